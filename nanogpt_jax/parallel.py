"""Placement, all of it: the device mesh, how a step's batch is laid out over it, where every leaf of the
train state lives, and how gradients are reduced. Everything that builds, restores or loads a state asks
`state_shardings`.

The mesh has two axes, `data` and `fsdp`, over every device of every process; each micro-batch's rows are
split over all of them. With fsdp=1 the state is replicated (data parallelism); with fsdp=F every matrix
of the params and of the AdamW moments is split F ways along one dimension (FSDP, never the layer axis of
the stacked blocks). Each device works on its own rows of every micro-batch (`per_device_grads`). With
data parallelism it accumulates whole gradients and they are reduced once per optimizer step. Under FSDP
each device gathers one layer's weights at a time, inside the layer loop, and regathers them in the
backward pass; each layer's gradient is reduce-scattered as it is made, so the accumulator stays sharded
and no device ever holds the whole model or a whole-size gradient (the embeddings and ln_f, outside the
loop, are gathered once per micro-batch).

`--parallel=pmap` runs the same step under `jax.pmap` (JAX keeps pmap in maintenance mode, built on jit and
shard_map, so the mesh is the default): the state carries a leading device axis, gradients are `pmean`ed
after the accumulation scan, and checkpoints hold the state without that axis.
"""

import dataclasses
import glob
import importlib.util
import os
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from . import peers
from .config import ConfigError

BATCH = ("data", "fsdp")  # a micro-batch's rows are split over both axes: every device of the mesh


def use_all_cpu_cores() -> None:
    """Expose one host device per core before JAX starts: data parallelism across cores beats
    XLA's intra-op threading for GPT-sized matmuls on a CPU. A user's own XLA_FLAGS setting wins.

    On a busy machine one core's device can lag the other's by more than XLA's default 40 s before a
    collective aborts the process; give it ten minutes."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        jax.config.update("jax_num_cpu_devices", os.cpu_count() or 1)
    if "xla_cpu_collective_call_terminate_timeout_seconds" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_cpu_collective_call_terminate_timeout_seconds=600".strip()


def quiet_libtpu() -> None:
    """With libtpu installed (for `compile --topology`) on a machine without a TPU, every jax process would ask
    the cloud metadata server about its TPU and print libtpu's warnings; say there is none to ask about, and let
    several processes load libtpu at once. Before any JAX computation; a TPU VM and the user's settings are
    left alone."""
    if importlib.util.find_spec("libtpu") is None or glob.glob("/dev/accel*") or glob.glob("/dev/vfio/*"):
        return
    for name, value in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_WORKER_HOSTNAMES", "localhost"),
                        ("TPU_ACCELERATOR_TYPE", "v5litepod-8"), ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):
        os.environ.setdefault(name, value)


def _cluster_launched() -> bool:
    """Started as one of several processes by SLURM, Open MPI or a TPU pod, where jax.distributed finds its
    coordinator by itself."""
    env = os.environ
    return (int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
            or "," in env.get("TPU_WORKER_HOSTNAMES", ""))


def start(coordinator_address: str | None = None, num_processes: int | None = None,
          process_id: int | None = None, initialization_timeout: int = 300,
          heartbeat_timeout_seconds: int = 100) -> None:
    """Before any JAX computation: join a multi-process run (explicit coordinator, or found by JAX's
    cluster detection; a peer missing at start or gone later ends it in one line, see peers.py), or alone
    on this host, expose one CPU device per core."""
    if coordinator_address is not None or _cluster_launched():
        peers.join(coordinator_address, num_processes, process_id, initialization_timeout, heartbeat_timeout_seconds)
    else:
        use_all_cpu_cores()


def preemption_reached(step: int) -> bool:
    """In a multi-process run, called by every process after every step: True on all of them at the same
    step once any one got SIGTERM (JAX's preemption service, started by jax.distributed.initialize)."""
    return multihost_utils.reached_preemption_sync_point(step)


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one optimizer step's A x B rows are laid out: `steps` micro-batches of `rows` rows each, every
    micro-batch split over the mesh's devices (rows / devices each)."""

    mesh: Mesh
    steps: int  # micro-batches per optimizer step (gradient accumulation)
    rows: int  # rows per micro-batch, over all devices
    pmap: bool = False
    available: int = 0  # devices there were to choose from

    @property
    def devices(self) -> int:
        return self.mesh.size

    @property
    def fsdp(self) -> int:
        return self.mesh.shape["fsdp"]

    def describe(self) -> str:
        processes = len({d.process_index for d in self.mesh.devices.flat})
        return (f"{processes} process(es), {self.devices} of {self.available} devices "
                f"({self.mesh.devices.flat[0].device_kind}), {'pmap' if self.pmap else 'mesh'} "
                f"data={self.mesh.shape['data']} x fsdp={self.fsdp}, {self.rows // self.devices} row(s) per device "
                f"x {self.steps} micro-batch(es) per step")


def plan(accum_steps: int, batch_size: int, micro_batch_size: int, *, fsdp: int = 1, num_devices: int = 0,
         pmap: bool = False, devices=None) -> Layout:
    """Lay out A x B rows per step over the devices (default: every device of every process; a TPU
    topology's to compile for it), keeping nanoGPT's meaning of the batch.

    Micro-batches of M rows (M = micro_batch_size or B); when the devices outnumber a micro-batch's rows,
    micro-batches are folded into wider ones (fewer accumulation steps, the same rows). num_devices=0 uses
    every device if some folding fits, else the most devices that divide a micro-batch."""
    M = micro_batch_size or batch_size
    if batch_size % M:
        raise ConfigError(f"--micro_batch_size={micro_batch_size} must divide --batch_size={batch_size}")
    devices = list(jax.devices() if devices is None else devices)
    total, available = accum_steps * batch_size, len(devices)
    if num_devices > available or (num_devices and num_devices % fsdp):
        raise ConfigError(f"--num_devices={num_devices}: need at most {available} devices and a multiple of "
                          f"--fsdp={fsdp}")
    if available % fsdp and not num_devices:
        raise ConfigError(f"--fsdp={fsdp} must divide the number of devices ({available})")
    wanted = num_devices or available
    for k in range(1, total // M + 1):  # fold k micro-batches into one, fewest first
        if (total // M) % k == 0 and (M * k) % wanted == 0:
            return Layout(make_mesh(devices[:wanted], fsdp), total // (M * k), M * k, pmap, available)
    fits = [n for n in range(fsdp, wanted + 1, fsdp) if M % n == 0]
    if num_devices or not fits:
        raise ConfigError(f"--num_devices={wanted} (--fsdp={fsdp}): no layout of {accum_steps} x {batch_size} rows "
                          f"in micro-batches of {M} gives every device the same number of rows; change "
                          "--num_devices, --fsdp, --batch_size or --micro_batch_size")
    return Layout(make_mesh(devices[:max(fits)], fsdp), total // M, M, pmap, available)


def make_mesh(devices, fsdp: int) -> Mesh:
    """A (data, fsdp) mesh over `devices`, fsdp of them per data-parallel group."""
    return Mesh(np.array(devices).reshape(len(devices) // fsdp, fsdp), ("data", "fsdp"))


def single_device_mesh() -> Mesh:
    return make_mesh(jax.devices()[:1], 1)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def leaf_spec(shape: tuple[int, ...], fsdp: int) -> P:
    """FSDP's rule: a matrix (or embedding) is split along its largest dimension that fsdp divides; vectors,
    scalars and matrices with no such dimension stay whole."""
    if fsdp == 1 or len(shape) < 2:
        return P()
    dims = [d for d in sorted(range(len(shape)), key=lambda d: -shape[d]) if shape[d] % fsdp == 0]
    return P(*("fsdp" if d == dims[0] else None for d in range(len(shape)))) if dims else P()


def _is_spec(x) -> bool:
    return isinstance(x, P)  # a PartitionSpec is a tuple: without this, tree.map would walk into it


def _stacked(path) -> bool:
    """A leaf of the stacked blocks (params["h"], or the AdamW moments' "h"): its first axis is the layer."""
    return any(getattr(k, "key", None) == "h" for k in path)


def state_specs(tree, fsdp: int):
    """A PartitionSpec per leaf of a params / optimizer-state tree (real or abstract arrays); a stacked
    block leaf is split as one layer's would be, its layer axis kept whole."""
    def spec(path, x):
        if _stacked(path):
            return P(None, *leaf_spec(tuple(x.shape[1:]), fsdp))
        return leaf_spec(tuple(x.shape), fsdp)

    return jax.tree_util.tree_map_with_path(spec, tree)


def state_shardings(mesh: Mesh, tree):
    """The sharding of every leaf of a train state, params or optimizer state (real or abstract arrays)."""
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), state_specs(tree, mesh.shape["fsdp"]),
                        is_leaf=_is_spec)


def batch_sharding(mesh: Mesh, batch_axis: int) -> NamedSharding:
    """Split axis `batch_axis` (the rows) of an array over every device of the mesh."""
    return NamedSharding(mesh, P(*([None] * batch_axis), BATCH))


def put_rows(sharding: NamedSharding, shape: tuple[int, ...], read):
    """A global array of `shape` whose rows this process reads itself: read(index) -> the np.ndarray at
    `index` (a tuple of slices) of the global array, asked only for this process's devices' shards."""
    return jax.make_array_from_callback(shape, sharding, read)


def put_replicated(mesh: Mesh, x) -> jax.Array:
    """A small host value (the same in every process) as one array on every device of the mesh."""
    x = np.asarray(x)
    return put_rows(replicated(mesh), x.shape, x.__getitem__)


# ------------------------------------------------------------------------------------------- gradients


def per_device_grads(grads_for, mesh: Mesh, param_specs):
    """The step's (loss, grads) with every device on its own rows of each micro-batch (batch: (A, M, T)
    arrays). `grads_for(gather)` builds `grads_fn(params, batch, key, loss_scale) -> (loss, grads)` (accumulating
    over the micro-batches) around a model whose layer loop calls `gather` on each layer's params, or None.
    float16's loss scale (a replicated scalar, or None) scales each device's loss before its backward pass; the
    gradients come back reduced and still scaled (train_step unscales them).

    Data parallelism: whole gradients, reduced once after the accumulation. FSDP: each layer's weights are
    all-gathered inside the loop; the gradient of that all-gather is a reduce-scatter, so each layer's
    gradient arrives summed over the fsdp axis and sharded, and only the data axis is left to reduce. The
    other params are gathered whole before the pass, their gradients reduce-scattered at the end. Dropout
    draws differ per device (the key is folded with its index)."""
    n = mesh.size
    per_layer = mesh.shape["fsdp"] > 1 and "h" in param_specs

    def gather(x, spec, layer_axis=0):  # layer_axis 1: x is one layer's slice of a stacked leaf
        if "fsdp" not in spec:
            return x
        return jax.lax.all_gather(x, "fsdp", axis=spec.index("fsdp") - layer_axis, tiled=True)

    def reduce(g, spec, summed_over_fsdp=False):
        if "fsdp" in spec:
            if not summed_over_fsdp:
                g = jax.lax.psum_scatter(g, "fsdp", scatter_dimension=spec.index("fsdp"), tiled=True)
            return jax.lax.psum(g, "data") / n
        return jax.lax.psum(g, BATCH) / n

    def gather_layer(variables):
        return {"params": jax.tree.map(partial(gather, layer_axis=1), variables["params"], param_specs["h"],
                                       is_leaf=_is_spec)}

    grads_fn = grads_for(gather_layer if per_layer else None)

    def local(params, batch, key, loss_scale):
        key = jax.random.fold_in(key, jax.lax.axis_index(BATCH))
        whole = {k: v if per_layer and k == "h" else jax.tree.map(gather, v, param_specs[k], is_leaf=_is_spec)
                 for k, v in params.items()}
        loss, grads = grads_fn(whole, batch, key, loss_scale)
        grads = {k: jax.tree.map(partial(reduce, summed_over_fsdp=per_layer and k == "h"), g, param_specs[k],
                                 is_leaf=_is_spec) for k, g in grads.items()}
        return jax.lax.pmean(loss, BATCH), grads

    rows = P(None, BATCH)
    return jax.shard_map(local, mesh=mesh, in_specs=(param_specs, (rows, rows), P(), P()),
                         out_specs=(P(), param_specs), check_vma=False)


def pmapped_grads(grads_fn, axis: str = "devices"):
    """The pmap form of per_device_grads: local accumulation, then one pmean over the devices."""

    def local(params, batch, key, loss_scale):
        loss, grads = grads_fn(params, batch, jax.random.fold_in(key, jax.lax.axis_index(axis)), loss_scale)
        return jax.lax.pmean(loss, axis), jax.lax.pmean(grads, axis)

    return local


def device_axis_sharding(mesh: Mesh) -> NamedSharding:
    """pmap's layout: a leading axis with one entry per device of the mesh."""
    return NamedSharding(Mesh(mesh.devices.reshape(-1), ("devices",)), P("devices"))


def stack_for_pmap(mesh: Mesh, tree):
    """A state (one copy, any placement) -> one copy per device along a new leading axis, as pmap wants it."""
    n = mesh.size
    return jax.jit(lambda t: jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *x.shape)), t),
                   out_shardings=device_axis_sharding(mesh))(tree)


def unstack_from_pmap(mesh: Mesh, tree):
    """The inverse of stack_for_pmap: device 0's copy, replicated over the mesh (what checkpoints hold)."""
    return jax.jit(lambda t: jax.tree.map(lambda x: x[0], t), out_shardings=replicated(mesh))(tree)
