#!/usr/bin/env bash
# One GPU check in one script, sized to about 8 minutes on one H100:
#   1. the CUDA-only tests (tests/test_devices.py: CUDA run against the CPU run);
#   2. fast vs reference engine at the authors' full settings (B=10, T=30, I=50, k=200, K=500),
#      one batch per class (benchmarks/bench_generate.py);
#   3. the fast engine in bf16 against fp32, same settings: seconds and final matching loss;
#   4. the budget study's LM-init and selection rows (experiments/budget_study.py).
# Results land in $OUT (the device tool's folder) or benchmarks/results/device/.
#
#   bash benchmarks/device_check.sh --dry-run    # on the CPU: every step at toy settings (~3 min)
#   bash benchmarks/device_check.sh              # on a GPU machine
#
# Needs: python with gradmm's dependencies (a device machine without registry access installs
# them from wheels carried in .whl/, see the device tool's README), the task data in
# $GRADMM_DATA_DIR (carry a copy of sst2/), and the model in $MODEL (default: the packaged
# reference LM; SmolLM2's smallest checkpoint, 85 MB as GGUF, is over what a device call carries).
set -euo pipefail
cd "$(dirname "$0")/.."

DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
PY=${PYTHON:-python3}
[[ -x .venv/bin/python ]] && PY=${PYTHON:-.venv/bin/python}
MODEL=${MODEL:-reference}
DEST=${OUT:-benchmarks/results/device}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
: "${GRADMM_DATA_DIR:?set GRADMM_DATA_DIR to a folder holding sst2/}"
mkdir -p "$DEST"
if [[ -d .whl ]] && ! "$PY" -c "import gradmm" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD/src"
fi

if (( DRY )); then  # toy settings on the CPU: checks that every step runs, measures nothing
    FULL=(--steps 1 --inner-steps 2 --init-candidates 2 --topk 5 --length 6)
    DEVICE=cpu
    BUDGET_ROWS=(lm_T0)
    DEST=$(mktemp -d)
else
    FULL=(--steps 30 --inner-steps 50 --init-candidates 500 --topk 200 --length 24)
    DEVICE=cuda
    BUDGET_ROWS=(lm_T0 lm_T1 lm_T3 lm_T10 select_M100 select_M400 select_M1600)
    nvidia-smi --query-gpu=name,memory.total --format=csv > "$DEST/gpu.txt"
fi

echo "== 1. CUDA-only tests"
"$PY" -m pytest -q -p no:cacheprovider tests/test_devices.py 2>&1 | tee "$DEST/tests.log" | tail -3

echo "== 2. fast vs reference engine, authors' settings, one batch per class"
"$PY" benchmarks/bench_generate.py --model "$MODEL" --data-dir "$GRADMM_DATA_DIR" \
    --problems-per-class 1 "${FULL[@]}" --runs reference fast --out "$DEST/generate"

echo "== 3. bf16 vs fp32 (fast engine)"
REL=$(mktemp -d)/release
"$PY" -m gradmm.cli release --task sst2 --model "$MODEL" --n-per-class 25 --out "$REL" \
    --device "$DEVICE" > /dev/null
for dtype in float32 bfloat16; do
    "$PY" -m gradmm.cli generate --release "$REL" --out "$(dirname "$REL")/gen_$dtype" \
        --per-class 10 "${FULL[@]}" --device "$DEVICE" --dtype "$dtype" --quiet > /dev/null
    "$PY" - "$(dirname "$REL")/gen_$dtype/manifest.json" "$dtype" <<'EOF' | tee -a "$DEST/dtype.md"
import json, sys
m = json.load(open(sys.argv[1]))
t = m["timings_s"]
print(f"| {sys.argv[2]} | {t['total'] - t['load']:.1f} s | mean rec_loss {m['mean_rec_loss']:.5f} |")
EOF
done

echo "== 4. budget study rows (LM init, selection)"
CONFIG=$(mktemp --suffix .yaml)
cat > "$CONFIG" <<EOF
model: $MODEL
tasks: [sst2]
methods: [zero_shot]
seeds: [0]
n_per_class: 25
synthetic_per_class: 20
runtime: {device: $DEVICE}
generate: {batch: 10, steps: 3, inner_steps: 10, init_candidates: 20, topk: 200, length: 24, rho: 5.0}
finetune: {method: lora, lr: 3.0e-4, steps: $(( DRY ? 2 : 50 )), batch_size: 16, eval_every: $(( DRY ? 1 : 25 )), max_dev: 250, max_test: 500}
EOF
"$PY" experiments/budget_study.py --config "$CONFIG" --out "$DEST/budget" --rows "${BUDGET_ROWS[@]}"
echo "device check done: $DEST"
