"""Where each update's completions come from: the GKD data mixture, and RL advantages.

GKD (Agarwal et al., 2024) trains on a mixture: with probability lambda
(`on_policy_fraction`) a completion is sampled from the current student (on-policy),
otherwise it is a fixed sequence, either the dataset's target (supervised KD) or one
sampled from the teacher (sequence-level KD). lambda is drawn per step by default, as in
the paper's Algorithm 1 (one coin per batch, so a step is wholly on- or off-policy);
`per_example=True` draws one coin per row instead, which costs a rollout of both kinds
every step. The coin comes from the train state's step key, so a resumed run makes the
same draws.
"""

from __future__ import annotations

import dataclasses

import gin
import numpy as np

FIXED_SOURCES = ("dataset", "teacher")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class MixtureConfig:
    """on_policy_fraction: GKD's lambda, the probability a completion is the student's own.
    per_example: draw lambda's coin per row rather than once per step.
    fixed_source: "dataset" (supervised KD on targets) or "teacher" (sequence-level KD).
    """

    on_policy_fraction: float = 0.5
    per_example: bool = False
    fixed_source: str = "dataset"

    def __post_init__(self):
        if not 0.0 <= self.on_policy_fraction <= 1.0:
            raise ValueError(f"on_policy_fraction must be in [0, 1], got {self.on_policy_fraction}")
        if self.fixed_source not in FIXED_SOURCES:
            raise ValueError(
                f"fixed_source must be one of {FIXED_SOURCES}, got {self.fixed_source!r}"
            )


def group_advantages(rewards_B: np.ndarray, group_size: int, eps: float = 1e-6) -> np.ndarray:
    """(r - mean of its group) / (std of its group + eps), groups being consecutive rows
    that share a prompt. A group whose rewards are all equal gets zero advantage: it
    carries no signal about which completion was better."""
    rewards_B = np.asarray(rewards_B, np.float32)
    if group_size < 1 or rewards_B.shape[0] % group_size:
        raise ValueError(f"{rewards_B.shape[0]} rewards do not split into groups of {group_size}")
    groups_GxS = rewards_B.reshape(-1, group_size)
    centered = groups_GxS - groups_GxS.mean(axis=1, keepdims=True)
    return (centered / (groups_GxS.std(axis=1, keepdims=True) + eps)).reshape(-1)
