"""Bad input, one line each (no traceback, exit 2, nothing written): HuggingFace folders whose config.json is
not a GPT-2 config or disagrees with its tensors (found from the header, before anything is built), truncated
or integer weights, an export over another model's folder; a non-UTF-8 --start file, a --data_dir that is a
file, an out_dir that cannot be written."""

import dataclasses
import errno
import json
import os
import shutil
import typing

import numpy as np
import pytest
import safetensors.numpy

from conftest import assert_one_error_line
from nanogpt_jax import config, pretrained
from nanogpt_jax.pretrained import PretrainedError, from_pretrained


def edited_folder(hf_small, tmp_path, edit_config=None, edit_tensors=None):
    """A copy of the small HF folder with its config.json (a dict -> any JSON) or tensors (a dict) edited."""
    _, source = hf_small
    folder = tmp_path / "hf"
    shutil.copytree(source, folder)
    if edit_config:
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps(edit_config(config)))
    if edit_tensors:
        tensors = safetensors.numpy.load_file(folder / "model.safetensors")
        safetensors.numpy.save_file(edit_tensors(tensors), folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("edit, fragment", [
    (lambda c: {**c, "n_layer": "2"}, "n_layer is '2', expected a positive integer"),
    (lambda c: {**c, "n_embd": -64}, "n_embd is -64, expected a positive integer"),
    (lambda c: {**c, "n_head": True}, "n_head is True, expected a positive integer"),
    (lambda c: [c], "holds a JSON list, not an object of GPT-2 options"),
    (lambda c: {**c, "n_layer": 10**6}, "config.json does not match model.safetensors: n_layer=1,000,000 but the "
                                        "tensors have 2 layers"),
    (lambda c: {**c, "vocab_size": 1000}, "wte.weight has shape [512, 64], the config implies [1000, 64]"),
    (lambda c: {**c, "n_positions": 4096}, "wpe.weight has shape [64, 64], the config implies [4096, 64]"),
])
def test_a_config_json_that_is_not_gpt2_or_disagrees_with_its_tensors(hf_small, tmp_path, run_cli, edit, fragment,
                                                                      monkeypatch):
    """Each is one line from `sample`, found from config.json and the file's header: a model of more layers
    than the file holds is never built, not even abstractly."""
    folder = edited_folder(hf_small, tmp_path, edit_config=edit)
    real = pretrained.init_params

    def small_only(config, key):
        assert config.n_layer <= 2, f"built a model of {config.n_layer} layers"
        return real(config, key)

    monkeypatch.setattr(pretrained, "init_params", small_only)
    with pytest.raises(PretrainedError) as e:
        from_pretrained(folder)
    assert fragment in str(e.value)
    code, out, err = run_cli("sample", f"--init_from={folder}")
    assert code == 2 and out == "" and err.startswith("error: ") and fragment in err, err


def test_truncated_and_integer_weights_are_refused(hf_small, tmp_path, run_cli):
    """A safetensors file cut in half, and one whose wte holds int64: one line naming the file."""
    folder = edited_folder(hf_small, tmp_path)
    weights = folder / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    code, out, err = run_cli("sample", f"--init_from={folder}")
    assert_one_error_line(code, out, err, f"{weights} is not a readable safetensors file (truncated or damaged?)")

    shutil.rmtree(folder)
    wte = "transformer.wte.weight"  # save_pretrained's name

    folder = edited_folder(hf_small, tmp_path, edit_tensors=lambda t: {**t, wte: t[wte].astype(np.int64)})
    code, out, err = run_cli("eval", f"--init_from={folder}", "--input=README.md")
    assert_one_error_line(code, out, err, f"{folder / 'model.safetensors'} holds non-floating-point tensors",
                          f"{wte} is I64")


def test_a_truncated_torch_file_is_refused(hf_small, tmp_path):
    """pytorch_model.bin cut short: one error naming it (torch's own error in brackets)."""
    import torch

    model, source = hf_small
    folder = tmp_path / "bin"
    folder.mkdir()
    shutil.copy(source / "config.json", folder)
    weights = folder / "pytorch_model.bin"
    torch.save(model.state_dict(), weights)
    from_pretrained(folder)  # whole, it loads
    os.truncate(weights, weights.stat().st_size // 2)
    with pytest.raises(PretrainedError, match="pytorch_model.bin is not a readable torch file") as e:
        from_pretrained(folder)
    assert "\n" not in str(e.value)


def test_export_refuses_a_folder_holding_another_model(char_run, hf_small, tmp_path, run_cli):
    """`convert --hf_dir` over a folder with a model's files: one line, the files untouched."""
    out, _ = char_run
    folder = edited_folder(hf_small, tmp_path)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    code, stdout, err = run_cli("convert", f"--out_dir={out}", f"--hf_dir={folder}")
    assert_one_error_line(code, stdout, err, f"{folder} already holds a model (config.json, model.safetensors)",
                          "export into a new --hf_dir")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_start_file_that_is_not_utf8(char_run, tmp_path, run_cli):
    out, _ = char_run
    prompt = tmp_path / "latin1.txt"
    prompt.write_bytes("caf\u00e9\n".encode("latin-1"))
    code, stdout, err = run_cli("sample", f"--out_dir={out}", f"--start=FILE:{prompt}")
    assert_one_error_line(code, stdout, err, f"{prompt} is not UTF-8 text (byte 3: invalid continuation byte)")


def test_data_dir_that_is_a_file(tmp_path, run_cli):
    """train and prepare: one line, nothing written."""
    file = tmp_path / "data"
    file.write_text("not a folder")
    code, out, err = run_cli("train", f"--data_dir={file}", "--dataset=shakespeare_char",
                             f"--out_dir={tmp_path / 'out'}")
    assert_one_error_line(code, out, err, f"--data_dir={file} is a file")
    code, out, err = run_cli("prepare", "shakespeare_char", f"--data_dir={file}")
    assert_one_error_line(code, out, err, f"--data_dir={file} is a file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_an_out_dir_that_cannot_be_written(char_data, tmp_path, run_cli, monkeypatch):
    """A read-only out_dir (simulated: root, who runs the tests here, writes anywhere; checked by hand on a
    read-only bind mount, which gives the same line with 'Read-only file system')."""
    data_dir, _ = char_data
    real_open = os.open

    def read_only(path, *args, **kwargs):
        if str(path).startswith(str(tmp_path)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    code, out, err = run_cli("train", f"--data_dir={data_dir}", "--dataset=shakespeare_char", f"--out_dir={tmp_path}")
    assert_one_error_line(code, out, err, f"--out_dir={tmp_path}: cannot write there (Read-only file system)")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------- every numeric option

SWEPT = {"prepare": config.PrepareConfig, "train": config.TrainConfig, "sample": config.SampleConfig,
         "eval": config.EvalConfig, "compile": config.CompileConfig}  # convert has no numeric option
# options where 0 means something (documented beside the field); 0 is refused for every other one
ZERO_OK = {"micro_batch_size", "num_devices", "max_iters", "eval_iters", "warmup_iters", "lr_decay_iters", "dropout",
           "learning_rate", "weight_decay", "grad_clip", "beta1", "beta2", "min_lr", "process_id", "seed", "num_proc",
           "max_new_tokens", "temperature", "hellaswag_interval"}


def _numeric(cls):
    hints = typing.get_type_hints(cls)
    return [f.name for f in dataclasses.fields(cls)
            if {int, float} & set(typing.get_args(hints[f.name]) or (hints[f.name],))]


@pytest.mark.parametrize("command, key", [(c, k) for c, cls in SWEPT.items() for k in _numeric(cls)])
def test_every_numeric_option_set_to_a_bad_value_is_one_line_and_writes_nothing(command, key, tmp_path, run_cli,
                                                                               monkeypatch):
    """Negative, zero (where 0 means nothing), NaN (from a config file: the command line has no NaN literal)
    and empty: one `error:` line naming the option, exit 2, nothing created where the command writes
    (out_dir and data_dir are relative to the scratch folder)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "nan.py").write_text(f"{key} = float('nan')\n")
    first = ("text",) if command == "prepare" else ()
    cases = [(f"--{key}=-1",), (f"--{key}=",), ("nan.py",)] + ([] if key in ZERO_OK else [(f"--{key}=0",)])
    for args in cases:
        code, out, err = run_cli(command, *first, *args)
        assert_one_error_line(code, out, err, f"--{key}")
        assert [p.name for p in tmp_path.iterdir()] == ["nan.py"], (args, err)


def test_seed_out_of_range_is_refused_before_anything_is_written(tmp_path, run_cli, monkeypatch):
    """JAX keys take a seed's low 32 bits: 2**32 would repeat seed 0's run."""
    monkeypatch.chdir(tmp_path)
    for command in ("train", "sample", "eval"):
        for seed in (-1, 2**32):
            code, out, err = run_cli(command, f"--seed={seed}")
            assert_one_error_line(code, out, err, f"--seed={seed}: must be in 0 .. 4,294,967,295")
    assert list(tmp_path.iterdir()) == []


def test_a_multi_process_timeout_past_a_million_seconds_is_refused(tmp_path, run_cli, monkeypatch):
    """JAX passes them to C++ as 32-bit ints (the heartbeat doubled): a huge value must not reach it."""
    monkeypatch.chdir(tmp_path)
    for key in ("initialization_timeout", "heartbeat_timeout_seconds"):
        code, out, err = run_cli("train", f"--{key}={10**6 + 1}", "--coordinator_address=localhost:1")
        assert_one_error_line(code, out, err, f"--{key}={10**6 + 1}: must be in 1 .. 1,000,000 seconds")
    assert list(tmp_path.iterdir()) == []


def test_an_option_given_twice_names_both_values(tmp_path, run_cli):
    """The last wins, as in nanoGPT; a note says so (an option set in a config file and then on the command
    line is an override, not a repetition)."""
    (tmp_path / "cfg.py").write_text("num_samples = 3\n")
    code, out, err = run_cli("sample", str(tmp_path / "cfg.py"), "--num_samples=4", "--top_k=-1", "--top_k=5",
                             "--temperature=0.5", "--temperature=0.5", f"--out_dir={tmp_path / 'none'}")
    assert code == 2 and err.splitlines() == [
        "--top_k is given twice (-1, then 5): the last, 5, is used",
        f"error: no checkpoints in {tmp_path / 'none'}: train first, or check --out_dir"], err
