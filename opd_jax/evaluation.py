"""Evaluation of generated completions against references.

Generation goes through a caller-supplied `generate_fn`, so evaluation runs the very jitted
sampler that training uses without this module knowing about models. Every batch has the
same shape (the last one is padded), so that sampler compiles once.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
from rouge_score import rouge_scorer

from opd_jax import data, datasets
from opd_jax.datasets import gsm_symbolic

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")

# generate_fn(prompt_BxP, prompt_valid_BxP) -> one decoded completion per row.
GenerateFn = Callable[[np.ndarray, np.ndarray], Sequence[str]]
# metric(predictions, examples) -> {name: mean score in [0, 100]}.
Metric = Callable[[Sequence[str], Sequence[Mapping[str, Any]]], dict[str, float]]

# ----------------------------------------------------------------------------- metrics


def _check_lengths(predictions: Sequence[str], references: Sequence[Any]) -> None:
    if not predictions or len(predictions) != len(references):
        raise ValueError(
            f"need as many predictions as references, at least one: "
            f"{len(predictions)} vs {len(references)}"
        )


@functools.cache
def _rouge_scorer() -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure ×100, the usual way summarization results are reported."""
    _check_lengths(predictions, references)
    scorer = _rouge_scorer()
    scores = [scorer.score(ref, pred) for pred, ref in zip(predictions, references, strict=True)]
    return {k: 100.0 * float(np.mean([s[k].fmeasure for s in scores])) for k in ROUGE_TYPES}


def exact_match(
    predictions: Sequence[str], examples: Sequence[Mapping[str, Any]]
) -> dict[str, float]:
    """Percentage of predictions whose `####` answer the task's own scorer accepts, and
    (`answered`) of predictions that give a `####` answer at all, right or wrong."""
    _check_lengths(predictions, examples)
    scores = [datasets.score_answer(p, e) for p, e in zip(predictions, examples, strict=True)]
    answered = [gsm_symbolic.extract_answer(p) is not None for p in predictions]
    return {
        "exact_match": 100.0 * float(np.mean(scores)),
        "answered": 100.0 * float(np.mean(answered)),
    }


def _words(text: str) -> list[str]:
    """The unit of the repetition measures: lowercased whitespace-separated words, so they
    do not depend on any model's tokenizer and read the same for every run."""
    return text.lower().split()


def _ngrams(words: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def _repeated_share(words: Sequence[str], n: int) -> float:
    """Share of the n-grams that already occurred earlier in the same text; 0 for a text
    with no n-gram (fewer than n words): nothing in it repeats."""
    grams = _ngrams(words, n)
    return (len(grams) - len(set(grams))) / len(grams) if grams else 0.0


def repetition(predictions: Sequence[str]) -> dict[str, float]:
    """How much each prediction repeats itself, averaged over predictions, ×100 like ROUGE:
    a distilled student can score ROUGE while writing loops ("to be a model to be the
    model ..."), which these expose. Over `_words`:
      repeated_3gram  percent of a prediction's 3-grams that already occurred earlier in it;
      distinct_2      percent of a prediction's bigrams that are distinct.
    A prediction too short to have such n-grams repeats nothing: 0 and 100."""
    if not predictions:
        raise ValueError("need at least one prediction")
    words = [_words(p) for p in predictions]
    return {
        "repeated_3gram": 100.0 * float(np.mean([_repeated_share(w, 3) for w in words])),
        "distinct_2": 100.0 * float(np.mean([1.0 - _repeated_share(w, 2) for w in words])),
    }


def summarization_metric(
    predictions: Sequence[str], examples: Sequence[Mapping[str, Any]]
) -> dict[str, float]:
    """ROUGE against each example's `target`, and the predictions' `repetition`."""
    return {**rouge(predictions, [e["target"] for e in examples]), **repetition(predictions)}


# Task kind -> metric, so an experiment names its metric in gin ("summarization", "math").
METRICS: dict[str, Metric] = {"summarization": summarization_metric, "math": exact_match}


def resolve_metric(metric: str | Metric) -> Metric:
    """A metric by its task kind, or the callable itself."""
    if callable(metric):
        return metric
    if metric not in METRICS:
        raise KeyError(f"unknown metric {metric!r}; known: {sorted(METRICS)}")
    return METRICS[metric]


# ----------------------------------------------------------------------------- evaluate


class Sample(NamedTuple):
    """One example shown in a report."""

    input: str
    prediction: str
    reference: str


@dataclasses.dataclass(frozen=True)
class EvalResult:
    """`seconds`: the evaluation's wall time, generation included, kept with its scores so
    a run's report can sum the time it spent evaluating."""

    metrics: dict[str, float]
    num_examples: int
    samples: tuple[Sample, ...]
    seconds: float


def padded_chunks(num_examples: int, batch_size: int) -> list[np.ndarray]:
    """Indices of each batch, in order; the last batch repeats its final index to full size
    (a real prompt, so the sampler never sees an all-padding row)."""
    indices = np.pad(np.arange(num_examples), (0, -num_examples % batch_size), mode="edge")
    return list(indices.reshape(-1, batch_size))


def evaluate(
    generate_fn: GenerateFn,
    examples: Sequence[Mapping[str, Any]],
    tokenizer: data.Tokenizer,
    spec: data.BatchSpec,
    metric: str | Metric,
    max_examples: int | None = None,
    num_samples: int = 3,
) -> EvalResult:
    """Scores the first `max_examples` examples (all by default), in order, in batches of
    `spec.batch_size` prompts of `spec.prompt_len` tokens; `spec.shuffle` is ignored."""
    began = time.perf_counter()
    metric_fn = resolve_metric(metric)
    num_examples = len(examples) if max_examples is None else min(max_examples, len(examples))
    if num_examples <= 0:
        raise ValueError("nothing to evaluate: no examples")
    chosen = [examples[i] for i in range(num_examples)]
    predictions: list[str] = []
    for indices_B in padded_chunks(num_examples, spec.batch_size):
        examples_B = [chosen[i] for i in indices_B]
        prompt_BxP, prompt_valid_BxP, _, _ = data.make_batch(examples_B, tokenizer, spec)
        completions = list(generate_fn(prompt_BxP, prompt_valid_BxP))
        if len(completions) != spec.batch_size:
            raise ValueError(
                f"generate_fn returned {len(completions)} completions for {spec.batch_size} rows"
            )
        predictions.extend(completions)
    predictions = predictions[:num_examples]  # the padded rows repeat a scored example
    samples = tuple(
        Sample(e["input"], p, e["target"])
        for e, p in zip(chosen[:num_samples], predictions, strict=False)
    )
    metrics = metric_fn(predictions, chosen)
    return EvalResult(metrics, num_examples, samples, time.perf_counter() - began)
