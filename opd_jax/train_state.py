"""The train state, the optimizer and the update machinery every step shares.

A `TrainState` holds what a resumed run needs: the trainable params, the optimizer state,
the key and, for an EMA self-teacher, the moving average; a `ValueTrainState` adds a
learned value head (`credit`); frozen params (a teacher, a LoRA base) sit beside it and
are never checkpointed. `make_update` turns any loss into a step: gradient accumulation
scans over micro-batches, each contributing its share of the whole batch's means (per
token, per sequence), so k micro-batches give the same update as one big batch; a
non-finite loss or gradient skips the update, and the host stops the run
(`raise_if_not_finite`) before it could be checkpointed. The objectives live in `distill`
(GKD, SFT); `update` builds the run's steps from both.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.struct
import gin
import jax
import jax.numpy as jnp
import optax

from opd_jax import credit, mesh, validation
from opd_jax.model import Params


@gin.configurable
@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with warmup and cosine decay, after global-norm clipping; each field a gin
    parameter of `OptimizerConfig`. grad_accum: micro-batches per update (the batch is
    split k ways to bound activation memory; the update is the same)."""

    learning_rate: float = 1e-5
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    grad_accum: int = 1

    def __post_init__(self):
        check = functools.partial(validation.check_fields, self)
        check(validation.check_number, "learning_rate", "max_grad_norm", low=0, open_low=True)
        check(validation.check_number, "weight_decay", low=0)
        check(validation.check_int, "warmup_steps", minimum=0)
        check(validation.check_int, "grad_accum", minimum=1)
        validation.check_types(self)


@flax.struct.dataclass
class TrainState:
    """Everything a resumed run needs; the teacher is not part of it."""

    step: jax.Array
    params: Params
    opt_state: optax.OptState
    rng: jax.Array  # raw uint32 key data (checkpointable); see `step_key`
    ema_params: Params | None = None  # a moving average of params (self-distillation's teacher)


@flax.struct.dataclass
class ValueTrainState(TrainState):
    """A TrainState that also learns a value head (credit "gae") with its own optimizer.

    A subclass rather than a field of TrainState: Orbax restores a checkpoint only into
    its exact tree, and a new field, even None, would refuse every existing checkpoint.
    """

    value_head: credit.ValueHead | None = None


def with_value_head(state: TrainState, value_head: credit.ValueHead) -> ValueTrainState:
    """`state` with `value_head` beside it."""
    fields = {field.name: getattr(state, field.name) for field in dataclasses.fields(TrainState)}
    return ValueTrainState(**fields, value_head=value_head)


@flax.struct.dataclass
class DistillBatch:
    """One update's sequences: prompts left-padded, completions right-padded.

    The teacher may read a different prompt (self-distillation adds privileged
    context); the completion is the same for both and is scored position by position.
    `advantage_B` carries the normalized task reward when RL is combined.
    What the rollout sampler recorded, for rows it drew from the current student
    (`on_policy_B`; 0 in the other rows): `sampler_logprob_BxN`, each token's log-prob
    under the distribution that drew it (after the rollout's temperature and filters),
    which the sampled-token estimators weigh against; `sampler_raw_logprob_BxN`, under
    the unfiltered policy at temperature 1, which the learner should reproduce.
    """

    prompt_BxP: jax.Array
    prompt_valid_BxP: jax.Array
    completion_BxN: jax.Array
    completion_mask_BxN: jax.Array
    teacher_prompt_BxQ: jax.Array | None = None
    teacher_prompt_valid_BxQ: jax.Array | None = None
    advantage_B: jax.Array | None = None
    sampler_logprob_BxN: jax.Array | None = None
    sampler_raw_logprob_BxN: jax.Array | None = None
    on_policy_B: jax.Array | None = None


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    """AdamW with linear warmup then cosine decay to 0 at `total_steps` (the run's length,
    which the experiment's schedule owns), after global-norm clipping."""
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.learning_rate,
        warmup_steps=cfg.warmup_steps,
        decay_steps=max(total_steps, cfg.warmup_steps + 1),
    )
    return optax.chain(
        optax.clip_by_global_norm(cfg.max_grad_norm),
        optax.adamw(schedule, weight_decay=cfg.weight_decay),
    )


def init_train_state(
    params: Params, optimizer: optax.GradientTransformation, seed: int
) -> TrainState:
    """A fresh state owning float32 copies of `params`: the update step donates the
    state's buffers, a student cut from its teacher shares arrays (embeddings) with it,
    and weights loaded in bfloat16 (`Models.dtype`) are trained through a float32 master
    copy, as steps smaller than bfloat16's spacing would round away."""
    params = jax.tree.map(lambda x: jnp.array(x, jnp.float32), params)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        rng=jax.random.key_data(jax.random.key(seed)),
    )


def step_key(state: TrainState) -> jax.Array:
    """This step's key: a pure function of (seed, step), so a resumed run draws exactly
    what an uninterrupted one would."""
    return jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)


class BatchCounts(NamedTuple):
    """The whole batch's normalizers, shared by its micro-batches."""

    tokens: jax.Array  # real completion tokens
    sequences: jax.Array  # rows with at least one real completion token
    sampled_tokens: jax.Array  # real completion tokens of rows the student sampled


def sampled_mask(batch: DistillBatch) -> jax.Array:
    """The completion mask of the rows the current student sampled; zeros without any."""
    mask_BxN = batch.completion_mask_BxN.astype(jnp.float32)
    if batch.on_policy_B is None:
        return jnp.zeros_like(mask_BxN)
    return mask_BxN * batch.on_policy_B.astype(jnp.float32)[:, None]


def batch_counts(batch: DistillBatch) -> BatchCounts:
    """Counts of the whole batch, each at least 1 so an empty one divides safely."""
    mask_BxN = batch.completion_mask_BxN.astype(jnp.float32)
    at_least_one = lambda x: jnp.maximum(x, 1.0)
    return BatchCounts(
        tokens=at_least_one(jnp.sum(mask_BxN)),
        sequences=at_least_one(jnp.sum(jnp.any(mask_BxN > 0, axis=1).astype(jnp.float32))),
        sampled_tokens=at_least_one(jnp.sum(sampled_mask(batch))),
    )


def _split_micro(batch: DistillBatch, k: int) -> DistillBatch:
    def split(x):
        if x.shape[0] % k:
            raise ValueError(f"batch size {x.shape[0]} is not divisible by grad_accum={k}")
        return x.reshape(k, x.shape[0] // k, *x.shape[1:])

    return jax.tree.map(split, batch)


# loss_shares(trainable, frozen, micro_batch, counts) -> {"loss": ..., other metrics...}, each
# the micro-batch's share of a whole-batch mean (normalized by `counts`); trainable is the
# params, or (params, value head params) for a ValueTrainState, whose loss_shares also
# gives "value_loss".
LossShares = Callable[[Any, Any, DistillBatch, BatchCounts], dict[str, jax.Array]]


def _apply(
    optimizer: optax.GradientTransformation,
    grads: Params,
    opt_state: optax.OptState,
    params: Params,
    finite: jax.Array,
) -> tuple[Params, optax.OptState]:
    """One optax update, or the old params and state when `finite` is false."""
    updates, new_opt_state = optimizer.update(grads, opt_state, params)
    new = (optax.apply_updates(params, updates), new_opt_state)
    return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, (params, opt_state))


def make_update(
    loss_shares: LossShares,
    grad_accum: int,
    optimizer: optax.GradientTransformation,
    value_optimizer: optax.GradientTransformation | None = None,
):
    """The shared update, unjitted (a caller may wrap it): gradients of the loss summed
    over `grad_accum` micro-batches, each normalized by the whole batch's counts, then one
    optax update. A non-finite loss or gradient keeps the old params and optimizer state
    (the host raises on `finite`).

    With `value_optimizer` the state is a ValueTrainState, and one backward pass of
    "loss" + "value_loss" gives both gradients: the value loss reads the student's hidden
    states under stop_gradient and the loss reads the values' advantages under it, so
    neither reaches the other's params. Each side then takes its own optimizer's step,
    and "grad_norm" stays the student's alone.
    """
    learns_value = value_optimizer is not None

    def update(state: TrainState, frozen: Any, batch: DistillBatch):
        if learns_value != isinstance(state, ValueTrainState):
            raise ValueError(
                "a value optimizer needs a ValueTrainState (and only it): build the state "
                "with the same value optimizer the update step is given"
            )
        counts = batch_counts(batch)
        micro_batches = _split_micro(batch, grad_accum)
        first = jax.tree.map(lambda x: x[0], micro_batches)
        trainable = (state.params, state.value_head.params) if learns_value else state.params

        def grads_and_shares(micro: DistillBatch):
            def loss(trainable):
                shares = loss_shares(trainable, frozen, micro, counts)
                value_loss = shares["value_loss"] if learns_value else 0.0
                return shares["loss"] + value_loss, shares

            return jax.grad(loss, has_aux=True)(trainable)

        zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(grads_and_shares, first))

        def accumulate(carry, micro):
            return jax.tree.map(jnp.add, carry, grads_and_shares(micro)), None

        (grads, metrics), _ = jax.lax.scan(accumulate, zeros, micro_batches)
        grads, value_grads = grads if learns_value else (grads, None)

        # A metric given as (sum, count) is a mean over a subset: divided once summed.
        is_pair = lambda v: isinstance(v, tuple)
        metrics = {
            name: value[0] / jnp.maximum(value[1], 1.0) if is_pair(value) else value
            for name, value in metrics.items()
        }
        metrics["num_tokens"] = counts.tokens
        metrics["grad_norm"] = optax.global_norm(grads)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
        if learns_value:
            metrics["value_grad_norm"] = optax.global_norm(value_grads)
            finite &= jnp.isfinite(metrics["value_loss"]) & jnp.isfinite(metrics["value_grad_norm"])
        metrics["finite"] = finite

        params, opt_state = _apply(optimizer, grads, state.opt_state, state.params, finite)
        new_state = state.replace(
            step=state.step + finite.astype(jnp.int32), params=params, opt_state=opt_state
        )
        if learns_value:
            head = state.value_head
            value_params, value_opt_state = _apply(
                value_optimizer, value_grads, head.opt_state, head.params, finite
            )
            new_state = new_state.replace(
                value_head=head.replace(params=value_params, opt_state=value_opt_state)
            )
        return new_state, metrics

    return update


def jit_update(update: Callable, shardings: mesh.StepShardings | None) -> Callable:
    """update(state, frozen, batch) jitted with the state donated. With `shardings` the
    state keeps its layout from step to step and metrics come back replicated."""
    if shardings is None:
        return jax.jit(update, donate_argnums=0)
    return jax.jit(
        update,
        donate_argnums=0,
        in_shardings=(shardings.state, shardings.frozen, shardings.batch),
        out_shardings=(shardings.state, mesh.replicated(shardings.mesh)),
    )


class NonFiniteLossError(FloatingPointError):
    """The update was skipped; the message names the step and the terms that went bad."""


def raise_if_not_finite(step: int, metrics: dict[str, Any]) -> None:
    """Host-side guard: stops the run before a bad update could be checkpointed."""
    if bool(metrics["finite"]):
        return
    bad = sorted(
        name for name, value in metrics.items() if name != "finite" and not jnp.isfinite(value)
    )
    raise NonFiniteLossError(
        f"step {step}: non-finite values in {', '.join(bad) or 'gradients'}; the update was "
        "skipped and the last checkpoint is untouched"
    )
