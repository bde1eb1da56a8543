"""The shipped Tiny Shakespeare and GPT-2 vocabulary against the shared copies and tiktoken's own gpt2."""

import hashlib
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO
from nanogpt_jax.assets import AssetError, gpt2_encoding, read_asset, shakespeare_text


def test_shakespeare_text_is_the_shared_file(input_txt):
    text = shakespeare_text()
    raw = text.encode("utf-8")
    assert len(raw) == 1_115_394
    assert hashlib.sha256(raw).hexdigest() == "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
    assert raw == input_txt.read_bytes()


def test_gpt2_encoding_known_ids():
    enc = gpt2_encoding()
    # GPT-2's tokenizer on HuggingFace's example sentence
    assert enc.encode("Hello world, my dog is cute") == [15496, 995, 11, 616, 3290, 318, 13779]
    assert enc.encode("<|endoftext|>", allowed_special="all") == [50256]
    assert enc.n_vocab == 50257 and enc.name == "gpt2"
    assert gpt2_encoding() is enc  # built once


def test_gpt2_encoding_equals_tiktoken(tiktoken_cache, input_text):
    import tiktoken

    ours, theirs = gpt2_encoding(), tiktoken.get_encoding("gpt2")  # theirs: from the shared cache
    assert ours.special_tokens_set == theirs.special_tokens_set
    assert ours.max_token_value == theirs.max_token_value
    # every id means the same bytes, so the merge ranks are the same
    assert all(ours.decode_single_token_bytes(i) == theirs.decode_single_token_bytes(i) for i in range(50257))
    ids = ours.encode_ordinary(input_text)
    assert ids == theirs.encode_ordinary(input_text)
    assert len(ids) == 301_966 + 36_059  # nanoGPT's data/shakespeare/prepare.py train + val counts
    assert ours.decode(ids) == input_text


def test_gpt2_encoding_offline_with_empty_cache(tmp_path):
    # A fresh interpreter with an empty tiktoken cache and every socket refused: tiktoken's own gpt2 must
    # fail there (so the test really is offline) while the shipped one works and writes nothing.
    script = textwrap.dedent("""
        import socket

        def refuse(*args, **kwargs):
            raise OSError("network disabled by the test")

        socket.socket.connect = refuse
        socket.create_connection = refuse
        import tiktoken
        try:
            tiktoken.get_encoding("gpt2")
            print("tiktoken: loaded")
        except Exception as e:
            print("tiktoken: failed", type(e).__name__)
        from nanogpt_jax.assets import gpt2_encoding
        print("shipped:", gpt2_encoding().encode("Hello world, my dog is cute"))
    """)
    cache = tmp_path / "empty_cache"
    cache.mkdir()
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(cache), "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("tiktoken: failed"), out.stdout
    assert lines[1] == "shipped: [15496, 995, 11, 616, 3290, 318, 13779]"
    assert list(cache.iterdir()) == []


def test_corrupt_or_missing_asset_is_one_clear_error():
    with pytest.raises(AssetError, match=r"input\.txt\.xz is corrupt \(sha256 mismatch\); reinstall"):
        read_asset("input.txt.xz", "0" * 64)
    with pytest.raises(AssetError, match=r"cannot read nanogpt_jax/assets/nothing\.xz .*reinstall"):
        read_asset("nothing.xz", "0" * 64)
