"""LoRA on the params pytree: a fresh adapter is the base model exactly, merging equals
running the low-rank path beside the base weight, and the merged student exports."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opd_jax import checkpoints, config, lora, model
from opd_jax.model import ModelConfig

CONFIG = ModelConfig(
    vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=48
)
CFG = lora.LoraConfig(rank=4, alpha=8.0)
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 61, (2, 7)))


def _trained_adapters(base):
    """Adapters as after some training: B no longer zero."""
    adapters = lora.init(base, CFG, jax.random.key(1))
    keys = iter(jax.random.split(jax.random.key(2), 2 * len(CFG.targets)))
    return jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape), adapters)


def test_zero_initialized_b_is_exactly_the_base_model():
    base = model.init_params(CONFIG, jax.random.key(0))
    adapters = lora.init(base, CFG, jax.random.key(1))
    assert all(not np.any(a["b"]) and np.any(a["a"]) for a in adapters["layers"].values())
    merged = lora.merge(base, adapters, CFG)
    for left, right in zip(jax.tree.leaves(merged), jax.tree.leaves(base), strict=True):
        np.testing.assert_array_equal(left, right)
    np.testing.assert_array_equal(
        model.forward(merged, TOKENS, CONFIG)[0], model.forward(base, TOKENS, CONFIG)[0]
    )


@pytest.mark.parametrize("target", lora.INPUT_AXES)
def test_merged_weight_equals_the_unmerged_low_rank_path(target):
    """x W' == x W + (alpha / r) (x A) B for every projection, including o's two input axes."""
    base = model.init_params(CONFIG, jax.random.key(0))
    adapters = _trained_adapters(base)
    w = base["layers"][target]
    merged = lora.merge(base, adapters, CFG)["layers"][target]
    n_in = int(np.prod(w.shape[1 : 1 + lora.INPUT_AXES[target]]))
    x = jax.random.normal(jax.random.key(3), (CONFIG.n_layers, 5, n_in))
    flat = lambda weight: weight.reshape(CONFIG.n_layers, n_in, -1)
    a, b = adapters["layers"][target]["a"], adapters["layers"][target]["b"]
    low_rank = CFG.scale * jnp.einsum("lxr,lro->lxo", jnp.einsum("lxi,lir->lxr", x, a), b)
    unmerged = jnp.einsum("lxi,lio->lxo", x, flat(w)) + low_rank
    merged_out = jnp.einsum("lxi,lio->lxo", x, flat(merged))
    assert float(jnp.max(jnp.abs(low_rank))) > 0.1  # the adapter really changes the output
    np.testing.assert_allclose(merged_out, unmerged, rtol=1e-5, atol=1e-5)


def test_targets_limit_which_projections_change():
    base = model.init_params(CONFIG, jax.random.key(0))
    cfg = lora.LoraConfig(rank=2, targets=("q", "v"))
    adapters = jax.tree.map(lambda x: x + 0.1, lora.init(base, cfg, jax.random.key(1)))
    merged = lora.merge(base, adapters, cfg)
    changed = {
        k for k in base["layers"] if not np.array_equal(merged["layers"][k], base["layers"][k])
    }
    assert changed == {"q", "v"}
    message = r"^LoraConfig.targets=\('q', 'query'\) must name one or more of q, k, v, o, "
    with pytest.raises(config.ConfigError, match=message):
        lora.LoraConfig(targets=("q", "query"))


def test_merged_student_exports_to_safetensors_and_reloads_equal(tmp_path):
    base = model.init_params(CONFIG, jax.random.key(0))
    merged = lora.merge(base, _trained_adapters(base), CFG)
    checkpoints.save_hf_dir(CONFIG, merged, tmp_path)
    config, reloaded = checkpoints.load(tmp_path)
    assert config == CONFIG
    np.testing.assert_allclose(
        model.forward(reloaded, TOKENS, config)[0],
        model.forward(merged, TOKENS, CONFIG)[0],
        rtol=1e-5,
        atol=1e-5,
    )


def test_adapters_stay_float32_over_a_bfloat16_base():
    """The adapters are what trains, so a bfloat16 base (`Models.dtype`) keeps them
    float32; the merged weights are in the base's dtype."""
    base = jax.tree.map(
        lambda x: x.astype(jnp.bfloat16), model.init_params(CONFIG, jax.random.key(0))
    )
    adapters = _trained_adapters(base)
    assert {x.dtype for x in jax.tree.leaves(adapters)} == {jnp.dtype(jnp.float32)}
    merged = lora.merge(base, adapters, CFG)
    assert {x.dtype for x in jax.tree.leaves(merged)} == {jnp.dtype(jnp.bfloat16)}
