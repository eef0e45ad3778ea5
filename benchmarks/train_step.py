"""One on-policy GKD step, timed by part, side by side with TRL's `GKDTrainer`, and our
update step's memory with and without vocabulary chunking.

Teacher SmolLM2-135M-Instruct, student its layer-pruned copy, float32, random prompts.
The step is: sample `--new-tokens` from the student at temperature 1 (lambda = 1), then
teacher forward, student forward and backward, generalized JSD(0.5), AdamW. Ours is the
jitted rollout and the jitted update; the teacher's share is timed by a separately jitted
teacher forward over the same sequences, and learner = update - teacher. TRL's is
`GKDTrainer.training_step` (HF `generate`, then its loss and backward) plus the
optimizer step, on the same student exported to safetensors and the same teacher GGUF;
it runs with gradient checkpointing off, so its `generate` keeps the KV cache (its
fastest setting). Memory is XLA's own account of our compiled update (temporaries).

    python -m benchmarks.train_step --batch 8 --prompt-len 128 --new-tokens 64
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from opd_jax import assets, checkpoints, distill, gkd, model, sampling, train_state
from opd_jax import update as update_lib

MODEL = "smollm2-135m-instruct"


def _best_seconds(run: Callable[[], object], repeats: int) -> float:
    """Fastest of `repeats` calls after one warm-up (compile) call: on a shared machine
    noise only ever adds time."""
    jax.block_until_ready(run())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(run())
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--student-layers", type=int, default=8)
    parser.add_argument("--chunk", type=int, default=16, help="vocab_chunk of the chunked run")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    teacher_config, teacher_params = checkpoints.load(MODEL)
    keep = model.evenly_spaced_layers(teacher_config.n_layers, args.student_layers)
    student_config, student_params = model.select_layers(teacher_params, teacher_config, keep)
    rng = np.random.default_rng(0)
    prompt = jnp.asarray(rng.integers(3, teacher_config.vocab_size, (args.batch, args.prompt_len)))
    prompt_valid = jnp.ones(prompt.shape, bool)
    target = jnp.zeros((args.batch, args.new_tokens), jnp.int32)
    target_valid = jnp.ones(target.shape, bool)
    inputs = (prompt, prompt_valid, target, target_valid, prompt, prompt_valid)
    sample_cfg = sampling.SamplingConfig(max_new_tokens=args.new_tokens)  # no EOS: full length
    roles = update_lib.Roles(student_config, teacher_config)
    roll = update_lib.make_rollout(roles, gkd.MixtureConfig(1.0), sample_cfg)

    @jax.jit
    def teacher_forward(params, batch: train_state.DistillBatch) -> jax.Array:
        hidden = distill.completion_hidden(
            params,
            teacher_config,
            batch.prompt_BxP,
            batch.prompt_valid_BxP,
            batch.completion_BxN,
            batch.completion_mask_BxN,
        )
        return model.logits_from_hidden(params, hidden, teacher_config)

    print(
        f"jax {jax.__version__} on {jax.devices()[0].device_kind}; teacher {MODEL} "
        f"({teacher_config.n_layers} layers), student {len(keep)} layers; batch {args.batch}, "
        f"prompt {args.prompt_len}, {args.new_tokens} sampled tokens, fp32, best of "
        f"{args.repeats}\n"
    )
    rows = {}
    for chunk in (0, args.chunk):
        rows[f"opd-jax, vocab_chunk {chunk or 'off'}"] = _measure(
            chunk,
            student_config,
            teacher_config,
            student_params,
            teacher_params,
            roll,
            teacher_forward,
            inputs,
            args.repeats,
        )
    rows["TRL GKDTrainer"] = _measure_trl(
        student_config, student_params, np.asarray(prompt), args.new_tokens, args.repeats
    )
    theirs = rows["TRL GKDTrainer"]["total"]
    print("| step | sampling s | teacher s | learner s | total s | TRL / this | update temp MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, parts in rows.items():
        memory = f"{parts['temp_mib']:.0f}" if "temp_mib" in parts else "n/a"
        print(
            f"| {name} | {parts['sampling']:.2f} | {parts['teacher']:.2f} | "
            f"{parts['learner']:.2f} | {parts['total']:.2f} | {theirs / parts['total']:.2f}x "
            f"| {memory} |",
            flush=True,
        )


def _measure(
    chunk,
    student_config,
    teacher_config,
    student_params,
    teacher_params,
    roll,
    teacher_forward,
    inputs,
    repeats,
) -> dict[str, float]:
    """Seconds of the rollout, the teacher forward and the whole update; update temp MiB."""
    cfg = distill.DistillConfig(divergence="jsd", vocab_chunk=chunk)
    optimizer = train_state.make_optimizer(train_state.OptimizerConfig(), total_steps=1000)
    roles = update_lib.Roles(student_config, teacher_config)
    update = update_lib.make_update_step(roles, cfg, optimizer)
    state = train_state.init_train_state(student_params, optimizer, seed=0)
    frozen = update_lib.frozen_arrays(roles, student_params, teacher_params)
    batch, _ = roll(state, frozen, *inputs)
    copy_s = _best_seconds(lambda: jax.tree.map(jnp.copy, state), repeats)
    update_s = _best_seconds(lambda: update(jax.tree.map(jnp.copy, state), frozen, batch), repeats)
    memory = update.lower(state, frozen, batch).compile().memory_analysis()
    sampling_s = _best_seconds(lambda: roll(state, frozen, *inputs), repeats)
    teacher_s = _best_seconds(lambda: teacher_forward(teacher_params, batch), repeats)
    update_s -= copy_s  # the copy only keeps the donated state alive between repeats
    return {
        "sampling": sampling_s,
        "teacher": teacher_s,
        "learner": update_s - teacher_s,
        "total": sampling_s + update_s,
        "temp_mib": memory.temp_size_in_bytes / 2**20,
    }


def _measure_trl(student_config, student_params, prompt_BxP, new_tokens, repeats):
    """The same step through TRL's GKDTrainer, timed by part like ours."""
    import datasets
    import torch
    import transformers
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    path = assets.fetch(MODEL)
    load = transformers.AutoModelForCausalLM.from_pretrained
    teacher = load(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoints.save_hf_dir(student_config, student_params, tmp)
        student = load(tmp, dtype=torch.float32)
        args = GKDConfig(
            output_dir=tmp,
            per_device_train_batch_size=prompt_BxP.shape[0],
            lmbda=1.0,
            beta=0.5,
            temperature=1.0,
            max_new_tokens=new_tokens,
            gradient_checkpointing=False,
            use_cpu=True,
            report_to=[],
        )
        messages = [[{"role": "user", "content": "-"}, {"role": "assistant", "content": "-"}]]
        trainer = GKDTrainer(
            model=student,
            teacher_model=teacher,
            args=args,
            train_dataset=datasets.Dataset.from_dict({"messages": messages}),
            processing_class=tokenizer,
        )
    trainer.generation_config.min_new_tokens = new_tokens  # full length, like ours
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # what Trainer.train sets per step
    student.train()
    prompts = torch.from_numpy(prompt_BxP.astype(np.int64))
    inputs = {
        "prompts": prompts,
        "prompt_attention_mask": torch.ones_like(prompts),
        "input_ids": prompts,
        "attention_mask": torch.ones_like(prompts),
        "labels": torch.full_like(prompts, -100),
    }

    def generate():
        with torch.no_grad():
            return trainer.generate_on_policy_outputs(student, inputs, trainer.generation_config)

    def step():
        loss = trainer.training_step(student, dict(inputs))
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()
        return loss

    sequences, attention, _ = generate()

    def teacher_forward():
        with torch.no_grad():
            return teacher(input_ids=sequences, attention_mask=attention).logits

    sampling_s = _best_seconds(generate, repeats)
    teacher_s = _best_seconds(teacher_forward, repeats)
    total_s = _best_seconds(step, repeats)
    return {
        "sampling": sampling_s,
        "teacher": teacher_s,
        "learner": total_s - sampling_s - teacher_s,
        "total": total_s,
    }


if __name__ == "__main__":
    main()
