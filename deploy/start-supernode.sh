#!/usr/bin/env bash
# Start one hospital's SuperNode (its public key must be registered first):  deploy/start-supernode.sh [supernode.env]
set -euo pipefail
set -a; source "${1:-$(dirname "$0")/supernode.env}"; set +a
mkdir -p "$FLWR_HOME"
exec flower-supernode \
  --superlink "$SUPERLINK_ADDRESS" \
  --root-certificates "$CA_CERT" \
  --auth-supernode-private-key "$NODE_KEY" \
  --node-config "$NODE_CONFIG" \
  --host 127.0.0.1 --port "$RUNTIME_PORT"
