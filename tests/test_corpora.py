"""Hub corpora (prepare openwebtext / fineweb_edu) against their references, llm.c's shards as training data,
and the two headline configs. No network: the corpora are small local copies written here."""

import json
import socket
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiktoken

from nanogpt_jax import cli, corpora, parallel
from nanogpt_jax.config import TrainConfig, parse
from nanogpt_jax.data import DataError, TokenShards, check_splits, open_split, read_windows
from nanogpt_jax.evaluate import batches
from nanogpt_jax.load import model_config
from nanogpt_jax.run import Run

from conftest import REPO, assert_one_error_line

EOT = 50256
HEADER_INTS = 256


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    """datasets' cache in tmp_path, its hub access off and every socket refused; JAX already runs in this
    process, so the CLI's one-device-per-core setting is skipped."""
    def no_network(*_, **__):
        raise OSError("network refused in tests")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(parallel, "use_all_cpu_cores", lambda: None)


def documents(n=50, seed=0):
    """n varied documents: words, numbers, unicode, newlines, and the literal text of the EOT token (which
    encode_ordinary must read as ordinary text)."""
    rng = np.random.default_rng(seed)
    words = ["the", "cat", "naïve", "café", "1234", "  ", "\n", "日本語", "<|endoftext|>", "GPT-2", "emoji 🙂",
             "don't", "x" * 20, "\t", "Hello", "world", ",", "."]
    return [" ".join(rng.choice(words, size=int(rng.integers(1, 120)))) for _ in range(n)]


def write_parquet_folder(folder: Path, docs, files=2):
    folder.mkdir(parents=True)
    for i, part in enumerate(np.array_split(np.arange(len(docs)), files)):
        table = pa.table({"text": [docs[j] for j in part], "id": [f"doc{j}" for j in part]})
        pq.write_table(table, folder / f"part-{i:05d}.parquet")
    return folder


def nanogpt_openwebtext(folder: Path) -> dict:
    """nanoGPT's data/openwebtext/prepare.py on a local copy, written plainly with datasets and tiktoken."""
    enc = tiktoken.get_encoding("gpt2")
    dataset = datasets.load_dataset(str(folder))
    split_dataset = dataset["train"].train_test_split(test_size=0.0005, seed=2357, shuffle=True)
    split_dataset["val"] = split_dataset.pop("test")

    def process(example):
        ids = enc.encode_ordinary(example["text"])
        ids.append(enc.eot_token)
        return {"ids": ids, "len": len(ids)}

    tokenized = split_dataset.map(process, remove_columns=["text", "id"])
    return {split: np.concatenate([np.asarray(ids, np.uint16) for ids in dset["ids"]])
            for split, dset in tokenized.items()}


def read_llmc_shard(path: Path):
    """(header, tokens) of an llm.c shard, read as llm.c's dataloader.h does."""
    raw = path.read_bytes()
    header = np.frombuffer(raw[:4 * HEADER_INTS], np.int32)
    return header, np.frombuffer(raw[4 * HEADER_INTS:], np.uint16)


def write_llmc_shard(path: Path, tokens, magic=20240520, version=1, count=None):
    """An llm.c shard as dev/data/data_common.py's write_datafile writes it."""
    header = np.zeros(HEADER_INTS, np.int32)
    header[0], header[1], header[2] = magic, version, len(tokens) if count is None else count
    path.write_bytes(header.tobytes() + np.asarray(tokens, np.uint16).tobytes())


def test_openwebtext_equals_nanogpts_prepare(tmp_path, tiktoken_cache):
    docs = documents(50)
    folder = write_parquet_folder(tmp_path / "owt_copy", docs)
    assert cli.main(["prepare", "openwebtext", f"--input={folder}", f"--data_dir={tmp_path / 'data'}",
                     "--num_proc=2"]) == 0
    expected = nanogpt_openwebtext(folder)
    assert len(expected["val"]) > 0 and len(expected["train"]) > 10 * len(expected["val"])
    for split in ("train", "val"):
        got = np.fromfile(tmp_path / "data" / "openwebtext" / f"{split}.bin", np.uint16)
        np.testing.assert_array_equal(got, expected[split])
    # one document per EOT, all of them: the split lost and repeated nothing
    enc = tiktoken.get_encoding("gpt2")
    assert sum(len(enc.encode_ordinary(d)) + 1 for d in docs) == len(expected["train"]) + len(expected["val"])


def test_openwebtext_from_one_jsonl_file_and_batches_of_any_size(tmp_path, monkeypatch, tiktoken_cache):
    """A single json-lines file works as --input too; the batching of documents over threads changes nothing."""
    docs = documents(40, seed=1)
    path = tmp_path / "owt.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    outs = []
    for per_task, threads in ((64, 1), (3, 2)):
        monkeypatch.setattr(corpora, "DOCS_PER_TASK", per_task)
        info = corpora.prepare("openwebtext", data_dir=str(tmp_path / f"d{per_task}"), input_path=str(path),
                               num_proc=threads, progress=False)
        outs.append([np.fromfile(Path(info["dir"]) / f"{s}.bin", np.uint16) for s in ("train", "val")])
        assert (info["train_tokens"], info["val_tokens"]) == tuple(len(a) for a in outs[-1])
    for a, b in zip(*outs):
        np.testing.assert_array_equal(a, b)
    ds = datasets.load_dataset("json", data_files=str(path), split="train")
    split = ds.train_test_split(test_size=0.0005, seed=2357, shuffle=True)
    enc = tiktoken.get_encoding("gpt2")
    want = [np.asarray([t for d in split[s]["text"] for t in enc.encode_ordinary(d) + [EOT]], np.uint16)
            for s in ("train", "test")]
    for got, ref in zip(outs[0], want):
        np.testing.assert_array_equal(got, ref)


@pytest.fixture
def fineweb_copy(tmp_path):
    """A local copy of a fineweb-edu-like corpus: jsonl files with text and the hub's other columns."""
    docs = documents(50, seed=2)
    folder = tmp_path / "fw_copy"
    folder.mkdir()
    for i in range(2):
        rows = [{"text": d, "id": f"<urn:{j}>", "score": 3.5} for j, d in enumerate(docs) if j % 2 == i]
        (folder / f"chunk_{i}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    ordered = [d for i in range(2) for j, d in enumerate(docs) if j % 2 == i]  # the files' order
    return folder, ordered


def test_fineweb_edu_writes_llmc_shards(tmp_path, fineweb_copy, tiktoken_cache, capsys):
    folder, docs = fineweb_copy
    size = 1000
    assert cli.main(["prepare", "fineweb_edu", f"--input={folder}", f"--data_dir={tmp_path / 'data'}",
                     f"--shard_size={size}"]) == 0
    assert "llm.c shards" in capsys.readouterr().out
    out = tmp_path / "data" / "fineweb_edu"
    enc = tiktoken.get_encoding("gpt2")
    stream = np.asarray([t for d in docs for t in [EOT] + enc.encode_ordinary(d)], np.uint16)  # EOT first
    n_shards = -(-len(stream) // size)
    names = [f"edu_fineweb_{'val' if i == 0 else 'train'}_{i:06d}.bin" for i in range(n_shards)]
    assert sorted(p.name for p in out.iterdir()) == sorted(names) and n_shards >= 3
    for i, name in enumerate(names):
        header, tokens = read_llmc_shard(out / name)
        assert header[0] == 20240520 and header[1] == 1 and not header[3:].any()
        assert header[2] == len(tokens) == min(size, len(stream) - i * size)
        np.testing.assert_array_equal(tokens, stream[i * size:(i + 1) * size])
    # the loader reads the same stream back: val is shard 0, train the rest in order
    np.testing.assert_array_equal(open_split(out, "val")[:], stream[:size])
    np.testing.assert_array_equal(open_split(out, "train")[:], stream[size:])


def test_fineweb_edu_bad_inputs_are_one_line(tmp_path, fineweb_copy, capsys):
    folder, docs = fineweb_copy
    data_dir = f"--data_dir={tmp_path / 'data'}"
    cases = [
        (["--shard_size=100000"], "not more than one shard"),
        ([], "--input="),
    ]
    for extra, needle in cases:
        args = ["prepare", "fineweb_edu", data_dir, *extra]
        args += [f"--input={folder}"] if extra else [f"--input={tmp_path / 'missing'}"]
        assert cli.main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar's lines
        assert err.startswith("error: ") and needle in err
    for corpus in corpora.CORPORA:  # the hub, with no network: one line that offers --input
        assert cli.main(["prepare", corpus, data_dir]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith(f"error: cannot read the hub's {corpora.HUB[corpus][0]}") and "--input" in err
    one = tmp_path / "one.jsonl"
    one.write_text('{"text": "a single document"}\n', encoding="utf-8")
    assert cli.main(["prepare", "openwebtext", data_dir, f"--input={one}"]) == 2
    assert "holds 1 document(s)" in capsys.readouterr().err.strip().splitlines()[-1]
    notext = tmp_path / "notext.jsonl"
    notext.write_text('{"body": "a"}\n', encoding="utf-8")
    assert cli.main(["prepare", "openwebtext", data_dir, f"--input={notext}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after datasets' own progress lines
    assert err.startswith("error: ") and "no 'text' column" in err
    assert not (tmp_path / "data" / "fineweb_edu").exists() or not any((tmp_path / "data" / "fineweb_edu").iterdir())


# ------------------------------------------------------------------------------------- shards as training data


def test_token_shards_index_as_their_concatenation(tmp_path):
    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 50257, n).astype(np.uint16) for n in (7, 1, 30, 5)]
    for i, p in enumerate(parts):
        write_llmc_shard(tmp_path / f"x_train_{i:06d}.bin", p)
    whole = np.concatenate(parts)
    shards = open_split(tmp_path, "train")
    assert isinstance(shards, TokenShards) and len(shards) == len(whole)
    index = rng.integers(0, len(whole), (3, 4, 9))  # windows that cross shard boundaries too
    np.testing.assert_array_equal(shards[index], whole[index])
    for a in range(len(whole) + 1):
        for b in (a, a + 1, a + 6, len(whole), len(whole) + 3):
            np.testing.assert_array_equal(shards[a:b], whole[a:b])
    starts = np.arange(len(whole) - 9).reshape(-1, 1)  # every window of train's reader, across boundaries too
    for a, b in zip(read_windows(shards, starts, 9), read_windows(whole, starts, 9)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(IndexError):
        shards[np.array([len(whole)])]
    with pytest.raises(IndexError):
        read_windows(shards, np.array([len(whole) - 9]), 9)


def test_bad_shard_headers_are_one_line(tmp_path, run_cli):
    good = np.arange(100, dtype=np.uint16)
    cases = {
        "bad magic 20240801": dict(magic=20240801),
        "shard version 7": dict(version=7),
        "the header says 101 tokens": dict(count=101),
        "the header says 0 tokens": dict(count=0),
    }
    for needle, kwargs in cases.items():
        folder = tmp_path / needle.replace(" ", "_")
        folder.mkdir()
        write_llmc_shard(folder / "c_val_000000.bin", good, **kwargs)
        with pytest.raises(DataError, match=needle) as e:
            open_split(folder, "val")
        assert "c_val_000000.bin" in str(e.value) and "\n" not in str(e.value)
    # as train sees it: one line before anything is built
    bad = tmp_path / "bad_magic_20240801"
    good.tofile(bad / "train.bin")
    assert_one_error_line(*run_cli("train", f"--data_dir={tmp_path}", f"--dataset={bad.name}",
                                   f"--out_dir={tmp_path / 'out'}"), "c_val_000000.bin: bad magic 20240801")
    (tmp_path / "short").mkdir()
    (tmp_path / "short" / "c_val_000000.bin").write_bytes(b"\0" * 100)
    with pytest.raises(DataError, match="less than llm.c's 1,024-byte header"):
        open_split(tmp_path / "short", "val")
    both = tmp_path / "both"
    both.mkdir()
    write_llmc_shard(both / "c_val_000000.bin", good)
    good.tofile(both / "val.bin")
    with pytest.raises(DataError, match="both val.bin and llm.c shards"):
        open_split(both, "val")


def test_check_splits_covers_every_shard(tmp_path):
    write_llmc_shard(tmp_path / "c_train_000001.bin", np.arange(20))
    write_llmc_shard(tmp_path / "c_train_000002.bin", [1, 2, 70])
    write_llmc_shard(tmp_path / "c_val_000000.bin", np.arange(10))
    splits = {s: open_split(tmp_path, s) for s in ("train", "val")}
    with pytest.raises(DataError, match=r"c_train_000002.bin holds token id 70 and the model has 65 ids"):
        check_splits(tmp_path, splits, 8, 65)
    check_splits(tmp_path, splits, 8, 71)
    with pytest.raises(DataError, match=r"c_val_000000.bin holds 10 tokens, fewer than block_size \+ 1 = 16"):
        check_splits(tmp_path, splits, 15, 71)
    with pytest.raises(DataError, match=r"2 train shards holds 23 tokens, fewer than block_size \+ 1 = 31"):
        check_splits(tmp_path, {"train": splits["train"]}, 30, 71)


# the configs' batch layout, schedule and optimizer with a tiny model and context: one step, one eval batch
TINY = ["--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=16", "--max_iters=1", "--eval_iters=1",
        "--eval_interval=1000", "--log_interval=1", "--warmup_iters=1", "--lr_decay_iters=2", "--dtype=float32"]


def tiny_run(dataset, data_dir, out_dir, config="train_gpt2.py"):
    cfg = parse(TrainConfig, [str(REPO / "configs" / config), *TINY, f"--dataset={dataset}", f"--data_dir={data_dir}",
                              f"--out_dir={out_dir}"])
    return Run(cfg, model_config(cfg, 50304))


def test_hand_made_llmc_shards_give_the_single_files_batches(tmp_path, bpe_data):
    """Tiny Shakespeare's BPE train.bin / val.bin cut into llm.c shards (written here as llm.c writes them)
    give train's and eval's batches of the single files: the shards are read as one sequence."""
    data_dir, _ = bpe_data
    src = data_dir / "shakespeare"
    shards = tmp_path / "data" / "shakespeare_shards"
    shards.mkdir(parents=True)
    train, val = (np.fromfile(src / f"{s}.bin", np.uint16) for s in ("train", "val"))
    write_llmc_shard(shards / "tiny_shakespeare_val_000000.bin", val)
    for i, part in enumerate(np.array_split(train, 3), start=1):
        write_llmc_shard(shards / f"tiny_shakespeare_train_{i:06d}.bin", part)
    single, sharded = (tiny_run(d, f, tmp_path / "out") for d, f in (("shakespeare", data_dir),
                                                                      ("shakespeare_shards", tmp_path / "data")))
    assert isinstance(sharded.splits["train"], TokenShards) and len(sharded.splits["train"]) == len(train)
    for it in range(4):
        for a, b in zip(single.train_batch(it), sharded.train_batch(it)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for split in ("train", "val"):  # eval's every-token pass (eval_iters=0) reads the same windows too
        pairs = zip(*(batches(r.splits[split], 16, 7, 0)[1] for r in (single, sharded)))
        for (xa, ya), (xb, yb) in pairs:
            np.testing.assert_array_equal(xa, xb)
            np.testing.assert_array_equal(ya, yb)


@pytest.mark.slow
def test_train_gpt2_config_trains_on_hand_made_llmc_shards(tmp_path, capsys):
    """configs/train_gpt2.py, a tiny model apart, trains on llm.c shards written here; the layout is printed."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "data" / "handmade"
    folder.mkdir(parents=True)
    write_llmc_shard(folder / "handmade_val_000000.bin", rng.integers(0, 50257, 500))
    write_llmc_shard(folder / "handmade_train_000001.bin", rng.integers(0, 50257, 3000))
    args = ["train", str(REPO / "configs" / "train_gpt2.py"), *TINY, "--dataset=handmade",
            f"--data_dir={tmp_path / 'data'}", f"--out_dir={tmp_path / 'out'}"]
    assert cli.main(args) == 0
    log = capsys.readouterr().out
    assert f"tokens per iteration: {40 * 12 * 16:,}" in log and "layout: 1 process(es)" in log
    assert "step 0: train loss" in log and "iter 0: loss" in log


@pytest.mark.slow
def test_train_gpt2_fineweb_config_trains_on_prepared_shards(tmp_path, fineweb_copy, capsys):
    folder, _ = fineweb_copy
    data = tmp_path / "data"
    assert corpora.prepare("fineweb_edu", data_dir=str(data), input_path=str(folder), shard_size=600,
                           progress=False)["shards"] >= 3
    args = ["train", str(REPO / "configs" / "train_gpt2_fineweb.py"), *TINY, "--dataset=fineweb_edu",
            f"--data_dir={data}", f"--out_dir={tmp_path / 'out'}", "--eval_interval=1"]  # saves at iter 1
    assert cli.main(args) == 0
    log = capsys.readouterr().out
    assert f"tokens per iteration: {8 * 64 * 16:,}" in log and "layout: 1 process(es)" in log
    assert "step 0: train loss" in log and "iter 0: loss" in log
    assert cli.main(["eval", f"--out_dir={tmp_path / 'out'}", "--eval_iters=1", "--batch_size=2"]) == 0
    assert f"{data / 'fineweb_edu'} val: loss" in capsys.readouterr().out  # eval reads the shard folder too


# ------------------------------------------------------------------------------------------------ configs


NANOGPT_TRAIN_GPT2 = dict(batch_size=12, block_size=1024, gradient_accumulation_steps=40, max_iters=600000,
                          lr_decay_iters=600000, eval_interval=1000, eval_iters=200, log_interval=10,
                          weight_decay=1e-1, learning_rate=6e-4, min_lr=6e-5, warmup_iters=2000, beta1=0.9,
                          beta2=0.95, bias=False, dropout=0.0, n_layer=12, n_head=12, n_embd=768,
                          dataset="openwebtext", grad_clip=1.0)
# scripts/run_gpt2_124M.sh: -b 64 -t 1024 -d 524288 -l 0.0006 -u 700 -q 0.0 -c 0.1 -v 250; one epoch of 10B
LLMC_124M = dict(block_size=1024, learning_rate=6e-4, warmup_iters=700, min_lr=0.0, weight_decay=0.1,
                 eval_interval=250, bias=True, n_layer=12, n_head=12, n_embd=768, beta2=0.95, dataset="fineweb_edu")


@pytest.mark.parametrize("name,expected,tokens", [("train_gpt2.py", NANOGPT_TRAIN_GPT2, 491_520),
                                                  ("train_gpt2_fineweb.py", LLMC_124M, 524_288)])
def test_headline_configs_hold_their_recipes(name, expected, tokens):
    cfg = parse(TrainConfig, [str(REPO / "configs" / name)])
    assert {k: getattr(cfg, k) for k in expected} == expected
    assert cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size == tokens
    if name == "train_gpt2_fineweb.py":
        assert cfg.max_iters == cfg.lr_decay_iters == 10_000_000_000 // tokens
