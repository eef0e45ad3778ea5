"""Workdir paths: local folders, `gs://` and the other schemes `etils.epath` knows.

`pathlib` folds "gs://bucket/run" into the local folder "gs:/bucket/run", so a pod's
resumable run would land on its ephemeral disk; every workdir path is an `epath.Path`
instead, which keeps the scheme and reaches the store through its own backend (Orbax
takes it as it is).
"""

from __future__ import annotations

from etils import epath


def as_path(path: epath.PathLike) -> epath.Path:
    """The workdir path, its URI scheme kept."""
    return epath.Path(path)


def is_local(path: epath.PathLike) -> bool:
    """Whether `path` is on this machine's file system (no "scheme://" in front)."""
    return "://" not in str(as_path(path))


def absolute(path: epath.PathLike) -> epath.Path:
    """A local path made absolute (Orbax wants one); a remote one is already, and
    `epath`'s `absolute` would fold it into a local folder."""
    path = as_path(path)
    return path.absolute() if is_local(path) else path
