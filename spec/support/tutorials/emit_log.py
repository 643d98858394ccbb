#!/usr/bin/env python
# RabbitMQ tutorial 3 (publish/subscribe), the emitter: https://www.rabbitmq.com/tutorials/tutorial-three-python
# As published (rabbitmq-tutorials python/emit_log.py), except that the broker comes from env
# RPC_URL and the exchange from env RPC_EXCHANGE (default 'logs'), and that prints are flushed.
import os
import sys

import pika

url = os.environ.get("RPC_URL", "amqp://guest:guest@localhost:5672/")
exchange = os.environ.get("RPC_EXCHANGE", "logs")

connection = pika.BlockingConnection(pika.URLParameters(url))
channel = connection.channel()

channel.exchange_declare(exchange=exchange, exchange_type="fanout")

message = " ".join(sys.argv[1:]) or "info: Hello World!"
channel.basic_publish(exchange=exchange, routing_key="", body=message)
print(f" [x] Sent {message}", flush=True)

connection.close()
