"""HellaSwag scored as build-nanogpt's and llm.c's `hellaswag.py` score it ("completion style"): the context,
then each of the 4 endings (a space before it) in GPT-2 BPE; each ending's cross-entropy given its context,
summed (acc: the lowest sum wins) and averaged over its tokens (acc_norm: the lowest mean wins).

The data is rowanz/hellaswag's `hellaswag_val.jsonl` (10,042 examples), downloaded once into the user's
cache and checked against its sha256, or any file of the same jsonl lines (`ctx`, `endings`, `label`).
"""

import hashlib
import json
import os
import sys
import urllib.request
from functools import lru_cache, partial
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from . import parallel
from .assets import gpt2_encoding
from .config import user_cache
from .model import GPTConfig, make_model
from .tokenizers import DataError

URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
# The file's sha256 (12,246,618 bytes) as HuggingFace datasets recorded it when downloading it from rowanz/hellaswag
# master (datasets/hellaswag/dataset_infos.json); the repository has not changed the file since its first commit.
SHA256 = "0aa3b88843990f3f10a97b9575c94d7b71fb2205240ba04ae4884d9e9c992588"
BUCKET = 64  # rows are padded to a multiple of this (at most block_size): few widths, so few compilations
GPT2_VOCAB = 50257


class Example(NamedTuple):
    context: list[int]  # GPT-2 BPE ids of ctx
    endings: tuple[list[int], ...]  # the 4 endings' ids, each encoded with a space before it
    label: int  # the index of the right ending


def cache_path() -> Path:
    """Where the download is kept, in the user's cache beside the compile cache."""
    return user_cache("hellaswag", "hellaswag_val.jsonl")


def download(path: Path) -> None:
    """URL -> path, written only once its sha256 is right (a partial or wrong file is never left at path)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(f"{path.name}.{os.getpid()}.part")
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(URL, timeout=60) as response, open(part, "wb") as f:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                f.write(chunk)
        if digest.hexdigest() != SHA256:
            raise OSError(f"its sha256 is {digest.hexdigest()}, not {SHA256}")
        os.replace(part, path)
    except (OSError, ValueError) as e:  # URLError and HTTPError are OSErrors; ValueError: a malformed URL
        part.unlink(missing_ok=True)
        reason = getattr(e, "reason", None) or e
        raise DataError(f"cannot download HellaSwag's validation set from {URL} into {path} ({reason}): "
                        "download hellaswag_val.jsonl yourself and pass --hellaswag_file=PATH") from None


def dataset_file(hellaswag_file: str | None = None, log=None) -> Path:
    """The jsonl to read: `hellaswag_file` if given, else the cached download (made now if missing)."""
    if hellaswag_file is not None:
        path = Path(hellaswag_file).expanduser()
        if not path.is_file():
            raise DataError(f"--hellaswag_file={hellaswag_file}: no such file (leave the option out to download "
                            f"{URL} into {cache_path()})")
        return path
    path = cache_path()
    if not path.is_file():
        download(path)
        if log:
            log(f"downloaded {URL} to {path} (sha256 checked)")
    return path


def read(path) -> list[Example]:
    """The examples of a HellaSwag jsonl file, tokenized (blank lines skipped)."""
    enc = gpt2_encoding()
    examples = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read it as UTF-8 text ({e})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            ctx, endings, label = item["ctx"], item["endings"], item["label"]
            ok = (isinstance(ctx, str) and isinstance(endings, list) and len(endings) == 4
                  and all(isinstance(e, str) for e in endings) and type(label) is int and 0 <= label < 4)
        except (ValueError, TypeError, KeyError):
            ok = False
        if not ok:
            raise DataError(f"{path}, line {number}: not a HellaSwag example (a JSON object with a string \"ctx\", "
                            "a list of 4 string \"endings\" and a \"label\" from 0 to 3)")
        examples.append(Example(enc.encode_ordinary(ctx), tuple(enc.encode_ordinary(" " + e) for e in endings),
                                label))
    if not examples:
        raise DataError(f"{path} holds no HellaSwag examples")
    return examples


def window(context: list[int], ending: list[int], T: int) -> tuple[np.ndarray, np.ndarray]:
    """(x, y), both of length <= T: the model reads x and is scored on y's ids >= 0, the ending's tokens. A row
    longer than the model's T positions keeps its last T + 1 tokens: the context is cut from the left."""
    row = np.asarray(context + ending, np.int32)
    y = row[1:].copy()
    y[:max(len(context) - 1, 0)] = -1  # targets that are the context's own tokens are not scored
    return row[:-1][-T:], y[-T:]


def batch(windows, n_rows: int, T: int) -> tuple[np.ndarray, np.ndarray]:
    """x_BT, y_BT for some examples' windows (4 rows each, in order): right-padded to one bucketed width;
    the spare rows and the padding have targets -1."""
    width = min(T, -(-max(1, *(len(x) for rows in windows for x, _ in rows)) // BUCKET) * BUCKET)
    x_BT = np.zeros((n_rows, width), np.int32)
    y_BT = np.full((n_rows, width), -1, np.int32)
    for r, (x, y) in enumerate(pair for rows in windows for pair in rows):
        x_BT[r, :len(x)], y_BT[r, :len(y)] = x, y
    return x_BT, y_BT


def ending_losses(params, x_BT, y_BT, *, model):
    """Per row: the summed cross-entropy of its targets (y >= 0), and how many there are."""
    logits_BTV, _ = model.apply({"params": params}, x_BT)
    valid_BT = y_BT >= 0
    picked_BT = jnp.take_along_axis(logits_BTV, jnp.where(valid_BT, y_BT, 0)[..., None], axis=-1)[..., 0]
    nll_BT = jax.nn.logsumexp(logits_BTV, axis=-1) - picked_BT  # -log_softmax without a second (B, T, V) array
    return jnp.sum(jnp.where(valid_BT, nll_BT, 0.0), axis=1), jnp.sum(valid_BT, axis=1)


@lru_cache(maxsize=16)
def _program(model, mesh):
    """One jitted ending_losses per model and mesh, so that a training loop's repeated calls compile once per width."""
    return jax.jit(partial(ending_losses, model=model), out_shardings=parallel.replicated(mesh))


def score(config: GPTConfig, params, examples: list[Example], *, batch_size: int = 12, mesh=None,
          progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(sum_E4, mean_E4): each ending's summed and mean cross-entropy (nats) given its context, dropout off.

    batch_size examples (4 rows each) per forward pass, their rows split over the mesh's devices (default: all
    of them that divide the rows); examples are taken shortest first, so that a batch's padding is small."""
    if config.vocab_size < GPT2_VOCAB:
        raise DataError(f"HellaSwag is read in GPT-2 BPE ({GPT2_VOCAB:,} ids); this model has a vocabulary of "
                        f"{config.vocab_size:,}")
    T = config.block_size
    n_rows = 4 * batch_size
    mesh = parallel.plan(1, n_rows, n_rows).mesh if mesh is None else mesh
    n_rows = -(-n_rows // mesh.size) * mesh.size  # spare rows, so that every device gets as many
    params = jax.device_put(params, parallel.state_shardings(mesh, params))
    program, rows = _program(make_model(config), mesh), parallel.batch_sharding(mesh, 0)
    windows = [[window(ex.context, end, T) for end in ex.endings] for ex in examples]
    order = sorted(range(len(examples)), key=lambda e: max(len(x) for x, _ in windows[e]))
    sum_E4, count_E4 = np.zeros((len(examples), 4)), np.zeros((len(examples), 4))
    done, right = 0, 0  # examples read back, and how many of them acc_norm gets right (the bar shows it)
    pending = None  # the last batch's (example ids, results on the devices), read one batch late
    bar = tqdm(total=-(-len(examples) // batch_size), desc="hellaswag", unit="batch", disable=not progress,
               file=sys.stderr, mininterval=0.1 if sys.stderr.isatty() else 30.0)
    with bar:

        def collect(ids, out):
            nonlocal done, right
            sums, counts = (np.asarray(a, np.float64)[:4 * len(ids)].reshape(-1, 4) for a in out)
            sum_E4[ids], count_E4[ids] = sums, counts
            labels = [examples[e].label for e in ids]
            done, right = done + len(ids), right + int(np.sum(np.argmin(sums / np.maximum(counts, 1), 1) == labels))
            bar.set_postfix(acc_norm=f"{right / done:.4f}", refresh=False)
            bar.update()

        for first in range(0, len(order), batch_size):
            ids = order[first:first + batch_size]
            x_BT, y_BT = batch([windows[e] for e in ids], n_rows, T)
            out = program(params, *(parallel.put_rows(rows, a.shape, a.__getitem__) for a in (x_BT, y_BT)))
            if pending is not None:
                collect(*pending)
            pending = (ids, out)
        if pending is not None:
            collect(*pending)
    return sum_E4, sum_E4 / np.maximum(count_E4, 1)


def accuracy(sum_E4, mean_E4, labels) -> dict:
    """acc from the summed losses, acc_norm from the mean ones (build-nanogpt's names), and the count."""
    labels = np.asarray(labels)
    return dict(acc=float(np.mean(np.argmin(sum_E4, axis=1) == labels)),
                acc_norm=float(np.mean(np.argmin(mean_E4, axis=1) == labels)), n=len(labels))


def evaluate(config: GPTConfig, params, examples: list[Example], *, batch_size: int = 12, mesh=None,
             progress: bool = False) -> dict:
    """{acc, acc_norm, n} of a model on examples (from `read`); every process of a run calls it."""
    if not examples:
        raise DataError("no HellaSwag examples to evaluate")
    sums, means = score(config, params, examples, batch_size=batch_size, mesh=mesh, progress=progress)
    return accuracy(sums, means, [ex.label for ex in examples])
