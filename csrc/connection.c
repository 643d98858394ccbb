/* One AMQP connection with channel 1 open: opening, classifying failures, and reading
 * frames without ever blocking, so one wait loop can serve many connections. */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/time.h>

#include <openssl/err.h>
#include <openssl/ssl.h>

#include "rpc.h"

#define DEFAULT_URL "amqp://guest:guest@localhost:5672/"

static char *copy_string(const char *s) {
  size_t n = strlen(s) + 1;
  char *p = malloc(n);
  if (p) memcpy(p, s, n);
  return p;
}

static void set_where(struct rpc_endpoint *e) {
  const char *vhost = strcmp(e->vhost, "/") == 0 ? "" : e->vhost;
  size_t n = strlen(e->user) + strlen(e->host) + strlen(vhost) + 32;
  e->where = malloc(n);
  if (e->where)
    snprintf(e->where, n, "%s://%s@%s:%d/%s", e->tls ? "amqps" : "amqp", e->user, e->host, e->port,
             vhost);
}

/* Parses url into e. Returns NULL, or why it cannot be used. */
static const char *parse_endpoint(const char *url, size_t len, struct rpc_endpoint *e) {
  struct amqp_connection_info info;
  char *scratch = copy_string(url);
  if (!scratch) return "not enough memory";
  const char *bad = NULL;
  /* amqp_parse_url decodes %00 in place: it would cut a user, password or vhost short */
  if (strlen(url) != len || strstr(url, "%00") || amqp_parse_url(scratch, &info) != AMQP_STATUS_OK)
    bad = "invalid url (expected amqp://user:password@host:port/vhost or amqps://...)";
  else if (info.port <= 0 || info.port > 65535)
    bad = "invalid url (the port must be from 1 to 65535)";
  if (!bad) {
    e->tls = info.ssl;
    e->host = copy_string(info.host);
    e->user = copy_string(info.user);
    e->password = copy_string(info.password);
    /* amqp://host/ names the vhost "" in the URI spec; users mean "/", as pika does */
    e->vhost = copy_string(*info.vhost ? info.vhost : "/");
    e->port = info.port;
    if (e->host && e->user && e->vhost) set_where(e);
    if (!e->host || !e->user || !e->password || !e->vhost || !e->where) bad = "not enough memory";
  }
  free(scratch);
  return bad;
}

static const char *const tls_options[] = {"ca", "cert", "key", "verify", "verify_hostname", NULL};

/* Pushes tls[key] (raw) and checks it is nil or of type; errors name the options argument. */
static int tls_field(lua_State *L, int t, int argn, const char *key, int type) {
  lua_pushstring(L, key);
  int got = lua_rawget(L, t);
  if (got != LUA_TNIL && got != type)
    luaL_argerror(L, argn, lua_pushfstring(L, "option 'tls.%s' must be a %s, got %s", key,
                                           lua_typename(L, type), luaL_typename(L, -1)));
  if (type == LUA_TSTRING && got == LUA_TSTRING && (lua_rawlen(L, -1) == 0 ||
                                                    strlen(lua_tostring(L, -1)) != lua_rawlen(L, -1)))
    luaL_argerror(L, argn, lua_pushfstring(L, "option 'tls.%s' must be a file path", key));
  return got != LUA_TNIL;
}

static void check_tls_keys(lua_State *L, int t, int argn) {
  lua_pushnil(L);
  while (lua_next(L, t)) {
    lua_pop(L, 1);
    int known = 0;
    for (int i = 0; tls_options[i] && lua_type(L, -1) == LUA_TSTRING && !known; i++)
      known = strcmp(lua_tostring(L, -1), tls_options[i]) == 0;
    if (!known)
      luaL_argerror(L, argn, lua_pushfstring(L, "unknown option 'tls.%s'", luaL_tolstring(L, -1, NULL)));
  }
}

static char *tls_path(lua_State *L, int t, const char *key) {
  lua_pushstring(L, key);
  if (lua_rawget(L, t) != LUA_TSTRING) {
    lua_pop(L, 1);
    return NULL;
  }
  char *copy = copy_string(lua_tostring(L, -1));
  lua_pop(L, 1);
  if (!copy) luaL_error(L, "not enough memory");
  return copy;
}

/* opts.tls, of the options table at idx: all checked before anything is allocated. */
static void read_tls(lua_State *L, struct rpc_conn *c, int idx) {
  c->tls.verify = c->tls.verify_hostname = 1;  /* safe unless asked otherwise */
  int any_tls = 0;
  for (int i = 0; i < c->n_endpoints; i++) any_tls |= c->endpoints[i].tls;
  int type = opts_get(L, idx, "tls");
  if (type == LUA_TNIL) {
    lua_pop(L, 1);
    return;
  }
  if (type != LUA_TTABLE)
    luaL_argerror(L, idx, lua_pushfstring(L, "option 'tls' must be a table, got %s", luaL_typename(L, -1)));
  if (!any_tls) luaL_argerror(L, idx, "option 'tls' needs an amqps:// url");
  int t = lua_gettop(L);
  check_tls_keys(L, t, idx);
  tls_field(L, t, idx, "ca", LUA_TSTRING);
  int has_cert = tls_field(L, t, idx, "cert", LUA_TSTRING), has_key = tls_field(L, t, idx, "key", LUA_TSTRING);
  if (has_cert != has_key) luaL_argerror(L, idx, "options 'tls.cert' and 'tls.key' go together");
  if (tls_field(L, t, idx, "verify", LUA_TBOOLEAN)) c->tls.verify = lua_toboolean(L, -1);
  if (tls_field(L, t, idx, "verify_hostname", LUA_TBOOLEAN)) c->tls.verify_hostname = lua_toboolean(L, -1);
  lua_settop(L, t);
  c->tls.ca = tls_path(L, t, "ca");  /* freed by conn_free, should a later one raise */
  c->tls.cert = tls_path(L, t, "cert");
  c->tls.key = tls_path(L, t, "key");
  lua_pop(L, 1);
}

/* The options table at idx gives url or urls, tls, heartbeat, connect_timeout and max_body.
 * Raises on bad values; what it allocates is freed by conn_free, which the owner's __gc calls. */
void conn_init(lua_State *L, struct rpc_conn *c, int idx, size_t max_body) {
  c->heartbeat = (int)opts_integer(L, idx, "heartbeat", RPC_DEFAULT_HEARTBEAT, 0, 3600);
  c->connect_timeout =
      opts_number(L, idx, "connect_timeout", RPC_DEFAULT_CONNECT_TIMEOUT, 0.001, RPC_MAX_TIMEOUT);
  c->max_body = (size_t)opts_integer(L, idx, "max_body", (lua_Integer)max_body, 0, RPC_MAX_BODY_LIMIT);
  int list = opts_get(L, idx, "urls") != LUA_TNIL;
  if (list) {
    if (!lua_istable(L, -1) || lua_rawlen(L, -1) == 0)
      luaL_argerror(L, idx, "option 'urls' must be a non-empty list of urls");
    opts_get(L, idx, "url");
    if (!lua_isnil(L, -1)) luaL_argerror(L, idx, "give option 'url' or 'urls', not both");
    lua_pop(L, 1);
  }
  lua_Integer n = list ? (lua_Integer)lua_rawlen(L, -1) : 1;
  luaL_argcheck(L, n <= 64, idx, "option 'urls' lists more than 64 brokers");
  c->endpoints = calloc((size_t)n, sizeof *c->endpoints);
  if (!c->endpoints) luaL_error(L, "not enough memory");
  c->n_endpoints = (int)n;
  for (lua_Integer i = 0; i < n; i++) {
    const char *url;
    size_t len;
    if (list) {
      if (lua_rawgeti(L, -1, i + 1) != LUA_TSTRING)
        luaL_argerror(L, idx, lua_pushfstring(L, "urls[%I] must be a string", i + 1));
      url = lua_tolstring(L, -1, &len);  /* the list keeps it alive */
      lua_pop(L, 1);
    } else {
      const char *env = getenv("RPC_URL");
      url = opts_string(L, idx, "url", env && *env ? env : DEFAULT_URL, &len);
    }
    const char *bad = parse_endpoint(url, len, &c->endpoints[i]);
    if (bad) luaL_argerror(L, idx, bad);
  }
  lua_pop(L, 1);  /* urls, or nil */
  read_tls(L, c, idx);
  c->where = c->endpoints[0].where;
}

/* Records why the connection can no longer be used and drops it: a 0.11 connection is never
 * reused after a fatal status (RABBITMQ-C-NOTES.md, short list item 7). Returns -1. */
int conn_lost(struct rpc_conn *c, const char *kind, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(c->error, sizeof c->error, fmt, ap);
  va_end(ap);
  c->error_kind = kind;
  frames_discard(&c->out);  /* never written on the next connection */
  if (c->amqp) {
    amqp_destroy_connection(c->amqp);
    c->amqp = NULL;
  }
  conn_release_message(c);
  return -1;
}

/* OpenSSL's reason for the last failure, for people: "certificate verify failed". */
static const char *openssl_reason(void) {
  const char *reason = ERR_reason_error_string(ERR_peek_last_error());
  return reason ? reason : "the peer closed the connection or spoke something else than TLS";
}

/* RabbitMQ says 403 both for missing permissions and for a queue in exclusive use. */
static const char *kind_of_close(int code, amqp_bytes_t text) {
  static const char permission[] = "refused for user";
  switch (code) {
    case 403: /* ACCESS_REFUSED */
      for (size_t i = 0; i + sizeof permission - 1 <= text.len; i++)
        if (memcmp((const char *)text.bytes + i, permission, sizeof permission - 1) == 0) return "auth";
      return "broker";
    case 530: /* NOT_ALLOWED: the vhost at login (classified as auth there), a reused tag... */
      return "broker";
    case 320: /* CONNECTION_FORCED: broker stopping, or close_connection */
      return "connection";
    case 404: /* NOT_FOUND: the exchange a request was sent to */
      return "no_route";
    default:
      return "broker";
  }
}

/* Classifies the outcome of a synchronous method (login, declare, consume). */
static int classify_reply(struct rpc_conn *c, const char *what, amqp_rpc_reply_t r) {
  if (r.reply_type == AMQP_RESPONSE_NORMAL) return 0;
  if (r.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION && r.library_error == AMQP_STATUS_SSL_ERROR) {
    /* TLS 1.3: the broker checks our certificate after our side of the handshake is done; its
     * alert may be lost to a reset, leaving only the closed connection */
    const char *reason = ERR_reason_error_string(ERR_peek_last_error());
    return conn_lost(c, "tls", "%s on %s failed: TLS: %s", what, c->where,
                     reason ? reason : c->tls.cert ? "the broker closed the connection (did it refuse "
                     "the client certificate?)" : "the broker closed the connection");
  }
  if (r.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION)
    return conn_lost(c, "connection", "%s on %s failed: %s", what, c->where,
                     amqp_error_string2(r.library_error));
  if (r.reply_type == AMQP_RESPONSE_SERVER_EXCEPTION) {
    int code = 0;
    amqp_bytes_t text = {0, NULL};
    if (r.reply.id == AMQP_CONNECTION_CLOSE_METHOD) {
      amqp_connection_close_t *m = r.reply.decoded;
      code = m->reply_code;
      text = m->reply_text;
    } else if (r.reply.id == AMQP_CHANNEL_CLOSE_METHOD) {
      amqp_channel_close_t *m = r.reply.decoded;
      code = m->reply_code;
      text = m->reply_text;
    }
    return conn_lost(c, strcmp(what, "login") == 0 ? "auth" : kind_of_close(code, text),
                     "%s on %s refused by the broker: %d %.*s", what,
                     c->where, code, (int)text.len, (const char *)text.bytes);
  }
  return conn_lost(c, "connection", "%s on %s failed: no reply", what, c->where);
}

int conn_check_reply(struct rpc_conn *c, const char *what) {
  return classify_reply(c, what, amqp_get_rpc_reply(c->amqp));
}

static struct timeval timeval_of(double seconds) {
  struct timeval tv;
  tv.tv_sec = (time_t)seconds;
  tv.tv_usec = (suseconds_t)((seconds - (double)tv.tv_sec) * 1e6);
  return tv;
}

/* 0.11 verifies the chain after the handshake and keeps only a status: record OpenSSL's first
 * complaint, so the message can say what was wrong with the certificate. */
static int note_verify_error(int ok, X509_STORE_CTX *store) {
  SSL *ssl = X509_STORE_CTX_get_ex_data(store, SSL_get_ex_data_X509_STORE_CTX_idx());
  struct rpc_conn *c = ssl ? SSL_CTX_get_app_data(SSL_get_SSL_CTX(ssl)) : NULL;
  if (!ok && c && !c->tls_problem[0])
    snprintf(c->tls_problem, sizeof c->tls_problem, "%s",
             X509_verify_cert_error_string(X509_STORE_CTX_get_error(store)));
  return ok;
}

/* Why path cannot be read, or NULL: OpenSSL would only say "system lib". */
static const char *unreadable(const char *path) {
  if (!path) return NULL;
  FILE *f = fopen(path, "r");
  if (!f) return strerror(errno);
  fclose(f);
  return NULL;
}

/* A TLS socket as opts.tls asks: TLS 1.2 or newer, the peer and its name verified by default
 * against opts.tls.ca or the system's store. */
static amqp_socket_t *tls_socket(struct rpc_conn *c) {
  amqp_socket_t *sock = amqp_ssl_socket_new(c->amqp);
  if (!sock) return conn_lost(c, "tls", "cannot set up TLS for %s: %s", c->where, openssl_reason()), NULL;
  SSL_CTX *ctx = amqp_ssl_socket_get_context(sock);
  SSL_CTX_set_app_data(ctx, c);
  SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, note_verify_error);  /* 0.11 checks the result itself */
  c->tls_problem[0] = '\0';
  const struct rpc_tls *t = &c->tls;
  if (amqp_ssl_socket_set_ssl_versions(sock, AMQP_TLSv1_2, AMQP_TLSvLATEST) != AMQP_STATUS_OK)
    return conn_lost(c, "tls", "cannot require TLS 1.2 or newer for %s", c->where), NULL;
  const char *const files[] = {t->ca, t->cert, t->key};
  for (int i = 0; i < 3; i++) {
    const char *why = unreadable(files[i]);
    if (why) return conn_lost(c, "tls", "cannot read TLS file '%s': %s", files[i], why), NULL;
  }
  if (t->ca && amqp_ssl_socket_set_cacert(sock, t->ca) != AMQP_STATUS_OK)
    return conn_lost(c, "tls", "cannot use CA file '%s': %s", t->ca, openssl_reason()), NULL;
  if (!t->ca && t->verify && SSL_CTX_set_default_verify_paths(ctx) != 1)
    return conn_lost(c, "tls", "cannot load the system's CA certificates: %s", openssl_reason()), NULL;
  if (t->cert && amqp_ssl_socket_set_key(sock, t->cert, t->key) != AMQP_STATUS_OK)
    return conn_lost(c, "tls", "cannot use client certificate '%s' with key '%s': %s", t->cert,
                     t->key, openssl_reason()), NULL;
  amqp_ssl_socket_set_verify_peer(sock, t->verify);
  amqp_ssl_socket_set_verify_hostname(sock, t->verify_hostname);
  return sock;
}

static int open_failed(struct rpc_conn *c, const struct rpc_endpoint *e, int st) {
  switch (st) {
    case AMQP_STATUS_SSL_PEER_VERIFY_FAILED:
      return conn_lost(c, "tls", "TLS: the certificate of %s could not be verified: %s", c->where,
                       c->tls_problem[0] ? c->tls_problem : "no certificate");
    case AMQP_STATUS_SSL_HOSTNAME_VERIFY_FAILED:
      return conn_lost(c, "tls", "TLS: the certificate of %s is not for host name '%s'", c->where, e->host);
    case AMQP_STATUS_SSL_CONNECTION_FAILED:
    case AMQP_STATUS_SSL_ERROR:
      return conn_lost(c, "tls", "TLS handshake with %s failed: %s", c->where, openssl_reason());
    default:
      return conn_lost(c, "connection", "cannot connect to %s: %s", c->where, amqp_error_string2(st));
  }
}

static unsigned int own_send_bound(const struct rpc_conn *c);
static void set_send_bound(struct rpc_conn *c, unsigned int ms);

static int connect_socket(struct rpc_conn *c, double limit) {
  struct timeval tv = timeval_of(limit);
  const struct rpc_endpoint *e = &c->endpoints[c->current];
  amqp_socket_t *sock = e->tls ? tls_socket(c) : amqp_tcp_socket_new(c->amqp);
  if (!sock) return c->error_kind ? -1 : conn_lost(c, "connection", "cannot create a socket for %s", c->where);
  ERR_clear_error();
  int st = amqp_socket_open_noblock(sock, e->host, e->port, &tv);
  if (st != AMQP_STATUS_OK) return open_failed(c, e, st);
  /* keepalive: a backstop for reads rabbitmq-c 0.11 makes with no deadline (rmqc#780) */
  int fd = amqp_get_sockfd(c->amqp), on = 1, idle = 30, interval = 5, count = 3;
  setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &on, sizeof on);
  setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof idle);
  setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &interval, sizeof interval);
  setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &count, sizeof count);
  c->send_bound = 0;
  /* acks and set-up methods send too, outside any publish: bound them from the start */
  set_send_bound(c, own_send_bound(c));
  return 0;
}

/* amqp_basic_publish sends with no deadline (rmqc#519): a peer that stops reading would hold
 * it forever. TCP_USER_TIMEOUT makes the kernel drop the connection once sent data stays
 * unacknowledged (or unsent behind a zero window) that long, and the send then fails. The
 * connection's own bound is the heartbeats' window (it also bounds acks and set-up methods).
 * Publishes on plain TCP never reach amqp_basic_publish (frames.c polls its own deadline);
 * under TLS a publish with a shorter bound (a call's timeout) sets it only while it sends, so
 * that one retransmit stall later does not drop a connection other calls share. */
static unsigned int bound_ms(double seconds) {
  return seconds < 1 ? 1000 : seconds > 3600 ? 3600000 : (unsigned int)(seconds * 1000);
}

static unsigned int own_send_bound(const struct rpc_conn *c) {
  return bound_ms(c->heartbeat ? 2.0 * c->heartbeat : 60);
}

static void set_send_bound(struct rpc_conn *c, unsigned int ms) {
  if (ms == c->send_bound) return;
  setsockopt(amqp_get_sockfd(c->amqp), IPPROTO_TCP, TCP_USER_TIMEOUT, &ms, sizeof ms);
  c->send_bound = ms;
}

static int open_endpoint(struct rpc_conn *c, double limit) {
  const struct rpc_endpoint *e = &c->endpoints[c->current];
  c->where = e->where;
  conn_close(c);
  c->error_kind = NULL;
  c->error[0] = '\0';
  c->amqp = amqp_new_connection();
  if (!c->amqp) return conn_lost(c, "connection", "out of memory connecting to %s", c->where);
  if (connect_socket(c, limit)) return -1;

  struct timeval tv = timeval_of(limit);
  amqp_set_handshake_timeout(c->amqp, &tv);
  amqp_set_rpc_timeout(c->amqp, &tv);  /* bounds declare/consume/close; never hang on a mute peer */
  /* 0.11 advertises neither: without consumer_cancel_notify the broker never tells a consumer
   * its queue was deleted (rmqc#511), without connection.blocked a resource alarm silently
   * stalls publishes (rmqc#519). 0.11 merges these with its own list. */
  amqp_table_entry_t capabilities[2], property;
  capabilities[0].key = amqp_cstring_bytes("consumer_cancel_notify");
  capabilities[1].key = amqp_cstring_bytes("connection.blocked");
  for (int i = 0; i < 2; i++) {
    capabilities[i].value.kind = AMQP_FIELD_KIND_BOOLEAN;
    capabilities[i].value.value.boolean = 1;
  }
  property.key = amqp_cstring_bytes("capabilities");
  property.value.kind = AMQP_FIELD_KIND_TABLE;
  property.value.value.table.num_entries = 2;
  property.value.value.table.entries = capabilities;
  amqp_table_t properties = {1, &property};
  amqp_rpc_reply_t login =
      amqp_login_with_properties(c->amqp, e->vhost, 0, RPC_FRAME_MAX, c->heartbeat, &properties,
                                 AMQP_SASL_METHOD_PLAIN, e->user, e->password);
  if (classify_reply(c, "login", login)) {
    /* 0.11 advertises authentication_failure_close, so a refused login is a 403; a closed
     * socket during login is what older brokers do instead */
    if (strstr(c->error, "socket is closed") || strstr(c->error, "connection closed"))
      c->error_kind = "auth";
    return -1;
  }
  amqp_channel_open(c->amqp, RPC_CHANNEL);
  if (conn_check_reply(c, "channel.open")) return -1;
  c->last_pumped = rpc_now();
  return 0;
}

/* Tries every broker once, in order from the one after the last used (the first, at the
 * start): a cluster's nodes, or a primary and its standby. */
int conn_open(struct rpc_conn *c, double limit) {
  if (c->n_endpoints == 0) return conn_lost(c, "closed", "closed");  /* freed by its owner's close */
  if (limit > c->connect_timeout) limit = c->connect_timeout;
  c->blocked[0] = '\0';
  int start = c->opened ? (c->current + 1) % c->n_endpoints : 0;
  for (int i = 0; i < c->n_endpoints; i++) {
    c->current = (start + i) % c->n_endpoints;
    if (open_endpoint(c, limit) == 0) {
      c->opened = 1;
      return 0;
    }
  }
  if (c->n_endpoints > 1) {  /* say that every broker was tried */
    char last[sizeof c->error];
    memcpy(last, c->error, sizeof last);
    snprintf(c->error, sizeof c->error, "none of the %d brokers answered; the last: %.400s",
             c->n_endpoints, last);
  }
  return -1;
}

void conn_close(struct rpc_conn *c) {
  if (!c->amqp) return;
  if (!c->error_kind) {  /* polite, but never long: close runs from __gc too */
    if (c->out.len && frames_write(&c->out, amqp_get_sockfd(c->amqp), 1, 1)) c->error_kind = "connection";
  }
  frames_discard(&c->out);
  if (!c->error_kind) {
    struct timeval brief = {1, 0};
    amqp_set_rpc_timeout(c->amqp, &brief);
    amqp_connection_close(c->amqp, AMQP_REPLY_SUCCESS);
  }
  amqp_destroy_connection(c->amqp);
  c->amqp = NULL;
  conn_release_message(c);
}

void conn_free(struct rpc_conn *c) {
  conn_close(c);
  frames_free(&c->out);
  for (int i = 0; c->endpoints && i < c->n_endpoints; i++) {
    struct rpc_endpoint *e = &c->endpoints[i];
    if (e->password) memset(e->password, 0, strlen(e->password));
    free(e->host);
    free(e->user);
    free(e->password);
    free(e->vhost);
    free(e->where);
  }
  free(c->endpoints);
  free(c->tls.ca);
  free(c->tls.cert);
  free(c->tls.key);
  c->tls.ca = c->tls.cert = c->tls.key = NULL;
  free(c->msg.buf);
  c->endpoints = NULL;
  c->n_endpoints = 0;
  c->where = NULL;
  c->msg.buf = NULL;
  c->msg.cap = 0;
}

int conn_fd(const struct rpc_conn *c) {
  return c->amqp ? amqp_get_sockfd(c->amqp) : -1;
}

/* rabbitmq-c may hold whole frames or raw bytes that a poll() on the socket cannot see. */
int conn_has_input(const struct rpc_conn *c) {
  return c->amqp && (amqp_frames_enqueued(c->amqp) || amqp_data_in_buffer(c->amqp));
}

/* Something to read, buffered or in the socket (data, a hang-up, an error), or a quiet spell:
 * the check before an operation that sees a connection the broker has just closed. After a
 * quiet second the read also checks the peer's heartbeats: a silent peer (gone without a
 * word) is found there, where a publish would wait forever (rmqc#780). One poll() with no
 * wait otherwise. */
int conn_should_read(const struct rpc_conn *c) {
  if (!c->amqp) return 0;
  if (conn_has_input(c) || rpc_now() - c->last_pumped > RPC_HEARTBEAT_READ) return 1;
  struct pollfd p = {amqp_get_sockfd(c->amqp), POLLIN, 0};
  return poll(&p, 1, 0) != 0;  /* -1 (EINTR): reading finds out */
}

#define KEEP_BUFFER (1 << 20)  /* a larger assembly buffer goes back after its message */

void conn_release_message(struct rpc_conn *c) {
  c->msg.kind = EV_NONE;
  c->msg.props = NULL;
  c->msg.body = NULL;
  c->msg.size = c->msg.received = 0;
  c->msg.header_seen = c->msg.oversized = 0;
  if (c->msg.cap > KEEP_BUFFER) {
    free(c->msg.buf);
    c->msg.buf = NULL;
    c->msg.cap = 0;
  }
  if (c->amqp) amqp_maybe_release_buffers(c->amqp);
}

static int add_body(struct rpc_conn *c, amqp_bytes_t part) {
  struct rpc_message *m = &c->msg;
  if (part.len > m->size - m->received)
    return conn_lost(c, "connection", "%s sent more body than announced", c->where);
  if (m->oversized) {  /* counted, never kept: a hostile size costs no memory */
    m->received += part.len;
    return 0;
  }
  if (m->received == 0 && part.len == m->size) {
    m->body = part.bytes;  /* the common case: one frame, read in place */
  } else {
    if (m->received + part.len > m->cap) {
      size_t cap = m->cap ? m->cap : 4096;
      while (cap < m->received + part.len) cap *= 2;
      char *buf = realloc(m->buf, cap);
      if (!buf) return conn_lost(c, "connection", "out of memory reading from %s", c->where);
      m->buf = buf;
      m->cap = cap;
    }
    memcpy(m->buf + m->received, part.bytes, part.len);
    m->body = m->buf;
  }
  m->received += part.len;
  return 0;
}

/* The broker closed our channel or connection: answer it, as 0.11 does not (rmqc#479). */
static enum conn_event broker_closed(struct rpc_conn *c, amqp_method_t *method) {
  int code;
  amqp_bytes_t text;
  if (method->id == AMQP_CHANNEL_CLOSE_METHOD) {
    amqp_channel_close_t *m = method->decoded;
    amqp_channel_close_ok_t ok = {0};
    code = m->reply_code;
    text = m->reply_text;
    amqp_send_method(c->amqp, RPC_CHANNEL, AMQP_CHANNEL_CLOSE_OK_METHOD, &ok);
  } else {
    amqp_connection_close_t *m = method->decoded;
    amqp_connection_close_ok_t ok = {0};
    code = m->reply_code;
    text = m->reply_text;
    amqp_send_method(c->amqp, 0, AMQP_CONNECTION_CLOSE_OK_METHOD, &ok);
  }
  conn_lost(c, kind_of_close(code, text), "%s closed by the broker: %d %.*s", c->where, code,
            (int)text.len, (const char *)text.bytes);
  return EV_FAILED;
}

static enum conn_event on_method(struct rpc_conn *c, amqp_method_t *method) {
  if (c->msg.kind != EV_NONE &&
      (method->id == AMQP_BASIC_DELIVER_METHOD || method->id == AMQP_BASIC_RETURN_METHOD)) {
    conn_lost(c, "connection", "%s sent a message before the last one was complete", c->where);
    return EV_FAILED;
  }
  switch (method->id) {
    case AMQP_BASIC_DELIVER_METHOD:
      c->msg.kind = EV_DELIVERY;
      c->msg.deliver = *(amqp_basic_deliver_t *)method->decoded;
      return EV_NONE;
    case AMQP_BASIC_RETURN_METHOD:
      c->msg.kind = EV_RETURN;
      c->msg.returned = *(amqp_basic_return_t *)method->decoded;
      return EV_NONE;
    case AMQP_BASIC_CANCEL_METHOD:
      return EV_CANCELLED;
    case AMQP_CONNECTION_BLOCKED_METHOD: {
      amqp_bytes_t reason = ((amqp_connection_blocked_t *)method->decoded)->reason;
      snprintf(c->blocked, sizeof c->blocked, "%s blocks publishing: %.*s", c->where,
               (int)reason.len, (const char *)reason.bytes);
      return EV_BLOCKED;
    }
    case AMQP_BASIC_NACK_METHOD: {
      const amqp_basic_nack_t *nack = method->decoded;
      c->nacked = nack->delivery_tag;
      c->nacked_multiple = nack->multiple;
      return EV_NACKED;
    }
    case AMQP_CONNECTION_UNBLOCKED_METHOD:
      c->blocked[0] = '\0';
      return EV_NONE;
    case AMQP_CHANNEL_CLOSE_METHOD:
    case AMQP_CONNECTION_CLOSE_METHOD:
      return broker_closed(c, method);
    default:
      return EV_NONE;  /* nothing else concerns request-reply */
  }
}

static enum conn_event on_frame(struct rpc_conn *c, amqp_frame_t *f) {
  struct rpc_message *m = &c->msg;
  if (f->frame_type == AMQP_FRAME_METHOD) return on_method(c, &f->payload.method);
  if (m->kind == EV_NONE) return EV_NONE;  /* content of something we did not ask for */
  if (f->frame_type == AMQP_FRAME_HEADER) {
    m->props = f->payload.properties.decoded;
    m->size = (size_t)f->payload.properties.body_size;
    m->oversized = f->payload.properties.body_size > c->max_body;
    m->header_seen = 1;
  } else if (f->frame_type == AMQP_FRAME_BODY) {
    if (!m->header_seen) return conn_lost(c, "connection", "%s sent a body before its header", c->where), EV_FAILED;
    if (add_body(c, f->payload.body_fragment)) return EV_FAILED;
  }
  if (m->header_seen && m->received == m->size) {
    if (m->size == 0 || m->oversized) m->body = "";
    return m->kind;
  }
  return EV_NONE;
}

/* Reads what has already arrived, never waiting, until one message is complete. The message
 * stays in c->msg until conn_release_message. */
enum conn_event conn_pump(struct rpc_conn *c) {
  struct timeval zero = {0, 0};
  amqp_frame_t frame;
  if (!conn_has_input(c)) c->last_pumped = rpc_now();  /* this one reads the socket */
  while (c->amqp) {
    int st = amqp_simple_wait_frame_noblock(c->amqp, &frame, &zero);
    if (st == AMQP_STATUS_TIMEOUT) return EV_NONE;
    if (st != AMQP_STATUS_OK) {
      conn_lost(c, "connection", "connection to %s lost: %s", c->where, amqp_error_string2(st));
      return EV_FAILED;
    }
    enum conn_event ev = on_frame(c, &frame);
    if (ev != EV_NONE) return ev;
  }
  return EV_FAILED;
}

/* Under TLS the bytes go through rabbitmq-c's socket, a frame a send. */
static int tls_publish(struct rpc_conn *c, amqp_bytes_t exchange, amqp_bytes_t routing_key, int mandatory,
                       const amqp_basic_properties_t *props, amqp_bytes_t body, double bound) {
  unsigned int own = own_send_bound(c), ms = bound_ms(bound);
  if (ms < own) set_send_bound(c, ms);
  int st = amqp_basic_publish(c->amqp, RPC_CHANNEL, exchange, routing_key, mandatory, 0, props, body);
  if (st == AMQP_STATUS_OK) set_send_bound(c, own);
  return st;
}

static int uses_tls(const struct rpc_conn *c) {
  return c->endpoints[c->current].tls;
}

static int publish_failed(struct rpc_conn *c, int st) {
  if (st == AMQP_STATUS_TIMEOUT)
    return conn_lost(c, "connection", "publishing to %s failed: the broker did not read it in time", c->where);
  return conn_lost(c, "connection", "publishing to %s failed: %s", c->where, amqp_error_string2(st));
}

/* Writes what is queued, giving a peer that does not read on bound seconds (at least 1)
 * without progress, and budget seconds in all: plain TCP sends are non-blocking and polled here, so
 * no publish waits on rabbitmq-c's infinite send deadline (rmqc#519) and no socket option
 * changes per publish. */
int conn_flush(struct rpc_conn *c, double bound, double budget) {
  if (!c->out.len) return 0;
  if (!c->amqp) {
    frames_discard(&c->out);
    return -1;
  }
  int st = frames_write(&c->out, amqp_get_sockfd(c->amqp), bound < 1 ? 1 : bound, budget);
  return st ? publish_failed(c, st) : 0;
}

int conn_queue_publish(struct rpc_conn *c, amqp_bytes_t exchange, amqp_bytes_t routing_key, int mandatory,
                       const amqp_basic_properties_t *props, amqp_bytes_t body, double bound) {
  if (uses_tls(c)) {
    int st = tls_publish(c, exchange, routing_key, mandatory, props, body, bound);
    return st ? publish_failed(c, st) : 0;
  }
  if (!c->out.len) c->out.since = rpc_now();
  int st = frames_publish(&c->out, exchange, routing_key, mandatory, props, body, (size_t)amqp_get_frame_max(c->amqp));
  if (st && st != AMQP_STATUS_NO_MEMORY) return -2;  /* would not encode: nothing queued, still fine */
  return st ? publish_failed(c, st) : 0;
}

int conn_publish(struct rpc_conn *c, amqp_bytes_t exchange, amqp_bytes_t routing_key, int mandatory,
                 const amqp_basic_properties_t *props, amqp_bytes_t body, double bound) {
  int st = uses_tls(c) ? tls_publish(c, exchange, routing_key, mandatory, props, body, bound)
                       : frames_publish(&c->out, exchange, routing_key, mandatory, props, body, (size_t)amqp_get_frame_max(c->amqp));
  if (st) return publish_failed(c, st);
  /* a publish's own bound, with README's slack: a call ends within its timeout (at least 1 s) */
  return conn_flush(c, bound, (bound < 1 ? 1 : bound) + 1);
}

/* An ack (reject: a reject) of tag, queued behind the replies before it (sent at once under
 * TLS, still in order). */
static int queue_settle(struct rpc_conn *c, uint64_t tag, int flag, int reject) {
  int st;
  if (uses_tls(c)) {
    st = reject ? amqp_basic_reject(c->amqp, RPC_CHANNEL, tag, flag) : amqp_basic_ack(c->amqp, RPC_CHANNEL, tag, flag);
  } else {
    if (!c->out.len) c->out.since = rpc_now();
    st = reject ? frames_reject(&c->out, tag, flag) : frames_ack(&c->out, tag, flag);
  }
  if (st == AMQP_STATUS_OK) return 0;
  return conn_lost(c, "connection", "%s on %s failed: %s", reject ? "rejecting" : "acknowledging",
                   c->where, amqp_error_string2(st));
}

int conn_queue_ack(struct rpc_conn *c, uint64_t delivery_tag, int multiple) {
  return queue_settle(c, delivery_tag, multiple, 0);
}

int conn_queue_reject(struct rpc_conn *c, uint64_t delivery_tag, int requeue) {
  return queue_settle(c, delivery_tag, requeue, 1);
}

/* The text value of header key, or NULL. */
const char *conn_header(const amqp_basic_properties_t *p, const char *key, size_t *len) {
  if (!p || !(p->_flags & AMQP_BASIC_HEADERS_FLAG)) return NULL;
  size_t klen = strlen(key);
  for (int i = 0; i < p->headers.num_entries; i++) {
    const amqp_table_entry_t *e = &p->headers.entries[i];
    if (e->key.len != klen || memcmp(e->key.bytes, key, klen) != 0) continue;
    if (e->value.kind != AMQP_FIELD_KIND_UTF8 && e->value.kind != AMQP_FIELD_KIND_BYTES) return NULL;
    *len = e->value.value.bytes.len;
    return e->value.value.bytes.bytes;
  }
  return NULL;
}

/* A header's value as a number: any integer or float kind, or decimal text. */
int conn_header_number(const amqp_basic_properties_t *p, const char *key, double *out) {
  if (!p || !(p->_flags & AMQP_BASIC_HEADERS_FLAG)) return 0;
  size_t klen = strlen(key);
  for (int i = 0; i < p->headers.num_entries; i++) {
    const amqp_table_entry_t *e = &p->headers.entries[i];
    if (e->key.len != klen || memcmp(e->key.bytes, key, klen) != 0) continue;
    const amqp_field_value_t *v = &e->value;
    switch (v->kind) {
      case AMQP_FIELD_KIND_I8: *out = v->value.i8; return 1;
      case AMQP_FIELD_KIND_U8: *out = v->value.u8; return 1;
      case AMQP_FIELD_KIND_I16: *out = v->value.i16; return 1;
      case AMQP_FIELD_KIND_U16: *out = v->value.u16; return 1;
      case AMQP_FIELD_KIND_I32: *out = v->value.i32; return 1;
      case AMQP_FIELD_KIND_U32: *out = v->value.u32; return 1;
      case AMQP_FIELD_KIND_I64: *out = (double)v->value.i64; return 1;
      case AMQP_FIELD_KIND_U64: *out = (double)v->value.u64; return 1;
      case AMQP_FIELD_KIND_TIMESTAMP: *out = (double)v->value.u64; return 1;
      case AMQP_FIELD_KIND_F32: *out = v->value.f32; return 1;
      case AMQP_FIELD_KIND_F64: *out = v->value.f64; return 1;
      case AMQP_FIELD_KIND_UTF8:
      case AMQP_FIELD_KIND_BYTES: {
        char text[32], *end;
        size_t n = v->value.bytes.len;
        if (n == 0 || n >= sizeof text) return 0;
        memcpy(text, v->value.bytes.bytes, n);
        text[n] = '\0';
        if (strspn(text, "0123456789.") != n) return 0;  /* plain decimal: no sign, hex, inf */
        *out = strtod(text, &end);
        return *end == '\0';
      }
      default: return 0;
    }
  }
  return 0;
}
