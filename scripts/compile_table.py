"""Compile the headline configs for TPU topologies on this machine (libtpu's compiler; no TPU needed) and print
one markdown table of what each chip would hold: `python scripts/compile_table.py [--only=SUBSTRING]`.

Each case is one `nanogpt-jax compile ... --json` process, run one after another (each compile uses every core:
run it on an otherwise idle machine for the compile times). Needs `pip install -e '.[tpu]'`."""

import json
import subprocess
import sys
import time

CASES = [  # (config, options)
    ("configs/finetune_shakespeare.py", ["--topology=v5e:2x4", "--fsdp=8"]),
    ("configs/finetune_shakespeare.py", ["--topology=v3:2x2", "--fsdp=8"]),
    ("configs/finetune_shakespeare.py", ["--topology=v2:2x2", "--fsdp=8"]),
    ("configs/finetune_shakespeare.py", ["--topology=v5e:2x4", "--fsdp=8", "--scan_layers=False"]),
    ("configs/train_gpt2.py", ["--topology=v4:2x2x1"]),
    ("configs/train_gpt2.py", ["--topology=v5e:2x4"]),
    ("configs/train_gpt2.py", ["--topology=v6e:2x4"]),
    ("configs/train_gpt2.py", ["--topology=v5e:4x4"]),
    ("configs/train_gpt2.py", ["--topology=v4:2x2x2"]),
]


def main(argv):
    only = next((a.split("=", 1)[1] for a in argv if a.startswith("--only=")), "")
    timeout = int(next((a.split("=", 1)[1] for a in argv if a.startswith("--timeout=")), "1800"))
    print("| config | options | chips (hosts) | device | args GiB | temps GiB | peak GiB / HBM | fits | compile s "
          "| TFLOP per chip per step |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for config, options in CASES:
        if only not in " ".join([config, *options]):
            continue
        command = [sys.executable, "-m", "nanogpt_jax.cli", "compile", config, *options, "--json"]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            print(f"| {config} | {' '.join(options)} | | | | | | | > {timeout} (stopped) | |", flush=True)
            continue
        if proc.returncode not in (0, 3):
            print(f"| {config} | {' '.join(options)} | error: {proc.stderr.strip().splitlines()[-1][:120]} |", flush=True)
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        flops = "" if r["flops_per_device"] is None else f"{r['flops_per_device'] / 1e12:.2f}"
        print(f"| {config} | {' '.join(options)} | {r['devices']} ({r['processes']}) | {r['device_kind']} | "
              f"{r['argument_gib']:.2f} | {r['temp_gib']:.2f} | {r['peak_gib_per_device']:.2f} / "
              f"{r['hbm_gib_per_device']:.0f} | {'yes' if r['fits'] else 'no'} | {r['compile_s']:.0f} "
              f"({time.perf_counter() - t0:.0f} wall) | {flops} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
