"""On-policy self-distillation with privileged teacher context (OPSD, Zhao et al. 2026).

One model teaches itself. The student sees the rendered question; the teacher is the same
model with privileged text in its context (a worked solution, or a shared rule in the
system prompt), rendered with the same chat template. The student samples a completion,
the completion is appended to both contexts, and the student is trained toward the
teacher's token distributions at the completion positions (`distill.per_token_terms`
reads them there whatever each context's length and padding).

The teacher's weights are one of:
  fixed: the initial weights. With LoRA these are the base params themselves, so the
    teacher costs no second copy of the model.
  ema:   a moving average of the student's trainable params, kept in the train state.
    With LoRA the adapters are averaged (their product is not the average of products,
    but memory stays at adapter size); for full fine-tuning it is the weights' average.
  live:  the current student weights, under stop-gradient.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import gin
import jax
import jax.numpy as jnp
import optax

from opd_jax import data, distill, lora, sampling
from opd_jax.distill import DistillBatch, TrainState
from opd_jax.lora import LoraConfig
from opd_jax.model import ModelConfig, Params

TEACHERS = ("fixed", "ema", "live")
PLACEMENTS = ("user", "system")

# ----------------------------------------------------------------------------- contexts


@gin.configurable
@dataclasses.dataclass(frozen=True)
class PrivilegedContext:
    """What only the teacher sees.

    text: formatted with the example's fields, so it is per-instance ("{target}" is the
      worked solution) or a shared rule (no fields). Per-instance text should end with the
      transition instruction that hands over to the answer.
    placement: "user" appends it to the user turn after the question; "system" appends it
      to the system prompt, which the student then must carry explicitly (`Task.system`),
      or the chat template's default system prompt would differ between the two. A
      system-placed block is one shared rule: it is not formatted with example fields.
    """

    text: str = (
        "Here is a reference solution to this problem:\n{target}\n\n"
        "After understanding the reference solution, solve the problem yourself, step by "
        "step, and end with the line '#### <answer>'."
    )
    placement: str = "user"
    separator: str = "\n\n"

    def __post_init__(self):
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement {self.placement!r} is not one of {PLACEMENTS}")
        if self.placement == "system" and "{" in self.text:
            raise ValueError("a system-placed privileged block is shared: it cannot name fields")


def teacher_template(student: data.PromptTemplate, ctx: PrivilegedContext) -> data.PromptTemplate:
    """The student's template with the privileged block added where `ctx` places it."""
    if ctx.placement == "user":
        return dataclasses.replace(
            student, instruction=student.instruction + ctx.separator + ctx.text
        )
    system = student.system + ctx.separator + ctx.text if student.system else ctx.text
    return dataclasses.replace(student, system=system)


class TemplateMismatchError(ValueError):
    """Student and teacher contexts differ in more than the privileged block."""


_BLOCK_MARK = "\ue001"  # a private-use character that no template or dataset contains


def check_contexts(
    example: Mapping[str, Any],
    student: data.PromptTemplate,
    ctx: PrivilegedContext,
    student_tokenizer: data.Tokenizer,
    teacher_tokenizer: data.Tokenizer,
) -> None:
    """Refuses to start unless the teacher's rendering, with its privileged block taken
    out, is the student's rendering character for character, and both stop on one EOS.

    Catches a teacher rendered by another chat template, and a system-placed block that
    silently replaces the template's default system prompt. The error shows both
    renderings, the block as [privileged].
    """
    teacher_marked = teacher_template(student, dataclasses.replace(ctx, text=_BLOCK_MARK))
    student_text = data.render_prompt(example, student, student_tokenizer)
    teacher_text = data.render_prompt(example, teacher_marked, teacher_tokenizer)
    stripped = teacher_text.replace(ctx.separator + _BLOCK_MARK, "").replace(_BLOCK_MARK, "")
    problems = []
    if stripped != student_text:
        problems.append("renderings differ outside the privileged block")
    if student_tokenizer.eos_id != teacher_tokenizer.eos_id:
        problems.append(
            f"EOS differs (student {student_tokenizer.eos_id}, teacher {teacher_tokenizer.eos_id})"
        )
    if problems:
        raise TemplateMismatchError(
            f"student and teacher contexts: {'; '.join(problems)}.\n"
            f"--- student rendering ---\n{student_text}\n"
            f"--- teacher rendering ---\n{teacher_text.replace(_BLOCK_MARK, '[privileged]')}"
        )


# ----------------------------------------------------------------------------- training


@gin.configurable
@dataclasses.dataclass(frozen=True)
class SelfDistillConfig:
    """teacher: "fixed" | "ema" | "live" (see the module docstring); ema_decay: the weight
    of the old average at each step."""

    teacher: str = "fixed"
    ema_decay: float = 0.99

    def __post_init__(self):
        if self.teacher not in TEACHERS:
            raise ValueError(f"teacher {self.teacher!r} is not one of {TEACHERS}")
        if not 0.0 <= self.ema_decay <= 1.0:
            raise ValueError(f"ema_decay must be in [0, 1], got {self.ema_decay}")


@dataclasses.dataclass(frozen=True)
class StudentShape:
    """What a checkpoint must match to be resumed: the model, the LoRA shape (a different
    rank or target set is another params tree) and the teacher kind (ema keeps params)."""

    model: ModelConfig
    lora: LoraConfig | None
    teacher: str


def student_weights(trainable: Params, base: Params, lora_cfg: LoraConfig | None) -> Params:
    """The full params the student runs: base + adapters, or the trainable params."""
    return trainable if lora_cfg is None else lora.merge(base, trainable, lora_cfg)


def teacher_weights(
    kind: str,
    trainable: Params,
    base: Params,
    ema: Params | None,
    lora_cfg: LoraConfig | None,
) -> Params:
    """The teacher's full params for one step, never differentiated."""
    if kind == "fixed":
        return base
    source = ema if kind == "ema" else trainable
    return jax.lax.stop_gradient(student_weights(source, base, lora_cfg))


def init_state(
    base: Params,
    lora_cfg: LoraConfig | None,
    sd: SelfDistillConfig,
    optimizer: optax.GradientTransformation,
    seed: int,
) -> TrainState:
    """The state of a fresh run: adapters (B = 0) or a copy of the weights, plus the
    moving average when the teacher is `ema`."""
    key = jax.random.fold_in(jax.random.key(seed), 1)
    trainable = base if lora_cfg is None else lora.init(base, lora_cfg, key)
    state = distill.init_train_state(trainable, optimizer, seed)
    if sd.teacher == "ema":
        state = state.replace(ema_params=jax.tree.map(jnp.copy, state.params))
    return state


def make_update_step(
    config: ModelConfig,
    cfg: distill.DistillConfig,
    sd: SelfDistillConfig,
    lora_cfg: LoraConfig | None,
    optimizer: optax.GradientTransformation,
):
    """update(state, base, batch) -> (state, metrics), jitted, state donated.

    `base` is the initial weights (the frozen base under LoRA); the batch carries the
    teacher's prompts. Metrics as `distill.make_update_step`.
    """

    def loss_shares(trainable, frozen, micro, counts):
        base, ema = frozen
        student = student_weights(trainable, base, lora_cfg)
        teacher = teacher_weights(sd.teacher, trainable, base, ema, lora_cfg)
        terms = distill.per_token_terms(student, teacher, micro, config, config, cfg)
        return distill.loss_terms(terms, micro, cfg, counts)

    inner = distill.make_update(loss_shares, cfg.grad_accum, optimizer)

    def update(state: TrainState, base: Params, batch: DistillBatch):
        if batch.teacher_prompt_BxQ is None:
            raise ValueError("self-distillation needs the teacher's prompts in the batch")
        new_state, metrics = inner(state, (base, state.ema_params), batch)
        if sd.teacher == "ema":
            d = sd.ema_decay
            averaged = jax.tree.map(
                lambda e, p: d * e + (1 - d) * p, state.ema_params, new_state.params
            )
            keep = lambda n, o: jnp.where(metrics["finite"], n, o)
            new_state = new_state.replace(ema_params=jax.tree.map(keep, averaged, state.ema_params))
        return new_state, metrics

    return jax.jit(update, donate_argnums=0)


def make_rollout(
    config: ModelConfig, lora_cfg: LoraConfig | None, sampling_cfg: sampling.SamplingConfig
):
    """rollout(state, base, prompt, prompt_valid, teacher_prompt, teacher_prompt_valid) ->
    DistillBatch, jitted: the current student's samples, keyed by the state's step."""

    def rollout(state, base, prompt_BxP, prompt_valid_BxP, teacher_BxQ, teacher_valid_BxQ):
        weights = student_weights(state.params, base, lora_cfg)
        samples = sampling.sample(
            weights, prompt_BxP, prompt_valid_BxP, distill.step_key(state), config, sampling_cfg
        )
        return DistillBatch(
            prompt_BxP=prompt_BxP,
            prompt_valid_BxP=prompt_valid_BxP,
            completion_BxN=samples.tokens_BxN,
            completion_mask_BxN=samples.mask_BxN,
            teacher_prompt_BxQ=teacher_BxQ,
            teacher_prompt_valid_BxQ=teacher_valid_BxQ,
            sampler_logprob_BxN=samples.logprobs_BxN,
            sampler_raw_logprob_BxN=samples.raw_logprobs_BxN,
            on_policy_B=jnp.ones(prompt_BxP.shape[:1], bool),
        )

    return jax.jit(rollout)
