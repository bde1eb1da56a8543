"""nanoGPT's CPU recipe end to end, side by side: `nanogpt-jax train configs/shakespeare_char_cpu.py` against
nanoGPT's own train.py with its README's CPU command, alternating (ours, theirs, ours, theirs, ...), each run a
fresh process on the same Tiny Shakespeare files, with its wall time, median ms/iter (from its log lines),
best val loss and peak RSS (the kernel's count for that process).

    python scripts/bench_recipe.py --nanogpt=PATH/TO/nanoGPT            # 2 rounds of 2000 iterations
    python scripts/bench_recipe.py --nanogpt=PATH --rounds=3 --max_iters=500
    python scripts/bench_recipe.py --nanogpt=PATH --ours_at=/tmp/old   # also a checkout of another commit

--ours_at (repeatable) adds a checkout of nanogpt-jax at another commit (`git worktree add /tmp/old COMMIT`) to
each round, run the same way from its own folder, so that two versions are compared in one alternating session.

PATH is a checkout of karpathy/nanoGPT (train.py, model.py, configurator.py, config/); torch must be installed
(the test extra). nanoGPT runs in a temporary folder holding links to its files and a data/shakespeare_char/
prepared by `nanogpt-jax prepare shakespeare_char` (the same train.bin / val.bin, with nanoGPT's meta.pkl).
Our compilation cache is off, so every run of ours compiles as a first run does.
"""

import argparse
import json
import os
import pickle
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NANOGPT_CPU = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20",
               "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128",
               "--max_iters=2000", "--lr_decay_iters=2000", "--dropout=0.0"]  # nanoGPT's README, as written
ITER = re.compile(r"^iter (\d+): loss [\d.]+, .*?time ([\d.]+)ms")
VAL = re.compile(r"^step (\d+): train loss ([\d.]+), val loss ([\d.]+)")


def prepare(work: Path) -> Path:
    """Tiny Shakespeare prepared by us, with nanoGPT's meta.pkl beside it (the same vocabulary); returns its folder."""
    subprocess.run([sys.executable, "-m", "nanogpt_jax.cli", "prepare", "shakespeare_char", f"--data_dir={work}"],
                   check=True, capture_output=True, cwd=ROOT)
    folder = work / "shakespeare_char"
    itos = json.loads((folder / "meta.json").read_text(encoding="utf-8"))["itos"]
    chars = [itos[i] for i in range(len(itos))] if isinstance(itos, list) else [itos[str(i)] for i in range(len(itos))]
    meta = {"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": {c: i for i, c in enumerate(chars)}}
    (folder / "meta.pkl").write_bytes(pickle.dumps(meta))
    return folder


def nanogpt_folder(nanogpt: Path, data: Path, work: Path) -> Path:
    """A folder nanoGPT's train.py runs in: links to its code and config/, and data/shakespeare_char."""
    folder = work / "nanogpt"
    (folder / "data").mkdir(parents=True)
    for name in ("train.py", "model.py", "configurator.py", "config"):
        (folder / name).symlink_to(nanogpt / name)
    (folder / "data" / "shakespeare_char").symlink_to(data)
    return folder


def timed(command: list[str], cwd: Path, env: dict) -> dict:
    """One run: its wall time, median ms/iter over the logged iterations after the first, best val loss and
    peak RSS (os.wait4's count for this child alone)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if status:
        raise RuntimeError(f"{' '.join(command[:4])} failed:\n{out[-3000:]}")
    ms = [float(m.group(2)) for m in map(ITER.match, out.splitlines()) if m and int(m.group(1)) > 0]
    vals = [float(m.group(3)) for m in map(VAL.match, out.splitlines()) if m]
    return {"wall_s": wall, "ms_per_iter": statistics.median(ms), "best_val": min(vals),
            "peak_rss_mb": usage.ru_maxrss / 1024}


def _commit(checkout: Path) -> str:
    """The short commit a checkout is at (its folder's name if git cannot tell)."""
    done = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() or checkout.name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nanogpt", type=Path, required=True, help="a checkout of karpathy/nanoGPT")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max_iters", type=int, default=2000, help="both sides (and lr_decay_iters)")
    parser.add_argument("--ours_at", type=Path, action="append", default=[],
                        help="a checkout of nanogpt-jax at another commit, run in each round too")
    args = parser.parse_args()
    if not (args.nanogpt / "train.py").is_file():
        sys.exit(f"error: --nanogpt={args.nanogpt} holds no train.py: give a checkout of karpathy/nanoGPT")
    for other in args.ours_at:
        if not (other / "nanogpt_jax" / "cli.py").is_file():
            sys.exit(f"error: --ours_at={other} holds no nanogpt_jax/cli.py: give a checkout of nanogpt-jax")
    ours = {"nanogpt-jax": ROOT, **{f"nanogpt-jax at {_commit(p)}": p.resolve() for p in args.ours_at}}
    length = [f"--max_iters={args.max_iters}", f"--lr_decay_iters={args.max_iters}"]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = prepare(work)
        theirs_cwd = nanogpt_folder(args.nanogpt.resolve(), data, work)
        env = {**os.environ, "NANOGPT_JAX_COMPILE_CACHE": "0"}
        runs = {**{side: [] for side in ours}, "nanoGPT": []}
        for r in range(args.rounds):
            for i, (side, root) in enumerate(ours.items()):
                runs[side].append(timed(
                    [sys.executable, "-m", "nanogpt_jax.cli", "train", "configs/shakespeare_char_cpu.py",
                     f"--data_dir={work}", f"--out_dir={work}/ours{i}_{r}", *length], root,
                    {**env, "PYTHONPATH": str(root)}))
            runs["nanoGPT"].append(timed(
                [sys.executable, "train.py", *NANOGPT_CPU, f"--out_dir={work}/theirs{r}", *length], theirs_cwd, env))
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]['ms_per_iter']:.1f} ms/iter" for k, v in runs.items()),
                  file=sys.stderr, flush=True)
    print("| side | ms/iter, median of runs (each run's median) | runs | wall s | best val loss | peak RSS MB |")
    print("| --- | --- | --- | --- | --- | --- |")
    for side, rs in runs.items():
        ms = statistics.median(r["ms_per_iter"] for r in rs)
        cells = [", ".join(f"{r[key]:{spec}}" for r in rs)
                 for key, spec in (("ms_per_iter", ".1f"), ("wall_s", ".0f"), ("best_val", ".4f"), ("peak_rss_mb", ".0f"))]
        print(f"| {side} | {ms:.1f} | " + " | ".join(cells) + " |")
    theirs = statistics.median(r["ms_per_iter"] for r in runs["nanoGPT"])
    for side in ours:
        ms = statistics.median(r["ms_per_iter"] for r in runs[side])
        print(f"\nratio (nanoGPT ms/iter / {side}): {theirs / ms:.2f}x; per round: "
              + ", ".join(f"{t['ms_per_iter'] / o['ms_per_iter']:.2f}x" for o, t in zip(runs[side], runs["nanoGPT"])))


if __name__ == "__main__":
    main()
