"""Time from_pretrained on a gpt2-xl-sized checkpoint and measure the loader's peak resident memory.

    python scripts/bench_load.py --dir /tmp/bench_xl [--keep]

Writes a randomly initialised model.safetensors in the hub's layout (48 layers, 1600 wide, 25 heads,
vocab 50257, 1024 positions, float32, causal-mask buffers included: about 6.4 GB) plus config.json, then
loads it in a fresh child process that does nothing else, so the peak (VmHWM of that process) is the
loading's alone. The file is deleted afterwards unless --keep. The file was just written, so it is read
from the page cache: this is a warm load.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

XL = dict(n_layer=48, n_head=25, n_embd=1600, n_positions=1024, vocab_size=50257)


def _status_kb(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def write_checkpoint(folder: Path) -> None:
    """Random float32 tensors under the hub's names; each array is created once and never copied."""
    import safetensors.numpy

    from nanogpt_jax.model import GPTConfig
    from nanogpt_jax.pretrained import hf_config, hf_layout

    config = GPTConfig(block_size=XL["n_positions"], vocab_size=XL["vocab_size"], n_layer=XL["n_layer"],
                       n_head=XL["n_head"], n_embd=XL["n_embd"])
    rng = np.random.default_rng(0)
    tensors = {}
    for name, (_, _, shape) in hf_layout(config).items():
        tensors[name] = rng.standard_normal(shape, dtype=np.float32)
        tensors[name] *= 0.02
    mask = np.tril(np.ones((config.block_size, config.block_size), np.float32))[None, None]  # [1, 1, T, T]
    for i in range(config.n_layer):
        tensors[f"h.{i}.attn.bias"] = mask  # the same buffer 48 times: written 48 times, held once
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(hf_config(config), indent=2))
    safetensors.numpy.save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def load_child(folder: str) -> None:
    """Runs in its own process: import, load, report seconds and memory as one JSON line."""
    import jax

    from nanogpt_jax.pretrained import from_pretrained

    base_kb = _status_kb("VmRSS")
    t0 = time.perf_counter()
    config, params = from_pretrained(folder)
    jax.block_until_ready(params)
    seconds = time.perf_counter() - t0
    n = sum(x.size for x in jax.tree_util.tree_leaves(params))
    print(json.dumps(dict(seconds=seconds, n_params=int(n), base_kb=base_kb, peak_kb=_status_kb("VmHWM"),
                          end_kb=_status_kb("VmRSS"))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", required=True, help="folder for the temporary checkpoint (about 6.4 GB free)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint instead of deleting it")
    ap.add_argument("--child", choices=["write", "load"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child == "write":
        return write_checkpoint(Path(args.dir))
    if args.child == "load":
        return load_child(args.dir)

    folder = Path(args.dir)
    try:
        t0 = time.perf_counter()
        # Written in a child too, so this process stays small and the loader's numbers are its own.
        subprocess.run([sys.executable, __file__, "--dir", str(folder), "--child", "write"], check=True)
        write_s = time.perf_counter() - t0
        out = subprocess.run([sys.executable, __file__, "--dir", str(folder), "--child", "load"], check=True,
                             capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        file_gb = os.path.getsize(folder / "model.safetensors") / 1e9
        f32_gb = r["n_params"] * 4 / 1e9
        peak_gb, base_gb, end_gb = r["peak_kb"] * 1024 / 1e9, r["base_kb"] * 1024 / 1e9, r["end_kb"] * 1024 / 1e9
        rows = [
            ("file size (with mask buffers)", f"{file_gb:.2f} GB"),
            ("parameters", f"{r['n_params']:,} = {f32_gb:.2f} GB float32"),
            ("write time", f"{write_s:.1f} s"),
            ("from_pretrained time (warm cache)", f"{r['seconds']:.1f} s"),
            ("RSS after imports", f"{base_gb:.2f} GB"),
            ("peak RSS of the loading process", f"{peak_gb:.2f} GB"),
            ("RSS after loading", f"{end_gb:.2f} GB"),
            ("peak / float32 size", f"{peak_gb / f32_gb:.2f}x"),
            ("(peak - imports) / float32 size", f"{(peak_gb - base_gb) / f32_gb:.2f}x"),
        ]
        width = max(len(k) for k, _ in rows)
        for k, v in rows:
            print(f"{k:<{width}}  {v}")
    finally:
        if not args.keep and folder.exists():
            shutil.rmtree(folder)


if __name__ == "__main__":
    main()
