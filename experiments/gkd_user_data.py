"""GKD on your own data: by default the country -> capital pairs of
experiments/data/capitals.jsonl, scored by exact match; bind Task to your files instead
(README: "Your own data"). Defaults: experiments/configs/gkd_user_data.gin.

    python -m experiments.gkd_user_data [--gin_file=my_task.gin] [--gin_param=...]
"""

import pathlib

from opd_jax import recipe

GIN_FILE = pathlib.Path(__file__).parent / "configs" / "gkd_user_data.gin"

if __name__ == "__main__":
    recipe.main(__doc__, GIN_FILE, default_workdir="workdirs/gkd_user_data")
