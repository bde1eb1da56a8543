"""The `nanogpt-jax` command as a user runs it: subprocesses of `python -m nanogpt_jax.cli` in a scratch folder.
Bad input must end with a non-zero exit and exactly one `error: ...` line on stderr, no traceback."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import assert_one_error_line

SEP = "---------------"
TINY = ["--dataset=shakespeare_char", "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32",
        "--batch_size=4", "--gradient_accumulation_steps=1", "--eval_iters=2", "--log_interval=5",
        "--learning_rate=1e-3", "--warmup_iters=2", "--lr_decay_iters=20", "--min_lr=1e-4"]


def cli(*args, cwd, timeout=300, **env_vars):
    env = dict(os.environ, JAX_PLATFORMS="cpu", **env_vars)
    return subprocess.run([sys.executable, "-m", "nanogpt_jax.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, input_txt):
    """A scratch folder where `prepare` and a 20-iteration `train` have run (out_dir `out`)."""
    cwd = tmp_path_factory.mktemp("cli")
    prep = cli("prepare", "shakespeare_char", f"--input={input_txt}", cwd=cwd)
    train = cli("train", *TINY, "--max_iters=20", "--eval_interval=10", "--out_dir=out", "--compile=False",
                "--device=cpu", cwd=cwd)
    return cwd, prep, train


@pytest.mark.slow
def test_prepare_prints_counts(workdir):
    cwd, prep, _ = workdir
    assert prep.returncode == 0, prep.stderr
    # nanoGPT's data/shakespeare_char/prepare.py: vocab 65, 1,003,854 train and 111,540 val tokens
    assert "vocab size 65" in prep.stdout
    assert "train 1,003,854 tokens" in prep.stdout and "val 111,540 tokens" in prep.stdout
    assert os.path.getsize(cwd / "data" / "shakespeare_char" / "train.bin") == 2 * 1_003_854


@pytest.mark.slow
def test_train_then_sample(workdir):
    cwd, _, train = workdir
    assert train.returncode == 0, train.stderr
    out = train.stdout
    notes = train.stderr  # nanoGPT's flags with no meaning here: a note each, on stderr
    assert "--compile has no effect" in notes and "--device has no effect" in notes
    # nanoGPT's count: wte 65*32 + one bias-free block 12*32^2 + 2*32 + ln_f 32 = 14,464 -> "0.01M"
    assert "number of parameters: 0.01M" in out
    assert "step 0:" in out and "step 20:" in out and "iter 15:" in out
    assert (cwd / "out" / "metrics.jsonl").is_file() and (cwd / "out" / "checkpoints" / "latest").is_dir()

    (cwd / "prompt.txt").write_text("ROMEO:", encoding="utf-8")
    proc = cli("sample", "--out_dir=out", "--num_samples=2", "--max_new_tokens=20", "--start=FILE:prompt.txt",
               cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count(SEP) == 2
    samples = proc.stdout.split("\n" + SEP + "\n")
    assert samples[2] == ""
    itos = json.loads((cwd / "data" / "shakespeare_char" / "meta.json").read_text(encoding="utf-8"))["itos"]
    for s in samples[:2]:
        assert s.startswith("ROMEO:")
        assert len(s) == len("ROMEO:") + 20  # characters: one token each
        assert set(s) <= set(itos)


def test_unknown_option(tmp_path):
    proc = cli("train", "--learnin_rate=1e-3", cwd=tmp_path)
    assert_one_error_line(proc.returncode, proc.stdout, proc.stderr, "--learnin_rate", "did you mean --learning_rate")


@pytest.mark.slow
def test_bad_option_value(tmp_path):
    proc = cli("train", "--max_iters='abc'", cwd=tmp_path)
    assert_one_error_line(proc.returncode, proc.stdout, proc.stderr, "--max_iters", "expected int")


@pytest.mark.slow
def test_train_without_prepared_data_says_run_prepare(tmp_path):
    proc = cli("train", *TINY, "--data_dir=nowhere", "--max_iters=2", cwd=tmp_path)
    assert_one_error_line(proc.returncode, proc.stdout, proc.stderr, "nanogpt-jax prepare shakespeare_char")


@pytest.mark.slow
def test_sample_from_missing_out_dir(tmp_path):
    proc = cli("sample", "--out_dir=not_trained", cwd=tmp_path)
    assert_one_error_line(proc.returncode, proc.stdout, proc.stderr, "not_trained")
    assert not (tmp_path / "not_trained").exists()


@pytest.mark.slow
def test_prepare_unknown_dataset(tmp_path):
    proc = cli("prepare", "tinystories", cwd=tmp_path)
    assert_one_error_line(proc.returncode, proc.stdout, proc.stderr, "tinystories", "shakespeare_char", "openwebtext")
    proc = cli("prepare", "shakespeare_char", "--input=missing.txt", cwd=tmp_path)
    assert_one_error_line(proc.returncode, proc.stdout, proc.stderr, "missing.txt")


@pytest.mark.slow
def test_sample_start_file_missing(workdir):
    cwd, _, train = workdir
    assert train.returncode == 0, train.stderr
    proc = cli("sample", "--out_dir=out", "--start=FILE:missing.txt", "--max_new_tokens=2", cwd=cwd)
    assert_one_error_line(proc.returncode, proc.stdout, proc.stderr, "missing.txt")


def test_usage(tmp_path):
    proc = cli(cwd=tmp_path)
    assert proc.returncode != 0 and "usage: nanogpt-jax" in proc.stderr
    proc = cli("--help", cwd=tmp_path)  # asked for: on stdout
    assert proc.returncode == 0 and proc.stdout.startswith("usage: nanogpt-jax") and proc.stderr == ""


@pytest.mark.slow
def test_two_devices_train_like_one(workdir):
    """The command splits each batch over one host device per core; the losses equal a one-device run."""
    cwd = workdir[0]
    runs = {}
    for n in (1, 2):
        proc = cli("train", *TINY, "--max_iters=10", "--eval_interval=10", "--log_interval=1",
                   f"--num_devices={n}", f"--out_dir=dev{n}", cwd=cwd,
                   XLA_FLAGS="--xla_force_host_platform_device_count=2")  # two devices whatever the cores
        assert proc.returncode == 0, proc.stderr
        assert f"devices: {n} x cpu" in proc.stdout
        lines = [json.loads(line) for line in (cwd / f"dev{n}" / "metrics.jsonl").read_text().splitlines()]
        runs[n] = [r["loss"] for r in lines if "loss" in r] + [r["val_loss"] for r in lines if "val_loss" in r]
    assert len(runs[1]) == 12
    # same batches, same init: only the order of the gradient all-reduce's float additions differs
    assert runs[2] == pytest.approx(runs[1], rel=1e-5)


# ------------------------------------------------------------------------------------------ in this process


def test_prepare_takes_input_with_a_space(tmp_path, input_txt, run_cli, monkeypatch):
    """`prepare shakespeare_char --input PATH` (space form, nanoGPT's own spelling of options) prepares from PATH:
    nanoGPT's counts, and the files hold the text."""
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli("prepare", "shakespeare_char", "--input", str(input_txt), "--data_dir", "d")
    assert (code, err) == (0, "")
    assert out == (f"wrote {Path('d') / 'shakespeare_char'}: vocab size 65, train 1,003,854 tokens, "
                   "val 111,540 tokens\n")
    itos = json.loads((tmp_path / "d" / "shakespeare_char" / "meta.json").read_text(encoding="utf-8"))["itos"]
    val = (tmp_path / "d" / "shakespeare_char" / "val.bin").read_bytes()
    text = input_txt.read_text(encoding="utf-8")
    assert "".join(itos[i] for i in memoryview(val).cast("H")) == text[int(len(text) * 0.9):]


def test_sample_prints_the_ignored_flag_note(char_run, run_cli):
    """nanoGPT's `--compile=False` on sample: a note on stderr, and the samples as without it."""
    out_dir, _ = char_run
    args = ["sample", f"--out_dir={out_dir}", "--num_samples=2", "--max_new_tokens=5", "--start=ROMEO:"]
    code, plain, err = run_cli(*args)
    assert (code, err) == (0, "")
    code, noted, err = run_cli(*args, "--compile=False")
    assert code == 0 and noted == plain
    assert err == "--compile has no effect in nanogpt-jax: XLA always compiles\n"
    assert plain.count(SEP) == 2 and all(s.startswith("ROMEO:") for s in plain.split("\n" + SEP + "\n")[:2])


@pytest.mark.parametrize("args", [
    ["prepare"],
    ["train", "--data_dir=nowhere"],
    ["sample", "--out_dir=nowhere"],
    ["eval", "--out_dir=nowhere"],
    ["convert"],
    ["compile", "--num_devices=5", "--n_layer=1", "--n_head=1", "--n_embd=8", "--block_size=8", "--batch_size=2"],
])
def test_every_command_notes_ignored_nanogpt_flags(args, tmp_path, monkeypatch, run_cli):
    """Each command accepts nanoGPT's --compile/--device/--backend with a note per flag on stderr, before it
    runs (here each then stops at a cheap error of its own)."""
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(*args, "--compile=False", "--device=cpu", "--backend=nccl")
    *notes, error = err.splitlines()
    assert notes == ["--compile has no effect in nanogpt-jax: XLA always compiles",
                     "--device has no effect in nanogpt-jax: JAX picks the accelerator; set JAX_PLATFORMS=cpu to "
                     "force the CPU",
                     "--backend has no effect in nanogpt-jax: JAX picks the collective backend"]
    assert_one_error_line(code, out, error)


def test_debug_shows_the_traceback_of_a_user_error(tmp_path, run_cli, monkeypatch):
    """Without --debug a bad config file is one line; with --debug or NANOGPT_JAX_DEBUG=1 it is raised."""
    from nanogpt_jax.config import ConfigError

    bad = tmp_path / "bad.py"
    bad.write_text("n_layer = 1 / 0\n")
    monkeypatch.delenv("NANOGPT_JAX_DEBUG", raising=False)
    assert_one_error_line(*run_cli("train", str(bad)), f"config {bad}, line 1: ZeroDivisionError")
    with pytest.raises(ConfigError, match="ZeroDivisionError"):
        run_cli("train", str(bad), "--debug")
    monkeypatch.setenv("NANOGPT_JAX_DEBUG", "1")
    with pytest.raises(ConfigError, match="ZeroDivisionError"):
        run_cli("train", str(bad))


HELPED = {"prepare": "PrepareConfig", "train": "TrainConfig", "sample": "SampleConfig", "eval": "EvalConfig",
          "convert": "ConvertConfig", "compile": "CompileConfig"}


@pytest.mark.parametrize("command", sorted(HELPED))
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_every_command_has_help_listing_each_option_with_its_default_and_meaning(command, flag, run_cli):
    """On stdout, exit 0: the usage, then one entry per field of the command's config, in order, each with its
    type and a meaning (the comment beside the field in config.py)."""
    import dataclasses
    import re

    from nanogpt_jax import config

    code, out, err = run_cli(command, flag)
    assert code == 0 and err == "", err
    assert out.startswith(f"usage: nanogpt-jax {command} [CONFIG.py ...]") and f"\n  {command} " in out
    entries = re.findall(r"^  (--\w+)=(\S+)\s+([^\n]*(?:\n {36}[^\n]*)*)", out, re.M)
    cls = getattr(config, HELPED[command])
    assert [name for name, _, _ in entries] == [f"--{f.name}" for f in dataclasses.fields(cls)]
    for name, _, text in entries:
        assert re.match(r"(str|int|float|bool)[^:]*: \S", text), (name, text)


def test_help_shows_defaults_and_meanings(run_cli):
    out = run_cli("train", "--help")[1]
    assert "\n  --learning_rate=0.0006            float: peak learning rate\n" in out
    assert "\n  --init_from=scratch               str: 'scratch', 'resume', or a GPT-2 name / HF folder\n" in out
    assert "\n AdamW\n" in out  # the comment heading a group of fields
    out = run_cli("sample", "-h")[1]
    assert "\n  --start='\\n'                      str: or \"FILE:prompt.txt\"" in out
    assert "\n  --top_k=200                       int | None: " in out


def test_the_command_list_is_the_help_of_nanogpt_jax(run_cli):
    for flag in ("--help", "-h"):
        code, out, err = run_cli(flag)
        assert code == 0 and err == "" and out.startswith("usage: nanogpt-jax COMMAND"), err
        assert all(f"\n  {command} " in out for command in (*HELPED, "plot"))
    code, out, err = run_cli("plot", "--help")
    assert code == 0 and out.startswith("usage:\n  plot OUT_DIR [OUT_DIR ...] [--output=loss.png]"), out
