#!/usr/bin/env bash
# Runs zlh locally on embedded defaults: a local artifact store under ./data, a signing key made
# on first run, a signed catalog with a small demo runtime, and the agent installing it from there.
# Re-running is safe: the same artifact is published again and the install is a no-op.
set -euo pipefail
cd "$(dirname "$0")/.."
data=${ZLH_DATA_DIR:-./data}
mkdir -p "$data"
data=$(cd "$data" && pwd)

if ! command -v minisign >/dev/null; then
  echo "minisign is needed to sign the catalog (Debian/Ubuntu: apt-get install minisign)" >&2
  exit 1
fi
cargo build -q -p zlh-agentd
agent() { cargo run -q -p zlh-agentd -- "$@"; }

export ZLH_STORE="file://$data/store"
export ZLH_TRUSTED_KEY="$data/keys/zlh.pub"
export ZLH_RUNTIME_ROOT="$data/runtimes"
export ZLH_CATALOG_FILE="$data/catalog.json"
mkdir -p "$data/store" "$data/keys" "$data/demo"

if [ ! -f "$data/keys/zlh.pub" ]; then
  echo "== making a catalog signing key (no password, for local use only)"
  minisign -G -W -p "$data/keys/zlh.pub" -s "$data/keys/zlh.key" >/dev/null
fi

echo "== building a demo runtime artifact"
tree="$data/demo/hello-1.0.0"
mkdir -p "$tree/bin"
printf '#!/bin/sh\necho "hello from a zlh-installed runtime"\n' > "$tree/bin/hello"
chmod 755 "$tree/bin/hello"
artifact="$data/demo/hello-1.0.0-linux-x64.tar.gz"
# Deterministic archive, so re-publishing gives the same digest.
tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$tree" -cf - . | gzip -n > "$artifact"

echo "== publishing it to $ZLH_STORE and signing the catalog"
agent publish artifact "$artifact" --id hello --version 1.0.0 --channel stable --bin bin
minisign -S -s "$data/keys/zlh.key" -m "$ZLH_CATALOG_FILE" -t "zlh local catalog" >/dev/null
agent publish push

echo "== installing from the signed catalog"
agent runtime install hello
agent runtime verify hello
agent runtime list
"$ZLH_RUNTIME_ROOT/hello/current/bin/hello"
