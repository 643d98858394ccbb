/* rpc.client: publishes requests (mandatory, reply_to, a fresh uuid correlation id, expiration)
 * and matches replies to pending calls by correlation id. */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include <uuid/uuid.h>

#include "rpc.h"

#define CLIENT_MT "rpc.client"

enum reply_mode { REPLY_DIRECT, REPLY_EXCLUSIVE, REPLY_NAMED };

struct rpc_client {
  struct rpc_conn conn;
  struct rpc_loop *loop;
  char queue[256];
  enum reply_mode mode;
  char reply_to[256];   /* what requests carry: the direct pseudo-queue or our queue's name */
  double timeout;
  struct rpc_pending pending;
  amqp_pool_t pool;     /* per-call headers, recycled after each publish */
  int open;
  struct { lua_Integer calls, replies, timeouts, remote_errors, no_route, discarded; } stats;
};

static struct rpc_client *check_client(lua_State *L) {
  return luaL_checkudata(L, 1, CLIENT_MT);
}

/* ---- connecting ---- */

static void set_reply_to(struct rpc_client *c, amqp_bytes_t name) {
  size_t n = name.len < sizeof c->reply_to ? name.len : sizeof c->reply_to - 1;
  memcpy(c->reply_to, name.bytes, n);
  c->reply_to[n] = '\0';
}

/* Opens the connection and the reply path: the direct reply-to consumer must exist before the
 * first publish; an exclusive queue is the tutorial's way; a named one survives the client. */
static int client_connect(struct rpc_client *c) {
  if (conn_open(&c->conn)) return -1;
  amqp_connection_state_t a = c->conn.amqp;
  if (c->mode != REPLY_DIRECT) {
    int named = c->mode == REPLY_NAMED;
    amqp_queue_declare_ok_t *ok =
        amqp_queue_declare(a, RPC_CHANNEL, named ? amqp_cstring_bytes(c->reply_to) : amqp_empty_bytes,
                           0, named, !named, !named, amqp_empty_table);
    if (conn_check_reply(&c->conn, "declaring the reply queue")) return -1;
    if (!named) set_reply_to(c, ok->queue);
  }
  /* a named reply queue is consumed exclusively: a second client would steal replies */
  amqp_basic_consume(a, RPC_CHANNEL, amqp_cstring_bytes(c->reply_to), amqp_empty_bytes, 0, 1,
                     c->mode == REPLY_NAMED, amqp_empty_table);
  return conn_check_reply(&c->conn, "consuming replies");
}

static const char *const client_options[] = {"url", "heartbeat", "connect_timeout", "timeout",
                                             "reply_to", NULL};

/* rpc.client(queue [, opts]): the client, or nil, message, kind. */
static int client_new(lua_State *L) {
  size_t qlen, rlen;
  const char *queue = luaL_checklstring(L, 1, &qlen);
  luaL_argcheck(L, qlen < 256, 1, "queue name longer than 255 bytes");
  opts_check_keys(L, 2, client_options);
  double timeout = opts_number(L, 2, "timeout", RPC_DEFAULT_CALL_TIMEOUT, 0.001, RPC_MAX_TIMEOUT);
  const char *reply_to = opts_string(L, 2, "reply_to", "direct", &rlen);
  luaL_argcheck(L, rlen > 0 && rlen < 256, 2, "option 'reply_to' must be 1 to 255 bytes");

  struct rpc_client *c = lua_newuserdatauv(L, sizeof *c, 0);
  memset(c, 0, sizeof *c);
  luaL_setmetatable(L, CLIENT_MT);
  init_amqp_pool(&c->pool, 4096);
  c->open = 1;  /* from here on, close (and so __gc) frees whatever is acquired */
  conn_init(L, &c->conn, 2);
  memcpy(c->queue, queue, qlen + 1);
  c->timeout = timeout;
  if (strcmp(reply_to, "direct") == 0) {
    c->mode = REPLY_DIRECT;
    strcpy(c->reply_to, RPC_DIRECT_REPLY_TO);
  } else if (strcmp(reply_to, "exclusive") == 0) {
    c->mode = REPLY_EXCLUSIVE;
  } else {
    c->mode = REPLY_NAMED;
    memcpy(c->reply_to, reply_to, rlen + 1);
  }
  if (client_connect(c)) return rpc_fail(L, c->conn.error_kind, c->conn.error);  /* __gc frees */
  c->loop = loop_get(L);
  return 1;
}

/* ---- matching replies ---- */

static int correlation_of(const amqp_basic_properties_t *p, unsigned char id[16]) {
  char text[37];
  if (!p || !(p->_flags & AMQP_BASIC_CORRELATION_ID_FLAG) || p->correlation_id.len != 36) return 0;
  memcpy(text, p->correlation_id.bytes, 36);
  text[36] = '\0';
  return uuid_parse(text, id) == 0;
}

struct outcome {
  enum call_state state;
  const char *kind;
  const char *data;
  size_t len;
  char text[512];
};

/* What a reply or a returned request means for its call. */
static void read_outcome(struct rpc_client *c, enum conn_event ev, struct outcome *o) {
  const struct rpc_message *m = &c->conn.msg;
  size_t len;
  const char *error = conn_header(m->props, RPC_ERROR_HEADER, &len);
  if (ev == EV_RETURN) {
    const amqp_basic_return_t *r = &m->returned;
    snprintf(o->text, sizeof o->text,
             "no route: nothing is bound to routing key '%.*s' on exchange '%.*s' (%d %.*s)",
             (int)r->routing_key.len, (const char *)r->routing_key.bytes, (int)r->exchange.len,
             (const char *)r->exchange.bytes, r->reply_code, (int)r->reply_text.len,
             (const char *)r->reply_text.bytes);
    o->state = CALL_FAILED;
    o->kind = "no_route";
    o->data = o->text;
    o->len = strlen(o->text);
    c->stats.no_route++;
  } else {
    o->state = error ? CALL_FAILED : CALL_REPLIED;
    o->kind = error ? "remote" : NULL;
    o->data = error ? error : m->body;
    o->len = error ? len : m->size;
    c->stats.replies++;
    if (error) c->stats.remote_errors++;
  }
}

static int push_outcome(lua_State *L, enum call_state state, const char *kind, const char *data,
                        size_t len) {
  if (state == CALL_REPLIED) {
    lua_pushlstring(L, data, len);
    return 1;
  }
  lua_pushnil(L);
  lua_pushlstring(L, data, len);
  lua_pushstring(L, kind);
  return 3;
}

/* Settles the call a message answers. Pushes the result and returns its count if that call is
 * target; a reply for another pending call is kept for it; any other is discarded. */
static int settle(lua_State *L, struct rpc_client *c, enum conn_event ev, const unsigned char *target) {
  unsigned char id[16];
  struct rpc_call *call;
  if (!correlation_of(c->conn.msg.props, id) || !(call = pending_find(&c->pending, id)) ||
      call->state != CALL_WAITING) {
    c->stats.discarded++;  /* late, duplicated, foreign or missing id */
    return 0;
  }
  struct outcome o;
  read_outcome(c, ev, &o);
  if (memcmp(id, target, 16) == 0) {
    int n = push_outcome(L, o.state, o.kind, o.data, o.len);
    pending_remove(&c->pending, call);
    return n;
  }
  if (pending_settle(call, o.state, o.kind, o.data, o.len)) luaL_error(L, "not enough memory");
  return 0;
}

/* Reads what the broker has sent, never waiting. Returns the target's result count, or 0. */
static int read_replies(lua_State *L, struct rpc_client *c, const unsigned char *target) {
  for (;;) {
    enum conn_event ev = conn_pump(&c->conn);
    if (ev == EV_NONE) return 0;
    if (ev == EV_CANCELLED) conn_lost(&c->conn, "connection", "the broker cancelled the reply consumer");
    if (ev == EV_FAILED || ev == EV_CANCELLED) {
      pending_fail_all(&c->pending, c->conn.error_kind, c->conn.error);
      return 0;
    }
    int n = settle(L, c, ev, target);
    conn_release_message(&c->conn);
    if (n) return n;
  }
}

static int wait_for(lua_State *L, struct rpc_client *c, const unsigned char *id, double deadline,
                    double timeout) {
  for (;;) {
    if (!c->open) return rpc_fail(L, "closed", "client closed while waiting for a reply");
    struct rpc_call *call = pending_find(&c->pending, id);
    if (call->state != CALL_WAITING) {  /* settled while a nested handler was reading */
      int n = push_outcome(L, call->state, call->kind, call->data, call->len);
      pending_remove(&c->pending, call);
      return n;
    }
    int n = read_replies(L, c, id);
    if (n) return n;
    if (pending_find(&c->pending, id)->state != CALL_WAITING) continue;
    if (rpc_now() >= deadline) {
      pending_remove(&c->pending, pending_find(&c->pending, id));
      c->stats.timeouts++;
      lua_pushnil(L);
      lua_pushfstring(L, "no reply from queue '%s' within %f s", c->queue, timeout);
      lua_pushliteral(L, "timeout");
      return 3;
    }
    loop_wait(L, c->loop, &c->conn, deadline);
  }
}

/* ---- publishing ---- */

static const char *const call_options[] = {"content_type", "headers", "persistent", "priority",
                                           "exchange", "routing_key", NULL};

static amqp_bytes_t short_string(lua_State *L, const char *key, const char *def) {
  size_t len;
  const char *s = opts_string(L, 4, key, def, &len);
  if (len > 255)
    luaL_argerror(L, 4, lua_pushfstring(L, "option '%s' longer than 255 bytes", key));
  amqp_bytes_t b = {len, (void *)s};
  return b;
}

/* Reads callopts (argument 4) into props, exchange and routing key; headers are built in
 * pool, or only checked when there is none. */
static void read_call_options(lua_State *L, struct rpc_client *c, amqp_pool_t *pool,
                              amqp_basic_properties_t *p,
                              amqp_bytes_t *exchange, amqp_bytes_t *routing_key) {
  *exchange = amqp_empty_bytes;
  *routing_key = amqp_cstring_bytes(c->queue);
  if (lua_isnoneornil(L, 4)) return;
  opts_check_keys(L, 4, call_options);
  amqp_bytes_t content_type = short_string(L, "content_type", NULL);
  if (content_type.bytes) {
    p->_flags |= AMQP_BASIC_CONTENT_TYPE_FLAG;
    p->content_type = content_type;
  }
  if (opts_boolean(L, 4, "persistent", 0)) {
    p->_flags |= AMQP_BASIC_DELIVERY_MODE_FLAG;
    p->delivery_mode = 2;
  }
  lua_Integer priority = opts_integer(L, 4, "priority", -1, 0, 255);
  if (priority >= 0) {
    p->_flags |= AMQP_BASIC_PRIORITY_FLAG;
    p->priority = (uint8_t)priority;
  }
  *exchange = short_string(L, "exchange", "");
  *routing_key = short_string(L, "routing_key", c->queue);
  if (lua_getfield(L, 4, "headers") != LUA_TNIL) {
    if (!lua_istable(L, -1))
      luaL_argerror(L, 4, lua_pushfstring(L, "option 'headers' must be a table, got %s",
                                          luaL_typename(L, -1)));
    table_from_lua(L, lua_gettop(L), 4, pool, &p->headers);  /* strings stay in callopts */
    p->_flags |= AMQP_BASIC_HEADERS_FLAG;
  }
  lua_pop(L, 1);
}

/* client:call(body [, timeout [, callopts]]) */
static int client_call(lua_State *L) {
  struct rpc_client *c = check_client(L);
  size_t len;
  const char *body = luaL_checklstring(L, 2, &len);  /* a number becomes its decimal text */
  double timeout = opts_check_timeout(L, 3, c->timeout);
  amqp_basic_properties_t props;
  amqp_bytes_t exchange, routing_key;
  props._flags = 0;
  if (c->open) recycle_amqp_pool(&c->pool);
  read_call_options(L, c, c->open ? &c->pool : NULL, &props, &exchange, &routing_key);
  if (!c->open) return rpc_fail(L, "closed", "client closed");
  /* after a quiet spell the broker may have dropped us (missed heartbeats, a restart): read
   * first, so a dead connection is replaced before publishing rather than failing the call */
  if (c->conn.amqp && rpc_now() - c->conn.last_pumped > RPC_SLICE * 5) {
    static const unsigned char nobody[16];  /* no random uuid is all zeros */
    read_replies(L, c, nobody);
  }
  if (!c->conn.amqp && client_connect(c)) return rpc_fail(L, c->conn.error_kind, c->conn.error);

  unsigned char id[16];
  char id_text[37], expiration[32];
  uuid_generate_random(id);
  uuid_unparse_lower(id, id_text);
  snprintf(expiration, sizeof expiration, "%.0f", ceil(timeout * 1000));
  props._flags |= AMQP_BASIC_CORRELATION_ID_FLAG | AMQP_BASIC_REPLY_TO_FLAG | AMQP_BASIC_EXPIRATION_FLAG;
  props.correlation_id = (amqp_bytes_t){36, id_text};
  props.reply_to = amqp_cstring_bytes(c->reply_to);
  props.expiration = amqp_cstring_bytes(expiration);

  if (!pending_add(&c->pending, id)) return luaL_error(L, "not enough memory");
  c->stats.calls++;
  /* mandatory: an unroutable request comes back as basic.return and fails the call at once */
  if (conn_publish(&c->conn, exchange, routing_key, 1, &props, (amqp_bytes_t){len, (void *)body})) {
    pending_fail_all(&c->pending, c->conn.error_kind, c->conn.error);
    return wait_for(L, c, id, 0, timeout);
  }
  return wait_for(L, c, id, rpc_now() + timeout, timeout);
}

/* ---- the rest ---- */

static int client_close(lua_State *L) {
  struct rpc_client *c = check_client(L);
  if (!c->open) return 0;
  c->open = 0;
  pending_free(&c->pending);
  conn_free(&c->conn);
  empty_amqp_pool(&c->pool);
  return 0;
}

static int client_stats(lua_State *L) {
  struct rpc_client *c = check_client(L);
  lua_createtable(L, 0, 6);
  rpc_set_count(L, "calls", c->stats.calls);
  rpc_set_count(L, "replies", c->stats.replies);
  rpc_set_count(L, "timeouts", c->stats.timeouts);
  rpc_set_count(L, "remote_errors", c->stats.remote_errors);
  rpc_set_count(L, "no_route", c->stats.no_route);
  rpc_set_count(L, "discarded", c->stats.discarded);
  return 1;
}

static int client_tostring(lua_State *L) {
  struct rpc_client *c = check_client(L);
  if (!c->open) lua_pushliteral(L, "rpc.client (closed)");
  else if (c->mode == REPLY_NAMED)
    lua_pushfstring(L, "rpc.client (%s, queue '%s', reply_to '%s')", c->conn.where, c->queue, c->reply_to);
  else
    lua_pushfstring(L, "rpc.client (%s, queue '%s', reply_to %s)", c->conn.where, c->queue,
                    c->mode == REPLY_DIRECT ? "direct" : "exclusive");
  return 1;
}

static const luaL_Reg client_methods[] = {
    {"call", client_call}, {"close", client_close}, {"stats", client_stats}, {NULL, NULL}};

static const luaL_Reg client_meta[] = {{"__gc", client_close},
                                       {"__close", client_close},
                                       {"__tostring", client_tostring},
                                       {NULL, NULL}};

int rpc_client_open(lua_State *L) {
  rpc_new_type(L, CLIENT_MT, client_meta, client_methods);
  lua_pushcfunction(L, client_new);
  lua_setfield(L, -2, "client");
  return 0;
}
