"""One run of any on-policy distillation recipe, end to end: models, stages, evaluation.

GKD (a separate teacher, often fine-tuned first, teaching a smaller student) and OPSD
(the student teaching itself from a privileged context) are configs of this one loop:
  1. teacher_sft (optional, separate teacher only): fine-tune the teacher on the targets.
  2. student_sft (optional): fine-tune the student's full weights on the targets.
  3. distill: rollout by the GKD mixture, then the update (`update`), with validation
     every `eval_every` steps and an optional task reward.
Each stage resumes from its own checkpoints in the workdir. Test-set scores of the
teacher (in its own, possibly privileged, context), the student before distillation and
after it go to a results table (markdown + JSON) and a plot of the metric and the exact
divergence against step; `python -m opd_jax.export WORKDIR OUT` turns the student into a
Hugging Face directory. The same path runs on one device, a mesh and several hosts.

Every setting is a gin parameter of `Task`, `Models`, `Schedule`, `RolloutSampling`,
`DistillConfig`, `OptimizerConfig`, `MixtureConfig`, `SelfTeacher`, `PrivilegedContext`, `LoraConfig`,
`Layout` or `make_mesh`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import sys
from collections.abc import Mapping
from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np

from opd_jax import (
    checkpoints,
    config,
    data,
    distill,
    evaluation,
    export,
    gkd,
    loop,
    lora,
    mesh,
    model,
    opsd,
    reporting,
    sampling,
    train_state,
    update,
)
from opd_jax import tokenizer as tokenizer_lib
from opd_jax.model import ModelConfig, Params

CUT_POLICIES = ("warn", "refuse")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class Task:
    """The dataset, its prompt and how outputs are scored.

    dataset: a TFDS name ("aclsum", "gsm_symbolic/chain_sum", or any prepared dataset
      with `input_key` / `target_key`). metric: "summarization" (ROUGE) or "math" (exact
      match of the `####` answer); `primary_metric` is the one reported, plotted and, when
      RL is on, used as the reward (divided by 100).
    instruction: the user turn, with `{input}` where the example goes; None takes the
      dataset's default prompt.
    """

    dataset: str = "aclsum"
    train_split: str = "train"
    eval_split: str = "validation"
    test_split: str = "test"
    input_key: str | None = None
    target_key: str | None = None
    metric: str = "summarization"
    primary_metric: str = "rougeL"
    instruction: str | None = None
    system: str | None = None
    data_dir: str | None = None

    def template(self) -> data.PromptTemplate:
        if self.instruction is None:
            base = self.dataset.split("/")[0]
            if base not in data.DEFAULT_TEMPLATES:
                raise config.ConfigError(
                    f"Task.instruction: dataset {self.dataset!r} has no default prompt; set one "
                    "with {input} where the example goes"
                )
            default = data.DEFAULT_TEMPLATES[base]
            return dataclasses.replace(default, system=self.system or default.system)
        return data.PromptTemplate(self.instruction, self.system)

    def splits(self) -> dict[str, data.Split]:
        """The "train", "eval" and "test" splits."""
        named = {"train": self.train_split, "eval": self.eval_split, "test": self.test_split}
        where = (self.data_dir, self.input_key, self.target_key)
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
    The fine-tuning learning rates are separate because a pruned student needs large
    steps to repair itself, which would wreck a full pretrained teacher.
    """

    teacher: str | None = "smollm2-135m-instruct"
    student: str | None = None
    student_layers: int | tuple[int, ...] | None = None
    use_lora: bool = False
    teacher_sft_steps: int = 0
    student_sft_steps: int = 30
    teacher_sft_learning_rate: float = 1e-4
    student_sft_learning_rate: float = 1e-4

    def __post_init__(self):
        if self.teacher is None and self.student is None:
            raise config.ConfigError(
                "Models.student: self-distillation (Models.teacher = None) needs the student's model"
            )
        if self.teacher is None and self.teacher_sft_steps:
            raise config.ConfigError(
                "Models.teacher_sft_steps: a self-distilling student has no separate teacher "
                "to fine-tune; use Models.student_sft_steps"
            )


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

    def __post_init__(self):
        if self.cut_prompts not in CUT_POLICIES:
            raise config.ConfigError(
                f"Schedule.cut_prompts={self.cut_prompts!r} is not one of {CUT_POLICIES}"
            )
        for name in ("steps", "batch_size", "prompt_len", "completion_len", "eval_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise config.ConfigError(f"Schedule.{name}={value!r} must be an integer >= 1")
        if self.checkpoint_every < 1:
            raise config.ConfigError("Schedule.checkpoint_every must be >= 1")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class RolloutSampling:
    """How on-policy (and sequence-KD) completions are sampled; evaluation is greedy."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0


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


def load_models(models: Models) -> LoadedModels:
    source = models.student if models.student is not None else models.teacher
    source_config, source_params = checkpoints.load(source)
    keep = models.student_layers
    if isinstance(keep, int):
        keep = model.evenly_spaced_layers(source_config.n_layers, keep)
    if keep is None:
        student_config, student_params = source_config, source_params
    else:
        student_config, student_params = model.select_layers(source_params, source_config, keep)
    if models.teacher is None:
        teacher_config, teacher_params = student_config, None
    elif models.student is None:
        teacher_config, teacher_params = source_config, source_params
    else:
        teacher_config, teacher_params = checkpoints.load(models.teacher)
    distill.check_vocab(teacher_config, student_config)
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


@dataclasses.dataclass(frozen=True)
class Run:
    """What the stages of one run share, built once its start-up checks have passed."""

    workdir: pathlib.Path
    task: Task
    models: Models
    schedule: Schedule
    tokenizer: tokenizer_lib.Tokenizer
    splits: Mapping[str, data.Split]
    spec: data.BatchSpec  # how the student's prompts and targets are built
    placement: mesh.Placement
    writer: reporting.MetricsWriter
    evals: dict[str, Any]  # evals.json, so a resumed run does not redo an evaluation

    def decode(self, tokens_BxN: np.ndarray, lengths_B: np.ndarray) -> list[str]:
        rows = zip(tokens_BxN, lengths_B, strict=True)
        return [self.tokenizer.decode(row[:length].tolist()).strip() for row, length in rows]

    def batch(
        self, step: int, repeat: int = 1, teacher_spec: data.BatchSpec | None = None
    ) -> tuple[data.Batch, tuple[jax.Array, ...]]:
        """The step's training batch of Schedule.batch_size rows, each prompt repeated
        `repeat` times, as global arrays (prompt, prompt_valid, target, target_mask[,
        teacher_prompt, teacher_prompt_valid]); this process builds only its own rows, and
        the host-side `Batch` it returns holds just those."""
        global_rows = self.schedule.batch_size
        spec = dataclasses.replace(self.spec, batch_size=global_rows // repeat)
        rows = mesh.process_rows(self.placement.mesh, global_rows)
        own = slice(rows.start // repeat, rows.stop // repeat)
        batch = data.batch_at(
            self.splits["train"], self.tokenizer, spec, self.schedule.seed, step, own
        )
        mask = batch.target_valid_BxN.astype(np.float32)
        local = [batch.prompt_BxP, batch.prompt_valid_BxP, batch.target_BxN, mask]
        if teacher_spec is not None:
            local += data.make_batch(batch.examples, self.tokenizer, teacher_spec)[:2]
        repeated = tuple(np.repeat(a, repeat, axis=0) for a in local)
        return batch, mesh.global_batch(repeated, self.placement.mesh, global_rows)

    def fine_tune(
        self, stage: str, params: Params, model_config: ModelConfig, params_sharding: Any
    ) -> Params:
        """Supervised fine-tuning on the targets, for Models.<stage>_steps at
        Models.<stage>_learning_rate; returns `params` unchanged for 0 steps. The params
        (placed in `params_sharding`) keep their layout."""
        steps = getattr(self.models, f"{stage}_steps")
        if steps == 0:
            return params
        learning_rate = getattr(self.models, f"{stage}_learning_rate")
        optim = train_state.OptimizerConfig(learning_rate=learning_rate, warmup_steps=min(5, steps))
        optimizer = train_state.make_optimizer(optim, steps)
        roles = update.Roles(model_config, model_config)
        state = update.create_state(roles, params, optimizer, self.schedule.seed, params_sharding)
        shardings = update.step_shardings(state, None, self.placement)
        remat = distill.DistillConfig().remat
        sft_step = distill.make_sft_step(
            model_config, optim.grad_accum, optimizer, shardings, remat
        )

        def step_fn(state, step):
            _, arrays = self.batch(step)
            return sft_step(state, None, train_state.DistillBatch(*arrays))

        every = self.schedule.checkpoint_every
        stage_spec = loop.Stage(stage, self.workdir / stage, steps, every, model_config)
        return loop.run(stage_spec, state, step_fn, self.writer).params

    def sampler(self, **settings: Any) -> sampling.SamplingConfig:
        """The sampler's settings for completions of Schedule.completion_len: greedy, as
        evaluation is, unless `settings` (temperature, top_k, top_p) say otherwise."""
        stops = {"eos_ids": self.tokenizer.eos_id, "pad_id": self.tokenizer.pad_id}
        settings = {"temperature": 0.0, **settings, **stops}
        return sampling.SamplingConfig(self.schedule.completion_len, **settings)

    def score(
        self, key: str, params: Params, model_config: ModelConfig, spec: data.BatchSpec
    ) -> dict[str, Any]:
        """Greedy evaluation of a model on `key` = "<model>/<split>[/<step>]", kept in
        evals.json; a validation score is logged as eval/<model>_<metric> at its step when
        first computed. Every process passes the same prompts to the jitted sampler and
        gets every completion back."""
        if key in self.evals:
            return self.evals[key]
        name, split, *step = key.split("/")

        def generate(prompt_BxP: np.ndarray, valid_BxP: np.ndarray) -> list[str]:
            rng = jax.random.key(0)
            samples = sampling.generate(
                params, prompt_BxP, valid_BxP, rng, model_config, self.sampler(), self.placement
            )
            samples = mesh.to_host(samples)
            return self.decode(samples.tokens_BxN, samples.lengths_B)

        limit = {"eval": self.schedule.eval_examples, "test": self.schedule.test_examples}
        spec = dataclasses.replace(spec, batch_size=self.schedule.eval_batch_size, shuffle=False)
        result = evaluation.evaluate(
            generate, self.splits[split], self.tokenizer, spec, self.task.metric, limit[split]
        )
        self.evals[key] = json.loads(json.dumps(dataclasses.asdict(result)))  # as a resume reads it
        if reporting.is_main_process():
            (self.workdir / "evals.json").write_text(json.dumps(self.evals, indent=2))
        if split == "eval":
            scalars = {f"eval/{name}_{k}": v for k, v in result.metrics.items()}
            self.writer.write(int(step[0]), scalars)
        return self.evals[key]


def run(workdir: str | pathlib.Path, title: str) -> list[dict[str, Any]]:
    """Runs (or resumes) the recipe configured by gin; returns the results rows."""
    workdir = pathlib.Path(workdir)
    task, models, schedule = Task(), Models(), Schedule()
    cfg, mixture, rollout_sampling = distill.DistillConfig(), gkd.MixtureConfig(), RolloutSampling()
    context = opsd.PrivilegedContext()
    self_teacher = opsd.SelfTeacher() if models.teacher is None else None
    lora_cfg = lora.LoraConfig() if models.use_lora else None
    device_mesh, layout = mesh.make_mesh(), mesh.Layout()
    placement = layout.placement(device_mesh)
    optim = train_state.OptimizerConfig()
    group = schedule.rl_group_size if cfg.rl_alpha < 1.0 else 1  # completions per prompt
    check_schedule(schedule, group, optim.grad_accum, device_mesh)
    gkd.check_rollouts(cfg, rollout_sampling, mixture.on_policy_fraction)

    with mesh.main_process_first("inputs ready"):  # they may be built into a shared cache
        student_source = models.student or models.teacher
        tokenizer = tokenizer_lib.load(student_source)
        teacher_tokenizer = tokenizer_lib.load(models.teacher or student_source)
        splits = task.splits()
        loaded = load_models(models)
    template = task.template()
    opsd.check_contexts(splits["train"][0], template, context, tokenizer, teacher_tokenizer)
    spec = data.BatchSpec(
        schedule.batch_size, schedule.prompt_len, schedule.completion_len, template
    )
    teacher_width = schedule.teacher_prompt_len or schedule.prompt_len
    teacher_template = opsd.teacher_template(template, context)
    teacher_spec = dataclasses.replace(spec, prompt_len=teacher_width, template=teacher_template)
    check_prompt_lengths(splits, spec, teacher_spec, tokenizer, schedule.cut_prompts)

    roles = update.Roles(loaded.student_config, loaded.teacher_config, self_teacher, lora_cfg)
    for model_config in (roles.teacher, roles.student):
        mesh.check_model_fits_mesh(model_config, device_mesh)
    student_sharding = placement.params(roles.student)
    teacher_sharding = layout.placement(device_mesh, "teacher").params(roles.teacher)
    student_params = mesh.place_params(loaded.student_params, student_sharding)
    teacher_params = loaded.teacher_params
    if teacher_params is not None:
        teacher_params = mesh.place_params(teacher_params, teacher_sharding)
    for stage, fingerprint in (
        ("teacher_sft", roles.teacher),
        ("student_sft", roles.student),
        ("distill", update.student_shape(roles)),
    ):
        loop.check_directory(workdir / stage, fingerprint)
    mesh.barrier("workdir checked")  # nothing is written before every process checked
    if reporting.is_main_process():
        config.save_operative_config(workdir)
        # how `python -m opd_jax.export` rebuilds the student
        stages = [("student_sft", "full"), ("distill", "full" if lora_cfg is None else "lora")]
        export.write_manifest(
            workdir, student_source, stages, layers=loaded.student_layers, lora_config=lora_cfg
        )
    evals_file = workdir / "evals.json"
    evals = json.loads(evals_file.read_text()) if evals_file.exists() else {}
    with reporting.MetricsWriter(workdir / "logs") as writer:
        r = Run(workdir, task, models, schedule, tokenizer, splits, spec, placement, writer, evals)
        # A self-distilling student has no teacher params and no teacher_sft steps.
        teacher_params = r.fine_tune("teacher_sft", teacher_params, roles.teacher, teacher_sharding)
        student_params = r.fine_tune("student_sft", student_params, roles.student, student_sharding)
        frozen = update.frozen_arrays(roles, student_params, teacher_params)
        teacher_weights = student_params if teacher_params is None else teacher_params
        teacher = (teacher_weights, roles.teacher, teacher_spec)
        teacher_test = r.score("teacher/test", *teacher)
        start_test = r.score("student_start/test", student_params, roles.student, spec)
        r.score("teacher/eval/0", *teacher)
        r.score("student/eval/0", student_params, roles.student, spec)

        optimizer = train_state.make_optimizer(optim, schedule.steps)
        state = update.create_state(
            roles, student_params, optimizer, schedule.seed, student_sharding
        )
        frozen_sharding = jax.tree.map(lambda x: x.sharding, frozen)
        shardings = update.step_shardings(state, frozen_sharding, placement)
        update_step = update.make_update_step(roles, cfg, optimizer, shardings, optim.grad_accum)
        sample_cfg = r.sampler(**dataclasses.asdict(rollout_sampling))
        roll = update.make_rollout(roles, mixture, sample_cfg, shardings)

        def distill_step(state, step):
            batch, arrays = r.batch(step, group, teacher_spec)
            distill_batch, on_B = roll(state, frozen, *arrays)
            extra = {"on_policy_fraction": jnp.mean(on_B.astype(jnp.float32))}
            if cfg.rl_alpha < 1.0:  # each process scores its own rows
                tokens = mesh.local_rows(distill_batch.completion_BxN)
                lengths = mesh.local_rows(distill_batch.completion_mask_BxN).sum(axis=1)
                texts = r.decode(tokens, lengths.astype(int))
                examples = [e for e in batch.examples for _ in range(group)]
                rewards = np.array(
                    [task.reward(t, e) for t, e in zip(texts, examples, strict=True)], np.float32
                )
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

        shape, every = update.student_shape(roles), schedule.checkpoint_every
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
    return report(workdir, title, results, task.primary_metric, final_test["num_examples"])


def report(
    workdir: pathlib.Path,
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
    try:
        run(args.workdir or default_workdir, title=default_gin_file.stem)
    except (config.ConfigError, mesh.MeshError) as err:  # settings, before any compile
        sys.exit(f"error: {err}")
