"""rabbitrpc benchmark driver: raw C vs rabbitrpc vs pika, interleaved, medians over reps.

Run it through bench/run.sh (it compiles the raw C programs first) with Debian's /usr/bin/python3.
Each measurement is one server process and one client process on a fresh queue:
  server QUEUE PREFETCH                                  prints "ready", then {"served":N} on SIGTERM
  client QUEUE MODE INFLIGHT WARMUP MEASURE SERVER_PID [BROKER_PID]
                                                         prints one JSON line (see raw_client.c)
WARMUP and MEASURE are "2.5s" (seconds) or "1000" (calls).
The client samples its own, the server's and the broker's /proc at the start and end of its
measured phase; the broker's pid is found once (find_broker).
"""
import argparse
import datetime
import json
import os
import platform
import select
import signal
import statistics
import subprocess
import sys
import time
import urllib.parse

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
OUT = os.path.join(BENCH, 'out')
LUA = os.environ.get('LUA', 'lua5.4')
PYTHON = '/usr/bin/python3'   # Debian's, with python3-pika 1.2; not whatever python3 is on PATH
MARKER = '<!-- million -->'   # RESULTS.md: the main part before it, the million-call run after

STACKS = {   # name: (server command, client command[, server arguments after QUEUE PREFETCH
             # [, environment for both]])
    'c': ([os.path.join(OUT, 'raw_server')], [os.path.join(OUT, 'raw_client')]),
    # the same server acking with multiple = true, as a library can: raw_server.c
    'c-batched': ([os.path.join(OUT, 'raw_server')], [os.path.join(OUT, 'raw_client')], ['batched']),
    # the naive loop sending the headers rabbitrpc's requests and replies carry: raw.h
    'c-headers': ([os.path.join(OUT, 'raw_server')], [os.path.join(OUT, 'raw_client')], [],
                  {'RAW_HEADERS': '1'}),
    'rabbitrpc': ([LUA, os.path.join(BENCH, 'lua_server.lua')],
                  [LUA, os.path.join(BENCH, 'lua_client.lua')]),
    'pika': ([PYTHON, os.path.join(BENCH, 'pika_server.py')],
             [PYTHON, os.path.join(BENCH, 'pika_client.py')]),
}
# what is measured, in order; pika only as the tutorial does it (an exclusive reply queue)
CONFIGS = [('c', 'direct'), ('c-batched', 'direct'), ('c-headers', 'direct'), ('rabbitrpc', 'direct'),
           ('c', 'exclusive'), ('c-batched', 'exclusive'), ('c-headers', 'exclusive'),
           ('rabbitrpc', 'exclusive'), ('pika', 'exclusive')]


def env_default(name, default, kind=str):
    value = os.environ.get(name)
    return kind(value) if value not in (None, '') else default


def parse_args():
    p = argparse.ArgumentParser(
        prog='bench/run.sh',
        description='Benchmarks raw C (naive and batched acks), rabbitrpc and pika request-reply '
                    'against the broker at env RPC_URL. Every flag has an environment twin (in brackets).')
    p.add_argument('--reps', type=int, default=env_default('BENCH_REPS', 3, int),
                   help='interleaved repetitions, medians over them [BENCH_REPS] (3)')
    p.add_argument('--seconds', type=float, default=env_default('BENCH_SECONDS', 3.0, float),
                   help='measured seconds per measurement [BENCH_SECONDS] (3)')
    p.add_argument('--calls', type=int, default=env_default('BENCH_CALLS', 0, int),
                   help='measure a fixed number of calls instead of seconds [BENCH_CALLS]')
    p.add_argument('--warmup', type=float, default=env_default('BENCH_WARMUP', 0.5, float),
                   help='warm-up seconds before each measurement [BENCH_WARMUP] (0.5)')
    p.add_argument('--inflight', default=env_default('BENCH_INFLIGHT', '1,10,100'),
                   help='in-flight counts; 1 is sequential calls [BENCH_INFLIGHT] (1,10,100)')
    p.add_argument('--stacks', default=env_default('BENCH_STACKS', 'c,c-batched,c-headers,rabbitrpc,pika'),
                   help='stacks to run [BENCH_STACKS] (c,c-batched,c-headers,rabbitrpc,pika)')
    p.add_argument('--modes', default=env_default('BENCH_MODES', 'direct,exclusive'),
                   help='reply modes to run [BENCH_MODES] (direct,exclusive)')
    p.add_argument('--broker-pid', type=int, default=env_default('BENCH_BROKER_PID', 0, int),
                   help="the broker's process (beam.smp) for its CPU [BENCH_BROKER_PID] (found: "
                        "scripts/broker.sh's pid file for RPC_URL's port, else the process "
                        "listening on that port)")
    p.add_argument('--results', default=env_default('BENCH_RESULTS', os.path.join(BENCH, 'RESULTS.md')),
                   help='markdown file to write; "-" for none [BENCH_RESULTS] (bench/RESULTS.md)')
    p.add_argument('--million', nargs='?', type=int, const=env_default('BENCH_MILLION_CALLS', 1000000, int),
                   metavar='N', help='instead: N calls (default 1000000 [BENCH_MILLION_CALLS]) in '
                   'one rabbitrpc client process, pipelined, reporting its RSS after warm-up and at the end')
    p.add_argument('--million-inflight', type=int, default=env_default('BENCH_MILLION_INFLIGHT', 100, int),
                   help='in flight for --million [BENCH_MILLION_INFLIGHT] (100)')
    p.add_argument('--million-mode', default=env_default('BENCH_MILLION_MODE', 'direct'),
                   help='reply mode for --million [BENCH_MILLION_MODE] (direct)')
    p.add_argument('--million-warmup', type=float, default=env_default('BENCH_MILLION_WARMUP', 2.0, float),
                   help='warm-up seconds for --million [BENCH_MILLION_WARMUP] (2)')
    a = p.parse_args()
    a.inflight = [int(k) for k in a.inflight.split(',')]
    a.stacks = a.stacks.split(',')
    a.modes = a.modes.split(',')
    a.measure = str(a.calls) if a.calls > 0 else f'{a.seconds:g}s'
    for s in a.stacks:
        if s not in STACKS:
            p.error(f'unknown stack {s!r} ({", ".join(STACKS)})')
    return a


# ---- one measurement ----

def child_env():
    env = dict(os.environ)
    env.setdefault('RPC_URL', 'amqp://guest:guest@localhost:5673/')
    env['BENCH_CLK_TCK'] = str(os.sysconf('SC_CLK_TCK'))
    return env


# ---- the broker's process, for its CPU ----

def is_process(pid):
    return os.path.exists(f'/proc/{pid}/stat')


def process_name(pid):
    try:
        with open(f'/proc/{pid}/comm') as f:
            return f.read().strip()
    except OSError:
        return '?'


def listening_pid(port):
    """The process listening on TCP port (this network namespace), or None."""
    inodes = set()
    for table in ('/proc/net/tcp', '/proc/net/tcp6'):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    fields = line.split()   # sl local_address rem_address st ... uid timeout inode
                    if fields[3] == '0A' and int(fields[1].rsplit(':', 1)[1], 16) == port:
                        inodes.add(f'socket:[{fields[9]}]')
        except OSError:
            pass
    if not inodes:
        return None
    for pid in filter(str.isdigit, os.listdir('/proc')):
        try:
            fds = os.listdir(f'/proc/{pid}/fd')
        except OSError:   # gone, or not ours to read
            continue
        for fd in fds:
            try:
                if os.readlink(f'/proc/{pid}/fd/{fd}') in inodes:
                    return int(pid)
            except OSError:
                pass
    return None


def find_broker(a):
    """(pid, how it was found) of the broker at RPC_URL, or (None, why not): its CPU is read
    from /proc/PID/stat, which sums all the threads of the process (beam.smp)."""
    if a.broker_pid:
        if not is_process(a.broker_pid):
            return None, f'--broker-pid {a.broker_pid}: no such process'
        return a.broker_pid, 'given'
    url = urllib.parse.urlsplit(child_env()['RPC_URL'])
    port = url.port or (5671 if url.scheme == 'amqps' else 5672)
    if url.hostname not in ('localhost', '127.0.0.1', '::1'):
        return None, f'{url.hostname} is not this machine (give --broker-pid)'
    # scripts/broker.sh: node rabbitrpc@localhost on port 5673, rabbitrpc-PORT@localhost on
    # another, its pid file (the beam.smp's pid) in its state folder
    node = os.environ.get('RPC_BROKER_NODE') or \
        ('rabbitrpc@localhost' if port == 5673 else f'rabbitrpc-{port}@localhost')
    node += '' if '@' in node else '@localhost'
    pidfile = os.path.join(os.environ.get('RPC_BROKER_DIR') or os.path.join(ROOT, '.broker'), node + '.pid')
    try:
        with open(pidfile) as f:
            pid = int(f.read().strip())
        if is_process(pid) and process_name(pid) == 'beam.smp':
            shown = os.path.relpath(pidfile, ROOT) if pidfile.startswith(ROOT + os.sep) else pidfile
            return pid, f'pid file {shown}'
    except (OSError, ValueError):
        pass
    pid = listening_pid(port)
    if pid:
        return pid, f'listening on port {port}'
    return None, f'no pid file {pidfile} and no process of ours listening on port {port} (give --broker-pid)'


queue_count = 0


def start_server(cmd, env):
    """The server process once it prints "ready", or None and why not."""
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env, cwd=ROOT)
    ready, _, _ = select.select([server.stdout], [], [], 30)
    if ready and server.stdout.readline().strip() == 'ready':
        return server, None
    server.kill()
    return None, server.communicate()[1].strip()[-300:]


def stop_server(server):
    """SIGTERM, then its count of requests served, or None and what went wrong."""
    server.send_signal(signal.SIGTERM)
    try:
        out, err = server.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        server.kill()
        server.communicate()
        return None, 'ignored SIGTERM for 10 s'
    if server.returncode != 0:
        return None, f'exited with {server.returncode}: {err.strip()[-200:]}'
    try:
        return json.loads(out.strip().splitlines()[-1])['served'], None
    except (ValueError, IndexError, KeyError):
        return None, f'printed no count: {err.strip()[-200:]}'


def run_client(cmd, env, timeout):
    """The client's JSON line as a dict, or {'error': why}."""
    try:
        client = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {'error': f'client still running after {timeout:.0f} s'}
    lines = client.stdout.strip().splitlines()
    if client.returncode != 0 or not lines:
        return {'error': f'client failed ({client.returncode}): {client.stderr.strip()[-300:]}'}
    try:
        return json.loads(lines[-1])
    except ValueError:
        return {'error': f'client printed {lines[-1][:200]!r}'}


def measure(stack, mode, inflight, warmup, how_much, timeout, broker_pid=None):
    """One server and one client on a fresh queue: the client's JSON plus 'served', or 'error'."""
    global queue_count
    queue_count += 1
    queue = f'bench-{os.getpid()}-{queue_count}'
    server_cmd, client_cmd, *rest = STACKS[stack]
    env = child_env()
    server_args = rest[0] if rest else []
    env.update(rest[1] if len(rest) > 1 else {})
    server, why = start_server(server_cmd + [queue, str(inflight)] + server_args, env)
    if not server:
        return {'error': f'{stack} server did not start: {why}'}
    try:
        result = run_client(client_cmd + [queue, mode, str(inflight), f'{warmup:g}s', how_much,
                                          str(server.pid)] + ([str(broker_pid)] if broker_pid else []),
                            env, timeout)
    finally:   # also on Ctrl-C
        served, problem = stop_server(server)
    if 'error' in result:
        result['error'] = f"{stack} {result['error']}"
    elif problem:
        result['warning'] = f'{stack} server {problem}'
    elif 'calls' in result and served < result['calls'] + result['warmup_calls']:
        result['warning'] = f'{stack} server served {served}, fewer than the client completed'
    result['served'] = served
    return result


def describe(r):
    if 'error' in r:
        return 'FAILED: ' + r['error']
    if 'skipped' in r:
        return 'skipped: ' + r['skipped']
    text = f"{r['rate']:9,.0f} calls/s  client {r['client_cpu']:.2f} s  server {r['server_cpu']:.2f} s"
    if r.get('broker_cpu') is not None:
        text += f"  broker {r['broker_cpu']:.2f} s"
    text += (f"  RSS {r['client_rss_kb'] / 1024:.1f}/{r['server_rss_kb'] / 1024:.1f} MB")
    if r['p50_us']:
        text += f"  p50 {r['p50_us']:.0f} µs  p99 {r['p99_us']:.0f} µs"
    if r.get('warning'):
        text += '  WARNING: ' + r['warning']
    return text


# ---- machine and versions ----

def run_text(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ''


def machine():
    model = ''
    with open('/proc/cpuinfo') as f:
        for line in f:
            if line.startswith('model name'):
                model = line.split(':', 1)[1].strip()
                break
    broker = ''
    try:
        import pika
        conn = pika.BlockingConnection(pika.URLParameters(child_env()['RPC_URL']))
        version = conn._impl.server_properties.get('version', '')
        broker = version.decode() if isinstance(version, bytes) else str(version)
        conn.close()
    except Exception as e:   # the report still gets the package version
        broker = f'unknown ({e.__class__.__name__})'
    otp = run_text(['sh', '-c', 'cat /usr/lib/erlang/releases/*/OTP_VERSION'])
    pkg = lambda name: run_text(['dpkg-query', '-W', '-f=${Version}', name]) or 'not installed'
    return {
        'date': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
        'nproc': os.cpu_count(),
        'cpu': model,
        'kernel': platform.release(),
        'rabbitmq': f"{broker} (Debian rabbitmq-server {pkg('rabbitmq-server')}, Erlang/OTP {otp})",
        'rabbitmq_c': f"{pkg('librabbitmq4')} (Debian librabbitmq4)",
        'lua': run_text([LUA, '-v']).split('  ')[0],
        'pika': f"{pkg('python3-pika')} ({run_text([PYTHON, '--version'])})",
        'commit': run_text(['git', '-C', ROOT, 'describe', '--always', '--dirty']),
    }


def machine_lines(m):
    return [f"- date: {m['date']}, commit {m['commit']}",
            f"- machine: {m['nproc']} CPUs ({m['cpu']}), kernel {m['kernel']}",
            f"- RabbitMQ {m['rabbitmq']}; rabbitmq-c {m['rabbitmq_c']}",
            f"- {m['lua']}; pika {m['pika']}"]


# ---- the table ----

def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(v, spec='{:,.0f}'):
    return '–' if v is None else spec.format(v)


def summarize(results, reps, inflights):
    """results[(stack, mode, inflight)] = list over reps (None where it failed)."""
    def ok(r):
        return r is not None and 'rate' in r

    def per_rep(stack, mode, k, f):
        return [f(r) if ok(r) else None for r in results.get((stack, mode, k), [None] * reps)]

    def ratio(stack, mode, k, base='c'):   # median over reps of (stack / base, same mode, same rep)
        mine = per_rep(stack, mode, k, lambda r: r['rate'])
        theirs = per_rep(base, mode, k, lambda r: r['rate'])
        return median([a / b for a, b in zip(mine, theirs) if a and b])

    def cpu10k(stack, mode, k, *sides):   # the sides' CPU summed, s per 10,000 calls
        def one(r):
            cpu = [r.get(side + '_cpu') for side in sides]
            return None if None in cpu else sum(cpu) / r['calls'] * 1e4
        return median(per_rep(stack, mode, k, one))

    # peak over the pipelined phases (the sequential one also holds the clients' latency
    # samples, up to a few hundred kB in Lua and Python), median over reps
    rss_phases = [k for k in inflights if k > 1] or inflights

    def rss_mb(stack, mode, side):
        peaks = []
        for rep in range(reps):
            seen = [results[(stack, mode, k)][rep][side + '_rss_kb'] for k in rss_phases
                    if (stack, mode, k) in results and ok(results[(stack, mode, k)][rep])]
            peaks.append(max(seen) / 1024 if seen else None)
        return median(peaks)

    configs = sorted({(s, m) for s, m, _ in results}, key=lambda c: CONFIGS.index(c))
    batched = any(s == 'c-batched' for s, _ in configs)   # the "ratio to batched C" columns
    headers = any(s == 'c-headers' for s, _ in configs)   # the "ratio to C with headers" ones
    seq = 1 if 1 in inflights else None
    big = max(inflights) if max(inflights) > 1 else None
    mid = sorted(inflights)[len(inflights) // 2] if len(inflights) > 2 else None
    head = ['stack', 'mode']
    if seq:
        head += ['seq calls/s', 'p50 µs', 'p99 µs']
    if mid:
        head += [f'{mid} in flight/s']
    if big:
        head += [f'{big} in flight/s']
    cpu_k = seq or big
    cpu_ks = [k for k in (seq, big) if k]   # client+server and broker CPU: seq and the most in flight
    label = lambda k: 'seq' if k == 1 else str(k)
    head += [f'client CPU s/10k ({label(cpu_k)})', f'server CPU s/10k ({label(cpu_k)})']
    head += [f'client+server CPU s/10k ({label(k)})' for k in cpu_ks]
    head += [f'broker CPU s/10k ({label(k)})' for k in cpu_ks]
    head += ['client RSS MB', 'server RSS MB']
    if seq:
        head += ['ratio seq']
    if big:
        head += [f'ratio {big}']
    if batched:
        head += [f'ratio to batched C {label(k)}' for k in cpu_ks]
    if headers:
        head += [f'ratio to C with headers {label(k)}' for k in cpu_ks]
    rows = []
    for stack, mode in configs:
        rate = lambda k: median(per_rep(stack, mode, k, lambda r: r['rate']))
        row = [stack, mode]
        if seq:
            row += [fmt(rate(1)), fmt(median(per_rep(stack, mode, 1, lambda r: r['p50_us']))),
                    fmt(median(per_rep(stack, mode, 1, lambda r: r['p99_us'])))]
        if mid:
            row += [fmt(rate(mid))]
        if big:
            row += [fmt(rate(big))]
        row += [fmt(cpu10k(stack, mode, cpu_k, 'client'), '{:.2f}'),
                fmt(cpu10k(stack, mode, cpu_k, 'server'), '{:.2f}')]
        row += [fmt(cpu10k(stack, mode, k, 'client', 'server'), '{:.2f}') for k in cpu_ks]
        row += [fmt(cpu10k(stack, mode, k, 'broker'), '{:.2f}') for k in cpu_ks]
        row += [fmt(rss_mb(stack, mode, 'client'), '{:.1f}'), fmt(rss_mb(stack, mode, 'server'), '{:.1f}')]
        if seq:
            row += [fmt(ratio(stack, mode, 1), '{:.2f}')]
        if big:
            row += [fmt(ratio(stack, mode, big), '{:.2f}')]
        if batched:
            row += [fmt(ratio(stack, mode, k, 'c-batched'), '{:.2f}') for k in cpu_ks]
        if headers:
            row += [fmt(ratio(stack, mode, k, 'c-headers'), '{:.2f}') for k in cpu_ks]
        rows.append(row)
    main = markdown_table(head, rows)

    head = ['stack', 'mode', 'in flight', 'calls/s (median)', 'min – max', 'ratio to C']
    head += ['ratio to batched C'] if batched else []
    head += ['ratio to C with headers'] if headers else []
    head += ['client CPU s/10k', 'server CPU s/10k', 'client+server CPU s/10k', 'broker CPU s/10k',
             'client RSS MB', 'server RSS MB']
    rows = []
    for k in inflights:
        for stack, mode in configs:
            rates = [v for v in per_rep(stack, mode, k, lambda r: r['rate']) if v]
            skipped = [r['skipped'] for r in results.get((stack, mode, k), []) if r and 'skipped' in r]
            if not rates and skipped:
                rows.append([stack, mode, str(k), 'skipped: ' + skipped[0]] + [''] * (len(head) - 4))
                continue
            rows.append([stack, mode, str(k), fmt(median(rates)),
                         f'{fmt(min(rates) if rates else None)} – {fmt(max(rates) if rates else None)}',
                         fmt(ratio(stack, mode, k), '{:.2f}')] +
                        ([fmt(ratio(stack, mode, k, 'c-batched'), '{:.2f}')] if batched else []) +
                        ([fmt(ratio(stack, mode, k, 'c-headers'), '{:.2f}')] if headers else []) +
                        [fmt(cpu10k(stack, mode, k, 'client'), '{:.2f}'),
                         fmt(cpu10k(stack, mode, k, 'server'), '{:.2f}'),
                         fmt(cpu10k(stack, mode, k, 'client', 'server'), '{:.2f}'),
                         fmt(cpu10k(stack, mode, k, 'broker'), '{:.2f}'),
                         fmt(median(per_rep(stack, mode, k, lambda r: r['client_rss_kb'] / 1024)), '{:.1f}'),
                         fmt(median(per_rep(stack, mode, k, lambda r: r['server_rss_kb'] / 1024)), '{:.1f}')])
    return main, markdown_table(head, rows)


def markdown_table(head, rows):
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '|'.join('---' for _ in head) + '|']
    lines += ['| ' + ' | '.join(row) + ' |' for row in rows]
    return '\n'.join(lines)


def write_results(path, part, text):
    """Rewrites one part of RESULTS.md (main or million), keeping the other."""
    if path == '-':
        return
    main, million = '# rabbitrpc benchmark\n', ''
    if os.path.exists(path):
        with open(path) as f:
            old = f.read()
        main, _, million = old.partition(MARKER)
    if part == 'main':
        main = text
    else:
        million = '\n' + text
    with open(path, 'w') as f:
        f.write(main.rstrip('\n') + '\n\n' + MARKER + '\n' + million.lstrip('\n'))
    print(f'written to {path}')


# ---- the two runs ----

def bench(a):
    m = machine()
    results = {}
    total = a.reps * len(a.inflight) * len([c for c in CONFIGS if c[0] in a.stacks and c[1] in a.modes])
    timeout = a.warmup + (a.seconds if a.calls <= 0 else a.calls / 100) + 60
    print(f'{total} measurements: {a.reps} reps x in flight {a.inflight} x {a.stacks} x {a.modes}; '
          f'warm-up {a.warmup} s, then {a.measure}; broker {child_env()["RPC_URL"]}', flush=True)
    broker_pid, how = find_broker(a)
    broker_line = (f'pid {broker_pid} ({process_name(broker_pid)}, {how})' if broker_pid
                   else f'unknown: {how}')
    print(f'broker process for its CPU: {broker_line}', flush=True)
    began, n, failures = time.monotonic(), 0, 0
    for rep in range(a.reps):
        # C and the others at one in-flight count back to back, in reverse order every other
        # rep, so that none always runs first after a change of load
        order = CONFIGS if rep % 2 == 0 else CONFIGS[::-1]
        for k in a.inflight:
            for stack, mode in order:
                if stack not in a.stacks or mode not in a.modes:
                    continue
                n += 1
                r = measure(stack, mode, k, a.warmup, a.measure, timeout, broker_pid)
                failures += 'error' in r
                results.setdefault((stack, mode, k), [None] * a.reps)[rep] = r
                print(f'[{n}/{total}] rep {rep + 1} {stack:9} {mode:9} {k:3} in flight: {describe(r)}',
                      flush=True)
    elapsed = time.monotonic() - began
    main, detail = summarize(results, a.reps, a.inflight)
    amount = f'{a.calls:,} calls' if a.calls > 0 else f'{a.seconds:g} s'
    raw = os.path.join(OUT, 'bench-' + time.strftime('%Y%m%d-%H%M%S') + '.json')
    with open(raw, 'w') as f:
        json.dump({'machine': m, 'args': vars(a),
                   'results': [{'stack': s, 'mode': md, 'inflight': k, 'reps': v}
                               for (s, md, k), v in results.items()]}, f, indent=1)
    text = '\n'.join([
        '# rabbitrpc benchmark', '',
        'Written by `make bench` (`bench/run.sh`); every figure is the median over the repetitions '
        'of one run, which interleaves the stacks. Ratios are medians of the per-repetition ratios '
        'to raw C in the same reply mode (pika, tutorial style, to raw C exclusive): "ratio" to '
        'naive raw C (`c`: one basic.ack per request), "ratio to batched C" to raw C acking as a '
        'library can (`c-batched`: one basic.ack with multiple = true once its read buffer is '
        'empty or half the prefetch is unacked), "ratio to C with headers" to the naive loop '
        'sending the two headers rabbitrpc adds (`c-headers`: x-rpc-deadline on each request, '
        'x-rpc-handler-time on each reply: the broker decodes them, and with direct reply-to '
        're-encodes the request\'s), so the cost of the protocol and that of the library show apart.', '',
        *machine_lines(m),
        f'- {a.reps} repetition(s); per measurement {a.warmup:g} s warm-up, then {amount}',
        f'- workload: 16-byte echo body, one client process and one server process, server prefetch '
        f'= in flight; the server acks after publishing the reply. Run took {elapsed:.0f} s; '
        f'raw data {os.path.relpath(raw, ROOT)} (not committed)',
        f'- broker process: {broker_line if broker_pid else "unknown (" + how + "): no broker CPU"}',
        '', main, '',
        'seq: one call at a time (`client:call`); p50/p99: its latency. N in flight: a ring of N '
        '`send`s, each `wait` for the oldest followed by one more `send`. CPU: utime+stime of '
        'each process over the measured phase, per 10,000 calls; client+server: the two summed; '
        'broker: the RabbitMQ node (beam.smp, all its threads, including its own background work) '
        'over the same phase. RSS: peak (VmHWM) of each process, '
        'highest over the pipelined runs (in the sequential ones the clients also hold their '
        'latency samples).', '',
        '## Each in-flight count', '', detail, '',
        'CPU and RSS here are those of the run itself (RSS: VmHWM of that process; in the '
        'sequential runs the client also holds one latency sample per call).', ''])
    print()
    print(main)
    print()
    print(detail)
    write_results(a.results, 'main', text)
    if failures:
        print(f'{failures} measurement(s) failed', file=sys.stderr)
        return 1
    return 0


def million(a):
    m = machine()
    print(f'{a.million:,} calls in one rabbitrpc client process ({a.million_inflight} in flight, '
          f'reply_to {a.million_mode}, {a.million_warmup:g} s warm-up) against a rabbitrpc server',
          flush=True)
    broker_pid, how = find_broker(a)
    if not broker_pid:
        print(f'broker process unknown ({how}): no broker CPU', flush=True)
    began = time.monotonic()
    r = measure('rabbitrpc', a.million_mode, a.million_inflight, a.million_warmup, str(a.million),
                a.million_warmup + a.million / 1000 + 60, broker_pid)
    elapsed = time.monotonic() - began
    if 'rate' not in r:
        print(describe(r), file=sys.stderr)
        return 1
    mb = lambda kb: kb / 1024
    # VmRSS and VmHWM are read from per-CPU counters (tens of kB apart): the peak is the largest
    peak = max(r['client_rss_kb'], r['rss_warm_kb'], r['rss_end_kb'])
    lines = [
        f"- client RSS after warm-up ({r['warmup_calls']:,} calls): {mb(r['rss_warm_kb']):.2f} MB; "
        f"after {r['calls']:,} more calls: {mb(r['rss_end_kb']):.2f} MB "
        f"(growth {r['rss_end_kb'] - r['rss_warm_kb']:+,} kB); peak {mb(peak):.2f} MB",
        f"- client Lua heap (collectgarbage 'count'): {r['lua_kb_warm']:,.0f} kB after warm-up, "
        f"{r['lua_kb_end']:,.0f} kB at the end",
        f"- server peak RSS {mb(r['server_rss_kb']):.2f} MB; {r['rate']:,.0f} calls/s; client CPU "
        f"{r['client_cpu'] / r['calls'] * 1e4:.2f} s/10k, server {r['server_cpu'] / r['calls'] * 1e4:.2f} s/10k"
        + (f", broker {r['broker_cpu'] / r['calls'] * 1e4:.2f} s/10k" if r.get('broker_cpu') is not None else '')
        + f"; discarded replies {r['discarded']}; took {elapsed:.0f} s",
    ]
    if r.get('warning'):
        lines.append('- WARNING: ' + r['warning'])
    text = '\n'.join([
        f"## {a.million:,} calls in one client process", '',
        f'Written by `bench/run.sh --million {a.million}`: one rabbitrpc client process, '
        f'{a.million_inflight} in flight (`send`/`wait`), reply_to {a.million_mode}, against a '
        f'rabbitrpc server with prefetch {a.million_inflight}.', '',
        *machine_lines(m), '', *lines, ''])
    print('\n'.join(lines))
    write_results(a.results, 'million', text)
    return 0


def main():
    a = parse_args()
    os.makedirs(OUT, exist_ok=True)
    sys.exit(million(a) if a.million else bench(a))


if __name__ == '__main__':
    main()
