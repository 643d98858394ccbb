#!/usr/bin/env bash
# make demo: the fib server in the background, the fib client for 30, then the server stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
export RPC_URL=${RPC_URL:-amqp://guest:guest@localhost:${RPC_BROKER_PORT:-5673}/}
LUA=${LUA:-lua5.4}
out=$(mktemp)
$LUA examples/fib_server.lua > "$out" 2>&1 &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null; cat "$out"; rm -f "$out"' EXIT
for _ in $(seq 100); do  # until the server has declared its queue (at most 10 s)
  grep -q "Awaiting" "$out" && break
  kill -0 $server 2>/dev/null || { echo "demo: the fib server exited"; exit 1; }
  sleep 0.1
done
$LUA examples/fib_client.lua 30
