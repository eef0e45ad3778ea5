"""The resumable run loop every experiment stage shares.

A stage (teacher fine-tune, student fine-tune, distillation) is a pure step function
applied to the batch at each step. The loop restores the newest Orbax checkpoint in the
stage's directory and continues from its step; batches and RNG are pure functions of
the step, so an interrupted run ends in the state of an uninterrupted one. Checkpoints
are written every `checkpoint_every` steps, at the end, and on SIGTERM (TPU
preemption), after which the process exits with `Preempted`. A non-finite loss stops
the run before anything is written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import pathlib
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax

from opd_jax import distill, reporting, train_checkpoint

StepFn = Callable[[distill.TrainState, int], tuple[distill.TrainState, dict[str, Any]]]
# after_step(step, state) runs after each step's metrics are written (e.g. evaluation).
AfterStep = Callable[[int, distill.TrainState], None]


class Preempted(SystemExit):
    """SIGTERM arrived; the state was checkpointed and rerunning the command resumes."""

    def __init__(self, step: int, directory: pathlib.Path) -> None:
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
    directory: pathlib.Path
    num_steps: int
    checkpoint_every: int
    model_config: train_checkpoint.Architecture


def restore(stage: Stage, state: distill.TrainState) -> distill.TrainState:
    """The newest checkpoint of the stage, or `state` in a fresh workdir."""
    mngr = train_checkpoint.manager(stage.directory)
    restored = train_checkpoint.restore_latest(
        mngr, train_checkpoint.abstract(state), stage.model_config
    )
    return state if restored is None else restored


def run(
    stage: Stage,
    state: distill.TrainState,
    step_fn: StepFn,
    writer: reporting.MetricsWriter,
    after_step: AfterStep | None = None,
) -> distill.TrainState:
    """Runs the stage to `num_steps`, resuming from its newest checkpoint."""
    state = restore(stage, state)
    start = int(state.step)
    if start >= stage.num_steps:
        return state
    mngr = train_checkpoint.manager(stage.directory)
    bar = reporting.progress(stage.num_steps, initial=start, desc=stage.name)
    with _sigterm_flag() as sigterm, bar:
        for step in range(start, stage.num_steps):
            began = time.perf_counter()
            state, metrics = step_fn(state, step)
            metrics = jax.device_get(metrics)
            distill.raise_if_not_finite(step, metrics)
            seconds = time.perf_counter() - began
            done = step + 1
            scalars = {k: v for k, v in metrics.items() if k != "finite"}
            writer.write(done, {f"{stage.name}/{k}": v for k, v in scalars.items()})
            writer.write(done, {f"{stage.name}/step_seconds": seconds})
            bar.set_postfix(loss=f"{float(metrics['loss']):.4f}", step_s=f"{seconds:.2f}")
            bar.update()
            last = done == stage.num_steps
            if last or sigterm["requested"] or done % stage.checkpoint_every == 0:
                train_checkpoint.save(mngr, done, state, stage.model_config)
            if sigterm["requested"] and not last:
                writer.flush()
                raise Preempted(done, stage.directory)
            if after_step is not None:
                after_step(done, state)
    writer.flush()
    return state
