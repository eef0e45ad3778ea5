"""The resumable run loop every stage shares, and the Orbax checkpoints it resumes from.

A stage (teacher fine-tune, student fine-tune, distillation) is a pure step function
applied to the batch at each step. The loop restores the newest Orbax checkpoint in the
stage's directory and continues from its step; batches and RNG are pure functions of
the step, so an interrupted run ends in the state of an uninterrupted one. Checkpoints
are written every `checkpoint_every` steps, at the end, and on SIGTERM (TPU
preemption), after which the process exits with `Preempted`. A non-finite loss stops
the run before anything is written. Each stage also keeps its wall time, summed over
the segments of a resumed run, in `wall_time.json` beside its checkpoints, and logs it
every step as "<stage>/wall_seconds".

Only the student's train state is saved: the teacher never changes and is reloaded from
its source. Each checkpoint carries a fingerprint of what shapes the saved params (the
architecture, a LoRA shape, the teacher kind), so a workdir holding another model's
checkpoints fails with a clear error instead of a shape crash deep inside Orbax. Orbax
writes each step to a temporary directory and renames it when complete, so an
interrupted save leaves the previous step intact; a step that cannot be read is reported
and the one before it is used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from opd_jax import paths, reporting
from opd_jax.train_state import TrainState, raise_if_not_finite

# A ModelConfig, or any dataclass holding one with what else shapes the saved params
# (a LoRA student's rank and targets): its fields are the fingerprint.
Architecture = Any

STATE_ITEM = "state"
_FINGERPRINT = "model"
WALL_TIME_FILE = "wall_time.json"


class CheckpointMismatchError(ValueError):
    """The workdir holds checkpoints of a different model; nothing is overwritten."""


def fingerprint(config: Architecture) -> dict[str, Any]:
    """A JSON-able description of the architecture (what must match to resume)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def manager(directory: epath.PathLike, max_to_keep: int = 2) -> ocp.CheckpointManager:
    """Keeps the newest two steps: a 135M model's state with AdamW moments is 1.6 GB, and
    Orbax commits a step atomically, so one complete step before the newest is enough."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False
    )
    return ocp.CheckpointManager(
        paths.absolute(directory), options=options, item_names=(STATE_ITEM, _FINGERPRINT)
    )


def save(mngr: ocp.CheckpointManager, step: int, state: Any, config: Architecture) -> None:
    items = {
        STATE_ITEM: ocp.args.StandardSave(state),
        _FINGERPRINT: ocp.args.JsonSave(fingerprint(config)),
    }
    mngr.save(step, args=ocp.args.Composite(**items), force=True)
    mngr.wait_until_finished()


def _check_fingerprint(mngr: ocp.CheckpointManager, step: int, config: Architecture) -> None:
    """A field missing on either side reads as None, so a field added later with a None
    default (nothing new in the state) leaves older checkpoints resumable."""
    saved = mngr.restore(step, args=ocp.args.Composite(**{_FINGERPRINT: ocp.args.JsonRestore()}))
    saved = saved[_FINGERPRINT]
    expected = fingerprint(config)
    differing = sorted(k for k in saved.keys() | expected.keys() if saved.get(k) != expected.get(k))
    if differing:
        raise CheckpointMismatchError(
            f"{mngr.directory} holds checkpoints of a different model (fields differ: "
            f"{', '.join(differing)}); use another --workdir, or --restart to start over"
        )


def check_directory(directory: epath.PathLike, config: Architecture) -> None:
    """Raises CheckpointMismatchError if `directory` holds another model's checkpoints;
    an experiment calls it for every stage before it writes anything to the workdir."""
    if paths.as_path(directory).exists():
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
    args = ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(abstract_state)})
    for step in steps:
        _check_fingerprint(mngr, step, config)
        try:
            restored = mngr.restore(step, args=args)
        except Exception as err:  # a damaged step: fall back to the one before it
            logging.warning(
                "checkpoint step %d in %s is unreadable (%s)", step, mngr.directory, err
            )
            continue
        return restored[STATE_ITEM]
    if steps:
        raise CheckpointMismatchError(
            f"no checkpoint in {mngr.directory} could be read (steps {steps}); see warnings above"
        )
    return None


def abstract(state: Any) -> Any:
    """Shape/dtype/sharding skeleton of a state, for `restore_latest`."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)


# ----------------------------------------------------------------------------- loop

StepFn = Callable[[TrainState, int], tuple[TrainState, dict[str, Any]]]
# after_step(step, state) runs after each step's metrics are written (e.g. evaluation).
AfterStep = Callable[[int, TrainState], None]


class Preempted(SystemExit):
    """SIGTERM arrived; the state was checkpointed and rerunning the command resumes."""

    def __init__(self, step: int, directory: epath.Path) -> None:
        super().__init__(
            f"preempted at step {step}; checkpoint saved in {directory}, rerun to resume"
        )


@contextlib.contextmanager
def _sigterm_flag() -> Iterator[dict[str, bool]]:
    """A flag that SIGTERM sets instead of killing the process mid-step."""
    flag = {"requested": False}

    def handler(signum: int, frame: Any) -> None:
        flag["requested"] = True

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclasses.dataclass(frozen=True)
class Stage:
    """name: prefix of its scalars and the name of its checkpoint directory."""

    name: str
    directory: epath.Path
    num_steps: int
    checkpoint_every: int
    model_config: Architecture


def recorded_seconds(directory: epath.PathLike) -> float:
    """The stage's wall time recorded so far over all its segments; 0 in a fresh workdir."""
    path = paths.as_path(directory) / WALL_TIME_FILE
    return float(json.loads(path.read_text())["seconds"]) if path.exists() else 0.0


class _WallClock:
    """A stage's wall time: what earlier segments recorded plus this segment's, less the
    time spent in `excluding` blocks (evaluation, reported as a phase of its own).

    Recorded after every step, so a resumed stage adds to it: the total counts all time
    spent on the stage, redone steps included; a killed process loses at most the step
    it was in. Only process 0 writes the file."""

    def __init__(self, directory: epath.Path) -> None:
        self.path = directory / WALL_TIME_FILE
        self.before = recorded_seconds(directory)
        self.began = time.perf_counter()
        self.excluded = 0.0

    @contextlib.contextmanager
    def excluding(self) -> Iterator[None]:
        began = time.perf_counter()
        try:
            yield
        finally:
            self.excluded += time.perf_counter() - began

    def record(self) -> float:
        """The total so far, written where a resumed run reads it."""
        seconds = self.before + time.perf_counter() - self.began - self.excluded
        if reporting.is_main_process():
            partial = self.path.with_suffix(".partial")
            partial.write_text(json.dumps({"seconds": seconds}))
            partial.replace(self.path)  # a write cut short never replaces the last total
        return seconds


def restore(stage: Stage, state: TrainState) -> TrainState:
    """The newest checkpoint of the stage, or `state` in a fresh workdir."""
    mngr = manager(stage.directory)
    restored = restore_latest(mngr, abstract(state), stage.model_config)
    return state if restored is None else restored


def run(
    stage: Stage,
    state: TrainState,
    step_fn: StepFn,
    writer: reporting.MetricsWriter,
    after_step: AfterStep | None = None,
) -> TrainState:
    """Runs the stage to `num_steps`, resuming from its newest checkpoint. Its wall time
    (restore, steps, checkpoints; not `after_step`) is added to `wall_time.json`."""
    clock = _WallClock(stage.directory)
    state = restore(stage, state)
    start = int(state.step)
    if start >= stage.num_steps:
        return state
    mngr = manager(stage.directory)
    bar = reporting.progress(stage.num_steps, initial=start, desc=stage.name)
    with _sigterm_flag() as sigterm, bar:
        for step in range(start, stage.num_steps):
            began = time.perf_counter()
            state, metrics = step_fn(state, step)
            metrics = jax.device_get(metrics)
            raise_if_not_finite(step, metrics)
            seconds = time.perf_counter() - began
            done = step + 1
            scalars = {k: v for k, v in metrics.items() if k != "finite"}
            writer.write(done, {f"{stage.name}/{k}": v for k, v in scalars.items()})
            bar.set_postfix(loss=f"{float(metrics['loss']):.4f}", step_s=f"{seconds:.2f}")
            bar.update()
            last = done == stage.num_steps
            if last or sigterm["requested"] or done % stage.checkpoint_every == 0:
                save(mngr, done, state, stage.model_config)
                writer.flush()  # a remote workdir's logs keep up with its checkpoints
            times = {"step_seconds": seconds, "wall_seconds": clock.record()}
            writer.write(done, {f"{stage.name}/{k}": v for k, v in times.items()})
            if sigterm["requested"] and not last:
                writer.flush()
                raise Preempted(done, stage.directory)
            if after_step is not None:
                with clock.excluding():
                    after_step(done, state)
    writer.flush()
    return state
