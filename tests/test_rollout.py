"""The GKD mixture: which completions each lambda setting yields, and RL advantages."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opd_jax import distill, model, rollout, sampling
from opd_jax.model import ModelConfig

CONFIG = ModelConfig(
    vocab_size=53, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8, mlp_dim=24
)
N = 4
SAMPLING = sampling.SamplingConfig(max_new_tokens=N, temperature=1.0)
B = 6


def _params(seed):
    params = model.init_params(CONFIG, jax.random.key(seed))
    return jax.tree.map(lambda x: x * 5.0 if x.ndim >= 2 else x, params)


@pytest.fixture(scope="module")
def inputs():
    prompt, valid = sampling.left_pad([[3, 4, 5], [6, 7], [8], [9, 10, 11], [12], [13, 14]], 0)
    target = np.full((B, N), 50, np.int32)
    target_valid = np.zeros((B, N), bool)
    target_valid[:, :2] = True
    return tuple(jnp.asarray(x) for x in (prompt, valid, target, target_valid))


def _state(step=0, seed=0):
    optimizer = distill.make_optimizer(distill.DistillConfig(), total_steps=100)
    state = distill.init_train_state(_params(0), optimizer, seed)
    return state.replace(step=jnp.asarray(step, jnp.int32))


def _roll(mixture, inputs, step=0, teacher=None):
    fn = rollout.make_rollout(CONFIG, CONFIG, mixture, SAMPLING)
    teacher = _params(1) if teacher is None else teacher
    return jax.device_get(fn(_state(step), teacher, *inputs))


def _student_samples(params, inputs, key):
    prompt, valid = inputs[:2]
    return sampling.sample(params, prompt, valid, key, CONFIG, SAMPLING)


def test_lambda_one_is_the_students_own_samples(inputs):
    batch, on_B = _roll(rollout.MixtureConfig(on_policy_fraction=1.0), inputs)
    student_key = jax.random.split(distill.step_key(_state()), 3)[1]
    expected = _student_samples(_params(0), inputs, student_key)
    assert on_B.all()
    np.testing.assert_array_equal(batch.completion_BxN, expected.tokens_BxN)
    np.testing.assert_array_equal(batch.completion_mask_BxN, expected.mask_BxN)


def test_lambda_zero_is_the_dataset_targets(inputs):
    batch, on_B = _roll(rollout.MixtureConfig(on_policy_fraction=0.0), inputs)
    assert not on_B.any()
    np.testing.assert_array_equal(batch.completion_BxN, inputs[2])
    np.testing.assert_array_equal(batch.completion_mask_BxN, inputs[3].astype(np.float32))


def test_sequence_level_kd_samples_the_teacher(inputs):
    mixture = rollout.MixtureConfig(on_policy_fraction=0.0, fixed_source="teacher")
    batch, _ = _roll(mixture, inputs)
    teacher_key = jax.random.split(distill.step_key(_state()), 3)[2]
    expected = _student_samples(_params(1), inputs, teacher_key)
    np.testing.assert_array_equal(batch.completion_BxN, expected.tokens_BxN)


def test_per_step_lambda_makes_whole_batches_of_one_kind_at_the_stated_rate(inputs):
    fn = rollout.make_rollout(CONFIG, CONFIG, rollout.MixtureConfig(0.3), SAMPLING)
    teacher = _params(1)
    draws = []
    for step in range(60):
        batch, on_B = jax.device_get(fn(_state(step), teacher, *inputs))
        assert on_B.all() or not on_B.any()
        if not on_B.any():
            np.testing.assert_array_equal(batch.completion_BxN, inputs[2])
        draws.append(bool(on_B[0]))
    # 60 Bernoulli(0.3) draws: mean 18, sd 3.5; 8..28 is beyond 2.8 sd on either side.
    assert 8 <= sum(draws) <= 28, sum(draws)


def test_per_example_lambda_mixes_rows(inputs):
    mixture = rollout.MixtureConfig(on_policy_fraction=0.5, per_example=True)
    fn = rollout.make_rollout(CONFIG, CONFIG, mixture, SAMPLING)
    mixed = 0
    for step in range(5):
        batch, on_B = jax.device_get(fn(_state(step), _params(1), *inputs))
        np.testing.assert_array_equal(batch.completion_BxN[~on_B], np.asarray(inputs[2])[~on_B])
        mixed += 0 < on_B.sum() < B
    assert mixed >= 3


def test_same_step_same_draws_resumed_run_repeats_them(inputs):
    first, _ = _roll(rollout.MixtureConfig(1.0), inputs, step=3)
    again, _ = _roll(rollout.MixtureConfig(1.0), inputs, step=3)
    other, _ = _roll(rollout.MixtureConfig(1.0), inputs, step=4)
    np.testing.assert_array_equal(first.completion_BxN, again.completion_BxN)
    assert not np.array_equal(first.completion_BxN, other.completion_BxN)


def test_target_width_must_match_the_sampling_budget(inputs):
    fn = rollout.make_rollout(
        CONFIG, CONFIG, rollout.MixtureConfig(1.0), sampling.SamplingConfig(max_new_tokens=N + 1)
    )
    with pytest.raises(ValueError, match="target width 4 != max_new_tokens 5"):
        fn(_state(), _params(1), *inputs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"on_policy_fraction": 1.5}, "on_policy_fraction must be in"),
        ({"fixed_source": "student"}, "fixed_source must be one of"),
    ],
)
def test_bad_mixture_settings_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        rollout.MixtureConfig(**kwargs)


def test_group_advantages_are_normalized_within_each_group():
    rewards = np.array([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    advantages = rollout.group_advantages(rewards, group_size=4)
    np.testing.assert_allclose(advantages[:4], [1.0, -1.0, -1.0, 1.0], atol=1e-5)
    np.testing.assert_array_equal(advantages[4:], 0.0)
    with pytest.raises(ValueError, match="groups of 3"):
        rollout.group_advantages(rewards, group_size=3)
