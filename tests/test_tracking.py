"""metrics.jsonl: fresh runs, resumed runs, torn lines, other processes, and the mirror to an offline wandb run."""

import json
import struct
import sys

import pytest

from nanogpt_jax import tracking
from nanogpt_jax.checkpoint import run_path
from nanogpt_jax.tracking import MetricsError, MetricsLog, read_metrics


def write_lines(path, lines, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + tail, encoding="utf-8")


def history(n_iters, eval_interval):
    """What a run logs: an eval record at every eval_interval, then a step record at every iteration."""
    out = []
    for it in range(n_iters):
        if it % eval_interval == 0:
            out.append({"iter": it, "train_loss": 5.0 - it / 8, "val_loss": 5.5 - it / 8})
        out.append({"iter": it, "loss": 4.0 - it / 16, "lr": 1e-3, "dt_ms": 10.0, "tokens_per_sec": 1e3, "mfu": None})
    return out


def test_new_run_writes_one_line_per_record_and_starts_fresh(tmp_path):
    write_lines(tmp_path / "metrics.jsonl", [{"iter": 99, "loss": 1.0}])  # an earlier run's file
    records = history(6, 4)
    with MetricsLog(tmp_path, resume_iter=None) as m:
        for r in records:
            m.log(**r)
    lines = (tmp_path / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == records
    assert read_metrics(tmp_path) == records


def test_resume_drops_the_records_the_resumed_run_writes_again(tmp_path):
    # killed at iteration 9 with a torn line; the checkpoint is at 8, so the resumed run logs 8, 9, ... again
    logged = history(10, 4)
    write_lines(tmp_path / "metrics.jsonl", logged, tail='{"iter": 10, "loss": 3.3')
    with MetricsLog(tmp_path, resume_iter=8) as m:
        kept = read_metrics(tmp_path)
        for r in history(12, 4)[len(kept):]:
            m.log(**r)
    assert kept == [r for r in logged if r["iter"] < 8]
    assert len(kept) == 8 + 2  # iterations 0..7 and the evals at 0 and 4
    assert read_metrics(tmp_path) == history(12, 4)  # as if the run had never stopped
    assert not (tmp_path / "metrics.jsonl.tmp").exists()


def test_resume_without_a_file_starts_an_empty_one(tmp_path):
    with MetricsLog(tmp_path, resume_iter=4) as m:
        m.log(iter=4, loss=2.0)
    assert read_metrics(tmp_path) == [{"iter": 4, "loss": 2.0}]


def test_read_metrics_skips_a_torn_last_line_only(tmp_path):
    records = [{"iter": 0, "loss": 4.0}, {"iter": 1, "loss": 3.5}]
    write_lines(tmp_path / "metrics.jsonl", records, tail='{"iter": 2, "lo')
    assert read_metrics(tmp_path) == records
    # a broken line before the last is damage, not a kill: say where
    (tmp_path / "metrics.jsonl").write_text('{"iter": 0}\n{"iter": 1, "lo\n{"iter": 2}\n', encoding="utf-8")
    with pytest.raises(MetricsError, match=r"metrics\.jsonl:2 is not a JSON object; fix or delete that line"):
        read_metrics(tmp_path)
    with pytest.raises(MetricsError, match=r"not found: is .*nowhere the --out_dir of a training run\?"):
        read_metrics(tmp_path / "nowhere")


def test_a_bucket_out_dir_gets_whole_rewrites_not_appends(tmp_path, monkeypatch):
    """gs:// objects cannot be appended to: the file is rewritten from memory every FLUSH_SECONDS and at
    close, through epath (tested on a local folder treated as a bucket)."""
    monkeypatch.setattr(tracking, "on_object_store", lambda path: True)
    logged = history(10, 4)
    write_lines(tmp_path / "metrics.jsonl", logged, tail='{"iter": 10, "loss": 3.3')
    clock = [0.0]
    monkeypatch.setattr(tracking.time, "monotonic", lambda: clock[0])
    with MetricsLog(tmp_path, resume_iter=8) as m:
        kept = read_metrics(tmp_path)
        later = history(12, 4)[len(kept):]
        m.log(**later[0])
        assert read_metrics(tmp_path) == kept  # not yet written
        clock[0] = tracking.FLUSH_SECONDS
        m.log(**later[1])
        assert read_metrics(tmp_path) == kept + later[:2]
        for r in later[2:]:
            m.log(**r)
    assert read_metrics(tmp_path) == history(12, 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_checkpoints_of_a_bucket_out_dir_stay_in_the_bucket(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert str(run_path("gs://bucket/run")) == "gs://bucket/run"
    assert str(run_path("out")) == str(tmp_path / "out")  # on a disk orbax wants an absolute path


def test_disabled_writes_nothing_and_keeps_the_file(tmp_path):
    with MetricsLog(tmp_path, resume_iter=None, enabled=False) as m:
        m.log(iter=0, loss=1.0)
    assert list(tmp_path.iterdir()) == []
    write_lines(tmp_path / "metrics.jsonl", [{"iter": 5, "loss": 1.0}])
    with MetricsLog(tmp_path, resume_iter=2, enabled=False) as m:  # process 1 of a resumed run
        m.log(iter=2, loss=1.0)
    assert read_metrics(tmp_path) == [{"iter": 5, "loss": 1.0}]


def test_missing_wandb_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now raises ImportError
    with pytest.raises(MetricsError, match=r"pip install wandb"):
        MetricsLog(tmp_path, resume_iter=None, wandb={"project": "p"})


def wandb_records(run_file):
    """(record type, record) of an offline .wandb file: a LevelDB-style log of wandb's Record protobufs.

    Each record has a 7-byte header (crc32, length, type 1 = whole record) after the 7-byte file header.
    """
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B" and len(data) < 32768  # one block: no record is split across blocks
    pos, out = 7, []
    while pos < len(data):
        _crc, length, kind = struct.unpack_from("<IHB", data, pos)
        assert kind == 1
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(data[pos + 7: pos + 7 + length])
        out.append((rec.WhichOneof("record_type"), rec))
        pos += 7 + length
    return out


def test_wandb_offline_run_gets_every_record(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):  # nothing outside tmp_path
        monkeypatch.setenv(var, str(tmp_path))
    options = {"project": "nanogpt-test", "name": "tiny", "config": {"n_layer": 2, "learning_rate": 1e-3}}
    with MetricsLog(tmp_path, resume_iter=None, wandb=options) as m:
        m.log(iter=0, train_loss=4.5, val_loss=4.25)
        m.log(iter=0, loss=4.375, lr=1e-3, mfu=None)
        m.log(iter=10, loss=3.125, lr=2e-3, mfu=None)
    assert len(read_metrics(tmp_path)) == 3  # the jsonl gets them too
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    records = wandb_records(run_file)
    (run,) = [r.run for kind, r in records if kind == "run"]
    assert (run.project, run.display_name) == ("nanogpt-test", "tiny")
    assert {i.key: json.loads(i.value_json) for i in run.config.update if i.key != "_wandb"} == options["config"]
    rows = [{key: json.loads(i.value_json) for i in r.history.item
             if not (key := i.key or "/".join(i.nested_key)).startswith("_") or key == "_step"}
            for kind, r in records if kind == "history"]
    # records of one iteration share a row; iter becomes wandb's step; a null mfu is left out
    assert rows == [{"_step": 0, "train_loss": 4.5, "val_loss": 4.25, "loss": 4.375, "lr": 1e-3},
                    {"_step": 10, "loss": 3.125, "lr": 2e-3}]
    assert records[-1][0] == "exit"  # close() finished the run
