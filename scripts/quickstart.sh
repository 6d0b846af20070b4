#!/usr/bin/env bash
# One command for a fresh machine: install, then run the main job.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
.venv/bin/ptq4arvg models
.venv/bin/ptq4arvg generate par-tiny --classes 0,1,2,3 --seed 0 --out out/quickstart.png
