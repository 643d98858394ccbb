#!/usr/bin/env bash
# Test certificates for the TLS specs (EC prime256v1 keys, valid 10 years), made into DIR:
#   ca.pem ca.key               a CA, "rabbitrpc test CA"
#   server.pem server.key       DNS name "localhost" (no IP address: 127.0.0.1 does not match), by ca
#   client.pem client.key       a client certificate, "rabbitrpc test client", by ca
#   other_ca.pem other_ca.key   an unrelated CA, "rabbitrpc other CA"
#   wrongname.pem wrongname.key DNS name "rabbit.invalid", by ca
#   other_client.pem other_client.key  a client certificate by other_ca, which ca does not trust
#   spec/support/make_certs.sh DIR
# Idempotent: when every file is there and the leaves verify against ca.pem, it does nothing.
set -euo pipefail

dir=${1:?usage: make_certs.sh DIR}
mkdir -p "$dir"
cd "$dir"
command -v openssl > /dev/null || { echo "make_certs: openssl is not installed (run scripts/deps.sh)" >&2; exit 1; }

all=(ca.pem ca.key server.pem server.key client.pem client.key other_ca.pem other_ca.key wrongname.pem wrongname.key
     other_client.pem other_client.key)
complete() {
  local f
  for f in "${all[@]}"; do [ -s "$f" ] || return 1; done
  openssl verify -CAfile ca.pem server.pem client.pem wrongname.pem > /dev/null 2>&1 &&
    openssl verify -CAfile other_ca.pem other_client.pem > /dev/null 2>&1
}
complete && exit 0

work=$(mktemp -d .make_certs.XXXXXX)
trap 'rm -rf "$work"' EXIT
umask 077   # the keys

key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:prime256v1 -out "$work/$1.key" 2> /dev/null; }

ca() { # NAME SUBJECT
  key "$1"
  openssl req -x509 -new -key "$work/$1.key" -subj "$2" -days 3650 -sha256 -out "$work/$1.pem" \
    -addext "basicConstraints = critical, CA:TRUE" \
    -addext "keyUsage = critical, keyCertSign, cRLSign" \
    -addext "subjectKeyIdentifier = hash"
}

leaf() { # NAME SUBJECT EXTENSIONS [CA]: a certificate signed by CA (ca)
  local ca=${4:-ca}
  key "$1"
  openssl req -new -key "$work/$1.key" -subj "$2" -out "$work/$1.csr"
  printf '%s\n' "basicConstraints = critical, CA:FALSE" "keyUsage = critical, digitalSignature" \
    "authorityKeyIdentifier = keyid" "$3" > "$work/$1.ext"
  openssl x509 -req -in "$work/$1.csr" -CA "$work/$ca.pem" -CAkey "$work/$ca.key" \
    -set_serial "0x$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')" -days 3650 -sha256 \
    -extfile "$work/$1.ext" -out "$work/$1.pem" 2> /dev/null
}

ca ca "/CN=rabbitrpc test CA"
ca other_ca "/CN=rabbitrpc other CA"
leaf server "/CN=localhost" $'subjectAltName = DNS:localhost\nextendedKeyUsage = serverAuth'
leaf wrongname "/CN=rabbit.invalid" $'subjectAltName = DNS:rabbit.invalid\nextendedKeyUsage = serverAuth'
leaf client "/CN=rabbitrpc test client" "extendedKeyUsage = clientAuth"
leaf other_client "/CN=rabbitrpc stranger" "extendedKeyUsage = clientAuth" other_ca

for f in "${all[@]}"; do mv -f "$work/$f" "$f"; done
chmod 644 ./*.pem
complete || { echo "make_certs: the certificates made in $dir do not verify" >&2; exit 1; }
