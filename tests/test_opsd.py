"""Self-distillation: teacher logits are read at exactly the completion positions, the
fixed / ema / live teachers are what they say, and mismatched contexts are refused."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opd_jax import data, distill, loop, lora, mesh, model, opsd, train_state, update
from opd_jax import tokenizer as tokenizer_lib
from opd_jax.model import ModelConfig

CONFIG = ModelConfig(
    vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=48
)
LORA = lora.LoraConfig(rank=4, alpha=8.0)


def _left_padded(rng, batch, width, lengths):
    valid = np.arange(width)[None] >= (width - lengths)[:, None]
    return jnp.asarray(rng.integers(0, CONFIG.vocab_size, (batch, width))), jnp.asarray(valid)


def _batch(seed=0, batch=3, student_len=5, teacher_len=9, completion_len=6):
    """Student and teacher prompts of different widths and per-row lengths."""
    rng = np.random.default_rng(seed)
    prompt, valid = _left_padded(rng, batch, student_len, rng.integers(1, student_len + 1, batch))
    teacher, teacher_valid = _left_padded(
        rng, batch, teacher_len, rng.integers(1, teacher_len + 1, batch)
    )
    lengths = rng.integers(1, completion_len + 1, batch)
    mask = (np.arange(completion_len)[None] < lengths[:, None]).astype(np.float32)
    return train_state.DistillBatch(
        prompt_BxP=prompt,
        prompt_valid_BxP=valid,
        completion_BxN=jnp.asarray(rng.integers(0, CONFIG.vocab_size, (batch, completion_len))),
        completion_mask_BxN=jnp.asarray(mask),
        teacher_prompt_BxQ=teacher,
        teacher_prompt_valid_BxQ=teacher_valid,
    )


def test_teacher_logits_are_read_at_the_completion_positions():
    """Against a separate unpadded forward of each row's teacher context + completion."""
    student = model.init_params(CONFIG, jax.random.key(0))
    teacher = model.init_params(CONFIG, jax.random.key(1))
    batch = _batch()
    terms = distill.per_token_terms(
        student, teacher, batch, CONFIG, CONFIG, distill.DistillConfig(divergence="reverse_kl")
    )
    hidden = distill.completion_hidden(
        teacher,
        CONFIG,
        batch.teacher_prompt_BxQ,
        batch.teacher_prompt_valid_BxQ,
        batch.completion_BxN,
        batch.completion_mask_BxN,
    )
    batched_logits = model.logits_from_hidden(teacher, hidden, CONFIG)
    for b in range(batch.completion_BxN.shape[0]):
        context = batch.teacher_prompt_BxQ[b][batch.teacher_prompt_valid_BxQ[b]]
        n = int(batch.completion_mask_BxN[b].sum())
        completion = batch.completion_BxN[b, :n]
        logits, _ = model.forward(teacher, jnp.concatenate([context, completion])[None], CONFIG)
        expected = logits[0, len(context) - 1 : len(context) - 1 + n]
        np.testing.assert_allclose(batched_logits[b, :n], expected, rtol=1e-4, atol=1e-4)
        logprobs = jax.nn.log_softmax(expected)[jnp.arange(n), completion]
        np.testing.assert_allclose(terms["teacher_logprob"][b, :n], logprobs, rtol=1e-4, atol=1e-4)


def _run(teacher, decay=0.9, steps=3, lora_cfg=LORA):
    """Losses and states of a few steps of the run's own update from a fresh state, on
    one device; a peaked base model so the student moves visibly."""
    base = jax.tree.map(
        lambda x: 4.0 * x if x.ndim >= 2 else x, model.init_params(CONFIG, jax.random.key(0))
    )
    roles = update.Roles(CONFIG, CONFIG, opsd.SelfTeacher(teacher, decay), lora_cfg)
    cfg = distill.DistillConfig(divergence="reverse_kl")
    optim = train_state.OptimizerConfig(learning_rate=1e-2, warmup_steps=0)
    optimizer = train_state.make_optimizer(optim, 100)
    placement = mesh.Layout().placement(mesh.make_mesh((1, 1, 1), devices=jax.devices()[:1]))
    base = mesh.place_params(base, placement.params(CONFIG))
    state = update.create_state(roles, base, optimizer, 0, placement.params(CONFIG))
    frozen = update.frozen_arrays(roles, base, None)
    shardings = update.step_shardings(state, jax.tree.map(lambda x: x.sharding, frozen), placement)
    update_step = update.make_update_step(roles, cfg, optimizer, shardings)
    losses, states = [], [jax.tree.map(np.asarray, state)]
    for step in range(steps):
        state, metrics = update_step(state, frozen, _batch(seed=step))
        losses.append(float(metrics["loss"]))
        states.append(jax.tree.map(np.asarray, state))
    return roles, frozen, losses, states


@pytest.mark.parametrize("lora_cfg", [LORA, None], ids=["lora", "full"])
def test_fixed_ema_and_live_teachers_behave_as_defined(lora_cfg):
    """ema with decay 1 never moves (it is the fixed teacher), with decay 0 it tracks the
    student (it is the live teacher); the two limits differ from each other; ema in
    between follows its recurrence."""
    _, _, fixed, _ = _run("fixed", lora_cfg=lora_cfg)
    _, _, live, _ = _run("live", lora_cfg=lora_cfg)
    _, _, ema_one, _ = _run("ema", decay=1.0, lora_cfg=lora_cfg)
    _, _, ema_zero, _ = _run("ema", decay=0.0, lora_cfg=lora_cfg)
    np.testing.assert_allclose(ema_one, fixed, rtol=1e-6)
    np.testing.assert_allclose(ema_zero, live, rtol=1e-6)
    assert fixed[0] == pytest.approx(live[0], rel=1e-6)  # before any update they coincide
    assert abs(fixed[-1] - live[-1]) > 1e-4 * abs(fixed[-1])

    roles, frozen, _, states = _run("ema", decay=0.9, lora_cfg=lora_cfg)
    expected = states[0].ema_params
    for state in states[1:]:
        expected = jax.tree.map(lambda e, p: 0.9 * e + 0.1 * p, expected, state.params)
        for got, want in zip(
            jax.tree.leaves(state.ema_params), jax.tree.leaves(expected), strict=True
        ):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    moved = jax.tree.leaves(
        jax.tree.map(lambda a, b: np.abs(a - b).max(), states[-1].params, states[0].params)
    )
    assert max(moved) > 0

    base, trainable, ema = frozen["base"], states[-1].params, states[-1].ema_params
    assert opsd.self_teacher_weights("fixed", trainable, base, ema, lora_cfg) is base
    live_weights = opsd.self_teacher_weights("live", trainable, base, ema, lora_cfg)
    student = update.student_weights(roles, trainable, frozen)
    for got, want in zip(jax.tree.leaves(live_weights), jax.tree.leaves(student), strict=True):
        np.testing.assert_array_equal(got, want)


def test_lora_student_keeps_the_base_untouched_and_no_ema_when_not_asked():
    _, _, _, states = _run("fixed")
    assert states[-1].ema_params is None
    assert set(states[-1].params["layers"]) == set(LORA.targets)
    assert np.any(states[-1].params["layers"]["q"]["b"])


def test_a_checkpoint_of_another_lora_shape_or_teacher_kind_is_refused(tmp_path):
    _, _, _, states = _run("fixed", steps=1)
    shape = update.StudentShape(CONFIG, LORA, "fixed")
    loop.save(loop.manager(tmp_path), 1, states[-1], shape)
    loop.check_directory(tmp_path, shape)
    for other, field in (
        (dataclasses.replace(shape, lora=lora.LoraConfig(rank=8)), "lora"),
        (dataclasses.replace(shape, lora=dataclasses.replace(LORA, targets=("q",))), "lora"),
        (dataclasses.replace(shape, teacher="ema"), "teacher"),
    ):
        with pytest.raises(loop.CheckpointMismatchError, match=f"differ: {field}"):
            loop.check_directory(tmp_path, other)


# ----------------------------------------------------------------------------- contexts

EXAMPLE = {"input": "2 + 3 =", "target": "2 + 3 = 5\n#### 5", "answer": "5"}
STUDENT = data.PromptTemplate("Solve.\n\n{input}", system="You are a helpful assistant.")


@pytest.fixture(scope="module")
def tokenizer():
    return tokenizer_lib.load("smollm2-135m-instruct")


def test_matching_contexts_pass_and_the_block_is_where_it_is_placed(tokenizer):
    student = data.render_prompt(EXAMPLE, STUDENT, tokenizer)
    for placement, text, block in (
        ("user", "Reference:\n{target}", "Reference:\n2 + 3 = 5\n#### 5"),
        ("system", "Show each step.", "Show each step."),
    ):
        ctx = opsd.PrivilegedContext(text=text, placement=placement)
        opsd.check_contexts(EXAMPLE, STUDENT, ctx, tokenizer, tokenizer)
        teacher = data.render_prompt(EXAMPLE, opsd.teacher_template(STUDENT, ctx), tokenizer)
        before, after = teacher.split(block)
        assert before.endswith("assistant.\n\n" if placement == "system" else "2 + 3 =\n\n")
        assert before[:-2] + after == student


def test_a_different_chat_template_is_refused_showing_both_renderings(tokenizer, capsys):
    other = dataclasses.replace(
        tokenizer,
        chat_template=tokenizer.chat_template.replace("<|im_start|>assistant", "<|im_start|>bot"),
    )
    ctx = opsd.PrivilegedContext(text="Reference:\n{target}")
    with pytest.raises(opsd.TemplateMismatchError) as err:
        opsd.check_contexts(EXAMPLE, STUDENT, ctx, tokenizer, other)
    message = str(err.value)
    assert "renderings differ" in message
    assert "<|im_start|>assistant" in message and "<|im_start|>bot" in message
    assert "[privileged]" in message


def test_a_different_eos_is_refused(tokenizer):
    other = dataclasses.replace(tokenizer, eos_id=tokenizer.eos_id + 1)
    ctx = opsd.PrivilegedContext(text="Reference:\n{target}")
    with pytest.raises(opsd.TemplateMismatchError, match="EOS differs"):
        opsd.check_contexts(EXAMPLE, STUDENT, ctx, tokenizer, other)


def test_a_system_rule_that_replaces_the_default_system_prompt_is_refused(tokenizer):
    """SmolLM2's template adds a default system prompt when there is none: a rule given as
    the only system prompt would silently drop it from the teacher's context."""
    ctx = opsd.PrivilegedContext(text="Always end with '#### <answer>'.", placement="system")
    no_system = dataclasses.replace(STUDENT, system=None)
    with pytest.raises(opsd.TemplateMismatchError, match="renderings differ"):
        opsd.check_contexts(EXAMPLE, no_system, ctx, tokenizer, tokenizer)
