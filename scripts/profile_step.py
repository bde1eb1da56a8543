"""Where a training step's time goes: ours' step at a bench shape, traced with jax.profiler, each XLA op's time
summed over the step's threads and named by the model code it came from (the HLO op_name metadata).

    python scripts/profile_step.py --shape=baby --steps=20          # the CPU recipe's step
    python scripts/profile_step.py --shape=gpt2 --steps=1 --top=15  # GPT-2 124M, 2 x 1024 on a CPU

Options are scripts/bench_case.py's (--shape, --batch_size, --dtype, ...) plus --top (rows printed, default 25).
Host CPU devices are one per core, as `train` and `bench` lay them out. On a GPU the trace's device lines
are summed the same way.
"""

import collections
import re
import sys
import tempfile
import time
from pathlib import Path

from nanogpt_jax import parallel

parallel.quiet_libtpu()  # the test extra's libtpu on a machine with no TPU: silent, as the CLI
parallel.use_all_cpu_cores()  # before JAX starts its backend

import jax  # noqa: E402

from benchmarks.ours import OursTrain  # noqa: E402
from benchmarks.presets import BenchConfig, shaped  # noqa: E402
from nanogpt_jax.cli import options  # noqa: E402


# The model part an op belongs to, from its op_name path (first match wins). Ops outside the shard_map are the
# optimizer's update; the loss's own ops sit under jvp() (its autodiff) beside jvp(GPT) (the model's).
PARTS = [("dropout's random bits", r"_bernoulli|_threefry|random_bits"), ("attention c_attn", r"attn/c_attn"),
         ("attention c_proj", r"attn/c_proj"), ("attention scores", r"/attn/"), ("mlp", r"/mlp/"),
         ("layer norms", r"/ln_"), ("logits and loss", r"wte\.attend|jvp\(\)|jvp\(jit\(_where"),
         ("embeddings", r"/wte/|/wpe/"), ("all-reduce", r"psum|pmean"), ("optimizer", r"^jit\(\w+\)/(?!shard_map)")]


def op_sources(hlo_text: str) -> tuple[dict[str, str], dict[str, str]]:
    """HLO instruction name -> 'shape  last three op_name parts' (which model line it came from), and -> the
    model part (PARTS) it belongs to."""
    sources, parts = {}, {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%(\S+) = (\S+) .*?op_name=\"([^\"]+)\"", line)
        if m:
            sources[m.group(1)] = f"{m.group(2)[:32]}  {'/'.join(m.group(3).split('/')[-3:])}"
            parts[m.group(1)] = next((part for part, rx in PARTS if re.search(rx, m.group(3))), "other")
    return sources, parts


def main(argv: list[str]) -> None:
    top = next((int(a.split("=", 1)[1]) for a in argv if a.startswith("--top=")), 25)
    cfg = shaped(options(BenchConfig, [a for a in argv if not a.startswith("--top=")]))
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryDirectory() as trace_dir:
        ours = OursTrain(cfg, tmp)
        ours(2)  # warm, as bench's timed rounds are
        with jax.profiler.trace(trace_dir):
            t0 = time.perf_counter()
            ours(cfg.steps)
            wall_ms = (time.perf_counter() - t0) / cfg.steps * 1000
        trace = jax.profiler.ProfileData.from_file(str(next(Path(trace_dir).rglob("*.xplane.pb"))))
        sources, parts = op_sources(ours.step.as_text())
    per_op = collections.Counter()
    for plane in trace.planes:
        for line in plane.lines:
            for event in line.events:
                if event.name in sources or event.name in ("all-reduce", "reduce-scatter", "all-gather"):
                    per_op[event.name] += event.duration_ns / 1e6 / cfg.steps
    busy = sum(per_op.values())
    print(f"{cfg.shape}: {wall_ms:,.1f} ms per step (wall, traced), {busy:,.1f} ms of op time summed over threads, "
          f"{ours.run.layout.devices} device(s), {jax.devices()[0].device_kind}")
    kinds = collections.Counter()
    for name, ms in per_op.items():  # dot.12, ynn_fusion.7, copy_bitcast_fusion.3 -> dot, ynn_fusion, ...
        kinds[re.sub(r"\.\d+$", "", name)] += ms
    print("by kind: " + ", ".join(f"{kind} {ms / busy:.0%}" for kind, ms in kinds.most_common(6)))
    by_part = collections.Counter()
    for name, ms in per_op.items():
        by_part[parts.get(name, "all-reduce")] += ms
    print("by part: " + ", ".join(f"{part} {ms / busy:.0%}" for part, ms in by_part.most_common()))
    print("| ms/step | share | op | shape, source |\n| ---: | ---: | --- | --- |")
    for name, ms in per_op.most_common(top):
        print(f"| {ms:,.1f} | {ms / busy:.1%} | {name} | {sources.get(name, '')} |")


if __name__ == "__main__":
    main(sys.argv[1:])
