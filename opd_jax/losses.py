"""Token-level distillation objectives as pure functions of log-probs (no model inside).

Teacher P and student Q are the softmaxes of teacher and student logits divided by one
loss temperature. An `Objective` makes two orthogonal choices: the divergence that is
minimized (forward KL, reverse KL or the generalized JSD) and the estimator of it:
  full          the exact divergence over the whole vocabulary;
  teacher_topk  the teacher's top-k tokens plus one tail bucket (a lower bound);
  student_topk  reverse KL restricted to the student's top-k tokens;
  pg, k1, k3    reverse KL from the sampled token alone, importance-weighted to the
                loss distribution with the sampler's recorded log-prob.
The pg estimator's gradient can further take other credit (return-to-go, discounted,
GAE advantages) and route a sampled token's lost mass to chosen alternatives (`credit`).
`token_statistics` computes the chosen estimate per position together with the exact
divergence and the other metrics in one chunked pass over the vocabulary.

Conventions:
- The teacher is a fixed target: its side is under stop_gradient everywhere.
- Math runs in at least float32 (bf16 inputs are upcast before the softmax; float64
  stays float64 so gradient checks can use it), because divergences between nearby
  distributions are differences of nearly equal log-probs.
- Logits must be finite: mask padded vocabulary with a large negative number, not -inf,
  whose 0 * inf terms would turn values or gradients into NaN.

Full-vocabulary divergences follow GKD (Agarwal et al., ICLR 2024) and TRL's generalized
JSD; the sampled-token estimators follow the later on-policy distillation work, where the
student samples y_t and is rewarded with log p_teacher(y_t) - log q_student(y_t), and
Schulman's "Approximating KL Divergence" (2020) for k1 and k3.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from opd_jax import credit, diagnostics, mesh, validation

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
ESTIMATORS = ("full", "teacher_topk", "student_topk", "pg", "k1", "k3")
SAMPLED_ESTIMATORS = ("pg", "k1", "k3")
TOPK_ESTIMATORS = ("teacher_topk", "student_topk")
REVERSE_KL_ESTIMATORS = ("student_topk", *SAMPLED_ESTIMATORS)
TOPK_FORMS = ("stopgrad", "renormalized", "unnormalized")

# Below this, 1 - sum(top-k teacher probs) is float32 rounding, not information.
_MIN_TAIL_PROB = float(jnp.finfo(jnp.float32).eps)

# ------------------------------------------------------------------------ validation


def _check_temperature(temperature: float) -> None:
    validation.check_number("temperature", temperature, 0.0, open_low=True)


def _resolve_kind(kind: str, beta: float) -> str:
    """Checks a divergence; jsd at beta = 0 / 1 is forward / reverse KL (`token_divergence`)."""
    validation.check_choice("divergence", kind, DIVERGENCES)
    validation.check_number("beta", beta, 0.0, 1.0)
    if kind == "jsd" and beta in (0.0, 1.0):
        return "forward_kl" if beta == 0.0 else "reverse_kl"
    return kind


@dataclasses.dataclass(frozen=True)
class Objective:
    """What a distillation step minimizes, and how its gradient is estimated.

    divergence: "forward_kl" | "reverse_kl" | "jsd", with `beta` the JSD's mixing weight
      (0 and 1 are forward and reverse KL, see `token_divergence`).
    estimator: one of ESTIMATORS (module docstring). student_topk, pg, k1 and k3 estimate
      reverse KL only; teacher_topk and student_topk use `top_k` tokens, student_topk in
      `topk_form` (see `student_topk_reverse_kl`).
    temperature: divides teacher and student logits alike.
    credit, gamma, gae_lambda: the advantage of estimator "pg"'s gradient, one of
      credit.CREDITS ("immediate" is pg itself; "gae" learns a value head).
    routing, routing_top_k: "overlap" sends the mass a token with a negative advantage
      loses to the teacher's and the student's shared top-`routing_top_k` tokens (CR-OPD);
      "none" spreads it as pg does. Both are defined in `credit`, "pg" only.
    Every check runs here, so a bad combination fails when the config is built, in one
    line naming the field as gin does (`DistillConfig.divergence`).
    """

    divergence: str = "jsd"
    beta: float = 0.5
    estimator: str = "full"
    top_k: int = 0
    topk_form: str = "stopgrad"
    temperature: float = 1.0
    credit: str = "immediate"
    gamma: float = 1.0
    gae_lambda: float = 0.95
    routing: str = "none"
    routing_top_k: int = 16

    def __post_init__(self):
        check = functools.partial(validation.check_fields, self)
        check(validation.check_choice, "divergence", choices=DIVERGENCES)
        check(validation.check_choice, "estimator", choices=ESTIMATORS)
        check(validation.check_choice, "topk_form", choices=TOPK_FORMS)
        check(validation.check_choice, "credit", choices=credit.CREDITS)
        check(validation.check_choice, "routing", choices=credit.ROUTINGS)
        check(validation.check_number, "beta", "gamma", "gae_lambda", low=0, high=1)
        check(validation.check_number, "temperature", low=0, open_low=True)
        check(validation.check_int, "top_k", minimum=0)
        check(validation.check_int, "routing_top_k", minimum=1)
        validation.check_types(self)
        self._check_combinations()

    def _check_combinations(self) -> None:
        name = lambda field: validation.binding(self, field)
        if self.estimator in REVERSE_KL_ESTIMATORS and self.kind != "reverse_kl":
            valid = ", ".join(e for e in ESTIMATORS if e not in REVERSE_KL_ESTIMATORS)
            raise validation.ConfigError(
                f"{name('estimator')}={self.estimator!r} estimates reverse KL only: it needs "
                f"divergence='reverse_kl' (or 'jsd' with beta=1); with divergence="
                f"{self.divergence!r} and beta={self.beta} the valid estimators are {valid}"
            )
        if self.estimator in TOPK_ESTIMATORS and self.top_k < 1:
            raise validation.ConfigError(
                f"{name('top_k')}={self.top_k} must be >= 1 with estimator={self.estimator!r}"
            )
        if self.reassigns_credit and self.estimator != "pg":
            raise validation.ConfigError(
                f"{name('credit')}={self.credit!r} and routing={self.routing!r} change the "
                f"gradient of estimator='pg' only, got estimator={self.estimator!r}: use 'pg', "
                "or credit='immediate' and routing='none'"
            )

    @property
    def reassigns_credit(self) -> bool:
        """Whether credit or routing changes pg's gradient (`credit`)."""
        return (self.credit, self.routing) != ("immediate", "none")

    @property
    def learns_value(self) -> bool:
        """Whether the update trains a value head beside the student (credit "gae")."""
        return self.credit == "gae"

    @property
    def kind(self) -> str:
        """The divergence with jsd's limits resolved to forward / reverse KL."""
        return _resolve_kind(self.divergence, self.beta)

    @property
    def sampled(self) -> bool:
        """Whether the estimate reads the sampled token (and so the sampler's log-prob)."""
        return self.estimator in SAMPLED_ESTIMATORS


# ----------------------------------------------------------------------- primitives


def _at_least_f32(x: jax.Array) -> jax.Array:
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def log_probs(logits_BxTxV: jax.Array, temperature: float = 1.0) -> jax.Array:
    """log softmax(logits / temperature) over the last axis, in at least float32."""
    return jax.nn.log_softmax(_at_least_f32(logits_BxTxV) / temperature, axis=-1)


def _nonnegative(values: jax.Array) -> jax.Array:
    """Clamps a divergence's value at 0 but keeps its unclamped gradient.

    Divergences are sums of signed terms, so nearly equal distributions can round a few
    ulps below zero; logs, ratios and `>= 0` checks downstream should never see that.
    A hard clamp would zero the gradient exactly where it is small but real.
    """
    return values + jax.lax.stop_gradient(jnp.maximum(values, 0.0) - values)


def _kl_sum(logp_BxTxV: jax.Array, logq_BxTxV: jax.Array) -> jax.Array:
    """sum_v p (log p - log q), unclamped."""
    return jnp.sum(jnp.exp(logp_BxTxV) * (logp_BxTxV - logq_BxTxV), axis=-1)


def _kl(logp_BxTxV: jax.Array, logq_BxTxV: jax.Array) -> jax.Array:
    return _nonnegative(_kl_sum(logp_BxTxV, logq_BxTxV))


def _entropy(logp_BxTxV: jax.Array) -> jax.Array:
    return _nonnegative(-jnp.sum(jnp.exp(logp_BxTxV) * logp_BxTxV, axis=-1))


def _jsd(logp_BxTxV: jax.Array, logq_BxTxV: jax.Array, beta: float) -> jax.Array:
    """beta KL(P||M) + (1-beta) KL(Q||M) for 0 < beta < 1, M = beta P + (1-beta) Q.

    log M is a two-term logsumexp of log-probs, so M never underflows where P or Q
    has mass.
    """
    logm_BxTxV = jnp.logaddexp(math.log(beta) + logp_BxTxV, math.log1p(-beta) + logq_BxTxV)
    return _nonnegative(
        beta * _kl_sum(logp_BxTxV, logm_BxTxV) + (1.0 - beta) * _kl_sum(logq_BxTxV, logm_BxTxV)
    )


def _take(logprobs_BxTxV: jax.Array, tokens_BxT: jax.Array) -> jax.Array:
    return jnp.take_along_axis(logprobs_BxTxV, tokens_BxT[..., None], axis=-1)[..., 0]


# ----------------------------------------------------------- full-vocabulary values


def token_divergence(
    teacher_logprobs_BxTxV: jax.Array,
    student_logprobs_BxTxV: jax.Array,
    kind: str,
    beta: float = 0.5,
) -> jax.Array:
    """The exact divergence `kind` per position, [B, T], between normalized log-probs.

    forward_kl = KL(P||Q) is mode-covering (supervised KD); reverse_kl = KL(Q||P) is
    mode-seeking (on-policy distillation); jsd is the generalized JSD(beta) =
    beta KL(P||M) + (1-beta) KL(Q||M), M = beta P + (1-beta) Q. JSD(beta) itself tends to 0
    at both ends, but JSD/beta -> KL(P||Q) as beta -> 0 and JSD/(1-beta) -> KL(Q||P) as
    beta -> 1, so, following GKD and TRL, beta = 0 is defined as forward KL and beta = 1
    as reverse KL (exactly those values), and one knob sweeps forward KL -> reverse KL.
    """
    kind = _resolve_kind(kind, beta)
    logp_BxTxV = jax.lax.stop_gradient(teacher_logprobs_BxTxV)
    if kind == "forward_kl":
        return _kl(logp_BxTxV, student_logprobs_BxTxV)
    if kind == "reverse_kl":
        return _kl(student_logprobs_BxTxV, logp_BxTxV)
    return _jsd(logp_BxTxV, student_logprobs_BxTxV, beta)


def masked_mean(
    values_BxT: jax.Array, mask_BxT: jax.Array, num_tokens: jax.Array | float | None = None
) -> jax.Array:
    """Sum of values over real tokens (mask nonzero) divided by their count.

    Pass `num_tokens` (the real-token count of the whole batch) when the batch is split
    into micro-batches: summing each micro-batch's mean over that shared count gives the
    whole batch's mean, where per-micro-batch counts would weight tokens unequally.
    Masked positions are dropped with `where`, so padding garbage (inf, NaN) cannot leak.
    """
    mask_BxT = mask_BxT.astype(bool)
    values_BxT = _at_least_f32(values_BxT)
    total = jnp.sum(jnp.where(mask_BxT, values_BxT, 0.0))
    if num_tokens is None:
        num_tokens = jnp.maximum(jnp.sum(mask_BxT), 1)
    return total / num_tokens


# ------------------------------------------------------- teacher top-k + tail bucket


def _check_k(k: int, vocab: int, allow_full: bool) -> None:
    upper = vocab if allow_full else vocab - 1
    if not 1 <= k <= upper:
        raise ValueError(f"top_k must be in [1, {upper}] for a vocabulary of {vocab}, got {k}")


def teacher_topk_divergence(
    teacher_logprobs_BxTxV: jax.Array,
    student_logprobs_BxTxV: jax.Array,
    k: int,
    kind: str = "forward_kl",
    beta: float = 0.5,
) -> jax.Array:
    """Divergence over k + 1 buckets: the teacher's top-k tokens and one tail bucket.

    Only the teacher's k largest log-probs are read (what a log-prob API serves). The
    tail holds each distribution's remaining mass: 1 - sum of the teacher's top-k
    probabilities, and the student's exact probability on the other V - k tokens. Merging
    tokens into buckets can only lose information, so for every kind the result is a lower
    bound on the full-vocabulary divergence (data processing inequality), equal to it
    when k = V - 1 (the tail is a single token). The teacher's tail mass is floored at
    float32 eps, the resolution of 1 - sum, so a teacher whose top-k mass rounds to 1
    gives a finite reverse KL instead of inf.
    """
    _check_k(k, student_logprobs_BxTxV.shape[-1], allow_full=False)
    logp_top_BxTxK, top_ids_BxTxK = jax.lax.top_k(jax.lax.stop_gradient(teacher_logprobs_BxTxV), k)
    top_mass_BxT = jnp.sum(jnp.exp(logp_top_BxTxK), axis=-1)
    logp_tail_BxT = jnp.log(jnp.maximum(1.0 - top_mass_BxT, _MIN_TAIL_PROB))

    logq_BxTxV = student_logprobs_BxTxV
    logq_top_BxTxK = jnp.take_along_axis(logq_BxTxV, top_ids_BxTxK, axis=-1)
    in_top_BxTxV = jnp.put_along_axis(
        jnp.zeros(logq_BxTxV.shape, bool), top_ids_BxTxK, True, axis=-1, inplace=False
    )
    logq_tail_BxT = jax.nn.logsumexp(jnp.where(in_top_BxTxV, -jnp.inf, logq_BxTxV), axis=-1)

    logp_buckets = jnp.concatenate([logp_top_BxTxK, logp_tail_BxT[..., None]], axis=-1)
    logq_buckets = jnp.concatenate([logq_top_BxTxK, logq_tail_BxT[..., None]], axis=-1)
    return token_divergence(logp_buckets, logq_buckets, kind, beta)


# ------------------------------------------------------ student top-k reverse KL


def student_topk_reverse_kl(
    teacher_logprobs_BxTxV: jax.Array,
    student_logprobs_BxTxV: jax.Array,
    k: int,
    form: str = "stopgrad",
) -> jax.Array:
    """Reverse KL(Q||P) restricted to the student's top-k tokens S (chosen without gradient).

    With d_i = log q_i - log p_i from full-softmax log-probs:
    - "stopgrad": value sum_{i in S} q_i d_i, differentiated as sum_{i in S} q_i sg(d_i).
      Its gradient is sum_{i in S} q_i d_i grad(log q_i): the exact reverse-KL gradient
      E_{y~q}[d_y grad(log q_y)] with the expectation cut to S. That is the sense in which
      it is unbiased: each term is exactly token i's expected contribution to the
      sampled-token policy gradient (estimator "pg"), with no variance and nothing added;
      the only error is the omitted tail, and with k = V it is the exact gradient.
    - "unnormalized": sum_{i in S} q_i d_i differentiated as written. Since
      grad(d_i) = grad(log q_i), its gradient is the stopgrad one plus grad(sum_{i in S} q_i),
      the gradient of the student's top-k mass, which vanishes only when S is the whole
      vocabulary. Descending it moves student mass out of its own top-k, lowering the
      loss without matching the teacher; this bias has been reported to collapse
      training. Kept only for comparison.
    - "renormalized": KL(q_S / Q_S || p_S / P_S), a proper divergence over S (>= 0, zero
      iff the shapes agree on S) that ignores how much mass either puts outside S.

    The stopgrad and unnormalized values are partial sums and may be negative; they are
    not clamped.
    """
    _check_k(k, student_logprobs_BxTxV.shape[-1], allow_full=True)
    validation.check_choice("topk_form", form, TOPK_FORMS)
    logp_BxTxV = jax.lax.stop_gradient(teacher_logprobs_BxTxV)
    logq_BxTxV = student_logprobs_BxTxV
    _, top_ids_BxTxK = jax.lax.top_k(jax.lax.stop_gradient(logq_BxTxV), k)
    logp_BxTxK = jnp.take_along_axis(logp_BxTxV, top_ids_BxTxK, axis=-1)
    logq_BxTxK = jnp.take_along_axis(logq_BxTxV, top_ids_BxTxK, axis=-1)
    if form == "renormalized":
        renorm = lambda x: x - jax.nn.logsumexp(x, axis=-1, keepdims=True)
        return _kl(renorm(logq_BxTxK), renorm(logp_BxTxK))
    log_ratio_BxTxK = logq_BxTxK - logp_BxTxK
    if form == "stopgrad":
        log_ratio_BxTxK = jax.lax.stop_gradient(log_ratio_BxTxK)
    return jnp.sum(jnp.exp(logq_BxTxK) * log_ratio_BxTxK, axis=-1)


# --------------------------------------------------------- sampled-token estimators


def sampled_estimate(
    teacher_logprob_BxT: jax.Array,
    student_logprob_BxT: jax.Array,
    sampler_logprob_BxT: jax.Array,
    estimator: str,
    valid_BxT: jax.Array | None = None,
) -> jax.Array:
    """Per-token surrogate of KL(Q||P) from the sampled token y alone, [B, T].

    Inputs are log-probs of y: teacher log p(y) and student log q(y) at the loss
    temperature, and log mu(y) under the distribution the sampler drew y from.

    Math. For y ~ q_theta and a per-token function k_theta(y),
        grad E_q[k] = E_q[k grad(log q)] + E_q[grad k]      (score function + pathwise).
    k1 = log q - log p has E_q[k1] = KL(Q||P). Its pathwise term grad k1 = grad(log q)
    has zero mean under q, so it only adds variance; "pg" drops it and keeps
    E_q[k1 grad(log q)] = grad KL, the policy gradient on the reward log p - log q.
    k3 = (r - 1) - log r with r = p/q has E_q[k3] = sum_y p - 1 + KL = KL (P sums to 1),
    and k3 >= 0 (e^x >= 1 + x). Its pathwise term grad k3 = (1 - r) grad(log q) has mean
    -sum_y p grad(log q) != 0, so "k1" and "k3" keep both terms. Tokens drawn from mu
    instead of q are reweighted by rho = q(y) / mu(y): E_mu[rho f] = E_q[f]. So
        L = sg(rho) * (sg(k) * (log q - sg(log q)) + k)       ("pg": the last k is sg(k))
    has value rho k, whose mean is KL(Q||P) for all three, and gradient
    rho (k grad(log q) + grad k), whose mean is grad KL(Q||P). The expectation is over y
    at each position given its prefix: prefixes are taken as given, as the full-vocabulary
    estimator takes them (weighting whole prefixes would need products of ratios).
    rho = 1 when the sampler is the current student at the loss temperature, up to the
    numerical difference between sampler and learner, which rho then also corrects.
    Positions outside `valid_BxT` are zeroed before the math: a padding token can have an
    extreme ratio whose inf would turn the masked-out gradient into NaN.
    """
    validation.check_choice("estimator", estimator, SAMPLED_ESTIMATORS)
    if valid_BxT is not None:
        keep = lambda x: jnp.where(valid_BxT.astype(bool), x, 0.0)
        teacher_logprob_BxT = keep(teacher_logprob_BxT)
        student_logprob_BxT = keep(student_logprob_BxT)
        sampler_logprob_BxT = keep(sampler_logprob_BxT)
    sg = jax.lax.stop_gradient
    log_q_BxT = student_logprob_BxT
    log_r_BxT = sg(teacher_logprob_BxT) - log_q_BxT
    # expm1 keeps k3 accurate for small log r; beware r = e^(log r) grows fast where the
    # teacher is far more confident than the student.
    k_BxT = _nonnegative(jnp.expm1(log_r_BxT) - log_r_BxT) if estimator == "k3" else -log_r_BxT
    rho_BxT = jnp.exp(sg(log_q_BxT - sampler_logprob_BxT))
    score_BxT = log_q_BxT - sg(log_q_BxT)  # value 0, gradient grad(log q)
    pathwise_BxT = sg(k_BxT) if estimator == "pg" else k_BxT
    return rho_BxT * (sg(k_BxT) * score_BxT + pathwise_BxT)


def token_logprobs(
    logits_BxTxV: jax.Array, tokens_BxT: jax.Array, temperature: float = 1.0
) -> jax.Array:
    """log softmax(logits / temperature) at the given tokens, [B, T]."""
    _check_temperature(temperature)
    return _take(log_probs(logits_BxTxV, temperature), tokens_BxT)


# ------------------------------------------------- chunked LM head + statistics


def _logits(hidden_BxCxD: jax.Array, head_DxV: jax.Array, sharding: Any) -> jax.Array:
    """hidden @ head accumulated in at least float32, like the model's own logits."""
    dtype = jnp.promote_types(jnp.result_type(hidden_BxCxD, head_DxV), jnp.float32)
    logits_BxCxV = jnp.einsum("bcd,dv->bcv", hidden_BxCxD, head_DxV, preferred_element_type=dtype)
    return mesh.constrain(logits_BxCxV, sharding)


def _chunk_statistics(
    teacher_logits_BxCxV: jax.Array,
    student_logits_BxCxV: jax.Array,
    tokens_BxC: jax.Array,
    objective: Objective,
    diagnostic_k: int,
) -> dict[str, jax.Array]:
    tau, kind = objective.temperature, objective.kind
    logp_BxCxV = log_probs(teacher_logits_BxCxV, tau)
    logq_BxCxV = log_probs(student_logits_BxCxV, tau)
    raw_logq_BxCxV = logq_BxCxV if tau == 1.0 else log_probs(student_logits_BxCxV)
    stats = {
        "forward_kl": _kl(logp_BxCxV, logq_BxCxV),
        "reverse_kl": _kl(logq_BxCxV, logp_BxCxV),
        "teacher_entropy": _entropy(logp_BxCxV),
        "student_entropy": _entropy(logq_BxCxV),
        "teacher_logprob": _take(logp_BxCxV, tokens_BxC),
        "student_logprob": _take(logq_BxCxV, tokens_BxC),
        "student_raw_logprob": _take(raw_logq_BxCxV, tokens_BxC),
    }
    stats["divergence"] = (
        _jsd(logp_BxCxV, logq_BxCxV, objective.beta) if kind == "jsd" else stats[kind]
    )
    if objective.estimator == "full":
        stats["estimate"] = stats["divergence"]
    elif objective.estimator == "teacher_topk":
        k, beta = objective.top_k, objective.beta
        stats["estimate"] = teacher_topk_divergence(logp_BxCxV, logq_BxCxV, k, kind, beta)
    elif objective.estimator == "student_topk":
        k, form = objective.top_k, objective.topk_form
        stats["estimate"] = student_topk_reverse_kl(logp_BxCxV, logq_BxCxV, k, form)
    vocab = logp_BxCxV.shape[-1]
    if diagnostic_k:
        k = min(diagnostic_k, vocab)
        stats |= diagnostics.topk_overlap(logp_BxCxV, logq_BxCxV, tokens_BxC, k)
    if objective.routing == "overlap":
        k = min(objective.routing_top_k, vocab)
        stats |= credit.routed_set(logp_BxCxV, logq_BxCxV, tokens_BxC, k)
    return stats


def token_statistics(
    teacher_hidden_BxTxD: jax.Array,
    teacher_head_DxV: jax.Array,
    student_hidden_BxTxE: jax.Array,
    student_head_ExV: jax.Array,
    tokens_BxT: jax.Array,
    objective: Objective,
    sampler_logprob_BxT: jax.Array | None = None,
    valid_BxT: jax.Array | None = None,
    chunk_size: int = 128,
    logits_sharding: Any = None,
    diagnostic_k: int = 0,
) -> dict[str, jax.Array]:
    """Everything one distillation step needs per position, [B, T] each, in one chunked pass.

    Keys: "estimate" (the objective's estimator, the term to differentiate), "divergence"
    (the exact full-vocabulary value of the objective's divergence, whatever the
    estimator), "forward_kl", "reverse_kl", "teacher_entropy", "student_entropy", and
    "teacher_logprob" / "student_logprob" of `tokens_BxT`, all at the objective's
    temperature, plus "student_raw_logprob" (temperature 1, what the sampler records as
    its raw log-prob). Sampled estimators need `sampler_logprob_BxT`, the log-prob under
    the distribution that drew each token; `valid_BxT` marks the real tokens.
    `diagnostic_k` > 0 adds `diagnostics.topk_overlap` of the two sides' top-k sets;
    routing "overlap" adds "routed_logprob" and "routed" (`credit.routed_set`).
    Teacher and student may have different widths (D, E) but share the vocabulary V.

    The sequence is cut into chunks of `chunk_size` positions (all rows at once, so a
    batch sharded over devices stays sharded). Each chunk's logits come from hidden @ head
    inside `jax.checkpoint`, so the backward pass recomputes them instead of keeping
    every chunk's [B, C, V] residuals: peak logits memory is O(B x chunk_size x V) in both
    passes. The last chunk is zero-padded; padded positions are computed and dropped,
    so they receive no gradient. chunk_size = 0 materializes all logits at once.
    `logits_sharding` pins both [B, C, V] logits (on a mesh: rows over the data axes,
    vocabulary over the tensor axis, so no device holds a whole vocabulary row).
    """
    if objective.sampled and sampler_logprob_BxT is None:
        raise ValueError(
            f"estimator={objective.estimator!r} weighs each sampled token by the sampler's "
            "log-prob of it: pass sampler_logprob_BxT (the rollout's recorded log-probs)"
        )
    if chunk_size < 0:
        raise ValueError(f"chunk_size must be >= 0 (0 = no chunking), got {chunk_size}")
    heads = (jax.lax.stop_gradient(teacher_head_DxV), student_head_ExV)
    per_position = (jax.lax.stop_gradient(teacher_hidden_BxTxD), student_hidden_BxTxE, tokens_BxT)

    def chunk_statistics(teacher_head, student_head, teacher_hidden, student_hidden, tokens):
        teacher_logits = _logits(teacher_hidden, teacher_head, logits_sharding)
        student_logits = _logits(student_hidden, student_head, logits_sharding)
        return _chunk_statistics(teacher_logits, student_logits, tokens, objective, diagnostic_k)

    if chunk_size == 0:
        stats = chunk_statistics(*heads, *per_position)
    else:
        B, T = tokens_BxT.shape
        chunk = min(chunk_size, T)
        n = -(-T // chunk)

        def split(x: jax.Array) -> jax.Array:  # [B, T, ...] -> [n, B, chunk, ...]
            pad = [(0, 0), (0, n * chunk - T)] + [(0, 0)] * (x.ndim - 2)
            return jnp.pad(x, pad).reshape(B, n, chunk, *x.shape[2:]).swapaxes(0, 1)

        remat_statistics = jax.checkpoint(chunk_statistics, prevent_cse=False)
        chunked = jax.tree.map(split, per_position)
        stats = jax.lax.map(lambda xs: remat_statistics(*heads, *xs), chunked)
        stats = jax.tree.map(lambda x: x.swapaxes(0, 1).reshape(B, n * chunk)[:, :T], stats)
    if objective.sampled:
        stats["estimate"] = sampled_estimate(
            stats["teacher_logprob"],
            stats["student_logprob"],
            sampler_logprob_BxT,
            objective.estimator,
            valid_BxT,
        )
    return stats
