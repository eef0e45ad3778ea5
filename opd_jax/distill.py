"""The distillation objective on a batch, and the update machinery every step shares.

`DistillConfig` chooses the objective; `per_token_terms` runs the teacher and student
forwards over a batch's completions and `loss_terms` reduces them to the loss and the
metrics. The student's params and optimizer state live in a `TrainState`; frozen params
(a teacher, a LoRA base) sit beside it and are never checkpointed. `make_update` runs
the loss's gradient and the optax update with a NaN guard; `update.make_update_step`
builds the run's step from it, `make_sft_step` the supervised fine-tuning step. Gradient accumulation scans over micro-batches, each
contributing its share of the whole batch's means (per token, per sequence), so k
micro-batches give the same update as one big batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.struct
import gin
import jax
import jax.numpy as jnp
import optax

from opd_jax import losses, mesh, model
from opd_jax.model import ModelConfig, Params


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """What the update step optimizes; every field is a gin parameter of `DistillConfig`.

    The objective is two orthogonal choices (`losses.Objective`, which checks them):
    divergence: WHAT is minimized, "forward_kl" | "reverse_kl" | "jsd"; beta: the JSD's
      mixing weight, 0 and 1 being forward and reverse KL.
    estimator: HOW, "full" (exact, every vocabulary entry) | "teacher_topk" (the
      teacher's `top_k` tokens + a tail bucket) | "student_topk" (reverse KL over the
      student's `top_k` tokens, in `topk_form`: "stopgrad" | "renormalized" |
      "unnormalized") | "pg" | "k1" | "k3" (reverse KL from the sampled token,
      importance-weighted by the rollout's recorded log-probs; see
      `losses.sampled_estimate` and `gkd.check_rollouts` for the rollouts they accept).
    temperature: applied to teacher and student logits alike inside the loss.
    vocab_chunk: positions per chunk when computing full-vocabulary values; 0
      materializes all logits at once (fastest for small models, most memory).
    rl_alpha: GKD's alpha, the weight of the divergence when a task reward is combined
      with it (batches carrying advantages): loss = (1 - rl_alpha) * reward term +
      rl_alpha * divergence estimate (see `loss_terms` for their common scale).
    remat: recompute each layer's activations in the backward pass instead of keeping
      them: activation memory of one layer rather than all, for one more forward. Large
      models need it; on a 2-core CPU, SmolLM2-135M at 4 x 320 tokens, turning it off
      saved 8% of a fine-tuning step and 6% of a GKD update.
    """

    divergence: str = "jsd"
    beta: float = 0.5
    estimator: str = "full"
    top_k: int = 0
    topk_form: str = "stopgrad"
    temperature: float = 1.0
    vocab_chunk: int = 0
    rl_alpha: float = 1.0
    grad_accum: int = 1
    learning_rate: float = 1e-5
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    remat: bool = True

    def __post_init__(self):
        _ = self.objective  # checks the objective's fields
        if not 0.0 <= self.rl_alpha <= 1.0:
            raise ValueError(f"rl_alpha must be in [0, 1], got {self.rl_alpha}")
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {self.grad_accum}")

    @property
    def objective(self) -> losses.Objective:
        return losses.Objective(
            divergence=self.divergence,
            beta=self.beta,
            estimator=self.estimator,
            top_k=self.top_k,
            topk_form=self.topk_form,
            temperature=self.temperature,
        )


@flax.struct.dataclass
class TrainState:
    """Everything a resumed run needs; the teacher is not part of it."""

    step: jax.Array
    params: Params
    opt_state: optax.OptState
    rng: jax.Array  # raw uint32 key data (checkpointable); see `step_key`
    ema_params: Params | None = None  # a moving average of params (self-distillation's teacher)


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


class VocabMismatchError(ValueError):
    """Teacher and student cannot be compared token by token."""


def check_vocab(teacher: ModelConfig, student: ModelConfig) -> None:
    """Fails at start-up, before any compile, when the vocabularies differ."""
    if teacher.vocab_size != student.vocab_size:
        raise VocabMismatchError(
            f"teacher vocabulary has {teacher.vocab_size} entries but the student's has "
            f"{student.vocab_size}: distillation compares distributions over one shared vocabulary"
        )


def make_optimizer(cfg: DistillConfig, total_steps: int) -> optax.GradientTransformation:
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
    """A fresh state owning copies of `params`: the update step donates the state's
    buffers, and a student cut from its teacher shares arrays (embeddings) with it."""
    params = jax.tree.map(jnp.copy, params)
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


def completion_hidden(
    params: Params,
    config: ModelConfig,
    prompt_BxP: jax.Array,
    prompt_valid_BxP: jax.Array,
    completion_BxN: jax.Array,
    completion_mask_BxN: jax.Array,
    remat: bool = False,
) -> jax.Array:
    """Hidden states [B, N, D] that predict each completion token.

    The last completion token is never an input, and position P-1+j predicts
    completion token j, whatever the prompt's padding.
    """
    P = prompt_BxP.shape[1]
    tokens = jnp.concatenate([prompt_BxP, completion_BxN[:, :-1]], axis=1)
    valid = jnp.concatenate([prompt_valid_BxP, completion_mask_BxN[:, :-1].astype(bool)], axis=1)
    hidden, _ = model.hidden_states(params, tokens, config, valid_BxT=valid, remat=remat)
    return hidden[:, P - 1 :]


def _teacher_inputs(batch: DistillBatch) -> tuple[jax.Array, jax.Array]:
    if batch.teacher_prompt_BxQ is None:
        return batch.prompt_BxP, batch.prompt_valid_BxP
    return batch.teacher_prompt_BxQ, batch.teacher_prompt_valid_BxQ


def per_token_terms(
    student_params: Params,
    teacher_params: Params,
    batch: DistillBatch,
    student_config: ModelConfig,
    teacher_config: ModelConfig,
    cfg: DistillConfig,
    logits_sharding: Any = None,
) -> dict[str, jax.Array]:
    """`losses.token_statistics` of the batch's completions, each [B, N]."""
    mask = batch.completion_mask_BxN
    student_hidden = completion_hidden(
        student_params,
        student_config,
        batch.prompt_BxP,
        batch.prompt_valid_BxP,
        batch.completion_BxN,
        mask,
        remat=cfg.remat,
    )
    teacher_prompt, teacher_valid = _teacher_inputs(batch)
    teacher_hidden = jax.lax.stop_gradient(
        completion_hidden(
            teacher_params,
            teacher_config,
            teacher_prompt,
            teacher_valid,
            batch.completion_BxN,
            mask,
        )
    )
    return losses.token_statistics(
        teacher_hidden,
        jax.lax.stop_gradient(model.lm_head(teacher_params, teacher_config)),
        student_hidden,
        model.lm_head(student_params, student_config),
        batch.completion_BxN,
        cfg.objective,
        sampler_logprob_BxT=batch.sampler_logprob_BxN,
        valid_BxT=mask,
        chunk_size=cfg.vocab_chunk,
        logits_sharding=logits_sharding,
    )


class BatchCounts(NamedTuple):
    """The whole batch's normalizers, shared by its micro-batches."""

    tokens: jax.Array  # real completion tokens
    sequences: jax.Array  # rows with at least one real completion token
    sampled_tokens: jax.Array  # real completion tokens of rows the student sampled


def _sampled_mask(batch: DistillBatch) -> jax.Array:
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
        sampled_tokens=at_least_one(jnp.sum(_sampled_mask(batch))),
    )


def reward_term(
    advantage_B: jax.Array,
    student_logprob_BxN: jax.Array,
    mask_BxN: jax.Array,
    num_sequences: jax.Array,
) -> jax.Array:
    """-(1/S) sum_b A_b sum_t log q(y_bt): REINFORCE for the mean task reward per sequence.

    Its gradient is the policy gradient of E[r(y)], the sequence's reward, which is what
    GKD's RL objective (1 - alpha) E[r(y)] - alpha E[D(y)] weighs against the divergence D,
    itself a per-token mean. Both are then per-sequence quantities whose size does not
    grow with completion length; averaging log q over a sequence's tokens instead would
    optimize E[r] / length, making the reward's weight fall as completions lengthen.
    S counts the whole batch's sequences, so micro-batch terms add up to the batch's.
    """
    logprob_B = jnp.sum(jnp.where(mask_BxN.astype(bool), student_logprob_BxN, 0.0), axis=1)
    return -jnp.sum(jax.lax.stop_gradient(advantage_B) * logprob_B) / num_sequences


def _logprob_mismatch(
    terms: dict[str, jax.Array], batch: DistillBatch, counts: BatchCounts
) -> jax.Array:
    """Share of mean |sampler raw log-prob - learner log-prob at temperature 1| over the
    tokens the student sampled: nonzero means sampler and learner are not one policy."""
    if batch.sampler_raw_logprob_BxN is None:
        return jnp.zeros((), jnp.float32)
    gap_BxN = jnp.abs(batch.sampler_raw_logprob_BxN - terms["student_raw_logprob"])
    return losses.masked_mean(
        jax.lax.stop_gradient(gap_BxN), _sampled_mask(batch), counts.sampled_tokens
    )


def loss_terms(
    terms: dict[str, jax.Array], batch: DistillBatch, cfg: DistillConfig, counts: BatchCounts
) -> dict[str, jax.Array]:
    """This (micro-)batch's shares of the whole batch's loss and metrics.

    "loss" is optimized: the estimator's per-token mean ("divergence_estimate") or, with
    advantages, (1 - rl_alpha) * `reward_term` + rl_alpha * that. "divergence" is always
    the exact full-vocabulary value of cfg.divergence, never a surrogate.
    """
    mask = batch.completion_mask_BxN
    token_mean = lambda values: losses.masked_mean(values, mask, counts.tokens)
    shares = {"divergence_estimate": token_mean(terms["estimate"])}
    for name in ("divergence", "forward_kl", "reverse_kl", "teacher_entropy", "student_entropy"):
        shares[name] = token_mean(jax.lax.stop_gradient(terms[name]))
    shares["logprob_mismatch"] = _logprob_mismatch(terms, batch, counts)
    shares["loss"] = shares["divergence_estimate"]
    if batch.advantage_B is not None:
        shares["policy_gradient"] = reward_term(
            batch.advantage_B, terms["student_logprob"], mask, counts.sequences
        )
        shares["loss"] = (1 - cfg.rl_alpha) * shares["policy_gradient"] + cfg.rl_alpha * shares[
            "loss"
        ]
    return shares


def _split_micro(batch: DistillBatch, k: int) -> DistillBatch:
    def split(x):
        if x.shape[0] % k:
            raise ValueError(f"batch size {x.shape[0]} is not divisible by grad_accum={k}")
        return x.reshape(k, x.shape[0] // k, *x.shape[1:])

    return jax.tree.map(split, batch)


# loss_shares(params, frozen, micro_batch, counts) -> {"loss": ..., other metrics...}, each
# the micro-batch's share of a whole-batch mean (normalized by `counts`).
LossShares = Callable[[Params, Any, DistillBatch, BatchCounts], dict[str, jax.Array]]


def make_update(loss_shares: LossShares, grad_accum: int, optimizer: optax.GradientTransformation):
    """The shared update, unjitted (a caller may wrap it): gradients of the loss summed
    over `grad_accum` micro-batches, each normalized by the whole batch's counts, then one
    optax update. A non-finite loss or gradient keeps the old params and optimizer state
    (the host raises on `finite`)."""

    def update(state: TrainState, frozen: Any, batch: DistillBatch):
        counts = batch_counts(batch)
        micro_batches = _split_micro(batch, grad_accum)
        first = jax.tree.map(lambda x: x[0], micro_batches)

        def grads_and_shares(micro: DistillBatch):
            def loss(params):
                shares = loss_shares(params, frozen, micro, counts)
                return shares["loss"], shares

            return jax.grad(loss, has_aux=True)(state.params)

        zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(grads_and_shares, first))

        def accumulate(carry, micro):
            return jax.tree.map(jnp.add, carry, grads_and_shares(micro)), None

        (grads, metrics), _ = jax.lax.scan(accumulate, zeros, micro_batches)

        metrics = dict(metrics)
        metrics["num_tokens"] = counts.tokens
        metrics["grad_norm"] = optax.global_norm(grads)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
        metrics["finite"] = finite

        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        new_state = state.replace(
            step=state.step + finite.astype(jnp.int32),
            params=keep(params, state.params),
            opt_state=keep(opt_state, state.opt_state),
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


def make_sft_step(
    config: ModelConfig,
    grad_accum: int,
    optimizer: optax.GradientTransformation,
    shardings: mesh.StepShardings | None = None,
    remat: bool = True,
):
    """update(state, None, batch) -> (state, metrics): cross-entropy on the completions.

    Fine-tunes a teacher on the task, or a fresh student before distillation (GKD's
    students start from supervised fine-tuning). Same accumulation and NaN guard as
    the distillation step.
    """
    pinned = None if shardings is None else shardings.logits

    def loss_shares(params, _, micro, counts):
        hidden = completion_hidden(
            params,
            config,
            micro.prompt_BxP,
            micro.prompt_valid_BxP,
            micro.completion_BxN,
            micro.completion_mask_BxN,
            remat=remat,
        )
        logits = mesh.constrain(model.logits_from_hidden(params, hidden, config), pinned)
        nll = -losses.token_logprobs(logits, micro.completion_BxN)
        return {"loss": losses.masked_mean(nll, micro.completion_mask_BxN, counts.tokens)}

    return jit_update(make_update(loss_shares, grad_accum, optimizer), shardings)


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
