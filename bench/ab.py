#!/usr/bin/python3
"""Interleaved A/B of builds: is a change worth keeping?

  bench/ab.py [--reps N] [--seconds S] [--inflight K] [--mode M] NAME=SERVER/CLIENT ...

Each variant pairs a server and a client, each one of: c (raw C), c-headers (raw C with
rabbitrpc's headers), . (rabbitrpc as built in this checkout) or a git revision (rabbitrpc at
that revision: exported to bench/out/ab/REV and built there once). The variants run in turn,
in alternating order, REPS times, each on a fresh queue, so drift in the machine or the broker
falls on all of them alike. Printed per variant: the median rate, the median of its per-repetition
ratios to the first variant, and the CPU (microseconds per call) of client, server and broker.
Needs what bench/run.sh needs: the broker up (RPC_URL), bench/out/raw_* built (run.sh builds them).

  bench/ab.py base=HEAD~1/c new=./c                 # a server change, against a raw C client
  bench/ab.py --inflight 100 c=c/c lib=./.          # the library at 100 in flight, against raw C
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, 'bench', 'out')


def broker_pid():
    path = os.path.join(ROOT, '.broker', 'rabbitrpc@localhost.pid')
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def tree_of(rev):
    """The checkout that holds rabbitrpc at rev, built."""
    if rev == '.':
        return ROOT
    sha = subprocess.run(['git', '-C', ROOT, 'rev-parse', '--short', rev], check=True,
                         capture_output=True, text=True).stdout.strip()
    tree = os.path.join(OUT, 'ab', sha)
    if not os.path.exists(os.path.join(tree, 'build', 'rpc', 'core.so')):
        os.makedirs(tree, exist_ok=True)
        archive = subprocess.Popen(['git', '-C', ROOT, 'archive', sha], stdout=subprocess.PIPE)
        subprocess.run(['tar', '-x', '-C', tree], stdin=archive.stdout, check=True)
        archive.wait()
        subprocess.run(['make', '-s', '-C', tree, 'build/rpc/core.so'], check=True)
    return tree


def command(side, role):
    """argv and extra environment of one side of a variant."""
    if side in ('c', 'c-headers'):
        return [os.path.join(OUT, 'raw_' + role)], {'RAW_HEADERS': '1'} if side == 'c-headers' else {}
    return ['lua5.4', os.path.join(tree_of(side), 'bench', 'lua_' + role + '.lua')], {}


def measure(server, client, queue, a, broker):
    env = dict(os.environ)
    sargv, senv = server
    srv = subprocess.Popen(sargv + [queue, str(a.inflight)], stdout=subprocess.PIPE, text=True,
                           env=dict(env, **senv))
    try:
        if srv.stdout.readline().strip() != 'ready':
            sys.exit('ab: the server did not start: ' + ' '.join(sargv))
        cargv, cenv = client
        run = subprocess.run(cargv + [queue, a.mode, str(a.inflight), '0.5s', '%gs' % a.seconds,
                                      str(srv.pid)] + ([broker] if broker else []),
                             capture_output=True, text=True, env=dict(env, **cenv))
        if run.returncode != 0:
            sys.exit('ab: the client failed: ' + run.stderr.strip())
        return json.loads(run.stdout.strip().splitlines()[-1])
    finally:
        srv.terminate()
        srv.wait()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--reps', type=int, default=8)
    p.add_argument('--seconds', type=float, default=3)
    p.add_argument('--inflight', type=int, default=1)
    p.add_argument('--mode', default='direct', choices=['direct', 'exclusive'])
    p.add_argument('variants', nargs='+', metavar='NAME=SERVER/CLIENT')
    a = p.parse_args()
    os.environ.setdefault('RPC_URL', 'amqp://guest:guest@localhost:5673/')
    variants = []
    for v in a.variants:
        name, _, pair = v.partition('=')
        server, _, client = pair.partition('/')
        if not (name and server and client):
            p.error('a variant is NAME=SERVER/CLIENT, got ' + v)
        variants.append((name, command(server, 'server'), command(client, 'client')))
    broker = broker_pid()
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
