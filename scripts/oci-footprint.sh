#!/usr/bin/env bash
# The cost of one isolated container: starts zlh-apid with container_host = "oci" on a fresh data
# dir, provisions a dev container (no code-server), and prints the time from the request to
# `running`, the container's memory (its cgroup's usage, and each process's own anonymous memory:
# the init beside the agent is the overhead), then deletes it and counts what is left (network
# namespaces, runc containers, the container's cgroup and directory). Needs root, runc and the CNI
# plugins; run after `cargo build -p zlh-apid -p zlh-agentd`.
set -euo pipefail
cd "$(dirname "$0")/.."
data=$(mktemp -d)
listen=127.0.0.1:${ZLH_FOOTPRINT_PORT:-4190}
api=http://$listen
ZLH_DATA_DIR=$data ZLH_API_LISTEN=$listen ./target/debug/zlh-apid --log-format text serve --container-host oci \
  >"$data/apid.log" 2>&1 &
apid=$!
trap 'kill $apid 2>/dev/null; wait $apid 2>/dev/null; rm -rf "$data"' EXIT
json() { python3 -c "import json,sys; print(json.load(sys.stdin)[\"$1\"])"; }
until curl -sf $api/api/health >/dev/null; do kill -0 $apid || { cat "$data/apid.log"; exit 1; }; sleep 0.1; done
reg=$(curl -s $api/api/auth/register -H 'content-type: application/json' \
  -d '{"email":"footprint@example.com","username":"footprint","password":"a long password"}')
token=$(echo "$reg" | json token 2>/dev/null) || { echo "register: $reg"; exit 1; }
began=$(date +%s%N)
id=$(curl -s $api/api/dev -H "authorization: Bearer $token" -H 'content-type: application/json' \
  -d '{"runtime":"hello","enable_code_server":false}' | json id)
until state=$(curl -s $api/api/servers/$id/status -H "authorization: Bearer $token" | json state)
      [ "$state" = running ] || [ "$state" = failed ]; do sleep 0.05; done
echo "request → $state: $(( ($(date +%s%N) - began) / 1000000 )) ms"
vmid=$(curl -s $api/api/servers/$id -H "authorization: Bearer $token" | json vmid)
cg=$(find /sys/fs/cgroup/memory /sys/fs/cgroup -maxdepth 6 -type d -name "zlh-$vmid" 2>/dev/null | head -1)
if [ -f "$cg/memory.usage_in_bytes" ]; then
  echo "container cgroup memory: $(( $(cat "$cg/memory.usage_in_bytes") / 1024 )) KiB"
elif [ -f "$cg/memory.current" ]; then
  echo "container cgroup memory: $(( $(cat "$cg/memory.current") / 1024 )) KiB"
fi
for p in $(cat "$cg/cgroup.procs"); do
  echo "  pid $p: $(tr '\0' ' ' </proc/$p/cmdline | cut -c1-60)… anonymous $(awk '/RssAnon/{print $2}' /proc/$p/status) KiB"
done
curl -s -X DELETE $api/api/servers/$id -H "authorization: Bearer $token" -o /dev/null
until [ ! -d "$data/oci/$vmid" ]; do sleep 0.1; done
echo "after delete: netns $(ip netns list | grep -c "^zlh-$vmid " || true), runc $(runc --root "$data/oci/runc" list -q | grep -c . || true), cgroup $( [ -d "$cg" ] && echo 1 || echo 0), dir $( [ -d "$data/oci/$vmid" ] && echo 1 || echo 0)"
