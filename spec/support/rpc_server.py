#!/usr/bin/env python
# RabbitMQ tutorial 6 (RPC), the server: https://www.rabbitmq.com/tutorials/tutorial-six-python
# As published, except that the broker comes from env RPC_URL and the queue from argv[1] or
# env RPC_QUEUE (default 'rpc_queue'), so the specs can use the private broker and a fresh queue.
import os
import sys

import pika

url = os.environ.get('RPC_URL', 'amqp://guest:guest@localhost:5672/')
queue = sys.argv[1] if len(sys.argv) > 1 else os.environ.get('RPC_QUEUE', 'rpc_queue')

connection = pika.BlockingConnection(pika.URLParameters(url))

channel = connection.channel()

channel.queue_declare(queue=queue)


def fib(n):
    if n == 0:
        return 0
    elif n == 1:
        return 1
    else:
        return fib(n - 1) + fib(n - 2)


def on_request(ch, method, props, body):
    n = int(body)

    print(f" [.] fib({n})", flush=True)
    response = fib(n)

    ch.basic_publish(exchange='',
                     routing_key=props.reply_to,
                     properties=pika.BasicProperties(correlation_id=props.correlation_id),
                     body=str(response))
    ch.basic_ack(delivery_tag=method.delivery_tag)


channel.basic_qos(prefetch_count=1)
channel.basic_consume(queue=queue, on_message_callback=on_request)

print(" [x] Awaiting RPC requests", flush=True)
channel.start_consuming()
