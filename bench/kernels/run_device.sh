#!/bin/bash
# One GPU-machine call: kernel correctness + per-layer timing (bench/kernels/run.py), then the GPU
# kernel tests (tests/test_kernels_gpu.py). Run from the repository root with .device carried:
#   bash bench/kernels/run_device.sh            # results under $OUT (default ./out)
# Env: BUDGET (s of timing configs, default 330), CORR (s of correctness checks, default 150),
#      PYTEST_K (pytest -k expression, default: all GPU kernel tests),
#      PROFILE (set: per-launch GPU times of a few configs, bench/kernels/profile_launches.py;
#               PROFILE_ARGS="--configs 'no-sharing'" for some of them),
#      PROBE (set: prefix-pass probe, gather vs TMA vs FlashInfer dense, bench/kernels/prefix_probe.py;
#             PROBE_ARGS=--no-flashinfer for the Triton launches only),
#      GATE (set: the relay gate against measured time, bench/kernels/gate_sweep.py, before the bench;
#            GATE_BUDGET s, default 240),
#      EXTEND (set: extend-attention probe over a shared cached prefix, bench/kernels/extend_probe.py;
#              EXTEND_ARGS for its arguments),
#      SKIP_BENCH (set: no bench/kernels/run.py, only the probes and the tests),
#      RUN_ARGS (more bench/kernels/run.py arguments, e.g. "--configs 'P=8192' --kernels fi_decode,relay_hybrid").
# With .device/jit-cache.tar.xz (bench/serving/run_serving.py --save-jit-cache) the FlashInfer
# modules it holds are installed as AOT modules and Triton's cache is reused: no nvcc for those.
T0=$(date +%s)
cd "$(dirname "$0")/../.." || exit 1
OUT=${OUT:-./out}
mkdir -p "$OUT" /tmp/site
if [ ! -f /tmp/site/.relay_site_stamp ]; then
  tar -C /tmp/site -xJf .device/site312.tar.xz && touch /tmp/site/.relay_site_stamp
fi
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 FLASHINFER_WORKSPACE_BASE=/tmp/fiws PATH=/usr/local/cuda/bin:$PATH
export TRITON_CACHE_DIR=/tmp/triton-cache
if [ -f .device/jit-cache.tar.xz ] && [ ! -d /tmp/jit-cache ]; then
  mkdir -p /tmp/jit-cache /tmp/site/flashinfer/data/aot "$TRITON_CACHE_DIR"
  tar -C /tmp/jit-cache -xJf .device/jit-cache.tar.xz
  cp -a /tmp/jit-cache/aot/. /tmp/site/flashinfer/data/aot/
  [ -d /tmp/jit-cache/triton ] && cp -a /tmp/jit-cache/triton/. "$TRITON_CACHE_DIR"/
fi
# $OUT brings back only a few files: the install log stays here unless the install fails.
python3 -m pip install -q --no-deps --no-index --no-build-isolation --upgrade --target /tmp/site . > /tmp/pip.log 2>&1 \
  || { tail -20 /tmp/pip.log; exit 1; }
# The repository root comes first on sys.path for pytest and the bench (they import tests.*):
# let its relay_radix/ see the kernels/ and patches/ folders as installed (package-dir mapping).
ln -sfn ../kernels relay_radix/kernels
ln -sfn ../patches relay_radix/patches
if [ -n "${PROFILE:-}" ]; then  # per-launch times (bench/kernels/profile_launches.py) first
  eval "set -- ${PROFILE_ARGS:-}"
  python3 bench/kernels/profile_launches.py --out "$OUT" "$@" > "$OUT/profile.log" 2>&1
  echo "profile rc=$? at $(( $(date +%s) - T0 ))s"
fi
if [ -n "${PROBE:-}" ]; then
  python3 bench/kernels/prefix_probe.py --out "$OUT" ${PROBE_ARGS:-} > "$OUT/probe.log" 2>&1
  echo "probe rc=$? at $(( $(date +%s) - T0 ))s"
fi
if [ -n "${EXTEND:-}" ]; then
  python3 bench/kernels/extend_probe.py --out "$OUT" ${EXTEND_ARGS:-} > "$OUT/extend.log" 2>&1
  echo "extend probe rc=$? at $(( $(date +%s) - T0 ))s"
fi
if [ -n "${GATE:-}" ]; then
  python3 bench/kernels/gate_sweep.py --out "$OUT" --budget-s "${GATE_BUDGET:-240}" > "$OUT/gate.log" 2>&1
  echo "gate sweep rc=$? at $(( $(date +%s) - T0 ))s"
fi
eval "set -- ${RUN_ARGS:-}"
if [ -z "${SKIP_BENCH:-}" ]; then
  python3 bench/kernels/run.py --out "$OUT" --budget-s "${BUDGET:-330}" --correctness-s "${CORR:-150}" "$@" \
    > "$OUT/kernels.log" 2>&1
  echo "bench rc=$? at $(( $(date +%s) - T0 ))s"
fi
LEFT=$(( 560 - ($(date +%s) - T0) ))
if [ "$LEFT" -gt 30 ]; then
  timeout "$LEFT" python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels_gpu.py ${PYTEST_K:+-k "$PYTEST_K"} \
    > "$OUT/kernels-pytest.log" 2>&1
  echo "pytest rc=$? at $(( $(date +%s) - T0 ))s"
fi
tail -3 "$OUT/kernels-pytest.log" 2>/dev/null
du -sh /tmp/fiws 2>/dev/null  # FlashInfer JIT cache (does it fit in what a call carries?)
rm -f relay_radix/kernels relay_radix/patches
