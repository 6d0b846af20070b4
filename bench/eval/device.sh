#!/usr/bin/env bash
# The GPU run of bench/eval, in two device calls: the fp16 network is carried in two parts (each fits
# the carry limit beside the tree), the first part kept in var/ (git-ignored, so it stays on the machine).
#   call 1: carry .inception/fid-inception-fp16.safetensors.part-1          -> bash bench/eval/device.sh stage
#   call 2: carry .inception/fid-inception-fp16.safetensors.part-2, .inception/fashion-mnist and the
#           pydantic wheels under .whl/ (the device image lacks pydantic)    -> bash bench/eval/device.sh run
set -euo pipefail
cd "$(dirname "$0")/../.."
NET=fid-inception-fp16.safetensors
KEEP=var/inception
case "${1:-}" in
  stage)
    mkdir -p "$KEEP"
    cp ".inception/$NET.part-1" "$KEEP/"
    ls -l "$KEEP"
    ;;
  run)
    OUT=${OUT:-var/eval-out}
    mkdir -p "$OUT"
    python -c "import pydantic" 2>/dev/null || python -m pip install -q --no-deps --no-index .whl/*.whl
    cat "$KEEP/$NET.part-1" ".inception/$NET.part-2" > "$KEEP/$NET"  # its sha256 is checked on load
    export PTQ4ARVG_INCEPTION="$KEEP/$NET" FASHION_MNIST_DIR=.inception/fashion-mnist PTQ4ARVG_CACHE=var/cache
    shift
    PYTHONPATH=. python bench/eval/run.py speed --model var-d16 --num-images 10000 --device cuda --out "$OUT" "$@" \
      2>&1 | tee "$OUT/speed.log" | tail -n 40
    ;;
  *)
    echo "usage: $0 stage | run [extra bench/eval/run.py speed options]" >&2
    exit 2
    ;;
esac
