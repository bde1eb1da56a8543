"""Placement, all of it: the device mesh, how batches are split over it, and where every leaf of the train
state lives. Everything that builds, restores or loads a state asks `state_shardings`.

Today the mesh has one axis, `data`: batches are split over it and the state is replicated, so the same
jitted step runs on one device or several (GPUs, TPU cores, or host CPU devices) with the compiler
inserting the gradient all-reduce. Only the devices of this process are used.
"""

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from .config import ConfigError


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


def data_mesh(batch_size: int, num_devices: int = 0) -> Mesh:
    """A mesh over the devices that share the batch; 0 = the most local devices that divide batch_size."""
    devices = jax.devices()
    if num_devices <= 0:
        num_devices = max(n for n in range(1, len(devices) + 1) if batch_size % n == 0)
    elif num_devices > len(devices) or batch_size % num_devices:
        raise ConfigError(f"--num_devices={num_devices}: need at most {len(devices)} devices and a "
                          f"batch_size ({batch_size}) divisible by it")
    return Mesh(np.array(devices[:num_devices]), ("data",))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def state_shardings(mesh: Mesh, tree):
    """The sharding of every leaf of a train state, params or optimizer state (real or abstract arrays)."""
    return jax.tree.map(lambda _: replicated(mesh), tree)


def batch_sharding(mesh: Mesh, batch_axis: int) -> NamedSharding:
    """Split axis `batch_axis` of an array over the mesh's devices."""
    return NamedSharding(mesh, P(*([None] * batch_axis), "data"))


def put_batch(mesh: Mesh, batch_axis: int, *arrays: np.ndarray):
    """Host arrays (this process's rows) -> global arrays split over the mesh along `batch_axis`."""
    sharding = batch_sharding(mesh, batch_axis)
    return tuple(jax.make_array_from_process_local_data(sharding, a) for a in arrays)
