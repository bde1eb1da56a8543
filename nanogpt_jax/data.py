"""Datasets in nanoGPT's format: `train.bin` / `val.bin` as raw uint16 token ids, plus the vocabulary.

Batches are random windows read from a memmap; which windows is a pure function of a key such as
(seed, split, process index, iteration) so that a resumed run sees exactly the batches of an uninterrupted one.
"""

import json
import os
import pickle
from pathlib import Path

import numpy as np

from .assets import gpt2_encoding, shakespeare_text
from .config import UserError

DATASETS = ("shakespeare_char", "shakespeare")


class DataError(UserError):
    """A dataset is missing or malformed; the message says how to fix it."""


def read_input(path: str | None, cache_path: Path) -> str:
    """The Tiny Shakespeare text: `path`, else an input.txt in the dataset folder (nanoGPT's layout), else the
    copy shipped inside the package: nothing is downloaded."""
    if path is not None:
        if not os.path.isfile(path):
            raise DataError(f"--input {path}: no such file")
        return Path(path).read_text(encoding="utf-8")
    if cache_path.is_file():
        return cache_path.read_text(encoding="utf-8")
    return shakespeare_text()


def write_split(ids, path: Path) -> int:
    arr = np.asarray(ids, dtype=np.uint16)
    arr.tofile(path)
    return len(arr)


def prepare(dataset: str, data_dir: str = "data", input_path: str | None = None) -> dict:
    """Tokenize Tiny Shakespeare into data_dir/<dataset>/{train,val}.bin (+ meta.json); returns the counts."""
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}: prepare knows {', '.join(DATASETS)}")
    out = Path(data_dir) / dataset
    out.mkdir(parents=True, exist_ok=True)
    text = read_input(input_path, out / "input.txt")
    n = len(text)
    train_text, val_text = text[: int(n * 0.9)], text[int(n * 0.9):]
    if dataset == "shakespeare_char":
        chars = sorted(set(text))
        stoi = {ch: i for i, ch in enumerate(chars)}
        info = {"vocab_size": len(chars)}
        (out / "meta.json").write_text(json.dumps({"vocab_size": len(chars), "itos": chars}), encoding="utf-8")
        encode = lambda s: [stoi[ch] for ch in s]  # noqa: E731
    else:
        enc = gpt2_encoding()
        info = {"vocab_size": enc.n_vocab}
        encode = enc.encode_ordinary
    info["train_tokens"] = write_split(encode(train_text), out / "train.bin")
    info["val_tokens"] = write_split(encode(val_text), out / "val.bin")
    info["dir"] = str(out)
    return info


def load_meta(dataset_dir: Path) -> dict | None:
    """The character vocabulary, from meta.json or from a nanoGPT-prepared meta.pkl; None for GPT-2 BPE."""
    if (dataset_dir / "meta.json").is_file():
        return json.loads((dataset_dir / "meta.json").read_text(encoding="utf-8"))
    if (dataset_dir / "meta.pkl").is_file():
        with open(dataset_dir / "meta.pkl", "rb") as f:
            meta = _PlainUnpickler(f).load()
        return {"vocab_size": meta["vocab_size"], "itos": [meta["itos"][i] for i in range(meta["vocab_size"])]}
    return None


class _PlainUnpickler(pickle.Unpickler):
    """nanoGPT's meta.pkl holds only dicts, strings and ints: refuse anything that would run code."""

    def find_class(self, module, name):
        raise DataError(f"meta.pkl refers to {module}.{name}; only plain dicts are accepted")


def check_vocabulary(model_meta, data_meta, dataset_dir):
    """The model and the dataset must use the same tokens: both GPT-2 BPE, or the same characters."""
    if model_meta == data_meta:
        return
    if model_meta is None:
        why = "the model reads GPT-2 BPE tokens but the dataset has its own character vocabulary (meta.json)"
    elif data_meta is None:
        why = "the model was trained on a character vocabulary but the dataset is GPT-2 BPE (no meta.json)"
    else:
        why = "the model's character vocabulary differs from the dataset's meta.json"
    raise DataError(f"{dataset_dir}: {why}; use a dataset tokenized as the model was trained")


class Tokenizer:
    """Text <-> ids: the dataset's characters (meta.json) or GPT-2 BPE."""

    def __init__(self, meta: dict | None):
        if meta is None:
            enc = gpt2_encoding()
            self.vocab_size = enc.n_vocab
            self.encode = lambda s: enc.encode(s, allowed_special={"<|endoftext|>"})
            self.decode = enc.decode
        else:
            itos = meta["itos"]
            self.vocab_size = len(itos)
            stoi = {ch: i for i, ch in enumerate(itos)}
            self.encode = lambda s: [self._lookup(stoi, ch) for ch in s]
            self.decode = lambda ids: "".join(itos[i] for i in ids)

    @staticmethod
    def _lookup(stoi, ch):
        if ch not in stoi:
            raise DataError(f"the character {ch!r} is not in this dataset's vocabulary")
        return stoi[ch]


def open_split(dataset_dir: Path, split: str) -> np.memmap:
    path = dataset_dir / f"{split}.bin"
    if not path.is_file():
        raise DataError(f"{path} not found: run `nanogpt-jax prepare {dataset_dir.name}` "
                        "(or point --data_dir at the folder holding it)")
    return np.memmap(path, dtype=np.uint16, mode="r")


def open_dataset(dataset_dir: Path) -> tuple[dict, dict | None]:
    """({'train': memmap, 'val': memmap}, vocabulary or None for GPT-2 BPE) of a prepared dataset."""
    return {split: open_split(dataset_dir, split) for split in ("train", "val")}, load_meta(dataset_dir)


def window_starts(n_tokens: int, block_size: int, shape: tuple[int, ...], seed_key: tuple[int, ...]) -> np.ndarray:
    """Random window starts of `shape`; `seed_key` (train's is (seed, split, 0, iteration)) alone decides
    them: no hidden RNG state, and every process draws the same global batch."""
    if n_tokens <= block_size:
        raise DataError(f"the split has {n_tokens} tokens, fewer than block_size + 1 = {block_size + 1}")
    return np.random.default_rng(list(seed_key)).integers(0, n_tokens - block_size, size=shape)


def read_windows(data: np.ndarray, starts: np.ndarray, block_size: int):
    """x, y = data[i:i+T], data[i+1:i+1+T] for every start i, int32, of shape `starts.shape + (T,)`."""
    win = np.asarray(data[starts[..., None] + np.arange(block_size + 1)], dtype=np.int32)
    return win[..., :-1], win[..., 1:]


def get_batch(data: np.ndarray, block_size: int, shape: tuple[int, ...], seed_key: tuple[int, ...]):
    """Random windows x, y of `shape + (T,)`, int32, read from `data` (a memmap: only those windows)."""
    return read_windows(data, window_starts(len(data), block_size, shape, seed_key), block_size)
