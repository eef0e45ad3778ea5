"""Device meshes and the logical-axis rules that place params, batches and caches.

Params carry logical axis names (`model.param_axes`); a short rules table maps them to
mesh axes, so changing the parallelism layout is a gin binding, not a code change.
The mesh has three axes: `data` (pure data parallelism), `fsdp` (data parallelism
whose replicas also shard the params and optimizer state) and `tensor` (Megatron-style
splitting of heads, MLP width and vocabulary).
"""

from __future__ import annotations

import dataclasses
import math
import socket
import time
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import gin
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the axes a batch's rows are split over

# Logical axis -> mesh axes. Batch-like axes split over both data-parallel axes; the
# embed axis of params is what FSDP shards; heads, MLP and vocab are tensor-parallel.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("length", None),
)


class MeshError(ValueError):
    """A mesh shape that does not fit the devices or the model."""


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Fills one -1 entry with the remaining devices; checks the product."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != len(MESH_AXES):
        raise MeshError(f"mesh shape {shape} must have {len(MESH_AXES)} entries {MESH_AXES}")
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise MeshError(f"mesh shape {shape}: sizes must be positive, with at most one -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise MeshError(f"mesh shape {shape} does not divide {num_devices} devices")
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != num_devices:
        raise MeshError(
            f"mesh shape {dict(zip(MESH_AXES, shape, strict=True))} uses {math.prod(shape)} "
            f"devices but {num_devices} are available"
        )
    return shape


@gin.configurable
def make_mesh(
    shape: Sequence[int] = (-1, 1, 1), devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """A (data, fsdp, tensor) mesh over all devices; `shape` may hold one -1."""
    devices = list(devices if devices is not None else jax.devices())
    resolved = resolve_mesh_shape(shape, len(devices))
    return jax.make_mesh(
        resolved, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
    )


def check_model_fits_mesh(config: Any, mesh: Mesh) -> None:
    """Tensor parallelism must divide the heads (and kv heads, or replicate them)."""
    tensor = mesh.shape["tensor"]
    for field in ("n_heads", "mlp_dim"):
        if getattr(config, field) % tensor:
            raise MeshError(
                f"tensor axis of size {tensor} does not divide {field}={getattr(config, field)}"
            )


def logical_to_sharding(axes_tree: Any, mesh: Mesh, rules: Sequence = DEFAULT_RULES) -> Any:
    """NamedShardings for a pytree of logical-axis-name tuples.

    A dimension whose size the mapped mesh axes do not divide (e.g. 3 kv heads over a
    tensor axis of 2) is left replicated rather than failing.
    """
    return nn.logical_to_mesh_sharding(
        jax.tree.map(lambda axes: PartitionSpec(*axes), axes_tree, is_leaf=_is_axes),
        mesh,
        list(rules),
    )


def _is_axes(x: Any) -> bool:
    return isinstance(x, tuple) and all(isinstance(a, str) or a is None for a in x)


def fitted_sharding(shape: Sequence[int], sharding: NamedSharding) -> NamedSharding:
    """Drops mesh axes from dimensions they do not divide, so any shape can be placed."""
    spec = []
    for size, axes in zip(shape, tuple(sharding.spec) + (None,) * len(shape), strict=False):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        ways = math.prod(sharding.mesh.shape[n] for n in names)
        spec.append(axes if ways and size % ways == 0 else None)
    return NamedSharding(sharding.mesh, PartitionSpec(*spec))


def param_shardings(
    params_or_shapes: Any, axes_tree: Any, mesh: Mesh, rules: Sequence = DEFAULT_RULES
) -> Any:
    """Shardings for params from their logical axes, fitted to each leaf's shape."""
    shardings = logical_to_sharding(axes_tree, mesh, rules)
    return jax.tree.map(lambda x, s: fitted_sharding(np.shape(x), s), params_or_shapes, shardings)


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Leading (batch) dimension split over data and fsdp; the rest replicated. With the
    default ndim=1 it also serves as a pytree prefix for arrays of any rank."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def batch_shards(mesh: Mesh) -> int:
    """Into how many row blocks a batch is split (batch sizes must be a multiple)."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def constrain(x: Any, shardings: Any) -> Any:
    """`with_sharding_constraint`, or nothing when no sharding is given (one device)."""
    return x if shardings is None else jax.lax.with_sharding_constraint(x, shardings)


@dataclasses.dataclass(frozen=True)
class StepShardings:
    """Where a jitted step's arguments live: the train state, the frozen params beside it
    (the teacher, or None), the batch (a prefix sharding of its leading axis) and the
    [B, T, V] logits inside the loss (vocabulary over the tensor axis)."""

    state: Any
    frozen: Any
    batch: NamedSharding
    logits: NamedSharding

    @property
    def mesh(self) -> Mesh:
        return self.batch.mesh


def from_host(x: Any, sharding: NamedSharding) -> jax.Array:
    """A global array from a host array that every process holds whole; each process
    transfers only the shards its own devices keep."""
    x = np.asarray(x)
    sharding = fitted_sharding(x.shape, sharding)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def to_host(tree: Any) -> Any:
    """Numpy copies of (possibly multi-host) global arrays, whole on every process."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)


class DistributedInitError(RuntimeError):
    """The multi-host runtime could not start; the message says which coordinator."""


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    auto_detect: bool = False,
    timeout_s: int = 300,
) -> None:
    """Starts JAX's multi-controller runtime when asked to; a no-op for one process.

    Explicit arguments (local multi-process, custom clusters) win; `auto_detect` lets
    JAX find TPU pod slices and SLURM allocations itself. A process other than 0 first
    waits up to `timeout_s` for the coordinator's port to answer: JAX's own client
    aborts the whole process on that timeout, with no word of which address it tried.
    """
    if coordinator_address is None and not auto_detect:
        return
    if coordinator_address is not None and process_id not in (None, 0):
        _wait_for_coordinator(coordinator_address, timeout_s, process_id, num_processes)
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            initialization_timeout=timeout_s,
        )
    except Exception as err:  # jaxlib raises XlaRuntimeError with a long gRPC dump
        where = coordinator_address or "auto-detected coordinator"
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DistributedInitError(
            f"could not join the JAX distributed runtime at {where} within {timeout_s}s "
            f"(process {process_id} of {num_processes}): {first_line}"
        ) from None


def _wait_for_coordinator(
    address: str, timeout_s: float, process_id: int | None, num_processes: int | None
) -> None:
    """Returns once a TCP connection to `address` succeeds; raises after `timeout_s`."""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=1.0):
                return
        except (OSError, ValueError) as err:
            if time.monotonic() >= deadline:
                raise DistributedInitError(
                    f"could not join the JAX distributed runtime at {address} within "
                    f"{timeout_s}s (process {process_id} of {num_processes}): the coordinator "
                    f"did not answer ({err}); is process 0 running and is the address "
                    "reachable from this host?"
                ) from None
            time.sleep(0.2)
