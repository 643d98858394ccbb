# The RabbitMQ tutorial 6 server (https://www.rabbitmq.com/tutorials/tutorial-six-python) as an
# echo server for the bench: Debian's pika 1.2, BlockingConnection, basic_qos, a callback that
# publishes the reply and then acks. Run it with /usr/bin/python3 (Debian's, which has pika).
#   RPC_URL=... /usr/bin/python3 bench/pika_server.py QUEUE PREFETCH
# Prints "ready" once consuming, and {"served":N} when SIGTERM or SIGINT ends it.
import os
import signal
import sys

import pika

queue, prefetch = sys.argv[1], int(sys.argv[2])
connection = pika.BlockingConnection(pika.URLParameters(os.environ['RPC_URL']))
channel = connection.channel()
channel.queue_declare(queue=queue, auto_delete=True)
served = 0


def on_request(ch, method, props, body):
    global served
    ch.basic_publish(exchange='',
                     routing_key=props.reply_to,
                     properties=pika.BasicProperties(correlation_id=props.correlation_id),
                     body=body)
    ch.basic_ack(delivery_tag=method.delivery_tag)
    served += 1


def on_signal(signum, frame):
    # wakes the ioloop; start_consuming returns once the callback in hand is done
    connection.add_callback_threadsafe(channel.stop_consuming)


signal.signal(signal.SIGTERM, on_signal)
signal.signal(signal.SIGINT, on_signal)
channel.basic_qos(prefetch_count=prefetch)
channel.basic_consume(queue=queue, on_message_callback=on_request)
print("ready", flush=True)
channel.start_consuming()
connection.close()
print(f'{{"served":{served}}}', flush=True)
