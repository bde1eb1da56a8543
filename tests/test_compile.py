"""`nanogpt-jax compile`: the train step (or generate) compiled ahead of time for this machine's devices or a
TPU topology's (libtpu's compiler, on this CPU machine), against figures counted independently: the state's
bytes per device from the parameter count, FSDP's share of it, one layer's weights."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, assert_one_error_line, nanogpt_num_params
from nanogpt_jax import compile_check
from nanogpt_jax.config import CompileConfig, ConfigError

# 4 layers of 256 (block 128, GPT-2's padded vocabulary: no dataset is named): small enough to compile in seconds,
# big enough that the state dwarfs the batch and the programs' own buffers.
TINY = ["--n_layer=4", "--n_head=4", "--n_embd=256", "--block_size=128", "--batch_size=8",
        "--gradient_accumulation_steps=1", "--dataset=none", "--dtype=bfloat16"]
# The test extra installs libtpu (CI has it); a machine given the project without its dependencies may not.
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu is not installed: pip install -e '.[test]'")
N = nanogpt_num_params(50304, 128, 4, 256, False, non_embedding=False)


def compile_json(*args, timeout=600):
    proc = subprocess.run([sys.executable, "-m", "nanogpt_jax.cli", "compile", *args, "--json"], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO)
    return proc, (json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode in (0, 3) else None)


@pytest.mark.slow
@needs_libtpu
def test_a_tpu_topology_compiles_and_fsdp_shrinks_each_chip_by_the_state_and_a_layer():
    """v5e:2x4 (8 chips on 2 hosts): with --fsdp=1 each chip holds the float32 params and AdamW's moments whole
    (12 bytes a parameter among its arguments); with --fsdp=8 an eighth of them, and the peak falls by at least
    the state's 7/8 less one layer's gathered weights."""
    results = {}
    for fsdp in (1, 8):
        proc, results[fsdp] = compile_json(*TINY, "--topology=v5e:2x4", f"--fsdp={fsdp}")
        assert proc.returncode == 0, proc.stderr[-2000:]
    one, eight = results[1], results[8]
    assert one["device_kind"] == "TPU v5 lite" and one["devices"] == 8 and one["processes"] == 2
    assert one["hbm_gib_per_device"] == 16 and one["fits"] and one["compile_s"] > 0 and one["flops_per_device"] > 0
    gib = 2**30
    state = 12 * N / gib
    assert state <= one["argument_gib"] < state * 1.1
    assert state / 8 <= eight["argument_gib"] < state / 8 * 1.3
    layer = 4 * 12 * 256 * 256 / gib
    assert one["peak_gib_per_device"] - eight["peak_gib_per_device"] > state * 7 / 8 - layer


@pytest.mark.slow
@needs_libtpu
def test_a_program_too_big_for_the_chip_exits_3_with_one_line():
    """gpt2-xl unsharded on v5e chips (16 GiB): the compiler refuses it; the answer is exit 3, the figures as
    JSON and one error line saying what to change."""
    proc, result = compile_json("--init_from=gpt2-xl", "--topology=v5e:2x2", "--batch_size=4", "--block_size=256",
                                "--gradient_accumulation_steps=1", "--dataset=none")
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert not result["fits"] and result["peak_gib_per_device"] > 16
    assert result["model"]["n_layer"] == 48 and result["model"]["n_embd"] == 1600  # from the known sizes
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "--fsdp" in lines[0] and "more than a TPU v5 lite's 16.00 GiB" in lines[0]


def test_compile_for_this_machine_and_generate(run_cli):
    """Without --topology: this machine's devices, the layout train would use. --what=generate: at least the
    params and the KV cache per device."""
    code, out, err = run_cli("compile", *TINY, "--json")
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["device_kind"] == "cpu" and "layout: 1 process(es)" in out and result["fits"]
    code, out, err = run_cli("compile", *TINY, "--what=generate", "--num_samples=2",
                             "--prompt_tokens=16", "--max_new_tokens=32", "--json")
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    cache = 2 * 4 * 2 * 128 * 256 * 2  # k and v, 4 layers, 2 rows, 64 + 64 columns (the buckets), bf16
    assert result["peak_gib_per_device"] * 2**30 >= 4 * N + cache


@pytest.mark.slow
@needs_libtpu
def test_generate_with_fsdp_holds_an_eighth_of_the_weights_per_chip():
    """`sample --fsdp`'s placement compiled for v5e:2x4: each chip's arguments lose 7/8 of the float32
    weights' 4N bytes (less the vectors kept whole), and the program still fits."""
    args = [*TINY, "--what=generate", "--num_samples=2", "--prompt_tokens=16", "--max_new_tokens=32",
            "--topology=v5e:2x4"]
    (one, whole), (eight, split) = compile_json(*args), compile_json(*args, "--fsdp=8")
    assert one.returncode == eight.returncode == 0, eight.stderr[-2000:]
    saved = (whole["argument_gib"] - split["argument_gib"]) * 2**30
    assert 0.95 * 7 / 8 * 4 * N <= saved <= 7 / 8 * 4 * N and split["fits"]


@pytest.mark.parametrize("args, fragment", [
    pytest.param(["--topology=v9:2x2"], "--topology=v9:2x2: libtpu does not know it", marks=needs_libtpu),
    (["--what=train_step"], "--what=train_step: use train or generate"),
    (["--init_from=gpt2", "--block_size=2048"], "--block_size=2048: gpt2 has only 1024 positions"),
])
def test_bad_input_is_one_line(run_cli, args, fragment):
    code, out, err = run_cli("compile", "--dataset=none", *args)
    assert_one_error_line(code, out, err, fragment)


def test_without_libtpu_the_line_says_what_to_install(monkeypatch):
    monkeypatch.setattr(compile_check.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"--topology=v5e:2x4 needs libtpu: pip install 'nanogpt-jax\[tpu\]'"):
        compile_check.compile_check(CompileConfig(topology="v5e:2x4", dataset="none"))
