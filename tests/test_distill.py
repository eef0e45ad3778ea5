"""The update step: it learns, accumulation is exact, bad inputs stop it cleanly."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from opd_jax import distill, model, rollout, sampling
from opd_jax.model import ModelConfig

TEACHER = ModelConfig(
    vocab_size=61, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=48
)
STUDENT = dataclasses.replace(TEACHER, n_layers=1, d_model=16, head_dim=4, mlp_dim=24)


def _batch(batch_size: int, seed: int = 0, prompt_len: int = 6, completion_len: int = 5):
    """Left-padded prompts and right-padded completions of varying real lengths."""
    rng = np.random.default_rng(seed)
    prompt_lengths = rng.integers(1, prompt_len + 1, batch_size)
    completion_lengths = rng.integers(1, completion_len + 1, batch_size)
    prompt_valid = np.arange(prompt_len)[None] >= (prompt_len - prompt_lengths)[:, None]
    mask = (np.arange(completion_len)[None] < completion_lengths[:, None]).astype(np.float32)
    return distill.DistillBatch(
        prompt_BxP=jnp.asarray(rng.integers(0, TEACHER.vocab_size, (batch_size, prompt_len))),
        prompt_valid_BxP=jnp.asarray(prompt_valid),
        completion_BxN=jnp.asarray(
            rng.integers(0, TEACHER.vocab_size, (batch_size, completion_len))
        ),
        completion_mask_BxN=jnp.asarray(mask),
    )


def _setup(cfg: distill.DistillConfig, student=STUDENT, seed=0):
    optimizer = distill.make_optimizer(cfg, total_steps=100)
    state = distill.init_train_state(model.init_params(student, jax.random.key(seed)), optimizer, 0)
    teacher = model.init_params(TEACHER, jax.random.key(7))
    teacher = jax.tree.map(lambda x: x * 4.0 if x.ndim >= 2 else x, teacher)  # peaked outputs
    return state, teacher, distill.make_update_step(student, TEACHER, cfg, optimizer)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_a_few_steps_lower_the_divergence(divergence):
    cfg = distill.DistillConfig(divergence=divergence, learning_rate=3e-3, warmup_steps=0)
    state, teacher, update = _setup(cfg)
    batch = _batch(4)
    first = None
    for _ in range(8):
        state, metrics = update(state, teacher, batch)
        first = first if first is not None else float(metrics["reverse_kl"] + metrics["forward_kl"])
    assert int(state.step) == 8
    last = float(metrics["reverse_kl"] + metrics["forward_kl"])
    assert last < 0.8 * first, (first, last)


def test_sampled_token_update_follows_the_exact_reverse_kl_gradient():
    """On the student's own rollouts, the per-token reward estimator's update agrees in
    expectation with the exact reverse-KL update. With SGD at learning rate 1 an update
    is minus the gradient; averaged over 32 rollouts their cosine is ~0.54 here (independent
    directions in this many dimensions give ~0.01; a sign error gives < 0)."""
    sgd = optax.sgd(1.0)
    state, teacher, _ = _setup(distill.DistillConfig())
    state = distill.init_train_state(state.params, sgd, 0)
    updates = {
        kind: distill.make_update_step(
            STUDENT, TEACHER, distill.DistillConfig(divergence=kind, max_grad_norm=1e9), sgd
        )
        for kind in ("reverse_kl", "sampled_reverse_kl")
    }
    roll = rollout.make_rollout(
        STUDENT, TEACHER, rollout.MixtureConfig(1.0), sampling.SamplingConfig(max_new_tokens=5)
    )
    prompts = _batch(16)
    targets = (prompts.completion_BxN, prompts.completion_mask_BxN > 0)
    flat = lambda params: np.concatenate([np.ravel(x) for x in jax.tree.leaves(params)])
    start = flat(state.params)
    total = {kind: 0.0 for kind in updates}
    for k in range(32):
        at_k = state.replace(step=jnp.asarray(k, jnp.int32))
        batch, _ = roll(at_k, teacher, prompts.prompt_BxP, prompts.prompt_valid_BxP, *targets)
        for kind, update in updates.items():
            new, _ = update(jax.tree.map(jnp.copy, at_k), teacher, batch)
            total[kind] = total[kind] + start - flat(new.params)
    exact, sampled = total["reverse_kl"], total["sampled_reverse_kl"]
    cosine = exact @ sampled / np.linalg.norm(exact) / np.linalg.norm(sampled)
    assert cosine > 0.35, cosine


def test_a_real_pruned_student_moves_toward_its_teacher(real_models):
    teacher_config, teacher_params = real_models.ours("smollm2-135m-instruct")
    student_config, student_params = model.select_layers(
        teacher_params, teacher_config, model.evenly_spaced_layers(teacher_config.n_layers, 4)
    )
    cfg = distill.DistillConfig(divergence="jsd", learning_rate=1e-4, warmup_steps=0)
    optimizer = distill.make_optimizer(cfg, total_steps=100)
    state = distill.init_train_state(student_params, optimizer, 0)
    update = distill.make_update_step(student_config, teacher_config, cfg, optimizer)
    batch = dataclasses.replace(_batch(2, prompt_len=8, completion_len=6))
    batch = batch.replace(
        prompt_BxP=batch.prompt_BxP + 1000, completion_BxN=batch.completion_BxN + 2000
    )
    divergences = []
    for _ in range(4):
        state, metrics = update(state, teacher_params, batch)
        divergences.append(float(metrics["divergence"]))
    assert divergences[-1] < divergences[0], divergences


def test_gradient_accumulation_equals_one_big_batch():
    """SGD at learning rate 1 makes the update minus the gradient, so the comparison is of
    gradients themselves (Adam's first step, ~sign(g), would amplify rounding where g ~ 0).
    The micro-batches hold different numbers of real tokens, which is what a per-micro
    normalization would get wrong."""
    batch = _batch(8, seed=3)
    sgd = optax.sgd(1.0)
    params = model.init_params(STUDENT, jax.random.key(0))
    _, teacher, _ = _setup(distill.DistillConfig())
    results = []
    for accum in (1, 4):
        update = distill.make_update_step(
            STUDENT, TEACHER, distill.DistillConfig(grad_accum=accum, max_grad_norm=1e9), sgd
        )
        results.append(update(distill.init_train_state(params, sgd, 0), teacher, batch))
    (one, one_metrics), (four, four_metrics) = results
    np.testing.assert_allclose(four_metrics["loss"], one_metrics["loss"], rtol=1e-6)
    np.testing.assert_allclose(four_metrics["grad_norm"], one_metrics["grad_norm"], rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
        one.params,
        four.params,
    )


def test_remat_does_not_change_the_update():
    """Recomputing activations in the backward pass gives the same gradients (SGD at
    learning rate 1: the update is minus the gradient), for GKD and for fine-tuning."""
    batch = _batch(4, seed=5)
    sgd = optax.sgd(1.0)
    params = model.init_params(STUDENT, jax.random.key(0))
    _, teacher, _ = _setup(distill.DistillConfig())
    steps = (  # (make(remat) -> update, its frozen argument)
        (
            lambda remat: distill.make_update_step(
                STUDENT, TEACHER, distill.DistillConfig(remat=remat, max_grad_norm=1e9), sgd
            ),
            teacher,
        ),
        (lambda remat: distill.make_sft_step(STUDENT, 1, sgd, remat=remat), None),
    )
    for make, frozen in steps:
        kept, _ = make(False)(distill.init_train_state(params, sgd, 0), frozen, batch)
        recomputed, _ = make(True)(distill.init_train_state(params, sgd, 0), frozen, batch)
        moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), kept.params, params)
        assert max(jax.tree.leaves(moved)) > 1e-3  # the step did something to compare
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
            kept.params,
            recomputed.params,
        )


def test_loss_is_the_mean_over_real_tokens_only():
    cfg = distill.DistillConfig(divergence="forward_kl")
    state, teacher, update = _setup(cfg)
    batch = _batch(4, seed=1)
    noise = batch.replace(
        completion_BxN=jnp.where(batch.completion_mask_BxN > 0, batch.completion_BxN, 5)
    )
    _, metrics = update(state, teacher, batch)
    state, _, _ = _setup(cfg)
    _, noise_metrics = update(state, teacher, noise)
    assert float(metrics["num_tokens"]) == float(jnp.sum(batch.completion_mask_BxN))
    np.testing.assert_allclose(metrics["loss"], noise_metrics["loss"], rtol=1e-6)


def test_sft_step_lowers_the_completion_nll():
    cfg = distill.DistillConfig(learning_rate=3e-3, warmup_steps=0)
    optimizer = distill.make_optimizer(cfg, total_steps=100)
    state = distill.init_train_state(model.init_params(STUDENT, jax.random.key(0)), optimizer, 0)
    update = distill.make_sft_step(STUDENT, 1, optimizer)
    batch = _batch(4)
    losses_seen = []
    for _ in range(6):
        state, metrics = update(state, None, batch)
        losses_seen.append(float(metrics["loss"]))
    assert losses_seen[-1] < 0.9 * losses_seen[0], losses_seen


def test_advantages_weight_the_policy_gradient_by_rl_alpha():
    batch = _batch(4, seed=2).replace(advantage_B=jnp.asarray([1.0, -1.0, 0.5, 0.0]))
    metrics = {}
    for alpha in (0.0, 1.0):
        state, teacher, update = _setup(distill.DistillConfig(rl_alpha=alpha))
        _, metrics[alpha] = update(state, teacher, batch)
    np.testing.assert_allclose(metrics[0.0]["loss"], metrics[0.0]["policy_gradient"], rtol=1e-6)
    np.testing.assert_allclose(metrics[1.0]["loss"], metrics[1.0]["divergence"], rtol=1e-6)


def test_positive_advantage_raises_the_completion_likelihood():
    cfg = distill.DistillConfig(rl_alpha=0.0, learning_rate=1e-2, warmup_steps=0)
    state, teacher, update = _setup(cfg)
    batch = _batch(2, seed=4).replace(advantage_B=jnp.asarray([1.0, -1.0]))
    hidden = lambda p: distill.completion_hidden(
        p,
        STUDENT,
        batch.prompt_BxP,
        batch.prompt_valid_BxP,
        batch.completion_BxN,
        batch.completion_mask_BxN,
    )

    def row_logprob(params):
        logits = model.logits_from_hidden(params, hidden(params), STUDENT)
        token = jnp.take_along_axis(jax.nn.log_softmax(logits), batch.completion_BxN[..., None], -1)
        return jnp.sum(token[..., 0] * batch.completion_mask_BxN, axis=1)

    before = row_logprob(state.params)
    state, _ = update(state, teacher, batch)
    after = row_logprob(state.params)
    assert after[0] > before[0] and after[1] < before[1], (before, after)


def test_vocabulary_mismatch_fails_with_both_sizes():
    student = dataclasses.replace(STUDENT, vocab_size=49152)
    teacher = dataclasses.replace(TEACHER, vocab_size=262144)
    with pytest.raises(distill.VocabMismatchError, match="262144.*49152"):
        distill.make_update_step(
            student,
            teacher,
            distill.DistillConfig(),
            distill.make_optimizer(distill.DistillConfig(), total_steps=100),
        )


def test_non_finite_loss_keeps_the_state_and_names_the_step_and_terms():
    state, teacher, update = _setup(distill.DistillConfig())
    before = jax.device_get(state)
    teacher["final_norm"] = teacher["final_norm"].at[0].set(jnp.nan)
    state, metrics = update(state, teacher, _batch(2))
    assert not bool(metrics["finite"])
    assert int(state.step) == 0
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), before.params)
    with pytest.raises(distill.NonFiniteLossError, match=r"step 0: .*divergence.*loss"):
        distill.raise_if_not_finite(0, jax.device_get(metrics))


def test_step_key_depends_only_on_seed_and_step():
    optimizer = distill.make_optimizer(distill.DistillConfig(), total_steps=100)
    params = model.init_params(STUDENT, jax.random.key(0))
    a = distill.init_train_state(params, optimizer, seed=5)
    b = distill.init_train_state(params, optimizer, seed=5)
    key_data = lambda s: jax.random.key_data(distill.step_key(s))
    np.testing.assert_array_equal(key_data(a), key_data(b))
    later = a.replace(step=a.step + 1)
    assert not np.array_equal(key_data(a), key_data(later))
