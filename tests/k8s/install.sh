#!/bin/sh
# Installs the manifest validator's packages (validate.mjs: kubernetes-models
# and yaml, pinned in package-lock.json) into tests/k8s/node_modules with
# `npm ci`, unless exactly those are already there (then nothing is fetched,
# so this works offline once installed). npm writes only under tests/k8s: its
# cache is tests/k8s/.npm-cache, removed afterwards. Called by
# scripts/deps.sh --k8s (make test) and tests/integration/test_k8s_manifests.py.
set -eu
cd "$(dirname "$0")"
for tool in node npm; do
  command -v "$tool" >/dev/null 2>&1 || { echo "tests/k8s/install.sh: $tool not found" >&2; exit 2; }
done
node validate.mjs --installed 2>/dev/null && exit 0
echo "tests/k8s: npm ci (the manifest validator's pinned packages)" >&2
npm ci --prefix . --cache ./.npm-cache --no-audit --no-fund --no-update-notifier --loglevel=error
rm -rf ./.npm-cache
node validate.mjs --installed
