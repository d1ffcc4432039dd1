#!/bin/sh
# k8s-secrets.sh DIR [DNS-NAME ...]
#
# Writes the files the k8s/ kustomization's secretGenerator reads, for a
# development setup (docs/kubernetes.md):
#   DIR/tls.crt, DIR/tls.key   server certificate (for the DNS names given,
#                              default tunnel-app) and key, signed by
#   DIR/ca.crt                 a new development CA: give it to the clients (--ca)
#   DIR/ticket.key             TLS session ticket key shared by every replica
#   DIR/tokens.yaml            the digest of one new client token (auth.tokens_file)
#   DIR/client-token           that token: give it to the clients (--token-file)
# Files are mode 0600; the CA key is not kept. For production bring your own
# certificate (e.g. cert-manager) and tokens.
set -eu
dir=${1:?usage: k8s-secrets.sh DIR [DNS-NAME ...]}
shift
[ $# -gt 0 ] || set -- tunnel-app
here=$(cd "$(dirname "$0")/.." && pwd)
baton=${BATON_BIN:-$here/build/baton}
[ -x "$baton" ] || { echo "k8s-secrets.sh: $baton not found (make build, or set BATON_BIN)" >&2; exit 2; }
umask 077
mkdir -p "$dir"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
names=""
for n in "$@"; do names="$names --name $n"; done
# shellcheck disable=SC2086
"$baton" certs --out "$tmp" $names >/dev/null
cp "$tmp/server.crt" "$dir/tls.crt"
cp "$tmp/server.key" "$dir/tls.key"
cp "$tmp/ca.crt" "$dir/ca.crt"
cp "$tmp/ticket.key" "$dir/ticket.key"
token=$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')
printf '%s\n' "$token" > "$dir/client-token"
digest=$(printf %s "$token" | "$baton" hash-token)
printf -- '- name: fleet\n  sha256: %s\n' "$digest" > "$dir/tokens.yaml"
echo "k8s-secrets.sh: wrote $dir (clients need $dir/ca.crt and $dir/client-token)"
