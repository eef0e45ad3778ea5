"""Distillation losses against float64 references, their limits, gradients and estimators."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opd_jax import losses

KINDS = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.1), ("jsd", 0.5), ("jsd", 0.9)]


def _logits(seed: int, shape: tuple[int, ...], scale: float = 2.0) -> np.ndarray:
    return (np.random.default_rng(seed).normal(size=shape) * scale).astype(np.float32)


def _np_log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _np_kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    return np.sum(p * (np.log(p) - np.log(q)), axis=-1)


def _np_divergence(teacher, student, kind, beta=0.5, temperature=1.0) -> np.ndarray:
    """Direct float64 definitions, mixing probabilities (not log-probs) for the JSD."""
    p = np.exp(_np_log_softmax(np.float64(teacher) / temperature))
    q = np.exp(_np_log_softmax(np.float64(student) / temperature))
    if kind == "forward_kl":
        return _np_kl(p, q)
    if kind == "reverse_kl":
        return _np_kl(q, p)
    m = beta * p + (1 - beta) * q
    return beta * _np_kl(p, m) + (1 - beta) * _np_kl(q, m)


# ------------------------------------------------------------- full-vocabulary values


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("kind,beta", KINDS)
def test_divergences_match_float64_reference(kind, beta, temperature):
    teacher, student = _logits(0, (2, 3, 11), 3.0), _logits(1, (2, 3, 11), 3.0)
    ours = losses.token_divergence(teacher, student, kind, beta, temperature)
    assert ours.shape == (2, 3) and ours.dtype == jnp.float32
    expected = _np_divergence(teacher, student, kind, beta, temperature)
    np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-6)


def test_named_functions_match_dispatch():
    teacher, student = _logits(0, (2, 3, 7)), _logits(1, (2, 3, 7))
    pairs = [
        (losses.forward_kl(teacher, student, 0.5), "forward_kl"),
        (losses.reverse_kl(teacher, student, 0.5), "reverse_kl"),
        (losses.jsd(teacher, student, 0.3, 0.5), "jsd"),
    ]
    for named, kind in pairs:
        expected = _np_divergence(teacher, student, kind, beta=0.3, temperature=0.5)
        np.testing.assert_allclose(named, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind,beta", KINDS)
def test_identical_distributions_give_zero(kind, beta):
    logits = _logits(2, (3, 4, 50), 4.0)
    np.testing.assert_allclose(losses.token_divergence(logits, logits, kind, beta), 0.0, atol=1e-7)


def _naive_f32(teacher, student, kind, beta):
    """The same sums without the clamp, to show the inputs below really round below 0."""
    lp = jax.nn.log_softmax(teacher.astype(jnp.float32))
    lq = jax.nn.log_softmax(student.astype(jnp.float32))
    kl = lambda a, b: jnp.sum(jnp.exp(a) * (a - b), -1)
    if kind == "forward_kl":
        return kl(lp, lq)
    if kind == "reverse_kl":
        return kl(lq, lp)
    lm = jnp.logaddexp(math.log(beta) + lp, math.log1p(-beta) + lq)
    return beta * kl(lp, lm) + (1 - beta) * kl(lq, lm)


@pytest.mark.parametrize("kind,beta", KINDS)
def test_never_negative_for_nearly_identical_bf16(kind, beta):
    rng = np.random.default_rng(3)
    teacher = jnp.asarray(rng.normal(size=(2000, 256)) * 4, jnp.bfloat16)
    bits = np.array(teacher).view(np.uint16).copy()
    bits[rng.random(bits.shape) < 0.05] += 1  # one bf16 ulp on 5% of the logits
    student = jnp.asarray(bits.view(jnp.bfloat16))
    shifted = (teacher.astype(jnp.float32) + 1.0).astype(
        jnp.bfloat16
    )  # same softmax up to rounding
    for other in (student, shifted):
        assert int(jnp.sum(_naive_f32(teacher, other, kind, beta) < 0)) > 0
        values = losses.token_divergence(teacher, other, kind, beta)
        assert values.dtype == jnp.float32
        assert float(values.min()) >= 0.0
        assert float(values.max()) < 1e-3  # still tiny: the clamp only removes rounding


def test_jsd_limits_are_forward_and_reverse_kl():
    teacher, student = _logits(4, (2, 3, 9), 1.0), _logits(5, (2, 3, 9), 1.0)
    fkl = losses.forward_kl(teacher, student)
    rkl = losses.reverse_kl(teacher, student)
    np.testing.assert_array_equal(losses.jsd(teacher, student, 0.0), fkl)
    np.testing.assert_array_equal(losses.jsd(teacher, student, 1.0), rkl)

    # The limits in float64, so float32 rounding of the O(beta) values does not blur them:
    # the relative gap to KL shrinks linearly with beta.
    with jax.enable_x64(True):
        t, s = jnp.float64(teacher), jnp.float64(student)
        fkl64, rkl64 = losses.forward_kl(t, s), losses.reverse_kl(t, s)

        def gaps(beta: float) -> tuple[float, float]:
            forward = losses.jsd(t, s, beta) / beta / fkl64 - 1
            reverse = losses.jsd(t, s, 1 - beta) / beta / rkl64 - 1
            return float(jnp.abs(forward).max()), float(jnp.abs(reverse).max())

        near, far = gaps(1e-5), gaps(1e-3)
    for near_gap, far_gap in zip(near, far, strict=True):
        assert near_gap < 1e-3
        assert near_gap < far_gap / 50


@pytest.mark.parametrize("kind,beta", KINDS)
def test_temperature_scales_both_distributions(kind, beta):
    teacher, student = _logits(6, (2, 3, 8)), _logits(7, (2, 3, 8))
    tau = 2.5
    ours = losses.token_divergence(teacher, student, kind, beta, temperature=tau)
    manual = losses.token_divergence(teacher / tau, student / tau, kind, beta)
    np.testing.assert_allclose(ours, manual, rtol=1e-6, atol=1e-7)
    assert not np.allclose(ours, losses.token_divergence(teacher, student, kind, beta), rtol=1e-2)


# --------------------------------------------------------------------- masked mean


def test_masked_mean_ignores_padding_and_supports_a_shared_count():
    values = np.array([[1.0, 2.0, np.nan], [3.0, np.inf, 5.0]], np.float32)
    mask = np.array([[1, 1, 0], [1, 0, 0]])
    assert float(losses.masked_mean(values, mask)) == pytest.approx(2.0)
    assert float(losses.masked_mean(values, np.zeros_like(mask))) == 0.0
    assert float(losses.masked_mean(values, mask, num_tokens=6)) == pytest.approx(1.0)

    # Gradient accumulation: micro-batch means over the batch's count add up to its mean.
    batch = _logits(8, (4, 5), 1.0)
    batch_mask = np.array([[1] * 5, [1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1] * 4 + [0]])
    whole = losses.masked_mean(batch, batch_mask)
    count = batch_mask.sum()
    shared = sum(losses.masked_mean(batch[i : i + 2], batch_mask[i : i + 2], count) for i in (0, 2))
    separate = sum(losses.masked_mean(batch[i : i + 2], batch_mask[i : i + 2]) for i in (0, 2)) / 2
    np.testing.assert_allclose(shared, whole, rtol=1e-6)
    assert abs(float(separate) - float(whole)) > 1e-2


# ----------------------------------------------------------------- chunked LM head


def _hidden_and_heads(T: int = 7, V: int = 13):
    return (
        jnp.asarray(_logits(10, (2, T, 6), 1.0)),
        jnp.asarray(_logits(11, (6, V), 0.7)),
        jnp.asarray(_logits(12, (2, T, 4), 1.0)),
        jnp.asarray(_logits(13, (4, V), 0.7)),
    )


@pytest.mark.parametrize("chunk_size", [3, 16])
@pytest.mark.parametrize("kind,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)])
def test_chunked_equals_unchunked_values_and_gradients(kind, beta, chunk_size):
    t_hidden, t_head, s_hidden, s_head = _hidden_and_heads()
    mask = jnp.asarray(np.arange(7)[None, :] < np.array([[7], [5]]))

    def chunked(t_hidden, t_head, s_hidden, s_head):
        values = losses.chunked_divergence(
            t_hidden, t_head, s_hidden, s_head, kind, beta, 1.3, chunk_size
        )
        return losses.masked_mean(values, mask), values

    def direct(s_hidden, s_head):
        values = losses.token_divergence(t_hidden @ t_head, s_hidden @ s_head, kind, beta, 1.3)
        return losses.masked_mean(values, mask), values

    grads, values = jax.jit(jax.grad(chunked, argnums=(0, 1, 2, 3), has_aux=True))(
        t_hidden, t_head, s_hidden, s_head
    )
    ref_grads, ref_values = jax.jit(jax.grad(direct, argnums=(0, 1), has_aux=True))(
        s_hidden, s_head
    )
    assert values.shape == (2, 7)
    np.testing.assert_allclose(values, ref_values, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grads[2], ref_grads[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grads[3], ref_grads[1], rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(grads[3]).max()) > 1e-3
    # The teacher is a fixed target.
    assert not np.any(grads[0]) and not np.any(grads[1])


def test_chunked_memory_does_not_grow_with_sequence_length():
    """Compiled temp memory of value + gradient: chunked stays flat as T doubles."""
    B, D, V = 2, 16, 2048

    def temp_bytes(T: int, chunk_size: int) -> int:
        t_hidden, s_hidden = jnp.zeros((B, T, D)), jnp.zeros((B, T, D))
        head = jnp.zeros((D, V))

        def loss(s_hidden, s_head):
            values = losses.chunked_divergence(
                t_hidden, head, s_hidden, s_head, "jsd", chunk_size=chunk_size
            )
            return jnp.mean(values)

        compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(s_hidden, head).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    logits_bytes = B * 64 * V * 4
    assert temp_bytes(64, 0) >= logits_bytes  # unchunked holds [B, T, V] buffers
    assert temp_bytes(128, 0) >= 1.8 * temp_bytes(64, 0)
    chunked_64, chunked_128 = temp_bytes(64, 8), temp_bytes(128, 8)
    assert chunked_64 < logits_bytes
    assert chunked_128 < 1.2 * chunked_64


def test_token_statistics_match_references_when_chunked():
    t_hidden, t_head, s_hidden, s_head = _hidden_and_heads()
    tokens = jnp.asarray(np.random.default_rng(14).integers(0, 13, (2, 7)))
    stats = losses.token_statistics(
        t_hidden, t_head, s_hidden, s_head, tokens, "jsd", 0.3, 0.8, chunk_size=3
    )
    teacher, student = np.asarray(t_hidden @ t_head), np.asarray(s_hidden @ s_head)
    lp = _np_log_softmax(np.float64(teacher) / 0.8)
    lq = _np_log_softmax(np.float64(student) / 0.8)
    expected = {
        "divergence": _np_divergence(teacher, student, "jsd", 0.3, 0.8),
        "forward_kl": _np_divergence(teacher, student, "forward_kl", temperature=0.8),
        "reverse_kl": _np_divergence(teacher, student, "reverse_kl", temperature=0.8),
        "teacher_entropy": -np.sum(np.exp(lp) * lp, -1),
        "student_entropy": -np.sum(np.exp(lq) * lq, -1),
        "teacher_logprob": np.take_along_axis(lp, np.asarray(tokens)[..., None], -1)[..., 0],
        "student_logprob": np.take_along_axis(lq, np.asarray(tokens)[..., None], -1)[..., 0],
    }
    assert set(stats) == set(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(stats[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    beta_one = losses.token_statistics(
        t_hidden, t_head, s_hidden, s_head, tokens, "jsd", 1.0, 0.8, chunk_size=3
    )
    np.testing.assert_array_equal(beta_one["divergence"], beta_one["reverse_kl"])


# --------------------------------------------------------- finite differences (x64)


def _fd_cases():
    teacher = _logits(20, (1, 2, 5))
    teacher_lp, teacher_ids = losses.teacher_topk(teacher, 2, 0.7)
    cases = {
        f"{kind}-{beta}": lambda s, kind=kind, beta=beta: losses.token_divergence(
            teacher, s, kind, beta, 0.7
        )
        for kind, beta in [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)]
    }
    for kind in losses.FULL_VOCAB_KINDS:
        cases[f"topk-tail-{kind}"] = lambda s, kind=kind: losses.teacher_topk_divergence(
            teacher_lp, teacher_ids, s, kind, 0.3, 0.7
        )
    for form in ("renormalized", "unnormalized"):
        cases[f"student-topk-{form}"] = lambda s, form=form: losses.student_topk_reverse_kl(
            teacher, s, 3, form, 0.7
        )
    return cases


@pytest.mark.parametrize("name", list(_fd_cases()))
def test_gradients_match_central_differences_in_float64(name):
    with jax.enable_x64(True):
        fn = _fd_cases()[name]
        student = jnp.asarray(_logits(21, (1, 2, 5)), jnp.float64)
        weights = jnp.asarray([[1.0, -0.7]], jnp.float64)
        scalar = lambda s: jnp.sum(weights * fn(s))
        grad = jax.jit(jax.grad(scalar))(student)
        assert grad.dtype == jnp.float64
        h = 1e-6
        basis = jnp.eye(student.size, dtype=jnp.float64).reshape(-1, *student.shape)
        diffs = jax.jit(
            jax.vmap(lambda e: (scalar(student + h * e) - scalar(student - h * e)) / (2 * h))
        )
        numeric = diffs(basis).reshape(student.shape)
        np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-8)
        assert float(jnp.abs(grad).max()) > 1e-3
    assert jnp.zeros(1).dtype == jnp.float32  # x64 is switched back off


# ------------------------------------------------------------ teacher top-k + tail


@pytest.mark.parametrize("kind,beta", KINDS)
def test_teacher_topk_tail_is_exact_at_v_minus_1_and_a_lower_bound_below(kind, beta):
    teacher, student = _logits(30, (2, 3, 8)), _logits(31, (2, 3, 8))
    # Equality in float64: in float32 the teacher's tail, rebuilt as 1 - sum of top-k
    # probabilities, carries ~1e-7 absolute error, a large relative error on a small tail.
    with jax.enable_x64(True):
        t, s = jnp.float64(teacher), jnp.float64(student)
        full = losses.token_divergence(t, s, kind, beta, 0.8)
        exact = losses.teacher_topk_divergence(*losses.teacher_topk(t, 7, 0.8), s, kind, beta, 0.8)
        np.testing.assert_allclose(exact, full, rtol=1e-10)

    full = losses.token_divergence(teacher, student, kind, beta, 0.8)
    for k in (1, 3):
        bucketed = losses.teacher_topk_divergence(
            *losses.teacher_topk(teacher, k, 0.8), student, kind, beta, 0.8
        )
        assert np.all(bucketed <= full + 1e-6)
        assert float(jnp.max(full - bucketed)) > 1e-3


def test_teacher_topk_tail_is_finite_when_the_top_mass_rounds_to_one():
    teacher = jnp.asarray([[[40.0, 0.0, 0.0, 0.0, 0.0, 0.0]]])
    student = jnp.asarray(_logits(32, (1, 1, 6)))
    logprobs, ids = losses.teacher_topk(teacher, 1)
    assert float(1.0 - jnp.exp(logprobs).sum()) == 0.0  # the tail mass is lost to rounding
    for kind in losses.FULL_VOCAB_KINDS:
        value = losses.teacher_topk_divergence(logprobs, ids, student, kind)
        assert bool(jnp.all(jnp.isfinite(value))) and float(value.min()) > 0.0


# ------------------------------------------------------- student top-k reverse KL


def _restricted_reverse_kl_grad(teacher, student, k, tau):
    """sum_{i in S} q_i d_i grad(log q_i) w.r.t. the logits, in float64: component j is
    q_j ([j in S] d_j - sum_{i in S} q_i d_i) / tau. With S = V it is the exact gradient."""
    lq = _np_log_softmax(np.float64(student) / tau)
    d = lq - _np_log_softmax(np.float64(teacher) / tau)
    q = np.exp(lq)
    in_top = np.zeros(q.shape, bool)
    np.put_along_axis(in_top, np.argsort(-q, -1)[..., :k], True, -1)
    partial = np.sum(np.where(in_top, q * d, 0.0), -1, keepdims=True)
    top_mass = np.sum(np.where(in_top, q, 0.0), -1, keepdims=True)
    return q * (in_top * d - partial) / tau, q * (in_top - top_mass) / tau


def test_student_topk_stopgrad_is_the_restricted_exact_gradient_and_unnormalized_is_not():
    teacher, student = _logits(40, (2, 3, 8)), _logits(41, (2, 3, 8))
    k, tau = 3, 0.9
    grad = lambda form: jax.grad(
        lambda s: jnp.sum(losses.student_topk_reverse_kl(teacher, s, k, form, tau))
    )(jnp.asarray(student))
    restricted, top_mass_grad = _restricted_reverse_kl_grad(teacher, student, k, tau)
    stopgrad, unnormalized = grad("stopgrad"), grad("unnormalized")
    np.testing.assert_allclose(stopgrad, restricted, atol=1e-6)
    assert np.abs(unnormalized - restricted).max() > 1e-2
    # The unnormalized bias is exactly the gradient of the student's top-k mass.
    np.testing.assert_allclose(unnormalized - stopgrad, top_mass_grad, atol=1e-6)
    np.testing.assert_array_equal(
        losses.student_topk_reverse_kl(teacher, student, k, "stopgrad", tau),
        losses.student_topk_reverse_kl(teacher, student, k, "unnormalized", tau),
    )


def test_student_topk_forms_at_full_vocabulary_are_reverse_kl():
    teacher, student = _logits(42, (2, 3, 6)), jnp.asarray(_logits(43, (2, 3, 6)))
    exact = losses.reverse_kl(teacher, student, 0.9)
    exact_grad = jax.grad(lambda s: jnp.sum(losses.reverse_kl(teacher, s, 0.9)))(student)
    for form in losses.TOPK_FORMS:
        fn = lambda s, form=form: losses.student_topk_reverse_kl(teacher, s, 6, form, 0.9)
        np.testing.assert_allclose(fn(student), exact, rtol=1e-5, atol=1e-6)
        grad = jax.grad(lambda s, fn=fn: jnp.sum(fn(s)))(student)
        np.testing.assert_allclose(grad, exact_grad, atol=1e-6)


def test_student_topk_renormalized_matches_reference():
    teacher, student = _logits(44, (2, 3, 8)), _logits(45, (2, 3, 8))
    ours = losses.student_topk_reverse_kl(teacher, student, 3, "renormalized", 1.2)
    lq = _np_log_softmax(np.float64(student) / 1.2)
    top = np.argsort(-lq, -1)[..., :3]
    q = np.take_along_axis(np.exp(lq), top, -1)
    p = np.take_along_axis(np.exp(_np_log_softmax(np.float64(teacher) / 1.2)), top, -1)
    expected = _np_kl(q / q.sum(-1, keepdims=True), p / p.sum(-1, keepdims=True))
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- sampled tokens

# Monte Carlo checks use N fixed-seed samples and a tolerance of 4 standard errors per
# component (SE = per-sample std / sqrt(N)): a correct unbiased estimator lands outside
# it with probability ~6e-5 per component, while the biased variants below miss it by
# many SE, so the tolerance separates right from wrong without depending on luck.
N_SAMPLES = 40_000
TEACHER_1V = _logits(50, (6,))
STUDENT_1V = _logits(51, (6,))


def _samples(logits_V: np.ndarray, seed: int) -> jax.Array:
    return jax.random.categorical(jax.random.key(seed), jnp.asarray(logits_V), shape=(N_SAMPLES,))


def _assert_within_4_se(per_sample_NxV: jax.Array, expected_V: jax.Array) -> None:
    mean = jnp.mean(per_sample_NxV, axis=0)
    se = jnp.std(per_sample_NxV, axis=0) / math.sqrt(per_sample_NxV.shape[0])
    assert bool(jnp.all(jnp.abs(mean - expected_V) <= 4 * se + 1e-7)), (mean, expected_V, se)


def _logprob_at(logits_V: jax.Array, token: jax.Array) -> jax.Array:
    return losses.token_logprobs(logits_V[None, None], token[None, None])[0, 0]


def _per_sample_grads(loss_fn, tokens_N: jax.Array) -> jax.Array:
    return jax.vmap(jax.grad(loss_fn), in_axes=(None, 0))(jnp.asarray(STUDENT_1V), tokens_N)


def _exact_reverse_kl_grad() -> jax.Array:
    return jax.grad(lambda s: losses.reverse_kl(TEACHER_1V, s))(jnp.asarray(STUDENT_1V))


def _reward(student_V, token):
    return losses.reverse_kl_reward(_logprob_at(TEACHER_1V, token), _logprob_at(student_V, token))


def test_policy_gradient_expectation_is_the_reverse_kl_gradient():
    tokens = _samples(STUDENT_1V, 0)

    def pg(student_V, token):
        return losses.policy_gradient_loss(_reward(student_V, token), _logprob_at(student_V, token))

    _assert_within_4_se(_per_sample_grads(pg, tokens), _exact_reverse_kl_grad())

    # Without the stop-gradient on the reward the same check fails (bias grad of -entropy).
    def no_stopgrad(student_V, token):
        return -_reward(student_V, token) * _logprob_at(student_V, token)

    with pytest.raises(AssertionError):
        _assert_within_4_se(_per_sample_grads(no_stopgrad, tokens), _exact_reverse_kl_grad())


def test_importance_weighted_gradient_with_an_older_sampler():
    sampler_V = jnp.asarray(STUDENT_1V + _logits(52, (6,), 0.5))
    tokens = _samples(sampler_V, 1)

    def is_loss(student_V, token):
        return losses.importance_weighted_pg_loss(
            _reward(student_V, token), _logprob_at(student_V, token), _logprob_at(sampler_V, token)
        )

    _assert_within_4_se(_per_sample_grads(is_loss, tokens), _exact_reverse_kl_grad())

    def unweighted(student_V, token):
        return losses.policy_gradient_loss(_reward(student_V, token), _logprob_at(student_V, token))

    with pytest.raises(AssertionError):
        _assert_within_4_se(_per_sample_grads(unweighted, tokens), _exact_reverse_kl_grad())


def test_importance_weight_of_one_gives_the_policy_gradient_and_clipping_stops_it():
    reward = jnp.asarray([[0.7, -0.4]])
    logq = jnp.asarray([[-1.2, -0.3]])
    pg_grad = jax.grad(lambda lq: jnp.sum(losses.policy_gradient_loss(reward, lq)))(logq)
    is_grad = jax.grad(
        lambda lq: jnp.sum(losses.importance_weighted_pg_loss(reward, lq, lq, clip_epsilon=0.2))
    )(logq)
    np.testing.assert_allclose(is_grad, pg_grad, rtol=1e-6)

    def clipped_grad(log_ratio: float, advantage: float) -> float:
        fn = lambda lq: losses.importance_weighted_pg_loss(
            jnp.asarray(advantage), lq, jnp.asarray(0.0), clip_epsilon=0.2
        )
        return float(jax.grad(fn)(jnp.asarray(log_ratio)))

    # Past the clip in the direction the advantage favours: no gradient.
    assert clipped_grad(math.log(1.5), 1.0) == 0.0
    assert clipped_grad(math.log(0.5), -1.0) == 0.0
    # Past the clip in the other direction the (pessimistic) unclipped term still pulls.
    assert clipped_grad(math.log(0.5), 1.0) == pytest.approx(-0.5)
    assert clipped_grad(math.log(1.5), -1.0) == pytest.approx(1.5)


def test_k1_and_k3_estimate_reverse_kl():
    tokens = _samples(STUDENT_1V, 2)
    teacher_lp = losses.token_logprobs(
        np.broadcast_to(TEACHER_1V, (1, N_SAMPLES, 6)), tokens[None]
    )[0]
    student_lp = losses.token_logprobs(
        np.broadcast_to(STUDENT_1V, (1, N_SAMPLES, 6)), tokens[None]
    )[0]
    exact = losses.reverse_kl(TEACHER_1V, STUDENT_1V)
    k1 = losses.k1_reverse_kl(teacher_lp, student_lp)
    k3 = losses.k3_reverse_kl(teacher_lp, student_lp)
    _assert_within_4_se(k1[:, None], exact[None])
    _assert_within_4_se(k3[:, None], exact[None])
    np.testing.assert_allclose(k1, -losses.reverse_kl_reward(teacher_lp, student_lp))
    assert float(k1.min()) < 0.0 <= float(k3.min())
    # k3 = r - 1 - log r with r = p/q (Schulman's convention), not with q/p.
    log_r = np.float64(teacher_lp) - np.float64(student_lp)
    np.testing.assert_allclose(k3, np.expm1(log_r) - log_r, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------ bad arguments


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda t, s: losses.token_divergence(t, s, "kl"), "unknown divergence kind 'kl'"),
        (lambda t, s: losses.token_divergence(t, s, "jsd", beta=1.5), r"beta must be in \[0, 1\]"),
        (lambda t, s: losses.jsd(t, s, beta=-0.1), r"beta must be in \[0, 1\]"),
        (lambda t, s: losses.jsd(t, s, beta=float("nan")), r"beta must be in \[0, 1\]"),
        (lambda t, s: losses.forward_kl(t, s, temperature=0.0), "temperature must be > 0"),
        (lambda t, s: losses.reverse_kl(t, s, temperature=-1.0), "temperature must be > 0"),
        (
            lambda t, s: losses.chunked_divergence(t, jnp.eye(5), s, jnp.eye(5), chunk_size=-1),
            "chunk_size must be >= 0",
        ),
        (lambda t, s: losses.teacher_topk(t, 5), r"k must be in \[1, 4\]"),
        (
            lambda t, s: losses.teacher_topk_divergence(t, jnp.zeros((2, 3, 5), int), s),
            r"k must be in \[1, 4\]",
        ),
        (lambda t, s: losses.student_topk_reverse_kl(t, s, 0), r"k must be in \[1, 5\]"),
        (lambda t, s: losses.student_topk_reverse_kl(t, s, 2, "biased"), "unknown top-k form"),
        (
            lambda t, s: losses.importance_weighted_pg_loss(t, s, s, clip_epsilon=0.0),
            "clip_epsilon must be > 0",
        ),
    ],
)
def test_bad_arguments_raise_clear_errors(call, message):
    teacher, student = jnp.asarray(_logits(60, (2, 3, 5))), jnp.asarray(_logits(61, (2, 3, 5)))
    with pytest.raises(ValueError, match=message):
        call(teacher, student)
