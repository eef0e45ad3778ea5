"""A 2-arm x 2-seed study on a tiny real run: every run finishes, the stages before
distillation run once for all four, a finished study resumes without running anything,
and the comparison gives each arm's mean and spread over its seeds."""

import json
import pathlib

import gin
import numpy as np
import pytest
from test_recipe import TINY

from experiments import gkd_summarize
from opd_jax import config, distill, recipe, reporting, study

GRID = {"DistillConfig.divergence": ["forward_kl", "reverse_kl"]}


def test_a_study_shares_its_prefix_stages_and_resumes(tmp_path, monkeypatch):
    settings = study.Study(grid=GRID, seeds=(0, 1))
    files, params = [str(gkd_summarize.GIN_FILE)], [*TINY, "Schedule.steps = 2"]
    table = study.run(tmp_path, settings, files, params, title="tiny study")

    runs = json.loads((tmp_path / "study.json").read_text())["runs"]
    assert [(r["arm"], r["seed"]) for r in runs] == [
        ("divergence=forward_kl", 0),
        ("divergence=forward_kl", 1),
        ("divergence=reverse_kl", 0),
        ("divergence=reverse_kl", 1),
    ]
    prefixes = sorted(p.name for p in tmp_path.glob("prefix-*"))
    assert prefixes == [runs[0]["prefix"]] and len({r["prefix"] for r in runs}) == 1
    # The student's fine-tuning ran in exactly one of the four runs; every run distilled.
    logs = [
        tmp_path / r["arm"] / f"seed{r['seed']}" / "logs" / reporting.METRICS_FILE for r in runs
    ]
    records = [reporting.read_metrics(path) for path in logs]
    fine_tuned = [any("student_sft/loss" in step for step in run) for run in records]
    assert sum(fine_tuned) == 1
    assert all(any("distill/loss" in step for step in run) for run in records)
    shared_evals = json.loads((tmp_path / prefixes[0] / "evals.json").read_text())
    assert {"teacher/test", "student_start/test"} <= set(shared_evals)
    # Each run logs the shared starting scores at step 0 of its own curves.
    assert all("eval/student_rougeL" in run[0] for run in records)

    arms = {row["arm"]: row for row in table}
    finals = [
        next(row for row in r["rows"] if row["model"] == study.AFTER)["rougeL"]
        for r in runs
        if r["arm"] == "divergence=forward_kl"
    ]
    spread = np.std(finals, ddof=1)
    assert arms["divergence=forward_kl"]["rougeL"] == f"{np.mean(finals):.2f} ± {spread:.2f}"
    assert arms["divergence=reverse_kl"]["seeds"] == 2
    assert "divergence=reverse_kl" in (tmp_path / "study.md").read_text()
    assert (tmp_path / "study.png").stat().st_size > 0
    assert (tmp_path / "study_curves.png").stat().st_size > 0

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished run was run again")

    monkeypatch.setattr(recipe, "run", must_not_run)
    assert study.run(tmp_path, settings, files, params, title="tiny study") == table


def test_a_bad_grid_is_a_one_line_error():
    with pytest.raises(config.ConfigError, match="Study.grid\\['divergence'\\]"):
        study.Study(grid={"divergence": ["forward_kl"]})
    with pytest.raises(config.ConfigError, match="Study.seeds"):
        study.Study(seeds=())


def test_variants_cross_the_grid_and_may_include_gin_files():
    settings = study.Study(
        grid={"Schedule.steps": [1, 2]},
        variants={"official": ["include 'opsd_official.gin'"], "ours": []},
    )
    arms = settings.arms()
    assert [arm.name for arm in arms] == [
        "official,steps=1",
        "official,steps=2",
        "ours,steps=1",
        "ours,steps=2",
    ]
    assert arms[1].bindings(seed=3) == [
        "include 'opsd_official.gin'",
        "Schedule.steps = 2",
        "Schedule.distill_seed = 3",
    ]
    gin.add_config_file_search_path(str(pathlib.Path(gkd_summarize.GIN_FILE).parent))
    config.apply_gin([], arms[1].bindings(seed=3))
    official = distill.DistillConfig()
    assert (official.divergence, official.beta, official.temperature) == ("jsd", 0.5, 1.1)
    assert recipe.RolloutSampling() == recipe.RolloutSampling(1.1, top_k=20, top_p=0.95)
