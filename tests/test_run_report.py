"""The run report: every checklist field rendered, tokens and wall times read back from a
resumed run's logs, the diagnostics grid, and the results table beside them."""

import dataclasses
import json
import struct

import pytest
import tokenizers

from opd_jax import (
    data,
    distill,
    fixes,
    gkd,
    loop,
    lora,
    opsd,
    recipe,
    reporting,
    run_report,
    train_state,
    update,
)
from opd_jax import tokenizer as tokenizer_lib
from opd_jax.model import ModelConfig

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEACHER = ModelConfig(
    vocab_size=64, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=96
)
STUDENT = dataclasses.replace(TEACHER, n_layers=2)
DIAGNOSTICS = (
    "overlap_ratio",
    "overlap_mass_teacher",
    "overlap_mass_student",
    "entropy_gap",
    "divergence_first_third",
    "divergence_middle_third",
    "divergence_last_third",
    "reward_on_overlap",
    "reward_off_overlap",
    "divergence",
    "loss",
)


def word_tokenizer(eos_id: int = 2, chat_template: str | None = CHATML) -> tokenizer_lib.Tokenizer:
    """A word-level vocabulary behind the run's Tokenizer interface, with a chat template."""
    words = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "the", "paper"]
    model = tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>")
    backend = tokenizer_lib.HFTokenizersBackend(tokenizers.Tokenizer(model))
    return tokenizer_lib.Tokenizer(
        backend, 1, eos_id, 0, frozenset({0, 1, 2}), False, chat_template
    )


def logged_records(tmp_path) -> list[dict]:
    """The logs of a run whose distillation was interrupted after step 3 and resumed from
    its step-2 checkpoint: steps 3 and 4 are logged twice, the last values count."""
    writer = reporting.MetricsWriter(tmp_path / "logs", enabled=True)
    writer.write(1, {"teacher_sft/loss": 2.0})
    writer.write(2, {"student_sft/loss": 2.0})
    for steps in (range(1, 5), range(3, 7)):
        for step in steps:
            scalars = {f"distill/{name}": 1.0 / step for name in DIAGNOSTICS}
            on_policy = float(step % 2)  # per-step coin: odd steps are the student's
            scalars |= {"distill/num_tokens": 100.0 + step, "distill/on_policy_fraction": on_policy}
            writer.write(step, scalars)
    for step in (0, 3, 6):
        writer.write(step, {"eval/student_rougeL": 10.0 + step, "eval/student_distinct_2": 90.0})
    writer.close()
    return reporting.read_metrics(tmp_path / "logs" / reporting.METRICS_FILE)


def stage_dirs(tmp_path):
    """Stage directories as the loop leaves them: teacher and student fine-tuned, no cold
    start, distillation over two segments (62 s in all)."""
    seconds = {"teacher_sft": 30.0, "student_sft": 12.5, "distill": 62.0}
    for stage, total in seconds.items():
        (tmp_path / stage).mkdir(parents=True)
        (tmp_path / stage / loop.WALL_TIME_FILE).write_text(json.dumps({"seconds": total}))
    return {stage: tmp_path / stage for stage in run_report.PHASES}


def checklist(records, stages=None, **tokenizers_) -> run_report.Checklist:
    """A GKD run's checklist: a separate teacher with a privileged context, a student cut
    to two layers with LoRA, a per-row lambda with teacher-sampled off-policy rows."""
    template = data.SUMMARIZE_PAPER
    context = opsd.PrivilegedContext(text="The reference summary: {target}")
    spec = data.BatchSpec(4, prompt_len=96, target_len=24, template=template)
    teacher_spec = dataclasses.replace(
        spec, prompt_len=160, template=opsd.teacher_template(template, context)
    )
    student_tokenizer = tokenizers_.get("tokenizer", word_tokenizer())
    return run_report.build_checklist(
        task=recipe.Task(),
        models=recipe.Models(teacher="teacher-dir", student_layers=2, use_lora=True),
        schedule=recipe.Schedule(steps=6, batch_size=4, seed=17, eval_every=3),
        rollout=recipe.RolloutSampling(temperature=0.7, top_k=40, top_p=0.95),
        objective=distill.DistillConfig(estimator="teacher_topk", top_k=8, temperature=1.5),
        mixture=gkd.MixtureConfig(
            on_policy_fraction=0.25, per_example=True, fixed_source="teacher"
        ),
        optim=train_state.OptimizerConfig(learning_rate=3e-5),
        cold=fixes.ColdStart(steps=3, min_reward=0.5),
        selection=fixes.PromptSelection(),
        roles=update.Roles(STUDENT, TEACHER, None, lora.LoraConfig(rank=4)),
        student_layers=(0, 3),
        spec=spec,
        teacher_spec=teacher_spec,
        tokenizer=student_tokenizer,
        teacher_tokenizer=tokenizers_.get("teacher_tokenizer", word_tokenizer()),
        records=records,
        evals={"teacher/test": {"seconds": 2.5}, "student/eval/3": {"seconds": 1.54}},
        stage_dirs=stages or {},
    )


def test_report_renders_every_checklist_field(tmp_path):
    records = logged_records(tmp_path)
    reporting.write_results(tmp_path, [{"model": "student after distillation", "rougeL": 12.5}])
    listed = checklist(records)
    text = run_report.write(tmp_path, listed, records).read_text()
    fields = dataclasses.fields(run_report.Checklist)
    labels = [f.metadata["label"] for f in fields]
    assert len(set(labels)) == len(labels)
    for field in fields:
        value = run_report.render_value(getattr(listed, field.name))
        assert field.metadata["label"] in text, field.name
        assert value in text, (field.name, value)
    assert "| Rollout temperature (RolloutSampling.temperature) | 0.7 |" in text
    assert "| lambda drawn (MixtureConfig.per_example) | per row |" in text
    assert "| Same tokenizer on both sides | yes |" in text
    assert "<|im_start|>user\nSummarize the following scientific paper" in listed.student_prompt
    assert "<input>\n\nThe reference summary: <target><|im_end|>" in listed.teacher_prompt
    assert listed.student_model == "teacher-dir (the teacher's source), keeping layers [0, 3]"
    assert listed.student_trained_weights.startswith("LoRA: rank=4, alpha=32.0")
    assert "| 12.50 |" in text and "## Results" in text


def test_tokens_and_wall_times_come_from_the_last_value_of_each_step(tmp_path):
    listed = checklist(logged_records(tmp_path), stage_dirs(tmp_path))
    num_tokens = {step: 100 + step for step in range(1, 7)}  # steps 3, 4 counted once
    assert listed.completion_tokens == sum(num_tokens.values())
    assert listed.student_sampled_tokens == 101 + 103 + 105
    assert listed.teacher_sampled_tokens == 102 + 104 + 106
    assert (listed.teacher_sft_seconds, listed.student_sft_seconds) == (30.0, 12.5)
    assert listed.cold_start_seconds is None  # it never ran
    assert listed.distill_seconds == 62.0
    assert listed.evaluation_seconds == 4.0  # 2.5 + 1.54, to a tenth of a second
    dataset_rows = run_report.distill_tokens(logged_records(tmp_path / "again"), "dataset")
    assert dataset_rows["teacher_sampled_tokens"] == 0  # targets are read, not generated


def test_a_fresh_workdir_reports_phases_that_never_ran_as_missing():
    seconds = run_report.phase_seconds({}, {"student/eval/0": {"metrics": {}}})
    assert set(seconds.values()) == {None}
    assert run_report.render_value(None) == "n/a"


def test_same_tokenizer_compares_vocabulary_specials_and_chat_template():
    assert run_report.same_tokenizer(word_tokenizer(), word_tokenizer())
    assert not run_report.same_tokenizer(word_tokenizer(), word_tokenizer(eos_id=4))
    assert not run_report.same_tokenizer(word_tokenizer(), word_tokenizer(chat_template=None))
    assert run_report.tokenizer_kind(word_tokenizer()) == "tokenizers WordLevel"


def test_diagnostics_png_draws_every_logged_series_in_a_grid(tmp_path):
    records = logged_records(tmp_path)
    panels = run_report.plot_diagnostics(records, tmp_path / "grid.png")
    drawn = [key for panel in panels for key in panel.keys]
    assert drawn == [
        *(f"distill/{name}" for name in DIAGNOSTICS),
        "eval/student_distinct_2",
        "eval/student_rougeL",
    ]
    assert "sampler vs learner log-prob gap" not in [p.title for p in panels]  # never logged
    png = (tmp_path / "grid.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE)
    assert struct.unpack(">II", png[16:24]) == (3 * 504, 1080), "3 columns, 3 rows at 120 dpi"
    markdown = run_report.diagnostics_markdown(panels)
    assert "![In-step diagnostics](diagnostics.png)" in markdown
    assert "- validation, student: eval/student_distinct_2, eval/student_rougeL" in markdown


def test_report_without_diagnostics_or_results_says_so(tmp_path):
    text = run_report.write(tmp_path, checklist([]), []).read_text()
    assert "No in-step diagnostics were logged." in text and "## Results" not in text
    assert not (tmp_path / run_report.DIAGNOSTICS_FILE).exists()


@pytest.mark.parametrize("value, shown", [(True, "yes"), (1e-05, "1e-05"), (62.0, "62"), (7, "7")])
def test_values_render_plainly(value, shown):
    assert run_report.render_value(value) == shown
