#!/usr/bin/env bash
# Installs the Debian packages baton needs to build, test, fuzz and benchmark,
# and only those that are missing. Safe to run again. (Fuzzing: clang, the
# libFuzzer and sanitizer runtimes in libclang-rt-dev, llvm-symbolizer in llvm.)
set -euo pipefail
pkgs=(
  build-essential pkg-config meson ninja-build
  libuv1-dev libmbedtls-dev libyaml-dev libcpp-httplib-dev libspdlog-dev libgtest-dev
  python3 python3-pytest python3-prometheus-client
  clang libclang-rt-dev llvm
  iproute2 procps haproxy stunnel4 nginx
)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
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
