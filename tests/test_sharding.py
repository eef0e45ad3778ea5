"""Meshes and multi-host start-up: a sharded GKD step equals the one-device step, params
are placed as the rules say (loaded straight into place too), and bad meshes or
coordinators fail with a clear message.

The mesh runs need 8 devices, which a JAX process fixes when it starts, so they run
`tests/mesh_worker.py` in a subprocess with 8 forced CPU devices.
"""

import json
import os
import pathlib
import subprocess
import sys
import time

import jax
import pytest

from opd_jax import config, mesh, model

WORKER = pathlib.Path(__file__).with_name("mesh_worker.py")
LOAD_WORKER = WORKER.with_name("load_worker.py")
ROOT = WORKER.parents[1]
# fp32 on CPU: a sharded reduction sums in another order than one device does.
LOSS_RTOL, PARAMS_ATOL = 1e-5, 1e-4


def _forced_devices_env(count: int) -> dict[str, str]:
    flags = f"--xla_force_host_platform_device_count={count}"
    return {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}


def _equivalence(tmp_path, meshes, kind="gkd"):
    out = tmp_path / "equivalence.json"
    subprocess.run(
        [sys.executable, str(WORKER), "equivalence", str(out), "--meshes", *meshes, "--kind", kind],
        env=_forced_devices_env(8),
        check=True,
        cwd=ROOT,
    )
    return json.loads(out.read_text())


def _check_mesh(result, shape, q_shape):
    data, fsdp, tensor = shape
    assert result["tokens_equal"], "sampled tokens differ from one device's"
    assert result["loss_rel_diff"] <= LOSS_RTOL
    assert result["params_max_diff"] <= PARAMS_ATOL
    # q is [layers, embed, heads, head_dim]: embed over fsdp, heads over tensor (rules).
    assert result["q_spec"] == [None, "fsdp", "tensor", None]
    layers, embed, heads, head_dim = q_shape
    assert result["q_shard_shape"] == [layers, embed // fsdp, heads // tensor, head_dim]
    assert result["q_mu_spec_equal"], "Adam's moments are laid out like their params"
    vocab, d_model = model.ModelConfig(64, 32, 1, 4, 2, 8, 48).vocab_size, 32
    assert result["embed_shard_shape"] == [vocab // tensor, d_model // fsdp]
    assert result["step_replicated"]


def test_2x2x2_mesh_matches_one_device(tmp_path):
    result = _equivalence(tmp_path, ["2,2,2"])
    _check_mesh(result["(2, 2, 2)"], (2, 2, 2), result["q_shape"])


def test_opsd_on_a_2x2x2_mesh_matches_one_device(tmp_path):
    """Self-distillation through LoRA with a moving-average teacher and a wider privileged
    context: the same tokens, and adapters and their average equal to one device's."""
    result = _equivalence(tmp_path, ["2,2,2"], kind="opsd")["(2, 2, 2)"]
    assert result["tokens_equal"], "sampled tokens differ from one device's"
    assert result["loss_rel_diff"] <= LOSS_RTOL
    assert result["params_max_diff"] <= PARAMS_ATOL
    assert result["ema_params_max_diff"] <= PARAMS_ATOL
    assert result["step_replicated"]


@pytest.mark.slow
def test_every_mesh_matches_one_device(tmp_path):
    meshes = [(8, 1, 1), (2, 4, 1), (2, 2, 2)]
    result = _equivalence(tmp_path, [",".join(map(str, m)) for m in meshes])
    for shape in meshes:
        _check_mesh(result[str(shape)], shape, result["q_shape"])


def test_checkpoints_load_straight_into_their_shardings(tmp_path, real_models):
    """Sharded loading on 8 devices, FSDP alone and 2x2x2: values equal the whole load
    (bfloat16 equal to its cast), every param has the layout's sharding, and each device
    holds its shard. Qwen2 (biases) and Gemma 3 (norms stored as w in 1 + w) from
    safetensors, the last kept layers of each; SmolLM2 from its quantized GGUF."""
    from test_checkpoints import _saved_tiny

    gguf = real_models.path("smollm2-135m-instruct")
    sources = [f"{_saved_tiny('qwen2')}", f"{_saved_tiny('gemma3')}:2,0", f"{gguf}:0,29"]
    out = tmp_path / "loading.json"
    subprocess.run(
        [sys.executable, str(LOAD_WORKER), str(out), "--meshes", "1,8,1", "2,2,2"]
        + ["--checkpoints", *sources],
        env=_forced_devices_env(8),
        check=True,
        cwd=ROOT,
    )
    results = json.loads(out.read_text())
    assert sorted(results) == sorted(sources)
    for source, by_mesh in results.items():
        for shape, by_dtype in by_mesh.items():
            _, fsdp, tensor = map(int, shape.split(","))
            for dtype, result in by_dtype.items():
                assert result["config_equal"] and result["values_equal"], (source, shape, dtype)
                assert result["shardings_equal"], (source, shape, dtype)
                assert result["dtypes"] == [dtype]
                # q is [layers, embed, heads, head_dim]; heads split where tensor divides them
                layers, embed, heads, head_dim = result["q_shape"]
                split_heads = heads // tensor if heads % tensor == 0 else heads
                assert result["q_shard_shape"] == [layers, embed // fsdp, split_heads, head_dim]
    assert results[f"{gguf}:0,29"]["1,8,1"]["float32"]["q_shape"][0] == 2


@pytest.mark.parametrize(
    "shape, devices, message",
    [
        ((3, 1, 1), 8, "uses 3 devices but 8 are available"),
        ((-1, 3, 1), 8, "does not divide 8 devices"),
        ((2, 2), 4, "must have 3 entries"),
        ((0, -1, 1), 4, "sizes must be positive"),
    ],
)
def test_mesh_shape_that_does_not_fit_the_devices_is_refused(shape, devices, message):
    with pytest.raises(mesh.MeshError, match=message):
        mesh.resolve_mesh_shape(shape, devices)


def test_gin_mesh_larger_than_the_machine_is_refused():
    config.apply_gin([], ["make_mesh.shape = (2, 2, 2)"])
    with pytest.raises(mesh.MeshError, match=f"but {jax.device_count()} are available"):
        mesh.make_mesh()


def test_tensor_axis_must_divide_the_heads():
    tensor_3 = jax.sharding.AbstractMesh((1, 1, 3), mesh.MESH_AXES)
    heads_4 = model.ModelConfig(64, 32, 1, 4, 2, 8, 48)
    with pytest.raises(mesh.MeshError, match="does not divide n_heads=4"):
        mesh.check_model_fits_mesh(heads_4, tensor_3)
    mesh.check_model_fits_mesh(heads_4, jax.sharding.AbstractMesh((1, 3, 2), mesh.MESH_AXES))


def test_unreachable_coordinator_fails_in_time_with_one_line():
    # Port 1: nothing listens there, and no outgoing connection can be given it as its
    # own source port. The probe fails before JAX's runtime is touched, so this runs
    # in-process.
    flags = [
        "--coordinator_address=127.0.0.1:1",
        "--num_processes=2",
        "--process_id=1",
        "--distributed_timeout_s=2",
    ]
    began = time.monotonic()
    with pytest.raises(SystemExit) as info:
        config.parse("test", flags)
    message = str(info.value)
    assert message.startswith("error: could not join the JAX distributed runtime at 127.0.0.1:1")
    assert "within 2s (process 1 of 2)" in message and "\n" not in message
    assert 2 <= time.monotonic() - began < 30
