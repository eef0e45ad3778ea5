"""reasoning-gym tasks (GSM-Symbolic, chain sums) as a TFDS builder, plus their scorer."""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import reasoning_gym
import tensorflow_datasets as tfds

from opd_jax.datasets.base import LocalBuilder


@dataclasses.dataclass(eq=False, kw_only=True)
class ReasoningGymConfig(tfds.core.BuilderConfig):
    """One reasoning-gym task, generated deterministically from `seed` into fixed splits."""

    task: str = "gsm_symbolic"
    task_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    seed: int = 0
    train_size: int = 2000
    validation_size: int = 200
    test_size: int = 500

    @property
    def task_seed(self) -> int:
        """reasoning-gym seeds item i with seed + i, so nearby seeds would give shifted copies
        of one stream; hashing the seed first makes different seeds give different data."""
        return int(np.random.SeedSequence(self.seed).generate_state(1)[0])

    def split_ranges(self) -> dict[str, range]:
        """Disjoint index ranges of one generator stream, so splits never share an item."""
        sizes = {"train": self.train_size, "validation": self.validation_size}
        sizes["test"] = self.test_size
        starts = itertools.accumulate(sizes.values(), initial=0)
        return {s: range(i, i + n) for (s, n), i in zip(sizes.items(), starts, strict=False)}


def chain_sum_solution(expression: str, answer: str) -> str:
    """A worked solution for `a + b - c`: one running total per line, then `#### answer`."""
    tokens = expression.split()
    total, lines = int(tokens[0]), []
    for op, term in zip(tokens[1::2], tokens[2::2], strict=True):
        new_total = total + int(term) if op == "+" else total - int(term)
        lines.append(f"{total} {op} {term} = {new_total}")
        total = new_total
    return "\n".join([*lines, f"#### {answer}"])


def reasoning_gym_example(task: str, item: Mapping[str, Any], index: int) -> dict[str, Any]:
    """question, worked `solution` ending in `#### answer`, and the final `answer`.

    gsm_symbolic's own solutions sometimes end `#### 51.0` for answer `51`; the last line
    is rewritten to the canonical answer so every target ends the same way."""
    answer = str(item["answer"])
    if task == "chain_sum":
        solution = chain_sum_solution(item["metadata"]["expression"], answer)
    else:
        lines = item["metadata"]["answer_cot"].strip().splitlines()
        body = lines[:-1] if lines and lines[-1].startswith("####") else lines
        solution = "\n".join([*body, f"#### {answer}"])
    fields = {"question": item["question"], "solution": solution, "answer": answer}
    return {"task": task, "index": index, **fields}


def reasoning_gym_split(config: ReasoningGymConfig, split: str) -> Iterator[dict[str, Any]]:
    """The examples of one split, from one reasoning-gym stream covering all splits."""
    ranges = config.split_ranges()
    total = sum(len(r) for r in ranges.values())
    dataset = reasoning_gym.create_dataset(
        config.task, seed=config.task_seed, size=total, **config.task_kwargs
    )
    for i in ranges[split]:
        yield reasoning_gym_example(config.task, dataset[i], i)


class GsmSymbolic(LocalBuilder):
    """reasoning-gym's GSM-Symbolic word problems, plus an easy arithmetic config (sums of
    two or three small numbers) for students too small to solve GSM-style problems."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [
        ReasoningGymConfig(name="gsm_symbolic", task="gsm_symbolic"),
        ReasoningGymConfig(
            name="chain_sum",
            task="chain_sum",
            task_kwargs={"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2},
        ),
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        text = tfds.features.Text()
        features = tfds.features.FeaturesDict(
            {"task": text, "index": np.int64, "question": text, "solution": text, "answer": text}
        )
        return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
        return {split: self._generate_examples(split) for split in ("train", "validation", "test")}

    def _generate_examples(self, split: str) -> Iterator[tuple[int, dict[str, Any]]]:
        for example in reasoning_gym_split(self.builder_config, split):
            yield example["index"], example


def extract_answer(text: str) -> str | None:
    """The text after the last `####` up to the end of its line, or None when absent."""
    _, marker, after = text.rpartition("####")
    return after.strip().partition("\n")[0].strip() if marker else None


@functools.cache
def _task_scorer(task: str) -> Any:
    return reasoning_gym.get_score_answer_fn(task)


def score_answer(prediction: str, example: Mapping[str, Any]) -> float:
    """1.0 when reasoning-gym's scorer gives the `####` answer full credit, else 0.0: its
    partial credit (0.01 for any wrong number, length ratios) is RL shaping, not accuracy."""
    entry = {"answer": example["answer"], "metadata": {}}
    return float(_task_scorer(example["task"])(extract_answer(prediction), entry) >= 1.0)
