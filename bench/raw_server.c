/* Raw C echo server: what rabbitrpc's server does, with nothing on top.
 *   RPC_URL=... raw_server QUEUE PREFETCH
 * Declares QUEUE (auto-delete), basic.qos PREFETCH, consumes with manual acks; per delivery
 * publishes the body to reply_to with the correlation_id, then acks. Prints "ready" once
 * consuming, and {"served":N} when SIGTERM or SIGINT ends it (exit 0). */
#include "raw.h"

#include <signal.h>

static volatile sig_atomic_t stop;

static void on_signal(int sig) {
  (void)sig;
  stop = 1;
}

static void reply(amqp_connection_state_t conn, const struct message *m) {
  const amqp_basic_properties_t *req = m->props;
  if (!(req->_flags & AMQP_BASIC_REPLY_TO_FLAG)) return;
  amqp_basic_properties_t props;
  props._flags = 0;
  if (req->_flags & AMQP_BASIC_CORRELATION_ID_FLAG) {
    props._flags |= AMQP_BASIC_CORRELATION_ID_FLAG;
    props.correlation_id = req->correlation_id;
  }
  check_status(amqp_basic_publish(conn, CHANNEL, amqp_empty_bytes, req->reply_to, 0, 0, &props,
                                  m->body), "publishing a reply");
}

int main(int argc, char **argv) {
  if (argc != 3) die("usage: raw_server QUEUE PREFETCH");
  amqp_bytes_t queue = amqp_cstring_bytes(argv[1]);
  int prefetch = atoi(argv[2]);
  if (prefetch < 1 || prefetch > 65535) die("PREFETCH must be 1..65535");

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
  long served = 0;
  while (!stop) {
    struct timeval slice = {0, 100000};  /* how soon a signal is noticed when idle */
    int kind = read_message(conn, &slice, &m);
    if (kind == MSG_DELIVER) {
      reply(conn, &m);
      check_status(amqp_basic_ack(conn, CHANNEL, m.delivery_tag, 0), "basic.ack");
      served++;
    }
    amqp_maybe_release_buffers(conn);
  }
  close_connection(conn);
  free(m.buf);
  printf("{\"served\":%ld}\n", served);
  return 0;
}
