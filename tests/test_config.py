"""Options with nanoGPT's names: config files, --key=value overrides, and the errors for bad ones."""

import dataclasses
import math
import typing

import pytest

from conftest import REPO
from nanogpt_jax.config import (ConfigError, ConvertConfig, EvalConfig, LoadConfig, PrepareConfig, SampleConfig,
                                TrainConfig, UserError, parse)

CONFIGS = REPO / "configs"


def test_defaults_are_nanogpts_train_py():
    cfg = parse(TrainConfig, [])
    # nanoGPT's train.py defaults (GPT-2 124M on OpenWebText)
    expected = dict(out_dir="out", eval_interval=2000, log_interval=1, eval_iters=200, eval_only=False,
                    always_save_checkpoint=True, init_from="scratch", dataset="openwebtext",
                    gradient_accumulation_steps=40, batch_size=12, block_size=1024, n_layer=12, n_head=12,
                    n_embd=768, dropout=0.0, bias=False, learning_rate=6e-4, max_iters=600000,
                    weight_decay=1e-1, beta1=0.9, beta2=0.95, grad_clip=1.0, decay_lr=True, warmup_iters=2000,
                    lr_decay_iters=600000, min_lr=6e-5)
    assert {k: getattr(cfg, k) for k in expected} == expected


def test_cpu_config_file_loads_nanogpts_cpu_recipe():
    cfg = parse(TrainConfig, [str(CONFIGS / "shakespeare_char_cpu.py")])
    # nanoGPT README: train_shakespeare_char.py with --device=cpu --compile=False --eval_iters=20
    # --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000
    # --lr_decay_iters=2000 --dropout=0.0
    expected = dict(dataset="shakespeare_char", eval_iters=20, log_interval=1, block_size=64, batch_size=12,
                    n_layer=4, n_head=4, n_embd=128, max_iters=2000, lr_decay_iters=2000, dropout=0.0,
                    gradient_accumulation_steps=1, learning_rate=1e-3, min_lr=1e-4, beta2=0.99,
                    warmup_iters=100, eval_interval=250, always_save_checkpoint=False)
    assert {k: getattr(cfg, k) for k in expected} == expected


def test_file_then_overrides_in_order():
    cfg = parse(TrainConfig, [str(CONFIGS / "shakespeare_char.py"), "--batch_size=32", "--dropout=0.1",
                              "--bias=True", "--dataset=shakespeare", "--out_dir=runs/a b"])
    # nanoGPT's config/train_shakespeare_char.py, then the overrides
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, cfg.max_iters) == (6, 6, 384, 256, 5000)
    assert (cfg.batch_size, cfg.dropout, cfg.bias, cfg.dataset, cfg.out_dir) == (32, 0.1, True, "shakespeare",
                                                                                 "runs/a b")
    # a later value wins, including a file after an override
    assert parse(TrainConfig, ["--n_layer=2", str(CONFIGS / "shakespeare_char.py")]).n_layer == 6
    assert parse(TrainConfig, [str(CONFIGS / "shakespeare_char.py"), "--n_layer=2"]).n_layer == 2


def test_unknown_key_suggests_closest():
    with pytest.raises(ConfigError, match=r"unknown option --learnin_rate .*did you mean --learning_rate\?"):
        parse(TrainConfig, ["--learnin_rate=1e-3"])
    with pytest.raises(ConfigError, match=r"unknown option --zzz") as e:
        parse(TrainConfig, ["--zzz=1"])
    assert "did you mean" not in str(e.value)
    assert issubclass(ConfigError, UserError)


def test_unknown_key_in_config_file_names_file(tmp_path):
    f = tmp_path / "my.py"
    f.write_text("n_layers = 3\n")
    with pytest.raises(ConfigError, match=r"--n_layers .*my\.py.*did you mean --n_layer"):
        parse(TrainConfig, [str(f)])


def test_wrong_type_says_expected_type():
    with pytest.raises(ConfigError, match=r"--max_iters='abc'.*expected int, got str"):
        parse(TrainConfig, ["--max_iters='abc'"])
    with pytest.raises(ConfigError, match=r"expected int, got float"):
        parse(TrainConfig, ["--batch_size=1.5"])
    with pytest.raises(ConfigError, match=r"expected bool, got int"):
        parse(TrainConfig, ["--bias=1"])
    with pytest.raises(ConfigError, match=r"expected int, got bool"):
        parse(TrainConfig, ["--max_iters=True"])
    with pytest.raises(ConfigError, match=r"expected float, got str"):
        parse(TrainConfig, ["--learning_rate=fast"])


def test_int_accepted_for_float_and_none_for_optional():
    cfg = parse(TrainConfig, ["--learning_rate=1", "--dropout=0"])
    assert cfg.learning_rate == 1.0 and type(cfg.learning_rate) is float
    assert cfg.dropout == 0.0 and type(cfg.dropout) is float
    s = parse(SampleConfig, ["--top_k=None", "--top_p=0.9", "--temperature=1", "--num_samples=2"])
    assert s.top_k is None and s.top_p == 0.9 and s.temperature == 1.0 and s.num_samples == 2
    assert parse(SampleConfig, ["--top_k=5"]).top_k == 5
    with pytest.raises(ConfigError, match=r"expected int or None"):
        parse(SampleConfig, ["--top_k=0.5"])
    assert parse(TrainConfig, ["--attn_impl=None"]).attn_impl is None
    assert parse(TrainConfig, ["--attn_impl=cudnn"]).attn_impl == "cudnn"


def test_malformed_arguments():
    with pytest.raises(ConfigError, match=r"--max_iters needs a value: write --max_iters=VALUE or --max_iters VALUE"):
        parse(TrainConfig, ["--max_iters"])
    with pytest.raises(ConfigError, match=r"--max_iters needs a value"):
        parse(TrainConfig, ["--max_iters", "--batch_size=2"])
    with pytest.raises(ConfigError, match=r"config file .*nope\.py not found"):
        parse(TrainConfig, ["nope.py"])
    with pytest.raises(ConfigError, match=r"expected a CONFIG.py file or --key=value"):
        parse(TrainConfig, ["max_iters=3"])


def test_nanogpt_only_options_give_notes():
    notes = []
    cfg = parse(TrainConfig, ["--compile=False", "--device=cpu", "--backend=gloo", "--max_iters=7"], notes)
    assert cfg.max_iters == 7
    assert len(notes) == 3 and all("has no effect" in n for n in notes)
    assert notes[0].startswith("--compile")
    assert cfg == dataclasses.replace(TrainConfig(), max_iters=7)
    # train logs to wandb itself; for the other commands wandb_log is a note
    assert parse(TrainConfig, ["--wandb_log=True"]).wandb_log is True
    notes = []
    assert parse(SampleConfig, ["--wandb_log=True"], notes) == SampleConfig()
    assert notes == ["--wandb_log has no effect in nanogpt-jax: only train logs to Weights & Biases"]


def test_command_line_values_are_never_executed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    payload = "__import__('os').system('touch X')"
    cfg = parse(TrainConfig, [f"--out_dir={payload}"])
    assert cfg.out_dir == payload
    assert not (tmp_path / "X").exists()
    with pytest.raises(ConfigError):
        parse(TrainConfig, [f"--max_iters={payload}"])
    assert not (tmp_path / "X").exists()
    # literals are parsed: quoted strings lose their quotes, bare words stay strings
    assert parse(TrainConfig, ["--dataset='shakespeare_char'"]).dataset == "shakespeare_char"
    assert parse(TrainConfig, ["--dataset=shakespeare_char"]).dataset == "shakespeare_char"
    assert parse(SampleConfig, ["--start='\\n'"]).start == "\n"


@pytest.mark.parametrize("cls,arg,fragment", [
    (TrainConfig, "--batch_size=0", "--batch_size=0: must be at least 1"),
    (TrainConfig, "--eval_iters=0", "--eval_iters=0: must be at least 1"),
    (TrainConfig, "--max_iters=-5", "--max_iters=-5: must be at least 0"),
    (TrainConfig, "--n_head=5", "--n_embd=768 must be a multiple of --n_head=5"),
    (TrainConfig, "--dropout=1.0", "--dropout=1.0: must be in [0, 1)"),
    (SampleConfig, "--num_samples=0", "--num_samples=0: must be at least 1"),
    (SampleConfig, "--top_k=0", "--top_k=0: must be at least 1"),
    (SampleConfig, "--temperature=-0.5", "--temperature=-0.5: must be at least 0"),
    (SampleConfig, "--top_p=1.5", "--top_p=1.5: must be in (0, 1]"),
])
def test_out_of_range_values_are_refused(cls, arg, fragment):
    with pytest.raises(ConfigError) as e:
        parse(cls, [arg])
    assert fragment in str(e.value)


def test_in_range_edges_are_accepted():
    assert parse(SampleConfig, ["--temperature=0", "--top_p=1.0", "--max_new_tokens=0"]).temperature == 0.0
    assert parse(TrainConfig, ["--max_iters=0", "--dropout=0.0", "--n_head=1"]).n_head == 1


def test_key_space_value_equals_key_equals_value():
    spaced = parse(TrainConfig, ["--max_iters", "30", "--dataset", "shakespeare_char", "--attn_impl", "None"])
    joined = parse(TrainConfig, ["--max_iters=30", "--dataset=shakespeare_char", "--attn_impl=None"])
    assert spaced == joined and (spaced.max_iters, spaced.dataset, spaced.attn_impl) == (30, "shakespeare_char", None)


def test_prepare_takes_its_dataset_as_a_bare_word_and_both_option_forms():
    cfg = parse(PrepareConfig, ["shakespeare_char", "--input", "a.txt", "--data_dir=d"], positional="dataset")
    assert (cfg.dataset, cfg.input, cfg.data_dir) == ("shakespeare_char", ("a.txt",), "d")
    with pytest.raises(ConfigError, match="unknown option --inptu.*did you mean --input"):
        parse(PrepareConfig, ["shakespeare", "--inptu=a.txt"], positional="dataset")


def test_optional_written_with_typing_is_understood():
    @dataclasses.dataclass
    class Opts:
        top_k: typing.Optional[int] = None  # noqa: UP007 - the spelling a contributor may use

    assert parse(Opts, ["--top_k=5"]).top_k == 5 and parse(Opts, ["--top_k=None"]).top_k is None
    with pytest.raises(ConfigError, match="expected int or None, got str"):
        parse(Opts, ["--top_k=many"])


def test_every_loading_command_shares_the_load_options():
    for cls in (SampleConfig, EvalConfig, ConvertConfig):
        assert issubclass(cls, LoadConfig)
        assert parse(cls, ["--checkpoint=best", "--out_dir=o"]).checkpoint == "best"
        with pytest.raises(ConfigError, match="--checkpoint=newest: use latest or best"):
            parse(cls, ["--checkpoint=newest"])


@pytest.mark.parametrize("text,fragment", [
    ("x = 1\ny = 1 / 0\n", "line 2: ZeroDivisionError: division by zero"),
    ("batch_size = 4\nbatch_size =\n", "line 2: SyntaxError"),
    ("import no_such_module_here\n", "line 1: ModuleNotFoundError: No module named 'no_such_module_here'"),
    ("def f():\n    raise RuntimeError('deep')\n\nn_layer = 2\nf()\n", "line 2: RuntimeError: deep"),
    ("x = 1\n\0\n", "line 2: a NUL byte"),
])
def test_broken_config_file_is_one_line_naming_file_and_line(tmp_path, text, fragment):
    path = tmp_path / "broken.py"
    path.write_bytes(text.encode())
    with pytest.raises(ConfigError) as e:
        parse(TrainConfig, [str(path)])
    assert str(e.value).startswith(f"config {path}, {fragment}"), str(e.value)
    assert "\n" not in str(e.value)


def test_config_folder_is_refused(tmp_path):
    folder = tmp_path / "cfg.py"
    folder.mkdir()
    with pytest.raises(ConfigError, match="is a folder"):
        parse(TrainConfig, [str(folder)])


@pytest.mark.parametrize("key,value", [("learning_rate", math.nan), ("learning_rate", math.inf),
                                       ("learning_rate", -1e-3), ("min_lr", math.nan), ("weight_decay", -0.1),
                                       ("grad_clip", math.inf), ("beta1", 1.0), ("beta2", math.nan),
                                       ("beta1", -0.1)])
def test_non_finite_or_negative_optimizer_values_are_refused(key, value):
    with pytest.raises(ConfigError, match=f"--{key}="):
        TrainConfig(**{key: value})
    assert TrainConfig(**{key: 0.0}).__dict__[key] == 0.0  # zero is fine for all of them


def test_parse_records_the_options_the_user_set(tmp_path):
    from nanogpt_jax.config import options_set

    path = tmp_path / "c.py"
    path.write_text("n_layer = 12\nbatch_size = 4\n")
    cfg = parse(TrainConfig, [str(path), "--bias=False", "--out_dir=o"])
    assert options_set(cfg) == {"n_layer", "batch_size", "bias", "out_dir"}  # set, even to the default
    assert options_set(TrainConfig(n_layer=2, bias=False)) == {"n_layer"}  # built in Python: non-defaults
