"""Greedy decoding throughput: our jitted sampler against transformers `generate`.

Both sides run SmolLM2-135M-Instruct in float32 on the same random prompts, with a KV
cache, and generate exactly max_new_tokens per row (we pass no EOS id; transformers gets
min_new_tokens), so tokens/second compare like for like. Compile time is reported
apart from our throughput; both sides get one untimed warm-up run first. Thread counts
are left at each library's default.

    python -m benchmarks.sampling --batch-sizes 1 8 32 --prompt-len 128 --new-tokens 128
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from opd_jax import assets, checkpoints, sampling

MODEL = "smollm2-135m-instruct"


def _best_seconds(run: Callable[[], object], repeats: int) -> float:
    """Fastest of `repeats` timed calls: on a shared machine noise only ever adds time."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def _ours(
    params, config, prompt_BxP: np.ndarray, new_tokens: int, repeats: int
) -> tuple[float, float]:
    """(compile seconds, best run seconds) of the jitted sampler."""
    settings = sampling.SamplingConfig(max_new_tokens=new_tokens, temperature=0.0)
    tokens_BxP = jnp.asarray(prompt_BxP)
    valid_BxP = jnp.ones(prompt_BxP.shape, bool)
    key = jax.random.key(0)
    start = time.perf_counter()
    compiled = sampling.sample_jit.lower(
        params, tokens_BxP, valid_BxP, key, model_config=config, config=settings
    ).compile()
    compile_s = time.perf_counter() - start

    def run() -> None:
        samples = compiled(params, tokens_BxP, valid_BxP, key)
        lengths_B = np.asarray(samples.lengths_B)  # blocks until done
        assert (lengths_B == new_tokens).all(), lengths_B

    run()
    return compile_s, _best_seconds(run, repeats)


def _theirs(reference, prompt_BxP: np.ndarray, new_tokens: int, repeats: int) -> float:
    """Best run seconds of transformers greedy `generate` with its KV cache."""
    import torch

    input_ids = torch.from_numpy(prompt_BxP.astype(np.int64))

    def run() -> None:
        with torch.inference_mode():
            out = reference.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                do_sample=False,
                use_cache=True,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
            )
        assert out.shape[1] == prompt_BxP.shape[1] + new_tokens, out.shape

    run()
    return _best_seconds(run, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per side; best kept")
    args = parser.parse_args()

    import torch
    import transformers

    config, params = checkpoints.load(MODEL)
    path = assets.fetch(MODEL)
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    print(
        f"jax {jax.__version__} on {jax.devices()[0].device_kind}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), transformers {transformers.__version__}; "
        f"prompt {args.prompt_len}, {args.new_tokens} new tokens, fp32, greedy, "
        f"best of {args.repeats}\n"
    )
    print("| batch | ours tok/s | transformers tok/s | ours / transformers | our compile s |")
    print("|---:|---:|---:|---:|---:|")
    rng = np.random.default_rng(0)
    for batch in args.batch_sizes:
        prompt_BxP = rng.integers(3, config.vocab_size, (batch, args.prompt_len), np.int32)
        compile_s, ours_s = _ours(params, config, prompt_BxP, args.new_tokens, args.repeats)
        theirs_s = _theirs(reference, prompt_BxP, args.new_tokens, args.repeats)
        tokens = batch * args.new_tokens
        print(
            f"| {batch} | {tokens / ours_s:.1f} | {tokens / theirs_s:.1f} | "
            f"{theirs_s / ours_s:.2f}x | {compile_s:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
