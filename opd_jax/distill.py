"""The objectives: GKD's divergence (and task reward) on a batch, and supervised fine-tuning.

`DistillConfig` chooses the objective; `per_token_terms` runs the teacher and student
forwards over a batch's completions and `loss_terms` reduces them to this (micro-)batch's
shares of the loss and the metrics, which `train_state.make_update` turns into a step
(`update.make_update_step` builds the run's). `make_sft_step` is the cross-entropy step
that fine-tunes a teacher or a student on the dataset's targets.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import gin
import jax
import jax.numpy as jnp
import optax

from opd_jax import credit, diagnostics, losses, mesh, model, train_state, validation
from opd_jax import tokenizer as tokenizer_lib
from opd_jax.model import ModelConfig, Params
from opd_jax.train_state import BatchCounts, DistillBatch


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DistillConfig(losses.Objective):
    """What the update step optimizes; every field is a gin parameter of `DistillConfig`.

    divergence, beta, estimator, top_k, topk_form, temperature, credit, gamma, gae_lambda,
      routing, routing_top_k: the objective, WHAT is minimized and HOW it is estimated
      (`losses.Objective`, which checks them when the config is built; the README's
      objective table lists every choice). Sampled-token estimators take only the
      rollouts `gkd.check_rollouts` accepts.
    vocab_chunk: positions per chunk when computing full-vocabulary values; 0
      materializes all logits at once (fastest for small models, most memory).
    rl_alpha: GKD's alpha, the weight of the divergence when a task reward is combined
      with it (batches carrying advantages): loss = (1 - rl_alpha) * reward term +
      rl_alpha * divergence estimate (see `loss_terms` for their common scale).
    remat: recompute each layer's activations in the backward pass instead of keeping
      them: activation memory of one layer rather than all, for one more forward. Large
      models need it; on a 2-core CPU, SmolLM2-135M at 4 x 320 tokens, turning it off
      saved 8% of a fine-tuning step and 6% of a GKD update.
    diagnostic_top_k: k of the logged top-k overlap diagnostics (`diagnostics`); 0 off.
    value_learning_rate: Adam's step size for the value head of credit "gae"
      (`credit.value_optimizer`).
    """

    vocab_chunk: int = 0
    rl_alpha: float = 1.0
    remat: bool = True
    diagnostic_top_k: int = 16
    value_learning_rate: float = 1e-3

    def __post_init__(self):
        check = functools.partial(validation.check_fields, self)
        check(validation.check_number, "rl_alpha", low=0, high=1)
        check(validation.check_number, "value_learning_rate", low=0, open_low=True)
        check(validation.check_int, "vocab_chunk", "diagnostic_top_k", minimum=0)
        super().__post_init__()  # the objective's fields, then every field's type

    def value_optimizer(self) -> optax.GradientTransformation | None:
        """The value head's optimizer when the update learns one, else None: the state and
        the update step must be built with the same."""
        return credit.value_optimizer(self.value_learning_rate) if self.learns_value else None


class VocabMismatchError(validation.ConfigError):
    """Teacher and student cannot be compared token by token."""


def check_vocab(teacher: tokenizer_lib.Tokenizer, student: tokenizer_lib.Tokenizer) -> int:
    """The size of the vocabulary teacher and student are compared over: their one
    tokenizer's. Their embedding tables may pad it to different row counts (Qwen2.5-7B
    has 152064 rows, Qwen2.5-0.5B 151936, both for 151665 tokens); rows beyond it are
    never produced by the tokenizer and get no probability (`per_token_terms`). Different
    tokenizers are refused at start-up, before any compile, in one line."""
    difference = tokenizer_lib.vocabulary_difference(teacher, student)
    if difference is not None:
        raise VocabMismatchError(
            f"teacher and student tokenizers differ (teacher vs student: {difference}): "
            "distillation compares next-token distributions id by id, and cross-tokenizer "
            "distillation is not supported yet"
        )
    return student.vocab_size


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
    value_params: Params | None = None,
    vocab_size: int | None = None,
) -> dict[str, jax.Array]:
    """`losses.token_statistics` of the batch's completions, each [B, N], and with
    `value_params` the value head's "value" of each position (`credit.values`).

    `vocab_size`: the shared tokenizer's (`check_vocab`); both heads are cut to it, so the
    padding rows beyond it in either embedding table get no probability and no gradient,
    and tables padded to different sizes compare. None: both heads whole (equal sizes)."""
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
    teacher_head = jax.lax.stop_gradient(model.lm_head(teacher_params, teacher_config))
    terms = losses.token_statistics(
        teacher_hidden,
        teacher_head[:, :vocab_size],
        student_hidden,
        model.lm_head(student_params, student_config)[:, :vocab_size],
        batch.completion_BxN,
        cfg,
        sampler_logprob_BxT=batch.sampler_logprob_BxN,
        valid_BxT=mask,
        chunk_size=cfg.vocab_chunk,
        diagnostic_k=cfg.diagnostic_top_k,
        logits_sharding=logits_sharding,
    )
    if value_params is not None:
        terms["value"] = credit.values(value_params, student_hidden)
    return terms


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
        jax.lax.stop_gradient(gap_BxN), train_state.sampled_mask(batch), counts.sampled_tokens
    )


def _diagnostics(
    terms: dict[str, jax.Array], batch: DistillBatch, counts: BatchCounts
) -> dict[str, Any]:
    """The `diagnostics` of this (micro-)batch: token means of the top-k overlap values
    and of the teacher-student entropy gap; the exact divergence of each third of the
    completions; and the per-token reward log p - log q of the tokens the student sampled,
    on the shared top-k set and off it. Means over a subset whose size the whole batch
    does not know in advance are (sum, count) pairs that `train_state.make_update`
    divides after accumulation."""
    sg = jax.lax.stop_gradient
    mask_BxN = batch.completion_mask_BxN.astype(jnp.float32)
    token_mean = lambda values: losses.masked_mean(sg(values), mask_BxN, counts.tokens)
    out = {"entropy_gap": token_mean(terms["teacher_entropy"] - terms["student_entropy"])}
    pair = lambda values, where: (jnp.sum(where * sg(values)), jnp.sum(where))
    thirds_BxN = diagnostics.position_thirds(mask_BxN)
    for index, third in enumerate(("first", "middle", "last")):
        where = mask_BxN * (thirds_BxN == index)
        out[f"divergence_{third}_third"] = pair(terms["divergence"], where)
    if "overlap_ratio" not in terms:
        return out
    for name in ("overlap_ratio", "overlap_mass_teacher", "overlap_mass_student"):
        out[name] = token_mean(terms[name])
    reward_BxN = terms["teacher_logprob"] - terms["student_logprob"]
    sampled_BxN, shared_BxN = train_state.sampled_mask(batch), terms["token_in_overlap"]
    out["reward_on_overlap"] = pair(reward_BxN, sampled_BxN * shared_BxN)
    out["reward_off_overlap"] = pair(reward_BxN, sampled_BxN * (1.0 - shared_BxN))
    return out


def _credited_estimate(
    terms: dict[str, jax.Array], batch: DistillBatch, cfg: DistillConfig, counts: BatchCounts
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """pg's per-token estimate with cfg's credit and routing: its value, the gradient of
    `credit.surrogate`; and their metrics: the mean advantage, the fraction of tokens
    routed and, with a value head, its loss (half the mean squared error against the
    lambda-returns) and the mean return."""
    sg = jax.lax.stop_gradient
    mask = batch.completion_mask_BxN
    token_mean = lambda values: losses.masked_mean(values, mask, counts.tokens)
    value_BxN = terms.get("value")
    reward_BxN = sg(terms["teacher_logprob"] - terms["student_logprob"])
    advantage_BxN = credit.advantages(
        reward_BxN,
        mask,
        cfg.credit,
        cfg.gamma,
        cfg.gae_lambda,
        None if value_BxN is None else sg(value_BxN),
    )
    estimate_BxN = sg(terms["estimate"]) + credit.surrogate(
        advantage_BxN,
        terms["student_logprob"],
        batch.sampler_logprob_BxN,
        mask,
        terms.get("routed_logprob"),
        terms.get("routed"),
    )
    shares = {"advantage_mean": token_mean(advantage_BxN)}
    if "routed" in terms:
        shares["routed_fraction"] = token_mean(credit.routes(advantage_BxN, terms["routed"]))
    if value_BxN is not None:
        return_BxN = credit.value_targets(advantage_BxN, sg(value_BxN))
        shares["value_loss"] = token_mean(0.5 * jnp.square(value_BxN - return_BxN))
        shares["return_mean"] = token_mean(return_BxN)
    return estimate_BxN, shares


def loss_terms(
    terms: dict[str, jax.Array], batch: DistillBatch, cfg: DistillConfig, counts: BatchCounts
) -> dict[str, jax.Array]:
    """This (micro-)batch's shares of the whole batch's loss and metrics.

    "loss" is optimized: the estimator's per-token mean ("divergence_estimate") or, with
    advantages, (1 - rl_alpha) * `reward_term` + rl_alpha * that. "divergence" is always
    the exact full-vocabulary value of cfg.divergence, never a surrogate. Credit and
    routing other than pg's own change the estimate's gradient, not its value, and add
    their metrics (`_credited_estimate`); "value_loss" trains the value head alone
    (`train_state.make_update`).
    """
    mask = batch.completion_mask_BxN
    token_mean = lambda values: losses.masked_mean(values, mask, counts.tokens)
    estimate_BxN, shares = terms["estimate"], {}
    if cfg.reassigns_credit:
        estimate_BxN, shares = _credited_estimate(terms, batch, cfg, counts)
    shares["divergence_estimate"] = token_mean(estimate_BxN)
    for name in ("divergence", "forward_kl", "reverse_kl", "teacher_entropy", "student_entropy"):
        shares[name] = token_mean(jax.lax.stop_gradient(terms[name]))
    shares["logprob_mismatch"] = _logprob_mismatch(terms, batch, counts)
    shares |= _diagnostics(terms, batch, counts)
    shares["loss"] = shares["divergence_estimate"]
    if batch.advantage_B is not None:
        shares["policy_gradient"] = reward_term(
            batch.advantage_B, terms["student_logprob"], mask, counts.sequences
        )
        shares["loss"] = (1 - cfg.rl_alpha) * shares["policy_gradient"] + cfg.rl_alpha * shares[
            "loss"
        ]
    return shares


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

    return train_state.jit_update(
        train_state.make_update(loss_shares, grad_accum, optimizer), shardings
    )
