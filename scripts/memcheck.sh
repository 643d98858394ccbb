#!/usr/bin/env bash
# make memcheck: valgrind over a call loop and the failure paths; fails on any definite leak or
# memory error. rabbitmq-c's frame pools show as "still reachable" until the connection is
# destroyed (rmqc#812); those are not counted.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v valgrind > /dev/null || { echo "memcheck: installing valgrind"; apt-get install -y -q valgrind > /dev/null; }
log=$(mktemp)
# rabbitmq-c sets OpenSSL up once per process and keeps it in its statics; lua_close unmaps the
# module's libraries, which would turn that into "definitely lost". Preloaded, it stays mapped.
rabbitmq=$(ldconfig -p | awk '/librabbitmq\.so\.4 / && !found {print $NF; found = 1}')  # reads to the end: pipefail
LD_PRELOAD=$rabbitmq valgrind --leak-check=full --show-leak-kinds=definite --errors-for-leak-kinds=definite \
  --error-exitcode=1 --log-file="$log" lua5.4 scripts/memcheck.lua "${1:-300}" || { cat "$log"; exit 1; }
grep -E "definitely lost|indirectly lost|ERROR SUMMARY" "$log"
rm -f "$log"
