"""One on-policy GKD step, timed by part, and the update step's memory with and without
vocabulary chunking.

Teacher SmolLM2-135M-Instruct, student its layer-pruned copy, float32, random prompts.
The step is: sample `--new-tokens` from the student (the jitted rollout at lambda = 1),
then the jitted update (teacher forward, student forward and backward, divergence,
AdamW). The teacher's share is timed by a separately jitted teacher forward over the
same sequences; learner = update - teacher. Memory is XLA's own account of the
compiled update (temporaries), so it is exact and needs no profiler.

    python -m benchmarks.train_step --batch 8 --prompt-len 128 --new-tokens 64
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from opd_jax import checkpoints, distill, model, rollout, sampling

MODEL = "smollm2-135m-instruct"


def _best_seconds(run: Callable[[], object], repeats: int) -> float:
    """Fastest of `repeats` calls after one warm-up (compile) call."""
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
    inputs = (prompt, prompt_valid, target, target_valid)
    sample_cfg = sampling.SamplingConfig(max_new_tokens=args.new_tokens)  # no EOS: full length
    roll = rollout.make_rollout(
        student_config, teacher_config, rollout.MixtureConfig(1.0), sample_cfg
    )

    @jax.jit
    def teacher_forward(params, batch: distill.DistillBatch) -> jax.Array:
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
    print("| vocab_chunk | sampling s | teacher s | learner s | total s | update temp MiB |")
    print("|---:|---:|---:|---:|---:|---:|")
    for chunk in (0, args.chunk):
        parts = _measure(
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
        print(
            f"| {chunk or 'off'} | {parts['sampling']:.2f} | {parts['teacher']:.2f} | "
            f"{parts['update'] - parts['teacher']:.2f} | {parts['sampling'] + parts['update']:.2f} "
            f"| {parts['temp_mib']:.0f} |",
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
    optimizer = distill.make_optimizer(cfg, total_steps=1000)
    update = distill.make_update_step(student_config, teacher_config, cfg, optimizer)
    state = distill.init_train_state(student_params, optimizer, seed=0)
    batch, _ = roll(state, teacher_params, *inputs)
    copy_s = _best_seconds(lambda: jax.tree.map(jnp.copy, state), repeats)
    update_s = _best_seconds(
        lambda: update(jax.tree.map(jnp.copy, state), teacher_params, batch), repeats
    )
    memory = update.lower(state, teacher_params, batch).compile().memory_analysis()
    return {
        "sampling": _best_seconds(lambda: roll(state, teacher_params, *inputs), repeats),
        "teacher": _best_seconds(lambda: teacher_forward(teacher_params, batch), repeats),
        # the copy only keeps the donated state alive between repeats
        "update": update_s - copy_s,
        "temp_mib": memory.temp_size_in_bytes / 2**20,
    }


if __name__ == "__main__":
    main()
