"""An OPSD experiment end to end: one model, privileged teacher context, LoRA student.

The student (the model plus LoRA adapters, or all its weights) samples completions to
the rendered question; the teacher, the same model with the privileged block in its
context, scores them; the student is trained toward the teacher's token distributions
(`self_distill`). Test-set scores of the teacher with its privileged context (an upper
reference), the student before and the student after go to the results table, as in
the GKD experiment, whose `Task`, `Schedule`, `RolloutSampling` and `DistillConfig`
this one shares. Its own settings: `SelfDistillRun`, `PrivilegedContext`,
`SelfDistillConfig` (teacher kind) and `LoraConfig`.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Mapping
from typing import Any

import gin
import jax.numpy as jnp

from opd_jax import (
    checkpoints,
    config,
    data,
    distill,
    evaluation,
    experiment,
    lora,
    reporting,
    rollout,
    self_distill,
    train_checkpoint,
    trainer,
)
from opd_jax import tokenizer as tokenizer_lib


@gin.configurable
@dataclasses.dataclass(frozen=True)
class SelfDistillRun:
    """model: a preset name, HF directory or GGUF file (student and teacher alike).
    use_lora: train LoRA adapters (`LoraConfig`) rather than every weight.
    teacher_prompt_len: the width of the teacher's contexts (question + privileged block);
      Schedule.prompt_len is the student's. A run that would cut either refuses to start.
    export_hf: also write the trained student, adapters merged, as HF safetensors.
    """

    model: str = "smollm2-135m-instruct"
    use_lora: bool = True
    teacher_prompt_len: int = 192
    export_hf: bool = False


class PromptCutError(config.ConfigError):
    """A rendered student or teacher prompt is longer than its width."""


def refuse_cut_prompts(
    splits: Mapping[str, data.Split],
    templates: Mapping[str, tuple[data.PromptTemplate, int, str]],
    tokenizer: tokenizer_lib.Tokenizer,
) -> None:
    """Cut math prompts lose their numbers and a cut teacher context loses part of the
    question: either makes the comparison meaningless, so the run stops and names the
    width to set. `templates`: who -> (template, width, gin name of the width)."""
    for who, (template, width, setting) in templates.items():
        for name, split in splits.items():
            cut, looked_at, longest = data.count_cut_prompts(split, template, tokenizer, width)
            if cut:
                raise PromptCutError(
                    f"{cut} of the first {looked_at} {name} {who} prompts are longer than "
                    f"{setting}={width} (longest {longest} tokens); set {setting} >= {longest}"
                )


def _context_arrays(examples, tokenizer, student_spec, teacher_spec):
    student = data.make_batch(examples, tokenizer, student_spec)[:2]
    teacher = data.make_batch(examples, tokenizer, teacher_spec)[:2]
    return tuple(jnp.asarray(a) for a in (*student, *teacher))


def run(workdir: str | pathlib.Path, title: str) -> list[dict[str, Any]]:
    """Runs (or resumes) the OPSD experiment configured by gin; returns the results rows."""
    workdir = pathlib.Path(workdir)
    task, schedule, settings = experiment.Task(), experiment.Schedule(), SelfDistillRun()
    cfg, sd, ctx = (
        distill.DistillConfig(),
        self_distill.SelfDistillConfig(),
        self_distill.PrivilegedContext(),
    )
    lora_cfg = lora.LoraConfig() if settings.use_lora else None
    rollout_sampling = experiment.RolloutSampling()
    rollout.check_rollouts(cfg, rollout_sampling, on_policy_fraction=1.0)
    if schedule.batch_size % cfg.grad_accum:
        raise config.ConfigError(
            f"Schedule.batch_size={schedule.batch_size} is not a multiple of "
            f"DistillConfig.grad_accum={cfg.grad_accum}"
        )

    tokenizer = tokenizer_lib.load(settings.model)
    splits = {
        name: data.load_split(task.dataset, split, task.data_dir, task.input_key, task.target_key)
        for name, split in (
            ("train", task.train_split),
            ("eval", task.eval_split),
            ("test", task.test_split),
        )
    }
    student_template = task.template()
    teacher_template = self_distill.teacher_template(student_template, ctx)
    self_distill.check_contexts(splits["train"][0], student_template, ctx, tokenizer, tokenizer)
    refuse_cut_prompts(
        splits,
        {
            "student": (student_template, schedule.prompt_len, "Schedule.prompt_len"),
            "teacher": (
                teacher_template,
                settings.teacher_prompt_len,
                "SelfDistillRun.teacher_prompt_len",
            ),
        },
        tokenizer,
    )
    student_spec = data.BatchSpec(
        schedule.batch_size, schedule.prompt_len, schedule.completion_len, student_template
    )
    teacher_spec = dataclasses.replace(
        student_spec, prompt_len=settings.teacher_prompt_len, template=teacher_template
    )
    eval_specs = {
        who: dataclasses.replace(spec, batch_size=schedule.eval_batch_size, shuffle=False)
        for who, spec in (("student", student_spec), ("teacher", teacher_spec))
    }

    model_config, base = checkpoints.load(settings.model)
    shape = self_distill.StudentShape(model_config, lora_cfg, sd.teacher)
    train_checkpoint.check_directory(workdir / "opsd", shape)
    config.save_operative_config(workdir)
    evals = experiment.EvalCache(workdir / "evals.json")

    def score(key, params, who, split, max_examples, writer=None, log_step=None):
        """Cached greedy evaluation; logged as eval/<model>_<metric> when first computed."""
        fresh = key not in evals.results
        generate = experiment.greedy_generate_fn(
            params, model_config, tokenizer, schedule.completion_len
        )
        result = evals.get(
            key,
            lambda: evaluation.evaluate(
                generate, splits[split], tokenizer, eval_specs[who], task.metric, max_examples
            ),
        )
        if fresh and writer is not None:
            name = key.split("/")[0]
            writer.write(log_step, {f"eval/{name}_{k}": v for k, v in result["metrics"].items()})
        return result

    with reporting.MetricsWriter(workdir / "logs") as writer:
        teacher_test = score("teacher/test", base, "teacher", "test", schedule.test_examples)
        start_test = score("student_start/test", base, "student", "test", schedule.test_examples)
        score("student/eval/0", base, "student", "eval", schedule.eval_examples, writer, 0)

        optimizer = distill.make_optimizer(cfg, schedule.steps)
        update = self_distill.make_update_step(model_config, cfg, sd, lora_cfg, optimizer)
        sample_cfg = rollout_sampling.config(schedule.completion_len, tokenizer)
        roll = self_distill.make_rollout(model_config, lora_cfg, sample_cfg)

        def step_fn(state, step):
            indices = data.example_indices(
                step, schedule.batch_size, len(splits["train"]), schedule.seed
            )
            examples = [splits["train"][int(i)] for i in indices]
            arrays = _context_arrays(examples, tokenizer, student_spec, teacher_spec)
            batch = roll(state, base, *arrays)
            return update(state, base, batch)

        def student_of(state):
            return self_distill.student_weights(state.params, base, lora_cfg)

        def after_step(step, state):
            if step % schedule.eval_every == 0 or step == schedule.steps:
                key = f"student/eval/{step}"
                score(
                    key, student_of(state), "student", "eval", schedule.eval_examples, writer, step
                )

        stage = trainer.Stage(
            "opsd", workdir / "opsd", schedule.steps, schedule.checkpoint_every, shape
        )
        state = self_distill.init_state(base, lora_cfg, sd, optimizer, schedule.seed)
        state = trainer.run(stage, state, step_fn, writer, after_step)
        final_params = student_of(state)
        final_test = score(
            f"student_after/test/{schedule.steps}",
            final_params,
            "student",
            "test",
            schedule.test_examples,
        )
    if settings.export_hf and reporting.is_main_process():
        checkpoints.save_hf_dir(model_config, final_params, workdir / "student_hf")

    rows = [
        _row("teacher with privileged context", teacher_test),
        _row("student before", start_test),
        _row("student after", final_test),
    ]
    samples = {
        row["model"]: r["samples"]
        for row, r in zip(rows, (teacher_test, start_test, final_test), strict=True)
    }
    keys = [f"eval/student_{task.primary_metric}", "opsd/divergence"]
    experiment.report(workdir, title, rows, samples, keys, final_test["num_examples"])
    return rows


def _row(name: str, result: Mapping[str, Any]) -> dict[str, Any]:
    return {"model": name, **{k: round(v, 2) for k, v in result["metrics"].items()}}
