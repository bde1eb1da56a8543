"""The headline runs' corpora from the HuggingFace hub (or a local copy), tokenized with GPT-2 BPE.

  openwebtext   nanoGPT's data/openwebtext/prepare.py: train_test_split(test_size=0.0005, seed=2357,
                shuffle=True), each document's ids then EOT, uint16 train.bin / val.bin in split order.
  fineweb_edu   llm.c's dev/data/fineweb.py -t edu: sample-10BT streamed, EOT then each document's ids, one
                token stream cut into shards of shard_size tokens with llm.c's header; shard 0 is val.

Both stream: documents are encoded by a pool of threads (tiktoken releases the GIL) a batch at a time and
written in order as they come, so memory stays bounded whatever the corpus size. `datasets` is optional
(pip install 'nanogpt-jax[hub]') and imported only here, when a corpus is prepared.
"""

import collections
import os
import shutil
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .assets import gpt2_encoding
from .data import DataError, shard_header

# dataset -> (hub name, hub configuration)
HUB = {"openwebtext": ("openwebtext", None), "fineweb_edu": ("HuggingFaceFW/fineweb-edu", "sample-10BT")}
CORPORA = tuple(HUB)
SHARD_PREFIX = "edu_fineweb"  # llm.c's names: edu_fineweb_val_000000.bin, edu_fineweb_train_000001.bin, ...
OWT_SPLIT = {"test_size": 0.0005, "seed": 2357, "shuffle": True}  # nanoGPT's train_test_split arguments
# --input FILE: the `datasets` builder that reads it (a folder is left to datasets to recognise)
BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".txt": "text", ".csv": "csv",
            ".arrow": "arrow"}
DOCS_PER_TASK = 64  # documents one thread encodes at a time


def prepare(dataset: str, data_dir: str = "data", input_path: str | None = None, shard_size: int = 10**8,
            num_proc: int = 0, progress: bool = True) -> dict:
    """Tokenize `dataset` (hub, or the local copy at input_path) into data_dir/<dataset>/; returns the counts.
    The files are written to a temporary folder and moved in at the end: a failure leaves the folder as it was."""
    if dataset not in HUB:
        raise DataError(f"unknown corpus {dataset!r}: use one of {', '.join(CORPORA)}")
    if shard_size < 1:
        raise DataError(f"--shard_size={shard_size}: must be at least 1 token")
    out = Path(data_dir) / dataset
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} is a file: prepare writes a folder there; move it or use another --data_dir")
    threads = num_proc or os.cpu_count() or 1
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dataset}.", dir=out.parent))
    try:
        if dataset == "openwebtext":
            info = _openwebtext(_load(dataset, input_path, streaming=False, num_proc=threads), tmp, threads,
                                progress)
        else:
            info = _fineweb_edu(_load(dataset, input_path, streaming=True, num_proc=threads), tmp, shard_size,
                                threads, progress)
        for old in out.glob(f"{SHARD_PREFIX}_*.bin"):  # a previous run's shards, which may be more
            old.unlink()
        for path in tmp.iterdir():
            os.replace(path, out / path.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"vocab_size": gpt2_encoding().n_vocab, **info, "dir": str(out)}


def _load(dataset: str, input_path: str | None, streaming: bool, num_proc: int):
    """The corpus' 'train' split as `datasets` reads it: from the hub, a local folder, or one local file."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"prepare {dataset} needs datasets: pip install datasets (or 'nanogpt-jax[hub]')") from None
    if input_path is None:
        name, config = HUB[dataset]
        where, kwargs = f"the hub's {name}", {"path": name, "name": config}
        if not streaming:
            kwargs["num_proc"] = num_proc  # nanoGPT downloads with num_proc workers too
    elif os.path.isdir(input_path):
        where, kwargs = f"--input={input_path}", {"path": input_path}
    elif os.path.isfile(input_path):
        builder = BUILDERS.get(Path(input_path).suffix.lower())
        if builder is None:
            raise DataError(f"--input={input_path}: datasets reads {', '.join(BUILDERS)} files (or a folder of them)")
        where, kwargs = f"--input={input_path}", {"path": builder, "data_files": input_path}
    else:
        raise DataError(f"--input={input_path}: no such file or folder")
    try:
        ds = datasets.load_dataset(**kwargs, split="train", streaming=streaming)
        columns = ds.column_names if not streaming else list(next(iter(ds)))
    except StopIteration:
        raise DataError(f"{where} holds no documents") from None
    except Exception as e:  # datasets raises many kinds (missing files, no network, bad formats)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        hint = "; or download a copy and pass it with --input" if input_path is None else ""
        raise DataError(f"cannot read {where} with datasets: {type(e).__name__}: {first}{hint}") from None
    if "text" not in columns:
        raise DataError(f"{where} has no 'text' column (it has {', '.join(map(str, columns))})")
    return ds.select_columns(["text"])


def _openwebtext(ds, folder: Path, threads: int, progress: bool) -> dict:
    if len(ds) < 2:
        raise DataError(f"the corpus holds {len(ds)} document(s): the train / val split needs at least 2")
    split = ds.train_test_split(**OWT_SPLIT)
    info = {}
    for name, part in (("train", split["train"]), ("val", split["test"])):
        with open(folder / f"{name}.bin", "wb") as f, _bar(progress, f"openwebtext {name}", len(part)) as bar:
            n = 0
            for ids in encoded(_texts(part, bar), threads, eot_first=False):
                f.write(ids.tobytes())
                n += len(ids)
        info[f"{name}_tokens"] = n
    return info


def _fineweb_edu(ds, folder: Path, shard_size: int, threads: int, progress: bool) -> dict:
    shards = ShardWriter(folder, SHARD_PREFIX, shard_size)
    with _bar(progress, "fineweb_edu", None) as bar:
        for ids in encoded(_texts(ds, bar), threads, eot_first=True):
            shards.write(ids)
        shards.close()
    if len(shards.counts) < 2:
        raise DataError(f"the corpus holds {sum(shards.counts):,} tokens, not more than one shard of "
                        f"{shard_size:,} (shard 0 is val): use a smaller --shard_size")
    return {"val_tokens": shards.counts[0], "train_tokens": sum(shards.counts[1:]), "shards": len(shards.counts)}


def _bar(progress: bool, desc: str, total: int | None):
    return tqdm(total=total, desc=desc, unit="doc", unit_scale=True, disable=not progress, file=sys.stderr,
                mininterval=0.5 if sys.stderr.isatty() else 30.0)


def _texts(ds, bar):
    """Lists of document texts, in the dataset's order, DOCS_PER_TASK at a time."""
    for batch in ds.iter(batch_size=DOCS_PER_TASK):
        bar.update(len(batch["text"]))
        yield batch["text"]


def encoded(batches, threads: int, eot_first: bool):
    """Each batch of texts as one uint16 array of its documents' GPT-2 ids, each with EOT (50256) before
    (llm.c) or after (nanoGPT) it; in order, with at most 2 x threads batches in flight."""
    enc = gpt2_encoding()

    def encode(texts):
        docs = [enc.encode_ordinary(t) for t in texts]
        out = np.full(sum(map(len, docs)) + len(docs), enc.eot_token, np.uint16)
        at = 0
        for ids in docs:
            at += eot_first
            out[at:at + len(ids)] = ids
            at += len(ids) + (not eot_first)
        return out

    with ThreadPoolExecutor(threads) as pool:
        pending = collections.deque()
        for texts in batches:
            pending.append(pool.submit(encode, texts))
            if len(pending) >= 2 * threads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


class ShardWriter:
    """llm.c's shards cut from one token stream: `size` tokens each (the last one shorter), a document
    running on into the next shard; shard 0 is val, the rest train. Written as the tokens come."""

    def __init__(self, folder: Path, prefix: str, size: int):
        self.folder, self.prefix, self.size = folder, prefix, size
        self.counts = []  # tokens in each closed shard
        self.file, self.n = None, 0

    def write(self, tokens: np.ndarray):
        while len(tokens):
            if self.file is None:
                split = "val" if not self.counts else "train"
                self.file = open(self.folder / f"{self.prefix}_{split}_{len(self.counts):06d}.bin", "wb")
                self.file.write(shard_header(0))  # its count is written when the shard is full
            take = tokens[:self.size - self.n]
            self.file.write(take.astype("<u2", copy=False).tobytes())
            self.n, tokens = self.n + len(take), tokens[len(take):]
            if self.n == self.size:
                self._finish()

    def close(self):
        if self.file is not None:
            self._finish()

    def _finish(self):
        self.file.seek(0)
        self.file.write(shard_header(self.n))
        self.file.close()
        self.counts.append(self.n)
        self.file, self.n = None, 0
