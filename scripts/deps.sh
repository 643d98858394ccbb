#!/usr/bin/env bash
# Installs the Debian (bookworm) packages rabbitrpc needs to build, test and run its private
# broker, if any is missing. Quiet and instant when everything is there. Run as root (or with sudo).
# Installing rabbitmq-server does not start the system broker: a policy-rc.d refuses it.
set -euo pipefail

packages=(
  gcc libc6-dev make pkg-config                     # build the C module
  lua5.4 liblua5.4-dev luarocks                     # Lua, its headers, the rockspec
  librabbitmq-dev uuid-dev                          # rabbitmq-c 0.11, libuuid
  lua-busted lua-system                             # specs, soak, bench (luasystem's clock and sleep)
  lua-argparse                                      # the rabbitrpc command
  rabbitmq-server                                   # the private broker (scripts/broker.sh)
  python3-pika                                      # interop specs: the tutorial's Python side
  openssl                                           # TLS specs: test certificates (spec/support/make_certs.sh)
  strace                                            # limits spec: what the socket options become
  lua-cqueues lua-luv                               # outside event loops: spec, examples/luv_server.lua
  lua-cjson                                         # opts.codec = "json": spec/codec_spec.lua
  git                                               # make rock: packs the committed HEAD (spec/rock_spec.lua)
)
# scripts/deps.sh PACKAGE...: those packages instead (make fuzz: clang and its libFuzzer runtime).
[ $# = 0 ] || packages=("$@")

# A debootstrapped system has no /etc/hosts, so "localhost" (RPC_URL) does not resolve.
if ! getent hosts localhost > /dev/null 2>&1; then
  if [ -w /etc ]; then
    echo "deps: adding '127.0.0.1 localhost' to /etc/hosts (localhost did not resolve)"
    echo "127.0.0.1 localhost" >> /etc/hosts
  else
    echo "deps: warning: 'localhost' does not resolve; add '127.0.0.1 localhost' to /etc/hosts" >&2
  fi
fi

missing=()
installed=$(dpkg-query -W -f='${db:Status-Abbrev} ${Package}\n' "${packages[@]}" 2> /dev/null || true)
for p in "${packages[@]}"; do
  grep -qx "ii  $p" <<< "$installed" || missing+=("$p")
done
[ ${#missing[@]} = 0 ] && exit 0

echo "deps: installing ${missing[*]}"
sudo=
if [ "$(id -u)" != 0 ]; then
  command -v sudo > /dev/null || { echo "deps: run as root: apt-get install ${missing[*]}" >&2; exit 1; }
  sudo=sudo
fi

policy=/usr/sbin/policy-rc.d
cleanup() { [ -z "${made_policy:-}" ] || $sudo rm -f "$policy"; }
trap cleanup EXIT
if [ ! -e "$policy" ]; then   # an existing one is left alone
  printf '#!/bin/sh\n# scripts/deps.sh: no service starts while it installs packages\nexit 101\n' |
    $sudo tee "$policy" > /dev/null
  $sudo chmod 755 "$policy"
  made_policy=1
fi

t0=$(date +%s)
log=$(mktemp)
run_apt() { $sudo env DEBIAN_FRONTEND=noninteractive apt-get -q -o DPkg::Lock::Timeout=300 "$@" >> "$log" 2>&1; }
if ! { { run_apt update || { sleep 5; run_apt update; }; } &&
       run_apt install -y --no-install-recommends "${missing[@]}"; }; then
  tail -n 25 "$log" >&2
  rm -f "$log"
  echo "deps: apt-get failed" >&2
  exit 1
fi
rm -f "$log"
echo "deps: installed in $(( $(date +%s) - t0 ))s"
