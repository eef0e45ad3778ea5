"""On-policy self-distillation (OPSD) of a shared rule: the teacher is the same model with
a rule in its system prompt that the student never sees, so the student must internalize
it. Defaults: experiments/configs/opsd_rule.gin.

    python -m experiments.opsd_rule [--gin_file=...] [--gin_param='Schedule.steps=100']
"""

import pathlib

from opd_jax import recipe

CONFIGS = pathlib.Path(__file__).parent / "configs"
GIN_FILE = CONFIGS / "opsd_rule.gin"

if __name__ == "__main__":
    recipe.main(__doc__, GIN_FILE, default_workdir="workdirs/opsd_rule")
