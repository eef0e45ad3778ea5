"""Token-level distillation losses as pure functions of logits (no model inside).

Teacher P and student Q are the softmaxes of teacher and student logits divided by one
loss temperature. Per-token functions take [..., V] logits (usually [B, T, V]) and
return one value per position; `masked_mean` reduces them over real tokens.

Conventions:
- The teacher is a fixed target: its side is under stop_gradient everywhere.
- Math runs in at least float32 (bf16 inputs are upcast before the softmax; float64
  stays float64 so gradient checks can use it), because divergences between nearby
  distributions are differences of nearly equal log-probs.
- Logits must be finite: mask padded vocabulary with a large negative number, not -inf,
  whose 0 * inf terms would turn values or gradients into NaN.

Full-vocabulary divergences follow GKD (Agarwal et al., ICLR 2024) and TRL's generalized
JSD; the sampled-token functions follow the later on-policy distillation work, where the
student samples y_t and is rewarded with log p_teacher(y_t) - log q_student(y_t).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from opd_jax import mesh

FULL_VOCAB_KINDS = ("forward_kl", "reverse_kl", "jsd")
TOPK_FORMS = ("stopgrad", "renormalized", "unnormalized")

# Below this, 1 - sum(top-k teacher probs) is float32 rounding, not information.
_MIN_TAIL_PROB = float(jnp.finfo(jnp.float32).eps)

# ------------------------------------------------------------------------ validation


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _check_divergence_args(kind: str, beta: float, temperature: float) -> None:
    if kind not in FULL_VOCAB_KINDS:
        raise ValueError(f"unknown divergence kind {kind!r}; expected one of {FULL_VOCAB_KINDS}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    _check_temperature(temperature)


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


def _resolve_kind(kind: str, beta: float) -> str:
    """jsd at beta = 0 / 1 is forward / reverse KL (see `jsd`)."""
    if kind == "jsd" and beta == 0.0:
        return "forward_kl"
    if kind == "jsd" and beta == 1.0:
        return "reverse_kl"
    return kind


def _divergence(
    teacher_logprobs_BxTxV: jax.Array, student_logprobs_BxTxV: jax.Array, kind: str, beta: float
) -> jax.Array:
    """The divergence `kind` between two normalized log-prob vectors (teacher first)."""
    kind = _resolve_kind(kind, beta)
    if kind == "forward_kl":
        return _kl(teacher_logprobs_BxTxV, student_logprobs_BxTxV)
    if kind == "reverse_kl":
        return _kl(student_logprobs_BxTxV, teacher_logprobs_BxTxV)
    return _jsd(teacher_logprobs_BxTxV, student_logprobs_BxTxV, beta)


# ----------------------------------------------------------- full-vocabulary losses


def forward_kl(
    teacher_logits_BxTxV: jax.Array, student_logits_BxTxV: jax.Array, temperature: float = 1.0
) -> jax.Array:
    """KL(P||Q) per position: mode-covering, the supervised-KD loss."""
    return token_divergence(
        teacher_logits_BxTxV, student_logits_BxTxV, "forward_kl", 0.5, temperature
    )


def reverse_kl(
    teacher_logits_BxTxV: jax.Array, student_logits_BxTxV: jax.Array, temperature: float = 1.0
) -> jax.Array:
    """KL(Q||P) per position: mode-seeking, the on-policy distillation loss."""
    return token_divergence(
        teacher_logits_BxTxV, student_logits_BxTxV, "reverse_kl", 0.5, temperature
    )


def jsd(
    teacher_logits_BxTxV: jax.Array,
    student_logits_BxTxV: jax.Array,
    beta: float = 0.5,
    temperature: float = 1.0,
) -> jax.Array:
    """Generalized JSD(beta) = beta KL(P||M) + (1-beta) KL(Q||M), M = beta P + (1-beta) Q.

    JSD(beta) itself tends to 0 at both ends, but JSD/beta -> KL(P||Q) as beta -> 0 and
    JSD/(1-beta) -> KL(Q||P) as beta -> 1. Following GKD and TRL, beta = 0 is therefore
    defined as forward KL and beta = 1 as reverse KL (exactly those functions), so one
    knob sweeps forward KL -> JSD -> reverse KL.
    """
    return token_divergence(teacher_logits_BxTxV, student_logits_BxTxV, "jsd", beta, temperature)


def token_divergence(
    teacher_logits_BxTxV: jax.Array,
    student_logits_BxTxV: jax.Array,
    kind: str,
    beta: float = 0.5,
    temperature: float = 1.0,
) -> jax.Array:
    """Per-position divergence [B, T], kind in FULL_VOCAB_KINDS; beta is used by "jsd".

    The temperature divides teacher and student logits alike; beta and temperature are
    Python numbers (checked eagerly, ValueError when out of range).
    """
    _check_divergence_args(kind, beta, temperature)
    logp_BxTxV = log_probs(jax.lax.stop_gradient(teacher_logits_BxTxV), temperature)
    logq_BxTxV = log_probs(student_logits_BxTxV, temperature)
    return _divergence(logp_BxTxV, logq_BxTxV, kind, beta)


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


# ------------------------------------------------- chunked LM head + divergence


def _logits(hidden_BxCxD: jax.Array, head_DxV: jax.Array) -> jax.Array:
    """hidden @ head accumulated in at least float32, like the model's own logits."""
    dtype = jnp.promote_types(jnp.result_type(hidden_BxCxD, head_DxV), jnp.float32)
    return jnp.einsum("bcd,dv->bcv", hidden_BxCxD, head_DxV, preferred_element_type=dtype)


def _split_chunks(x_BxT: jax.Array, chunk: int) -> jax.Array:
    """[B, T, ...] -> [T/chunk, B, chunk, ...], zero-padding T up to a multiple of chunk."""
    B, T = x_BxT.shape[:2]
    num_chunks = -(-T // chunk)
    pad = [(0, 0), (0, num_chunks * chunk - T)] + [(0, 0)] * (x_BxT.ndim - 2)
    x_BxNxC = jnp.pad(x_BxT, pad).reshape(B, num_chunks, chunk, *x_BxT.shape[2:])
    return jnp.swapaxes(x_BxNxC, 0, 1)


def _merge_chunks(x_NxBxC: jax.Array, length: int) -> jax.Array:
    """Inverse of `_split_chunks` for per-position outputs; drops the padded positions."""
    num_chunks, B, chunk = x_NxBxC.shape
    return jnp.swapaxes(x_NxBxC, 0, 1).reshape(B, num_chunks * chunk)[:, :length]


def _check_chunk_size(chunk_size: int) -> None:
    if chunk_size < 0:
        raise ValueError(f"chunk_size must be >= 0 (0 = no chunking), got {chunk_size}")


def _map_chunks(
    fn: Callable[[jax.Array, jax.Array, Any], Any],
    teacher_hidden_BxTxD: jax.Array,
    teacher_head_DxV: jax.Array,
    student_hidden_BxTxE: jax.Array,
    student_head_ExV: jax.Array,
    tokens_BxT: jax.Array | None,
    chunk_size: int,
    logits_sharding: Any = None,
) -> Any:
    """Applies fn(teacher_logits, student_logits, tokens) -> {name: [B, C]} chunk by chunk.

    The sequence is cut into chunks of `chunk_size` positions (all rows at once, so a
    batch sharded over devices stays sharded). Each chunk's logits come from hidden @ head
    inside `jax.checkpoint`, so the backward pass recomputes them instead of keeping
    every chunk's [B, C, V] residuals: peak logits memory is O(B x chunk_size x V) in both
    passes. The last chunk is zero-padded; padded positions are computed and dropped,
    so they receive no gradient. chunk_size = 0 materializes all logits at once.
    `logits_sharding` pins both [B, C, V] logits (on a mesh: rows over the data axes,
    vocabulary over the tensor axis, so no device holds a whole vocabulary row).
    """
    _check_chunk_size(chunk_size)
    teacher_hidden_BxTxD = jax.lax.stop_gradient(teacher_hidden_BxTxD)
    teacher_head_DxV = jax.lax.stop_gradient(teacher_head_DxV)

    def chunk_fn(teacher_head, student_head, teacher_hidden, student_hidden, tokens):
        pin = lambda logits: mesh.constrain(logits, logits_sharding)
        return fn(
            pin(_logits(teacher_hidden, teacher_head)),
            pin(_logits(student_hidden, student_head)),
            tokens,
        )

    T = student_hidden_BxTxE.shape[1]
    if chunk_size == 0:
        return chunk_fn(
            teacher_head_DxV,
            student_head_ExV,
            teacher_hidden_BxTxD,
            student_hidden_BxTxE,
            tokens_BxT,
        )
    chunk = min(chunk_size, T)
    remat_fn = jax.checkpoint(chunk_fn, prevent_cse=False)
    inputs = jax.tree.map(
        lambda x: _split_chunks(x, chunk), (teacher_hidden_BxTxD, student_hidden_BxTxE, tokens_BxT)
    )
    outputs = jax.lax.map(lambda xs: remat_fn(teacher_head_DxV, student_head_ExV, *xs), inputs)
    return jax.tree.map(lambda x: _merge_chunks(x, T), outputs)


def chunked_divergence(
    teacher_hidden_BxTxD: jax.Array,
    teacher_head_DxV: jax.Array,
    student_hidden_BxTxE: jax.Array,
    student_head_ExV: jax.Array,
    kind: str = "jsd",
    beta: float = 0.5,
    temperature: float = 1.0,
    chunk_size: int = 128,
) -> jax.Array:
    """`token_divergence` of hidden @ head logits, [B, T], without materializing B x T x V.

    Teacher and student may have different widths (D, E) but share the vocabulary V.
    Equal to the unchunked result; see `_map_chunks` for memory and padding.
    """
    _check_divergence_args(kind, beta, temperature)

    def fn(teacher_logits_BxCxV, student_logits_BxCxV, _):
        return token_divergence(teacher_logits_BxCxV, student_logits_BxCxV, kind, beta, temperature)

    return _map_chunks(
        fn,
        teacher_hidden_BxTxD,
        teacher_head_DxV,
        student_hidden_BxTxE,
        student_head_ExV,
        None,
        chunk_size,
    )


def token_statistics(
    teacher_hidden_BxTxD: jax.Array,
    teacher_head_DxV: jax.Array,
    student_hidden_BxTxE: jax.Array,
    student_head_ExV: jax.Array,
    tokens_BxT: jax.Array,
    kind: str = "jsd",
    beta: float = 0.5,
    temperature: float = 1.0,
    chunk_size: int = 128,
    logits_sharding: Any = None,
) -> dict[str, jax.Array]:
    """Everything one distillation step needs per position, [B, T] each, in one chunked pass.

    Keys: "divergence" (`kind`), "forward_kl", "reverse_kl", "teacher_entropy",
    "student_entropy", and "teacher_logprob" / "student_logprob" of `tokens_BxT` (the
    inputs of the sampled-token estimators), all at `temperature`. Only "divergence" and
    "student_logprob" are meant to be differentiated; the rest are metrics.
    """
    _check_divergence_args(kind, beta, temperature)
    resolved = _resolve_kind(kind, beta)

    def fn(teacher_logits_BxCxV, student_logits_BxCxV, tokens_BxC):
        logp_BxCxV = log_probs(teacher_logits_BxCxV, temperature)
        logq_BxCxV = log_probs(student_logits_BxCxV, temperature)
        stats = {
            "forward_kl": _kl(logp_BxCxV, logq_BxCxV),
            "reverse_kl": _kl(logq_BxCxV, logp_BxCxV),
            "teacher_entropy": _entropy(logp_BxCxV),
            "student_entropy": _entropy(logq_BxCxV),
            "teacher_logprob": _take(logp_BxCxV, tokens_BxC),
            "student_logprob": _take(logq_BxCxV, tokens_BxC),
        }
        jsd_only = resolved == "jsd"
        stats["divergence"] = _jsd(logp_BxCxV, logq_BxCxV, beta) if jsd_only else stats[resolved]
        return stats

    return _map_chunks(
        fn,
        teacher_hidden_BxTxD,
        teacher_head_DxV,
        student_hidden_BxTxE,
        student_head_ExV,
        tokens_BxT,
        chunk_size,
        logits_sharding,
    )


# ------------------------------------------------------- teacher top-k + tail bucket


def _check_k(k: int, vocab: int, allow_full: bool) -> None:
    upper = vocab if allow_full else vocab - 1
    if not 1 <= k <= upper:
        raise ValueError(f"k must be in [1, {upper}] for a vocabulary of {vocab}, got {k}")


def teacher_topk(
    teacher_logits_BxTxV: jax.Array, k: int, temperature: float = 1.0
) -> tuple[jax.Array, jax.Array]:
    """The teacher's top-k full-softmax log-probs and token ids, [B, T, k] each.

    This is what a log-prob API serves, and what `teacher_topk_divergence` consumes.
    """
    _check_temperature(temperature)
    _check_k(k, teacher_logits_BxTxV.shape[-1], allow_full=False)
    logp_BxTxV = log_probs(jax.lax.stop_gradient(teacher_logits_BxTxV), temperature)
    return jax.lax.top_k(logp_BxTxV, k)


def teacher_topk_divergence(
    teacher_topk_logprobs_BxTxK: jax.Array,
    teacher_topk_ids_BxTxK: jax.Array,
    student_logits_BxTxV: jax.Array,
    kind: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
) -> jax.Array:
    """Divergence over k + 1 buckets: the teacher's top-k tokens and one tail bucket.

    The tail holds each distribution's remaining mass: 1 - sum of the teacher's top-k
    probabilities, and the student's exact probability on the other V - k tokens. Merging
    tokens into buckets can only lose information, so for every kind the result is a lower
    bound on the full-vocabulary divergence (data processing inequality), equal to it
    when k = V - 1 (the tail is a single token).

    The teacher side is full-softmax log-probs (`teacher_topk` or a log-prob API) at the
    same `temperature` that is applied here to the student logits; ids must be distinct.
    The teacher's tail mass is floored at float32 eps, the resolution of 1 - sum, so a
    teacher whose top-k mass rounds to 1 gives a finite reverse KL instead of inf.
    """
    _check_divergence_args(kind, beta, temperature)
    _check_k(teacher_topk_ids_BxTxK.shape[-1], student_logits_BxTxV.shape[-1], allow_full=False)
    logp_top_BxTxK = _at_least_f32(jax.lax.stop_gradient(teacher_topk_logprobs_BxTxK))
    top_mass_BxT = jnp.sum(jnp.exp(logp_top_BxTxK), axis=-1)
    logp_tail_BxT = jnp.log(jnp.maximum(1.0 - top_mass_BxT, _MIN_TAIL_PROB))

    logq_BxTxV = log_probs(student_logits_BxTxV, temperature)
    logq_top_BxTxK = jnp.take_along_axis(logq_BxTxV, teacher_topk_ids_BxTxK, axis=-1)
    in_top_BxTxV = jnp.put_along_axis(
        jnp.zeros(logq_BxTxV.shape, bool), teacher_topk_ids_BxTxK, True, axis=-1, inplace=False
    )
    logq_tail_BxT = jax.nn.logsumexp(jnp.where(in_top_BxTxV, -jnp.inf, logq_BxTxV), axis=-1)

    logp_buckets = jnp.concatenate([logp_top_BxTxK, logp_tail_BxT[..., None]], axis=-1)
    logq_buckets = jnp.concatenate([logq_top_BxTxK, logq_tail_BxT[..., None]], axis=-1)
    return _divergence(logp_buckets.astype(logq_buckets.dtype), logq_buckets, kind, beta)


# ------------------------------------------------------ student top-k reverse KL


def student_topk_reverse_kl(
    teacher_logits_BxTxV: jax.Array,
    student_logits_BxTxV: jax.Array,
    k: int,
    form: str = "stopgrad",
    temperature: float = 1.0,
) -> jax.Array:
    """Reverse KL(Q||P) restricted to the student's top-k tokens S (chosen without gradient).

    With d_i = log q_i - log p_i from full-softmax log-probs:
    - "stopgrad": value sum_{i in S} q_i d_i, differentiated as sum_{i in S} q_i sg(d_i).
      Its gradient is sum_{i in S} q_i d_i grad(log q_i): the exact reverse-KL gradient
      E_{y~q}[d_y grad(log q_y)] with the expectation cut to S. That is the sense in which
      it is unbiased: each term is exactly token i's expected contribution to the
      sampled-token policy gradient (`policy_gradient_loss`), with no variance and nothing
      added; the only error is the omitted tail, and with k = V it is the exact gradient.
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
    _check_temperature(temperature)
    _check_k(k, student_logits_BxTxV.shape[-1], allow_full=True)
    if form not in TOPK_FORMS:
        raise ValueError(f"unknown top-k form {form!r}; expected one of {TOPK_FORMS}")
    logp_BxTxV = log_probs(jax.lax.stop_gradient(teacher_logits_BxTxV), temperature)
    logq_BxTxV = log_probs(student_logits_BxTxV, temperature)
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


def _take(logprobs_BxTxV: jax.Array, tokens_BxT: jax.Array) -> jax.Array:
    return jnp.take_along_axis(logprobs_BxTxV, tokens_BxT[..., None], axis=-1)[..., 0]


def token_logprobs(
    logits_BxTxV: jax.Array, tokens_BxT: jax.Array, temperature: float = 1.0
) -> jax.Array:
    """log softmax(logits / temperature) at the given tokens, [B, T]."""
    _check_temperature(temperature)
    return _take(log_probs(logits_BxTxV, temperature), tokens_BxT)


def reverse_kl_reward(teacher_logprob_BxT: jax.Array, student_logprob_BxT: jax.Array) -> jax.Array:
    """r_t = log p(y_t) - log q(y_t) for y_t ~ Q: minus the k1 sample of KL(Q||P)."""
    return teacher_logprob_BxT - student_logprob_BxT


def k1_reverse_kl(teacher_logprob_BxT: jax.Array, student_logprob_BxT: jax.Array) -> jax.Array:
    """k1 = log q(y) - log p(y), y ~ Q: unbiased for KL(Q||P), high variance, often < 0.

    k1 and k3 estimate the value. Differentiating them through fixed samples does not
    give the KL gradient (E_q[grad log q] = 0); use `policy_gradient_loss` for that.
    """
    return student_logprob_BxT - teacher_logprob_BxT


def k3_reverse_kl(teacher_logprob_BxT: jax.Array, student_logprob_BxT: jax.Array) -> jax.Array:
    """k3 = (r - 1) - log r with r = p(y) / q(y), y ~ Q: unbiased for KL(Q||P) and >= 0.

    Sign convention as in Schulman's "Approximating KL Divergence" (2020): for KL[q, p]
    with samples from q, r = p/q, k1 = -log r and k3 = (r - 1) - log r. Here q is the
    student (the sampler) and p the teacher, so log r is the reward
    `reverse_kl_reward`. k3 >= 0 because e^x >= 1 + x; expm1 keeps it accurate for small
    log r, and the clamp removes rounding below zero. Beware r = e^(log r) grows fast
    where the teacher is far more confident than the student.
    """
    log_r_BxT = reverse_kl_reward(teacher_logprob_BxT, student_logprob_BxT)
    return _nonnegative(jnp.expm1(log_r_BxT) - log_r_BxT)


def policy_gradient_loss(reward_BxT: jax.Array, student_logprob_BxT: jax.Array) -> jax.Array:
    """-(sg(reward) * log q(y)), per token; the on-policy distillation surrogate.

    With reward = `reverse_kl_reward` and y ~ Q (current params), its expected gradient is
    E_q[(log q - log p) grad(log q)] = grad KL(Q||P) at each position given its prefix.
    Per token on purpose: the reward is not summed over later positions (discount 0), which
    ignores how y_t changes later positions' KL but keeps the variance low.
    """
    return -jax.lax.stop_gradient(reward_BxT) * student_logprob_BxT


def importance_weighted_pg_loss(
    reward_BxT: jax.Array,
    student_logprob_BxT: jax.Array,
    sampler_logprob_BxT: jax.Array,
    clip_epsilon: float | None = None,
) -> jax.Array:
    """`policy_gradient_loss` for tokens sampled by older params (or another engine).

    The gradient is weighted by rho = q_theta(y) / q_sampler(y) (sampler log-probs under
    stop_gradient), which makes it unbiased for grad KL(Q_theta||P) when y ~ Q_sampler
    and the reward uses the current student's log-probs; rewards computed with the
    sampler's log-probs are the usual off-policy approximation. At rho = 1 the gradient
    equals `policy_gradient_loss`'s. `clip_epsilon` applies PPO's pessimistic clipping,
    -min(rho A, clip(rho, 1 - eps, 1 + eps) A), which stops the gradient once rho has
    moved more than eps in the direction the advantage favours.
    """
    if clip_epsilon is not None and not clip_epsilon > 0:
        raise ValueError(f"clip_epsilon must be > 0 or None, got {clip_epsilon}")
    advantage_BxT = jax.lax.stop_gradient(reward_BxT)
    ratio_BxT = jnp.exp(student_logprob_BxT - jax.lax.stop_gradient(sampler_logprob_BxT))
    if clip_epsilon is None:
        return -advantage_BxT * ratio_BxT
    clipped_BxT = jnp.clip(ratio_BxT, 1.0 - clip_epsilon, 1.0 + clip_epsilon)
    return -jnp.minimum(advantage_BxT * ratio_BxT, advantage_BxT * clipped_BxT)
