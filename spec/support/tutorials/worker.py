#!/usr/bin/env python
# RabbitMQ tutorial 2 (work queues), the worker: https://www.rabbitmq.com/tutorials/tutorial-two-python
# As published (rabbitmq-tutorials python/worker.py, 2024), except that the broker comes from env
# RPC_URL and the queue from env RPC_QUEUE (default 'task_queue'), and that prints are flushed.
import os
import time

import pika

url = os.environ.get("RPC_URL", "amqp://guest:guest@localhost:5672/")
queue = os.environ.get("RPC_QUEUE", "task_queue")

connection = pika.BlockingConnection(pika.URLParameters(url))
channel = connection.channel()

channel.queue_declare(queue=queue, durable=True)
print(" [*] Waiting for messages. To exit press CTRL+C", flush=True)


def callback(ch, method, properties, body):
    print(f" [x] Received {body.decode()}", flush=True)
    time.sleep(body.count(b"."))
    print(" [x] Done", flush=True)
    ch.basic_ack(delivery_tag=method.delivery_tag)


channel.basic_qos(prefetch_count=1)
channel.basic_consume(queue=queue, on_message_callback=callback)

channel.start_consuming()
