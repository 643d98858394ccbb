#!/usr/bin/env python
# RabbitMQ tutorial 1 (hello world), the receiver: https://www.rabbitmq.com/tutorials/tutorial-one-python
# As published (rabbitmq-tutorials python/receive.py, 2024), except that the broker comes from
# env RPC_URL and the queue from env RPC_QUEUE (default 'hello'), and that prints are flushed.
import os
import sys

import pika

url = os.environ.get("RPC_URL", "amqp://guest:guest@localhost:5672/")
queue = os.environ.get("RPC_QUEUE", "hello")


def main():
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()

    channel.queue_declare(queue=queue)

    def callback(ch, method, properties, body):
        print(f" [x] Received {body.decode()}", flush=True)

    channel.basic_consume(
        queue=queue,
        on_message_callback=callback,
        auto_ack=True,
    )

    print(" [*] Waiting for messages. To exit press CTRL+C", flush=True)
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
