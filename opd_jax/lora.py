"""LoRA on the params pytree: low-rank adapters beside frozen base weights.

The adapters are their own small pytree, `{"layers": {target: {"a": [L, In, r], "b":
[L, r, Out]}}}`, trained while the base params stay untouched; `merge` folds them into
a full params dict that the ordinary forward and sampler run. A self-distillation
teacher that should stay fixed is then simply the base params: no second copy of the
model is kept. B starts at zero, so a fresh adapter leaves the model exactly as it was.
"""

from __future__ import annotations

import dataclasses
import math

import gin
import jax
import jax.numpy as jnp

from opd_jax import validation
from opd_jax.model import Params

# Projection -> how many of its leading (after `layers`) axes are inputs: o maps
# (heads, head_dim) to embed, every other projection maps one input axis.
INPUT_AXES = {"q": 1, "k": 1, "v": 1, "o": 2, "gate": 1, "up": 1, "down": 1}


@gin.configurable
@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """rank r, the scale alpha / r applied to B @ A, and which projections get adapters."""

    rank: int = 16
    alpha: float = 32.0
    targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")

    def __post_init__(self):
        validation.check_fields(self, validation.check_int, "rank", minimum=1)
        validation.check_fields(self, validation.check_number, "alpha", low=0, open_low=True)
        validation.check_types(self)
        if not self.targets or not set(self.targets) <= set(INPUT_AXES):
            raise validation.ConfigError(
                f"LoraConfig.targets={self.targets!r} must name one or more of "
                f"{', '.join(INPUT_AXES)}"
            )

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _in_out(shape: tuple[int, ...], target: str) -> tuple[int, int]:
    """(flattened input size, flattened output size) of one stacked projection."""
    split = 1 + INPUT_AXES[target]
    return math.prod(shape[1:split]), math.prod(shape[split:])


def init(base: Params, cfg: LoraConfig, key: jax.Array) -> Params:
    """Adapters for `base`: A ~ N(0, 1/In) (kaiming-like, as PEFT), B = 0; float32 over a
    base of any dtype, as they are what is trained (`delta` casts to the base's)."""
    adapters = {}
    for target, k in zip(cfg.targets, jax.random.split(key, len(cfg.targets)), strict=True):
        w = base["layers"][target]
        n_in, n_out = _in_out(w.shape, target)
        a = jax.random.normal(k, (w.shape[0], n_in, cfg.rank), jnp.float32) / math.sqrt(n_in)
        b = jnp.zeros((w.shape[0], cfg.rank, n_out), jnp.float32)
        adapters[target] = {"a": a, "b": b}
    return {"layers": adapters}


def delta(w: jax.Array, adapter: Params, target: str, scale: float) -> jax.Array:
    """scale * A @ B, shaped like the stacked base weight `w`."""
    product = jnp.einsum("lir,lro->lio", adapter["a"], adapter["b"])
    return (scale * product).reshape(w.shape).astype(w.dtype)


def merge(base: Params, adapters: Params, cfg: LoraConfig) -> Params:
    """Full params with the adapters folded in: what the student's forward runs, and what
    `checkpoints.save_hf_dir` exports."""
    layers = dict(base["layers"])
    for target, adapter in adapters["layers"].items():
        layers[target] = layers[target] + delta(layers[target], adapter, target, cfg.scale)
    return {**base, "layers": layers}


def student_weights(trainable: Params, base: Params, cfg: LoraConfig | None) -> Params:
    """The full params a student runs: base + adapters under LoRA, else the trainable
    params themselves (then `base` is unused)."""
    return trainable if cfg is None else merge(base, trainable, cfg)
