"""Memory estimates before anything is built: the parameter count against the built model's, the training and
sampling estimates against a naive sum, and absurd sizes refused in one line with both figures."""

import dataclasses
import os
import subprocess
import sys

import jax
import pytest

from conftest import REPO, assert_one_error_line, nanogpt_num_params
from nanogpt_jax import memory
from nanogpt_jax.model import GPTConfig, cross_entropy, init_params, make_model, num_params


@pytest.mark.parametrize("config", [
    GPTConfig(block_size=16, vocab_size=65, n_layer=2, n_head=2, n_embd=32, bias=False),
    GPTConfig(block_size=8, vocab_size=11, n_layer=3, n_head=1, n_embd=8, bias=True),
    GPTConfig(block_size=8, vocab_size=11, model="bigram"),
])
def test_param_count_is_the_built_models(config):
    """The count from the config alone equals the initialised params' (and nanoGPT's formula for the GPT)."""
    built = num_params(jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0))), non_embedding=False)
    assert memory.param_count(config) == built
    if config.model == "gpt":
        assert built == nanogpt_num_params(config.vocab_size, config.block_size, config.n_layer, config.n_embd,
                                           config.bias, non_embedding=False)


def test_estimates_add_up_what_must_be_held():
    """Training, per device: params and AdamW's two moments (12 bytes a parameter, split fsdp ways), the gradient
    accumulator and a micro-batch's gradient (whole with data parallelism; split under FSDP, plus the whole
    embeddings, ln_f and one layer and their gradients), and activations, which grow with the rows and the
    layers (one layer's and each layer's input with remat=full); sampling: params, cache and ids."""
    c = GPTConfig(block_size=16, vocab_size=65, n_layer=2, n_head=2, n_embd=32, dtype="float32")
    n = memory.param_count(c)
    act = memory.activation_bytes(c, 4)
    # a naive recount: per token 17 * C activations and N * T attention probabilities per layer, float32 logits
    per_layer = 4 * 16 * (17 * 32 + 2 * 16) * 4
    assert act == 2 * per_layer + 2 * 4 * 4 * 16 * 65
    inputs = 4 * 16 * 32 * 4  # one layer's input, float32
    assert memory.activation_bytes(dataclasses.replace(c, remat="full"), 4) == (
        per_layer + 2 * inputs + 2 * 4 * 4 * 16 * 65)
    assert memory.activation_bytes(c, 8) == 2 * act
    # the naive count of the parameters: wte 65 x 32, wpe 16 x 32, ln_f 2 x 32; per layer 2 LNs, 4 Linears
    layer = 2 * 2 * 32 + (32 * 96 + 96) + (32 * 32 + 32) + (32 * 128 + 128) + (128 * 32 + 32)
    outside = 65 * 32 + 16 * 32 + 2 * 32
    assert n == outside + 2 * layer
    assert memory.training_bytes(c, 4, fsdp=1) == 12 * n + 4 * n + act
    assert memory.training_bytes(c, 4, fsdp=1, steps=3) == 12 * n + 8 * n + act
    assert memory.training_bytes(c, 4, fsdp=2) == 12 * n // 2 + 4 * n // 2 + 8 * (outside + layer) + act
    assert memory.generate_bytes(c, 3, 12) == 4 * n + 2 * 2 * 3 * 12 * 32 * 4 + 3 * 12 * 16
    assert memory.generate_bytes(c, 3, 100) == 4 * n + 2 * 2 * 3 * 16 * 32 * 4 + 3 * 100 * 16  # cache: block_size
    assert memory.host_bytes() == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") > 2**30


@pytest.mark.parametrize("args, fragments", [
    (["train", "--n_layer=1000000"], ["training 3,104,017,440 parameters", "n_layer=1000000", "GiB per device of memory and each device has"]),
    (["train", "--block_size=1000000000"], ["block_size=1000000000", "GiB per device of memory and each device has"]),
])
def test_absurd_training_sizes_are_refused_before_building(char_data, tmp_path, run_cli, args, fragments):
    """In seconds, before any parameter exists, and nothing is written but the empty run folder."""
    data_dir, _ = char_data
    code, out, err = run_cli(*args, "--dataset=shakespeare_char", f"--data_dir={data_dir}", f"--out_dir={tmp_path}",
                             "--n_head=1", "--n_embd=16", "--batch_size=2")
    assert_one_error_line(code, out, err, *fragments)
    assert not list((tmp_path / "checkpoints").rglob("[0-9]*"))


def test_sampling_a_billion_tokens_is_refused(char_run, run_cli):
    """10 x 10**9 new tokens: their ids alone exceed any host this runs on (the context is cropped, so the
    model's own memory stays bounded: it is the output that does not fit)."""
    out, _ = char_run
    code, stdout, err = run_cli("sample", f"--out_dir={out}", "--max_new_tokens=1000000000")
    assert_one_error_line(code, stdout, err, "generate: 10 x 1,000,000,000 new tokens needs about",
                          "--max_new_tokens or --num_samples")


def test_the_command_refuses_a_million_layers_in_seconds(char_data, tmp_path):
    """The real command line refuses in seconds, before tracing a million layers (which takes minutes)."""
    data_dir, _ = char_data
    proc = subprocess.run([sys.executable, "-m", "nanogpt_jax.cli", "train", "--n_layer=1000000", "--n_head=1",
                           "--n_embd=16", "--dataset=shakespeare_char", f"--data_dir={data_dir}",
                           f"--out_dir={tmp_path}"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert_one_error_line(proc.returncode, proc.stdout, proc.stderr, "n_layer=1000000", "GiB per device of memory")


@pytest.mark.slow
@pytest.mark.parametrize("scan_layers", [True, False])
def test_remat_saves_memory_says_what_the_compiler_does(scan_layers):
    """remat_saves_memory against the compiled step itself: the temp memory of a GPT's gradient with and without
    remat (XLA:CPU merges the recomputation of unrolled layers into the saved forward; a scanned loop or an
    accelerator keeps it)."""
    config = GPTConfig(block_size=64, vocab_size=65, n_layer=4, n_head=2, n_embd=64, scan_layers=scan_layers)
    params = init_params(config, jax.random.PRNGKey(0))
    x = jax.numpy.zeros((8, 64), jax.numpy.int32)

    def temp_bytes(remat):
        model = make_model(dataclasses.replace(config, remat=remat))
        grad = jax.jit(jax.grad(lambda p: cross_entropy(model.apply({"params": p}, x)[0], x)))
        return grad.lower(params).compile().memory_analysis().temp_size_in_bytes

    without, with_remat = temp_bytes("none"), temp_bytes("full")
    assert (with_remat < 0.8 * without) == memory.remat_saves_memory(scan_layers), (with_remat, without)


def test_train_on_a_cpu_says_remat_saves_nothing(char_data, tmp_path, run_cli):
    data_dir, _ = char_data
    code, out, err = run_cli("train", "--dataset=shakespeare_char", f"--data_dir={data_dir}", f"--out_dir={tmp_path}",
                             "--n_layer=1", "--n_head=1", "--n_embd=16", "--batch_size=2", "--block_size=8",
                             "--max_iters=1", "--eval_iters=1", "--remat=True", "--scan_layers=False")
    assert code == 0, err
    assert "--remat saves no memory on a CPU with --scan_layers=False" in out
