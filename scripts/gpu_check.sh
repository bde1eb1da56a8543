#!/usr/bin/env bash
# The GPU check, run on a lent GPU machine (python 3.12, jax 0.11 and the test references preinstalled,
# no network) from the repository root: install without network, the benchmark table side by side with
# transformers + torch first (what only a GPU can tell), then the test suite on the GPU, all inside 8 minutes.
# Everything it measures lands under $OUT (default ./gpu-out). Usage: bash scripts/gpu_check.sh
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export TIKTOKEN_CACHE_DIR=${TIKTOKEN_CACHE_DIR:-$(cd .. && pwd)/shared/data/tiktoken_cache}
# JAX would take 75% of the GPU at start; the torch reference shares the card in the same process.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || echo "no nvidia-smi"
  python -c 'import jax; print("jax", jax.__version__, jax.devices())'
  python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'
  git rev-parse HEAD 2>/dev/null || true
} > "$OUT/env.txt" 2>&1
pip install --no-deps --no-build-isolation -q -e . > "$OUT/install.txt" 2>&1 || pip install --no-deps -q -e . >> "$OUT/install.txt" 2>&1
# Each case at most 110 s (a slow one prints "timeout" in its row); rows print as they finish.
timeout 300 python scripts/bench.py --gpu --timeout=110 --json > "$OUT/bench.md" 2> "$OUT/bench.jsonl"
echo "bench exit $?" >> "$OUT/bench.jsonl"
# fp32 parity tests compare with transformers at 1e-4: ask for full-precision matmuls (not TF32) on the GPU.
JAX_DEFAULT_MATMUL_PRECISION=highest timeout 150 python -m pytest -q -x -m "not slow" --durations=10 > "$OUT/tests.txt" 2>&1
echo "pytest exit $?" >> "$OUT/tests.txt"
tail -3 "$OUT/tests.txt"; cat "$OUT/bench.md"
