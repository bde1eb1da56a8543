"""Files shipped inside the package so that nothing is downloaded: Tiny Shakespeare and GPT-2's BPE vocabulary.

Both are stored xz-compressed next to this file and checked against their sha256 when read.
"""

import functools
import hashlib
import json
import lzma
from importlib import resources

import tiktoken

from ..config import UserError

# (file in this folder, sha256 of the decompressed bytes)
# karpathy/char-rnn's tinyshakespeare/input.txt, the file nanoGPT downloads (1,115,394 bytes)
SHAKESPEARE = ("input.txt.xz", "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed")
# OpenAI's gpt-2/encodings/main/encoder.json, the hash tiktoken checks it against
GPT2_ENCODER = ("encoder.json.xz", "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783")
# tiktoken's gpt2 split pattern (tiktoken_ext/openai_public.py): GPT-2's original one, written to run faster
GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
ENDOFTEXT = "<|endoftext|>"


class AssetError(UserError):
    """A shipped file is missing or corrupt: the installation is broken."""


def read_asset(name: str, sha256: str) -> bytes:
    """The decompressed bytes of a shipped file, checked against its sha256."""
    try:
        raw = lzma.decompress(resources.files(__name__).joinpath(name).read_bytes())
    except (OSError, lzma.LZMAError) as e:
        raise AssetError(f"cannot read nanogpt_jax/assets/{name} ({e}); reinstall nanogpt-jax") from None
    if hashlib.sha256(raw).hexdigest() != sha256:
        raise AssetError(f"nanogpt_jax/assets/{name} is corrupt (sha256 mismatch); reinstall nanogpt-jax")
    return raw


def shakespeare_text() -> str:
    """Tiny Shakespeare's input.txt, as nanoGPT's prepare scripts download it."""
    return read_asset(*SHAKESPEARE).decode("utf-8")


def data_gym_bytes() -> dict[str, int]:
    """encoder.json spells every byte as a printable character: character -> the byte it stands for."""
    # Printable bytes other than space stand for themselves; the other 68 move, in order, to chr(256 + n).
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    moved = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + n): b for n, b in enumerate(moved)}


@functools.cache
def gpt2_encoding():
    """tiktoken's gpt2 Encoding built from the shipped encoder.json: no network, no tiktoken cache."""

    # A token's id is also its merge rank (tiktoken asserts this when it reads vocab.bpe + encoder.json),
    # so encoder.json alone gives the mergeable ranks. tiktoken's own loader is not used because it copies
    # local files into TIKTOKEN_CACHE_DIR and fails where that folder is read-only.
    to_byte = data_gym_bytes()
    encoder = json.loads(read_asset(*GPT2_ENCODER))
    special = encoder.pop(ENDOFTEXT)
    ranks = {bytes(to_byte[ch] for ch in token): rank for token, rank in encoder.items()}
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PAT_STR, mergeable_ranks=ranks,
                             special_tokens={ENDOFTEXT: special}, explicit_n_vocab=len(ranks) + 1)
