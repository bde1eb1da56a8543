"""The folder lock (control.RunLock) of `train` and `prepare`: of any number of simultaneous starts exactly one
holds it and every other is refused with one line naming the holder; a holder that is gone is taken over, a
live one never; a lock that names another host needs --force_unlock. A failed start leaves nothing behind."""

import contextlib
import multiprocessing
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from conftest import assert_one_error_line, read_metrics
from nanogpt_jax.control import RunLock, RunLockedError

N, ROUNDS = 8, 20


def _racer(root, start, done, results):
    """One of N processes: in each round, wait for all at the barrier, try to lock the round's new folder,
    report, and let go only once every process has tried."""
    for r in range(ROUNDS):
        start.wait()
        try:
            lock, said = RunLock(Path(root) / f"round{r}" / "out"), None
        except RunLockedError as e:
            lock, said = None, str(e)
        results.put((r, os.getpid(), said))
        done.wait()
        if lock is not None:
            lock.release()


def test_of_n_simultaneous_starts_exactly_one_holds_the_lock_every_round(tmp_path):
    """8 processes released together from a barrier into a folder that does not exist yet, 20 rounds:
    one wins each round, the 7 others are refused naming the winner's pid, and the winner's release leaves
    no lock behind."""
    # Forked: a spawned racer would import the package (and JAX) first, 8 times over. The racers run only
    # Python and the OS's calls, never JAX, so JAX's warning about forking its threads does not apply.
    ctx = multiprocessing.get_context("fork")
    start, done, results = ctx.Barrier(N), ctx.Barrier(N), ctx.Queue()
    procs = [ctx.Process(target=_racer, args=(str(tmp_path), start, done, results)) for _ in range(N)]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "os.fork", RuntimeWarning)
        for p in procs:
            p.start()
    try:
        got = [results.get(timeout=120) for _ in range(N * ROUNDS)]
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    for r in range(ROUNDS):
        this = [(pid, said) for rr, pid, said in got if rr == r]
        winners = [pid for pid, said in this if said is None]
        assert len(this) == N and len(winners) == 1, (r, this)
        for pid, said in this:
            if said is not None:
                assert said == (f"{tmp_path / f'round{r}' / 'out'} is in use by training process {winners[0]}: "
                                "wait for it, stop it, or use another --out_dir"), said
    assert all(p.exitcode == 0 for p in procs)
    assert list(tmp_path.rglob(".lock")) == []  # each winner removed its lock


def test_a_lock_naming_a_live_process_is_kept_a_dead_ones_taken_over(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    lock = folder / ".lock"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(f"{other.pid} {socket.gethostname()}\n")  # no flock: an older version's lock, say
        with pytest.raises(RunLockedError, match=f"in use by training process {other.pid} .*--force_unlock"):
            RunLock(folder)
        assert lock.read_text() == f"{other.pid} {socket.gethostname()}\n"
    finally:
        other.kill()
        other.wait()
    held = RunLock(folder)  # its process is gone: stale
    assert lock.read_text() == f"{os.getpid()} {socket.gethostname()}\n"
    held.release()
    assert not lock.exists() and folder.is_dir()  # the folder was there before: kept


def test_another_hosts_lock_needs_force_unlock(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / ".lock").write_text("4242 some-other-host\n")
    with pytest.raises(RunLockedError, match="in use by training process 4242 on some-other-host .*--force_unlock"):
        RunLock(folder)
    held = RunLock(folder, force=True)
    assert (folder / ".lock").read_text() == f"{os.getpid()} {socket.gethostname()}\n"
    held.release()


@contextlib.contextmanager
def held(folder: Path, *args):
    """A subprocess holding RunLock(folder, *args) until the block ends; yields its pid."""
    code = ("import sys; from pathlib import Path; from nanogpt_jax.control import RunLock; "
            "RunLock(Path(sys.argv[1]), *sys.argv[2:]); print('held', flush=True); sys.stdin.read()")
    with subprocess.Popen([sys.executable, "-c", code, str(folder), *args], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu")) as holder:
        try:
            assert holder.stdout.readline() == "held\n"
            yield holder.pid
        finally:
            holder.kill()


def test_a_held_lock_cannot_be_forced(tmp_path):
    """force_unlock takes over a file nobody holds, never a lock a live process holds."""
    with held(tmp_path / "out") as pid:
        with pytest.raises(RunLockedError, match=f"in use by prepare process {pid}: wait for it, stop it, "
                                                 "or prepare elsewhere$"):
            RunLock(tmp_path / "out", "prepare", "prepare elsewhere", force=True)
    RunLock(tmp_path / "out").release()  # killed: the kernel let go of its flock, and its name is of a dead pid


def test_prepare_into_a_dataset_folder_in_use_is_refused(tmp_path, run_cli):
    """A second `prepare text --name=X` while one runs: one line naming it, and the folder left as it is."""
    (tmp_path / "a.txt").write_text("some text to tokenize " * 50)
    args = ("prepare", "text", f"--input={tmp_path / 'a.txt'}", "--name=mine", f"--data_dir={tmp_path / 'data'}",
            "--tokenizer=char")
    with held(tmp_path / "data" / "mine", "prepare") as pid:
        code, out, err = run_cli(*args)
        assert_one_error_line(code, out, err, f"{tmp_path / 'data' / 'mine'} is in use by prepare process {pid}: "
                                              "wait for it, stop it, or prepare into another --name or --data_dir")
        assert [p.name for p in (tmp_path / "data").iterdir()] == ["mine"]
        assert [p.name for p in (tmp_path / "data" / "mine").iterdir()] == [".lock"]
    code, out, err = run_cli(*args)  # its holder is gone
    assert code == 0 and out.startswith(f"wrote {tmp_path / 'data' / 'mine'}"), err
    assert not (tmp_path / "data" / "mine" / ".lock").exists()


def test_a_failed_prepare_or_train_leaves_no_folder(tmp_path, run_cli):
    """The lock made the folders: a start refused after it (no such input, no such dataset) removes them."""
    code, out, err = run_cli("prepare", "text", f"--input={tmp_path / 'nothing'}", "--name=mine",
                             f"--data_dir={tmp_path / 'data'}")
    assert_one_error_line(code, out, err, "no such file or folder")
    code, out, err = run_cli("train", "--dataset=nothing", f"--data_dir={tmp_path / 'data'}",
                             f"--out_dir={tmp_path / 'runs' / 'out'}")
    assert code == 2 and err.startswith("error: "), err
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "made").mkdir()  # a folder that was there before is kept, empty as it was
    code, out, err = run_cli("train", "--dataset=nothing", f"--data_dir={tmp_path / 'data'}",
                             f"--out_dir={tmp_path / 'made'}")
    assert code == 2 and list(tmp_path.iterdir()) == [tmp_path / "made"] and not any((tmp_path / "made").iterdir())


TINY = ["--dataset=shakespeare_char", "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32",
        "--batch_size=4", "--gradient_accumulation_steps=1", "--eval_iters=2", "--log_interval=1",
        "--max_iters=6", "--eval_interval=3", "--dtype=float32"]


@pytest.mark.slow
def test_three_trains_started_at_once_into_a_new_out_dir(char_data, tmp_path):
    """One trains; the others print one line naming it and exit 2; metrics.jsonl holds one run."""
    data_dir, _ = char_data
    out = tmp_path / "out"
    procs = [subprocess.Popen([sys.executable, "-m", "nanogpt_jax.cli", "train", *TINY, f"--data_dir={data_dir}",
                               f"--out_dir={out}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ, JAX_PLATFORMS="cpu")) for _ in range(3)]
    results = [(p.pid, *p.communicate(timeout=300)) for p in procs]
    results = [(pid, p.returncode, stdout, stderr) for p, (pid, stdout, stderr) in zip(procs, results)]
    winners = [pid for pid, code, _, _ in results if code == 0]
    assert len(winners) == 1, results
    for pid, code, stdout, stderr in results:
        if pid != winners[0]:
            assert_one_error_line(code, stdout, stderr, f"{out} is in use by training process {winners[0]}")
    iters = [m["iter"] for m in read_metrics(out) if "loss" in m]
    assert iters == list(range(6)), iters
