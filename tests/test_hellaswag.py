"""HellaSwag against build-nanogpt's `hellaswag.py`, rewritten here in torch on transformers' GPT2LMHeadModel with
tiktoken's own GPT-2 BPE (randomly initialised weights, a fixture of our own in rowanz/hellaswag's jsonl format;
nothing is downloaded: the download is tested with file:// URLs)."""

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
import tiktoken
import torch
from torch.nn import functional as F
from transformers import GPT2LMHeadModel

from conftest import assert_one_error_line, hf_gpt2, read_metrics, tiny_cfg
from nanogpt_jax import hellaswag
from nanogpt_jax.config import ConfigError
from nanogpt_jax.convert import export_hf
from nanogpt_jax.data import DataError
from nanogpt_jax.load import crop
from nanogpt_jax.plot import plot
from nanogpt_jax.pretrained import from_pretrained
from nanogpt_jax.train import train

# (ctx, endings, label): short texts of our own; the longest row is 35 tokens
EXAMPLES = [
    ("A baker pulls a tray of bread out of the oven. She",
     ["sets the loaves on a rack to cool.", "climbs onto the roof with a ladder.", "sings to the flour.",
      "paints the oven door bright blue while the bread burns on the floor."], 0),
    ("Two kids build a sandcastle near the water. A wave",
     ["plays the violin.", "washes over the walls and the kids laugh.", "is eaten.",
      "files its taxes before April."], 1),
    ("How to repot a plant. Water the plant a day before.",
     ["Sell the pot.", "Fly to the moon.", "Gently lift it out of its old pot, holding the base of the stem.",
      "Ask the cat."], 2),
    ("A man ties his running shoes on the porch. He",
     ["eats the laces.", "becomes a tree.", "swims across the porch.", "jogs down the street toward the park."], 3),
    ("The orchestra tunes up. The conductor",
     ["raises her baton and the music begins.", "melts.", "drives a tractor through the hall.",
      "orders pizza for the violins."], 0),
    ("", ["An empty context: the first token of an ending is not scored.", "Short.", "Shorter one here.",
          "And a fourth ending."], 1),
]


def write_jsonl(path, examples=EXAMPLES):
    """The examples as hellaswag_val.jsonl lines, with the fields build-nanogpt ignores as well."""
    lines = [json.dumps({"ind": i, "activity_label": "Our own", "ctx_a": ctx, "ctx_b": "", "ctx": ctx, "split": "val",
                         "split_type": "indomain", "label": label, "endings": endings, "source_id": f"ours~{i}"})
             for i, (ctx, endings, label) in enumerate(examples)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def hf_bpe(tmp_path_factory):
    """A GPT2LMHeadModel with GPT-2's 50,257 ids (2 layers of 32, 64 positions) and its save_pretrained folder."""
    model = hf_gpt2(n_embd=32, n_head=2, vocab=50257, initializer_range=0.1)
    folder = tmp_path_factory.mktemp("hf_bpe")
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture
def val_file(tmp_path):
    return write_jsonl(tmp_path / "val.jsonl")


def build_nanogpt_losses(model, ctx, endings, T=None):
    """build-nanogpt's render_example and evaluate for one example: (sum_loss, avg_loss) of each ending. T: each
    row keeps its last T + 1 tokens (the window a model of T positions scores), its mask with it."""
    enc = tiktoken.get_encoding("gpt2")  # tiktoken's own files, from the shared cache
    ctx_tokens = enc.encode(ctx)
    tok_rows, mask_rows = [], []
    for end in endings:
        end_tokens = enc.encode(" " + end)
        tok_rows.append((ctx_tokens + end_tokens)[-(T + 1) if T else 0:])
        mask_rows.append(([0] * len(ctx_tokens) + [1] * len(end_tokens))[-(T + 1) if T else 0:])
    max_len = max(len(row) for row in tok_rows)
    tokens = torch.zeros((4, max_len), dtype=torch.long)
    mask = torch.zeros((4, max_len), dtype=torch.long)
    for i, (tok_row, mask_row) in enumerate(zip(tok_rows, mask_rows)):
        tokens[i, :len(tok_row)] = torch.tensor(tok_row)
        mask[i, :len(mask_row)] = torch.tensor(mask_row)
    with torch.no_grad():
        logits = model(tokens).logits
    shift_losses = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1),
                                   reduction="none").view(4, -1)
    shift_mask = mask[:, 1:]
    sum_loss = (shift_losses * shift_mask).sum(dim=1)
    return sum_loss.numpy(), (sum_loss / shift_mask.sum(dim=1)).numpy()


def build_nanogpt_accuracy(ref) -> dict:
    """build-nanogpt's counts: acc from the lowest sum_loss, acc_norm from the lowest avg_loss (first on ties)."""
    labels = np.array([label for *_, label in EXAMPLES])
    return dict(acc=np.mean([np.argmin(s) for s, _ in ref] == labels),
                acc_norm=np.mean([np.argmin(m) for _, m in ref] == labels), n=len(EXAMPLES))


@pytest.mark.parametrize("block_size, batch_size", [(None, 4), (16, 1)])
def test_losses_and_accuracy_equal_build_nanogpt(hf_bpe, val_file, block_size, batch_size):
    """Each ending's summed and mean loss as build-nanogpt computes them (to 1e-5), hence acc and acc_norm; with
    a model cropped to 16 positions the longer rows keep their last 17 tokens. batch_size 4: a batch of 4 and
    a last one of 2, rows of different widths padded."""
    model, folder = hf_bpe
    config, params = from_pretrained(str(folder))
    if block_size:
        config, params = crop(config, params, block_size)
    examples = hellaswag.read(val_file)
    sums, means = hellaswag.score(config, params, examples, batch_size=batch_size)
    ref = [build_nanogpt_losses(model, ctx, endings, block_size) for ctx, endings, _ in EXAMPLES]
    np.testing.assert_allclose(sums, [s for s, _ in ref], rtol=1e-5)
    np.testing.assert_allclose(means, [m for _, m in ref], rtol=1e-5)

    expected = build_nanogpt_accuracy(ref)
    assert hellaswag.evaluate(config, params, examples, batch_size=batch_size) == expected
    assert hellaswag.accuracy(sums, means, [label for *_, label in EXAMPLES]) == expected


def test_a_long_row_keeps_its_last_tokens():
    """The window a model of T positions reads: targets only where the ending's tokens are predicted."""
    x, y = hellaswag.window([1, 2, 3], [4, 5], T=8)
    assert x.tolist() == [1, 2, 3, 4] and y.tolist() == [-1, -1, 4, 5]
    x, y = hellaswag.window([1, 2, 3, 4, 5, 6], [7, 8], T=3)
    assert x.tolist() == [5, 6, 7] and y.tolist() == [-1, 7, 8]


def test_download_is_checked_and_kept(val_file, tmp_path, monkeypatch):
    """No --hellaswag_file: the file is downloaded once into $XDG_CACHE_HOME/nanogpt-jax/hellaswag and read from
    there afterwards; a wrong sha256 leaves nothing behind."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(hellaswag, "URL", val_file.as_uri())
    monkeypatch.setattr(hellaswag, "SHA256", "0" * 64)
    with pytest.raises(DataError, match=f"sha256 is {hashlib.sha256(val_file.read_bytes()).hexdigest()}.*"
                                        "--hellaswag_file=PATH"):
        hellaswag.dataset_file()
    assert list((tmp_path / "cache" / "nanogpt-jax" / "hellaswag").iterdir()) == []

    monkeypatch.setattr(hellaswag, "SHA256", hashlib.sha256(val_file.read_bytes()).hexdigest())
    said = []
    path = hellaswag.dataset_file(log=said.append)
    assert path == tmp_path / "cache" / "nanogpt-jax" / "hellaswag" / "hellaswag_val.jsonl"
    assert path.read_bytes() == val_file.read_bytes()
    assert said == [f"downloaded {val_file.as_uri()} to {path} (sha256 checked)"]
    val_file.unlink()  # the URL is gone: the cached copy is what is read now, without a word
    assert hellaswag.dataset_file(log=said.append) == path and len(said) == 1
    assert [ex.label for ex in hellaswag.read(path)] == [label for *_, label in EXAMPLES]


@pytest.mark.parametrize("line, number", [
    ("not json", 2),
    (json.dumps({"ctx": "A", "endings": ["a", "b", "c"], "label": 0}), 2),  # three endings
    (json.dumps({"ctx": "A", "endings": ["a", "b", "c", "d"]}), 2),  # the test split: no labels
    (json.dumps({"ctx": "A", "endings": ["a", "b", "c", "d"], "label": "1"}), 2),
])
def test_a_bad_line_is_named(tmp_path, line, number):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"ctx": "A", "endings": ["a", "b", "c", "d"], "label": 0}) + "\n" + line + "\n")
    with pytest.raises(DataError, match=f"bad.jsonl, line {number}: not a HellaSwag example"):
        hellaswag.read(path)
    path.write_text("\n\n")
    with pytest.raises(DataError, match="holds no HellaSwag examples"):
        hellaswag.read(path)


# ---------------------------------------------------------------------------------------------- command line


def test_eval_task_hellaswag_prints_the_figures(hf_bpe, val_file, run_cli):
    """One result line with acc, acc_norm and the count, build-nanogpt's figures; a progress bar on stderr."""
    model, folder = hf_bpe
    r = build_nanogpt_accuracy([build_nanogpt_losses(model, ctx, endings) for ctx, endings, _ in EXAMPLES])
    code, out, err = run_cli("eval", "--task=hellaswag", f"--init_from={folder}", f"--hellaswag_file={val_file}",
                             "--batch_size=2", "--dtype=float32")
    assert code == 0, err
    assert out.splitlines() == [f"hellaswag {val_file}: acc {r['acc']:.4f}, acc_norm {r['acc_norm']:.4f} "
                                f"(6 examples)"]
    assert "hellaswag: 100%" in err and "3/3" in err


@pytest.mark.parametrize("args, fragments", [
    (["--hellaswag_file=missing.jsonl"], ["--hellaswag_file=missing.jsonl", "no such file", "download", "URL"]),
    ([], ["cannot download", "URL", "--hellaswag_file=PATH"]),  # no file given, and the download fails
    (["--init_from=SMALL", "--hellaswag_file=VAL"], ["GPT-2 BPE", "vocabulary of 512"]),
    (["--init_from=CHARS", "--hellaswag_file=VAL"], ["GPT-2 BPE", "reads char tokens"]),  # an exported char model
    (["--task=hellaswa"], ["--task=hellaswa", "loss or hellaswag"]),
])
def test_eval_hellaswag_errors_are_one_line(args, fragments, hf_bpe, hf_small, val_file, tmp_path, monkeypatch,
                                            run_cli):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    url = (tmp_path / "nowhere.jsonl").as_uri()
    monkeypatch.setattr(hellaswag, "URL", url)
    chars = shutil.copytree(hf_bpe[1], tmp_path / "chars")
    (chars / "meta.json").write_text(json.dumps({"vocab_size": 2, "itos": ["a", "b"]}))
    args = [a.replace("SMALL", str(hf_small[1])).replace("CHARS", str(chars)).replace("VAL", str(val_file))
            for a in args]
    model = [] if any(a.startswith("--init_from=") for a in args) else [f"--init_from={hf_bpe[1]}"]
    code, out, err = run_cli("eval", "--task=hellaswag", *model, *args)
    assert_one_error_line(code, out, err, *[f.replace("URL", url) for f in fragments])


def test_hellaswag_file_needs_the_task(run_cli):
    assert_one_error_line(*run_cli("eval", "--hellaswag_file=x.jsonl"), "--hellaswag_file=x.jsonl",
                          "--task=hellaswag")


SHARDED = """
import json, sys
import jax
jax.config.update("jax_num_cpu_devices", 8)
from nanogpt_jax import hellaswag, parallel
from nanogpt_jax.pretrained import from_pretrained
config, params = from_pretrained(sys.argv[1])
examples = hellaswag.read(sys.argv[2])
out = {}
for name, mesh in (("default", None), ("8 devices", parallel.make_mesh(jax.devices(), 1)),
                   ("fsdp=2", parallel.make_mesh(jax.devices(), 2))):
    sums, means = hellaswag.score(config, params, examples, batch_size=1, mesh=mesh)
    out[name] = [sums.tolist(), means.tolist()]
print(json.dumps(out))
"""


@pytest.mark.slow
def test_rows_split_over_devices_and_fsdp_params(hf_bpe, val_file, tmp_path):
    """On 8 devices (a fresh process): the default layout (4 of them share one example's 4 rows), all 8 with
    spare rows, and params split FSDP-style as a training run holds them give the one-device losses."""
    _, folder = hf_bpe
    config, params = from_pretrained(str(folder))
    sums, means = hellaswag.score(config, params, hellaswag.read(val_file), batch_size=1)
    proc = subprocess.run([sys.executable, "-c", SHARDED, str(folder), str(val_file)], cwd=tmp_path,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for name, (s, m) in json.loads(proc.stdout.splitlines()[-1]).items():
        np.testing.assert_allclose(s, sums, rtol=1e-5, err_msg=name)
        np.testing.assert_allclose(m, means, rtol=1e-5, err_msg=name)


@pytest.mark.slow
def test_train_measures_hellaswag_at_its_interval_and_the_end(bpe_data, val_file, tmp_path):
    """train --hellaswag_interval=4 on a GPT-2 BPE dataset: hellaswag records at iterations 0, 4 and the last (6)
    in metrics.jsonl; the last one's figures equal build-nanogpt's script run on the final checkpoint exported
    to transformers; the plot gains a HellaSwag panel."""
    data_dir, _ = bpe_data
    out = tmp_path / "out"
    lines = []
    train(tiny_cfg(data_dir, out, dataset="shakespeare", block_size=64, max_iters=6, eval_interval=3,
                   hellaswag_interval=4, hellaswag_file=str(val_file)), log=lines.append)
    records = [r for r in read_metrics(out) if "hellaswag_acc" in r]
    assert [r["iter"] for r in records] == [0, 4, 6]
    assert sum(line.startswith("step 4: hellaswag acc ") for line in lines) == 1
    export_hf(str(out), str(tmp_path / "hf"))
    model = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    expected = build_nanogpt_accuracy([build_nanogpt_losses(model, ctx, endings) for ctx, endings, _ in EXAMPLES])
    assert (records[-1]["hellaswag_acc"], records[-1]["hellaswag_acc_norm"]) == (expected["acc"], expected["acc_norm"])
    plot([str(out)], str(tmp_path / "run.png"))
    assert (tmp_path / "run.png").read_bytes()[16:24] == struct.pack(">II", 800, 1200)  # four panels of 300 px


def test_train_refuses_hellaswag_on_a_char_dataset(char_data, val_file, tmp_path):
    data_dir, _ = char_data
    with pytest.raises(ConfigError, match="HellaSwag is read in GPT-2 BPE; shakespeare_char is char tokens"):
        train(tiny_cfg(data_dir, tmp_path, hellaswag_interval=5, hellaswag_file=str(val_file)))
