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


class RealModels:
    """Cached access to the packaged checkpoints, ours and the reference's."""

    path = staticmethod(packaged_path)
    ours = staticmethod(ours)
    reference = staticmethod(reference_model)
    reference_tokenizer = staticmethod(reference_tokenizer)


@pytest.fixture(scope="session")
def real_models() -> RealModels:
    return RealModels()
