"""The GKD mixture: which completions each lambda setting yields, the sampler log-probs
they carry, the rollouts each update accepts, and RL advantages."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from one_device import gkd_rollout

from opd_jax import config, distill, gkd, model, sampling, train_state
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
    rows = [[3, 4, 5], [6, 7], [8], [9, 10, 11], [12], [13, 14]]
    prompt = np.array([[0] * (3 - len(row)) + row for row in rows], np.int32)
    valid = prompt != 0
    target = np.full((B, N), 50, np.int32)
    target_valid = np.zeros((B, N), bool)
    target_valid[:, :2] = True
    return tuple(jnp.asarray(x) for x in (prompt, valid, target, target_valid))


def _state(step=0, seed=0):
    optimizer = train_state.make_optimizer(train_state.OptimizerConfig(), total_steps=100)
    state = train_state.init_train_state(_params(0), optimizer, seed)
    return state.replace(step=jnp.asarray(step, jnp.int32))


def _roll(mixture, inputs, step=0, teacher=None):
    fn = gkd_rollout(CONFIG, CONFIG, mixture, SAMPLING)
    teacher = _params(1) if teacher is None else teacher
    return jax.device_get(fn(_state(step), teacher, *inputs))


def _student_samples(params, inputs, key):
    prompt, valid = inputs[:2]
    return sampling.sample(params, prompt, valid, key, CONFIG, SAMPLING)


def test_lambda_one_is_the_students_own_samples_with_their_logprobs(inputs):
    batch, on_B = _roll(gkd.MixtureConfig(on_policy_fraction=1.0), inputs)
    student_key = jax.random.split(train_state.step_key(_state()), 3)[1]
    expected = _student_samples(_params(0), inputs, student_key)
    assert on_B.all() and batch.on_policy_B.all()
    np.testing.assert_array_equal(batch.completion_BxN, expected.tokens_BxN)
    np.testing.assert_array_equal(batch.completion_mask_BxN, expected.mask_BxN)
    # Inside the rollout's jit XLA fuses the prefill differently than in a standalone
    # sampler: measured 4.8e-7 at most (a few float32 ulps of log-probs near -4).
    np.testing.assert_allclose(batch.sampler_logprob_BxN, expected.logprobs_BxN, atol=5e-6)
    np.testing.assert_allclose(batch.sampler_raw_logprob_BxN, expected.raw_logprobs_BxN, atol=5e-6)
    assert np.all(batch.sampler_logprob_BxN[batch.completion_mask_BxN > 0] < 0)


def _assert_no_sampler_logprobs(batch):
    assert not batch.on_policy_B.any()
    np.testing.assert_array_equal(batch.sampler_logprob_BxN, 0.0)
    np.testing.assert_array_equal(batch.sampler_raw_logprob_BxN, 0.0)


def test_lambda_zero_is_the_dataset_targets(inputs):
    batch, on_B = _roll(gkd.MixtureConfig(on_policy_fraction=0.0), inputs)
    assert not on_B.any()
    np.testing.assert_array_equal(batch.completion_BxN, inputs[2])
    np.testing.assert_array_equal(batch.completion_mask_BxN, inputs[3].astype(np.float32))
    _assert_no_sampler_logprobs(batch)


def test_sequence_level_kd_samples_the_teacher_and_keeps_no_student_logprobs(inputs):
    mixture = gkd.MixtureConfig(on_policy_fraction=0.0, fixed_source="teacher")
    batch, _ = _roll(mixture, inputs)
    teacher_key = jax.random.split(train_state.step_key(_state()), 3)[2]
    expected = _student_samples(_params(1), inputs, teacher_key)
    np.testing.assert_array_equal(batch.completion_BxN, expected.tokens_BxN)
    _assert_no_sampler_logprobs(batch)


def test_per_step_lambda_makes_whole_batches_of_one_kind_at_the_stated_rate(inputs):
    fn = gkd_rollout(CONFIG, CONFIG, gkd.MixtureConfig(0.3), SAMPLING)
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
    mixture = gkd.MixtureConfig(on_policy_fraction=0.5, per_example=True)
    fn = gkd_rollout(CONFIG, CONFIG, mixture, SAMPLING)
    mixed = 0
    for step in range(5):
        batch, on_B = jax.device_get(fn(_state(step), _params(1), *inputs))
        np.testing.assert_array_equal(batch.completion_BxN[~on_B], np.asarray(inputs[2])[~on_B])
        np.testing.assert_array_equal(batch.on_policy_B, on_B)
        np.testing.assert_array_equal(batch.sampler_logprob_BxN[~on_B], 0.0)
        assert np.all(batch.sampler_logprob_BxN[on_B][:, 0] < 0)
        mixed += 0 < on_B.sum() < B
    assert mixed >= 3


def test_same_step_same_draws_resumed_run_repeats_them(inputs):
    first, _ = _roll(gkd.MixtureConfig(1.0), inputs, step=3)
    again, _ = _roll(gkd.MixtureConfig(1.0), inputs, step=3)
    other, _ = _roll(gkd.MixtureConfig(1.0), inputs, step=4)
    np.testing.assert_array_equal(first.completion_BxN, again.completion_BxN)
    assert not np.array_equal(first.completion_BxN, other.completion_BxN)


def test_target_width_must_match_the_sampling_budget(inputs):
    fn = gkd_rollout(
        CONFIG, CONFIG, gkd.MixtureConfig(1.0), sampling.SamplingConfig(max_new_tokens=N + 1)
    )
    with pytest.raises(ValueError, match="target width 4 != max_new_tokens 5"):
        fn(_state(), _params(1), *inputs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"on_policy_fraction": 1.5},
            r"^MixtureConfig.on_policy_fraction=1.5 must be a number in \[0, 1\]$",
        ),
        (
            {"fixed_source": "student"},
            r"^MixtureConfig.fixed_source='student' is not one of dataset, teacher$",
        ),
    ],
)
def test_bad_mixture_settings_raise(kwargs, message):
    with pytest.raises(config.ConfigError) as err:
        gkd.MixtureConfig(**kwargs)
    assert re.search(message, config.error_line(err.value))  # gin appends its own lines


def test_group_advantages_are_normalized_within_each_group():
    rewards = np.array([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    advantages = gkd.group_advantages(rewards, group_size=4)
    # (r - mean) / (std + 1e-6) with std 0.5: off from +-1 by 2e-6 (the eps).
    np.testing.assert_allclose(advantages[:4], [1.0, -1.0, -1.0, 1.0], atol=2e-5)
    np.testing.assert_array_equal(advantages[4:], 0.0)
    with pytest.raises(ValueError, match="groups of 3"):
        gkd.group_advantages(rewards, group_size=3)


def test_group_of_one_takes_the_batch_mean_as_baseline():
    rewards = np.array([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    advantages = gkd.group_advantages(rewards, group_size=1)
    expected = (rewards - rewards.mean()) / (rewards.std() + 1e-6)
    np.testing.assert_allclose(advantages, expected, rtol=1e-6)  # float32 vs float64
    assert np.abs(advantages).min() > 0.1


SAMPLED = distill.DistillConfig(divergence="reverse_kl", estimator="pg")


@pytest.mark.parametrize(
    "cfg,settings,fraction,message",
    [
        (SAMPLED, {"top_k": 3}, 1.0, r"estimator='pg' needs .* rollout top_k=3 cuts it"),
        (SAMPLED, {"top_p": 0.9}, 1.0, r"rollout top_p=0.9 cuts it"),
        (SAMPLED, {"temperature": 0.0}, 1.0, r"rollout temperature=0.0 cuts it"),
        (SAMPLED, {}, 0.5, r"estimator='pg' .*on_policy_fraction=0.5 mixes in fixed rows"),
        (
            distill.DistillConfig(rl_alpha=0.5),
            {},
            0.5,
            r"rl_alpha=0.5 scores the student's own samples.*on_policy_fraction=0.5",
        ),
    ],
)
def test_rollouts_a_sampled_estimator_cannot_use_are_refused_in_one_line(
    cfg, settings, fraction, message
):
    sampler = dataclasses.replace(SAMPLING, **settings)
    with pytest.raises(config.ConfigError, match=message) as err:
        gkd.check_rollouts(cfg, sampler, fraction)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "cfg,settings,fraction",
    [
        (SAMPLED, {"temperature": 0.7}, 1.0),  # same support: importance-corrected
        (distill.DistillConfig(estimator="full"), {"top_k": 3, "top_p": 0.9}, 0.5),
        (distill.DistillConfig(estimator="teacher_topk", top_k=4), {"temperature": 0.0}, 0.0),
    ],
)
def test_rollouts_the_update_can_use_are_accepted(cfg, settings, fraction):
    gkd.check_rollouts(cfg, dataclasses.replace(SAMPLING, **settings), fraction)
