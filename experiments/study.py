"""A study: one recipe over a grid of settings x seeds, its stages before distillation run
once and shared, with one comparison table and plot (`opd_jax.study`). Defaults:
experiments/configs/study_lambda_objective.gin (GKD's lambda x forward / reverse KL).

    python -m experiments.study [--gin_file=...] [--gin_param='Study.recipe="gkd_summarize"']
"""

import importlib
import logging
import pathlib
import sys

import gin

from opd_jax import config, mesh, study

GIN_FILE = pathlib.Path(__file__).parent / "configs" / "study_lambda_objective.gin"

if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    config.enable_compilation_cache()
    gin.add_config_file_search_path(str(GIN_FILE.parent))  # `include 'x.gin'` in variants
    args = config.parse(__doc__, default_gin_files=[str(GIN_FILE)])
    settings = study.Study()
    base = importlib.import_module(f"experiments.{settings.recipe}").GIN_FILE
    gin_files = [str(base), str(GIN_FILE), *args.gin_file]
    try:
        study.run(
            args.workdir or f"workdirs/study_{settings.recipe}",
            settings,
            gin_files,
            args.gin_param,
            title=f"{settings.recipe} {settings.name}",
            restart=args.restart,
        )
    except (config.ConfigError, mesh.MeshError) as err:
        sys.exit(f"error: {err}")
