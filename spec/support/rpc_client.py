#!/usr/bin/env python
# RabbitMQ tutorial 6 (RPC), the client: https://www.rabbitmq.com/tutorials/tutorial-six-python
# As published, except that the broker comes from env RPC_URL, the queue from env RPC_QUEUE
# (default 'rpc_queue'), n from argv[1] (default 30), and that it gives up after env
# RPC_TIMEOUT seconds (default 10) with exit status 1 instead of waiting forever.
import os
import sys
import time
import uuid

import pika


class FibonacciRpcClient(object):

    def __init__(self, url, queue):
        self.queue = queue
        self.connection = pika.BlockingConnection(pika.URLParameters(url))

        self.channel = self.connection.channel()

        result = self.channel.queue_declare(queue='', exclusive=True)
        self.callback_queue = result.method.queue

        self.channel.basic_consume(
            queue=self.callback_queue,
            on_message_callback=self.on_response,
            auto_ack=True)

        self.response = None
        self.corr_id = None

    def on_response(self, ch, method, props, body):
        if self.corr_id == props.correlation_id:
            self.response = body

    def call(self, n, timeout):
        self.response = None
        self.corr_id = str(uuid.uuid4())
        self.channel.basic_publish(
            exchange='',
            routing_key=self.queue,
            properties=pika.BasicProperties(
                reply_to=self.callback_queue,
                correlation_id=self.corr_id,
            ),
            body=str(n))
        deadline = time.monotonic() + timeout
        while self.response is None and time.monotonic() < deadline:
            self.connection.process_data_events(time_limit=0.1)
        if self.response is None:
            return None
        return int(self.response)


url = os.environ.get('RPC_URL', 'amqp://guest:guest@localhost:5672/')
queue = os.environ.get('RPC_QUEUE', 'rpc_queue')
n = int(sys.argv[1]) if len(sys.argv) > 1 else 30
timeout = float(os.environ.get('RPC_TIMEOUT', '10'))

fibonacci_rpc = FibonacciRpcClient(url, queue)

print(f" [x] Requesting fib({n})", flush=True)
response = fibonacci_rpc.call(n, timeout)
if response is None:
    print(f" [!] No reply within {timeout} s", flush=True)
    sys.exit(1)
print(f" [.] Got {response}")
