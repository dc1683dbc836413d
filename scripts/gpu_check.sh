#!/usr/bin/env bash
# The prepared GPU check (one call on an H100/H200): kernel tests compiled for real, then the benchmarks.
# Writes everything under ${OUT:-gpu_out}. Each part has its own time limit (550 s in all, under the
# device's 600 s per call), so one slow part cannot take the others' results with it.
# Needs torch, triton, transformers, peft already installed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export TRITON_INTERPRET=0 PYTHONPATH=$PWD
# the data root: ../shared/data beside a checkout, or shared/data inside the device copy
export PEFTU_DATA=${PEFTU_DATA:-$(ls -d ../shared/data shared/data 2>/dev/null | head -1)}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
timeout 100 python -m pytest -q -x tests/test_triton_ops.py tests/test_triton_grids.py tests/test_dora.py tests/test_triton_model.py tests/test_cuda_build.py 2>&1 | tail -25 | tee "$OUT/tests.txt"
timeout 60 python -m benchmarks.ops --quick --check --out "$OUT/ops.jsonl" 2>&1 | tee "$OUT/ops.md"
# bytes and FLOPs of every op against the card's measured copy bandwidth and matmul peak
timeout 40 python -m benchmarks.roofline --quick --out "$OUT/roofline.jsonl" 2>&1 | tee "$OUT/roofline.md"
timeout 50 python -m benchmarks.t5_forward --shape flan-t5-base --batch 64 --seq 128 --out "$OUT/t5.jsonl" 2>&1 | tee "$OUT/t5.md"
timeout 50 python -m benchmarks.mixed_batch --shape flan-t5-base --users 64 --batch 64 --backend triton --out "$OUT/mixed.jsonl" 2>&1 | tee "$OUT/mixed.md"
timeout 70 python -m benchmarks.train_users --shape flan-t5-base --users 16 --epochs 2 --cache "$OUT/cache" --out "$OUT/train.jsonl" 2>&1 | tee "$OUT/train.md"
timeout 60 python -m benchmarks.train_step --shape flan-t5-base --users 16 --dtype bfloat16 --cache "$OUT/cache" --out "$OUT/train_step.jsonl" 2>&1 | tee "$OUT/train_step.md"
timeout 60 python -m benchmarks.serving --shapes flan-t5-base --quick --out "$OUT/serving.jsonl" 2>&1 | tail -60 | tee "$OUT/serving.md"
# continuous batching: 1,000 distinct LoRA users against the base model on the same open-loop trace
timeout 60 python -m benchmarks.serve_trace --shape flan-t5-base --lora-only --users 1000 --rates 8,32 --duration 8 --contenders continuous,base --out "$OUT/serve_trace.jsonl" 2>&1 | tail -20 | tee "$OUT/serve_trace.md"
