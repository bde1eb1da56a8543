"""Joining the other processes of a multi-process run, and noticing when one of them is gone.

Left to itself, jax.distributed ends such a run in C++: a peer that never joins aborts every waiting
process after its initialization timeout, and a peer that dies mid-run aborts the others once its
heartbeats stop (a `Check failure` stack, exit 134, no word of what to do). Nothing in Python can catch
that abort, so two watchdogs act before it: one on the start-up, and one on a heartbeat of our own kept in
the coordinator's key-value store, each ending the process with one `error:` line and exit 2. JAX's own
timeouts are set further out, as a backstop.

One abort comes first whatever we do: when process 0 dies, JAX ends every other process within a second
(its service's connection drops). For that case each other process starts a small watcher process, which
outlives it and says in one line, after JAX's stack, what happened."""

import atexit
import inspect
import os
import socket
import subprocess
import sys
import threading
import time

import jax
from jax._src import distributed  # JAX has no public handle on its key-value store (orbax reads it so)

BEAT = 1.0  # seconds between our heartbeats
PREFIX = "nanogpt_jax/alive/"
FAILED = "nanogpt_jax/failed/"  # process -> the error it stopped on

_watcher = None  # the watcher process of a non-coordinator
_watching = None  # the heartbeat timeout, once `watch` runs


def _done() -> None:
    if _watcher is not None:
        try:
            _watcher.stdin.write("done\n")
            _watcher.stdin.flush()
        except OSError:
            pass


def _fail(message: str) -> None:
    """One line, then exit 2 at once: the main thread may be blocked inside a collective or in connect."""
    _done()
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(2)


def _answers(address: str) -> bool:
    """Whether something accepts connections at HOST:PORT (the coordinator's service, once process 0 is up)."""
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=2).close()
        return True
    except (OSError, ValueError):
        return False


# Reads its parent's pipe until the parent says "done" or dies; a parent gone unannounced while the coordinator
# no longer answers was ended by JAX's abort (or killed along with process 0). Plain Python: no jax to load.
WATCHER = """
if sys.stdin.readline() != "done\\n" and not _answers(sys.argv[1]):
    print(f"error: process {sys.argv[2]}: the coordinator (process 0 at {sys.argv[1]}) is gone (killed, or its "
          "machine is down), and JAX ended this process too (the lines above). Start all processes again "
          "with --init_from=resume", file=sys.stderr, flush=True)
"""


def _start_watcher(address: str, me: str) -> None:
    global _watcher
    code = f"import socket, sys\n{inspect.getsource(_answers)}{WATCHER}"
    _watcher = subprocess.Popen([sys.executable, "-c", code, address, me], stdin=subprocess.PIPE, text=True,
                                start_new_session=True)  # a Ctrl-C to the run's process group spares it
    atexit.register(_done)


def _missing_words(address: str, n: int, me: int, timeout: int) -> str:
    others = [p for p in range(n) if p != me]
    if me == 0:
        who = f"process {others[0]}" if n == 2 else f"at least one of processes {others[0]}..{others[-1]}"
        return (f"{who} did not join the run at {address} within {timeout} s (this is process 0 of {n}): start "
                f"every process with the same --coordinator_address and --num_processes, or raise "
                f"--initialization_timeout")
    if not _answers(address):
        return (f"process {me} of {n}: nothing answered at {address} within {timeout} s: process 0 (the "
                "coordinator) is not running there; start it, or check --coordinator_address")
    return (f"process {me} of {n}: process 0 answers at {address}, but not all {n} processes joined within "
            f"{timeout} s: start the missing ones, or raise --initialization_timeout")


def join(address: str | None, n: int | None, me: int | None, timeout: int, heartbeat: int) -> None:
    """jax.distributed.initialize, said at start and ended in one line when the others do not all join in
    `timeout` seconds; then watch the others' heartbeats (see `watch`)."""
    where = address or "the coordinator the cluster names"
    if me == 0:
        print(f"waiting up to {timeout} s for {n} processes at {where} (this is process 0, the coordinator)",
              file=sys.stderr, flush=True)
    else:  # under a cluster launcher, JAX learns this process's index only as it joins
        print(f"process {'?' if me is None else me} of {n or '?'}: joining the run at {where} (waiting up to "
              f"{timeout} s)", file=sys.stderr, flush=True)
    words = (_missing_words(address, n, me, timeout) if None not in (address, n, me) else
             f"the processes did not all join at {where} within {timeout} s: raise --initialization_timeout, or "
             "check that every process was started")
    alarm = threading.Timer(timeout, _fail, (words,))
    alarm.daemon = True
    alarm.start()
    # JAX's own limits sit beyond ours, so that its abort never comes first
    jax.distributed.initialize(address, n, me, initialization_timeout=timeout + 30,
                               heartbeat_timeout_seconds=2 * heartbeat + 30)
    alarm.cancel()
    if jax.process_index() != 0 and address is not None:
        _start_watcher(address, f"{jax.process_index()} of {jax.process_count()}")
    watch(jax.process_index(), jax.process_count(), heartbeat, address or "the coordinator")


def watch(me: int, n: int, timeout: int, address: str) -> None:
    """From a daemon thread, every BEAT seconds: count up this process's key in the coordinator's key-value
    store and read the others'. A peer whose count has not moved for `timeout` seconds, or a coordinator that
    stops answering, ends this process with one line. The beat goes on while the process exits: JAX's
    shutdown holds every process at a barrier until all arrive, so a peer that is done is not taken for dead,
    and one that died is still noticed; once past the barrier the store is gone and the thread stops."""
    global _watching
    client, exiting = distributed.global_state.client, threading.Event()
    atexit.register(exiting.set)  # runs before JAX's own shutdown, registered when jax was imported
    _watching = timeout
    threading.Thread(target=_beat, args=(client, me, n, timeout, address, exiting), daemon=True).start()


def _beat(client, me, n, timeout, address, exiting) -> None:
    changed = {p: (None, time.monotonic()) for p in range(n) if p != me}  # peer -> (its count, when it moved)
    count = 0
    while True:
        time.sleep(BEAT)
        count += 1
        try:
            client.key_value_set(f"{PREFIX}{me}", str(count), allow_overwrite=True)
            counts = {int(k.rsplit("/", 1)[1]): v for k, v in client.key_value_dir_get(PREFIX)}
            failed = {int(k.rsplit("/", 1)[1]): v for k, v in client.key_value_dir_get(FAILED)}
        except Exception:  # noqa: BLE001 -- any failure here means the coordinator is unreachable
            if exiting.is_set():
                return
            _fail(f"process {me} of {n}: the coordinator (process 0 at {address}) stopped answering: it was "
                  "killed or its machine is down; this process stops too. Start all processes again with "
                  "--init_from=resume")
        for p, why in sorted(failed.items()):
            if p != me:
                _fail(f"process {p} of {n} stopped on an error ({why}); process {me} stops too. Fix it and start "
                      "all processes again with --init_from=resume")
        now = time.monotonic()
        for p, (last, since) in changed.items():
            if counts.get(p) != last:
                changed[p] = (counts.get(p), now)
        silent = sorted(p for p, (_, since) in changed.items() if now - since > timeout)
        if silent:
            _fail(f"process {', '.join(map(str, silent))} of {n} sent no heartbeat for {timeout} s: it was killed "
                  f"or its machine is down; process {me} stops too. Start all processes again with "
                  "--init_from=resume")


def stop_on_error(message: str) -> None:
    """This process of a multi-process run stops on an error of its own (a UserError): it tells the others
    through the store (their heartbeat threads then end them with one line naming it), says it, and exits 2
    without JAX's shutdown barrier, where it would wait for peers that wait for its part of their next step.
    The coordinator waits a few beats first, so that the others read the store before it is gone. Alone, or
    before joining: returns, and the caller says the error as usual."""
    if _watching is None:
        return
    me = jax.process_index()
    try:
        distributed.global_state.client.key_value_set(f"{FAILED}{me}", message, allow_overwrite=True)
    except Exception:  # noqa: BLE001 -- the coordinator is gone: the others learn it from JAX or the heartbeat
        pass
    if me == 0:
        time.sleep(3 * BEAT)
    _fail(message)


def collective_failed(error: Exception) -> None:
    """A step across processes raised (gloo sees a dead peer's socket close before any heartbeat is missed):
    leave the heartbeat watchdog time to name the process that is gone; if all still beat, say what failed.
    Either way one line and exit 2, never the shutdown barrier that would wait for a dead process."""
    if _watching is None:
        raise error
    time.sleep(_watching + 3 * BEAT)
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    _fail(f"process {jax.process_index()} of {jax.process_count()}: a step across the processes failed, every "
          f"process still answering ({first}); start all processes again with --init_from=resume")
