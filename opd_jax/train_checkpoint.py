"""Orbax checkpoints of the student's train state, for resumable runs.

Only the student is saved: the teacher never changes and is reloaded from its source.
Each checkpoint carries a fingerprint of the student's architecture, so a workdir
holding another model's checkpoint fails with a clear error instead of a shape crash
deep inside Orbax. Orbax writes each step to a temporary directory and renames it
when complete, so an interrupted save leaves the previous step intact; a step that
cannot be read is reported and the one before it is used.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp

# A ModelConfig, or any dataclass holding one with what else shapes the saved params
# (a LoRA student's rank and targets): its fields are the fingerprint.
Architecture = Any

_STATE = "state"
_FINGERPRINT = "model"


class CheckpointMismatchError(ValueError):
    """The workdir holds checkpoints of a different model; nothing is overwritten."""


def fingerprint(config: Architecture) -> dict[str, Any]:
    """A JSON-able description of the architecture (what must match to resume)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def manager(directory: str | pathlib.Path, max_to_keep: int = 2) -> ocp.CheckpointManager:
    """Keeps the newest two steps: a 135M model's state with AdamW moments is 1.6 GB, and
    Orbax commits a step atomically, so one complete step before the newest is enough."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False
    )
    return ocp.CheckpointManager(
        pathlib.Path(directory).absolute(),
        options=options,
        item_names=(_STATE, _FINGERPRINT),
    )


def save(mngr: ocp.CheckpointManager, step: int, state: Any, config: Architecture) -> None:
    mngr.save(
        step,
        args=ocp.args.Composite(
            **{
                _STATE: ocp.args.StandardSave(state),
                _FINGERPRINT: ocp.args.JsonSave(fingerprint(config)),
            }
        ),
        force=True,
    )
    mngr.wait_until_finished()


def _check_fingerprint(mngr: ocp.CheckpointManager, step: int, config: Architecture) -> None:
    saved = mngr.restore(step, args=ocp.args.Composite(**{_FINGERPRINT: ocp.args.JsonRestore()}))
    saved = saved[_FINGERPRINT]
    expected = fingerprint(config)
    if saved != expected:
        differing = sorted(k for k in expected if saved.get(k) != expected[k])
        raise CheckpointMismatchError(
            f"{mngr.directory} holds checkpoints of a different model (fields differ: "
            f"{', '.join(differing)}); use another --workdir or remove it"
        )


def check_directory(directory: str | pathlib.Path, config: Architecture) -> None:
    """Raises CheckpointMismatchError if `directory` holds another model's checkpoints;
    an experiment calls it for every stage before it writes anything to the workdir."""
    if pathlib.Path(directory).exists():
        mngr = manager(directory)
        for step in mngr.all_steps():
            _check_fingerprint(mngr, step, config)


def restore_latest(
    mngr: ocp.CheckpointManager, abstract_state: Any, config: Architecture
) -> Any | None:
    """The newest readable state, or None for a fresh workdir.

    `abstract_state` (e.g. from `jax.eval_shape`, carrying shardings) tells Orbax the
    structure, dtypes and placement to restore into.
    """
    steps = sorted(mngr.all_steps(), reverse=True)
    for step in steps:
        _check_fingerprint(mngr, step, config)
        try:
            restored = mngr.restore(
                step, args=ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(abstract_state)})
            )
        except Exception as err:  # a damaged step: fall back to the one before it
            logging.warning(
                "checkpoint step %d in %s is unreadable (%s)", step, mngr.directory, err
            )
            continue
        return restored[_STATE]
    if steps:
        raise CheckpointMismatchError(
            f"no checkpoint in {mngr.directory} could be read (steps {steps}); see warnings above"
        )
    return None


def abstract(state: Any) -> Any:
    """Shape/dtype/sharding skeleton of a state, for `restore_latest`."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
