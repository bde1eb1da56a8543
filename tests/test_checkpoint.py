"""Checkpoints: a run's saved params and record read back bit for bit, nanoGPT's best/latest saving rule, the
run record's version check, and the refusal to write a new run over an old one."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from conftest import assert_one_error_line, assert_trees_equal, read_metrics, tiny_cfg, quiet
from nanogpt_jax import load_checkpoint
from nanogpt_jax.checkpoint import RECORD_VERSION, Checkpointer, CheckpointError, RunRecord, refuse_existing_run
from nanogpt_jax.config import TrainConfig, UserError
from nanogpt_jax.load import load_run
from nanogpt_jax.model import GPTConfig, init_params
from nanogpt_jax.run import Run
from nanogpt_jax.train import train

TINY = GPTConfig(block_size=8, vocab_size=11, n_layer=1, n_head=1, n_embd=8)


def record_json(**changes) -> dict:
    """A record as Checkpointer.save writes it (dataclasses.asdict), with `changes` applied."""
    record = RunRecord(train=dataclasses.asdict(TrainConfig()), model=dataclasses.asdict(TINY),
                       meta={"vocab_size": 2, "itos": ["a", "b"]}, iter_num=7, best_val_loss=2.5)
    return {**dataclasses.asdict(record), **changes}


def save_tiny(out_dir, record: RunRecord, kind="latest", iter_num=7):
    """One checkpoint of a 1-layer model in out_dir, its params returned."""
    params = init_params(TINY, jax.random.PRNGKey(0))
    ckpt = Checkpointer(str(out_dir))
    try:
        ckpt.save(kind, iter_num, params, {"step": jnp.zeros((), jnp.int32)}, jax.random.PRNGKey(1), record)
    finally:
        ckpt.close()
    return params


@pytest.mark.slow
def test_checkpoint_round_trip(run_a):
    """The latest and best checkpoints of a real run hold the params saved, the architecture trained, a record
    of the run, and give back the logged val loss."""
    cfg, out, saves, result = run_a
    assert result["iter_num"] == 20
    latest = [s for s in saves if s[0] == "latest"]
    assert [s[1] for s in latest] == [10, 20]
    config, params = load_checkpoint(str(out))
    assert_trees_equal(params, latest[-1][2])
    # the architecture is the one trained
    assert config == GPTConfig(block_size=16, vocab_size=65, n_layer=2, n_head=2, n_embd=32, dropout=0.1,
                               bias=False, model="gpt", dtype="float32", attn_impl=None, remat="none",
                               scan_layers=False)
    # best: the last improving evaluation's params
    best = [s for s in saves if s[0] == "best"]
    config_b, params_b = load_checkpoint(str(out), "best")
    assert config_b == config
    assert_trees_equal(params_b, best[-1][2])
    evals = {m["iter"]: m["val_loss"] for m in read_metrics(out) if "val_loss" in m}
    running = evals[0]
    improving = []
    for it in (10, 20):
        if evals[it] < running:
            improving.append(it)
            running = evals[it]
    assert [s[1] for s in best] == improving
    # the restored params give the logged val loss on the same val batches
    run = Run(cfg, config)
    assert run.estimate_loss(params, 20)["val"] == pytest.approx(evals[20], rel=1e-6)
    _, _, record = load_run(str(out))
    assert record.iter_num == 20 and record.meta["vocab_size"] == 65 and len(record.meta["itos"]) == 65
    assert record.train == dataclasses.asdict(cfg)


SCRIPTED_VAL = {0: 4.0, 2: 3.0, 4: 3.5, 6: 2.5, 8: 2.8}


@pytest.mark.slow
@pytest.mark.parametrize("always_save, expected", [
    # nanoGPT saves at iter > 0 when val improves (3.0 at 2, 2.5 at 6), or at every evaluation with
    # always_save_checkpoint; `best` is written beside `latest` at each improvement
    (False, [("latest", 2), ("best", 2), ("latest", 6), ("best", 6)]),
    (True, [("latest", 2), ("best", 2), ("latest", 4), ("latest", 6), ("best", 6), ("latest", 8)]),
])
def test_best_and_latest_semantics(char_data, tmp_path, monkeypatch, spy_saves, always_save, expected):
    """With scripted val losses: `best` holds the lowest-val iteration; `latest` every evaluation
    (always_save_checkpoint=True) or only the improving ones (False)."""
    data_dir, _ = char_data
    monkeypatch.setattr(Run, "estimate_loss", lambda self, params, it: {"train": 9.0, "val": SCRIPTED_VAL[it]})
    cfg = tiny_cfg(data_dir, tmp_path, n_layer=1, n_head=1, n_embd=16, block_size=8, batch_size=2,
                   max_iters=8, eval_interval=2, always_save_checkpoint=always_save)
    result = train(cfg, log=quiet)
    assert [(k, i) for k, i, _, _ in spy_saves] == expected
    assert result["best_val_loss"] == 2.5
    _, params_best, rec_best = load_run(str(tmp_path), "best")
    assert rec_best.iter_num == 6 and rec_best.best_val_loss == 2.5
    assert_trees_equal(params_best, next(p for k, i, p, _ in spy_saves if (k, i) == ("best", 6)))
    _, params_latest, rec_latest = load_run(str(tmp_path), "latest")
    last = 8 if always_save else 6
    assert rec_latest.iter_num == last and rec_latest.best_val_loss == 2.5
    assert_trees_equal(params_latest, next(p for k, i, p, _ in spy_saves if (k, i) == ("latest", last)))
    # one step directory per kind (max_to_keep=1)
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "best").iterdir() if p.name.isdigit()) == ["6"]
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "latest").iterdir() if p.name.isdigit()) == [str(last)]


# ---------------------------------------------------------------------------------------------- the record


def test_record_reads_back_field_for_field():
    """A record written by this version reads back equal, its model fields as the GPTConfig."""
    data = record_json()
    assert data["version"] == RECORD_VERSION == 4
    record = RunRecord.from_json(data, "somewhere")
    assert dataclasses.asdict(record) == data
    assert record.config == TINY


def test_record_without_a_version_reads_as_version_1():
    """Records written before the version field existed are version 1, as are those without best_iter and
    checksums (version 2's fields): they read with both None."""
    data = record_json()
    for key in ("version", "best_iter", "checksums"):
        del data[key]
    record = RunRecord.from_json(data, "somewhere")
    assert record.version == 1
    assert dataclasses.asdict(record) == {**record_json(), "version": 1}
    assert record.best_iter is None and record.checksums is None


@pytest.mark.parametrize("changes, named", [
    ({"version": 5}, ["record version 5"]),
    ({"optimizer": "lion"}, ["record version 4", "'optimizer'"]),
    ({"model": {**dataclasses.asdict(TINY), "rope": True}}, ["record version 4", "'rope'"]),
])
def test_a_newer_record_is_refused_in_one_line(changes, named):
    """A newer version, or a field this version does not know (top level or model), is a CheckpointError: one
    line naming where, the version and the unknown fields."""
    with pytest.raises(CheckpointError) as e:
        RunRecord.from_json(record_json(**changes), "out/checkpoints/latest")
    message = str(e.value)
    assert "\n" not in message and message.startswith("out/checkpoints/latest was written by a newer nanogpt-jax")
    for fragment in named:
        assert fragment in message, message
    assert issubclass(CheckpointError, UserError)


def test_a_newer_record_on_disk_is_refused_by_every_reader(tmp_path, run_cli):
    """A checkpoint whose record says version 5: load_run refuses it, and `sample` prints one error line."""
    save_tiny(tmp_path, RunRecord(**{**record_json(), "version": 5}))
    with pytest.raises(CheckpointError, match="record version 5"):
        load_run(str(tmp_path))
    code, out, err = run_cli("sample", f"--out_dir={tmp_path}")
    assert_one_error_line(code, out, err, "record version 5", "upgrade nanogpt-jax")


# -------------------------------------------------------------------------------------- existing runs


def test_refuse_existing_run_refuses_checkpoints_and_accepts_an_empty_folder(tmp_path):
    """No folder, an empty one, or the empty checkpoint tree a Checkpointer creates are accepted; a folder
    holding a saved checkpoint is refused, the message naming it and what to do."""
    refuse_existing_run(str(tmp_path / "new"), "unused")
    empty = tmp_path / "empty"
    empty.mkdir()
    refuse_existing_run(str(empty), "unused")
    Checkpointer(str(empty)).close()
    assert sorted(p.name for p in (empty / "checkpoints").iterdir()) == ["best", "latest"]
    refuse_existing_run(str(empty), "unused")

    run = tmp_path / "run"
    save_tiny(run, RunRecord(**record_json()), kind="best", iter_num=0)
    with pytest.raises(CheckpointError) as e:
        refuse_existing_run(str(run), "train into a new --out_dir")
    assert str(e.value) == f"{run} already holds a run's checkpoints: train into a new --out_dir"


def test_save_at_or_below_a_saved_iteration_is_refused(tmp_path):
    """orbax silently skips such a save: the Checkpointer says so instead of losing it."""
    params = save_tiny(tmp_path, RunRecord(**record_json()), iter_num=7)
    ckpt = Checkpointer(str(tmp_path))
    try:
        with pytest.raises(CheckpointError, match="iteration 5 was not saved.*already holds a later one"):
            ckpt.save("latest", 5, params, {"step": jnp.zeros((), jnp.int32)}, jax.random.PRNGKey(1),
                      RunRecord(**record_json()))
    finally:
        ckpt.close()
    record = load_run(str(tmp_path))[2]
    assert (record.iter_num, record.best_val_loss) == (7, 2.5)
