"""One benchmark case, measured, as one JSON line (scripts/benchmarks/ says how each side is timed):

    python scripts/bench_case.py --shape=baby --compare=torch --steps=50          # the CPU recipe's step
    python scripts/bench_case.py --bench=generate --shape=gpt2 --compare=torch --torch_compile --num_samples=8
    python scripts/bench_case.py configs/shakespeare_char.py --micro_batch_size=8 --steps=3   # any config, ours only
"""

import json
import sys

from nanogpt_jax import parallel

parallel.quiet_libtpu()  # the test extra's libtpu on a machine with no TPU: silent, as the CLI
parallel.use_all_cpu_cores()  # before JAX starts its backend, as `train` lays a CPU out

from benchmarks.case import bench  # noqa: E402
from benchmarks.presets import BenchConfig  # noqa: E402
from nanogpt_jax.cli import options  # noqa: E402
from nanogpt_jax.config import UserError  # noqa: E402


def main(argv: list[str]) -> int:
    try:
        print(json.dumps(bench(options(BenchConfig, argv))))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
