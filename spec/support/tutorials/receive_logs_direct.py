#!/usr/bin/env python
# RabbitMQ tutorial 4 (routing), the receiver: https://www.rabbitmq.com/tutorials/tutorial-four-python
# As published (rabbitmq-tutorials python/receive_logs_direct.py), except that the broker comes
# from env RPC_URL and the exchange from env RPC_EXCHANGE (default 'direct_logs'), and that
# prints are flushed.
import os
import sys

import pika

url = os.environ.get("RPC_URL", "amqp://guest:guest@localhost:5672/")
exchange = os.environ.get("RPC_EXCHANGE", "direct_logs")


def main():
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()

    channel.exchange_declare(exchange=exchange, exchange_type="direct")

    result = channel.queue_declare(queue="", exclusive=True)
    queue_name = result.method.queue

    severities = sys.argv[1:]
    if not severities:
        sys.stderr.write("Usage: %s [info] [warning] [error]\n" % sys.argv[0])
        sys.exit(1)

    for severity in severities:
        channel.queue_bind(
            exchange=exchange,
            queue=queue_name,
            routing_key=severity,
        )

    print(" [*] Waiting for logs. To exit press CTRL+C", flush=True)

    def callback(ch, method, properties, body):
        print(f" [x] {method.routing_key}:{body.decode()}", flush=True)

    channel.basic_consume(
        queue=queue_name,
        on_message_callback=callback,
        auto_ack=True,
    )

    channel.start_consuming()


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("Interrupted", flush=True)
        try:
            sys.exit(0)
        except SystemExit:
            os._exit(0)
