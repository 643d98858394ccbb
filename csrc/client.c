/* rpc.client: publishes requests (mandatory, reply_to, a fresh uuid correlation id, expiration)
 * and matches replies to pending calls by correlation id. */
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <uuid/uuid.h>

#include "rpc.h"

#define CLIENT_MT "rpc.client"
#define UV_OUTCOMES 1  /* a table: replies kept for a later wait, by luaL_ref */
#define UV_CODEC 2     /* opts.codec's functions (codec.c), or nil */
#define CLIENT_MAX_BODY 134217728  /* RabbitMQ's own default max_message_size: 128 MiB */
#define SWEEP_MIN 64  /* pending calls before the first sweep for sends nobody waits for */
#define SWEPT_KEPT 1024  /* ids of swept sends remembered, so that a late wait says timeout */
#define DEFER_MAX (64 * 1024)  /* queued sends' bytes: a larger queue is written at once */
#define DEFER_AFTER 0.001      /* queued only this soon after a wait returned, and after the
                                * oldest queued send: later, the send writes them all */

enum reply_mode { REPLY_DIRECT, REPLY_EXCLUSIVE, REPLY_NAMED };

struct rpc_client {
  struct rpc_conn conn;
  struct rpc_loop *loop;
  struct rpc_watch watch;  /* the loop reads its replies while its waiters are suspended */
  char queue[256];      /* the routing key requests are published with */
  char exchange[256];   /* through which: "" is the default exchange */
  enum reply_mode mode;
  char reply_to[256];   /* what requests carry: the direct pseudo-queue or our queue's name */
  double timeout;
  int confirm;           /* publisher confirms: a nack fails its call at once */
  int trace;             /* opts.trace: requests outside a traced one start a trace */
  int retries;           /* opts.retries: a call's default (safe retries, call only) */
  uint64_t published;    /* publishes on this connection: the broker's delivery tags */
  long long expiration_of;  /* the milliseconds expiration was last written for */
  struct rpc_ids *ids;   /* where correlation ids come from */
  char expiration[24];   /* milliseconds, as text */
  struct rpc_pending pending;
  size_t kept;          /* calls settled with their outcome kept (keep), not yet taken */
  double took_at;       /* when a wait last returned an outcome (rpc_now) */
  size_t sweep_at;      /* pending calls at which the next publish sweeps expired sends */
  unsigned char (*swept)[16];  /* a ring of the last SWEPT_KEPT swept ids (NULL until needed) */
  size_t swept_next;
  amqp_pool_t pool;     /* per-call headers, recycled after each publish */
  int open;
  int reading;          /* a message is in hand: a finalizer must not read past it */
  struct rpc_codec codec;  /* opts.codec */
  /* the id of the last call whose waiter took a retryable failure: tells a retrying call that
   * its failure was one (ids are never reused: a stale one matches no later call) */
  unsigned char retryable_id[16];
  struct {
    lua_Integer calls, replies, timeouts, remote_errors, no_route, discarded, codec_errors, retries;
  } stats;
  struct rpc_histogram latency;  /* publish to reply, over replies that are not errors */
};

static struct rpc_client *check_client(lua_State *L) {
  return luaL_checkudata(L, 1, CLIENT_MT);
}

/* For the methods that read or publish. */
static struct rpc_client *check_usable_client(lua_State *L) {
  struct rpc_client *c = check_client(L);
  luaL_argcheck(L, !c->reading, 1, "client in use: called from a finalizer while it reads a reply");
  return c;
}

/* ---- connecting ---- */

static void set_reply_to(struct rpc_client *c, amqp_bytes_t name) {
  size_t n = name.len < sizeof c->reply_to ? name.len : sizeof c->reply_to - 1;
  memcpy(c->reply_to, name.bytes, n);
  c->reply_to[n] = '\0';
}

/* Opens the connection and the reply path: the direct reply-to consumer must exist before the
 * first publish; an exclusive queue is the tutorial's way; a named one survives the client. */
static int client_connect(struct rpc_client *c, double limit) {
  if (conn_open(&c->conn, limit)) return -1;
  amqp_connection_state_t a = c->conn.amqp;
  c->published = 0;
  if (c->confirm) {
    amqp_confirm_select(a, RPC_CHANNEL);
    if (conn_check_reply(&c->conn, "confirm.select")) return -1;
  }
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

static const char *const client_options[] = {"url",     "urls",     "heartbeat", "connect_timeout",
                                             "timeout", "reply_to", "confirm",   "max_body",
                                             "tls",     "exchange", "codec",    "trace",
                                             "retries", NULL};

static const struct rpc_watch_ops watch_ops;

/* rpc.client(queue [, opts]): the client, or nil, message, kind. */
static int client_new(lua_State *L) {
  size_t qlen, rlen;
  const char *queue = luaL_checklstring(L, 1, &qlen);
  luaL_argcheck(L, qlen < 256, 1, "queue name longer than 255 bytes");
  luaL_argcheck(L, strlen(queue) == qlen, 1, "queue name contains a NUL byte");
  opts_check_keys(L, 2, client_options);
  lua_settop(L, 2);  /* opts keep slot 2 when absent: nothing pushed below (the codec's nil) takes it */
  double timeout = opts_number(L, 2, "timeout", RPC_DEFAULT_CALL_TIMEOUT, 0.001, RPC_MAX_TIMEOUT);
  const char *reply_to = opts_string(L, 2, "reply_to", "direct", &rlen);
  luaL_argcheck(L, rlen > 0 && rlen < 256 && strlen(reply_to) == rlen, 2,
                "option 'reply_to' must be 1 to 255 bytes, none of them NUL");
  int confirm = opts_boolean(L, 2, "confirm", 0);
  int trace = opts_boolean(L, 2, "trace", 0);
  lua_Integer retries = opts_integer(L, 2, "retries", 0, 0, RPC_MAX_RETRIES);
  size_t elen;
  const char *exchange = opts_string(L, 2, "exchange", "", &elen);
  luaL_argcheck(L, elen < 256 && strlen(exchange) == elen, 2,
                "option 'exchange' must be at most 255 bytes, none of them NUL");
  struct rpc_codec codec;
  int n = rpc_codec_new(L, 2, &codec);
  if (n) return n;

  struct rpc_client *c = lua_newuserdatauv(L, sizeof *c, 2);
  memset(c, 0, sizeof *c);
  luaL_setmetatable(L, CLIENT_MT);
  lua_newtable(L);
  lua_setiuservalue(L, -2, UV_OUTCOMES);
  lua_rotate(L, -2, 1);  /* the codec's functions, on top */
  lua_setiuservalue(L, -2, UV_CODEC);
  c->codec = codec;
  init_amqp_pool(&c->pool, 4096);
  c->sweep_at = SWEEP_MIN;
  c->open = 1;  /* from here on, close (and so __gc) frees whatever is acquired */
  c->ids = ids_new();
  conn_init(L, &c->conn, 2, CLIENT_MAX_BODY);
  memcpy(c->queue, queue, qlen + 1);
  memcpy(c->exchange, exchange, elen + 1);
  c->timeout = timeout;
  c->confirm = confirm;
  c->trace = trace;
  c->retries = (int)retries;
  if (strcmp(reply_to, "direct") == 0) {
    c->mode = REPLY_DIRECT;
    strcpy(c->reply_to, RPC_DIRECT_REPLY_TO);
  } else if (strcmp(reply_to, "exclusive") == 0) {
    c->mode = REPLY_EXCLUSIVE;
  } else {
    c->mode = REPLY_NAMED;
    memcpy(c->reply_to, reply_to, rlen + 1);
  }
  if (client_connect(c, c->conn.connect_timeout))
    return rpc_fail(L, c->conn.error_kind, c->conn.error);  /* __gc frees */
  c->loop = loop_get(L);
  c->watch.ops = &watch_ops;
  c->watch.conn = &c->conn;
  loop_add(L, c->loop, &c->watch, -1, 1);
  return 1;
}

/* ---- matching replies ---- */

static int correlation_of(const amqp_basic_properties_t *p, unsigned char id[16]) {
  return p && (p->_flags & AMQP_BASIC_CORRELATION_ID_FLAG) &&
         pending_parse_id(p->correlation_id.bytes, p->correlation_id.len, id);
}

/* Keeps an outcome for call id, whose waiter is not reading now: one Lua string (and, props
 * not NULL, the reply's properties table), referenced from the client's outcomes table until
 * its wait takes it. Allocating may run finalizers, which may close the client (freeing the
 * message data and props point into: both are read first) or add calls: the call is looked
 * up again after. */
static void keep(lua_State *L, struct rpc_client *c, int idx, const unsigned char id[16],
                 enum call_state state, const char *kind, int retryable, const char *data,
                 size_t len, const amqp_basic_properties_t *props) {
  lua_getiuservalue(L, idx, UV_OUTCOMES);
  int outcomes = lua_gettop(L);
  if (props) rpc_codec_push_properties(L, props);
  lua_pushlstring(L, data, len);
  int ref = luaL_ref(L, outcomes);
  int props_ref = props ? luaL_ref(L, outcomes) : LUA_NOREF;
  struct rpc_call *call = c->open ? pending_find(&c->pending, id) : NULL;
  if (call && call->state == CALL_WAITING) {
    c->kept++;
    call->ref = ref;
    call->props_ref = props_ref;
    call->state = state;
    call->kind = kind;
    call->retryable = retryable;
    if (call->waiter) loop_wake(L, call->waiter);
  } else if (lua_istable(L, -1)) {
    luaL_unref(L, -1, ref);
    luaL_unref(L, -1, props_ref);
  }
  lua_pop(L, 1);
}

static void fail_all(lua_State *L, struct rpc_client *c, int idx, const char *kind,
                     const char *message) {
  for (size_t i = 0; c->open && i < c->pending.cap; i++) {
    struct rpc_call *call = &c->pending.slots[i];
    if (!call->used || call->state != CALL_WAITING) continue;
    unsigned char id[16];
    memcpy(id, call->id, 16);
    keep(L, c, idx, id, CALL_FAILED, kind, 0, message, strlen(message), NULL);  /* they went out */
  }
}

/* Publisher confirms: the broker refused the publishes up to (or at) the nacked tag. A nack
 * says one of the queues a request was routed to refused it, not that all did: a retry is safe
 * only for a request that could reach one queue (the default exchange routes to the queue its
 * routing key names, or to none). */
static void fail_nacked(lua_State *L, struct rpc_client *c, int idx) {
  static const char message[] = "the broker refused the request (basic.nack: a full queue that "
                                "rejects publishes, or an internal error)";
  for (size_t i = 0; c->open && i < c->pending.cap; i++) {
    struct rpc_call *call = &c->pending.slots[i];
    if (!call->used || call->state != CALL_WAITING || !call->seq) continue;
    if (call->seq == c->conn.nacked || (c->conn.nacked_multiple && call->seq < c->conn.nacked)) {
      unsigned char id[16];
      memcpy(id, call->id, 16);
      keep(L, c, idx, id, CALL_FAILED, "broker", call->one_queue, message, sizeof message - 1, NULL);
    }
  }
}

/* With a codec, the reply, first of the n results on top (a reply and maybe its properties),
 * decoded in place; a reply the codec refuses (or a raise in it) is nil, message, "codec". The
 * call is forgotten already: nothing stays pending or flagged. */
static int decoded(lua_State *L, struct rpc_client *c, int idx, int n) {
  if (!c->codec.on || n < 1 || n > 2) return n;
  int reply = lua_gettop(L) - n + 1;
  if (rpc_codec_decode(L, &c->codec, idx, UV_CODEC, reply, "decode the reply")) {
    lua_replace(L, reply);
    return n;
  }
  lua_replace(L, reply);
  lua_settop(L, reply);
  if (loop_took_interrupt(L, c->loop)) {  /* Ctrl-C while the codec ran: not the reply's fault */
    lua_settop(L, reply - 1);
    return rpc_fail(L, "interrupted", "interrupted while decoding the reply");
  }
  c->stats.codec_errors++;
  lua_pushnil(L);
  lua_insert(L, reply);
  lua_pushliteral(L, "codec");
  return 3;
}

/* A request queued by send (may_defer) whose call ends before it is written (timed out,
 * forgotten) is taken out of the queue: written later, it would reach a server after its caller
 * gave up (its expiration counts from when the broker gets it). Runs no Lua code. */
static void unqueue(struct rpc_client *c, struct rpc_call *call) {
  struct rpc_out *o = &c->conn.out;
  size_t at = call->queued_at, len = call->queued_len;
  call->queued_len = 0;
  if (!len || call->queued_in != o->emptied) return;  /* written or dropped since */
  frames_cut(o, at, len);
  for (size_t i = 0; i < c->pending.cap; i++) {
    struct rpc_call *other = &c->pending.slots[i];
    if (other->used && other->queued_len && other->queued_in == o->emptied && other->queued_at > at)
      other->queued_at -= len;
  }
}

/* Every call leaves the pending table here: one whose request is still queued takes it along. */
static void remove_call(struct rpc_client *c, struct rpc_call *call) {
  unqueue(c, call);
  pending_remove(&c->pending, call);
}

/* Forgets a call that nobody will take: its kept outcome, if any, is discarded and counted. */
static void forget_call(lua_State *L, struct rpc_client *c, int idx, struct rpc_call *call) {
  if (call->ref != LUA_NOREF) {
    c->kept--;
    lua_getiuservalue(L, idx, UV_OUTCOMES);
    luaL_unref(L, -1, call->ref);
    luaL_unref(L, -1, call->props_ref);
    lua_pop(L, 1);
    c->stats.discarded++;
  }
  remove_call(c, call);
}

/* A send nobody waited for, past its deadline: forgotten, its id among the last swept so that
 * a late wait on it says timeout (no memory for that ring: the late wait raises). */
static void forget_unwaited(lua_State *L, struct rpc_client *c, int idx, struct rpc_call *call) {
  if (!c->swept) c->swept = calloc(SWEPT_KEPT, sizeof *c->swept);
  if (c->swept) memcpy(c->swept[c->swept_next++ % SWEPT_KEPT], call->id, 16);
  forget_call(L, c, idx, call);
}

/* Pushes a settled call's result (reply [, properties], or nil, message, kind) and forgets the
 * call. */
static int take(lua_State *L, struct rpc_client *c, int idx, struct rpc_call *call) {
  enum call_state state = call->state;
  const char *kind = call->kind;
  int ref = call->ref, props_ref = call->props_ref;
  if (ref != LUA_NOREF) c->kept--;
  c->took_at = rpc_now();
  if (call->retryable) memcpy(c->retryable_id, call->id, 16);
  remove_call(c, call);
  if (state == CALL_FAILED) lua_pushnil(L);
  lua_getiuservalue(L, idx, UV_OUTCOMES);
  int outcomes = lua_gettop(L);
  lua_rawgeti(L, outcomes, ref);
  luaL_unref(L, outcomes, ref);
  if (props_ref != LUA_NOREF) {
    lua_rawgeti(L, outcomes, props_ref);
    luaL_unref(L, outcomes, props_ref);
  }
  lua_remove(L, outcomes);
  if (state == CALL_REPLIED) return decoded(L, c, idx, props_ref != LUA_NOREF ? 2 : 1);
  lua_pushstring(L, kind);
  return 3;
}

static int push_result(lua_State *L, enum call_state state, const char *kind, const char *data,
                       size_t len) {
  if (state == CALL_FAILED) lua_pushnil(L);
  lua_pushlstring(L, data, len);
  if (state == CALL_REPLIED) return 1;
  lua_pushstring(L, kind);
  return 3;
}

/* A server says "too_large" when it refused the request for its size, "codec" when its codec
 * could not decode it; any other error is the handler's, "remote". Only known kinds pass: a
 * server cannot invent one. */
static const char *remote_kind(const amqp_basic_properties_t *p) {
  size_t len;
  const char *kind = conn_header(p, RPC_ERROR_KIND_HEADER, &len);
  if (kind && len == 9 && memcmp(kind, "too_large", 9) == 0) return "too_large";
  if (kind && len == 5 && memcmp(kind, "codec", 5) == 0) return "codec";
  if (kind && len == 8 && memcmp(kind, "poisoned", 8) == 0) return "poisoned";
  return "remote";
}

/* Settles the call the message in hand answers. If it is target, pushes the result straight
 * from the frame (the one copy of the body) and returns its count; a reply for another
 * pending call is kept for its wait, unless nobody waits and its deadline has passed; any other
 * is discarded and counted. */
static int settle(lua_State *L, struct rpc_client *c, int idx, enum conn_event ev,
                  const unsigned char *target) {
  const struct rpc_message *m = &c->conn.msg;
  unsigned char id[16];
  struct rpc_call *call;
  if (!correlation_of(m->props, id) || !(call = pending_find(&c->pending, id)) ||
      call->state != CALL_WAITING) {
    c->stats.discarded++;  /* late, duplicated, foreign or missing id */
    return 0;
  }
  double now = rpc_now();
  char text[512];
  size_t len = 0;
  const char *data, *kind = NULL;
  enum call_state state = CALL_FAILED;
  int retryable = ev == EV_RETURN;  /* unroutable: no queue took it, so no handler saw it */
  if (ev == EV_RETURN) {
    const amqp_basic_return_t *r = &m->returned;
    snprintf(text, sizeof text,
             "no route: nothing is bound to routing key '%.*s' on exchange '%.*s' (%d %.*s)",
             (int)r->routing_key.len, (const char *)r->routing_key.bytes, (int)r->exchange.len,
             (const char *)r->exchange.bytes, r->reply_code, (int)r->reply_text.len,
             (const char *)r->reply_text.bytes);
    data = text;
    len = strlen(text);
    kind = "no_route";
    c->stats.no_route++;
  } else if (m->oversized) {
    snprintf(text, sizeof text, "the reply of %zu bytes is over max_body (%zu)", m->size, c->conn.max_body);
    data = text;
    len = strlen(text);
    kind = "too_large";
    c->stats.replies++;
  } else if ((data = conn_header(m->props, RPC_ERROR_HEADER, &len))) {
    kind = remote_kind(m->props);
    c->stats.replies++;
    c->stats.remote_errors++;
  } else {
    state = CALL_REPLIED;
    data = m->body;
    len = m->size;
    c->stats.replies++;
    /* timed as it arrives, not when a wait takes it: a late wait() is not the round trip's */
    histogram_record(&c->latency, now - call->published);
  }
  if (!call->waited && call->deadline < now) {  /* counted as any reply, then the next */
    forget_unwaited(L, c, idx, call);                 /* sweep's: not kept meanwhile, however */
    c->stats.discarded++;                             /* long another wait reads */
    return 0;
  }
  const amqp_basic_properties_t *props = state == CALL_REPLIED && call->want_props ? m->props : NULL;
  if (memcmp(id, target, 16) == 0) {
    c->took_at = now;
    if (retryable) memcpy(c->retryable_id, id, 16);
    remove_call(c, call);
    if (!props) return push_result(L, state, kind, data, len);
    rpc_codec_push_properties(L, props);  /* before the body, which is read before any finalizer */
    push_result(L, state, kind, data, len);
    lua_insert(L, -2);
    return 2;
  }
  keep(L, c, idx, id, state, kind, retryable, data, len, props);
  return 0;
}

/* Reads what the broker has sent, never waiting. Returns the target's result count, or 0. */
static int read_replies_in_hand(lua_State *L, struct rpc_client *c, int idx,
                                const unsigned char *target) {
  for (;;) {
    enum conn_event ev = conn_pump(&c->conn);
    if (ev == EV_NONE) return 0;
    if (ev == EV_CANCELLED) conn_lost(&c->conn, "connection", "the broker cancelled the reply consumer");
    if (ev == EV_FAILED || ev == EV_CANCELLED) {
      fail_all(L, c, idx, c->conn.error_kind, c->conn.error);
      return 0;
    }
    if (ev == EV_NACKED) {
      fail_nacked(L, c, idx);
      continue;
    }
    if (ev == EV_BLOCKED) {  /* requests in flight may never be read: do not let them hang */
      frames_discard(&c->conn.out);  /* queued sends: failed as blocked, so never written */
      fail_all(L, c, idx, "blocked", c->conn.blocked);
      continue;
    }
    int n = settle(L, c, idx, ev, target);
    conn_release_message(&c->conn);
    if (n) return n;
  }
}

static int read_protected(lua_State *L) {
  struct rpc_client *c = lua_touserdata(L, 1);
  const unsigned char *target = lua_touserdata(L, 2);
  lua_settop(L, 1);
  return read_replies_in_hand(L, c, 1, target);
}

/* Keeping a reply allocates, and so may run a finalizer that uses this client: it must not
 * read on while the message in hand is not released (check_usable refuses it). The reading
 * runs protected: a raise (out of memory) releases the message and clears the flag, then
 * returns -1 with the error on top for the caller to forget its call and raise it again. */
static int read_replies(lua_State *L, struct rpc_client *c, int idx, const unsigned char *target) {
  int top = lua_gettop(L);
  lua_pushcfunction(L, read_protected);
  lua_pushvalue(L, idx);
  lua_pushlightuserdata(L, (void *)target);
  c->reading = 1;
  int status = lua_pcall(L, 2, LUA_MULTRET, 0);
  c->reading = 0;
  if (status == LUA_OK) return lua_gettop(L) - top;
  conn_release_message(&c->conn);
  return -1;
}

/* Before the queue is written: the queued requests whose calls' deadlines have passed (their
 * caller was away longer than they had) are taken out. Only a queue older than DEFER_AFTER can
 * hold one: a ring of sends and waits writes its queue within microseconds. */
static void unqueue_expired(struct rpc_client *c) {
  if (!c->conn.out.len) return;
  double now = rpc_now();
  if (now - c->conn.out.since < DEFER_AFTER) return;
  for (size_t i = 0; i < c->pending.cap; i++) {
    struct rpc_call *call = &c->pending.slots[i];
    if (call->used && call->queued_len && call->deadline <= now) unqueue(c, call);
  }
}

/* Sends nobody waited for are dropped once their deadline has passed: their slots and kept
 * replies would otherwise stay forever. Runs no Lua code. Sweeping when the table has doubled
 * since the last sweep keeps it O(1) per call. */
static void forget_expired(lua_State *L, struct rpc_client *c, int idx) {
  double now = rpc_now();
  for (size_t i = 0; i < c->pending.cap; i++) {
    struct rpc_call *call = &c->pending.slots[i];
    while (call->used && !call->waited && call->deadline < now)  /* a removal may shift one in */
      forget_unwaited(L, c, idx, call);
  }
  c->sweep_at = c->pending.count * 2 > SWEEP_MIN ? c->pending.count * 2 : SWEEP_MIN;
}

static int was_swept(const struct rpc_client *c, const unsigned char id[16]) {
  size_t used = c->swept_next < SWEPT_KEPT ? c->swept_next : SWEPT_KEPT;  /* not the zeroed rest */
  for (size_t i = 0; c->swept && i < used; i++)
    if (memcmp(c->swept[i], id, 16) == 0) return 1;
  return 0;
}

/* The call's wait ended without a reply: it is forgotten (a late reply is discarded). */
static int timed_out(lua_State *L, struct rpc_client *c, struct rpc_call *call) {
  double seconds = call->timeout;
  remove_call(c, call);
  c->stats.timeouts++;
  char text[400];
  snprintf(text, sizeof text, "no reply from queue '%s' within %.4g s", c->queue, seconds);
  return rpc_fail(L, "timeout", text);
}

/* Writes the requests send() queued (may_defer), once what was buffered has been read: a
 * failed write drops the connection, and replies still in its buffer with it. 0, or -1 with the
 * connection lost: the next read fails the calls in flight, queued ones too (they may have gone
 * out in part). Not while a reply is in hand: the loss would release it. */
static int flush_requests(struct rpc_client *c, double limit) {
  if (!c->open || c->reading || !c->conn.out.len || conn_has_input(&c->conn)) return 0;
  unqueue_expired(c);
  /* a stalled broker holds it at most the waiter's time (at least 1 s, README's slack) */
  return conn_flush(&c->conn, c->timeout, fmin(fmax(c->timeout, 1) + 1, fmax(limit, 1)));
}

/* One look at call id, waited for in a handler thread until call->wait_deadline: its result
 * pushed (the count), or 0: wait on (the loop reads the client, and writes its queued sends,
 * in its watch_step). */
static int look(lua_State *L, struct rpc_client *c, int idx, const unsigned char *id) {
  if (!c->open) return rpc_fail(L, "closed", "client closed while waiting for a reply");
  struct rpc_call *call = pending_find(&c->pending, id);
  if (!call) return luaL_error(L, "rabbitrpc: the call being waited for is gone");
  if (call->state != CALL_WAITING) return take(L, c, idx, call);
  if (rpc_now() >= call->wait_deadline) return timed_out(L, c, call);
  call->waiter = L;
  return 0;
}

/* In a handler thread: suspends it until the call is settled or its deadline. Its stack keeps
 * the client at 1 and the id at ctx, the top (a script resuming the thread may push more). */
static int wait_k(lua_State *L, int status, lua_KContext ctx) {
  (void)status;
  lua_settop(L, (int)ctx);
  loop_unsuspend(L);
  struct rpc_client *c = lua_touserdata(L, 1);
  const unsigned char *id = (const unsigned char *)lua_tostring(L, (int)ctx);
  int n = look(L, c, 1, id);
  if (n) return n;
  return loop_suspend(L, pending_find(&c->pending, id)->wait_deadline, ctx, wait_k);
}

static int wait_suspended(lua_State *L, struct rpc_client *c, int idx, const unsigned char *id,
                          double deadline) {
  struct rpc_call *call = pending_find(&c->pending, id);
  if (!call) return luaL_error(L, "rabbitrpc: the call being waited for is gone");
  call->wait_deadline = deadline;
  (void)idx;  /* 1: call and wait have the client first */
  lua_pushlstring(L, (const char *)id, 16);  /* may run a finalizer: wait_k looks everything up */
  return wait_k(L, LUA_OK, lua_gettop(L));
}

/* In a coroutine of an outside scheduler (rpc.cqueues): yields to it, polling the client, and
 * on each wake does the state's ready work (replies read, handlers resumed) and looks again.
 * Stack: the client at 1, the id at ctx. */
static int wait_outside_k(lua_State *L, int status, lua_KContext ctx) {
  (void)status;
  lua_settop(L, (int)ctx);
  struct rpc_client *c = lua_touserdata(L, 1);
  if (c->open) loop_step(L, c->loop);
  lua_settop(L, (int)ctx);
  const unsigned char *id = (const unsigned char *)lua_tostring(L, (int)ctx);
  int n = look(L, c, 1, id);
  if (n) return n;
  return loop_yield_outside(L, 1, pending_find(&c->pending, id)->wait_deadline - rpc_now(), ctx,
                            wait_outside_k);
}

/* may_suspend: a handler thread's wait suspends it (not call_all's, which waits in a C loop). */
static int wait_for(lua_State *L, struct rpc_client *c, int idx, const unsigned char *id,
                    double deadline, int may_suspend) {
  if (may_suspend && loop_can_suspend(L)) return wait_suspended(L, c, idx, id, deadline);
  if (may_suspend && loop_can_yield_outside(L)) {  /* it ran Lua code: look everything up again */
    struct rpc_call *call = c->open ? pending_find(&c->pending, id) : NULL;
    if (!call) return rpc_fail(L, "closed", "client closed while waiting for a reply");
    call->wait_deadline = deadline;
    lua_pushlstring(L, (const char *)id, 16);
    return wait_outside_k(L, LUA_OK, lua_gettop(L));
  }
  lua_Hook hook = lua_gethook(L);
  unsigned long interrupts = loop_interrupts(c->loop);
  int ready = conn_has_input(&c->conn);  /* else go straight to poll: no recv that must fail */
  for (;;) {
    if (!c->open) return rpc_fail(L, "closed", "client closed while waiting for a reply");
    struct rpc_call *call = pending_find(&c->pending, id);
    /* never: a waited call is removed only by its waiter (wait() refuses a second one) */
    if (!call) return luaL_error(L, "rabbitrpc: the call being waited for is gone");
    /* Ctrl-C seen here (it may have come while a handler ran to its end in its own thread,
     * where lua.c's hook does not reach), or taken by a handler this wait ran */
    if (lua_gethook(L) != hook || loop_interrupts(c->loop) != interrupts) {
      if (call->ref != LUA_NOREF) forget_call(L, c, idx, call);
      else remove_call(c, call);
      return rpc_fail(L, "interrupted", "interrupted while waiting for a reply");
    }
    if (call->state != CALL_WAITING) return take(L, c, idx, call);  /* settled meanwhile */
    if (ready) {
      ready = 0;
      int n = read_replies(L, c, idx, id);
      if (n < 0) {
        call = c->open ? pending_find(&c->pending, id) : NULL;
        if (call) forget_call(L, c, idx, call);
        if (!loop_took_interrupt(L, c->loop)) return lua_error(L);
        return rpc_fail(L, "interrupted", "interrupted while waiting for a reply");
      }
      if (n) return decoded(L, c, idx, n);
      continue;  /* a finalizer may have closed it; another reply may have settled it */
    }
    if (rpc_now() >= deadline) return timed_out(L, c, call);
    if (flush_requests(c, deadline - rpc_now())) {  /* (all read by now) lost: reading fails the calls */
      ready = 1;
      continue;
    }
    ready = loop_wait(L, c->loop, &c->conn, deadline);
  }
}

/* ---- the loop's view: replies read, and heartbeats answered, while others wait ---- */

static const struct rpc_client *client_of(const struct rpc_watch *w) {
  return (const struct rpc_client *)(const void *)((const char *)w - offsetof(struct rpc_client, watch));
}

static int watch_pollfd(const struct rpc_watch *w) {
  const struct rpc_client *c = client_of(w);
  return c->open && !c->reading ? conn_fd(&c->conn) : -1;
}

static int watch_has_input(const struct rpc_watch *w) {
  const struct rpc_client *c = client_of(w);
  return c->open && !c->reading && conn_has_input(&c->conn);
}

/* queued sends are due at once: whoever turns the loop writes them before it waits */
static double watch_next_due(const struct rpc_watch *w) {
  const struct rpc_client *c = client_of(w);
  if (!c->open || c->reading || !c->conn.amqp) return HUGE_VAL;
  return c->conn.out.len ? c->conn.out.since : c->conn.last_pumped + RPC_HEARTBEAT_READ;
}

/* limit: the waiter's time left, which a write stalled by the broker may not hold up (a client
 * reconnects in its next call, not here) */
static void watch_step(lua_State *L, int idx, double limit) {
  static const unsigned char nobody[16];
  struct rpc_client *c = lua_touserdata(L, idx);
  for (int pass = 0; pass < 2; pass++) {  /* read, write what is queued; a failed write is read */
    if (c->open && !c->reading && read_replies(L, c, idx, nobody) < 0) {  /* a reply lost to a raise */
      loop_took_interrupt(L, c->loop);  /* or a Ctrl-C, for the waits under way */
      lua_pop(L, 1);
    }
    if (!flush_requests(c, limit)) break;
  }
}

static const struct rpc_watch_ops watch_ops = {watch_pollfd, watch_has_input, watch_next_due, watch_step};

/* ---- publishing ---- */

struct request {  /* what each request of one call, send or call_all carries */
  amqp_basic_properties_t props;
  amqp_bytes_t exchange, routing_key;
  double timeout;
  int arg, headers;  /* the callopts argument; the stack index of its headers table, or 0 */
  int properties;    /* the reply's properties go with it */
  const struct rpc_context *ctx;  /* of the request whose handler makes it, or NULL */
  double until;                   /* that request's deadline (rpc_now), or HUGE_VAL */
  double deadline_ms;             /* its deadline, wall clock, for the deadline header */
  char traceparent[56];           /* "": no trace context of ours */
  int retries;                    /* call's: retries allowed (callopts.retries, else opts.retries) */
  lua_Integer attempt;            /* what x-rpc-attempt says; 0: no such header */
};

static const char *const call_options[] = {"content_type", "headers", "persistent", "priority",
                                           "exchange", "routing_key", "properties", "retries", NULL};
static const char *const send_options[] = {"content_type", "headers", "persistent", "priority",
                                           "exchange", "routing_key", "timeout", "properties", NULL};

static amqp_bytes_t short_string(lua_State *L, int arg, const char *key, const char *def) {
  size_t len;
  const char *s = opts_string(L, arg, key, def, &len);
  if (len > 255)
    luaL_argerror(L, arg, lua_pushfstring(L, "option '%s' longer than 255 bytes", key));
  amqp_bytes_t b = {len, (void *)s};
  return b;
}

/* Reads the options table at arg into r. Headers are only checked here and kept on the stack:
 * publish builds them, after the last Lua allocation (a finalizer run by one may call this
 * client, and recycle its pool). */
static void read_request(lua_State *L, struct rpc_client *c, int arg, const char *const keys[],
                         struct request *r) {
  amqp_basic_properties_t *p = &r->props;
  p->_flags = 0;
  r->arg = arg;
  r->headers = 0;
  r->exchange = amqp_cstring_bytes(c->exchange);
  r->routing_key = amqp_cstring_bytes(c->queue);
  r->properties = 0;
  r->retries = c->retries;
  if (c->codec.content_type_len) {  /* what the codec makes, unless callopts say otherwise */
    p->_flags |= AMQP_BASIC_CONTENT_TYPE_FLAG;
    p->content_type = (amqp_bytes_t){c->codec.content_type_len, c->codec.content_type};
  }
  if (lua_isnoneornil(L, arg)) return;
  opts_check_keys(L, arg, keys);
  amqp_bytes_t content_type = short_string(L, arg, "content_type", NULL);
  if (content_type.bytes) {
    p->_flags |= AMQP_BASIC_CONTENT_TYPE_FLAG;
    p->content_type = content_type;
  }
  r->properties = opts_boolean(L, arg, "properties", 0);
  if (keys == call_options) r->retries = (int)opts_integer(L, arg, "retries", c->retries, 0, RPC_MAX_RETRIES);
  if (opts_boolean(L, arg, "persistent", 0)) {
    p->_flags |= AMQP_BASIC_DELIVERY_MODE_FLAG;
    p->delivery_mode = 2;
  }
  lua_Integer priority = opts_integer(L, arg, "priority", -1, 0, 255);
  if (priority >= 0) {
    p->_flags |= AMQP_BASIC_PRIORITY_FLAG;
    p->priority = (uint8_t)priority;
  }
  r->exchange = short_string(L, arg, "exchange", c->exchange);
  r->routing_key = short_string(L, arg, "routing_key", c->queue);
  if (keys == send_options) r->timeout = opts_number(L, arg, "timeout", r->timeout, 0.001, RPC_MAX_TIMEOUT);
  if (opts_get(L, arg, "headers") != LUA_TNIL) {
    if (!lua_istable(L, -1))
      luaL_argerror(L, arg, lua_pushfstring(L, "option 'headers' must be a table, got %s",
                                            luaL_typename(L, -1)));
    table_from_lua(L, lua_gettop(L), arg, NULL, NULL);
    r->headers = lua_gettop(L);  /* stays on the stack, keeping its strings alive */
    return;
  }
  lua_pop(L, 1);  /* the other strings stay alive in the options table */
}

/* Everything a publish needs: open, and a live connection (a lost one is replaced, within
 * limit seconds: the call's timeout). Returns 0, or pushes a failure. */
static int ready_to_publish(lua_State *L, struct rpc_client *c, int idx, double limit) {
  static const unsigned char nobody[16];  /* no random uuid is all zeros */
  if (!c->open) return rpc_fail(L, "closed", "client closed");
  /* the broker may have dropped us since the last read (a connection.close on stop_app, a
   * reset, missed heartbeats): read what waits first, so a dead connection is replaced before
   * publishing rather than failing the call */
  if (conn_should_read(&c->conn) && read_replies(L, c, idx, nobody) < 0) return lua_error(L);
  if (!c->open) return rpc_fail(L, "closed", "client closed");  /* by a finalizer meanwhile */
  if (!c->conn.amqp && client_connect(c, limit)) return rpc_fail(L, c->conn.error_kind, c->conn.error);
  if (c->conn.blocked[0]) {  /* the broker would not read the request: fail now, not at the timeout */
    if (read_replies(L, c, idx, nobody) < 0) return lua_error(L);  /* unless it has unblocked meanwhile */
    if (!c->open) return rpc_fail(L, "closed", "client closed");
    if (c->conn.blocked[0]) return rpc_fail(L, "blocked", c->conn.blocked);
  }
  return 0;
}

static int too_large(lua_State *L, const struct rpc_client *c, size_t len) {
  lua_pushnil(L);
  lua_pushfstring(L, "request body of %I bytes is over max_body (%I)", (lua_Integer)len,
                  (lua_Integer)c->conn.max_body);
  lua_pushliteral(L, "too_large");
  return 3;
}

/* Inside a handler, a call gets at most the time its request has left: none left, it fails at
 * once (its caller has given up), else r's timeout is cut to it. Returns 0, or pushes the
 * failure. */
static int within_deadline(lua_State *L, struct rpc_client *c, struct request *r) {
  r->ctx = loop_context(c->loop);
  r->until = HUGE_VAL;
  if (!c->open || !r->ctx || r->ctx->deadline_wall <= 0) return 0;  /* closed: said next */
  r->until = r->ctx->deadline;
  double left = r->until - rpc_now();
  if (left < 0.001) {
    c->stats.calls++;
    c->stats.timeouts++;
    return rpc_fail(L, "timeout", "the request being served is past its deadline: no time left to call");
  }
  if (left < r->timeout) r->timeout = left;
  return 0;
}

static int is_key(const amqp_table_entry_t *e, const char *key, size_t len) {
  return e->key.len == len && memcmp(e->key.bytes, key, len) == 0;
}

static int has_key(const amqp_table_t *t, const char *key) {
  size_t len = strlen(key);
  for (int i = 0; i < t->num_entries; i++)
    if (is_key(&t->entries[i], key, len)) return 1;
  return 0;
}

/* The headers a request carries: the caller's, its deadline, its attempt (a call with retries),
 * and the trace it continues (the served request's, or a new one with opts.trace) unless the
 * caller gave a traceparent. */
static void stamp_headers(lua_State *L, struct rpc_client *c, struct request *r) {
  amqp_table_t user = amqp_empty_table;
  recycle_amqp_pool(&c->pool);
  if (r->headers) table_from_lua(L, r->headers, r->arg, &c->pool, &user);
  int traced = !has_key(&user, "traceparent") && (c->trace || (r->ctx && r->ctx->traced));
  if (traced && !r->traceparent[0]) trace_child(r->ctx, c->ids, r->traceparent);
  amqp_table_entry_t *e = amqp_pool_alloc(&c->pool, ((size_t)user.num_entries + 4) * sizeof *e);
  if (!e) luaL_error(L, "not enough memory");
  int n = 0;
  for (int i = 0; i < user.num_entries; i++)  /* the deadline and the attempt are ours to say */
    if (!is_key(&user.entries[i], RPC_DEADLINE_HEADER, sizeof RPC_DEADLINE_HEADER - 1) &&
        !(r->attempt && is_key(&user.entries[i], RPC_ATTEMPT_HEADER, sizeof RPC_ATTEMPT_HEADER - 1)))
      e[n++] = user.entries[i];
  e[n].key = amqp_cstring_bytes(RPC_DEADLINE_HEADER);
  e[n].value.kind = AMQP_FIELD_KIND_I64;
  e[n++].value.value.i64 = (int64_t)r->deadline_ms;
  if (r->attempt) {
    e[n].key = amqp_cstring_bytes(RPC_ATTEMPT_HEADER);
    e[n].value.kind = AMQP_FIELD_KIND_I64;
    e[n++].value.value.i64 = (int64_t)r->attempt;
  }
  if (traced) {
    e[n].key = amqp_cstring_bytes("traceparent");
    e[n].value.kind = AMQP_FIELD_KIND_UTF8;
    e[n++].value.value.bytes = (amqp_bytes_t){55, r->traceparent};
    if (r->ctx && r->ctx->tracestate_len && !has_key(&user, "tracestate")) {
      e[n].key = amqp_cstring_bytes("tracestate");
      e[n].value.kind = AMQP_FIELD_KIND_UTF8;
      e[n++].value.value.bytes = (amqp_bytes_t){r->ctx->tracestate_len, (void *)r->ctx->tracestate};
    }
  }
  r->props.headers = (amqp_table_t){n, e};
  r->props._flags |= AMQP_BASIC_HEADERS_FLAG;
}

/* Fills in what every attempt of a request carries. Runs no Lua code (table_from_lua may raise
 * for memory only): the headers point into the pool, which a finalizer calling this client
 * would recycle. */
static void stamp_request(lua_State *L, struct rpc_client *c, struct request *r, const char *id_text) {
  stamp_headers(L, c, r);
  long long ms = (long long)ceil(r->timeout * 1000);
  if (ms != c->expiration_of) {  /* printing costs more than the rest */
    snprintf(c->expiration, sizeof c->expiration, "%lld", ms);
    c->expiration_of = ms;
  }
  r->props._flags |= AMQP_BASIC_CORRELATION_ID_FLAG | AMQP_BASIC_REPLY_TO_FLAG | AMQP_BASIC_EXPIRATION_FLAG;
  r->props.correlation_id = (amqp_bytes_t){36, (void *)id_text};
  r->props.reply_to = amqp_cstring_bytes(c->reply_to);  /* a reconnect may rename it */
  r->props.expiration = amqp_cstring_bytes(c->expiration);
}

/* Publishes one request under a fresh id (its text in id_text), pending until deadline, its
 * call's end; r's deadline_ms, traceparent and attempt are set. waited: a wait on it is under
 * way from the start (call, call_all), so neither a sweep nor a second wait may take it.
 * Returns 0, or pushes the failure and returns 3. A publish that fails never went out whole,
 * so no broker routed it: the calls the lost connection carried fail, and this one is tried
 * once more on a fresh connection (the next broker of urls) within its timeout. */
static int publish_once(lua_State *L, struct rpc_client *c, int idx, struct request *r,
                        const char *body, size_t len, unsigned char id[16], char id_text[37],
                        int waited, double deadline, int defer) {
  if (c->pending.count >= c->sweep_at) forget_expired(L, c, idx);
  ids_next(c->ids, id);
  uuid_unparse_lower(id, id_text);
  for (int tries = 1;; tries++) {
    /* lost meanwhile (a finalizer's call, a failed attempt): reconnect first */
    if (!c->conn.amqp && client_connect(c, deadline - rpc_now()))
      return rpc_fail(L, c->conn.error_kind, c->conn.error);
    stamp_request(L, c, r, id_text);  /* from here to the publish, nothing may run Lua code */
    struct rpc_call *call = pending_add(&c->pending, id);
    if (!call) return luaL_error(L, "not enough memory");
    call->timeout = r->timeout;
    call->deadline = deadline;
    call->waited = waited;
    call->seq = c->confirm ? ++c->published : 0;
    call->want_props = r->properties;
    call->published = rpc_now();
    call->one_queue = r->exchange.len == 0;
    /* mandatory: an unroutable request comes back as basic.return and fails the call at once */
    amqp_bytes_t bytes = {len, (void *)body};
    unqueue_expired(c);  /* this publish writes the queue, or joins it */
    size_t at = c->conn.out.len;
    int st = defer && tries == 1 ? conn_queue_publish(&c->conn, r->exchange, r->routing_key, 1, &r->props, bytes, r->timeout) : -2;
    if (st == -2) st = conn_publish(&c->conn, r->exchange, r->routing_key, 1, &r->props, bytes, r->timeout);
    if (!st && c->conn.out.len > at) {  /* queued (plain TCP): where, until written */
      call->queued_at = at;
      call->queued_len = c->conn.out.len - at;
      call->queued_in = c->conn.out.emptied;
    }
    if (!st) return 0;
    remove_call(c, call);
    fail_all(L, c, idx, c->conn.error_kind, c->conn.error);
    if (!c->open) return rpc_fail(L, "closed", "client closed");  /* by a finalizer meanwhile */
    if (tries > 1 || rpc_now() >= deadline) return rpc_fail(L, c->conn.error_kind, c->conn.error);
  }  /* the next try reconnects, unless a finalizer run by fail_all already did */
}

/* A new request (call, send, call_all) published: publish_once, its deadline r's timeout from
 * now (at most the served request's), with no x-rpc-attempt header. */
static int publish(lua_State *L, struct rpc_client *c, int idx, struct request *r,
                   const char *body, size_t len, unsigned char id[16], char id_text[37], int waited,
                   int defer) {
  if (len > c->conn.max_body) return too_large(L, c, len);
  if (!c->open) return rpc_fail(L, "closed", "client closed");  /* by a finalizer meanwhile */
  double now = rpc_now(), deadline = fmin(now + r->timeout, r->until);
  /* a reconnect took the time its request had left (not deadline - now: a 0.001 s timeout
   * would round below 0.001 one time in two) */
  if (r->until - now < 0.001) {
    c->stats.calls++;
    c->stats.timeouts++;
    return rpc_fail(L, "timeout", "the request being served is past its deadline: no time left to call");
  }
  r->timeout = deadline - now;  /* its wait's, its expiration's and its deadline header's */
  r->deadline_ms = ceil((rpc_wall_now() + r->timeout) * 1000);
  r->traceparent[0] = '\0';  /* one span for all tries */
  r->attempt = 0;
  c->stats.calls++;
  return publish_once(L, c, idx, r, body, len, id, id_text, waited, deadline, defer);
}

/* ---- safe retries (opts.retries, callopts.retries): call only ----
 * A call is sent again only when its request provably reached no handler: returned unroutable
 * (no_route), refused by the broker (a basic.nack, with confirms), never published because the
 * broker blocks publishing, or its connection lost before the publish was whole (after
 * publish_once's own second try). A timeout, a handler's error, a connection lost once the
 * request was out: the work may have run, and is never repeated. Every attempt is a new request
 * (a new correlation id: a late reply for an earlier one is discarded) with x-rpc-attempt and
 * the call's one deadline; retries wait a backoff, all within that deadline. Between attempts
 * everything lives on the stack, as a handler thread suspends there. */

#define RETRY_BASE 0.05  /* seconds before the first retry (at most: jitter), doubled for each */
#define RETRY_CAP 1.0    /* the longest backoff */
#define RETRY_STATE 5    /* stack: 1 client, 2 body, 3 timeout, 4 callopts, 5 struct retry, */
#define RETRY_ID 6       /* 6 the pending attempt's id (16 bytes), while it is waited for */

enum retry_phase { RETRY_PUBLISH, RETRY_WAIT, RETRY_SLEEP };
enum retry_how { RETRY_INLINE, RETRY_SUSPEND, RETRY_OUTSIDE };  /* how it waits: see wait_for */

struct retry {
  enum retry_phase phase;
  int counted;             /* in stats.calls (once a publish is tried, as a call without retries) */
  lua_Integer attempt;     /* 1 for the first */
  lua_Integer left;        /* retries left */
  double deadline;         /* monotonic: the call's end, fixed when it starts */
  double deadline_ms;      /* the same on the wall clock, which every attempt's header says */
  double timeout;          /* the call's, for the timeout message */
  double due;              /* RETRY_SLEEP: when the next attempt starts */
  char traceparent[56];    /* one span for all attempts */
};

/* The backoff before retry number `attempt`: RETRY_BASE doubled for each earlier retry, at most
 * RETRY_CAP, and jittered to between half and all of that, so that callers failed by the same
 * event do not all come back at once. */
static double backoff(struct rpc_client *c, lua_Integer attempt) {
  unsigned char random[16];
  ids_next(c->ids, random);
  uint32_t bits;
  memcpy(&bits, random, sizeof bits);
  double delay = attempt > 6 ? RETRY_CAP : fmin(RETRY_CAP, RETRY_BASE * (double)(1 << (attempt - 1)));
  return delay * (0.5 + 0.5 * (bits / 4294967296.0));
}

/* The failure n results on top (nil, message, kind), of an attempt that provably reached no
 * handler (retryable): 1, the failure popped, when another attempt is to follow after a backoff;
 * 0 when the call ends with it. A retry whose backoff would leave the attempt less than
 * RETRY_BASE before the deadline is not made: it would likely only turn the failure into a
 * timeout. */
static int retry_after(lua_State *L, struct rpc_client *c, struct retry *t, int n, int retryable) {
  if (n != 3 || !retryable || t->left <= 0 || !c->open) return 0;
  double now = rpc_now(), delay = backoff(c, t->attempt);
  if (now + delay + RETRY_BASE > t->deadline) return 0;
  t->left--;
  t->due = now + delay;
  t->phase = RETRY_SLEEP;
  lua_settop(L, RETRY_STATE);
  return 1;
}

/* A failure before the publish (kind on top) that a later attempt may not meet: a broker that
 * blocks publishing, a connection lost or refused. Not auth, tls, broker: they stay. */
static int retryable_kind(lua_State *L) {
  const char *kind = lua_tostring(L, -1);
  return kind && (strcmp(kind, "blocked") == 0 || strcmp(kind, "connection") == 0);
}

/* Publishes attempt t->attempt: 0, with its id at RETRY_ID (pending, waited for until the
 * deadline), or its failure pushed (3), *retryable set when it is one that reached no handler.
 * callopts are read again for each attempt: their strings must stay alive until the publish. */
static int retry_publish(lua_State *L, struct rpc_client *c, struct retry *t, int *retryable) {
  struct request r;
  lua_settop(L, RETRY_STATE);
  /* the attempt id's place first (RETRY_ID, below what read_request pushes): an allocation
   * after the publish could raise and leave a waited call pending that nobody takes */
  unsigned char *slot = lua_newuserdatauv(L, 16, 0);
  r.timeout = fmax(t->deadline - rpc_now(), 0.001);
  read_request(L, c, 4, call_options, &r);
  r.ctx = loop_context(c->loop);  /* the served request's, if any: its trace (its deadline is in t's) */
  size_t len;
  const char *body = lua_tolstring(L, 2, &len);
  if (len > c->conn.max_body) return too_large(L, c, len);
  int n = ready_to_publish(L, c, 1, r.timeout);
  if (n) {
    *retryable = retryable_kind(L);
    return n;
  }
  if (!t->counted) c->stats.calls++;
  t->counted = 1;
  r.timeout = t->deadline - rpc_now();  /* a reconnect may have taken some */
  if (r.timeout < 0.001) {
    c->stats.timeouts++;
    return rpc_fail(L, "timeout", "the call's deadline passed while reconnecting: no time left to publish");
  }
  r.deadline_ms = t->deadline_ms;
  r.attempt = t->attempt;
  memcpy(r.traceparent, t->traceparent, sizeof r.traceparent);
  unsigned char id[16];
  char id_text[37];
  n = publish_once(L, c, 1, &r, body, len, id, id_text, 1, t->deadline, 0);
  memcpy(t->traceparent, r.traceparent, sizeof t->traceparent);  /* one span for all attempts */
  if (n) {
    *retryable = retryable_kind(L);
    return n;
  }
  struct rpc_call *call = pending_find(&c->pending, id);  /* no Lua code ran since: it is there */
  if (call) {
    call->timeout = t->timeout;
    call->wait_deadline = t->deadline;
  }
  memcpy(slot, id, 16);
  lua_settop(L, RETRY_ID);
  return 0;
}

static int retry_k(lua_State *L, int status, lua_KContext ctx);

/* Runs a retrying call from its phase to its end: publishes, waits, backs off, again. In a
 * handler thread (RETRY_SUSPEND) or an outside scheduler's coroutine (RETRY_OUTSIDE), a wait or
 * a backoff yields and retry_k comes back here; elsewhere both turn the loop, so the state's
 * servers are served meanwhile. */
static int retry_run(lua_State *L, enum retry_how how) {
  static const unsigned char nobody[16];
  struct rpc_client *c = lua_touserdata(L, 1);
  struct retry *t = lua_touserdata(L, RETRY_STATE);
  lua_Hook hook = lua_gethook(L);  /* RETRY_INLINE never yields: these hold for its whole run */
  unsigned long interrupts = c->open ? loop_interrupts(c->loop) : 0;
  for (;;) {
    int n, retryable = 0;
    /* closed meanwhile (by a handler or finalizer the backoff ran): loop is gone too */
    if (!c->open) return rpc_fail(L, "closed", "client closed while retrying");
    /* no attempt pending here: a Ctrl-C (or, once it has backed off, run()'s signal) seen
     * meanwhile ends the call */
    if (how == RETRY_INLINE && t->phase != RETRY_WAIT &&
        (lua_gethook(L) != hook || loop_interrupts(c->loop) != interrupts ||
         ((t->attempt > 1 || t->phase == RETRY_SLEEP) && loop_signalled())))
      return rpc_fail(L, "interrupted", "interrupted while waiting to retry");
    if (t->phase == RETRY_PUBLISH && c->reading && how != RETRY_INLINE) {
      /* resumed by a loop a finalizer turns while this client reads a reply: not now */
      if (how == RETRY_SUSPEND) return loop_suspend(L, rpc_now() + 0.001, how, retry_k);
      return loop_yield_outside(L, 0, 0, how, retry_k);
    }
    if (t->phase == RETRY_PUBLISH) {
      n = retry_publish(L, c, t, &retryable);
      if (!n) {
        t->phase = RETRY_WAIT;
        continue;
      }
    } else if (t->phase == RETRY_WAIT) {
      unsigned char id[16];
      memcpy(id, lua_touserdata(L, RETRY_ID), 16);
      if (how == RETRY_INLINE) {
        n = wait_for(L, c, 1, id, t->deadline, 0);
      } else if (!(n = look(L, c, 1, id))) {
        if (how == RETRY_SUSPEND) return loop_suspend(L, t->deadline, how, retry_k);
        return loop_yield_outside(L, 1, t->deadline - rpc_now(), how, retry_k);
      }
      retryable = memcmp(c->retryable_id, id, 16) == 0;  /* its failure was taken as one */
    } else {
      if (!c->open) return rpc_fail(L, "closed", "client closed while waiting to retry");
      if (rpc_now() < t->due) {
        if (how == RETRY_SUSPEND) return loop_suspend(L, t->due, how, retry_k);
        if (how == RETRY_OUTSIDE) return loop_yield_outside(L, 0, t->due - rpc_now(), how, retry_k);
        /* its own connection read too (heartbeats, replies for others), and the other watches'
         * reconnects bounded by the call's deadline, as wait_for does */
        int read = flush_requests(c, t->deadline - rpc_now())  /* sends queued before: lost, read */
                       || (loop_wait(L, c->loop, &c->conn, t->due) && c->open && conn_should_read(&c->conn));
        if (read && c->open && read_replies(L, c, 1, nobody) < 0) {
          if (!loop_took_interrupt(L, c->loop)) return lua_error(L);
          return rpc_fail(L, "interrupted", "interrupted while waiting to retry");
        }
        lua_settop(L, RETRY_STATE);
        continue;
      }
      if (t->deadline - rpc_now() < 0.001) {  /* the backoff overran: no time for another */
        c->stats.timeouts++;
        return rpc_fail(L, "timeout", "the call's deadline passed during the backoff before a retry");
      }
      t->phase = RETRY_PUBLISH;
      t->attempt++;
      c->stats.retries++;
      continue;
    }
    if (!retry_after(L, c, t, n, retryable)) return n;
  }
}

/* Where a retrying call's wait or backoff resumes (ctx: its retry_how). */
static int retry_k(lua_State *L, int status, lua_KContext ctx) {
  (void)status;
  struct retry *t = lua_touserdata(L, RETRY_STATE);
  int top = t->phase == RETRY_WAIT ? RETRY_ID : RETRY_STATE;
  lua_settop(L, top);  /* a script resuming the thread may have pushed more */
  if (ctx == RETRY_SUSPEND) {
    loop_unsuspend(L);
  } else {
    struct rpc_client *c = lua_touserdata(L, 1);
    if (c->open) loop_step(L, c->loop);  /* the state's ready work, as wait_outside_k does */
    lua_settop(L, top);
  }
  return retry_run(L, (enum retry_how)ctx);
}

/* client:call with retries > 0 (r read from callopts at 4, the body at 2). */
static int call_retrying(lua_State *L, struct rpc_client *c, struct request *r) {
  int n = within_deadline(L, c, r);  /* the deadline is the served request's too, if sooner */
  if (n) return n;
  lua_settop(L, 4);  /* the headers read_request left: each attempt reads its own */
  struct retry *t = lua_newuserdatauv(L, sizeof *t, 0);
  memset(t, 0, sizeof *t);
  t->phase = RETRY_PUBLISH;
  t->attempt = 1;
  t->left = r->retries;
  double now = rpc_now();
  t->deadline = fmin(now + r->timeout, r->until);
  t->timeout = t->deadline - now;
  t->deadline_ms = ceil((rpc_wall_now() + t->timeout) * 1000);
  if (loop_can_suspend(L)) return retry_run(L, RETRY_SUSPEND);
  if (loop_can_yield_outside(L)) return retry_run(L, RETRY_OUTSIDE);
  return retry_run(L, RETRY_INLINE);
}

/* The body at arg: a string (a number becomes its decimal text); with a codec, any value,
 * encoded in its place first (user code: before callopts are read, whose strings it could
 * change). A value the codec refuses is the caller's bad argument. */
static const char *check_body(lua_State *L, struct rpc_client *c, int arg, size_t *len) {
  if (!c->codec.on) return luaL_checklstring(L, arg, len);
  luaL_checkany(L, arg);
  if (!rpc_codec_encode(L, &c->codec, 1, UV_CODEC, arg, "encode the body"))
    luaL_argerror(L, arg, lua_tostring(L, -1));
  lua_replace(L, arg);
  return lua_tolstring(L, arg, len);
}

/* client:call(body [, timeout [, callopts]]) */
static int client_call(lua_State *L) {
  struct rpc_client *c = check_usable_client(L);
  size_t len;
  const char *body = check_body(L, c, 2, &len);
  struct request r;
  r.timeout = opts_check_timeout(L, 3, c->timeout);
  read_request(L, c, 4, call_options, &r);
  if (r.retries) return call_retrying(L, c, &r);
  unsigned char id[16];
  char id_text[37];
  int n = within_deadline(L, c, &r);
  if (!n) n = ready_to_publish(L, c, 1, r.timeout);
  if (!n) n = publish(L, c, 1, &r, body, len, id, id_text, 1, 0);
  return n ? n : wait_for(L, c, 1, id, rpc_now() + r.timeout, 1);
}

/* A send made right after a wait returned (DEFER_AFTER), while replies the caller has not
 * taken yet are in hand (kept), is queued, not written: the caller reads them one wait at a
 * time (a ring of sends and waits) and waits again soon, so the sends between two reads go out
 * in one write, before the next wait for input (flush_requests), whoever turns the loop (the
 * queue makes the watch due), flush() or close. A caller that never waits (replies kept for
 * nobody) is never made to wait. It has looked at the connection first, as every send does
 * (ready_to_publish). Never for long or much: DEFER_AFTER, DEFER_MAX. Not with publisher
 * confirms (delivery tags are counted as publishes are made: a queued one a block discards would
 * shift them). Under TLS conn_queue_publish writes at once. */
static int may_defer(const struct rpc_client *c, size_t len) {
  const struct rpc_conn *conn = &c->conn;
  if (!c->open || !c->kept || c->confirm || !conn->amqp || conn->blocked[0] || conn->out.len + len >= DEFER_MAX)
    return 0;
  double now = rpc_now();
  return now - c->took_at < DEFER_AFTER && (!conn->out.len || now - conn->out.since < DEFER_AFTER);
}

/* id = client:send(body [, callopts]): publishes and returns the id to wait for. */
static int client_send(lua_State *L) {
  struct rpc_client *c = check_usable_client(L);
  size_t len;
  const char *body = check_body(L, c, 2, &len);
  struct request r;
  r.timeout = c->timeout;
  if (opts_get(L, 3, "retries") != LUA_TNIL)  /* its wait may come too late to retry anything */
    luaL_argerror(L, 3, "option 'retries' is for call only");
  lua_pop(L, 1);
  read_request(L, c, 3, send_options, &r);
  unsigned char id[16];
  char id_text[37];
  int n = within_deadline(L, c, &r);
  if (!n) n = ready_to_publish(L, c, 1, r.timeout);
  if (!n) n = publish(L, c, 1, &r, body, len, id, id_text, 0, may_defer(c, len));
  if (n) return n;
  lua_pushlstring(L, id_text, 36);
  return 1;
}

/* client:wait(id [, timeout]): the reply to a send. Without a timeout, waits until the
 * send's own timeout has passed since it was sent. */
static int client_wait(lua_State *L) {
  struct rpc_client *c = check_usable_client(L);
  size_t len;
  const char *text = luaL_checklstring(L, 2, &len);
  double timeout = opts_check_timeout(L, 3, 0);
  unsigned char id[16];
  luaL_argcheck(L, pending_parse_id(text, len, id), 2, "not an id returned by send");
  if (!c->open) return rpc_fail(L, "closed", "client closed");
  struct rpc_call *call = pending_find(&c->pending, id);
  if (!call && was_swept(c, id)) {
    c->stats.timeouts++;
    return rpc_fail(L, "timeout", "no wait came within the send's timeout: the request was "
                    "forgotten (its reply, if any, discarded)");
  }
  luaL_argcheck(L, call, 2, "unknown id (already waited for, or not sent by this client)");
  luaL_argcheck(L, !call->waited, 2, "this id is already being waited for");
  call->waited = 1;
  if (timeout > 0) call->timeout = timeout;
  return wait_for(L, c, 1, id, timeout > 0 ? rpc_now() + timeout : call->deadline, 1);
}

/* client:flush(): writes the requests send() queued now; true, or nil, message, kind. */
static int client_flush(lua_State *L) {
  static const unsigned char nobody[16];
  struct rpc_client *c = check_usable_client(L);
  if (!c->open) return rpc_fail(L, "closed", "client closed");
  if (conn_has_input(&c->conn) && read_replies(L, c, 1, nobody) < 0) return lua_error(L);  /* first */
  if (!c->open) return rpc_fail(L, "closed", "client closed");  /* by a finalizer meanwhile */
  if (!flush_requests(c, HUGE_VAL)) {
    lua_pushboolean(L, 1);
    return 1;
  }
  char why[sizeof c->conn.error];
  memcpy(why, c->conn.error, sizeof why);
  const char *kind = c->conn.error_kind;  /* a string constant */
  if (read_replies(L, c, 1, nobody) < 0) return lua_error(L);  /* fails the calls in flight */
  return rpc_fail(L, kind ? kind : "connection", why);
}

/* Forgets calls ids[from..n): their replies, if any come, are discarded and counted. */
static void abandon(lua_State *L, struct rpc_client *c, const unsigned char (*ids)[16], lua_Integer from,
                    lua_Integer n) {
  for (lua_Integer i = from; i < n && c->open; i++) {
    struct rpc_call *call = pending_find(&c->pending, ids[i]);
    if (call) forget_call(L, c, 1, call);
  }
}

/* The requests of one call_all, and where its wait is (a handler thread's resumes there). */
struct batch {
  lua_Integer n, sent;
  double deadline;
  unsigned char ids[][16];
};

/* Ends call_all: the replies table (on top), or the failure of request i. */
static int batch_end(lua_State *L, struct rpc_client *c, struct batch *b, lua_Integer i, int failed) {
  if (!failed) return 1;
  abandon(L, c, (const unsigned char (*)[16])b->ids, i + 1, b->sent);
  lua_pushfstring(L, "request %I of %I: %s", i + 1, b->n, lua_tostring(L, -2));
  lua_replace(L, -3);
  return 3;
}

/* call_all's wait in a handler thread. ctx: the request it is at, and (low 20 bits) the index
 * of the replies table, the batch right below it (a script resuming the thread may push more). */
#define BATCH_CTX(i, replies) ((lua_KContext)(i) << 20 | (replies))
static int batch_k(lua_State *L, int status, lua_KContext ctx) {
  (void)status;
  int replies = (int)(ctx & 0xFFFFF);
  lua_settop(L, replies);
  loop_unsuspend(L);
  struct rpc_client *c = lua_touserdata(L, 1);
  struct batch *b = lua_touserdata(L, replies - 1);
  for (lua_Integer i = (lua_Integer)(ctx >> 20); i < b->n; i++) {
    int n = look(L, c, 1, b->ids[i]);
    if (n == 0) return loop_suspend(L, b->deadline, BATCH_CTX(i, replies), batch_k);
    if (n != 1) return batch_end(L, c, b, i, 1);
    lua_rawseti(L, replies, i + 1);
  }
  return 1;
}

/* call_all's wait in an outside scheduler's coroutine: as batch_k, yielding to it and doing the
 * state's ready work on each wake. */
static int batch_outside_k(lua_State *L, int status, lua_KContext ctx) {
  (void)status;
  int replies = (int)(ctx & 0xFFFFF);
  lua_settop(L, replies);
  struct rpc_client *c = lua_touserdata(L, 1);
  struct batch *b = lua_touserdata(L, replies - 1);
  if (c->open) loop_step(L, c->loop);
  lua_settop(L, replies);
  for (lua_Integer i = (lua_Integer)(ctx >> 20); i < b->n; i++) {
    int n = look(L, c, 1, b->ids[i]);
    if (n == 0)
      return loop_yield_outside(L, 1, b->deadline - rpc_now(), BATCH_CTX(i, replies), batch_outside_k);
    if (n != 1) return batch_end(L, c, b, i, 1);
    lua_rawseti(L, replies, i + 1);
  }
  return 1;
}

/* With a codec, the bodies list at arg replaced by a list of their encodings, made before
 * anything is read or sent; one the codec refuses is a bad argument. */
static void encode_bodies(lua_State *L, struct rpc_client *c, int arg, lua_Integer n) {
  lua_createtable(L, (int)n, 0);
  for (lua_Integer i = 1; i <= n; i++) {
    lua_rawgeti(L, arg, i);
    if (!rpc_codec_encode(L, &c->codec, 1, UV_CODEC, -1, "encode the body"))
      luaL_argerror(L, arg, lua_pushfstring(L, "bodies[%I]: %s", i, lua_tostring(L, -1)));
    lua_rawseti(L, -3, i);
    lua_pop(L, 1);
  }
  lua_replace(L, arg);
}

/* replies = client:call_all(bodies [, timeout [, callopts]]): all requests in flight at once,
 * the replies in order; the first failure ends it with nil, "request i of n: ...", kind. */
static int client_call_all(lua_State *L) {
  struct rpc_client *c = check_usable_client(L);
  luaL_checktype(L, 2, LUA_TTABLE);
  lua_Integer n = (lua_Integer)lua_rawlen(L, 2);
  if (c->codec.on) encode_bodies(L, c, 2, n);
  for (lua_Integer i = 1; i <= n; i++) {
    int t = lua_rawgeti(L, 2, i);
    if (t != LUA_TSTRING && t != LUA_TNUMBER)
      luaL_argerror(L, 2, lua_pushfstring(L, "bodies[%I] must be a string or number, got %s", i,
                                          luaL_typename(L, -1)));
    lua_pop(L, 1);
  }
  struct request r;
  r.timeout = opts_check_timeout(L, 3, c->timeout);
  if (opts_get(L, 4, "properties") != LUA_TNIL)
    luaL_argerror(L, 4, "option 'properties' is not for call_all (use send with properties = true, then wait)");
  lua_pop(L, 1);
  if (opts_get(L, 4, "retries") != LUA_TNIL)  /* all or nothing: one retried request would hold the rest */
    luaL_argerror(L, 4, "option 'retries' is for call only");
  lua_pop(L, 1);
  read_request(L, c, 4, call_options, &r);
  for (lua_Integer i = 1; i <= n; i++) {  /* all or nothing: none is sent if one is too large */
    lua_rawgeti(L, 2, i);
    size_t len = lua_rawlen(L, -1);
    lua_pop(L, 1);
    if (len > c->conn.max_body) {
      too_large(L, c, len);
      lua_pushfstring(L, "request %I of %I: %s", i, n, lua_tostring(L, -2));
      lua_replace(L, -3);
      return 3;
    }
  }
  int failed = within_deadline(L, c, &r);
  if (!failed) failed = ready_to_publish(L, c, 1, r.timeout);
  if (failed) return failed;
  struct batch *b = lua_newuserdatauv(L, sizeof *b + 16 * (size_t)n, 0);
  b->n = n;
  b->deadline = fmin(rpc_now() + r.timeout, r.until);
  char id_text[37];
  lua_Integer i;
  for (i = 0; i < n && !failed; i++) {
    lua_rawgeti(L, 2, i + 1);
    size_t len;
    const char *body = lua_tolstring(L, -1, &len);
    int defer = i + 1 < n && !c->confirm && c->conn.out.len + len < DEFER_MAX;  /* few writes */
    failed = publish(L, c, 1, &r, body, len, b->ids[i], id_text, 1, defer);
    if (!failed) lua_pop(L, 1);
  }
  b->sent = i;
  if (failed) {  /* request i of n could not be published: the ones before it are forgotten */
    abandon(L, c, (const unsigned char (*)[16])b->ids, 0, b->sent);
    lua_pushfstring(L, "request %I of %I: %s", i, n, lua_tostring(L, -2));
    lua_replace(L, -3);
    return 3;
  }
  lua_createtable(L, (int)n, 0);
  int suspend = loop_can_suspend(L), outside = !suspend && loop_can_yield_outside(L);
  if (suspend || outside) {
    for (i = 0; i < n && c->open; i++) {
      struct rpc_call *call = pending_find(&c->pending, b->ids[i]);
      if (call) call->wait_deadline = b->deadline;
    }
    if (suspend) return batch_k(L, LUA_OK, BATCH_CTX(0, lua_gettop(L)));
    return batch_outside_k(L, LUA_OK, BATCH_CTX(0, lua_gettop(L)));
  }
  for (i = 0; i < n && !failed; i++) {
    failed = wait_for(L, c, 1, b->ids[i], b->deadline, 0) != 1;
    if (!failed) lua_rawseti(L, -2, i + 1);
  }
  return batch_end(L, c, b, i - 1, failed);
}

/* ---- the rest ---- */

static int client_close(lua_State *L) {
  struct rpc_client *c = check_client(L);
  if (!c->open) return 0;
  c->open = 0;
  for (size_t i = 0; i < c->pending.cap; i++)  /* threads waiting on it: they find it closed */
    if (c->pending.slots[i].used && c->pending.slots[i].waiter) loop_wake(L, c->pending.slots[i].waiter);
  if (c->loop) loop_remove(L, c->loop, &c->watch);
  c->loop = NULL;
  unqueue_expired(c);  /* the rest of the queue is written by conn_free */
  pending_free(&c->pending);
  c->kept = 0;
  free(c->swept);
  c->swept = NULL;
  lua_pushnil(L);  /* kept replies go with it */
  lua_setiuservalue(L, 1, UV_OUTCOMES);
  conn_free(&c->conn);
  empty_amqp_pool(&c->pool);
  ids_free(c->ids);
  c->ids = NULL;
  return 0;
}

static int client_stats(lua_State *L) {
  struct rpc_client *c = check_client(L);
  lua_createtable(L, 0, 9);
  rpc_set_count(L, "calls", c->stats.calls);
  rpc_set_count(L, "replies", c->stats.replies);
  rpc_set_count(L, "timeouts", c->stats.timeouts);
  rpc_set_count(L, "remote_errors", c->stats.remote_errors);
  rpc_set_count(L, "no_route", c->stats.no_route);
  rpc_set_count(L, "discarded", c->stats.discarded);
  rpc_set_count(L, "codec_errors", c->stats.codec_errors);
  rpc_set_count(L, "retries", c->stats.retries);
  histogram_push(L, &c->latency);
  lua_setfield(L, -2, "latency");
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

/* ---- the pollable protocol (loop.c); a closed object says so ---- */

static int client_pollfd(lua_State *L) {
  struct rpc_client *c = check_client(L);
  return c->open ? loop_pollfd(L, loop_get(L)) : rpc_fail(L, "closed", "client closed");
}

static int client_events(lua_State *L) {
  struct rpc_client *c = check_client(L);
  return c->open ? loop_events(L) : rpc_fail(L, "closed", "client closed");
}

static int client_timeout(lua_State *L) {
  struct rpc_client *c = check_client(L);
  return c->open ? loop_timeout(L, loop_get(L)) : rpc_fail(L, "closed", "client closed");
}

static int client_step(lua_State *L) {
  struct rpc_client *c = check_client(L);
  return c->open ? loop_step(L, loop_get(L)) : rpc_fail(L, "closed", "client closed");
}

static const luaL_Reg client_methods[] = {
    {"call", client_call},   {"send", client_send},   {"wait", client_wait},
    {"call_all", client_call_all}, {"flush", client_flush}, {"close", client_close}, {"stats", client_stats},
    {"pollfd", client_pollfd}, {"events", client_events}, {"timeout", client_timeout}, {"step", client_step},
    {NULL, NULL}};

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
