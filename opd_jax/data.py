"""Data for distillation: loading splits, prompt templates, fixed-shape batches.

Everything is read through TFDS `as_data_source` over array_record files, the random-access
path that needs no TensorFlow. Our own builders (`opd_jax.datasets`) are built from local
files on first use, and so are a user's own data files (`datasets.user_files`: JSONL,
JSON, CSV, Parquet, a `datasets` save_to_disk folder); any other TFDS dataset (xsum,
cnn_dailymail, ...) must already be prepared in `data_dir` in a random-access format:
`tfds build --file_format=array_record`, or `tfds convert_format
--out_file_format=array_record` for a tfrecord build.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import string
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import tensorflow_datasets as tfds
from google.protobuf import json_format

from opd_jax import config, datasets
from opd_jax.datasets import user_files
from opd_jax.datasets.base import DataError, MissingDatasetError, MissingFieldError

# ----------------------------------------------------------------------------- loading

# Default (input_key, target_key) for our builders; other datasets name theirs.
DEFAULT_KEYS = {"aclsum": ("document", "summary"), "gsm_symbolic": ("question", "solution")}


class CorruptDatasetError(RuntimeError):
    """The dataset's metadata says it is prepared but a data file is missing or unreadable."""


def _base_name(name: str) -> str:
    return name.split("/")[0].split(":")[0]


def is_user_files(dataset: user_files.Dataset) -> bool:
    """Whether `dataset` names a user's data files rather than a TFDS dataset; our own
    builders' names are never paths."""
    ours = isinstance(dataset, str) and _base_name(dataset) in DEFAULT_KEYS
    return not ours and user_files.is_file_source(dataset)


def _data_dir(data_dir: str | os.PathLike | None) -> pathlib.Path:
    return pathlib.Path(data_dir or datasets.default_data_dir())


def _prepared(builder: Any) -> Any:
    """The builder, built from its local files first if it is not yet (never downloads)."""
    if not builder.is_prepared():
        download = tfds.download.DownloadConfig(try_download_gcs=False)
        builder.download_and_prepare(download_config=download)
    return builder


def load_builder(name: str, data_dir: str | os.PathLike | None = None) -> Any:
    """A prepared TFDS builder. Our builders are built from local files on first use; any
    other dataset must already be prepared in data_dir."""
    data_dir = _data_dir(data_dir)
    missing = MissingDatasetError(
        f"dataset {name!r} is not prepared in {data_dir}, and no data file or folder "
        f"{os.path.abspath(name)} exists either"
    )
    try:
        builder = tfds.builder(name, data_dir=str(data_dir))
    except json_format.Error as e:
        raise CorruptDatasetError(f"dataset {name!r} in {data_dir} has bad metadata: {e}") from e
    except ValueError:  # an unknown name (its message lists TFDS's catalogue) or a bad one
        raise missing from None
    if not builder.is_prepared() and _base_name(name) not in DEFAULT_KEYS:
        raise missing
    return _prepared(builder)


def _to_python(value: Any) -> Any:
    """TFDS hands back bytes and numpy scalars; templates and scorers want str and int."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray):
        return [_to_python(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return {k: _to_python(v) for k, v in value.items()}
    return value


@dataclasses.dataclass(frozen=True)
class Split:
    """Random access to one split; each example is a dict of its decoded features plus
    `input` and `target`, the fields that prompts and references are built from."""

    name: str
    split: str
    files: tuple[str, ...]
    source: Sequence[Any]
    input_key: str
    target_key: str

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        where = f"dataset {self.name!r} split {self.split!r} (files {', '.join(self.files)})"
        try:
            example = _to_python(self.source[index])
        except RuntimeError as e:  # array_record reports unreadable files this way
            raise CorruptDatasetError(f"cannot read record {index} of {where}: {e}") from e
        if any(v is None for v in example.values()):  # what a truncated file decodes to
            raise CorruptDatasetError(f"record {index} of {where} is empty: corrupt data file")
        return {**example, "input": example[self.input_key], "target": example[self.target_key]}


def load_split(
    name: user_files.Dataset,
    split: str,
    data_dir: str | os.PathLike | None = None,
    input_key: str | None = None,
    target_key: str | None = None,
    messages_key: str | None = None,
) -> Split:
    """One split of a TFDS dataset by name ("xsum", "gsm_symbolic/chain_sum", ...) or of a
    user's data files (a path, or {split: path}: `datasets.user_files`), with the fields
    that hold the model input and the reference output, or for files a chat column
    (`messages_key`) that holds both. `split` may be a TFDS slice: "train[:80%]"."""
    data_dir = _data_dir(data_dir)
    if is_user_files(name):
        files_config = user_files.make_config(name, input_key, target_key, messages_key)
        builder = _prepared(user_files.UserFiles(config=files_config, data_dir=str(data_dir)))
        input_key, target_key = files_config.input_key, files_config.target_key
    else:
        if messages_key is not None:
            raise DataError(f"messages_key reads data files; {name!r} is a TFDS dataset")
        builder = load_builder(name, data_dir)
        default_input, default_target = DEFAULT_KEYS.get(_base_name(name), (None, None))
        input_key, target_key = input_key or default_input, target_key or default_target
        features = list(builder.info.features.keys())
        for key in (input_key, target_key):
            if key not in features:
                raise MissingFieldError(
                    f"dataset {name!r} has no feature {key!r}; features: {features}"
                )
    try:
        split_info = builder.info.splits[split]
    except ValueError as e:  # an unknown split or a bad slice
        hint = ' (one path is the split "train": slice it, e.g. "train[:80%]")'
        message = str(e).splitlines()[0] + (hint if is_user_files(name) else "")
        raise DataError(f"dataset {name!r}: {message}") from None
    files = tuple(str(path) for path in split_info.filepaths)
    data = Split(str(name), split, files, builder.as_data_source(split), input_key, target_key)
    if len(data):
        data[0]  # a missing or unreadable file fails here rather than mid-training
    return data


# ----------------------------------------------------------------------------- prompts


class Tokenizer(Protocol):
    eos_id: int
    pad_id: int

    def encode(self, text: str, add_bos: bool = False) -> list[int]: ...

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str: ...


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
    """`instruction` is the user turn, formatted with the example's fields; it must contain
    `{input}` once. `chat=False` gives a plain BOS-prefixed string for base models.
    `conversation=True` puts the example's earlier chat turns (the `history` a messages
    column is read into) before the user turn; `system`, when set, replaces their own
    system turn."""

    instruction: str
    system: str | None = None
    chat: bool = True
    conversation: bool = False

    def __post_init__(self):
        fields = [f for _, f, _, _ in string.Formatter().parse(self.instruction) if f]
        if fields.count("input") != 1:
            raise config.ConfigError(
                "the instruction must contain {input} exactly once, where the example goes: "
                f"{self.instruction!r}"
            )


SUMMARIZE_PAPER = PromptTemplate(
    "Summarize the following scientific paper in three sentences: the challenge it "
    "addresses, its approach, and its outcome.\n\n{input}"
)
SOLVE_MATH = PromptTemplate(
    "Solve the following problem step by step. End your response with a final line of the "
    "form '#### <answer>'.\n\n{input}"
)
DEFAULT_TEMPLATES = {"aclsum": SUMMARIZE_PAPER, "gsm_symbolic": SOLVE_MATH}


def default_template(dataset: user_files.Dataset) -> PromptTemplate | None:
    """The prompt of one of our datasets; None for any other, which needs an instruction."""
    return None if is_user_files(dataset) else DEFAULT_TEMPLATES.get(_base_name(dataset))


def prompt_turns(example: Mapping[str, Any], template: PromptTemplate) -> list[dict[str, str]]:
    """The prompt's chat turns: a system turn, a conversation's earlier turns, the user's."""
    turns = json.loads(example[user_files.HISTORY]) if template.conversation else []
    if template.system:
        own = [t for t in turns if t["role"] != "system"]
        turns = [{"role": "system", "content": template.system}, *own]
    return [*turns, {"role": "user", "content": template.instruction.format_map(example)}]


def render_prompt(
    example: Mapping[str, Any], template: PromptTemplate, tokenizer: Tokenizer
) -> str:
    """The prompt text, chat markup included, ending where the model's answer starts."""
    messages = prompt_turns(example, template)
    if template.chat:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return "\n\n".join(m["content"] for m in messages) + "\n\n"


_INPUT_MARK = "\ue000"  # a private-use character that no template or dataset contains


def encode_prompt(
    example: Mapping[str, Any],
    template: PromptTemplate,
    tokenizer: Tokenizer,
    max_len: int | None = None,
) -> list[int]:
    """Prompt token ids, at most max_len (None: uncut). A prompt that does not fit loses the
    end of its `input` (the document), never the instruction or the chat markup around it."""
    add_bos = not template.chat  # a chat template writes its own start-of-text markup
    ids = tokenizer.encode(render_prompt(example, template, tokenizer), add_bos=add_bos)
    if max_len is None or len(ids) <= max_len:
        return ids
    marked = render_prompt({**example, "input": _INPUT_MARK}, template, tokenizer)
    head, tail = marked.split(_INPUT_MARK)  # the template holds {input} once
    head_ids = tokenizer.encode(head, add_bos=add_bos)
    tail_ids = tokenizer.encode(tail, add_bos=False)
    budget = max_len - len(head_ids) - len(tail_ids)
    if budget < 0:
        raise ValueError(f"the template alone is {max_len - budget} tokens > {max_len}")
    return head_ids + tokenizer.encode(example["input"], add_bos=False)[:budget] + tail_ids


def count_cut_prompts(
    split: Split, template: PromptTemplate, tokenizer: Tokenizer, max_len: int, sample: int = 256
) -> tuple[int, int, int]:
    """(prompts cut, prompts looked at, longest prompt) over the first `sample` examples.

    A cut prompt loses the end of its input: harmless for a long document, fatal for a
    math question, so the experiment reports it before training on it.
    """
    looked_at = min(sample, len(split))
    lengths = [len(encode_prompt(split[i], template, tokenizer)) for i in range(looked_at)]
    return sum(n > max_len for n in lengths), looked_at, max(lengths, default=0)


# ----------------------------------------------------------------------------- batches


@dataclasses.dataclass(frozen=True)
class BatchSpec:
    batch_size: int
    prompt_len: int
    target_len: int
    template: PromptTemplate
    shuffle: bool = True


@dataclasses.dataclass(frozen=True)
class Batch:
    """Left-padded prompts, right-padded targets, and the host-side examples for scoring."""

    indices_B: np.ndarray
    prompt_BxP: np.ndarray
    prompt_valid_BxP: np.ndarray
    target_BxN: np.ndarray
    target_valid_BxN: np.ndarray
    examples: tuple[dict[str, Any], ...]


@functools.lru_cache(maxsize=4)
def _permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def example_indices(
    step: int, batch_size: int, num_examples: int, seed: int, shuffle: bool = True
) -> np.ndarray:
    """Source indices of the batch at `step`: the stream is one permutation per epoch,
    seeded by (seed, epoch), so a resumed run sees exactly the batches it would have."""
    epochs, offsets = np.divmod(step * batch_size + np.arange(batch_size), num_examples)
    if not shuffle:
        return offsets
    return np.array(
        [_permutation(seed, int(e), num_examples)[o] for e, o in zip(epochs, offsets, strict=True)]
    )


def make_batch(
    examples: Sequence[Mapping[str, Any]], tokenizer: Tokenizer, spec: BatchSpec
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(prompt_BxP, prompt_valid_BxP, target_BxN, target_valid_BxN), int32 and bool."""
    size, p_len, n_len = len(examples), spec.prompt_len, spec.target_len
    prompt_BxP = np.full((size, p_len), tokenizer.pad_id, np.int32)
    prompt_valid_BxP = np.zeros((size, p_len), bool)
    target_BxN = np.full((size, n_len), tokenizer.pad_id, np.int32)
    target_valid_BxN = np.zeros((size, n_len), bool)
    for b, example in enumerate(examples):
        prompt = encode_prompt(example, spec.template, tokenizer, p_len)
        target = tokenizer.encode(example["target"], add_bos=False)[:n_len]
        if len(target) < n_len:  # EOS only where it fits: a missing EOS marks a cut target
            target.append(tokenizer.eos_id)
        prompt_BxP[b, p_len - len(prompt) :] = prompt
        prompt_valid_BxP[b, p_len - len(prompt) :] = True
        target_BxN[b, : len(target)] = target
        target_valid_BxN[b, : len(target)] = True
    return prompt_BxP, prompt_valid_BxP, target_BxN, target_valid_BxN


def batch_at(
    split: Split,
    tokenizer: Tokenizer,
    spec: BatchSpec,
    seed: int,
    step: int,
    rows: slice = slice(None),
) -> Batch:
    """The batch at `step`, a pure function of (split, spec, seed, step).

    `rows` keeps only those rows of it (a host of a multi-host run reads and tokenizes
    just its own share); row r is the same example whichever rows are asked for.
    """
    indices_B = example_indices(step, spec.batch_size, len(split), seed, spec.shuffle)[rows]
    examples = tuple(split[int(i)] for i in indices_B)
    return Batch(indices_B, *make_batch(examples, tokenizer, spec), examples)
