#!/usr/bin/env python
# RabbitMQ tutorial 3 (publish/subscribe), the receiver: https://www.rabbitmq.com/tutorials/tutorial-three-python
# As published (rabbitmq-tutorials python/receive_logs.py), except that the broker comes from
# env RPC_URL and the exchange from env RPC_EXCHANGE (default 'logs'), and that prints are flushed.
import os
import sys

import pika

url = os.environ.get("RPC_URL", "amqp://guest:guest@localhost:5672/")
exchange = os.environ.get("RPC_EXCHANGE", "logs")


def main():
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()

    channel.exchange_declare(exchange=exchange, exchange_type="fanout")

    result = channel.queue_declare(queue="", exclusive=True)
    queue_name = result.method.queue

    channel.queue_bind(exchange=exchange, queue=queue_name)

    def callback(ch, method, properties, body):
        print(f" [x] {body.decode()}", flush=True)

    print(" [*] Waiting for logs. To exit press CTRL+C", flush=True)
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
