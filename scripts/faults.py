"""Fault injection for checkpointing and the training loop: rerun after any change to either.

A tiny shakespeare_char run that saves every iteration is stopped again and again, each time resumed with
--init_from=resume: SIGKILLs at random moments (some while a save is on disk half-written, an
`*.orbax-checkpoint-tmp*` folder) and SIGTERMs at random moments (a clean stop that saves). The last run goes
to max_iters. Its latest checkpoint (params and AdamW state, by checksum) and its metrics.jsonl losses must
equal those of one uninterrupted run, bit for bit.

    python scripts/faults.py --kills=10 --terms=3 --seed=0

Prints one table row and exits 0 when everything is equal, 1 otherwise."""

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = ["--dataset=shakespeare_char", "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32",
        "--batch_size=8", "--eval_iters=2", "--log_interval=1", "--eval_interval=1", "--learning_rate=1e-3",
        "--warmup_iters=5", "--min_lr=1e-4", "--dropout=0.0", "--dtype=float32"]
TMP = "*/*orbax-checkpoint-tmp*"  # a save in flight: orbax renames its folder to the step number last


def complete_steps(out_dir: Path) -> list[int]:
    """The iterations of the complete `latest` checkpoints."""
    return sorted(int(p.name) for p in (out_dir / "checkpoints" / "latest").glob("*") if p.name.isdigit())


def saving(out_dir: Path) -> bool:
    return any((out_dir / "checkpoints").glob(TMP))


def train(command: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_until_training(proc, out_dir: Path, timeout=300) -> bool:
    """Until this run has saved a checkpoint of its own (it is past start-up); False if it ended first."""
    start, deadline = complete_steps(out_dir), time.monotonic() + timeout
    while complete_steps(out_dir) == start:
        if proc.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def interrupt(proc, out_dir: Path, fault: str, rng: random.Random) -> str:
    """Send `fault` ('kill', 'kill-mid-save' or 'term') once the run trains: 'caught mid-save', 'sent', or
    'missed' (the run ended first)."""
    if not wait_until_training(proc, out_dir):
        return "missed"
    if fault == "kill-mid-save":
        deadline = time.monotonic() + 60
        while not saving(out_dir) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.0005)
    else:
        time.sleep(rng.uniform(0.0, 1.0))
    mid_save = saving(out_dir)
    proc.send_signal(signal.SIGTERM if fault == "term" else signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    expected = 0 if fault == "term" else -signal.SIGKILL
    if proc.returncode != expected:
        sys.exit(f"{fault}: exit {proc.returncode}, expected {expected}\n{err[-3000:]}")
    return "caught mid-save" if mid_save and fault != "term" else "sent"


def result(out_dir: Path):
    """(checksums of the latest checkpoint's params and optimizer state, training losses, val losses)."""
    from nanogpt_jax.checkpoint import checksum
    from nanogpt_jax.load import load_run
    _, params, record = load_run(str(out_dir))  # verifies both against the checksums saved with them
    metrics = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return (record.iter_num, checksum(params), record.checksums["optimizer"], [(m["iter"], m["loss"]) for m in metrics if "loss" in m],
            [(m["iter"], m["val_loss"]) for m in metrics if "val_loss" in m])


def finish(proc) -> None:
    _, err = proc.communicate(timeout=1800)
    if proc.returncode != 0:
        sys.exit(f"a run failed (exit {proc.returncode}):\n{err[-3000:]}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=10, help="SIGKILLs (the first while a save is in flight)")
    ap.add_argument("--terms", type=int, default=3, help="SIGTERMs")
    ap.add_argument("--seed", type=int, default=0, help="seeds the order and moments of the faults")
    ap.add_argument("--max_iters", type=int, default=150)
    ap.add_argument("--workdir", help="where the data and both runs go (default: a temporary folder)")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="faults-"))
    sys.path.insert(0, str(REPO))
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the runs' platform: bit-exact resume is a CPU claim
    from nanogpt_jax.data import prepare
    prepare("shakespeare_char", data_dir=str(work / "data"))
    os.environ.setdefault("NANOGPT_JAX_COMPILE_CACHE", str(work / "xla"))  # restarts skip compiling
    base = [sys.executable, "-m", "nanogpt_jax.cli", "train", *TINY, f"--data_dir={work / 'data'}",
            f"--max_iters={args.max_iters}", f"--lr_decay_iters={args.max_iters}"]
    started = time.monotonic()
    finish(train([*base, f"--out_dir={work / 'reference'}"]))
    rest = rng.choices(["kill", "kill-mid-save"], k=max(args.kills - 1, 0)) + ["term"] * args.terms
    rng.shuffle(rest)
    faults = ["kill-mid-save"] * min(args.kills, 1) + rest
    out, outcomes = work / "faulted", []
    for i, fault in enumerate(faults):
        proc = train([*base, f"--out_dir={out}", *(["--init_from=resume"] if i else [])])
        outcomes.append((fault, interrupt(proc, out, fault, rng)))
    finish(train([*base, f"--out_dir={out}", "--init_from=resume"]))
    equal = result(out) == result(work / "reference")
    sent = [(f, o) for f, o in outcomes if o != "missed"]
    row = {"kills": sum(f != "term" for f, _ in sent), "terms": sum(f == "term" for f, _ in sent),
           "resumes": len(faults), "mid-save kills caught": sum(o == "caught mid-save" for _, o in sent),
           "missed (run ended first)": len(outcomes) - len(sent), "equal": "yes" if equal else "no",
           "time": f"{time.monotonic() - started:.0f} s"}
    print(" | ".join(row))
    print(" | ".join(str(v) for v in row.values()))
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())
