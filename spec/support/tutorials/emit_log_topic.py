#!/usr/bin/env python
# RabbitMQ tutorial 5 (topics), the emitter: https://www.rabbitmq.com/tutorials/tutorial-five-python
# As published (rabbitmq-tutorials python/emit_log_topic.py), except that the broker comes from
# env RPC_URL and the exchange from env RPC_EXCHANGE (default 'topic_logs'), and that prints
# are flushed.
import os
import sys

import pika

url = os.environ.get("RPC_URL", "amqp://guest:guest@localhost:5672/")
exchange = os.environ.get("RPC_EXCHANGE", "topic_logs")

connection = pika.BlockingConnection(pika.URLParameters(url))
channel = connection.channel()

channel.exchange_declare(exchange=exchange, exchange_type="topic")

routing_key = sys.argv[1] if len(sys.argv) > 2 else "anonymous.info"
message = " ".join(sys.argv[2:]) or "Hello World!"
channel.basic_publish(
    exchange=exchange,
    routing_key=routing_key,
    body=message,
)
print(f" [x] Sent {routing_key}:{message}", flush=True)

connection.close()
