"""A study: one recipe over a grid of settings x seeds, its stages before distillation run
once and shared, with one comparison table and plot (`opd_jax.study`). Defaults:
experiments/configs/study_lambda_objective.gin (GKD's lambda x forward / reverse KL).

    python -m experiments.study [--gin_file=...] [--gin_param='Study.recipe="gkd_summarize"']
"""

import importlib
import logging
import pathlib

import gin

from opd_jax import config, study, validation

HERE = pathlib.Path(__file__).parent
GIN_FILE = HERE / "configs" / "study_lambda_objective.gin"
# The experiment modules a study can run: those with a gin file of their own name.
RECIPES = sorted(
    p.stem for p in (HERE / "configs").glob("*.gin") if (HERE / f"{p.stem}.py").exists()
)


def settings() -> study.Study:
    """The study gin configures, its recipe one of RECIPES."""
    chosen = study.Study()
    validation.check_choice("Study.recipe", chosen.recipe, RECIPES)
    return chosen


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    config.enable_compilation_cache()
    gin.add_config_file_search_path(str(GIN_FILE.parent))  # `include 'x.gin'` in variants
    args = config.parse(__doc__, default_gin_files=[str(GIN_FILE)])
    with config.exit_on_config_error():
        chosen = settings()
        base = importlib.import_module(f"experiments.{chosen.recipe}").GIN_FILE
        study.run(
            args.workdir or f"workdirs/study_{chosen.recipe}",
            chosen,
            [str(base), str(GIN_FILE), *args.gin_file],
            args.gin_param,
            title=f"{chosen.recipe} {chosen.name}",
            restart=args.restart,
        )
