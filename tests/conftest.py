"""Shared fixtures: the real packaged checkpoints and their transformers references, and
a clean gin config around every test.

Loading a real model costs seconds, so each is loaded once per test session and
shared by every test file that needs it.
"""

import functools
import pathlib

import gin
import pytest

from opd_jax import assets, checkpoints, config

# The suite compiles the same small programs in many tests and in the processes some
# tests start; a persistent cache compiles each once per machine, even the sub-second ones.
config.enable_compilation_cache(min_compile_seconds=0.0)


@pytest.fixture(autouse=True)
def clean_gin():
    """No gin binding leaks from one test into the next."""
    gin.clear_config()
    yield
    gin.clear_config()


@functools.cache
def packaged_path(name: str) -> pathlib.Path:
    return assets.fetch(name)


@functools.cache
def ours(name: str):
    """(config, params) loaded by our GGUF loader, float32."""
    return checkpoints.load(name)


@functools.cache
def reference_model(name: str):
    """The transformers model loaded from the same GGUF file, float32, eval mode."""
    import torch
    import transformers

    path = packaged_path(name)
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()


@functools.cache
def reference_tokenizer(name: str):
    import transformers

    path = packaged_path(name)
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory) -> pathlib.Path:
    """A user's checkpoint directory as a run reads one: a two-layer Llama with SmolLM2's
    real vocabulary and tokenizer (config.json, safetensors, tokenizer files). Random
    weights, scaled up so its next-token distributions are peaked rather than uniform
    over 49152 tokens: a student cut from it starts measurably far from it. Small enough
    that a whole run compiles in seconds."""
    import jax

    from opd_jax import model
    from opd_jax import tokenizer as tokenizer_lib

    config = model.ModelConfig(
        vocab_size=49152,
        d_model=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=16,
        mlp_dim=128,
        rope=model.RopeConfig(theta=100000.0),
    )
    params = model.init_params(config, jax.random.key(0))
    params = jax.tree.map(lambda w: 4.0 * w if w.ndim >= 2 else w, params)
    params["final_norm"] = 4.0 * params["final_norm"]  # entropy ~2 nats, not log(49152)
    directory = checkpoints.save_hf_dir(config, params, tmp_path_factory.mktemp("tiny_teacher"))
    tokenizer_lib.load("smollm2-135m-instruct").save_hf(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_student_dir(tiny_teacher_dir, tmp_path_factory) -> pathlib.Path:
    """The tiny teacher with Gaussian noise of 0.2 x each weight matrix's spread: a student
    a few nats of KL away whose error every context shares, so any sound objective can
    repair some of it in a few steps."""
    import jax
    import numpy as np

    from opd_jax import tokenizer as tokenizer_lib

    config, params = checkpoints.load(tiny_teacher_dir)
    keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(params))))
    noisy = jax.tree.map(
        lambda w: (
            w + 0.2 * np.std(w) * jax.random.normal(next(keys), w.shape) if w.ndim >= 2 else w
        ),
        params,
    )
    directory = checkpoints.save_hf_dir(config, noisy, tmp_path_factory.mktemp("tiny_student"))
    tokenizer_lib.load(tiny_teacher_dir).save_hf(directory)
    return directory


PADDING_ROWS = 64


@pytest.fixture(scope="session")
def tiny_padded_student_dir(tiny_student_dir, tmp_path_factory) -> pathlib.Path:
    """The tiny student with its (tied) embedding table padded by PADDING_ROWS rows, as
    checkpoints pad theirs to a round size, with the same tokenizer. The padded rows are
    random and large: left in, they would take most of every next-token distribution."""
    import dataclasses

    import jax
    import numpy as np

    from opd_jax import tokenizer as tokenizer_lib

    config, params = checkpoints.load(tiny_student_dir)
    embed = params["embed"]
    noise = jax.random.normal(jax.random.key(2), (PADDING_ROWS, embed.shape[1]))
    padded = {**params, "embed": np.concatenate([embed, 50.0 * np.std(embed) * noise])}
    config = dataclasses.replace(config, vocab_size=config.vocab_size + PADDING_ROWS)
    directory = checkpoints.save_hf_dir(config, padded, tmp_path_factory.mktemp("tiny_padded"))
    tokenizer_lib.load(tiny_student_dir).save_hf(directory)
    return directory


class RealModels:
    """Cached access to the packaged checkpoints, ours and the reference's."""

    path = staticmethod(packaged_path)
    ours = staticmethod(ours)
    reference = staticmethod(reference_model)
    reference_tokenizer = staticmethod(reference_tokenizer)


@pytest.fixture(scope="session")
def real_models() -> RealModels:
    return RealModels()
