/* The raw C reference's shared part: connecting, reading one message with a frame loop, and
 * reading /proc. Plain rabbitmq-c 0.11 (Debian's <amqp.h>), no rabbitrpc code: the limit of
 * our stack. Errors end the program: a benchmark has nothing to recover. */
#ifndef BENCH_RAW_H
#define BENCH_RAW_H

#define _POSIX_C_SOURCE 200809L
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include <amqp.h>
#include <amqp_tcp_socket.h>

#define CHANNEL 1
#define FRAME_MAX 131072   /* rabbitmq-c 0.11 takes 0 as "no limit": pass what rabbitrpc passes */
#define HEARTBEAT 60

static void die(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  fputs("raw: ", stderr);
  vfprintf(stderr, fmt, ap);
  fputc('\n', stderr);
  va_end(ap);
  exit(1);
}

static void check_reply(amqp_rpc_reply_t r, const char *what) {
  switch (r.reply_type) {
    case AMQP_RESPONSE_NORMAL:
      return;
    case AMQP_RESPONSE_LIBRARY_EXCEPTION:
      die("%s: %s", what, amqp_error_string2(r.library_error));
      break;
    case AMQP_RESPONSE_SERVER_EXCEPTION:
      if (r.reply.id == AMQP_CONNECTION_CLOSE_METHOD) {
        amqp_connection_close_t *m = r.reply.decoded;
        die("%s: connection closed %d %.*s", what, m->reply_code, (int)m->reply_text.len,
            (char *)m->reply_text.bytes);
      }
      if (r.reply.id == AMQP_CHANNEL_CLOSE_METHOD) {
        amqp_channel_close_t *m = r.reply.decoded;
        die("%s: channel closed %d %.*s", what, m->reply_code, (int)m->reply_text.len,
            (char *)m->reply_text.bytes);
      }
      die("%s: server exception, method 0x%08x", what, r.reply.id);
      break;
    default:
      die("%s: no reply", what);
  }
}

static void check_status(int status, const char *what) {
  if (status != AMQP_STATUS_OK) die("%s: %s", what, amqp_error_string2(status));
}

/* One connection to env RPC_URL with channel 1 open. */
static amqp_connection_state_t open_connection(void) {
  const char *env = getenv("RPC_URL");
  char *url = strdup(env && *env ? env : "amqp://guest:guest@localhost:5672/");
  struct amqp_connection_info info;
  if (!url || amqp_parse_url(url, &info) != AMQP_STATUS_OK) die("bad RPC_URL");
  amqp_connection_state_t conn = amqp_new_connection();
  amqp_socket_t *sock = amqp_tcp_socket_new(conn);
  if (!sock) die("cannot create a socket");
  check_status(amqp_socket_open(sock, info.host, info.port), "connect");
  check_reply(amqp_login(conn, *info.vhost ? info.vhost : "/", 0, FRAME_MAX, HEARTBEAT,
                         AMQP_SASL_METHOD_PLAIN, info.user, info.password), "login");
  amqp_channel_open(conn, CHANNEL);
  check_reply(amqp_get_rpc_reply(conn), "channel.open");
  free(url);
  return conn;
}

/* env RAW_HEADERS set: the headers rabbitrpc's requests and replies carry (its deadlines and
 * latency figures), x-rpc-deadline on requests and x-rpc-handler-time on replies, so that the
 * broker decodes (and, with direct reply-to, re-encodes) a headers table as it does for ours. */
static int with_headers(void) {
  static int on = -1;
  if (on < 0) on = getenv("RAW_HEADERS") != NULL && *getenv("RAW_HEADERS");
  return on;
}

/* props gets a headers table of one entry, kept in *e. */
static void add_header(amqp_basic_properties_t *props, amqp_table_entry_t *e, const char *key,
                       amqp_field_value_t value) {
  e->key = amqp_cstring_bytes(key);
  e->value = value;
  props->_flags |= AMQP_BASIC_HEADERS_FLAG;
  props->headers = (amqp_table_t){1, e};
}

static double clock_seconds(clockid_t id) {
  struct timespec ts;
  clock_gettime(id, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void close_connection(amqp_connection_state_t conn) {
  check_reply(amqp_channel_close(conn, CHANNEL, AMQP_REPLY_SUCCESS), "channel.close");
  check_reply(amqp_connection_close(conn, AMQP_REPLY_SUCCESS), "connection.close");
  amqp_destroy_connection(conn);
}

/* ---- one message (basic.deliver or basic.return) with a frame loop ---- */

enum { MSG_NONE, MSG_DELIVER, MSG_RETURN };

struct message {
  int kind;
  uint64_t delivery_tag;
  amqp_basic_properties_t *props;  /* these point into rabbitmq-c's pool: valid until */
  amqp_bytes_t body;               /* amqp_maybe_release_buffers */
  char *buf;                       /* a body of several frames, assembled */
  size_t cap;
};

static void wait_frame(amqp_connection_state_t conn, amqp_frame_t *f) {
  check_status(amqp_simple_wait_frame(conn, f), "reading a frame");
  if (f->frame_type == AMQP_FRAME_METHOD &&
      (f->payload.method.id == AMQP_CHANNEL_CLOSE_METHOD ||
       f->payload.method.id == AMQP_CONNECTION_CLOSE_METHOD))
    die("the broker closed the channel or connection");
}

/* Reads the next message; timeout NULL blocks. Returns MSG_NONE on timeout. The header and
 * body frames follow the method frame at once, so only the first frame waits for timeout. */
static int read_message(amqp_connection_state_t conn, struct timeval *timeout, struct message *m) {
  amqp_frame_t f;
  for (;;) {
    int st = amqp_simple_wait_frame_noblock(conn, &f, timeout);
    if (st == AMQP_STATUS_TIMEOUT) return MSG_NONE;
    check_status(st, "reading a frame");
    if (f.frame_type != AMQP_FRAME_METHOD) continue;
    if (f.payload.method.id == AMQP_BASIC_DELIVER_METHOD) {
      m->kind = MSG_DELIVER;
      m->delivery_tag = ((amqp_basic_deliver_t *)f.payload.method.decoded)->delivery_tag;
      break;
    }
    if (f.payload.method.id == AMQP_BASIC_RETURN_METHOD) {
      m->kind = MSG_RETURN;
      break;
    }
    if (f.payload.method.id == AMQP_CHANNEL_CLOSE_METHOD ||
        f.payload.method.id == AMQP_CONNECTION_CLOSE_METHOD)
      die("the broker closed the channel or connection");
  }
  wait_frame(conn, &f);
  if (f.frame_type != AMQP_FRAME_HEADER) die("expected a content header");
  m->props = f.payload.properties.decoded;
  size_t size = (size_t)f.payload.properties.body_size, got = 0;
  m->body.len = size;
  m->body.bytes = NULL;
  while (got < size) {
    wait_frame(conn, &f);
    if (f.frame_type != AMQP_FRAME_BODY) die("expected a body frame");
    amqp_bytes_t part = f.payload.body_fragment;
    if (got == 0 && part.len == size) {  /* the usual case: one frame, read in place */
      m->body = part;
      return m->kind;
    }
    if (size > m->cap) {
      m->buf = realloc(m->buf, size);
      if (!m->buf) die("out of memory");
      m->cap = size;
    }
    if (part.len > size - got) die("more body than announced");
    memcpy(m->buf + got, part.bytes, part.len);
    got += part.len;
    m->body.bytes = m->buf;
  }
  return m->kind;
}

#endif
