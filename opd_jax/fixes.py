"""The two fixes "Rethinking On-Policy Distillation" (2026) gives for runs whose student
and teacher do not think alike, as stages a run can add before distillation.

Off-policy cold start (`ColdStart`): the teacher samples completions of the training
prompts (in its own, possibly privileged, context); optionally only those the task
scorer accepts are kept; the student fine-tunes on them by cross-entropy. On-policy
distillation then starts from a student that already writes in the teacher's way.

Teacher-aligned prompt selection (`PromptSelection`): the student completes candidate
training prompts; each prompt is scored by the mean top-k overlap ratio between the
teacher's and the student's next-token distributions along that completion
(`diagnostics.topk_overlap`); distillation then trains on the best-aligned share of the
candidates plus a random share of the rest, so it keeps some coverage of the prompts the
two disagree on.
"""

from __future__ import annotations

import dataclasses
import functools

import gin
import numpy as np

from opd_jax import validation


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ColdStart:
    """steps: fine-tuning steps on teacher samples (0: no cold start).
    temperature: the teacher's sampling temperature (0 greedy).
    min_reward: keep only completions whose task score (`Task.reward`, in [0, 1]) is at
      least this; None keeps every completion.
    """

    steps: int = 0
    learning_rate: float = 1e-4
    temperature: float = 1.0
    min_reward: float | None = None

    def __post_init__(self):
        check = functools.partial(validation.check_fields, self)
        check(validation.check_int, "steps", minimum=0)
        check(validation.check_number, "learning_rate", low=0, open_low=True)
        check(validation.check_number, "temperature", low=0)
        check(validation.check_number, "min_reward", low=0, high=1, or_none=True)
        validation.check_types(self)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class PromptSelection:
    """candidates: training prompts scored (0: no selection; the first `candidates` of the
      training split).
    keep_fraction: the share of candidates kept for their overlap, best first.
    rest_share: the share of the remaining candidates kept at random besides.
    """

    candidates: int = 0
    keep_fraction: float = 0.5
    rest_share: float = 0.1

    def __post_init__(self):
        check = functools.partial(validation.check_fields, self)
        check(validation.check_int, "candidates", minimum=0)
        check(validation.check_number, "keep_fraction", "rest_share", low=0, high=1)
        validation.check_types(self)


def kept_rows(rewards_B: np.ndarray, min_reward: float | None) -> np.ndarray:
    """Which teacher samples the cold start trains on, [B] bool."""
    rewards_B = np.asarray(rewards_B)
    if min_reward is None:
        return np.ones(rewards_B.shape, bool)
    return rewards_B >= min_reward


def select_prompts(
    scores_C: np.ndarray, keep_fraction: float, rest_share: float, seed: int
) -> np.ndarray:
    """Indices (into the candidates, ascending) of the prompts distillation trains on: the
    round(keep_fraction * C) best-scored (ties broken by index) and round(rest_share * R)
    drawn at random from the R others, seeded, so every process picks the same ones."""
    scores_C = np.asarray(scores_C, np.float64)
    order = np.lexsort((np.arange(len(scores_C)), -scores_C))  # best first, then by index
    num_best = int(round(keep_fraction * len(scores_C)))
    best, rest = order[:num_best], order[num_best:]
    num_rest = int(round(rest_share * len(rest)))
    drawn = np.random.default_rng(seed).choice(rest, size=num_rest, replace=False)
    return np.sort(np.concatenate([best, drawn]).astype(np.int64))
