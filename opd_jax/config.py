"""gin wiring and the flags every entry point shares.

Every experiment takes `--gin_file` and `--gin_param` (both repeatable), `--workdir`
and `--restart`. Bindings are parsed one at a time so a bad one fails with a single
line that names it, instead of a gin traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import sys
from collections.abc import Iterator, Sequence

import gin
import jax
from etils import epath

from opd_jax import assets, mesh, paths
from opd_jax.validation import ConfigError


def flag_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--gin_file", action="append", default=[], help="gin config file (repeatable)"
    )
    parser.add_argument(
        "--gin_param",
        action="append",
        default=[],
        help="gin binding such as 'MixtureConfig.on_policy_fraction=1.0' (repeatable, applied "
        "after the files)",
    )
    parser.add_argument(
        "--workdir", default=None, help="where checkpoints and logs go (a folder or gs://...)"
    )
    parser.add_argument(
        "--restart",
        action="store_true",
        help="remove what an earlier run wrote in the workdir and start over",
    )
    multihost = parser.add_argument_group("multi-host (jax.distributed)")
    multihost.add_argument("--coordinator_address", default=None, help="host:port of process 0")
    multihost.add_argument("--num_processes", type=int, default=None)
    multihost.add_argument("--process_id", type=int, default=None)
    multihost.add_argument(
        "--distributed",
        action="store_true",
        help="auto-detect the cluster (TPU pod slice, SLURM) and join it",
    )
    multihost.add_argument("--distributed_timeout_s", type=int, default=300)
    return parser


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def error_line(err: Exception) -> str:
    """A ConfigError's (or MeshError's) own message: its first line. Raised while gin
    builds a configurable, it comes with gin's "In call to configurable ..." lines
    appended, which the `Class.field` the message names makes redundant."""
    return str(err).split("\n", 1)[0]


@contextlib.contextmanager
def exit_on_config_error() -> Iterator[None]:
    """Turns a setting that cannot work (ConfigError, MeshError, an unreachable
    coordinator) into one line on exit; every other exception keeps its traceback."""
    try:
        yield
    except (ConfigError, mesh.MeshError, mesh.DistributedInitError) as err:
        sys.exit(f"error: {error_line(err)}")


def apply_gin(gin_files: Sequence[str], gin_params: Sequence[str]) -> None:
    """Parses the files, then each binding, raising ConfigError that names the culprit."""
    for path in gin_files:
        if not pathlib.Path(path).exists():
            raise ConfigError(f"--gin_file {path}: no such file")
        try:
            gin.parse_config_file(path)
        except Exception as err:  # gin raises ValueError, KeyError, SyntaxError, ...
            raise ConfigError(f"--gin_file {path}: {_one_line(err)}") from None
    for binding in gin_params:
        try:
            gin.parse_config(binding)
        except Exception as err:
            raise ConfigError(f"--gin_param '{binding}': {_one_line(err)}") from None


def parse(
    description: str, argv: Sequence[str] | None = None, default_gin_files: Sequence[str] = ()
) -> argparse.Namespace:
    """Parses the shared flags, applies gin (an entry point's own defaults first, then the
    user's files and bindings) and joins a multi-host run if asked to.

    A bad binding or an unreachable coordinator exits with one line.
    """
    args = flag_parser(description).parse_args(argv)
    with exit_on_config_error():
        apply_gin([*default_gin_files, *args.gin_file], args.gin_param)
        mesh.initialize_distributed(
            args.coordinator_address,
            args.num_processes,
            args.process_id,
            auto_detect=args.distributed,
            timeout_s=args.distributed_timeout_s,
        )
    return args


def enable_compilation_cache(min_compile_seconds: float = 1.0) -> pathlib.Path:
    """Keeps XLA's compiled programs on disk (under the checkpoint cache unless
    $JAX_COMPILATION_CACHE_DIR says otherwise), so a resumed or repeated run skips the
    compiles that dominate a small model's start-up. Set before anything is compiled;
    processes a run starts inherit the directory through the environment."""
    default = assets.cache_dir() / "xla"
    directory = pathlib.Path(os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(default)))
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_seconds)
    return directory


def save_operative_config(workdir: epath.PathLike) -> epath.Path:
    """Writes the bindings the run actually used, so a result can be reproduced."""
    path = paths.as_path(workdir) / "operative_config.gin"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(gin.operative_config_str())
    return path
