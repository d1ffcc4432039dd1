#!/usr/bin/env bash
# Installs the Debian packages baton needs to build, test, fuzz and benchmark,
# and only those that are missing. Safe to run again. (Fuzzing: clang, the
# libFuzzer and sanitizer runtimes in libclang-rt-dev, llvm-symbolizer in llvm.
# Benchmark peers: haproxy, stunnel4, nginx with its stream module; gnuplot-nox
# draws bench/peers.py's chart.)
#
# --k8s (make test): also what the manifest checks need
# (tests/integration/test_k8s_manifests.py): kubectl for kustomize (Debian's
# kubernetes-client, only if no kubectl is installed), Node.js and npm (only if
# missing), then the validator's pinned npm packages in tests/k8s
# (tests/k8s/install.sh: npm ci there, skipped when already installed). Not in
# plain `make deps`/`make build`, which the image's build stage runs.
#
# --k8s also installs the Go interop peer's toolchain: golang-go and
# golang-github-hashicorp-yamux-dev (tests/integration/test_interop_go.py
# builds tests/interop/yamuxpeer with them, offline, in GOPATH mode). They
# are test-only (a few hundred MB that `make build` and the image's build
# stage do not need), so they sit with the other test-only packages here
# rather than in the main list.
set -euo pipefail
k8s=0
[ "${1:-}" = --k8s ] && k8s=1
here=$(cd "$(dirname "$0")/.." && pwd)
pkgs=(
  build-essential pkg-config meson ninja-build
  libuv1-dev libmbedtls-dev libssl-dev libyaml-dev libcpp-httplib-dev libspdlog-dev libgtest-dev
  libcli11-dev nlohmann-json3-dev
  python3 python3-pytest python3-prometheus-client
  clang libclang-rt-dev llvm
  iproute2 procps haproxy stunnel4 nginx libnginx-mod-stream gnuplot-nox
)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "$k8s" = 1 ]; then
  command -v kubectl >/dev/null 2>&1 || missing+=(kubernetes-client)
  command -v node >/dev/null 2>&1 || missing+=(nodejs)
  command -v npm >/dev/null 2>&1 || missing+=(npm)
  for p in golang-go golang-github-hashicorp-yamux-dev; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "deps: installing ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  # Package post-install scripts must not start system services (nginx, haproxy) on CI.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod +x /usr/sbin/policy-rc.d
    trap '$SUDO rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
# A failed npm ci (no registry) does not stop the other tests: the manifest
# test tries again and fails with npm's message.
if [ "$k8s" = 1 ]; then
  sh "$here/tests/k8s/install.sh" || echo "deps: tests/k8s/install.sh failed; the manifest checks will fail" >&2
fi
