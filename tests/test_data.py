"""Dataset preparation and batches against nanoGPT's published token counts and naive recomputations."""

import json
import os
import pickle
import socket
from pathlib import Path

import numpy as np
import pytest

import nanogpt_jax.data as data
from nanogpt_jax.data import DataError, get_batch, load_meta, open_split, prepare
from nanogpt_jax.tokenizers import Tokenizer


def prepared_splits(folder, info, vocab_size, n_train, n_val):
    """The train and val ids of a prepared folder, after checking prepare's counts and the files' sizes."""
    assert (info["vocab_size"], info["train_tokens"], info["val_tokens"]) == (vocab_size, n_train, n_val)
    train = np.fromfile(folder / "train.bin", dtype=np.uint16)
    val = np.fromfile(folder / "val.bin", dtype=np.uint16)
    assert (len(train), len(val)) == (n_train, n_val)
    assert os.path.getsize(folder / "train.bin") == 2 * n_train  # raw uint16, no header
    return train, val


def test_prepare_char_counts_and_files(char_data, input_text):
    data_dir, info = char_data
    # nanoGPT's data/shakespeare_char/prepare.py prints these
    folder = data_dir / "shakespeare_char"
    train, val = prepared_splits(folder, info, 65, 1_003_854, 111_540)
    # the vocabulary is the sorted set of characters, and it round-trips the text
    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    assert meta["vocab_size"] == 65 and meta["itos"] == sorted(set(input_text))
    itos = meta["itos"]
    assert "".join(itos[i] for i in train) + "".join(itos[i] for i in val) == input_text
    n = len(input_text)
    assert "".join(itos[i] for i in val) == input_text[int(n * 0.9):]
    tok = Tokenizer(load_meta(folder))
    assert tok.decode(tok.encode("ROMEO:\nO, she doth teach")) == "ROMEO:\nO, she doth teach"
    assert tok.encode("\n !") == [itos.index(c) for c in "\n !"]


def test_prepare_bpe_counts(bpe_data, input_text):
    import tiktoken

    data_dir, info = bpe_data
    # nanoGPT's data/shakespeare/prepare.py: "train has 301,966 tokens", "val has 36,059 tokens"
    folder = data_dir / "shakespeare"
    train, val = prepared_splits(folder, info, 50257, 301_966, 36_059)
    enc = tiktoken.get_encoding("gpt2")
    assert enc.decode(train.tolist()) + enc.decode(val.tolist()) == input_text
    assert load_meta(folder) is None  # GPT-2 BPE: no character vocabulary
    tok = Tokenizer(None)
    assert tok.encode("Hello world, my dog is cute") == [15496, 995, 11, 616, 3290, 318, 13779]


def test_nanogpt_meta_pkl_loads(tmp_path, input_text):
    chars = sorted(set(input_text))
    meta = {"vocab_size": len(chars), "itos": {i: c for i, c in enumerate(chars)},
            "stoi": {c: i for i, c in enumerate(chars)}}
    with open(tmp_path / "meta.pkl", "wb") as f:
        pickle.dump(meta, f)
    loaded = load_meta(tmp_path)
    assert loaded == {"vocab_size": 65, "itos": chars}
    tok = Tokenizer(loaded)
    assert tok.encode("First Citizen:") == [meta["stoi"][c] for c in "First Citizen:"]
    with pytest.raises(DataError, match="not in this dataset's vocabulary"):
        tok.encode("é")


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_meta_pkl_is_refused(tmp_path):
    marker = tmp_path / "PWNED"
    with open(tmp_path / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": 2, "itos": {0: "a", 1: _Evil(marker)}}, f)
    with pytest.raises(DataError, match="system"):
        load_meta(tmp_path)
    assert not marker.exists()


def test_prepare_without_input_or_network_uses_the_shipped_copy(tmp_path, monkeypatch):
    """No --input, no network (sockets refused), an empty tiktoken cache: nanoGPT's counts all the same."""
    def no_network(*_, **__):
        raise OSError("network refused in this test")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty_cache"))
    char = prepare("shakespeare_char", data_dir=str(tmp_path))
    assert (char["vocab_size"], char["train_tokens"], char["val_tokens"]) == (65, 1_003_854, 111_540)
    bpe = prepare("shakespeare", data_dir=str(tmp_path))
    assert (bpe["vocab_size"], bpe["train_tokens"], bpe["val_tokens"]) == (50257, 301_966, 36_059)


def test_prepare_reads_input_txt_already_in_the_dataset_folder(tmp_path, monkeypatch, input_txt):
    """nanoGPT's layout keeps input.txt next to train.bin: a copy there is used, nothing is downloaded."""
    folder = tmp_path / "shakespeare_char"
    folder.mkdir()
    (folder / "input.txt").write_bytes(input_txt.read_bytes())
    monkeypatch.setattr(data, "shakespeare_text", lambda: pytest.fail("the shipped copy was read"))
    info = prepare("shakespeare_char", data_dir=str(tmp_path))
    assert (info["vocab_size"], info["train_tokens"], info["val_tokens"]) == (65, 1_003_854, 111_540)


def test_prepare_bad_arguments(tmp_path):
    with pytest.raises(DataError, match="unknown dataset"):
        prepare("openwebtext", data_dir=str(tmp_path))
    with pytest.raises(DataError, match="no such file"):
        prepare("shakespeare_char", data_dir=str(tmp_path), input_path=str(tmp_path / "missing.txt"))
    with pytest.raises(DataError, match="prepare shakespeare_char"):
        open_split(tmp_path / "shakespeare_char", "train")


def test_get_batch_windows_come_from_the_data():
    data_arr = np.arange(1000, dtype=np.uint16) * 7 % 65535
    T = 16
    x, y = get_batch(data_arr, T, (3, 4), (1337, 0, 0, 5))
    assert x.shape == y.shape == (3, 4, T) and x.dtype == np.int32
    np.testing.assert_array_equal(x[..., 1:], y[..., :-1])  # y is x shifted by one
    for a in range(3):
        for b in range(4):
            i = int(np.flatnonzero(data_arr == x[a, b, 0])[0])  # values are distinct: recover the offset
            assert 0 <= i <= len(data_arr) - T - 1
            np.testing.assert_array_equal(x[a, b], data_arr[i:i + T])
            np.testing.assert_array_equal(y[a, b], data_arr[i + 1:i + 1 + T])


def test_get_batch_is_a_function_of_its_key():
    data_arr = np.random.default_rng(0).integers(0, 65, 5000).astype(np.uint16)
    a = get_batch(data_arr, 8, (4,), (1337, 0, 0, 3))
    b = get_batch(data_arr, 8, (4,), (1337, 0, 0, 3))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    for other in [(1337, 0, 0, 4), (1338, 0, 0, 3), (1337, 1, 0, 3), (1337, 0, 1, 3)]:
        assert not np.array_equal(get_batch(data_arr, 8, (4,), other)[0], a[0])
    # the offsets are numpy's default_rng draws for that key (nothing else decides them)
    ix = np.random.default_rng([1337, 0, 0, 3]).integers(0, len(data_arr) - 8, size=(4,))
    np.testing.assert_array_equal(a[0], np.stack([data_arr[i:i + 8] for i in ix]))


def test_get_batch_from_memmap_and_too_short(char_data):
    data_dir, _ = char_data
    split = open_split(data_dir / "shakespeare_char", "val")
    assert isinstance(split, np.memmap) and split.dtype == np.uint16 and len(split) == 111_540
    x, y = get_batch(split, 64, (12,), (1, 2, 3))
    ref = np.fromfile(data_dir / "shakespeare_char" / "val.bin", dtype=np.uint16)
    ix = np.random.default_rng([1, 2, 3]).integers(0, len(ref) - 64, size=(12,))
    np.testing.assert_array_equal(x, np.stack([ref[i:i + 64] for i in ix]))
    np.testing.assert_array_equal(y, np.stack([ref[i + 1:i + 65] for i in ix]))
    with pytest.raises(DataError, match="block_size"):
        get_batch(np.zeros(8, np.uint16), 8, (2,), (0,))


# ----------------------------------------------------------------------------------------------------------
# bad inputs: one line naming the file


@pytest.mark.parametrize("raw,fragment", [(b"", "holds 0 bytes"), (b"\x01\x00\x02", "holds 3 bytes")])
def test_empty_or_odd_token_file_is_refused(tmp_path, raw, fragment):
    (tmp_path / "train.bin").write_bytes(raw)
    with pytest.raises(DataError, match=fragment) as e:
        open_split(tmp_path, "train")
    assert str(tmp_path / "train.bin") in str(e.value) and "prepare" in str(e.value)


def test_short_split_and_ids_past_the_vocabulary_name_the_file(tmp_path):
    from nanogpt_jax.data import check_splits

    splits = {"train": np.array([1, 2, 70, 3] * 10, np.uint16), "val": np.array([1, 2, 3] * 10, np.uint16)}
    with pytest.raises(DataError, match=f"{tmp_path / 'train.bin'} holds token id 70 and the model has 65 ids"):
        check_splits(tmp_path, splits, 8, 65)
    check_splits(tmp_path, splits, 8, 71)  # ids below the vocabulary are fine
    with pytest.raises(DataError, match=f"{tmp_path / 'val.bin'} holds 30 tokens, fewer than block_size"):
        check_splits(tmp_path, splits, 30, 71)


@pytest.mark.parametrize("text", ["{not json", '["a", "b"]', '{"vocab_size": 3, "itos": ["a", "b"]}',
                                  '{"vocab_size": 2, "itos": ["a", "bc"]}', '{"vocab_size": "2", "itos": ["a", "b"]}'])
def test_corrupt_meta_json_is_one_line(tmp_path, text):
    (tmp_path / "meta.json").write_text(text)
    with pytest.raises(DataError, match="meta.json is not") as e:
        load_meta(tmp_path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("content,fragment", [(b"", "holds 0 characters"), (b"a", "holds 1 characters"),
                                              (b"ok text\n\xff\xfe more", "not UTF-8 text: byte 8 is b'\\xff'")])
def test_prepare_refuses_empty_short_and_non_utf8_input(tmp_path, content, fragment):
    path = tmp_path / "input.txt"
    path.write_bytes(content)
    with pytest.raises(DataError, match=fragment.replace("\\", "\\\\")) as e:
        prepare("shakespeare_char", data_dir=str(tmp_path / "data"), input_path=str(path))
    assert str(path) in str(e.value)


def test_prepare_refuses_more_characters_than_uint16_ids(tmp_path):
    path = tmp_path / "input.txt"
    path.write_text("".join(chr(c) for c in range(0x10000, 0x10000 + 65_537)) * 2, encoding="utf-8")
    with pytest.raises(DataError, match="65,537 distinct characters"):
        prepare("shakespeare_char", data_dir=str(tmp_path / "data"), input_path=str(path))


def test_a_failing_prepare_leaves_a_prepared_folder_untouched(tmp_path, monkeypatch):
    path = tmp_path / "input.txt"
    path.write_text("hello world, a small text\n" * 20)
    info = prepare("shakespeare_char", data_dir=str(tmp_path), input_path=str(path))
    folder = Path(info["dir"])
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    path.write_text("another text entirely, other characters: xyz\n" * 20)

    def fail(ids, where):
        if where.name == "val.bin":
            raise OSError("disk full")
        return data_write_split(ids, where)

    data_write_split = data.write_split
    monkeypatch.setattr(data, "write_split", fail)
    with pytest.raises(OSError, match="disk full"):
        prepare("shakespeare_char", data_dir=str(tmp_path), input_path=str(path))
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["input.txt", "shakespeare_char"]  # no temporary left
