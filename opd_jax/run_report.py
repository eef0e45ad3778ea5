"""The run report: what a reader needs to judge or repeat a distillation run, on one page.

`build_checklist` gathers the reporting checklist (models and tokenizers, the prompts
their chat templates render, EOS, sampling and loss temperatures, objective and
estimator, lambda, top-k, lengths, seeds, tokens generated, wall time per phase) from a
run's configs, its models and tokenizers, and what its workdir recorded: the per-step
scalars of metrics.jsonl and the evaluations of evals.json. `write` renders it as
`report.md`, with `diagnostics.png`, a grid of the in-step diagnostics against step, and
the results table when the run has written one.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from etils import epath
from matplotlib import ticker

from opd_jax import data, loop, paths, reporting
from opd_jax import tokenizer as tokenizer_lib
from opd_jax.model import ModelConfig

if TYPE_CHECKING:  # recipe builds the report, so it is imported for its types only
    from opd_jax import distill, fixes, gkd, recipe, train_state, update

REPORT_FILE = "report.md"
DIAGNOSTICS_FILE = "diagnostics.png"
RESULTS_FILE = "results.json"  # written by `reporting.write_results`, beside results.md
PHASES = ("teacher_sft", "student_sft", "cold_start", "distill")  # evaluation apart


def _item(label: str) -> Any:
    """A checklist field and the label the report shows for it (with its gin setting)."""
    return dataclasses.field(metadata={"label": label})


@dataclasses.dataclass(frozen=True)
class Checklist:
    """One field per item a distillation paper should report; `write` renders them all."""

    dataset: str = _item("Dataset (Task.dataset: train / eval / test splits)")
    metric: str = _item("Metric (Task.metric, Task.primary_metric)")
    teacher_model: str = _item("Teacher model (Models.teacher, SelfTeacher)")
    student_model: str = _item("Student model (Models.student, Models.student_layers)")
    teacher_architecture: str = _item("Teacher architecture")
    student_architecture: str = _item("Student architecture")
    student_trained_weights: str = _item("Student's trained weights (Models.use_lora)")
    teacher_tokenizer: str = _item("Teacher tokenizer")
    student_tokenizer: str = _item("Student tokenizer")
    same_tokenizer: bool = _item("Same tokenizer on both sides")
    teacher_eos_id: int | None = _item("Teacher EOS id")
    student_eos_id: int | None = _item("Student EOS id")
    teacher_prompt: str = _item("Teacher prompt by its chat template, example fields by name")
    student_prompt: str = _item("Student prompt by its chat template, example fields by name")
    prompt_len: int = _item("Student prompt length (Schedule.prompt_len)")
    teacher_prompt_len: int = _item("Teacher prompt length (Schedule.teacher_prompt_len)")
    completion_len: int = _item("Completion length (Schedule.completion_len)")
    rollout_temperature: float = _item("Rollout temperature (RolloutSampling.temperature)")
    rollout_top_k: int = _item("Rollout top-k, 0 off (RolloutSampling.top_k)")
    rollout_top_p: float = _item("Rollout top-p, 1 off (RolloutSampling.top_p)")
    loss_temperature: float = _item("Loss temperature (DistillConfig.temperature)")
    divergence: str = _item("Divergence (DistillConfig.divergence)")
    beta: float = _item("JSD beta (DistillConfig.beta)")
    estimator: str = _item("Estimator (DistillConfig.estimator)")
    estimator_top_k: int = _item("Estimator top-k (DistillConfig.top_k)")
    topk_form: str = _item("Student top-k form (DistillConfig.topk_form)")
    rl_alpha: float = _item("Divergence weight with a task reward (DistillConfig.rl_alpha)")
    on_policy_fraction: float = _item("lambda, on-policy fraction (MixtureConfig)")
    lambda_drawn: str = _item("lambda drawn (MixtureConfig.per_example)")
    fixed_source: str = _item("Off-policy completions (MixtureConfig.fixed_source)")
    diagnostic_top_k: int = _item("Diagnostics top-k (DistillConfig.diagnostic_top_k)")
    batch_size: int = _item("Batch size (Schedule.batch_size)")
    steps: int = _item("Distillation steps (Schedule.steps)")
    teacher_sft: str = _item("Teacher fine-tuning (Models.teacher_sft_*)")
    student_sft: str = _item("Student fine-tuning (Models.student_sft_*)")
    cold_start: str = _item("Off-policy cold start on teacher samples (ColdStart)")
    prompt_selection: str = _item("Teacher-aligned prompt selection (PromptSelection)")
    optimizer: str = _item("Optimizer, AdamW with warmup and cosine decay (OptimizerConfig)")
    seed: int = _item("Seed of data order, init and rollouts (Schedule.seed)")
    distill_seed: int | None = _item("Seed of distillation, if apart (Schedule.distill_seed)")
    evaluation: str = _item("Evaluation (Schedule.eval_*, test_examples)")
    completion_tokens: int = _item("Completion tokens trained on, distillation")
    student_sampled_tokens: int = _item("Tokens generated by the student, distillation")
    teacher_sampled_tokens: int = _item("Tokens generated by the teacher, distillation")
    teacher_sft_seconds: float | None = _item("Wall time, teacher fine-tuning (s)")
    student_sft_seconds: float | None = _item("Wall time, student fine-tuning (s)")
    cold_start_seconds: float | None = _item("Wall time, cold start (s)")
    distill_seconds: float | None = _item("Wall time, distillation (s)")
    evaluation_seconds: float | None = _item("Wall time, evaluation (s)")


# ----------------------------------------------------------------------------- pieces


def architecture(config: ModelConfig) -> str:
    return (
        f"{config.family}: {config.n_layers} layers, width {config.d_model}, "
        f"{config.n_heads} heads ({config.n_kv_heads} key/value), MLP {config.mlp_dim}, "
        f"vocabulary {config.vocab_size}"
    )


def tokenizer_kind(tok: tokenizer_lib.Tokenizer) -> str:
    if isinstance(tok.backend, tokenizer_lib.SentencePieceBackend):
        return "sentencepiece"
    return f"tokenizers {type(tok.backend.tokenizer.model).__name__}"


def _tokenizer(source: str | None, tok: tokenizer_lib.Tokenizer) -> str:
    return f"{source}: {tokenizer_kind(tok)}, {tok.vocab_size} tokens"


def _identity(tok: tokenizer_lib.Tokenizer) -> tuple[Any, ...]:
    """Everything that decides a token id or the markup around a prompt."""
    backend = tok.backend
    if isinstance(backend, tokenizer_lib.SentencePieceBackend):
        vocabulary: str | bytes = backend.processor.serialized_model_proto()
    else:
        vocabulary = backend.tokenizer.to_str()
    named = (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos_token, tok.chat_template)
    return (vocabulary, tok.special_ids, *named)


def same_tokenizer(a: tokenizer_lib.Tokenizer, b: tokenizer_lib.Tokenizer) -> bool:
    """Whether two tokenizers give the same ids and render the same chat markup; loaded
    from two sources they can be equal, and one source can be loaded twice."""
    return _identity(a) == _identity(b)


class _Placeholders(dict):
    """Example fields shown by name: any `{field}` of a template renders as `<field>`."""

    def __missing__(self, key: str) -> str:
        return f"<{key}>"


def rendered_prompt(spec: data.BatchSpec, tok: tokenizer_lib.Tokenizer) -> str:
    """The prompt a side sees, through its own chat template, fields left as names."""
    return data.render_prompt(_Placeholders(), spec.template, tok)


def settings(config: Any) -> str:
    """A config dataclass as `name=value` pairs."""
    return ", ".join(f"{f.name}={getattr(config, f.name)}" for f in dataclasses.fields(config))


def _fine_tuning(steps: int, learning_rate: float) -> str:
    return f"steps: {steps}, learning rate {learning_rate:g}" if steps else "none"


def _teacher_model(models: recipe.Models, roles: update.Roles) -> str:
    if roles.self_teacher is None:
        return str(models.teacher)
    return f"the student itself: {settings(roles.self_teacher)}"


def _student_model(models: recipe.Models, layers: Sequence[int] | None) -> str:
    source = models.student or f"{models.teacher} (the teacher's source)"
    return source if layers is None else f"{source}, keeping layers {list(layers)}"


def _evaluation(schedule: recipe.Schedule) -> str:
    count = lambda n: "all" if n is None else str(n)
    return (
        f"greedy; {count(schedule.eval_examples)} validation examples every "
        f"{schedule.eval_every} steps, {count(schedule.test_examples)} test examples"
    )


# ----------------------------------------------------------------------------- recorded


def distill_tokens(records: Sequence[Mapping[str, Any]], fixed_source: str) -> dict[str, int]:
    """Completion tokens of the distillation updates, from each step's
    `distill/num_tokens` (the batch's real completion tokens) and
    `distill/on_policy_fraction` (its share of rows the student sampled):
      completion_tokens       sum of num_tokens;
      student_sampled_tokens  sum of num_tokens x on_policy_fraction;
      teacher_sampled_tokens  the rest, when the off-policy rows are teacher samples
                              (MixtureConfig.fixed_source = "teacher"), else 0.
    Exact when lambda's coin is drawn per step (a step is wholly on- or off-policy);
    with one coin per row, rows are weighed as if equally long. Tokens sampled and then
    not kept (a per-row coin samples every row of both kinds) and evaluation's are not
    counted. `records` are `reporting.read_metrics`'s: a step a resumed run redid counts
    once."""
    steps = [
        (r["distill/num_tokens"], r["distill/on_policy_fraction"])
        for r in records
        if "distill/num_tokens" in r and "distill/on_policy_fraction" in r
    ]
    total = sum(n for n, _ in steps)
    student = sum(n * fraction for n, fraction in steps)
    teacher = total - student if fixed_source == "teacher" else 0.0
    return {
        "completion_tokens": round(total),
        "student_sampled_tokens": round(student),
        "teacher_sampled_tokens": round(teacher),
    }


def phase_seconds(
    stage_dirs: Mapping[str, epath.Path], evals: Mapping[str, Mapping[str, Any]]
) -> dict[str, float | None]:
    """Wall time per phase, disjoint: each loop stage's total over its resumed segments
    (`loop.recorded_seconds` of its directory; validation during distillation not
    included), and evaluation, the sum of every evaluation's `seconds` in `evals`; to a
    tenth of a second. None: a phase that never ran. Read from the stage directories, so
    a run that reuses shared stages (`opd_jax.study`) reports their time too."""
    seconds: dict[str, float | None] = {}
    for phase in PHASES:
        directory = stage_dirs.get(phase)
        ran = directory is not None and (directory / loop.WALL_TIME_FILE).exists()
        seconds[f"{phase}_seconds"] = loop.recorded_seconds(directory) if ran else None
    timed = [e["seconds"] for e in evals.values() if "seconds" in e]
    seconds["evaluation_seconds"] = sum(timed) if timed else None
    return {name: None if value is None else round(value, 1) for name, value in seconds.items()}


# ----------------------------------------------------------------------------- builder


def build_checklist(
    *,
    task: recipe.Task,
    models: recipe.Models,
    schedule: recipe.Schedule,
    rollout: recipe.RolloutSampling,
    objective: distill.DistillConfig,
    mixture: gkd.MixtureConfig,
    optim: train_state.OptimizerConfig,
    cold: fixes.ColdStart,
    selection: fixes.PromptSelection,
    roles: update.Roles,
    student_layers: Sequence[int] | None,
    spec: data.BatchSpec,
    teacher_spec: data.BatchSpec,
    tokenizer: tokenizer_lib.Tokenizer,
    teacher_tokenizer: tokenizer_lib.Tokenizer,
    records: Sequence[Mapping[str, Any]],
    evals: Mapping[str, Mapping[str, Any]],
    stage_dirs: Mapping[str, epath.Path],
) -> Checklist:
    """The checklist of a run from what `recipe.run` holds: its configs, the roles (model
    architectures, self-teacher, LoRA), the student's kept layers, the student's and the
    teacher's batch specs and tokenizers, and at its end `reporting.read_metrics` of
    logs/metrics.jsonl, the evaluations (evals.json) and each stage's directory."""
    student_source = models.student or models.teacher
    return Checklist(
        dataset=f"{task.dataset}: {task.train_split} / {task.eval_split} / {task.test_split}",
        metric=f"{task.metric}, primary {task.primary_metric}",
        teacher_model=_teacher_model(models, roles),
        student_model=_student_model(models, student_layers),
        teacher_architecture=architecture(roles.teacher),
        student_architecture=architecture(roles.student),
        student_trained_weights="all" if roles.lora is None else f"LoRA: {settings(roles.lora)}",
        teacher_tokenizer=_tokenizer(models.teacher or student_source, teacher_tokenizer),
        student_tokenizer=_tokenizer(student_source, tokenizer),
        same_tokenizer=same_tokenizer(tokenizer, teacher_tokenizer),
        teacher_eos_id=teacher_tokenizer.eos_id,
        student_eos_id=tokenizer.eos_id,
        teacher_prompt=rendered_prompt(teacher_spec, teacher_tokenizer),
        student_prompt=rendered_prompt(spec, tokenizer),
        prompt_len=spec.prompt_len,
        teacher_prompt_len=teacher_spec.prompt_len,
        completion_len=spec.target_len,
        rollout_temperature=rollout.temperature,
        rollout_top_k=rollout.top_k,
        rollout_top_p=rollout.top_p,
        loss_temperature=objective.temperature,
        divergence=objective.divergence,
        beta=objective.beta,
        estimator=objective.estimator,
        estimator_top_k=objective.top_k,
        topk_form=objective.topk_form,
        rl_alpha=objective.rl_alpha,
        on_policy_fraction=mixture.on_policy_fraction,
        lambda_drawn="per row" if mixture.per_example else "per step",
        fixed_source=mixture.fixed_source,
        diagnostic_top_k=objective.diagnostic_top_k,
        batch_size=schedule.batch_size,
        steps=schedule.steps,
        teacher_sft=_fine_tuning(models.teacher_sft_steps, models.teacher_sft_learning_rate),
        student_sft=_fine_tuning(models.student_sft_steps, models.student_sft_learning_rate),
        cold_start=settings(cold) if cold.steps else "none",
        prompt_selection=settings(selection) if selection.candidates else "none",
        optimizer=settings(optim),
        seed=schedule.seed,
        distill_seed=schedule.distill_seed,
        evaluation=_evaluation(schedule),
        **distill_tokens(records, mixture.fixed_source),
        **phase_seconds(stage_dirs, evals),
    )


# ----------------------------------------------------------------------------- markdown


def render_value(value: Any) -> str:
    """A checklist value as the report shows it."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def checklist_markdown(checklist: Checklist) -> str:
    """A table of every field; a value of several lines (a rendered prompt) follows the
    table in a code block of its own, where its chat markup shows as written."""
    rows, blocks = [], []
    for field in dataclasses.fields(checklist):
        label, text = field.metadata["label"], render_value(getattr(checklist, field.name))
        if "\n" in text:
            rows.append({"item": label, "value": "below"})
            blocks += [f"### {label}", reporting.fenced(text)]
        else:
            rows.append({"item": label, "value": text})
    return "\n\n".join([reporting.results_table(rows), *blocks])


# ----------------------------------------------------------------------------- diagnostics


@dataclasses.dataclass(frozen=True)
class Panel:
    title: str
    keys: tuple[str, ...]


_THIRDS = ("first", "middle", "last")
# The in-step diagnostics (README: "Is distillation working?"), then validation scores.
DIAGNOSTIC_PANELS = (
    Panel("top-k overlap ratio", ("distill/overlap_ratio",)),
    Panel(
        "mass on the shared top-k", ("distill/overlap_mass_teacher", "distill/overlap_mass_student")
    ),
    Panel("entropy gap, teacher - student", ("distill/entropy_gap",)),
    Panel("divergence by third", tuple(f"distill/divergence_{t}_third" for t in _THIRDS)),
    Panel(
        "reward log p - log q, sampled tokens",
        ("distill/reward_on_overlap", "distill/reward_off_overlap"),
    ),
    Panel("sampler vs learner log-prob gap", ("distill/logprob_mismatch",)),
    Panel("divergence and loss", ("distill/divergence", "distill/loss")),
)
EVAL_PREFIX = "eval/student_"


def diagnostic_panels(records: Sequence[Mapping[str, Any]]) -> list[Panel]:
    """The panels `records` can draw: `DIAGNOSTIC_PANELS`, then the student's validation
    scores (every `eval/student_*`); series never logged are left out, empty panels too."""
    logged = {key for r in records for key in r}
    scores = tuple(sorted(key for key in logged if key.startswith(EVAL_PREFIX)))
    panels = [*DIAGNOSTIC_PANELS, Panel("validation, student", scores)]
    kept = [Panel(p.title, tuple(k for k in p.keys if k in logged)) for p in panels]
    return [p for p in kept if p.keys]


def plot_diagnostics(
    records: Sequence[Mapping[str, Any]], out_png: epath.PathLike, columns: int = 3
) -> list[Panel]:
    """A grid of small plots against step, one per panel; returns the panels drawn (none,
    and no file, when nothing was logged)."""
    panels = diagnostic_panels(records)
    if not panels:
        return []
    columns = min(columns, len(panels))
    rows = math.ceil(len(panels) / columns)
    fig = reporting.figure(4.2 * columns, 0.6 + 2.8 * rows)
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax, panel in zip(axes, panels, strict=False):
        for key in panel.keys:
            reporting.plot_series(ax, records, key, label=key.split("/", 1)[-1])
        ax.set_title(panel.title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if len(panel.keys) > 1:
            ax.legend(fontsize=7)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle("In-step diagnostics")
    reporting.save_png(fig, out_png)
    return panels


def diagnostics_markdown(panels: Sequence[Panel]) -> str:
    if not panels:
        return "No in-step diagnostics were logged."
    listing = "\n".join(f"- {p.title}: {', '.join(p.keys)}" for p in panels)
    return f"![In-step diagnostics]({DIAGNOSTICS_FILE})\n\n{listing}"


# ----------------------------------------------------------------------------- write


def write(
    workdir: epath.PathLike, checklist: Checklist, records: Sequence[Mapping[str, Any]]
) -> epath.Path:
    """Writes `report.md` (the checklist, the diagnostics, the test results when
    results.json exists) and `diagnostics.png` in `workdir`; returns the markdown path."""
    workdir = paths.as_path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    panels = plot_diagnostics(records, workdir / DIAGNOSTICS_FILE)
    sections = ["# Run report", "## Checklist", checklist_markdown(checklist)]
    sections += ["## Diagnostics", diagnostics_markdown(panels)]
    results = workdir / RESULTS_FILE
    if results.exists():
        rows = json.loads(results.read_text(encoding="utf-8"))
        sections += [
            "## Results",
            "Test set; samples in results.md.",
            reporting.results_table(rows),
        ]
    markdown = workdir / REPORT_FILE
    markdown.write_text("\n\n".join(sections) + "\n", encoding="utf-8")
    return markdown
