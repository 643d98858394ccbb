/* rpc.server: declares a queue, consumes it with manual acks, runs a Lua handler per request
 * and publishes its reply to the request's reply_to, acking only after the reply is out. */
#include <math.h>
#include <stddef.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "rpc.h"

#define SERVER_MT "rpc.server"
#define MAX_ERROR_HEADER 8192  /* the whole text is in the body; the header must fit a frame */
#define SERVER_MAX_BODY 16777216  /* 16 MiB: what an untrusted publisher can make us hold */

#define FIRST_RETRY 0.1        /* seconds before the first reconnect */
#define MAX_RETRY 30.0         /* the backoff doubles up to this */
#define FLUSH_AFTER 0.001      /* seconds a queued reply may wait for others to share its send */
#define MAX_DELIVERIES 3       /* opts.max_deliveries' default */
#define DELIVERIES_HEADER "x-rpc-deliveries"    /* classic queues: deliveries so far, in the copy */
#define QUORUM_COUNT_HEADER "x-delivery-count"  /* quorum queues: the broker's count of earlier ones */

/* user values */
enum { UV_HANDLER = 1, UV_MSGH, UV_LAST_ERROR, UV_LOG, UV_ALLOW, UV_CODEC, UV_IDLE, UV_COUNT = UV_IDLE };
/* UV_IDLE: a finished handler thread's request userdata, for the next one, or nil; its user
 *   values: 1 the server, 2 its abort function, 3 a new thread for the next handler.
 * The threads themselves are not reused: a handler may keep coroutine.running() as its
 * request's identity (a weak table of per-request data, say). */

/* What a request's reply and ack need, copied from the delivery: its handler may run on after
 * the message is released (it waits, suspended, while the server takes the next ones). */
struct request {
  uint64_t tag;
  unsigned long generation;   /* of the connection it came on: its tag means nothing on another */
  int reply_due, ack_due;     /* what is still to do for it */
  int tracked;                /* in the server's batched acks (else acked alone) */
  int codec_failed;           /* its body did not decode: the handler never ran */
  int suspended;              /* its thread has waited: the loop owns it until it ends */
  int has_correlation_id;
  size_t reply_to_len, correlation_id_len;
  double started;             /* when its handler started (rpc_now), or 0: it never ran */
  double ran;                 /* seconds it ran, fixed as it ends: its reply header and
                               * stats().handler_time say the same */
  char reply_to[256], correlation_id[256];  /* shortstrs */
  struct rpc_context ctx;     /* its deadline and trace, for the calls its handler makes */
};

/* *to = *from, but only the used parts of its strings: the whole is over a kilobyte, mostly
 * empty, and copied on every request's way to its reply. */
static void copy_request(struct request *to, const struct request *from) {
  memcpy(to, from, offsetof(struct request, reply_to));
  memcpy(to->reply_to, from->reply_to, from->reply_to_len);
  memcpy(to->correlation_id, from->correlation_id, from->correlation_id_len);
  memcpy(&to->ctx, &from->ctx, offsetof(struct rpc_context, tracestate) + from->ctx.tracestate_len);
}

struct binding {    /* opts.bind, copied at creation: redone on every reconnect */
  char exchange[256], routing_key[256], type[8];  /* type "": the exchange is not declared */
  int has_key, durable;  /* without a routing key, the queue's name */
};

struct rpc_server {
  struct rpc_conn conn;
  struct rpc_loop *loop;
  struct rpc_watch watch;     /* the loop's view of it */
  char queue[256];
  int prefetch, durable, exclusive, auto_delete;
  int server_named;   /* declared as "": a new name on every connection */
  int wants_request;  /* the handler declares a second parameter */
  int open, busy, stopping, close_pending;
  struct request in_hand;     /* the delivery being read, until a handler thread takes it over */
  int draining;               /* run() had a signal: no new request starts, those under way end */
  int cancelled;              /* its consumer, by that drain: the next run() consumes again */
  char consumer_tag[256];
  unsigned long generation;   /* connections made before this one */
  lua_Integer in_progress;    /* handler threads under way */
  amqp_pool_t args_pool;      /* opts.arguments, copied at creation, and its strings */
  amqp_table_t args;
  struct binding *bindings;
  int n_bindings;
  double backoff, retry_at;   /* while the connection is down */
  uint32_t jitter;            /* xorshift state for the backoff's jitter */
  int has_allow;      /* opts.reply_to_allow was given */
  lua_Integer max_deliveries;  /* a redelivery past it is poison (0: never) */
  int quorum;         /* declared as a quorum queue: the broker counts deliveries */
  struct rpc_codec codec;     /* opts.codec */
  struct rpc_acks acks;       /* deliveries not yet acked, for batched acks */
  const struct request *starting;  /* the request whose handler the server's step runs */
  int serving;                /* its own run() or poll() turns the loop: replies may wait */
  int reading;                /* the delivery's pool is read (until its handler starts): no write
                               * may lose the connection, which frees it */
  struct rpc_ids *ids;        /* span ids for traced requests */
  struct {
    lua_Integer requests, replies, errors, no_reply_to, refused_reply_to, too_large, reconnects,
        codec_errors, expired, poisoned;
  } stats;
  struct rpc_histogram handler_time;  /* of every request whose handler ran */
};

/* Can take a request now: open, connected, not inside its own handler. */
static int servable(const struct rpc_server *s) {
  return s->open && !s->busy && s->conn.amqp;
}

static struct rpc_server *check_server(lua_State *L, int idx) {
  return luaL_checkudata(L, idx, SERVER_MT);
}

/* ---- handling one request ---- */

/* Turns any error value into text and keeps its traceback for stats().last_error. */
static int message_handler(lua_State *L) {
  const char *msg = lua_tostring(L, 1);
  if (!msg) {
    if (luaL_callmeta(L, 1, "__tostring") && lua_type(L, -1) == LUA_TSTRING)
      msg = lua_tostring(L, -1);
    else
      msg = lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, 1));
  }
  luaL_traceback(L, L, msg, 1);
  lua_setiuservalue(L, lua_upvalueindex(1), UV_LAST_ERROR);
  lua_pushstring(L, msg);
  return 1;
}

static void set_string_field(lua_State *L, const char *name, amqp_bytes_t b) {
  lua_pushlstring(L, b.bytes, b.len);
  lua_setfield(L, -2, name);
}

/* Built only for handlers that declare a second parameter. Returns 0, pushing nothing, when
 * the headers are over the caps of table_push. */
static int push_request(lua_State *L, const struct rpc_message *m, const struct request *r) {
  const amqp_basic_properties_t *p = m->props;
  lua_createtable(L, 0, 8);
  if (r->ctx.deadline_wall > 0) {
    lua_pushnumber(L, r->ctx.deadline_wall);
    lua_setfield(L, -2, "deadline");
  }
  if (p->_flags & AMQP_BASIC_HEADERS_FLAG) {
    if (!table_push(L, &p->headers)) {
      lua_pop(L, 1);
      return 0;
    }
    lua_setfield(L, -2, "headers");
  }
  if (p->_flags & AMQP_BASIC_CORRELATION_ID_FLAG) set_string_field(L, "correlation_id", p->correlation_id);
  if (p->_flags & AMQP_BASIC_REPLY_TO_FLAG) set_string_field(L, "reply_to", p->reply_to);
  if (p->_flags & AMQP_BASIC_CONTENT_TYPE_FLAG) set_string_field(L, "content_type", p->content_type);
  double count;  /* the copy a redelivery became (requeue_counted) was delivered before too */
  lua_pushboolean(L, m->deliver.redelivered || conn_header_number(p, DELIVERIES_HEADER, &count));
  lua_setfield(L, -2, "redelivered");
  set_string_field(L, "routing_key", m->deliver.routing_key);
  set_string_field(L, "exchange", m->deliver.exchange);
  return 1;
}

/* What every reply carries besides what its handler said: how long the handler ran, and the
 * request's trace under the server's span. Appended to the n entries at e (room for 2 more). */
static int has_entry(const amqp_table_entry_t *e, int n, const char *key) {
  size_t len = strlen(key);
  for (int i = 0; i < n; i++)
    if (e[i].key.len == len && memcmp(e[i].key.bytes, key, len) == 0) return 1;
  return 0;
}

static int reply_headers(const struct request *r, amqp_table_entry_t *e, int n, char traceparent[56]) {
  int given = n;  /* a handler's own values win */
  if (r->started > 0 && !has_entry(e, given, RPC_HANDLER_TIME_HEADER)) {
    e[n].key = amqp_cstring_bytes(RPC_HANDLER_TIME_HEADER);
    e[n].value.kind = AMQP_FIELD_KIND_F64;
    e[n++].value.value.f64 = r->ran;
  }
  if (r->ctx.traced && !has_entry(e, given, "traceparent")) {
    snprintf(traceparent, 56, "00-%s-%s-%s", r->ctx.trace_id, r->ctx.span_id, r->ctx.flags);
    e[n].key = amqp_cstring_bytes("traceparent");
    e[n].value.kind = AMQP_FIELD_KIND_UTF8;
    e[n++].value.value.bytes = (amqp_bytes_t){55, traceparent};
  }
  return n;
}

/* Replies to r: failed, the reply is an error message; kind, if not NULL, the x-rpc-error-kind
 * a client maps; extra, if not NULL, the content type and headers a reply (not an error) carries.
 * Runs no Lua code. */
static int publish_reply(struct rpc_server *s, struct request *r, const char *reply, size_t len,
                         int failed, const char *kind, const amqp_basic_properties_t *extra) {
  r->reply_due = 0;
  if (!s->open || !s->conn.amqp) return -1;  /* the request goes back to the queue */
  amqp_basic_properties_t props;
  amqp_table_entry_t own[4], few[16], *merged = NULL, *error = own;
  char traceparent[56];
  props._flags = 0;
  if (r->has_correlation_id) {
    props._flags |= AMQP_BASIC_CORRELATION_ID_FLAG;
    props.correlation_id = (amqp_bytes_t){r->correlation_id_len, r->correlation_id};
  }
  props.headers = (amqp_table_t){0, own};
  if (extra && !failed) {
    props._flags |= extra->_flags & AMQP_BASIC_CONTENT_TYPE_FLAG;
    props.content_type = extra->content_type;
    int n = extra->_flags & AMQP_BASIC_HEADERS_FLAG ? extra->headers.num_entries : 0;
    if (n && (merged = n + 2 <= 16 ? few : malloc(((size_t)n + 2) * sizeof *merged))) {
      memcpy(merged, extra->headers.entries, (size_t)n * sizeof *merged);
      props.headers = (amqp_table_t){n, merged};
    } else if (n) {
      props.headers = extra->headers;  /* no memory for ours: the handler's go alone */
    }
  }
  if (failed) {
    error[0].key = amqp_cstring_bytes(RPC_ERROR_HEADER);
    error[0].value.kind = AMQP_FIELD_KIND_UTF8;
    size_t cap = (size_t)amqp_get_frame_max(s->conn.amqp) / 2;  /* a broker's frames may be small */
    if (cap > MAX_ERROR_HEADER) cap = MAX_ERROR_HEADER;
    error[0].value.value.bytes.len = len < cap ? len : cap;
    error[0].value.value.bytes.bytes = (void *)reply;
    error[1].key = amqp_cstring_bytes(RPC_ERROR_KIND_HEADER);
    error[1].value.kind = AMQP_FIELD_KIND_UTF8;
    error[1].value.value.bytes = amqp_cstring_bytes(kind ? kind : "");
    props.headers.num_entries = kind ? 2 : 1;
  }
  if (props.headers.entries == own || merged)
    props.headers.num_entries = reply_headers(r, props.headers.entries, props.headers.num_entries, traceparent);
  if (props.headers.num_entries) props._flags |= AMQP_BASIC_HEADERS_FLAG;
  amqp_bytes_t body = {len, (void *)reply};
  amqp_bytes_t reply_to = {r->reply_to_len, r->reply_to};
  /* a reply may wait on a stalled peer as long as heartbeats would take to notice it */
  double bound = s->conn.heartbeat ? 2.0 * s->conn.heartbeat : 60;
  int st = conn_queue_publish(&s->conn, amqp_empty_bytes, reply_to, 0, &props, body, bound);
  if (merged != few) free(merged);
  if (st == -2 && !failed) {  /* handler headers over the broker's frame size: say so instead */
    static const char why[] = "rabbitrpc: the reply's properties do not fit the broker's frame size";
    s->stats.too_large++;
    return publish_reply(s, r, why, sizeof why - 1, 1, "too_large", NULL);
  }
  if (st) return -1;
  s->stats.replies++;
  return 0;
}

static int has_output(const struct rpc_server *s) {
  return s->open && s->conn.amqp && !s->reading && (s->conn.out.len || s->acks.done);
}

/* Writes the queued replies, then the acks they allow, in one send; bound: seconds without
 * progress before the peer counts as gone. */
static void flush_within(struct rpc_server *s, double bound, double budget) {
  if (!s->conn.amqp) return;
  if (s->acks.done && acks_flush(&s->acks, &s->conn)) return;
  conn_flush(&s->conn, bound, budget);
}

/* a reply may wait on a stalled peer as long as heartbeats would take to notice it */
static void server_flush(struct rpc_server *s) {
  flush_within(s, s->conn.heartbeat ? 2.0 * s->conn.heartbeat : 60, HUGE_VAL);
}

/* Acks r, once: only after its reply (queued before its ack), and only on the connection it
 * came on (the broker has requeued it otherwise). While its own run() or poll() serves it,
 * replies and acks of the requests the server's step starts wait while more requests are
 * buffered, up to half the prefetch window or FLUSH_AFTER; a request that ends anywhere else
 * (a handler resumed by another wait, or by a loop nested in a handler), or while another
 * waiter turns the loop (it may return to its caller at once), goes out at once. */
static void ack_request(struct rpc_server *s, struct request *r) {
  r->reply_due = 0;
  if (r->ack_due && s->open && s->conn.amqp && r->generation == s->generation) {
    if (r->tracked) {
      acks_done(&s->acks, r->tag);
    } else {
      s->acks.untracked--;
      conn_queue_ack(&s->conn, r->tag, 0);
    }
  }
  r->ack_due = 0;
  int starting = s->serving && s->busy && (r == &s->in_hand || r == s->starting);
  if (!starting || s->acks.done * 2 >= (size_t)s->prefetch ||
      (s->conn.out.len && rpc_now() - s->conn.out.since > FLUSH_AFTER))
    server_flush(s);
}

static int has_reply_to(const amqp_basic_properties_t *p) {
  return (p->_flags & AMQP_BASIC_REPLY_TO_FLAG) && p->reply_to.len > 0;
}

/* A request's deadline and trace, from its headers; a malformed one is ignored. */
static void read_context(struct rpc_server *s, const amqp_basic_properties_t *p, struct rpc_context *ctx) {
  double ms;
  ctx->deadline = ctx->deadline_wall = 0;
  /* milliseconds after 2001 and before the year 33658: seconds, or nonsense, are ignored */
  if (conn_header_number(p, RPC_DEADLINE_HEADER, &ms) && ms >= 1e12 && ms < 1e15) {
    ctx->deadline_wall = ms / 1000;
    ctx->deadline = rpc_now() + (ctx->deadline_wall - rpc_wall_now());
  }
  size_t len;
  const char *v = conn_header(p, "traceparent", &len);
  ctx->traced = 0;
  ctx->tracestate_len = 0;
  if (!v || !trace_parse(ctx, v, len, s->ids)) return;
  v = conn_header(p, "tracestate", &len);
  if (v && len <= sizeof ctx->tracestate) {
    memcpy(ctx->tracestate, v, len);
    ctx->tracestate_len = len;
  }
}

/* Its caller has given up (its deadline passed while it waited in the queue or in our prefetch
 * window): the work would be for nobody. */
static int expired(const struct request *r) {
  return r->ctx.deadline_wall > 0 && rpc_now() > r->ctx.deadline + RPC_CLOCK_SKEW;
}

/* The delivery in s->conn.msg, as s->in_hand. */
static void take_in_hand(struct rpc_server *s) {
  const struct rpc_message *m = &s->conn.msg;
  const amqp_basic_properties_t *p = m->props;
  struct request *r = &s->in_hand;
  r->tag = m->deliver.delivery_tag;
  r->generation = s->generation;
  r->tracked = acks_track(&s->acks, r->tag) == 0;
  r->ack_due = 1;
  r->reply_due = 0;
  r->codec_failed = 0;
  r->reply_to_len = has_reply_to(p) ? p->reply_to.len : 0;
  if (r->reply_to_len) memcpy(r->reply_to, p->reply_to.bytes, r->reply_to_len);
  r->has_correlation_id = (p->_flags & AMQP_BASIC_CORRELATION_ID_FLAG) != 0;
  r->correlation_id_len = r->has_correlation_id ? p->correlation_id.len : 0;
  if (r->correlation_id_len) memcpy(r->correlation_id, p->correlation_id.bytes, r->correlation_id_len);
  r->started = r->ran = 0;
  read_context(s, p, &r->ctx);
}

static void log_line(lua_State *L, int idx, const char *fmt, ...);

/* A reply goes where the request says, so whoever can publish to our queue could have us write
 * into any queue: only reply queues are allowed (direct reply-to, server-named), and the names
 * opts.reply_to_allow lists, as such or as Lua patterns anchored at both ends. */
static int reply_to_allowed(lua_State *L, struct rpc_server *s, int idx, amqp_bytes_t name) {
  static const char direct[] = RPC_DIRECT_REPLY_TO ".", generated[] = "amq.gen-";
  if ((name.len > sizeof direct - 1 && memcmp(name.bytes, direct, sizeof direct - 1) == 0) ||
      (name.len > sizeof generated - 1 && memcmp(name.bytes, generated, sizeof generated - 1) == 0))
    return 1;
  if (!s->has_allow) return 0;
  int top = lua_gettop(L), allowed = 0;
  lua_getiuservalue(L, idx, UV_ALLOW);  /* {find, name1, anchored1, name2, anchored2...} */
  lua_Integer n = (lua_Integer)lua_rawlen(L, top + 1);
  for (lua_Integer i = 2; i < n && !allowed; i += 2) {
    size_t len;
    const char *entry = (lua_rawgeti(L, top + 1, i), lua_tolstring(L, -1, &len));
    if (len == name.len && memcmp(entry, name.bytes, len) == 0) {  /* the name itself */
      allowed = 1;
    } else {
      lua_rawgeti(L, top + 1, 1);
      lua_pushlstring(L, name.bytes, name.len);
      lua_rawgeti(L, top + 1, i + 1);
      allowed = lua_pcall(L, 2, 1, 0) == LUA_OK && !lua_isnil(L, -1);
    }
    lua_settop(L, top + 1);
  }
  lua_settop(L, top);
  return allowed;
}

/* Names from the wire are any bytes: logged printable and short. */
static const char *printable(char out[80], amqp_bytes_t b) {
  size_t n = b.len < 64 ? b.len : 64;
  for (size_t i = 0; i < n; i++) {
    char ch = ((const char *)b.bytes)[i];
    out[i] = ch >= 32 && ch < 127 ? ch : '?';
  }
  strcpy(out + n, b.len > n ? "..." : "");
  return out;
}

/* Refuses the request in hand with an error reply of kind "too_large"; the handler never runs. */
static void refuse_too_large(lua_State *L, struct rpc_server *s, const char *what) {
  s->stats.too_large++;
  const char *text = lua_pushfstring(L, "%s (request refused by queue '%s')", what, s->queue);
  if (s->in_hand.reply_due) publish_reply(s, &s->in_hand, text, strlen(text), 1, "too_large", NULL);
  lua_pop(L, 1);
}

/* What reply_text fills in for request_done: the properties a successful reply carries, their
 * memory (request_done's own, emptied after the publish), and whether the body never decoded. */
struct reply_out {
  amqp_pool_t pool;
  amqp_basic_properties_t props;
  int codec_failed;
};

/* A failure reply_text made of the handler's results: the message on top (popped) replaces
 * the value (2), and is the server's last error. */
static void handler_failed(lua_State *L) {
  lua_pushvalue(L, -1);
  lua_setiuservalue(L, 1, UV_LAST_ERROR);
  lua_replace(L, 2);
}

/* With a codec, the handler's value at 2 encoded in its place, and the codec's content type
 * for the reply; a value it cannot encode is a handler failure. Returns 1 if encoded. */
static int encode_reply(lua_State *L, struct rpc_server *s, struct reply_out *out) {
  if (!rpc_codec_encode(L, &s->codec, 1, UV_CODEC, 2, "encode the handler's reply")) {
    handler_failed(L);
    return 0;
  }
  lua_replace(L, 2);
  if (s->codec.content_type_len && !(out->props._flags & AMQP_BASIC_CONTENT_TYPE_FLAG)) {
    out->props._flags |= AMQP_BASIC_CONTENT_TYPE_FLAG;
    out->props.content_type = (amqp_bytes_t){s->codec.content_type_len, s->codec.content_type};
  }
  return 1;
}

/* The reply for a handler's outcome (arguments: server, value, ok, the handler's reply
 * properties, out): text, failed, kind, and what out's properties point into. */
static int reply_text(lua_State *L) {
  struct rpc_server *s = lua_touserdata(L, 1);
  struct reply_out *out = lua_touserdata(L, 5);
  int ok = lua_toboolean(L, 3);
  lua_settop(L, 4);
  lua_pushnil(L);  /* 5: the properties' copy, if any */
  if (out->codec_failed) {  /* the handler never ran: 2 is why */
    s->stats.codec_errors++;
    lua_pushvalue(L, 2);
    lua_pushboolean(L, 1);
    lua_pushliteral(L, "codec");
    lua_pushnil(L);
    return 4;
  }
  int failed = !ok;
  /* A second value is reply properties only when it is a table: handlers written before them
   * may return more (a string, or gsub's count in `return body:gsub(...)`), ignored as ever.
   * Checked first: they go with whatever the handler returned. */
  if (!failed && lua_istable(L, 4)) {
    if (rpc_codec_reply_properties(L, 4, &out->pool, &out->props)) {
      lua_replace(L, 5);
    } else {
      handler_failed(L);
      failed = 1;
    }
  }
  if (!failed && s->codec.on && !encode_reply(L, s, out)) failed = 1;
  int type = lua_type(L, 2);
  if (!failed && type != LUA_TSTRING && type != LUA_TNUMBER) {
    lua_pushfstring(L, "handler returned %s (a string or number expected)", luaL_typename(L, 2));
    handler_failed(L);
    failed = 1;
  }
  if (failed) s->stats.errors++;
  size_t len;
  lua_tolstring(L, 2, &len);  /* a number becomes its text (allocating: hence protected) */
  if (len > s->conn.max_body) {  /* the broker may refuse it, and cost us the connection */
    lua_pushfstring(L, "the handler's reply of %I bytes is over max_body (%I)", (lua_Integer)len,
                    (lua_Integer)s->conn.max_body);
    lua_replace(L, 2);
    s->stats.too_large++;
    lua_pushvalue(L, 2);
    lua_pushboolean(L, 1);
    lua_pushliteral(L, "too_large");
    lua_pushnil(L);
    return 4;
  }
  lua_pushvalue(L, 2);
  lua_pushboolean(L, failed);
  lua_pushnil(L);
  lua_pushvalue(L, 5);
  return 4;
}

/* The reply for a handler's outcome (stack as request_done's): a plain string as it is, else
 * what reply_text makes of it, under protection (it may allocate). Returns failed; *reply
 * lives until request_done returns. */
static int reply_for(lua_State *T, struct rpc_server *s, int ok, struct reply_out *out,
                     const char **reply, size_t *len, const char **kind) {
  if (ok && !out->codec_failed && !s->codec.on && lua_type(T, 3) == LUA_TSTRING &&
      !lua_istable(T, 4) && lua_rawlen(T, 3) <= s->conn.max_body) {
    *reply = lua_tolstring(T, 3, len);
    return 0;
  }
  lua_pushcfunction(T, reply_text);
  lua_pushvalue(T, 5);
  lua_pushvalue(T, 3);
  lua_pushboolean(T, ok);
  lua_pushvalue(T, 4);
  lua_pushlightuserdata(T, out);
  if (lua_pcall(T, 5, 4, 0) != LUA_OK) {
    *reply = "rabbitrpc: not enough memory for the reply";
    *len = strlen(*reply);
    return 1;
  }
  *reply = lua_tolstring(T, 6, len);  /* 6 text, 7 failed, 8 kind, 9 what out points into */
  *kind = lua_tostring(T, 8);
  return lua_toboolean(T, 7);
}

/* A handler thread's request is done: how long it ran (up to its reply being ready), counted
 * when the handler did run (a body the codec refused never reached it). Runs no Lua code. */
static void handler_ended(struct rpc_server *s, struct request *r) {
  if (r->started <= 0) return;
  if (r->codec_failed) {  /* the handler never ran: no handler time, in the reply or the stats */
    r->started = 0;
    return;
  }
  r->ran = rpc_now() - r->started;
  histogram_record(&s->handler_time, r->ran);
}

/* The end of a handler thread (request_main's continuation, or its return): the reply, the
 * ack, and the thread's anchors released. Stack: 1 request, 2 message handler, 3 the handler's
 * result or error, 4 its reply properties. Whatever raises is protected: the request is always
 * answered and acked. */
static int request_done(lua_State *T, int status, lua_KContext armed) {
  struct request *r = lua_touserdata(T, 1);
  lua_settop(T, 4);
  lua_getiuservalue(T, 1, 1);  /* 5: the server */
  struct rpc_server *s = lua_touserdata(T, 5);
  int ok = status == LUA_OK || status == LUA_YIELD;
  if (!ok && armed && s->loop && loop_sigint_fired()) loop_note_interrupt(s->loop);
  struct reply_out out;  /* lives until the publish: nothing in between yields or raises */
  init_amqp_pool(&out.pool, 1024);
  out.props._flags = 0;
  out.codec_failed = r->codec_failed;
  size_t len = 0;
  const char *reply, *kind = NULL;
  int failed = reply_for(T, s, ok, &out, &reply, &len, &kind);
  handler_ended(s, r);
  if (r->reply_due) publish_reply(s, r, reply, len, failed, kind, &out.props);
  else if (!r->reply_to_len) s->stats.no_reply_to++;
  empty_amqp_pool(&out.pool);
  ack_request(s, r);
  s->in_progress--;
  if (r->suspended) loop_disown(T);
  return 0;
}

/* A handler thread that died outside request_main's protection (closed by a script, say): its
 * request is answered, acked and forgotten all the same. 1: the error, 2: the thread. */
static int request_abort(lua_State *L) {
  static const char unknown[] = "rabbitrpc: the handler's thread ended abnormally";
  struct request *r = lua_touserdata(L, lua_upvalueindex(1));
  lua_settop(L, 2);
  lua_getiuservalue(L, lua_upvalueindex(1), 1);  /* 3: the server */
  struct rpc_server *s = lua_touserdata(L, 3);
  size_t len = sizeof unknown - 1;
  const char *why = lua_type(L, 1) == LUA_TSTRING ? lua_tolstring(L, 1, &len) : unknown;
  s->stats.errors++;
  handler_ended(s, r);
  if (r->reply_due) publish_reply(s, r, why, len, 1, NULL, NULL);
  ack_request(s, r);
  s->in_progress--;
  return 0;
}

/* With a codec, the body (4) decoded in its place, in the handler's thread. Returns 0; or, a
 * body the codec refuses, leaves why at 3 (the handler's place) and returns 1: the handler
 * does not run, the caller gets kind "codec". */
static int decode_request(lua_State *T, struct request *r) {
  lua_getiuservalue(T, 1, 1);
  struct rpc_server *s = lua_touserdata(T, -1);
  int top = lua_gettop(T);
  if (s->codec.on && rpc_codec_decode(T, &s->codec, top, UV_CODEC, 4, "decode the request")) {
    lua_replace(T, 4);
  } else if (s->codec.on) {
    r->codec_failed = 1;
    lua_replace(T, 3);
    lua_settop(T, 3);
    return 1;
  }
  lua_settop(T, top - 1);
  return 0;
}

/* A handler thread's function: 1 request, 2 message handler, 3 handler, then its arguments.
 * The handler's results: its reply and the reply's properties. */
static int request_main(lua_State *T) {
  int armed = loop_sigint_armed();
  if (decode_request(T, lua_touserdata(T, 1))) return request_done(T, LUA_ERRRUN, 0);
  int status = lua_pcallk(T, lua_gettop(T) - 3, 2, 2, armed, request_done);
  return request_done(T, status, armed);
}

static lua_State *new_thread(lua_State *L) {
  lua_State *T = lua_newthread(L);
  lua_sethook(T, NULL, 0, 0);  /* not a Ctrl-C hook lua.c had set on the creating thread */
  return T;
}

/* Pushes a new handler thread, then a request userdata and its abort function
 * (request_abort): those keep_for_next kept, or new ones. Returns the thread. */
static lua_State *handler_thread(lua_State *L, int idx) {
  if (lua_getiuservalue(L, idx, UV_IDLE) == LUA_TUSERDATA) {
    lua_pushnil(L);
    lua_setiuservalue(L, idx, UV_IDLE);
    lua_getiuservalue(L, -1, 3);
    lua_State *T = lua_tothread(L, -1);
    lua_insert(L, -2);
    lua_pushnil(L);
    lua_setiuservalue(L, -2, 3);
    lua_getiuservalue(L, -1, 2);
    return T;
  }
  lua_pop(L, 1);
  lua_State *T = new_thread(L);
  lua_newuserdatauv(L, sizeof(struct request), 3);
  lua_pushvalue(L, idx);
  lua_setiuservalue(L, -2, 1);
  lua_pushvalue(L, -1);
  lua_pushcclosure(L, request_abort, 1);
  lua_pushvalue(L, -1);
  lua_setiuservalue(L, -3, 2);  /* a cycle the collector takes whole */
  return T;
}

/* The request at 2 with a new thread, kept in the server at 1 (allocates: under protection,
 * as the request it served has been answered). */
static int keep_protected(lua_State *L) {
  new_thread(L);
  lua_setiuservalue(L, 2, 3);
  lua_pushliteral(L, "");  /* the collector's step for the thread, now rather than next request */
  lua_pop(L, 1);
  lua_settop(L, 2);
  lua_setiuservalue(L, 1, UV_IDLE);
  return 0;
}

/* The thread at t (its request and abort function above it) ran its request to the end, here:
 * the pair is kept for the next request, unless one is or the thread ended otherwise
 * (suspended, or dead by an error: its abort function may still run). A thread that ends in
 * its first run was never the loop's (loop_start), so the pair is nobody else's. With it goes
 * a new thread: made now, after the reply went out, rather than while the next request's
 * caller waits (a thread is most of a request's garbage, and its collection comes with it). */
static void keep_for_next(lua_State *L, struct rpc_server *s, int idx, int t) {
  lua_State *T = lua_tothread(L, t);
  lua_Debug ar;
  const struct request *r = lua_touserdata(L, t + 1);
  if (!s->open || r->suspended || lua_status(T) != LUA_OK || lua_gettop(T) != 0 || lua_getstack(T, 0, &ar))
    return;
  int kept = lua_getiuservalue(L, idx, UV_IDLE) != LUA_TNIL;
  lua_pop(L, 1);
  if (kept) return;
  lua_pushcfunction(L, keep_protected);
  lua_pushvalue(L, idx);
  lua_pushvalue(L, t + 1);
  if (lua_pcall(L, 2, 0, 0) != LUA_OK) {  /* no memory: the next makes its own */
    loop_took_interrupt(L, s->loop);  /* or lua.c's Ctrl-C hook, firing at the call: the waiter's */
    lua_pop(L, 1);
  }
}

/* Runs the handler on the request in hand in a thread of its own: it replies and acks when it
 * ends, which may be after waits that suspend it while the server takes the next requests. */
static void start_handler(lua_State *L, struct rpc_server *s, int idx) {
  const struct rpc_message *m = &s->conn.msg;
  int top = lua_gettop(L);
  lua_State *T = handler_thread(L, idx);  /* top + 1, its request top + 2, its abort function top + 3 */
  struct request *r = lua_touserdata(L, top + 2);
  copy_request(r, &s->in_hand);
  r->suspended = 0;
  lua_pushcfunction(L, request_main);
  lua_pushvalue(L, top + 2);
  lua_getiuservalue(L, idx, UV_MSGH);
  lua_getiuservalue(L, idx, UV_HANDLER);
  lua_pushlstring(L, m->body, m->size);
  if (s->wants_request && !push_request(L, m, r)) {
    lua_settop(L, top);
    refuse_too_large(L, s, "request headers over 16 levels deep or 1024 entries");
    return;
  }
  int nargs = lua_gettop(L) - (top + 4);  /* request, msgh, handler and the handler's arguments */
  luaL_checkstack(L, LOOP_START_ROOM, "starting a handler");  /* raises as the pushes above may */
  s->in_hand.reply_due = s->in_hand.ack_due = 0;  /* the thread's now */
  s->in_progress++;
  lua_xmove(L, T, nargs + 1);
  s->starting = r;
  s->reading = 0;  /* all the handler needs is copied */
  r->started = rpc_now();
  r->ctx.owner = s;
  r->suspended = loop_start(L, s->loop, top + 1, nargs, top + 3, &r->ctx);
  s->starting = NULL;
  keep_for_next(L, s, idx, top + 1);
  lua_settop(L, top);
}

/* ---- poison requests: a request that kills its server comes back to kill the next ---- */

/* How many times the redelivered request in hand has now been delivered. A quorum queue counts
 * for us: each redelivery carries x-delivery-count, the deliveries before it (RabbitMQ 3.10
 * sets it from 1 on, over whatever a publisher put there). A classic queue only says
 * "redelivered": the count travels in the message, in the header of the copy the previous
 * redelivery made; without one, this is the second delivery. */
static lua_Integer delivery_number(const struct rpc_server *s, const amqp_basic_properties_t *p) {
  double n;
  if (!conn_header_number(p, s->quorum ? QUORUM_COUNT_HEADER : DELIVERIES_HEADER, &n) || !(n >= 1))
    n = 1;
  if (n > INT32_MAX) n = INT32_MAX;  /* a publisher's, for its own request: poisoned */
  return (lua_Integer)n + 1;
}

/* Rejects the request in hand without requeue (its queue's dead-letter exchange gets it, if it
 * has one) and tells its caller why, without running the handler: each earlier delivery may
 * have killed a server. The reply goes out before the reject, in the same write. */
static void reject_poisoned(lua_State *L, struct rpc_server *s, int idx, lua_Integer n) {
  const amqp_basic_properties_t *p = s->conn.msg.props;
  struct request *r = &s->in_hand;
  s->stats.requests++;
  s->stats.poisoned++;
  r->reply_due = has_reply_to(p) && reply_to_allowed(L, s, idx, p->reply_to);
  log_line(L, idx, "rpc.server '%s': rejected a request delivered %lld times (max_deliveries %lld): poisoned",
           s->queue, (long long)n, (long long)s->max_deliveries);
  const char *text = lua_pushfstring(L, "request delivered %I times, more than max_deliveries (%I): "
                                     "its handler may kill the server; rejected unhandled by queue '%s'",
                                     n, s->max_deliveries, s->queue);
  if (r->reply_due) publish_reply(s, r, text, strlen(text), 1, "poisoned", NULL);
  lua_pop(L, 1);
  if (r->tracked) acks_settled(&s->acks, r->tag);  /* no ack may name it now */
  else s->acks.untracked--;
  r->ack_due = 0;
  if (s->conn.amqp) conn_queue_reject(&s->conn, r->tag, 0);  /* lost: the broker requeues it */
}

/* A classic queue keeps no count that survives the crashing process: the redelivery in hand
 * goes back to the back of its queue as a copy (default exchange, the queue's current name,
 * every property but another user's user_id, and the body) with x-rpc-deliveries = n, and the
 * original is acked after it, in the same write: lost before, the original is redelivered.
 * -1 when the copy cannot be made (its headers would not fit a frame, no memory): the handler
 * then runs, uncounted. */
static int requeue_counted(struct rpc_server *s, lua_Integer n) {
  const struct rpc_message *m = &s->conn.msg;
  amqp_basic_properties_t props = *m->props;
  int old = props._flags & AMQP_BASIC_HEADERS_FLAG ? props.headers.num_entries : 0, kept = 0;
  amqp_table_entry_t *e = malloc(((size_t)old + 1) * sizeof *e);
  if (!e) return -1;
  for (int i = 0; i < old; i++) {
    amqp_bytes_t key = props.headers.entries[i].key;
    if (key.len != sizeof DELIVERIES_HEADER - 1 || memcmp(key.bytes, DELIVERIES_HEADER, key.len) != 0)
      e[kept++] = props.headers.entries[i];
  }
  e[kept].key = amqp_cstring_bytes(DELIVERIES_HEADER);
  e[kept].value.kind = AMQP_FIELD_KIND_I64;
  e[kept++].value.value.i64 = n;
  props._flags |= AMQP_BASIC_HEADERS_FLAG;
  props.headers = (amqp_table_t){kept, e};
  /* the broker refuses a user_id other than the publishing connection's user, closing the
   * channel (406): kept, another user's would cost the server its channel on every redelivery */
  const char *user = s->conn.endpoints[s->conn.current].user;
  if ((props._flags & AMQP_BASIC_USER_ID_FLAG) &&
      (props.user_id.len != strlen(user) || memcmp(props.user_id.bytes, user, props.user_id.len) != 0))
    props._flags &= ~(amqp_flags_t)AMQP_BASIC_USER_ID_FLAG;
  double bound = s->conn.heartbeat ? 2.0 * s->conn.heartbeat : 60;
  int st = conn_queue_publish(&s->conn, amqp_empty_bytes, amqp_cstring_bytes(s->queue), 0, &props,
                              (amqp_bytes_t){m->size, (void *)m->body}, bound);
  free(e);
  if (st == -2) return -1;
  s->in_hand.reply_due = 0;  /* the copy's handler answers */
  return 0;
}

/* With max_deliveries, a redelivery is counted: 1 when it was settled here (copied back to
 * its queue, or poisoned), 0 when its handler is to run. What would not run the handler anyway
 * (a body over max_body, a caller gone) is left to the checks that follow. */
static int count_redelivery(lua_State *L, struct rpc_server *s, int idx) {
  const struct rpc_message *m = &s->conn.msg;
  if (!s->max_deliveries || !m->deliver.redelivered || m->oversized || expired(&s->in_hand)) return 0;
  lua_Integer n = delivery_number(s, m->props);
  if (n > s->max_deliveries) {
    reject_poisoned(L, s, idx, n);
    return 1;
  }
  if (s->quorum) return 0;  /* the broker counts the next one */
  if (requeue_counted(s, n) == 0) return 1;
  log_line(L, idx, "rpc.server '%s': a redelivered request could not be copied to count it "
           "(headers too large, or no memory): handled uncounted", s->queue);
  return 0;
}

/* Checks the delivery in s->conn.msg and starts its handler; a refused request is answered
 * and acked at once: it would only come back. */
static void handle_request(lua_State *L, struct rpc_server *s, int idx) {
  struct rpc_message *m = &s->conn.msg;
  s->reading = 1;  /* finalizers run by the allocations below may turn the loop */
  take_in_hand(s);
  if (s->draining) {  /* read after the consumer was cancelled: back to the queue, for another */
    amqp_basic_reject(s->conn.amqp, RPC_CHANNEL, s->in_hand.tag, 1);
    if (s->in_hand.tracked) acks_settled(&s->acks, s->in_hand.tag);
    else s->acks.untracked--;
    s->in_hand.ack_due = 0;
    return;
  }
  if (count_redelivery(L, s, idx)) {  /* copied to the back of the queue, or poisoned */
    s->reading = 0;
    ack_request(s, &s->in_hand);
    return;
  }
  s->stats.requests++;
  if (expired(&s->in_hand)) {
    s->stats.expired++;  /* acked, no reply: the caller has stopped waiting */
  } else if (has_reply_to(m->props) && !reply_to_allowed(L, s, idx, m->props->reply_to)) {
    char name[80];
    s->stats.refused_reply_to++;
    log_line(L, idx, "rpc.server '%s': refused a request: reply_to '%s' is not allowed (reply_to_allow)",
             s->queue, printable(name, m->props->reply_to));
  } else {
    s->in_hand.reply_due = has_reply_to(m->props);
    if (m->oversized) {
      const char *what = lua_pushfstring(L, "request body of %I bytes is over max_body (%I)",
                                         (lua_Integer)m->size, (lua_Integer)s->conn.max_body);
      refuse_too_large(L, s, what);
      lua_pop(L, 1);
    } else {
      start_handler(L, s, idx);
    }
  }
  s->reading = 0;
  ack_request(s, &s->in_hand);
}

static void server_close(lua_State *L, struct rpc_server *s);

static int log_protected(lua_State *L) {
  const char *line = lua_touserdata(L, 2);
  lua_settop(L, 1);
  lua_pushstring(L, line);
  lua_call(L, 1, 0);
  return 0;
}

/* Hands a line to opts.log, if set. Formatted in C and pushed under protection: an error in
 * it, or no memory for it, never stops serving. */
static void log_line(lua_State *L, int idx, const char *fmt, ...) {
  if (lua_getiuservalue(L, idx, UV_LOG) != LUA_TFUNCTION) {
    lua_pop(L, 1);
    return;
  }
  char line[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(line, sizeof line, fmt, ap);
  va_end(ap);
  lua_pushcfunction(L, log_protected);
  lua_insert(L, -2);
  lua_pushlightuserdata(L, line);
  if (lua_pcall(L, 2, 0, 0) != LUA_OK) lua_pop(L, 1);
}

/* The connection is gone: plan the next attempt, backing off exponentially with jitter (half
 * to one and a half times the backoff), so that many servers do not come back in step. */
static void schedule_retry(lua_State *L, struct rpc_server *s, int idx) {
  s->backoff = s->backoff ? s->backoff * 2 : FIRST_RETRY;
  if (s->backoff > MAX_RETRY) s->backoff = MAX_RETRY;
  s->jitter ^= s->jitter << 13;
  s->jitter ^= s->jitter >> 17;
  s->jitter ^= s->jitter << 5;
  double delay = s->backoff * (0.5 + (double)(s->jitter % 1000) / 1000);
  s->retry_at = rpc_now() + delay;
  log_line(L, idx, "rpc.server '%s': %s (%s); reconnecting in %.3f s", s->queue, s->conn.error,
           s->conn.error_kind, delay);
}

static int declare_and_consume(struct rpc_server *s);

/* One reconnect attempt, from the loop: connect, declare, consume, as at the start. */
static void server_reconnect(lua_State *L, int idx, double limit) {
  struct rpc_server *s = check_server(L, idx);
  acks_clear(&s->acks);  /* the lost connection's deliveries are the broker's again */
  s->busy = 1;  /* declare runs no handler, but the loop must not pick it twice */
  int failed = conn_open(&s->conn, limit) || declare_and_consume(s);
  s->busy = 0;
  if (failed) {
    schedule_retry(L, s, idx);
    return;
  }
  s->backoff = 0;
  s->generation++;
  s->stats.reconnects++;
  log_line(L, idx, "rpc.server '%s': reconnected to %s", s->queue, s->conn.where);
}

/* One read, and the request it completes, if any: under protection (server_service). */
static int service_step(lua_State *L) {
  struct rpc_server *s = lua_touserdata(L, 1);
  enum conn_event ev = conn_pump(&s->conn);
  if (ev == EV_DELIVERY) {
    handle_request(L, s, 1);
  } else if (ev == EV_CANCELLED) {
    conn_lost(&s->conn, "broker", "the broker cancelled the consumer of queue '%s' (was it deleted?)",
              s->queue);
  }
  if (ev != EV_NONE) conn_release_message(&s->conn);  /* EV_NONE: a message may be half read */
  lua_pushboolean(L, ev == EV_DELIVERY);
  return 1;
}

/* Our own work on a request raised (out of memory building its table, say): the request gets
 * an error reply if one is still due, and is acked, as a handler's error would be; the
 * message is released. The error, on top, is popped. */
static void recover(lua_State *L, struct rpc_server *s, int idx) {
  static const char unknown[] = "rabbitrpc: an error while handling the request";
  size_t len = sizeof unknown - 1;
  const char *why = lua_type(L, -1) == LUA_TSTRING ? lua_tolstring(L, -1, &len) : unknown;
  if (loop_took_interrupt(L, s->loop)) {  /* a Ctrl-C, for the wait that runs us: not ours */
    conn_release_message(&s->conn);
    lua_pop(L, 1);
    return;
  }
  lua_pushvalue(L, -1);
  lua_setiuservalue(L, idx, UV_LAST_ERROR);  /* keeps why alive */
  s->stats.errors++;
  if (s->conn.msg.kind == EV_DELIVERY) {
    if (s->in_hand.reply_due) publish_reply(s, &s->in_hand, why, len, 1, NULL, NULL);
    ack_request(s, &s->in_hand);
  }
  s->in_hand.reply_due = s->in_hand.ack_due = 0;
  conn_release_message(&s->conn);
  lua_pop(L, 1);
}

/* Handles at most one request already received by the server at idx, never waiting: the
 * loop then lets every other waiter have its turn. Returns the number handled. */
static int server_service(lua_State *L, struct rpc_server *s, int idx) {
  int handled = 1;
  if (!s->conn.amqp) return 0;
  s->busy = 1;
  lua_pushcfunction(L, service_step);
  lua_pushvalue(L, idx);
  if (lua_pcall(L, 1, 1, 0) == LUA_OK) {
    handled = lua_toboolean(L, -1);
    lua_pop(L, 1);
  } else {
    recover(L, s, idx);
  }
  s->starting = NULL;  /* a raise passed start_handler by */
  s->reading = 0;
  if (s->conn.amqp && !conn_has_input(&s->conn)) server_flush(s);  /* no more to share the send */
  if (!s->conn.amqp) schedule_retry(L, s, idx);  /* the broker went away: never give up */
  s->busy = 0;
  if (s->close_pending) server_close(L, s);
  return handled;
}

/* ---- the loop's view ---- */

static const struct rpc_server *server_of(const struct rpc_watch *w) {
  return (const struct rpc_server *)(const void *)((const char *)w - offsetof(struct rpc_server, watch));
}

static int watch_pollfd(const struct rpc_watch *w) {
  const struct rpc_server *s = server_of(w);
  return servable(s) ? conn_fd(&s->conn) : -1;
}

/* Queued output counts: a step writes it, whoever turns the loop. */
static int watch_has_input(const struct rpc_watch *w) {
  const struct rpc_server *s = server_of(w);
  return (servable(s) && conn_has_input(&s->conn)) || has_output(s);
}

/* Down: its next reconnect; up: a read for its heartbeats, at least every RPC_HEARTBEAT_READ. */
static double watch_next_due(const struct rpc_watch *w) {
  const struct rpc_server *s = server_of(w);
  if (!s->open || s->busy) return HUGE_VAL;
  return s->conn.amqp ? s->conn.last_pumped + RPC_HEARTBEAT_READ : s->retry_at;
}

static void watch_step(lua_State *L, int idx, double limit) {
  struct rpc_server *s = lua_touserdata(L, idx);  /* the loop steps a watch with its own object */
  if (s->busy && !s->reading) server_flush(s);  /* a loop nested in one of its handlers: writing is all */
  if (!s->open || s->busy) return;
  if (s->conn.amqp) server_service(L, s, idx);
  else server_reconnect(L, idx, limit);
}

static const struct rpc_watch_ops watch_ops = {watch_pollfd, watch_has_input, watch_next_due, watch_step};

/* ---- setting up ---- */

/* opts.bind: the exchange is declared when a type is given; the routing key defaults to the
 * queue's name (a server-named queue's current one). */
static int bind_queue(struct rpc_server *s) {
  for (int i = 0; i < s->n_bindings; i++) {
    const struct binding *b = &s->bindings[i];
    amqp_bytes_t name = amqp_cstring_bytes(b->exchange);
    if (b->type[0]) {
      amqp_exchange_declare(s->conn.amqp, RPC_CHANNEL, name, amqp_cstring_bytes(b->type), 0, b->durable,
                            0, 0, amqp_empty_table);
      if (conn_check_reply(&s->conn, "declaring the exchange")) return -1;
    }
    amqp_queue_bind(s->conn.amqp, RPC_CHANNEL, amqp_cstring_bytes(s->queue), name,
                    amqp_cstring_bytes(b->has_key ? b->routing_key : s->queue), amqp_empty_table);
    if (conn_check_reply(&s->conn, "binding the queue")) return -1;
  }
  return 0;
}

static const char *const bind_options[] = {"exchange", "routing_key", "type", "durable", NULL};
static const char *const exchange_types[] = {"direct", "fanout", "topic", "headers", NULL};

static void check_binding(lua_State *L, int b, int opts) {
  lua_pushnil(L);
  while (lua_next(L, b)) {
    lua_pop(L, 1);
    if (lua_type(L, -1) != LUA_TSTRING)
      luaL_argerror(L, opts, lua_pushfstring(L, "option keys of 'bind' must be strings, got %s",
                                             luaL_typename(L, -1)));
    int known = 0;
    for (int i = 0; bind_options[i] && !known; i++) known = strcmp(lua_tostring(L, -1), bind_options[i]) == 0;
    if (!known) luaL_argerror(L, opts, lua_pushfstring(L, "unknown option 'bind.%s'", lua_tostring(L, -1)));
  }
  size_t len;
  if (opts_get(L, b, "exchange") != LUA_TSTRING || (lua_tolstring(L, -1, &len), len == 0 || len > 255) ||
      strlen(lua_tostring(L, -1)) != len)
    luaL_argerror(L, opts, "option 'bind.exchange' must be an exchange name (1 to 255 bytes, no NUL)");
  int t = opts_get(L, b, "routing_key");
  if (t != LUA_TNIL && (t != LUA_TSTRING || lua_rawlen(L, -1) > 255 || strlen(lua_tostring(L, -1)) != lua_rawlen(L, -1)))
    luaL_argerror(L, opts, "option 'bind.routing_key' must be a string of at most 255 bytes, no NUL");
  t = opts_get(L, b, "type");
  if (t != LUA_TNIL) {
    int known = 0;
    for (int i = 0; exchange_types[i] && t == LUA_TSTRING && !known; i++)
      known = strcmp(lua_tostring(L, -1), exchange_types[i]) == 0 && lua_rawlen(L, -1) == strlen(exchange_types[i]);
    if (!known) luaL_argerror(L, opts, "option 'bind.type' must be direct, fanout, topic or headers");
  }
  t = opts_get(L, b, "durable");
  if (t != LUA_TNIL && t != LUA_TBOOLEAN) luaL_argerror(L, opts, "option 'bind.durable' must be a boolean");
  lua_pop(L, 4);
}

/* opts.bind as a list of bindings, pushed (nil when absent). */
static void push_bindings(lua_State *L, int opts) {
  int t = opts_get(L, opts, "bind");
  if (t == LUA_TNIL) return;
  int value = lua_gettop(L);
  if (t != LUA_TTABLE) luaL_argerror(L, opts, "option 'bind' must be a table (a binding or a list of them)");
  int single = lua_rawlen(L, value) == 0;
  lua_Integer n = single ? 1 : (lua_Integer)lua_rawlen(L, value);
  lua_createtable(L, (int)n, 0);
  for (lua_Integer i = 1; i <= n; i++) {
    if (single) lua_pushvalue(L, value);
    else if (lua_rawgeti(L, value, i) != LUA_TTABLE)
      luaL_argerror(L, opts, lua_pushfstring(L, "bind[%I] must be a table", i));
    int b = lua_gettop(L);
    check_binding(L, b, opts);
    lua_createtable(L, 0, 4);  /* a copy of what was checked: later changes to it do not count */
    for (int k = 0; bind_options[k]; k++) {
      opts_get(L, b, bind_options[k]);
      lua_setfield(L, -2, bind_options[k]);
    }
    lua_rawseti(L, value + 1, i);
    lua_pop(L, 1);
  }
  lua_remove(L, value);
}

static int consume(struct rpc_server *s) {
  amqp_basic_consume_ok_t *ok = amqp_basic_consume(s->conn.amqp, RPC_CHANNEL, amqp_cstring_bytes(s->queue),
                                                   amqp_empty_bytes, 0, 0, 0, amqp_empty_table);
  if (conn_check_reply(&s->conn, "consuming the queue")) return -1;
  snprintf(s->consumer_tag, sizeof s->consumer_tag, "%.*s", ok ? (int)ok->consumer_tag.len : 0,
           ok ? (const char *)ok->consumer_tag.bytes : "");
  return 0;
}

/* Runs no Lua code: what it needs was copied when the server was made. */
static int declare_and_consume(struct rpc_server *s) {
  amqp_queue_declare_ok_t *ok =
      amqp_queue_declare(s->conn.amqp, RPC_CHANNEL, amqp_cstring_bytes(s->server_named ? "" : s->queue),
                         0, s->durable, s->exclusive, s->auto_delete, s->args);
  if (conn_check_reply(&s->conn, "declaring the queue")) return -1;
  if (s->server_named && ok) {  /* amq.gen-..., a new one on each connection */
    size_t n = ok->queue.len < sizeof s->queue ? ok->queue.len : sizeof s->queue - 1;
    memcpy(s->queue, ok->queue.bytes, n);
    s->queue[n] = '\0';
  }
  if (bind_queue(s)) return -1;
  amqp_basic_qos(s->conn.amqp, RPC_CHANNEL, 0, (uint16_t)s->prefetch, 0);
  if (conn_check_reply(&s->conn, "setting the prefetch")) return -1;
  s->cancelled = 0;
  return consume(s);
}

/* Points b at a copy of its bytes in pool. */
static int own_bytes(amqp_pool_t *pool, amqp_bytes_t *b) {
  if (b->len == 0) {
    b->bytes = NULL;  /* never read: nothing may point into the user's strings */
    return 0;
  }
  void *copy = amqp_pool_alloc(pool, b->len);
  if (!copy) return -1;
  memcpy(copy, b->bytes, b->len);
  b->bytes = copy;
  return 0;
}

/* opts.arguments, checked already, copied into the server's own pool, strings and all: a later
 * change to the user's table cannot reach the re-declare on a reconnect. (amqp_table_clone
 * would refuse an empty key, which the broker takes.) */
static void copy_arguments(lua_State *L, struct rpc_server *s, int opts) {
  if (opts_get(L, opts, "arguments") == LUA_TTABLE) {
    table_from_lua(L, lua_gettop(L), opts, &s->args_pool, &s->args);
    for (int i = 0; i < s->args.num_entries; i++) {
      amqp_table_entry_t *e = &s->args.entries[i];
      if (own_bytes(&s->args_pool, &e->key) ||
          (e->value.kind == AMQP_FIELD_KIND_UTF8 && own_bytes(&s->args_pool, &e->value.value.bytes)))
        luaL_error(L, "not enough memory");
    }
  }
  lua_pop(L, 1);
}

/* Declared a quorum queue (opts.arguments), whose redeliveries carry the broker's count. On
 * 3.10 a quorum queue cannot be declared without saying so (406 inequivalent arg
 * 'x-queue-type'); any other queue gets the count in copies (requeue_counted). */
static int is_quorum(const amqp_table_t *args) {
  static const char key[] = "x-queue-type", quorum[] = "quorum";
  for (int i = 0; i < args->num_entries; i++) {
    const amqp_table_entry_t *e = &args->entries[i];
    if (e->key.len == sizeof key - 1 && memcmp(e->key.bytes, key, sizeof key - 1) == 0)
      return (e->value.kind == AMQP_FIELD_KIND_UTF8 || e->value.kind == AMQP_FIELD_KIND_BYTES) &&
             e->value.value.bytes.len == sizeof quorum - 1 &&
             memcmp(e->value.value.bytes.bytes, quorum, sizeof quorum - 1) == 0;
  }
  return 0;
}

/* The checked list push_bindings made (at idx), into C. */
static void copy_bindings(lua_State *L, struct rpc_server *s, int idx) {
  int n = (int)lua_rawlen(L, idx);
  s->bindings = calloc((size_t)n, sizeof *s->bindings);
  if (!s->bindings) luaL_error(L, "not enough memory");
  s->n_bindings = n;
  for (int i = 0; i < n; i++) {
    struct binding *b = &s->bindings[i];
    lua_rawgeti(L, idx, i + 1);
    const char *exchange = (lua_getfield(L, -1, "exchange"), lua_tostring(L, -1));
    const char *key = (lua_getfield(L, -2, "routing_key"), lua_tostring(L, -1));
    const char *type = (lua_getfield(L, -3, "type"), lua_tostring(L, -1));
    b->durable = (lua_getfield(L, -4, "durable"), lua_toboolean(L, -1));
    b->has_key = key != NULL;
    snprintf(b->exchange, sizeof b->exchange, "%s", exchange);  /* lengths checked: no cut */
    snprintf(b->routing_key, sizeof b->routing_key, "%s", key ? key : "");
    snprintf(b->type, sizeof b->type, "%s", type ? type : "");
    lua_pop(L, 5);
  }
}

static void check_arguments_table(lua_State *L, int opts) {
  if (lua_isnoneornil(L, opts)) return;
  if (opts_get(L, opts, "arguments") != LUA_TNIL) {
    if (!lua_istable(L, -1))
      luaL_argerror(L, opts, lua_pushfstring(L, "option 'arguments' must be a table, got %s",
                                             luaL_typename(L, -1)));
    table_from_lua(L, lua_gettop(L), opts, NULL, NULL);  /* raises on a bad entry */
  }
  lua_pop(L, 1);
}

static const char *const server_options[] = {
    "url", "urls", "heartbeat", "connect_timeout", "durable", "exclusive", "auto_delete",
    "arguments", "prefetch", "log", "max_body", "tls", "reply_to_allow", "bind", "codec",
    "max_deliveries", NULL};

/* Pushes the pattern at idx anchored at both ends, unless it already is: every pattern must
 * match the whole name, a lazy one too. */
static void push_anchored(lua_State *L, int idx) {
  size_t len, escapes = 0;
  const char *p = lua_tolstring(L, idx, &len);
  while (len >= 2 + escapes && p[len - 2 - escapes] == '%') escapes++;
  int anchored_end = len > 0 && p[len - 1] == '$' && escapes % 2 == 0;  /* "%$" is a dollar */
  luaL_Buffer b;
  luaL_buffinit(L, &b);
  if (len == 0 || p[0] != '^') luaL_addchar(&b, '^');
  luaL_addlstring(&b, p, len);
  if (!anchored_end) luaL_addchar(&b, '$');
  luaL_pushresult(&b);
}

/* opts.reply_to_allow (a pattern or a list of them) as {string.find, name1, anchored1, ...},
 * pushed; nil when absent. string.find is taken from the string metatable, not from a global a
 * script may have replaced. */
static void push_reply_to_allow(lua_State *L, int opts) {
  int t = opts_get(L, opts, "reply_to_allow");
  if (t == LUA_TNIL) return;
  int value = lua_gettop(L);
  if (t != LUA_TSTRING && (t != LUA_TTABLE || lua_rawlen(L, value) == 0))
    luaL_argerror(L, opts, "option 'reply_to_allow' must be a Lua pattern or a non-empty list of them");
  lua_Integer n = t == LUA_TSTRING ? 1 : (lua_Integer)lua_rawlen(L, value);
  lua_createtable(L, (int)(2 * n + 1), 0);
  lua_pushliteral(L, "");
  if (luaL_getmetafield(L, -1, "__index") != LUA_TTABLE || lua_getfield(L, -1, "find") != LUA_TFUNCTION)
    luaL_error(L, "string.find is not available");
  lua_rawseti(L, value + 1, 1);
  lua_settop(L, value + 1);
  for (lua_Integer i = 1; i <= n; i++) {
    if (t == LUA_TSTRING) lua_pushvalue(L, value);
    else if (lua_rawgeti(L, value, i) != LUA_TSTRING)
      luaL_argerror(L, opts, lua_pushfstring(L, "reply_to_allow[%I] must be a string", i));
    int entry = lua_gettop(L);
    for (int anchored = 0; anchored < 2; anchored++) {  /* a malformed pattern is a bad argument
                                                          * now, not a refusal later ("a%" too) */
      lua_rawgeti(L, value + 1, 1);
      lua_pushliteral(L, "");
      if (anchored) push_anchored(L, entry);
      else lua_pushvalue(L, entry);
      if (lua_pcall(L, 2, 0, 0) != LUA_OK)
        luaL_argerror(L, opts, lua_pushfstring(L, "option 'reply_to_allow': %s", lua_tostring(L, -1)));
    }
    push_anchored(L, entry);
    lua_rawseti(L, value + 1, 2 * i + 1);
    lua_rawseti(L, value + 1, 2 * i);
  }
  lua_remove(L, value);
}

/* rpc.server(queue, handler [, opts]): pushes the server, or nil, message, kind. */
static int server_new(lua_State *L) {
  size_t qlen;
  const char *queue = luaL_checklstring(L, 1, &qlen);
  luaL_argcheck(L, qlen < 256, 1, "queue name longer than 255 bytes");
  luaL_argcheck(L, strlen(queue) == qlen, 1, "queue name contains a NUL byte");
  luaL_checktype(L, 2, LUA_TFUNCTION);
  opts_check_keys(L, 3, server_options);
  lua_settop(L, 3);  /* opts keep slot 3 when absent: nothing pushed below takes it */
  int prefetch = (int)opts_integer(L, 3, "prefetch", 1, 1, 65535);
  int durable = opts_boolean(L, 3, "durable", 0);
  int exclusive = opts_boolean(L, 3, "exclusive", 0);
  int auto_delete = opts_boolean(L, 3, "auto_delete", 0);
  lua_Integer max_deliveries = opts_integer(L, 3, "max_deliveries", MAX_DELIVERIES, 0, INT32_MAX);
  check_arguments_table(L, 3);
  if (opts_get(L, 3, "log") != LUA_TNIL)
    luaL_argcheck(L, lua_isfunction(L, -1), 3, "option 'log' must be a function");
  lua_pop(L, 1);
  push_reply_to_allow(L, 3);
  int allow = lua_istable(L, -1) ? lua_gettop(L) : 0;
  push_bindings(L, 3);
  int bind = lua_istable(L, -1) ? lua_gettop(L) : 0;
  struct rpc_codec codec;
  int n = rpc_codec_new(L, 3, &codec);
  if (n) return n;
  int codec_idx = lua_gettop(L);

  struct rpc_server *s = lua_newuserdatauv(L, sizeof *s, UV_COUNT);
  memset(s, 0, sizeof *s);
  init_amqp_pool(&s->args_pool, 1024);
  s->args = amqp_empty_table;
  luaL_setmetatable(L, SERVER_MT);  /* from here on, __gc frees whatever is acquired */
  int idx = lua_gettop(L);
  conn_init(L, &s->conn, 3, SERVER_MAX_BODY);
  copy_arguments(L, s, 3);
  s->quorum = is_quorum(&s->args);
  s->max_deliveries = max_deliveries;
  if (bind) copy_bindings(L, s, bind);
  memcpy(s->queue, queue, qlen + 1);
  s->prefetch = prefetch;
  s->durable = durable;
  s->exclusive = exclusive;
  s->auto_delete = auto_delete;
  lua_Debug ar;
  lua_pushvalue(L, 2);
  lua_getinfo(L, ">u", &ar);
  s->wants_request = ar.isvararg || ar.nparams >= 2;
  lua_pushvalue(L, 2);
  lua_setiuservalue(L, idx, UV_HANDLER);
  lua_pushvalue(L, idx);
  lua_pushcclosure(L, message_handler, 1);  /* made once, not per request */
  lua_setiuservalue(L, idx, UV_MSGH);
  if (!lua_isnoneornil(L, 3)) {
    opts_get(L, 3, "log");
    lua_setiuservalue(L, idx, UV_LOG);
  }
  if (allow) {
    lua_pushvalue(L, allow);
    lua_setiuservalue(L, idx, UV_ALLOW);
    s->has_allow = 1;
  }
  lua_pushvalue(L, codec_idx);
  lua_setiuservalue(L, idx, UV_CODEC);
  s->codec = codec;
  s->server_named = qlen == 0;
  if (s->server_named) s->exclusive = 1;  /* a new name per connection: the old queue must go with it */
  s->ids = ids_new();
  s->jitter = ((uint32_t)((uintptr_t)s >> 4) ^ (uint32_t)(rpc_now() * 1e6)) | 1;  /* never 0 */
  s->open = 1;
  if (conn_open(&s->conn, s->conn.connect_timeout) || declare_and_consume(s)) {
    n = rpc_fail(L, s->conn.error_kind, s->conn.error);
    server_close(L, s);
    return n;
  }
  s->loop = loop_get(L);
  s->watch.ops = &watch_ops;
  s->watch.conn = &s->conn;
  loop_add(L, s->loop, &s->watch, idx, 0);
  lua_pushvalue(L, idx);
  return 1;
}

/* ---- methods ---- */

static int closed(lua_State *L) {
  return rpc_fail(L, "closed", "server closed");
}

/* Called from one of s's own handlers (or what it runs): before its first wait (busy), or
 * after (the loop runs a request of s's, or a script resumed one's thread). */
static int in_own_handler(lua_State *L, const struct rpc_server *s) {
  const struct rpc_context *ctx = loop_context(s->loop), *own = loop_thread_context(L);
  return s->busy || (ctx && ctx->owner == s) || (own && own->owner == s);
}

/* After a signal: no new request (the consumer is cancelled; what arrives meanwhile goes back
 * to the queue), and those under way end, reply and ack: at most RPC_DRAIN seconds, until a
 * second signal, or until the connection is lost (the broker requeues them then). */
static void drain(lua_State *L, struct rpc_server *s) {
  int signals = loop_signals();
  double until = rpc_now() + RPC_DRAIN;
  if (s->in_progress == 0 || !s->conn.amqp) return;
  s->draining = 1;
  loop_wake_all(L);  /* waits with no deadline (a receive) end on the signal; the others go on */
  server_flush(s);
  if (!s->conn.amqp) {  /* lost writing: the broker has requeued what is under way */
    s->draining = 0;
    return;
  }
  amqp_basic_cancel(s->conn.amqp, RPC_CHANNEL, amqp_cstring_bytes(s->consumer_tag));
  s->cancelled = !conn_check_reply(&s->conn, "cancelling the consumer");
  while (s->open && s->conn.amqp && s->in_progress > 0 && loop_signals() == signals && rpc_now() < until)
    loop_wait(L, s->loop, NULL, fmin(until, rpc_now() + RPC_SLICE));
  s->draining = 0;
}

static int run_loop(lua_State *L) {
  struct rpc_server *s = lua_touserdata(L, 1);
  while (s->open && !s->stopping && !loop_signalled())
    loop_wait(L, s->loop, NULL, HUGE_VAL);  /* turns of at most RPC_SLICE */
  if (s->open && loop_signalled()) drain(L, s);
  return 0;
}

/* Serves every open server of this Lua state until s is stopped or closed. A lost connection
 * does not end it: the server reconnects, backing off, for as long as it takes. The signal
 * handlers it installs are restored on every way out, a raise included. */
static int run_server(lua_State *L, int idx) {
  struct rpc_server *s = check_server(L, idx);
  if (!s->open) return closed(L);
  luaL_argcheck(L, !in_own_handler(L, s), idx, "server:run() called from its own handler");
  s->stopping = 0;
  if (s->cancelled && s->conn.amqp && consume(s) == 0) s->cancelled = 0;  /* after a drain */
  lua_pushcfunction(L, run_loop);
  lua_pushvalue(L, idx);
  loop_catch_signals(1);
  s->serving = 1;
  int status = lua_pcall(L, 1, 0, 0);
  s->serving = 0;
  loop_catch_signals(0);
  server_flush(s);  /* stopped with more input buffered: what is done goes out now */
  if (status != LUA_OK) return lua_error(L);
  if (!s->open) return closed(L);
  lua_pushboolean(L, 1);
  return 1;
}

static int server_run(lua_State *L) {
  return run_server(L, 1);
}

/* server:poll([timeout]): waits up to timeout (default 0) for requests to this server. */
static int server_poll(lua_State *L) {
  struct rpc_server *s = check_server(L, 1);
  double timeout = luaL_optnumber(L, 2, 0);
  luaL_argcheck(L, timeout >= 0 && timeout <= RPC_MAX_TIMEOUT, 2,
                "timeout must be a number of seconds from 0 to 1e6");
  if (!s->open) return closed(L);
  luaL_argcheck(L, !in_own_handler(L, s), 1, "server:poll() called from its own handler");
  if (s->cancelled && s->conn.amqp && consume(s) == 0) s->cancelled = 0;  /* after a drain */
  lua_Integer before = s->stats.requests;
  double deadline = rpc_now() + timeout;
  s->serving = 1;  /* a raise (no memory) leaves it set: replies then only wait a little longer */
  do {  /* while the connection is down, the loop reconnects it when due */
    if (loop_wait(L, s->loop, s->conn.amqp ? &s->conn : NULL, deadline) && s->open)
      server_service(L, s, 1);
  } while (s->open && s->stats.requests == before && rpc_now() < deadline);
  while (s->open && s->conn.amqp && conn_has_input(&s->conn)) server_service(L, s, 1);  /* the rest */
  s->serving = 0;
  server_flush(s);
  if (!s->open) return closed(L);
  lua_pushinteger(L, s->stats.requests - before);
  return 1;
}

static int server_stop(lua_State *L) {
  check_server(L, 1)->stopping = 1;
  return 0;
}

static void server_close(lua_State *L, struct rpc_server *s) {
  if (s->busy) {  /* closed from its own handler: finish the request first */
    s->close_pending = 1;
    return;
  }
  if (s->loop) loop_remove(L, s->loop, &s->watch);
  s->loop = NULL;
  flush_within(s, 1, 1);  /* what is done is answered and acked; the rest goes back to the queue */
  s->open = 0;
  s->close_pending = 0;
  conn_free(&s->conn);
  acks_free(&s->acks);
  ids_free(s->ids);
  s->ids = NULL;
  empty_amqp_pool(&s->args_pool);
  s->args = amqp_empty_table;
  free(s->bindings);
  s->bindings = NULL;
  s->n_bindings = 0;
}

static int server_close_method(lua_State *L) {
  server_close(L, check_server(L, 1));
  return 0;
}

static int server_stats(lua_State *L) {
  struct rpc_server *s = check_server(L, 1);
  lua_createtable(L, 0, 12);
  rpc_set_count(L, "requests", s->stats.requests);
  rpc_set_count(L, "replies", s->stats.replies);
  rpc_set_count(L, "errors", s->stats.errors);
  rpc_set_count(L, "no_reply_to", s->stats.no_reply_to);
  rpc_set_count(L, "refused_reply_to", s->stats.refused_reply_to);
  rpc_set_count(L, "too_large", s->stats.too_large);
  rpc_set_count(L, "reconnects", s->stats.reconnects);
  rpc_set_count(L, "codec_errors", s->stats.codec_errors);
  rpc_set_count(L, "expired", s->stats.expired);
  rpc_set_count(L, "poisoned", s->stats.poisoned);
  rpc_set_count(L, "in_progress", s->in_progress);
  lua_pushboolean(L, s->conn.amqp != NULL);
  lua_setfield(L, -2, "connected");
  histogram_push(L, &s->handler_time);
  lua_setfield(L, -2, "handler_time");
  lua_getiuservalue(L, 1, UV_LAST_ERROR);
  lua_setfield(L, -2, "last_error");
  return 1;
}

static int server_tostring(lua_State *L) {
  struct rpc_server *s = check_server(L, 1);
  if (!s->open) lua_pushliteral(L, "rpc.server (closed)");
  else lua_pushfstring(L, "rpc.server (%s, queue '%s', prefetch %d%s)", s->conn.where, s->queue,
                       s->prefetch, s->conn.amqp ? "" : ", reconnecting");
  return 1;
}

/* rpc.serve(queue, handler [, opts]): server, run, close. */
static int serve(lua_State *L) {
  int n = server_new(L);
  if (n != 1) return n;
  int idx = lua_gettop(L);
  n = run_server(L, idx);
  server_close(L, check_server(L, idx));
  return n;
}

/* ---- the pollable protocol (loop.c); a closed object says so ---- */

static int server_pollfd(lua_State *L) {
  struct rpc_server *s = check_server(L, 1);
  return s->open ? loop_pollfd(L, loop_get(L)) : closed(L);
}

static int server_events(lua_State *L) {
  struct rpc_server *s = check_server(L, 1);
  return s->open ? loop_events(L) : closed(L);
}

static int server_timeout(lua_State *L) {
  struct rpc_server *s = check_server(L, 1);
  return s->open ? loop_timeout(L, loop_get(L)) : closed(L);
}

static int server_step(lua_State *L) {
  struct rpc_server *s = check_server(L, 1);
  return s->open ? loop_step(L, loop_get(L)) : closed(L);
}

static const luaL_Reg server_methods[] = {
    {"run", server_run},   {"poll", server_poll},   {"stop", server_stop},
    {"close", server_close_method}, {"stats", server_stats}, {"pollfd", server_pollfd}, {"events", server_events}, {"timeout", server_timeout}, {"step", server_step},
    {NULL, NULL}};

static const luaL_Reg server_meta[] = {{"__gc", server_close_method},
                                       {"__close", server_close_method},
                                       {"__tostring", server_tostring},
                                       {NULL, NULL}};

int rpc_server_open(lua_State *L) {
  rpc_new_type(L, SERVER_MT, server_meta, server_methods);
  lua_pushcfunction(L, server_new);
  lua_setfield(L, -2, "server");
  lua_pushcfunction(L, serve);
  lua_setfield(L, -2, "serve");
  return 0;
}
