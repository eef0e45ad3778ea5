"""A study: one recipe run over a grid of settings and several seeds, compared in one table.

Every arm x seed is a run of `recipe.run` in its own workdir (`<study>/<arm>/seed<k>`),
resumable on its own; runs whose stages before distillation are configured alike (teacher
and student fine-tuning, cold start, prompt selection: `recipe.prefix_bindings`) share one
copy of them in `<study>/prefix-<hash>`, so a grid over distillation settings fine-tunes
once. Seeds are `Schedule.distill_seed`: they vary the distillation stage's batch order and
sampling from one shared start. All runs go through one process, so they also share its
compiled programs.

The study writes <name>.md / <name>.json (each arm's test metrics as mean ± standard
deviation over seeds, the teacher and the student before distillation once per prefix),
<name>.png (the primary metric per arm, each seed a dot) and <name>_curves.png (top-k
overlap ratio and masses and the validation metric against step, a line per run, a
color per arm); `Study.name` is "study" by default.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from collections.abc import Mapping, Sequence
from typing import Any

import gin
import numpy as np
from etils import epath

from opd_jax import config, paths, recipe, reporting, validation

AFTER = "student after distillation"


@gin.configurable
@dataclasses.dataclass(frozen=True)
class Study:
    """recipe: the experiment module (experiments/<recipe>.py) whose gin file configures
    every run, before the study's own files and bindings. grid: {"Class.field": [values]}.
    variants: named lists of gin bindings (an `include 'file.gin'` line among them), for
    arms that differ in several settings at once. Every variant x every combination of
    the grid's values is an arm. seeds: the `Schedule.distill_seed` of each arm's runs.
    name: the stem of the comparison's files, so several studies in one workdir (sharing
    its prefix stages where they are configured alike) keep their own table and plot."""

    recipe: str = "gkd_arithmetic"
    name: str = "study"
    grid: Mapping[str, Sequence[Any]] = dataclasses.field(default_factory=dict)
    variants: Mapping[str, Sequence[str]] = dataclasses.field(default_factory=dict)
    seeds: Sequence[int] = (0, 1)

    def __post_init__(self):
        validation.check_types(self)
        if not self.seeds:
            raise config.ConfigError("Study.seeds: give at least one seed")
        for name, values in self.grid.items():
            if "." not in name or isinstance(values, str) or not len(values):
                raise config.ConfigError(
                    f"Study.grid[{name!r}]: want 'Class.field': [values], got {values!r}"
                )

    def arms(self) -> list[Arm]:
        names, variants = list(self.grid), self.variants or {"": ()}
        return [
            Arm(variant, tuple(variants[variant]), dict(zip(names, values, strict=True)))
            for variant in variants
            for values in itertools.product(*self.grid.values())
        ]


@dataclasses.dataclass(frozen=True)
class Arm:
    """One setting of a study: a variant's bindings and one value per grid entry."""

    variant: str
    variant_bindings: tuple[str, ...]
    values: Mapping[str, Any]

    @property
    def name(self) -> str:
        """A readable directory name: the variant, then "field=value" pairs."""
        parts = [f"{name.split('.')[-1]}={value}" for name, value in self.values.items()]
        parts = [self.variant] * bool(self.variant) + parts
        return ",".join(parts).replace("/", "_").replace(" ", "") or "base"

    def bindings(self, seed: int) -> list[str]:
        grid = [f"{name} = {value!r}" for name, value in self.values.items()]
        return [*self.variant_bindings, *grid, f"Schedule.distill_seed = {seed}"]


def prefix_dir(root: epath.Path) -> epath.Path:
    """The shared directory of the stages before distillation the current gin config
    defines: named by a hash of `recipe.prefix_bindings`."""
    text = json.dumps(recipe.prefix_bindings(), sort_keys=True)
    return root / f"prefix-{hashlib.sha256(text.encode()).hexdigest()[:10]}"


def run(
    root: epath.PathLike,
    study: Study,
    gin_files: Sequence[str],
    gin_params: Sequence[str],
    title: str,
    restart: bool = False,
) -> list[dict[str, Any]]:
    """Runs (or resumes) every arm x seed and writes the comparison; returns its rows.
    Each run is configured by `gin_files`, then `gin_params`, then the arm's bindings.
    A finished run is reused only when its fingerprint (`recipe.run_bindings`) matches;
    `restart` reruns every run, keeping a shared prefix whose fingerprint matches
    (`recipe.clear_workdir`)."""
    root = paths.as_path(root)
    runs = []
    for arm in study.arms():
        for seed in study.seeds:
            gin.clear_config()
            config.apply_gin(gin_files, [*gin_params, *arm.bindings(seed)])
            workdir, prefix = root / arm.name / f"seed{seed}", prefix_dir(root)
            results = workdir / "results.json"
            if results.exists() and not restart:  # finished before: the study resumes after it
                recipe.check_bindings(workdir / recipe.RUN_FILE, recipe.run_bindings())
                rows = json.loads(results.read_text())
            else:
                name = f"{title}: {arm.name} seed {seed}"
                rows = recipe.run(workdir, title=name, prefix_dir=prefix, restart=restart)
            runs.append({"arm": arm.name, "seed": seed, "prefix": prefix.name, "rows": rows})
    gin.clear_config()
    metric = _primary_metric(gin_files, gin_params)
    table = comparison(runs)
    if reporting.is_main_process():
        write(root, study.name, title, table, runs, metric)
    return table


def _primary_metric(gin_files: Sequence[str], gin_params: Sequence[str]) -> str:
    config.apply_gin(gin_files, gin_params)
    metric = recipe.Task().primary_metric
    gin.clear_config()
    return metric


def _mean_spread(values: Sequence[float]) -> str:
    values = np.asarray(values, np.float64)
    spread = values.std(ddof=1) if len(values) > 1 else 0.0
    return f"{values.mean():.2f} ± {spread:.2f}"


def comparison(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per shared starting point (teacher, student before) and one per arm (the
    distilled student): each numeric metric as "mean ± sample standard deviation" over
    the seeds, with the seed count."""
    rows: list[dict[str, Any]] = []
    for prefix in dict.fromkeys(r["prefix"] for r in runs):
        first = next(r for r in runs if r["prefix"] == prefix)
        for row in first["rows"]:
            if row["model"] != AFTER:
                rows.append({"arm": f"{row['model']} ({prefix})", "seeds": 1, **_metrics(row)})
    for arm in dict.fromkeys(r["arm"] for r in runs):
        finals = [_final(r["rows"]) for r in runs if r["arm"] == arm]
        names = [name for name in _metrics(finals[0]) if name != "num_examples"]
        cells = {name: _mean_spread([f[name] for f in finals]) for name in names}
        rows.append({"arm": arm, "seeds": len(finals), **cells})
    return rows


def _metrics(row: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k not in ("model", "layers")}


def _final(rows: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
    return next(row for row in rows if row["model"] == AFTER)


CURVES = ("distill/overlap_ratio", "distill/overlap_mass_teacher", "distill/overlap_mass_student")


def write(
    root: epath.Path,
    name: str,
    title: str,
    table: Sequence[Mapping[str, Any]],
    runs: Sequence[Mapping[str, Any]],
    metric: str,
) -> None:
    """<name>.md (the table), <name>.json (table and every run's rows), <name>.png (the
    final metric per arm) and <name>_curves.png (diagnostics and validation per run)."""
    stem = root / name
    root.mkdir(parents=True, exist_ok=True)
    markdown = f"# {title}\n\nTest set; mean ± standard deviation over seeds.\n\n"
    stem.with_suffix(".md").write_text(markdown + reporting.results_table(table) + "\n")
    runs_json = json.dumps({"table": table, "runs": list(runs)}, indent=2)
    stem.with_suffix(".json").write_text(runs_json)
    plot(runs, metric, stem.with_suffix(".png"), title)
    records = {
        (r["arm"], r["seed"]): reporting.read_metrics(
            root / r["arm"] / f"seed{r['seed']}" / "logs" / reporting.METRICS_FILE
        )
        for r in runs
    }
    keys = [*CURVES, f"eval/student_{metric}"]
    plot_curves(records, keys, root / f"{name}_curves.png", title)


def plot(runs: Sequence[Mapping[str, Any]], metric: str, out_png: epath.Path, title: str) -> None:
    """The distilled student's `metric` per arm (bar: mean; dots: seeds), with the
    students before distillation as dashed lines."""
    arms = list(dict.fromkeys(r["arm"] for r in runs))
    fig = reporting.figure(1.5 + 1.2 * len(arms), 4)
    ax = fig.subplots()
    for position, arm in enumerate(arms):
        values = [_final(r["rows"])[metric] for r in runs if r["arm"] == arm]
        ax.bar(position, np.mean(values), color="tab:blue", alpha=0.5)
        ax.scatter([position] * len(values), values, color="black", s=12, zorder=3)
    before = {
        row[metric]
        for r in runs
        for row in r["rows"]
        if row["model"] == "student before distillation"
    }
    for value in before:
        ax.axhline(value, color="gray", linestyle="--")
    ax.set_xticks(range(len(arms)), arms, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(metric)
    ax.set_title(title)
    reporting.save_png(fig, out_png)


def plot_curves(
    records: Mapping[tuple[str, int], Sequence[Mapping[str, Any]]],
    keys: Sequence[str],
    out_png: epath.Path,
    title: str,
) -> None:
    """Each key against step, one line per run, a color per arm: the side-by-side view
    of runs that work and runs that do not. Keys no run logged are left out."""
    keys = [k for k in keys if any(k in r for run in records.values() for r in run)]
    arms = list(dict.fromkeys(arm for arm, _ in records))
    colors = {arm: f"C{i % 10}" for i, arm in enumerate(arms)}
    fig = reporting.figure(7, 1 + 2.4 * max(len(keys), 1))
    axes = fig.subplots(max(len(keys), 1), 1, sharex=True, squeeze=False)[:, 0]
    for ax, key in zip(axes, keys, strict=False):
        for (arm, seed), run in records.items():
            if any(key in r for r in run):
                label = arm if seed == min(s for a, s in records if a == arm) else None
                reporting.plot_series(ax, run, key, color=colors[arm], label=label, alpha=0.8)
        ax.set_title(key)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    axes[-1].set_xlabel("step")
    fig.suptitle(title)
    reporting.save_png(fig, out_png)
