"""GKD's specifics: where each update's completions come from (the data mixture), and
the task reward's advantages.

GKD (Agarwal et al., 2024) trains on a mixture: with probability lambda
(`on_policy_fraction`) a completion is sampled from the current student (on-policy),
otherwise it is a fixed sequence, either the dataset's target (supervised KD) or one
sampled from the teacher (sequence-level KD). lambda is drawn per step by default, as in
the paper's Algorithm 1 (one coin per batch, so a step is wholly on- or off-policy);
`per_example=True` draws one coin per row instead, which costs a rollout of both kinds
every step. The coin comes from the train state's step key, so a resumed run makes the
same draws. Rows the student sampled carry the sampler's recorded log-probs, which the
sampled-token estimators need; `check_rollouts` refuses, before any compile, rollouts
those estimators (or the RL term) cannot use.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import NamedTuple, Protocol

import gin
import jax
import jax.numpy as jnp
import numpy as np

from opd_jax import config, sampling, validation
from opd_jax.distill import DistillConfig

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
        check = functools.partial(validation.check_fields, self)
        check(validation.check_number, "on_policy_fraction", low=0, high=1)
        check(validation.check_choice, "fixed_source", choices=FIXED_SOURCES)
        validation.check_types(self)


class RolloutSettings(Protocol):
    """The sampler settings `check_rollouts` reads (a SamplingConfig has them)."""

    temperature: float
    top_k: int
    top_p: float


def check_rollouts(
    cfg: DistillConfig, settings: RolloutSettings, on_policy_fraction: float
) -> None:
    """Refuses at start-up, with one line, rollouts the configured update cannot use.

    Sampled-token estimators (pg, k1, k3) need each token drawn from the student's whole
    distribution. Another rollout temperature than the loss temperature keeps the
    support, and the estimator corrects it with the importance weight
    q_tau(y) / mu(y) (`losses.sampled_estimate`). Refused: greedy rollouts (a point mass
    has no density to weigh by), top_k / top_p (tokens outside the cut are never drawn,
    and no weight brings back their share of the expectation), and on_policy_fraction < 1
    (dataset or teacher rows are not draws from the student). The RL term is REINFORCE
    on the completions, so it too needs on_policy_fraction = 1.
    """
    if cfg.rl_alpha < 1.0 and on_policy_fraction < 1.0:
        raise config.ConfigError(
            f"DistillConfig.rl_alpha={cfg.rl_alpha} scores the student's own samples, but "
            f"MixtureConfig.on_policy_fraction={on_policy_fraction} mixes in fixed rows: set it to 1"
        )
    if not cfg.sampled:
        return
    needs = f"DistillConfig.estimator={cfg.estimator!r} needs rollouts from the student's whole distribution"
    if on_policy_fraction < 1.0:
        raise config.ConfigError(
            f"{needs}, but MixtureConfig.on_policy_fraction={on_policy_fraction} mixes in "
            "fixed rows: set it to 1, or use estimator='full'"
        )
    cuts = {
        "temperature": settings.temperature == 0,
        "top_k": settings.top_k > 0,
        "top_p": settings.top_p < 1.0,
    }
    for name, cut in cuts.items():
        if cut:
            raise config.ConfigError(
                f"{needs}, but rollout {name}={getattr(settings, name)} cuts it (greedy or "
                "truncated sampling): sample with temperature > 0, top_k=0 and top_p=1, or "
                "use estimator='full'"
            )


class Completions(NamedTuple):
    tokens_BxN: jax.Array
    mask_BxN: jax.Array
    sampler_logprob_BxN: jax.Array  # 0 in rows the current student did not sample
    sampler_raw_logprob_BxN: jax.Array


def from_samples(samples: sampling.Samples, own: bool) -> Completions:
    """Completions drawn by a sampler; their log-probs kept only if `own` (the student's)."""
    keep = (lambda x: x) if own else jnp.zeros_like
    logprobs = keep(samples.logprobs_BxN), keep(samples.raw_logprobs_BxN)
    return Completions(samples.tokens_BxN, samples.mask_BxN, *logprobs)


def mixture_completions(
    mixture: MixtureConfig,
    key: jax.Array,
    student_samples: Callable[[jax.Array], sampling.Samples],
    teacher_samples: Callable[[jax.Array], sampling.Samples],
    target_BxN: jax.Array,
    target_valid_BxN: jax.Array,
) -> tuple[Completions, jax.Array]:
    """(completions, on_policy_B) of one step, traceable: the student's own samples with
    probability lambda, else the fixed source (`target_*` or the teacher's samples).
    The samplers are called with their key only where their branch can run."""
    choice_key, student_key, teacher_key = jax.random.split(key, 3)
    B = target_BxN.shape[0]

    def on_policy() -> Completions:
        return from_samples(student_samples(student_key), own=True)

    def fixed() -> Completions:
        if mixture.fixed_source == "teacher":
            return from_samples(teacher_samples(teacher_key), own=False)
        zeros = jnp.zeros(target_BxN.shape, jnp.float32)
        return Completions(target_BxN, target_valid_BxN.astype(jnp.float32), zeros, zeros)

    lam = mixture.on_policy_fraction
    if lam in (0.0, 1.0):  # static: compile only the branch that can run
        return (on_policy() if lam == 1.0 else fixed()), jnp.full((B,), lam == 1.0)
    if mixture.per_example:
        on_B = jax.random.uniform(choice_key, (B,)) < lam
        mixed = jax.tree.map(lambda s, f: jnp.where(on_B[:, None], s, f), on_policy(), fixed())
        return mixed, on_B
    on = jax.random.uniform(choice_key) < lam
    return jax.lax.cond(on, on_policy, fixed), jnp.full((B,), on)


def group_advantages(rewards_B: np.ndarray, group_size: int, eps: float = 1e-6) -> np.ndarray:
    """(r - mean of its group) / (std of its group + eps), groups being consecutive rows
    that share a prompt. A group whose rewards are all equal gets zero advantage: it
    carries no signal about which completion was better.

    group_size = 1 (one completion per prompt) has no within-prompt baseline, and
    normalizing each reward against itself would give zero everywhere; the rows given
    then form one group, the baseline being their mean (GRPO's normalization across
    prompts, blind to how hard each prompt is)."""
    rewards_B = np.asarray(rewards_B, np.float32)
    if group_size < 1 or rewards_B.shape[0] % group_size:
        raise ValueError(f"{rewards_B.shape[0]} rewards do not split into groups of {group_size}")
    groups_GxS = rewards_B.reshape(-1, group_size) if group_size > 1 else rewards_B[None]
    centered = groups_GxS - groups_GxS.mean(axis=1, keepdims=True)
    return (centered / (groups_GxS.std(axis=1, keepdims=True) + eps)).reshape(-1)
