#!/usr/bin/env bash
# Start the SuperExec beside the SuperLink (same machine, same env file):  deploy/start-superexec.sh [superlink.env]
# It asks the SuperLink's Runtime API for runs to start and starts their ServerApp (flwr-serverapp, which needs
# fedsynth installed). A process of its own, not the SuperLink's child: it and the ServerApp outlive a SuperLink
# restart and reconnect to it. The shared secret proves to the SuperLink that it is the SuperExec.
set -euo pipefail
set -a; source "${1:-$(dirname "$0")/superlink.env}"; set +a
mkdir -p "$FLWR_HOME"
exec flower-superexec \
  --runtime-api-address "$SUPEREXEC_RUNTIME_ADDRESS" \
  --root-certificates "$PKI_DIR/ca.crt" \
  --superexec-auth-secret-file "$SUPEREXEC_SECRET"
