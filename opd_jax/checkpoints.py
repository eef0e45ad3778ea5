"""Pretrained weights in and out: HF safetensors directories, GGUF files, named presets.

Every source is first turned into the Hugging Face form (a config dict plus tensors
under HF names, in HF layout), then one table maps HF names to our params. GGUF files
go through that same table after dequantization and llama.cpp's layout fixes are
undone, and export runs the table backwards, so the three paths cannot drift apart.
"""

from __future__ import annotations

import json
import pathlib
import re
from collections.abc import Iterator
from typing import Any

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy

from opd_jax import assets
from opd_jax.model import ModelConfig, Params, RopeConfig, param_shapes

# Our family -> (HF model_type, HF architecture); GGUF files name their architecture by family.
_FAMILIES = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
    "gemma3": ("gemma3_text", "Gemma3ForCausalLM"),
}
SUPPORTED_FAMILIES = tuple(_FAMILIES)
_MODEL_TYPE_TO_FAMILY = {"gemma3": "gemma3"} | {hf: ours for ours, (hf, _) in _FAMILIES.items()}
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
        per_type = rope_params if rope_params and "full_attention" in rope_params else {}
        local_theta = float(hf.get("rope_local_base_freq", 10000.0))
        pattern = int(hf.get("sliding_window_pattern", 6))  # older configs: every 6th is full
        layer_types = hf.get("layer_types") or [
            "full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
            for i in range(hf["num_hidden_layers"])
        ]
        fields.update(
            rope=_rope_from_hf(per_type.get("full_attention", rope_params), rope_theta),
            local_rope=_rope_from_hf(per_type.get("sliding_attention"), local_theta),
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


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    """A config.json dict that transformers loads as the same architecture."""
    c = config
    model_type, architecture = _FAMILIES[c.family]
    hf: dict[str, Any] = {
        "architectures": [architecture],
        "model_type": model_type,
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
        "rope_parameters": _rope_to_hf(c.rope),
    }
    if c.family == "gemma3":
        scalar = c.query_pre_attn_scalar  # transformers validates an integral one as an int
        hf.update(
            rope_parameters={
                "full_attention": _rope_to_hf(c.rope),
                "sliding_attention": _rope_to_hf(c.local_rope or c.rope),
            },
            query_pre_attn_scalar=int(scalar) if scalar and float(scalar).is_integer() else scalar,
            sliding_window=c.sliding_window,
            layer_types=["sliding_attention" if s else "full_attention" for s in c.is_sliding],
            hidden_activation="gelu_pytorch_tanh",
        )
    return hf


# --------------------------------------------------------------------------- name table

_EMBED = "model.embed_tokens.weight"  # [V, D] in both layouts


def _hf_layout(config: ModelConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """The HF name and shape of each of our params: (top-level, per layer); a per-layer
    name is the tensor's inside layer i."""
    c = config
    D, F, Dh = c.d_model, c.mlp_dim, c.head_dim
    q, kv = c.n_heads * Dh, c.n_kv_heads * Dh
    top = {"embed": (_EMBED, (c.vocab_size, D)), "final_norm": ("model.norm.weight", (D,))}
    if not c.tie_embeddings:
        top["lm_head"] = ("lm_head.weight", (c.vocab_size, D))
    layer = {
        "attn_norm": ("input_layernorm.weight", (D,)),
        "q": ("self_attn.q_proj.weight", (q, D)),
        "k": ("self_attn.k_proj.weight", (kv, D)),
        "v": ("self_attn.v_proj.weight", (kv, D)),
        "o": ("self_attn.o_proj.weight", (D, q)),
        "gate": ("mlp.gate_proj.weight", (F, D)),
        "up": ("mlp.up_proj.weight", (F, D)),
        "down": ("mlp.down_proj.weight", (D, F)),
    }
    if c.family == "gemma3":
        layer["post_attn_norm"] = ("post_attention_layernorm.weight", (D,))
        layer["mlp_norm"] = ("pre_feedforward_layernorm.weight", (D,))
        layer["post_mlp_norm"] = ("post_feedforward_layernorm.weight", (D,))
    else:
        layer["mlp_norm"] = ("post_attention_layernorm.weight", (D,))
    if c.qkv_bias:
        layer["q_bias"] = ("self_attn.q_proj.bias", (q,))
        layer["k_bias"] = ("self_attn.k_proj.bias", (kv,))
        layer["v_bias"] = ("self_attn.v_proj.bias", (kv,))
    if c.qk_norm:
        layer["q_norm"] = ("self_attn.q_norm.weight", (Dh,))
        layer["k_norm"] = ("self_attn.k_norm.weight", (Dh,))
    return top, layer


def _is_gemma_norm(config: ModelConfig, hf_name: str) -> bool:
    """Gemma stores RMSNorm scales as w in `(1 + w)`; we keep the effective scale."""
    return config.family == "gemma3" and hf_name.endswith("norm.weight")


def params_from_hf(
    config: ModelConfig, tensors: dict[str, np.ndarray], dtype: Any = jnp.float32
) -> Params:
    """Our params from HF-named tensors in HF layout; every shape checked against the config.

    HF linear weights are [out, in] and ours [*in, *out] with the heads split out of the
    flat axes, so each moves between the layouts as a transpose and a reshape.
    """
    dtype = _resolve_dtype(dtype)
    shapes = param_shapes(config)

    def read(name: str, hf_shape: tuple[int, ...], shape: tuple[int, ...]) -> np.ndarray:
        if name not in tensors:
            raise CheckpointError(f"checkpoint has no tensor {name}")
        w = np.asarray(tensors[name], np.float32)
        if w.shape != hf_shape:
            raise CheckpointError(
                f"tensor {name} has shape {w.shape} but the config implies {hf_shape}"
            )
        if _is_gemma_norm(config, name):
            w = w + 1.0
        return w if name == _EMBED else w.T.reshape(shape)

    top, layer = _hf_layout(config)
    params = {ours: read(name, hf, shapes[ours][0]) for ours, (name, hf) in top.items()}
    params["layers"] = {}
    for ours, (name, hf) in layer.items():
        shape = shapes["layers"][ours][0][1:]
        per_layer = [read(f"model.layers.{i}.{name}", hf, shape) for i in range(config.n_layers)]
        params["layers"][ours] = np.stack(per_layer)
    return jax.tree.map(lambda x: jnp.asarray(x, dtype), params)


def params_to_hf(config: ModelConfig, params: Params) -> dict[str, np.ndarray]:
    """HF-named float32 tensors in HF layout, the inverse of `params_from_hf`."""

    def write(name: str, hf_shape: tuple[int, ...], w: Any) -> np.ndarray:
        w = np.asarray(w, np.float32)
        if _is_gemma_norm(config, name):
            w = w - 1.0
        # contiguous: safetensors writes the raw buffer, ignoring strides
        return w if name == _EMBED else np.ascontiguousarray(w.reshape(hf_shape[::-1]).T)

    top, layer = _hf_layout(config)
    tensors = {name: write(name, hf, params[ours]) for ours, (name, hf) in top.items()}
    for ours, (name, hf) in layer.items():
        for i, w in enumerate(np.asarray(params["layers"][ours], np.float32)):
            tensors[f"model.layers.{i}.{name}"] = write(name, hf, w)
    return tensors


def _resolve_dtype(dtype: Any) -> Any:
    name = jnp.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in _SUPPORTED_DTYPES:
        raise CheckpointError(
            f"param dtype {name!r} is not supported; use one of {sorted(_SUPPORTED_DTYPES)}"
        )
    return _SUPPORTED_DTYPES[name]


# --------------------------------------------------------------------------- HF directories


def _require(path: pathlib.Path, what: str) -> pathlib.Path:
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def _read_safetensors(path: pathlib.Path) -> Iterator[tuple[str, np.ndarray]]:
    try:
        with safetensors.safe_open(str(path), framework="flax") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                dtype = f.get_slice(name).get_dtype()
                if dtype not in ("F32", "F16", "BF16", "F64"):
                    raise CheckpointError(
                        f"{path}: tensor {name} has dtype {dtype}, which we cannot load"
                    )
                yield name, np.asarray(f.get_tensor(name).astype(jnp.float32))
    except safetensors.SafetensorError as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None


def load_hf_dir(
    directory: str | pathlib.Path, dtype: Any = jnp.float32
) -> tuple[ModelConfig, Params]:
    """(config, params) from a directory holding config.json and safetensors weights."""
    directory = _require(pathlib.Path(directory), "checkpoint directory")
    config_path = _require(directory / "config.json", "config.json")
    try:
        config = config_from_hf(json.loads(config_path.read_text()))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{config_path}: not valid JSON ({err})") from None
    index = directory / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [_require(directory / s, "safetensors shard named in the index") for s in shards]
    else:
        files = [_require(directory / "model.safetensors", "model.safetensors")]
    # Gemma 3 multimodal checkpoints nest the text model under `language_model.`
    text_model = re.compile(r"^(model\.)?language_model\.(model\.)?")
    tensors = {text_model.sub("model.", k): v for f in files for k, v in _read_safetensors(f)}
    return config, params_from_hf(config, tensors, dtype)


def save_hf_dir(config: ModelConfig, params: Params, directory: str | pathlib.Path) -> pathlib.Path:
    """Writes config.json + model.safetensors that transformers (and we) load back."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config_to_hf(config), indent=2))
    weights = str(directory / "model.safetensors")
    safetensors.numpy.save_file(params_to_hf(config, params), weights, {"format": "pt"})
    return directory


# --------------------------------------------------------------------------- GGUF


def _hf_config_from_gguf(reader: gguf.GGUFReader, path: pathlib.Path) -> dict[str, Any]:
    def field(key: str, default: Any = ...) -> Any:
        if key not in reader.fields:
            if default is ...:
                raise CheckpointError(f"{path}: GGUF metadata has no field {key}")
            return default
        return reader.fields[key].contents()

    arch = field("general.architecture")
    if arch not in _FAMILIES:
        raise CheckpointError(
            f"{path}: unsupported architecture general.architecture={arch!r}; "
            f"supported: {sorted(_FAMILIES)}"
        )
    names = {t.name: t for t in reader.tensors}
    n_heads = int(field(f"{arch}.attention.head_count"))
    d_model = int(field(f"{arch}.embedding_length"))
    hf = {
        "model_type": _FAMILIES[arch][0],
        "vocab_size": int(names["token_embd.weight"].shape[-1]),
        "hidden_size": d_model,
        "intermediate_size": int(field(f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(field(f"{arch}.block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(field(f"{arch}.attention.head_count_kv", n_heads)),
        "head_dim": int(field(f"{arch}.attention.key_length", d_model // n_heads)),
        "rms_norm_eps": float(field(f"{arch}.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(field(f"{arch}.rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in names,
    }
    if arch == "gemma3":
        hf["sliding_window"] = int(field(f"{arch}.attention.sliding_window", 512))
    return hf


def _unpermute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp interleaves Q/K rows for its rotary kernel; HF keeps the halves split."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)


def _dequantize(tensor: gguf.ReaderTensor, path: pathlib.Path) -> np.ndarray:
    try:
        return np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), np.float32)
    except NotImplementedError:
        raise CheckpointError(
            f"{path}: tensor {tensor.name} has GGUF type {tensor.tensor_type.name}, "
            "which the gguf package cannot dequantize"
        ) from None


def load_gguf(path: str | pathlib.Path, dtype: Any = jnp.float32) -> tuple[ModelConfig, Params]:
    """(config, params) from a GGUF file, dequantized to float32 first; gguf's own name
    map says which GGUF tensor holds each HF-named one."""
    path = _require(pathlib.Path(path), "GGUF file")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as err:  # the reader raises a zoo of types on bad bytes
        raise CheckpointError(
            f"{path}: not a readable GGUF file ({type(err).__name__}: {err})"
        ) from None
    config = config_from_hf(_hf_config_from_gguf(reader, path))
    in_file = {t.name: t for t in reader.tensors}
    arch = gguf.MODEL_ARCH[config.family.upper()]
    gguf_names = gguf.get_tensor_name_map(arch, config.n_layers)
    top, layer = _hf_layout(config)
    names = [name for name, _ in top.values()]
    names += [f"model.layers.{i}.{n}" for n, _ in layer.values() for i in range(config.n_layers)]
    tensors = {}
    for name in names:
        tensor = in_file.get(gguf_names.get_name(name, try_suffixes=(".weight", ".bias")))
        if tensor is None:
            continue  # params_from_hf names what is missing
        weights = _dequantize(tensor, path)
        if config.family == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.n_heads if "q_proj" in name else config.n_kv_heads
            weights = _unpermute_rotary(weights, heads)
        if _is_gemma_norm(config, name):
            weights = weights - 1.0  # to the HF convention; params_from_hf adds it back
        tensors[name] = weights
    return config, params_from_hf(config, tensors, dtype)


# --------------------------------------------------------------------------- one entry point


def is_source(spec: str | pathlib.Path) -> bool:
    """Whether `spec` is something `load` reads: a packaged model's name, a checkpoint
    directory (with config.json) or a GGUF file. Nothing is fetched."""
    if isinstance(spec, str) and spec in assets.PACKAGED_CHECKPOINTS:
        return True
    path = pathlib.Path(spec)
    return (path / "config.json").is_file() or (path.is_file() and path.suffix == ".gguf")


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
    return load_hf_dir(path, dtype) if path.is_dir() else load_gguf(path, dtype)
