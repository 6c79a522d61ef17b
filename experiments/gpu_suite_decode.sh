#!/usr/bin/env bash
# Decode speed and quantization on a GPU (split from gpu_suite.sh, which issue 12's training and update
# measurements fill to its 8-minute budget). Prepared and run like gpu_suite.sh (timeout_s 300).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . || echo 'editable install failed'
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

step() {  # step NAME SECONDS CMD...: runs with a time limit, logs, never stops the suite
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s)"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log" | grep -v '^I[0-9]' | tail -25
}

step model_tests 60 env JAX_PLATFORMS=cuda python3 -m pytest -q -x tests/test_model.py -k "kv_cache or causal" -p no:cacheprovider
step bench_generate 80 python3 experiments/bench_generate.py --models=medium --dtype=bfloat16 \
  --out "$OUT/bench_generate.json"
# Decode speed of medium in bf16 vs int8 vs int4 (a briefly trained model on the built-in corpus: the
# speed is what is measured here; perplexity changes are measured on CPU after longer training).
step quantization 60 python3 experiments/quantization.py --config=medium --data=builtin:pydoc --steps=30 \
  --batch_size=8 --seq_len=256 --new_tokens=128 --repeats=3 --workdir=/tmp/quant_medium \
  --out "$OUT/quantization.json"
echo "=== summary"; cat "$OUT/gpu.txt"; ls -la "$OUT"
