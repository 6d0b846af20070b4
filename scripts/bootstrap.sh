#!/usr/bin/env bash
# Create .venv with the pinned CPU torch and the project (editable, with dev tools). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
  .venv/bin/pip install -q --upgrade pip
fi
# torch first, exactly the CPU wheel CI tests: pyproject's range (torch>=2.11,<2.14) admits newer
# releases, and pip resolving it on its own would pull a multi-GB CUDA build.
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e '.[dev]'
