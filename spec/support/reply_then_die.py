"""A server that dies after replying but before acking: it takes one request from QUEUE,
publishes the reply ("first:" + body) to its reply_to with its correlation_id, and exits at
once without acking, so the broker redelivers the request to the next consumer.
Usage: RPC_URL=... /usr/bin/python3 reply_then_die.py QUEUE"""
import os
import sys

import pika

queue = sys.argv[1]
connection = pika.BlockingConnection(pika.URLParameters(os.environ["RPC_URL"]))
channel = connection.channel()
channel.queue_declare(queue=queue)
channel.basic_qos(prefetch_count=1)


def on_request(ch, method, props, body):
    ch.basic_publish(exchange="", routing_key=props.reply_to, body=b"first:" + body,
                     properties=pika.BasicProperties(correlation_id=props.correlation_id))
    connection.process_data_events(0)  # the reply is on the wire
    os._exit(0)                        # no ack: the request goes back to the queue


channel.basic_consume(queue=queue, on_message_callback=on_request)
print("ready", flush=True)
channel.start_consuming()
