"""`nanogpt-jax sample` (nanogpt_jax.sample): continuations of the prompt decoded with the run's vocabulary, the
greedy one equal to generate's greedy output, and the prompt read from FILE:path."""

import dataclasses
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from nanogpt_jax.config import SampleConfig, UserError
from nanogpt_jax.generate import generate
from nanogpt_jax.load import load_run
from nanogpt_jax.sample import read_start, sample, stream


def test_samples_continue_the_prompt_in_the_runs_vocabulary(char_run):
    """num_samples strings, each the prompt then max_new_tokens characters of the run's vocabulary; the seed
    decides them."""
    out, _ = char_run
    itos = load_run(str(out))[2].meta["itos"]
    cfg = SampleConfig(out_dir=str(out), start="ROMEO:", num_samples=3, max_new_tokens=12, seed=4)
    texts = sample(cfg)
    assert len(texts) == 3
    for text in texts:
        assert text.startswith("ROMEO:") and len(text) == len("ROMEO:") + 12 and set(text) <= set(itos)
    assert sample(cfg) == texts


def test_greedy_sample_is_generates_greedy_output_decoded(char_run):
    """temperature=0: every row is generate's argmax continuation of the prompt, decoded by the vocabulary."""
    out, _ = char_run
    config, params, record = load_run(str(out))
    itos = record.meta["itos"]
    prompt = "KING:\n"
    ids = np.array([[itos.index(c) for c in prompt]] * 2, np.int32)
    expected = np.asarray(generate(config, params, ids, 20, key=jax.random.PRNGKey(0), temperature=0.0))
    texts = sample(SampleConfig(out_dir=str(out), start=prompt, num_samples=2, max_new_tokens=20,
                                temperature=0.0, seed=9))
    assert texts == ["".join(itos[i] for i in row) for row in expected.tolist()]


def test_read_start_reads_file_prompts(tmp_path):
    """FILE:path is the file's text (UTF-8, newlines kept); any other start is the prompt itself."""
    path = tmp_path / "prompt.txt"
    path.write_text("ROMEO:\nWhat, ho! Été\n", encoding="utf-8")
    assert read_start(f"FILE:{path}") == ["ROMEO:\nWhat, ho! Été\n"]
    assert read_start(f"LINES:{path}") == ["ROMEO:", "What, ho! Été"]
    assert read_start("ROMEO:") == ["ROMEO:"] and read_start("FILE") == ["FILE"]
    missing = tmp_path / "missing.txt"
    with pytest.raises(UserError, match=f"--start=FILE:{missing}: cannot read {missing} \\(No such file"):
        read_start(f"FILE:{missing}")


def test_an_empty_prompt_is_refused(char_run, tmp_path):
    """There is nothing to continue from an empty --start (or an empty FILE:)."""
    out, _ = char_run
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    for start in ("", f"FILE:{tmp_path / 'empty.txt'}"):
        with pytest.raises(UserError, match="--start is empty"):
            sample(SampleConfig(out_dir=str(out), start=start))


def greedy_text(out, prompt, new):
    config, params, record = load_run(str(out))
    itos = record.meta["itos"]
    ids = np.array([[itos.index(c) for c in prompt]], np.int32)
    row = np.asarray(generate(config, params, ids, new, key=jax.random.PRNGKey(0), temperature=0.0))[0]
    return "".join(itos[i] for i in row)


@pytest.mark.slow
def test_prompts_one_per_line_are_each_their_own_greedy_continuation(char_run, tmp_path):
    """LINES: prompts of 2, 6 and 11 characters in one batch (left padded): each text is that prompt's
    greedy continuation alone."""
    out, _ = char_run
    path = tmp_path / "prompts.txt"
    path.write_text("AB\nKING:\n\nFirst Citiz\n", encoding="utf-8")
    texts = sample(SampleConfig(out_dir=str(out), start=f"LINES:{path}", num_samples=2, max_new_tokens=15,
                                temperature=0.0))
    expected = [greedy_text(out, p, 15) for p in ("AB", "KING:", "First Citiz")]
    assert texts == [t for t in expected for _ in range(2)]


@pytest.mark.slow
def test_stop_cuts_each_sample_before_the_stop_text(char_run):
    """A one-character stop (it is also generate's eos_id) and a two-character one: each sample is the
    unstopped sample (same seed) cut before the stop's first place in the continuation."""
    out, _ = char_run
    cfg = SampleConfig(out_dir=str(out), start="KING:", num_samples=3, max_new_tokens=40, seed=5)
    full = sample(cfg)
    new = full[0][len("KING:"):]
    for stop in (new[4], new[6:8]):
        cut = sample(dataclasses.replace(cfg, stop=stop))
        for f, c in zip(full, cut):
            at = f.find(stop, len("KING:"))
            assert c == (f if at < 0 else f[:at])
        assert len(cut[0]) < len(full[0])


@pytest.mark.parametrize("stop", [None, "e", "the"])
def test_stream_writes_the_sample_as_it_is_made(char_run, stop):
    """Streamed pieces join to the sample's text (same seed); more than one piece is written."""
    out, _ = char_run
    cfg = SampleConfig(out_dir=str(out), start="ROMEO:", num_samples=1, max_new_tokens=60, seed=3, stop=stop)
    pieces = []
    stream(cfg, pieces.append)
    assert "".join(pieces) == sample(cfg)[0] and len([p for p in pieces if p]) > 1


def test_the_command_streams_and_refuses_stream_of_several(char_run, run_cli):
    out, _ = char_run
    code, stdout, err = run_cli("sample", f"--out_dir={out}", "--num_samples=1", "--max_new_tokens=20", "--stream",
                                "--start=ROMEO:", "--temperature=0")
    assert code == 0 and stdout == greedy_text(out, "ROMEO:", 20) + "\n---------------\n"
    code, stdout, err = run_cli("sample", f"--out_dir={out}", "--num_samples=2", "--stream")
    assert code == 2 and stdout == "" and err.count("\n") == 1 and "--stream shows one sample and there are 2" in err


@pytest.mark.slow
def test_a_second_sample_compiles_nothing_new(char_run, tmp_path):
    """The CLI's persistent compilation cache: the first sample writes its programs, the second finds them all
    (no new entry); NANOGPT_JAX_COMPILE_CACHE=0 and --no_compile_cache write nothing."""
    out, _ = char_run

    def run(*extra, **env):
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "XDG_CACHE_HOME": str(tmp_path / "home"),
               "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", **env}  # the tiny model compiles in under 1 s
        proc = subprocess.run([sys.executable, "-m", "nanogpt_jax.cli", "sample", f"--out_dir={out}",
                               "--num_samples=2", "--max_new_tokens=20", *extra], env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    cache = tmp_path / "home" / "nanogpt-jax" / "xla"
    assert run("--no_compile_cache", NANOGPT_JAX_COMPILE_CACHE="1") and not cache.exists()
    assert run(NANOGPT_JAX_COMPILE_CACHE="0") and not cache.exists()
    first = run(NANOGPT_JAX_COMPILE_CACHE="1")
    entries = set(os.listdir(cache))
    assert entries and run(NANOGPT_JAX_COMPILE_CACHE="1") == first and set(os.listdir(cache)) == entries


@pytest.mark.slow
def test_weights_split_over_four_devices_sample_the_same_text(char_run):
    """--fsdp=4 on 4 host devices: the weights rest split 4 ways (training's FSDP rule) and the greedy and
    the seeded samples equal the one-device ones; more devices than there are is one error line."""
    out, _ = char_run
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}

    def run(*extra):
        return subprocess.run([sys.executable, "-m", "nanogpt_jax.cli", "sample", f"--out_dir={out}",
                               "--num_samples=3", "--max_new_tokens=30", "--start=KING:", *extra], env=env,
                              capture_output=True, text=True, timeout=300)

    for temperature in ("0", "0.8"):
        one, four = run(f"--temperature={temperature}"), run(f"--temperature={temperature}", "--fsdp=4")
        assert one.returncode == four.returncode == 0, four.stderr
        assert four.stdout == one.stdout and one.stdout.count("KING:") == 3
    refused = run("--fsdp=5")
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.strip().splitlines() == ["error: --fsdp=5: this machine has 4 device(s); use at most that many"]
