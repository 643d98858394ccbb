/* Outgoing frames: publishes, acks and rejects encoded into one buffer and written with one send().
 * rabbitmq-c 0.11 sends every frame with a send() of its own (three per publish, one per ack)
 * and copies the body into its own buffer all the same; a server that has several replies and
 * their acks to send writes them together here. rabbitmq-c exports its encoders
 * (amqp_encode_method, amqp_encode_properties), so the bytes are its own. Plain TCP only:
 * under TLS the bytes must go through its socket (connection.c keeps rabbitmq-c's calls). */
#include "rpc.h"

#include <errno.h>
#include <math.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#define FRAME_HEADER 7          /* type, channel, size */
#define FRAME_OVERHEAD 8        /* and the frame-end octet */
#define CONTENT_HEADER 12       /* class, weight, body size, before the properties */
#define KEEP_OUT (256 * 1024)   /* a larger buffer goes back once written */

static void put16(unsigned char *p, uint16_t v) {
  p[0] = (unsigned char)(v >> 8);
  p[1] = (unsigned char)v;
}

static void put32(unsigned char *p, uint32_t v) {
  put16(p, (uint16_t)(v >> 16));
  put16(p + 2, (uint16_t)v);
}

static void put64(unsigned char *p, uint64_t v) {
  put32(p, (uint32_t)(v >> 32));
  put32(p + 4, (uint32_t)v);
}

/* Doubling while small; a large body gets just the room it needs. */
static int reserve(struct rpc_out *o, size_t more) {
  if (o->cap - o->len >= more) return 0;
  if (more > SIZE_MAX - o->len) return -1;
  size_t cap = o->cap ? o->cap : 4096;
  while (cap - o->len < more && cap <= KEEP_OUT) cap *= 2;
  if (cap - o->len < more) cap = o->len + more;
  unsigned char *buf = realloc(o->buf, cap);
  if (!buf) return -1;
  o->buf = buf;
  o->cap = cap;
  return 0;
}

/* Closes the frame whose payload, n bytes, was written after the FRAME_HEADER at o->len. */
static void close_frame(struct rpc_out *o, uint8_t type, size_t n) {
  unsigned char *p = o->buf + o->len;
  p[0] = type;
  put16(p + 1, RPC_CHANNEL);
  put32(p + 3, (uint32_t)n);
  p[FRAME_HEADER + n] = AMQP_FRAME_END;
  o->len += n + FRAME_OVERHEAD;
}

static int put_method(struct rpc_out *o, amqp_method_number_t id, void *method, size_t room) {
  if (reserve(o, room + FRAME_OVERHEAD + 4)) return AMQP_STATUS_NO_MEMORY;
  unsigned char *p = o->buf + o->len + FRAME_HEADER;
  put32(p, id);
  int n = amqp_encode_method(id, method, (amqp_bytes_t){room, p + 4});
  if (n < 0) return n;
  close_frame(o, AMQP_FRAME_METHOD, (size_t)n + 4);
  return 0;
}

/* The properties' size is known only once encoded: first in a little room, then in all a
 * frame may hold. */
static int put_content_header(struct rpc_out *o, const amqp_basic_properties_t *props, size_t body,
                              size_t frame_max) {
  size_t most = frame_max - FRAME_OVERHEAD - CONTENT_HEADER;
  size_t rooms[2] = {most < 1024 ? most : 1024, most};
  int n = AMQP_STATUS_BAD_AMQP_DATA;
  for (int i = 0; i < 2 && n < 0; i++) {
    if (reserve(o, rooms[i] + FRAME_OVERHEAD + CONTENT_HEADER)) return AMQP_STATUS_NO_MEMORY;
    unsigned char *p = o->buf + o->len + FRAME_HEADER;
    put16(p, AMQP_BASIC_CLASS);
    put16(p + 2, 0);
    put64(p + 4, body);
    n = amqp_encode_properties(AMQP_BASIC_CLASS, (void *)props, (amqp_bytes_t){rooms[i], p + CONTENT_HEADER});
  }
  if (n < 0) return n;
  close_frame(o, AMQP_FRAME_HEADER, (size_t)n + CONTENT_HEADER);
  return 0;
}

static int put_body(struct rpc_out *o, amqp_bytes_t body, size_t frame_max) {
  size_t chunk = frame_max - FRAME_OVERHEAD;
  size_t frames = (body.len + chunk - 1) / chunk;
  if (reserve(o, body.len + frames * FRAME_OVERHEAD)) return AMQP_STATUS_NO_MEMORY;
  for (size_t at = 0; at < body.len; at += chunk) {
    size_t n = body.len - at < chunk ? body.len - at : chunk;
    memcpy(o->buf + o->len + FRAME_HEADER, (const char *)body.bytes + at, n);
    close_frame(o, AMQP_FRAME_BODY, n);
  }
  return 0;
}

/* Appends a basic.publish, its content header and its body frames; on failure nothing. */
int frames_publish(struct rpc_out *o, amqp_bytes_t exchange, amqp_bytes_t routing_key, int mandatory,
                   const amqp_basic_properties_t *props, amqp_bytes_t body, size_t frame_max) {
  size_t start = o->len;
  amqp_basic_publish_t m = {0, exchange, routing_key, (amqp_boolean_t)(mandatory != 0), 0};
  int st = put_method(o, AMQP_BASIC_PUBLISH_METHOD, &m, 2 + 1 + exchange.len + 1 + routing_key.len + 1);
  if (!st) st = put_content_header(o, props, body.len, frame_max);
  if (!st) st = put_body(o, body, frame_max);
  if (st) o->len = start;
  return st;
}

int frames_ack(struct rpc_out *o, uint64_t tag, int multiple) {
  amqp_basic_ack_t m = {tag, (amqp_boolean_t)(multiple != 0)};
  return put_method(o, AMQP_BASIC_ACK_METHOD, &m, 9);
}

int frames_reject(struct rpc_out *o, uint64_t tag, int requeue) {
  amqp_basic_reject_t m = {tag, (amqp_boolean_t)(requeue != 0)};
  return put_method(o, AMQP_BASIC_REJECT_METHOD, &m, 9);
}

/* Writes everything buffered, waiting for room in the socket while the peer reads: stall
 * seconds without progress give up (TCP_USER_TIMEOUT's rule, on our side), and so does budget
 * seconds in all (a peer that takes a few bytes now and then). The clock is read only once the
 * socket is full: a write that goes through at once costs no clock_gettime. Returns 0 or an
 * AMQP_STATUS_*; after a failure the connection is unusable (a frame may be half written). */
int frames_write(struct rpc_out *o, int fd, double stall, double budget) {
  size_t done = 0;
  int st = AMQP_STATUS_OK;
  double until = -1, deadline = -1;  /* not read yet */
  while (done < o->len) {
    ssize_t n = send(fd, o->buf + done, o->len - done, MSG_NOSIGNAL);
    if (n > 0) {
      done += (size_t)n;
      deadline = -1;
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK)) {
      st = AMQP_STATUS_SOCKET_ERROR;
      break;
    }
    double now = rpc_now();
    if (until < 0) until = now + budget;
    if (deadline < 0) deadline = fmin(now + stall, until);
    double left = deadline - now;
    struct pollfd p = {fd, POLLOUT, 0};
    if (left <= 0 || (poll(&p, 1, (int)(left * 1000) + 1) < 0 && errno != EINTR)) {
      st = left <= 0 ? AMQP_STATUS_TIMEOUT : AMQP_STATUS_SOCKET_ERROR;
      break;
    }
  }
  frames_discard(o);
  return st;
}

/* Takes out the len bytes queued at at (whole frames: a request whose call ended unwritten). */
void frames_cut(struct rpc_out *o, size_t at, size_t len) {
  memmove(o->buf + at, o->buf + at + len, o->len - at - len);
  o->len -= len;
}

void frames_discard(struct rpc_out *o) {
  o->len = 0;
  o->emptied++;
  if (o->cap > KEEP_OUT) frames_free(o);
}

void frames_free(struct rpc_out *o) {
  free(o->buf);
  o->buf = NULL;
  o->len = o->cap = 0;
}
