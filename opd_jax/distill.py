"""The GKD train state and the jitted update step.

The student's params and optimizer state live in a `TrainState`; the teacher's params
sit beside it, frozen, and are never checkpointed. One jitted function runs the
teacher forward, the student forward and backward, the loss, and the optax update,
with the state's buffers donated. Gradient accumulation scans over micro-batches and
normalizes by the real-token count of the whole batch, so k micro-batches give the
same update as one big batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

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

    divergence: "forward_kl" | "reverse_kl" | "jsd" (full vocabulary), or
      "sampled_reverse_kl" (the per-token reward log p_teacher - log q_student at the
      sampled token, trained with a policy-gradient surrogate).
    beta: JSD mixing weight; 0 and 1 are forward and reverse KL (see `losses`).
    temperature: applied to teacher and student logits alike inside the loss.
    vocab_chunk: positions per chunk when computing full-vocabulary divergences; 0
      materializes all logits at once (fastest for small models, most memory).
    rl_alpha: the weight of the divergence when a task reward is combined with it:
      loss = (1 - rl_alpha) * policy-gradient loss + rl_alpha * divergence.
    remat: recompute each layer's activations in the backward pass instead of keeping
      them: activation memory of one layer rather than all, for one more forward. Large
      models need it; on a 2-core CPU, SmolLM2-135M at 4 x 320 tokens, turning it off
      saved 8% of a fine-tuning step and 6% of a GKD update.
    """

    divergence: str = "jsd"
    beta: float = 0.5
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
        if self.divergence not in losses.FULL_VOCAB_KINDS + ("sampled_reverse_kl",):
            raise ValueError(f"divergence {self.divergence!r} is not supported")
        if not 0.0 <= self.rl_alpha <= 1.0:
            raise ValueError(f"rl_alpha must be in [0, 1], got {self.rl_alpha}")
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {self.grad_accum}")


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
    `advantage_B` carries the group-normalized task reward when RL is combined.
    """

    prompt_BxP: jax.Array
    prompt_valid_BxP: jax.Array
    completion_BxN: jax.Array
    completion_mask_BxN: jax.Array
    teacher_prompt_BxQ: jax.Array | None = None
    teacher_prompt_valid_BxQ: jax.Array | None = None
    advantage_B: jax.Array | None = None


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
    """Per-token divergence, token log-probs and entropies, each [B, N]."""
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
        kind=cfg.divergence if cfg.divergence in losses.FULL_VOCAB_KINDS else "reverse_kl",
        beta=cfg.beta,
        temperature=cfg.temperature,
        chunk_size=cfg.vocab_chunk,
        logits_sharding=logits_sharding,
    )


def loss_sum(
    terms: dict[str, jax.Array], batch: DistillBatch, cfg: DistillConfig
) -> dict[str, jax.Array]:
    """Sums over real tokens of each loss term (normalized later by the batch's count)."""
    mask = batch.completion_mask_BxN.astype(jnp.float32)
    if cfg.divergence == "sampled_reverse_kl":
        reward = terms["teacher_logprob"] - terms["student_logprob"]
        divergence = losses.policy_gradient_loss(reward, terms["student_logprob"])
    else:
        divergence = terms["divergence"]
    sums = {"divergence": jnp.sum(divergence * mask)}
    if batch.advantage_B is not None:
        pg = -jax.lax.stop_gradient(batch.advantage_B)[:, None] * terms["student_logprob"]
        sums["policy_gradient"] = jnp.sum(pg * mask)
        sums["loss"] = (1 - cfg.rl_alpha) * sums["policy_gradient"] + cfg.rl_alpha * sums[
            "divergence"
        ]
    else:
        sums["loss"] = sums["divergence"]
    for name in ("forward_kl", "reverse_kl", "teacher_entropy", "student_entropy"):
        sums[name] = jnp.sum(jax.lax.stop_gradient(terms[name]) * mask)
    return sums


def _split_micro(batch: DistillBatch, k: int) -> DistillBatch:
    def split(x):
        if x.shape[0] % k:
            raise ValueError(f"batch size {x.shape[0]} is not divisible by grad_accum={k}")
        return x.reshape(k, x.shape[0] // k, *x.shape[1:])

    return jax.tree.map(split, batch)


# loss_sums(params, frozen, micro_batch) -> {"loss": sum over real tokens, other sums...}
LossSums = Callable[[Params, Any, DistillBatch], dict[str, jax.Array]]


def make_update(loss_sums: LossSums, grad_accum: int, optimizer: optax.GradientTransformation):
    """The shared update, unjitted (a caller may wrap it): gradients of loss_sums / (real
    tokens in the whole batch), accumulated over `grad_accum` micro-batches, then one optax
    update. A non-finite loss or gradient keeps the old params and optimizer state (the host
    raises on `finite`)."""

    def micro_grads(params, frozen, micro: DistillBatch, num_tokens):
        def scaled_loss(p):
            sums = loss_sums(p, frozen, micro)
            return sums["loss"] / num_tokens, sums

        return jax.grad(scaled_loss, has_aux=True)(params)

    def update(state: TrainState, frozen: Any, batch: DistillBatch):
        num_tokens = jnp.maximum(jnp.sum(batch.completion_mask_BxN.astype(jnp.float32)), 1.0)
        micro_batches = _split_micro(batch, grad_accum)
        first = jax.tree.map(lambda x: x[0], micro_batches)
        grads_and_sums = lambda micro: micro_grads(state.params, frozen, micro, num_tokens)
        zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(grads_and_sums, first))

        def accumulate(carry, micro):
            return jax.tree.map(jnp.add, carry, grads_and_sums(micro)), None

        (grads, sums), _ = jax.lax.scan(accumulate, zeros, micro_batches)

        metrics = {name: value / num_tokens for name, value in sums.items()}
        metrics["num_tokens"] = num_tokens
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


def _make_step(
    loss_sums: LossSums,
    grad_accum: int,
    optimizer: optax.GradientTransformation,
    shardings: mesh.StepShardings | None,
):
    """`make_update` jitted with the state donated. With `shardings` the state keeps its
    layout from step to step and metrics come back replicated."""
    update = make_update(loss_sums, grad_accum, optimizer)
    if shardings is None:
        return jax.jit(update, donate_argnums=0)
    return jax.jit(
        update,
        donate_argnums=0,
        in_shardings=(shardings.state, shardings.frozen, shardings.batch),
        out_shardings=(shardings.state, mesh.replicated(shardings.mesh)),
    )


def make_update_step(
    student_config: ModelConfig,
    teacher_config: ModelConfig,
    cfg: DistillConfig,
    optimizer: optax.GradientTransformation,
    shardings: mesh.StepShardings | None = None,
):
    """update(state, teacher_params, batch) -> (state, metrics), jitted, state donated.

    Metrics are means over the batch's real completion tokens: loss, divergence,
    forward_kl, reverse_kl, teacher_entropy, student_entropy (and policy_gradient when
    the batch carries advantages), plus num_tokens, grad_norm and finite.
    """
    check_vocab(teacher_config, student_config)
    logits = None if shardings is None else shardings.logits

    def loss_sums(params, teacher_params, micro):
        terms = per_token_terms(
            params, teacher_params, micro, student_config, teacher_config, cfg, logits
        )
        return loss_sum(terms, micro, cfg)

    return _make_step(loss_sums, cfg.grad_accum, optimizer, shardings)


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

    def loss_sums(params, _, micro):
        mask = micro.completion_mask_BxN.astype(jnp.float32)
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
        nll = -losses.token_logprobs(logits, micro.completion_BxN) * mask
        return {"loss": jnp.sum(nll)}

    return _make_step(loss_sums, grad_accum, optimizer, shardings)


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
