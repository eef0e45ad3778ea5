"""The teacher probe (`opd_jax.probe`): contexts spliced from the student's prefixes, and
the probe in a tiny real run, where the teacher alone must score as its evaluation does."""

import json

import numpy as np
import pytest
from test_recipe import _run

from experiments import gkd_summarize
from opd_jax import config, probe, reporting


def test_splice_puts_the_students_prefix_after_the_real_prompt_tokens():
    prompt = np.array([[0, 0, 5, 6], [7, 8, 9, 4]])
    valid = prompt > 0
    tokens = np.array([[11, 12, 13], [21, 22, 23]])
    context, context_valid = probe.splice_prefix(prompt, valid, tokens, np.array([2, 0]), pad_id=0)
    np.testing.assert_array_equal(context, [[0, 0, 0, 5, 6, 11, 12], [0, 0, 0, 7, 8, 9, 4]])
    np.testing.assert_array_equal(context_valid, context > 0)
    np.testing.assert_array_equal(probe.prefix_lengths(np.array([4, 7, 0]), 0.5), [2, 3, 0])


def test_bad_probe_settings_are_one_line_errors():
    with pytest.raises(config.ConfigError, match="TeacherProbe.fractions"):
        probe.TeacherProbe(every=1, fractions=(0.5, 1.0))
    assert probe.TeacherProbe(every=2).due(4, last=5) and probe.TeacherProbe(every=2).due(5, 5)
    assert not probe.TeacherProbe(every=0).due(4, last=4)


def test_a_run_probes_its_teacher_from_student_prefixes(tmp_path):
    extra = [
        "TeacherProbe.every = 2",
        "TeacherProbe.examples = 2",
        "TeacherProbe.fractions = (0.0, 0.5)",
    ]
    _run(gkd_summarize.GIN_FILE, tmp_path, extra)
    records = reporting.read_metrics(tmp_path / "logs" / reporting.METRICS_FILE)
    own, half = "probe/teacher_from_student_0pct_rougeL", "probe/teacher_from_student_50pct_rougeL"
    assert [r["step"] for r in records if half in r] == [0, 2, 4]
    assert all(0.0 <= r[key] <= 100.0 for r in records for key in (own, half) if key in r)
    # Fraction 0 is the teacher alone, on the first two validation examples as its own
    # evaluation (Schedule.eval_examples = 2), only with more left padding: greedy
    # decoding does not depend on the padding, so the scores agree.
    evals = json.loads((tmp_path / "evals.json").read_text())
    teacher = evals["teacher/eval"]["metrics"]["rougeL"]
    assert all(r[own] == pytest.approx(teacher, abs=1e-6) for r in records if own in r)
