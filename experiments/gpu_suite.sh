#!/usr/bin/env bash
# The whole GPU check in one device call: correctness of the compiled kernels first, then timings.
# Every number is written under $OUT (JSON) and the card's name is recorded beside it.
#
# Prepare here (once per session, from the repo root), then run with carry [".whl"]:
#   ../shared/tools/device-prep.sh                         # ml_collections + jax-triton wheels
#   python3 -m pip download -q --no-deps -d .whl tensorboardX   # the GPU image lacks it
#   device run: bash experiments/gpu_suite.sh              (timeout_s 600; the step limits add up to 570 s)
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
# The editable install maps kernels/ to vesper_jax.kernels (a plain PYTHONPATH does not).
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . || echo 'editable install failed'
python3 -c 'import vesper_jax.kernels.velvet_pallas' || echo 'vesper_jax.kernels is not importable'
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c 'import jax; print(jax.__version__, jax.devices())' | tee -a "$OUT/gpu.txt"

step() {  # step NAME SECONDS CMD...: runs with a time limit, logs, never stops the suite
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s)"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log" | grep -v '^I[0-9]' | tail -25
}

step kernel_tests 60 env JAX_PLATFORMS=cuda python3 -m pytest -q -x tests/test_velvet_kernel.py -m gpu -p no:cacheprovider
step model_tests 60 env JAX_PLATFORMS=cuda python3 -m pytest -q -x tests/test_model.py -k "kv_cache or causal" -p no:cacheprovider
step bench_velvet 120 python3 kernels/bench_velvet.py --e2e --json "$OUT/bench_velvet.json"
step bench_train 110 python3 experiments/bench_train.py --configs=medium --optimizers=adamw,velvet \
  --batch_size=32 --steps=10 --out "$OUT/bench_train.json"
step bench_train_cudnn 80 python3 experiments/bench_train.py --configs=medium --optimizers=adamw \
  --attention_impl=cudnn --batch_size=32 --steps=10 --out "$OUT/bench_train_cudnn.json"
step bench_generate 80 python3 experiments/bench_generate.py --models=medium --dtype=bfloat16 \
  --out "$OUT/bench_generate.json"
# Decode speed of medium in bf16 vs int8 vs int4 (a briefly trained model on the built-in corpus: the
# speed is what is measured here; perplexity changes are measured on CPU after longer training).
step quantization 60 python3 experiments/quantization.py --config=medium --data=builtin:pydoc --steps=30 \
  --batch_size=8 --seq_len=256 --new_tokens=128 --repeats=3 --workdir=/tmp/quant_medium \
  --out "$OUT/quantization.json"
echo "=== summary"; cat "$OUT/gpu.txt"; ls -la "$OUT"
