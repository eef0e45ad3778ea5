"""ACLSum as a TFDS builder, read from the JSONL files inside the aclsum PyPI package."""

from __future__ import annotations

import importlib.resources
import json
import pathlib
from collections.abc import Iterator, Mapping
from typing import Any

import tensorflow_datasets as tfds

from opd_jax.datasets.base import LocalBuilder

SECTIONS = ("abstract", "introduction", "conclusion")
ASPECTS = ("challenge", "approach", "outcome")
# Our split name -> the file the aclsum wheel ships; the splits are kept as shipped.
SPLITS = {"train": "train", "validation": "val", "test": "test"}


def aclsum_example(row: Mapping[str, Any]) -> dict[str, str]:
    """One paper: `document` is the annotated source text (sections in paper order, so
    truncation keeps the abstract); `summary` joins the challenge, approach and outcome
    summaries in that order. Sentences stay tokenized as shipped ("paper , we")."""
    sections = {s: " ".join(row["sentences"][s]) for s in SECTIONS}
    return {
        "id": row["id"],
        "title": row["title"],
        "document": "\n\n".join(sections[s] for s in SECTIONS if sections[s]),
        **sections,
        **{a: row["summary"][a] for a in ASPECTS},
        "summary": " ".join(row["summary"][a] for a in ASPECTS),
    }


def aclsum_file(split: str) -> pathlib.Path:
    """The JSONL file of one split inside the installed aclsum package."""
    package_dir = pathlib.Path(str(importlib.resources.files("aclsum")))
    return package_dir / "dataset" / f"{SPLITS[split]}.jsonl"


class Aclsum(LocalBuilder):
    """ACLSum (Takeshita et al., 2024): 250 ACL papers with aspect-based summaries."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        keys = ("id", "title", "document", *SECTIONS, *ASPECTS, "summary")
        features = tfds.features.FeaturesDict({k: tfds.features.Text() for k in keys})
        return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
        return {split: self._generate_examples(aclsum_file(split)) for split in SPLITS}

    def _generate_examples(self, path: pathlib.Path) -> Iterator[tuple[str, dict[str, str]]]:
        with path.open(encoding="utf-8") as f:
            for line in f:
                example = aclsum_example(json.loads(line))
                yield example["id"], example
