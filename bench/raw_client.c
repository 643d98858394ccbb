/* Raw C echo client: what rabbitrpc's client does, with nothing on top.
 *   RPC_URL=... raw_client QUEUE MODE INFLIGHT WARMUP MEASURE SERVER_PID [BROKER_PID]
 * MODE: direct (amq.rabbitmq.reply-to) or exclusive (an anonymous exclusive reply queue).
 * INFLIGHT: requests kept in flight (1 = sequential calls). WARMUP, then MEASURE: how long to
 * call before measuring, then while measuring: "2.5s" (seconds) or "100000" (calls).
 * SERVER_PID: the server whose CPU and peak RSS it reports with its own, as one JSON line (the
 * bench's client protocol). BROKER_PID: the broker (its beam.smp, all threads), whose CPU over
 * the measured phase it reports as broker_cpu (null without it).
 * Each request: 16-byte body, mandatory, reply_to, a fresh random uuid as correlation_id,
 * expiration "30000", as rabbitrpc publishes them (with RAW_HEADERS set, also its x-rpc-deadline
 * header: raw.h). Replies are matched by correlation id. */
#include "raw.h"

#include <uuid/uuid.h>

#define BODY "0123456789abcdef"
static char body[] = BODY;   /* amqp_bytes_t wants a mutable pointer */

/* ---- time and /proc ---- */

static double now(void) {
  return clock_seconds(CLOCK_MONOTONIC);
}

/* utime + stime of process pid ("self" or a number), seconds. */
static double proc_cpu(const char *pid) {
  char path[64], line[1024];
  snprintf(path, sizeof path, "/proc/%s/stat", pid);
  FILE *f = fopen(path, "r");
  if (!f || !fgets(line, sizeof line, f)) die("cannot read %s", path);
  fclose(f);
  const char *p = strrchr(line, ')');   /* the command name may hold spaces */
  unsigned long utime, stime;
  /* after ")": state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime */
  if (!p || sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu", &utime, &stime) != 2)
    die("cannot parse %s", path);
  return (double)(utime + stime) / (double)sysconf(_SC_CLK_TCK);
}

/* A "Vm...:" field of /proc/pid/status, kB. */
static long proc_kb(const char *pid, const char *field) {
  char path[64], line[256];
  size_t n = strlen(field);
  long kb = -1;
  snprintf(path, sizeof path, "/proc/%s/status", pid);
  FILE *f = fopen(path, "r");
  if (!f) die("cannot read %s", path);
  while (fgets(line, sizeof line, f))
    if (strncmp(line, field, n) == 0 && line[n] == ':') kb = strtol(line + n + 1, NULL, 10);
  fclose(f);
  return kb;
}

/* Peak RSS, kB. The kernel raises VmHWM only when RSS is about to shrink, so it can lag the
 * current VmRSS: the peak is the larger. */
static long peak_kb(const char *pid) {
  long hwm = proc_kb(pid, "VmHWM"), rss = proc_kb(pid, "VmRSS");
  return hwm > rss ? hwm : rss;
}

struct slot {            /* one request in flight */
  char id[37];
  double sent;
  int done;
};

struct client {
  amqp_connection_state_t conn;
  amqp_bytes_t queue, reply_to;
  char reply_queue[256];
  struct slot *ring;
  int inflight;
  long discarded;
  struct message m;
};

/* direct: the consumer on the pseudo-queue must exist before the first publish. */
static void open_reply_path(struct client *c, const char *mode) {
  if (strcmp(mode, "direct") == 0) {
    strcpy(c->reply_queue, "amq.rabbitmq.reply-to");
  } else if (strcmp(mode, "exclusive") == 0) {
    amqp_queue_declare_ok_t *ok =
        amqp_queue_declare(c->conn, CHANNEL, amqp_empty_bytes, 0, 0, 1, 1, amqp_empty_table);
    check_reply(amqp_get_rpc_reply(c->conn), "queue.declare (reply queue)");
    snprintf(c->reply_queue, sizeof c->reply_queue, "%.*s", (int)ok->queue.len, (char *)ok->queue.bytes);
  } else {
    die("MODE must be direct or exclusive");
  }
  c->reply_to = amqp_cstring_bytes(c->reply_queue);
  amqp_basic_consume(c->conn, CHANNEL, c->reply_to, amqp_empty_bytes, 0, 1, 0, amqp_empty_table);
  check_reply(amqp_get_rpc_reply(c->conn), "basic.consume (replies)");
}

static void send_request(struct client *c, struct slot *s) {
  unsigned char uuid[16];
  uuid_generate_random(uuid);
  uuid_unparse_lower(uuid, s->id);
  amqp_basic_properties_t props;
  props._flags = AMQP_BASIC_CORRELATION_ID_FLAG | AMQP_BASIC_REPLY_TO_FLAG | AMQP_BASIC_EXPIRATION_FLAG;
  props.correlation_id = (amqp_bytes_t){36, s->id};
  props.reply_to = c->reply_to;
  props.expiration = amqp_cstring_bytes("30000");
  amqp_table_entry_t deadline;
  if (with_headers())   /* wall-clock milliseconds, as rabbitrpc's */
    add_header(&props, &deadline, "x-rpc-deadline",
               (amqp_field_value_t){AMQP_FIELD_KIND_I64,
                                    {.i64 = (int64_t)((clock_seconds(CLOCK_REALTIME) + 30) * 1000)}});
  s->done = 0;
  s->sent = now();
  check_status(amqp_basic_publish(c->conn, CHANNEL, amqp_empty_bytes, c->queue, 1, 0, &props,
                                  (amqp_bytes_t){sizeof body - 1, body}), "publishing a request");
}

/* Marks the slot a reply answers; a reply for no pending slot is counted and dropped. */
static void settle(struct client *c) {
  const amqp_basic_properties_t *p = c->m.props;
  if (p->_flags & AMQP_BASIC_CORRELATION_ID_FLAG && p->correlation_id.len == 36) {
    for (int i = 0; i < c->inflight; i++) {
      struct slot *s = &c->ring[i];
      if (!s->done && memcmp(s->id, p->correlation_id.bytes, 36) == 0) {
        if (c->m.body.len != sizeof BODY - 1 || memcmp(c->m.body.bytes, BODY, sizeof BODY - 1) != 0)
          die("reply body differs from the request's");
        s->done = 1;
        return;
      }
    }
  }
  c->discarded++;
}

/* Reads replies until slot s has its own. */
static void wait_reply(struct client *c, struct slot *s) {
  while (!s->done) {
    int kind = read_message(c->conn, NULL, &c->m);
    if (kind == MSG_RETURN) die("request returned unroutable (is the server up?)");
    settle(c);
    amqp_maybe_release_buffers(c->conn);
  }
}

static int by_value(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

struct amount {          /* "2.5s" or "1000": seconds, or else calls */
  double seconds;
  long calls;
};

static struct amount parse_amount(const char *text) {
  struct amount a = {0, 0};
  char *end;
  double v = strtod(text, &end);
  if (end == text || v < 0 || (*end && strcmp(end, "s") != 0)) die("bad amount '%s' (2.5s or 1000)", text);
  if (*end) a.seconds = v;
  else a.calls = (long)v;
  return a;
}

static int reached(struct amount a, double elapsed, long calls) {
  return a.seconds > 0 ? elapsed >= a.seconds : calls >= a.calls;
}

/* Nearest rank, as the Lua and Python clients compute it. */
static double percentile(const double *sorted, long n, double p) {
  if (n == 0) return 0;
  long rank = (long)(p * (double)n);   /* ceil(p * n), without libm */
  if ((double)rank < p * (double)n) rank++;
  if (rank < 1) rank = 1;
  return sorted[rank - 1];
}

int main(int argc, char **argv) {
  if (argc != 7 && argc != 8)
    die("usage: raw_client QUEUE direct|exclusive INFLIGHT WARMUP MEASURE SERVER_PID [BROKER_PID]");
  struct client c = {0};
  c.queue = amqp_cstring_bytes(argv[1]);
  c.inflight = atoi(argv[3]);
  struct amount warmup = parse_amount(argv[4]), measure = parse_amount(argv[5]);
  const char *server = argv[6], *broker = argc == 8 ? argv[7] : NULL;
  if (c.inflight < 1 || (measure.seconds <= 0 && measure.calls <= 0)) die("bad INFLIGHT or MEASURE");
  c.ring = calloc((size_t)c.inflight, sizeof *c.ring);
  long cap = c.inflight == 1 ? 1024 : 0, nlat = 0;  /* latencies: sequential calls only */
  double *lat = cap ? malloc((size_t)cap * sizeof *lat) : NULL;
  if (!c.ring || (cap && !lat)) die("out of memory");

  c.conn = open_connection();
  open_reply_path(&c, argv[2]);

  for (int i = 0; i < c.inflight; i++) send_request(&c, &c.ring[i]);
  double t0 = now(), start = 0, end = 0, cpu0 = 0, server_cpu0 = 0, broker_cpu0 = 0, cpu1, server_cpu1;
  double broker_cpu1 = 0;
  long rss_warm = 0, measured = 0, total = 0;
  int measuring = 0;
  for (int head = 0;; head = (head + 1) % c.inflight) {
    struct slot *s = &c.ring[head];
    wait_reply(&c, s);
    double t = now();
    total++;
    if (measuring) {
      measured++;
      if (lat) {
        if (nlat == cap) {
          double *more = realloc(lat, (size_t)(cap *= 2) * sizeof *lat);
          if (!more) die("out of memory");
          lat = more;
        }
        lat[nlat++] = t - s->sent;
      }
      if (reached(measure, t - start, measured)) {
        end = t;
        break;
      }
    } else if (reached(warmup, t - t0, total)) {  /* warm-up over: the measured phase starts now */
      measuring = 1;
      start = t;
      cpu0 = proc_cpu("self");
      server_cpu0 = proc_cpu(server);
      if (broker) broker_cpu0 = proc_cpu(broker);
      rss_warm = proc_kb("self", "VmRSS");
    }
    send_request(&c, s);
  }
  cpu1 = proc_cpu("self");
  server_cpu1 = proc_cpu(server);
  if (broker) broker_cpu1 = proc_cpu(broker);
  long rss_end = proc_kb("self", "VmRSS");
  for (int i = 0; i < c.inflight; i++) wait_reply(&c, &c.ring[i]);  /* drain what is in flight */
  close_connection(c.conn);

  if (lat) qsort(lat, (size_t)nlat, sizeof *lat, by_value);
  char broker_cpu[32] = "null";
  if (broker) snprintf(broker_cpu, sizeof broker_cpu, "%.3f", broker_cpu1 - broker_cpu0);
  printf("{\"calls\":%ld,\"seconds\":%.6f,\"rate\":%.1f,\"p50_us\":%.1f,\"p99_us\":%.1f,"
         "\"client_cpu\":%.3f,\"server_cpu\":%.3f,\"broker_cpu\":%s,\"client_rss_kb\":%ld,\"server_rss_kb\":%ld,"
         "\"rss_warm_kb\":%ld,\"rss_end_kb\":%ld,\"discarded\":%ld,\"warmup_calls\":%ld}\n",
         measured, end - start, (double)measured / (end - start), percentile(lat, nlat, 0.50) * 1e6,
         percentile(lat, nlat, 0.99) * 1e6, cpu1 - cpu0, server_cpu1 - server_cpu0, broker_cpu,
         peak_kb("self"), peak_kb(server), rss_warm, rss_end, c.discarded,
         total - measured);
  free(lat);
  free(c.ring);
  free(c.m.buf);
  return 0;
}
