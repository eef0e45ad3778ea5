"""The single-device code on a device mesh: sharded state, step shardings, per-host batches.

`distill`, `rollout` and `sampling` are functions of pytrees; this module decides where
each array lives. A train state is built as `jax.eval_shape(init)` -> shardings ->
`jax.jit(init, out_shardings=...)`, so no device ever holds more than its shard of a
model. In a multi-host run every process builds only its own rows of a batch, and
`jax.make_array_from_process_local_data` joins them into one global array.

The student (params and optimizer state) and the frozen teacher each have a rules
table; by default both follow `sharding.DEFAULT_RULES`, and a teacher that fits can be
laid out without FSDP (`Layout.teacher_rules`) to save the all-gathers of its weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import gin
import jax
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from opd_jax import distill, model, sharding
from opd_jax.model import ModelConfig, Params

LOGITS_AXES = ("batch", "length", "vocab")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class Layout:
    """Logical-axis rules of the student and of the teacher (None: the student's)."""

    student_rules: tuple = sharding.DEFAULT_RULES
    teacher_rules: tuple | None = None

    def rules(self, role: str) -> tuple:
        if role == "teacher" and self.teacher_rules is not None:
            return self.teacher_rules
        return self.student_rules


def param_shardings(config: ModelConfig, mesh: Mesh, rules: Sequence = sharding.DEFAULT_RULES):
    """NamedShardings of every param of `config`, from the shapes alone (nothing is built)."""
    shapes = jax.eval_shape(lambda: model.init_params(config, jax.random.key(0)))
    return sharding.param_shardings(shapes, model.param_axes(config), mesh, rules)


def place_params(params: Params, shardings: Any) -> Params:
    """Params (host or device arrays that every process holds whole) moved to their
    shardings; each process transfers only its devices' shards."""
    return jax.tree.map(sharding.from_host, params, shardings)


def state_shardings(
    abstract_state: distill.TrainState, optimizer: optax.GradientTransformation, params_sharding
) -> distill.TrainState:
    """Shardings of a TrainState: params as given, optimizer moments like their params,
    everything else (step, counts, rng) replicated."""
    mesh = jax.tree.leaves(params_sharding)[0].mesh
    replicated = sharding.replicated(mesh)
    opt_state = optax.tree_utils.tree_map_params(
        optimizer,
        lambda _, s: s,
        abstract_state.opt_state,
        params_sharding,
        transform_non_params=lambda _: replicated,
    )
    return distill.TrainState(
        step=replicated, params=params_sharding, opt_state=opt_state, rng=replicated
    )


def create_train_state(
    params: Params,
    optimizer: optax.GradientTransformation,
    seed: int,
    params_sharding: Any,
) -> distill.TrainState:
    """`distill.init_train_state` built directly in its shardings: the optimizer moments
    of each shard are made on the device that holds it."""
    init = lambda p: distill.init_train_state(p, optimizer, seed)
    shardings = state_shardings(jax.eval_shape(init, params), optimizer, params_sharding)
    return jax.jit(init, out_shardings=shardings)(params)


def step_shardings(
    state: distill.TrainState, frozen_sharding: Any, mesh: Mesh
) -> sharding.StepShardings:
    """The shardings the jitted steps take, read off a placed state."""
    logits = sharding.logical_to_sharding(LOGITS_AXES, mesh)
    return sharding.StepShardings(
        state=jax.tree.map(lambda x: x.sharding, state),
        frozen=frozen_sharding,
        batch=sharding.batch_sharding(mesh),
        logits=logits,
    )


# ----------------------------------------------------------------------------- batches


def process_rows(mesh: Mesh, global_batch: int) -> slice:
    """The rows of a global batch that this process's devices hold (one contiguous block)."""
    rows = sharding.batch_sharding(mesh)
    if global_batch % sharding.batch_shards(mesh):
        raise sharding.MeshError(
            f"batch of {global_batch} rows does not split over the data axes "
            f"({sharding.batch_shards(mesh)} ways)"
        )
    indices = rows.addressable_devices_indices_map((global_batch,)).values()
    spans = sorted({index[0].indices(global_batch)[:2] for index in indices})
    if any(a[1] != b[0] for a, b in zip(spans[:-1], spans[1:], strict=True)):
        raise sharding.MeshError(f"this process's rows {spans} are not one block")
    return slice(spans[0][0], spans[-1][1])


def global_batch(local: Any, mesh: Mesh, global_rows: int) -> Any:
    """A pytree of this process's rows (host arrays) -> global arrays of `global_rows`."""
    rows = sharding.batch_sharding(mesh)
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
