# The RabbitMQ tutorial 6 client (https://www.rabbitmq.com/tutorials/tutorial-six-python) as an
# echo client for the bench: Debian's pika 1.2, BlockingConnection, an exclusive server-named
# reply queue (or direct reply-to), uuid4 correlation ids, process_data_events until the reply
# is in. As the tutorial, requests carry reply_to and correlation_id only (no mandatory flag,
# no expiration). Run it with /usr/bin/python3 (Debian's, which has pika).
#   RPC_URL=... /usr/bin/python3 bench/pika_client.py QUEUE MODE INFLIGHT WARMUP MEASURE SERVER_PID [BROKER_PID]
# The same arguments and JSON line as raw_client.c (see there).
import json
import math
import os
import sys
import time
import uuid

import pika

BODY = b'0123456789abcdef'
CLK_TCK = os.sysconf('SC_CLK_TCK')


class RpcClient(object):

    def __init__(self, url, queue, mode):
        self.queue = queue
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        self.channel = self.connection.channel()
        if mode == 'exclusive':
            result = self.channel.queue_declare(queue='', exclusive=True)
            self.callback_queue = result.method.queue
        elif mode == 'direct':
            self.callback_queue = 'amq.rabbitmq.reply-to'
        else:
            sys.exit('MODE must be direct or exclusive')
        self.channel.basic_consume(
            queue=self.callback_queue,
            on_message_callback=self.on_response,
            auto_ack=True)
        self.pending = set()     # correlation ids sent and not yet answered
        self.replies = {}        # correlation id -> reply body, until its wait
        self.discarded = 0

    def on_response(self, ch, method, props, body):
        if props.correlation_id in self.pending:
            self.pending.discard(props.correlation_id)
            self.replies[props.correlation_id] = body
        else:
            self.discarded += 1

    def send(self, body):
        corr_id = str(uuid.uuid4())
        self.pending.add(corr_id)
        self.channel.basic_publish(
            exchange='',
            routing_key=self.queue,
            properties=pika.BasicProperties(
                reply_to=self.callback_queue,
                correlation_id=corr_id,
            ),
            body=body)
        return corr_id

    def wait(self, corr_id):
        while corr_id not in self.replies:
            self.connection.process_data_events(time_limit=None)
        return self.replies.pop(corr_id)

    def call(self, body):
        return self.wait(self.send(body))


def proc_cpu(pid):
    with open(f'/proc/{pid}/stat') as f:
        fields = f.read().rsplit(')', 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_kb(pid, field):
    with open(f'/proc/{pid}/status') as f:
        for line in f:
            if line.startswith(field + ':'):
                return int(line.split()[1])
    return -1


def peak_kb(pid):
    # the kernel raises VmHWM only when RSS is about to shrink, so it can lag VmRSS
    return max(proc_kb(pid, 'VmHWM'), proc_kb(pid, 'VmRSS'))


def percentile(sorted_values, p):   # nearest rank, as the C and Lua clients
    if not sorted_values:
        return 0.0
    return sorted_values[max(1, math.ceil(p * len(sorted_values))) - 1]


def amount(text):
    """'2.5s' (seconds) or '1000' (calls): a function telling whether it is reached."""
    if text.endswith('s'):
        seconds = float(text[:-1])
        return lambda elapsed, n: elapsed >= seconds
    calls = int(text)
    return lambda elapsed, n: n >= calls


def main():
    queue, mode, inflight, warmup, measure, server = sys.argv[1:7]
    broker = sys.argv[7] if len(sys.argv) > 7 else None
    inflight = int(inflight)
    warmed, done = amount(warmup), amount(measure)
    client = RpcClient(os.environ['RPC_URL'], queue, mode)
    now = time.perf_counter

    def check(reply):
        if reply != BODY:
            sys.exit('pika_client: reply differs from the request')

    ring = [None] * inflight     # (correlation id, sent at) per slot
    lat = []
    if inflight > 1:
        for slot in range(inflight):
            ring[slot] = (client.send(BODY), now())
    t0 = now()
    start = stop = 0.0
    measuring, measured, total, slot = False, 0, 0, 0
    while True:
        if inflight == 1:
            before = now()
            check(client.call(BODY))
            t = now()
            if measuring:
                lat.append(t - before)
        else:
            check(client.wait(ring[slot][0]))
            t = now()
        total += 1
        if measuring:
            measured += 1
            if done(t - start, measured):
                stop = t
                break
        elif warmed(t - t0, total):   # warm-up over: the measured phase starts now
            measuring, start = True, t
            cpu0, server_cpu0 = proc_cpu('self'), proc_cpu(server)
            broker_cpu0 = proc_cpu(broker) if broker else None
            rss_warm = proc_kb('self', 'VmRSS')
        if inflight > 1:
            ring[slot] = (client.send(BODY), now())
            slot = (slot + 1) % inflight
    cpu, server_cpu = proc_cpu('self') - cpu0, proc_cpu(server) - server_cpu0
    broker_cpu = proc_cpu(broker) - broker_cpu0 if broker else None
    rss_end = proc_kb('self', 'VmRSS')
    for i in range(1, inflight):   # drain what is in flight
        check(client.wait(ring[(slot + i) % inflight][0]))
    client.connection.close()

    lat.sort()
    print(json.dumps({
        'calls': measured, 'seconds': stop - start, 'rate': measured / (stop - start),
        'p50_us': percentile(lat, 0.50) * 1e6, 'p99_us': percentile(lat, 0.99) * 1e6,
        'client_cpu': cpu, 'server_cpu': server_cpu, 'broker_cpu': broker_cpu,
        'client_rss_kb': peak_kb('self'), 'server_rss_kb': peak_kb(server),
        'rss_warm_kb': rss_warm, 'rss_end_kb': rss_end, 'discarded': client.discarded,
        'warmup_calls': total - measured}), flush=True)


main()
