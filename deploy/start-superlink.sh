#!/usr/bin/env bash
# Start the consortium SuperLink with TLS and SuperNode authentication:  deploy/start-superlink.sh [superlink.env]
# --isolation process: the SuperExec that starts ServerApps is a service of its own (start-superexec.sh), so a
# SuperLink crash or restart does not take the run in flight with it (deploy/README.md, "When the SuperLink restarts").
set -euo pipefail
set -a; source "${1:-$(dirname "$0")/superlink.env}"; set +a
mkdir -p "$FLWR_HOME" "$(dirname "$SUPERLINK_DB")" "$(dirname "$SUPERLINK_LOG")"
exec flower-superlink \
  --host "$SUPERLINK_HOST" --port "$SUPERLINK_PORT" \
  --ssl-ca-certfile "$PKI_DIR/ca.crt" --ssl-certfile "$PKI_DIR/superlink.crt" --ssl-keyfile "$PKI_DIR/superlink.key" \
  --enable-supernode-auth \
  --disable-runtime-dependency-installation \
  --isolation process --superexec-auth-secret-file "$SUPEREXEC_SECRET" \
  --database "$SUPERLINK_DB" --log-file "$SUPERLINK_LOG"
