"""Every recipe end to end through the one run loop, on the real model and tokenizer at
tiny sizes: results, a student that changed, resume after SIGTERM equal to an
uninterrupted run, and clear errors that overwrite nothing."""

import dataclasses
import json
import signal
import subprocess
import sys

import gin
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from test_distill import GIN_CHOICES
from test_export import LOGIT_TOLERANCE, _assert_transformers_matches, _logit_distance

from experiments import gkd_arithmetic, gkd_summarize, opsd_math, opsd_rule
from opd_jax import (
    checkpoints,
    config,
    data,
    distill,
    export,
    loop,
    lora,
    losses,
    opsd,
    recipe,
    reporting,
    sampling,
    train_state,
)
from opd_jax import tokenizer as tokenizer_lib
from opd_jax.datasets import base

TINY = [
    "Models.student_layers = 1",
    "Models.student_sft_steps = 1",
    "Models.teacher_sft_steps = 0",
    "Schedule.steps = 4",
    "Schedule.batch_size = 2",
    "Schedule.prompt_len = 64",
    "Schedule.completion_len = 6",
    "Schedule.checkpoint_every = 2",
    "Schedule.eval_every = 2",
    "Schedule.eval_examples = 2",
    "Schedule.test_examples = 2",
    "Schedule.eval_batch_size = 2",
    "MixtureConfig.on_policy_fraction = 0.5",
]


OPSD_TINY = [
    "Schedule.steps = 2",
    "Schedule.batch_size = 2",
    "Schedule.completion_len = 4",
    "Schedule.checkpoint_every = 1",
    "Schedule.eval_every = 2",
    "Schedule.eval_examples = 2",
    "Schedule.test_examples = 2",
    "Schedule.eval_batch_size = 2",
    "LoraConfig.rank = 2",
    "LoraConfig.targets = ('q', 'v')",
]


def _run(gin_file, workdir, extra=(), tiny=TINY):
    gin.clear_config()
    config.apply_gin([str(gin_file)], [*tiny, *extra])
    return recipe.run(workdir, title="test")


def _final_params(workdir, step=4, stage="distill"):
    """A stage's params at `step`, on this process's first device whatever the mesh or
    process count that wrote them."""
    directory = workdir / stage
    saved = ocp.StandardCheckpointer().metadata(directory / str(step) / "state").item_metadata
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), saved)
    mngr = loop.manager(directory)
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    return restored["state"]["params"]


@pytest.mark.parametrize("module", [gkd_summarize, gkd_arithmetic], ids=["summarize", "arithmetic"])
def test_tiny_run_writes_results_table_plot_and_config(module, tmp_path):
    # The arithmetic run also fine-tunes its teacher and mixes in the RL reward.
    rl = [
        "DistillConfig.rl_alpha = 0.5",
        "Schedule.rl_group_size = 2",
        "MixtureConfig.on_policy_fraction = 1.0",  # the reward scores the student's samples
    ]
    extra = ["Models.teacher_sft_steps = 1", *rl] if module is gkd_arithmetic else []
    rows = _run(module.GIN_FILE, tmp_path, extra)
    assert [r["model"] for r in rows] == [
        "teacher",
        "student before distillation",
        "student after distillation",
    ]
    metric = "rougeL" if module is gkd_summarize else "exact_match"
    assert all(0.0 <= r[metric] <= 100.0 for r in rows)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results == rows
    assert (tmp_path / "curves.png").stat().st_size > 0
    assert "Schedule.steps = 4" in (tmp_path / "operative_config.gin").read_text()
    records = reporting.read_metrics(tmp_path / "logs" / reporting.METRICS_FILE)
    logged = {key for r in records for key in r}
    assert {"distill/loss", "distill/divergence", "distill/on_policy_fraction"} <= logged
    if module is gkd_arithmetic:
        assert {"teacher_sft/loss", "distill/reward", "distill/policy_gradient"} <= logged
    assert f"eval/student_{metric}" in logged and f"eval/teacher_{metric}" in logged
    assert loop.manager(tmp_path / "distill").all_steps()[-1] == 4
    changed = jax.tree.map(
        lambda a, b: float(np.max(np.abs(a - b))),
        _final_params(tmp_path, step=1, stage="student_sft"),
        _final_params(tmp_path),
    )
    assert max(jax.tree.leaves(changed)) > 0, "distillation left the student unchanged"


@pytest.mark.slow
@pytest.mark.parametrize("module", [opsd_math, opsd_rule], ids=["math", "rule"])
def test_tiny_self_distillation_run_writes_results(module, tmp_path):
    rows = _run(module.GIN_FILE, tmp_path, tiny=OPSD_TINY)
    assert [r["model"] for r in rows] == [
        "teacher with privileged context",
        "student before distillation",
        "student after distillation",
    ]
    assert all(0.0 <= r["exact_match"] <= 100.0 for r in rows)
    assert json.loads((tmp_path / "results.json").read_text()) == rows
    records = reporting.read_metrics(tmp_path / "logs" / reporting.METRICS_FILE)
    logged = {key for r in records for key in r}
    assert {"distill/loss", "distill/divergence", "eval/student_exact_match"} <= logged
    adapters = _final_params(tmp_path, step=2)["layers"]
    assert set(adapters) == {"q", "v"}, "a LoRA run checkpoints the adapters only"
    assert np.any(adapters["q"]["b"] != 0), "the adapters' B factors left zero"


@pytest.mark.slow
def test_a_checkpoint_of_another_lora_shape_is_refused(tmp_path):
    _run(
        opsd_math.GIN_FILE,
        tmp_path,
        ["Schedule.steps = 1", "Schedule.test_examples = 1"],
        tiny=OPSD_TINY,
    )
    with pytest.raises(loop.CheckpointMismatchError, match="fields differ: lora"):
        _run(
            opsd_math.GIN_FILE,
            tmp_path,
            ["Schedule.steps = 1", "Schedule.test_examples = 1", "LoraConfig.rank = 4"],
            tiny=OPSD_TINY,
        )


def test_cut_prompts_and_a_dropped_default_system_prompt_refuse_to_start(tmp_path):
    with pytest.raises(recipe.PromptCutError, match="teacher_prompt_len >= 1"):
        _run(opsd_math.GIN_FILE, tmp_path, ["Schedule.teacher_prompt_len = 100"], tiny=OPSD_TINY)
    with pytest.raises(opsd.TemplateMismatchError, match="--- teacher rendering ---"):
        _run(opsd_rule.GIN_FILE, tmp_path, ["Task.system = None"], tiny=OPSD_TINY)
    assert not (tmp_path / "distill").exists()


def test_sigterm_then_rerun_ends_where_an_uninterrupted_run_does(tmp_path, monkeypatch):
    _run(gkd_summarize.GIN_FILE, tmp_path / "straight")

    original_write = reporting.MetricsWriter.write

    def write_then_preempt(self, step, scalars):
        original_write(self, step, scalars)
        if step == 2 and "distill/loss" in scalars:
            signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(reporting.MetricsWriter, "write", write_then_preempt)
    interrupted = tmp_path / "interrupted"
    with pytest.raises(SystemExit, match="preempted at step 2"):
        _run(gkd_summarize.GIN_FILE, interrupted)
    assert loop.manager(interrupted / "distill").all_steps() == [2]
    monkeypatch.setattr(reporting.MetricsWriter, "write", original_write)
    _run(gkd_summarize.GIN_FILE, interrupted)

    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
        _final_params(tmp_path / "straight"),
        _final_params(interrupted),
    )
    straight = json.loads((tmp_path / "straight" / "results.json").read_text())
    assert json.loads((interrupted / "results.json").read_text()) == straight


def test_workdir_of_another_model_is_refused_and_left_alone(tmp_path):
    _run(gkd_summarize.GIN_FILE, tmp_path)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(config.ConfigError, match="Models.student_layers=1, not 2"):
        _run(gkd_summarize.GIN_FILE, tmp_path, ["Models.student_layers = 2"])
    after = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before


def test_missing_dataset_names_it_before_the_workdir_is_touched(tmp_path, monkeypatch):
    monkeypatch.setenv(base.DATA_DIR_ENV, str(tmp_path / "data"))
    with pytest.raises(data.MissingDatasetError, match="'xsum' is not prepared"):
        _run(gkd_summarize.GIN_FILE, tmp_path / "work", ['Task.dataset = "xsum"'])
    assert not (tmp_path / "work").exists()


def test_models_load_in_their_dtype_and_a_whole_student_shares_its_teacher(tiny_teacher_dir):
    whole = recipe.load_models(recipe.Models(teacher=str(tiny_teacher_dir), dtype="bfloat16"))
    assert whole.student_params is whole.teacher_params
    assert {x.dtype for x in jax.tree.leaves(whole.student_params)} == {jnp.dtype("bfloat16")}
    cut = recipe.load_models(
        recipe.Models(teacher=str(tiny_teacher_dir), student_layers=(1,), dtype="bfloat16")
    )
    assert (cut.student_config.n_layers, cut.teacher_config.n_layers) == (1, 2)
    np.testing.assert_array_equal(
        cut.student_params["layers"]["q"][0], whole.teacher_params["layers"]["q"][1]
    )


def test_models_dtype_other_than_float32_or_bfloat16_is_named():
    with pytest.raises(config.ConfigError, match=r"Models.dtype='float16' is not one of \("):
        recipe.Models(dtype="float16")


def test_bad_binding_is_one_line_naming_it():
    with pytest.raises(config.ConfigError, match=r"--gin_param 'Schedule.stepz = 3'") as err:
        config.apply_gin([str(gkd_summarize.GIN_FILE)], ["Schedule.stepz = 3"])
    assert "\n" not in str(err.value)


def test_batch_not_divisible_by_rl_groups_is_a_config_error(tmp_path):
    extra = ["DistillConfig.rl_alpha = 0.5", "Schedule.rl_group_size = 3"]
    with pytest.raises(config.ConfigError, match="multiple of rl_group_size"):
        _run(gkd_arithmetic.GIN_FILE, tmp_path, extra)


def _fixed_batch(tokenizer, student_config, student_params, rows=16):
    """The run's first training prompts (the gin config still bound) completed by
    `student_params`, sampled at temperature 1: the fixed batch an objective is judged on."""
    task, schedule = recipe.Task(), recipe.Schedule()
    split = data.load_split(task.dataset, task.train_split)
    spec = data.BatchSpec(rows, schedule.prompt_len, schedule.completion_len, task.template())
    prompts = data.batch_at(split, tokenizer, spec, seed=123, step=0)
    settings = sampling.SamplingConfig(
        schedule.completion_len, eos_ids=tokenizer.eos_id, pad_id=tokenizer.pad_id
    )
    samples = sampling.generate(
        student_params,
        prompts.prompt_BxP,
        prompts.prompt_valid_BxP,
        jax.random.key(0),
        student_config,
        settings,
    )
    return train_state.DistillBatch(
        prompts.prompt_BxP, prompts.prompt_valid_BxP, samples.tokens_BxN, samples.mask_BxN
    )


# Temporal credit and vocabulary routing on the sampled-token estimator: whether they
# lower the per-token divergence in a few steps depends on the run (routing through a
# near-uniform student's top-k can raise it), so the test asserts what they log instead.
CREDIT_CHOICES = {
    "pg-gae": ('divergence = "reverse_kl"', 'estimator = "pg"', 'credit = "gae"'),
    "pg-routing": (
        'divergence = "reverse_kl"',
        'estimator = "pg"',
        'routing = "overlap"',
        "routing_top_k = 8",
    ),
}


@pytest.mark.parametrize("name", [*GIN_CHOICES, *CREDIT_CHOICES])
def test_every_objective_runs_end_to_end_from_gin(
    name, tiny_teacher_dir, tiny_student_dir, tmp_path
):
    """The whole loop on a user's checkpoint directories (a tiny teacher with SmolLM2's
    tokenizer and a noisy copy of it as the student), the objective chosen by gin alone:
    the student's params change, the logged divergence is finite and non-negative beside
    the optimized loss, and the exact divergence of the chosen kind on a fixed batch (the
    four training prompts, completed by the start student) falls. Measured final / start
    in 16 steps: full 0.66-0.71, teacher_topk 0.75-0.84, student_topk 0.88-0.92, pg and
    k3 0.952 (their per-token gradients are identical), k1 0.957. The student is read back
    through the export path (`export.student_model`)."""
    extra = [
        f'Models.teacher = "{tiny_teacher_dir}"',
        f'Models.student = "{tiny_student_dir}"',
        "Models.student_layers = None",
        "Models.student_sft_steps = 0",
        'Task.train_split = "train[:4]"',
        "Schedule.steps = 16",
        "Schedule.batch_size = 4",
        "Schedule.completion_len = 4",
        "Schedule.prompt_len = 80",
        "Schedule.checkpoint_every = 8",
        "Schedule.eval_every = 16",
        "MixtureConfig.on_policy_fraction = 1.0",
        "OptimizerConfig.learning_rate = 1e-3",
        "OptimizerConfig.warmup_steps = 0",
        *(f"DistillConfig.{b}" for b in {**GIN_CHOICES, **CREDIT_CHOICES}[name]),
    ]
    _run(gkd_arithmetic.GIN_FILE, tmp_path, extra)
    records = reporting.read_metrics(tmp_path / "logs" / reporting.METRICS_FILE)
    logged = [r for r in records if "distill/divergence" in r]
    assert len(logged) == 16
    assert all(np.isfinite(r["distill/loss"]) and r["distill/divergence"] >= 0 for r in logged)
    teacher_config, teacher_params = checkpoints.load(tiny_teacher_dir)
    student_config, start = checkpoints.load(tiny_student_dir)
    _, final = export.student_model(tmp_path)
    changed = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), final, start)
    assert max(jax.tree.leaves(changed)) > 0, "distillation left the student unchanged"
    if name == "pg-gae":  # the value head learns: its loss falls from its zero start
        value_loss = [r["distill/value_loss"] for r in logged]
        assert min(value_loss[-4:]) < value_loss[0], value_loss
    if name == "pg-routing":  # some sampled tokens had a negative advantage and a route
        assert max(r["distill/routed_fraction"] for r in logged) > 0
    if name in CREDIT_CHOICES:
        return
    exact_cfg = dataclasses.replace(distill.DistillConfig(), estimator="full", top_k=0)
    batch = _fixed_batch(tokenizer_lib.load(tiny_teacher_dir), student_config, start, rows=4)

    def exact(params):
        terms = distill.per_token_terms(
            params, teacher_params, batch, student_config, teacher_config, exact_cfg
        )
        return float(losses.masked_mean(terms["divergence"], batch.completion_mask_BxN))

    before, after = exact(start), exact(final)
    assert after < before, f"exact {exact_cfg.divergence}: {before:.4f} -> {after:.4f}"


def test_a_student_with_a_padded_vocabulary_trains_end_to_end(
    tiny_teacher_dir, tiny_padded_student_dir, tmp_path
):
    """The tiny teacher (49152 rows) teaches a student of one tokenizer whose embedding
    table has 64 padding rows more, as Qwen2.5-7B (152064 rows) would teach Qwen2.5-0.5B
    (151936): the run trains; sampler and learner agree on every sampled token's log-prob,
    the padding left out of both; and the padding rows are never updated."""
    extra = [
        f'Models.teacher = "{tiny_teacher_dir}"',
        f'Models.student = "{tiny_padded_student_dir}"',
        "Models.student_layers = None",
        "Models.student_sft_steps = 0",
        'Task.train_split = "train[:4]"',
        "Schedule.steps = 2",
        "Schedule.prompt_len = 80",
        "Schedule.completion_len = 4",
        "MixtureConfig.on_policy_fraction = 1.0",
        "OptimizerConfig.learning_rate = 1e-3",
    ]
    _run(gkd_arithmetic.GIN_FILE, tmp_path, extra)
    records = reporting.read_metrics(tmp_path / "logs" / reporting.METRICS_FILE)
    logged = [r for r in records if "distill/divergence" in r]
    assert len(logged) == 2 and all(r["distill/divergence"] >= 0 for r in logged)
    assert all(r["distill/logprob_mismatch"] < 1e-4 for r in logged), logged
    vocab = tokenizer_lib.load(tiny_padded_student_dir).vocab_size
    start = checkpoints.load(tiny_padded_student_dir)[1]["embed"]
    final = _final_params(tmp_path, step=2)["embed"]
    np.testing.assert_array_equal(final[vocab:], start[vocab:])
    assert np.max(np.abs(final[:vocab] - start[:vocab])) > 0


@pytest.mark.parametrize("recipe_name", ["gkd", "opsd_lora"])
def test_a_run_exports_its_student_to_transformers(
    recipe_name, tiny_teacher_dir, tiny_student_dir, tmp_path
):
    """`python -m opd_jax.export` on a real run's workdir: a GKD student (full weights) and
    a self-distilled LoRA student (adapters merged) reload in transformers with our
    logits, token ids and chat template, and they are the weights the run trained."""
    models = [f'Models.student = "{tiny_student_dir}"', "Models.student_layers = None"]
    if recipe_name == "gkd":
        gin_file, tiny = gkd_arithmetic.GIN_FILE, TINY
        models.append(f'Models.teacher = "{tiny_teacher_dir}"')
    else:
        gin_file, tiny = opsd_math.GIN_FILE, OPSD_TINY
    _run(gin_file, tmp_path / "run", [*models, "Models.student_sft_steps = 1"], tiny=tiny)
    steps = recipe.Schedule().steps
    subprocess.run(
        [sys.executable, "-m", "opd_jax.export", str(tmp_path / "run"), str(tmp_path / "hf")],
        check=True,
    )
    config, start = checkpoints.load(tiny_student_dir)
    sft = _final_params(tmp_path / "run", step=1, stage="student_sft")
    trained = _final_params(tmp_path / "run", step=steps)
    if recipe_name == "opsd_lora":
        trained = lora.merge(sft, trained, lora.LoraConfig())
    tok = tokenizer_lib.load(tiny_student_dir)
    _assert_transformers_matches(tmp_path / "hf", trained, config, tok)
    assert _logit_distance(trained, sft, config, tok) > 100 * LOGIT_TOLERANCE
