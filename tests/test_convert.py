"""`nanogpt-jax convert`: a HuggingFace GPT-2 folder -> a checkpoint that samples, evaluates and finetunes as the
folder does, and a checkpoint -> a folder that transformers' GPT2LMHeadModel loads and runs to the same logits."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from conftest import HF_POSITIONS, HF_VOCAB, assert_one_error_line, assert_trees_equal, quiet
from nanogpt_jax.checkpoint import CheckpointError
from nanogpt_jax.config import ConfigError, ConvertConfig, EvalConfig, TrainConfig, UserError
from nanogpt_jax.convert import ConvertError, convert, import_hf
from nanogpt_jax.evaluate import run as run_eval
from nanogpt_jax.load import load_run
from nanogpt_jax.model import make_model
from nanogpt_jax.pretrained import from_pretrained
from nanogpt_jax.train import train


@pytest.mark.slow
def test_convert_hf_to_checkpoint_then_sample_eval_and_resume(hf_small, token_data, tmp_path, run_cli):
    """HF folder -> checkpoint: the params are from_pretrained's, the logits transformers', and the checkpoint
    samples (GPT-2 BPE), evaluates like the folder and finetunes from iteration 0; a second import is refused."""
    model, folder = hf_small
    data_dir, _ = token_data
    out = tmp_path / "conv"
    code, stdout, err = run_cli("convert", f"--init_from={folder}", f"--out_dir={out}")
    assert code == 0, err
    assert "wrote" in stdout and "vocab_size=512" in stdout

    config, params, record = load_run(str(out))
    assert record.meta is None and record.iter_num == 0
    ref_config, ref_params = from_pretrained(folder)
    assert config == ref_config
    assert_trees_equal(params, ref_params)
    idx = np.random.default_rng(1).integers(0, HF_VOCAB, (2, HF_POSITIONS))
    with torch.no_grad():
        expected = model(torch.from_numpy(idx)).logits.numpy()
    got = np.asarray(make_model(config).apply({"params": params}, jnp.asarray(idx))[0])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)

    # sample: no vocabulary in the record -> GPT-2 BPE text in and out (ids below 512 are BPE tokens:
    # "," is 11 and " the" 262); "Hello" is 15496, past this model's 512 ids: one line, not NaN samples
    code, stdout, err = run_cli("sample", f"--out_dir={out}", "--start=, the", "--num_samples=2", "--max_new_tokens=8")
    assert code == 0, err
    samples = stdout.split("\n---------------\n")
    assert len(samples) == 3 and all(s.startswith(", the") for s in samples[:2])
    code, stdout, err = run_cli("sample", f"--out_dir={out}", "--start=Hello", "--max_new_tokens=8")
    assert_one_error_line(code, stdout, err, "token id 15,496", "knows 512 ids")

    # the converted checkpoint evaluates like the folder it came from
    args = dict(dataset="toks", data_dir=str(data_dir), eval_iters=0, batch_size=4, dtype="float32")
    assert run_eval(EvalConfig(out_dir=str(out), **args), progress=False).loss == pytest.approx(
        run_eval(EvalConfig(init_from=str(folder), **args), progress=False).loss, rel=1e-6)

    # and finetunes with init_from=resume, from iteration 0
    train(TrainConfig(init_from="resume", out_dir=str(out), dataset="toks", data_dir=str(data_dir), batch_size=4,
                      gradient_accumulation_steps=1, eval_iters=1, eval_interval=2, max_iters=2, dtype="float32"),
          log=quiet)
    assert load_run(str(out))[2].iter_num == 2

    # converting into a folder that holds checkpoints is refused
    with pytest.raises(CheckpointError, match="already holds a run's checkpoints"):
        import_hf(str(folder), str(out))


@pytest.mark.slow
def test_convert_checkpoint_to_hf(char_run, tmp_path, run_cli):
    """checkpoint -> HF folder: transformers loads it with no missing or unexpected keys and gives our logits
    (a bias=False model exported with zero biases); its character vocabulary travels as meta.json."""
    out, _ = char_run
    config, params, record = load_run(str(out))
    assert not config.bias  # exported with zero biases: HF GPT-2 always has them
    hf_dir = tmp_path / "hf"
    code, stdout, err = run_cli("convert", f"--out_dir={out}", f"--hf_dir={hf_dir}")
    assert code == 0, err
    assert "iteration 10" in stdout

    hf, info = transformers.GPT2LMHeadModel.from_pretrained(hf_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    idx = np.random.default_rng(2).integers(0, 65, (2, 32))
    with torch.no_grad():
        got = hf.eval()(torch.from_numpy(idx)).logits.numpy()
    expected = np.asarray(make_model(config).apply({"params": params}, jnp.asarray(idx))[0])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)

    # the character vocabulary travels as meta.json: sampling the folder speaks characters
    assert json.loads((hf_dir / "meta.json").read_text()) == record.meta
    code, stdout, err = run_cli("sample", f"--init_from={hf_dir}", "--start=ROMEO:", "--num_samples=1",
                                "--max_new_tokens=10")
    assert code == 0, err
    sample = stdout.split("\n---------------\n")[0]
    assert sample.startswith("ROMEO:") and len(sample) == 16 and set(sample) <= set(record.meta["itos"])


@pytest.mark.parametrize("args, fragments", [
    (["convert"], ["--hf_dir"]),
    (["convert", "--init_from=HF", "--hf_dir=x"], ["--hf_dir", "--out_dir"]),
    (["convert", "--init_from=gpt5"], ["'gpt5'", "gpt2-xl"]),
    (["convert", "--out_dir=never_trained", "--hf_dir=x"], ["never_trained"]),
])
def test_convert_errors_are_one_line(args, fragments, tmp_path, monkeypatch, run_cli):
    """Each wrong convert command line ends with one `error:` line naming the option at fault."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "HF").mkdir()  # the direction check comes before any reading of the folder
    code, out, err = run_cli(*args)
    assert_one_error_line(code, out, err, *fragments)
    assert not (tmp_path / "never_trained").exists() and not (tmp_path / "x").exists()


def test_convert_direction_follows_init_from(tmp_path):
    """init_from=resume exports (and needs hf_dir); a name or folder imports (and refuses hf_dir)."""
    with pytest.raises(ConfigError, match="give --hf_dir=FOLDER to write"):
        convert(ConvertConfig(out_dir=str(tmp_path)))
    with pytest.raises(ConfigError, match="--hf_dir is for exporting a checkpoint"):
        convert(ConvertConfig(init_from="gpt2", hf_dir=str(tmp_path / "hf"), out_dir=str(tmp_path)))
    (tmp_path / "file").write_text("")
    with pytest.raises(ConvertError, match="--hf_dir=.*file is a file"):
        convert(ConvertConfig(out_dir=str(tmp_path), hf_dir=str(tmp_path / "file")))
    assert issubclass(ConvertError, UserError) and issubclass(ConfigError, UserError)
