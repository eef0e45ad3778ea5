"""The update step: every objective learns, sampled estimators follow the exact gradient,
accumulation is exact, RL is on the divergence's scale, bad inputs stop it cleanly."""

import dataclasses
import functools
import json
import re
import shutil

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import PADDING_ROWS
from one_device import gkd_rollout, gkd_update

from opd_jax import checkpoints, config, distill, gkd, losses, model, sampling, train_state, update
from opd_jax import tokenizer as tokenizer_lib
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
    return train_state.DistillBatch(
        prompt_BxP=jnp.asarray(rng.integers(0, TEACHER.vocab_size, (batch_size, prompt_len))),
        prompt_valid_BxP=jnp.asarray(prompt_valid),
        completion_BxN=jnp.asarray(
            rng.integers(0, TEACHER.vocab_size, (batch_size, completion_len))
        ),
        completion_mask_BxN=jnp.asarray(mask),
    )


def _setup(cfg: distill.DistillConfig, student=STUDENT, seed=0, optim=None):
    optim = optim or train_state.OptimizerConfig()
    optimizer = train_state.make_optimizer(optim, total_steps=100)
    state = train_state.init_train_state(
        model.init_params(student, jax.random.key(seed)), optimizer, 0
    )
    return state, _teacher(), gkd_update(student, TEACHER, cfg, optimizer)


def _teacher():
    params = model.init_params(TEACHER, jax.random.key(7))
    return jax.tree.map(lambda x: x * 4.0 if x.ndim >= 2 else x, params)  # peaked outputs


@functools.cache
def _rollout(temperature: float = 1.0):
    """On-policy rollouts (lambda = 1) of 5 tokens; ids 0-7 end a row, so lengths vary."""
    settings = sampling.SamplingConfig(5, temperature=temperature, eos_ids=tuple(range(8)))
    return gkd_rollout(STUDENT, TEACHER, gkd.MixtureConfig(1.0), settings)


def _rolled(state, teacher, prompts: train_state.DistillBatch, temperature: float = 1.0):
    """The student's completions of `prompts` at `state`'s step key."""
    targets = (prompts.completion_BxN, prompts.completion_mask_BxN > 0)
    batch, _ = _rollout(temperature)(
        state, teacher, prompts.prompt_BxP, prompts.prompt_valid_BxP, *targets
    )
    return batch


def _flat(tree) -> jax.Array:
    return jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(tree)])


def _exact_divergence(params, teacher, batch, cfg):
    terms = distill.per_token_terms(params, teacher, batch, STUDENT, TEACHER, cfg)
    return losses.masked_mean(terms["divergence"], batch.completion_mask_BxN)


GIN_CHOICES = {  # every (divergence, estimator[, form]) a run can select
    "full-forward_kl": ('divergence = "forward_kl"', 'estimator = "full"'),
    "full-reverse_kl": ('divergence = "reverse_kl"', 'estimator = "full"'),
    "full-jsd": ('divergence = "jsd"', "beta = 0.5", 'estimator = "full"'),
    "teacher_topk-forward_kl": (
        'divergence = "forward_kl"',
        'estimator = "teacher_topk"',
        "top_k = 16",
    ),
    "teacher_topk-reverse_kl": (
        'divergence = "reverse_kl"',
        'estimator = "teacher_topk"',
        "top_k = 16",
    ),
    "teacher_topk-jsd": ('divergence = "jsd"', 'estimator = "teacher_topk"', "top_k = 16"),
    **{
        f"student_topk-{form}": (
            'divergence = "reverse_kl"',
            'estimator = "student_topk"',
            "top_k = 16",
            f'topk_form = "{form}"',
        )
        for form in ("stopgrad", "renormalized", "unnormalized")
    },
    **{
        estimator: ('divergence = "reverse_kl"', f'estimator = "{estimator}"')
        for estimator in ("pg", "k1", "k3")
    },
}


@pytest.mark.parametrize("name", list(GIN_CHOICES))
def test_every_objective_gin_choice_lowers_the_exact_divergence(name):
    """40 steps on fresh on-policy rollouts of 64 prompts lower the exact divergence of a
    fixed rollout batch. Measured final / first: full 0.88-0.89, teacher_topk 0.92-0.94,
    student_topk 0.95-0.97, pg and k3 0.966, k1 0.988 (its pathwise term is zero-mean
    noise); a wrong-signed or biased gradient raises it instead."""
    training = ("OptimizerConfig.learning_rate = 1e-3", "OptimizerConfig.warmup_steps = 0")
    gin.parse_config([f"DistillConfig.{b}" for b in GIN_CHOICES[name]] + list(training))
    cfg = distill.DistillConfig()
    assert name.split("-")[0] in (cfg.estimator, cfg.topk_form)
    optimizer = train_state.make_optimizer(train_state.OptimizerConfig(), total_steps=100)
    state = train_state.init_train_state(
        model.init_params(STUDENT, jax.random.key(0)), optimizer, 0
    )
    start = _flat(state.params)
    update = gkd_update(STUDENT, TEACHER, cfg, optimizer)
    teacher, prompts = _teacher(), _batch(64)
    fixed = _rolled(state, teacher, prompts)
    exact = jax.jit(lambda params: _exact_divergence(params, teacher, fixed, cfg))
    first = float(exact(state.params))
    for _ in range(40):
        state, metrics = update(state, teacher, _rolled(state, teacher, prompts))
    assert bool(metrics["finite"])
    last = float(exact(state.params))
    assert last < 0.995 * first, (first, last)
    assert float(jnp.max(jnp.abs(_flat(state.params) - start))) > 1e-3


def _gradient_fn(cfg: distill.DistillConfig, teacher):
    """params, batch -> the flattened gradient of the update's loss."""

    def loss(params, batch):
        terms = distill.per_token_terms(params, teacher, batch, STUDENT, TEACHER, cfg)
        return distill.loss_terms(terms, batch, cfg, train_state.batch_counts(batch))["loss"]

    return jax.jit(lambda params, batch: _flat(jax.grad(loss)(params, batch)))


@pytest.mark.parametrize("rollout_temperature", [0.7, 1.0])
def test_sampled_update_follows_the_exact_reverse_kl_gradient(rollout_temperature):
    """Rollouts at `rollout_temperature`, loss at temperature 1: over 64 rollouts of 256
    rows, the pg gradient minus the exact reverse-KL gradient of the same batch, projected
    on the exact gradient's mean direction, averages to 0 within 4 standard errors (SE
    from the rollouts' spread, ~1.3% of the gradient; a fixed-seed unbiased estimator
    falls outside with probability ~6e-5). At 0.7 the estimator without the importance
    weight is off by ~10% of the gradient (z ~ 7), which the same check rejects. The
    student is peaked (weights x5) so that temperature changes its distribution."""
    teacher = _teacher()
    params = jax.tree.map(
        lambda x: x * 5.0 if x.ndim >= 2 else x, model.init_params(STUDENT, jax.random.key(0))
    )
    optimizer = optax.sgd(1.0)
    state = train_state.init_train_state(params, optimizer, 0)
    exact_cfg = distill.DistillConfig(divergence="reverse_kl")
    pg_cfg = distill.DistillConfig(divergence="reverse_kl", estimator="pg")
    exact_grad, pg_grad = _gradient_fn(exact_cfg, teacher), _gradient_fn(pg_cfg, teacher)
    own_logprob = jax.jit(
        lambda batch: distill.per_token_terms(params, teacher, batch, STUDENT, TEACHER, exact_cfg)[
            "student_logprob"
        ]
    )
    prompts = _batch(256, seed=1)
    exact, corrected, uncorrected = [], [], []
    for k in range(64):
        batch = _rolled(state.replace(step=jnp.asarray(k)), teacher, prompts, rollout_temperature)
        exact.append(exact_grad(params, batch))
        corrected.append(pg_grad(params, batch) - exact[-1])
        as_if_unweighted = batch.replace(sampler_logprob_BxN=own_logprob(batch))  # rho = 1
        uncorrected.append(pg_grad(params, as_if_unweighted) - exact[-1])
    mean_exact = jnp.mean(jnp.stack(exact), axis=0)
    direction = mean_exact / jnp.linalg.norm(mean_exact) ** 2  # projection relative to |g|

    def z_score(differences):
        projected = np.asarray(jnp.stack(differences) @ direction)
        return projected.mean() / (projected.std(ddof=1) / np.sqrt(len(projected)))

    assert abs(z_score(corrected)) < 4.0
    if rollout_temperature != 1.0:
        assert abs(z_score(uncorrected)) > 4.0


def test_a_real_pruned_student_moves_toward_its_teacher(real_models):
    teacher_config, teacher_params = real_models.ours("smollm2-135m-instruct")
    student_config, student_params = model.select_layers(
        teacher_params, teacher_config, model.evenly_spaced_layers(teacher_config.n_layers, 4)
    )
    cfg = distill.DistillConfig(divergence="jsd")
    optim = train_state.OptimizerConfig(learning_rate=1e-4, warmup_steps=0)
    optimizer = train_state.make_optimizer(optim, total_steps=100)
    state = train_state.init_train_state(student_params, optimizer, 0)
    update = gkd_update(student_config, teacher_config, cfg, optimizer)
    batch = dataclasses.replace(_batch(2, prompt_len=8, completion_len=6))
    batch = batch.replace(
        prompt_BxP=batch.prompt_BxP + 1000, completion_BxN=batch.completion_BxN + 2000
    )
    divergences = []
    for _ in range(4):
        state, metrics = update(state, teacher_params, batch)
        divergences.append(float(metrics["divergence"]))
    assert divergences[-1] < divergences[0], divergences


@pytest.mark.parametrize("estimator,rl", [("full", False), ("pg", True)])
def test_gradient_accumulation_equals_one_big_batch(estimator, rl):
    """SGD at learning rate 1 makes the update minus the gradient, so the comparison is of
    gradients themselves (Adam's first step, ~sign(g), would amplify rounding where g ~ 0).
    The micro-batches hold different numbers of real tokens, which is what a per-micro
    normalization would get wrong; with RL the reward term is normalized by the whole
    batch's sequence count."""
    sgd = optax.sgd(1.0)
    params = model.init_params(STUDENT, jax.random.key(0))
    teacher = _teacher()
    state = train_state.init_train_state(params, sgd, 0)
    batch = _rolled(state, teacher, _batch(8, seed=3))
    lengths = np.asarray(batch.completion_mask_BxN).reshape(4, -1).sum(axis=1)
    assert len(set(lengths.tolist())) > 1  # micro-batches of unequal token counts
    if rl:
        batch = batch.replace(advantage_B=jnp.linspace(-1.0, 1.0, 8))
    results = []
    for accum in (1, 4):
        cfg = distill.DistillConfig(
            divergence="reverse_kl",
            estimator=estimator,
            rl_alpha=0.5 if rl else 1.0,
        )
        update = gkd_update(STUDENT, TEACHER, cfg, sgd, grad_accum=accum)
        results.append(update(train_state.init_train_state(params, sgd, 0), teacher, batch))
    (one, one_metrics), (four, four_metrics) = results
    # One float32 sum split into four partial sums: measured <= 6.7e-7 relative on the
    # metrics, <= 1.7e-8 absolute on logprob_mismatch (itself rounding, ~1e-7) and
    # <= 3e-8 absolute on the params.
    for name in one_metrics:
        np.testing.assert_allclose(
            four_metrics[name], one_metrics[name], rtol=7e-6, atol=2e-7, err_msg=name
        )
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=3e-7),
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
            lambda remat: gkd_update(STUDENT, TEACHER, distill.DistillConfig(remat=remat), sgd),
            teacher,
        ),
        (lambda remat: distill.make_sft_step(STUDENT, 1, sgd, remat=remat), None),
    )
    for make, frozen in steps:
        kept, _ = make(False)(train_state.init_train_state(params, sgd, 0), frozen, batch)
        recomputed, _ = make(True)(train_state.init_train_state(params, sgd, 0), frozen, batch)
        moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), kept.params, params)
        assert max(jax.tree.leaves(moved)) > 1e-3  # the step did something to compare
        # Measured identical; the tolerance leaves room for another fusion of the
        # recomputed forward (float32 reassociation, ~1e-7 relative).
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
    # Measured identical (padding is dropped with `where`); 1e-6 is a few float32 ulps.
    np.testing.assert_allclose(metrics["loss"], noise_metrics["loss"], rtol=1e-6)


def test_sft_step_lowers_the_completion_nll():
    optim = train_state.OptimizerConfig(learning_rate=3e-3, warmup_steps=0)
    optimizer = train_state.make_optimizer(optim, total_steps=100)
    state = train_state.init_train_state(
        model.init_params(STUDENT, jax.random.key(0)), optimizer, 0
    )
    update = distill.make_sft_step(STUDENT, 1, optimizer)
    batch = _batch(4)
    losses_seen = []
    for _ in range(6):
        state, metrics = update(state, None, batch)
        losses_seen.append(float(metrics["loss"]))
    assert losses_seen[-1] < 0.9 * losses_seen[0], losses_seen


def _completion_logprobs(params, batch):
    """log q of each completion token [B, N] from a plain forward of the student."""
    hidden = distill.completion_hidden(
        params,
        STUDENT,
        batch.prompt_BxP,
        batch.prompt_valid_BxP,
        batch.completion_BxN,
        batch.completion_mask_BxN,
    )
    logits = model.logits_from_hidden(params, hidden, STUDENT)
    return losses.token_logprobs(logits, batch.completion_BxN)


def test_reward_term_is_reinforce_per_sequence_weighed_by_rl_alpha():
    """policy_gradient = -(1/S) sum_b A_b sum_t log q_bt over the S sequences, and
    loss = (1 - alpha) policy_gradient + alpha divergence estimate."""
    batch = _batch(4, seed=2).replace(advantage_B=jnp.asarray([1.0, -1.0, 0.5, 0.0]))
    state, teacher, update = _setup(distill.DistillConfig(rl_alpha=0.25))
    logprobs = _completion_logprobs(state.params, batch) * batch.completion_mask_BxN
    expected = -float(jnp.sum(batch.advantage_B * jnp.sum(logprobs, axis=1))) / 4
    _, metrics = update(state, teacher, batch)
    # float32 forwards by two paths (chunked statistics vs plain logits): measured
    # <= 2.2e-7 relative.
    np.testing.assert_allclose(metrics["policy_gradient"], expected, rtol=2e-6)
    combined = 0.75 * metrics["policy_gradient"] + 0.25 * metrics["divergence_estimate"]
    np.testing.assert_allclose(metrics["loss"], combined, rtol=2e-6)


def test_task_reward_changes_the_update_at_group_size_one():
    """One completion per prompt (the default rl_group_size): advantages against the
    batch's mean reward are not all zero, so the reward moves the params."""
    sgd = optax.sgd(1.0)
    params = model.init_params(STUDENT, jax.random.key(0))
    teacher = _teacher()
    batch = _rolled(train_state.init_train_state(params, sgd, 0), teacher, _batch(8, seed=5))
    mask = np.asarray(batch.completion_mask_BxN)
    high_ids = (np.asarray(batch.completion_BxN) >= TEACHER.vocab_size // 2) * mask
    rewards = high_ids.sum(axis=1) / mask.sum(axis=1)  # the task: use high token ids
    advantages = gkd.group_advantages(rewards, group_size=1)
    assert np.abs(advantages).max() > 0.5
    cfg = distill.DistillConfig(divergence="reverse_kl", rl_alpha=0.5)
    update = gkd_update(STUDENT, TEACHER, cfg, sgd)
    plain, _ = update(train_state.init_train_state(params, sgd, 0), teacher, batch)
    rewarded_batch = batch.replace(advantage_B=jnp.asarray(advantages))
    rewarded, _ = update(train_state.init_train_state(params, sgd, 0), teacher, rewarded_batch)
    assert float(jnp.max(jnp.abs(_flat(rewarded.params) - _flat(plain.params)))) > 1e-3


def test_logged_divergence_is_exact_whatever_the_estimator():
    """Under pg the optimized loss is an importance-weighted sample of KL(Q||P); the
    logged divergence is the full-vocabulary KL(Q||P) of the same batch."""
    sgd = optax.sgd(1.0)
    params = model.init_params(STUDENT, jax.random.key(0))
    teacher = _teacher()
    batch = _rolled(train_state.init_train_state(params, sgd, 0), teacher, _batch(8, seed=6))
    metrics = {}
    for estimator in ("full", "pg"):
        cfg = distill.DistillConfig(divergence="reverse_kl", estimator=estimator)
        update = gkd_update(STUDENT, TEACHER, cfg, sgd)
        _, metrics[estimator] = update(train_state.init_train_state(params, sgd, 0), teacher, batch)
    pg, full = metrics["pg"], metrics["full"]
    # One computation, two compiled programs: measured exactly equal.
    np.testing.assert_allclose(pg["divergence"], full["divergence"], rtol=1e-6)
    np.testing.assert_allclose(pg["divergence"], pg["reverse_kl"], rtol=1e-6)
    np.testing.assert_allclose(full["loss"], full["divergence"], rtol=1e-6)
    assert abs(float(pg["loss"]) - float(pg["divergence"])) > 1e-2 * float(pg["divergence"])


def test_logprob_mismatch_compares_sampler_and_learner_on_sampled_rows_only():
    params = model.init_params(STUDENT, jax.random.key(0))
    teacher = _teacher()
    state = train_state.init_train_state(params, optax.sgd(1.0), 0)
    batch = _rolled(state, teacher, _batch(8, seed=7))
    cfg = distill.DistillConfig(temperature=0.5)  # the metric is at temperature 1 anyway
    update = gkd_update(STUDENT, TEACHER, cfg, optax.sgd(0.0))
    mismatch = lambda b: float(
        update(jax.tree.map(jnp.copy, state), teacher, b)[1]["logprob_mismatch"]
    )
    # Sampler and learner run one model by two code paths: measured 1.5e-7.
    assert mismatch(batch) < 2e-6
    shifted = batch.replace(sampler_raw_logprob_BxN=batch.sampler_raw_logprob_BxN + 0.25)
    assert mismatch(shifted) == pytest.approx(0.25, rel=1e-4)
    assert mismatch(shifted.replace(on_policy_B=jnp.zeros(8, bool))) == 0.0


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (
            {"estimator": "pg"},
            r"^DistillConfig.estimator='pg' estimates reverse KL only.*full, teacher_topk$",
        ),
        (
            {"estimator": "sampled_reverse_kl"},
            r"^DistillConfig.estimator='sampled_reverse_kl' is not one of full, teacher_topk, ",
        ),
        (
            {"divergence": "sampled_reverse_kl"},
            r"^DistillConfig.divergence='sampled_reverse_kl' is not one of forward_kl, ",
        ),
        ({"rl_alpha": 1.5}, r"^DistillConfig.rl_alpha=1.5 must be a number in \[0, 1\]$"),
    ],
)
def test_invalid_objective_bindings_fail_when_the_config_is_built(kwargs, message):
    bindings = [f"DistillConfig.{name} = {value!r}" for name, value in kwargs.items()]
    gin.parse_config([b.replace("'", '"') for b in bindings])
    with pytest.raises(config.ConfigError) as err:
        distill.DistillConfig()
    assert re.search(message, config.error_line(err.value))  # gin appends its own lines


def test_positive_advantage_raises_the_completion_likelihood():
    cfg = distill.DistillConfig(rl_alpha=0.0)
    optim = train_state.OptimizerConfig(learning_rate=1e-2, warmup_steps=0)
    state, teacher, update = _setup(cfg, optim=optim)
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


def test_tables_of_different_sizes_need_the_vocabulary_they_share():
    student = dataclasses.replace(STUDENT, vocab_size=49152)
    teacher = dataclasses.replace(TEACHER, vocab_size=262144)
    with pytest.raises(ValueError, match="give Roles.vocab_size"):
        update.Roles(student, teacher)
    with pytest.raises(ValueError, match="a vocabulary of 50000 tokens does not fit"):
        update.Roles(student, teacher, vocab_size=50000)
    assert update.Roles(student, teacher, vocab_size=49152).vocab_size == 49152


# ------------------------------------------------------------- padded vocabularies


def _tiny(directory):
    return (*checkpoints.load(directory), tokenizer_lib.load(directory))


def test_padded_rows_get_no_probability_and_no_gradient(
    tiny_teacher_dir, tiny_student_dir, tiny_padded_student_dir
):
    """The tiny pair against the same pair with the student's table padded by 64 random
    rows: the tokenizers match, so they train together, and every per-token term, the
    exact divergence and its gradient are the unpadded pair's; the padded rows, which
    would take most of the student's probability, get none and no gradient."""
    teacher_config, teacher, teacher_tokenizer = _tiny(tiny_teacher_dir)
    student_config, student, _ = _tiny(tiny_student_dir)
    padded_config, padded, padded_tokenizer = _tiny(tiny_padded_student_dir)
    vocab = distill.check_vocab(teacher_tokenizer, padded_tokenizer)
    assert vocab == teacher_config.vocab_size == padded_config.vocab_size - PADDING_ROWS
    batch = _batch(2, seed=3)  # ids below TEACHER.vocab_size, so real tokens here too
    cfg = distill.DistillConfig(estimator="full")

    def exact(params, config):
        terms = distill.per_token_terms(
            params, teacher, batch, config, teacher_config, cfg, vocab_size=vocab
        )
        return losses.masked_mean(terms["divergence"], batch.completion_mask_BxN), terms

    grad = jax.value_and_grad(exact, has_aux=True)
    (value, terms), grads = grad(student, student_config)
    (padded_value, padded_terms), padded_grads = grad(padded, padded_config)
    np.testing.assert_allclose(padded_value, value, rtol=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), padded_terms, terms
    )
    np.testing.assert_array_equal(padded_grads["embed"][vocab:], 0.0)
    padded_grads["embed"] = padded_grads["embed"][:vocab]
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8), padded_grads, grads
    )
    hidden = distill.completion_hidden(
        padded, padded_config, batch.prompt_BxP, batch.prompt_valid_BxP, batch.completion_BxN,
        batch.completion_mask_BxN,
    )  # fmt: skip
    probs = jax.nn.softmax(model.logits_from_hidden(padded, hidden, padded_config))
    assert float(jnp.mean(jnp.sum(probs[..., vocab:], axis=-1))) > 0.5


def test_the_sampler_never_draws_a_padding_row(tiny_student_dir, tiny_padded_student_dir):
    """Told the vocabulary, the padded student samples exactly what the unpadded one does;
    untold, it draws padding ids."""
    student_config, student, _ = _tiny(tiny_student_dir)
    padded_config, padded, tokenizer = _tiny(tiny_padded_student_dir)
    prompts = _batch(4, seed=5)
    settings = sampling.SamplingConfig(8, vocab_size=tokenizer.vocab_size)

    def draw(params, config, settings):
        return sampling.generate(
            params, prompts.prompt_BxP, prompts.prompt_valid_BxP, jax.random.key(0), config,
            settings,
        )  # fmt: skip

    unpadded = draw(student, student_config, settings)
    masked = draw(padded, padded_config, settings)
    np.testing.assert_array_equal(masked.tokens_BxN, unpadded.tokens_BxN)
    np.testing.assert_allclose(masked.logprobs_BxN, unpadded.logprobs_BxN, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        masked.raw_logprobs_BxN, unpadded.raw_logprobs_BxN, rtol=1e-5, atol=1e-6
    )
    untold = draw(padded, padded_config, dataclasses.replace(settings, vocab_size=None))
    assert int(jnp.max(untold.tokens_BxN)) >= tokenizer.vocab_size


def test_different_tokenizers_are_refused_in_one_line(tiny_teacher_dir, tmp_path):
    """Another tokenizer (Gemma 3's), and SmolLM2's with two tokens' ids swapped."""
    smollm2 = tokenizer_lib.load(tiny_teacher_dir)
    with pytest.raises(distill.VocabMismatchError) as err:
        distill.check_vocab(tokenizer_lib.load("gemma3-270m"), smollm2)
    assert str(err.value) == (
        "teacher and student tokenizers differ (teacher vs student: 262144 vs 49152 tokens): "
        "distillation compares next-token distributions id by id, and cross-tokenizer "
        "distillation is not supported yet"
    )
    swapped = json.loads((tiny_teacher_dir / "tokenizer.json").read_text())
    vocab = swapped["model"]["vocab"]
    first, second = (token for token, i in vocab.items() if i in (1000, 1001))
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (tmp_path / "tokenizer.json").write_text(json.dumps(swapped))
    shutil.copy(tiny_teacher_dir / "tokenizer_config.json", tmp_path)
    with pytest.raises(distill.VocabMismatchError, match=r"\(teacher vs student: token 1000 is "):
        distill.check_vocab(smollm2, tokenizer_lib.load(tmp_path))


def test_non_finite_loss_keeps_the_state_and_names_the_step_and_terms():
    state, teacher, update = _setup(distill.DistillConfig())
    before = jax.device_get(state)
    teacher["final_norm"] = teacher["final_norm"].at[0].set(jnp.nan)
    state, metrics = update(state, teacher, _batch(2))
    assert not bool(metrics["finite"])
    assert int(state.step) == 0
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), before.params)
    with pytest.raises(train_state.NonFiniteLossError, match=r"step 0: .*divergence.*loss"):
        train_state.raise_if_not_finite(0, jax.device_get(metrics))


def test_step_key_depends_only_on_seed_and_step():
    optimizer = train_state.make_optimizer(train_state.OptimizerConfig(), total_steps=100)
    params = model.init_params(STUDENT, jax.random.key(0))
    a = train_state.init_train_state(params, optimizer, seed=5)
    b = train_state.init_train_state(params, optimizer, seed=5)
    key_data = lambda s: jax.random.key_data(train_state.step_key(s))
    np.testing.assert_array_equal(key_data(a), key_data(b))
    later = a.replace(step=a.step + 1)
    assert not np.array_equal(key_data(a), key_data(later))


def test_diagnostics_of_a_student_equal_to_its_teacher():
    """A student with the teacher's weights: the top-k sets coincide (ratio 1, equal mass
    on each side), the entropy gap, every third's divergence and the sampled tokens'
    reward are zero; all are logged by the update."""
    optimizer = optax.sgd(0.0)
    teacher = _teacher()
    state = train_state.init_train_state(teacher, optimizer, 0)
    update = gkd_update(TEACHER, TEACHER, distill.DistillConfig(diagnostic_top_k=4), optimizer)
    rollout = gkd_rollout(TEACHER, TEACHER, gkd.MixtureConfig(1.0), sampling.SamplingConfig(5))
    prompts = _batch(4, seed=2)
    targets = (prompts.completion_BxN, prompts.completion_mask_BxN > 0)
    batch, _ = rollout(state, teacher, prompts.prompt_BxP, prompts.prompt_valid_BxP, *targets)
    _, metrics = update(state, teacher, batch)
    assert float(metrics["overlap_ratio"]) == 1.0
    # One forward per side over the same weights: equal up to float32 rounding (~1e-7).
    np.testing.assert_allclose(
        metrics["overlap_mass_teacher"], metrics["overlap_mass_student"], rtol=1e-5
    )
    for name in ("entropy_gap", "reward_on_overlap", "reward_off_overlap") + tuple(
        f"divergence_{third}_third" for third in ("first", "middle", "last")
    ):
        np.testing.assert_allclose(metrics[name], 0.0, atol=1e-5, err_msg=name)
