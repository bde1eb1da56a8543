"""Placement and scale-out: one layout on 1 device, a data-parallel mesh over 8, FSDP, pmap and two
jax.distributed processes see the same global batches, so they train alike; gradients are reduced once per
optimizer step; under FSDP each device holds only its shard; checkpoints move between layouts.

The device counts are XLA's fake host devices and real local processes, each in its own subprocess
(the count is fixed when JAX starts)."""

import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from conftest import read_metrics
from jax.sharding import PartitionSpec as P

from nanogpt_jax import load_checkpoint
from nanogpt_jax.parallel import leaf_spec

TINY = ["--dataset=shakespeare_char", "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32",
        "--batch_size=8", "--gradient_accumulation_steps=2", "--eval_iters=2", "--log_interval=1",
        "--learning_rate=1e-3", "--warmup_iters=2", "--lr_decay_iters=20", "--min_lr=1e-4", "--eval_interval=3"]


def run(args, cwd, devices, timeout=300):
    """`python -m nanogpt_jax.cli ARGS` with `devices` fake CPU devices; returns the finished process."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return subprocess.Popen([sys.executable, "-m", "nanogpt_jax.cli", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(proc, timeout=300):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return out


def losses(out_dir):
    """(per-iteration training losses, (iteration, val loss) of each evaluation) from metrics.jsonl."""
    m = read_metrics(out_dir)
    return [r["loss"] for r in m if "loss" in r], [(r["iter"], r["val_loss"]) for r in m if "val_loss" in r]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def layouts(tmp_path_factory, char_data):
    """Three optimizer steps of one config on 1 device, a mesh over 8, FSDP over 4 (mesh 2 x 4) and pmap
    over 8, each saved at iteration 3."""
    data_dir, _ = char_data
    cwd = tmp_path_factory.mktemp("layouts")
    variants = {"one": ["--num_devices=1"], "mesh": [], "fsdp": ["--fsdp=4"],
                "pmap": ["--parallel=pmap"]}
    outs = {}
    for name, extra in variants.items():  # one after the other: two cores
        outs[name] = finish(run(["train", *TINY, f"--data_dir={data_dir}", f"--out_dir={name}", "--max_iters=3",
                                 *extra], cwd, devices=8))
    return cwd, outs


@pytest.mark.slow
def test_every_layout_trains_like_one_device(layouts):
    cwd, outs = layouts
    assert "1 of 8 devices" in outs["one"] and "mesh data=8 x fsdp=1" in outs["mesh"]
    assert "mesh data=2 x fsdp=4" in outs["fsdp"] and "pmap data=8" in outs["pmap"]
    assert "1 row(s) per device x 2 micro-batch(es) per step" in outs["pmap"]
    ref_steps, ref_evals = losses(cwd / "one")
    _, ref_params = load_checkpoint(str(cwd / "one"))  # saved at iteration 3
    for name in ("mesh", "fsdp", "pmap"):
        steps, evals = losses(cwd / name)
        np.testing.assert_allclose(steps, ref_steps, rtol=1e-5, err_msg=name)
        np.testing.assert_allclose([v for _, v in evals], [v for _, v in ref_evals], rtol=1e-5)
        _, params = load_checkpoint(str(cwd / name))  # any layout's checkpoint loads on one device
        jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5), params,
                     ref_params)


@pytest.mark.slow
def test_an_fsdp_checkpoint_resumes_on_one_device(layouts, char_data):
    """Iteration 3 of the 8-device FSDP run, resumed on a single device, gives the loss of the one-device run
    resumed there."""
    cwd, _ = layouts
    data_dir, _ = char_data
    for name in ("fsdp", "one"):
        finish(run(["train", *TINY, f"--data_dir={data_dir}", f"--out_dir={name}", "--init_from=resume",
                    "--max_iters=4"], cwd, devices=1))
    assert losses(cwd / "fsdp")[0][3] == pytest.approx(losses(cwd / "one")[0][3], rel=1e-5)


PROBE = textwrap.dedent("""
    import re, sys
    from functools import partial
    import jax, jax.numpy as jnp
    from nanogpt_jax import parallel
    from nanogpt_jax.config import TrainConfig
    from nanogpt_jax.model import GPTConfig, init_params, make_model
    from nanogpt_jax.optim import OptimConfig, make_optimizer
    from nanogpt_jax.step import TrainState, accumulate_grads, train_step

    fsdp = int(sys.argv[1])
    config = GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32)
    model, tx = make_model(config), make_optimizer(OptimConfig.of(TrainConfig()))
    layout = parallel.plan(3, 8, 8, fsdp=fsdp)
    mesh, params = layout.mesh, init_params(config, jax.random.PRNGKey(0))
    shardings = parallel.state_shardings(mesh, TrainState(params, tx.init(params)))
    state = TrainState(jax.device_put(params, shardings.params),
                       jax.jit(tx.init, out_shardings=shardings.opt_state)(params))
    grads = parallel.per_device_grads(lambda gather: partial(accumulate_grads, model=make_model(config, gather)),
                                      mesh, parallel.state_specs(params, fsdp))
    step = jax.jit(partial(train_step, model=model, tx=tx, grads_fn=grads),
                   in_shardings=(shardings, parallel.batch_sharding(mesh, 1), parallel.replicated(mesh)),
                   out_shardings=(shardings, parallel.replicated(mesh)))
    x = jnp.zeros((3, 8, 16), jnp.int32)
    hlo = step.lower(state, (x, x), jax.random.PRNGKey(0)).compile().as_text()
    state, _ = step(state, (x, x), jax.random.PRNGKey(0))
    blocks = {b.split()[0].lstrip("%"): b for b in re.split(r"\\n(?=\\S.*\\{\\n)", hlo) if b.strip()}
    loops = {m.lstrip("%") for m in re.findall(r"body=(%?[\\w.\\-]+)", hlo)}
    in_loop = sum(len(re.findall(r"(all-reduce|reduce-scatter)(-start)?\\(", blocks[b])) for b in loops)
    total = len(re.findall(r"(all-reduce|reduce-scatter)(-start)?\\(", hlo))
    gathers_in_loops = sum(len(re.findall(r"all-gather(-start)?\\(", blocks[b])) for b in loops)
    gathered = re.findall(r"= \\(?(\\w+\\[[\\d,]*\\])[^=]*? all-gather(?:-start)?\\(", hlo)
    shard = lambda a: list(a.addressable_shards[0].data.shape)
    adam = state.opt_state[1][0]
    plans = [parallel.plan(*args, **kw) for args, kw in [((1, 12, 0), {}), ((4, 12, 0), {}), ((40, 12, 0), {}),
                                                          ((1, 12, 0), {"fsdp": 4}), ((1, 64, 8), {})]]
    print({"plans": [(p.devices, p.steps, p.rows) for p in plans], "loops": len(loops), "reductions_in_loops": in_loop,
           "reductions": total, "gathers_in_loops": gathers_in_loops, "gathered": sorted(set(gathered)),
           "c_fc": shard(state.params["h"]["mlp"]["c_fc"]["kernel"]),
           "c_fc_mu": shard(adam.mu["h"]["mlp"]["c_fc"]["kernel"]),
           "c_fc_nu": shard(adam.nu["h"]["mlp"]["c_fc"]["kernel"]),
           "wte": shard(state.params["wte"]["embedding"]),
           "ln_1": shard(state.params["h"]["ln_1"]["scale"])})
""")


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [1, 4])
def test_gradients_are_reduced_once_per_step_and_fsdp_shards(fsdp, tmp_path):
    """With 3 micro-batches and data parallelism, the compiled step's loops hold no all-reduce or
    reduce-scatter: each device accumulates its own rows' gradients and they are reduced once, after the loop.
    Under --fsdp=4 every device holds a quarter of each matrix and of its AdamW moments (vectors stay whole),
    and the blocks' weights are gathered inside the loops one layer at a time: no all-gather in the program
    yields a stacked (2-layer) leaf."""
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.run([sys.executable, str(script), str(fsdp)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    probe = eval(proc.stdout.strip().splitlines()[-1])  # a dict literal printed by the probe
    assert probe["loops"] >= 1 and probe["reductions"] >= 1, probe
    C = 32
    if fsdp == 1:
        assert probe["reductions_in_loops"] == 0 and probe["gathered"] == [], probe
    else:
        assert probe["gathers_in_loops"] >= 1, probe
        assert probe["gathered"] and not [g for g in probe["gathered"] if g.split("[")[1].startswith("2,")], probe
    expected_fc = [2, C, 4 * C // 4] if fsdp == 4 else [2, C, 4 * C]  # (32, 128): the larger dimension is split
    assert probe["c_fc"] == probe["c_fc_mu"] == probe["c_fc_nu"] == expected_fc
    assert probe["wte"] == ([64 // 4, C] if fsdp == 4 else [64, C])
    assert probe["ln_1"] == [2, C]
    # A x B = 1 x 12 on 8 devices: 6 of them; 4 x 12: micro-batches folded in pairs, 8 devices x 3 rows; 40 x 12
    # likewise; FSDP 4 needs a multiple of 4 dividing 12; 1 x 64 in micro-batches of 8: one row per device
    assert probe["plans"] == [(6, 1, 12), (8, 2, 24), (8, 20, 24), (4, 1, 12), (8, 8, 8)]


@pytest.mark.slow
def test_two_processes_train_like_one_with_four_devices(tmp_path, char_data):
    """Two jax.distributed processes on localhost (2 CPU devices each) read their own rows of the same
    global batches: every loss equals a one-process run on 4 devices; both save, both resume."""
    data_dir, _ = char_data
    common = ["train", *TINY, f"--data_dir={data_dir}"]
    finish(run([*common, "--out_dir=single", "--max_iters=6"], tmp_path, devices=4))

    def two_processes(*extra):
        port = free_port()
        procs = [run([*common, "--out_dir=multi", f"--coordinator_address=localhost:{port}", "--num_processes=2",
                      f"--process_id={i}", *extra], tmp_path, devices=2) for i in range(2)]
        return [finish(p) for p in procs]

    out0, out1 = two_processes("--max_iters=3")
    assert "2 process(es), 4 of 4 devices" in out0
    # process 0 speaks for both. gloo's own threads print "[Gloo] Rank N is connected to M peer ranks ..."
    # lines, which two threads writing at once cut anywhere (a lone "3" was seen): look for train's words
    assert not [line for line in out1.splitlines() if re.search(r"iter|step|loss|sav|layout|compiled|parameters", line)]
    assert sorted(p.name for p in (tmp_path / "multi" / "checkpoints" / "latest").iterdir()) == ["3"]
    two_processes("--max_iters=6", "--init_from=resume")
    multi, single = losses(tmp_path / "multi"), losses(tmp_path / "single")
    np.testing.assert_allclose(multi[0], single[0], rtol=1e-5)
    assert [it for it, _ in multi[1]] == [it for it, _ in single[1]] == [0, 3, 6]
    np.testing.assert_allclose([v for _, v in multi[1]], [v for _, v in single[1]], rtol=1e-5)


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_one_step_and_resume_continues(tmp_path, char_data):
    """A TPU pod is preempted with SIGTERM, maybe on one host: JAX's preemption service makes both processes
    stop after the same step, save it as `latest` and exit 0; resuming gives the losses of a run never stopped."""
    data_dir, _ = char_data
    # SIGTERM goes out after 3 logged steps: 120 leaves a loaded machine over a hundred steps to deliver it
    common = ["train", *TINY, f"--data_dir={data_dir}", "--max_iters=120", "--eval_interval=120"]
    reference = run([*common, "--out_dir=single"], tmp_path, devices=4)

    def two_processes(*extra):
        port = free_port()
        return [run([*common, "--out_dir=multi", f"--coordinator_address=localhost:{port}", "--num_processes=2",
                     f"--process_id={i}", *extra], tmp_path, devices=2) for i in range(2)]

    procs = two_processes()
    metrics = tmp_path / "multi" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.is_file() and metrics.read_text().count('"loss"') >= 3):
        assert time.monotonic() < deadline and procs[0].poll() is None, procs[0].communicate()[1][-3000:]
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)
    out0, _ = finish(procs[0]), finish(procs[1])
    stopped = int(re.search(r"SIGTERM: saved iteration (\d+)", out0).group(1))
    assert 3 <= stopped < 120
    assert [p.name for p in (tmp_path / "multi" / "checkpoints" / "latest").iterdir()] == [str(stopped)]
    [finish(p) for p in two_processes("--init_from=resume")]
    finish(reference)
    multi, single = losses(tmp_path / "multi"), losses(tmp_path / "single")
    assert len(multi[0]) == len(single[0]) == 120
    np.testing.assert_allclose(multi[0], single[0], rtol=1e-5)
    np.testing.assert_allclose([v for _, v in multi[1]], [v for _, v in single[1]], rtol=1e-5)


def test_fsdp_rule_splits_matrices_along_a_divisible_dimension():
    assert leaf_spec((32, 128), 4) == P(None, "fsdp")  # the larger dimension
    assert leaf_spec((65, 32), 4) == P(None, "fsdp")  # 65 is not divisible by 4
    assert leaf_spec((30, 6), 4) == P() and leaf_spec((128,), 4) == P() and leaf_spec((32, 128), 1) == P()


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


@pytest.mark.slow
def test_a_process_whose_peer_never_joins_ends_in_one_line(tmp_path, char_data):
    """Process 0 with no process 1, and a process 1 with no process 0 (on another port), each waiting 10 s:
    each says at start what it waits for, then ends with one line naming who is missing, exit 2, and writes
    nothing. The 120 s bound is 10 s plus start-up on a loaded 2-core machine; without the watchdog JAX
    waits its own 300 s and aborts."""
    data_dir, _ = char_data
    procs = [run(["train", *TINY, f"--data_dir={data_dir}", f"--out_dir=out{i}", f"--process_id={i}",
                  f"--coordinator_address=localhost:{free_port()}", "--num_processes=2",
                  "--initialization_timeout=10"], tmp_path, devices=2) for i in range(2)]
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [2, 2], errs
    assert "waiting up to 10 s for 2 processes at localhost:" in errs[0]
    assert "process 1 of 2: joining the run at localhost:" in errs[1]
    assert [len(error_lines(e)) for e in errs] == [1, 1], errs
    assert "process 1 did not join the run" in error_lines(errs[0])[0]
    assert "nothing answered" in error_lines(errs[1])[0] and "process 0 (the coordinator)" in errs[1]
    assert not list(tmp_path.iterdir())


# Process `victim` of a two-process run raises a UserError of its own (as a disk gone from under it would) when it
# reads iteration 4's batch; the other process carries on into that step.
FAILING = textwrap.dedent("""
    import sys
    from nanogpt_jax import cli, run
    from nanogpt_jax.config import UserError
    victim, original = int(sys.argv[1]), run.Run.train_batch

    def train_batch(self, iter_num):
        if iter_num == 4 and f"--process_id={victim}" in sys.argv:
            raise UserError(f"cannot read the data of process {victim}")
        return original(self, iter_num)

    run.Run.train_batch = train_batch
    sys.exit(cli.main(sys.argv[2:]))
""")


@pytest.mark.slow
@pytest.mark.parametrize("victim", [1, 0])
def test_a_peer_stopped_by_an_error_ends_the_other_in_one_line(victim, tmp_path, char_data):
    """One of two training processes stops on an error of its own mid-run: it says it in one line and exits 2,
    and so does the other, naming that process and its error, at its next heartbeat (10 s per run here, start-up
    included; --heartbeat_timeout_seconds=100 is never reached); without the word through the store the other
    would wait inside its next step until XLA's collective timeout (600 s) and the failed one at JAX's shutdown
    barrier."""
    data_dir, _ = char_data
    script = tmp_path / "failing.py"
    script.write_text(FAILING)
    port = free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    procs = [subprocess.Popen([sys.executable, str(script), str(victim), "train", *TINY, f"--data_dir={data_dir}",
                               "--out_dir=multi", "--max_iters=100000", "--eval_interval=100000",
                               f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}",
                               "--heartbeat_timeout_seconds=100"], cwd=tmp_path, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
    try:
        errs = [p.communicate(timeout=240)[1] for p in procs]  # start-up on a loaded machine; 10 s when idle
    finally:  # a hung pair would otherwise hold both cores for the rest of the suite
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [2, 2], errs
    assert [len(error_lines(e)) for e in errs] == [1, 1], errs
    assert error_lines(errs[victim]) == [f"error: cannot read the data of process {victim}"]
    assert error_lines(errs[1 - victim])[0].startswith(
        f"error: process {victim} of 2 stopped on an error (cannot read the data of process {victim}); "
        f"process {1 - victim} stops too"), errs[1 - victim]


@pytest.mark.slow
@pytest.mark.parametrize("victim", [1, 0])
def test_a_peer_killed_mid_run_ends_the_other_in_one_line(victim, tmp_path, char_data):
    """SIGKILL one of two training processes after 3 steps. Process 1 killed: process 0 sees no heartbeat for
    --heartbeat_timeout_seconds=20 and exits 2 with one line naming it. Process 0 (the coordinator) killed:
    JAX aborts process 1 at once (its own fatal line and a C++ stack), and its watcher adds one line after
    them. The 120 s bound is 20 s plus room for a loaded machine; without the watchdog JAX's abort takes
    50-100 s."""
    data_dir, _ = char_data
    port = free_port()
    procs = [run(["train", *TINY, f"--data_dir={data_dir}", "--out_dir=multi", "--max_iters=100000",
                  "--eval_interval=100000", f"--coordinator_address=localhost:{port}", "--num_processes=2",
                  f"--process_id={i}", "--heartbeat_timeout_seconds=20"], tmp_path, devices=2) for i in range(2)]
    metrics = tmp_path / "multi" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.is_file() and metrics.read_text().count('"loss"') >= 3):
        assert time.monotonic() < deadline and procs[0].poll() is None, procs[0].communicate()[1][-3000:]
        time.sleep(0.2)
    procs[victim].kill()
    survivor = procs[1 - victim]
    err = survivor.communicate(timeout=120)[1]
    procs[victim].communicate()
    assert len(error_lines(err)) == 1, err[-3000:]
    if victim == 1:
        assert survivor.returncode == 2, err[-3000:]
        assert "process 1 of 2 sent no heartbeat for 20 s" in error_lines(err)[0]
    else:
        assert survivor.returncode == -signal.SIGABRT, err[-3000:]
        assert err.strip().splitlines()[-1].startswith("error: process 1 of 2: the coordinator (process 0 at ")
