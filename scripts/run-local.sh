#!/usr/bin/env bash
# Runs the whole zlh platform on this machine on embedded defaults: zlh-apid on 127.0.0.1:4000
# with SQLite, a local artifact store (seeded with a signed demo catalog on first run) and
# containers, all under ./data. The containers are isolated OCI containers (runc, CNI network)
# when this runs as root on a machine with runc and the CNI plugins; else zlh-agentd processes
# without isolation, with a warning (ZLH_CONTAINER_HOST chooses either way).
# ZLH_API_LISTEN and ZLH_DATA_DIR change where; Ctrl-C stops the API (containers keep running).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q -p zlh-agentd -p zlh-apid
listen=${ZLH_API_LISTEN:-127.0.0.1:4000}
if [ -z "${ZLH_CONTAINER_HOST:-}" ]; then
  if [ "$(id -u)" = 0 ] && { command -v runc >/dev/null || [ -x /usr/sbin/runc ]; } && [ -x /usr/lib/cni/ptp ]; then
    export ZLH_CONTAINER_HOST=oci
  else
    export ZLH_CONTAINER_HOST=local
    echo "warning: no runc, no CNI plugins or not root: containers are local processes WITHOUT isolation" >&2
  fi
fi
cat >&2 <<HELP
zlh is starting on http://$listen (data in ${ZLH_DATA_DIR:-./data}). Try:
  token=\$(curl -s http://$listen/api/auth/register -H 'content-type: application/json' \\
          -d '{"email":"ada@example.com","username":"ada","password":"a long password"}' | sed 's/.*"token":"\\([^"]*\\)".*/\\1/')
  curl -s http://$listen/api/dev -H "authorization: Bearer \$token" -H 'content-type: application/json' \\
       -d '{"runtime":"hello","enable_code_server":true}'
  curl -s http://$listen/api/servers -H "authorization: Bearer \$token"
  curl -s -X POST http://$listen/api/dev/<id>/ide-token -H "authorization: Bearer \$token"   # open its "url" in a browser
HELP
exec ./target/debug/zlh-apid --log-format "${ZLH_LOG_FORMAT:-text}" serve "$@"
