"""Orbax train-state checkpoints: round trip, wrong model, damaged and partial steps."""

import dataclasses
import shutil

import jax
import numpy as np
import pytest

from opd_jax import loop, model, train_state
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
