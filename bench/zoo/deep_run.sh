#!/bin/bash
# The one device call of issue 14: train VQ-zoo-16 + deep-llamagen and deep-var (two chains at once on
# one GPU), then the activation statistics and the comparison of every calibration recipe on each new
# model (one process per bit-width), and W6A6 on the old bundled models while time is left.
#   OUT=DIR FASHION_MNIST_DIR=DIR bash bench/zoo/deep_run.sh   (from the repository root, with a GPU)
# Everything stops by DEADLINE seconds after the start so that the results can be packed into $OUT.
# Ran once (2026-12-02, H200, DEADLINE_S=520): tokenizer-16 and deep-var finished, deep-llamagen was cut at
# epoch 7 of 12 and the comparisons by the deadline; bench/zoo/README.md has what came back.
set -u
START=$(date +%s)
DEADLINE=$((START + ${DEADLINE_S:-530}))
W=quantcore/zoo/weights
LOGS=bench/zoo/deep-logs
mkdir -p "$LOGS" "$OUT"
export PYTHONUNBUFFERED=1
RECIPES=fp,rtn,smoothquant,os+,ptq4arvg,ptq4arvg-staged,dtwq

left() {  # seconds to the deadline, at least 1 (timeout refuses 0 and negative limits)
    local s=$((DEADLINE - $(date +%s)))
    echo $((s > 1 ? s : 1))
}

compare() {  # MODEL BITS FOLDER IMAGES
    timeout "$(left)" python3 bench/quality/run.py --model "$1" --bits "$2" --recipes "$RECIPES" \
        --no-selections --num-images "$4" --out "bench/quality/$1/$3" >"$LOGS/compare-$1-$3.log" 2>&1
}

measure_new() {  # MODEL: statistics, then the three bit-widths at once
    python3 bench/quality/ranges.py --model "$1" --out "bench/quality/$1" >"$LOGS/ranges-$1.log" 2>&1
    for bits in w6a6 w8a8 w4a8; do compare "$1" "$bits" "$bits" 400 & done
    wait
}

train() {  # NAME STAGES...: a marker file when the stages end, then the measurements if they succeeded
    local name=$1
    shift
    timeout "$(left)" python3 -m quantcore.zoo.train "$@" --device cuda --out $W >"$LOGS/train-$name.log" 2>&1
    local rc=$?
    touch "$LOGS/trained-$name"
    [ $rc -eq 0 ] && measure_new "$name"
}

train deep-llamagen tokenizer-16 deep-llamagen &
train deep-var deep-var &
# the old models' statistics need no training
for m in tiny-llamagen tiny-par tiny-var tiny-rar; do
    python3 bench/quality/ranges.py --model $m --out bench/quality/$m >"$LOGS/ranges-$m.log" 2>&1
done
# their W6A6 comparison once the GPU has room: after both trainings
until [ -e "$LOGS/trained-deep-llamagen" ] && [ -e "$LOGS/trained-deep-var" ]; do sleep 5; done
for m in tiny-llamagen tiny-par tiny-var tiny-rar; do compare $m w6a6 modes-w6a6 300 & done
wait
echo "finished after $(($(date +%s) - START)) s" | tee "$LOGS/finished.txt"
tar cf "$OUT/weights.tar" $W/vq-zoo-16.safetensors $W/deep-llamagen.safetensors $W/deep-var.safetensors \
    $W/training.json
tar cf "$OUT/bench.tar" "$LOGS" bench/quality/deep-llamagen bench/quality/deep-var \
    bench/quality/tiny-*/ranges.* bench/quality/tiny-*/modes-w6a6
