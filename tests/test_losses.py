"""Distillation objectives against float64 references, their limits, gradients and estimators."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opd_jax import losses, validation

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


def _divergence(teacher, student, kind, beta=0.5, temperature=1.0):
    """`token_divergence` of logits, as the training step computes it."""
    return losses.token_divergence(
        losses.log_probs(teacher, temperature), losses.log_probs(student, temperature), kind, beta
    )


# ------------------------------------------------------------- full-vocabulary values


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("kind,beta", KINDS)
def test_divergences_match_float64_reference(kind, beta, temperature):
    teacher, student = _logits(0, (2, 3, 11), 3.0), _logits(1, (2, 3, 11), 3.0)
    ours = _divergence(teacher, student, kind, beta, temperature)
    assert ours.shape == (2, 3) and ours.dtype == jnp.float32
    expected = _np_divergence(teacher, student, kind, beta, temperature)
    # float32 log-softmax rounding vs float64: measured <= 3.4e-7 relative.
    np.testing.assert_allclose(ours, expected, rtol=3e-6, atol=1e-7)


@pytest.mark.parametrize("kind,beta", KINDS)
def test_identical_distributions_give_zero(kind, beta):
    logits = _logits(2, (3, 4, 50), 4.0)
    # float32 rounding of 50 terms that cancel: measured <= 4.4e-8.
    np.testing.assert_allclose(_divergence(logits, logits, kind, beta), 0.0, atol=5e-7)


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
    shifted = (teacher.astype(jnp.float32) + 1.0).astype(jnp.bfloat16)  # same softmax
    for other in (student, shifted):
        assert int(jnp.sum(_naive_f32(teacher, other, kind, beta) < 0)) > 0
        values = _divergence(teacher, other, kind, beta)
        assert values.dtype == jnp.float32
        assert float(values.min()) >= 0.0
        assert float(values.max()) < 1e-3  # still tiny: the clamp only removes rounding


def test_jsd_limits_are_forward_and_reverse_kl():
    teacher, student = _logits(4, (2, 3, 9), 1.0), _logits(5, (2, 3, 9), 1.0)
    np.testing.assert_array_equal(
        _divergence(teacher, student, "jsd", 0.0), _divergence(teacher, student, "forward_kl")
    )
    np.testing.assert_array_equal(
        _divergence(teacher, student, "jsd", 1.0), _divergence(teacher, student, "reverse_kl")
    )

    # The limits in float64, so float32 rounding of the O(beta) values does not blur them:
    # the relative gap to KL shrinks linearly with beta.
    with jax.enable_x64(True):
        t, s = jnp.float64(teacher), jnp.float64(student)
        fkl64, rkl64 = _divergence(t, s, "forward_kl"), _divergence(t, s, "reverse_kl")

        def gaps(beta: float) -> tuple[float, float]:
            forward = _divergence(t, s, "jsd", beta) / beta / fkl64 - 1
            reverse = _divergence(t, s, "jsd", 1 - beta) / beta / rkl64 - 1
            return float(jnp.abs(forward).max()), float(jnp.abs(reverse).max())

        near, far = gaps(1e-5), gaps(1e-3)
    for near_gap, far_gap in zip(near, far, strict=True):
        assert near_gap < 1e-3
        assert near_gap < far_gap / 50


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
    # Two float32 sums in another order: measured exactly equal; 1e-6 is a few ulps.
    np.testing.assert_allclose(shared, whole, rtol=1e-6)
    assert abs(float(separate) - float(whole)) > 1e-2


# ----------------------------------------------------------------- objective choices


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (
            {"divergence": "kl"},
            r"^Objective.divergence='kl' is not one of forward_kl, reverse_kl, jsd$",
        ),
        ({"estimator": "k2"}, r"^Objective.estimator='k2' is not one of full, teacher_topk, "),
        ({"beta": 1.5}, r"^Objective.beta=1.5 must be a number in \[0, 1\]$"),
        ({"beta": float("nan")}, r"^Objective.beta=nan must be a number in \[0, 1\]$"),
        ({"temperature": 0.0}, r"^Objective.temperature=0.0 must be a number > 0$"),
        ({"top_k": "8"}, r"^Objective.top_k='8' must be an integer >= 0$"),
        (
            {"divergence": "jsd", "estimator": "pg"},
            r"^Objective.estimator='pg' estimates reverse KL only.*valid estimators are "
            r"full, teacher_topk$",
        ),
        ({"divergence": "forward_kl", "estimator": "student_topk", "top_k": 2}, "reverse KL only"),
        (
            {"estimator": "teacher_topk"},
            r"^Objective.top_k=0 must be >= 1 with estimator='teacher_topk'$",
        ),
        ({"topk_form": "biased"}, r"^Objective.topk_form='biased' is not one of stopgrad, "),
    ],
)
def test_invalid_objectives_fail_with_one_line_naming_the_field(kwargs, message):
    with pytest.raises(validation.ConfigError, match=message) as err:
        losses.Objective(**kwargs)
    assert "\n" not in str(err.value)


def test_jsd_at_beta_one_is_reverse_kl_for_the_sampled_estimators():
    objective = losses.Objective(divergence="jsd", beta=1.0, estimator="k3")
    assert objective.kind == "reverse_kl" and objective.sampled


# ----------------------------------------------------------------- chunked LM head


def _hidden_and_heads(T: int = 7, V: int = 13):
    return (
        jnp.asarray(_logits(10, (2, T, 6), 1.0)),
        jnp.asarray(_logits(11, (6, V), 0.7)),
        jnp.asarray(_logits(12, (2, T, 4), 1.0)),
        jnp.asarray(_logits(13, (4, V), 0.7)),
    )


CHUNKED_OBJECTIVES = [
    losses.Objective("forward_kl", temperature=1.3),
    losses.Objective("reverse_kl", temperature=1.3),
    losses.Objective("jsd", 0.3, temperature=1.3),
    losses.Objective("jsd", 0.3, "teacher_topk", top_k=4, temperature=1.3),
    losses.Objective("reverse_kl", estimator="student_topk", top_k=4, temperature=1.3),
]


@pytest.mark.parametrize("chunk_size", [3, 16])
@pytest.mark.parametrize("objective", CHUNKED_OBJECTIVES, ids=lambda o: o.estimator + o.divergence)
def test_chunked_equals_unchunked_values_and_gradients(objective, chunk_size):
    t_hidden, t_head, s_hidden, s_head = _hidden_and_heads()
    tokens = jnp.asarray(np.random.default_rng(9).integers(0, 13, (2, 7)))
    mask = jnp.asarray(np.arange(7)[None, :] < np.array([[7], [5]]))

    def chunked(t_hidden, t_head, s_hidden, s_head):
        stats = losses.token_statistics(
            t_hidden, t_head, s_hidden, s_head, tokens, objective, chunk_size=chunk_size
        )
        return losses.masked_mean(stats["estimate"], mask), stats["estimate"]

    def unchunked(s_hidden, s_head):
        stats = losses.token_statistics(
            t_hidden, t_head, s_hidden, s_head, tokens, objective, chunk_size=0
        )
        return losses.masked_mean(stats["estimate"], mask), stats["estimate"]

    grads, values = jax.jit(jax.grad(chunked, argnums=(0, 1, 2, 3), has_aux=True))(
        t_hidden, t_head, s_hidden, s_head
    )
    ref_grads, ref_values = jax.jit(jax.grad(unchunked, argnums=(0, 1), has_aux=True))(
        s_hidden, s_head
    )
    assert values.shape == (2, 7)
    # The same float32 math in other shapes and summation orders: measured <= 3.6e-7.
    np.testing.assert_allclose(values, ref_values, rtol=1e-6, atol=4e-6)
    np.testing.assert_allclose(grads[2], ref_grads[0], rtol=1e-6, atol=4e-6)
    np.testing.assert_allclose(grads[3], ref_grads[1], rtol=1e-6, atol=4e-6)
    assert float(jnp.abs(grads[3]).max()) > 1e-3
    # The teacher is a fixed target.
    assert not np.any(grads[0]) and not np.any(grads[1])


def test_chunked_memory_does_not_grow_with_sequence_length():
    """Compiled temp memory of value + gradient: chunked stays flat as T doubles."""
    B, D, V = 2, 16, 2048
    objective = losses.Objective("jsd")

    def temp_bytes(T: int, chunk_size: int) -> int:
        t_hidden, s_hidden = jnp.zeros((B, T, D)), jnp.zeros((B, T, D))
        head, tokens = jnp.zeros((D, V)), jnp.zeros((B, T), jnp.int32)

        def loss(s_hidden, s_head):
            stats = losses.token_statistics(
                t_hidden, head, s_hidden, s_head, tokens, objective, chunk_size=chunk_size
            )
            return jnp.mean(stats["estimate"])

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
    objective = losses.Objective("jsd", 0.3, temperature=0.8)
    stats = losses.token_statistics(
        t_hidden, t_head, s_hidden, s_head, tokens, objective, chunk_size=3
    )
    teacher, student = np.asarray(t_hidden @ t_head), np.asarray(s_hidden @ s_head)
    lp = _np_log_softmax(np.float64(teacher) / 0.8)
    lq = _np_log_softmax(np.float64(student) / 0.8)
    at_tokens = lambda logprobs: np.take_along_axis(logprobs, np.asarray(tokens)[..., None], -1)
    jsd = _np_divergence(teacher, student, "jsd", 0.3, 0.8)
    expected = {
        "estimate": jsd,
        "divergence": jsd,
        "forward_kl": _np_divergence(teacher, student, "forward_kl", temperature=0.8),
        "reverse_kl": _np_divergence(teacher, student, "reverse_kl", temperature=0.8),
        "teacher_entropy": -np.sum(np.exp(lp) * lp, -1),
        "student_entropy": -np.sum(np.exp(lq) * lq, -1),
        "teacher_logprob": at_tokens(lp)[..., 0],
        "student_logprob": at_tokens(lq)[..., 0],
        "student_raw_logprob": at_tokens(_np_log_softmax(np.float64(student)))[..., 0],
    }
    assert set(stats) == set(expected)
    for name, value in expected.items():
        # float32 logits and log-softmax vs float64: measured <= 2.9e-7 relative.
        np.testing.assert_allclose(stats[name], value, rtol=3e-6, atol=1e-7, err_msg=name)
    beta_one = losses.token_statistics(
        t_hidden, t_head, s_hidden, s_head, tokens, losses.Objective("jsd", 1.0), chunk_size=3
    )
    np.testing.assert_array_equal(beta_one["divergence"], beta_one["reverse_kl"])


def test_sampled_estimators_refuse_a_batch_without_sampler_logprobs():
    t_hidden, t_head, s_hidden, s_head = _hidden_and_heads()
    tokens = jnp.zeros((2, 7), jnp.int32)
    with pytest.raises(ValueError, match="estimator='pg'.*pass sampler_logprob_BxT"):
        losses.token_statistics(
            t_hidden, t_head, s_hidden, s_head, tokens, losses.Objective("reverse_kl", 0.5, "pg")
        )


# --------------------------------------------------------- finite differences (x64)


def _fd_cases():
    teacher = _logits(20, (1, 2, 5))
    lp = losses.log_probs(teacher, 0.7)
    lq = lambda s: losses.log_probs(s, 0.7)
    cases = {
        f"{kind}-{beta}": lambda s, kind=kind, beta=beta: losses.token_divergence(
            lp, lq(s), kind, beta
        )
        for kind, beta in [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)]
    }
    for kind in losses.DIVERGENCES:
        cases[f"topk-tail-{kind}"] = lambda s, kind=kind: losses.teacher_topk_divergence(
            lp, lq(s), 2, kind, 0.3
        )
    for form in ("renormalized", "unnormalized"):
        cases[f"student-topk-{form}"] = lambda s, form=form: losses.student_topk_reverse_kl(
            lp, lq(s), 3, form
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
        # Central differences at h = 1e-6: O(h^2) truncation plus ~1e-16 / h rounding,
        # measured <= 6.9e-10 absolute.
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
        lp, lq = (
            losses.log_probs(jnp.float64(teacher), 0.8),
            losses.log_probs(jnp.float64(student), 0.8),
        )
        full = losses.token_divergence(lp, lq, kind, beta)
        exact = losses.teacher_topk_divergence(lp, lq, 7, kind, beta)
        # float64 rounding of 1 - sum(top-7): measured <= 1.6e-14 relative.
        np.testing.assert_allclose(exact, full, rtol=2e-13)

    lp, lq = losses.log_probs(teacher, 0.8), losses.log_probs(student, 0.8)
    full = losses.token_divergence(lp, lq, kind, beta)
    for k in (1, 3):
        bucketed = losses.teacher_topk_divergence(lp, lq, k, kind, beta)
        assert np.all(bucketed <= full + 1e-6)  # float32 rounding of both values
        assert float(jnp.max(full - bucketed)) > 1e-3


def test_teacher_topk_tail_is_finite_when_the_top_mass_rounds_to_one():
    teacher = losses.log_probs(jnp.asarray([[[40.0, 0.0, 0.0, 0.0, 0.0, 0.0]]]))
    student = losses.log_probs(jnp.asarray(_logits(32, (1, 1, 6))))
    assert float(1.0 - jnp.exp(teacher).max()) == 0.0  # the tail mass is lost to rounding
    for kind in losses.DIVERGENCES:
        value = losses.teacher_topk_divergence(teacher, student, 1, kind)
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


def _student_topk(teacher, student, k, form, tau):
    return losses.student_topk_reverse_kl(
        losses.log_probs(teacher, tau), losses.log_probs(student, tau), k, form
    )


def test_student_topk_stopgrad_is_the_restricted_exact_gradient_and_unnormalized_is_not():
    teacher, student = _logits(40, (2, 3, 8)), _logits(41, (2, 3, 8))
    k, tau = 3, 0.9
    grad = lambda form: jax.grad(lambda s: jnp.sum(_student_topk(teacher, s, k, form, tau)))(
        jnp.asarray(student)
    )
    restricted, top_mass_grad = _restricted_reverse_kl_grad(teacher, student, k, tau)
    stopgrad, unnormalized = grad("stopgrad"), grad("unnormalized")
    # float32 gradients vs the float64 formula: measured <= 3.4e-7 absolute.
    np.testing.assert_allclose(stopgrad, restricted, atol=4e-6)
    assert np.abs(unnormalized - restricted).max() > 1e-2
    # The unnormalized bias is exactly the gradient of the student's top-k mass.
    np.testing.assert_allclose(unnormalized - stopgrad, top_mass_grad, atol=4e-6)
    np.testing.assert_array_equal(
        _student_topk(teacher, student, k, "stopgrad", tau),
        _student_topk(teacher, student, k, "unnormalized", tau),
    )


def test_student_topk_forms_at_full_vocabulary_are_reverse_kl():
    teacher, student = _logits(42, (2, 3, 6)), jnp.asarray(_logits(43, (2, 3, 6)))
    exact_fn = lambda s: _divergence(teacher, s, "reverse_kl", temperature=0.9)
    exact_grad = jax.grad(lambda s: jnp.sum(exact_fn(s)))(student)
    for form in losses.TOPK_FORMS:
        fn = lambda s, form=form: _student_topk(teacher, s, 6, form, 0.9)
        # Same float32 sums in another order (sorted top-k vs vocabulary order):
        # measured <= 1.8e-7 relative on values, <= 4.8e-7 absolute on gradients.
        np.testing.assert_allclose(fn(student), exact_fn(student), rtol=2e-6, atol=1e-7)
        grad = jax.grad(lambda s, fn=fn: jnp.sum(fn(s)))(student)
        np.testing.assert_allclose(grad, exact_grad, atol=5e-6)


def test_student_topk_renormalized_matches_reference():
    teacher, student = _logits(44, (2, 3, 8)), _logits(45, (2, 3, 8))
    ours = _student_topk(teacher, student, 3, "renormalized", 1.2)
    lq = _np_log_softmax(np.float64(student) / 1.2)
    top = np.argsort(-lq, -1)[..., :3]
    q = np.take_along_axis(np.exp(lq), top, -1)
    p = np.take_along_axis(np.exp(_np_log_softmax(np.float64(teacher) / 1.2)), top, -1)
    expected = _np_kl(q / q.sum(-1, keepdims=True), p / p.sum(-1, keepdims=True))
    # float32 vs float64: measured <= 3.4e-7 relative.
    np.testing.assert_allclose(ours, expected, rtol=4e-6, atol=1e-7)


# ---------------------------------------------------------------- sampled tokens

# Monte Carlo checks use N fixed-seed samples and a tolerance of 4 standard errors per
# component (SE = per-sample std / sqrt(N)): a correct unbiased estimator lands outside
# it with probability ~6e-5 per component, while the biased variants below miss it by
# many SE, so the tolerance separates right from wrong without depending on luck.
N_SAMPLES = 40_000
TEACHER_1V = _logits(50, (6,))
STUDENT_1V = _logits(51, (6,))
ROLLOUT_TEMPERATURE = 0.7  # rollouts sharper than the loss distribution (temperature 1)


def _samples(logits_V: np.ndarray, temperature: float, seed: int) -> jax.Array:
    scaled_V = jnp.asarray(logits_V) / temperature
    return jax.random.categorical(jax.random.key(seed), scaled_V, shape=(N_SAMPLES,))


def _within_4_se(per_sample_NxV: jax.Array, expected_V: jax.Array) -> bool:
    mean = jnp.mean(per_sample_NxV, axis=0)
    se = jnp.std(per_sample_NxV, axis=0) / math.sqrt(per_sample_NxV.shape[0])
    return bool(jnp.all(jnp.abs(mean - expected_V) <= 4 * se + 1e-7))


def _at(logits_V: jax.Array, token: jax.Array, temperature: float = 1.0) -> jax.Array:
    return losses.token_logprobs(logits_V[None, None], token[None, None], temperature)[0, 0]


def _estimate(estimator: str, student_V, token, sampler_temperature):
    """The per-token estimate for a token drawn at `sampler_temperature` (None: the
    uncorrected estimator, which takes the token to come from the loss distribution)."""
    own = _at(student_V, token)
    sampler = (
        jax.lax.stop_gradient(own)
        if sampler_temperature is None
        else _at(jnp.asarray(STUDENT_1V), token, sampler_temperature)
    )
    return losses.sampled_estimate(_at(TEACHER_1V, token), own, sampler, estimator)


def _per_sample(estimator, tokens_N, sampler_temperature):
    """(values [N], gradients [N, V]) of the estimate at the student's logits."""
    fn = lambda s, token: _estimate(estimator, s, token, sampler_temperature)
    student = jnp.asarray(STUDENT_1V)
    values = jax.vmap(fn, in_axes=(None, 0))(student, tokens_N)
    return values, jax.vmap(jax.grad(fn), in_axes=(None, 0))(student, tokens_N)


def _exact_reverse_kl():
    fn = lambda s: _divergence(TEACHER_1V, s, "reverse_kl")
    return fn(jnp.asarray(STUDENT_1V)), jax.grad(fn)(jnp.asarray(STUDENT_1V))


@pytest.mark.parametrize("estimator", losses.SAMPLED_ESTIMATORS)
@pytest.mark.parametrize("rollout_temperature", [1.0, ROLLOUT_TEMPERATURE])
def test_sampled_estimates_are_unbiased_for_reverse_kl_and_its_gradient(
    estimator, rollout_temperature
):
    """Value and gradient, in expectation over tokens drawn at the rollout temperature,
    equal KL(Q||P) and its gradient at the loss temperature 1."""
    tokens = _samples(STUDENT_1V, rollout_temperature, seed=0)
    values, grads = _per_sample(estimator, tokens, rollout_temperature)
    exact, exact_grad = _exact_reverse_kl()
    assert _within_4_se(values[:, None], exact[None])
    assert _within_4_se(grads, exact_grad)


def test_without_the_importance_weight_sharper_rollouts_bias_the_gradient():
    tokens = _samples(STUDENT_1V, ROLLOUT_TEMPERATURE, seed=0)
    _, grads = _per_sample("pg", tokens, sampler_temperature=None)
    assert not _within_4_se(grads, _exact_reverse_kl()[1])


def test_k3_surrogate_has_the_policy_gradient_and_k1_adds_the_zero_mean_score():
    """Per sample: grad k3 = (1 - r) grad(log q) cancels k3's own (r - 1) in the score
    term, leaving -log r grad(log q), pg's gradient; k1's pathwise term is grad(log q)."""
    tokens = _samples(STUDENT_1V, 1.0, seed=1)[:64]
    pg, k1, k3 = (_per_sample(e, tokens, 1.0) for e in ("pg", "k1", "k3"))
    score = jax.vmap(jax.grad(_at), in_axes=(None, 0))(jnp.asarray(STUDENT_1V), tokens)
    # The same gradient by another float32 path: measured <= 4.8e-7 absolute.
    np.testing.assert_allclose(k3[1], pg[1], atol=5e-6)
    np.testing.assert_allclose(k1[1], pg[1] + score, atol=5e-6)
    np.testing.assert_array_equal(k1[0], pg[0])  # both are valued rho * k1
    assert float(k1[0].min()) < 0.0 <= float(k3[0].min())


def test_padding_positions_give_zero_and_no_nan_gradient():
    """A padding token the teacher is sure of and the student is not: e^(log r) = inf
    there, which must not reach the gradient through the mask."""
    teacher, student = jnp.asarray([[-1e-3, 0.0]]), jnp.asarray([[-2.0, -200.0]])
    valid = jnp.asarray([[True, False]])
    fn = lambda s: jnp.sum(losses.sampled_estimate(teacher, s, s, "k3", valid))
    grad = jax.grad(fn)(student)
    assert bool(jnp.all(jnp.isfinite(grad))) and float(grad[0, 1]) == 0.0


# ------------------------------------------------------------------ bad arguments


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda t, s: losses.token_divergence(t, s, "kl"), "divergence='kl' is not one of"),
        (
            lambda t, s: losses.token_divergence(t, s, "jsd", 1.5),
            r"beta=1.5 must be a number in \[0, 1\]",
        ),
        (
            lambda t, s: losses.token_logprobs(t, jnp.zeros((2, 3), jnp.int32), 0.0),
            "temperature=0.0 must be a number > 0",
        ),
        (lambda t, s: losses.teacher_topk_divergence(t, s, 5), r"top_k must be in \[1, 4\]"),
        (lambda t, s: losses.student_topk_reverse_kl(t, s, 0), r"top_k must be in \[1, 5\]"),
        (lambda t, s: losses.student_topk_reverse_kl(t, s, 2, "biased"), "topk_form='biased'"),
        (lambda t, s: losses.sampled_estimate(t, s, s, "full"), "estimator='full' is not one of"),
    ],
)
def test_bad_arguments_raise_clear_errors(call, message):
    teacher, student = jnp.asarray(_logits(60, (2, 3, 5))), jnp.asarray(_logits(61, (2, 3, 5)))
    with pytest.raises(ValueError, match=message):
        call(teacher, student)


def test_negative_chunk_size_is_refused():
    t_hidden, t_head, s_hidden, s_head = _hidden_and_heads()
    with pytest.raises(ValueError, match="chunk_size must be >= 0"):
        losses.token_statistics(
            t_hidden,
            t_head,
            s_hidden,
            s_head,
            jnp.zeros((2, 7), jnp.int32),
            losses.Objective(),
            chunk_size=-1,
        )
