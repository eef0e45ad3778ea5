"""TFDS builders over local files: importing this package registers `aclsum` and
`gsm_symbolic` with TFDS, so `tfds.builder(name, data_dir=...)` finds them; `user_files`
builds a user's own data files, found by path rather than by name."""

from opd_jax.datasets.aclsum import Aclsum
from opd_jax.datasets.base import FILE_FORMAT, default_data_dir
from opd_jax.datasets.gsm_symbolic import GsmSymbolic, ReasoningGymConfig, score_answer

__all__ = [
    "FILE_FORMAT",
    "Aclsum",
    "GsmSymbolic",
    "ReasoningGymConfig",
    "default_data_dir",
    "score_answer",
]
