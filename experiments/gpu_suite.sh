#!/usr/bin/env bash
# The whole GPU check of issue 12 in one device call (≤ 8 minutes: the step limits below add up to 450 s,
# the installs take seconds): correctness of the compiled kernels first, then, side by side in the same
# run, the Velvet update's GB/s on every path against a device copy, the medium train step (bf16,
# batch 32 × 1024) with AdamW and with Velvet on each kernel against the torch.compile anchor, cuDNN
# against XLA attention, and the first step cold and from the persistent compilation cache.
# Every number is written under $OUT (JSON), summary.json puts them beside the targets, and the card's
# name is recorded beside them. Decode speed and quantization: experiments/gpu_suite_decode.sh.
#
# Prepare here (once per session, from the repo root), then run with carry [".whl"]:
#   ../shared/tools/device-prep.sh                         # ml_collections + jax-triton wheels
#   python3 -m pip download -q --no-deps -d .whl tensorboardX   # the GPU image lacks it
#   device run: bash experiments/gpu_suite.sh              (timeout_s 540)
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
# The editable install maps kernels/ to vesper_jax.kernels (a plain PYTHONPATH does not).
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . || echo 'editable install failed'
python3 -c 'import vesper_jax.kernels.velvet_pallas' || echo 'vesper_jax.kernels is not importable'
python3 -c 'from vesper_jax.kernels import velvet_triton as t; print("triton:", t.unavailable_reason() or "available")' \
  | tee "$OUT/triton.txt"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c 'import jax; print(jax.__version__, jax.devices())' | tee -a "$OUT/gpu.txt"
python3 -c 'import torch; print("torch", torch.__version__, torch.cuda.is_available())' | tee -a "$OUT/gpu.txt"

step() {  # step NAME SECONDS CMD...: runs with a time limit, logs, never stops the suite
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s)"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log" | grep -v '^I[0-9]' | tail -25
}

MEDIUM=(--configs=medium --batch_size=32 --seq_len=1024)
CACHE=/tmp/jax_compilation_cache  # fresh on a fresh machine: the first bench_train compiles cold
step kernel_tests 45 env JAX_PLATFORMS=cuda python3 -m pytest -q -x tests/test_velvet_kernel.py -m gpu -p no:cacheprovider
step bench_velvet 100 python3 kernels/bench_velvet.py --sizes=medium,large --iters=10 --repeats=3 \
  --json "$OUT/bench_velvet.json"
step bench_train 220 python3 experiments/bench_train.py "${MEDIUM[@]}" --optimizers=adamw,velvet \
  --velvet_kernels=xla,pallas,triton --steps=10 --torch --compilation_cache_dir=$CACHE --out "$OUT/bench_train.json"
step bench_train_xla_attention 50 python3 experiments/bench_train.py "${MEDIUM[@]}" --optimizers=adamw \
  --attention_impl=xla --steps=5 --out "$OUT/bench_train_xla_attention.json"
step bench_train_cached 35 python3 experiments/bench_train.py "${MEDIUM[@]}" --optimizers=adamw --steps=2 \
  --compilation_cache_dir=$CACHE --out "$OUT/bench_train_cached.json"
echo "=== summary"; cat "$OUT/gpu.txt"
python3 experiments/gpu_summary.py --dir="$OUT"
ls -la "$OUT"
