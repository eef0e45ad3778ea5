"""A user's own data files as one TFDS builder, written as array_record like our other
builders, so a user's splits are read, batched, resumed and shared across hosts alike.

A dataset is a path or a {split: path} mapping; a path is a file, a glob, a folder of data
files, or a folder written by Hugging Face `datasets`' `save_to_disk`. Formats go by
suffix: .jsonl (one object per line), .json (an array of objects, or one object per line
as `datasets`' `to_json` writes), .csv (a header row), .parquet and .arrow (the shards
`save_to_disk` writes). One path is one split, "train" (slice it: "train[:80%]"), except
a `save_to_disk` folder of several splits, which keeps them.

Every column of the first row becomes a text feature (numbers, lists and objects as JSON,
a missing value empty), so a metric or a privileged context can read any of them. A chat
column (`messages_key`: a list of {role, content}) makes each conversation three more
fields: `target`, the assistant turn that ends it; `input`, the user turn before that;
and `history`, every turn before that user turn (a system turn included), as JSON.

A build lives in the data cache under a name hashed from the files' contents and the
field settings: an edited file is built anew, an unchanged one read from the cache.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import glob
import hashlib
import json
import pathlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import tensorflow_datasets as tfds

from opd_jax.datasets.base import DataError, LocalBuilder, MissingDatasetError, MissingFieldError

Row = dict[str, Any]
Dataset = str | Mapping[str, str]
# The fields a conversation is split into; `data.render_prompt` reads HISTORY.
HISTORY, INPUT, TARGET = "history", "input", "target"

# ----------------------------------------------------------------------------- reading


def _parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: not valid JSON ({err})") from None


def _object(value: Any, where: str) -> Row:
    if not isinstance(value, dict):
        raise DataError(f"{where}: a row must be a JSON object, not {type(value).__name__}")
    return value


def read_jsonl(path: pathlib.Path) -> Iterator[Row]:
    """One JSON object per line; blank lines are skipped."""
    with path.open(encoding="utf-8-sig") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                where = f"{path} line {number}"
                yield _object(_parse_json(line, where), where)


def read_json(path: pathlib.Path) -> Iterator[Row]:
    """An array of objects; a file that is not one JSON value is read as JSON Lines."""
    try:
        value = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError:
        yield from read_jsonl(path)
        return
    for number, row in enumerate(value if isinstance(value, list) else [value], 1):
        yield _object(row, f"{path} item {number}")


def read_csv(path: pathlib.Path) -> Iterator[Row]:
    """Rows keyed by the header row; every value is text."""
    with path.open(encoding="utf-8-sig", newline="") as f:
        yield from csv.DictReader(f)


def read_parquet(path: pathlib.Path) -> Iterator[Row]:
    for batch in pq.ParquetFile(path).iter_batches():
        yield from batch.to_pylist()


def read_arrow(path: pathlib.Path) -> Iterator[Row]:
    """An Arrow IPC stream, the format of the data-*.arrow shards `save_to_disk` writes."""
    with pa.OSFile(str(path)) as f:
        for batch in pa.ipc.open_stream(f):
            yield from batch.to_pylist()


FORMATS: dict[str, Callable[[pathlib.Path], Iterator[Row]]] = {
    ".jsonl": read_jsonl,
    ".json": read_json,
    ".csv": read_csv,
    ".parquet": read_parquet,
    ".arrow": read_arrow,
}


def read_rows(path: pathlib.Path) -> Iterator[Row]:
    """The rows of one data file; a file its format's reader cannot parse is one error
    naming it."""
    try:
        yield from FORMATS[path.suffix](path)
    except DataError:
        raise
    except (OSError, ValueError, csv.Error) as err:  # pyarrow's errors are among these
        message = " ".join(str(err).split())
        raise DataError(f"{path}: cannot be read as {path.suffix}: {message}") from None


# ----------------------------------------------------------------------------- finding


def is_file_source(dataset: Dataset) -> bool:
    """Whether `dataset` names data files rather than a TFDS dataset: a {split: path}
    mapping, a path with a data file's suffix, a glob, or an existing file or folder."""
    if isinstance(dataset, Mapping):
        return True
    path = pathlib.Path(dataset)
    return path.suffix in FORMATS or any(c in dataset for c in "*?[") or path.exists()


def data_files(path: str) -> tuple[pathlib.Path, ...]:
    """The files `path` names: itself, a glob's matches, a `save_to_disk` folder's shards
    (listed in its state.json), or any other folder's data files."""
    where = pathlib.Path(path)
    if (where / "state.json").is_file():
        state = json.loads((where / "state.json").read_text(encoding="utf-8"))
        return tuple(where / shard["filename"] for shard in state["_data_files"])
    if where.is_dir():
        files = sorted(p for p in where.iterdir() if p.suffix in FORMATS)
        missing = f"folder {path} holds no {', '.join(FORMATS)} file"
    elif any(c in path for c in "*?["):
        files = sorted(pathlib.Path(p) for p in glob.glob(path, recursive=True))
        missing = f"no file matches {path}"
    else:
        files = [where] if where.is_file() else []
        missing = f"no such file or folder: {path}"
    if not files:
        raise MissingDatasetError(missing)
    for file in files:
        if file.suffix not in FORMATS:
            raise DataError(f"{file}: unknown data format; use one of {', '.join(FORMATS)}")
    return tuple(files)


def split_files(dataset: Dataset) -> dict[str, tuple[pathlib.Path, ...]]:
    """split -> its files. One path is the split "train", unless it is a `save_to_disk`
    folder of several splits (its dataset_dict.json lists them)."""
    if isinstance(dataset, Mapping):
        return {split: data_files(path) for split, path in dataset.items()}
    splits_file = pathlib.Path(dataset) / "dataset_dict.json"
    if splits_file.is_file():
        splits = json.loads(splits_file.read_text(encoding="utf-8"))["splits"]
        return {split: data_files(str(pathlib.Path(dataset) / split)) for split in splits}
    return {"train": data_files(dataset)}


def first_row(files: Sequence[pathlib.Path]) -> tuple[pathlib.Path, Row]:
    """The first row of the first file that has one, and that file."""
    for path in files:
        for row in read_rows(path):
            return path, row
    raise DataError(f"{', '.join(map(str, files))}: no rows")


@functools.lru_cache(maxsize=256)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    """Keyed by size and mtime too, so the splits of one run read a file once and an
    edited file is read again."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def content_digest(path: pathlib.Path) -> str:
    stat = path.stat()
    return _sha256(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


# ----------------------------------------------------------------------------- examples


def as_text(value: Any) -> str:
    """Text as it is, nothing as "", anything else (numbers, lists, objects) as JSON."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, default=str)


def conversation_fields(messages: Any, where: str) -> dict[str, str]:
    """`history`, `input` and `target` of a conversation that ends with a user turn and
    the assistant's reply to it; a CSV cell holds the turns as JSON."""
    turns = _parse_json(messages, where) if isinstance(messages, str) else messages
    try:
        turns = [{"role": t["role"], "content": t["content"]} for t in turns]
    except (TypeError, KeyError):
        raise DataError(f"{where}: messages must be a list of {{role, content}} turns") from None
    if any(not isinstance(t["content"], str) for t in turns):
        raise DataError(f"{where}: every turn's content must be text")
    roles = [t["role"] for t in turns[-2:]]
    if roles != ["user", "assistant"]:
        raise DataError(
            f"{where}: a conversation must end with a user turn and the assistant's reply, "
            f"not {roles}"
        )
    *history, user, reply = turns
    history_json = json.dumps(history, ensure_ascii=False)
    return {HISTORY: history_json, INPUT: user["content"], TARGET: reply["content"]}


@dataclasses.dataclass(eq=False, kw_only=True)
class UserFilesConfig(tfds.core.BuilderConfig):
    """One set of files and how their fields are read; `name` hashes both (`make_config`).
    With `messages_key`, input_key and target_key are the fields built from it."""

    files: dict[str, tuple[str, ...]]
    columns: tuple[str, ...]
    input_key: str
    target_key: str
    messages_key: str | None = None

    def __repr__(self) -> str:
        """Short, as TFDS logs it on every load: the name and each split's file count."""
        counts = ", ".join(f"{split}: {len(paths)} file(s)" for split, paths in self.files.items())
        return f"user files {self.name} ({counts})"


def example(row: Row, config: UserFilesConfig, where: str) -> dict[str, str]:
    """A row as it is stored: every column as text, its fields checked present."""
    keys = [config.messages_key] if config.messages_key else [config.input_key, config.target_key]
    for key in keys:
        if row.get(key) is None:
            raise MissingFieldError(f"{where} has no {key!r}")
    stored = {column: as_text(row.get(column)) for column in config.columns}
    if config.messages_key:
        stored.update(conversation_fields(row[config.messages_key], where))
    return stored


def make_config(
    dataset: Dataset,
    input_key: str | None = None,
    target_key: str | None = None,
    messages_key: str | None = None,
) -> UserFilesConfig:
    """The config of `dataset`'s files, its fields checked against the first row's columns."""
    files = split_files(dataset)
    path, row = first_row(next(iter(files.values())))
    columns = tuple(key for key in row if isinstance(key, str))  # a CSV's extra cells: None

    def check(setting: str, key: str | None) -> None:
        if key not in columns:
            raise MissingFieldError(
                f"{setting} {key!r} is not a column of {path}; its columns: {list(columns)}"
            )

    if messages_key is None:
        check("input_key", input_key)
        check("target_key", target_key)
    else:
        if input_key or target_key:
            raise DataError(
                "messages_key makes input and target from each conversation: "
                "leave input_key and target_key unset"
            )
        check("messages_key", messages_key)
        clash = sorted(set(columns) & {HISTORY, INPUT, TARGET})
        if clash:
            raise DataError(f"{path} has columns {clash}, names that messages_key's fields take")
        input_key, target_key = INPUT, TARGET
    fields = {"input_key": input_key, "target_key": target_key, "messages_key": messages_key}
    digests = {split: [content_digest(p) for p in paths] for split, paths in files.items()}
    name = hashlib.sha256(json.dumps([digests, fields], sort_keys=True).encode()).hexdigest()
    as_str = {split: tuple(map(str, paths)) for split, paths in files.items()}
    return UserFilesConfig(name=name[:16], files=as_str, columns=columns, **fields)


class UserFiles(LocalBuilder, skip_registration=True):
    """The files of a `UserFilesConfig`, built once per content into the data cache."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        config = self.builder_config
        built = (HISTORY, INPUT, TARGET) if config.messages_key else ()
        text = tfds.features.Text()
        features = tfds.features.FeaturesDict({k: text for k in (*config.columns, *built)})
        return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
        splits = self.builder_config.files.items()
        return {split: self._generate_examples(paths) for split, paths in splits}

    def _generate_examples(self, paths: Sequence[str]) -> Iterator[tuple[str, dict[str, str]]]:
        for index, path in enumerate(map(pathlib.Path, paths)):
            for number, row in enumerate(read_rows(path), 1):
                yield f"{index}:{number}", example(row, self.builder_config, f"{path} row {number}")
