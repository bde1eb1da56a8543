"""Text <-> token ids at the lecture's three levels: characters, words, and sub-words (GPT-2's BPE through
tiktoken, or a SentencePiece model trained on the corpus).

A dataset's tokenizer is described by its `meta` (meta.json beside train.bin, and the `meta` of a checkpoint's
run record), a JSON-able dict:
  None                                                   GPT-2 BPE (nanoGPT's datasets without meta)
  {"vocab_size": n, "itos": [n characters]}              characters (nanoGPT's meta.pkl has the same fields)
  {"tokenizer": "word", "vocab_size": n, "itos": [...]}  itos[0] is <unk>, then words and marks, most frequent first
  {"tokenizer": "sentencepiece", "vocab_size": n, "model": base64 of the .model file}
"""

import base64
import binascii
import io
import re

import numpy as np

from .assets import ENDOFTEXT, gpt2_encoding
from .config import UserError

MAX_TOKENS = 65_536  # ids 0..65535: what uint16 train.bin / val.bin hold
KINDS = ("char", "word", "gpt2", "sentencepiece")

# word level: a run of letters/digits/underscore, one punctuation mark, or a line break (so samples keep their
# lines); other whitespace is dropped, and decode puts single spaces back
WORD = re.compile(r"\w+|[^\w\s]|\n")
UNK = "<unk>"
NO_SPACE_BEFORE = set(",.;:!?)]}'-\n")
NO_SPACE_AFTER = set("([{'-\n")


class DataError(UserError):
    """A dataset is missing or malformed; the message says how to fix it."""


def kind(meta: dict | None) -> str:
    if meta is None:
        return "gpt2"
    return meta.get("tokenizer", "char")


def words(text: str) -> list[str]:
    """The word-level pieces of a text: words, punctuation marks and line breaks."""
    return WORD.findall(text)


def join_words(pieces: list[str]) -> str:
    """Words back to text: a space between two pieces unless a line break or a mark that hugs its neighbour."""
    out = []
    for prev, piece in zip([None] + pieces[:-1], pieces):
        if prev is not None and piece not in NO_SPACE_BEFORE and prev not in NO_SPACE_AFTER:
            out.append(" ")
        out.append(piece)
    return "".join(out)


def char_meta(chars) -> dict:
    chars = sorted(chars)
    return {"vocab_size": len(chars), "itos": chars}


def word_meta(counts, vocab_size: int) -> dict:
    """<unk> and the vocab_size - 1 most frequent pieces (ties: the piece seen first comes first)."""
    itos = [UNK] + [w for w, _ in counts.most_common(vocab_size - 1)]
    return {"tokenizer": "word", "vocab_size": len(itos), "itos": itos}


def sentencepiece_meta(model: bytes) -> dict:
    return {"tokenizer": "sentencepiece", "vocab_size": _sentencepiece(model).get_piece_size(),
            "model": base64.b64encode(model).decode("ascii")}


def train_sentencepiece(lines, vocab_size: int, threads: int, max_lines: int = 2_000_000) -> bytes:
    """A BPE SentencePiece model (the .model file's bytes) trained on `lines` (an iterator of str): identity
    normalization, whitespace kept as it is and bytes for unseen characters, so that decode(encode(s)) == s.
    SentencePiece keeps a random sample of at most max_lines lines in memory."""
    spm = _import_sentencepiece()
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines, model_writer=model, vocab_size=vocab_size, model_type="bpe",
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
            allow_whitespace_only_pieces=True, byte_fallback=True, character_coverage=1.0,
            user_defined_symbols=["\n"], input_sentence_size=max_lines, shuffle_input_sentence=True,
            num_threads=threads, minloglevel=2)
    except RuntimeError as e:  # e.g. "Vocabulary size is too high (8192). Please set it to a value <= 4000."
        raise DataError(f"sentencepiece could not train a {vocab_size:,}-token model on this corpus: "
                        f"{str(e).strip().splitlines()[-1]}") from None
    return model.getvalue()


def _import_sentencepiece():
    try:
        import sentencepiece
    except ImportError:
        raise UserError("the sentencepiece tokenizer needs the sentencepiece package: "
                        "pip install 'nanogpt-jax[sentencepiece]'") from None
    return sentencepiece


def _sentencepiece(model: bytes):
    return _import_sentencepiece().SentencePieceProcessor(model_proto=model)


def check_meta(meta, path) -> dict:
    """`meta` if it is one of the forms above, else a DataError naming `path`."""
    ok = (isinstance(meta, dict) and type(meta.get("vocab_size")) is int and 0 < meta["vocab_size"] <= MAX_TOKENS
          and meta.get("tokenizer", "char") in ("char", "word", "sentencepiece"))
    if ok and kind(meta) == "sentencepiece":
        ok = isinstance(meta.get("model"), str)
        try:
            ok = ok and _sentencepiece(base64.b64decode(meta["model"], validate=True)).get_piece_size() == meta[
                "vocab_size"]
        except (binascii.Error, RuntimeError):
            ok = False
    elif ok:
        itos = meta.get("itos")
        ok = (isinstance(itos, list) and meta["vocab_size"] == len(itos) and all(isinstance(c, str) for c in itos)
              and len(set(itos)) == len(itos))
        ok = ok and (kind(meta) == "word" and itos[0] == UNK or all(len(c) == 1 for c in itos))
    if not ok:
        raise DataError(f"{path} is not a vocabulary ({{'vocab_size': N, 'itos': [N distinct characters]}} or a "
                        "word or sentencepiece one): run prepare again, or delete it for GPT-2 BPE data")
    return meta


class Tokenizer:
    """Text <-> ids of a dataset's `meta` (see the module's docstring)."""

    def __init__(self, meta: dict | None):
        self.kind = kind(meta)
        if self.kind == "gpt2":
            enc = gpt2_encoding()
            self.vocab_size = enc.n_vocab
            self.eot = enc.eot_token
            self.encode = lambda s: enc.encode(s, allowed_special={ENDOFTEXT})
            self.decode = enc.decode
            self._batch = lambda texts, threads: enc.encode_ordinary_batch(texts, num_threads=threads)
        elif self.kind == "sentencepiece":
            sp = _sentencepiece(base64.b64decode(meta["model"]))
            self.vocab_size = sp.get_piece_size()
            self.eot = sp.eos_id()
            self.encode, self.decode = sp.encode, sp.decode
            self._batch = lambda texts, threads: sp.encode(texts, num_threads=threads)
        else:
            itos = meta["itos"]
            self.vocab_size = len(itos)
            self.eot = None  # char and word datasets simply concatenate their documents
            stoi = {ch: i for i, ch in enumerate(itos)}
            if self.kind == "word":
                self.encode = lambda s: [stoi.get(w, 0) for w in words(s)]
                self.decode = lambda ids: join_words([itos[i] for i in ids])
                self._batch = lambda texts, threads: [self.encode(t) for t in texts]  # regex holds the GIL
            else:
                self.encode = lambda s: [self._lookup(stoi, ch) for ch in s]
                self.decode = lambda ids: "".join(itos[i] for i in ids)
                codepoints = np.array([ord(c) for c in itos])
                table = np.zeros(codepoints.max() + 1, np.uint16)  # code point -> id: at most 2.2 MB
                table[codepoints] = np.arange(len(itos))
                self._batch = lambda texts, threads: [table[_codepoints(t)] for t in texts]

    def encode_batch(self, texts: list[str], threads: int) -> list[np.ndarray]:
        """Each text's ids as uint16, the texts spread over `threads` threads where the tokenizer allows it
        (tiktoken and sentencepiece release the GIL). A char text must hold only the vocabulary's characters."""
        return [np.asarray(ids, np.uint16) for ids in self._batch(texts, threads)]

    @staticmethod
    def _lookup(stoi, ch):
        if ch not in stoi:
            raise DataError(f"the character {ch!r} is not in this dataset's vocabulary")
        return stoi[ch]


def _codepoints(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), np.uint32)
