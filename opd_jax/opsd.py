"""On-policy self-distillation's specifics (OPSD, Zhao et al. 2026): privileged teacher
contexts and the self-teacher's weights.

One model teaches itself. The student sees the rendered question; the teacher is the same
model with privileged text in its context (a worked solution, or a shared rule in the
system prompt), rendered with the same chat template. The student samples a completion,
the completion is appended to both contexts, and the student is trained toward the
teacher's token distributions at the completion positions, read there whatever each
context's length and padding. A separate teacher model may be given a privileged context
too: the run loop treats both alike.

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

from opd_jax import data, lora, validation
from opd_jax.lora import LoraConfig
from opd_jax.model import Params

TEACHERS = ("fixed", "ema", "live")
PLACEMENTS = ("user", "system")

# ----------------------------------------------------------------------------- contexts


@gin.configurable
@dataclasses.dataclass(frozen=True)
class PrivilegedContext:
    """What only the teacher sees.

    text: empty (the default) for none: the teacher reads the student's prompt. Otherwise
      formatted with the example's fields, so it is per-instance ("{target}" is the
      worked solution) or a shared rule (no fields). Per-instance text should end with the
      transition instruction that hands over to the answer.
    placement: "user" appends it to the user turn after the question; "system" appends it
      to the system prompt, which the student then must carry explicitly (`Task.system`),
      or the chat template's default system prompt would differ between the two. A
      system-placed block is one shared rule: it is not formatted with example fields.
    """

    text: str = ""
    placement: str = "user"
    separator: str = "\n\n"

    def __post_init__(self):
        validation.check_fields(self, validation.check_choice, "placement", choices=PLACEMENTS)
        validation.check_types(self)
        if self.placement == "system" and "{" in self.text:
            raise validation.ConfigError(
                "PrivilegedContext.text: a system-placed privileged block is shared: it cannot "
                "name fields"
            )


def teacher_template(student: data.PromptTemplate, ctx: PrivilegedContext) -> data.PromptTemplate:
    """The student's template with the privileged block added where `ctx` places it."""
    if not ctx.text:
        return student
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


# ----------------------------------------------------------------------------- teacher


@gin.configurable
@dataclasses.dataclass(frozen=True)
class SelfTeacher:
    """Which weights teach when the student teaches itself (`Models.teacher = None`):
    "fixed" | "ema" | "live" (see the module docstring); ema_decay: the weight of the old
    average at each step."""

    weights: str = "fixed"
    ema_decay: float = 0.99

    def __post_init__(self):
        validation.check_fields(self, validation.check_choice, "weights", choices=TEACHERS)
        validation.check_fields(self, validation.check_number, "ema_decay", low=0, high=1)
        validation.check_types(self)


def self_teacher_weights(
    kind: str, trainable: Params, base: Params, ema: Params | None, lora_cfg: LoraConfig | None
) -> Params:
    """The teacher's full params for one step of self-distillation, never differentiated."""
    if kind == "fixed":
        return base
    source = ema if kind == "ema" else trainable
    return jax.lax.stop_gradient(lora.student_weights(source, base, lora_cfg))


def ema_update(ema: Params, params: Params, decay: float) -> Params:
    """One step of the moving average the "ema" teacher reads."""
    return jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, ema, params)
