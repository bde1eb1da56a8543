"""What controls a training run from outside it: the out_dir lock that keeps a second run out, and stop
requests (SIGTERM / SIGINT, a pod's preemption) that the loop answers by saving and returning."""

import contextlib
import fcntl
import os
import signal
import socket
import threading
import time
from pathlib import Path

import jax

from . import parallel
from .config import UserError


class StopRequest:
    """SIGTERM / SIGINT while training: the loop finishes its step, saves `latest` and returns. A second
    SIGINT interrupts at once (KeyboardInterrupt). In a multi-process run (a TPU pod is preempted with
    SIGTERM, possibly on one host only) JAX's preemption service catches SIGTERM instead, and every
    process stops after the same step (parallel.preemption_reached)."""

    def __init__(self):
        self.signal, self._previous = None, {}
        self.processes = jax.process_count()
        if threading.current_thread() is not threading.main_thread() or self.processes > 1:
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def after(self, iter_num: int) -> bool:
        """Stop now that iteration iter_num is done? Every process asks at every iteration."""
        if self.processes > 1 and parallel.preemption_reached(iter_num):
            self.signal = "SIGTERM"
        return self.signal is not None

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class RunLockedError(UserError):
    """Another process writes to this folder (a training to its out_dir, a prepare to its dataset)."""


class RunLock:
    """DIR/.lock, held with flock for the holder's life and naming it ('PID HOST'). The kernel lets one of
    any number of simultaneous starts hold it, and releases it when the holder dies however it dies. The name
    is only trusted to refuse: a file naming a live process of this host (pid reused, or a run of a version
    without flock) or any process of another host (whose flock a network filesystem may not show here) is
    refused unless force; one naming a dead process of this host is stale and taken over."""

    def __init__(self, folder: Path, what: str = "training", advice: str = "use another --out_dir",
                 force: bool = False):
        self.path, self.what, self.advice = folder / ".lock", what, advice
        self.mine = f"{os.getpid()} {socket.gethostname()}"
        self.created, self._fd = _make_folder(folder), None
        try:
            self._fd = self._flock()
            owner = _read_owner(self._fd)
            if owner and not force and _maybe_alive(*owner):
                raise self._refusal(*owner, unlock=True)
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, (self.mine + "\n").encode(), 0)
        except BaseException:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            self._remove_created()
            raise

    def _flock(self) -> int:
        """A descriptor of the file now at self.path, flocked by this process."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise self._refusal(*self._holder()) from None
            try:
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)  # its holder released and removed it between our open and flock: try the new file

    def _holder(self) -> tuple:
        """(pid, host) of the process holding the flock. It writes its name just after taking the lock, so
        an empty file, or one still naming a dead process of this host, is read again for a moment."""
        owner = None
        for _ in range(200):
            try:
                with open(self.path, "rb") as f:
                    owner = _parse_owner(f.read())
            except FileNotFoundError:
                owner = None
            if owner and _maybe_alive(*owner):
                break
            time.sleep(0.01)
        return owner or (None, None)

    def _refusal(self, pid, host, unlock=False) -> RunLockedError:
        who = f"{self.what} process {pid}" if pid else f"a {self.what} process that has not written its name"
        where = f" on {host}" if host and host != socket.gethostname() else ""
        if unlock:
            return RunLockedError(f"{self.path.parent} is in use by {who}{where} (by its lock file {self.path}): "
                                  f"wait for it, stop it, or {self.advice}; if that process is not a {self.what} "
                                  "of this folder any more, pass --force_unlock=True")
        return RunLockedError(f"{self.path.parent} is in use by {who}{where}: wait for it, stop it, "
                              f"or {self.advice}")

    def release(self) -> None:
        """Remove the empty folders a failed start left (the folders themselves only if the lock created them) and
        the lock, then let go of the flock: a start that opened the file meanwhile finds it gone and retries."""
        if self._fd is None:
            return
        try:
            _remove_empty_folders(self.path.parent)
            self.path.unlink(missing_ok=True)
            self._remove_created()
        finally:
            os.close(self._fd)
            self._fd = None

    def _remove_created(self) -> None:
        for path in self.created:
            try:
                path.rmdir()  # only if empty
            except OSError:
                return


def _make_folder(folder: Path) -> list[Path]:
    """Create folder and its missing parents; returns those this call created, deepest first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    created = []
    for path in reversed(missing):
        try:
            path.mkdir()
            created.append(path)
        except FileExistsError:  # a racing start made it
            if not path.is_dir():
                raise
    return created[::-1]


def _remove_empty_folders(folder: Path) -> None:
    for path in sorted((p for p in folder.rglob("*") if p.is_dir() and not p.is_symlink()), reverse=True):
        with contextlib.suppress(OSError):
            path.rmdir()  # only if empty; deepest first


def _parse_owner(raw: bytes) -> tuple | None:
    pid, _, host = raw.decode("utf-8", "replace").strip().partition(" ")
    return (int(pid), host) if pid.isdigit() else None


def _read_owner(fd: int) -> tuple | None:
    return _parse_owner(os.pread(fd, 4096, 0))


def _maybe_alive(pid: int, host: str) -> bool:
    """False only when provably gone: a process of this host that no longer exists (or is this one)."""
    if host and host != socket.gethostname():
        return True
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, someone else's
    return True
