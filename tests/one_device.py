"""The run's own rollout and update on one device with a separate teacher, called as
(state, teacher_params, ...): the shape most unit tests of the objective and the mixture
want."""

from opd_jax import distill, gkd, sampling, update
from opd_jax.model import ModelConfig


def gkd_update(
    student: ModelConfig,
    teacher: ModelConfig,
    cfg: distill.DistillConfig,
    optimizer,
    grad_accum: int = 1,
):
    """update(state, teacher_params, batch) -> (state, metrics), state donated."""
    roles = update.Roles(student, teacher)
    step = update.make_update_step(roles, cfg, optimizer, grad_accum=grad_accum)
    return lambda state, teacher_params, batch: step(state, _frozen(teacher_params), batch)


def gkd_rollout(
    student: ModelConfig,
    teacher: ModelConfig,
    mixture: gkd.MixtureConfig,
    settings: sampling.SamplingConfig,
):
    """rollout(state, teacher_params, prompt, valid, target, target_valid) -> (batch,
    on_policy_B); the teacher samples from the student's prompt."""
    roll = update.make_rollout(update.Roles(student, teacher), mixture, settings)

    def rollout(state, teacher_params, prompt, valid, target, target_valid):
        return roll(
            state, _frozen(teacher_params), prompt, valid, target, target_valid, prompt, valid
        )

    return rollout


def _frozen(teacher_params) -> update.Frozen:
    return {"teacher": teacher_params, "base": None}
