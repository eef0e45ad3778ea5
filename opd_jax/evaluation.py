"""Evaluation of generated completions against references: ROUGE, BLEU, chrF, exact
match, or the user's own metric.

Generation goes through a caller-supplied `generate_fn`, so evaluation runs the very jitted
sampler that training uses without this module knowing about models. Every batch has the
same shape (the last one is padded), so that sampler compiles once.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import numbers
import time
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import sacrebleu
from rouge_score import rouge_scorer

from opd_jax import config, data, datasets
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


def _normalized(text: str) -> str:
    """Lowercased, punctuation dropped, whitespace collapsed: "Paris." is "paris"."""
    kept = "".join(c for c in text.lower() if not unicodedata.category(c).startswith("P"))
    return " ".join(kept.split())


def text_exact_match(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Percentage of predictions equal to their reference, ignoring case, punctuation and
    spacing (the `####` answer of a math task is `exact_match`'s)."""
    _check_lengths(predictions, references)
    pairs = zip(predictions, references, strict=True)
    matches = [_normalized(p) == _normalized(r) for p, r in pairs]
    return {"exact_match": 100.0 * float(np.mean(matches))}


def bleu(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """sacrebleu's corpus BLEU (13a tokens, exp smoothing). One prediction alone, as a
    reward is, gets its sentence BLEU (effective n-gram order): a short sentence without
    a 4-gram match would otherwise always score 0."""
    _check_lengths(predictions, references)
    if len(predictions) == 1:
        return {"bleu": sacrebleu.sentence_bleu(predictions[0], [references[0]]).score}
    return {"bleu": sacrebleu.corpus_bleu(list(predictions), [list(references)]).score}


def chrf(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """sacrebleu's corpus chrF (character 6-grams, beta 2)."""
    _check_lengths(predictions, references)
    return {"chrf": sacrebleu.corpus_chrf(list(predictions), [list(references)]).score}


def against_targets(score: Callable[[Sequence[str], Sequence[str]], dict[str, float]]) -> Metric:
    """A metric of (predictions, references) as one of (predictions, examples): each
    example's reference is its `target`."""

    def metric(predictions: Sequence[str], examples: Sequence[Mapping[str, Any]]):
        return score(predictions, [e["target"] for e in examples])

    return metric


# Task kind -> metric, so an experiment names its metric in gin ("summarization", "bleu").
METRICS: dict[str, Metric] = {
    "summarization": summarization_metric,
    "math": exact_match,
    "exact_match": against_targets(text_exact_match),
    "rouge": against_targets(rouge),
    "bleu": against_targets(bleu),
    "chrf": against_targets(chrf),
}


def _checked(function: Callable[..., Any], path: str) -> Metric:
    """The user's metric, its output checked: a score outside [0, 100] would silently
    make a reward outside [0, 1]."""

    def metric(predictions: Sequence[str], examples: Sequence[Mapping[str, Any]]):
        scores = function(predictions, examples)
        valid = isinstance(scores, Mapping) and all(
            isinstance(v, numbers.Real) and 0.0 <= v <= 100.0 for v in scores.values()
        )
        if not valid:
            raise ValueError(
                f"metric {path!r} returned {scores!r}, not {{name: value in [0, 100]}}"
            )
        return {name: float(value) for name, value in scores.items()}

    return metric


@functools.cache
def _import_metric(path: str) -> Metric:
    module_name, _, function_name = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # the user's module: any error in it
        reason = " ".join(f"{type(err).__name__}: {err}".split())
        raise config.ConfigError(
            f"metric {path!r}: cannot import {module_name!r}: {reason}"
        ) from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise config.ConfigError(
            f"metric {path!r}: module {module_name!r} has no function {function_name!r}"
        )
    return _checked(function, path)


def resolve_metric(metric: str | Metric) -> Metric:
    """A metric by its kind (`METRICS`), the user's own by import path "module:function"
    (called as function(predictions, examples) -> {name: value in [0, 100]}, each example
    a dict of its fields with `input` and `target`), or the callable itself."""
    if callable(metric):
        return metric
    if ":" in metric:
        return _import_metric(metric)
    if metric not in METRICS:
        raise config.ConfigError(
            f"unknown metric {metric!r}; known: {sorted(METRICS)}, or 'module:function'"
        )
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
