/* rpc.connection: the plain AMQP patterns around RPC (the RabbitMQ tutorials 1 to 5) on the
 * same connection machinery as clients and servers: declare, bind, publish, consume, receive,
 * acknowledge. Synchronous methods go through rabbitmq-c (deliveries that arrive meanwhile are
 * queued by it); deliveries are read by conn_pump and waited for in the shared wait loop. */
#include <math.h>
#include <stddef.h>
#include <string.h>

#include "rpc.h"

#define CONNECTION_MT "rpc.connection"
#define CONNECTION_MAX_BODY 134217728  /* as a client: RabbitMQ's default max_message_size */
#define READ_AHEAD 16  /* deliveries read ahead at most: the rest waits in the socket (back-pressure) */
/* Delivery tags restart at 1 on every channel: the tags receive gives carry their connection's
 * generation above TAG_BITS (0 on the first, so those are the broker's own numbers). */
#define TAG_BITS 40
#define TAG_MASK ((((lua_Integer)1) << TAG_BITS) - 1)
#define GENERATIONS (((lua_Integer)1) << 22)

/* user values */
enum { UV_INBOX = 1, UV_MANUAL, UV_RECEIVERS, UV_COUNT = UV_RECEIVERS };
/* UV_RECEIVERS: handler threads suspended in receive (thread pointer -> true), woken by a read;
 * UV_INBOX: messages read while doing something else (a list, oldest first);
 * UV_MANUAL: consumer tag -> true for consumers with manual acks (to reject what is too large) */

struct rpc_connection {
  struct rpc_conn conn;
  struct rpc_loop *loop;
  struct rpc_watch watch;  /* the loop reads ahead (and answers heartbeats) while others wait */
  int unreported;     /* a loss the loop found, for the next operation to report */
  amqp_pool_t pool;   /* a publish's headers, recycled per publish */
  int open;
  int reading;        /* a message is in hand: a finalizer must not read past it */
  int close_pending;  /* closed by a finalizer while a message was in hand: closed after it */
  lua_Integer inbox_first, inbox_last;
  lua_Integer generation;  /* connections opened before this one, modulo GENERATIONS */
  int consumers;      /* consumers this connection holds */
  int exclusive;      /* it declared an exclusive queue */
};

static struct rpc_connection *check_connection(lua_State *L) {
  return luaL_checkudata(L, 1, CONNECTION_MT);
}

static int closed(lua_State *L) {
  return rpc_fail(L, "closed", "connection closed");
}

static int lost(lua_State *L, struct rpc_connection *m) {
  return rpc_fail(L, m->conn.error_kind ? m->conn.error_kind : "connection", m->conn.error);
}

/* ---- messages to Lua ---- */

static void set_bytes(lua_State *L, const char *name, amqp_bytes_t b) {
  lua_pushlstring(L, b.bytes, b.len);
  lua_setfield(L, -2, name);
}

static void set_integer(lua_State *L, const char *name, lua_Integer n) {
  lua_pushinteger(L, n);
  lua_setfield(L, -2, name);
}

static void push_properties(lua_State *L, const amqp_basic_properties_t *p) {
  amqp_flags_t f = p->_flags;
  if (f & AMQP_BASIC_CONTENT_TYPE_FLAG) set_bytes(L, "content_type", p->content_type);
  if (f & AMQP_BASIC_CONTENT_ENCODING_FLAG) set_bytes(L, "content_encoding", p->content_encoding);
  if (f & AMQP_BASIC_DELIVERY_MODE_FLAG) set_integer(L, "delivery_mode", p->delivery_mode);
  if (f & AMQP_BASIC_PRIORITY_FLAG) set_integer(L, "priority", p->priority);
  if (f & AMQP_BASIC_CORRELATION_ID_FLAG) set_bytes(L, "correlation_id", p->correlation_id);
  if (f & AMQP_BASIC_REPLY_TO_FLAG) set_bytes(L, "reply_to", p->reply_to);
  if (f & AMQP_BASIC_EXPIRATION_FLAG) set_bytes(L, "expiration", p->expiration);
  if (f & AMQP_BASIC_MESSAGE_ID_FLAG) set_bytes(L, "message_id", p->message_id);
  if (f & AMQP_BASIC_TIMESTAMP_FLAG) set_integer(L, "timestamp", (lua_Integer)p->timestamp);
  if (f & AMQP_BASIC_TYPE_FLAG) set_bytes(L, "type", p->type);
  if (f & AMQP_BASIC_USER_ID_FLAG) set_bytes(L, "user_id", p->user_id);
  if (f & AMQP_BASIC_APP_ID_FLAG) set_bytes(L, "app_id", p->app_id);
  if (f & AMQP_BASIC_HEADERS_FLAG) {
    if (table_push(L, &p->headers)) {
      lua_setfield(L, -2, "headers");
    } else {  /* over 16 levels or 1024 entries: not built, said so */
      lua_pushboolean(L, 1);
      lua_setfield(L, -2, "headers_too_large");
    }
  }
}

/* The message in m->conn.msg as a table, pushed. */
static void push_message(lua_State *L, struct rpc_connection *m) {
  const struct rpc_message *msg = &m->conn.msg;
  lua_createtable(L, 0, 10);
  lua_pushlstring(L, msg->body, msg->size);
  lua_setfield(L, -2, "body");
  if (msg->kind == EV_DELIVERY) {
    const amqp_basic_deliver_t *d = &msg->deliver;
    set_integer(L, "delivery_tag", m->generation << TAG_BITS | ((lua_Integer)d->delivery_tag & TAG_MASK));
    lua_pushboolean(L, d->redelivered);
    lua_setfield(L, -2, "redelivered");
    set_bytes(L, "exchange", d->exchange);
    set_bytes(L, "routing_key", d->routing_key);
    set_bytes(L, "consumer_tag", d->consumer_tag);
  } else {  /* basic.return: a mandatory message nothing was bound for */
    const amqp_basic_return_t *r = &msg->returned;
    lua_pushboolean(L, 1);
    lua_setfield(L, -2, "returned");
    set_integer(L, "reply_code", r->reply_code);
    set_bytes(L, "reply_text", r->reply_text);
    set_bytes(L, "exchange", r->exchange);
    set_bytes(L, "routing_key", r->routing_key);
  }
  if (msg->props) push_properties(L, msg->props);
}

/* A delivery over max_body was never buffered: a consumer with manual acks gets it rejected
 * (dead-lettered, if the queue says so), and the caller a too_large failure. */
static int refuse_too_large(lua_State *L, struct rpc_connection *m) {
  const struct rpc_message *msg = &m->conn.msg;
  if (msg->kind == EV_DELIVERY) {
    lua_getiuservalue(L, 1, UV_MANUAL);
    lua_pushlstring(L, msg->deliver.consumer_tag.bytes, msg->deliver.consumer_tag.len);
    int manual = lua_rawget(L, -2) != LUA_TNIL;
    lua_pop(L, 2);
    if (manual) amqp_basic_reject(m->conn.amqp, RPC_CHANNEL, msg->deliver.delivery_tag, 0);
  }
  lua_pushnil(L);
  lua_pushfstring(L, "a message of %I bytes from %s is over max_body (%I)%s",
                  (lua_Integer)msg->size, m->conn.where, (lua_Integer)m->conn.max_body,
                  msg->kind == EV_DELIVERY ? ", rejected" : "");
  lua_pushliteral(L, "too_large");
  return 3;
}

/* ---- reading ---- */

static void close_now(lua_State *L, struct rpc_connection *m);

static int push_protected(lua_State *L) {
  struct rpc_connection *m = lua_touserdata(L, 1);
  if (m->conn.msg.oversized) return refuse_too_large(L, m);
  push_message(L, m);
  return 1;
}

/* Reads what has arrived, never waiting: pushes one message (1), a failure (3), or nothing (0).
 * A cancelled consumer is a failure; the connection stays. Building the message runs protected:
 * a raise (out of memory) releases it and clears the flags before going on up. */
static int read_one(lua_State *L, struct rpc_connection *m) {
  for (;;) {
    enum conn_event ev = conn_pump(&m->conn);
    switch (ev) {
      case EV_NONE: return 0;
      case EV_FAILED: return lost(L, m);
      case EV_CANCELLED:
        if (m->consumers > 0) m->consumers--;
        return rpc_fail(L, "broker", "the broker cancelled a consumer (was its queue deleted?)");
      case EV_DELIVERY:
      case EV_RETURN: {
        int top = lua_gettop(L);
        lua_pushcfunction(L, push_protected);
        lua_pushvalue(L, 1);
        m->reading = 1;
        int status = lua_pcall(L, 1, LUA_MULTRET, 0);
        m->reading = 0;
        conn_release_message(&m->conn);
        if (m->close_pending) close_now(L, m);
        if (status != LUA_OK) return lua_error(L);
        return lua_gettop(L) - top;
      }
      default: continue;  /* blocked, nacked: nothing a receiver must see */
    }
  }
}

/* Appends what read_one pushed (n = 1: a message; 3: nil, message, kind, kept as a table
 * without body) to the inbox, for receive. */
static void inbox_push(lua_State *L, struct rpc_connection *m, int n) {
  if (n == 3) {
    lua_createtable(L, 0, 2);
    lua_insert(L, -3);
    lua_setfield(L, -3, "kind");
    lua_setfield(L, -2, "message");
    lua_remove(L, -2);  /* the nil */
  }
  if (lua_getiuservalue(L, 1, UV_INBOX) != LUA_TTABLE) {  /* closed by a finalizer just now */
    lua_pop(L, 2);
    return;
  }
  lua_insert(L, -2);
  lua_rawseti(L, -2, ++m->inbox_last);
  lua_pop(L, 1);
}

/* Pushes the inbox's oldest entry as receive's result (1 or 3). */
static int inbox_take(lua_State *L, struct rpc_connection *m) {
  lua_getiuservalue(L, 1, UV_INBOX);
  lua_rawgeti(L, -1, m->inbox_first);
  lua_pushnil(L);
  lua_rawseti(L, -3, m->inbox_first++);
  if (lua_getfield(L, -1, "body") != LUA_TNIL) {
    lua_pop(L, 1);
    return 1;
  }
  lua_getfield(L, -2, "message");
  lua_getfield(L, -3, "kind");
  return 3;
}

static void forget_old_connection(lua_State *L, struct rpc_connection *m);

/* Reads what has arrived into the inbox, so that a connection the broker closed is noticed
 * (and replaced) before an operation, and its heartbeats are answered. 0, or a failure pushed. */
static int drain(lua_State *L, struct rpc_connection *m) {
  int n;
  while (m->inbox_last - m->inbox_first + 1 < READ_AHEAD && (n = read_one(L, m)) != 0) {
    if (!m->open) {  /* closed by a finalizer: what was read goes back to the broker */
      lua_pop(L, n);
      return 0;
    }
    if (n == 3 && !m->conn.amqp) {  /* lost: the caller reports it now */
      forget_old_connection(L, m);
      return 3;
    }
    inbox_push(L, m, n);  /* a message, a cancelled consumer, a message too large: receive's */
  }
  return 0;
}

/* A new connection: its consumers are gone, and so are the deliveries read ahead for
 * consumers with manual acks (the broker redelivers them; their tags would ack others on the
 * new channel). Deliveries the broker counted as acked are kept for receive. */
static void forget_old_connection(lua_State *L, struct rpc_connection *m) {
  lua_getiuservalue(L, 1, UV_INBOX);
  lua_getiuservalue(L, 1, UV_MANUAL);
  lua_newtable(L);
  lua_Integer kept = 0;
  for (lua_Integer i = m->inbox_first; i <= m->inbox_last; i++) {
    lua_rawgeti(L, -3, i);
    int auto_acked = lua_getfield(L, -1, "consumer_tag") == LUA_TSTRING &&
                     (lua_rawget(L, -4), lua_isnil(L, -1));  /* manual[tag] */
    lua_pop(L, 1);
    if (auto_acked) lua_rawseti(L, -2, ++kept);
    else lua_pop(L, 1);
  }
  lua_setiuservalue(L, 1, UV_INBOX);
  lua_pop(L, 2);
  lua_newtable(L);
  lua_setiuservalue(L, 1, UV_MANUAL);
  m->inbox_first = 1;
  m->inbox_last = kept;
  m->consumers = m->exclusive = 0;
}

static int quiet(const struct rpc_connection *m) {
  return m->conn.amqp && rpc_now() - m->conn.last_pumped > RPC_HEARTBEAT_READ;
}

/* Holds nothing a new connection would lack (no consumer, no exclusive queue): such a
 * connection is replaced without a word when lost, as a client's is. */
static int stateless(const struct rpc_connection *m) {
  return m->consumers == 0 && !m->exclusive;
}

/* A new connection in place of the lost one: 0, or a failure pushed. */
static int reconnect(lua_State *L, struct rpc_connection *m) {
  forget_old_connection(L, m);
  if (!m->open) return closed(L);  /* by a finalizer its allocations ran */
  if (conn_open(&m->conn, m->conn.connect_timeout)) return lost(L, m);
  m->generation = (m->generation + 1) % GENERATIONS;
  return 0;
}

/* For every operation: open, and connected. A loss is reported once, by the operation that
 * meets it, and the next one replaces the connection; a stateless connection that merely lost
 * its link (kind connection: a close by the broker's operator, a restart, missed heartbeats)
 * is replaced at once. A refused operation (a publish to a missing exchange, a bad tag) is
 * always reported. What the broker has sent meanwhile is read first. */
static int ready(lua_State *L, struct rpc_connection *m) {
  if (!m->open) return closed(L);
  if (m->unreported) {
    m->unreported = 0;
    return lost(L, m);
  }
  int quietly = stateless(m), n;
  if (conn_should_read(&m->conn) && (n = drain(L, m))) {
    if (!quietly || strcmp(lua_tostring(L, -1), "connection") != 0) return n;
    lua_pop(L, n);
  }
  if (!m->open) return closed(L);  /* by a finalizer, while reading ahead */
  return m->conn.amqp ? 0 : reconnect(L, m);
}

static struct rpc_connection *check_usable(lua_State *L) {
  struct rpc_connection *m = check_connection(L);
  luaL_argcheck(L, !m->reading, 1, "connection in use: called from a finalizer while it reads a message");
  return m;
}

static void set_receiver(lua_State *L, int waiting) {
  lua_getiuservalue(L, 1, UV_RECEIVERS);
  if (waiting) lua_pushboolean(L, 1);
  else lua_pushnil(L);
  lua_rawsetp(L, -2, L);
  lua_pop(L, 1);
}

/* One look for a suspended receive: a message, a loss, closed or the deadline pushed (their
 * count), or 0: wait on. */
static int receive_look(lua_State *L, struct rpc_connection *m, double deadline) {
  if (!m->open) return closed(L);
  if (m->inbox_first <= m->inbox_last) return inbox_take(L, m);
  if (m->unreported || !m->conn.amqp) {
    m->unreported = 0;
    return lost(L, m);
  }
  if (rpc_now() >= deadline)
    return rpc_fail(L, "timeout", lua_pushfstring(L, "no message within %f s", luaL_optnumber(L, 2, HUGE_VAL)));
  return 0;
}

/* receive in a handler thread: suspended until the loop reads a message for the inbox, a loss,
 * or the deadline (on top of the stack). */
static int receive_k(lua_State *L, int status, lua_KContext ctx) {
  (void)status;
  lua_settop(L, (int)ctx);
  loop_unsuspend(L);
  struct rpc_connection *m = lua_touserdata(L, 1);
  double deadline = lua_tonumber(L, (int)ctx);
  set_receiver(L, 0);
  int n = receive_look(L, m, deadline);
  if (n) return n;
  if (loop_signalled())  /* SIGINT/SIGTERM caught by run(), which now lets its handlers end */
    return rpc_fail(L, "interrupted", "interrupted while waiting for a message");
  set_receiver(L, 1);
  return loop_suspend(L, deadline, ctx, receive_k);
}

/* receive in an outside scheduler's coroutine: yields to it, and on each wake does the state's
 * ready work (which reads ahead into the inbox). The deadline at ctx, the top. */
static int receive_outside_k(lua_State *L, int status, lua_KContext ctx) {
  (void)status;
  lua_settop(L, (int)ctx);
  struct rpc_connection *m = lua_touserdata(L, 1);
  set_receiver(L, 0);
  double deadline = lua_tonumber(L, (int)ctx);
  if (m->open) loop_step(L, m->loop);
  lua_settop(L, (int)ctx);
  int n = receive_look(L, m, deadline);
  if (n) return n;
  set_receiver(L, 1);  /* another's step that reads a message for it wakes it (the epoll set) */
  return loop_yield_outside(L, 1, fmin(deadline - rpc_now(), RPC_MAX_TIMEOUT), ctx, receive_outside_k);
}

/* conn:receive([timeout]): the next message of any consumer, or nil, message, kind. */
static int connection_receive(lua_State *L) {
  struct rpc_connection *m = check_usable(L);
  double timeout = luaL_optnumber(L, 2, HUGE_VAL);
  luaL_argcheck(L, timeout >= 0, 2, "timeout must be a number of seconds, 0 or more");
  if (!m->open) return closed(L);
  int n;
  if (m->unreported) {
    m->unreported = 0;
    return lost(L, m);
  }
  /* after a quiet spell, a loss the broker told of comes first; auto-acked deliveries stay for
   * later. Otherwise the wait below reads: a message it converts is returned, not read ahead. */
  if (quiet(m) && (n = drain(L, m))) return n;
  if (!m->open) return closed(L);
  if (m->inbox_first <= m->inbox_last) return inbox_take(L, m);  /* read while doing something else */
  if (!m->conn.amqp && (n = reconnect(L, m))) return n;
  double deadline = rpc_now() + (timeout > RPC_MAX_TIMEOUT ? RPC_MAX_TIMEOUT * 1000 : timeout);
  if (timeout > 0 && loop_can_suspend(L)) {  /* the loop reads for it */
    lua_settop(L, 2);
    lua_pushnumber(L, deadline);
    return receive_k(L, LUA_OK, 3);
  }
  if (timeout > 0 && loop_can_yield_outside(L)) {
    lua_settop(L, 2);
    lua_pushnumber(L, deadline);
    return receive_outside_k(L, LUA_OK, 3);
  }
  lua_Hook hook = lua_gethook(L);
  unsigned long interrupts = loop_interrupts(m->loop);
  int input = conn_has_input(&m->conn) || timeout == 0;
  for (;;) {
    if (!m->open) return closed(L);
    if (m->inbox_first <= m->inbox_last) return inbox_take(L, m);  /* a handler served meanwhile read it */
    if (!m->conn.amqp) return lost(L, m);
    if (input && (n = read_one(L, m))) return n;
    if (rpc_now() >= deadline)
      return rpc_fail(L, "timeout", lua_pushfstring(L, "no message within %f s", timeout));
    /* Ctrl-C (lua.c's hook, here or taken by a handler this wait ran), or SIGINT/SIGTERM caught
     * by a server's run() whose handler waits here */
    if (lua_gethook(L) != hook || loop_signalled() || loop_interrupts(m->loop) != interrupts)
      return rpc_fail(L, "interrupted", "interrupted while waiting for a message");
    input = loop_wait(L, m->loop, &m->conn, deadline);
  }
}

/* ---- the loop's view ---- */

static const struct rpc_connection *connection_of(const struct rpc_watch *w) {
  return (const struct rpc_connection *)(const void *)((const char *)w - offsetof(struct rpc_connection, watch));
}

/* Reads ahead while the inbox has room. */
static int readable_now(const struct rpc_connection *m) {
  return m->open && !m->reading && m->conn.amqp && m->inbox_last - m->inbox_first + 1 < READ_AHEAD;
}

static int watch_pollfd(const struct rpc_watch *w) {
  const struct rpc_connection *m = connection_of(w);
  return readable_now(m) ? conn_fd(&m->conn) : -1;
}

static int watch_has_input(const struct rpc_watch *w) {
  const struct rpc_connection *m = connection_of(w);
  return readable_now(m) && conn_has_input(&m->conn);
}

static double watch_next_due(const struct rpc_watch *w) {
  const struct rpc_connection *m = connection_of(w);
  return readable_now(m) ? m->conn.last_pumped + RPC_HEARTBEAT_READ : HUGE_VAL;
}

/* Reads ahead into the inbox and wakes the handler threads waiting in receive. A loss is kept
 * for the next operation to report (unless the connection holds nothing to lose). In a frame of
 * its own: drain and its helpers find the connection at index 1. */
static int step_protected(lua_State *L) {
  struct rpc_connection *m = lua_touserdata(L, 1);
  int quietly = stateless(m), n = drain(L, m);
  if (n) {
    lua_pop(L, n);
    m->unreported = !quietly;
  }
  if (lua_getiuservalue(L, 1, UV_RECEIVERS) == LUA_TTABLE) {
    lua_pushnil(L);
    while (lua_next(L, -2)) {
      lua_pop(L, 1);
      loop_wake(L, (lua_State *)lua_touserdata(L, -1));
    }
  }
  return 0;
}

static void watch_step(lua_State *L, int idx, double limit) {
  (void)limit;
  struct rpc_connection *m = lua_touserdata(L, idx);
  if (!readable_now(m)) return;
  lua_pushcfunction(L, step_protected);
  lua_pushvalue(L, idx);
  if (lua_pcall(L, 1, 0, 0) != LUA_OK) {  /* out of memory reading ahead, or a Ctrl-C */
    loop_took_interrupt(L, m->loop);
    lua_pop(L, 1);
  }
}

static const struct rpc_watch_ops watch_ops = {watch_pollfd, watch_has_input, watch_next_due, watch_step};

/* ---- options and arguments ---- */

static amqp_bytes_t name_arg(lua_State *L, int arg) {
  size_t len;
  const char *s = luaL_checklstring(L, arg, &len);
  luaL_argcheck(L, len <= 255, arg, "name longer than 255 bytes");
  luaL_argcheck(L, strlen(s) == len, arg, "name contains a NUL byte");
  return (amqp_bytes_t){len, (void *)s};
}

static amqp_bytes_t opt_name_arg(lua_State *L, int arg) {
  return lua_isnoneornil(L, arg) ? amqp_empty_bytes : name_arg(L, arg);
}

/* Arguments (x-message-ttl, x-match...): the table at idx, or nil, checked before anything is
 * acquired (bad entries name argument argn); built later in the connection's pool, its strings
 * staying in the caller's table. */
static void check_arguments(lua_State *L, int idx, int argn) {
  if (lua_isnil(L, idx)) return;
  if (!lua_istable(L, idx))
    luaL_argerror(L, argn, lua_pushfstring(L, "arguments must be a table, got %s", luaL_typename(L, idx)));
  table_from_lua(L, idx, argn, NULL, NULL);
}

static amqp_table_t build_arguments(lua_State *L, struct rpc_connection *m, int idx, int argn) {
  amqp_table_t t = amqp_empty_table;
  if (lua_isnil(L, idx)) return t;
  recycle_amqp_pool(&m->pool);
  table_from_lua(L, idx, argn, &m->pool, &t);
  return t;
}

/* opts.arguments of the options table at idx, pushed (nil or a table) and checked. */
static int arguments_option(lua_State *L, int idx) {
  opts_get(L, idx, "arguments");
  check_arguments(L, lua_gettop(L), idx);
  return lua_gettop(L);
}

static int done(lua_State *L, struct rpc_connection *m, const char *what) {
  if (conn_check_reply(&m->conn, what)) return lost(L, m);
  lua_pushboolean(L, 1);
  return 1;
}

/* ---- declaring ---- */

static const char *const exchange_types[] = {"direct", "fanout", "topic", "headers", NULL};
static const char *const exchange_options[] = {"durable", "auto_delete", "internal", "passive", "arguments", NULL};
static const char *const queue_options[] = {"durable", "exclusive", "auto_delete", "passive", "arguments", NULL};

/* conn:declare_exchange(name, type [, opts]) */
static int connection_declare_exchange(lua_State *L) {
  struct rpc_connection *m = check_usable(L);
  amqp_bytes_t name = name_arg(L, 2);
  const char *type = exchange_types[luaL_checkoption(L, 3, NULL, exchange_types)];
  opts_check_keys(L, 4, exchange_options);
  lua_settop(L, 4);  /* what is pushed next has a known index */
  int durable = opts_boolean(L, 4, "durable", 0), auto_delete = opts_boolean(L, 4, "auto_delete", 0);
  int internal = opts_boolean(L, 4, "internal", 0), passive = opts_boolean(L, 4, "passive", 0);
  int args = arguments_option(L, 4);
  int n = ready(L, m);
  if (n) return n;
  amqp_exchange_declare(m->conn.amqp, RPC_CHANNEL, name, amqp_cstring_bytes(type), passive, durable,
                        auto_delete, internal, build_arguments(L, m, args, 4));
  return done(L, m, "declaring the exchange");
}

/* name, messages, consumers = conn:declare_queue([name [, opts]]) */
static int connection_declare_queue(lua_State *L) {
  struct rpc_connection *m = check_usable(L);
  amqp_bytes_t name = opt_name_arg(L, 2);
  opts_check_keys(L, 3, queue_options);
  lua_settop(L, 3);
  int durable = opts_boolean(L, 3, "durable", 0), exclusive = opts_boolean(L, 3, "exclusive", 0);
  int auto_delete = opts_boolean(L, 3, "auto_delete", 0), passive = opts_boolean(L, 3, "passive", 0);
  int args = arguments_option(L, 3);
  int n = ready(L, m);
  if (n) return n;
  amqp_queue_declare_ok_t *ok = amqp_queue_declare(m->conn.amqp, RPC_CHANNEL, name, passive, durable,
                                                   exclusive, auto_delete, build_arguments(L, m, args, 3));
  if (conn_check_reply(&m->conn, "declaring the queue") || !ok) return lost(L, m);
  m->exclusive |= exclusive;
  lua_Integer messages = ok->message_count, consumers = ok->consumer_count;
  lua_pushlstring(L, ok->queue.bytes, ok->queue.len);  /* may run a finalizer: ok read before */
  lua_pushinteger(L, messages);
  lua_pushinteger(L, consumers);
  return 3;
}

/* conn:bind(queue, exchange [, routing_key [, arguments]]) and unbind */
static int bind_or_unbind(lua_State *L, int bind) {
  struct rpc_connection *m = check_usable(L);
  amqp_bytes_t queue = name_arg(L, 2), exchange = name_arg(L, 3), key = opt_name_arg(L, 4);
  lua_settop(L, 5);
  check_arguments(L, 5, 5);
  int n = ready(L, m);
  if (n) return n;
  amqp_table_t args = build_arguments(L, m, 5, 5);
  if (bind) amqp_queue_bind(m->conn.amqp, RPC_CHANNEL, queue, exchange, key, args);
  else amqp_queue_unbind(m->conn.amqp, RPC_CHANNEL, queue, exchange, key, args);
  return done(L, m, bind ? "binding the queue" : "unbinding the queue");
}

static int connection_bind(lua_State *L) { return bind_or_unbind(L, 1); }
static int connection_unbind(lua_State *L) { return bind_or_unbind(L, 0); }

/* count = conn:purge(queue) */
static int connection_purge(lua_State *L) {
  struct rpc_connection *m = check_usable(L);
  amqp_bytes_t queue = name_arg(L, 2);
  int n = ready(L, m);
  if (n) return n;
  amqp_queue_purge_ok_t *ok = amqp_queue_purge(m->conn.amqp, RPC_CHANNEL, queue);
  if (conn_check_reply(&m->conn, "purging the queue") || !ok) return lost(L, m);
  lua_pushinteger(L, ok->message_count);
  return 1;
}

static const char *const delete_queue_options[] = {"if_unused", "if_empty", NULL};
static const char *const delete_exchange_options[] = {"if_unused", NULL};

/* count = conn:delete_queue(queue [, opts]) */
static int connection_delete_queue(lua_State *L) {
  struct rpc_connection *m = check_usable(L);
  amqp_bytes_t queue = name_arg(L, 2);
  opts_check_keys(L, 3, delete_queue_options);
  int if_unused = opts_boolean(L, 3, "if_unused", 0), if_empty = opts_boolean(L, 3, "if_empty", 0);
  int n = ready(L, m);
  if (n) return n;
  amqp_queue_delete_ok_t *ok = amqp_queue_delete(m->conn.amqp, RPC_CHANNEL, queue, if_unused, if_empty);
  if (conn_check_reply(&m->conn, "deleting the queue") || !ok) return lost(L, m);
  lua_pushinteger(L, ok->message_count);
  return 1;
}

/* conn:delete_exchange(name [, opts]) */
static int connection_delete_exchange(lua_State *L) {
  struct rpc_connection *m = check_usable(L);
  amqp_bytes_t name = name_arg(L, 2);
  opts_check_keys(L, 3, delete_exchange_options);
  int if_unused = opts_boolean(L, 3, "if_unused", 0);
  int n = ready(L, m);
  if (n) return n;
  amqp_exchange_delete(m->conn.amqp, RPC_CHANNEL, name, if_unused);
  return done(L, m, "deleting the exchange");
}

/* ---- publishing ---- */

static const char *const property_names[] = {
    "content_type", "content_encoding", "headers", "persistent", "priority", "correlation_id",
    "reply_to", "expiration", "message_id", "timestamp", "type", "user_id", "app_id", NULL};

static void short_property(lua_State *L, int arg, const char *key, amqp_flags_t flag,
                           amqp_basic_properties_t *p, amqp_bytes_t *field) {
  size_t len;
  const char *s = opts_string(L, arg, key, NULL, &len);
  if (!s) return;
  if (len > 255) luaL_argerror(L, arg, lua_pushfstring(L, "property '%s' longer than 255 bytes", key));
  p->_flags |= flag;
  *field = (amqp_bytes_t){len, (void *)s};  /* the properties table keeps it alive */
}

/* The properties table at arg into p; headers only checked (publish builds them). */
static int read_properties(lua_State *L, int arg, amqp_basic_properties_t *p) {
  p->_flags = 0;
  if (lua_isnoneornil(L, arg)) return 0;
  opts_check_keys(L, arg, property_names);
  short_property(L, arg, "content_type", AMQP_BASIC_CONTENT_TYPE_FLAG, p, &p->content_type);
  short_property(L, arg, "content_encoding", AMQP_BASIC_CONTENT_ENCODING_FLAG, p, &p->content_encoding);
  short_property(L, arg, "correlation_id", AMQP_BASIC_CORRELATION_ID_FLAG, p, &p->correlation_id);
  short_property(L, arg, "reply_to", AMQP_BASIC_REPLY_TO_FLAG, p, &p->reply_to);
  short_property(L, arg, "expiration", AMQP_BASIC_EXPIRATION_FLAG, p, &p->expiration);
  short_property(L, arg, "message_id", AMQP_BASIC_MESSAGE_ID_FLAG, p, &p->message_id);
  short_property(L, arg, "type", AMQP_BASIC_TYPE_FLAG, p, &p->type);
  short_property(L, arg, "user_id", AMQP_BASIC_USER_ID_FLAG, p, &p->user_id);
  short_property(L, arg, "app_id", AMQP_BASIC_APP_ID_FLAG, p, &p->app_id);
  if (opts_boolean(L, arg, "persistent", 0)) {
    p->_flags |= AMQP_BASIC_DELIVERY_MODE_FLAG;
    p->delivery_mode = 2;
  }
  lua_Integer priority = opts_integer(L, arg, "priority", -1, 0, 255);
  if (priority >= 0) {
    p->_flags |= AMQP_BASIC_PRIORITY_FLAG;
    p->priority = (uint8_t)priority;
  }
  lua_Integer timestamp = opts_integer(L, arg, "timestamp", -1, 0, LUA_MAXINTEGER);
  if (timestamp >= 0) {
    p->_flags |= AMQP_BASIC_TIMESTAMP_FLAG;
    p->timestamp = (uint64_t)timestamp;
  }
  if (opts_get(L, arg, "headers") == LUA_TNIL) {
    lua_pop(L, 1);
    return 0;
  }
  if (!lua_istable(L, -1))
    luaL_argerror(L, arg, lua_pushfstring(L, "property 'headers' must be a table, got %s", luaL_typename(L, -1)));
  table_from_lua(L, lua_gettop(L), arg, NULL, NULL);
  return lua_gettop(L);  /* stays on the stack, keeping its strings alive */
}

/* conn:publish(exchange, routing_key, body [, properties [, mandatory]]) */
static int connection_publish(lua_State *L) {
  struct rpc_connection *m = check_usable(L);
  amqp_bytes_t exchange = name_arg(L, 2), key = name_arg(L, 3);
  size_t len;
  const char *body = luaL_checklstring(L, 4, &len);
  lua_settop(L, 6);
  amqp_basic_properties_t props;
  int headers = read_properties(L, 5, &props);
  int mandatory = lua_isnoneornil(L, 6) ? 0 : (luaL_checktype(L, 6, LUA_TBOOLEAN), lua_toboolean(L, 6));
  if (len > m->conn.max_body)
    return rpc_fail(L, "too_large", lua_pushfstring(L, "message body of %I bytes is over max_body (%I)",
                                                    (lua_Integer)len, (lua_Integer)m->conn.max_body));
  int n = ready(L, m);
  if (n) return n;
  if (m->conn.blocked[0]) return rpc_fail(L, "blocked", m->conn.blocked);
  double bound = m->conn.heartbeat ? 2.0 * m->conn.heartbeat : 60;
  amqp_bytes_t message = {len, (void *)body};
  int retry = stateless(m);
  for (;;) {
    if (headers) {  /* from here to the publish, nothing may run Lua code */
      recycle_amqp_pool(&m->pool);
      table_from_lua(L, headers, 5, &m->pool, &props.headers);
      props._flags |= AMQP_BASIC_HEADERS_FLAG;
    }
    if (!conn_publish(&m->conn, exchange, key, mandatory, &props, message, bound)) break;
    /* it never went out whole: a stateless connection tries once more on a new one (whose
     * set-up may run finalizers that publish: the headers are built again) */
    if (!retry) return lost(L, m);
    retry = 0;
    if ((n = reconnect(L, m))) return n;
  }
  lua_pushboolean(L, 1);
  return 1;
}

/* ---- consuming ---- */

static const char *const consume_options[] = {"ack", "prefetch", "exclusive", "tag", NULL};

/* tag = conn:consume(queue [, opts]) */
static int connection_consume(lua_State *L) {
  struct rpc_connection *m = check_usable(L);
  amqp_bytes_t queue = name_arg(L, 2);
  opts_check_keys(L, 3, consume_options);
  int manual = opts_boolean(L, 3, "ack", 1), exclusive = opts_boolean(L, 3, "exclusive", 0);
  lua_Integer prefetch = opts_integer(L, 3, "prefetch", -1, 0, 65535);
  size_t tag_len;
  const char *tag = opts_string(L, 3, "tag", "", &tag_len);
  luaL_argcheck(L, tag_len <= 255 && strlen(tag) == tag_len, 3, "option 'tag' must be at most 255 bytes, no NUL");
  int n = ready(L, m);
  if (n) return n;
  if (prefetch >= 0) {
    amqp_basic_qos(m->conn.amqp, RPC_CHANNEL, 0, (uint16_t)prefetch, 0);
    if (conn_check_reply(&m->conn, "setting the prefetch")) return lost(L, m);
  }
  amqp_basic_consume_ok_t *ok = amqp_basic_consume(m->conn.amqp, RPC_CHANNEL, queue,
                                                   (amqp_bytes_t){tag_len, (void *)tag}, 0, !manual,
                                                   exclusive, amqp_empty_table);
  if (conn_check_reply(&m->conn, "consuming the queue") || !ok) return lost(L, m);
  m->consumers++;
  lua_pushlstring(L, ok->consumer_tag.bytes, ok->consumer_tag.len);
  if (manual) {
    lua_getiuservalue(L, 1, UV_MANUAL);
    lua_pushvalue(L, -2);
    lua_pushboolean(L, 1);
    lua_rawset(L, -3);
    lua_pop(L, 1);
  }
  return 1;
}

/* conn:cancel(tag) */
static int connection_cancel(lua_State *L) {
  struct rpc_connection *m = check_usable(L);
  amqp_bytes_t tag = name_arg(L, 2);
  int n = ready(L, m);
  if (n) return n;
  amqp_basic_cancel(m->conn.amqp, RPC_CHANNEL, tag);
  if (conn_check_reply(&m->conn, "cancelling the consumer")) return lost(L, m);
  if (m->consumers > 0) m->consumers--;
  lua_getiuservalue(L, 1, UV_MANUAL);
  lua_pushvalue(L, 2);
  lua_pushnil(L);
  lua_rawset(L, -3);
  lua_pushboolean(L, 1);
  return 1;
}

static lua_Integer tag_arg(lua_State *L) {
  lua_Integer tag = luaL_checkinteger(L, 2);
  luaL_argcheck(L, tag > 0 && (tag & TAG_MASK) > 0, 2, "delivery tag must be one receive gave");
  return tag;
}

/* A tag of a lost connection: the broker requeued its delivery, and the same number names
 * another one on the new channel. Nothing is sent. */
static int stale(lua_State *L, struct rpc_connection *m, lua_Integer tag) {
  if (tag >> TAG_BITS == m->generation && m->conn.amqp) return 0;
  lua_pushnil(L);
  lua_pushfstring(L, "delivery tag %I is from a connection to %s that was lost: the broker requeued "
                  "its message, nothing was acknowledged", tag, m->conn.where);
  lua_pushliteral(L, "stale");
  return 3;
}

static int optboolean(lua_State *L, int arg, int def) {
  if (lua_isnoneornil(L, arg)) return def;
  luaL_checktype(L, arg, LUA_TBOOLEAN);
  return lua_toboolean(L, arg);
}

/* ack, nack and reject go out at once; a wrong tag makes the broker close the channel, which
 * the next operation reports (as "broker", 406 PRECONDITION_FAILED). */
static int acknowledge(lua_State *L, int status, struct rpc_connection *m) {
  if (status == AMQP_STATUS_OK) {
    lua_pushboolean(L, 1);
    return 1;
  }
  conn_lost(&m->conn, "connection", "acknowledging on %s failed: %s", m->conn.where, amqp_error_string2(status));
  return lost(L, m);
}

/* conn:ack(tag [, multiple]) */
static int connection_ack(lua_State *L) {
  struct rpc_connection *m = check_usable(L);
  lua_Integer tag = tag_arg(L);
  int multiple = optboolean(L, 3, 0);
  if (!m->open) return closed(L);
  int n = stale(L, m, tag);
  if (n) return n;
  return acknowledge(L, amqp_basic_ack(m->conn.amqp, RPC_CHANNEL, (uint64_t)(tag & TAG_MASK), multiple), m);
}

/* conn:nack(tag [, multiple [, requeue]]) */
static int connection_nack(lua_State *L) {
  struct rpc_connection *m = check_usable(L);
  lua_Integer tag = tag_arg(L);
  int multiple = optboolean(L, 3, 0), requeue = optboolean(L, 4, 1);
  if (!m->open) return closed(L);
  int n = stale(L, m, tag);
  if (n) return n;
  return acknowledge(L, amqp_basic_nack(m->conn.amqp, RPC_CHANNEL, (uint64_t)(tag & TAG_MASK), multiple, requeue), m);
}

/* conn:reject(tag [, requeue]) */
static int connection_reject(lua_State *L) {
  struct rpc_connection *m = check_usable(L);
  lua_Integer tag = tag_arg(L);
  int requeue = optboolean(L, 3, 1);
  if (!m->open) return closed(L);
  int n = stale(L, m, tag);
  if (n) return n;
  return acknowledge(L, amqp_basic_reject(m->conn.amqp, RPC_CHANNEL, (uint64_t)(tag & TAG_MASK), requeue), m);
}

/* ---- the rest ---- */

static const char *const connect_options[] = {"url", "urls", "heartbeat", "connect_timeout",
                                              "tls", "max_body", NULL};

/* rpc.connect([opts]): the connection, or nil, message, kind. */
static int connection_new(lua_State *L) {
  opts_check_keys(L, 1, connect_options);
  lua_settop(L, 1);
  struct rpc_connection *m = lua_newuserdatauv(L, sizeof *m, UV_COUNT);
  memset(m, 0, sizeof *m);
  luaL_setmetatable(L, CONNECTION_MT);
  lua_newtable(L);
  lua_setiuservalue(L, 2, UV_INBOX);
  lua_newtable(L);
  lua_setiuservalue(L, 2, UV_MANUAL);
  lua_newtable(L);
  lua_setiuservalue(L, 2, UV_RECEIVERS);
  init_amqp_pool(&m->pool, 4096);
  m->inbox_first = 1;
  m->open = 1;  /* from here on, close (and so __gc) frees whatever is acquired */
  conn_init(L, &m->conn, 1, CONNECTION_MAX_BODY);
  if (conn_open(&m->conn, m->conn.connect_timeout)) return lost(L, m);  /* __gc frees */
  m->loop = loop_get(L);
  m->watch.ops = &watch_ops;
  m->watch.conn = &m->conn;
  loop_add(L, m->loop, &m->watch, 2, 1);
  return 1;
}

/* A finalizer run while a message is in hand (push_message allocates) may close the connection:
 * that waits until the message is released. */
static int connection_close(lua_State *L) {
  struct rpc_connection *m = check_connection(L);
  if (m->reading) {
    m->close_pending = 1;
    return 0;
  }
  close_now(L, m);
  return 0;
}

static void close_now(lua_State *L, struct rpc_connection *m) {
  if (!m->open) return;
  m->open = 0;
  if (m->loop) loop_remove(L, m->loop, &m->watch);
  m->loop = NULL;
  conn_free(&m->conn);
  empty_amqp_pool(&m->pool);
  lua_pushnil(L);  /* messages read but not received go with it: unacked, they are redelivered */
  lua_setiuservalue(L, 1, UV_INBOX);
}

static int connection_tostring(lua_State *L) {
  struct rpc_connection *m = check_connection(L);
  if (!m->open) lua_pushliteral(L, "rpc.connection (closed)");
  else lua_pushfstring(L, "rpc.connection (%s%s)", m->conn.where, m->conn.amqp ? "" : ", disconnected");
  return 1;
}

/* ---- the pollable protocol (loop.c); a closed object says so ---- */

static int connection_pollfd(lua_State *L) {
  struct rpc_connection *m = check_connection(L);
  return m->open ? loop_pollfd(L, loop_get(L)) : closed(L);
}

static int connection_events(lua_State *L) {
  struct rpc_connection *m = check_connection(L);
  return m->open ? loop_events(L) : closed(L);
}

static int connection_timeout(lua_State *L) {
  struct rpc_connection *m = check_connection(L);
  return m->open ? loop_timeout(L, loop_get(L)) : closed(L);
}

static int connection_step(lua_State *L) {
  struct rpc_connection *m = check_connection(L);
  return m->open ? loop_step(L, loop_get(L)) : closed(L);
}

static const luaL_Reg connection_methods[] = {
    {"declare_exchange", connection_declare_exchange},
    {"declare_queue", connection_declare_queue},
    {"bind", connection_bind},
    {"unbind", connection_unbind},
    {"publish", connection_publish},
    {"consume", connection_consume},
    {"cancel", connection_cancel},
    {"receive", connection_receive},
    {"ack", connection_ack},
    {"nack", connection_nack},
    {"reject", connection_reject},
    {"purge", connection_purge},
    {"delete_queue", connection_delete_queue},
    {"delete_exchange", connection_delete_exchange},
    {"close", connection_close},
    {"pollfd", connection_pollfd}, {"events", connection_events}, {"timeout", connection_timeout}, {"step", connection_step},
    {NULL, NULL}};

static const luaL_Reg connection_meta[] = {{"__gc", connection_close},
                                           {"__close", connection_close},
                                           {"__tostring", connection_tostring},
                                           {NULL, NULL}};

int rpc_messaging_open(lua_State *L) {
  rpc_new_type(L, CONNECTION_MT, connection_meta, connection_methods);
  lua_pushcfunction(L, connection_new);
  lua_setfield(L, -2, "connect");
  return 0;
}
