#!/usr/bin/env bash
# The GPU check, run on a lent GPU machine (python 3.12, jax 0.11 and the test references preinstalled,
# no network) from the repository root: install without network, the benchmark table side by side with
# transformers + torch first (what only a GPU can tell), then the test suite on the GPU, inside 8 minutes.
# Everything it measures lands under $OUT (default ./gpu-out).
#
#   bash scripts/gpu_check.sh                      # BENCH_S=330 TESTS_S=120 seconds by default
#   PYTHON=.venv/bin/python BENCH_S=60 TESTS_S=30 bash scripts/gpu_check.sh   # a rehearsal on a CPU
#
# The tests read <repo>/../shared (Tiny Shakespeare, the tiktoken cache). The device machine receives the
# repository alone: a copy in .gpu-shared/data (git-ignored, carried with the call) stands in for it there.
set -u
PY=${PYTHON:-python3}
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
if [ ! -d ../shared/data ] && [ -d .gpu-shared/data ]; then
  mkdir -p ../shared && cp -r .gpu-shared/data ../shared/
fi
export TIKTOKEN_CACHE_DIR=${TIKTOKEN_CACHE_DIR:-$(cd .. && pwd)/shared/data/tiktoken_cache}
# JAX would take 75% of the GPU at start; the torch reference shares the card in the same process.
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>&1 || echo "no nvidia-smi"
  lscpu | grep -E "Model name|^CPU\(s\)" || true
  $PY -c 'import jax; print("jax", jax.__version__, jax.devices())'
  $PY -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'
  git rev-parse HEAD 2>/dev/null || true
} > "$OUT/env.txt" 2>&1
$PY -m pip install --no-deps --no-build-isolation -q -e . > "$OUT/install.txt" 2>&1 \
  || echo "pip install failed: running from the checkout (PYTHONPATH)" >> "$OUT/install.txt"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# The cases in order of what is wanted most; a case over 200 s prints "timeout" in its row, and rows
# print as they finish, so a table cut short by BENCH_S keeps what it measured.
timeout "${BENCH_S:-330}" $PY scripts/bench.py --gpu --timeout=200 --json > "$OUT/bench.md" 2> "$OUT/bench.jsonl"
echo "bench exit $?" >> "$OUT/bench.jsonl"
# fp32 parity tests compare with transformers at 1e-4: ask for full-precision matmuls (not TF32) on the GPU.
# The test extra's corpus reader (datasets) is not on the device image: its module is left out there.
skip=""; $PY -c "import datasets" 2>/dev/null || skip="--ignore=tests/test_corpora.py"
JAX_DEFAULT_MATMUL_PRECISION=highest timeout "${TESTS_S:-120}" $PY -m pytest -q -m "not slow" -p no:cacheprovider \
  --durations=10 $skip > "$OUT/tests.txt" 2>&1
echo "pytest exit $? (124: cut at ${TESTS_S:-120} s)" >> "$OUT/tests.txt"
grep -E "passed|failed|error" "$OUT/tests.txt" | tail -3
cat "$OUT/bench.md"
