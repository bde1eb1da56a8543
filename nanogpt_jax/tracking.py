"""A run's metrics: one JSON object per line in out_dir/metrics.jsonl, optionally mirrored to Weights & Biases.

Every record is written with one write call and ends with a newline, so a killed run can leave at most a
torn last line without its newline; readers skip it, and a resumed run rewrites the file without it.

out_dir may be a bucket (`gs://bucket/run`): every file goes through etils `epath`, the path library orbax
uses. Objects in a bucket cannot be appended to (gcsfs silently turns append into overwrite), so there the
whole file is rewritten from memory at most every FLUSH_SECONDS and when the run ends.
"""

import json
import os
import time

from etils import epath

from .config import UserError

METRICS = "metrics.jsonl"
FLUSH_SECONDS = 30.0  # how stale a bucket's metrics.jsonl may get


def on_object_store(path) -> bool:
    """A bucket path such as gs://bucket/run (no appends, no renames in place, no file locks)."""
    return "://" in str(path)


class MetricsError(UserError):
    """metrics.jsonl is missing or unreadable."""


def read_metrics(out_dir: str) -> list[dict]:
    """The records of out_dir/metrics.jsonl in order, without a torn last line."""
    path = epath.Path(out_dir) / METRICS
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


def keep_history(out_dir: str, resume_iter: int) -> list[str]:
    """Drop the records from resume_iter on (the resumed run logs them again); returns the kept lines."""
    path = epath.Path(out_dir) / METRICS
    records = read_metrics(out_dir) if path.is_file() else []
    lines = [json.dumps(r) + "\n" for r in records if r.get("iter", -1) < resume_iter]
    rewrite(path, lines)
    return lines


def rewrite(path: epath.Path, lines: list[str]) -> None:
    """Replace the file's content at once: a temporary file renamed over it (atomic on a disk; a bucket
    replaces whole objects anyway)."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.writelines(lines)
        if not on_object_store(path):
            f.flush()
            os.fsync(f.fileno())
    tmp.replace(path)


def start_wandb(out_dir: str | None, options: dict):
    """wandb.init(**options) with its files under out_dir (None: wandb's default, for a bucket out_dir);
    WANDB_MODE=offline etc. are wandb's own."""
    try:
        import wandb
    except ImportError:
        raise MetricsError("wandb logging needs wandb: pip install wandb (or 'nanogpt-jax[wandb]')") from None
    return wandb.init(dir=None if out_dir is None else str(out_dir), **options)


class MetricsLog:
    """out_dir/metrics.jsonl of one run (and a wandb run if `wandb` holds wandb.init's options); a context manager.

    resume_iter: None starts a new file; else the iteration the resumed run starts at (its checkpoint's
    iter_num), and the records from it on are dropped. enabled=False (processes other than 0) writes nothing.
    """

    def __init__(self, out_dir: str, *, resume_iter: int | None, enabled: bool = True, wandb: dict | None = None):
        self.file = self.run = self.bucket_lines = None
        if not enabled:
            return
        path = epath.Path(out_dir) / METRICS
        kept = [] if resume_iter is None else keep_history(out_dir, resume_iter)
        if on_object_store(path):
            self.path, self.bucket_lines, self.written_at = path, kept, time.monotonic()
            rewrite(path, kept)
        else:  # unbuffered append: each record reaches the file in one write() call
            self.file = open(path, "ab" if resume_iter is not None else "wb", buffering=0)
        if wandb is not None:
            try:
                self.run = start_wandb(None if on_object_store(out_dir) else out_dir, wandb)
            except BaseException:
                self.close()
                raise

    def log(self, **record) -> None:
        """Append one record (it must have `iter`); wandb gets the others at step=iter, nulls left out."""
        line = json.dumps(record) + "\n"
        if self.file is not None:
            self.file.write(line.encode("utf-8"))
        elif self.bucket_lines is not None:
            self.bucket_lines.append(line)
            if time.monotonic() - self.written_at >= FLUSH_SECONDS:
                rewrite(self.path, self.bucket_lines)
                self.written_at = time.monotonic()
        if self.run is not None:
            self.run.log({k: v for k, v in record.items() if k != "iter" and v is not None}, step=record["iter"])

    def close(self) -> None:
        """Close the file (a bucket's: write it) and finish the wandb run; safe to call twice."""
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.bucket_lines is not None:
            rewrite(self.path, self.bucket_lines)
            self.bucket_lines = None
        if self.run is not None:
            self.run.finish()
            self.run = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
