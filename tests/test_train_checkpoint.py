"""Orbax train-state checkpoints: round trip, wrong model, damaged and partial steps."""

import dataclasses
import shutil

import jax
import numpy as np
import pytest

from opd_jax import distill, model, train_checkpoint
from opd_jax.model import ModelConfig

CONFIG = ModelConfig(
    vocab_size=64, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=8, mlp_dim=32
)


def _state(seed: int) -> distill.TrainState:
    params = model.init_params(CONFIG, jax.random.key(seed))
    optimizer = distill.make_optimizer(distill.DistillConfig(), total_steps=100)
    return distill.init_train_state(params, optimizer, seed)


def _assert_same(a, b):
    jax.tree.map(np.testing.assert_array_equal, jax.tree.leaves(a), jax.tree.leaves(b))


def test_round_trip_restores_the_newest_step(tmp_path):
    mngr = train_checkpoint.manager(tmp_path)
    first, second = _state(0), _state(1)
    train_checkpoint.save(mngr, 1, first, CONFIG)
    train_checkpoint.save(mngr, 2, second, CONFIG)
    restored = train_checkpoint.restore_latest(
        train_checkpoint.manager(tmp_path), train_checkpoint.abstract(first), CONFIG
    )
    _assert_same(restored, second)


def test_fresh_workdir_restores_nothing(tmp_path):
    mngr = train_checkpoint.manager(tmp_path)
    assert (
        train_checkpoint.restore_latest(mngr, train_checkpoint.abstract(_state(0)), CONFIG) is None
    )


def test_checkpoint_of_another_model_is_refused_and_kept(tmp_path):
    train_checkpoint.save(train_checkpoint.manager(tmp_path), 1, _state(0), CONFIG)
    other = dataclasses.replace(CONFIG, n_layers=3)
    with pytest.raises(train_checkpoint.CheckpointMismatchError, match="fields differ: n_layers"):
        train_checkpoint.restore_latest(
            train_checkpoint.manager(tmp_path), train_checkpoint.abstract(_state(0)), other
        )
    assert train_checkpoint.manager(tmp_path).all_steps() == [1]


def test_damaged_newest_step_falls_back_to_the_previous(tmp_path):
    mngr = train_checkpoint.manager(tmp_path)
    good = _state(0)
    train_checkpoint.save(mngr, 1, good, CONFIG)
    train_checkpoint.save(mngr, 2, _state(1), CONFIG)
    state_dir = tmp_path / "2" / "state"
    for path in state_dir.rglob("*"):
        if path.is_file() and path.stat().st_size > 0 and "metadata" not in path.name:
            path.write_bytes(b"\0" * 7)
    restored = train_checkpoint.restore_latest(
        train_checkpoint.manager(tmp_path), train_checkpoint.abstract(good), CONFIG
    )
    _assert_same(restored, good)


def test_partial_save_is_ignored(tmp_path):
    mngr = train_checkpoint.manager(tmp_path)
    good = _state(0)
    train_checkpoint.save(mngr, 1, good, CONFIG)
    train_checkpoint.save(mngr, 2, _state(1), CONFIG)
    # What an interrupted save leaves: a step directory still under its temporary name.
    shutil.move(tmp_path / "2", tmp_path / "2.orbax-checkpoint-tmp-123")
    restored = train_checkpoint.restore_latest(
        train_checkpoint.manager(tmp_path), train_checkpoint.abstract(good), CONFIG
    )
    _assert_same(restored, good)
