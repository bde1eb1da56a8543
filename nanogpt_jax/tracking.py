"""A run's metrics: one JSON object per line in out_dir/metrics.jsonl, optionally mirrored to Weights & Biases.

Every record is written with one write call and ends with a newline, so a killed run can leave at most a
torn last line without its newline; readers skip it, and a resumed run rewrites the file without it.
"""

import json
import os
from pathlib import Path

from .config import UserError

METRICS = "metrics.jsonl"


class MetricsError(UserError):
    """metrics.jsonl is missing or unreadable."""


def read_metrics(out_dir: str) -> list[dict]:
    """The records of out_dir/metrics.jsonl in order, without a torn last line."""
    path = Path(out_dir) / METRICS
    if not path.is_file():
        raise MetricsError(f"{path} not found: is {out_dir} the --out_dir of a training run?")
    *lines, _torn = path.read_text(encoding="utf-8").split("\n")  # _torn is "" unless the writer was killed
    records = []
    for n, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict):
            raise MetricsError(f"{path}:{n} is not a JSON object; fix or delete that line")
        records.append(record)
    return records


def keep_history(out_dir: str, resume_iter: int) -> None:
    """Drop the records from resume_iter on (the resumed run logs them again); the rewrite is atomic."""
    path = Path(out_dir) / METRICS
    records = read_metrics(out_dir) if path.is_file() else []
    tmp = path.with_name(METRICS + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records if r.get("iter", -1) < resume_iter)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def start_wandb(out_dir: str, options: dict):
    """wandb.init(**options) with its files under out_dir; WANDB_MODE=offline etc. are wandb's own."""
    try:
        import wandb
    except ImportError:
        raise MetricsError("wandb logging needs wandb: pip install wandb (or 'nanogpt-jax[wandb]')") from None
    return wandb.init(dir=str(out_dir), **options)


class MetricsLog:
    """out_dir/metrics.jsonl of one run (and a wandb run if `wandb` holds wandb.init's options); a context manager.

    resume_iter: None starts a new file; else the iteration the resumed run starts at (its checkpoint's
    iter_num), and the records from it on are dropped. enabled=False (processes other than 0) writes nothing.
    """

    def __init__(self, out_dir: str, *, resume_iter: int | None, enabled: bool = True, wandb: dict | None = None):
        self.file = self.run = None
        if not enabled:
            return
        if resume_iter is not None:
            keep_history(out_dir, resume_iter)
        # Unbuffered append: each record reaches the file in one write() call.
        self.file = open(Path(out_dir) / METRICS, "ab" if resume_iter is not None else "wb", buffering=0)
        if wandb is not None:
            try:
                self.run = start_wandb(out_dir, wandb)
            except BaseException:
                self.file.close()
                raise

    def log(self, **record) -> None:
        """Append one record (it must have `iter`); wandb gets the others at step=iter, nulls left out."""
        if self.file is None:
            return
        self.file.write((json.dumps(record) + "\n").encode("utf-8"))
        if self.run is not None:
            self.run.log({k: v for k, v in record.items() if k != "iter" and v is not None}, step=record["iter"])

    def close(self) -> None:
        """Close the file and finish the wandb run; safe to call twice."""
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.run is not None:
            self.run.finish()
            self.run = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
