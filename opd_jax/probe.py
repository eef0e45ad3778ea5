"""The teacher probe: how good is the teacher where on-policy distillation asks it to be?

On-policy distillation scores the student's own prefixes with the teacher, and "The Many
Faces of On-Policy Distillation" (2026) finds teachers degrade when they continue a
student's prefix instead of their own. The probe measures this on validation examples:
the student writes its greedy completion; the teacher, in its own (possibly privileged)
context, continues greedily from the first `fraction` of the student's tokens; the task
metric scores the student's prefix joined with the teacher's continuation. Fraction 0 is
the teacher on its own. A teacher whose score falls as the student's share grows gives
targets that lead the student nowhere useful: its corrections hold only on its own paths.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import gin
import numpy as np

from opd_jax import data, evaluation, validation

# (prompt_BxP, prompt_valid_BxP) -> (tokens_BxN, lengths_B), host arrays: greedy completions
Generate = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TeacherProbe:
    """every: distillation steps between probes (0: off); the probe also runs before the
    first step and after the last. fractions: shares of the student's completion the
    teacher continues from (0: the teacher alone). examples: validation examples probed."""

    every: int = 0
    fractions: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75)
    examples: int = 16

    def __post_init__(self):
        validation.check_fields(self, validation.check_int, "every", minimum=0)
        validation.check_fields(self, validation.check_int, "examples", minimum=1)
        validation.check_types(self)
        if not self.fractions or not all(0.0 <= f < 1.0 for f in self.fractions):
            raise validation.ConfigError(
                f"TeacherProbe.fractions={self.fractions!r}: give shares in [0, 1)"
            )

    def due(self, step: int, last: int) -> bool:
        return bool(self.every) and (step % self.every == 0 or step == last)


def splice_prefix(
    prompt_BxP: np.ndarray,
    prompt_valid_BxP: np.ndarray,
    tokens_BxN: np.ndarray,
    prefix_len_B: np.ndarray,
    pad_id: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded contexts of width P + N: each row's real prompt tokens followed by the
    first prefix_len_B[b] completion tokens."""
    B, P = prompt_BxP.shape
    width = P + tokens_BxN.shape[1]
    context_BxW = np.full((B, width), pad_id, prompt_BxP.dtype)
    valid_BxW = np.zeros((B, width), bool)
    for b in range(B):
        row = np.concatenate([prompt_BxP[b][prompt_valid_BxP[b]], tokens_BxN[b, : prefix_len_B[b]]])
        context_BxW[b, width - len(row) :] = row
        valid_BxW[b, width - len(row) :] = True
    return context_BxW, valid_BxW


def prefix_lengths(lengths_B: np.ndarray, fraction: float) -> np.ndarray:
    """How many of each completion's tokens the teacher is given: floor(fraction x length)."""
    return np.floor(fraction * np.asarray(lengths_B)).astype(np.int64)


def probe(
    student: Generate,
    teacher: Generate,
    examples: Sequence[Mapping[str, Any]],
    tokenizer: data.Tokenizer,
    spec: data.BatchSpec,
    teacher_spec: data.BatchSpec,
    fractions: Sequence[float],
    metric: str,
) -> dict[float, dict[str, float]]:
    """The task metric of (student prefix + teacher continuation) per fraction, over
    `examples` in batches of spec.batch_size. The teacher's completions are as long as the
    student's (spec.target_len new tokens), so the joined text may be longer."""
    metric_fn = evaluation.resolve_metric(metric)
    texts: dict[float, list[str]] = {f: [] for f in fractions}
    chosen = list(examples)
    for indices_B in evaluation.padded_chunks(len(chosen), spec.batch_size):
        batch = [chosen[i] for i in indices_B]
        student_tokens_BxN, student_lengths_B = student(
            *data.make_batch(batch, tokenizer, spec)[:2]
        )
        teacher_prompt = data.make_batch(batch, tokenizer, teacher_spec)[:2]
        for fraction in fractions:
            prefix_B = prefix_lengths(student_lengths_B, fraction)
            context = splice_prefix(*teacher_prompt, student_tokens_BxN, prefix_B, tokenizer.pad_id)
            tokens_BxN, lengths_B = teacher(*context)
            for b in range(len(batch)):
                joined = [*student_tokens_BxN[b, : prefix_B[b]], *tokens_BxN[b, : lengths_B[b]]]
                texts[fraction].append(tokenizer.decode([int(t) for t in joined]).strip())
    count = len(chosen)
    return {f: metric_fn(texts[f][:count], chosen) for f in fractions}
