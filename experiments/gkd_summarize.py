"""GKD on scientific-paper summarization (ACLSum): SmolLM2-135M-Instruct teaches a
layer-pruned copy of itself. Defaults: experiments/configs/gkd_summarize.gin.

    python -m experiments.gkd_summarize [--gin_file=...] [--gin_param='Schedule.steps=100']
"""

import pathlib

from opd_jax import recipe

GIN_FILE = pathlib.Path(__file__).parent / "configs" / "gkd_summarize.gin"

if __name__ == "__main__":
    recipe.main(__doc__, GIN_FILE, default_workdir="workdirs/gkd_summarize")
