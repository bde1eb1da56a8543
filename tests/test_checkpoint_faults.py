"""Checkpoints under faults: damaged files after the save (a truncated or garbled data file, a deleted manifest,
an empty record) are one error line naming the folder for every command, with the intact `best` offered and
usable; a failed write (disk full) is one line that keeps the previous checkpoint and leaves no temporary folder;
a kill between the `latest` and `best` saves is repaired on resume; SIGKILL at any moment, in the middle of a
save too, resumes from a complete checkpoint."""

import asyncio
import dataclasses
import errno
import gc
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import REPO, assert_one_error_line, assert_trees_equal, quiet, tiny_cfg
from nanogpt_jax.checkpoint import ORBAX_DIR, Checkpointer, checksum, quiet_orbax_failures
from nanogpt_jax.load import load_run
from nanogpt_jax.tracking import read_metrics
from nanogpt_jax.run import Run
from nanogpt_jax.train import train

# the tiny run's options, as the command line takes them
TINY = dict(n_layer=1, n_head=1, n_embd=16, block_size=8, batch_size=2, eval_iters=1)


def options(cfg) -> list[str]:
    keys = ("dataset", "data_dir", "out_dir", "n_layer", "n_head", "n_embd", "block_size", "batch_size",
            "gradient_accumulation_steps", "eval_iters", "eval_interval", "max_iters", "learning_rate",
            "warmup_iters", "lr_decay_iters", "min_lr", "dtype", "log_interval")
    return [f"--{k}={getattr(cfg, k)}" for k in keys]


# --------------------------------------------------------------------------------------------- the checksum


class Pair(NamedTuple):
    mu: jax.Array
    nu: jax.Array


def test_checksum_sees_one_changed_bit_and_nothing_else():
    """The digest changes with any one flipped bit of any leaf, a swap of two elements, a dtype or a shape; it is
    the same for the same arrays sharded over two devices, and for dicts where the saved tree had named tuples
    (what a restore from metadata gives)."""
    rng = np.random.default_rng(0)
    tree = {"opt": Pair(jnp.asarray(rng.normal(size=(6, 5)), jnp.float32),
                        jnp.asarray(rng.normal(size=(7,)), jnp.bfloat16)),
            "count": jnp.int32(3), "rng": jnp.asarray([1, 2], jnp.uint32)}
    base = checksum(tree)
    assert len(base) == 16 and checksum(tree) == base
    assert checksum({"opt": {"mu": tree["opt"].mu, "nu": tree["opt"].nu}, "count": tree["count"],
                     "rng": tree["rng"]}) == base
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("d",))
    sharded = jax.device_put(tree["opt"].mu, jax.NamedSharding(mesh, jax.sharding.PartitionSpec("d")))
    assert checksum({**tree, "opt": Pair(sharded, tree["opt"].nu)}) == base

    def flipped(x, i, bit):
        flat = np.array(x).reshape(-1).view(np.uint8 if x.dtype.itemsize == 1 else f"uint{8 * x.dtype.itemsize}")
        flat[i] ^= 1 << bit
        return jnp.asarray(flat.view(x.dtype).reshape(x.shape))

    digests = {base}
    for i, bit in ((0, 0), (17, 31), (29, 12)):
        digests.add(checksum({**tree, "opt": Pair(flipped(tree["opt"].mu, i, bit), tree["opt"].nu)}))
    digests.add(checksum({**tree, "opt": Pair(tree["opt"].mu, flipped(tree["opt"].nu, 3, 15))}))
    digests.add(checksum({**tree, "count": jnp.int32(4)}))
    digests.add(checksum({**tree, "rng": tree["rng"][::-1]}))  # the same elements, swapped
    digests.add(checksum({**tree, "rng": tree["rng"].astype(jnp.int32)}))  # the same bits, another dtype
    digests.add(checksum({**tree, "opt": Pair(tree["opt"].mu.reshape(5, 6), tree["opt"].nu)}))
    assert len(digests) == 9


# --------------------------------------------------------------------------------------- damaged checkpoints


def scripted_val(monkeypatch, val: dict):
    """Evaluations give these val losses (by iteration), so that which saves happen is known."""
    monkeypatch.setattr(Run, "estimate_loss", lambda self, params, it: {"train": 9.0, "val": val[it]})


@pytest.fixture(scope="module")
def small_run(char_data, tmp_path_factory):
    """A 4-iteration run, evaluated every 2: best at 2, latest at 4. (cfg, out_dir)."""
    data_dir, _ = char_data
    out = tmp_path_factory.mktemp("small_run")
    cfg = tiny_cfg(data_dir, out, **TINY, eval_interval=2, max_iters=4)
    with pytest.MonkeyPatch.context() as mp:
        scripted_val(mp, {0: 4.0, 2: 3.0, 4: 3.5})
        train(cfg, log=quiet)
    return cfg, out


def biggest_data_file(step_dir: Path) -> Path:
    return max((step_dir / "params").rglob("d/*"), key=lambda p: p.stat().st_size)


def truncate(step_dir):
    path = biggest_data_file(step_dir)
    os.truncate(path, path.stat().st_size // 3)


def truncate_all(step_dir):
    for path in (step_dir / "params").rglob("d/*"):
        os.truncate(path, path.stat().st_size // 4)


def flip_64_bytes(step_dir):
    path = biggest_data_file(step_dir)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    path.write_bytes(bytes(data))


def delete_manifest(step_dir):
    (step_dir / "params" / "manifest.ocdbt").unlink()


def empty_record(step_dir):
    (step_dir / "record" / "metadata").write_bytes(b"")


DAMAGES = {"truncated": (truncate, "truncated, garbled or incomplete"),
           "all truncated": (truncate_all, "truncated, garbled or incomplete"),
           "64 bytes flipped": (flip_64_bytes, "checksum mismatch"),
           "manifest deleted": (delete_manifest, "truncated, garbled or incomplete"),
           "empty record": (empty_record, "truncated, garbled or incomplete")}


def damaged_copy(small_run, tmp_path, damage) -> tuple[Path, Path]:
    """A copy of the small run with its latest checkpoint damaged: (out_dir, the damaged folder)."""
    _, out = small_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    step_dir = next((copy / "checkpoints" / "latest").glob("[0-9]*"))
    DAMAGES[damage][0](step_dir)
    return copy, step_dir


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_sample_names_a_damaged_checkpoint_and_offers_best(small_run, tmp_path, run_cli, damage):
    """Each damage, found by reading or by the checksum: `sample` prints one line naming the folder and
    offering the intact best checkpoint; with --checkpoint=best it samples."""
    copy, step_dir = damaged_copy(small_run, tmp_path, damage)
    code, out, err = run_cli("sample", f"--out_dir={copy}", "--num_samples=1", "--max_new_tokens=3")
    assert_one_error_line(code, out, err, f"the latest checkpoint {step_dir} cannot be used", DAMAGES[damage][1],
                          "the best checkpoint (iteration 2) is intact: use it with --checkpoint=best")
    code, out, err = run_cli("sample", f"--out_dir={copy}", "--num_samples=1", "--max_new_tokens=3",
                             "--checkpoint=best")
    assert code == 0 and out.endswith("---------------\n"), err


def test_eval_and_convert_refuse_a_damaged_checkpoint(small_run, tmp_path, run_cli):
    """`eval` and `convert` (export) print the same line and write nothing."""
    copy, step_dir = damaged_copy(small_run, tmp_path, "64 bytes flipped")
    for args in (("eval", "--eval_iters=1"), ("convert", f"--hf_dir={tmp_path / 'hf'}")):
        code, out, err = run_cli(*args, f"--out_dir={copy}")
        assert_one_error_line(code, out, err, f"the latest checkpoint {step_dir} cannot be used", "checksum mismatch")
    assert not (tmp_path / "hf").exists()


@pytest.mark.slow
def test_resume_refuses_a_damaged_latest_then_resumes_from_best(small_run, tmp_path, run_cli):
    """`train --init_from=resume` on a truncated latest (iteration 4): one line offering best (iteration 2); with
    --checkpoint=best it sets the damaged latest aside, continues from iteration 2 with best's state (its first
    loss equals the original run's at 2, bit for bit) and saves latest at 4 again."""
    cfg, out = small_run
    copy, step_dir = damaged_copy(small_run, tmp_path, "truncated")
    args = ["train", *options(dataclasses.replace(cfg, out_dir=str(copy))), "--init_from=resume"]
    code, stdout, err = run_cli(*args)
    assert_one_error_line(code, stdout, err, f"the latest checkpoint {step_dir} cannot be used",
                          "--init_from=resume --checkpoint=best")
    code, stdout, err = run_cli(*args, "--checkpoint=best")
    assert code == 0, err
    aside = copy / "checkpoints" / "set_aside" / "latest_4"
    assert f"resuming from the best checkpoint (iteration 2): moved the later latest checkpoint to {aside}" in stdout
    assert aside.is_dir() and load_run(str(copy))[2].iter_num == 4

    def losses(run):
        return {m["iter"]: m["loss"] for m in read_metrics(str(run)) if "loss" in m}

    assert losses(copy)[2] == losses(out)[2] and sorted(losses(copy)) == [0, 1, 2, 3]


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["manifest deleted", "all truncated"])
def test_a_subprocess_prints_one_line_for_a_damaged_checkpoint(small_run, tmp_path, damage):
    """The real command, where orbax's thread logs, tensorstore's late callbacks and orbax's abandoned read
    coroutines would print: one line."""
    copy, step_dir = damaged_copy(small_run, tmp_path, damage)
    proc = subprocess.run([sys.executable, "-m", "nanogpt_jax.cli", "sample", f"--out_dir={copy}",
                           "--checkpoint=latest"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert_one_error_line(proc.returncode, proc.stdout, proc.stderr, f"the latest checkpoint {step_dir} cannot be used")


# ------------------------------------------------------------------------------------------- failed writes


def test_asyncio_reports_of_orbax_reads_left_unawaited_are_dropped(tmp_path, caplog):
    """A failed restore abandons orbax's other read tasks and tensorstore's read futures; those that finish
    before the process exits are logged by asyncio when collected ('Task/Future exception was never
    retrieved'), after the one error line. The command line drops them, and only them: the same failure raised
    outside orbax, or a future's error that is not tensorstore's, is still logged. The test reads only its own
    records (marked): an earlier test's abandoned read may be collected in its window."""
    quiet_orbax_failures()
    mark = f"mark-{os.getpid()}-{id(tmp_path)}"

    def abandoned_failure(filename):
        code = compile(f"async def read():\n    raise ValueError('truncated {mark}')\n", filename, "exec")
        namespace = {}
        exec(code, namespace)

        async def start_and_leave():
            asyncio.ensure_future(namespace["read"]())
            await asyncio.sleep(0)

        asyncio.run(start_and_leave())
        gc.collect()

    def abandoned_future(error, raised=False):  # raised=False: set from tensorstore's thread, as it sets them
        exc = ValueError(f"{error} {mark}")
        if raised:
            try:
                raise exc
            except ValueError:
                pass

        async def start_and_leave():
            asyncio.get_running_loop().create_future().set_exception(exc)

        asyncio.run(start_and_leave())
        gc.collect()

    def ours():
        return [r.getMessage().splitlines()[0] for r in caplog.records if mark in r.getMessage()]

    with caplog.at_level("ERROR", logger="asyncio"):
        abandoned_failure(f"{ORBAX_DIR}/_src/serialization/serialization.py")
        abandoned_future('NOT_FOUND: Error opening "zarr" driver [tensorstore_spec[1]=\'{}\']')
        abandoned_future('OUT_OF_RANGE: Error reading "wte.embedding/0.0" in OCDBT database at local file '
                         '"/run/checkpoints/latest/4/params/": Requested byte range [6723, 10606) is not '
                         'valid for value of size 4280')  # as a CI run printed it
        assert ours() == []
        abandoned_failure(str(tmp_path / "elsewhere.py"))
        abandoned_future("truncated")
        abandoned_future("truncated: NOT_FOUND: in the middle is not a status")
        abandoned_future("NOT_FOUND: raised in Python, not set by tensorstore", raised=True)
    assert ours() == ["Task exception was never retrieved"] + ["Future exception was never retrieved"] * 3


def test_the_library_leaves_logging_and_the_unraisable_hook_alone(tmp_path):
    """Importing the package and making a Checkpointer change no process-wide hook or logger: only the command
    line (the program that owns the process) installs the orbax filters."""
    code = ("import logging, sys\n"
            "hook = sys.unraisablehook\n"
            "from nanogpt_jax.checkpoint import Checkpointer\n"
            f"Checkpointer({str(tmp_path / 'run')!r}).close()\n"
            "assert sys.unraisablehook is hook, 'unraisablehook replaced'\n"
            "assert not logging.getLogger('absl').filters and not logging.getLogger('asyncio').filters\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr


@pytest.mark.slow
def test_a_write_error_during_a_save_keeps_the_previous_checkpoint(char_data, tmp_path, run_cli, monkeypatch):
    """Disk full (simulated: the record's write raises ENOSPC inside orbax's temporary folder, after the arrays
    are written): one line naming the save and the kept checkpoint, no temporary folder left, and the run
    resumes from the previous checkpoint."""
    data_dir, _ = char_data
    cfg = tiny_cfg(data_dir, tmp_path, **TINY, eval_interval=2, max_iters=4)
    original = ocp.JsonCheckpointHandler._save_fn
    seen = []

    async def full_disk(self, x, directory):
        if x["iter_num"] == 4:
            seen.append(directory)
            assert ".orbax-checkpoint-tmp" in str(directory)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        await original(self, x, directory)

    monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", full_disk)
    code, out, err = run_cli("train", *options(cfg))
    assert seen
    assert_one_error_line(code, "", err, "could not write the latest checkpoint at iteration 4",
                          "(No space left on device)", "the latest checkpoint (iteration 2) is kept")
    assert list((tmp_path / "checkpoints").rglob("*orbax-checkpoint-tmp*")) == []
    assert not (tmp_path / ".lock").exists()
    monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", original)
    code, out, err = run_cli("train", *options(cfg), "--init_from=resume")
    assert code == 0, err
    assert load_run(str(tmp_path))[2].iter_num == 4


# ------------------------------------------------------------------------------------ kills between saves


@pytest.mark.slow
def test_a_kill_between_the_latest_and_best_saves_is_repaired_on_resume(char_data, tmp_path, monkeypatch):
    """The run dies after `latest` is written and before `best` is: best is behind its record. Resuming saves
    best again from latest (the same state), so best holds the record's best iteration."""
    data_dir, _ = char_data
    cfg = tiny_cfg(data_dir, tmp_path, **TINY, eval_interval=2, max_iters=4)
    scripted_val(monkeypatch, {0: 4.0, 2: 3.0, 4: 2.5})
    original = Checkpointer.save
    saves = []

    def dying_save(self, kind, iter_num, *args):
        if kind == "best" and iter_num == 4:
            raise KeyboardInterrupt  # the process is gone; the latest save in flight completes (orbax's commit)
        saves.append((kind, iter_num))
        return original(self, kind, iter_num, *args)

    monkeypatch.setattr(Checkpointer, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, log=quiet)
    assert saves == [("latest", 2), ("best", 2), ("latest", 4)]
    _, latest_params, record = load_run(str(tmp_path))
    assert (record.iter_num, record.best_iter, record.best_val_loss) == (4, 4, 2.5)
    assert load_run(str(tmp_path), "best")[2].iter_num == 2  # stale

    monkeypatch.setattr(Checkpointer, "save", original)
    logs = []
    train(tiny_cfg(data_dir, tmp_path, **TINY, eval_interval=2, max_iters=4, init_from="resume"), log=logs.append)
    assert "saved the best checkpoint of iteration 4 again: the run had stopped between its latest and best " \
           "saves" in logs
    _, best_params, best_record = load_run(str(tmp_path), "best")
    assert (best_record.iter_num, best_record.best_val_loss) == (4, 2.5)
    assert_trees_equal(best_params, latest_params)


@pytest.mark.slow
def test_the_last_iteration_is_saved_when_eval_interval_passes_it(char_data, tmp_path):
    """eval_interval > max_iters: the last iteration is evaluated and saved, and the log says why."""
    data_dir, _ = char_data
    logs = []
    train(tiny_cfg(data_dir, tmp_path, **TINY, eval_interval=100, max_iters=3), log=logs.append)
    assert "iteration 3 is the last (max_iters): evaluating and saving it, though eval_interval=100 does not " \
           "fall on it" in logs
    assert load_run(str(tmp_path))[2].iter_num == 3
    assert [m["iter"] for m in read_metrics(tmp_path) if "val_loss" in m] == [0, 3]


# -------------------------------------------------------------------------------------------------- SIGKILL


def complete_steps(out_dir) -> list[int]:
    """The iterations of the complete `latest` checkpoints (orbax renames a save's folder to its number last)."""
    return sorted(int(p.name) for p in (Path(out_dir) / "checkpoints" / "latest").glob("*") if p.name.isdigit())


@pytest.mark.slow
def test_sigkill_at_any_moment_resumes_from_a_complete_checkpoint(char_data, tmp_path):
    """A checkpoint every iteration; SIGKILL in the middle of a save (a temporary folder is on disk), then at
    a random moment, each run resuming the one before: each starts from the newest complete
    checkpoint (its checksums verified), the temporary folders are cleared, and the last run reaches max_iters
    with one history in metrics.jsonl."""
    data_dir, _ = char_data
    cfg = tiny_cfg(data_dir, tmp_path, **TINY, eval_interval=1, max_iters=20)
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "nanogpt_jax.cli", "train", *options(cfg)]
    tmp_dirs = (tmp_path / "checkpoints").glob
    newest = None  # the iteration the next run must start from
    for moment in ("mid-save", random.Random(1), "finish"):
        resume = [] if newest is None else ["--init_from=resume"]
        proc = subprocess.Popen(command + resume, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if moment == "finish":
            stdout, stderr = proc.communicate(timeout=120)
            assert proc.returncode == 0, stderr
        else:
            start, deadline = complete_steps(tmp_path), time.monotonic() + 120
            while time.monotonic() < deadline and complete_steps(tmp_path) == start:
                time.sleep(0.005)  # until this process has saved once: it is training
            if moment == "mid-save":
                while time.monotonic() < deadline and not list(tmp_dirs("*/*orbax-checkpoint-tmp*")):
                    time.sleep(0.0005)
                assert list(tmp_dirs("*/*orbax-checkpoint-tmp*")), "no save was caught in flight"
            else:
                time.sleep(moment.uniform(0.0, 0.3))
            proc.send_signal(signal.SIGKILL)
            stdout, stderr = proc.communicate(timeout=30)
            assert proc.returncode == -signal.SIGKILL, stderr
        if newest is not None:
            first_eval = next(line for line in stdout.splitlines() if line.startswith("step "))
            assert first_eval.startswith(f"step {newest}: train loss"), stdout
        newest = complete_steps(tmp_path)[-1]
    assert complete_steps(tmp_path) == [20] and list(tmp_dirs("*/*orbax-checkpoint-tmp*")) == []
    assert [m["iter"] for m in read_metrics(str(tmp_path)) if "loss" in m] == list(range(20))
