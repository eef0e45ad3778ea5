"""One decoder-only transformer for every family we load, as pure functions.

Llama/SmolLM2, Qwen2, Qwen3 and Gemma 3 differ only in config fields (biases, q/k
norms, post norms, activation, embedding scale, sliding-window layers), so one
forward serves them all. Params are a plain dict pytree: loaders, LoRA and sharding
rules all work on it without a module system in the way. Layers are stacked along a
leading `layers` axis and run under `lax.scan`, which keeps compile time flat in
depth. Norm scales are stored as the effective multiplier (Gemma's `1 + w` is folded
in by the loader), so the forward has one RMSNorm.

One function, `block`, is the transformer block: the forward scans it over the stacked
layers, and `decode_step` (one new token per row, for a sampler's loop) unrolls it.

The KV cache has one layout: per layer, keys and values [B, K, S, Dh]. Both attention
dots take (B, K) as batch dimensions and contract over Dh or S, and this layout puts
the batch dimensions first and the slots next to Dh, so the dots read the cache as it
lies: no step transposes it, and a decode step writes its new key and value into one
slot in place. `init_cache` stacks the layers ([L, B, K, S, Dh]) for the scan, and
`layer_caches` splits them into per-layer buffers of the same layout.

Shapes are in the names: B batch, T new tokens, S key slots, D model width,
H query heads, K kv heads, G = H // K, Dh head dim, F mlp width, V vocab, L layers.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Params = dict[str, Any]
Cache = dict[str, jax.Array]
LayerCache = tuple[jax.Array, jax.Array]  # one layer's keys and values, each [B, K, S, Dh]
CACHE_AXES = ("batch", "kv_heads", "length", "head_dim")  # logical axes of a LayerCache array
_MASK_VALUE = float(np.finfo(np.float32).min)


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding: base frequency and an optional context-extension scaling."""

    theta: float = 10000.0
    scaling: str = "default"  # "default" | "linear" | "llama3"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only transformer; hashable so jit can take it static."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    mlp_dim: int
    rope: RopeConfig = RopeConfig()
    local_rope: RopeConfig | None = None  # Gemma 3 sliding layers use their own base
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    qkv_bias: bool = False  # Qwen2
    qk_norm: bool = False  # Qwen3, Gemma 3
    post_norms: bool = False  # Gemma 3: norms after attention and after the MLP too
    activation: str = "silu"  # "silu" | "gelu_tanh"
    embed_scale: bool = False  # Gemma: embeddings times sqrt(d_model)
    query_pre_attn_scalar: float | None = None  # attention scale^-2; None -> head_dim
    sliding_window: int | None = None
    sliding_layers: tuple[bool, ...] = ()  # per layer; empty means all global
    family: str = "llama"  # which HF architecture the weights come from and export to

    def __post_init__(self):
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}"
            )
        if self.sliding_layers and len(self.sliding_layers) != self.n_layers:
            raise ValueError(
                f"sliding_layers has {len(self.sliding_layers)} entries for {self.n_layers} layers"
            )
        if any(self.sliding_layers) and not self.sliding_window:
            raise ValueError("sliding_layers are set but sliding_window is not")
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"activation {self.activation!r} is not one of {sorted(_ACTIVATIONS)}")

    @property
    def is_sliding(self) -> tuple[bool, ...]:
        return self.sliding_layers or (False,) * self.n_layers


_ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


def param_axes(config: ModelConfig) -> Params:
    """The logical axis names of every parameter, as a pytree shaped like the params."""
    layers = {
        "attn_norm": ("layers", "embed"),
        "q": ("layers", "embed", "heads", "head_dim"),
        "k": ("layers", "embed", "kv_heads", "head_dim"),
        "v": ("layers", "embed", "kv_heads", "head_dim"),
        "o": ("layers", "heads", "head_dim", "embed"),
        "mlp_norm": ("layers", "embed"),
        "gate": ("layers", "embed", "mlp"),
        "up": ("layers", "embed", "mlp"),
        "down": ("layers", "mlp", "embed"),
    }
    if config.qkv_bias:
        layers["q_bias"] = ("layers", "heads", "head_dim")
        layers["k_bias"] = layers["v_bias"] = ("layers", "kv_heads", "head_dim")
    if config.qk_norm:
        layers["q_norm"] = layers["k_norm"] = ("layers", "head_dim")
    if config.post_norms:
        layers["post_attn_norm"] = layers["post_mlp_norm"] = ("layers", "embed")
    axes = {"embed": ("vocab", "embed"), "layers": layers, "final_norm": ("embed",)}
    if not config.tie_embeddings:
        axes["lm_head"] = ("embed", "vocab")
    return axes


def param_shapes(config: ModelConfig) -> dict[str, Any]:
    """Every parameter's (shape, logical axis names), the one source for init and sharding."""
    c = config
    sizes = {
        "layers": c.n_layers,
        "embed": c.d_model,
        "heads": c.n_heads,
        "kv_heads": c.n_kv_heads,
        "head_dim": c.head_dim,
        "mlp": c.mlp_dim,
        "vocab": c.vocab_size,
    }
    with_shape = lambda axes: (tuple(sizes[a] for a in axes), axes)
    return jax.tree.map(with_shape, param_axes(c), is_leaf=lambda x: isinstance(x, tuple))


def init_params(config: ModelConfig, key: jax.Array, dtype: Any = jnp.float32) -> Params:
    """Random init (normal 0.02, unit norm scales, zero biases) for students trained from scratch."""
    is_spec = lambda x: isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], tuple)
    specs, treedef = jax.tree.flatten_with_path(param_shapes(config), is_leaf=is_spec)
    keys = jax.random.split(key, len(specs))

    def init_one(path: tuple, shape: tuple[int, ...], k: jax.Array) -> jax.Array:
        name = jax.tree_util.keystr(path)
        if "norm" in name:
            return jnp.ones(shape, dtype)
        if "bias" in name:
            return jnp.zeros(shape, dtype)
        return (0.02 * jax.random.normal(k, shape, jnp.float32)).astype(dtype)

    leaves = [init_one(path, shape, k) for (path, (shape, _)), k in zip(specs, keys, strict=True)]
    return jax.tree.unflatten(treedef, leaves)


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> np.ndarray:
    """Inverse frequencies of the rotary embedding, with Llama 3 / linear scaling."""
    inv_freq = 1.0 / (rope.theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    if rope.scaling == "default":
        return inv_freq
    if rope.scaling == "linear":
        return inv_freq / rope.factor
    if rope.scaling != "llama3":
        raise ValueError(f"rope scaling {rope.scaling!r} is not supported")
    low_wavelen = rope.original_max_position / rope.low_freq_factor
    high_wavelen = rope.original_max_position / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (rope.original_max_position / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def _rotate(x_BxTxNxDh: jax.Array, positions_BxT: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotary embedding in the half-split layout that HF checkpoints use."""
    angles_BxTxF = positions_BxT[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)
    angles_BxTx1xDh = jnp.concatenate([angles_BxTxF, angles_BxTxF], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles_BxTx1xDh), jnp.sin(angles_BxTx1xDh)
    x = x_BxTxNxDh.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x * cos + rotated * sin).astype(x_BxTxNxDh.dtype)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """RMSNorm computed in float32, returned in the input's dtype."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (normed * scale.astype(jnp.float32)).astype(x.dtype)


def positions_from_mask(valid_BxT: jax.Array) -> jax.Array:
    """Per-row positions for left-padded batches: 0 at each row's first real token."""
    return jnp.maximum(jnp.cumsum(valid_BxT.astype(jnp.int32), axis=-1) - 1, 0)


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype: Any = jnp.float32) -> Cache:
    """An empty static-size KV cache, layers stacked: slots are filled left to right from `index`."""
    shape = (config.n_layers, batch, config.n_kv_heads, max_len, config.head_dim)
    return {
        "k": jnp.zeros(shape, dtype),
        "v": jnp.zeros(shape, dtype),
        "valid": jnp.zeros((batch, max_len), bool),
        "index": jnp.zeros((), jnp.int32),
    }


def layer_caches(cache: Cache) -> tuple[LayerCache, ...]:
    """The stacked cache as one (keys, values) pair per layer, for `decode_step`."""
    return tuple(zip(cache["k"], cache["v"], strict=True))


def unstack_layers(params: Params, config: ModelConfig) -> tuple[Params, ...]:
    """Each layer's weights as its own pytree, for `decode_step`."""
    return tuple(
        jax.tree.map(lambda w, i=i: w[i], params["layers"]) for i in range(config.n_layers)
    )


def _embed(params: Params, tokens_BxT: jax.Array, config: ModelConfig) -> jax.Array:
    x_BxTxD = params["embed"][tokens_BxT]
    if config.embed_scale:
        x_BxTxD = x_BxTxD * jnp.asarray(math.sqrt(config.d_model), x_BxTxD.dtype)
    return x_BxTxD


def _project_qkv(
    h_BxTxD: jax.Array,
    p: Params,
    positions_BxT: jax.Array,
    is_sliding: bool | jax.Array,
    config: ModelConfig,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Rotated queries [B, T, H, Dh], and rotated keys and values in the cache's [B, K, T, Dh]."""
    c = config
    q, k, v = (jnp.einsum("btd,dhk->bthk", h_BxTxD, p[name]) for name in "qkv")
    if c.qkv_bias:
        q, k, v = q + p["q_bias"], k + p["k_bias"], v + p["v_bias"]
    if c.qk_norm:
        q, k = rms_norm(q, p["q_norm"], c.norm_eps), rms_norm(k, p["k_norm"], c.norm_eps)
    global_freq = rope_inv_freq(c.rope, c.head_dim)
    local_freq = rope_inv_freq(c.local_rope, c.head_dim) if c.local_rope else global_freq
    inv_freq = jnp.where(is_sliding, local_freq, global_freq)
    q, k = _rotate(q, positions_BxT, inv_freq), _rotate(k, positions_BxT, inv_freq)
    return q, k.swapaxes(1, 2), v.swapaxes(1, 2)


class Slots(NamedTuple):
    """Where a block's T new tokens go: key slots [first, first + T), at positions
    `positions_BxT`, among S key slots of which `valid_BxS` marks those holding real tokens."""

    first: jax.Array | int
    positions_BxT: jax.Array
    valid_BxS: jax.Array


def _attention(
    q_BxTxHxDh: jax.Array,
    k_BxKxSxDh: jax.Array,
    v_BxKxSxDh: jax.Array,
    slots: Slots,
    is_sliding: bool | jax.Array,
    config: ModelConfig,
) -> jax.Array:
    """Grouped-query attention; a query sees valid keys at its own slot or before, within
    the window on sliding layers."""
    B, T, H, Dh = q_BxTxHxDh.shape
    K, S = k_BxKxSxDh.shape[1:3]
    distance_TxS = (slots.first + jnp.arange(T))[:, None] - jnp.arange(S)[None, :]
    in_window_TxS = jnp.where(is_sliding, distance_TxS < (config.sliding_window or S), True)
    mask_BxTxS = ((distance_TxS >= 0) & in_window_TxS)[None] & slots.valid_BxS[:, None, :]
    scale = (config.query_pre_attn_scalar or config.head_dim) ** -0.5
    q_BxTxKxGxDh = q_BxTxHxDh.reshape(B, T, K, H // K, Dh)
    dtype = q_BxTxHxDh.dtype
    k_BxKxSxDh, v_BxKxSxDh = k_BxKxSxDh.astype(dtype), v_BxKxSxDh.astype(dtype)
    scores_BxKxGxTxS = jnp.einsum(
        "btkgd,bksd->bkgts", q_BxTxKxGxDh, k_BxKxSxDh, preferred_element_type=jnp.float32
    )
    scores_BxKxGxTxS = jnp.where(mask_BxTxS[:, None, None], scores_BxKxGxTxS * scale, _MASK_VALUE)
    probs_BxKxGxTxS = jax.nn.softmax(scores_BxKxGxTxS, axis=-1).astype(v_BxKxSxDh.dtype)
    out_BxTxKxGxDh = jnp.einsum("bkgts,bksd->btkgd", probs_BxKxGxTxS, v_BxKxSxDh)
    return out_BxTxKxGxDh.reshape(B, T, H, Dh)


def _mlp(h_BxTxD: jax.Array, p: Params, config: ModelConfig) -> jax.Array:
    gated_BxTxF = _ACTIVATIONS[config.activation](jnp.einsum("btd,df->btf", h_BxTxD, p["gate"]))
    up_BxTxF = jnp.einsum("btd,df->btf", h_BxTxD, p["up"])
    return jnp.einsum("btf,fd->btd", gated_BxTxF * up_BxTxF, p["down"])


def block(
    x_BxTxD: jax.Array,
    p: Params,
    kv: LayerCache | None,
    is_sliding: bool | jax.Array,
    slots: Slots,
    config: ModelConfig,
) -> tuple[jax.Array, LayerCache | None]:
    """The transformer block (pre-norm attention, then MLP) on T new tokens.

    With a layer cache `kv` the new keys and values are written into their slots and the
    queries attend over all S slots of it; without one they attend over each other
    (S = T). Causality and the sliding window are applied here. Returns the block's
    output and the updated cache.
    """
    c = config
    h = rms_norm(x_BxTxD, p["attn_norm"], c.norm_eps)
    q_BxTxHxDh, k_BxKxTxDh, v_BxKxTxDh = _project_qkv(h, p, slots.positions_BxT, is_sliding, c)
    if kv is None:
        keys_BxKxSxDh, values_BxKxSxDh = k_BxKxTxDh, v_BxKxTxDh
    else:
        write = lambda cache, new: jax.lax.dynamic_update_slice_in_dim(
            cache, new.astype(cache.dtype), slots.first, axis=2
        )
        keys_BxKxSxDh, values_BxKxSxDh = write(kv[0], k_BxKxTxDh), write(kv[1], v_BxKxTxDh)
    attn = _attention(q_BxTxHxDh, keys_BxKxSxDh, values_BxKxSxDh, slots, is_sliding, c)
    attn_out = jnp.einsum("bthk,hkd->btd", attn, p["o"])
    if c.post_norms:
        attn_out = rms_norm(attn_out, p["post_attn_norm"], c.norm_eps)
    x_BxTxD = x_BxTxD + attn_out

    mlp_out = _mlp(rms_norm(x_BxTxD, p["mlp_norm"], c.norm_eps), p, c)
    if c.post_norms:
        mlp_out = rms_norm(mlp_out, p["post_mlp_norm"], c.norm_eps)
    new_kv = None if kv is None else (keys_BxKxSxDh, values_BxKxSxDh)
    return x_BxTxD + mlp_out, new_kv


def hidden_states(
    params: Params,
    tokens_BxT: jax.Array,
    config: ModelConfig,
    *,
    valid_BxT: jax.Array | None = None,
    positions_BxT: jax.Array | None = None,
    cache: Cache | None = None,
    remat: bool = False,
) -> tuple[jax.Array, Cache | None]:
    """Final-normed hidden states; with a cache, the T tokens go into slots [index, index+T).

    Without a cache this is a plain causal forward over the T tokens. With one, it is a
    prefill (T = prompt length, index 0) or a decode step (T = 1): rows share the slot
    index, and left padding is carried by `valid`, so rows of different lengths batch.
    """
    B, T = tokens_BxT.shape
    if valid_BxT is None:
        valid_BxT = jnp.ones((B, T), bool)
    if positions_BxT is None:
        positions_BxT = positions_from_mask(valid_BxT)
    x = _embed(params, tokens_BxT, config)

    if cache is None:
        index = jnp.zeros((), jnp.int32)
        key_valid_BxS = valid_BxT
        stacked_kv = None
    else:
        index = cache["index"]
        key_valid_BxS = jax.lax.dynamic_update_slice_in_dim(cache["valid"], valid_BxT, index, 1)
        stacked_kv = (cache["k"], cache["v"])

    slots = Slots(index, positions_BxT, key_valid_BxS)
    body = lambda x, layer: block(x, *layer, slots, config)
    if remat:
        body = jax.checkpoint(body)
    layers = (params["layers"], stacked_kv, jnp.asarray(config.is_sliding))
    x, new_kv = jax.lax.scan(body, x, layers)
    x = rms_norm(x, params["final_norm"], config.norm_eps)
    if cache is None:
        return x, None
    return x, {"k": new_kv[0], "v": new_kv[1], "valid": key_valid_BxS, "index": index + T}


def lm_head(params: Params, config: ModelConfig) -> jax.Array:
    """The [D, V] output projection (the transposed embedding when tied)."""
    return params["embed"].T if config.tie_embeddings else params["lm_head"]


def logits_from_hidden(params: Params, hidden_BxTxD: jax.Array, config: ModelConfig) -> jax.Array:
    """Float32 logits, so losses never see rounded log-probabilities."""
    return jnp.einsum(
        "btd,dv->btv", hidden_BxTxD, lm_head(params, config), preferred_element_type=jnp.float32
    )


def forward(
    params: Params, tokens_BxT: jax.Array, config: ModelConfig, **kwargs: Any
) -> tuple[jax.Array, Cache | None]:
    """Logits [B, T, V] (float32) and the updated cache; see `hidden_states` for kwargs."""
    hidden_BxTxD, cache = hidden_states(params, tokens_BxT, config, **kwargs)
    return logits_from_hidden(params, hidden_BxTxD, config), cache


def decode_step(
    params: Params,
    layers: Sequence[Params],
    token_B: jax.Array,
    caches: Sequence[LayerCache],
    slot: jax.Array,
    positions_B: jax.Array,
    valid_BxS: jax.Array,
    config: ModelConfig,
) -> tuple[jax.Array, tuple[LayerCache, ...]]:
    """Logits [B, V] (float32) after one token per row, at `positions_B`, goes into key
    slot `slot` of every layer's cache; returns them with the updated caches.

    `layers` and `caches` hold one entry per layer (`unstack_layers`, `layer_caches`) and
    the layers are unrolled, so inside a decode loop every layer's cache is its own
    buffer and the new key and value are written into it in place. `valid_BxS` marks the
    slots that hold real tokens; slots after `slot` are masked by causality anyway.
    """
    x_Bx1xD = _embed(params, token_B[:, None], config)
    slots = Slots(slot, positions_B[:, None], valid_BxS)
    new_caches = []
    for p, kv, is_sliding in zip(layers, caches, config.is_sliding, strict=True):
        x_Bx1xD, kv = block(x_Bx1xD, p, kv, is_sliding, slots, config)
        new_caches.append(kv)
    hidden_Bx1xD = rms_norm(x_Bx1xD, params["final_norm"], config.norm_eps)
    return logits_from_hidden(params, hidden_Bx1xD, config)[:, 0], tuple(new_caches)


def select_layers(
    params: Params, config: ModelConfig, layers: Sequence[int]
) -> tuple[ModelConfig, Params]:
    """A shallower model made of the given layers (in order) of a deeper one.

    The usual way to build a distillation student that starts close to its teacher: the
    embeddings, final norm and head are shared, and each kept layer keeps its weights
    (and, for Gemma 3, whether it is a sliding-window layer).
    """
    new_config = select_config(config, layers)
    index = np.asarray(tuple(layers))
    new_params = {**params, "layers": jax.tree.map(lambda w: w[index], params["layers"])}
    return new_config, new_params


def select_config(config: ModelConfig, layers: Sequence[int]) -> ModelConfig:
    """The config of `select_layers`' model, for loaders that read only the kept layers."""
    layers = tuple(layers)
    if not layers or any(not 0 <= i < config.n_layers for i in layers):
        raise ValueError(f"layers {layers} must be a non-empty subset of 0..{config.n_layers - 1}")
    sliding = tuple(config.is_sliding[i] for i in layers) if config.sliding_layers else ()
    return dataclasses.replace(config, n_layers=len(layers), sliding_layers=sliding)


def evenly_spaced_layers(n_layers: int, keep: int) -> tuple[int, ...]:
    """`keep` layer indices spread over 0..n_layers-1, always keeping the first and last."""
    if not 1 <= keep <= n_layers:
        raise ValueError(f"cannot keep {keep} of {n_layers} layers")
    return tuple(sorted({round(i) for i in np.linspace(0, n_layers - 1, keep)}))
