"""One run of any on-policy distillation recipe, end to end: models, stages, evaluation.

GKD (a separate teacher, often fine-tuned first, teaching a smaller student) and OPSD
(the student teaching itself from a privileged context) are configs of this one loop:
  1. teacher_sft (optional, separate teacher only): fine-tune the teacher on the targets.
  2. student_sft (optional): fine-tune the student's full weights on the targets.
  3. cold_start (optional, `fixes.ColdStart`): fine-tune the student on teacher samples.
  4. prompt selection (optional, `fixes.PromptSelection`): keep the training prompts on
     which teacher and student agree best.
  5. distill: rollout by the GKD mixture, then the update (`update`), with validation
     every `eval_every` steps and an optional task reward.
Each stage resumes from its own checkpoints. Stages 1-4 live in a prefix directory (the
workdir, or one that runs configured alike share: `prefix_bindings`, `opd_jax.study`).
The workdir, local or remote (`gs://`, `opd_jax.paths`), records what defines the run in
run.json (`run_bindings`); a rerun with other settings is refused unless `--restart`
removes what the earlier run wrote (`clear_workdir`).
Test-set scores of the teacher (in its own, possibly privileged, context), the student
before distillation and after it go to a results table (markdown + JSON) and a plot of
the metric and the exact divergence against step; report.md and diagnostics.png
(`run_report`) hold the reporting checklist and the in-step diagnostics.
`python -m opd_jax.export WORKDIR OUT` turns the student into a Hugging Face directory.
The same path runs on one device, a mesh and several hosts.

Every setting is a gin parameter of `Task`, `Models`, `Schedule`, `RolloutSampling`,
`DistillConfig`, `OptimizerConfig`, `MixtureConfig`, `ColdStart`, `PromptSelection`,
`SelfTeacher`, `PrivilegedContext`, `LoraConfig`, `Layout` or `make_mesh`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from opd_jax import (
    assets,
    checkpoints,
    config,
    data,
    distill,
    evaluation,
    export,
    fixes,
    gkd,
    loop,
    lora,
    mesh,
    model,
    opsd,
    paths,
    reporting,
    run_report,
    sampling,
    train_state,
    update,
    validation,
)
from opd_jax import probe as probe_lib
from opd_jax import tokenizer as tokenizer_lib
from opd_jax.model import ModelConfig, Params

CUT_POLICIES = ("warn", "refuse")
PARAM_DTYPES = ("float32", "bfloat16")  # what Models.dtype may be


@gin.configurable
@dataclasses.dataclass(frozen=True)
class Task:
    """The dataset, its prompt and how outputs are scored.

    dataset: a TFDS name ("aclsum", "gsm_symbolic/chain_sum", or any prepared dataset with
      `input_key` / `target_key`), or the user's own data files (`datasets.user_files`):
      a path (.jsonl, .json, .csv, .parquet file, glob, folder, or a `datasets`
      save_to_disk folder), whose rows are the split "train" (slice it into the others:
      "train[:80%]"), or {split: path}. Files name their columns in `input_key` /
      `target_key`, or hold chat conversations in `messages_key`: a list of
      {role, content} whose final assistant turn is the target, the user turn before it
      the input, and the turns before that the prompt's history.
    metric: a kind ("summarization": ROUGE and repetition; "math": exact match of the
      `####` answer; "exact_match": of the whole text; "rouge"; "bleu" and "chrf" by
      sacrebleu) or "module:function", the user's own (`evaluation.resolve_metric`);
      `primary_metric` is the one reported, plotted and, when RL is on, used as the
      reward (divided by 100).
    instruction: the user turn, with `{input}` where the example goes; None takes the
      dataset's default prompt, or for a conversation its own user turn.
    """

    dataset: str | dict[str, str] = "aclsum"
    train_split: str = "train"
    eval_split: str = "validation"
    test_split: str = "test"
    input_key: str | None = None
    target_key: str | None = None
    messages_key: str | None = None
    metric: str = "summarization"
    primary_metric: str = "rougeL"
    instruction: str | None = None
    system: str | None = None
    data_dir: str | None = None

    def __post_init__(self):
        validation.check_types(self)
        try:  # a bad name or import path fails at start-up, naming the binding
            evaluation.resolve_metric(self.metric)
        except config.ConfigError as err:
            raise config.ConfigError(f"Task.metric: {err}") from None

    def template(self) -> data.PromptTemplate:
        if self.messages_key is not None:
            instruction = self.instruction or "{input}"
            return data.PromptTemplate(instruction, self.system, conversation=True)
        if self.instruction is None:
            default = data.default_template(self.dataset)
            if default is None:
                raise config.ConfigError(
                    f"Task.instruction: dataset {self.dataset!r} has no default prompt; set one "
                    "with {input} where the example goes"
                )
            return dataclasses.replace(default, system=self.system or default.system)
        return data.PromptTemplate(self.instruction, self.system)

    def splits(self) -> dict[str, data.Split]:
        """The "train", "eval" and "test" splits."""
        named = {"train": self.train_split, "eval": self.eval_split, "test": self.test_split}
        where = (self.data_dir, self.input_key, self.target_key, self.messages_key)
        return {name: data.load_split(self.dataset, split, *where) for name, split in named.items()}

    def reward(self, text: str, example: Mapping[str, Any]) -> float:
        """The primary metric of one completion, in [0, 1]."""
        metric = evaluation.resolve_metric(self.metric)
        return metric([text], [example])[self.primary_metric] / 100.0


@gin.configurable
@dataclasses.dataclass(frozen=True)
class Models:
    """Who teaches whom. Each model is a packaged preset name, an HF directory or a GGUF.

    teacher: a separate teacher model, or None for self-distillation: the student teaches
      itself (`SelfTeacher` says with which weights, `PrivilegedContext` what it sees).
    student: the student's model; None starts it from the teacher's weights.
    student_layers: the layers of that source (the student's model, else the teacher's)
      the student keeps: a count of evenly spaced layers, a tuple of layer indices, or
      None for all of them. A layer-pruned copy of the teacher is the usual GKD student.
    use_lora: train LoRA adapters (`LoraConfig`) on the student instead of every weight.
    dtype: "float32" or "bfloat16", the dtype both models' weights are loaded in. Weights
      that are trained are trained through a float32 copy (the train state's, and LoRA
      adapters are float32), so bfloat16 halves the frozen weights: the teacher, the
      LoRA base, a fixed self-teacher. A model a fine-tuning stage trains leaves it in
      float32.
    The fine-tuning learning rates are separate because a pruned student needs large
    steps to repair itself, which would wreck a full pretrained teacher.
    """

    teacher: str | None = "smollm2-135m-instruct"
    student: str | None = None
    student_layers: int | tuple[int, ...] | None = None
    use_lora: bool = False
    dtype: str = "float32"
    teacher_sft_steps: int = 0
    student_sft_steps: int = 30
    teacher_sft_learning_rate: float = 1e-4
    student_sft_learning_rate: float = 1e-4

    def __post_init__(self):
        check = functools.partial(validation.check_fields, self)
        check(validation.check_int, "teacher_sft_steps", "student_sft_steps", minimum=0)
        learning_rates = ("teacher_sft_learning_rate", "student_sft_learning_rate")
        check(validation.check_number, *learning_rates, low=0, open_low=True)
        validation.check_types(self)
        layers = self.student_layers
        if isinstance(layers, int):
            validation.check_int("Models.student_layers", layers, minimum=1)
        elif layers is not None and (not layers or min(layers) < 0):
            raise config.ConfigError(
                f"Models.student_layers={layers!r} must hold one or more layer indices >= 0"
            )
        if self.teacher is None and self.student is None:
            raise config.ConfigError(
                "Models.student: self-distillation (Models.teacher = None) needs the student's model"
            )
        if self.teacher is None and self.teacher_sft_steps:
            raise config.ConfigError(
                "Models.teacher_sft_steps: a self-distilling student has no separate teacher "
                "to fine-tune; use Models.student_sft_steps"
            )
        if self.dtype not in PARAM_DTYPES:
            raise config.ConfigError(f"Models.dtype={self.dtype!r} is not one of {PARAM_DTYPES}")

    def kept_layers(self, n_layers: int) -> tuple[int, ...] | None:
        """The layers of a source model of `n_layers` the student keeps (None: all)."""
        layers = self.student_layers
        if layers is None:
            return None
        count = isinstance(layers, int)  # else layer indices
        if (layers > n_layers) if count else (max(layers) >= n_layers):
            raise config.ConfigError(
                f"Models.student_layers={layers!r}: the student's source model has {n_layers} "
                f"layers (indices 0..{n_layers - 1})"
            )
        return model.evenly_spaced_layers(n_layers, layers) if count else layers


@gin.configurable
@dataclasses.dataclass(frozen=True)
class Schedule:
    """Sizes and cadence.

    prompt_len / teacher_prompt_len: the width of the student's prompts and of the
      teacher's contexts (None: the student's width; a privileged context needs more).
    cut_prompts: what a prompt longer than its width does: "warn" (its input is cut, as
      a long document may be) or "refuse" (a math question or a privileged context must
      not lose its end; the error names the width to set).
    eval_examples: validation examples scored every `eval_every` distillation steps;
      test_examples: test examples in the final table (None: all).
    rl_group_size: completions per prompt when a task reward is combined
      (DistillConfig.rl_alpha < 1).
    seed: the seed of every stage's batch order and sampling; distill_seed, when set,
      replaces it for the distillation stage alone, so runs that differ only in it
      share their fine-tuned starting point (`experiments.study` varies it).
    """

    steps: int = 40
    batch_size: int = 4
    prompt_len: int = 128
    teacher_prompt_len: int | None = None
    completion_len: int = 64
    cut_prompts: str = "warn"
    checkpoint_every: int = 10
    eval_every: int = 20
    eval_examples: int | None = 24
    test_examples: int | None = 50
    eval_batch_size: int = 8
    rl_group_size: int = 1
    seed: int = 0
    distill_seed: int | None = None

    def __post_init__(self):
        check = functools.partial(validation.check_fields, self)
        sizes = ("steps", "batch_size", "prompt_len", "completion_len", "rl_group_size")
        cadences = ("checkpoint_every", "eval_every", "eval_batch_size")
        check(validation.check_int, *sizes, *cadences, minimum=1)
        optional = ("teacher_prompt_len", "eval_examples", "test_examples")
        check(validation.check_int, *optional, minimum=1, or_none=True)
        check(validation.check_int, "seed", minimum=0)
        check(validation.check_int, "distill_seed", minimum=0, or_none=True)
        check(validation.check_choice, "cut_prompts", choices=CUT_POLICIES)
        validation.check_types(self)

    def seed_of(self, stage: str) -> int:
        if stage == "distill" and self.distill_seed is not None:
            return self.distill_seed
        return self.seed


@gin.configurable
@dataclasses.dataclass(frozen=True)
class RolloutSampling:
    """How on-policy (and sequence-KD) completions are sampled; evaluation is greedy."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        check = functools.partial(validation.check_fields, self)
        check(validation.check_number, "temperature", low=0)
        check(validation.check_int, "top_k", minimum=0)
        check(validation.check_number, "top_p", low=0, high=1, open_low=True)
        validation.check_types(self)


# ----------------------------------------------------------------------------- start-up


@dataclasses.dataclass(frozen=True)
class LoadedModels:
    """The teacher's params are None when the student teaches itself; `student_layers`
    are the source's layers the student kept (None when loaded whole)."""

    teacher_config: ModelConfig
    teacher_params: Params | None
    student_config: ModelConfig
    student_params: Params
    student_layers: tuple[int, ...] | None


def check_model_sources(models: Models) -> None:
    """Refuses a model that is not there, named as the binding that gave it, before a
    tokenizer is looked for in it."""
    for field in ("teacher", "student"):
        spec = getattr(models, field)
        if spec is not None and not checkpoints.is_source(spec):
            packaged = ", ".join(sorted(assets.PACKAGED_CHECKPOINTS))
            raise config.ConfigError(
                f"Models.{field}: {spec} is not a packaged model name ({packaged}), a "
                "checkpoint directory (with config.json) or a GGUF file"
            )


def load_models(
    models: Models,
    placement: mesh.Placement | None = None,
    teacher_placement: mesh.Placement | None = None,
) -> LoadedModels:
    """Both models in `Models.dtype`, each built tensor by tensor straight into its
    placement's param shardings when given, else whole on the default device. The student
    reads only the layers it keeps; cut from its teacher's checkpoint whole and placed
    alike, it shares the teacher's arrays."""
    source = models.student if models.student is not None else models.teacher
    shardings = lambda where: None if where is None else where.params
    teacher_params = None
    with checkpoints.opened(source) as checkpoint:
        keep = models.kept_layers(checkpoint.config.n_layers)
        student_config, student_params = checkpoint.params(models.dtype, keep, shardings(placement))
        teacher_config = student_config
        if models.teacher is not None and models.student is None:
            if keep is None and teacher_placement == placement:
                teacher_params = student_params
            else:
                teacher_config, teacher_params = checkpoint.params(
                    models.dtype, shardings=shardings(teacher_placement)
                )
    if models.teacher is not None and models.student is not None:
        teacher_config, teacher_params = checkpoints.load(
            models.teacher, models.dtype, shardings=shardings(teacher_placement)
        )
    return LoadedModels(teacher_config, teacher_params, student_config, student_params, keep)


def check_schedule(
    schedule: Schedule, group: int, grad_accum: int, device_mesh: jax.sharding.Mesh
) -> None:
    """`group`: completions per prompt (the RL group, or 1)."""
    if schedule.batch_size % (group * grad_accum):
        raise config.ConfigError(
            f"Schedule.batch_size={schedule.batch_size} must be a multiple of "
            f"rl_group_size x grad_accum = {group} x {grad_accum}"
        )
    shards = mesh.batch_shards(device_mesh)
    if schedule.batch_size % (shards * group) or schedule.eval_batch_size % shards:
        raise config.ConfigError(
            f"Schedule.batch_size={schedule.batch_size} must be a multiple of data x fsdp x "
            f"rl_group_size = {shards} x {group}, and Schedule.eval_batch_size="
            f"{schedule.eval_batch_size} of data x fsdp = {shards} "
            f"(mesh {dict(device_mesh.shape)})"
        )


class PromptCutError(config.ConfigError):
    """A rendered prompt is longer than its width and Schedule.cut_prompts = "refuse"."""


def check_prompt_lengths(
    splits: Mapping[str, data.Split],
    spec: data.BatchSpec,
    teacher_spec: data.BatchSpec,
    tokenizer: tokenizer_lib.Tokenizer,
    policy: str,
) -> None:
    """One prompt-length policy for every prompt a run renders: a cut prompt loses the end
    of its input, harmless for a long document, fatal for a math question or a privileged
    context."""
    widths = {"student": (spec, "Schedule.prompt_len")}
    if teacher_spec != spec:  # another template or width
        widths["teacher"] = (teacher_spec, "Schedule.teacher_prompt_len")
    for who, (checked, setting) in widths.items():
        template, width = checked.template, checked.prompt_len
        for name, split in splits.items():
            cut, looked_at, longest = data.count_cut_prompts(split, template, tokenizer, width)
            if not cut:
                continue
            message = (
                f"{cut} of the first {looked_at} {name} {who} prompts are longer than "
                f"{setting}={width} (longest {longest} tokens)"
            )
            if policy == "refuse":
                raise PromptCutError(f"{message}; set {setting} >= {longest}")
            logging.warning("%s: the end of their input is cut", message)


# ----------------------------------------------------------------------------- run

# Schedule fields only the distillation stage reads: runs that differ in them alone share
# the stages before it (and those stages' evaluations).
DISTILL_ONLY_SCHEDULE = (
    "steps",
    "checkpoint_every",
    "eval_every",
    "distill_seed",
    "rl_group_size",
    "cut_prompts",
)
# Settings that leave every result as it is (memory, speed, cadence of saves, a policy
# that only warns or refuses); a resumed run may change them.
NOT_RESULTS = (
    "Schedule.checkpoint_every",
    "Schedule.cut_prompts",
    "DistillConfig.vocab_chunk",
    "DistillConfig.remat",
    "OptimizerConfig.grad_accum",
)
PREFIX_FILE = "prefix.json"
RUN_FILE = "run.json"
# Evaluations of models the stages before distillation define, kept beside those stages.
PREFIX_MODELS = ("teacher", "student_start")
# What a run writes: in its workdir, and in its prefix directory (`clear_workdir` removes them).
RUN_OUTPUTS = (
    "distill", "logs", "evals.json", RUN_FILE, "operative_config.gin", export.MANIFEST_FILE,
    "results.md", run_report.RESULTS_FILE, "curves.png", run_report.REPORT_FILE,
    run_report.DIAGNOSTICS_FILE,
)  # fmt: skip
PREFIX_OUTPUTS = (
    "teacher_sft", "student_sft", "cold_start", "prompt_selection.json", "evals.json",
    PREFIX_FILE,
)  # fmt: skip


def _bindings(configs: list[Any], leave_out: Callable[[str], bool]) -> dict[str, Any]:
    """{"Class.field": value} of every field of `configs` but those left out, as JSON
    reads them back."""
    bindings = {
        f"{type(cfg).__name__}.{field.name}": getattr(cfg, field.name)
        for cfg in configs
        for field in dataclasses.fields(cfg)
    }
    kept = {name: value for name, value in bindings.items() if not leave_out(name)}
    return json.loads(json.dumps(kept, default=str))


def prefix_bindings() -> dict[str, Any]:
    """What the stages before distillation and their evaluations depend on, read from gin
    as {"Class.field": value}: runs with equal bindings can share those stages."""
    configs = [Task(), Models(), Schedule(), opsd.PrivilegedContext(), fixes.ColdStart()]
    selection = fixes.PromptSelection()
    configs.append(selection)
    if selection.candidates:  # scored on the student's rollouts by the top-k overlap
        configs.append(RolloutSampling())
    schedule_only = tuple(f"Schedule.{name}" for name in DISTILL_ONLY_SCHEDULE)
    bindings = _bindings(configs, lambda name: name in schedule_only)
    if selection.candidates:
        bindings["DistillConfig.diagnostic_top_k"] = distill.DistillConfig().diagnostic_top_k
    return bindings


def run_bindings() -> dict[str, Any]:
    """What the distillation stage and every result of a run depend on: the prefix's
    bindings, the objective, rollouts, optimizer and the schedule's distillation fields."""
    models = Models()
    configs = [
        Schedule(), distill.DistillConfig(), gkd.MixtureConfig(), RolloutSampling(),
        train_state.OptimizerConfig(), probe_lib.TeacherProbe(),
    ]  # fmt: skip
    if models.use_lora:
        configs.append(lora.LoraConfig())
    if models.teacher is None:
        configs.append(opsd.SelfTeacher())
    return {**prefix_bindings(), **_bindings(configs, lambda name: name in NOT_RESULTS)}


def first_difference(saved: Mapping[str, Any], bindings: Mapping[str, Any]) -> str | None:
    """The first binding (in name order) whose value differs; one missing on a side reads
    as None."""
    names = sorted(set(saved) | set(bindings))
    return next((name for name in names if saved.get(name) != bindings.get(name)), None)


def saved_bindings(path: epath.Path) -> dict[str, Any] | None:
    """A directory's fingerprint, None before its first run."""
    return json.loads(path.read_text()) if path.exists() else None


def check_bindings(path: epath.Path, bindings: Mapping[str, Any]) -> None:
    """Refuses a directory whose fingerprint `path` records other settings, in one line
    naming the first binding that differs; nothing is written."""
    saved = saved_bindings(path)
    name = None if saved is None else first_difference(saved, bindings)
    if name is not None:
        raise config.ConfigError(
            f"{path.parent} holds a run with {name}={saved.get(name)!r}, not "
            f"{bindings.get(name)!r}; use another --workdir, or --restart to start over"
        )


def record_bindings(path: epath.Path, bindings: Mapping[str, Any]) -> None:
    """Writes a fresh directory's fingerprint (process 0); a checked one stays as it is."""
    if reporting.is_main_process() and not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(bindings, indent=2, sort_keys=True))


def remove_outputs(directory: epath.Path, names: Sequence[str]) -> None:
    """Removes the named files and folders a run wrote in `directory` (process 0), and
    nothing else a user keeps there."""
    if not reporting.is_main_process():
        return
    for name in names:
        path = directory / name
        if path.is_dir():
            path.rmtree()
        elif path.exists():
            path.unlink()


def clear_workdir(workdir: epath.Path, prefix_dir: epath.Path) -> None:
    """`--restart`: the run's outputs go; so do the prefix stages when they live in the
    workdir, or when a shared prefix directory was run with other settings (one that
    matches is kept: its stages are what this run would make again)."""
    remove_outputs(workdir, RUN_OUTPUTS)
    saved = saved_bindings(prefix_dir / PREFIX_FILE)
    shared_match = saved is not None and first_difference(saved, prefix_bindings()) is None
    if prefix_dir == workdir or not shared_match:
        remove_outputs(prefix_dir, PREFIX_OUTPUTS)


def read_evals(directory: epath.Path) -> dict[str, Any]:
    path = directory / "evals.json"
    return json.loads(path.read_text()) if path.exists() else {}


BatchFn = Callable[[train_state.TrainState, int], train_state.DistillBatch]


@dataclasses.dataclass(frozen=True)
class Run:
    """What the stages of one run share, built once its start-up checks have passed.

    The stages before distillation, and the evaluations of the models they make, live in
    `prefix_dir`: the workdir itself, or a directory several runs share (`experiments.study`).
    """

    workdir: epath.Path
    prefix_dir: epath.Path
    task: Task
    models: Models
    schedule: Schedule
    tokenizer: tokenizer_lib.Tokenizer
    splits: Mapping[str, data.Split]
    spec: data.BatchSpec  # how the student's prompts and targets are built
    teacher_spec: data.BatchSpec  # and the teacher's (possibly privileged) contexts
    placement: mesh.Placement
    writer: reporting.MetricsWriter
    # evals.json of each directory, so a resumed run does not redo an evaluation
    evals: Mapping[epath.Path, dict[str, Any]]

    def decode(self, tokens_BxN: np.ndarray, lengths_B: np.ndarray) -> list[str]:
        rows = zip(tokens_BxN, lengths_B, strict=True)
        return [self.tokenizer.decode(row[:length].tolist()).strip() for row, length in rows]

    def batch(
        self, step: int, seed: int, repeat: int = 1
    ) -> tuple[data.Batch, tuple[jax.Array, ...]]:
        """The step's training batch of Schedule.batch_size rows, each prompt repeated
        `repeat` times, as global arrays (prompt, prompt_valid, target, target_mask,
        teacher_prompt, teacher_prompt_valid); this process builds only its own rows, and
        the host-side `Batch` it returns holds just those."""
        global_rows = self.schedule.batch_size
        spec = dataclasses.replace(self.spec, batch_size=global_rows // repeat)
        rows = mesh.process_rows(self.placement.mesh, global_rows)
        own = slice(rows.start // repeat, rows.stop // repeat)
        batch = data.batch_at(self.splits["train"], self.tokenizer, spec, seed, step, own)
        mask = batch.target_valid_BxN.astype(np.float32)
        local = [batch.prompt_BxP, batch.prompt_valid_BxP, batch.target_BxN, mask]
        local += data.make_batch(batch.examples, self.tokenizer, self.teacher_spec)[:2]
        repeated = tuple(np.repeat(a, repeat, axis=0) for a in local)
        return batch, mesh.global_batch(repeated, self.placement.mesh, global_rows)

    def rewards(
        self, completions: train_state.DistillBatch, examples: list[dict[str, Any]]
    ) -> np.ndarray:
        """The task score in [0, 1] of this process's rows of `completions`."""
        tokens = mesh.local_rows(completions.completion_BxN)
        lengths = mesh.local_rows(completions.completion_mask_BxN).sum(axis=1)
        texts = self.decode(tokens, lengths.astype(int))
        scored = zip(texts, examples, strict=True)
        return np.array([self.task.reward(t, e) for t, e in scored], np.float32)

    def fine_tune(
        self,
        stage: str,
        steps: int,
        learning_rate: float,
        params: Params,
        model_config: ModelConfig,
        params_sharding: Any,
        completions: Callable[[mesh.StepShardings], BatchFn] | None = None,
    ) -> Params:
        """Supervised fine-tuning for `steps` (a stage before distillation): on the targets,
        or on what `completions(shardings)` makes per step; returns `params` unchanged for
        0 steps. The params (placed in `params_sharding`) keep their layout."""
        if steps == 0:
            return params
        optim = train_state.OptimizerConfig(learning_rate=learning_rate, warmup_steps=min(5, steps))
        optimizer = train_state.make_optimizer(optim, steps)
        roles = update.Roles(model_config, model_config)
        seed = self.schedule.seed_of(stage)
        state = update.create_state(roles, params, optimizer, seed, params_sharding)
        shardings = update.step_shardings(state, None, self.placement)
        remat = distill.DistillConfig().remat
        sft_step = distill.make_sft_step(
            model_config, optim.grad_accum, optimizer, shardings, remat
        )

        def targets(state, step):
            return train_state.DistillBatch(*self.batch(step, seed)[1][:4])

        batch_of = targets if completions is None else completions(shardings)
        step_fn = lambda state, step: sft_step(state, None, batch_of(state, step))
        every = self.schedule.checkpoint_every
        stage_spec = loop.Stage(stage, self.prefix_dir / stage, steps, every, model_config)
        return loop.run(stage_spec, state, step_fn, self.writer).params

    def sampler(self, **settings: Any) -> sampling.SamplingConfig:
        """The sampler's settings for completions of Schedule.completion_len: greedy, as
        evaluation is, unless `settings` (temperature, top_k, top_p) say otherwise; only
        the tokenizer's ids are drawn, whatever padding the embedding table has."""
        tokens = {"eos_ids": self.tokenizer.eos_id, "pad_id": self.tokenizer.pad_id}
        tokens["vocab_size"] = self.tokenizer.vocab_size
        settings = {"temperature": 0.0, **settings, **tokens}
        return sampling.SamplingConfig(self.schedule.completion_len, **settings)

    def score(
        self, key: str, params: Params, model_config: ModelConfig, spec: data.BatchSpec
    ) -> dict[str, Any]:
        """Greedy evaluation of a model on `key` = "<model>/<split>[/<step>]", kept in the
        evals.json of the directory of the stage that made the model; a validation score
        is logged as eval/<teacher|student>_<metric> at its step (0 if none). Every
        process passes the same prompts to the jitted sampler and gets every completion
        back."""
        name, split, *step = key.split("/")
        directory = self.prefix_dir if name in PREFIX_MODELS else self.workdir
        evals = self.evals[directory]
        if key not in evals:
            evals[key] = self._evaluate(split, params, model_config, spec)
            if reporting.is_main_process():
                (directory / "evals.json").write_text(json.dumps(evals, indent=2))
        if split == "eval":
            who = "teacher" if name == "teacher" else "student"
            scalars = {f"eval/{who}_{k}": v for k, v in evals[key]["metrics"].items()}
            self.writer.write(int(step[0]) if step else 0, scalars)
        return evals[key]

    def greedy(self, params: Params, model_config: ModelConfig) -> probe_lib.Generate:
        """Greedy completions of host prompts, every one back on every process."""

        def generate(prompt_BxP: np.ndarray, valid_BxP: np.ndarray):
            rng = jax.random.key(0)
            samples = sampling.generate(
                params, prompt_BxP, valid_BxP, rng, model_config, self.sampler(), self.placement
            )
            samples = mesh.to_host(samples)
            return samples.tokens_BxN, samples.lengths_B

        return generate

    def probe_teacher(
        self,
        step: int,
        settings: probe_lib.TeacherProbe,
        student: tuple[Params, ModelConfig],
        teacher: tuple[Params, ModelConfig],
    ) -> None:
        """`probe_lib.probe` on the first validation examples at this step, kept in
        evals.json and logged as probe/teacher_from_student_<percent>_<metric>."""
        key, evals = f"probe/{step}", self.evals[self.workdir]
        if key not in evals:
            size = self.schedule.eval_batch_size
            specs = [
                dataclasses.replace(s, batch_size=size, shuffle=False)
                for s in (self.spec, self.teacher_spec)
            ]
            split = self.splits["eval"]
            examples = [split[i] for i in range(min(settings.examples, len(split)))]
            scores = probe_lib.probe(
                self.greedy(*student), self.greedy(*teacher), examples, self.tokenizer, *specs,
                settings.fractions, self.task.metric,
            )  # fmt: skip
            evals[key] = {str(fraction): metrics for fraction, metrics in scores.items()}
            if reporting.is_main_process():
                (self.workdir / "evals.json").write_text(json.dumps(evals, indent=2))
        metric = self.task.primary_metric
        scalars = {
            f"probe/teacher_from_student_{round(100 * float(f))}pct_{metric}": m[metric]
            for f, m in evals[key].items()
        }
        self.writer.write(step, scalars)

    def _evaluate(
        self, split: str, params: Params, model_config: ModelConfig, spec: data.BatchSpec
    ) -> dict[str, Any]:
        def generate(prompt_BxP: np.ndarray, valid_BxP: np.ndarray) -> list[str]:
            return self.decode(*self.greedy(params, model_config)(prompt_BxP, valid_BxP))

        limit = {"eval": self.schedule.eval_examples, "test": self.schedule.test_examples}
        spec = dataclasses.replace(spec, batch_size=self.schedule.eval_batch_size, shuffle=False)
        result = evaluation.evaluate(
            generate, self.splits[split], self.tokenizer, spec, self.task.metric, limit[split]
        )
        return json.loads(json.dumps(dataclasses.asdict(result)))  # as a resume reads it


def cold_start_completions(
    r: Run, cold: fixes.ColdStart, roles: update.Roles, frozen: update.Frozen
) -> Callable[[mesh.StepShardings], BatchFn]:
    """The cold start's batches: the teacher's samples of the step's prompts, in its own
    context, the rows the task scorer rejects masked out. `frozen` holds the teacher."""
    teacher_only = gkd.MixtureConfig(on_policy_fraction=0.0, fixed_source="teacher")
    sample_cfg = r.sampler(temperature=cold.temperature)
    frozen_sharding = jax.tree.map(lambda x: x.sharding, frozen)
    seed = r.schedule.seed_of("cold_start")

    def make(shardings: mesh.StepShardings) -> BatchFn:
        shardings = dataclasses.replace(shardings, frozen=frozen_sharding)
        roll = update.make_rollout(roles, teacher_only, sample_cfg, shardings)

        def batch_of(state: train_state.TrainState, step: int) -> train_state.DistillBatch:
            batch, arrays = r.batch(step, seed)
            completions, _ = roll(state, frozen, *arrays)
            if cold.min_reward is None:
                return completions
            keep_B = fixes.kept_rows(r.rewards(completions, list(batch.examples)), cold.min_reward)
            (keep_B,) = mesh.global_batch(
                (keep_B.astype(np.float32),), r.placement.mesh, r.schedule.batch_size
            )
            r.writer.write(step + 1, {"cold_start/kept_fraction": jnp.mean(keep_B)})
            return completions.replace(
                completion_mask_BxN=completions.completion_mask_BxN * keep_B[:, None]
            )

        return batch_of

    return make


def select_prompts(
    r: Run,
    selection: fixes.PromptSelection,
    score: Callable[..., jax.Array],
    roll: Callable[..., tuple[train_state.DistillBatch, jax.Array]],
    state: train_state.TrainState,
    frozen: update.Frozen,
) -> data.Split:
    """The training split distillation reads after teacher-aligned prompt selection:
    the first `selection.candidates` prompts of the seeded training stream, scored by
    `score` on the student's rollouts (`roll`), kept by `fixes.select_prompts`. The choice
    is kept in the prefix directory's prompt_selection.json."""
    path = r.prefix_dir / "prompt_selection.json"
    train, seed, size = r.splits["train"], r.schedule.seed, r.schedule.batch_size
    if path.exists():
        chosen = json.loads(path.read_text())
    else:
        indices, scores = [], []
        for step in range(-(-selection.candidates // size)):
            indices += data.example_indices(step, size, len(train), seed).tolist()
            rollouts, _ = roll(state, frozen, *r.batch(step, seed)[1])
            scores += mesh.to_host(score(state, frozen, rollouts)).tolist()
        scores = np.array(scores[: selection.candidates])
        kept = fixes.select_prompts(scores, selection.keep_fraction, selection.rest_share, seed)
        chosen = {
            "candidates": indices[: selection.candidates],
            "overlap_ratio": scores.tolist(),
            "kept": kept.tolist(),  # positions in the candidates
            "overlap_ratio_all": float(scores.mean()),
            "overlap_ratio_kept": float(scores[kept].mean()),
        }
        if reporting.is_main_process():
            path.write_text(json.dumps(chosen, indent=2))
    means = {
        f"prompt_selection/{k}": chosen[k] for k in ("overlap_ratio_all", "overlap_ratio_kept")
    }
    r.writer.write(0, means)
    kept_examples = [chosen["candidates"][i] for i in chosen["kept"]]
    return dataclasses.replace(train, source=[train.source[i] for i in kept_examples])


def run(
    workdir: epath.PathLike,
    title: str,
    prefix_dir: epath.PathLike | None = None,
    restart: bool = False,
) -> list[dict[str, Any]]:
    """Runs (or resumes) the recipe configured by gin; returns the results rows. The
    stages before distillation go to `prefix_dir` (default: the workdir). A workdir run
    with other settings is refused (`run_bindings`) unless `restart` (`--restart`)
    first removes what that run wrote (`clear_workdir`)."""
    workdir = paths.as_path(workdir)
    prefix_dir = workdir if prefix_dir is None else paths.as_path(prefix_dir)
    task, models, schedule = Task(), Models(), Schedule()
    cfg, mixture, rollout_sampling = distill.DistillConfig(), gkd.MixtureConfig(), RolloutSampling()
    cold, selection = fixes.ColdStart(), fixes.PromptSelection()
    teacher_probe = probe_lib.TeacherProbe()
    context = opsd.PrivilegedContext()
    self_teacher, lora_cfg = opsd.SelfTeacher(), lora.LoraConfig()  # checked even if unused
    self_teacher = self_teacher if models.teacher is None else None
    lora_cfg = lora_cfg if models.use_lora else None
    device_mesh, layout = mesh.make_mesh(), mesh.Layout()
    placement = layout.placement(device_mesh)
    teacher_placement = layout.placement(device_mesh, "teacher")
    optim = train_state.OptimizerConfig()
    group = schedule.rl_group_size if cfg.rl_alpha < 1.0 else 1  # completions per prompt
    check_schedule(schedule, group, optim.grad_accum, device_mesh)
    gkd.check_rollouts(cfg, rollout_sampling, mixture.on_policy_fraction)
    check_model_sources(models)

    with mesh.main_process_first("inputs ready"):  # they may be built into a shared cache
        student_source = models.student or models.teacher
        tokenizer = tokenizer_lib.load(student_source)
        teacher_tokenizer = tokenizer_lib.load(models.teacher or student_source)
        vocab_size = distill.check_vocab(teacher_tokenizer, tokenizer)
        splits = task.splits()
        loaded = load_models(models, placement, teacher_placement)
    template = task.template()
    opsd.check_contexts(splits["train"][0], template, context, tokenizer, teacher_tokenizer)
    spec = data.BatchSpec(
        schedule.batch_size, schedule.prompt_len, schedule.completion_len, template
    )
    teacher_width = schedule.teacher_prompt_len or schedule.prompt_len
    teacher_template = opsd.teacher_template(template, context)
    teacher_spec = dataclasses.replace(spec, prompt_len=teacher_width, template=teacher_template)
    check_prompt_lengths(splits, spec, teacher_spec, tokenizer, schedule.cut_prompts)

    roles = update.Roles(
        loaded.student_config, loaded.teacher_config, self_teacher, lora_cfg, vocab_size
    )
    for model_config in (roles.teacher, roles.student):
        mesh.check_model_fits_mesh(model_config, device_mesh)
    student_sharding = placement.params(roles.student)
    teacher_sharding = teacher_placement.params(roles.teacher)
    student_params, teacher_params = loaded.student_params, loaded.teacher_params
    if restart:
        clear_workdir(workdir, prefix_dir)
        mesh.barrier("workdir restarted")
    fingerprints = {prefix_dir / PREFIX_FILE: prefix_bindings(), workdir / RUN_FILE: run_bindings()}
    for path, bindings in fingerprints.items():
        check_bindings(path, bindings)
    for directory, stage, fingerprint in (
        (prefix_dir, "teacher_sft", roles.teacher),
        (prefix_dir, "student_sft", roles.student),
        (prefix_dir, "cold_start", roles.student),
        (workdir, "distill", update.student_shape(roles, cfg.learns_value)),
    ):
        loop.check_directory(directory / stage, fingerprint)
    mesh.barrier("workdir checked")  # nothing is written before every process checked
    for path, bindings in fingerprints.items():
        record_bindings(path, bindings)
    full_stages = [os.path.relpath(prefix_dir / s, workdir) for s in ("student_sft", "cold_start")]
    if reporting.is_main_process():
        config.save_operative_config(workdir)
        # how `python -m opd_jax.export` rebuilds the student
        stages = [(s, "full") for s in full_stages]
        stages.append(("distill", "full" if lora_cfg is None else "lora"))
        export.write_manifest(
            workdir, student_source, stages, layers=loaded.student_layers, lora_config=lora_cfg
        )
    evals = {directory: read_evals(directory) for directory in {workdir, prefix_dir}}
    with reporting.MetricsWriter(workdir / "logs") as writer:
        r = Run(
            workdir, prefix_dir, task, models, schedule, tokenizer, splits, spec, teacher_spec,
            placement, writer, evals,
        )  # fmt: skip
        # A self-distilling student has no teacher params and no teacher_sft steps.
        teacher_params = r.fine_tune(
            "teacher_sft",
            models.teacher_sft_steps,
            models.teacher_sft_learning_rate,
            teacher_params,
            roles.teacher,
            teacher_sharding,
        )
        student_params = r.fine_tune(
            "student_sft",
            models.student_sft_steps,
            models.student_sft_learning_rate,
            student_params,
            roles.student,
            student_sharding,
        )
        if cold.steps:  # the teacher is fixed while the student learns from its samples
            teacher_of_cold = student_params if teacher_params is None else teacher_params
            cold_roles = dataclasses.replace(roles, self_teacher=None, lora=None)
            cold_frozen = {"teacher": teacher_of_cold, "base": None}
            student_params = r.fine_tune(
                "cold_start",
                cold.steps,
                cold.learning_rate,
                student_params,
                roles.student,
                student_sharding,
                cold_start_completions(r, cold, cold_roles, cold_frozen),
            )
        frozen = update.frozen_arrays(roles, student_params, teacher_params)
        teacher_weights = student_params if teacher_params is None else teacher_params
        teacher = (teacher_weights, roles.teacher, teacher_spec)
        teacher_test = r.score("teacher/test", *teacher)
        start_test = r.score("student_start/test", student_params, roles.student, spec)
        r.score("teacher/eval", *teacher)
        r.score("student_start/eval", student_params, roles.student, spec)
        if teacher_probe.every:
            student_start = (student_params, roles.student)
            r.probe_teacher(0, teacher_probe, student_start, (teacher_weights, roles.teacher))

        optimizer = train_state.make_optimizer(optim, schedule.steps)
        seed = schedule.seed_of("distill")
        state = update.create_state(
            roles, student_params, optimizer, seed, student_sharding, cfg.value_optimizer()
        )
        frozen_sharding = jax.tree.map(lambda x: x.sharding, frozen)
        shardings = update.step_shardings(state, frozen_sharding, placement)
        update_step = update.make_update_step(roles, cfg, optimizer, shardings, optim.grad_accum)
        sample_cfg = r.sampler(**dataclasses.asdict(rollout_sampling))
        roll = update.make_rollout(roles, mixture, sample_cfg, shardings)
        if selection.candidates:
            on_policy = gkd.MixtureConfig(on_policy_fraction=1.0)
            student_roll = update.make_rollout(roles, on_policy, sample_cfg, shardings)
            scorer = update.make_alignment_scorer(roles, cfg, shardings)
            train = select_prompts(r, selection, scorer, student_roll, state, frozen)
            r = dataclasses.replace(r, splits={**r.splits, "train": train})

        def distill_step(state, step):
            batch, arrays = r.batch(step, seed, group)
            distill_batch, on_B = roll(state, frozen, *arrays)
            extra = {"on_policy_fraction": jnp.mean(on_B.astype(jnp.float32))}
            if cfg.rl_alpha < 1.0:  # each process scores its own rows
                examples = [e for e in batch.examples for _ in range(group)]
                rewards = r.rewards(distill_batch, examples)
                local = (rewards, gkd.group_advantages(rewards, group))
                reward_B, advantage_B = mesh.global_batch(local, device_mesh, schedule.batch_size)
                distill_batch = distill_batch.replace(advantage_B=advantage_B)
                extra["reward"] = jnp.mean(reward_B)
            state, metrics = update_step(state, frozen, distill_batch)
            return state, {**metrics, **extra}

        def student_of(state):
            return update.student_weights(roles, state.params, frozen)

        def after_step(step, state):
            if step % schedule.eval_every == 0 or step == schedule.steps:
                r.score(f"student/eval/{step}", student_of(state), roles.student, spec)
            if teacher_probe.due(step, schedule.steps):
                teacher_now = update.teacher_weights(roles, state, frozen)
                student_now = (student_of(state), roles.student)
                r.probe_teacher(step, teacher_probe, student_now, (teacher_now, roles.teacher))

        shape, every = update.student_shape(roles, cfg.learns_value), schedule.checkpoint_every
        stage = loop.Stage("distill", workdir / "distill", schedule.steps, every, shape)
        state = loop.run(stage, state, distill_step, writer, after_step)
        final_key = f"student_distilled/test/{schedule.steps}"
        final_test = r.score(final_key, student_of(state), roles.student, spec)

    teacher_name = "teacher with privileged context" if context.text else "teacher"
    results = {
        teacher_name: (roles.teacher.n_layers, teacher_test),
        "student before distillation": (roles.student.n_layers, start_test),
        "student after distillation": (roles.student.n_layers, final_test),
    }
    rows = report(workdir, title, results, task.primary_metric, final_test["num_examples"])
    if reporting.is_main_process():
        records = reporting.read_metrics(workdir / "logs" / reporting.METRICS_FILE)
        checklist = run_report.build_checklist(
            task=task, models=models, schedule=schedule, rollout=rollout_sampling,
            objective=cfg, mixture=mixture, optim=optim, cold=cold, selection=selection,
            roles=roles, student_layers=loaded.student_layers, spec=spec,
            teacher_spec=teacher_spec, tokenizer=tokenizer, teacher_tokenizer=teacher_tokenizer,
            records=records, evals={k: v for store in evals.values() for k, v in store.items()},
            stage_dirs={
                stage: (workdir if stage == "distill" else prefix_dir) / stage
                for stage in run_report.PHASES
            },
        )  # fmt: skip
        run_report.write(workdir, checklist, records)
    return rows


def report(
    workdir: epath.Path,
    title: str,
    results: Mapping[str, tuple[int, Mapping[str, Any]]],
    primary_metric: str,
    num_examples: int,
) -> list[dict[str, Any]]:
    """The results rows from model -> (layers, test score). Process 0 also writes the
    table (markdown + JSON) with samples and the curves, and prints the table."""
    rows = [
        {"model": name, "layers": layers, **{k: round(v, 2) for k, v in result["metrics"].items()}}
        for name, (layers, result) in results.items()
    ]
    if not reporting.is_main_process():
        return rows
    samples = {name: result["samples"] for name, (_, result) in results.items()}
    reporting.write_results(workdir, rows, samples)
    records = reporting.read_metrics(workdir / "logs" / reporting.METRICS_FILE)
    keys = [f"eval/student_{primary_metric}", "distill/divergence"]
    reporting.plot_curves(records, keys, workdir / "curves.png", title=title)
    print(f"\n{title}: test set, {num_examples} examples\n")
    print(reporting.results_table(rows))
    print(f"\nresults, samples and curves in {workdir}")
    return rows


def main(description: str, default_gin_file: pathlib.Path, default_workdir: str) -> None:
    """The entry point of an experiment module: its gin file first, then the user's."""
    logging.basicConfig(level=logging.WARNING)
    config.enable_compilation_cache()
    args = config.parse(description, default_gin_files=[str(default_gin_file)])
    with config.exit_on_config_error():  # settings, found before any compile
        run(args.workdir or default_workdir, title=default_gin_file.stem, restart=args.restart)
