/* rabbitrpc internal header: the pieces the concept files share. */
#ifndef RPC_H
#define RPC_H

#include <stddef.h>
#include <stdint.h>

/* rabbitmq-c moved its headers in 0.12 (<rabbitmq-c/amqp.h>); the old names stay there only as
 * deprecated shims that warn. Debian 12 has 0.11, which has only the old names. cppcheck cannot
 * evaluate __has_include: it reads the 0.11 branch. */
#if defined(__has_include) && !defined(__CPPCHECK__)
#if __has_include(<rabbitmq-c/amqp.h>)
#define RPC_RABBITMQ_C_HEADERS 1
#endif
#endif
#ifdef RPC_RABBITMQ_C_HEADERS
#include <rabbitmq-c/amqp.h>
#include <rabbitmq-c/ssl_socket.h>
#include <rabbitmq-c/tcp_socket.h>
#else
#include <amqp.h>
#include <amqp_ssl_socket.h>
#include <amqp_tcp_socket.h>
#endif
#include <lauxlib.h>
#include <lua.h>

#define RPC_VERSION "0.1.0"     /* the rockspec's version: spec/rock_spec.lua checks they agree */
#define RPC_CHANNEL 1
#define RPC_FRAME_MAX 131072    /* rabbitmq-c 0.11 keeps 0 as "no limit": always pass it */
#define RPC_MAX_TABLE (RPC_FRAME_MAX - 4096)  /* headers, leaving room for the other properties */
#define RPC_DEFAULT_HEARTBEAT 60
#define RPC_DEFAULT_CONNECT_TIMEOUT 10.0
#define RPC_DEFAULT_CALL_TIMEOUT 30.0
#define RPC_MAX_TIMEOUT 1e6     /* seconds; keeps expiration and deadlines far from overflow */
#define RPC_SLICE 0.2           /* longest sleep between checks for signals and deadlines */
#define RPC_HEARTBEAT_READ 1.0  /* read every connection at least this often (heartbeats) */
#define RPC_DRAIN 30.0          /* seconds run() lets requests in progress finish after a signal */
#define RPC_DIRECT_REPLY_TO "amq.rabbitmq.reply-to"
#define RPC_ERROR_HEADER "x-rpc-error"
#define RPC_ERROR_KIND_HEADER "x-rpc-error-kind"  /* set only for kinds a client maps: too_large, codec, poisoned */
#define RPC_MAX_BODY_LIMIT 536870912  /* RabbitMQ refuses messages over 512 MiB whatever its config */
#define RPC_DEADLINE_HEADER "x-rpc-deadline"          /* a request's deadline: ms since the epoch */
#define RPC_HANDLER_TIME_HEADER "x-rpc-handler-time"  /* a reply's: seconds its handler ran */
#define RPC_ATTEMPT_HEADER "x-rpc-attempt"  /* a request's attempt, 1 first: calls with retries only */
#define RPC_MAX_RETRIES 100     /* opts.retries, callopts.retries */
#define RPC_CLOCK_SKEW 0.5      /* seconds a deadline may seem past before a request is skipped */
#define RPC_TRACESTATE_MAX 512  /* longer tracestate headers are not passed on */

/* What a request being served passes on to the calls its handler makes. */
struct rpc_context {
  double deadline_wall;         /* seconds since the epoch, as the request said, or 0: none */
  double deadline;              /* the same on the monotonic clock (rpc_now): any sign */
  int traced;                   /* a valid traceparent came with it */
  char trace_id[33];            /* 32 lowercase hex digits */
  char span_id[17];             /* the server's span for this request (new), 16 hex digits */
  char flags[3];                /* trace-flags, 2 hex digits */
  const void *owner;            /* whose request it is (its server), for that owner's checks */
  size_t tracestate_len;
  char tracestate[RPC_TRACESTATE_MAX];  /* last: a copy takes only its used part */
};

/* ---- errors (core.c) ---- */
/* Pushes nil, message, kind and returns 3: the one way runtime failures reach Lua. */
int rpc_fail(lua_State *L, const char *kind, const char *message);
double rpc_now(void);   /* monotonic seconds */
double rpc_wall_now(void);  /* seconds since the epoch */
void rpc_new_type(lua_State *L, const char *name, const luaL_Reg *meta, const luaL_Reg *methods);
void rpc_set_count(lua_State *L, const char *name, lua_Integer n);  /* t[name] = n, t on top */

/* ---- options (options.c) ---- */
void opts_check_keys(lua_State *L, int idx, const char *const allowed[]);
int opts_get(lua_State *L, int idx, const char *key);  /* pushes opts[key], raw; its type (a non-table raises) */
const char *opts_string(lua_State *L, int idx, const char *key, const char *def, size_t *len);
double opts_number(lua_State *L, int idx, const char *key, double def, double min, double max);
lua_Integer opts_integer(lua_State *L, int idx, const char *key, lua_Integer def, lua_Integer min,
                         lua_Integer max);
int opts_boolean(lua_State *L, int idx, const char *key, int def);
/* A timeout in seconds at stack index idx: positive and finite; def when nil or absent. */
double opts_check_timeout(lua_State *L, int idx, double def);

/* ---- connection (connection.c): one AMQP connection with channel 1 open ---- */
enum conn_event { EV_NONE, EV_DELIVERY, EV_RETURN, EV_CANCELLED, EV_BLOCKED, EV_NACKED, EV_FAILED };

struct rpc_message {            /* a basic.deliver or basic.return being assembled */
  enum conn_event kind;         /* EV_NONE while idle */
  amqp_basic_deliver_t deliver; /* its byte fields point into rabbitmq-c's pool */
  amqp_basic_return_t returned;
  amqp_basic_properties_t *props;
  size_t size, received;
  int oversized;                /* over the connection's max_body: body skipped, body NULL */
  const char *body;             /* the single body frame, or buf */
  char *buf;                    /* reused across messages */
  size_t cap;
  int header_seen;
};

struct rpc_endpoint {           /* one broker of url or urls */
  char *host, *user, *password, *vhost;
  int port;
  int tls;                      /* an amqps:// url */
  char *where;                  /* amqp://user@host:port/vhost, never the password */
};

struct rpc_tls {                /* opts.tls, for amqps:// endpoints */
  char *ca, *cert, *key;        /* file paths, or NULL */
  int verify, verify_hostname;
};

/* ---- outgoing frames (frames.c): several written with one send() ---- */
struct rpc_out {
  unsigned char *buf;
  size_t len, cap;
  double since;                 /* when the oldest buffered frame was queued */
  unsigned long emptied;        /* times written or dropped: what was queued before is gone */
};
int frames_publish(struct rpc_out *o, amqp_bytes_t exchange, amqp_bytes_t routing_key, int mandatory,
                   const amqp_basic_properties_t *props, amqp_bytes_t body, size_t frame_max);
int frames_ack(struct rpc_out *o, uint64_t tag, int multiple);
int frames_reject(struct rpc_out *o, uint64_t tag, int requeue);
int frames_write(struct rpc_out *o, int fd, double stall, double budget);
void frames_cut(struct rpc_out *o, size_t at, size_t len);
void frames_discard(struct rpc_out *o);
void frames_free(struct rpc_out *o);

/* ---- correlation ids (ids.c) ---- */
struct rpc_ids;
struct rpc_ids *ids_new(void);
void ids_free(struct rpc_ids *ids);
void ids_next(struct rpc_ids *ids, unsigned char id[16]);
void ids_hex(struct rpc_ids *ids, char *out, size_t digits);  /* random lowercase hex, NUL ended */

/* ---- trace context (trace.c): W3C traceparent and tracestate ---- */
/* A traceparent header's value, checked as the W3C spec says: 1 and ctx's trace fields set
 * (with a new span id from ids), or 0 (ignored). */
int trace_parse(struct rpc_context *ctx, const char *value, size_t len, struct rpc_ids *ids);
/* The traceparent (55 characters and a NUL, into out) of a call made under ctx (its parent
 * id the server's span for that request, which its reply names) or, ctx NULL, of a new trace. */
void trace_child(const struct rpc_context *ctx, struct rpc_ids *ids, char out[56]);

/* ---- latency histograms (histogram.c): constant memory, +/-4.5 % ---- */
#define RPC_HISTOGRAM_BUCKETS 242  /* 1 us to 2^30 us by 2^(1/8), one below and one above */
struct rpc_histogram {          /* all zeros: empty */
  uint64_t count;
  double max;                   /* exact */
  uint64_t buckets[RPC_HISTOGRAM_BUCKETS];
};
void histogram_record(struct rpc_histogram *h, double seconds);  /* allocates nothing, runs no Lua */
void histogram_push(lua_State *L, const struct rpc_histogram *h);  /* {count, p50, p90, p99, max} */

/* ---- batched acks (acks.c) ---- */
struct rpc_acks {
  uint64_t *tags;               /* a ring, in the order the deliveries came */
  unsigned char *state;
  size_t head, count, cap;
  size_t done;                  /* done since the last flush */
  size_t untracked;             /* under way but not noted (no memory): acked alone */
};
int acks_track(struct rpc_acks *a, uint64_t tag);
int acks_done(struct rpc_acks *a, uint64_t tag);
void acks_settled(struct rpc_acks *a, uint64_t tag);
void acks_clear(struct rpc_acks *a);
void acks_free(struct rpc_acks *a);

struct rpc_conn {
  amqp_connection_state_t amqp; /* NULL when not connected */
  struct rpc_endpoint *endpoints;
  int n_endpoints, current, opened;
  struct rpc_tls tls;
  int heartbeat;
  double connect_timeout;
  size_t max_body;              /* a longer incoming message is skipped, not buffered */
  unsigned int send_bound;      /* TCP_USER_TIMEOUT now set, ms (the connection's own between publishes) */
  const char *where;            /* the current endpoint's */
  struct rpc_message msg;
  struct rpc_out out;           /* queued frames (plain TCP), written by conn_flush */
  double last_pumped;             /* when the loop last serviced it (heartbeats) */
  const char *error_kind;       /* why it was lost, for the next caller */
  char blocked[300];            /* why the broker blocks publishing (a resource alarm), or "" */
  uint64_t nacked;              /* publisher confirms: the last basic.nack's delivery tag */
  int nacked_multiple;
  char tls_problem[256];         /* OpenSSL's complaint about the peer's certificate */
  char error[512];
};

/* Reads url or urls, tls, heartbeat, connect_timeout and max_body (default max_body) from the
 * options table at idx. */
void conn_init(lua_State *L, struct rpc_conn *c, int opts_idx, size_t max_body);
/* 0 on success; else -1 with c->error and c->error_kind set. */
int conn_open(struct rpc_conn *c, double limit);  /* limit: seconds, at most connect_timeout */
int conn_check_reply(struct rpc_conn *c, const char *what);
void conn_close(struct rpc_conn *c);      /* polite close, then free the connection */
void conn_free(struct rpc_conn *c);       /* conn_close and release everything */
int conn_fd(const struct rpc_conn *c);
int conn_has_input(const struct rpc_conn *c);
/* Worth a read before an operation: buffered input, a quiet spell (heartbeats), or a socket that
 * polls readable */
int conn_should_read(const struct rpc_conn *c);
enum conn_event conn_pump(struct rpc_conn *c);
void conn_release_message(struct rpc_conn *c);
/* bound: seconds a stalled peer may hold the publish before the connection is dropped */
int conn_publish(struct rpc_conn *c, amqp_bytes_t exchange, amqp_bytes_t routing_key, int mandatory,
                 const amqp_basic_properties_t *props, amqp_bytes_t body, double bound);
/* Queued: written by the next conn_flush (or conn_publish, conn_close), in order. Under TLS
 * they are sent at once. 0, or -1 with the connection lost; conn_queue_publish: -2 when the
 * properties do not fit the negotiated frame size (nothing queued, the connection fine). */
int conn_queue_publish(struct rpc_conn *c, amqp_bytes_t exchange, amqp_bytes_t routing_key, int mandatory,
                       const amqp_basic_properties_t *props, amqp_bytes_t body, double bound);
int conn_queue_ack(struct rpc_conn *c, uint64_t delivery_tag, int multiple);
int conn_queue_reject(struct rpc_conn *c, uint64_t delivery_tag, int requeue);
int conn_flush(struct rpc_conn *c, double bound, double budget);  /* seconds: see frames_write */
int acks_flush(struct rpc_acks *a, struct rpc_conn *c);
int conn_lost(struct rpc_conn *c, const char *kind, const char *fmt, ...);
const char *conn_header(const amqp_basic_properties_t *p, const char *key, size_t *len);
int conn_header_number(const amqp_basic_properties_t *p, const char *key, double *out);  /* 1: found */

/* ---- AMQP field tables (table.c) ---- */
void table_from_lua(lua_State *L, int idx, int argn, amqp_pool_t *pool, amqp_table_t *out);
int table_push(lua_State *L, const amqp_table_t *t);  /* 0: over the caps, nothing pushed */

/* ---- bodies and properties (codec.c) ---- */
struct rpc_codec {              /* opts.codec; its functions are a user value of its owner */
  int on;
  const char *name;             /* "json" or "custom", for messages */
  size_t content_type_len;      /* what encoded bodies carry unless told otherwise (0: none) */
  char content_type[256];
};
/* Checks opts.codec (bad arguments raise) and pushes what the owner keeps as the user value
 * the other functions take (nil without a codec); returns 0. When "json" cannot load
 * lua-cjson, pushes nil, message, "codec" and returns 3 instead. Runs require. */
int rpc_codec_new(lua_State *L, int opts, struct rpc_codec *codec);
/* Encode or decode the value at idx with the codec kept as user value uv of the userdata at
 * owner, protected: pushes the result and returns 1, or pushes "cannot <what> (codec name):
 * why" and returns 0. An encoding is a string, a decoding never nil. */
int rpc_codec_encode(lua_State *L, const struct rpc_codec *codec, int owner, int uv, int idx, const char *what);
int rpc_codec_decode(lua_State *L, const struct rpc_codec *codec, int owner, int uv, int idx, const char *what);
/* Pushes {content_type =, headers =} of p (a reply in hand), for a caller with properties. */
void rpc_codec_push_properties(lua_State *L, const amqp_basic_properties_t *p);
/* A handler's reply properties at idx, a table (a second value of any other type is not
 * properties: the caller ignores it), {content_type =, headers =} checked and converted into out,
 * allocating from pool: pushes the private copy out points into (keep it on the stack until
 * the publish) and returns 1, or pushes the message of a handler error and returns 0. Never
 * raises but for memory. */
int rpc_codec_reply_properties(lua_State *L, int idx, amqp_pool_t *pool, amqp_basic_properties_t *out);

/* ---- pending calls (pending.c): correlation id -> call ---- */
enum call_state { CALL_WAITING, CALL_REPLIED, CALL_FAILED };

struct rpc_call {
  unsigned char id[16];
  int used;
  enum call_state state;
  const char *kind;             /* CALL_FAILED only */
  int retryable;                /* CALL_FAILED before any handler could see the request (a
                                 * basic.return; a basic.nack of a one_queue request): a retry
                                 * is safe */
  int one_queue;                /* published to the default exchange: routed to one queue at most */
  int ref;                      /* the reply or failure text, kept for its waiter (LUA_NOREF) */
  int want_props;               /* properties = true: the reply's properties go with it */
  int props_ref;                /* and are kept there (LUA_NOREF) */
  int waited;                   /* a wait() is under way on it */
  lua_State *waiter;            /* the handler thread suspended in that wait, to wake; or NULL */
  double wait_deadline;         /* when that wait ends */
  double timeout, deadline;     /* of send(): wait()'s defaults; the timeout is for messages */
  double published;             /* when its request went out (rpc_now): its reply's latency */
  uint64_t seq;                 /* its publish's number, for publisher confirms */
  size_t queued_at, queued_len; /* its request, while still queued in the connection's out */
  unsigned long queued_in;      /* (that is, while out.emptied is this) */
};

struct rpc_pending {
  struct rpc_call *slots;
  size_t cap, count;
};

/* Slot pointers move when the table grows or shrinks: look calls up again after either. */
struct rpc_call *pending_add(struct rpc_pending *p, const unsigned char id[16]);
struct rpc_call *pending_find(struct rpc_pending *p, const unsigned char id[16]);
void pending_remove(struct rpc_pending *p, struct rpc_call *call);
void pending_free(struct rpc_pending *p);
int pending_parse_id(const char *text, size_t len, unsigned char id[16]);  /* 1 if well formed */

/* ---- the wait loop (loop.c): one per Lua state, serves what is open in it ---- */
/* What the loop knows of each thing it serves: one record, embedded in the object. */
struct rpc_watch;
struct rpc_watch_ops {
  int (*pollfd)(const struct rpc_watch *w);       /* the fd to poll for input, or -1: none now */
  int (*has_input)(const struct rpc_watch *w);    /* input already buffered, which no poll shows */
  double (*next_due)(const struct rpc_watch *w);  /* when work comes due without input (a read
                                                   * for heartbeats, a reconnect); HUGE_VAL: none */
  /* Reads that input or does that work, without waiting; its object's userdata at idx; limit:
   * seconds a reconnect may take. */
  void (*step)(lua_State *L, int idx, double limit);
};
struct rpc_watch {
  const struct rpc_watch_ops *ops;
  const struct rpc_conn *conn;  /* its connection: the loop leaves a waiter's own to it */
  int polled_fd;                /* its socket as the loop's epoll set has it, or -1 */
  struct rpc_watch *next;
};

struct rpc_loop;
struct rpc_loop *loop_get(lua_State *L);
/* Watches w, the userdata at idx: kept alive until loop_remove, unless weak. */
void loop_add(lua_State *L, struct rpc_loop *loop, struct rpc_watch *w, int idx, int weak);
void loop_remove(lua_State *L, struct rpc_loop *loop, struct rpc_watch *w);
#define LOOP_START_ROOM 12  /* free slots on L that loop_start needs (see it) */
/* The scheduler. A request's handler runs in its own thread T, which the server starts
 * (loop_start); a wait in it (loop_can_suspend) suspends T until loop_wake or its due time,
 * with lua_yieldk and continuation k, and the loop resumes it. A wait anywhere else turns the
 * loop, which resumes the threads that are due meanwhile. */
/* Runs the thread at idx (nargs values on its stack) until it ends or suspends: it may
 * suspend; should it ever end in an error outside its own protection, or suspend when there is
 * no memory to record it (it is then reset, never to run again), the function at abort is
 * called with the error and the thread. ctx, if not NULL, is its request's context while it
 * runs (it must live as long as the thread runs). Returns 1 if it suspended: the loop owns it,
 * and keeps it alive, until it calls loop_disown. The caller has made LOOP_START_ROOM slots
 * free on L (luaL_checkstack, before it commits to anything): once T has run, a stack that
 * cannot grow could not be reported. */
int loop_start(lua_State *L, struct rpc_loop *loop, int idx, int nargs, int abort,
               const struct rpc_context *ctx);
/* The context of the request whose handler is running (its thread run by the loop, or
 * anything that thread runs), or NULL. Valid until that thread yields or ends. */
const struct rpc_context *loop_context(const struct rpc_loop *loop);
/* The context the running thread was started with, if it is a request thread that has
 * suspended (a script may resume it: loop_context is then another's), or NULL. */
const struct rpc_context *loop_thread_context(lua_State *L);
void loop_disown(lua_State *L);  /* the running thread, at its end, if it ever suspended */
int loop_can_suspend(lua_State *L);
int loop_suspend(lua_State *L, double due, lua_KContext ctx, lua_KFunction k);  /* yields */
void loop_unsuspend(lua_State *L);  /* first thing in a continuation: it runs, however resumed */
void loop_wake(lua_State *L, lua_State *T);
void loop_wake_all(lua_State *L);  /* every suspended thread looks at its wait again (a signal) */
/* An outside scheduler (rpc.cqueues): a wait in one of its coroutines yields to it, polling
 * the object at idx for at most seconds, and continues in k. */
int loop_can_yield_outside(lua_State *L);
int loop_yield_outside(lua_State *L, int idx, double seconds, lua_KContext ctx, lua_KFunction k);
/* The pollable protocol (cqueues' names): obj:pollfd() (the state's: an epoll set of its
 * sockets, which stays while they come and go), obj:events() ("r"),
 * obj:timeout() (the state's: seconds until due work, nil: none), obj:step() (the state's
 * ready work, never waiting for input). */
int loop_pollfd(lua_State *L, struct rpc_loop *loop);
int loop_events(lua_State *L);
int loop_timeout(lua_State *L, struct rpc_loop *loop);
int loop_step(lua_State *L, struct rpc_loop *loop);
/* One turn: 1 when own may have input (or another server was served: look again); 0 at the
 * deadline (waiting at most RPC_SLICE) or on a signal. */
int loop_wait(lua_State *L, struct rpc_loop *loop, struct rpc_conn *own, double deadline);
/* While a server runs, SIGINT/SIGTERM set a flag (the signal's number); nested runs install
 * the handlers once. */
void loop_catch_signals(int on);
int loop_signalled(void);
int loop_signals(void);  /* signals caught so far */
/* Ctrl-C taken by a handler a wait ran (lua.c's hook raised "interrupted!" inside it): the
 * handler's server counts it, and every wait under way since before it ends "interrupted" (a
 * wait compares the count with the one it started with: later waits are not affected). */
void loop_note_interrupt(struct rpc_loop *loop);
unsigned long loop_interrupts(const struct rpc_loop *loop);
int loop_sigint_armed(void);  /* before an inline handler: is SIGINT caught by the host? */
int loop_sigint_fired(void);  /* after it failed: was SIGINT reset to its default since? */
int loop_took_interrupt(lua_State *L, struct rpc_loop *loop);  /* the error on top is a Ctrl-C */

/* ---- Lua types ---- */
LUAMOD_API int luaopen_rpc_core(lua_State *L);
int rpc_client_open(lua_State *L);
int rpc_server_open(lua_State *L);
int rpc_messaging_open(lua_State *L);
int rpc_loop_open(lua_State *L);  /* rpc.sleep */

#endif
