"""GKD on grade-school arithmetic (reasoning-gym chain sums by default, GSM-Symbolic with
experiments/configs/gkd_gsm_symbolic.gin): a fine-tuned SmolLM2-135M-Instruct teaches a
layer-pruned copy of itself. Defaults: experiments/configs/gkd_arithmetic.gin.

    python -m experiments.gkd_arithmetic [--gin_file=...] [--gin_param='Schedule.steps=100']
"""

import pathlib

from opd_jax import recipe

GIN_FILE = pathlib.Path(__file__).parent / "configs" / "gkd_arithmetic.gin"

if __name__ == "__main__":
    recipe.main(__doc__, GIN_FILE, default_workdir="workdirs/gkd_arithmetic")
