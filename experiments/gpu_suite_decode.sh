#!/usr/bin/env bash
# Decode speed and quantization on a GPU (split from gpu_suite.sh, which its correctness checks and
# training and update measurements fill to its 8-minute budget). The step limits add up to 220 s.
# Prepared like gpu_suite.sh (`bash experiments/gpu_suite.sh --prep` here), then
#   device run, carry [".whl"], timeout_s 300:  bash experiments/gpu_suite_decode.sh
# The set-up (the offline install of .whl/ into $SITE, PYTHONPATH, PY, `step`, the device line in
# $OUT/gpu.txt, GPU=1 or 0) is gpu_suite.sh's own, sourced.
source "$(dirname "$0")/gpu_suite.sh" --setup || exit 1

if [[ $GPU == 1 ]]; then
  step model_tests 60 env JAX_PLATFORMS=cuda python3 -m pytest -q -x tests/test_model.py -k "kv_cache or causal" \
    -p no:cacheprovider
  # bf16 vs int8 vs int4 side by side (the head quantized too): on a GPU the quantized projections are
  # XLA's dequantize-then-dot, fused (the C++ decode kernel is the CPU platform's choice).
  step bench_generate 100 "${PY[@]}" experiments/bench_generate.py --models=medium --dtype=bfloat16 \
    --quantize=none,int8,int4 --batch_sizes=1 --paths=prefill,step,loop --out "$OUT/bench_generate.json"
  # Decode speed of medium in bf16 vs int8 vs int4 (a briefly trained model on the built-in corpus: the
  # speed is what is measured here; perplexity changes are measured on CPU after longer training).
  step quantization 60 "${PY[@]}" experiments/quantization.py --config=medium --data=builtin:pydoc --steps=30 \
    --batch_size=8 --seq_len=256 --new_tokens=128 --repeats=3 --workdir=/tmp/quant_medium \
    --out "$OUT/quantization.json"
else
  echo "=== decode timing: skipped (no GPU: $(grep '^backend:' "$OUT/gpu.txt" || echo 'JAX did not start'))"
fi
echo "=== summary (step, limit s, exit status, s)"; cat "$LOGS/steps.tsv" 2>/dev/null; ls -la "$OUT"
