"""Benchmark table: each case runs `scripts/bench_case.py --compare=torch` in a fresh process, which times ours and
transformers + torch alternately in that one process (and measures each side's memory in a fresh process of
its own on a CPU); the table shows both sides and the ratio (> 1: nanogpt-jax is faster).

    python scripts/bench.py            # CPU: baby, char and gpt2 train steps; GPT-2 124M decoding, batch 1 and 8
    python scripts/bench.py --quick    # baby train step and decoding at batch 1 only (a few minutes)
    python scripts/bench.py --gpu      # GPU: the same in bfloat16, GPT-2 124M at batch 32 (and 64, ours only), gpt2-xl ours only
    python scripts/bench.py --json     # also print each case's JSON line (on stderr)
    python scripts/bench.py --timeout=100   # give up a case after 100 s (its row says so)
"""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DECODE = ["--bench=generate", "--shape=gpt2", "--compare=torch", "--torch_compile", "--repeats=1"]

CASES = {
    "quick": [
        ("baby train step (CPU recipe: 4x128, 12 x 64)", ["--shape=baby", "--compare=torch", "--steps=50", "--rounds=3"]),
        ("GPT-2 124M decode, batch 1, 32 + 128 greedy", [*DECODE, "--num_samples=1", "--rounds=2"]),
    ],
    "cpu": [
        ("baby train step (CPU recipe: 4x128, 12 x 64)", ["--shape=baby", "--compare=torch", "--steps=50", "--rounds=5"]),
        ("char train step (6x384, 64 x 256, dropout 0.2, micro-batch 8)",
         ["--shape=char", "--compare=torch", "--steps=1", "--rounds=3"]),
        ("gpt2 train step (124M, 2 x 1024)", ["--shape=gpt2", "--compare=torch", "--steps=1", "--rounds=3"]),
        ("GPT-2 124M decode, batch 1, 32 + 128 greedy", [*DECODE, "--num_samples=1", "--rounds=3"]),
        ("GPT-2 124M decode, batch 8, 32 + 128 greedy", [*DECODE, "--num_samples=8", "--rounds=3"]),
    ],
    "gpu": [  # most wanted first: scripts/gpu_check.sh gives the table a few minutes in all
        ("gpt2 train step (124M, 32 x 1024), bf16, cuDNN attention",
         ["--shape=gpt2", "--compare=torch", "--steps=10", "--rounds=2", "--dtype=bfloat16", "--attn_impl=cudnn"]),
        ("gpt2 train step (124M, 64 x 1024), bf16, cuDNN attention, ours only",
         ["--shape=gpt2", "--batch_size=64", "--steps=10", "--rounds=3", "--dtype=bfloat16", "--attn_impl=cudnn"]),
        ("GPT-2 124M decode, batch 1, 32 + 128 greedy, bf16", [*DECODE, "--num_samples=1", "--rounds=2",
                                                                "--dtype=bfloat16", "--repeats=2"]),
        ("gpt2-xl train step (1.5B, 8 x 1024, micro-batch 2), bf16, remat full, scanned layers, ours only",
         ["--shape=gpt2-xl", "--steps=3", "--rounds=1", "--dtype=bfloat16", "--attn_impl=cudnn", "--remat=full"]),
        ("gpt2-xl train step, the same with the layers unrolled (--scan_layers=False), ours only",
         ["--shape=gpt2-xl", "--steps=3", "--rounds=1", "--dtype=bfloat16", "--attn_impl=cudnn", "--remat=full",
          "--scan_layers=False"]),
        ("GPT-2 124M decode, batch 8, 32 + 128 greedy, bf16", [*DECODE, "--num_samples=8", "--rounds=2",
                                                                "--dtype=bfloat16", "--repeats=2"]),
        ("char train step (6x384, 64 x 256, dropout 0.2), bf16", ["--shape=char", "--compare=torch", "--steps=20",
                                                                  "--rounds=2", "--dtype=bfloat16"]),
    ],
}


def run_case(args: list[str], timeout: float | None) -> dict:
    try:
        proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_case.py"), *args],
                              capture_output=True, text=True, cwd=ROOT, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:  # the row shows the last line; the JSON keeps the tail to read
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1], "stderr_tail": proc.stderr[-3000:]}
    return json.loads(lines[-1])


def gb(side: dict) -> str:
    if "step_peak_gb" in side:  # CPU: a fresh process per side
        return f"{side['step_peak_gb']:.2f}"
    return f"{side['peak_device_gb']:.2f}" if "peak_device_gb" in side else ""


def speed(r: dict, bench: str) -> str:
    if bench == "train":
        return f"{r['ms_per_iter']:,.1f} ms/iter, {r['tokens_per_sec']:,.0f} tok/s"
    return f"{r['tokens_per_sec']:,.1f} tok/s ({r['ms_per_call']:,.0f} ms/call)"


def flops(r: dict) -> str:
    if "tflops_per_sec" not in r:
        return ""
    text = f"{r['tflops_per_sec'] * 1000:,.1f} GFLOP/s"
    if "flops_per_iter_xla" in r:
        text += f" (XLA count {r['flops_per_iter_xla'] / r['flops_per_iter_formula']:.2f}x formula)"
    return text + (f", MFU {r['mfu'] * 100:.1f}%" if r.get("mfu") is not None else "")


def row(name: str, r: dict) -> str:
    if "error" in r:
        return f"| {name} | | error: {r['error']} | | | | | |"
    t = r.get("torch")
    ours, theirs = speed(r, r["bench"]), (f"{speed(t, r['bench'])} ({t['name']})" if t else "")
    ratio = f"{r['ratio']:.2f}x" if t else ""
    if r["bench"] == "generate" and t:
        ratio += ", same tokens" if r["same_tokens"] else f", tokens differ from #{r['first_different_token']}"
    memory = f"{gb(r)} / {gb(t)}" if t else gb(r)
    compile_s = f"{r['compile_s']:.1f} / {t['compile_s']:.1f}" if t else f"{r['compile_s']:.1f}"
    device = r["device"] + (f", {r['malloc']}" if r.get("malloc", "glibc") != "glibc" else "")
    return f"| {name} | {device} | {ours} | {theirs} | {ratio} | {flops(r)} | {memory} | {compile_s} |"


def main(argv: list[str]) -> None:
    kind = "gpu" if "--gpu" in argv else "quick" if "--quick" in argv else "cpu"
    timeout = next((float(a.split("=", 1)[1]) for a in argv if a.startswith("--timeout=")), None)
    print("| case | device | nanogpt-jax | transformers + torch | ratio | nanogpt-jax FLOP/s | peak GB (ours / torch) "
          "| compile s (ours / torch) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, args in CASES[kind]:
        r = run_case(args, timeout)
        print(row(name, r), flush=True)
        if "--json" in argv:
            print(json.dumps(r), file=sys.stderr, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
