#!/usr/bin/env python
# RabbitMQ tutorial 2 (work queues), the producer: https://www.rabbitmq.com/tutorials/tutorial-two-python
# As published (rabbitmq-tutorials python/new_task.py, 2024), except that the broker comes from
# env RPC_URL and the queue from env RPC_QUEUE (default 'task_queue'), that prints are flushed,
# and that delivery mode 2 is pika.spec.PERSISTENT_DELIVERY_MODE (as in the 2021 version):
# Debian 12's pika 1.2 has no pika.DeliveryMode.
import os
import sys

import pika

url = os.environ.get("RPC_URL", "amqp://guest:guest@localhost:5672/")
queue = os.environ.get("RPC_QUEUE", "task_queue")

connection = pika.BlockingConnection(pika.URLParameters(url))
channel = connection.channel()

channel.queue_declare(queue=queue, durable=True)

message = " ".join(sys.argv[1:]) or "Hello World!"
channel.basic_publish(
    exchange="",
    routing_key=queue,
    body=message,
    properties=pika.BasicProperties(
        delivery_mode=pika.spec.PERSISTENT_DELIVERY_MODE,
    ),
)
print(f" [x] Sent {message}", flush=True)

connection.close()
