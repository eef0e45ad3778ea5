"""What our TFDS builders share: the array_record file format, where data lives, and the
errors that bad data settings raise."""

from __future__ import annotations

import os
import pathlib
from typing import Any

import tensorflow_datasets as tfds

from opd_jax import config

DATA_DIR_ENV = "OPD_JAX_DATA"
FILE_FORMAT = "array_record"  # random access without TensorFlow; grain reads it as well


class DataError(config.ConfigError):
    """Data that cannot be read as asked. A config error: an entry point prints its one-line
    message, which names the dataset, file, row or field, instead of a traceback."""


class MissingDatasetError(DataError, FileNotFoundError):
    """Neither a prepared TFDS dataset (nothing here downloads) nor an existing data file."""


class MissingFieldError(DataError):
    """A named field (feature or column) that the dataset does not have."""


class LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Writes array_record by default. `code_path` is None because TFDS 4.9.10 finds a
    package builder's code through the importlib_resources backport, which it installs only
    on Python < 3.9; the path only locates a checksums file, and nothing here downloads."""

    code_path = None

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("file_format", FILE_FORMAT)
        super().__init__(**kwargs)


def default_data_dir() -> pathlib.Path:
    """$OPD_JAX_DATA, else ~/.cache/opd_jax/tensorflow_datasets: never inside the repo."""
    default = pathlib.Path.home() / ".cache" / "opd_jax" / "tensorflow_datasets"
    return pathlib.Path(os.environ.get(DATA_DIR_ENV, default))
