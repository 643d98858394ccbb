#!/usr/bin/python3
"""The specs' side door to the broker, over pika (the RabbitMQ tutorials' client library).

    amqp_tool.py ops JSON       run a JSON list of operations on one connection and print a
                                JSON list with one result object per operation
    amqp_tool.py capture QUEUE  declare QUEUE, print "ready", then for each request print one
                                JSON line (body, properties, delivery fields), reply with the
                                same body to its reply_to if it has one, and ack it; runs
                                until killed

Operations (objects with "op"):
    declare  queue [passive durable exclusive auto_delete arguments]
             -> {ok, queue, messages, consumers}
    count    queue                 -> passive declare: {ok, messages, consumers}
    bind     queue exchange routing_key
    publish  [exchange] routing_key body [properties: reply_to correlation_id content_type
             headers delivery_mode priority expiration]
             Binary or generated parts for hostile requests: body_hex (instead of body),
             body_size (instead of body: that many "x"), properties_hex (a property's raw bytes
             as hex: correlation_id, reply_to, content_type), headers_nested (depth: headers
             {n = {n = ... "leaf"}}, nested that deep; with headers_array, [[... "leaf"]]),
             headers_keys (count: headers k00000 .. = true)
    get      queue [timeout]       -> {body, properties, redelivered, routing_key, exchange,
                                      body_hex, hex}, or {empty = true} when nothing arrived
                                      within timeout; hex: the string properties' raw bytes
    declare_exchange exchange [type]
    delete_exchange  exchange
    delete   queue
An operation the broker refuses gives {error: reply_code, text: reply_text}; the next
operation gets a fresh channel. Bodies travel as latin-1 text (body_hex and hex: binary safe).

The broker is env RPC_URL (default amqp://guest:guest@localhost:5673/).
"""
import json
import os
import sys
import time

import pika

# pika encodes and decodes field tables recursively: room for the deeply nested headers
sys.setrecursionlimit(100000)

URL = os.environ.get("RPC_URL") or "amqp://guest:guest@localhost:5673/"


def plain(value):
    """AMQP values as JSON-friendly ones: bytes become latin-1 text."""
    if isinstance(value, bytes):
        return value.decode("latin-1")
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


PROPERTY_NAMES = ("content_type", "content_encoding", "headers", "delivery_mode", "priority",
                  "correlation_id", "reply_to", "expiration", "message_id", "type", "app_id")


def properties_of(props):
    out = {}
    for name in PROPERTY_NAMES:
        value = getattr(props, name, None)
        if value is not None:
            out[name] = plain(value)
    return out


def raw(value):
    """A short string property's bytes: pika gives text when they were valid UTF-8."""
    return value.encode("utf-8") if isinstance(value, str) else value


def hex_of(props):
    out = {}
    for name in ("content_type", "correlation_id", "reply_to"):
        value = getattr(props, name, None)
        if value is not None:
            out[name] = raw(value).hex()
    return out


def delivery_of(method, props, body):
    return {
        "body": body.decode("latin-1"),
        "body_hex": body.hex(),
        "properties": properties_of(props),
        "hex": hex_of(props),
        "redelivered": bool(method.redelivered),
        "routing_key": method.routing_key,
        "exchange": method.exchange,
    }


def declare(ch, op, passive=False):
    r = ch.queue_declare(queue=op["queue"], passive=passive or op.get("passive", False),
                         durable=op.get("durable", False), exclusive=op.get("exclusive", False),
                         auto_delete=op.get("auto_delete", False),
                         arguments=op.get("arguments") or None)
    return {"ok": True, "queue": r.method.queue, "messages": r.method.message_count,
            "consumers": r.method.consumer_count}


def get(conn, ch, op):
    deadline = time.monotonic() + float(op.get("timeout", 0))
    while True:
        method, props, body = ch.basic_get(queue=op["queue"], auto_ack=True)
        if method is not None:
            return delivery_of(method, props, body)
        if time.monotonic() >= deadline:
            return {"empty": True}
        conn.sleep(0.05)


def nested(depth, array):
    value = "leaf"
    for _ in range(depth):
        value = [value] if array else {"n": value}
    return value


def publish(ch, op):
    properties = dict(op.get("properties") or {})
    for name, value in (op.get("properties_hex") or {}).items():
        properties[name] = bytes.fromhex(value)
    if "headers_nested" in op or "headers_keys" in op:
        headers = dict(properties.get("headers") or {})
        if "headers_nested" in op:
            headers["n"] = nested(op["headers_nested"], op.get("headers_array", False))
        for i in range(op.get("headers_keys", 0)):
            headers["k%05d" % i] = True
        properties["headers"] = headers
    if "body_hex" in op:
        body = bytes.fromhex(op["body_hex"])
    elif "body_size" in op:
        body = b"x" * op["body_size"]
    else:
        body = op.get("body", "").encode("latin-1")
    ch.basic_publish(exchange=op.get("exchange", ""), routing_key=op["routing_key"],
                     body=body, properties=pika.BasicProperties(**properties))
    return {"ok": True}


def run_ops(ops):
    conn = pika.BlockingConnection(pika.URLParameters(URL))
    ch = conn.channel()
    results = []
    for op in ops:
        kind = op["op"]
        try:
            if kind == "declare":
                results.append(declare(ch, op))
            elif kind == "count":
                results.append(declare(ch, op, passive=True))
            elif kind == "bind":
                ch.queue_bind(queue=op["queue"], exchange=op["exchange"],
                              routing_key=op["routing_key"])
                results.append({"ok": True})
            elif kind == "publish":
                results.append(publish(ch, op))
            elif kind == "get":
                results.append(get(conn, ch, op))
            elif kind == "delete":
                ch.queue_delete(queue=op["queue"])
                results.append({"ok": True})
            elif kind == "declare_exchange":
                ch.exchange_declare(exchange=op["exchange"],
                                    exchange_type=op.get("type", "direct"))
                results.append({"ok": True})
            elif kind == "delete_exchange":
                ch.exchange_delete(exchange=op["exchange"])
                results.append({"ok": True})
            else:
                raise SystemExit("amqp_tool.py: unknown op " + repr(kind))
        except pika.exceptions.ChannelClosedByBroker as e:
            results.append({"error": e.reply_code, "text": e.reply_text})
            ch = conn.channel()
    conn.close()
    print(json.dumps(results, default=str))


def capture(queue):
    conn = pika.BlockingConnection(pika.URLParameters(URL))
    ch = conn.channel()
    ch.queue_declare(queue=queue)
    ch.basic_qos(prefetch_count=1)

    def on_request(ch, method, props, body):
        print(json.dumps(delivery_of(method, props, body), default=str), flush=True)
        if props.reply_to:
            ch.basic_publish(exchange="", routing_key=props.reply_to, body=body,
                             properties=pika.BasicProperties(correlation_id=props.correlation_id))
        ch.basic_ack(delivery_tag=method.delivery_tag)

    ch.basic_consume(queue=queue, on_message_callback=on_request)
    print("ready", flush=True)
    ch.start_consuming()


def main(argv):
    if len(argv) == 3 and argv[1] == "ops":
        run_ops(json.loads(argv[2]))
    elif len(argv) == 3 and argv[1] == "capture":
        capture(argv[2])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv)
