"""Loss, perplexity and bits per character of a model (a checkpoint or released GPT-2 weights) on a dataset
split or a text file.

Two ways to pick the windows, both deterministic:
  eval_iters > 0   nanoGPT's estimate: eval_iters random batches of batch_size windows, chosen exactly as
                   `train` chooses its iteration-0 estimate (same seed -> same windows, same loss);
  eval_iters == 0  every token after the first predicted once: non-overlapping block_size windows, the
                   last one shorter; padding targets are -1, which `cross_entropy` ignores.
"""

import itertools
import math
import sys
from functools import partial
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np
from tqdm import tqdm

from . import data, hellaswag, parallel
from .config import EvalConfig
from .data import DataError
from .tokenizers import Tokenizer, kind
from .load import crop, load_model
from .model import GPTConfig, make_model
from .step import eval_step

SPLITS = ("train", "val")  # split ids as train's batches use them


class EvalResult(NamedTuple):
    loss: float  # mean cross-entropy per predicted token, nats
    perplexity: float  # exp(loss)
    tokens: int  # predicted tokens
    batches: int
    source: str  # what was evaluated, for printing
    # loss / ln 2 * tokens / characters of the text evaluated (the split's, as prepare counted them; the
    # --input file's): bits per character of the source text, a scale that tokenizers share; None if unknown
    bits_per_char: float | None = None


def batches(tokens, block_size: int, batch_size: int, eval_iters: int, seed_key: tuple[int, ...] = (1337, 1)):
    """(number of batches, iterator of host batches (x, y) int32 (batch_size, block_size))."""
    if eval_iters > 0:
        # train's Run.windows at iteration 0 on process 0 uses (seed, split, process, iteration, k).
        return eval_iters, (data.get_batch(tokens, block_size, (batch_size,), (*seed_key, 0, 0, k))
                            for k in range(eval_iters))
    starts = range(0, len(tokens) - 1, block_size)

    def gen():
        for first in range(0, len(starts), batch_size):
            x = np.zeros((batch_size, block_size), np.int32)
            y = np.full((batch_size, block_size), -1, np.int32)
            for row, s in enumerate(starts[first:first + batch_size]):
                w = np.asarray(tokens[s:s + block_size + 1], np.int32)
                x[row, :len(w) - 1], y[row, :len(w) - 1] = w[:-1], w[1:]
            yield x, y

    return -(-len(starts) // batch_size), gen()


def evaluate(config: GPTConfig, params, tokens, *, batch_size: int = 12, eval_iters: int = 200,
             seed_key: tuple[int, ...] = (1337, 1), progress: bool = False, source: str = "") -> EvalResult:
    """Mean token cross-entropy of `params` on a 1-D token array (memmap or list), dropout off."""
    T = config.block_size
    if len(tokens) < 2:
        raise DataError(f"{source or 'the text'} has {len(tokens)} token(s): at least 2 are needed")
    if eval_iters > 0 and len(tokens) <= T:
        raise DataError(f"{source or 'the text'} has {len(tokens):,} tokens, fewer than block_size + 1 = {T + 1} "
                        "that a random window needs: pass --eval_iters=0 (every token once) or a smaller --block_size")
    mesh = parallel.plan(1, batch_size, batch_size).mesh
    shardings = parallel.state_shardings(mesh, params)
    step = jax.jit(partial(eval_step, model=make_model(config)),
                   in_shardings=(shardings, parallel.batch_sharding(mesh, 0)), out_shardings=parallel.replicated(mesh))
    params = jax.device_put(params, shardings)
    n_batches, it = batches(tokens, T, batch_size, eval_iters, seed_key)

    def check(x, y):
        hi = max(int(x.max()), int(y.max()))
        if hi >= config.vocab_size:
            raise DataError(f"{source or 'the data'} holds token id {hi}, outside the model's vocabulary "
                            f"(vocab_size {config.vocab_size}): it was tokenized for another model")
        return x, y

    first = check(*next(it))  # a wrong dataset fails here, before the progress bar starts
    total, count, pending = 0.0, 0, None  # pending: the last batch's (loss, targets), read one step late
    bar = tqdm(total=n_batches, desc=f"eval {source}", unit="batch", disable=not progress, file=sys.stderr,
               mininterval=0.1 if sys.stderr.isatty() else 30.0)  # a log file gets a line per 30 s, not per batch
    with bar:

        def add(loss, n):
            nonlocal total, count
            total, count = total + float(loss) * n, count + n
            bar.set_postfix(loss=f"{total / count:.4f}", refresh=False)
            bar.update()

        for x, y in itertools.chain([first], (check(x, y) for x, y in it)):
            rows = parallel.batch_sharding(mesh, 0)
            # the mean over the batch's real targets
            loss = step(params, tuple(parallel.put_rows(rows, a.shape, a.__getitem__) for a in (x, y)))
            if pending is not None:
                add(*pending)
            pending = (loss, int(np.sum(y >= 0)))
        add(*pending)
    loss = total / count
    return EvalResult(loss, math.exp(min(loss, 700.0)), count, n_batches, source)


def run(cfg: EvalConfig, progress: bool = True) -> EvalResult:
    """`nanogpt-jax eval`: load the model cfg names, then evaluate it on cfg's split or text file."""
    config, params, meta, record = load_model(cfg)
    if cfg.block_size is not None and cfg.block_size != config.block_size:
        config, params = crop(config, params, cfg.block_size)

    train = record.train if record else {}  # a checkpoint's run: its dataset, folder and batch size
    if cfg.input is not None:
        try:
            text = Path(cfg.input).read_text(encoding="utf-8")
        except OSError as e:
            raise DataError(f"--input={cfg.input}: cannot read it ({e.strerror})") from None
        except UnicodeDecodeError:
            raise DataError(f"--input={cfg.input}: not UTF-8 text") from None
        tokens = np.asarray(Tokenizer(meta).encode(text), np.int64)
        source, split_id = cfg.input, 0
        tokens_per_char = len(tokens) / len(text) if text else None
    else:
        dataset = cfg.dataset or train.get("dataset", "openwebtext")
        data_dir = cfg.data_dir or train.get("data_dir", "data")
        dataset_dir = Path(data_dir) / dataset
        tokens = data.open_split(dataset_dir, cfg.split)
        data.check_vocabulary(meta, data.load_meta(dataset_dir), dataset_dir)
        source, split_id = f"{dataset_dir} {cfg.split}", SPLITS.index(cfg.split)
        tokens_per_char = data.tokens_per_char(dataset_dir, cfg.split, meta)
    batch_size = cfg.batch_size or train.get("batch_size", 12)
    r = evaluate(config, params, tokens, batch_size=batch_size, eval_iters=cfg.eval_iters,
                 seed_key=(cfg.seed, split_id), progress=progress, source=source)
    return r._replace(bits_per_char=None if tokens_per_char is None else r.loss / math.log(2) * tokens_per_char)


def run_hellaswag(cfg: EvalConfig, progress: bool = True) -> dict:
    """`nanogpt-jax eval --task=hellaswag`: {acc, acc_norm, n, source} of the model cfg names."""
    config, params, meta, _ = load_model(cfg)
    if meta is not None:
        raise DataError(f"HellaSwag is read in GPT-2 BPE; this model reads {kind(meta)} tokens")
    if cfg.block_size is not None and cfg.block_size != config.block_size:
        config, params = crop(config, params, cfg.block_size)
    path = hellaswag.dataset_file(cfg.hellaswag_file, log=lambda line: print(line, file=sys.stderr))
    result = hellaswag.evaluate(config, params, hellaswag.read(path), batch_size=cfg.batch_size or 12,
                                progress=progress)
    return {**result, "source": str(path)}
