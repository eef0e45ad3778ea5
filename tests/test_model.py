"""The transformer's own contracts: cache == full forward, causality, padding, dtypes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opd_jax import model
from opd_jax.model import ModelConfig, RopeConfig

LLAMA = ModelConfig(
    vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=48
)
GEMMA = dataclasses.replace(
    LLAMA,
    n_layers=3,
    qk_norm=True,
    post_norms=True,
    activation="gelu_tanh",
    embed_scale=True,
    query_pre_attn_scalar=6.0,
    local_rope=RopeConfig(theta=100.0),
    sliding_window=3,
    sliding_layers=(True, False, True),
    family="gemma3",
)
QWEN2 = dataclasses.replace(LLAMA, qkv_bias=True, family="qwen2", tie_embeddings=False)
CONFIGS = {"llama": LLAMA, "gemma3": GEMMA, "qwen2": QWEN2}


def _params(config: ModelConfig, dtype=jnp.float32):
    return model.init_params(config, jax.random.key(0), dtype)


def _left_padded_batch(lengths, width, vocab, seed=0):
    rng = np.random.RandomState(seed)
    tokens = rng.randint(1, vocab, (len(lengths), width))
    valid = np.arange(width)[None, :] >= (width - np.asarray(lengths))[:, None]
    return jnp.asarray(np.where(valid, tokens, 0)), jnp.asarray(valid)


def _cached_logits(params, tokens, valid, config: ModelConfig, max_len: int = 12):
    """Logits of a prompt fed in pieces: slots 0-3 and 4-5 through `forward` with the
    stacked cache (the layer scan), then one token at a time through `decode_step` (the
    unrolled layers), which is how the sampler prefills and decodes."""
    positions = model.positions_from_mask(valid)
    cache = model.init_cache(config, batch=tokens.shape[0], max_len=max_len)
    chunk = jax.jit(model.forward, static_argnums=2)
    pieces = []
    for start, stop in ((0, 4), (4, 6)):
        logits, cache = chunk(
            params,
            tokens[:, start:stop],
            config,
            valid_BxT=valid[:, start:stop],
            positions_BxT=positions[:, start:stop],
            cache=cache,
        )
        pieces.append(logits)
    assert int(cache["index"]) == 6
    decode = jax.jit(model.decode_step, static_argnums=7)
    layers, caches = model.unstack_layers(params, config), model.layer_caches(cache)
    key_valid = jnp.pad(valid, ((0, 0), (0, max_len - tokens.shape[1])), constant_values=True)
    for t in range(6, tokens.shape[1]):
        logits_BxV, caches = decode(
            params, layers, tokens[:, t], caches, t, positions[:, t], key_valid, config
        )
        pieces.append(logits_BxV[:, None])
    return jnp.concatenate(pieces, axis=1)


# Two forwards of the same tokens that reduce over different numbers of key slots (a
# cache wider than the prompt, extra left padding) or compile differently (scan vs
# unrolled layers) differ only by float32 rounding order. Measured max |difference| on
# these logits (|logit| < 1): 1.5e-7 with AVX2+FMA, 2.1e-7 with XLA held to SSE4.2.
REORDERED_LOGITS_ATOL = 2e-6


@pytest.mark.parametrize("name", CONFIGS)
def test_cached_prefill_and_decode_steps_equal_full_forward(name):
    config = CONFIGS[name]
    params = _params(config)
    tokens, valid = _left_padded_batch([9, 6], width=9, vocab=config.vocab_size)
    full, _ = model.forward(params, tokens, config, valid_BxT=valid)
    cached = _cached_logits(params, tokens, valid, config)
    np.testing.assert_allclose(cached[valid], full[valid], rtol=0, atol=REORDERED_LOGITS_ATOL)


@pytest.mark.parametrize("name", CONFIGS)
def test_gradient_causality(name):
    """The logits at position t have zero gradient w.r.t. the inputs at positions > t.

    Each position holds a distinct token id and the head is untied, so the gradient
    w.r.t. embedding row `tokens[s]` is exactly the gradient w.r.t. input position s.
    """
    config = dataclasses.replace(CONFIGS[name], tie_embeddings=False)
    params = _params(config)
    tokens = jnp.arange(1, 9)[None]
    t = 4

    def logits_at_t(embed_VxD):
        logits, _ = model.forward(dict(params, embed=embed_VxD), tokens, config)
        return logits[0, t].sum()

    grad_VxD = jax.grad(logits_at_t)(params["embed"])
    per_position = np.abs(np.asarray(grad_VxD[tokens[0]])).sum(-1)
    assert np.all(per_position[: t + 1] > 0)
    np.testing.assert_array_equal(per_position[t + 1 :], 0.0)


def test_sliding_window_limits_reach():
    """One sliding layer of window 3: a token reaches only itself and the next two positions."""
    config = dataclasses.replace(GEMMA, n_layers=1, sliding_layers=(True,))
    params = _params(config)
    tokens, _ = _left_padded_batch([8], width=8, vocab=config.vocab_size)
    perturbed = tokens.at[0, 0].set((tokens[0, 0] + 1) % config.vocab_size)
    a, _ = model.forward(params, tokens, config)
    b, _ = model.forward(params, perturbed, config)
    changed = np.abs(np.asarray(a - b))[0].max(-1) > 0
    np.testing.assert_array_equal(changed, [True, True, True, False, False, False, False, False])


@pytest.mark.parametrize("name", CONFIGS)
def test_left_padding_does_not_change_a_row(name):
    config = CONFIGS[name]
    params = _params(config)
    tokens, valid = _left_padded_batch([5, 8], width=8, vocab=config.vocab_size)
    batched, _ = model.forward(params, tokens, config, valid_BxT=valid)
    alone, _ = model.forward(params, tokens[:1, 3:], config)
    np.testing.assert_allclose(batched[0, 3:], alone[0], rtol=0, atol=REORDERED_LOGITS_ATOL)


def test_bfloat16_params_track_float32():
    params32 = _params(LLAMA)
    params16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params32)
    tokens, _ = _left_padded_batch([8], width=8, vocab=LLAMA.vocab_size)
    logits32, _ = model.forward(params32, tokens, LLAMA)
    logits16, _ = model.forward(params16, tokens, LLAMA)
    assert logits16.dtype == jnp.float32  # losses always see float32 logits
    # bfloat16 keeps 8 significand bits (relative rounding 4e-3) in weights and activations;
    # measured max |difference| 2.1e-3 on logits of |logit| < 1.
    np.testing.assert_allclose(logits16, logits32, rtol=0, atol=0.02)


def test_param_axes_cover_every_param_with_matching_rank():
    for config in CONFIGS.values():
        params = _params(config)
        axes = model.param_axes(config)
        assert jax.tree.structure(params) == jax.tree.structure(
            axes, is_leaf=lambda x: isinstance(x, tuple)
        )
        for p, names in zip(
            jax.tree.leaves(params),
            jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple)),
            strict=True,
        ):
            assert p.ndim == len(names)


def test_llama3_rope_scaling_changes_only_low_frequencies():
    plain = model.rope_inv_freq(RopeConfig(theta=500000.0), 64)
    scaled = model.rope_inv_freq(
        RopeConfig(theta=500000.0, scaling="llama3", factor=8.0, original_max_position=8192), 64
    )
    assert scaled[0] == plain[0]  # the highest frequency is untouched
    assert scaled[-1] == plain[-1] / 8.0  # the lowest is divided (by 8: exact in floating point)


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(n_heads=4, n_kv_heads=3), "not a multiple of n_kv_heads"),
        (dict(sliding_layers=(True,)), "sliding_layers has 1 entries for 2 layers"),
        (dict(activation="relu2"), "activation 'relu2'"),
    ],
)
def test_bad_config_is_named(fields, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(LLAMA, **fields)
