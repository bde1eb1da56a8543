#!/usr/bin/env bash
# The GPU check, run on a lent GPU machine (python 3.12, jax 0.11 and the test references preinstalled,
# no network) from the repository root: install without network, run the test suite on the GPU, then
# the benchmarks. Everything it measures lands under $OUT (default ./gpu-out). About 8 minutes at most.
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export TIKTOKEN_CACHE_DIR=${TIKTOKEN_CACHE_DIR:-$(cd .. && pwd)/shared/data/tiktoken_cache}
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || echo "no nvidia-smi"
  python -c 'import jax; print("jax", jax.__version__, jax.devices())'
  git rev-parse HEAD 2>/dev/null || true
} > "$OUT/env.txt" 2>&1
pip install --no-deps --no-build-isolation -q -e . > "$OUT/install.txt" 2>&1 || pip install --no-deps -q -e . >> "$OUT/install.txt" 2>&1
# fp32 parity tests compare with transformers at 1e-4: ask for full-precision matmuls (not TF32) on the GPU.
JAX_DEFAULT_MATMUL_PRECISION=highest timeout 240 python -m pytest -q --durations=10 > "$OUT/tests.txt" 2>&1
echo "pytest exit $?" >> "$OUT/tests.txt"
timeout 200 python scripts/bench.py --gpu > "$OUT/bench.md" 2> "$OUT/bench.err"
echo "bench exit $?" >> "$OUT/bench.err"
tail -3 "$OUT/tests.txt"; cat "$OUT/bench.md"
