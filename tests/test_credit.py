"""Temporal credit (GAE-OPD) and vocabulary routing (CR-OPD): advantages against numpy
loops, the routed target's support, the reduction to pg, and one update with a value head.

Float error, against float64 references: advantages are float32 sums of at most 6 terms
of size ~1 (measured <= 2.4e-7); routed logit gradients are float32 softmaxes over 8
tokens (measured <= 2.4e-8). The reductions to pg run the same float32 operations on the
same values and were measured equal; their tolerance allows a few ulps of gradients ~4.
Tolerances are ~10x the measured errors."""

import dataclasses
import re

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opd_jax import config, credit, distill, loop, losses, mesh, model, train_state, update
from opd_jax.model import ModelConfig

# float32 against float64 references, measured here: advantages 2.4e-7, routed logit
# gradients 2.4e-8; the bounds are about 100x those, for other CPUs' summation orders.
ATOL = 3e-5  # advantages
ROUTED_ATOL = 3e-6  # logit gradients of the routed surrogate

# Rows of 6, 3, 1 and 0 real tokens; masked positions hold garbage that must not leak.
LENGTHS = np.array([6, 3, 1, 0])
MASK = (np.arange(6)[None] < LENGTHS[:, None]).astype(np.float32)


def _rewards(seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=MASK.shape).astype(np.float32)
    return np.where(MASK > 0, x, np.nan)


def _discounted(x: np.ndarray, discount: float) -> np.ndarray:
    """sum_{l>=0} discount^l x_{t+l} over each row's real tokens, by a plain loop."""
    out = np.zeros_like(MASK)
    for b, n in enumerate(LENGTHS):
        for t in range(n):
            out[b, t] = sum(discount**i * x[b, t + i] for i in range(n - t))
    return out


def _gae(r: np.ndarray, v: np.ndarray, gamma: float, lam: float) -> np.ndarray:
    """GAE by its definition: delta_t with V = 0 after the last real token, then the
    (gamma lambda)-discounted sum of deltas."""
    delta = np.zeros_like(MASK)
    for b, n in enumerate(LENGTHS):
        for t in range(n):
            later = v[b, t + 1] if t + 1 < n else 0.0
            delta[b, t] = r[b, t] + gamma * later - v[b, t]
    return _discounted(delta, gamma * lam)


def _advantages(kind: str, r: np.ndarray, gamma=1.0, lam=1.0, v=None) -> np.ndarray:
    value = None if v is None else jnp.asarray(v)
    return np.asarray(credit.advantages(jnp.asarray(r), jnp.asarray(MASK), kind, gamma, lam, value))


@pytest.mark.parametrize(
    "kind, gamma, discount",
    [("immediate", 0.7, 0.0), ("return_to_go", 0.7, 1.0), ("discounted", 0.7, 0.7)],
)
def test_reward_credits_match_a_numpy_loop_over_padded_rows(kind, gamma, discount):
    r = _rewards(0)
    np.testing.assert_allclose(_advantages(kind, r, gamma), _discounted(r, discount), atol=ATOL)


def test_gae_follows_its_definition_and_its_two_limits():
    r, v = _rewards(1), _rewards(2)
    np.testing.assert_allclose(_advantages("gae", r, 0.9, 0.8, v), _gae(r, v, 0.9, 0.8), atol=ATOL)
    # gamma = 0: the immediate reward (minus the baseline V)
    zero = np.zeros_like(MASK)
    np.testing.assert_allclose(_advantages("gae", r, 0.0, 0.8, zero), _advantages("immediate", r))
    np.testing.assert_allclose(
        _advantages("gae", r, 0.0, 0.8, v), np.where(MASK > 0, r - v, 0.0), atol=ATOL
    )
    # lambda = 1: the return minus V, which with V = 0 and gamma = 1 is return-to-go
    np.testing.assert_allclose(
        _advantages("gae", r, 1.0, 1.0, zero), _advantages("return_to_go", r), atol=ATOL
    )
    np.testing.assert_allclose(
        _advantages("gae", r, 0.9, 1.0, v),
        _discounted(r, 0.9) - np.where(MASK > 0, v, 0.0),
        atol=ATOL,
    )


# --------------------------------------------------------------------------- routing

# One row, three positions over 8 tokens, k = 3. The teacher's top 3 are {0, 1, 2}; the
# student's are {1, 2, 3} at positions 0 and 1, {4, 6, 7} at position 2. Sampled tokens
# y = 1, 5, 6 make R = {2}, {1, 2} and the empty set.
TEACHER_LOGITS = np.array([3.0, 2.5, 2.0, -1.0, 0.0, -2.0, -1.5, -3.0], np.float32)
STUDENT_LOGITS = np.array([-1.0, 2.0, 1.5, 2.5, 0.0, -2.0, 0.5, -1.0], np.float32)
DISJOINT_LOGITS = np.array([-3.0, -3.0, -3.0, -3.0, 2.0, 1.0, 3.0, 2.5], np.float32)
TOKENS = jnp.asarray([[1, 5, 6]])


def _logits() -> tuple[jax.Array, jax.Array]:
    teacher = np.stack([TEACHER_LOGITS] * 3)
    student = np.stack([STUDENT_LOGITS, STUDENT_LOGITS, DISJOINT_LOGITS])
    return jnp.asarray(teacher[None]), jnp.asarray(student[None])


def _routed_gradient(advantage: jax.Array) -> tuple[np.ndarray, dict]:
    """d/d student logits of the routed surrogate, on-policy (rho = 1), and routed_set."""
    teacher, student = _logits()
    logp = jax.nn.log_softmax(teacher)

    def loss(student_logits):
        logq = jax.nn.log_softmax(student_logits)
        routed = credit.routed_set(logp, logq, TOKENS, 3)
        logq_y = losses.token_logprobs(student_logits, TOKENS)
        sampler = jax.lax.stop_gradient(logq_y)
        valid = jnp.ones(TOKENS.shape)
        term = credit.surrogate(
            advantage, logq_y, sampler, valid, routed["routed_logprob"], routed["routed"]
        )
        return jnp.sum(term), routed

    grad, routed = jax.grad(loss, has_aux=True)(student)
    return np.asarray(grad[0]), routed


def test_routed_target_is_the_teachers_renormalized_mass_on_the_shared_set():
    """A < 0: the logit gradient is |A| (e_y - pi), so descent moves mass from y to R
    alone, in proportion to p there; with R empty it is pg's |A| (e_y - q)."""
    teacher, student = _logits()
    p, q = np.asarray(jax.nn.softmax(teacher[0])), np.asarray(jax.nn.softmax(student[0]))
    advantage = jnp.asarray([[-1.5, -0.5, -2.0]])
    grad, routed = _routed_gradient(advantage)
    np.testing.assert_array_equal(routed["routed"], [[1.0, 1.0, 0.0]])
    for t, routed_set in enumerate(([2], [1, 2], [])):
        target = grad[t] / float(advantage[0, t])  # where descent sends y's lost mass, per unit
        y = int(TOKENS[0, t])
        pi = np.zeros(8)
        pi[routed_set] = p[t, routed_set] / p[t, routed_set].sum()
        spread = pi if routed_set else q[t]
        np.testing.assert_allclose(target, spread - np.eye(8)[y], atol=ROUTED_ATOL, err_msg=f"{t}")
        if routed_set:
            outside = np.setdiff1d(np.arange(8), routed_set + [y])
            np.testing.assert_allclose(target[outside], 0.0, atol=ROUTED_ATOL)
            logq = np.log(q[t])
            np.testing.assert_allclose(routed["routed_logprob"][0, t], np.sum(pi * logq), rtol=1e-6)
    # A >= 0 is never routed: the plain gradient -A (e_y - q)
    grad, _ = _routed_gradient(jnp.asarray([[1.0, 0.0, 2.0]]))
    for t, a in enumerate([1.0, 0.0, 2.0]):
        expected = -a * (np.eye(8)[int(TOKENS[0, t])] - q[t])
        np.testing.assert_allclose(grad[t], expected, atol=ROUTED_ATOL)


# --------------------------------------------------------------------- reduction to pg

V, D, N = 8, 5, 5


def _pg_problem():
    """Hidden states and heads whose last hidden unit is a constant 1 that pushes the
    teacher toward tokens 0-3 and the student toward 4-7 (disjoint top-4 sets), and a
    batch with real lengths 5 and 3 and a sampler unlike the student."""
    keys = jax.random.split(jax.random.key(0), 5)
    ones = jnp.ones((2, N, 1))
    hidden = lambda key: jnp.concatenate([0.3 * jax.random.normal(key, (2, N, D - 1)), ones], -1)
    bias = lambda tokens: jnp.zeros((1, V)).at[0, tokens].set(6.0)
    head = lambda key, tokens: jnp.concatenate(
        [jax.random.normal(key, (D - 1, V)), bias(tokens)], 0
    )
    mask = (np.arange(N)[None] < np.array([[5], [3]])).astype(np.float32)
    batch = train_state.DistillBatch(
        prompt_BxP=jnp.zeros((2, 1), jnp.int32),
        prompt_valid_BxP=jnp.ones((2, 1), bool),
        completion_BxN=jax.random.randint(keys[0], (2, N), 0, V),
        completion_mask_BxN=jnp.asarray(mask),
        sampler_logprob_BxN=-2.0 + 0.3 * jax.random.normal(keys[1], (2, N)),
    )
    teacher = (hidden(keys[2]), head(keys[3], jnp.arange(4)))
    student = (hidden(keys[4]), head(keys[3], jnp.arange(4, 8)))
    return teacher, student, batch


def _loss_and_grads(cfg: distill.DistillConfig):
    (teacher_hidden, teacher_head), student, batch = _pg_problem()
    counts = train_state.batch_counts(batch)

    def loss(student):
        terms = losses.token_statistics(
            teacher_hidden,
            teacher_head,
            *student,
            batch.completion_BxN,
            cfg,
            sampler_logprob_BxT=batch.sampler_logprob_BxN,
            valid_BxT=batch.completion_mask_BxN,
            chunk_size=cfg.vocab_chunk,
            diagnostic_k=cfg.diagnostic_top_k,
        )
        shares = distill.loss_terms(terms, batch, cfg, counts)
        return shares["loss"], shares

    return jax.value_and_grad(loss, has_aux=True)(student)


def test_credit_and_routing_reduce_to_pg_when_they_change_nothing():
    """Immediate credit with no routing is pg's own path; the credit path with A = r
    (discounted, gamma 0) and routing whose sets never meet give its loss and gradient."""
    pg = distill.DistillConfig(
        divergence="reverse_kl", estimator="pg", vocab_chunk=2, diagnostic_top_k=4
    )
    assert not pg.reassigns_credit
    (loss, shares), grads = _loss_and_grads(pg)
    for other in (
        dataclasses.replace(pg, credit="discounted", gamma=0.0),
        dataclasses.replace(pg, routing="overlap", routing_top_k=4),
    ):
        (other_loss, other_shares), other_grads = _loss_and_grads(other)
        assert other_loss == loss
        for got, want in zip(other_grads, grads, strict=True):
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert float(shares["overlap_ratio"]) == 0.0  # the sets were disjoint indeed
    assert float(other_shares["routed_fraction"]) == 0.0


# -------------------------------------------------------------------- config and update


@pytest.mark.parametrize(
    "bindings, message",
    [
        ({"credit": "gae"}, r"change the gradient of estimator='pg' only, got estimator='full'"),
        (
            {"divergence": "reverse_kl", "estimator": "k3", "routing": "overlap"},
            r"estimator='pg' only, got estimator='k3'",
        ),
        (
            {"credit": "returns"},
            r"^DistillConfig.credit='returns' is not one of immediate, return_to_go, discounted, gae$",
        ),
        ({"routing": "all"}, r"^DistillConfig.routing='all' is not one of none, overlap$"),
        ({"gamma": 1.5}, r"^DistillConfig.gamma=1.5 must be a number in \[0, 1\]$"),
        (
            {"value_learning_rate": 0.0},
            r"^DistillConfig.value_learning_rate=0.0 must be a number > 0$",
        ),
    ],
)
def test_invalid_credit_bindings_fail_with_one_line(bindings, message):
    gin.parse_config([f"DistillConfig.{k} = {v!r}".replace("'", '"') for k, v in bindings.items()])
    with pytest.raises(config.ConfigError) as err:
        distill.DistillConfig()
    assert re.search(message, config.error_line(err.value))


STUDENT = ModelConfig(
    vocab_size=61, d_model=16, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=4, mlp_dim=24
)
GAE = distill.DistillConfig(
    divergence="reverse_kl", estimator="pg", credit="gae", routing="overlap", routing_top_k=8
)


def _value_state(roles: update.Roles, params, placement=None, value_optimizer=None):
    optim = train_state.OptimizerConfig(learning_rate=1e-3, warmup_steps=0)
    optimizer = train_state.make_optimizer(optim, total_steps=10)
    if placement is None:
        return update.init_state(roles, params, optimizer, 0, value_optimizer), optimizer
    sharding = placement.params(roles.student)
    params = mesh.place_params(params, sharding)
    state = update.create_state(roles, params, optimizer, 0, sharding, GAE.value_optimizer())
    return state, optimizer


def test_a_gae_update_trains_the_value_head_beside_the_student():
    """One jitted step on a one-device mesh with GAE and routing: both the student and
    its (replicated) value head move, and every metric is finite."""
    rng = np.random.default_rng(0)
    teacher = jax.tree.map(lambda x: 4.0 * x, model.init_params(STUDENT, jax.random.key(7)))
    roles = update.Roles(STUDENT, STUDENT)
    placement = mesh.Layout().placement(mesh.make_mesh((1, 1, 1), devices=jax.devices()[:1]))
    state, optimizer = _value_state(roles, model.init_params(STUDENT, jax.random.key(0)), placement)
    before = jax.device_get(state)
    frozen = update.frozen_arrays(roles, None, teacher)
    shardings = update.step_shardings(state, jax.tree.map(lambda x: x.sharding, frozen), placement)
    mask = (np.arange(6)[None] < np.array([[6], [4], [2], [5]])).astype(np.float32)
    batch = train_state.DistillBatch(
        prompt_BxP=jnp.asarray(rng.integers(0, 61, (4, 3))),
        prompt_valid_BxP=jnp.ones((4, 3), bool),
        completion_BxN=jnp.asarray(rng.integers(0, 61, (4, 6))),
        completion_mask_BxN=jnp.asarray(mask),
        sampler_logprob_BxN=jnp.full((4, 6), -np.log(61.0), jnp.float32),
    )
    state, metrics = update.make_update_step(roles, GAE, optimizer, shardings)(state, frozen, batch)
    metrics = jax.device_get(metrics)
    assert bool(metrics["finite"]) and int(state.step) == 1
    for name in ("value_loss", "value_grad_norm", "advantage_mean", "return_mean", "loss"):
        assert np.isfinite(metrics[name]), name
    assert metrics["value_loss"] > 0 and metrics["value_grad_norm"] > 0
    assert 0.0 <= metrics["routed_fraction"] <= 1.0
    moved = lambda a, b: max(jax.tree.leaves(jax.tree.map(lambda x, y: np.abs(x - y).max(), a, b)))
    assert moved(jax.device_get(state.value_head.params), before.value_head.params) > 0
    assert moved(jax.device_get(state.params), before.params) > 0


def test_value_head_checkpoints_resume_and_older_ones_still_match(tmp_path):
    """A state with a value head round-trips; its fingerprint names the head, so a run
    without one refuses it; a fingerprint from before the field matches a run without."""
    roles = update.Roles(STUDENT, STUDENT)
    params = model.init_params(STUDENT, jax.random.key(0))
    state, _ = _value_state(roles, params, value_optimizer=GAE.value_optimizer())
    state = state.replace(value_head=state.value_head.replace(params={"w": jnp.ones(16), "b": 2.0}))
    shape = update.student_shape(roles, learns_value=True)
    loop.save(loop.manager(tmp_path / "gae"), 1, state, shape)
    restored = loop.restore_latest(loop.manager(tmp_path / "gae"), loop.abstract(state), shape)
    assert isinstance(restored, train_state.ValueTrainState)
    np.testing.assert_array_equal(restored.value_head.params["w"], np.ones(16))
    with pytest.raises(loop.CheckpointMismatchError, match="fields differ: value_head"):
        loop.check_directory(tmp_path / "gae", update.student_shape(roles))

    @dataclasses.dataclass(frozen=True)
    class OlderShape:  # StudentShape before it had a value_head field
        model: ModelConfig
        lora: None
        teacher: str

    plain, _ = _value_state(roles, params)
    assert type(plain) is train_state.TrainState
    loop.save(loop.manager(tmp_path / "older"), 1, plain, OlderShape(STUDENT, None, "separate"))
    loop.check_directory(tmp_path / "older", update.student_shape(roles))
