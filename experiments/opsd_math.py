"""On-policy self-distillation (OPSD) with the worked solution as privileged context:
SmolLM2-135M-Instruct with LoRA learns from itself reading the reference solution.
Reasoning-gym chain sums by default, GSM-Symbolic with
experiments/configs/opsd_gsm_symbolic.gin. Defaults: experiments/configs/opsd_math.gin.

    python -m experiments.opsd_math [--gin_file=...] [--gin_param='Schedule.steps=100']
"""

import pathlib

from opd_jax import recipe

GIN_FILE = pathlib.Path(__file__).parent / "configs" / "opsd_math.gin"

if __name__ == "__main__":
    recipe.main(__doc__, GIN_FILE, default_workdir="workdirs/opsd_math")
