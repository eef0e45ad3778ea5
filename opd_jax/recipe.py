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
from collections.abc import Callable, Mapping, Sequence
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
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise config.ConfigError(
                    f"Schedule.{name}={getattr(self, name)!r} must be an integer >= 1"
                )
        if self.checkpoint_every < 1:
            raise config.ConfigError("Schedule.checkpoint_every must be >= 1")

    @property
    def teacher_width(self) -> int:
        return self.teacher_prompt_len or self.prompt_len


@gin.configurable
@dataclasses.dataclass(frozen=True)
class RolloutSampling:
    """How on-policy (and sequence-KD) completions are sampled; evaluation is greedy."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def config(
        self, max_new_tokens: int, tokenizer: tokenizer_lib.Tokenizer
    ) -> sampling.SamplingConfig:
        """The sampler's settings for rollouts of `max_new_tokens`."""
        return sampling.SamplingConfig(
            max_new_tokens=max_new_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            eos_ids=tokenizer.eos_id,
            pad_id=tokenizer.pad_id,
        )


# ----------------------------------------------------------------------------- models


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


def decode_completions(
    tokenizer: tokenizer_lib.Tokenizer, tokens_BxN: np.ndarray, lengths_B: np.ndarray
) -> list[str]:
    return [
        tokenizer.decode(row[:length].tolist()).strip()
        for row, length in zip(tokens_BxN, lengths_B, strict=True)
    ]


def greedy_generate_fn(
    params: Params,
    model_config: ModelConfig,
    tokenizer: tokenizer_lib.Tokenizer,
    max_new_tokens: int,
    placement: mesh.Placement | None = None,
) -> evaluation.GenerateFn:
    """Evaluation's generate_fn: greedy completions through the jitted sampler. Every
    process passes the same prompts and gets every completion back."""
    settings = sampling.SamplingConfig(
        max_new_tokens=max_new_tokens,
        temperature=0.0,
        eos_ids=tokenizer.eos_id,
        pad_id=tokenizer.pad_id,
    )

    def generate(prompt_BxP: np.ndarray, prompt_valid_BxP: np.ndarray) -> list[str]:
        samples = sampling.generate(
            params,
            prompt_BxP,
            prompt_valid_BxP,
            jax.random.key(0),
            model_config,
            settings,
            placement,
        )
        samples = mesh.to_host(samples)
        return decode_completions(tokenizer, samples.tokens_BxN, samples.lengths_B)

    return generate


# ----------------------------------------------------------------------------- batches


@dataclasses.dataclass(frozen=True)
class Specs:
    """How the student's and the teacher's prompts of each kind of batch are built."""

    train: data.BatchSpec
    teacher_train: data.BatchSpec
    sft: data.BatchSpec
    eval: data.BatchSpec
    teacher_eval: data.BatchSpec


def make_specs(
    schedule: Schedule, student: data.PromptTemplate, teacher: data.PromptTemplate, group: int
) -> Specs:
    train = data.BatchSpec(
        schedule.batch_size // group, schedule.prompt_len, schedule.completion_len, student
    )
    teacher_train = dataclasses.replace(train, prompt_len=schedule.teacher_width, template=teacher)
    evaluated = lambda spec: dataclasses.replace(
        spec, batch_size=schedule.eval_batch_size, shuffle=False
    )
    return Specs(
        train=train,
        teacher_train=teacher_train,
        sft=dataclasses.replace(train, batch_size=schedule.batch_size),
        eval=evaluated(train),
        teacher_eval=evaluated(teacher_train),
    )


def sharded_batch(
    split: data.Split,
    tokenizer: tokenizer_lib.Tokenizer,
    spec: data.BatchSpec,
    seed: int,
    step: int,
    device_mesh: jax.sharding.Mesh,
    repeat: int = 1,
    teacher_spec: data.BatchSpec | None = None,
) -> tuple[data.Batch, tuple[jax.Array, ...]]:
    """The step's batch with each prompt repeated `repeat` times, as global arrays
    (prompt, prompt_valid, target, target_mask[, teacher_prompt, teacher_prompt_valid]);
    this process builds only its own rows, and the host-side `Batch` it returns holds
    just those."""
    global_rows = spec.batch_size * repeat
    rows = mesh.process_rows(device_mesh, global_rows)
    batch = data.batch_at(
        split, tokenizer, spec, seed, step, slice(rows.start // repeat, rows.stop // repeat)
    )
    local = [
        batch.prompt_BxP,
        batch.prompt_valid_BxP,
        batch.target_BxN,
        batch.target_valid_BxN.astype(np.float32),
    ]
    if teacher_spec is not None:
        local += data.make_batch(batch.examples, tokenizer, teacher_spec)[:2]
    repeated = tuple(np.repeat(a, repeat, axis=0) for a in local)
    return batch, mesh.global_batch(repeated, device_mesh, global_rows)


# ----------------------------------------------------------------------------- stages


def fine_tune(
    name: str,
    workdir: pathlib.Path,
    params: Params,
    model_config: ModelConfig,
    split: data.Split,
    tokenizer: tokenizer_lib.Tokenizer,
    spec: data.BatchSpec,
    steps: int,
    learning_rate: float,
    schedule: Schedule,
    writer: reporting.MetricsWriter,
    params_sharding: Any,
    placement: mesh.Placement,
) -> Params:
    """Supervised fine-tuning on the targets; returns `params` unchanged for 0 steps. The
    params (placed in `params_sharding`) keep their layout."""
    if steps == 0:
        return params
    optim = train_state.OptimizerConfig(learning_rate=learning_rate, warmup_steps=min(5, steps))
    optimizer = train_state.make_optimizer(optim, steps)
    roles = update.Roles(model_config, model_config)
    state = update.create_state(roles, params, optimizer, schedule.seed, params_sharding)
    shardings = update.step_shardings(state, None, placement)
    remat = distill.DistillConfig().remat
    sft_step = distill.make_sft_step(model_config, optim.grad_accum, optimizer, shardings, remat)

    def step_fn(state, step):
        _, arrays = sharded_batch(split, tokenizer, spec, schedule.seed, step, placement.mesh)
        return sft_step(state, None, train_state.DistillBatch(*arrays))

    stage = loop.Stage(name, workdir / name, steps, schedule.checkpoint_every, model_config)
    return loop.run(stage, state, step_fn, writer).params


def reward_fn(task: Task) -> Callable[[str, Mapping[str, Any]], float]:
    """The task's primary metric of one completion, in [0, 1]."""
    metric = evaluation.resolve_metric(task.metric)
    return lambda text, example: metric([text], [example])[task.primary_metric] / 100.0


# ----------------------------------------------------------------------------- evaluation


class EvalCache:
    """Evaluation results kept in the workdir, so a resumed run does not redo them."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path
        self.results = json.loads(path.read_text()) if path.exists() else {}

    def get(self, key: str, compute: Callable[[], evaluation.EvalResult]) -> dict[str, Any]:
        if key not in self.results:
            result = compute()
            self.results[key] = {
                "metrics": result.metrics,
                "num_examples": result.num_examples,
                "samples": [list(s) for s in result.samples],
            }
            if reporting.is_main_process():
                self.path.write_text(json.dumps(self.results, indent=2))
        return self.results[key]


# ----------------------------------------------------------------------------- checks


def check_schedule(
    schedule: Schedule,
    cfg: distill.DistillConfig,
    optim: train_state.OptimizerConfig,
    device_mesh: jax.sharding.Mesh,
) -> None:
    rl_on = cfg.rl_alpha < 1.0
    per_prompt = schedule.rl_group_size if rl_on else 1
    if schedule.batch_size % (per_prompt * optim.grad_accum):
        raise config.ConfigError(
            f"Schedule.batch_size={schedule.batch_size} must be a multiple of "
            f"rl_group_size x grad_accum = {per_prompt} x {optim.grad_accum}"
        )
    shards = mesh.batch_shards(device_mesh)
    if schedule.batch_size % (shards * per_prompt) or schedule.eval_batch_size % shards:
        raise config.ConfigError(
            f"Schedule.batch_size={schedule.batch_size} must be a multiple of data x fsdp x "
            f"rl_group_size = {shards} x {per_prompt}, and Schedule.eval_batch_size="
            f"{schedule.eval_batch_size} of data x fsdp = {shards} "
            f"(mesh {dict(device_mesh.shape)})"
        )


class PromptCutError(config.ConfigError):
    """A rendered prompt is longer than its width and Schedule.cut_prompts = "refuse"."""


def check_prompt_lengths(
    splits: Mapping[str, data.Split],
    widths: Mapping[str, tuple[data.PromptTemplate, int, str]],
    tokenizer: tokenizer_lib.Tokenizer,
    policy: str,
) -> None:
    """One prompt-length policy for every prompt a run renders: a cut prompt loses the end
    of its input, harmless for a long document, fatal for a math question or a privileged
    context. `widths`: who -> (template, width, gin name of the width)."""
    for who, (template, width, setting) in widths.items():
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


def run(workdir: str | pathlib.Path, title: str) -> list[dict[str, Any]]:
    """Runs (or resumes) the recipe configured by gin; returns the results rows."""
    workdir = pathlib.Path(workdir)
    task, models, schedule = Task(), Models(), Schedule()
    cfg, mixture, rollout_sampling = (
        distill.DistillConfig(),
        gkd.MixtureConfig(),
        RolloutSampling(),
    )
    context = opsd.PrivilegedContext()
    self_teacher = opsd.SelfTeacher() if models.teacher is None else None
    lora_cfg = lora.LoraConfig() if models.use_lora else None
    device_mesh = mesh.make_mesh()
    layout = mesh.Layout()
    placement = layout.placement(device_mesh)
    optim = train_state.OptimizerConfig()
    check_schedule(schedule, cfg, optim, device_mesh)
    gkd.check_rollouts(cfg, rollout_sampling, mixture.on_policy_fraction)

    with mesh.main_process_first("inputs ready"):  # they may be built into a shared cache
        student_source = models.student or models.teacher
        tokenizer = tokenizer_lib.load(student_source)
        teacher_tokenizer = tokenizer_lib.load(models.teacher or student_source)
        splits = {
            name: data.load_split(
                task.dataset, split, task.data_dir, task.input_key, task.target_key
            )
            for name, split in (
                ("train", task.train_split),
                ("eval", task.eval_split),
                ("test", task.test_split),
            )
        }
        loaded = load_models(models)
    student_template = task.template()
    teacher_template = opsd.teacher_template(student_template, context)
    opsd.check_contexts(splits["train"][0], student_template, context, tokenizer, teacher_tokenizer)
    widths = {"student": (student_template, schedule.prompt_len, "Schedule.prompt_len")}
    if (teacher_template, schedule.teacher_width) != (student_template, schedule.prompt_len):
        widths["teacher"] = (
            teacher_template,
            schedule.teacher_width,
            "Schedule.teacher_prompt_len",
        )
    check_prompt_lengths(splits, widths, tokenizer, schedule.cut_prompts)
    group = schedule.rl_group_size if cfg.rl_alpha < 1.0 else 1
    specs = make_specs(schedule, student_template, teacher_template, group)

    roles = update.Roles(loaded.student_config, loaded.teacher_config, self_teacher, lora_cfg)
    for model_config in (roles.teacher, roles.student):
        mesh.check_model_fits_mesh(model_config, device_mesh)
    teacher_placement = layout.placement(device_mesh, "teacher")
    student_sharding = placement.params(roles.student)
    teacher_sharding = teacher_placement.params(roles.teacher)
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
        adapter = "full" if lora_cfg is None else "lora"
        export.write_manifest(  # how `python -m opd_jax.export` rebuilds the student
            workdir,
            student_source,
            [("student_sft", "full"), ("distill", adapter)],
            layers=loaded.student_layers,
            lora_config=lora_cfg,
        )
    with reporting.MetricsWriter(workdir / "logs") as writer:
        tune = lambda name, params, model_config, steps, learning_rate, shardings: fine_tune(
            name,
            workdir,
            params,
            model_config,
            splits["train"],
            tokenizer,
            specs.sft,
            steps,
            learning_rate,
            schedule,
            writer,
            shardings,
            placement,
        )
        if teacher_params is not None:
            teacher_params = tune(
                "teacher_sft",
                teacher_params,
                roles.teacher,
                models.teacher_sft_steps,
                models.teacher_sft_learning_rate,
                teacher_sharding,
            )
        student_params = tune(
            "student_sft",
            student_params,
            roles.student,
            models.student_sft_steps,
            models.student_sft_learning_rate,
            student_sharding,
        )
        frozen = update.frozen_arrays(roles, student_params, teacher_params)
        evals = EvalCache(workdir / "evals.json")

        def score(key, params, model_config, split, max_examples, spec, log_step=None):
            """Cached evaluation; logged as eval/<model>_<metric> when first computed."""
            fresh = key not in evals.results
            generate = greedy_generate_fn(
                params, model_config, tokenizer, schedule.completion_len, placement
            )
            result = evals.get(
                key,
                lambda: evaluation.evaluate(
                    generate, splits[split], tokenizer, spec, task.metric, max_examples
                ),
            )
            if fresh and log_step is not None:
                name = key.split("/")[0]
                writer.write(
                    log_step, {f"eval/{name}_{k}": v for k, v in result["metrics"].items()}
                )
            return result

        teacher_weights = student_params if teacher_params is None else teacher_params
        test, evaluate_on = schedule.test_examples, schedule.eval_examples
        teacher_test = score(
            "teacher/test", teacher_weights, roles.teacher, "test", test, specs.teacher_eval
        )
        start_test = score(
            "student_start/test", student_params, roles.student, "test", test, specs.eval
        )
        score(
            "teacher/eval/0",
            teacher_weights,
            roles.teacher,
            "eval",
            evaluate_on,
            specs.teacher_eval,
            0,
        )
        score("student/eval/0", student_params, roles.student, "eval", evaluate_on, specs.eval, 0)

        optimizer = train_state.make_optimizer(optim, schedule.steps)
        state = update.create_state(
            roles, student_params, optimizer, schedule.seed, student_sharding
        )
        frozen_sharding = jax.tree.map(lambda x: x.sharding, frozen)
        shardings = update.step_shardings(state, frozen_sharding, placement)
        update_step = update.make_update_step(roles, cfg, optimizer, shardings, optim.grad_accum)
        sample_cfg = rollout_sampling.config(schedule.completion_len, tokenizer)
        roll = update.make_rollout(roles, mixture, sample_cfg, shardings)
        reward = reward_fn(task)

        def distill_step(state, step):
            batch, arrays = sharded_batch(
                splits["train"],
                tokenizer,
                specs.train,
                schedule.seed,
                step,
                device_mesh,
                group,
                specs.teacher_train,
            )
            distill_batch, on_B = roll(state, frozen, *arrays)
            extra = {"on_policy_fraction": jnp.mean(on_B.astype(jnp.float32))}
            if cfg.rl_alpha < 1.0:  # each process scores its own rows
                tokens = mesh.local_rows(distill_batch.completion_BxN)
                mask = mesh.local_rows(distill_batch.completion_mask_BxN)
                texts = decode_completions(tokenizer, tokens, mask.sum(axis=1).astype(int))
                examples = [e for e in batch.examples for _ in range(group)]
                rewards = np.array(
                    [reward(t, e) for t, e in zip(texts, examples, strict=True)], np.float32
                )
                advantages = gkd.group_advantages(rewards, group)
                rows = schedule.batch_size
                distill_batch = distill_batch.replace(
                    advantage_B=mesh.global_batch(advantages, device_mesh, rows)
                )
                extra["reward"] = jnp.mean(mesh.global_batch(rewards, device_mesh, rows))
            state, metrics = update_step(state, frozen, distill_batch)
            return state, {**metrics, **extra}

        def student_of(state):
            return update.student_weights(roles, state.params, frozen)

        def after_step(step, state):
            if step % schedule.eval_every == 0 or step == schedule.steps:
                score(
                    f"student/eval/{step}",
                    student_of(state),
                    roles.student,
                    "eval",
                    evaluate_on,
                    specs.eval,
                    step,
                )

        stage = loop.Stage(
            "distill",
            workdir / "distill",
            schedule.steps,
            schedule.checkpoint_every,
            update.student_shape(roles),
        )
        state = loop.run(stage, state, distill_step, writer, after_step)
        final_test = score(
            f"student_distilled/test/{schedule.steps}",
            student_of(state),
            roles.student,
            "test",
            test,
            specs.eval,
        )

    teacher_name = "teacher with privileged context" if context.text else "teacher"
    rows = [
        _row(teacher_name, roles.teacher, teacher_test),
        _row("student before distillation", roles.student, start_test),
        _row("student after distillation", roles.student, final_test),
    ]
    samples = {
        row["model"]: result["samples"]
        for row, result in zip(rows, (teacher_test, start_test, final_test), strict=True)
    }
    keys = [f"eval/student_{task.primary_metric}", "distill/divergence"]
    report(workdir, title, rows, samples, keys, final_test["num_examples"])
    return rows


def report(
    workdir: pathlib.Path,
    title: str,
    rows: list[dict[str, Any]],
    samples: Mapping[str, Any],
    curve_keys: Sequence[str],
    num_examples: int,
) -> None:
    """Results table (markdown + JSON), curves and the printed table, from process 0."""
    if not reporting.is_main_process():
        return
    reporting.write_results(workdir, rows, samples)
    records = reporting.read_metrics(workdir / "logs" / reporting.METRICS_FILE)
    reporting.plot_curves(records, curve_keys, workdir / "curves.png", title=title)
    print(f"\n{title}: test set, {num_examples} examples\n")
    print(reporting.results_table(rows))
    print(f"\nresults, samples and curves in {workdir}")


def _row(name: str, model_config: ModelConfig, result: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "model": name,
        "layers": model_config.n_layers,
        **{k: round(v, 2) for k, v in result["metrics"].items()},
    }


def main(description: str, default_gin_file: pathlib.Path, default_workdir: str) -> None:
    """The entry point of an experiment module: its gin file first, then the user's."""
    logging.basicConfig(level=logging.WARNING)
    config.enable_compilation_cache()
    args = config.parse(description, default_gin_files=[str(default_gin_file)])
    try:
        run(args.workdir or default_workdir, title=default_gin_file.stem)
    except (config.ConfigError, mesh.MeshError) as err:  # settings, before any compile
        sys.exit(f"error: {err}")
