"""A GKD experiment end to end: teacher, student, fine-tuning, distillation, evaluation.

Stages, each resumable from its own checkpoints in the workdir:
  1. teacher_sft (optional): fine-tune the teacher on the task's targets.
  2. student_sft: a student cut from the teacher's layers (or loaded) is fine-tuned
     briefly, since GKD students start from supervised fine-tuning.
  3. distill: GKD steps (rollout by the lambda mixture, then the update step), with
     validation every `eval_every` steps.
Test-set scores of the teacher, the student before distillation and after it go to a
results table (markdown + JSON) and a plot of the metric and divergence against step.
Every setting is a gin parameter of `Task`, `Models`, `Schedule`, `RolloutSampling`,
`DistillConfig` or `MixtureConfig`.
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
from jax.sharding import Mesh

from opd_jax import (
    checkpoints,
    config,
    data,
    distill,
    evaluation,
    model,
    parallel,
    reporting,
    rollout,
    sampling,
    sharding,
    train_checkpoint,
    trainer,
)
from opd_jax import tokenizer as tokenizer_lib
from opd_jax.model import ModelConfig, Params


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
    """teacher / student: a packaged preset name, an HF directory or a GGUF file. With no
    student, the student is a layer-pruned teacher: `student_layers` is a count of evenly
    spaced layers, or the tuple of layer indices to keep. The fine-tuning learning rates
    are separate because a pruned student needs large steps to repair itself, which would
    wreck a full pretrained teacher."""

    teacher: str = "smollm2-135m-instruct"
    student: str | None = None
    student_layers: int | tuple[int, ...] = 8
    teacher_sft_steps: int = 0
    student_sft_steps: int = 30
    teacher_sft_learning_rate: float = 1e-4
    student_sft_learning_rate: float = 1e-4


@gin.configurable
@dataclasses.dataclass(frozen=True)
class Schedule:
    """Sizes and cadence. eval_examples: validation examples scored every `eval_every`
    distillation steps; test_examples: test examples in the final table (None: all).
    rl_group_size: completions per prompt when RL is on (DistillConfig.rl_alpha < 1)."""

    steps: int = 40
    batch_size: int = 4
    prompt_len: int = 128
    completion_len: int = 64
    checkpoint_every: int = 10
    eval_every: int = 20
    eval_examples: int | None = 24
    test_examples: int | None = 50
    eval_batch_size: int = 8
    rl_group_size: int = 1
    seed: int = 0


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


def load_models(models: Models) -> tuple[ModelConfig, Params, ModelConfig, Params]:
    """(teacher config, teacher params, student config, student params)."""
    teacher_config, teacher_params = checkpoints.load(models.teacher)
    if models.student is not None:
        student_config, student_params = checkpoints.load(models.student)
    else:
        keep = models.student_layers
        if isinstance(keep, int):
            keep = model.evenly_spaced_layers(teacher_config.n_layers, keep)
        student_config, student_params = model.select_layers(teacher_params, teacher_config, keep)
    distill.check_vocab(teacher_config, student_config)
    return teacher_config, teacher_params, student_config, student_params


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
    mesh: Mesh | None = None,
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
            params, prompt_BxP, prompt_valid_BxP, jax.random.key(0), model_config, settings, mesh
        )
        samples = sharding.to_host(samples)
        return decode_completions(tokenizer, samples.tokens_BxN, samples.lengths_B)

    return generate


# ----------------------------------------------------------------------------- stages


def _repeat_rows(arrays: Sequence[np.ndarray], times: int) -> tuple[np.ndarray, ...]:
    return tuple(np.repeat(a, times, axis=0) for a in arrays)


def sharded_batch(
    split: data.Split,
    tokenizer: tokenizer_lib.Tokenizer,
    spec: data.BatchSpec,
    seed: int,
    step: int,
    mesh: Mesh,
    repeat: int = 1,
) -> tuple[data.Batch, tuple[jax.Array, ...]]:
    """The step's batch with each prompt repeated `repeat` times, as global arrays
    (prompt, prompt_valid, target, target_mask); this process builds only its own rows,
    and the host-side `Batch` it returns holds just those."""
    global_rows = spec.batch_size * repeat
    rows = parallel.process_rows(mesh, global_rows)
    batch = data.batch_at(
        split, tokenizer, spec, seed, step, slice(rows.start // repeat, rows.stop // repeat)
    )
    local = (
        batch.prompt_BxP,
        batch.prompt_valid_BxP,
        batch.target_BxN,
        batch.target_valid_BxN.astype(np.float32),
    )
    return batch, parallel.global_batch(_repeat_rows(local, repeat), mesh, global_rows)


def place_model(
    params: Params, model_config: ModelConfig, mesh: Mesh, role: str
) -> tuple[Params, Any]:
    """(params on the mesh, their shardings), laid out by `Layout`'s rules for `role`."""
    shardings = parallel.param_shardings(model_config, mesh, parallel.Layout().rules(role))
    return parallel.place_params(params, shardings), shardings


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
) -> Params:
    """Supervised fine-tuning on the targets; returns `params` unchanged for 0 steps. The
    params (placed in `params_sharding`) keep their layout."""
    if steps == 0:
        return params
    cfg = distill.DistillConfig(learning_rate=learning_rate, warmup_steps=min(5, steps))
    optimizer = distill.make_optimizer(cfg, steps)
    state = parallel.create_train_state(params, optimizer, schedule.seed, params_sharding)
    mesh = jax.tree.leaves(params_sharding)[0].mesh
    shardings = parallel.step_shardings(state, None, mesh)
    update = distill.make_sft_step(model_config, 1, optimizer, shardings, cfg.remat)

    def step_fn(state, step):
        _, arrays = sharded_batch(split, tokenizer, spec, schedule.seed, step, mesh)
        return update(state, None, distill.DistillBatch(*arrays))

    stage = trainer.Stage(name, workdir / name, steps, schedule.checkpoint_every, model_config)
    return trainer.run(stage, state, step_fn, writer).params


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


# ----------------------------------------------------------------------------- run


def _check_schedule(schedule: Schedule, cfg: distill.DistillConfig, mesh: Mesh) -> None:
    rl_on = cfg.rl_alpha < 1.0
    per_prompt = schedule.rl_group_size if rl_on else 1
    if schedule.batch_size % (per_prompt * cfg.grad_accum):
        raise config.ConfigError(
            f"Schedule.batch_size={schedule.batch_size} must be a multiple of "
            f"rl_group_size x grad_accum = {per_prompt} x {cfg.grad_accum}"
        )
    shards = sharding.batch_shards(mesh)
    if schedule.batch_size % (shards * per_prompt) or schedule.eval_batch_size % shards:
        raise config.ConfigError(
            f"Schedule.batch_size={schedule.batch_size} must be a multiple of data x fsdp x "
            f"rl_group_size = {shards} x {per_prompt}, and Schedule.eval_batch_size="
            f"{schedule.eval_batch_size} of data x fsdp = {shards} (mesh {dict(mesh.shape)})"
        )
    if schedule.eval_every < 1 or schedule.checkpoint_every < 1 or schedule.steps < 1:
        raise config.ConfigError("Schedule.steps, eval_every and checkpoint_every must be >= 1")


def warn_about_cut_prompts(
    splits: Mapping[str, data.Split],
    template: data.PromptTemplate,
    tokenizer: tokenizer_lib.Tokenizer,
    prompt_len: int,
) -> None:
    """Logs a warning per split whose rendered prompts overflow Schedule.prompt_len."""
    for name, split in splits.items():
        cut, looked_at, longest = data.count_cut_prompts(split, template, tokenizer, prompt_len)
        if cut:
            logging.warning(
                "%d of the first %d %s prompts are longer than Schedule.prompt_len=%d "
                "(longest %d tokens): the end of their input is cut",
                cut,
                looked_at,
                name,
                prompt_len,
                longest,
            )


def run(workdir: str | pathlib.Path, title: str) -> list[dict[str, Any]]:
    """Runs (or resumes) the experiment configured by gin; returns the results rows."""
    workdir = pathlib.Path(workdir)
    task, models, schedule = Task(), Models(), Schedule()
    cfg, mixture, rollout_sampling = (
        distill.DistillConfig(),
        rollout.MixtureConfig(),
        RolloutSampling(),
    )
    mesh = sharding.make_mesh()
    _check_schedule(schedule, cfg, mesh)
    rollout.check_rollouts(cfg, rollout_sampling, mixture.on_policy_fraction)

    with parallel.main_process_first("inputs ready"):  # they may be built into a shared cache
        tokenizer = tokenizer_lib.load(models.teacher)
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
        teacher_config, teacher_params, student_config, student_params = load_models(models)
    template = task.template()
    warn_about_cut_prompts(splits, template, tokenizer, schedule.prompt_len)
    group = schedule.rl_group_size if cfg.rl_alpha < 1.0 else 1
    train_spec = data.BatchSpec(
        schedule.batch_size // group, schedule.prompt_len, schedule.completion_len, template
    )
    sft_spec = dataclasses.replace(train_spec, batch_size=schedule.batch_size)
    eval_spec = dataclasses.replace(train_spec, batch_size=schedule.eval_batch_size, shuffle=False)

    for model_config in (teacher_config, student_config):
        sharding.check_model_fits_mesh(model_config, mesh)
    teacher_params, teacher_sharding = place_model(teacher_params, teacher_config, mesh, "teacher")
    student_params, student_sharding = place_model(student_params, student_config, mesh, "student")
    for stage, stage_config in (
        ("teacher_sft", teacher_config),
        ("student_sft", student_config),
        ("distill", student_config),
    ):
        train_checkpoint.check_directory(workdir / stage, stage_config)
    parallel.barrier("workdir checked")  # nothing is written before every process checked
    if reporting.is_main_process():
        config.save_operative_config(workdir)
    with reporting.MetricsWriter(workdir / "logs") as writer:
        tune = lambda name, params, model_config, steps, learning_rate, shardings: fine_tune(
            name,
            workdir,
            params,
            model_config,
            splits["train"],
            tokenizer,
            sft_spec,
            steps,
            learning_rate,
            schedule,
            writer,
            shardings,
        )
        teacher_params = tune(
            "teacher_sft",
            teacher_params,
            teacher_config,
            models.teacher_sft_steps,
            models.teacher_sft_learning_rate,
            teacher_sharding,
        )
        student_params = tune(
            "student_sft",
            student_params,
            student_config,
            models.student_sft_steps,
            models.student_sft_learning_rate,
            student_sharding,
        )

        evals = EvalCache(workdir / "evals.json")

        def score(key, params, model_config, split, max_examples, log_step=None):
            """Cached evaluation; logged as eval/<model>_<metric> when first computed."""
            fresh = key not in evals.results
            generate = greedy_generate_fn(
                params, model_config, tokenizer, schedule.completion_len, mesh
            )
            result = evals.get(
                key,
                lambda: evaluation.evaluate(
                    generate, splits[split], tokenizer, eval_spec, task.metric, max_examples
                ),
            )
            if fresh and log_step is not None:
                name = key.split("/")[0]
                metrics = {f"eval/{name}_{k}": v for k, v in result["metrics"].items()}
                writer.write(log_step, metrics)
            return result

        teacher_test = score(
            "teacher/test", teacher_params, teacher_config, "test", schedule.test_examples
        )
        start_test = score(
            "student_start/test", student_params, student_config, "test", schedule.test_examples
        )
        score("teacher/eval/0", teacher_params, teacher_config, "eval", schedule.eval_examples, 0)
        score("student/eval/0", student_params, student_config, "eval", schedule.eval_examples, 0)

        optimizer = distill.make_optimizer(cfg, schedule.steps)
        state = parallel.create_train_state(
            student_params, optimizer, schedule.seed, student_sharding
        )
        shardings = parallel.step_shardings(state, teacher_sharding, mesh)
        update = distill.make_update_step(student_config, teacher_config, cfg, optimizer, shardings)
        sample_cfg = rollout_sampling.config(schedule.completion_len, tokenizer)
        roll = rollout.make_rollout(student_config, teacher_config, mixture, sample_cfg, shardings)
        reward = reward_fn(task)

        def distill_step(state, step):
            batch, arrays = sharded_batch(
                splits["train"], tokenizer, train_spec, schedule.seed, step, mesh, group
            )
            distill_batch, on_B = roll(state, teacher_params, *arrays)
            extra = {"on_policy_fraction": jnp.mean(on_B.astype(jnp.float32))}
            if cfg.rl_alpha < 1.0:  # each process scores its own rows
                tokens = parallel.local_rows(distill_batch.completion_BxN)
                mask = parallel.local_rows(distill_batch.completion_mask_BxN)
                texts = decode_completions(tokenizer, tokens, mask.sum(axis=1).astype(int))
                examples = [e for e in batch.examples for _ in range(group)]
                rewards = np.array(
                    [reward(t, e) for t, e in zip(texts, examples, strict=True)], np.float32
                )
                advantages = rollout.group_advantages(rewards, group)
                rows = schedule.batch_size
                distill_batch = distill_batch.replace(
                    advantage_B=parallel.global_batch(advantages, mesh, rows)
                )
                extra["reward"] = jnp.mean(parallel.global_batch(rewards, mesh, rows))
            state, metrics = update(state, teacher_params, distill_batch)
            return state, {**metrics, **extra}

        def after_step(step, state):
            if step % schedule.eval_every == 0 or step == schedule.steps:
                key = f"student/eval/{step}"
                score(key, state.params, student_config, "eval", schedule.eval_examples, step)

        stage = trainer.Stage(
            "distill",
            workdir / "distill",
            schedule.steps,
            schedule.checkpoint_every,
            student_config,
        )
        state = trainer.run(stage, state, distill_step, writer, after_step)
        final_test = score(
            f"student_distilled/test/{schedule.steps}",
            state.params,
            student_config,
            "test",
            schedule.test_examples,
        )

    rows = [
        _row("teacher", teacher_config, teacher_test),
        _row("student before distillation", student_config, start_test),
        _row("student after distillation", student_config, final_test),
    ]
    samples = {
        name: evals_result["samples"]
        for name, evals_result in (
            ("teacher", teacher_test),
            ("student before", start_test),
            ("student after", final_test),
        )
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


def main(
    description: str,
    default_gin_file: pathlib.Path,
    default_workdir: str,
    run_fn: Callable[[str | pathlib.Path, str], Any] = run,
) -> None:
    """The entry point of an experiment module: its gin file first, then the user's;
    `run_fn` is the experiment (GKD's `run` unless given)."""
    logging.basicConfig(level=logging.WARNING)
    args = config.parse(description, default_gin_files=[str(default_gin_file)])
    try:
        run_fn(args.workdir or default_workdir, title=default_gin_file.stem)
    except (config.ConfigError, sharding.MeshError) as err:  # settings, before any compile
        sys.exit(f"error: {err}")
