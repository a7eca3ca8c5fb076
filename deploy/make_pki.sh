#!/usr/bin/env bash
# Make a consortium PKI: CA, SuperLink TLS certificate, SuperNode authentication keys.
#   deploy/make_pki.sh --out pki --nodes 3 [--host link.example.org] [--days 365] [--force]
# Runs with the python of the active environment (or $PYTHON); see deploy/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" -m server.pki "$@"
