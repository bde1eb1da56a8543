"""What controls a training run from outside it: the out_dir lock that keeps a second run out, and stop
requests (SIGTERM / SIGINT, a pod's preemption) that the loop answers by saving and returning."""

import os
import signal
import socket
import threading
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
    """Another training writes to this out_dir."""


class RunLock:
    """out_dir/.lock holding 'PID HOST' while a training runs there; a lock whose process is gone (same host)
    is stale and taken over."""

    def __init__(self, out_dir: Path):
        self.path, self.mine = out_dir / ".lock", f"{os.getpid()} {socket.gethostname()}"
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                if self._held():
                    raise
                self.path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as f:
                f.write(self.mine + "\n")
            return
        raise RunLockedError(f"could not lock {self.path}: another training is starting there")

    def _held(self) -> bool:
        try:
            pid, _, host = self.path.read_text().strip().partition(" ")
            pid = int(pid)
        except (OSError, ValueError):
            return False  # unreadable or half-written: treated as stale
        if host and host != socket.gethostname():
            raise RunLockedError(f"{self.path.parent} is in use by training process {pid} on {host}: use another "
                                 f"--out_dir, or delete {self.path} if that run is over")
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # alive, someone else's
        raise RunLockedError(f"{self.path.parent} is in use by training process {pid}: wait for it, stop it, "
                             f"or use another --out_dir")

    def release(self) -> None:
        try:
            if self.path.read_text().strip() == self.mine:
                self.path.unlink()
        except OSError:
            pass
