"""`prepare text`: a dataset from your own UTF-8 text files, in bounded memory.

Each file is a document; the documents are taken in order (the --input values as given, the files of a folder
or glob sorted) and read in chunks. The split is nanoGPT's: the first int(n * (1 - val_fraction)) of the corpus's
n characters are train, the rest val, so the document holding that character is cut in two and each half is
tokenized apart (one document and val_fraction=0.1 give exactly nanoGPT's shakespeare_char / shakespeare
splits). gpt2 appends <|endoftext|> (50256) and sentencepiece </s> after each document, in the split where the
document ends; char and word concatenate the documents as they are.

Passes over the files: one to check them (UTF-8), count their characters and build the vocabulary (char: the
characters, word: the counts of words and marks), one more to train sentencepiece, and one to tokenize, in
batches of chunks spread over threads, appending each batch's ids to train.bin / val.bin.
"""

import codecs
import collections
import glob
import json
import os
import re
import sys
from pathlib import Path

from tqdm import tqdm

from . import data
from .data import MAX_TOKENS, SENTENCEPIECE_MODEL, DataError
from .tokenizers import Tokenizer, char_meta, sentencepiece_meta, train_sentencepiece, word_meta, words

CHUNK_BYTES = 1 << 18  # read size; a chunk is cut where tokenizing its halves apart gives the same tokens
# chunks tokenized at once per thread: tiktoken returns Python ints (~36 bytes per token, ~2.5 MB per chunk),
# so a batch holds about 4 * threads * 2.5 MB for a moment
BATCH_PER_THREAD = 4
GLOB_CHARS = set("*?[")


def find_files(inputs) -> tuple[list[Path], int]:
    """The documents, and how many names of a file already taken were skipped. Each input is a file, a folder
    (its files, recursively, sorted; hidden ones skipped) or a glob (its matches, sorted; `**` any depth).
    Symbolic links are followed, each real folder entered once (a link loop ends there) and each real file
    read once, however many names lead to it."""
    if not inputs:
        raise DataError("prepare text needs --input=PATH (a file, folder or glob; repeat --input for several)")
    files, seen, duplicates = [], set(), 0
    for spec in inputs:
        path = os.path.expanduser(spec)
        if GLOB_CHARS & set(spec):
            found, what = _glob(path), "matches no file"
        elif os.path.isdir(path):
            found, what = sorted(_walk(Path(path))), "is a folder without files"
        elif os.path.exists(path):
            found = [Path(path)]
        else:
            raise DataError(f"--input={spec}: no such file or folder")
        if not found:
            raise DataError(f"--input={spec} {what}")
        for file in found:
            real = os.path.realpath(file)
            duplicates += real in seen
            if real not in seen:
                seen.add(real)
                files.append(file)
    return files, duplicates


def _walk(root: Path):
    """The files under root, not hidden, following links to folders but entering each real folder once."""
    stack, entered = [root], set()
    while stack:
        folder = stack.pop()
        real = os.path.realpath(folder)
        if real in entered:
            continue
        entered.add(real)
        try:
            entries = list(os.scandir(folder))
        except OSError as e:
            raise DataError(f"{folder}: cannot read it ({e.strerror or e})") from None
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                stack.append(folder / entry.name)
            elif entry.is_file():
                yield folder / entry.name


def _glob(pattern: str) -> list[Path]:
    """glob's matches (files only), sorted. A `**` pattern walks the folder before its first wildcard with
    _walk, which cannot loop, where glob's own `**` follows a link loop until the path is too long."""
    if "**" not in pattern:
        return sorted(p for p in map(Path, glob.glob(pattern)) if p.is_file())
    parts = Path(pattern).parts
    fixed = next(i for i, part in enumerate(parts) if GLOB_CHARS & set(part))
    root = Path(*parts[:fixed]) if fixed else Path(".")
    regex = "".join("(?:[^/]+/)*" if part == "**" else _component_regex(part) + "/" for part in parts[fixed:])
    regex = re.compile(regex[:-1] if regex.endswith("/") else regex + "[^/]+")  # a last `**`: every file below
    if not root.is_dir():
        return []
    return sorted(p for p in _walk(root) if regex.fullmatch(p.relative_to(root).as_posix()))


def _component_regex(part: str) -> str:
    """One path component of a glob (not `**`) as a regex: `*` and `?` within a name, [...] a class."""
    out, i = "", 0
    while i < len(part):
        c = part[i]
        close = part.find("]", i + 2) if c == "[" else -1
        if c == "*":
            out += "[^/]*"
        elif c == "?":
            out += "[^/]"
        elif close > 0:
            body = part[i + 1:close]
            out += "[" + ("^" + body[1:] if body.startswith("!") else body).replace("\\", "\\\\") + "]"
            i = close
        else:
            out += re.escape(c)
        i += 1
    return out


def cut_point(text: str) -> int:
    """The last index i > 0 with text[i] a space or line break and text[i - 1] not whitespace, else 0.
    GPT-2's pre-tokenizer (and words, and sentencepiece's whitespace split) always starts a new piece there, so
    text[:i] and text[i:] tokenize to the tokens of text."""
    i = len(text)
    while True:
        i = max(text.rfind(" ", 0, i), text.rfind("\n", 0, i))
        if i <= 0 or not text[i - 1].isspace():
            return max(i, 0)


def read_chunks(path: Path, chunk_bytes: int = CHUNK_BYTES):
    """(text, bytes read since the last piece) pieces of a UTF-8 file, in order, each cut at a cut_point
    (a piece with none in 4 chunks is cut where it ends); at least one piece, the last one with the file's end."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    carry, offset, pending_bytes = "", 0, 0
    try:
        with open(path, "rb") as f:
            while True:
                raw = f.read(chunk_bytes)
                held = len(decoder.getstate()[0])  # the start of a character cut by the last read
                try:
                    text = carry + decoder.decode(raw, final=not raw)
                except UnicodeDecodeError as e:  # e.start counts from the held bytes
                    where = offset - held + e.start
                    raise DataError(f"{path} is not UTF-8 text: byte {where:,} is {e.object[e.start:e.start + 1]!r}; "
                                    "convert it to UTF-8 first") from None
                offset += len(raw)
                pending_bytes += len(raw)
                if not raw:
                    yield text, pending_bytes
                    return
                cut = cut_point(text) or (len(text) if len(text) > 4 * chunk_bytes else 0)
                carry = text[cut:]
                if cut:
                    yield text[:cut], pending_bytes
                    pending_bytes = 0
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e.strerror or e})") from None


def scan(files, tokenizer: str, progress: bool, chunk_bytes: int) -> tuple[list[int], object]:
    """Each file's character count, and what the vocabulary needs: the set of characters (char), the counts
    of words and marks (word), nothing otherwise."""
    seen = set() if tokenizer == "char" else collections.Counter() if tokenizer == "word" else None
    lengths = []
    with _bar(files, "check", progress) as bar:
        for path in files:
            n = 0
            for text, nbytes in read_chunks(path, chunk_bytes):
                n += len(text)
                if tokenizer == "char":
                    seen.update(text)
                elif tokenizer == "word":
                    seen.update(words(text))
                bar.update(nbytes)
            lengths.append(n)
    return lengths, seen


def lines(files, chunk_bytes: int):
    """The corpus's lines (without their line break), for sentencepiece's trainer."""
    for path in files:
        for text, _ in read_chunks(path, chunk_bytes):
            yield from text.split("\n")


def pieces(files, split_at: int, chunk_bytes: int):
    """(split, text, ends a document, bytes read) over the corpus; the piece holding character `split_at`
    is cut there."""
    pos = 0
    for path in files:
        chunks = read_chunks(path, chunk_bytes)
        text, nbytes = next(chunks)
        for following in chunks:  # one piece late, to know which is the file's last
            yield from _split_piece(text, pos, split_at, False, nbytes)
            pos += len(text)
            text, nbytes = following
        yield from _split_piece(text, pos, split_at, True, nbytes)
        pos += len(text)


def _split_piece(text, pos, split_at, ends_document, nbytes):
    if pos < split_at < pos + len(text):
        yield "train", text[:split_at - pos], False, 0
        yield "val", text[split_at - pos:], ends_document, nbytes
    else:
        yield "train" if pos < split_at else "val", text, ends_document, nbytes


def _bar(files, what, progress):
    return _progress(progress, total=sum(p.stat().st_size for p in files), desc=f"{what} {len(files):,} file(s)",
                     unit="B")


def _progress(progress, iterable=None, **kw):
    # shown after a second (a bad input fails before: its error is the only line), then each 30 s in a log file
    return tqdm(iterable, file=sys.stderr, disable=not progress, delay=1.0, unit_scale=True,
                mininterval=0.5 if sys.stderr.isatty() else 30.0, **kw)


def threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def dataset_dir(data_dir: str, name: str) -> Path:
    """DATA_DIR/NAME, where `prepare text --name=NAME` writes; NAME must be one folder's name."""
    if not name or name != Path(name).name or name in (".", ".."):
        raise DataError(f"prepare text needs --name=NAME, a folder name (got {name!r}): the dataset is written "
                        "to DATA_DIR/NAME and trained with --dataset=NAME")
    return Path(data_dir) / name


def prepare_text(inputs, name: str, tokenizer: str = "gpt2", vocab_size: int = 8192, val_fraction: float = 0.1,
                 data_dir: str = "data", progress: bool = True, chunk_bytes: int = CHUNK_BYTES) -> dict:
    """Tokenize text files into data_dir/name/{train,val}.bin (+ meta.json, tokenizer.model, stats.json);
    returns the counts. Memory holds a few chunks, the vocabulary and (sentencepiece) its training sample."""
    out = dataset_dir(data_dir, name)
    files, duplicates = find_files(inputs)
    lengths, seen = scan(files, tokenizer, progress, chunk_bytes)
    n = sum(lengths)
    if n < 2:
        raise DataError(f"the corpus ({len(files):,} file(s)) holds {n} characters: prepare needs a text to split "
                        "into train and val")
    if tokenizer == "char" and len(seen) > MAX_TOKENS:
        raise DataError(f"the corpus has {len(seen):,} distinct characters; train.bin stores uint16 ids, at most "
                        f"{MAX_TOKENS:,}: use --tokenizer=gpt2 or sentencepiece")
    if tokenizer in ("word", "sentencepiece") and vocab_size > MAX_TOKENS:
        raise DataError(f"--vocab_size={vocab_size:,}: train.bin stores uint16 ids, at most {MAX_TOKENS:,}")
    model = None
    if tokenizer == "char":
        meta = char_meta(seen)
    elif tokenizer == "word":
        meta = word_meta(seen, vocab_size)
    elif tokenizer == "sentencepiece":
        read = _progress(progress, lines(files, chunk_bytes), desc="sentencepiece: read", unit=" lines")
        model = train_sentencepiece(iter(read), vocab_size, threads())
        meta = sentencepiece_meta(model)
    else:
        meta = None
    tok = Tokenizer(meta)
    split_at = int(n * (1 - val_fraction))  # nanoGPT's int(n * 0.9) for the default 0.1
    counts = {split: {"tokens": 0, "chars": 0} for split in ("train", "val")}
    with data.staging(out) as tmp:
        outs = {split: open(tmp / f"{split}.bin", "wb") for split in counts}
        try:
            with _bar(files, f"tokenize ({tokenizer})", progress) as bar:
                batch = []
                for piece in pieces(files, split_at, chunk_bytes):
                    batch.append(piece)
                    if len(batch) == BATCH_PER_THREAD * threads():
                        _write(tok, batch, outs, counts, bar)
                        batch = []
                _write(tok, batch, outs, counts, bar)
        finally:
            for f in outs.values():
                f.close()
        for split, c in counts.items():
            if c["tokens"] < 2:
                raise DataError(f"the corpus is too short: its {split} split would hold {c['tokens']} tokens "
                                f"({c['chars']} characters)")
        if model is not None:
            (tmp / SENTENCEPIECE_MODEL).write_bytes(model)
            meta = {k: v for k, v in meta.items() if k != "model"} | {"model_file": SENTENCEPIECE_MODEL}
        if meta is not None:
            (tmp / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
        data.write_stats(tmp, counts)
    return {"dir": str(out), "files": len(files), "duplicates": duplicates, "vocab_size": tok.vocab_size,
            **{f"{split}_{k}": v for split, c in counts.items() for k, v in c.items()}}


def _write(tok, batch, outs, counts, bar):
    """Tokenize a batch of pieces over threads and append their ids, with an end-of-text token after each
    document where the tokenizer has one, to their splits' files."""
    for (split, text, ends_document, nbytes), ids in zip(batch, tok.encode_batch([p[1] for p in batch], threads())):
        outs[split].write(ids.tobytes())
        counts[split]["tokens"] += len(ids)
        counts[split]["chars"] += len(text)
        if ends_document and tok.eot is not None:
            outs[split].write(ids.dtype.type(tok.eot).tobytes())
            counts[split]["tokens"] += 1
        bar.update(nbytes)

