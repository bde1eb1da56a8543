"""Shared fixtures and references.

Data: the read-only Tiny Shakespeare copy and tiktoken cache in `<repo>/../shared`, and datasets prepared from it
once per session into temporary folders (nothing is downloaded). Runs: small training runs and HuggingFace
folders built once per session and shared by the modules that read them. References: nanoGPT's formulas and
numpy recomputes that the tests compare the package against. Helpers: the small things several modules need.
"""

import atexit
import contextlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
INPUT_TXT = SHARED / "data" / "tinyshakespeare" / "input.txt"
TIKTOKEN_CACHE = SHARED / "data" / "tiktoken_cache"

# Set before anything imports tiktoken, and inherited by the CLI subprocesses.
os.environ["TIKTOKEN_CACHE_DIR"] = str(TIKTOKEN_CACHE)
os.environ["NANOGPT_JAX_COMPILE_CACHE"] = "0"  # the CLI's own cache (in ~/.cache) off; test_sample turns it on
# One persistent compilation cache for the session, in a temporary folder, shared by this process and the CLI
# subprocesses: most tests train, evaluate and sample the same few tiny models, and a program one test compiled
# is loaded by the next instead of compiled again (the cache key is the program, its options and the devices).
_XLA_CACHE = tempfile.mkdtemp(prefix="nanogpt-jax-tests-xla-")
atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
os.environ["JAX_COMPILATION_CACHE_DIR"] = _XLA_CACHE
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # the tiny models compile in well under 1 s

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from nanogpt_jax import cli, parallel  # noqa: E402

parallel.quiet_libtpu()  # libtpu (the test extra's, for TPU topology compiles) on a machine with no TPU: silent
from nanogpt_jax.checkpoint import Checkpointer  # noqa: E402
from nanogpt_jax.config import TrainConfig  # noqa: E402
from nanogpt_jax.data import prepare  # noqa: E402
from nanogpt_jax.train import train  # noqa: E402

HF_VOCAB, HF_POSITIONS = 512, 64  # the small HuggingFace GPT-2 that stands in for released weights


# ------------------------------------------------------------------------------------------------------ data


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        pytest.fail(f"{what} not found at {path}: the tests need the shared folder <repo>/../shared "
                    f"(Tiny Shakespeare input.txt and the tiktoken gpt2 cache); nothing is downloaded",
                    pytrace=False)
    return path


@pytest.fixture(scope="session")
def input_txt() -> Path:
    """The shared Tiny Shakespeare input.txt (the file nanoGPT downloads)."""
    return _require(INPUT_TXT, "Tiny Shakespeare input.txt")


@pytest.fixture(scope="session")
def input_text(input_txt) -> str:
    return input_txt.read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def tiktoken_cache() -> Path:
    return _require(TIKTOKEN_CACHE, "tiktoken cache")


@pytest.fixture(scope="session")
def char_data(tmp_path_factory, input_txt):
    """shakespeare_char prepared once: (data_dir, info returned by prepare)."""
    data_dir = tmp_path_factory.mktemp("data_char")
    info = prepare("shakespeare_char", data_dir=str(data_dir), input_path=str(input_txt))
    return data_dir, info


@pytest.fixture(scope="session")
def bpe_data(tmp_path_factory, input_txt, tiktoken_cache):
    """shakespeare (GPT-2 BPE) prepared once: (data_dir, info returned by prepare)."""
    data_dir = tmp_path_factory.mktemp("data_bpe")
    info = prepare("shakespeare", data_dir=str(data_dir), input_path=str(input_txt))
    return data_dir, info


@pytest.fixture(scope="session")
def token_data(tmp_path_factory):
    """A dataset `toks` of random ids below HF_VOCAB (no meta.json: read as GPT-2 BPE ids); val is not a
    multiple of the block size, so a full pass ends with a short window. (data_dir, val ids as int64)."""
    data_dir = tmp_path_factory.mktemp("data_toks")
    (data_dir / "toks").mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 3000), ("val", 1000)):
        rng.integers(0, HF_VOCAB, n).astype(np.uint16).tofile(data_dir / "toks" / f"{split}.bin")
    return data_dir, np.fromfile(data_dir / "toks" / "val.bin", np.uint16).astype(np.int64)


# ------------------------------------------------------------------------------------------------- helpers


def quiet(*_):
    """A `log` for train() that prints nothing."""


def tiny_cfg(data_dir, out_dir, **kw) -> TrainConfig:
    """A seconds-long shakespeare_char run: 2 layers of 32, block 16, batch 4, 20 iterations."""
    base = dict(dataset="shakespeare_char", data_dir=str(data_dir), out_dir=str(out_dir), n_layer=2, n_head=2,
                n_embd=32, block_size=16, batch_size=4, gradient_accumulation_steps=1, eval_iters=2,
                eval_interval=10, log_interval=1, max_iters=20, learning_rate=1e-3, warmup_iters=5,
                lr_decay_iters=20, min_lr=1e-4, dropout=0.0, dtype="float32")
    base.update(kw)
    return TrainConfig(**base)


def read_metrics(out_dir) -> list[dict]:
    """The records of out_dir/metrics.jsonl, in order."""
    lines = (Path(out_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def as_numpy(tree):
    return jax.tree.map(lambda x: np.array(x, copy=True), jax.device_get(tree))


def assert_trees_equal(a, b):
    """Same structure, every leaf bit for bit."""
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


@contextlib.contextmanager
def spying_saves():
    """Records (kind, iter_num, params as numpy, record) for every checkpoint save while it is open."""
    saves = []
    original = Checkpointer.save

    def save(self, kind, iter_num, params, opt_state, rng, record):
        saves.append((kind, iter_num, as_numpy(params), record))
        return original(self, kind, iter_num, params, opt_state, rng, record)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Checkpointer, "save", save)
        yield saves


@pytest.fixture
def spy_saves():
    """The saves of this test, as `spying_saves` records them."""
    with spying_saves() as saves:
        yield saves


@pytest.fixture
def run_cli(monkeypatch, capsys):
    """cli.main in this process: (exit code, stdout, stderr). JAX is already started here, so the command's
    one-device-per-core setting is skipped (the device count cannot change any more)."""
    monkeypatch.setattr(parallel, "use_all_cpu_cores", lambda: None)

    def run(*args):
        code = cli.main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    return run


def assert_one_error_line(code, out, err, *fragments) -> str:
    """A user error: exit status 2, nothing on stdout, one `error: ...` line holding every fragment."""
    assert code == 2 and out == "", (code, out, err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------------------------------------- references


def nanogpt_get_lr(it, learning_rate, warmup_iters, lr_decay_iters, min_lr):
    """nanoGPT's train.py get_lr, verbatim."""
    # 1) linear warmup for warmup_iters steps
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    # 2) if it > lr_decay_iters, return min learning rate
    if it > lr_decay_iters:
        return min_lr
    # 3) in between, use cosine decay down to min learning rate
    decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    assert 0 <= decay_ratio <= 1
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))  # coeff ranges 0..1
    return min_lr + coeff * (learning_rate - min_lr)


def nanogpt_num_params(V, block, L, C, bias, non_embedding=True):
    """nanoGPT's parameter count: wte (tied lm_head counted once), wpe, L blocks, ln_f."""
    ln = 2 * C if bias else C  # LayerNorm weight (+ bias)

    def lin(i, o):
        return i * o + (o if bias else 0)

    block_params = ln + lin(C, 3 * C) + lin(C, C) + ln + lin(C, 4 * C) + lin(4 * C, C)
    total = V * C + block * C + L * block_params + ln
    return total - block * C if non_embedding else total


def np_log_softmax(logits) -> np.ndarray:
    """log softmax over the last axis in float64 numpy."""
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def hf_gpt2(n_embd=64, n_head=4, *, vocab=HF_VOCAB, n_positions=HF_POSITIONS, n_layer=2, initializer_range=0.02,
            seed=0):
    """A randomly initialised transformers GPT2LMHeadModel (eval mode), its LayerNorms and biases moved off
    HF's (1, 0) init so that a swapped or dropped one would show. Nothing is downloaded."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                                  n_head=n_head, initializer_range=initializer_range, bos_token_id=vocab - 1,
                                  eos_token_id=vocab - 1)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.05 * torch.randn_like(p))
    return model


# ------------------------------------------------------------------------------------------ shared models


@pytest.fixture(scope="session")
def hf_small(tmp_path_factory):
    """A vocab-512, 64-position GPT2LMHeadModel (2 layers of 64, initializer_range 0.1) and its
    save_pretrained folder."""
    model = hf_gpt2(initializer_range=0.1)
    folder = tmp_path_factory.mktemp("hf_small")
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="session")
def char_run(tmp_path_factory, char_data):
    """A bias=False character model trained 10 iterations on shakespeare_char (checkpoint at 10):
    (out_dir, data_dir)."""
    data_dir, _ = char_data
    out = tmp_path_factory.mktemp("char_run")
    cfg = TrainConfig(dataset="shakespeare_char", data_dir=str(data_dir), out_dir=str(out), n_layer=2, n_head=2,
                      n_embd=32, block_size=32, batch_size=8, gradient_accumulation_steps=1, eval_iters=2,
                      eval_interval=10, max_iters=10, learning_rate=3e-3, decay_lr=False, dtype="float32")
    train(cfg, log=quiet)
    return out, data_dir


@pytest.fixture(scope="session")
def run_a(char_data, tmp_path_factory):
    """The uninterrupted run: 20 iterations, dropout on, a checkpoint every 10; saved params recorded.
    (cfg, out_dir, saves as `spying_saves` records them, train's result)."""
    data_dir, _ = char_data
    out = tmp_path_factory.mktemp("run_a")
    cfg = tiny_cfg(data_dir, out, dropout=0.1, gradient_accumulation_steps=2, always_save_checkpoint=True)
    with spying_saves() as saves:
        result = train(cfg, log=quiet)
    return cfg, out, saves, result
