"""Pretrained weights in and out: HF safetensors directories, GGUF files, named presets.

Every source is first turned into the Hugging Face form (a config dict plus tensors
under HF names, in HF layout), then one table maps HF names to our params. GGUF files
go through that same table after dequantization and llama.cpp's layout fixes are
undone, and export runs the table backwards, so the three paths cannot drift apart.

Params are read tensor by tensor, and given their shardings (`Checkpoint.params`), each
is built straight into them: every device's shard is read from the checkpoint on its
own (a slice of a safetensors file; a GGUF tensor is dequantized whole, one at a time),
so no host and no device ever holds more than its own shards plus one tensor, and a
model larger than one device reaches a mesh. Layers a student does not keep are never
read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import json
import math
import operator
import pathlib
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy

from opd_jax import assets, model
from opd_jax.model import ModelConfig, Params, RopeConfig

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


# --------------------------------------------------------------------------- reading params

Box = tuple[tuple[int, int], ...]  # a block of an array: [start, stop) along every axis
_CHUNK_BYTES = 1 << 24  # float32 bytes a tensor is read in when not read whole
Sharding = jax.sharding.Sharding | None  # None: the whole array on the default device
ShardingsOf = Callable[[ModelConfig], Params]  # a config -> its params' shardings


class _Tensors(Protocol):
    """A checkpoint's tensors under HF names and in HF layout, read a block at a time."""

    def shape(self, name: str) -> tuple[int, ...] | None:
        """The tensor's shape; None when the checkpoint has no such tensor."""

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """The block `index` of the tensor, in the dtype it is stored in (a float)."""

    @property
    def reads_whole_rows(self) -> bool:
        """Whether a block costs reading its rows whole (GGUF dequantizes rows), so blocks
        of the same rows are best read together (`_place`'s `part_major`)."""


@dataclasses.dataclass(frozen=True)
class _InMemory:
    """Tensors already in memory (a dict of arrays)."""

    tensors: Mapping[str, Any]
    reads_whole_rows = False

    def shape(self, name: str) -> tuple[int, ...] | None:
        return tuple(np.shape(self.tensors[name])) if name in self.tensors else None

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        return np.asarray(self.tensors[name])[index]


def _runs(shape: tuple[int, ...], sizes: tuple[int, ...]) -> list[tuple[int, int]]:
    """The consecutive runs [first, stop) of our axes that each of `sizes` flattens."""
    runs, first = [], 0
    for n, size in enumerate(sizes):
        stop = len(shape) if n == len(sizes) - 1 else first + 1
        while math.prod(shape[first:stop]) != size:
            stop += 1
        runs.append((first, stop))
        first = stop
    return runs


def _read_block(
    tensors: _Tensors, config: ModelConfig, shape: tuple[int, ...], name: str, box: Box
) -> np.ndarray:
    """The block `box` of one HF tensor in our layout (`shape`), float32.

    Ours is the HF tensor transposed (the embedding excepted) and reshaped: each HF axis
    flattens a run of our axes. Only the span of each run's leading axis is read, and the
    run's other axes are cut after the reshape: the default rules split none of those
    (head_dim), so what is read is the block itself.
    """
    transposed = name != _EMBED
    hf_shape = tensors.shape(name)
    runs = _runs(shape, hf_shape[::-1] if transposed else hf_shape)
    spans, read_shape = [], []
    for first, stop in runs:
        (start, end), inner = box[first], shape[first + 1 : stop]
        spans.append(slice(start * math.prod(inner), end * math.prod(inner)))
        read_shape += [end - start, *inner]
    w = np.asarray(tensors.read(name, tuple(spans[::-1] if transposed else spans)), np.float32)
    if _is_gemma_norm(config, name):
        w = w + 1.0
    w = (w.T if transposed else w).reshape(read_shape)
    leading = {first for first, _ in runs}
    return w[tuple(slice(None) if i in leading else slice(*b) for i, b in enumerate(box))]


def _device_boxes(shape: tuple[int, ...], sharding: Sharding) -> dict[Any, Box]:
    """The block of the array each addressable device holds (without a sharding: the
    whole array, for the default device, keyed None)."""
    if sharding is None:
        return {None: tuple((0, n) for n in shape)}
    return {
        device: tuple(s.indices(n)[:2] for s, n in zip(index, shape, strict=True))
        for device, index in sharding.addressable_devices_indices_map(shape).items()
    }


Part = tuple[tuple[int, int], Callable[[Box], np.ndarray]]  # rows of axis 0, their reader


def _place(
    shape: tuple[int, ...],
    dtype: Any,
    sharding: Sharding,
    parts: Sequence[Part],
    part_major: bool,
) -> jax.Array:
    """One param built where it lives from `parts`, which cover its axis 0 in order
    (one kept layer each for stacked layers, some MB of rows for the others); a part's
    reader gives any block of the param inside its rows.

    Each distinct shard is filled from the parts it spans and goes to its devices, and
    leaves the host, as soon as its last block is in; a device only ever receives its own
    shard. Shard after shard, a host holds one shard and one part's block at a time;
    `part_major` (for sources that read whole rows, GGUF) goes part after part instead,
    every shard taking its block of each, so rows are read once and a host holds the
    shards being filled and one part.
    """
    devices_of: dict[Box, list[Any]] = {}
    for device, box in _device_boxes(shape, sharding).items():
        devices_of.setdefault(box, []).append(device)
    filling = {box: np.empty([stop - start for start, stop in box], dtype) for box in devices_of}
    steps = (
        itertools.product(parts, devices_of)
        if part_major
        else ((part, box) for box in devices_of for part in parts)
    )
    arrays = {}
    for ((low, high), read), box in steps:
        (start, stop), rest = box[0], box[1:]
        first, last = max(low, start), min(high, stop)
        if first >= last:
            continue
        filling[box][first - start : last - start] = read(((first, last), *rest))
        if last == stop:
            shard = filling.pop(box)
            arrays.update({device: jax.device_put(shard, device) for device in devices_of[box]})
    if sharding is None:
        return arrays[None]
    return jax.make_array_from_single_device_arrays(shape, sharding, list(arrays.values()))


def _parts(
    read: Callable[[str, Box], np.ndarray],
    names: Sequence[str],
    shape: tuple[int, ...],
    stacked: bool,
) -> list[Part]:
    """The parts of one param (see `_place`): each stacked layer's tensor, or row chunks of
    `_CHUNK_BYTES` of the one tensor, so a large embedding is read (and a GGUF one
    dequantized) a chunk at a time."""
    if stacked:
        layer = lambda name: lambda box: read(name, box[1:])[None]
        return [((j, j + 1), layer(name)) for j, name in enumerate(names)]
    (name,) = names
    rows = max(1, _CHUNK_BYTES // (4 * math.prod(shape[1:])))
    chunk = functools.partial(read, name)
    return [((start, min(start + rows, shape[0])), chunk) for start in range(0, shape[0], rows)]


def _check_tensors(tensors: _Tensors, expected: Mapping[str, tuple[int, ...]]) -> None:
    """Every tensor the config implies is there, in the shape it implies."""
    for name, hf_shape in expected.items():
        shape = tensors.shape(name)
        if shape is None:
            raise CheckpointError(f"checkpoint has no tensor {name}")
        if shape != hf_shape:
            raise CheckpointError(
                f"tensor {name} has shape {shape} but the config implies {hf_shape}"
            )


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """An open checkpoint: its config, and its tensors, read when params are asked for."""

    config: ModelConfig
    tensors: _Tensors

    def params(
        self,
        dtype: Any = jnp.float32,
        layers: Sequence[int] | None = None,
        shardings: ShardingsOf | None = None,
    ) -> tuple[ModelConfig, Params]:
        """(config, params) of the model made of `layers` of this one (None: all; as
        `model.select_layers`, but other layers are never read), in `dtype`.

        `shardings` gives a config's param shardings (`mesh.Placement.params`); each param
        is then built tensor by tensor straight into them (`_place`), so no host and no
        device holds more than its own shards plus one tensor. Without it the params are
        whole arrays on the default device.
        """
        dtype = _resolve_dtype(dtype)
        kept = tuple(range(self.config.n_layers) if layers is None else layers)
        config = self.config if layers is None else model.select_config(self.config, kept)
        top, layer = _hf_layout(config)
        sources = {(ours,): ([name], hf) for ours, (name, hf) in top.items()}
        for ours, (name, hf) in layer.items():
            sources["layers", ours] = ([f"model.layers.{i}.{name}" for i in kept], hf)
        _check_tensors(self.tensors, {n: hf for names, hf in sources.values() for n in names})
        shapes = model.param_shapes(config)
        where = None if shardings is None else shardings(config)
        at = lambda tree, path: functools.reduce(operator.getitem, path, tree)
        params: Params = {"layers": {}}
        for path, (names, _) in sources.items():
            shape, stacked = at(shapes, path)[0], path[0] == "layers"
            tensor_shape = shape[1:] if stacked else shape
            read = functools.partial(_read_block, self.tensors, config, tensor_shape)
            parts = _parts(read, names, shape, stacked)
            sharding = None if where is None else at(where, path)
            part_major = self.tensors.reads_whole_rows
            at(params, path[:-1])[path[-1]] = _place(shape, dtype, sharding, parts, part_major)
        return config, params


def params_from_hf(
    config: ModelConfig, tensors: Mapping[str, Any], dtype: Any = jnp.float32
) -> Params:
    """Our params from HF-named tensors in HF layout; every shape checked against the config.

    HF linear weights are [out, in] and ours [*in, *out] with the heads split out of the
    flat axes, so each moves between the layouts as a transpose and a reshape.
    """
    return Checkpoint(config, _InMemory(tensors)).params(dtype)[1]


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


class _Safetensors:
    """The tensors of safetensors files, each block read from the mapped file on its own.

    Gemma 3 multimodal checkpoints nest the text model under `language_model.`, which
    the names lose here."""

    _TEXT_MODEL = re.compile(r"^(model\.)?language_model\.(model\.)?")
    reads_whole_rows = False

    def __init__(self, files: Sequence[pathlib.Path], stack: contextlib.ExitStack):
        self._where: dict[str, tuple[Any, str]] = {}
        for path in files:
            with self._named_errors(path):
                handle = stack.enter_context(safetensors.safe_open(str(path), framework="numpy"))
                for name in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                    dtype = handle.get_slice(name).get_dtype()
                    if dtype not in ("F32", "F16", "BF16", "F64"):
                        raise CheckpointError(
                            f"{path}: tensor {name} has dtype {dtype}, which we cannot load"
                        )
                    self._where[self._TEXT_MODEL.sub("model.", name)] = (handle, name)

    @staticmethod
    @contextlib.contextmanager
    def _named_errors(path: pathlib.Path) -> Iterator[None]:
        try:
            yield
        except safetensors.SafetensorError as err:
            raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None

    def shape(self, name: str) -> tuple[int, ...] | None:
        if name not in self._where:
            return None
        handle, stored = self._where[name]
        return tuple(handle.get_slice(stored).get_shape())

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        handle, stored = self._where[name]
        return handle.get_slice(stored)[index]


@contextlib.contextmanager
def _opened_hf_dir(directory: pathlib.Path) -> Iterator[Checkpoint]:
    directory = _require(directory, "checkpoint directory")
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
    with contextlib.ExitStack() as stack:
        yield Checkpoint(config, _Safetensors(files, stack))


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


def _hf_shape(tensor: gguf.ReaderTensor) -> tuple[int, ...]:
    """GGUF lists a tensor's dimensions fastest first; HF (and numpy) slowest first."""
    return tuple(int(n) for n in reversed(tensor.shape))


def _dequantize(tensor: gguf.ReaderTensor, rows: slice, path: pathlib.Path) -> np.ndarray:
    """Rows of the tensor in float32 (HF layout), dequantized `_CHUNK_BYTES` of rows at a
    time (a quantization block never spans rows), so the dequantizer's temporaries stay
    that small. A 1-D tensor is dequantized whole."""
    shape = _hf_shape(tensor)
    dequantize = lambda data: gguf.quants.dequantize(data, tensor.tensor_type)
    try:
        if len(shape) == 1:
            return np.asarray(dequantize(tensor.data), np.float32)[rows]
        start, stop, _ = rows.indices(shape[0])
        weights = np.empty((stop - start, *shape[1:]), np.float32)
        chunk = max(1, _CHUNK_BYTES // (4 * math.prod(shape[1:])))
        for first in range(start, stop, chunk):
            last = min(first + chunk, stop)
            weights[first - start : last - start] = dequantize(tensor.data[first:last])
        return weights
    except NotImplementedError:
        raise CheckpointError(
            f"{path}: tensor {tensor.name} has GGUF type {tensor.tensor_type.name}, "
            "which the gguf package cannot dequantize"
        ) from None


class _Gguf:
    """The tensors of a GGUF file under HF names (gguf's own name map says which GGUF
    tensor holds each), in float32; a block is read by dequantizing the rows it spans."""

    reads_whole_rows = True

    def __init__(self, reader: gguf.GGUFReader, config: ModelConfig, path: pathlib.Path):
        self._config, self._path = config, path
        in_file = {t.name: t for t in reader.tensors}
        gguf_names = gguf.get_tensor_name_map(
            gguf.MODEL_ARCH[config.family.upper()], config.n_layers
        )
        top, layer = _hf_layout(config)
        names = [name for name, _ in top.values()]
        names += [
            f"model.layers.{i}.{n}" for n, _ in layer.values() for i in range(config.n_layers)
        ]
        self._tensors = {}
        for name in names:
            tensor = in_file.get(gguf_names.get_name(name, try_suffixes=(".weight", ".bias")))
            if tensor is not None:  # _check_tensors names what is missing
                self._tensors[name] = tensor
        self._last: tuple[tuple[str, int, int], np.ndarray] | None = None

    def shape(self, name: str) -> tuple[int, ...] | None:
        tensor = self._tensors.get(name)
        return None if tensor is None else _hf_shape(tensor)

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """The block, from the rows it spans dequantized whole (the rows of the last block
        read are kept: blocks that differ only in columns share them)."""
        rows, columns = index[0], index[1:]
        key = (name, rows.start, rows.stop)
        if self._last is None or self._last[0] != key:
            self._last = None  # the previous rows are freed before the next are made
            self._last = (key, self._in_hf_form(name, rows))
        return self._last[1][(slice(None), *columns)]

    def _in_hf_form(self, name: str, rows: slice) -> np.ndarray:
        """Rows of a tensor dequantized, with llama.cpp's layout fixes undone (the rows of
        Q or K a block spans are whole heads: `_read_block` reads a head's dims whole)."""
        config, weights = self._config, _dequantize(self._tensors[name], rows, self._path)
        if config.family == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            weights = _unpermute_rotary(weights, len(weights) // config.head_dim)
        if _is_gemma_norm(config, name):
            weights = weights - 1.0  # to the HF convention; _read_block adds it back
        return weights


@contextlib.contextmanager
def _opened_gguf(path: pathlib.Path) -> Iterator[Checkpoint]:
    path = _require(path, "GGUF file")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as err:  # the reader raises a zoo of types on bad bytes
        raise CheckpointError(
            f"{path}: not a readable GGUF file ({type(err).__name__}: {err})"
        ) from None
    config = config_from_hf(_hf_config_from_gguf(reader, path))
    tensors = _Gguf(reader, config, path)
    del reader  # its metadata, a whole vocabulary as Python objects, can go before loading
    yield Checkpoint(config, tensors)


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


def opened(spec: str | pathlib.Path) -> contextlib.AbstractContextManager[Checkpoint]:
    """A preset name, a `.gguf` file or a HF checkpoint directory, open: its config is
    read, its tensors are read when `Checkpoint.params` asks for them."""
    path = resolve(spec)
    return _opened_hf_dir(path) if path.is_dir() else _opened_gguf(path)


def load(
    spec: str | pathlib.Path,
    dtype: Any = jnp.float32,
    *,
    layers: Sequence[int] | None = None,
    shardings: ShardingsOf | None = None,
) -> tuple[ModelConfig, Params]:
    """(config, params) from a preset name, a `.gguf` file or a HF checkpoint directory;
    `layers` and `shardings` as in `Checkpoint.params`."""
    with opened(spec) as checkpoint:
        return checkpoint.params(dtype, layers, shardings)
