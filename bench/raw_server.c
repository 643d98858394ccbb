/* Raw C echo server: what rabbitrpc's server does, with nothing on top.
 *   RPC_URL=... raw_server QUEUE PREFETCH [batched]
 * Declares QUEUE (auto-delete), basic.qos PREFETCH, consumes with manual acks; per delivery
 * publishes the body to reply_to with the correlation_id, then acks. Prints "ready" once
 * consuming, and {"served":N} when SIGTERM or SIGINT ends it (exit 0).
 * batched: what a library can do on top: acks with multiple = true (one basic.ack up to the
 * last delivery tag) once the read buffer is empty (nothing more already received to serve)
 * or when the unacked deliveries reach half the prefetch, instead of one ack per delivery.
 * Every reply is still published before the ack that covers its request (at-least-once).
 * With env RAW_HEADERS set, each reply carries rabbitrpc's x-rpc-handler-time header (raw.h),
 * the seconds from the delivery read to its reply.
 * Two knobs for experiments on a sequential call's time (bench/README.md), both off by default:
 * RAW_DELAY_US, microseconds of busy work before each reply (a slower handler path);
 * RAW_TOUCH_KB, kilobytes of a 64 MB region written after each reply, a new part each time
 * (work after the reply that reaches memory the server has not touched lately). */
#include "raw.h"

#include <signal.h>

static volatile sig_atomic_t stop;

static void on_signal(int sig) {
  (void)sig;
  stop = 1;
}

static void reply(amqp_connection_state_t conn, const struct message *m) {
  double started = with_headers() ? clock_seconds(CLOCK_MONOTONIC) : 0;
  const amqp_basic_properties_t *req = m->props;
  if (!(req->_flags & AMQP_BASIC_REPLY_TO_FLAG)) return;
  amqp_basic_properties_t props;
  props._flags = 0;
  if (req->_flags & AMQP_BASIC_CORRELATION_ID_FLAG) {
    props._flags |= AMQP_BASIC_CORRELATION_ID_FLAG;
    props.correlation_id = req->correlation_id;
  }
  amqp_table_entry_t handler_time;
  if (with_headers())
    add_header(&props, &handler_time, "x-rpc-handler-time",
               (amqp_field_value_t){AMQP_FIELD_KIND_F64,
                                    {.f64 = clock_seconds(CLOCK_MONOTONIC) - started}});
  check_status(amqp_basic_publish(conn, CHANNEL, amqp_empty_bytes, req->reply_to, 0, 0, &props,
                                  m->body), "publishing a reply");
}

/* RAW_DELAY_US and RAW_TOUCH_KB (see the top). */
struct knobs {
  double delay;
  size_t touch, at, size;
  volatile unsigned char *region;
};

static struct knobs knobs_from_env(void) {
  struct knobs k = {0};
  const char *delay = getenv("RAW_DELAY_US"), *touch = getenv("RAW_TOUCH_KB");
  k.delay = delay ? atof(delay) * 1e-6 : 0;
  k.touch = touch ? (size_t)atol(touch) * 1024 : 0;
  if (k.touch) {
    k.size = (size_t)64 << 20;
    k.region = malloc(k.size);
    if (!k.region) die("RAW_TOUCH_KB: out of memory");
    memset((void *)k.region, 1, k.size);
  }
  return k;
}

static void delay(const struct knobs *k) {
  if (k->delay <= 0) return;
  double until = clock_seconds(CLOCK_MONOTONIC) + k->delay;
  while (clock_seconds(CLOCK_MONOTONIC) < until) {}
}

static void touch(struct knobs *k) {
  for (size_t i = 0; i < k->touch; i += 64) {
    k->region[k->at]++;
    k->at = (k->at + 64) % k->size;
  }
}

/* batched: one basic.ack with multiple = true for every delivery up to tag. */
static void ack_up_to(amqp_connection_state_t conn, uint64_t tag, int *unacked) {
  if (*unacked == 0) return;
  check_status(amqp_basic_ack(conn, CHANNEL, tag, 1), "basic.ack (multiple)");
  *unacked = 0;
}

int main(int argc, char **argv) {
  if (argc != 3 && !(argc == 4 && strcmp(argv[3], "batched") == 0))
    die("usage: raw_server QUEUE PREFETCH [batched]");
  amqp_bytes_t queue = amqp_cstring_bytes(argv[1]);
  int prefetch = atoi(argv[2]);
  if (prefetch < 1 || prefetch > 65535) die("PREFETCH must be 1..65535");
  int batched = argc == 4;
  int batch = prefetch / 2 > 1 ? prefetch / 2 : 1;   /* batched: ack at the latest at this many */
  int unacked = 0;
  uint64_t last_tag = 0;

  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_signal;   /* no SA_RESTART */
  sigaction(SIGTERM, &sa, NULL);
  sigaction(SIGINT, &sa, NULL);

  amqp_connection_state_t conn = open_connection();
  amqp_queue_declare(conn, CHANNEL, queue, 0, 0, 0, 1, amqp_empty_table);
  check_reply(amqp_get_rpc_reply(conn), "queue.declare");
  amqp_basic_qos(conn, CHANNEL, 0, (uint16_t)prefetch, 0);
  check_reply(amqp_get_rpc_reply(conn), "basic.qos");
  amqp_basic_consume(conn, CHANNEL, queue, amqp_empty_bytes, 0, 0, 0, amqp_empty_table);
  check_reply(amqp_get_rpc_reply(conn), "basic.consume");
  printf("ready\n");
  fflush(stdout);

  struct message m = {0};
  struct knobs knobs = knobs_from_env();
  long served = 0;
  while (!stop) {
    struct timeval slice = {0, 100000};  /* how soon a signal is noticed when idle */
    int kind = read_message(conn, &slice, &m);
    if (kind == MSG_DELIVER) {
      delay(&knobs);
      reply(conn, &m);
      touch(&knobs);
      served++;
      if (!batched) {
        check_status(amqp_basic_ack(conn, CHANNEL, m.delivery_tag, 0), "basic.ack");
      } else {
        last_tag = m.delivery_tag;
        unacked++;
        /* nothing more received and unread (a partial frame left counts as data: its rest is
         * on its way, so the next read does not block for long), or half the prefetch held */
        if (unacked >= batch || (!amqp_data_in_buffer(conn) && !amqp_frames_enqueued(conn)))
          ack_up_to(conn, last_tag, &unacked);
      }
    } else if (batched) {   /* idle: the buffer was empty, so nothing is unacked; to be sure */
      ack_up_to(conn, last_tag, &unacked);
    }
    amqp_maybe_release_buffers(conn);
  }
  if (batched) ack_up_to(conn, last_tag, &unacked);
  close_connection(conn);
  free(m.buf);
  free((void *)knobs.region);
  printf("{\"served\":%ld}\n", served);
  return 0;
}
