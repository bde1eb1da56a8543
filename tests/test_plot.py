"""plot: PNGs of one and several runs from metrics.jsonl, and its one-line errors."""

import json
import struct
import sys

import pytest

from nanogpt_jax.plot import PlotError, main, plot, series
from nanogpt_jax.tracking import MetricsError


def fake_run(folder, n_iters=50, eval_interval=10, scale=1.0, tail=""):
    """A metrics.jsonl as train.py writes it; returns the records."""
    records = []
    for it in range(n_iters):
        if it % eval_interval == 0:
            records.append({"iter": it, "train_loss": scale * 4 / (1 + it / 10),
                            "val_loss": scale * 4.2 / (1 + it / 10)})
        records.append({"iter": it, "loss": scale * 4 / (1 + it / 12), "lr": 1e-3 * min(1, (it + 1) / 10),
                        "dt_ms": 40.0, "tokens_per_sec": 12_000.0 + it, "mfu": None})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + tail, encoding="utf-8")
    return records


def png_size(path):
    """(width, height) from the PNG signature and IHDR chunk."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def test_series_picks_numbers_of_one_key():
    records = [{"iter": 0, "train_loss": 4.0, "val_loss": 4.1}, {"iter": 0, "loss": 4.2, "mfu": None},
               {"iter": 1, "loss": 3.9, "mfu": 0.25}]
    assert series(records, "loss") == ([0, 1], [4.2, 3.9])
    assert series(records, "mfu") == ([1], [0.25])
    assert series(records, "val_loss") == ([0], [4.1])


def test_one_run_with_a_torn_last_line(tmp_path):
    fake_run(tmp_path / "out-a", tail='{"iter": 50, "loss": 1.')  # killed mid-write
    out = plot([str(tmp_path / "out-a")], str(tmp_path / "a.png"))
    assert out == str(tmp_path / "a.png")
    assert png_size(tmp_path / "a.png") == (800, 900)  # figsize (8, 9) at 100 dpi
    assert (tmp_path / "a.png").stat().st_size > 20_000  # three panels of lines and text, not a blank canvas


def test_two_runs_overlaid(tmp_path):
    fake_run(tmp_path / "out-a")
    fake_run(tmp_path / "out-b", n_iters=30, scale=1.3)
    plot([str(tmp_path / "out-a")], str(tmp_path / "a.png"))
    plot([str(tmp_path / "out-a"), str(tmp_path / "out-b")], str(tmp_path / "ab.png"))
    assert png_size(tmp_path / "ab.png") == (800, 900)
    assert (tmp_path / "ab.png").read_bytes() != (tmp_path / "a.png").read_bytes()


def test_main_parses_folders_and_output(tmp_path, capsys):
    fake_run(tmp_path / "out-a")
    main([str(tmp_path / "out-a"), f"--output={tmp_path / 'x.png'}"])
    assert capsys.readouterr().out == f"wrote {tmp_path / 'x.png'}\n"
    assert png_size(tmp_path / "x.png") == (800, 900)
    with pytest.raises(PlotError, match=r"plot: unknown argument '--out=x.png'; it takes run folders and --output="):
        main([str(tmp_path / "out-a"), "--out=x.png"])


def test_errors_are_one_clear_line(tmp_path, monkeypatch):
    with pytest.raises(PlotError, match=r"plot needs at least one run folder"):
        plot([])
    (tmp_path / "empty").mkdir()
    with pytest.raises(MetricsError, match=r"metrics\.jsonl not found: is .*empty the --out_dir of a training run\?"):
        plot([str(tmp_path / "empty")], str(tmp_path / "e.png"))
    (tmp_path / "empty" / "metrics.jsonl").write_text('{"iter": 0, "lr": 0.001}\n{"iter": 1, "lo', encoding="utf-8")
    with pytest.raises(PlotError, match=r"empty[/\\]metrics\.jsonl has no loss record yet"):
        plot([str(tmp_path / "empty")], str(tmp_path / "e.png"))
    fake_run(tmp_path / "out-a")
    with pytest.raises(PlotError, match=r"cannot write .*no_such_dir.*\.png"):
        plot([str(tmp_path / "out-a")], str(tmp_path / "no_such_dir" / "a.png"))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(PlotError, match=r"pip install 'nanogpt-jax\[plot\]' \(or pip install matplotlib\)"):
        plot([str(tmp_path / "out-a")], str(tmp_path / "a.png"))
    assert not (tmp_path / "e.png").exists() and not (tmp_path / "a.png").exists()
