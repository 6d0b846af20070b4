#!/bin/bash
# A device call: train one bundled model, then its activation statistics and the comparison of
# every calibration recipe on it at W6A6, W8A8 and W4A8 (one process per bit-width, side by side).
#   OUT=DIR FASHION_MNIST_DIR=DIR bash bench/zoo/train_and_measure.sh MODEL STAGE...   (repository root, with a GPU)
# Everything stops by DEADLINE_S seconds after the start so that the results can be packed into $OUT.
# Runs: 2026-12-02 (H200, DEADLINE_S=520) `tokenizer-16 deep-llamagen` and `deep-var` side by side:
# tokenizer-16 and deep-var finished, deep-llamagen (then width 192) was cut at epoch 7 of 12;
# 2026-12-03 `deep-llamagen deep-llamagen` (width 128) beside `tiny-mar kl-tokenizer mar` (BITS="w6a6 w8a8"): both
# trained; tiny-mar's comparisons failed (a CPU generator inside a cuda device block, since fixed) and ran in a later call.
# bench/zoo/README.md has what came back.
set -u
START=$(date +%s)
DEADLINE=$((START + ${DEADLINE_S:-560}))
MODEL=$1
shift
W=quantcore/zoo/weights
LOGS=bench/zoo/deep-logs
mkdir -p "$LOGS" "$OUT"
touch "$LOGS/start-$MODEL"  # the weights this run writes are the ones newer than this
export PYTHONUNBUFFERED=1
RECIPES=fp,rtn,smoothquant,os+,ptq4arvg,ptq4arvg-staged,dtwq

left() {  # seconds to the deadline, at least 1 (timeout refuses 0 and negative limits)
    local s=$((DEADLINE - $(date +%s)))
    echo $((s > 1 ? s : 1))
}

compare() {  # BITS IMAGES THREADS
    timeout "$(left)" python3 bench/quality/run.py --model "$MODEL" --bits "$1" --recipes "$RECIPES" \
        --no-selections --num-images "$2" --threads "$3" --out "bench/quality/$MODEL/$1" \
        >"$LOGS/compare-$MODEL-$1.log" 2>&1
}

timeout "$(left)" python3 -m quantcore.zoo.train "$@" --device cuda --out $W >"$LOGS/train-$MODEL.log" 2>&1 &&
    python3 bench/quality/ranges.py --model "$MODEL" --out "bench/quality/$MODEL" >"$LOGS/ranges-$MODEL.log" 2>&1 &&
    for bits in ${BITS:-w6a6 w8a8 w4a8}; do compare "$bits" "${IMAGES:-100}" "${THREADS:-5}" & done
wait
echo "$MODEL finished after $(($(date +%s) - START)) s" | tee "$LOGS/finished-$MODEL.txt"
tar cf "$OUT/weights-$MODEL.tar" $(find $W -name '*.safetensors' -newer "$LOGS/start-$MODEL") $W/training.json
tar cf "$OUT/bench-$MODEL.tar" "$LOGS" "bench/quality/$MODEL"
