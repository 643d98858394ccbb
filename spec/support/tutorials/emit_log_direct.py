#!/usr/bin/env python
# RabbitMQ tutorial 4 (routing), the emitter: https://www.rabbitmq.com/tutorials/tutorial-four-python
# As published (rabbitmq-tutorials python/emit_log_direct.py), except that the broker comes from
# env RPC_URL and the exchange from env RPC_EXCHANGE (default 'direct_logs'), and that prints
# are flushed.
import os
import sys

import pika

url = os.environ.get("RPC_URL", "amqp://guest:guest@localhost:5672/")
exchange = os.environ.get("RPC_EXCHANGE", "direct_logs")

connection = pika.BlockingConnection(pika.URLParameters(url))
channel = connection.channel()

channel.exchange_declare(exchange=exchange, exchange_type="direct")

severity = sys.argv[1] if len(sys.argv) > 2 else "info"
message = " ".join(sys.argv[2:]) or "Hello World!"
channel.basic_publish(
    exchange=exchange,
    routing_key=severity,
    body=message,
)
print(f" [x] Sent {severity}:{message}", flush=True)

connection.close()
