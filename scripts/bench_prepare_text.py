"""Time and peak memory of `nanogpt-jax prepare text` on a generated corpus; prints a markdown table.

    python scripts/bench_prepare_text.py [--gb=1.0] [--tokenizers=gpt2,char] [--dir=/tmp]

The corpus is Tiny Shakespeare's lines shuffled (seeded) into 100 MB files under a temporary folder in --dir,
deleted at the end with the prepared data. Each tokenizer runs in a fresh process under /usr/bin/time -v,
which gives the wall time and the peak resident memory (maximum RSS).
"""

import argparse
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from nanogpt_jax.assets import shakespeare_text

FILE_BYTES = 100_000_000


def make_corpus(folder: Path, total_bytes: int) -> int:
    lines = shakespeare_text().splitlines(keepends=True)
    rng, written, index = random.Random(0), 0, 0
    while written < total_bytes:
        rng.shuffle(lines)
        text = "".join(lines)
        with open(folder / f"{index:04d}.txt", "w", encoding="utf-8") as f:
            while f.tell() < min(FILE_BYTES, total_bytes - written):
                f.write(text)
            written += f.tell()
        index += 1
    return written


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--gb", type=float, default=1.0)
    parser.add_argument("--tokenizers", default="gpt2,char")
    parser.add_argument("--dir", default=tempfile.gettempdir())
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="prepare-text-bench.", dir=args.dir))
    try:
        (root / "corpus").mkdir()
        size = make_corpus(root / "corpus", int(args.gb * 1e9))
        files = len(list((root / "corpus").iterdir()))
        print(f"corpus: {size / 1e9:.3f} GB in {files} files, {os.cpu_count()} CPUs\n")
        print("| tokenizer | wall | MB/s | peak RSS | train tokens | val tokens |")
        print("| --- | --- | --- | --- | --- | --- |")
        for tok in args.tokenizers.split(","):
            cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "nanogpt_jax.cli", "prepare", "text",
                   f"--input={root / 'corpus'}", f"--name={tok}", f"--tokenizer={tok}", f"--data_dir={root / 'data'}"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(proc.stderr[-3000:])
            wall = re.search(r"Elapsed \(wall clock\) time.*: (\S+)", proc.stderr).group(1)
            parts = [float(p) for p in wall.split(":")]
            seconds = sum(p * 60 ** i for i, p in enumerate(reversed(parts)))
            rss_mb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1)) / 1024
            train, val = re.search(r"train ([\d,]+) tokens .* val ([\d,]+) tokens", proc.stdout).groups()
            print(f"| {tok} | {seconds:.0f} s | {size / 1e6 / seconds:.1f} | {rss_mb:,.0f} MB | {train} | {val} |",
                  flush=True)
            shutil.rmtree(root / "data" / tok)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
