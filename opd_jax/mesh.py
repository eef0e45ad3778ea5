"""Where every array lives: the device mesh, one table of logical-axis rules, placement,
and the multi-host runtime.

Params carry logical axis names (`model.param_axes`), and so do batches, logits and KV
caches; one rules table (`Layout`) maps them all to mesh axes, so changing the
parallelism layout is a gin binding, not a code change, and it moves params, logits and
caches alike. The mesh has three axes: `data` (pure data parallelism), `fsdp` (data
parallelism whose replicas also shard the params and optimizer state) and `tensor`
(Megatron-style splitting of heads, MLP width and vocabulary). In a multi-host run every
process builds only its own rows of a batch, and `global_batch` joins them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import socket
import time
from collections.abc import Iterator, Sequence
from typing import Any

import flax.linen as nn
import gin
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from opd_jax import model, validation

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
    is_int = lambda s: isinstance(s, (int, np.integer))
    if not isinstance(shape, (tuple, list)) or not all(map(is_int, shape)):
        raise MeshError(f"make_mesh.shape={shape!r} must be a tuple of integers {MESH_AXES}")
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


LOGITS_AXES = ("batch", "length", "vocab")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class Layout:
    """The logical-axis rules of a run: one table for the student's params, batch rows,
    logits and KV caches; `teacher_rules` optionally lays out a separate teacher's params
    differently (e.g. no FSDP for a teacher that fits, to save the all-gathers of its
    weights)."""

    rules: tuple = DEFAULT_RULES
    teacher_rules: tuple | None = None

    def __post_init__(self):
        validation.check_types(self)

    def placement(self, mesh: Mesh, role: str = "student") -> Placement:
        rules = self.teacher_rules if role == "teacher" and self.teacher_rules else self.rules
        return Placement(mesh, tuple(rules))


@dataclasses.dataclass(frozen=True)
class Placement:
    """A mesh and the rules that place arrays on it; hashable, so jitted functions take
    it as a static argument (the sampler pins its KV cache with it, the loss its logits)."""

    mesh: Mesh
    rules: tuple = DEFAULT_RULES

    def of(self, logical_axes: Any) -> Any:
        """NamedShardings for a logical-axes tuple (or a pytree of them)."""
        return logical_to_sharding(logical_axes, self.mesh, self.rules)

    @property
    def rows(self) -> NamedSharding:
        """A batch's leading axis over the data axes (a prefix sharding for any rank)."""
        return batch_sharding(self.mesh)

    def pin(self, x: jax.Array, logical_axes: tuple) -> jax.Array:
        """Constrains `x` to the rules' layout, dropping axes its shape cannot split."""
        return constrain(x, fitted_sharding(x.shape, self.of(logical_axes)))

    def params(self, config: model.ModelConfig) -> Any:
        """NamedShardings of every param of `config`, from the shapes alone."""
        shapes = jax.eval_shape(lambda: model.init_params(config, jax.random.key(0)))
        return param_shardings(shapes, model.param_axes(config), self.mesh, self.rules)


@dataclasses.dataclass(frozen=True)
class StepShardings:
    """Where a jitted step's arguments live: the train state, the frozen params beside it
    (a teacher, a LoRA base, or None), and the placement that gives the batch's rows and
    pins the [B, T, V] logits inside the loss."""

    state: Any
    frozen: Any
    placement: Placement

    @property
    def mesh(self) -> Mesh:
        return self.placement.mesh

    @property
    def batch(self) -> NamedSharding:
        return self.placement.rows

    @property
    def logits(self) -> NamedSharding:
        return self.placement.of(LOGITS_AXES)


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


def place_params(params: Any, shardings: Any) -> Any:
    """Params (host or device arrays that every process holds whole) moved to their
    shardings; each process transfers only its devices' shards."""
    return jax.tree.map(from_host, params, shardings)


# ----------------------------------------------------------------------------- batches


def process_rows(mesh: Mesh, global_batch: int) -> slice:
    """The rows of a global batch that this process's devices hold (one contiguous block)."""
    rows = batch_sharding(mesh)
    if global_batch % batch_shards(mesh):
        raise MeshError(
            f"batch of {global_batch} rows does not split over the data axes "
            f"({batch_shards(mesh)} ways)"
        )
    indices = rows.addressable_devices_indices_map((global_batch,)).values()
    spans = sorted({index[0].indices(global_batch)[:2] for index in indices})
    if any(a[1] != b[0] for a, b in zip(spans[:-1], spans[1:], strict=True)):
        raise MeshError(f"this process's rows {spans} are not one block")
    return slice(spans[0][0], spans[-1][1])


def global_batch(local: Any, mesh: Mesh, global_rows: int) -> Any:
    """A pytree of this process's rows (host arrays) -> global arrays of `global_rows`."""
    rows = batch_sharding(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(
            rows, np.asarray(x), (global_rows, *np.shape(x)[1:])
        ),
        local,
    )


def local_rows(x: jax.Array) -> np.ndarray:
    """This process's rows of a row-sharded global array, in order (what it fed in)."""
    shards = {shard.index[0].start or 0: shard.data for shard in x.addressable_shards}
    return np.concatenate([np.asarray(shards[start]) for start in sorted(shards)])


# ----------------------------------------------------------------------------- processes


def barrier(name: str) -> None:
    """Waits for every process (nothing to wait for in a single-process run)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


@contextlib.contextmanager
def main_process_first(name: str) -> Iterator[None]:
    """Process 0 runs the body (which may build a dataset or fetch weights into a shared
    cache) before the others start it, so they only read what it wrote."""
    if jax.process_index() != 0:
        barrier(name)
    yield
    if jax.process_index() == 0:
        barrier(name)


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
    try:
        if coordinator_address is not None and process_id not in (None, 0):
            _wait_for_coordinator(coordinator_address, timeout_s)
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


def _wait_for_coordinator(address: str, timeout_s: float) -> None:
    """Returns once a TCP connection to `address` succeeds; raises after `timeout_s`."""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=1.0):
                return
        except (OSError, ValueError) as err:
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"the coordinator did not answer ({err}); is process 0 running and is the "
                    "address reachable from this host?"
                ) from None
            time.sleep(0.2)
