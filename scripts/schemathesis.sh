#!/usr/bin/env bash
# Fuzzes the running API against its own contract: starts `zlh-apid serve` on a fresh data dir
# (embedded defaults, containers in memory), signs a user in, and runs schemathesis on
# /api/openapi.json with that user's bearer token. Fails on any 5xx, an answer whose schema or
# status the document does not give, or a broken document.
# ZLH_SCHEMATHESIS_VENV: where schemathesis is installed (made on first use).
# ZLH_SCHEMATHESIS_EXAMPLES: test cases per operation (default 20).
set -euo pipefail
cd "$(dirname "$0")/.."

version=4.32.5
venv=${ZLH_SCHEMATHESIS_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/zlh/schemathesis-$version}
if [ ! -x "$venv/bin/st" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "schemathesis==$version"
fi

cargo build -q -p zlh-apid
api_bin=${CARGO_TARGET_DIR:-$PWD/target}/debug/zlh-apid

data=$(mktemp -d)
api_pid=
cleanup() {
  if [ -n "$api_pid" ]; then kill "$api_pid" 2>/dev/null || true; wait "$api_pid" 2>/dev/null || true; fi
  rm -rf "$data"
}
trap cleanup EXIT

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
base=http://127.0.0.1:$port
"$api_bin" --log-format text serve --listen "127.0.0.1:$port" --data-dir "$data" --container-host mock \
  >"$data/api.log" 2>&1 &
api_pid=$!
for _ in $(seq 1 120); do
  python3 -c "import urllib.request; urllib.request.urlopen('$base/api/health', timeout=1)" 2>/dev/null && break
  kill -0 "$api_pid" 2>/dev/null || { cat "$data/api.log" >&2; exit 1; }
  sleep 0.5
done

token=$(python3 - "$base" <<'PY'
import json, sys, urllib.request
body = json.dumps({"email": "fuzz@example.com", "username": "fuzz", "password": "a long password"}).encode()
req = urllib.request.Request(sys.argv[1] + "/api/auth/register", body, {"content-type": "application/json"})
print(json.load(urllib.request.urlopen(req))["token"])
PY
)

# Logging out would end the session the run uses: every later call would only test the 401.
# Run from the temp dir: schemathesis keeps its cache in the working directory.
status=0
hooks=$PWD/scripts/schemathesis_hooks.py
cd "$data"
SCHEMATHESIS_HOOKS=$hooks "$venv/bin/st" run "$base/api/openapi.json" \
  --checks not_a_server_error,response_schema_conformance,status_code_conformance \
  --header "Authorization: Bearer $token" \
  --exclude-path /api/auth/logout \
  --max-examples "${ZLH_SCHEMATHESIS_EXAMPLES:-20}" \
  --seed 1 \
  --no-color \
  --report-dir "$data/report" || status=$?
if [ "$status" != 0 ]; then
  echo "schemathesis found problems; the API's log:" >&2
  tail -n 200 "$data/api.log" >&2
fi
exit "$status"
