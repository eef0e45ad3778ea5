"""Autoregressive sampling with a static-size KV cache, as one traceable function.

On-policy distillation samples completions from the student inside the training step,
so the sampler is a pure function of (params, prompts, key) with every setting static:
it traces inside other jitted code, and new prompts, params or keys of the same shapes
reuse the compiled program. The prompt batch is left-padded and prefilled at once; a
`lax.while_loop` then decodes one token per step and stops as soon as every row has
emitted EOS. Alongside each token it records the two log-probabilities OPD losses need:
under the filtered distribution that drew it, and under the raw policy at temperature 1.

Shapes are in the names: B batch, P prompt width, N new tokens, V vocab.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from opd_jax import mesh, model
from opd_jax.model import ModelConfig, Params


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to sample; hashable, so it is a static argument and its checks run before compile.

    temperature: 0 means greedy. top_k: 0 disables it. top_p: 1 disables it. Tokens tied
      with the top-k / top-p cut-off are kept, as in transformers.
    eos_ids: one id or several; a row stops at the first of them. Empty: never stop early.
    pad_id: written after a row's EOS.
    max_len: the longest prompt + completion the model may see (e.g. its context window);
      None puts no limit. The cache itself is always prompt width + max_new_tokens.
    vocab_size: the tokenizer's vocabulary; rows of the embedding table at or beyond it are
      padding, never drawn and outside every log-prob. None: every row is a token.
    """

    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    eos_ids: int | tuple[int, ...] = ()
    pad_id: int = 0
    max_len: int | None = None
    vocab_size: int | None = None

    def __post_init__(self):
        eos_ids = (self.eos_ids,) if isinstance(self.eos_ids, int) else tuple(self.eos_ids)
        object.__setattr__(self, "eos_ids", eos_ids)
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(
                f"temperature must be finite and >= 0 (0 = greedy), got {self.temperature}"
            )
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        for name, ids in (("eos_ids", eos_ids), ("pad_id", (self.pad_id,))):
            if not all(_is_int(i) and i >= 0 for i in ids):
                raise ValueError(f"{name} must be non-negative integer token ids, got {ids!r}")
        for name in ("max_len", "vocab_size"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 1):
                raise ValueError(f"{name} must be an integer >= 1 or None, got {value!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def check(self, vocab_size: int, prompt_width: int) -> None:
        """The checks that need the model's vocabulary and the prompt width (both static)."""
        vocab_size = min(vocab_size, self.vocab_size or vocab_size)
        if self.top_k > vocab_size:
            raise ValueError(f"top_k={self.top_k} is larger than the vocabulary ({vocab_size})")
        for name, ids in (("eos_ids", self.eos_ids), ("pad_id", (self.pad_id,))):
            if any(i >= vocab_size for i in ids):
                raise ValueError(f"{name} {ids} outside the vocabulary of size {vocab_size}")
        if prompt_width < 1:
            raise ValueError("the prompt batch has width 0: every row needs a real token")
        total = prompt_width + self.max_new_tokens
        if self.max_len is not None and total > self.max_len:
            raise ValueError(
                f"prompt width {prompt_width} + max_new_tokens {self.max_new_tokens} = {total} "
                f"does not fit in max_len={self.max_len}"
            )


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


@flax.struct.dataclass
class Samples:
    """Completions [B, N]; every position after a row's EOS holds pad_id, 0 log-probs, mask 0.

    logprobs_BxN: log-prob under the distribution that drew the token (after temperature,
      top-k and top-p); 0 for greedy, whose distribution is a point mass.
    raw_logprobs_BxN: log-prob under the unfiltered policy at temperature 1.
    mask_BxN: 1.0 up to and including EOS, 0.0 after.
    lengths_B: generated tokens per row, EOS included.
    """

    tokens_BxN: jax.Array
    logprobs_BxN: jax.Array
    raw_logprobs_BxN: jax.Array
    mask_BxN: jax.Array
    lengths_B: jax.Array


class _DecodeState(NamedTuple):
    step: jax.Array  # the completion position the next emitted token goes to
    caches: tuple[model.LayerCache, ...]  # one buffer pair per layer, updated in place
    done_B: jax.Array
    samples: Samples


def _pin_layout(state: _DecodeState, placement: mesh.Placement | None) -> _DecodeState:
    """Keeps the loop state's layout fixed on a mesh: caches by the logical-axis rules
    (rows over the data axes, kv heads over tensor where they divide), every other
    per-row buffer split by rows, so the while loop never reshards its carry."""
    if placement is None:
        return state
    rows = placement.rows
    pin_rows = lambda x: mesh.constrain(x, mesh.fitted_sharding(x.shape, rows)) if x.ndim else x
    caches = jax.tree.map(lambda x: placement.pin(x, model.CACHE_AXES), state.caches)
    per_row = jax.tree.map(pin_rows, state._replace(caches=()))
    return per_row._replace(caches=caches)


def _filtered_logits(logits_BxV: jax.Array, config: SamplingConfig) -> jax.Array:
    """Temperature, then top-k, then top-p; tokens cut are -inf."""
    scaled_BxV = logits_BxV / config.temperature
    if config.top_k == 0 and config.top_p == 1.0:
        return scaled_BxV
    if config.top_k:
        sorted_BxK = jax.lax.top_k(scaled_BxV, config.top_k)[0]
    else:
        sorted_BxK = jnp.flip(jnp.sort(scaled_BxV, axis=-1), axis=-1)
    if config.top_p < 1.0:
        probs_BxK = jax.nn.softmax(sorted_BxK, axis=-1)
        mass_before_BxK = jnp.cumsum(probs_BxK, axis=-1) - probs_BxK
        sorted_BxK = jnp.where(mass_before_BxK < config.top_p, sorted_BxK, jnp.inf)
    cutoff_Bx1 = jnp.min(sorted_BxK, axis=-1, keepdims=True)
    return jnp.where(scaled_BxV >= cutoff_Bx1, scaled_BxV, -jnp.inf)


def _log_prob_at(logits_BxV: jax.Array, token_B: jax.Array) -> jax.Array:
    picked_B = jnp.take_along_axis(logits_BxV, token_B[:, None], axis=-1)[:, 0]
    return picked_B - jax.nn.logsumexp(logits_BxV, axis=-1)


def _emit(
    state: _DecodeState, logits_BxV: jax.Array, row_keys_B: jax.Array, config: SamplingConfig
) -> _DecodeState:
    """Draws the token for position `step` and writes it with its sampling and raw
    (temperature-1) log-probs, both over the vocabulary alone; rows already done write
    padding."""
    logits_BxV = logits_BxV[:, : config.vocab_size]
    if config.greedy:
        token_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
        logprob_B = jnp.zeros(token_B.shape, jnp.float32)
    else:
        keys_B = jax.vmap(jax.random.fold_in, (0, None))(row_keys_B, state.step)
        filtered_BxV = _filtered_logits(logits_BxV, config)
        token_B = jax.vmap(jax.random.categorical)(keys_B, filtered_BxV).astype(jnp.int32)
        logprob_B = _log_prob_at(filtered_BxV, token_B)
    raw_logprob_B = _log_prob_at(logits_BxV, token_B)
    live_B = ~state.done_B
    s = state.samples
    write = lambda buf_BxN, value_B: buf_BxN.at[:, state.step].set(value_B)
    samples = Samples(
        tokens_BxN=write(s.tokens_BxN, jnp.where(live_B, token_B, config.pad_id)),
        logprobs_BxN=write(s.logprobs_BxN, jnp.where(live_B, logprob_B, 0.0)),
        raw_logprobs_BxN=write(s.raw_logprobs_BxN, jnp.where(live_B, raw_logprob_B, 0.0)),
        mask_BxN=write(s.mask_BxN, live_B.astype(jnp.float32)),
        lengths_B=s.lengths_B + live_B.astype(jnp.int32),
    )
    is_eos_B = jnp.isin(token_B, jnp.asarray(config.eos_ids, jnp.int32))
    return state._replace(step=state.step + 1, done_B=state.done_B | is_eos_B, samples=samples)


def sample(
    params: Params,
    prompt_BxP: jax.Array,
    prompt_valid_BxP: jax.Array,
    key: jax.Array,
    model_config: ModelConfig,
    config: SamplingConfig,
    placement: mesh.Placement | None = None,
) -> Samples:
    """Completions of a left-padded prompt batch; pure and traceable (jit it, or call it
    from jitted code). Row i draws from fold_in(fold_in(key, i), step), so a row's sample
    does not depend on the rest of its batch. Prompt values are not checked here (they may
    be tracers): use `generate`, or `check_prompts` on host. With a `placement` the KV
    cache and loop state are laid out by its mesh and logical-axis rules."""
    B, P = prompt_BxP.shape
    config.check(model_config.vocab_size, P)
    N = config.max_new_tokens
    cache = model.init_cache(model_config, B, P + N, params["embed"].dtype)
    hidden_BxPxD, cache = model.hidden_states(
        params, prompt_BxP, model_config, valid_BxT=prompt_valid_BxP, cache=cache
    )
    logits_BxV = model.logits_from_hidden(params, hidden_BxPxD[:, -1:], model_config)[:, 0]
    layers = model.unstack_layers(params, model_config)
    last_position_B = model.positions_from_mask(prompt_valid_BxP)[:, -1]
    # Every completion slot holds a real token once written; until then causality hides it.
    valid_BxS = jnp.pad(prompt_valid_BxP, ((0, 0), (0, N)), constant_values=True)
    row_keys_B = jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(B))
    zeros_BxN = jnp.zeros((B, N), jnp.float32)
    pads_BxN = jnp.full((B, N), config.pad_id, jnp.int32)
    empty = Samples(pads_BxN, zeros_BxN, zeros_BxN, zeros_BxN, jnp.zeros((B,), jnp.int32))
    caches = model.layer_caches(cache)
    start = _DecodeState(jnp.zeros((), jnp.int32), caches, jnp.zeros((B,), bool), empty)
    state = _pin_layout(_emit(start, logits_BxV, row_keys_B, config), placement)

    def keep_going(state: _DecodeState) -> jax.Array:
        return (state.step < N) & ~jnp.all(state.done_B)

    def decode_one(state: _DecodeState) -> _DecodeState:
        last_B = state.samples.tokens_BxN[:, state.step - 1]
        slot, positions_B = P + state.step - 1, last_position_B + state.step
        logits_BxV, caches = model.decode_step(
            params, layers, last_B, state.caches, slot, positions_B, valid_BxS, model_config
        )
        state = _emit(state._replace(caches=caches), logits_BxV, row_keys_B, config)
        return _pin_layout(state, placement)

    return jax.lax.while_loop(keep_going, decode_one, state).samples


sample_jit = jax.jit(sample, static_argnames=("model_config", "config", "placement"))


def check_prompts(
    prompt_BxP: Any, prompt_valid_BxP: Any, model_config: ModelConfig, config: SamplingConfig
) -> None:
    """Host-side checks of prompt values, which the traced sampler cannot make."""
    tokens_BxP, valid_BxP = np.asarray(prompt_BxP), np.asarray(prompt_valid_BxP)
    if tokens_BxP.ndim != 2 or tokens_BxP.shape != valid_BxP.shape:
        raise ValueError(
            f"prompt tokens {tokens_BxP.shape} and valid mask {valid_BxP.shape} must both be [B, P]"
        )
    if not np.issubdtype(tokens_BxP.dtype, np.integer) or valid_BxP.dtype != bool:
        raise ValueError(
            f"prompt tokens must be integers and the mask bool, got {tokens_BxP.dtype} and "
            f"{valid_BxP.dtype}"
        )
    config.check(model_config.vocab_size, tokens_BxP.shape[1])
    empty_rows = np.flatnonzero(~valid_BxP.any(axis=1))
    if empty_rows.size:
        raise ValueError(f"prompt rows {empty_rows.tolist()} are all padding: no token to continue")
    not_left_padded = np.flatnonzero((valid_BxP[:, :-1] & ~valid_BxP[:, 1:]).any(axis=1))
    if not_left_padded.size:
        raise ValueError(
            f"prompt rows {not_left_padded.tolist()} are not left-padded (a real token is "
            "followed by padding)"
        )
    real_B = tokens_BxP[valid_BxP]
    if real_B.size and (real_B.min() < 0 or real_B.max() >= model_config.vocab_size):
        raise ValueError(
            f"prompt token ids span [{real_B.min()}, {real_B.max()}], outside the vocabulary "
            f"of size {model_config.vocab_size}"
        )


def generate(
    params: Params,
    prompt_BxP: Any,
    prompt_valid_BxP: Any,
    key: jax.Array,
    model_config: ModelConfig,
    config: SamplingConfig,
    placement: mesh.Placement | None = None,
) -> Samples:
    """Host entry point: checks the prompts (every process holds them whole), then runs
    the jitted sampler; with a `placement` the prompts' rows are split over the data axes."""
    check_prompts(prompt_BxP, prompt_valid_BxP, model_config, config)
    place = jnp.asarray if placement is None else lambda x: mesh.from_host(x, placement.rows)
    return sample_jit(
        params, place(prompt_BxP), place(prompt_valid_BxP), key, model_config, config, placement
    )
