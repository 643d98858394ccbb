#!/usr/bin/env bash
# rabbitrpc benchmark: raw C vs rabbitrpc vs pika, against the broker at env RPC_URL.
#   bench/run.sh [--reps N] [--seconds S] ...   the comparison; writes bench/RESULTS.md
#   bench/run.sh --million [N]                  N (1000000) calls in one rabbitrpc client
#   bench/run.sh --help                         every flag and its environment twin
# Needs the module built (make) and the broker up (scripts/broker.sh start): `make bench` does both.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
CC=${CC:-cc}
export RPC_URL=${RPC_URL:-amqp://guest:guest@localhost:5673/}

[ -f build/rpc/core.so ] || { echo "bench: build/rpc/core.so is missing: run make first" >&2; exit 1; }
[ -x /usr/bin/python3 ] && /usr/bin/python3 -c 'import pika' 2> /dev/null ||
  { echo "bench: Debian's /usr/bin/python3 with python3-pika is needed (scripts/deps.sh)" >&2; exit 1; }

# the raw C reference, rebuilt when its sources change
mkdir -p bench/out
for prog in raw_client raw_server; do
  if [ ! -x bench/out/$prog ] || [ bench/$prog.c -nt bench/out/$prog ] || [ bench/raw.h -nt bench/out/$prog ]; then
    $CC -O2 -std=c99 -Wall -Wextra -o bench/out/$prog bench/$prog.c -lrabbitmq -luuid
  fi
done

exec /usr/bin/python3 bench/bench.py "$@"
