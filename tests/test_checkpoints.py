"""Loaders agree with transformers, export round-trips, and bad checkpoints are named."""

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from opd_jax import checkpoints, model

COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


def _tiny_hf_model(family: str) -> transformers.PreTrainedModel:
    """A randomly initialised HF model; norms and biases perturbed so they matter."""
    torch.manual_seed(0)
    if family == "llama":
        llama3 = {
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        }
        config = transformers.LlamaConfig(
            **COMMON, rope_parameters=llama3, tie_word_embeddings=False
        )
        hf_model = transformers.LlamaForCausalLM(config)
    elif family == "qwen2":
        config = transformers.Qwen2Config(**COMMON, tie_word_embeddings=True)
        hf_model = transformers.Qwen2ForCausalLM(config)
    elif family == "qwen3":
        config = transformers.Qwen3Config(**COMMON, head_dim=32, tie_word_embeddings=False)
        hf_model = transformers.Qwen3ForCausalLM(config)
    else:
        config = transformers.Gemma3TextConfig(
            **COMMON,
            head_dim=32,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            query_pre_attn_scalar=24,
        )
        hf_model = transformers.Gemma3ForCausalLM(config)
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(0.1 * torch.randn_like(p))
    return hf_model.eval()


def _padded_batch(vocab: int):
    tokens = np.random.RandomState(0).randint(0, vocab, (2, 12))
    valid = np.ones((2, 12), bool)
    valid[1, :5] = False  # left padding
    return tokens, valid


def _reference_logits(hf_model, tokens, valid) -> np.ndarray:
    positions = np.maximum(np.cumsum(valid, 1) - 1, 0)
    with torch.no_grad():
        return (
            hf_model(
                input_ids=torch.tensor(tokens),
                attention_mask=torch.tensor(valid.astype(np.int64)),
                position_ids=torch.tensor(positions),
            )
            .logits.float()
            .numpy()
        )


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3", "gemma3"])
def tiny_checkpoint(request, tmp_path_factory):
    hf_model = _tiny_hf_model(request.param)
    directory = tmp_path_factory.mktemp(request.param)
    hf_model.save_pretrained(directory)
    return request.param, hf_model, directory


def test_tiny_models_match_transformers_logits(tiny_checkpoint):
    family, hf_model, directory = tiny_checkpoint
    config, params = checkpoints.load(directory)
    assert config.family == family
    tokens, valid = _padded_batch(config.vocab_size)
    ours, _ = model.forward(params, jnp.asarray(tokens), config, valid_BxT=jnp.asarray(valid))
    error = np.abs(np.asarray(ours) - _reference_logits(hf_model, tokens, valid))[valid].max()
    assert error <= 1e-4, f"{family}: max abs logit difference {error}"


def test_export_round_trips_through_transformers(tiny_checkpoint, tmp_path):
    family, hf_model, directory = tiny_checkpoint
    config, params = checkpoints.load(directory)
    exported = checkpoints.save_hf_dir(config, params, tmp_path / "export")

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32)
    tokens, valid = _padded_batch(config.vocab_size)
    np.testing.assert_allclose(
        _reference_logits(reloaded.eval(), tokens, valid)[valid],
        _reference_logits(hf_model, tokens, valid)[valid],
        atol=1e-5,
    )
    config_again, params_again = checkpoints.load(exported)
    assert config_again == config
    jax.tree.map(np.testing.assert_array_equal, params_again, params)


def test_sharded_safetensors_index_loads(tmp_path):
    hf_model = _tiny_hf_model("qwen3")
    hf_model.save_pretrained(tmp_path, max_shard_size="50KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    config, params = checkpoints.load(tmp_path)
    tokens, valid = _padded_batch(config.vocab_size)
    ours, _ = model.forward(params, jnp.asarray(tokens), config, valid_BxT=jnp.asarray(valid))
    np.testing.assert_allclose(
        np.asarray(ours)[valid], _reference_logits(hf_model, tokens, valid)[valid], atol=1e-4
    )


def test_bfloat16_load_is_the_float32_load_cast():
    config, params = checkpoints.load(_saved_tiny("llama"), dtype="bfloat16")
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    cast = jax.tree.map(lambda x: x.astype(jnp.bfloat16), checkpoints.load(_saved_tiny("llama"))[1])
    jax.tree.map(np.testing.assert_array_equal, params, cast)


def test_layers_a_student_does_not_keep_are_never_read(tmp_path):
    """Kept layers load as `select_layers` cuts them, from a checkpoint that lacks the
    others (Gemma 3: the kept layers' sliding flags come along)."""
    from safetensors.numpy import load_file, save_file

    directory = _copy("gemma3", tmp_path)
    tensors = load_file(directory / "model.safetensors")
    kept = {k: v for k, v in tensors.items() if not k.startswith("model.layers.1.")}
    save_file(kept, directory / "model.safetensors", {"format": "pt"})
    config, params = checkpoints.load(directory, layers=(2, 0))
    whole_config, whole = checkpoints.load(_saved_tiny("gemma3"))
    expected_config, expected = model.select_layers(whole, whole_config, (2, 0))
    assert config == expected_config and config.sliding_layers == (True, True)
    jax.tree.map(np.testing.assert_array_equal, params, expected)
    with pytest.raises(checkpoints.CheckpointError, match="no tensor model.layers.1."):
        checkpoints.load(directory)


# --------------------------------------------------------------------------- real models

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village,",
]


def _greedy(params, config, prompt_ids: list[int], new_tokens: int) -> list[int]:
    """Greedy decoding by repeated full forwards over a fixed buffer (one compile)."""
    width = len(prompt_ids) + new_tokens
    tokens = np.zeros((1, width), np.int32)
    tokens[0, : len(prompt_ids)] = prompt_ids
    forward = jax.jit(lambda p, t, v: model.forward(p, t, config, valid_BxT=v)[0])
    for length in range(len(prompt_ids), width):
        valid = np.arange(width)[None] < length
        logits = forward(params, jnp.asarray(tokens), jnp.asarray(valid))
        tokens[0, length] = int(jnp.argmax(logits[0, length - 1]))
    return tokens[0, len(prompt_ids) :].tolist()


@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "gemma3-270m"])
def test_real_model_logits_and_greedy_text_match_transformers(name, real_models):
    config, params = real_models.ours(name)
    hf_model = real_models.reference(name)
    tokenizer = real_models.reference_tokenizer(name)
    encoded = [tokenizer(p).input_ids for p in PROMPTS]
    width = max(map(len, encoded))
    tokens = np.zeros((len(PROMPTS), width), np.int64)
    valid = np.zeros((len(PROMPTS), width), bool)
    for row, ids in enumerate(encoded):
        tokens[row, width - len(ids) :] = ids
        valid[row, width - len(ids) :] = True
    ours, _ = model.forward(params, jnp.asarray(tokens), config, valid_BxT=jnp.asarray(valid))
    error = np.abs(np.asarray(ours) - _reference_logits(hf_model, tokens, valid))[valid].max()
    assert error <= 1e-3, f"{name}: max abs logit difference {error}"

    ids = encoded[0]
    with torch.no_grad():
        reference = hf_model.generate(
            torch.tensor([ids]), max_new_tokens=20, do_sample=False, min_new_tokens=20
        )[0, len(ids) :].tolist()
    ours_ids = _greedy(params, config, ids, 20)
    assert tokenizer.decode(ours_ids) == tokenizer.decode(reference)


# --------------------------------------------------------------------------- bad input

_SAVED: dict[str, pathlib.Path] = {}


def _saved_tiny(family: str) -> pathlib.Path:
    """One saved tiny checkpoint per family per session, copied before any mutation."""
    if family not in _SAVED:
        import tempfile

        directory = pathlib.Path(tempfile.mkdtemp()) / family
        _tiny_hf_model(family).save_pretrained(directory)
        _SAVED[family] = directory
    return _SAVED[family]


def _copy(family: str, tmp_path: pathlib.Path) -> pathlib.Path:
    return pathlib.Path(shutil.copytree(_saved_tiny(family), tmp_path / family))


def _edit_config(directory: pathlib.Path, **changes) -> None:
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_missing_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"checkpoint not found: {tmp_path / 'nope'}"):
        checkpoints.load(tmp_path / "nope")


def test_a_model_source_is_a_packaged_name_a_checkpoint_directory_or_a_gguf_file(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    (tmp_path / "model.gguf").write_bytes(b"")
    (tmp_path / "model.safetensors").write_bytes(b"")
    sources = ["smollm2-135m-instruct", tmp_path / "hf", str(tmp_path / "model.gguf")]
    assert all(checkpoints.is_source(s) for s in sources)
    others = ["smollm2", tmp_path / "nope", tmp_path, tmp_path / "model.safetensors"]
    assert not any(checkpoints.is_source(s) for s in others)


def test_missing_config_is_named(tmp_path):
    directory = _copy("llama", tmp_path)
    (directory / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        checkpoints.load(directory)


def test_missing_weights_are_named(tmp_path):
    directory = _copy("llama", tmp_path)
    (directory / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors not found"):
        checkpoints.load(directory)


def test_unsupported_architecture_is_named(tmp_path):
    directory = _copy("llama", tmp_path)
    _edit_config(directory, model_type="mamba")
    with pytest.raises(
        checkpoints.CheckpointError, match="unsupported architecture model_type='mamba'"
    ):
        checkpoints.load(directory)


def test_truncated_safetensors_is_named(tmp_path):
    directory = _copy("llama", tmp_path)
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(checkpoints.CheckpointError, match="not a readable safetensors file"):
        checkpoints.load(directory)


def test_config_and_tensor_shapes_that_disagree_are_named(tmp_path):
    directory = _copy("llama", tmp_path)
    _edit_config(directory, intermediate_size=100)
    with pytest.raises(
        checkpoints.CheckpointError, match=r"mlp.gate_proj.weight has shape \(96, 64\)"
    ):
        checkpoints.load(directory)


def test_integer_tensor_dtype_is_named(tmp_path):
    from safetensors.numpy import load_file, save_file

    directory = _copy("llama", tmp_path)
    tensors = load_file(directory / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"].astype(np.int8)
    save_file(tensors, directory / "model.safetensors")
    with pytest.raises(checkpoints.CheckpointError, match="model.norm.weight has dtype I8"):
        checkpoints.load(directory)


def test_unsupported_param_dtype_is_named():
    with pytest.raises(checkpoints.CheckpointError, match="param dtype 'int32' is not supported"):
        checkpoints.load(_saved_tiny("llama"), dtype=jnp.int32)


def test_truncated_gguf_is_named(tmp_path, real_models):
    truncated = tmp_path / "model.gguf"
    with real_models.path("smollm2-135m-instruct").open("rb") as f:
        truncated.write_bytes(f.read(1 << 20))
    with pytest.raises(checkpoints.CheckpointError, match=f"{truncated}: not a readable GGUF file"):
        checkpoints.load(truncated)


def test_random_bytes_are_not_a_gguf(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(np.random.RandomState(0).bytes(4096))
    with pytest.raises(checkpoints.CheckpointError, match="not a readable GGUF file"):
        checkpoints.load(junk)


def test_unsupported_gguf_architecture_is_named(tmp_path):
    import gguf

    path = tmp_path / "mamba.gguf"
    writer = gguf.GGUFWriter(str(path), "mamba")
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(
        checkpoints.CheckpointError, match="unsupported architecture general.architecture='mamba'"
    ):
        checkpoints.load(path)


def test_unknown_preset_is_named():
    with pytest.raises(FileNotFoundError, match="checkpoint not found: no-such-model"):
        checkpoints.load("no-such-model")
