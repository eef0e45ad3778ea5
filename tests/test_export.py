"""A run's student leaves its workdir as a Hugging Face directory that transformers loads
to our logits, our token ids and our chat template.

The workdirs are real: stage checkpoints written by `loop.save` from real
train states (optimizer moments included) of the packaged SmolLM2, cut to two layers
so that saving and loading stay quick, plus the manifest a run writes.
"""

import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from opd_jax import checkpoints, export, loop, lora, model, opsd, train_state, update
from opd_jax import tokenizer as tokenizer_lib
from opd_jax.model import ModelConfig, Params

SMOLLM = "smollm2-135m-instruct"
KEEP = (0, 29)  # SmolLM2's first and last layers
STRINGS = ["Hello world", "  two  spaces\n", "café résumé naïve", "中文 😀 👍🏽", "<|im_end|> x"]
CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Translate: café 中文 😀"},
]
# Relative to the largest logit (about 95 here). Both forwards run in float32 and each is
# about 1e-6 of that scale from a float64 forward of the same weights (summation order,
# XLA vs torch kernels); they differed by at most 1.3e-6 of it (1.3e-4 absolute).
LOGIT_TOLERANCE = 1.5e-5


def _perturbed(params: Params, seed: int, scale: float) -> Params:
    """Params as after training: every weight but the embedding (exported alike either
    way, and 28M draws) moved by a relative `scale`."""
    rng = np.random.default_rng(seed)
    move = lambda w: w * (1 + scale * rng.standard_normal(w.shape, np.float32))
    return {k: v if k == "embed" else jax.tree.map(move, v) for k, v in params.items()}


def _save_stage(workdir: pathlib.Path, stage: str, step: int, state, architecture) -> None:
    loop.save(loop.manager(workdir / stage), step, state, architecture)


def _train_state(params: Params) -> train_state.TrainState:
    """A state as the run saves it: AdamW moments beside the params."""
    optimizer = train_state.make_optimizer(train_state.OptimizerConfig(), total_steps=10)
    return train_state.init_train_state(params, optimizer, seed=0)


@pytest.fixture(scope="module")
def smollm_source(real_models, tmp_path_factory) -> pathlib.Path:
    """SmolLM2 as an HF directory, the run's source: it loads in seconds where the GGUF
    takes twenty (dequantization)."""
    config, params = real_models.ours(SMOLLM)
    return checkpoints.save_hf_dir(config, params, tmp_path_factory.mktemp("smollm2"))


@pytest.fixture(scope="module")
def pruned(real_models) -> tuple[ModelConfig, Params]:
    config, params = real_models.ours(SMOLLM)
    return model.select_layers(params, config, KEEP)


@pytest.fixture(scope="module")
def smollm_tokenizer(real_models) -> tokenizer_lib.Tokenizer:
    return tokenizer_lib.from_gguf(real_models.path(SMOLLM))


_forward = jax.jit(model.forward, static_argnums=2)


def _logits(params: Params, config: ModelConfig, tokens_1xT: np.ndarray) -> np.ndarray:
    return np.asarray(_forward(params, jnp.asarray(tokens_1xT), config)[0])


def _reference_logits(directory: pathlib.Path, tokens_1xT: np.ndarray) -> np.ndarray:
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    with torch.no_grad():
        return hf_model.eval()(input_ids=torch.tensor(tokens_1xT)).logits.numpy()


def _chat_tokens(tok: tokenizer_lib.Tokenizer) -> np.ndarray:
    return np.asarray([tok.encode_chat(CONVERSATION)])


def _assert_transformers_matches(
    directory: pathlib.Path, params: Params, config: ModelConfig, tok: tokenizer_lib.Tokenizer
) -> None:
    """Logits, ids, chat template and generation ids of the export equal ours."""
    ref_tok = transformers.AutoTokenizer.from_pretrained(directory)
    for text in STRINGS:
        assert ref_tok(text).input_ids == tok.encode(text, add_bos=tok.add_bos_token), text
    rendered = ref_tok.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert rendered == tok.apply_chat_template(CONVERSATION)
    assert ref_tok.eos_token_id == tok.eos_id and ref_tok.pad_token_id == tok.pad_id

    generation = transformers.GenerationConfig.from_pretrained(directory)
    ids = (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id)
    assert ids == (tok.bos_id, tok.eos_id, tok.pad_id)

    tokens_1xT = _chat_tokens(tok)
    reference = _reference_logits(directory, tokens_1xT)
    error = np.abs(_logits(params, config, tokens_1xT) - reference).max() / np.abs(reference).max()
    assert error <= LOGIT_TOLERANCE, f"max abs logit difference {error} of the largest logit"


def _logit_distance(a: Params, b: Params, config: ModelConfig, tok: tokenizer_lib.Tokenizer):
    """How far apart two params' logits are, relative to the largest: the export must
    tell them apart."""
    tokens_1xT = _chat_tokens(tok)
    logits_a, logits_b = _logits(a, config, tokens_1xT), _logits(b, config, tokens_1xT)
    return np.abs(logits_a - logits_b).max() / np.abs(logits_a).max()


def test_full_weights_student_exports_to_transformers(
    smollm_source, pruned, smollm_tokenizer, tmp_path
):
    """The newest step of the stage is exported; a stage with no checkpoint is skipped."""
    config, base = pruned
    earlier, trained = _perturbed(base, 1, 0.05), _perturbed(base, 2, 0.05)
    workdir = tmp_path / "run"
    _save_stage(workdir, "student_sft", 3, _train_state(earlier), config)
    _save_stage(workdir, "student_sft", 7, _train_state(trained), config)
    stages = [("student_sft", "full"), ("distill", "full")]
    export.write_manifest(workdir, smollm_source, stages, tokenizer=SMOLLM, layers=KEEP)

    out = export.export(workdir, tmp_path / "hf")

    _assert_transformers_matches(out, trained, config, smollm_tokenizer)
    assert _logit_distance(trained, earlier, config, smollm_tokenizer) > 100 * LOGIT_TOLERANCE


def test_lora_student_exports_merged(smollm_source, pruned, smollm_tokenizer, tmp_path):
    """Adapters of a "lora" stage merge onto what the "full" stage before it made."""
    config, base = pruned
    fine_tuned = _perturbed(base, 3, 0.05)
    lora_config = lora.LoraConfig(rank=4, alpha=8.0, targets=("q", "v", "down"))
    roles = update.Roles(config, config, opsd.SelfTeacher("ema"), lora_config)
    optimizer = train_state.make_optimizer(train_state.OptimizerConfig(), total_steps=10)
    state = update.init_state(roles, fine_tuned, optimizer, seed=0)
    keys = iter(jax.random.split(jax.random.key(4), 2 * len(lora_config.targets)))
    adapters = jax.tree.map(
        lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape), state.params
    )
    workdir = tmp_path / "run"
    _save_stage(workdir, "student_sft", 5, _train_state(fine_tuned), config)
    shape = update.student_shape(roles)
    _save_stage(workdir, "distill", 2, state.replace(params=adapters), shape)
    stages = [("student_sft", "full"), ("distill", "lora")]
    export.write_manifest(
        workdir, smollm_source, stages, tokenizer=SMOLLM, layers=KEEP, lora_config=lora_config
    )

    out = export.export(workdir, tmp_path / "hf")

    merged = lora.merge(fine_tuned, adapters, lora_config)
    _assert_transformers_matches(out, merged, config, smollm_tokenizer)
    assert _logit_distance(merged, fine_tuned, config, smollm_tokenizer) > 100 * LOGIT_TOLERANCE


# ----------------------------------------------------------------------------- bad workdirs

TINY = ModelConfig(
    vocab_size=61, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=48
)


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory) -> pathlib.Path:
    """A real (random) checkpoint directory, a source that loads in milliseconds; it has
    no tokenizer files, so manifests that export it name SmolLM2's."""
    params = model.init_params(TINY, jax.random.key(0))
    return checkpoints.save_hf_dir(TINY, params, tmp_path_factory.mktemp("tiny"))


def test_manifest_round_trips_with_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lora_config = lora.LoraConfig(rank=2, alpha=4.0, targets=("q", "o"))
    stages = [("student_sft", "full"), ("distill", "lora")]
    export.write_manifest(
        "run", "source", stages, tokenizer=SMOLLM, layers=[0, 2], lora_config=lora_config
    )
    assert export.read_manifest(tmp_path / "run") == export.StudentManifest(
        source=str(tmp_path / "source"),
        tokenizer=SMOLLM,
        layers=(0, 2),
        lora=lora_config,
        stages=(export.StageParams("student_sft", "full"), export.StageParams("distill", "lora")),
    )


def test_lora_stage_without_lora_config_is_refused(tmp_path):
    with pytest.raises(export.ExportError, match="no LoRA config"):
        export.write_manifest(tmp_path, SMOLLM, [("distill", "lora")])


def test_cli_without_manifest_fails_with_one_line(tmp_path):
    (tmp_path / "run").mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "opd_jax.export", str(tmp_path / "run"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        cwd=pathlib.Path(__file__).parent.parent,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"export failed: {tmp_path / 'run'} has no student.json: it is not the workdir of a run"
    ]
    assert not (tmp_path / "out").exists()


def _damage(step_dir: pathlib.Path) -> None:
    """Every data file of the saved state overwritten with bytes Orbax cannot parse."""
    for path in (step_dir / "state").rglob("*"):
        if path.is_file():
            path.write_bytes(b"not a checkpoint")


def test_unreadable_stage_fails_with_one_line(tiny_source, tmp_path):
    workdir = tmp_path / "run"
    _save_stage(workdir, "distill", 4, _train_state(checkpoints.load(tiny_source)[1]), TINY)
    _damage(workdir / "distill" / "4")
    export.write_manifest(workdir, tiny_source, [("distill", "full")], tokenizer=SMOLLM)
    with pytest.raises(SystemExit) as failure:
        export.main([str(workdir), str(tmp_path / "out")])
    message = str(failure.value)
    assert f"{workdir / 'distill'}: no checkpoint could be read (step 4: " in message
    assert "\n" not in message
    assert not (tmp_path / "out").exists()


def test_checkpoint_of_another_shape_is_named(tiny_source, tmp_path):
    """A student of one layer restored from a three-layer checkpoint: Orbax alone would
    fail on the first array, or leave a missing one as a shape without values."""
    workdir = tmp_path / "run"
    _save_stage(workdir, "distill", 1, _train_state(checkpoints.load(tiny_source)[1]), TINY)
    export.write_manifest(workdir, tiny_source, [("distill", "full")], layers=[1])
    with pytest.raises(export.ExportError, match=r"step 1 holds params unlike the student"):
        export.student_model(workdir)
