"""The OPSD experiment end to end on the real model and tokenizer, at tiny sizes."""

import json

import gin
import pytest

from experiments import opsd_math, opsd_rule
from opd_jax import config, opsd_experiment, reporting, self_distill, train_checkpoint

TINY = [
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


def _run(gin_file, workdir, extra=()):
    gin.clear_config()
    config.apply_gin([str(gin_file)], [*TINY, *extra])
    return opsd_experiment.run(workdir, title="test")


@pytest.mark.slow
@pytest.mark.parametrize("module", [opsd_math, opsd_rule], ids=["math", "rule"])
def test_tiny_run_writes_results_and_exports_the_merged_student(module, tmp_path):
    rows = _run(module.GIN_FILE, tmp_path, ["SelfDistillRun.export_hf = True"])
    assert [r["model"] for r in rows] == [
        "teacher with privileged context",
        "student before",
        "student after",
    ]
    assert all(0.0 <= r["exact_match"] <= 100.0 for r in rows)
    assert json.loads((tmp_path / "results.json").read_text()) == rows
    records = reporting.read_metrics(tmp_path / "logs" / reporting.METRICS_FILE)
    logged = {key for r in records for key in r}
    assert {"opsd/loss", "opsd/divergence", "eval/student_exact_match"} <= logged
    assert train_checkpoint.manager(tmp_path / "opsd").all_steps()[-1] == 2
    assert (tmp_path / "student_hf" / "config.json").exists()


@pytest.mark.slow
def test_a_checkpoint_of_another_lora_shape_is_refused(tmp_path):
    _run(opsd_math.GIN_FILE, tmp_path, ["Schedule.steps = 1", "Schedule.test_examples = 1"])
    with pytest.raises(train_checkpoint.CheckpointMismatchError, match="fields differ: lora"):
        _run(opsd_math.GIN_FILE, tmp_path, ["LoraConfig.rank = 4"])


def test_cut_prompts_and_a_dropped_default_system_prompt_refuse_to_start(tmp_path):
    with pytest.raises(opsd_experiment.PromptCutError, match="teacher_prompt_len >= 1"):
        _run(opsd_math.GIN_FILE, tmp_path, ["SelfDistillRun.teacher_prompt_len = 100"])
    with pytest.raises(self_distill.TemplateMismatchError, match="--- teacher rendering ---"):
        _run(opsd_rule.GIN_FILE, tmp_path, ["Task.system = None"])
    assert not (tmp_path / "opsd").exists()
