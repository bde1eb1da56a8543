"""Datasets in nanoGPT's format: `train.bin` / `val.bin` as raw uint16 token ids, plus the vocabulary; or
llm.c's token shards (a 1 KB header, then uint16 ids), several per split.

Batches are random windows read from a memmap; which windows is a pure function of a key such as
(seed, split, process index, iteration) so that a resumed run sees exactly the batches of an uninterrupted one.
"""

import base64
import contextlib
import json
import os
import pickle
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .assets import gpt2_encoding, shakespeare_text
from .tokenizers import MAX_TOKENS, DataError, check_meta, kind

DATASETS = ("shakespeare_char", "shakespeare")
STATS = "stats.json"  # {split: {"tokens": n, "chars": n}}: the characters each split's tokens encode
SENTENCEPIECE_MODEL = "tokenizer.model"  # a sentencepiece dataset's model, named by its meta.json
TOKENIZER_FILES = ("meta.json", "meta.pkl", SENTENCEPIECE_MODEL)  # a dataset without them is GPT-2 BPE


def read_input(path: str | None, cache_path: Path) -> str:
    """The Tiny Shakespeare text: `path`, else an input.txt in the dataset folder (nanoGPT's layout), else the
    copy shipped inside the package: nothing is downloaded."""
    if path is not None:
        if not os.path.isfile(path):
            raise DataError(f"--input {path}: no such file")
        return _read_utf8(Path(path))
    if cache_path.is_file():
        return _read_utf8(cache_path)
    return shakespeare_text()


def _read_utf8(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text: byte {e.start:,} is {raw[e.start:e.start + 1]!r}; "
                        "convert it to UTF-8 first") from None


def write_split(ids, path: Path) -> int:
    arr = np.asarray(ids, dtype=np.uint16)
    arr.tofile(path)
    return len(arr)


def prepare(dataset: str, data_dir: str = "data", input_path: str | None = None) -> dict:
    """Tokenize Tiny Shakespeare into data_dir/<dataset>/{train,val}.bin (+ meta.json); returns the counts.
    The files are written to a temporary folder and moved in at the end: a failure leaves the folder as it was."""
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}: prepare knows {', '.join(DATASETS)}")
    out = Path(data_dir) / dataset
    source = input_path or (out / "input.txt" if (out / "input.txt").is_file() else "the shipped Tiny Shakespeare")
    text = read_input(input_path, out / "input.txt")
    if len(text) < 2:
        raise DataError(f"{source} holds {len(text)} characters: prepare needs a text to split into train and val")
    n = len(text)
    train_text, val_text = text[: int(n * 0.9)], text[int(n * 0.9):]
    files = {}
    if dataset == "shakespeare_char":
        chars = sorted(set(text))
        if len(chars) > MAX_TOKENS:
            raise DataError(f"{source} has {len(chars):,} distinct characters; train.bin stores uint16 ids, "
                            f"at most {MAX_TOKENS:,}: use the GPT-2 BPE dataset (prepare shakespeare)")
        stoi = {ch: i for i, ch in enumerate(chars)}
        info = {"vocab_size": len(chars)}
        files["meta.json"] = json.dumps({"vocab_size": len(chars), "itos": chars})
        encode = lambda s: [stoi[ch] for ch in s]  # noqa: E731
    else:
        enc = gpt2_encoding()
        info = {"vocab_size": enc.n_vocab}
        encode = enc.encode_ordinary
    with staging(out) as tmp:
        for name, content in files.items():
            (tmp / name).write_text(content, encoding="utf-8")
        stats = {}
        for split, part in (("train", train_text), ("val", val_text)):
            ids = encode(part)
            if len(ids) < 2:
                raise DataError(f"{source} is too short: its {split} split would hold {len(ids)} tokens")
            info[f"{split}_tokens"] = write_split(ids, tmp / f"{split}.bin")
            stats[split] = {"tokens": len(ids), "chars": len(part)}
        write_stats(tmp, stats)
    info["dir"] = str(out)
    return info


@contextlib.contextmanager
def staging(out: Path):
    """A temporary folder beside `out` to write a dataset into; on success its files replace out's (and a
    tokenizer file the new dataset lacks is removed, as it would describe other tokens), on failure out is
    left as it was."""
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} is a file: prepare writes a folder there; move it or use another --data_dir")
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        for name in TOKENIZER_FILES:
            if not (tmp / name).exists():
                (out / name).unlink(missing_ok=True)
        for path in tmp.iterdir():
            os.replace(path, out / path.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_stats(folder: Path, stats: dict) -> None:
    (folder / STATS).write_text(json.dumps(stats), encoding="utf-8")


def tokens_per_char(dataset_dir: Path, split: str, meta: dict | None) -> float | None:
    """Tokens per character of a split's text, as prepare measured it (stats.json); 1 for a character
    vocabulary; None when unknown (a dataset prepared before stats.json, or by another program)."""
    path = dataset_dir / STATS
    if path.is_file():
        try:
            counts = json.loads(path.read_bytes().decode("utf-8"))[split]
            return counts["tokens"] / counts["chars"]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ZeroDivisionError):
            raise DataError(f"{path} is not prepare's {{split: {{'tokens': N, 'chars': N}}}}: run prepare again, "
                            "or delete it") from None
    return 1.0 if kind(meta) == "char" else None


def load_meta(dataset_dir: Path) -> dict | None:
    """The tokenizer's meta (see tokenizers), from meta.json or from a nanoGPT-prepared meta.pkl; None for GPT-2
    BPE. A sentencepiece meta.json names its model file, whose bytes the returned meta carries."""
    path = dataset_dir / "meta.json"
    if path.is_file():
        try:
            meta = json.loads(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{path} is not valid JSON ({e}): run prepare again, or delete it for GPT-2 BPE "
                            "data") from None
        if isinstance(meta, dict) and "model_file" in meta:  # sentencepiece: the model is a file beside it
            meta = {k: v for k, v in meta.items() if k != "model_file"} | {
                "model": base64.b64encode(_read_model(dataset_dir / str(meta["model_file"]))).decode("ascii")}
        return check_meta(meta, path)
    path = dataset_dir / "meta.pkl"
    if path.is_file():
        try:
            with open(path, "rb") as f:
                meta = _PlainUnpickler(f).load()
            meta = {"vocab_size": meta["vocab_size"], "itos": [meta["itos"][i] for i in range(meta["vocab_size"])]}
        except DataError:
            raise
        except Exception as e:  # a truncated or foreign pickle: any of pickle's many errors
            raise DataError(f"{path} is not nanoGPT's meta.pkl ({type(e).__name__}: {e}): prepare the data "
                            "again") from None
        return check_meta(meta, path)
    return None


def _read_model(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read the dataset's sentencepiece model ({e.strerror}): run prepare "
                        "again") from None


class _PlainUnpickler(pickle.Unpickler):
    """nanoGPT's meta.pkl holds only dicts, strings and ints: refuse anything that would run code."""

    def find_class(self, module, name):
        raise DataError(f"meta.pkl refers to {module}.{name}; only plain dicts are accepted")


def check_vocabulary(model_meta, data_meta, dataset_dir):
    """The model and the dataset must use the same tokens: both GPT-2 BPE, or the same characters."""
    if model_meta == data_meta:
        return
    names = {"char": "a character vocabulary", "word": "a word vocabulary", "sentencepiece": "a sentencepiece model"}
    if model_meta is None:
        why = f"the model reads GPT-2 BPE tokens but the dataset has {names[kind(data_meta)]} (meta.json)"
    elif data_meta is None:
        why = f"the model was trained on {names[kind(model_meta)]} but the dataset is GPT-2 BPE (no meta.json)"
    else:
        why = (f"the model's vocabulary ({names[kind(model_meta)]}) differs from the dataset's meta.json "
               f"({names[kind(data_meta)]})")
    raise DataError(f"{dataset_dir}: {why}; use a dataset tokenized as the model was trained")


def open_split(dataset_dir: Path, split: str):
    """The split's tokens: nanoGPT's headerless `{split}.bin` (a memmap), else llm.c's shards
    `*_{split}_*.bin` read as one sequence (TokenShards)."""
    path = dataset_dir / f"{split}.bin"
    shards = sorted({p for pattern in (f"*_{split}_*.bin", f"*_{split}.bin") for p in dataset_dir.glob(pattern)})
    if path.is_file() and shards:
        raise DataError(f"{dataset_dir} holds both {path.name} and llm.c shards ({shards[0].name} ...): "
                        "keep one format per dataset folder")
    if shards:
        return TokenShards(shards, [open_shard(p) for p in shards])
    if not path.is_file():
        raise DataError(f"{path} not found (nor llm.c shards *_{split}_*.bin): run `nanogpt-jax prepare "
                        f"{dataset_dir.name}` (or point --data_dir at the folder holding it)")
    size = path.stat().st_size
    if size == 0 or size % 2:
        raise DataError(f"{path} holds {size:,} bytes: token files are uint16 ids (2 bytes each, at least one); "
                        f"it is {'empty' if size == 0 else 'cut short'}: run `nanogpt-jax prepare` again")
    return np.memmap(path, dtype=np.uint16, mode="r")


# llm.c's token shards (dev/data/data_common.py): 256 little-endian int32 (magic, version, token count, zeros),
# then the tokens as uint16. Version 1 is GPT-2's; llama-3's uint32 shards (another magic) are not read here.
SHARD_MAGIC, SHARD_VERSION, SHARD_HEADER_INTS = 20240520, 1, 256
SHARD_HEADER_BYTES = 4 * SHARD_HEADER_INTS


def shard_header(n_tokens: int) -> bytes:
    header = np.zeros(SHARD_HEADER_INTS, "<i4")
    header[:3] = SHARD_MAGIC, SHARD_VERSION, n_tokens
    return header.tobytes()


def open_shard(path: Path) -> np.memmap:
    """An llm.c shard's tokens, after checking its header against the file."""
    size = path.stat().st_size
    if size < SHARD_HEADER_BYTES:
        raise DataError(f"{path} holds {size:,} bytes, less than llm.c's {SHARD_HEADER_BYTES:,}-byte header: "
                        "it is not a token shard, or it is cut short")
    magic, version, n = (int(v) for v in np.fromfile(path, "<i4", count=3))
    if magic != SHARD_MAGIC:
        raise DataError(f"{path}: bad magic {magic} (llm.c's GPT-2 token shards start with {SHARD_MAGIC}): "
                        "not a GPT-2 token shard")
    if version != SHARD_VERSION:
        raise DataError(f"{path}: shard version {version}, only version {SHARD_VERSION} (GPT-2, uint16 tokens) "
                        "is read")
    if n < 1:
        raise DataError(f"{path}: the header says {n:,} tokens: an empty shard; prepare it again or remove it")
    if size != SHARD_HEADER_BYTES + 2 * n:
        raise DataError(f"{path}: the header says {n:,} tokens ({SHARD_HEADER_BYTES + 2 * n:,} bytes) but the "
                        f"file holds {size:,} bytes: prepare the shard again")
    return np.memmap(path, dtype="<u2", mode="r", offset=SHARD_HEADER_BYTES, shape=(n,))


class TokenShards:
    """Shards of one split read as one token sequence, in name order. llm.c cuts one token stream into shards
    (a document runs on into the next shard), so windows may cross a shard boundary as they would in the
    stream. Indexing takes integer arrays (windows) or step-1 slices, as a memmap would."""

    def __init__(self, paths: list[Path], arrays: list[np.memmap]):
        self.paths, self.arrays = paths, arrays
        self.ends = np.cumsum([len(a) for a in arrays])  # (shards,) one past each shard's last token
        self.starts = self.ends - [len(a) for a in arrays]

    def __len__(self) -> int:
        return int(self.ends[-1])

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                raise IndexError("TokenShards takes slices with step 1")
            return self._range(start, stop)
        index = np.asarray(index)
        if index.size and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError(f"token index out of range for {len(self):,} tokens")
        flat = index.reshape(-1)
        shard = np.searchsorted(self.ends, flat, side="right")
        order = np.argsort(shard, kind="stable")  # the positions of each shard's indices, grouped
        cuts = np.searchsorted(shard[order], np.arange(len(self.arrays) + 1))
        out = np.empty(flat.shape, np.uint16)
        for s in np.flatnonzero(np.diff(cuts)):
            at = order[cuts[s]:cuts[s + 1]]
            out[at] = self.arrays[s][flat[at] - self.starts[s]]
        return out.reshape(index.shape)

    def _range(self, start: int, stop: int) -> np.ndarray:
        """tokens[start:stop] (0 <= start, stop <= len), read shard by shard."""
        parts, s = [np.zeros(0, np.uint16)], int(np.searchsorted(self.ends, start, side="right"))
        while start < stop:
            base, arr = int(self.starts[s]), self.arrays[s]
            parts.append(arr[start - base:stop - base])
            start, s = base + len(arr), s + 1
        return np.concatenate(parts)

    def windows(self, starts: np.ndarray, length: int) -> np.ndarray:
        """tokens[i:i+length] for every start i, of shape `starts.shape + (length,)`: one read per window,
        where indexing with an array of every position would look each one up."""
        out = np.empty((*starts.shape, length), np.uint16)
        for at, i in np.ndenumerate(starts):
            if not 0 <= i <= len(self) - length:
                raise IndexError(f"a window of {length} tokens at {i} is outside {len(self):,} tokens")
            out[at] = self._range(int(i), int(i) + length)
        return out


def check_splits(dataset_dir: Path, splits: dict, block_size: int, vocab_size: int) -> None:
    """Every split holds a window of block_size + 1 tokens and only ids below vocab_size (an id past the
    embedding table reads garbage instead of failing). Reads the files once, in chunks."""
    for split, arr in splits.items():
        files = (list(zip(arr.paths, arr.arrays)) if isinstance(arr, TokenShards)
                 else [(dataset_dir / f"{split}.bin", arr)])
        where = files[0][0] if len(files) == 1 else f"{dataset_dir}'s {len(files)} {split} shards"
        if len(arr) <= block_size:
            raise DataError(f"{where} holds {len(arr):,} tokens, fewer than block_size + 1 = {block_size + 1}: "
                            "use a smaller --block_size or more data")
        for path, tokens in files:
            top = max(int(tokens[i:i + (1 << 24)].max()) for i in range(0, len(tokens), 1 << 24))
            if top >= vocab_size:
                raise DataError(f"{path} holds token id {top:,} and the model has {vocab_size:,} ids: use a "
                                "dataset tokenized for this model")


def open_dataset(dataset_dir: Path) -> tuple[dict, dict | None]:
    """({'train': tokens, 'val': tokens}, vocabulary or None for GPT-2 BPE) of a prepared dataset."""
    return {split: open_split(dataset_dir, split) for split in ("train", "val")}, load_meta(dataset_dir)


def window_starts(n_tokens: int, block_size: int, shape: tuple[int, ...], seed_key: tuple[int, ...]) -> np.ndarray:
    """Random window starts of `shape`; `seed_key` (train's is (seed, split, 0, iteration)) alone decides
    them: no hidden RNG state, and every process draws the same global batch."""
    if n_tokens <= block_size:
        raise DataError(f"the split has {n_tokens} tokens, fewer than block_size + 1 = {block_size + 1}")
    return np.random.default_rng(list(seed_key)).integers(0, n_tokens - block_size, size=shape)


def read_windows(data, starts: np.ndarray, block_size: int):
    """x, y = data[i:i+T], data[i+1:i+1+T] for every start i, int32, of shape `starts.shape + (T,)`;
    `data` is a memmap or TokenShards."""
    if isinstance(data, TokenShards):
        win = data.windows(starts, block_size + 1).astype(np.int32)
    else:
        win = np.asarray(data[starts[..., None] + np.arange(block_size + 1)], dtype=np.int32)
    return win[..., :-1], win[..., 1:]


def get_batch(data, block_size: int, shape: tuple[int, ...], seed_key: tuple[int, ...]):
    """Random windows x, y of `shape + (T,)`, int32, read from `data` (a memmap: only those windows)."""
    return read_windows(data, window_starts(len(data), block_size, shape, seed_key), block_size)
