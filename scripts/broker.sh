#!/usr/bin/env bash
# A private RabbitMQ node for rabbitrpc's tests and demo, from Debian's rabbitmq-server: its own
# node name, ports, cookie, config and state folder, so it never touches another broker.
#   scripts/broker.sh start|stop|status|url|ctl ARGS...
# The rock installs it as the command rabbitrpc-broker (same commands and settings).
# Settings (environment):
#   RPC_BROKER_PORT       AMQP port, on loopback                 (5673)
#   RPC_BROKER_DIST_PORT  Erlang distribution port, on loopback  (AMQP port + 20000)
#   RPC_BROKER_NODE       node name    (rabbitrpc@localhost; rabbitrpc-PORT@localhost off 5673)
#   RPC_BROKER_DIR        state folder: cookie, config, data, logs, pid file
#                         (<project>/.broker in a checkout; installed: ./.rabbitrpc-broker)
#   RPC_BROKER_TLS_PORT   optional: a TLS (amqps) listener on this port, on loopback   (none)
#   RPC_BROKER_TLS_DIR    with it: the folder holding ca.pem, server.pem and server.key
#                         (spec/support/make_certs.sh makes them); clients' certificates are
#                         checked against ca.pem when they send one, but not required
# Works as root in a bare chroot: no systemd, no hostname, no "localhost" in /etc/hosts needed.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# In a checkout this file is <project>/scripts/broker.sh; installed (rabbitrpc-broker in a tree's
# bin/) there is no project: the state goes where the user runs it, not into the tree.
if [ "$root/scripts/broker.sh" -ef "${BASH_SOURCE[0]}" ]; then default_dir=$root/.broker
else default_dir=$PWD/.rabbitrpc-broker; fi
PORT=${RPC_BROKER_PORT:-5673}
DIST_PORT=${RPC_BROKER_DIST_PORT:-$((PORT + 20000))}
if [ "$PORT" = 5673 ]; then NODE=${RPC_BROKER_NODE:-rabbitrpc@localhost}
else NODE=${RPC_BROKER_NODE:-rabbitrpc-$PORT@localhost}; fi
DIR=${RPC_BROKER_DIR:-$default_dir}
SBIN=/usr/lib/rabbitmq/bin      # the real scripts; /usr/sbin's wrappers su to the rabbitmq user
BOOT_TIMEOUT=60

die() { echo "broker: $*" >&2; exit 1; }
[[ $PORT =~ ^[0-9]+$ && $DIST_PORT =~ ^[0-9]+$ ]] || die "RPC_BROKER_PORT and RPC_BROKER_DIST_PORT must be numbers"
[[ $NODE == *@* ]] || NODE=$NODE@localhost
TLS_PORT=${RPC_BROKER_TLS_PORT:-}
TLS_DIR=${RPC_BROKER_TLS_DIR:-}
[[ -z $TLS_PORT || $TLS_PORT =~ ^[0-9]+$ ]] || die "RPC_BROKER_TLS_PORT must be a number"
url() { echo "amqp://guest:guest@localhost:$PORT/"; }
case ${1:-} in
  start|stop|status|ctl) ;;
  url) url; exit 0 ;;   # needs neither the broker nor a state folder
  *) echo "usage: $0 start|stop|status|url|ctl ARGS..." >&2; exit 2 ;;
esac
[ -x "$SBIN/rabbitmq-server" ] ||
  die "rabbitmq-server is not installed (Debian: apt-get install rabbitmq-server; a checkout: scripts/deps.sh)"
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
PIDFILE=$DIR/$NODE.pid
LOG=$DIR/log/$NODE.log

# Everything the node and rabbitmqctl read comes from here, not from /etc/rabbitmq or ~.
export HOME=$DIR                                  # the Erlang cookie: $DIR/.erlang.cookie
export LANG=C.UTF-8 LC_ALL=C.UTF-8                # else the Elixir CLI warns about latin1
export RABBITMQ_NODENAME=$NODE RABBITMQ_USE_LONGNAME=false
export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 RABBITMQ_NODE_PORT=$PORT RABBITMQ_DIST_PORT=$DIST_PORT
export RABBITMQ_MNESIA_BASE=$DIR/mnesia RABBITMQ_LOG_BASE=$DIR/log RABBITMQ_PID_FILE=$PIDFILE
export RABBITMQ_CONFIG_FILE=$DIR/rabbitmq.conf RABBITMQ_CONFIG_FILES=$DIR/conf.d
export RABBITMQ_ADVANCED_CONFIG_FILE=$DIR/advanced.config RABBITMQ_CONF_ENV_FILE=$DIR/rabbitmq-env.conf
export RABBITMQ_ENABLED_PLUGINS_FILE=$DIR/enabled_plugins
export RABBITMQ_ALLOW_INPUT=true                  # exec erl directly: no signal-proxy shell, no systemd
export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
export ERL_CRASH_DUMP=$DIR/erl_crash.dump
# "localhost" for Erlang without /etc/hosts (a fresh debootstrap has none): the node's host part
# and rabbitmqctl's connection to it resolve from this file first.
export ERL_INETRC=$DIR/inetrc
unset NOTIFY_SOCKET RABBITMQ_LOGS ERL_EPMD_PORT

ctl() { "$SBIN/rabbitmqctl" -n "$NODE" "$@" 9>&-; }   # 9: the start/stop lock, kept to ourselves

write_files() {
  mkdir -p "$DIR/mnesia" "$DIR/log" "$DIR/conf.d"
  if [ ! -s "$DIR/.erlang.cookie" ]; then   # made before either side starts: no cookie race
    local b cookie='' letters=ABCDEFGHIJKLMNOPQRSTUVWXYZ
    for b in $(od -An -N20 -tu1 /dev/urandom); do cookie+=${letters:b % 26:1}; done
    (umask 077; echo -n "$cookie" > "$DIR/.erlang.cookie")
    chmod 400 "$DIR/.erlang.cookie"
  fi
  printf '%s\n' '{host, {127,0,0,1}, ["localhost"]}.' '{lookup, [file, native]}.' > "$ERL_INETRC"
  echo '[].' > "$RABBITMQ_ENABLED_PLUGINS_FILE"
  echo '# empty: the settings come from scripts/broker.sh, not /etc/rabbitmq/rabbitmq-env.conf' \
    > "$RABBITMQ_CONF_ENV_FILE"
  {
    echo "# written by scripts/broker.sh on each start"
    echo "listeners.tcp.1 = 127.0.0.1:$PORT"
    # ::1 too when loopback has it, so a "localhost" that resolves to ::1 first connects at once
    grep -qs '^0\{31\}1 .* lo$' /proc/net/if_inet6 && echo "listeners.tcp.2 = ::1:$PORT"
    echo "loopback_users.guest = true"
    echo "disk_free_limit.absolute = 50MB"
    echo "log.console = false"
    echo "log.file.level = info"
    [ -z "$TLS_PORT" ] || tls_settings
  } > "$RABBITMQ_CONFIG_FILE"
}

# The amqps listener: the server's certificate, and a client's checked against the same CA when
# it sends one (verify_peer), without requiring one (fail_if_no_peer_cert = false). TLS 1.2+.
tls_settings() {
  echo "listeners.ssl.1 = 127.0.0.1:$TLS_PORT"
  grep -qs '^0\{31\}1 .* lo$' /proc/net/if_inet6 && echo "listeners.ssl.2 = ::1:$TLS_PORT"
  echo "ssl_options.cacertfile = $TLS_DIR/ca.pem"
  echo "ssl_options.certfile = $TLS_DIR/server.pem"
  echo "ssl_options.keyfile = $TLS_DIR/server.key"
  echo "ssl_options.verify = verify_peer"
  echo "ssl_options.fail_if_no_peer_cert = false"
  echo "ssl_options.versions.1 = tlsv1.3"
  echo "ssl_options.versions.2 = tlsv1.2"
}

# The pid of our node if it is running: the pid file's process is a beam whose home is $DIR.
node_pid() {
  local pid
  [ -s "$PIDFILE" ] || return 1
  pid=$(< "$PIDFILE")
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  tr '\0' '\n' < "/proc/$pid/cmdline" 2> /dev/null | grep -qxF -- "$DIR" || return 1
  echo "$pid"
}

port_open() { timeout 2 bash -c "exec 3<> /dev/tcp/127.0.0.1/$1" 2> /dev/null; }
epmd_up() { epmd -names > /dev/null 2>&1; }

show_log() {
  echo "broker: last lines of $LOG:" >&2
  tail -n 25 "$LOG" >&2 2> /dev/null || echo "(no log)" >&2
  [ -s "$ERL_CRASH_DUMP" ] && { echo "broker: $ERL_CRASH_DUMP:" >&2; head -n 3 "$ERL_CRASH_DUMP" >&2; }
  return 0
}

kill_node() { # PID: TERM, then KILL after 15 s
  local pid=$1
  kill -TERM "$pid" 2> /dev/null || return 0
  for _ in $(seq 150); do [ -d "/proc/$pid" ] || return 0; sleep 0.1; done
  kill -KILL "$pid" 2> /dev/null || true
}

check_tls_dir() { # start only: stop, status and ctl do not need the files
  local f
  [ -n "$TLS_DIR" ] || die "RPC_BROKER_TLS_PORT needs RPC_BROKER_TLS_DIR (a folder with ca.pem, server.pem, server.key)"
  for f in ca.pem server.pem server.key; do
    [ -r "$TLS_DIR/$f" ] || die "RPC_BROKER_TLS_DIR: cannot read $TLS_DIR/$f"
  done
  TLS_DIR=$(cd "$TLS_DIR" && pwd)
}

start() {
  local pid t0
  [ -z "$TLS_PORT" ] || check_tls_dir
  write_files
  if pid=$(node_pid); then
    if port_open "$PORT" && ctl -q await_startup --timeout 30 > /dev/null 2>&1; then
      echo "broker: $NODE already running (pid $pid), $(url)"
      return 0
    elif ctl -q start_app > /dev/null 2>&1 && port_open "$PORT"; then   # left by a stop_app
      echo "broker: $NODE was running with its app stopped: app started (pid $pid), $(url)"
      return 0
    fi
    echo "broker: $NODE (pid $pid) does not answer: restarting it" >&2
    kill_node "$pid"
  fi
  port_open "$PORT" && die "port $PORT on 127.0.0.1 is in use by something else (not $NODE of $DIR);" \
    "stop it or choose another port: RPC_BROKER_PORT=5680 $0 start (make BROKER_PORT=5680 ...)"
  port_open "$DIST_PORT" && die "distribution port $DIST_PORT is in use by something else; set RPC_BROKER_DIST_PORT"
  [ -n "$TLS_PORT" ] && port_open "$TLS_PORT" && die "TLS port $TLS_PORT on 127.0.0.1 is in use by something else"
  rm -f "$PIDFILE" "$ERL_CRASH_DUMP"
  epmd_up || touch "$DIR/epmd.ours"   # epmd comes up with our node; stop ends it if nobody else uses it
  t0=$(date +%s)
  # 9>&-: the node (and an epmd it starts) must not inherit the lock
  (cd "$DIR" && "$SBIN/rabbitmq-server" -detached) > "$DIR/log/start.out" 2>&1 < /dev/null 9>&- ||
    { cat "$DIR/log/start.out" >&2; show_log; die "rabbitmq-server -detached failed"; }
  # wait's own --timeout does not bound the wait for the app, hence timeout(1)
  if ! timeout "$BOOT_TIMEOUT" "$SBIN/rabbitmqctl" -q -n "$NODE" wait --timeout "$BOOT_TIMEOUT" "$PIDFILE" \
       > "$DIR/log/wait.out" 2>&1 9>&-; then
    cat "$DIR/log/wait.out" >&2
    show_log
    pid=$(node_pid) && kill_node "$pid"
    die "$NODE did not come up within ${BOOT_TIMEOUT}s"
  fi
  port_open "$PORT" || { show_log; die "$NODE is up but port $PORT does not answer"; }
  [ -z "$TLS_PORT" ] || port_open "$TLS_PORT" || { show_log; die "$NODE is up but its TLS port $TLS_PORT does not answer"; }
  echo "broker: $NODE started in $(( $(date +%s) - t0 ))s (pid $(node_pid)), $(url)${TLS_PORT:+, amqps on port $TLS_PORT}"
}

stop() {
  local pid
  if ! pid=$(node_pid); then
    echo "broker: $NODE not running"
    rm -f "$PIDFILE"
  else
    if ! timeout 60 "$SBIN/rabbitmqctl" -q -n "$NODE" stop "$PIDFILE" > /dev/null 2>&1 9>&-; then
      echo "broker: rabbitmqctl stop failed; terminating pid $pid" >&2
      kill_node "$pid"
    fi
    rm -f "$PIDFILE"
    echo "broker: $NODE stopped"
  fi
  # An epmd our start brought up goes too, unless another node has registered with it since.
  if [ -e "$DIR/epmd.ours" ]; then
    if ! epmd_up; then rm -f "$DIR/epmd.ours"
    elif ! epmd -names 2> /dev/null | grep -q '^name '; then
      epmd -kill > /dev/null 2>&1 9>&- || true
      rm -f "$DIR/epmd.ours"
    fi
  fi
}

status() {
  local pid
  if pid=$(node_pid) && ctl -q ping > /dev/null 2>&1 && port_open "$PORT"; then
    echo "broker: $NODE running (pid $pid), $(url)"
  elif [ -n "${pid:-}" ]; then
    echo "broker: $NODE pid $pid exists but does not answer on port $PORT"; return 1
  else
    echo "broker: $NODE not running"; return 3
  fi
}

locked() { # start and stop one at a time (make -j, two terminals)
  exec 9> "$DIR/.lock"
  flock -w 180 9 || die "another broker.sh start/stop holds $DIR/.lock"
  "$@"
}

case ${1:-} in
  start) locked start ;;
  stop) locked stop ;;
  status) status ;;
  ctl) shift; exec "$SBIN/rabbitmqctl" -n "$NODE" "$@" ;;
esac
