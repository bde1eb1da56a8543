"""Placement, all of it: the device mesh, how a step's batch is laid out over it, where every leaf of the
train state lives, and how gradients are reduced. Everything that builds, restores or loads a state asks
`state_shardings`.

The mesh has two axes, `data` and `fsdp`, over every device of every process; each micro-batch's rows are
split over all of them. With fsdp=1 the state is replicated (data parallelism); with fsdp=F every matrix
of the params and of the AdamW moments is split F ways along one dimension (FSDP), and each device
gathers the whole params for the step. Either way each device accumulates the gradients of its own rows
over the micro-batches, and they are reduced once per optimizer step (`per_device_grads`).

`--parallel=pmap` runs the same step under `jax.pmap` (JAX keeps pmap in maintenance mode, built on jit and
shard_map, so the mesh is the default): the state carries a leading device axis, gradients are `pmean`ed
after the accumulation scan, and checkpoints hold the state without that axis.
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

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


def _cluster_launched() -> bool:
    """Started as one of several processes by SLURM, Open MPI or a TPU pod, where jax.distributed finds its
    coordinator by itself."""
    env = os.environ
    return (int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
            or "," in env.get("TPU_WORKER_HOSTNAMES", ""))


def start(coordinator_address: str | None = None, num_processes: int | None = None,
          process_id: int | None = None) -> None:
    """Before any JAX computation: join a multi-process run (explicit coordinator, or found by JAX's
    cluster detection), or alone on this host, expose one CPU device per core."""
    if coordinator_address is not None or _cluster_launched():
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
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

    @property
    def devices(self) -> int:
        return self.mesh.size

    @property
    def fsdp(self) -> int:
        return self.mesh.shape["fsdp"]

    def describe(self) -> str:
        return (f"{jax.process_count()} process(es), {self.devices} of {jax.device_count()} devices "
                f"({self.mesh.devices.flat[0].device_kind}), {'pmap' if self.pmap else 'mesh'} "
                f"data={self.mesh.shape['data']} x fsdp={self.fsdp}, {self.rows // self.devices} row(s) per device "
                f"x {self.steps} micro-batch(es) per step")


def plan(accum_steps: int, batch_size: int, micro_batch_size: int, *, fsdp: int = 1, num_devices: int = 0,
         pmap: bool = False) -> Layout:
    """Lay out A x B rows per step over the devices, keeping nanoGPT's meaning of the batch.

    Micro-batches of M rows (M = micro_batch_size or B); when the devices outnumber a micro-batch's rows,
    micro-batches are folded into wider ones (fewer accumulation steps, the same rows). num_devices=0 uses
    every device if some folding fits, else the most devices that divide a micro-batch."""
    M = micro_batch_size or batch_size
    if batch_size % M:
        raise ConfigError(f"--micro_batch_size={micro_batch_size} must divide --batch_size={batch_size}")
    total, available = accum_steps * batch_size, jax.device_count()
    if num_devices > available or (num_devices and num_devices % fsdp):
        raise ConfigError(f"--num_devices={num_devices}: need at most {available} devices and a multiple of "
                          f"--fsdp={fsdp}")
    if available % fsdp and not num_devices:
        raise ConfigError(f"--fsdp={fsdp} must divide the number of devices ({available})")
    wanted = num_devices or available
    for k in range(1, total // M + 1):  # fold k micro-batches into one, fewest first
        if (total // M) % k == 0 and (M * k) % wanted == 0:
            return Layout(_mesh(wanted, fsdp), total // (M * k), M * k, pmap)
    fits = [n for n in range(fsdp, wanted + 1, fsdp) if M % n == 0]
    if num_devices or not fits:
        raise ConfigError(f"--num_devices={wanted} (--fsdp={fsdp}): no layout of {accum_steps} x {batch_size} rows "
                          f"in micro-batches of {M} gives every device the same number of rows; change "
                          "--num_devices, --fsdp, --batch_size or --micro_batch_size")
    return Layout(_mesh(max(fits), fsdp), total // M, M, pmap)


def _mesh(n: int, fsdp: int) -> Mesh:
    return Mesh(np.array(jax.devices()[:n]).reshape(n // fsdp, fsdp), ("data", "fsdp"))


def single_device_mesh() -> Mesh:
    return _mesh(1, 1)


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


def state_specs(tree, fsdp: int):
    """A PartitionSpec per leaf of a params / optimizer-state tree (real or abstract arrays)."""
    return jax.tree.map(lambda x: leaf_spec(tuple(x.shape), fsdp), tree)


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


def per_device_grads(grads_fn, mesh: Mesh, param_specs):
    """`grads_fn(params, batch, key) -> (loss, grads)` run by every device on its own rows of each
    micro-batch (batch: (A, M, T) arrays), the gradients reduced once, after the accumulation.

    Under FSDP each device first gathers the whole params and at the end keeps only its shard of the
    gradient sum (reduce-scatter). Dropout draws differ per device (the key is folded with its index)."""
    n = mesh.size

    def gather(x, spec):
        return jax.lax.all_gather(x, "fsdp", axis=spec.index("fsdp"), tiled=True) if "fsdp" in spec else x

    def reduce(g, spec):
        if "fsdp" in spec:
            g = jax.lax.psum_scatter(g, "fsdp", scatter_dimension=spec.index("fsdp"), tiled=True)
            return jax.lax.psum(g, "data") / n
        return jax.lax.psum(g, BATCH) / n

    def local(params, batch, key):
        key = jax.random.fold_in(key, jax.lax.axis_index(BATCH))
        loss, grads = grads_fn(jax.tree.map(gather, params, param_specs, is_leaf=_is_spec), batch, key)
        return jax.lax.pmean(loss, BATCH), jax.tree.map(reduce, grads, param_specs, is_leaf=_is_spec)

    rows = P(None, BATCH)
    return jax.shard_map(local, mesh=mesh, in_specs=(param_specs, (rows, rows), P()), out_specs=(P(), param_specs),
                         check_vma=False)


def pmapped_grads(grads_fn, axis: str = "devices"):
    """The pmap form of per_device_grads: local accumulation, then one pmean over the devices."""

    def local(params, batch, key):
        loss, grads = grads_fn(params, batch, jax.random.fold_in(key, jax.lax.axis_index(axis)))
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
