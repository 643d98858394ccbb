#!/usr/bin/python3
"""Interleaved A/B of builds: is a change worth keeping?

  bench/ab.py [--reps N] [--seconds S] [--inflight K] [--mode M] NAME=SERVER/CLIENT ...

Each variant pairs a server and a client, each one of bench.py's raw stacks (c, c-batched,
c-headers), . (rabbitrpc as built in this checkout) or a git revision (rabbitrpc at that
revision: exported to bench/out/ab/REV and built there once), each optionally followed by
:VAR=VALUE[,VAR=VALUE...], environment for that side only. The variants run in turn, in
alternating order, REPS times, each on a fresh queue, so drift in the machine or the broker
falls on all of them alike. Printed per variant: the median rate, the median of its
per-repetition ratios to the first variant, and the CPU (microseconds per call) of client,
server and broker. Needs what bench/run.sh needs: the broker up (RPC_URL), bench/out/raw_*
built (run.sh builds them).

  bench/ab.py c=c/c base=HEAD~1/c new=./c           # a server change, against a raw C client
  bench/ab.py --inflight 100 c=c/c lib=./.          # the library at 100 in flight, against raw C
  bench/ab.py ch=c-headers/c-headers d2=c-headers:RAW_DELAY_US=2/c-headers   # raw_server's knobs
"""
import argparse
import os
import statistics
import subprocess
import sys

import bench   # its stacks, and how it starts servers, runs clients and finds the broker


def tree_of(rev):
    """The checkout that holds rabbitrpc at rev, built."""
    if rev == '.':
        return bench.ROOT
    sha = subprocess.run(['git', '-C', bench.ROOT, 'rev-parse', '--short', rev], check=True,
                         capture_output=True, text=True).stdout.strip()
    tree = os.path.join(bench.OUT, 'ab', sha)
    if not os.path.exists(os.path.join(tree, 'build', 'rpc', 'core.so')):
        os.makedirs(tree, exist_ok=True)
        archive = subprocess.Popen(['git', '-C', bench.ROOT, 'archive', sha], stdout=subprocess.PIPE)
        subprocess.run(['tar', '-x', '-C', tree], stdin=archive.stdout, check=True)
        archive.wait()
        subprocess.run(['make', '-s', '-C', tree, 'build/rpc/core.so'], check=True)
    return tree


RAW = ('c', 'c-batched', 'c-headers')


def side(name, role):
    """argv, server arguments after QUEUE PREFETCH, and environment of one side of a variant
    (NAME[:VAR=VALUE,...])."""
    name, _, extra = name.partition(':')
    extra = dict(kv.split('=', 1) for kv in extra.split(',') if kv)
    if name in RAW:
        stack = list(bench.STACKS[name])
        server, client, args, env = stack + [[], {}][len(stack) - 2:]
        env = dict(env, **extra)
        return (server, args, env) if role == 'server' else (client, [], env)
    return [bench.LUA, os.path.join(tree_of(name), 'bench', 'lua_' + role + '.lua')], [], extra


def measure(server, client, queue, a, broker):
    (sargv, sargs, senv), (cargv, _, cenv) = server, client
    srv, why = bench.start_server(sargv + [queue, str(a.inflight)] + sargs, dict(bench.child_env(), **senv))
    if not srv:
        sys.exit('ab: the server did not start: ' + why)
    try:
        r = bench.run_client(cargv + [queue, a.mode, str(a.inflight), '0.5s', '%gs' % a.seconds, str(srv.pid)]
                             + ([str(broker)] if broker else []), dict(bench.child_env(), **cenv), a.seconds + 60)
    finally:
        bench.stop_server(srv)
    if 'error' in r:
        sys.exit('ab: ' + r['error'])
    return r


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--reps', type=int, default=8)
    p.add_argument('--seconds', type=float, default=3)
    p.add_argument('--inflight', type=int, default=1)
    p.add_argument('--mode', default='direct', choices=['direct', 'exclusive'])
    p.add_argument('variants', nargs='+', metavar='NAME=SERVER/CLIENT')
    a = p.parse_args()
    variants = []
    for v in a.variants:
        name, _, pair = v.partition('=')
        server, _, client = pair.partition('/')
        if not (name and server and client):
            p.error('a variant is NAME=SERVER/CLIENT, got ' + v)
        for sd in (server, client):
            if any('=' not in kv for kv in sd.partition(':')[2].split(',') if kv):
                p.error('a side\'s environment is :VAR=VALUE[,VAR=VALUE], got ' + sd)
        variants.append((name, side(server, 'server'), side(client, 'client')))
    broker, how = bench.find_broker(argparse.Namespace(broker_pid=0))
    print('broker: %s (%s)' % (broker or '-', how))
    runs = {name: [] for name, _, _ in variants}
    for rep in range(a.reps):
        for name, server, client in variants if rep % 2 == 0 else variants[::-1]:
            runs[name].append(measure(server, client, 'ab-%d-%d-%s' % (os.getpid(), rep, name), a, broker))
    first = runs[variants[0][0]]
    for name, _, _ in variants:
        rs = runs[name]
        ratio = statistics.median(r['rate'] / f['rate'] for r, f in zip(rs, first))
        us = {k: statistics.median((r[k] or 0) / r['calls'] * 1e6 for r in rs)
              for k in ('client_cpu', 'server_cpu', 'broker_cpu')}
        print('%-10s %9.1f calls/s  ratio %.3f  CPU us/call: client %.1f, server %.1f, broker %s  rates %s' % (
            name, statistics.median(r['rate'] for r in rs), ratio, us['client_cpu'], us['server_cpu'],
            '%.1f' % us['broker_cpu'] if broker else '-', ' '.join('%.0f' % r['rate'] for r in rs)))


if __name__ == '__main__':
    main()
