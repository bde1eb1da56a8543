"""`prepare text` against independent references: tiktoken's own gpt2 encoding, a sentencepiece processor
loaded from the written model file, a word count by collections.Counter, nanoGPT's shakespeare_char/shakespeare
files; bits per character against loss / ln 2 * tokens / characters recomputed here; memory under a cap."""

import collections
import json
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import sentencepiece
import tiktoken

from conftest import REPO, assert_one_error_line
from nanogpt_jax.config import ConfigError, PrepareConfig, parse
from nanogpt_jax.data import load_meta, prepare
from nanogpt_jax.textdata import cut_point, find_files, prepare_text, read_chunks
from nanogpt_jax.tokenizers import UNK, Tokenizer, words

# unicode that spans several bytes (so that reads of a few bytes cut characters), runs of spaces and lines
EXTRA = "café naïve — 日本語 😀 tab\there\n\n\n   indented  twice\n"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, input_text):
    """Documents cut from Tiny Shakespeare in three places: a folder (with a sub-folder and a hidden file that is
    skipped) and a glob. (inputs, the documents' texts in prepare's order, the held-out last paragraph)."""
    root = tmp_path_factory.mktemp("corpus")
    paras = input_text.split("\n\n")
    held_out = paras[-1]
    docs = ["\n\n".join(paras[i:i + 40]) + ("\n" + EXTRA if i % 80 == 0 else "") for i in range(0, 400, 40)]
    names = ["books/a.txt", "books/b.txt", "books/sub/c.txt", "books/sub/d.md", "books/z.txt",
             "more/1.txt", "more/2.txt", "more/3.txt", "more/4.txt", "more/5.txt"]
    for name, doc in zip(names, docs):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(doc, encoding="utf-8")
    (root / "books" / ".hidden").write_text("never read")
    (root / "more" / "skip.md").write_text("not matched by the glob")
    return [str(root / "books"), str(root / "more" / "*.txt")], docs, held_out


def read_bin(folder, split):
    return np.fromfile(folder / f"{split}.bin", np.uint16)


def reference_splits(docs, encode, eot, val_fraction=0.1):
    """train/val ids by the documented rule, written out plainly: the corpus's characters cut at
    int(n * (1 - val_fraction)), each document (or half) encoded whole, eot after each document's end."""
    n = sum(map(len, docs))
    split_at, pos, out = int(n * (1 - val_fraction)), 0, {"train": [], "val": []}
    for doc in docs:
        halves = [("train", doc[:max(0, split_at - pos)]), ("val", doc[max(0, split_at - pos):])]
        halves = [(s, t) for s, t in halves if t] or [("train" if pos < split_at else "val", "")]
        for s, t in halves:
            out[s] += encode(t)
        if eot is not None:
            out[halves[-1][0]].append(eot)
        pos += len(doc)
    return {s: np.asarray(ids, np.uint16) for s, ids in out.items()}


def test_gpt2_tokens_are_tiktokens_plus_one_eot_per_document(corpus, tmp_path, tiktoken_cache):
    inputs, docs, _ = corpus
    enc = tiktoken.get_encoding("gpt2")  # tiktoken's own files (TIKTOKEN_CACHE_DIR), not the shipped copy
    ref = reference_splits(docs, enc.encode_ordinary, enc.eot_token)
    for chunk_bytes in (1 << 20, 61):  # 61-byte reads cut words, lines and UTF-8 characters
        info = prepare_text(inputs, "g", "gpt2", data_dir=str(tmp_path / str(chunk_bytes)), progress=False,
                            chunk_bytes=chunk_bytes)
        folder = tmp_path / str(chunk_bytes) / "g"
        for split in ("train", "val"):
            np.testing.assert_array_equal(read_bin(folder, split), ref[split])
        assert info["files"] == len(docs) == sum(int((ref[s] == 50256).sum()) for s in ref)
        assert info["train_tokens"] + info["val_tokens"] == sum(len(ref[s]) for s in ref)
        assert not (folder / "meta.json").exists()  # GPT-2 BPE, as nanoGPT's datasets without meta
        stats = json.loads((folder / "stats.json").read_text())
        n = sum(map(len, docs))
        assert stats == {"train": {"tokens": len(ref["train"]), "chars": int(n * 0.9)},
                         "val": {"tokens": len(ref["val"]), "chars": n - int(n * 0.9)}}


def test_one_document_gives_nanogpts_shakespeare_files(tmp_path, input_txt):
    """Tiny Shakespeare as one document: char = shakespeare_char file for file (1,003,854 / 111,540 tokens);
    gpt2 = shakespeare plus the EOT that ends the document."""
    prepare_text([str(input_txt)], "c", "char", data_dir=str(tmp_path), progress=False)
    prepare_text([str(input_txt)], "g", "gpt2", data_dir=str(tmp_path), progress=False)
    prepare("shakespeare_char", data_dir=str(tmp_path), input_path=str(input_txt))
    prepare("shakespeare", data_dir=str(tmp_path), input_path=str(input_txt))
    char, nano_char = tmp_path / "c", tmp_path / "shakespeare_char"
    assert [len(read_bin(char, s)) for s in ("train", "val")] == [1_003_854, 111_540]
    for name in ("train.bin", "val.bin", "stats.json"):
        assert (char / name).read_bytes() == (nano_char / name).read_bytes()
    assert load_meta(char) == load_meta(nano_char)
    bpe, nano_bpe = tmp_path / "g", tmp_path / "shakespeare"
    np.testing.assert_array_equal(read_bin(bpe, "train"), read_bin(nano_bpe, "train"))
    np.testing.assert_array_equal(read_bin(bpe, "val"), np.append(read_bin(nano_bpe, "val"), 50256))


def test_cut_point_keeps_gpt2_tokens(input_text):
    enc = tiktoken.get_encoding("gpt2")
    for text in (input_text[:3000], "a  b\n\n c \n\nd", "x" * 50 + "  \n\n\n y"):
        for end in range(1, len(text), 7):
            i = cut_point(text[:end])
            assert enc.encode_ordinary(text[:i]) + enc.encode_ordinary(text[i:]) == enc.encode_ordinary(text)


def test_word_vocabulary_and_round_trip_up_to_whitespace(corpus, tmp_path):
    inputs, docs, _ = corpus
    info = prepare_text(inputs, "w", "word", vocab_size=2000, data_dir=str(tmp_path), progress=False)
    meta = load_meta(tmp_path / "w")
    counts = collections.Counter(re.findall(r"\w+|[^\w\s]|\n", "".join(docs)))
    assert info["vocab_size"] == meta["vocab_size"] == 2000 and meta["itos"][0] == UNK
    ranked = sorted(counts.items(), key=lambda kv: -kv[1])  # stable: ties keep their first appearance
    assert meta["itos"][1:] == [w for w, _ in ranked[:1999]]
    tok = Tokenizer(meta)
    held_out = "What, my lord? I will not speak of it!\nThe people -- 'tis he -- is here;  and\tgone."
    assert held_out not in "".join(docs)
    assert [w for w in words(held_out) if w not in meta["itos"]] == []  # all in the vocabulary
    ids = tok.encode(held_out)
    decoded = tok.decode(ids)
    assert "".join(decoded.split()) == "".join(held_out.split())
    assert decoded.count("\n") == 1
    assert tok.encode("zzyzx the") == [0, meta["itos"].index("the")]  # an unknown word is <unk>
    train = read_bin(tmp_path / "w", "train")
    first = [w for w in re.findall(r"\w+|[^\w\s]|\n", docs[0])][:30]
    assert tok.decode(train[:30].tolist()) == tok.decode([meta["itos"].index(w) if w in meta["itos"] else 0
                                                          for w in first])


def test_sentencepiece_round_trips_exactly_and_matches_its_model_file(corpus, tmp_path):
    inputs, docs, held_out = corpus
    info = prepare_text(inputs, "s", "sentencepiece", vocab_size=400, data_dir=str(tmp_path), progress=False)
    folder = tmp_path / "s"
    sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    assert json.loads((folder / "meta.json").read_text()) == {"tokenizer": "sentencepiece", "vocab_size": 400,
                                                              "model_file": "tokenizer.model"}
    ref = reference_splits(docs, sp.encode, sp.eos_id())
    for split in ("train", "val"):
        np.testing.assert_array_equal(read_bin(folder, split), ref[split])
    assert info["vocab_size"] == 400
    tok = Tokenizer(load_meta(folder))
    for text in (held_out, "  Ünseen: ß€ 😀\n\n\tend "):
        assert tok.decode(tok.encode(text)) == text


def test_repeated_input_option(tmp_path):
    """config.parse: a tuple[str, ...] option repeated on the command line keeps every value, in order, and
    replaces a config file's value; paths are kept as written (not read as Python literals)."""
    assert parse(PrepareConfig, positional="dataset", argv=["text", "--input=a", "--input", "b/*.txt", "--input=1e3"]).input == (
        "a", "b/*.txt", "1e3")
    assert parse(PrepareConfig, positional="dataset", argv=["text"]).input == ()
    config = tmp_path / "c.py"
    config.write_text("input = ['x.txt', 'y/']\n")
    assert parse(PrepareConfig, positional="dataset", argv=["text", str(config)]).input == ("x.txt", "y/")
    assert parse(PrepareConfig, positional="dataset", argv=["text", str(config), "--input=z"]).input == ("z",)
    config.write_text("input = 3\n")
    with pytest.raises(ConfigError, match="expected a string or a list of strings"):
        parse(PrepareConfig, positional="dataset", argv=["text", str(config)])


@pytest.mark.slow
def test_sentencepiece_train_sample_eval_end_to_end(corpus, tmp_path, run_cli):
    """Prepared, trained, then sampled and evaluated with the model the checkpoint carries (the dataset's
    tokenizer.model is removed first): bits/char = loss / ln 2 * val tokens / val characters."""
    inputs, docs, held_out = corpus
    args = [f"--input={p}" for p in inputs]
    code, out, err = run_cli("prepare", "text", *args, "--name=sp", "--tokenizer=sentencepiece",
                             "--vocab_size=400", f"--data_dir={tmp_path}")
    assert code == 0 and "vocab size 400" in out, err
    code, out, err = run_cli("train", "--dataset=sp", f"--data_dir={tmp_path}", f"--out_dir={tmp_path / 'out'}",
                             "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=16", "--batch_size=4",
                             "--gradient_accumulation_steps=1", "--max_iters=4", "--eval_interval=4",
                             "--eval_iters=2", "--warmup_iters=1", "--lr_decay_iters=4", "--dtype=float32")
    assert code == 0, err
    model = (tmp_path / "sp" / "tokenizer.model").read_bytes()
    (tmp_path / "sp" / "tokenizer.model").unlink()
    code, out, err = run_cli("sample", f"--out_dir={tmp_path / 'out'}", "--start=To be", "--num_samples=2",
                             "--max_new_tokens=20")
    assert code == 0, err
    samples = out.split("---------------\n")[:2]
    assert all(s.startswith("To be") and len(s) > len("To be\n") for s in samples)
    (tmp_path / "sp" / "tokenizer.model").write_bytes(model)
    code, out, err = run_cli("eval", f"--out_dir={tmp_path / 'out'}", "--eval_iters=0", "--batch_size=64")
    assert code == 0, err
    loss, bpc = (float(x) for x in re.search(r"loss ([\d.]+), .* bits/char ([\d.]+)", out).groups())
    n = sum(map(len, docs))
    sp = sentencepiece.SentencePieceProcessor(model_proto=model)
    val_tokens = len(reference_splits(docs, sp.encode, sp.eos_id())["val"])
    assert bpc == pytest.approx(loss / math.log(2) * val_tokens / (n - int(n * 0.9)), abs=2e-4)


@pytest.mark.slow
def test_bits_per_char_of_a_char_dataset_is_loss_over_ln2_even_without_stats(char_run, run_cli, tmp_path):
    """shakespeare_char: one token per character, also for a folder prepared before stats.json existed."""
    out_dir, data_dir = char_run
    old = tmp_path / "shakespeare_char"
    shutil.copytree(data_dir / "shakespeare_char", old)
    (old / "stats.json").unlink()
    code, out, err = run_cli("eval", f"--out_dir={out_dir}", f"--data_dir={tmp_path}", "--eval_iters=2")
    loss, bpc = (float(x) for x in re.search(r"loss ([\d.]+), .* bits/char ([\d.]+)", out).groups())
    assert code == 0 and bpc == pytest.approx(loss / math.log(2), abs=1e-4), err
    (tmp_path / "t.txt").write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n")
    code, out, err = run_cli("eval", f"--out_dir={out_dir}", f"--input={tmp_path / 't.txt'}", "--eval_iters=0")
    loss, bpc = (float(x) for x in re.search(r"loss ([\d.]+), .* bits/char ([\d.]+)", out).groups())
    assert code == 0 and bpc == pytest.approx(loss / math.log(2), abs=1e-4), err


@pytest.mark.slow
def test_bits_per_char_is_na_for_bpe_data_without_stats(token_data, hf_small, run_cli):
    data_dir, _ = token_data
    _, folder = hf_small
    code, out, err = run_cli("eval", f"--init_from={folder}", f"--data_dir={data_dir}", "--dataset=toks",
                             "--eval_iters=1", "--batch_size=2", "--block_size=16")
    assert code == 0 and "bits/char n/a (no stats.json" in out, err


@pytest.mark.slow
def test_a_corpus_bigger_than_the_memory_cap_prepares(tmp_path):
    """Address space capped at what a 4 MB corpus needs (whole batches of chunks) + 16 MB: a 50 MB corpus, 3x
    that headroom (in ids 6x for char), still prepares, char and gpt2. glibc's arenas are capped so that the
    address space follows what is allocated."""
    line = "Thou art a villain, and I'll prove it on thee; 1234 — ŝ\n"
    small, big = tmp_path / "small.txt", tmp_path / "big"
    small.write_text(line * (4_000_000 // len(line)), encoding="utf-8")
    big.mkdir()
    for i in range(5):
        (big / f"{i}.txt").write_text(line * (10_000_000 // len(line)), encoding="utf-8")
    script = textwrap.dedent("""
        import resource, sys
        cap = int(sys.argv[3])
        if cap:
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        from nanogpt_jax.textdata import prepare_text
        info = prepare_text([sys.argv[1]], "d", sys.argv[2], data_dir=sys.argv[4], progress=False)
        peak = [l for l in open("/proc/self/status") if l.startswith("VmPeak")][0].split()[1]
        print(int(peak) * 1024, info["train_tokens"] + info["val_tokens"])
    """)

    def run(path, tokenizer, cap):
        env = {**os.environ, "PYTHONPATH": str(REPO), "MALLOC_ARENA_MAX": "2"}
        proc = subprocess.run([sys.executable, "-c", script, str(path), tokenizer, str(cap), str(tmp_path / "d")],
                              capture_output=True, text=True, cwd=REPO, env=env)
        assert proc.returncode == 0, (tokenizer, cap, proc.stderr[-2000:])
        return [int(x) for x in proc.stdout.split()]

    chars = 5 * (10_000_000 // len(line)) * len(line)
    for tokenizer in ("char", "gpt2"):
        peak, _ = run(small, tokenizer, 0)
        _, tokens = run(big, tokenizer, peak + (16 << 20))
        assert tokens == chars if tokenizer == "char" else chars / 5 < tokens < chars / 2


@pytest.mark.parametrize("case,fragments", [
    ("missing", ["--input=", "no such file or folder"]),
    ("no match", ["matches no file"]),
    ("no input", ["needs --input"]),
    ("no name", ["needs --name"]),
    ("unreadable", ["/proc/self/mem: cannot read it"]),
    ("not utf-8", ["bad.txt is not UTF-8 text: byte 1,048,579 is b'\\xff'"]),
    ("empty", ["holds 0 characters"]),
    ("too many chars", ["65,537 distinct characters"]),
    ("sentencepiece too big", ["sentencepiece could not train a 5,000-token model", "Vocabulary size"]),
    ("bad tokenizer", ["--tokenizer=bpe"]),
])
def test_each_bad_input_is_one_line(tmp_path, run_cli, case, fragments):
    good = tmp_path / "good.txt"
    good.write_text("a small good text\n" * 10)
    args = {"missing": [f"--input={tmp_path / 'nope.txt'}"], "no match": [f"--input={tmp_path}/*.md"], "no input": [],
            "no name": [f"--input={good}", "--name="], "unreadable": ["--input=/proc/self/mem"],
            "bad tokenizer": [f"--input={good}", "--tokenizer=bpe"]}.get(case)
    if case == "not utf-8":  # the bad byte after the first 1 MiB read, past a 2-byte character cut by it
        (tmp_path / "bad.txt").write_bytes(b"a" * ((1 << 20) - 1) + "é".encode() + b"ok\xff")
        args = [f"--input={tmp_path / 'bad.txt'}", f"--input={good}"]
    elif case == "empty":
        (tmp_path / "e1.txt").write_text("")
        (tmp_path / "e2.txt").write_text("")
        args = [f"--input={tmp_path}/e*.txt"]
    elif case == "too many chars":
        (tmp_path / "u.txt").write_text("".join(chr(c) for c in range(0x10000, 0x10000 + 65_537)), encoding="utf-8")
        args = [f"--input={tmp_path / 'u.txt'}", "--tokenizer=char"]
    elif case == "sentencepiece too big":
        args = [f"--input={good}", "--tokenizer=sentencepiece", "--vocab_size=5000"]
    if case != "no name":
        args.append("--name=x")
    assert_one_error_line(*run_cli("prepare", "text", *args, f"--data_dir={tmp_path / 'data'}"), *fragments)
    assert not (tmp_path / "data" / "x" / "train.bin").exists()


def test_read_chunks_names_the_byte_offset_and_keeps_split_characters(tmp_path):
    path = tmp_path / "t.txt"
    text = "é😀 a b\n" * 40
    path.write_text(text, encoding="utf-8")
    assert "".join(t for t, _ in read_chunks(path, 5)) == text
    assert sum(n for _, n in read_chunks(path, 5)) == path.stat().st_size


def _looped_tree(tmp_path):
    """DIR with a.txt, sub/b.txt and sub/c.md, a link to itself, two links that loop between two folders, a
    second name of a.txt and a link to a file outside (read, once)."""
    root = tmp_path / "dir"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("first document\n")
    (root / "sub" / "b.txt").write_text("second document\n")
    (root / "sub" / "c.md").write_text("third document\n")
    (tmp_path / "outside.txt").write_text("fourth document\n")
    (root / "self").symlink_to(root)
    (root / "sub" / "up").symlink_to(root)
    (root / "sub" / "loop").symlink_to(root / "sub")
    (root / "also_a.txt").symlink_to(root / "a.txt")
    (root / "sub" / "out.txt").symlink_to(tmp_path / "outside.txt")
    return root


@pytest.mark.parametrize("spec, expected, duplicates", [
    ("{root}/**/*.txt", ["a.txt", "sub/b.txt", "sub/out.txt"], 1),  # also_a.txt is a second name of a.txt
    ("{root}", ["a.txt", "sub/b.txt", "sub/c.md", "sub/out.txt"], 1),
    ("{root}/**", ["a.txt", "sub/b.txt", "sub/c.md", "sub/out.txt"], 1),
    ("{root}/s*/*.md", ["sub/c.md"], 0),
    ("{root}/**/[bc].*", ["sub/b.txt", "sub/c.md"], 0),
])
def test_file_discovery_follows_links_but_reads_each_real_file_once(tmp_path, spec, expected, duplicates):
    """Folders and `**` globs with a link to themselves and a loop of two links: each real folder is entered
    once (glob's own `**` walked such a tree for minutes), each real file read once, the names skipped counted."""
    root = _looped_tree(tmp_path)
    files, skipped = find_files([spec.format(root=root)])
    assert [p.relative_to(root).as_posix() for p in files] == expected
    assert skipped == duplicates


def test_prepare_says_how_many_duplicates_it_skipped(tmp_path, run_cli):
    root = _looped_tree(tmp_path)
    code, out, err = run_cli("prepare", "text", f"--input={root}/**/*.txt", f"--input={root / 'a.txt'}",
                             "--name=looped", f"--data_dir={tmp_path / 'data'}", "--tokenizer=char")
    assert code == 0, err
    assert out.startswith(f"wrote {tmp_path / 'data' / 'looped'} (char, 3 file(s), 2 duplicate(s) skipped): "), out
    text = "first document\nsecond document\nfourth document\n"
    assert json.loads((tmp_path / "data" / "looped" / "stats.json").read_text())["train"]["chars"] == int(
        len(text) * 0.9)
