"""The sampler's contracts: the tokens and log-probs OPD losses consume, EOS, padding,
reproducibility, no recompiles, input checks, and greedy parity with transformers."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from opd_jax import model, sampling
from opd_jax.model import ModelConfig, RopeConfig
from opd_jax.sampling import SamplingConfig

TINY = ModelConfig(
    vocab_size=97,
    d_model=32,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    head_dim=8,
    mlp_dim=48,
    tie_embeddings=False,
)
GEMMA = dataclasses.replace(
    TINY,
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
QWEN2 = dataclasses.replace(TINY, qkv_bias=True, family="qwen2")
FAMILIES = {"llama": TINY, "gemma3": GEMMA, "qwen2": QWEN2}
PROMPTS = [[11, 12, 13, 14, 19, 20], [15, 16], [17, 18, 30]]
SAMPLED = SamplingConfig(max_new_tokens=10, temperature=0.8, top_k=20, top_p=0.9)
# Two sampler runs of the same tokens differ by float32 reduction order at most (another
# prompt width or compiled program). Measured max |difference| in these log-probs: 1.9e-6.
RERUN_ATOL = 2e-5


@functools.cache
def _sharp_params(config: ModelConfig, seed: int) -> model.Params:
    """Random weights scaled up: init's 0.02 gives near-uniform logits, whose argmax is a
    coin flip between cached and uncached rounding; these give logits spread over units."""
    params = model.init_params(config, jax.random.key(seed))
    params = jax.tree.map(lambda x: x * 5.0 if x.ndim >= 2 else x, params)
    params["lm_head"] = params["lm_head"] * 4.0
    return params


@pytest.fixture(scope="module")
def params() -> model.Params:
    return _sharp_params(TINY, 0)


def _left_pad(rows, pad_id=0, width=None) -> tuple[np.ndarray, np.ndarray]:
    """Token lists -> (tokens [B, P] int32, valid [B, P] bool), right-aligned."""
    width = width or max(map(len, rows))
    valid = np.arange(width)[None, :] >= width - np.array([len(r) for r in rows])[:, None]
    tokens = np.full(valid.shape, pad_id, np.int32)
    tokens[valid] = np.concatenate(rows)
    return tokens, valid


@pytest.fixture(scope="module")
def prompts() -> tuple[np.ndarray, np.ndarray]:
    return _left_pad(PROMPTS)


def _run(params, prompts, config, key=0, model_config=TINY) -> sampling.Samples:
    tokens, valid = prompts
    return jax.device_get(
        sampling.generate(params, tokens, valid, jax.random.key(key), model_config, config)
    )


def _full_logits(params, prompts, samples, model_config=TINY) -> np.ndarray:
    """Uncached logits at every completion position, predicting completion token j."""
    tokens, valid = prompts
    seq = np.concatenate([tokens, samples.tokens_BxN], axis=1)
    seq_valid = np.concatenate([valid, np.ones_like(samples.tokens_BxN, bool)], axis=1)
    logits, _ = model.forward(
        params, jnp.asarray(seq), model_config, valid_BxT=jnp.asarray(seq_valid)
    )
    P, N = tokens.shape[1], samples.tokens_BxN.shape[1]
    return np.asarray(logits[:, P - 1 : P - 1 + N], np.float64)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    return x - scipy.special.logsumexp(x, axis=-1, keepdims=True)


def _filtered(logits_V: np.ndarray, config: SamplingConfig) -> np.ndarray:
    """Reference filter, written independently: a boolean keep-mask over the vocabulary."""
    scaled = logits_V / config.temperature
    order = np.argsort(-scaled, kind="stable")
    keep = np.zeros(scaled.shape, bool)
    k = config.top_k or scaled.size
    keep[order[:k]] = True
    probs = np.exp(_log_softmax(np.where(keep, scaled, -np.inf)))
    mass_before = np.cumsum(probs[order]) - probs[order]
    keep[order[mass_before >= config.top_p]] = False
    return np.where(keep, scaled, -np.inf)


# ----------------------------------------------------------------------------- greedy


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_is_the_argmax_chain_of_the_uncached_forward(family, prompts):
    """One static-width uncached forward per step: causality keeps the not-yet-written
    slots (pad) out of the logits that predict the next token. Every family, because the
    sampler decodes with its own cache layout."""
    config = FAMILIES[family]
    params = _sharp_params(config, 0)
    tokens, valid = prompts
    P, N = tokens.shape[1], 8
    greedy = SamplingConfig(max_new_tokens=N, temperature=0.0)
    samples = _run(params, prompts, greedy, model_config=config)
    forward = jax.jit(lambda seq: model.forward(params, seq, config, valid_BxT=seq_valid)[0])
    seq = np.concatenate([tokens, np.zeros((3, N), np.int32)], axis=1)
    seq_valid = jnp.asarray(np.concatenate([valid, np.ones((3, N), bool)], axis=1))
    for j in range(N):
        logits_BxV = np.asarray(forward(jnp.asarray(seq))[:, P - 1 + j])
        top2_Bx2 = np.sort(logits_BxV, axis=-1)[:, -2:]
        assert (top2_Bx2[:, 1] - top2_Bx2[:, 0]).min() > 1e-3, "a near-tie would be flaky"
        seq[:, P + j] = logits_BxV.argmax(axis=-1)
    np.testing.assert_array_equal(samples.tokens_BxN, seq[:, P:])
    assert len({tuple(row) for row in samples.tokens_BxN.tolist()}) == 3
    np.testing.assert_array_equal(samples.logprobs_BxN, 0.0)


def test_temperature_zero_equals_top_k_one(params, prompts):
    """top_k=1 keeps only the argmax at any temperature: the same chain reached by sampling."""
    greedy = _run(params, prompts, SamplingConfig(max_new_tokens=8, temperature=0.0))
    top1 = _run(params, prompts, SamplingConfig(max_new_tokens=8, temperature=1.5, top_k=1))
    np.testing.assert_array_equal(greedy.tokens_BxN, top1.tokens_BxN)
    np.testing.assert_allclose(
        greedy.raw_logprobs_BxN, top1.raw_logprobs_BxN, rtol=0, atol=RERUN_ATOL
    )
    np.testing.assert_array_equal(top1.logprobs_BxN, 0.0)  # x - logsumexp([x, -inf, ...]) is 0


# ----------------------------------------------------------------------------- log-probs


# The sampler (cached, layers unrolled) and the full forward (uncached, layers scanned) do
# the same float32 arithmetic in different reduction orders. Each is that far from a
# float64 forward too. Max |difference| measured over keys 3-6 with AVX2+FMA, and keys 3
# and 5 with XLA held to AVX or SSE4.2: llama 7.8e-6, qwen2 7.8e-6, gemma3 4.8e-4. The
# gemma3 test model is badly conditioned: `_sharp_params` scales its q/k-norm and post-norm
# scales by 5 too. A 10x margin on each. Real bugs are orders larger: a sliding window one
# wider moves these log-probs by 8.8, a norm eps of 1e-4 instead of 1e-5 by 9e-3.
LOGPROB_ATOL = {"llama": 1e-4, "gemma3": 5e-3, "qwen2": 1e-4}


@pytest.mark.parametrize("family", FAMILIES)
def test_log_probs_equal_a_full_forward_recomputation(family, prompts):
    """A sampled run (temperature, top-k and top-p) over rows of different padding."""
    config, atol = FAMILIES[family], LOGPROB_ATOL[family]
    params = _sharp_params(config, 0)
    samples = _run(params, prompts, SAMPLED, key=3, model_config=config)
    logits_BxNxV = _full_logits(params, prompts, samples, config)
    tokens_BxN = samples.tokens_BxN
    raw = np.take_along_axis(_log_softmax(logits_BxNxV), tokens_BxN[..., None], -1)[..., 0]
    np.testing.assert_allclose(samples.raw_logprobs_BxN, raw, rtol=0, atol=atol)

    filtered_BxNxV = np.stack([[_filtered(v, SAMPLED) for v in row] for row in logits_BxNxV])
    assert np.isfinite(np.take_along_axis(filtered_BxNxV, tokens_BxN[..., None], -1)).all()
    drawn = np.take_along_axis(_log_softmax(filtered_BxNxV), tokens_BxN[..., None], -1)[..., 0]
    np.testing.assert_allclose(samples.logprobs_BxN, drawn, rtol=0, atol=atol)
    assert np.abs(samples.logprobs_BxN - samples.raw_logprobs_BxN).min() > 1e-3


@pytest.mark.parametrize(
    "config",
    [
        SamplingConfig(max_new_tokens=1, temperature=1.0, top_k=5),
        SamplingConfig(max_new_tokens=1, temperature=0.7, top_p=0.8),
        SamplingConfig(max_new_tokens=1, temperature=1.3, top_k=8, top_p=0.9),
    ],
    ids=["top_k", "top_p", "top_k+top_p"],
)
def test_next_token_distribution_matches_the_filtered_softmax(params, config):
    """4000 rows of one prompt each draw a first token from their own key.

    Support: no draw falls outside the allowed set. Shape: a chi-square goodness-of-fit
    test against the filtered softmax must not reject at p < 1e-3. The seed is fixed, so
    the outcome is deterministic; a correct sampler fails it for about one seed in a
    thousand, while a wrong temperature or a wrong cut-off gives p-values far below it.
    """
    n = 4000
    tokens, valid = _left_pad([PROMPTS[0]] * n)
    samples = _run(params, (tokens, valid), config, key=7)
    logits, _ = model.forward(params, jnp.asarray(tokens[:1]), TINY)
    expected = np.exp(_log_softmax(_filtered(np.asarray(logits[0, -1], np.float64), config)))
    allowed = np.flatnonzero(expected > 0)
    assert 2 <= allowed.size < 97
    assert np.isin(samples.tokens_BxN[:, 0], allowed).all()
    counts = np.bincount(samples.tokens_BxN[:, 0], minlength=97)[allowed]
    assert scipy.stats.chisquare(counts, n * expected[allowed]).pvalue > 1e-3


# ----------------------------------------------------------------------------- EOS


def test_eos_masks_and_pads_everything_after_it(params, prompts):
    """Two EOS ids taken from an unstopped run with the same key: row 0 stops on one, row 1
    on the other, and every row must then repeat that run up to and including its EOS."""
    free = _run(params, prompts, SAMPLED, key=5)
    row0, row1 = free.tokens_BxN[:2].tolist()
    eos_a = row0[2]
    stop0 = row0.index(eos_a)
    eos_b = next(t for j, t in enumerate(row1) if j and eos_a not in row1[: j + 1] + row0[:stop0])
    pad = 96
    config = dataclasses.replace(SAMPLED, eos_ids=(eos_a, eos_b), pad_id=pad)
    stopped = _run(params, prompts, config, key=5)

    is_eos_BxN = np.isin(free.tokens_BxN, [eos_a, eos_b])
    length_B = np.where(is_eos_BxN.any(axis=1), is_eos_BxN.argmax(axis=1) + 1, 10)
    np.testing.assert_array_equal(stopped.lengths_B, length_B)
    assert stopped.tokens_BxN[0, length_B[0] - 1] == eos_a
    assert stopped.tokens_BxN[1, length_B[1] - 1] == eos_b
    mask_BxN = np.arange(10)[None] < length_B[:, None]
    np.testing.assert_array_equal(stopped.mask_BxN, mask_BxN.astype(np.float32))
    np.testing.assert_array_equal(stopped.tokens_BxN[mask_BxN], free.tokens_BxN[mask_BxN])
    np.testing.assert_array_equal(stopped.tokens_BxN[~mask_BxN], pad)
    for field in ("logprobs_BxN", "raw_logprobs_BxN"):
        np.testing.assert_array_equal(getattr(stopped, field)[~mask_BxN], 0.0)
        np.testing.assert_allclose(
            getattr(stopped, field)[mask_BxN],
            getattr(free, field)[mask_BxN],
            rtol=0,
            atol=RERUN_ATOL,
        )


def test_decoding_stops_once_every_row_has_emitted_eos(params, prompts, monkeypatch):
    """Counts decode steps as they run (one model call per while-loop step, prefill excluded)."""
    greedy = SamplingConfig(max_new_tokens=10, temperature=0.0)
    free = _run(params, prompts, greedy)
    eos_ids = tuple(int(t) for t in free.tokens_BxN[:, 1])  # every row stops at token 2
    steps = []
    decode = model.decode_step

    def counting_decode(*args, **kwargs):
        jax.debug.callback(lambda: steps.append(1))
        return decode(*args, **kwargs)

    monkeypatch.setattr(model, "decode_step", counting_decode)
    run = jax.jit(
        lambda *a: sampling.sample(*a, TINY, dataclasses.replace(greedy, eos_ids=eos_ids))
    )
    stopped = jax.device_get(run(params, *map(jnp.asarray, prompts), jax.random.key(0)))
    assert len(steps) == 1  # token 1 came from the prefill, token 2 from one decode step
    assert (stopped.lengths_B <= 2).all() and stopped.lengths_B.max() == 2
    np.testing.assert_array_equal(stopped.mask_BxN[:, 2:], 0.0)


# ----------------------------------------------------------------------------- padding, keys


@pytest.mark.parametrize(
    "config", [SamplingConfig(8, temperature=0.0), SAMPLED], ids=["greedy", "sampled"]
)
def test_a_left_padded_row_samples_as_it_would_alone(params, prompts, config):
    """Row i's key depends only on (key, i), so row 0 alone must repeat row 0 of a batch."""
    batch = _run(params, prompts, config, key=11)
    alone = _run(params, _left_pad(PROMPTS[1:2]), config, key=11)
    padded = _run(params, _left_pad(PROMPTS[1:], width=9), config, key=11)
    assert not prompts[1][1].all()  # row 1 of `batch` is padded
    np.testing.assert_array_equal(padded.tokens_BxN[0], alone.tokens_BxN[0])
    np.testing.assert_allclose(
        padded.raw_logprobs_BxN[0], alone.raw_logprobs_BxN[0], rtol=0, atol=RERUN_ATOL
    )
    if config.greedy:  # keys differ by row index in `batch`, so only greedy must agree there
        np.testing.assert_array_equal(batch.tokens_BxN[1], alone.tokens_BxN[0])


def test_same_key_same_tokens_other_key_other_tokens(params, prompts):
    first, again = _run(params, prompts, SAMPLED, key=1), _run(params, prompts, SAMPLED, key=1)
    other = _run(params, prompts, SAMPLED, key=2)
    np.testing.assert_array_equal(first.tokens_BxN, again.tokens_BxN)
    np.testing.assert_array_equal(first.logprobs_BxN, again.logprobs_BxN)
    assert (first.tokens_BxN != other.tokens_BxN).any(axis=1).all()


def test_new_values_of_the_same_shapes_do_not_recompile(params, prompts):
    config = dataclasses.replace(SAMPLED, eos_ids=(3, 4))
    traces = []

    def outer(params, tokens, valid, key):  # the sampler traced inside other jitted code
        traces.append(1)
        samples = sampling.sample(params, tokens, valid, key, TINY, config)
        return samples, jnp.sum(samples.raw_logprobs_BxN * samples.mask_BxN)

    outer_jit = jax.jit(outer)
    tokens, valid = map(jnp.asarray, prompts)
    other_tokens, other_valid = map(jnp.asarray, _left_pad([[5], [6, 7, 8], [9, 9]], width=6))
    _run(params, prompts, config)
    compiled = sampling.sample_jit._cache_size()
    results = []
    for p, t, v, k in [
        (params, tokens, valid, 0),
        (_sharp_params(TINY, 1), tokens, valid, 0),
        (params, other_tokens, other_valid, 0),
        (params, tokens, valid, 9),
    ]:
        results.append(outer_jit(p, t, v, jax.random.key(k))[0].tokens_BxN)
        _run(p, (t, v), config, key=k)
    assert len(traces) == 1 and outer_jit._cache_size() == 1
    assert sampling.sample_jit._cache_size() == compiled
    assert all((r != results[0]).any() for r in results[1:])  # the values did change


# ----------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=4, temperature=-0.5), "temperature"),
        (dict(max_new_tokens=4, temperature=float("nan")), "temperature"),
        (dict(max_new_tokens=4, top_p=0.0), "top_p"),
        (dict(max_new_tokens=4, top_p=1.2), "top_p"),
        (dict(max_new_tokens=4, top_k=-1), "top_k"),
        (dict(max_new_tokens=4, eos_ids=(2, -1)), "eos_ids"),
        (dict(max_new_tokens=4, max_len=0), "max_len"),
    ],
)
def test_bad_settings_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingConfig(**kwargs)


@pytest.mark.parametrize(
    "config, rows, message",
    [
        (SamplingConfig(4, top_k=98), [[1, 2, 3]], "top_k=98 is larger than the vocabulary"),
        (SamplingConfig(4, eos_ids=97), [[1, 2, 3]], "eos_ids"),
        (SamplingConfig(4, max_len=6), [[1, 2, 3]], r"3 \+ max_new_tokens 4 = 7 does not fit"),
        (SamplingConfig(4), [[1, 2], [0, 0], [3, 4]], r"rows \[1\] are all padding"),
        (SamplingConfig(4), [[1, 2], [3, 0], [3, 4]], r"rows \[1\] are not left-padded"),
        (SamplingConfig(4), [[1, 2], [3, 97]], "outside the vocabulary"),
    ],
    ids=["top_k", "eos", "cache", "empty_row", "right_padded", "token_id"],
)
def test_bad_prompts_raise_before_compiling(params, config, rows, message):
    tokens = np.array(rows, np.int32)
    valid = tokens != 0
    compiled = sampling.sample_jit._cache_size()
    with pytest.raises(ValueError, match=message):
        sampling.generate(params, tokens, valid, jax.random.key(0), TINY, config)
    assert sampling.sample_jit._cache_size() == compiled


# ----------------------------------------------------------------------------- real model


CHATS = [
    "What is the capital of France?",
    "Hi!",
    "Write a short poem about the sea, with a rhyme in every line.",
]


def test_greedy_matches_transformers_on_smollm2(real_models):
    import torch

    name = "smollm2-135m-instruct"
    config, params = real_models.ours(name)
    reference, tokenizer = real_models.reference(name), real_models.reference_tokenizer(name)
    prompt_ids = [
        tokenizer(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": chat}], add_generation_prompt=True, tokenize=False
            ),
            add_special_tokens=False,
        )["input_ids"]
        for chat in CHATS
    ]
    assert len({len(ids) for ids in prompt_ids}) > 1  # the batch really is left-padded
    eos = tokenizer.eos_token_id
    settings = SamplingConfig(max_new_tokens=20, temperature=0.0, eos_ids=eos, pad_id=eos)
    tokens, valid = _left_pad(prompt_ids, pad_id=eos)
    ours = jax.device_get(
        sampling.generate(params, tokens, valid, jax.random.key(0), config, settings)
    )
    for row, ids in enumerate(prompt_ids):
        with torch.no_grad():
            out = reference.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                do_sample=False,
                max_new_tokens=20,
                eos_token_id=eos,
            )
        theirs = out[0, len(ids) :].tolist()
        assert ours.lengths_B[row] == len(theirs)
        assert ours.tokens_BxN[row, : len(theirs)].tolist() == theirs
