"""The fixes for runs whose student and teacher do not think alike (`opd_jax.fixes`):
which prompts and samples they keep, and both as stages of a tiny real run."""

import json

import numpy as np
import pytest
from test_recipe import _final_params, _run

from experiments import gkd_summarize
from opd_jax import config, fixes, reporting


def test_selection_keeps_the_best_share_and_a_seeded_share_of_the_rest():
    scores = np.array([0.1, 0.9, 0.5, 0.9, 0.3, 0.7, 0.2, 0.4, 0.6, 0.8])
    kept = fixes.select_prompts(scores, keep_fraction=0.3, rest_share=0.0, seed=0)
    np.testing.assert_array_equal(kept, [1, 3, 9])  # the three best; a tie goes by index
    with_rest = fixes.select_prompts(scores, keep_fraction=0.3, rest_share=0.5, seed=0)
    assert set(kept) < set(with_rest) and len(with_rest) == 3 + 4  # half of the 7 others
    again = fixes.select_prompts(scores, keep_fraction=0.3, rest_share=0.5, seed=0)
    np.testing.assert_array_equal(with_rest, again)
    assert len(fixes.select_prompts(scores, 0.0, 1.0, seed=0)) == len(scores)


def test_cold_start_keeps_the_samples_the_scorer_accepts():
    rewards = np.array([0.0, 0.5, 1.0])
    np.testing.assert_array_equal(fixes.kept_rows(rewards, 0.5), [False, True, True])
    assert fixes.kept_rows(rewards, None).all()


def test_bad_fix_settings_are_one_line_errors():
    with pytest.raises(config.ConfigError, match="ColdStart.min_reward=2"):
        fixes.ColdStart(steps=1, min_reward=2)
    with pytest.raises(config.ConfigError, match="PromptSelection.keep_fraction"):
        fixes.PromptSelection(candidates=4, keep_fraction=1.5)


def test_cold_start_and_prompt_selection_run_before_distillation(tmp_path):
    extra = [
        "ColdStart.steps = 2",
        "ColdStart.min_reward = 0.0",  # every score passes: the filter runs, keeps all
        "PromptSelection.candidates = 4",
        "PromptSelection.keep_fraction = 0.5",
        "PromptSelection.rest_share = 0.5",
    ]
    rows = _run(gkd_summarize.GIN_FILE, tmp_path, extra)
    assert rows[-1]["model"] == "student after distillation"
    records = reporting.read_metrics(tmp_path / "logs" / reporting.METRICS_FILE)
    cold = [r["cold_start/kept_fraction"] for r in records if "cold_start/kept_fraction" in r]
    assert cold == [1.0, 1.0]
    assert any("cold_start/loss" in r for r in records)
    before, after = (
        _final_params(tmp_path, 1, "student_sft"),
        _final_params(tmp_path, 2, "cold_start"),
    )
    assert not np.array_equal(before["final_norm"], after["final_norm"]), (
        "cold start trained nothing"
    )

    selection = json.loads((tmp_path / "prompt_selection.json").read_text())
    assert len(selection["candidates"]) == 4
    assert len(selection["kept"]) == 2 + 1  # the best half, and half of the other two
    ratios = np.array(selection["overlap_ratio"])
    assert ((ratios >= 0.0) & (ratios <= 1.0)).all()
    best = sorted(range(4), key=lambda i: (-ratios[i], i))[:2]
    assert set(best) <= set(selection["kept"])
    manifest = json.loads((tmp_path / "student.json").read_text())
    assert [s["name"] for s in manifest["stages"]] == ["student_sft", "cold_start", "distill"]
