#!/usr/bin/python3
"""Writes the seed corpus of each fuzz target under OUTDIR/<target>/ (make fuzz runs it).

Each seed follows its target's input layout (see the comment at the top of each fuzz/*.c):
cheap starting points that already reach the interesting paths, which libFuzzer mutates."""
import os
import struct
import sys


def shortstr(s):
    return bytes([len(s)]) + s


def longstr(s):
    return struct.pack(">I", len(s)) + s


def value(kind, payload=b""):
    return kind + payload


def table(entries):
    body = b"".join(shortstr(k) + v for k, v in entries)
    return longstr(body)


def array(values):
    return longstr(b"".join(values))


def table_push_seeds():
    every_kind = [
        (b"t", value(b"t", b"\x01")), (b"b", value(b"b", b"\xff")), (b"B", value(b"B", b"\xff")),
        (b"s", value(b"s", struct.pack(">h", -2))), (b"u", value(b"u", struct.pack(">H", 65535))),
        (b"I", value(b"I", struct.pack(">i", -5))), (b"i", value(b"i", struct.pack(">I", 2**32 - 1))),
        (b"l", value(b"l", struct.pack(">q", -2**63))), (b"L", value(b"L", struct.pack(">Q", 2**64 - 1))),
        (b"f", value(b"f", struct.pack(">f", 1.5))), (b"d", value(b"d", struct.pack(">d", float("nan")))),
        (b"D", value(b"D", b"\x02" + struct.pack(">I", 12345))), (b"S", value(b"S", longstr(b"a\x00b"))),
        (b"x", value(b"x", longstr(b"\xff\xfe"))), (b"T", value(b"T", struct.pack(">Q", 1700000000))),
        (b"V", value(b"V")), (b"A", value(b"A", array([]))), (b"F", value(b"F", table([]))),
        (b"t", value(b"t", b"\x00")),  # a duplicate key: the last one wins
    ]
    seeds = {"every_kind": every_kind}

    def nested(levels, kind):
        inner = value(b"t", b"\x01")
        for _ in range(levels - 1):
            inner = value(b"F", table([(b"k", inner)])) if kind == b"F" else value(b"A", array([inner]))
        return [(b"top", inner)]

    seeds["tables_16_levels"] = nested(16, b"F")   # the headers table and 15 below: within the cap
    seeds["tables_17_levels"] = nested(17, b"F")
    seeds["arrays_16_levels"] = nested(16, b"A")
    seeds["arrays_17_levels"] = nested(17, b"A")
    seeds["entries_1024"] = [(b"a", value(b"A", array([value(b"V")] * 1023)))]
    seeds["entries_1025"] = [(b"a", value(b"A", array([value(b"V")] * 1024)))]
    out = {}
    for name, entries in seeds.items():
        encoded = table(entries)
        out["wire_" + name] = b"\x00" + encoded[4:]          # mode 0: the target adds the length
        out["props_" + name] = b"\x01" + struct.pack(">H", 0x2000) + encoded  # mode 1: headers flag
    out["built_deep"] = b"\x02\x01\x01k" + bytes([14, 1]) * 40  # mode 2: arrays 40 deep
    out["built_unknown_kind"] = b"\x02\x02\x01a\xff\x7f\x01b\xfe\x00"
    return out


def pending_seeds():
    ops = b""
    for s in range(0, 4096, 256):        # 16 ids with the same home
        ops += b"\x00" + struct.pack(">H", s)
    for s in range(0, 4096, 512):        # remove every other one: backward shifts
        ops += b"\x04" + struct.pack(">H", s)
    ops += b"\x03" + struct.pack(">H", 256)
    grow = b"\x06" + struct.pack(">H", 1) + b"\xff"   # 255 adds: the table grows
    parse = b"\x07\x00\x00" + b"\x00" + bytes(range(16)) + b"\x07\x00\x00" + b"\xff\x24" + b"0" * 36
    return {"collide": ops, "grow": grow + ops, "parse": parse}


def conn_init_seeds():
    valid_url = bytes([0, 0, 0, 0, 1, 0])            # amqp://guest:PW@localhost:5672
    tls_url = bytes([1, 0, 0, 0, 10, 5])             # amqps://guest:PW@localhost:5671/vh
    opts = b"\x00\x06\xff"                           # RPC_URL unset; rpc.client's options; no failures
    return {
        "url": opts + b"\x01" + b"\x00\x01" + valid_url + b"\x01",
        "tls": opts + b"\x02" + b"\x00\x01" + tls_url + b"\x05\x01" +
               b"\x05" + b"\x00\x01\x00" + b"\x01\x01\x03" + b"\x02\x01\x03" + b"\x03\x02" + b"\x04\x03" +
               b"\x01" + b"\x01",
        "urls": opts + b"\x01" + b"\x01\x01" + b"\x02" + b"\x01" + valid_url + b"\x01" + tls_url +
                b"\x01\x01\x01",
        "numbers": opts + b"\x03" + b"\x02\x01\x04" + b"\x03\x01\x6f" + b"\x04\x01\x08" + b"\x01",
        "env_default": b"\x02\x00\xff",
        "server_options": b"\x00\x07\xff\x01\x00\x01" + valid_url + b"\x01",
        "failing_allocations": b"\x00\x06\x05\x01\x00\x01" + tls_url + b"\x01",
    }


def table_from_lua_seeds():
    flat = (b"\x04\xff\x04" + b"\x05hello" + b"\x00\x03abc" + b"\x03key" + b"\x04" + bytes(8) +
            b"\x01k" + b"\x07" + b"\x02b" + b"\x08")
    return {
        "flat": flat,
        "at_the_cap": b"\x04\xff\x01" + b"\x01k" + b"\x03\x05x",      # encodes to RPC_MAX_TABLE bytes
        "over_the_cap": b"\x04\xff\x01" + b"\x01k" + b"\x03\x06x",    # one byte more
        "bad_key": b"\x0c\xff\x01" + b"\xe6" + b"\x00\x01a",
        "bad_value": b"\x14\xff\x01" + b"\x01k" + b"\x0a",
    }


def main():
    outdir = sys.argv[1]
    for target, seeds in (("table_push", table_push_seeds()), ("pending", pending_seeds()),
                          ("conn_init", conn_init_seeds()), ("table_from_lua", table_from_lua_seeds())):
        os.makedirs(os.path.join(outdir, target), exist_ok=True)
        for name, data in seeds.items():
            with open(os.path.join(outdir, target, name), "wb") as f:
                f.write(data)


main()
