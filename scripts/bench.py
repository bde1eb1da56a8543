"""Benchmark table: each case runs `nanogpt-jax bench` in a fresh process (so peak memory is its own).

    python scripts/bench.py            # the issue's cases: CPU recipe step, char recipe step, generate
    python scripts/bench.py --quick    # small cases only (a minute)
    python scripts/bench.py --gpu      # GPU-sized cases (bfloat16, GPT-2 124M step)
"""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CPU_RECIPE = str(ROOT / "configs/shakespeare_char_cpu.py")
CHAR_RECIPE = str(ROOT / "configs/shakespeare_char.py")

CASES = {
    "quick": [
        ("CPU recipe step (4x128, 12x64)", [CPU_RECIPE, "--steps=50"]),
        ("generate, CPU recipe model, 500 tokens (block 64)", [CPU_RECIPE, "--bench=generate"]),
        ("generate, CPU recipe model, 63 tokens (all cached)", [CPU_RECIPE, "--bench=generate", "--new_tokens=63"]),
    ],
    "full": [
        ("char recipe step (6x384, 64x256), micro-batch 8", [CHAR_RECIPE, "--steps=3", "--micro_batch_size=8"]),
        ("char recipe step (6x384, 64x256), whole batch", [CHAR_RECIPE, "--steps=3"]),
    ],
    "gpu": [
        ("char recipe step (6x384, 64x256), bf16", [CHAR_RECIPE, "--steps=20", "--dtype=bfloat16"]),
        ("char recipe step, bf16, cuDNN attention",
         [CHAR_RECIPE, "--steps=20", "--dtype=bfloat16", "--attn_impl=cudnn", "--dropout=0.0"]),
        ("GPT-2 124M step (12x768, 12x1024), bf16",
         ["--steps=10", "--dtype=bfloat16", "--vocab_size=50304", "--gradient_accumulation_steps=1"]),
        ("generate, GPT-2 124M shape, 8 x 500 tokens",
         ["--bench=generate", "--dtype=bfloat16", "--vocab_size=50304", "--num_samples=8"]),
    ],
}


def run_case(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, "-m", "nanogpt_jax.cli", "bench", *args],
                          capture_output=True, text=True, cwd=ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(lines[-1])


def main(argv: list[str]) -> None:
    if "--gpu" in argv:
        cases = CASES["quick"] + CASES["gpu"]
    else:
        cases = CASES["quick"] + ([] if "--quick" in argv else CASES["full"])
    print("| case | device | result | peak RSS |")
    print("| --- | --- | --- | --- |")
    for name, args in cases:
        r = run_case(args)
        if "error" in r:
            result, device, rss = f"error: {r['error']}", "", ""
        elif r["bench"] == "train":
            result = (f"{r['ms_per_iter']:,.1f} ms/iter, {r['tokens_per_sec']:,.0f} tok/s "
                      f"({r['devices']} device(s), micro-batch {r['micro_batch']})")
            device, rss = r["device"], f"{r['peak_rss_gb']:.2f} GB"
        else:
            result = f"{r['tokens_per_sec']:,.0f} tok/s ({r['batch']} x {r['new_tokens']} new tokens)"
            device, rss = r["device"], f"{r['peak_rss_gb']:.2f} GB"
        print(f"| {name} | {device} | {result} | {rss} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
