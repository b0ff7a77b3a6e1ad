#!/usr/bin/env bash
# The GPU recording in one call (docs/gpu_recording.md says how to launch it and what to do with
# the tarball). ON THE GPU MACHINE, in the repo root, with the wheels of
# scripts/gpu_fetch_wheels.sh carried in .whl/:
#   scripts/gpu_record.sh                 -> $OUT/gpu_record.tar.gz and $OUT/log.txt
# Here, on a CPU, the same steps on a tiny configuration:
#   scripts/gpu_record.sh --dry-run [--only EXP,...]
# It stops itself: the Python driver skips experiments that would not fit in BUDGET_S, is killed
# at PY_TIMEOUT_S, and the report and the tarball are written after it in any case.
set -u
cd "$(dirname "$0")/.."
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT=${OUT:-/tmp/gpu_record_out}
REC=${REC:-/tmp/gpu_record}            # its basename is the tarball's top folder
BUDGET_S=${BUDGET_S:-410}
PY_TIMEOUT_S=${PY_TIMEOUT_S:-440}
PY=${PY:-python3}
rm -rf "$REC"
mkdir -p "$REC" "$OUT"
exec > >(tee -a "$REC/log.txt") 2>&1
t0=$(date +%s)
echo "== gpu_record $(date -u +%FT%TZ) dry_run=$DRY budget=${BUDGET_S}s timeout=${PY_TIMEOUT_S}s"

# 1. The carried wheels (no network there) and the project itself (from this checkout).
if ls .whl/*.whl >/dev/null 2>&1; then
  if $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl; then
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "WARNING: installing the carried wheels failed"
  fi
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 TFDS_DISABLE_GCS=1
[ $DRY = 1 ] && export JAX_PLATFORMS=cpu

# 2. What it ran on.
{
  echo "## nvidia-smi"; nvidia-smi 2>&1 || echo "(no nvidia-smi)"
  echo "## nvidia-smi --query-gpu"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,compute_mode --format=csv 2>&1 || true
  echo "## python and jax"
  $PY -c "import sys, jax, jaxlib; print(sys.version); print('jax', jax.__version__, 'jaxlib', jaxlib.__version__); print(jax.devices())" 2>&1
  echo "## packages"
  $PY -m pip list 2>/dev/null | grep -i -E "^(jax|flax|optax|numpy|tensorflow|array|mlxtend|orbax)" || true
} > "$REC/env.txt" 2>&1
cat "$REC/env.txt"

# 3. CUDA MPS: the paper's mechanism for the 'processes' backend. Whether it ran is recorded.
MPS=not_tried
if [ $DRY = 0 ]; then
  if ! command -v nvidia-cuda-mps-control >/dev/null 2>&1; then
    MPS=no_binary
  elif nvidia-cuda-mps-control -d; then
    sleep 1; MPS=started
  else
    MPS=failed_to_start
  fi
fi
PREFLIGHT="import jax, jax.numpy as jnp; assert jax.default_backend() == 'gpu', jax.default_backend(); print(jax.devices(), float(jnp.ones(8).sum()))"
if [ "$MPS" = started ] && ! timeout -k 5 90 $PY -c "$PREFLIGHT"; then
  echo "MPS started but a CUDA client could not use the GPU under it: stopping MPS"
  echo quit | nvidia-cuda-mps-control; sleep 1; MPS=started_but_unusable
fi
echo "MPS: $MPS" | tee -a "$REC/env.txt"
export MTFL_MPS_STATUS=$MPS

# 4. Several processes share the GPU: no preallocation, and a cap per process.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.12}
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/jax_cache_gpu_record}  # outside the tarball
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0

# 5. The recording, stopped at PY_TIMEOUT_S whatever happens.
ARGS=(--out "$REC" --budget-s "$BUDGET_S")
[ $DRY = 1 ] && ARGS+=(--dry-run)
timeout -k 10 "$PY_TIMEOUT_S" $PY -m mtfl_jax.experiments.gpu_record "${ARGS[@]}" "$@"
rc=$?
echo "== recording exit code $rc after $(( $(date +%s) - t0 ))s"
if [ $rc != 0 ]; then  # killed or crashed: the report from what finished
  timeout -k 5 45 $PY -m mtfl_jax.experiments.gpu_record --out "$REC" --finish || echo "WARNING: --finish failed"
fi
if [ "$MPS" = started ]; then echo quit | nvidia-cuda-mps-control && echo "MPS stopped"; fi

# 6. One tarball (and the log beside it, in case the tarball is what broke).
echo "== packing after $(( $(date +%s) - t0 ))s; recording exit code $rc" | tee -a "$REC/env.txt"
tar -czf "$OUT/gpu_record.tar.gz" -C "$(dirname "$REC")" "$(basename "$REC")"
cp "$REC/log.txt" "$OUT/log.txt"
ls -la "$OUT"
exit 0
