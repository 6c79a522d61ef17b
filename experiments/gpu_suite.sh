#!/usr/bin/env bash
# The whole GPU check in one device call (≤ 8 minutes: the step limits below add up to 455 s, the
# set-up and summary take ~20 s). It checks before it times: first the correctness checks
# (experiments/gpu_checks.py, ≤ 100 s: the tiny float32 run against the CPU reference losses in
# experiments/gpu_reference.json, the bfloat16 run, cuDNN against XLA attention, the compiled Pallas and
# Triton Velvet updates against XLA), each a PASS/FAIL/SKIP line; then, whatever they said, the timings:
# the Velvet update's GB/s on every path against a device copy, the medium train step (bf16, batch
# 32 × 1024) with AdamW and with Velvet on each kernel against the torch.compile anchor, cuDNN against
# XLA attention, and the first step cold and from the persistent compilation cache. The summary
# (experiments/gpu_summary.py) leads with the failures. Decode speed and quantization:
# experiments/gpu_suite_decode.sh.
#
# Prepare here, from the repo root, right before the device call (the device runs the package built
# now; the `package` check fails if the tree changed since):
#   bash experiments/gpu_suite.sh --prep
# which copies the wheels the GPU image lacks (ml_collections, jax-triton, tensorboardX) into .whl/ with
# ../shared/tools/device-prep.sh and builds this project's wheel there (git-ignored). Then:
#   device run, carry [".whl"], timeout_s 540:  bash experiments/gpu_suite.sh
# (`bash experiments/gpu_suite.sh --checks`, timeout_s 240: the set-up and the correctness checks alone.)
#
# On the GPU machine the wheels are installed with --target into $SITE and only $SITE is put on
# PYTHONPATH, never the working tree: vesper_jax.kernels exists only in the installed package (pyproject
# maps kernels/ to it), so a working tree ahead on sys.path would shadow it. PYTHONSAFEPATH=1 keeps
# `python3 -m pytest` and scripts from putting the current or the script's directory first, and
# PY below runs scripts that insert the repo root into sys.path themselves with vesper_jax already
# imported from $SITE. Results go to $OUT: checks.json, steps.log, the bench_*.json files, gpu.txt and
# summary.json (the device tool returns at most 8 files).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1  # the repo root (also when sourced)

if [[ ${1:-} == --prep ]]; then  # here, not on the device: the wheels the device run installs offline
  set -e
  "${DEVICE_PREP:-../shared/tools/device-prep.sh}"
  rm -f .whl/vesper_jax-*.whl
  # The wheel is built from a clean copy of what travels to the device (tracked and untracked files git
  # does not ignore), so stale build/ output or ignored files never reach it.
  src=$(mktemp -d)
  git ls-files -z -co --exclude-standard | while IFS= read -r -d '' f; do
    [[ -e $f ]] && cp --parents -- "$f" "$src/"
  done
  python3 -m pip wheel -q --no-deps -w .whl "$src"
  rm -rf "$src"
  python3 - <<'EOF'
import glob, zipfile
wheel, = glob.glob('.whl/vesper_jax-*.whl')
names = zipfile.ZipFile(wheel).namelist()
kernels = sorted(n for n in names if n.startswith('vesper_jax/kernels/') and n.endswith('.py'))
assert 'vesper_jax/kernels/velvet_pallas.py' in kernels and 'vesper_jax/kernels/velvet_triton.py' in kernels, kernels
print(f'{wheel}: {len(names)} files, kernels/ as vesper_jax.kernels: {", ".join(k.split("/")[-1] for k in kernels)}')
EOF
  du -sh .whl
  exit 0
fi

# ------------------------------------------------------------------ set-up (gpu_suite_decode.sh sources it)
export OUT=${OUT:-/tmp/gpu_out}
SITE=${SITE:-/tmp/site}
LOGS=$(mktemp -d)  # step statuses for the summary (kept out of $OUT: the device returns 8 files)
mkdir -p "$OUT" "$SITE"
setup_failed() {  # shown now, and listed first by the summary
  echo "FAIL setup: $*"; printf 'setup: %s\t0\t1\t0\n' "$*" >>"$LOGS/steps.tsv"
}
compgen -G '.whl/vesper_jax-*.whl' >/dev/null \
  || setup_failed "no .whl/vesper_jax-*.whl: run 'bash experiments/gpu_suite.sh --prep' here first, carry .whl"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
  || setup_failed "pip install of .whl/*.whl into $SITE failed"
# Config names (configs/<name>.py) are found beside the package (vesper_jax.config.CONFIGS_DIR): configs
# are files a user edits, not package data, so the installed package gets the working tree's.
ln -sfn "$PWD/configs" "$SITE/configs"
export PYTHONPATH=$SITE PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false

# "${PY[@]}" SCRIPT ARGS...: python3 SCRIPT with vesper_jax (and its kernels) imported from $SITE first,
# so a script's own sys.path.insert(0, <repo root>) cannot swap in the working tree's vesper_jax.
PY=(python3 -c 'import runpy, sys, vesper_jax.kernels; sys.argv.pop(0); runpy.run_path(sys.argv[0], run_name="__main__")')

step() {  # [SHOW=REGEX] step NAME SECONDS CMD...: runs with a time limit, logs the whole output to
          # $OUT/steps.log, shows its last 25 lines (or those matching SHOW), never stops the suite
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s)"
  echo "=== $name (limit ${limit}s): $*" >>"$OUT/steps.log"
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee -a "$OUT/steps.log" | if [[ -n ${SHOW:-} ]]; then grep -E "$SHOW"; else
    grep -v '^[IWE][0-9]' | tail -25; fi
  local rc=${PIPESTATUS[0]}
  printf '%s\t%s\t%s\t%s\n' "$name" "$limit" "$rc" "$((SECONDS - start))" >>"$LOGS/steps.tsv"
  [[ $rc == 0 ]] || echo "=== $name: exit status $rc$([[ $rc == 124 ]] && echo " (timed out after ${limit}s)")"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$OUT/gpu.txt" 2>&1 \
  || echo 'nvidia-smi: not available' >"$OUT/gpu.txt"
python3 - >>"$OUT/gpu.txt" 2>&1 <<'EOF'
import jax, vesper_jax
print('jax', jax.__version__, jax.devices())
print('backend:', jax.default_backend())
print('vesper_jax:', vesper_jax.__file__)
try:
  from vesper_jax.kernels import velvet_triton
  print('triton:', velvet_triton.unavailable_reason() or 'available')
except Exception as e:  # jax-triton built for another jax can fail in other ways than ImportError
  print('triton: import failed:', type(e).__name__, e)
try:
  import torch
  print('torch', torch.__version__, 'cuda' if torch.cuda.is_available() else 'no cuda')
except ImportError as e:
  print('torch: not importable:', e)
EOF
cat "$OUT/gpu.txt"
GPU=$(grep -qx 'backend: gpu' "$OUT/gpu.txt" && echo 1 || echo 0)
if [[ ${1:-} == --setup ]]; then return 0; fi  # sourced by gpu_suite_decode.sh
TIMING=$GPU
if [[ ${1:-} == --checks ]]; then TIMING=0; fi  # the correctness section alone (~2 min with the set-up)

# ------------------------------------------------------------------ correctness (before any timing)
SHOW='^(PASS|FAIL|SKIP|checks on) ' step checks 100 "${PY[@]}" experiments/gpu_checks.py --out="$OUT"

# ------------------------------------------------------------------ timing
MEDIUM=(--configs=medium --batch_size=32 --seq_len=1024)
CACHE=/tmp/jax_compilation_cache  # fresh on a fresh machine: the first bench_train compiles cold
if [[ $TIMING == 1 ]]; then
  step bench_velvet 80 "${PY[@]}" kernels/bench_velvet.py --sizes=medium,large --iters=10 --repeats=3 \
    --json "$OUT/bench_velvet.json"
  step bench_train 200 "${PY[@]}" experiments/bench_train.py "${MEDIUM[@]}" --optimizers=adamw,velvet \
    --velvet_kernels=xla,pallas,triton --steps=10 --torch --compilation_cache_dir=$CACHE --out "$OUT/bench_train.json"
  step bench_train_xla_attention 45 "${PY[@]}" experiments/bench_train.py "${MEDIUM[@]}" --optimizers=adamw \
    --attention_impl=xla --steps=5 --out "$OUT/bench_train_xla_attention.json"
  step bench_train_cached 30 "${PY[@]}" experiments/bench_train.py "${MEDIUM[@]}" --optimizers=adamw --steps=2 \
    --compilation_cache_dir=$CACHE --out "$OUT/bench_train_cached.json"
elif [[ $GPU == 1 ]]; then
  echo '=== timing: skipped (--checks)'
else
  echo "=== timing: skipped (no GPU: $(grep '^backend:' "$OUT/gpu.txt" || echo 'JAX did not start'))"
fi

echo "=== summary"
python3 experiments/gpu_summary.py --dir="$OUT" --steps="$LOGS/steps.tsv" --device_file="$OUT/gpu.txt"
ls -la "$OUT"
