#!/usr/bin/env bash
# One command for a fresh machine: install, then run the service in its embedded setup
# (SQLite, local artifacts and a worker process under ./var, the registry's models registered).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/ptq4arvg serve "$@"
