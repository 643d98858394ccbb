#!/usr/bin/env python
# RabbitMQ tutorial 1 (hello world), the sender: https://www.rabbitmq.com/tutorials/tutorial-one-python
# As published (rabbitmq-tutorials python/send.py, 2024), except that the broker comes from env
# RPC_URL and the queue from env RPC_QUEUE (default 'hello'), and that prints are flushed.
import os

import pika

url = os.environ.get("RPC_URL", "amqp://guest:guest@localhost:5672/")
queue = os.environ.get("RPC_QUEUE", "hello")

connection = pika.BlockingConnection(pika.URLParameters(url))
channel = connection.channel()

channel.queue_declare(queue=queue)

channel.basic_publish(exchange="", routing_key=queue, body="Hello World!")
print(" [x] Sent 'Hello World!'", flush=True)

connection.close()
