"""The one distillation step of every recipe: rollout, then update.

A run is a choice along four axes, all static:
  student adapter: full fine-tuning, or LoRA adapters over a frozen base;
  teacher: a separate frozen model, or the student itself (`opsd.SelfTeacher`: its
    fixed initial weights, a moving average, or its live weights);
  teacher context: the student's prompt, or a privileged one (`opsd.PrivilegedContext`);
  objective: `distill.DistillConfig`; completions: the GKD mixture (`gkd`).
`Roles` holds the first two; the frozen arrays beside the train state (`Frozen`) are the
separate teacher's params and the LoRA / fixed-teacher base. Both jitted functions
resolve the student's and the teacher's full weights from (state, frozen) inside the
trace, so GKD and OPSD run the same compiled code path, on one device or a mesh.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from opd_jax import credit, distill, gkd, lora, mesh, opsd, sampling, train_state
from opd_jax.lora import LoraConfig
from opd_jax.model import ModelConfig, Params
from opd_jax.train_state import DistillBatch, TrainState

# {"teacher": a separate teacher's params or None, "base": the LoRA base / the fixed
# self-teacher's weights, or None}; never differentiated, never checkpointed.
Frozen = dict[str, Params | None]


@dataclasses.dataclass(frozen=True)
class Roles:
    """Who teaches whom; hashable, so the jitted steps take it as static.

    vocab_size: the tokenizer's vocabulary (`distill.check_vocab`), which the loss compares
    the two models over; rows of either embedding table beyond it are padding. None: the
    tables have one size and no padding to leave out.
    """

    student: ModelConfig
    teacher: ModelConfig
    self_teacher: opsd.SelfTeacher | None = None  # None: a separate teacher model
    lora: LoraConfig | None = None
    vocab_size: int | None = None

    def __post_init__(self):
        rows = {"student": self.student.vocab_size, "teacher": self.teacher.vocab_size}
        if self.vocab_size is None and rows["student"] != rows["teacher"]:
            raise ValueError(
                f"embedding tables of {rows} rows: give Roles.vocab_size, the size of the "
                "vocabulary their tokenizer shares (`distill.check_vocab`)"
            )
        if self.vocab_size is not None and not 1 <= self.vocab_size <= min(rows.values()):
            raise ValueError(
                f"a vocabulary of {self.vocab_size} tokens does not fit embedding tables of "
                f"{rows} rows"
            )

    @property
    def teacher_kind(self) -> str:
        return "separate" if self.self_teacher is None else self.self_teacher.weights

    @property
    def needs_base(self) -> bool:
        """Whether the student's initial weights stay beside the state, frozen."""
        return self.lora is not None or self.teacher_kind == "fixed"


@dataclasses.dataclass(frozen=True)
class StudentShape:
    """What a distillation checkpoint must match to be resumed: the model, the LoRA shape
    (another rank or target set is another params tree), the teacher kind (ema keeps
    a second params tree in the state) and the width of a learned value head (None
    without one, as in checkpoints older than the field: `loop` reads a missing field as
    None)."""

    model: ModelConfig
    lora: LoraConfig | None
    teacher: str
    value_head: int | None = None


def student_shape(roles: Roles, learns_value: bool = False) -> StudentShape:
    """`learns_value`: the state holds a value head (`distill.DistillConfig.learns_value`)."""
    width = roles.student.d_model if learns_value else None
    return StudentShape(roles.student, roles.lora, roles.teacher_kind, width)


def frozen_arrays(roles: Roles, student_params: Params, teacher_params: Params | None) -> Frozen:
    """The frozen side of a run, from the student's initial and the teacher's params."""
    return {
        "teacher": teacher_params if roles.self_teacher is None else None,
        "base": student_params if roles.needs_base else None,
    }


def student_weights(roles: Roles, trainable: Params, frozen: Frozen) -> Params:
    return lora.student_weights(trainable, frozen["base"], roles.lora)


def teacher_weights(roles: Roles, state: TrainState, frozen: Frozen) -> Params:
    if roles.self_teacher is None:
        return frozen["teacher"]
    return opsd.self_teacher_weights(
        roles.teacher_kind, state.params, frozen["base"], state.ema_params, roles.lora
    )


# ----------------------------------------------------------------------------- state


def init_state(
    roles: Roles,
    student_params: Params,
    optimizer: optax.GradientTransformation,
    seed: int,
    value_optimizer: optax.GradientTransformation | None = None,
) -> TrainState:
    """A fresh state: the student's weights (copied) or zero-effect adapters, plus the
    moving average when the teacher is "ema", and a value head when `value_optimizer` is
    given (`distill.DistillConfig.value_optimizer`)."""
    trainable = student_params
    if roles.lora is not None:
        trainable = lora.init(
            student_params, roles.lora, jax.random.fold_in(jax.random.key(seed), 1)
        )
    state = train_state.init_train_state(trainable, optimizer, seed)
    if roles.teacher_kind == "ema":
        state = state.replace(ema_params=jax.tree.map(jnp.copy, state.params))
    if value_optimizer is not None:
        head = credit.init_value_head(roles.student.d_model, value_optimizer)
        state = train_state.with_value_head(state, head)
    return state


def state_shardings(
    abstract_state: TrainState, optimizer: optax.GradientTransformation, params_sharding: Any
) -> TrainState:
    """Shardings of a TrainState: params (and their moving average) as given, optimizer
    moments like their params, everything else (step, counts, rng, a value head and its
    optimizer state, a few KB) replicated."""
    replicated = mesh.replicated(jax.tree.leaves(params_sharding)[0].mesh)
    opt_state = optax.tree_utils.tree_map_params(
        optimizer,
        lambda _, s: s,
        abstract_state.opt_state,
        params_sharding,
        transform_non_params=lambda _: replicated,
    )
    ema = None if abstract_state.ema_params is None else params_sharding
    shardings = TrainState(
        step=replicated, params=params_sharding, opt_state=opt_state, rng=replicated, ema_params=ema
    )
    if isinstance(abstract_state, train_state.ValueTrainState):
        head = jax.tree.map(lambda _: replicated, abstract_state.value_head)
        shardings = train_state.with_value_head(shardings, head)
    return shardings


def create_state(
    roles: Roles,
    student_params: Params,
    optimizer: optax.GradientTransformation,
    seed: int,
    student_sharding: Any,
    value_optimizer: optax.GradientTransformation | None = None,
) -> TrainState:
    """`init_state` built directly in its shardings, so each shard of the optimizer
    moments is made on the device that keeps it. Full weights follow the student's
    layout; LoRA adapters (a few MB) are replicated."""
    init = lambda p: init_state(roles, p, optimizer, seed, value_optimizer)
    abstract = jax.eval_shape(init, student_params)
    trainable_sharding = student_sharding
    if roles.lora is not None:
        replicated = mesh.replicated(jax.tree.leaves(student_sharding)[0].mesh)
        trainable_sharding = jax.tree.map(lambda _: replicated, abstract.params)
    shardings = state_shardings(abstract, optimizer, trainable_sharding)
    return jax.jit(init, out_shardings=shardings)(student_params)


def step_shardings(
    state: TrainState, frozen_sharding: Any, placement: mesh.Placement
) -> mesh.StepShardings:
    """The shardings the jitted steps take, read off a placed state."""
    state_sharding = jax.tree.map(lambda x: x.sharding, state)
    return mesh.StepShardings(state_sharding, frozen_sharding, placement)


# ----------------------------------------------------------------------------- steps


def make_update_step(
    roles: Roles,
    cfg: distill.DistillConfig,
    optimizer: optax.GradientTransformation,
    shardings: mesh.StepShardings | None = None,
    grad_accum: int = 1,
):
    """update(state, frozen, batch) -> (state, metrics), jitted, state donated; metrics as
    `distill.loss_terms` gives them (replicated on a mesh), accumulated over `grad_accum`
    micro-batches. Without `shardings`, one device. When cfg learns a value head, the
    state must hold one (`init_state` with cfg.value_optimizer()).
    """

    def loss_shares(trainable, frozen_and_ema, micro, counts):
        frozen, ema = frozen_and_ema
        params, value_params = trainable if cfg.learns_value else (trainable, None)
        view = TrainState(step=None, params=params, opt_state=None, rng=None, ema_params=ema)
        terms = distill.per_token_terms(
            student_weights(roles, params, frozen),
            teacher_weights(roles, view, frozen),
            micro,
            roles.student,
            roles.teacher,
            cfg,
            None if shardings is None else shardings.logits,
            value_params,
            roles.vocab_size,
        )
        return distill.loss_terms(terms, micro, cfg, counts)

    inner = train_state.make_update(loss_shares, grad_accum, optimizer, cfg.value_optimizer())

    def update(state: TrainState, frozen: Frozen, batch: DistillBatch):
        new_state, metrics = inner(state, (frozen, state.ema_params), batch)
        if roles.teacher_kind == "ema":
            averaged = opsd.ema_update(
                state.ema_params, new_state.params, roles.self_teacher.ema_decay
            )
            keep = lambda n, o: jnp.where(metrics["finite"], n, o)
            new_state = new_state.replace(ema_params=jax.tree.map(keep, averaged, state.ema_params))
        return new_state, metrics

    return train_state.jit_update(update, shardings)


def make_alignment_scorer(
    roles: Roles, cfg: distill.DistillConfig, shardings: mesh.StepShardings | None = None
):
    """score(state, frozen, batch) -> [B], jitted: each completion's mean top-k overlap
    ratio (`diagnostics.topk_overlap`, k = cfg.diagnostic_top_k) between the teacher's and
    the student's next-token distributions, which teacher-aligned prompt selection ranks
    prompts by. Without `shardings`, one device."""
    if cfg.diagnostic_top_k < 1:
        raise ValueError("scoring alignment needs DistillConfig.diagnostic_top_k >= 1")

    def score(state: TrainState, frozen: Frozen, batch: DistillBatch) -> jax.Array:
        terms = distill.per_token_terms(
            student_weights(roles, state.params, frozen),
            teacher_weights(roles, state, frozen),
            batch,
            roles.student,
            roles.teacher,
            cfg,
            None if shardings is None else shardings.logits,
            vocab_size=roles.vocab_size,
        )
        mask_BxN = batch.completion_mask_BxN.astype(jnp.float32)
        return jnp.sum(terms["overlap_ratio"] * mask_BxN, 1) / jnp.maximum(mask_BxN.sum(1), 1.0)

    if shardings is None:
        return jax.jit(score)
    rows = shardings.batch
    return jax.jit(
        score, in_shardings=(shardings.state, shardings.frozen, rows), out_shardings=rows
    )


def make_rollout(
    roles: Roles,
    mixture: gkd.MixtureConfig,
    sampling_cfg: sampling.SamplingConfig,
    shardings: mesh.StepShardings | None = None,
):
    """rollout(state, frozen, prompt, prompt_valid, target, target_valid, teacher_prompt,
    teacher_prompt_valid) -> (DistillBatch, on_policy_B), jitted.

    Completions come from the GKD mixture (`gkd.mixture_completions`): the student's own
    samples, the dataset's targets, or the teacher's samples, drawn from the teacher's
    own (possibly privileged) context. Completions have the target width N, which must
    equal sampling_cfg.max_new_tokens. Without `shardings`, one device.
    """
    placement = None if shardings is None else shardings.placement

    def rollout_fn(
        state,
        frozen,
        prompt_BxP,
        prompt_valid_BxP,
        target_BxN,
        target_valid_BxN,
        teacher_BxQ,
        teacher_valid_BxQ,
    ):
        N = target_BxN.shape[1]
        if sampling_cfg.max_new_tokens != N:
            raise ValueError(
                f"target width {N} != max_new_tokens {sampling_cfg.max_new_tokens}: on- and "
                "off-policy completions must have one shape"
            )

        # Weights are resolved inside the branch that samples with them, not before it.
        def sampler(weights, prompt, valid, model_config):
            return lambda key: sampling.sample(
                weights(), prompt, valid, key, model_config, sampling_cfg, placement
            )

        student_params = lambda: student_weights(roles, state.params, frozen)
        student = sampler(student_params, prompt_BxP, prompt_valid_BxP, roles.student)
        teacher_params = lambda: teacher_weights(roles, state, frozen)
        teacher = sampler(teacher_params, teacher_BxQ, teacher_valid_BxQ, roles.teacher)
        completions, on_B = gkd.mixture_completions(
            mixture, train_state.step_key(state), student, teacher, target_BxN, target_valid_BxN
        )
        batch = DistillBatch(
            prompt_BxP=prompt_BxP,
            prompt_valid_BxP=prompt_valid_BxP,
            completion_BxN=completions.tokens_BxN,
            completion_mask_BxN=completions.mask_BxN,
            teacher_prompt_BxQ=teacher_BxQ,
            teacher_prompt_valid_BxQ=teacher_valid_BxQ,
            sampler_logprob_BxN=completions.sampler_logprob_BxN,
            sampler_raw_logprob_BxN=completions.sampler_raw_logprob_BxN,
            on_policy_B=on_B,
        )
        return batch, on_B

    if shardings is None:
        return jax.jit(rollout_fn)
    rows = shardings.batch
    return jax.jit(
        rollout_fn,
        in_shardings=(shardings.state, shardings.frozen, *(rows,) * 6),
        out_shardings=(rows, rows),
    )
