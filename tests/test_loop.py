"""Orbax train-state checkpoints: round trip, wrong model, damaged and partial steps; a
stage's wall time over resumed segments."""

import dataclasses
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opd_jax import loop, model, reporting, train_state
from opd_jax.model import ModelConfig

CONFIG = ModelConfig(
    vocab_size=64, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=8, mlp_dim=32
)


def _state(seed: int) -> train_state.TrainState:
    params = model.init_params(CONFIG, jax.random.key(seed))
    optimizer = train_state.make_optimizer(train_state.OptimizerConfig(), total_steps=100)
    return train_state.init_train_state(params, optimizer, seed)


def _assert_same(a, b):
    jax.tree.map(np.testing.assert_array_equal, jax.tree.leaves(a), jax.tree.leaves(b))


def test_bfloat16_params_train_through_a_float32_copy():
    params = jax.tree.map(lambda x: x.astype("bfloat16"), _state(0).params)
    optimizer = train_state.make_optimizer(train_state.OptimizerConfig(), total_steps=100)
    state = train_state.init_train_state(params, optimizer, 0)
    leaves = jax.tree.leaves((state.params, state.opt_state))
    floats = {x.dtype for x in leaves if jnp.issubdtype(x.dtype, jnp.floating)}
    assert floats == {np.dtype("float32")}, "params and Adam's moments are float32"
    _assert_same(state.params, jax.tree.map(lambda x: x.astype("float32"), params))


def test_round_trip_restores_the_newest_step(tmp_path):
    mngr = loop.manager(tmp_path)
    first, second = _state(0), _state(1)
    loop.save(mngr, 1, first, CONFIG)
    loop.save(mngr, 2, second, CONFIG)
    restored = loop.restore_latest(loop.manager(tmp_path), loop.abstract(first), CONFIG)
    _assert_same(restored, second)


def test_fresh_workdir_restores_nothing(tmp_path):
    mngr = loop.manager(tmp_path)
    assert loop.restore_latest(mngr, loop.abstract(_state(0)), CONFIG) is None


def test_checkpoint_of_another_model_is_refused_and_kept(tmp_path):
    loop.save(loop.manager(tmp_path), 1, _state(0), CONFIG)
    other = dataclasses.replace(CONFIG, n_layers=3)
    with pytest.raises(loop.CheckpointMismatchError, match="fields differ: n_layers"):
        loop.restore_latest(loop.manager(tmp_path), loop.abstract(_state(0)), other)
    assert loop.manager(tmp_path).all_steps() == [1]


def test_damaged_newest_step_falls_back_to_the_previous(tmp_path):
    mngr = loop.manager(tmp_path)
    good = _state(0)
    loop.save(mngr, 1, good, CONFIG)
    loop.save(mngr, 2, _state(1), CONFIG)
    state_dir = tmp_path / "2" / "state"
    for path in state_dir.rglob("*"):
        if path.is_file() and path.stat().st_size > 0 and "metadata" not in path.name:
            path.write_bytes(b"\0" * 7)
    restored = loop.restore_latest(loop.manager(tmp_path), loop.abstract(good), CONFIG)
    _assert_same(restored, good)


def test_partial_save_is_ignored(tmp_path):
    mngr = loop.manager(tmp_path)
    good = _state(0)
    loop.save(mngr, 1, good, CONFIG)
    loop.save(mngr, 2, _state(1), CONFIG)
    # What an interrupted save leaves: a step directory still under its temporary name.
    shutil.move(tmp_path / "2", tmp_path / "2.orbax-checkpoint-tmp-123")
    restored = loop.restore_latest(loop.manager(tmp_path), loop.abstract(good), CONFIG)
    _assert_same(restored, good)


# ----------------------------------------------------------------------------- wall time


class FakeClock:
    """Stands in for `time` in the loop: a step costs 1 s, an evaluation 100 s."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


def test_wall_time_adds_up_over_a_resumed_stage_without_evaluation(tmp_path, monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(loop, "time", clock)
    stage = loop.Stage(
        "toy", tmp_path / "toy", num_steps=4, checkpoint_every=2, model_config=CONFIG
    )

    def step_fn(state, step, crash_at=None):
        if step == crash_at:
            raise RuntimeError("killed")
        clock.now += 1.0
        return state.replace(step=state.step + 1), {"loss": 1.0, "finite": True}

    def evaluate(step, state):
        clock.now += 100.0

    with reporting.MetricsWriter(tmp_path / "logs", enabled=True) as writer:
        with pytest.raises(RuntimeError, match="killed"):  # after step 3, checkpoint at 2
            loop.run(stage, _state(0), lambda s, i: step_fn(s, i, crash_at=3), writer, evaluate)
        assert loop.recorded_seconds(stage.directory) == 3.0
        loop.run(stage, _state(0), step_fn, writer, evaluate)  # redoes step 3, then step 4
        loop.run(stage, _state(0), step_fn, writer, evaluate)  # finished: adds nothing
    assert loop.recorded_seconds(stage.directory) == 5.0
    records = reporting.read_metrics(tmp_path / "logs" / reporting.METRICS_FILE)
    assert [r["toy/wall_seconds"] for r in records] == [1.0, 2.0, 4.0, 5.0]
    assert [r["toy/step_seconds"] for r in records] == [1.0] * 4
    assert loop.manager(stage.directory).all_steps() == [2, 4]
