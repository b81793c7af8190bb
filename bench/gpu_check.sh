#!/usr/bin/env bash
# Every GPU measurement the project owes, in one command, on one H100/H200 (budget: 10 minutes;
# step limits sized from the first run on an H200, 2026-12-04, where the 8-minute version timed out
# in four steps).
#
#   bash bench/gpu_check.sh            # from the repository root, on the GPU machine
#
# The lent GPU machines have Python 3.12, jax 0.11.2, triton 3.6.0, flax, optax, orbax and
# transformers but no network: carry jax-triton 0.3.1 as a wheel in wheels/ (see BUILD.md) and the
# SmolLM2 asset in $CALDERA_JAX_CACHE (default ~/.cache/caldera-jax) when the decode figure is wanted.
# Results (JSON per step + the log) go to bench/results/gpu/ ($GPU_OUT overrides), and a copy to
# $OUT when the device tool sets it. Each step has its own time limit; a failing step is logged and
# the script goes on, so one broken kernel does not cost the other figures. Exit status: the number
# of failed steps.
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${GPU_OUT:-bench/results/gpu}
mkdir -p "$OUTDIR"
LOG="$OUTDIR/gpu_check.log"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false
failed=0

step() {   # step NAME SECONDS CMD...
  local name=$1 secs=$2; shift 2
  local t0=$SECONDS
  echo "=== $name (limit ${secs}s): $*" | tee -a "$LOG"
  timeout "$secs" "$@" >>"$LOG" 2>&1
  local rc=$?
  echo "=== $name: rc=$rc in $((SECONDS - t0))s" | tee -a "$LOG"
  [ $rc -eq 0 ] || failed=$((failed + 1))
}

: >"$LOG"
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import jax, sys; print('python', sys.version.split()[0], 'jax', jax.__version__, jax.devices())"
} 2>&1 | tee -a "$LOG"

if ! $PY -c "import jax_triton" 2>/dev/null && ls wheels/jax_triton-*.whl >/dev/null 2>&1; then
  step "install jax-triton (carried wheel)" 120 $PY -m pip install --no-deps --no-index wheels/jax_triton-*.whl
fi

# 1. Compiled kernels: Pallas (Triton lowering) and jax-triton against the float64 reference (the
#    interpret-mode kernel tests run in CI on CPU; here only the compiled ones: ~25 s on an H200).
step "kernel tests (compiled Pallas, jax-triton)" 60 \
  $PY -m pytest -q tests/test_kernels.py -k "compiled_on_gpu or jax_triton" -p no:cacheprovider
# 2. The QLR linear per backend vs dense bf16, full grid; writes the measured backend table.
step "bench.qlr_linear (full grid, --write-table)" 180 \
  $PY -m bench.qlr_linear --write-table --out "$OUTDIR/qlr_linear.json"
# 3. Decode tokens/s: SmolLM2-135M with QLR linears vs float. Without the asset (it is 540 MB: too
#    big to carry to a GPU machine), a model of its exact shape (bench/smollm2_shape_config.json) with
#    random weights: decode time does not depend on the weight values.
DECODE_MODEL=$($PY -c "from experiments.assets import asset_path; print(asset_path('smollm2-135m-instruct'))" 2>/dev/null)
if [ ! -f "$DECODE_MODEL/config.json" ]; then
  DECODE_MODEL=/tmp/smollm2-shape-random
  step "random-weight SmolLM2-shaped model" 40 $PY -c "
from transformers import AutoConfig, AutoModelForCausalLM
AutoModelForCausalLM.from_config(AutoConfig.from_pretrained('bench/smollm2_shape_config.json')).save_pretrained('$DECODE_MODEL')"
fi
step "bench.decode_qlr ($DECODE_MODEL)" 120 $PY -m bench.decode_qlr --model "$DECODE_MODEL" --out "$OUTDIR/decode_qlr.json"
# 4. The 4096x4096 rank-256 decomposition (goal < 30 s).
step "bench.decompose 4096 (rank 256)" 100 \
  $PY -m bench.decompose --size 4096 --rank 256 --repeats 2 --skip-table --out "$OUTDIR/decompose_4096.json"
# 5. Every dispatch codec at ep=1 on the GPU.
step "bench.moe_ep ep=1" 90 $PY -m bench.moe_ep --ep 1 --repeats 5 --out "$OUTDIR/moe_ep_ep1.json"

echo "failed steps: $failed; results in $OUTDIR" | tee -a "$LOG"
if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then cp -r "$OUTDIR" "$OUT/"; fi
exit $failed
