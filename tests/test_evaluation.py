"""Evaluation: ROUGE and exact match against their references, and `evaluate` driving a fake
sampler through real batches of a real byte-level BPE tokenizer."""

import numpy as np
import pytest
import tokenizers
from rouge_score import rouge_scorer

from opd_jax import config, data, evaluation

SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "Solve the following problem step by step. End your response with a final line.",
    "State the final answer to the following arithmetic problem: 12 + 7 - 4 =",
    "Summarize the following scientific paper in three sentences.",
    "In this paper , we propose a method for neural machine translation .",
]


class TinyTokenizer:
    """A real byte-level BPE trained on a few sentences, behind the interface data.py uses."""

    pad_id, bos_id, eos_id = 0, 1, 2

    def __init__(self) -> None:
        self._tok = tokenizers.Tokenizer(tokenizers.models.BPE())
        self._tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
        self._tok.decoder = tokenizers.decoders.ByteLevel()
        trainer = tokenizers.trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=SPECIALS,
            initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        self._tok.train_from_iterator(CORPUS, trainer)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        return [self.bos_id] * add_bos + self._tok.encode(text).ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return turns + "<|im_start|>assistant\n" * add_generation_prompt


@pytest.fixture(scope="module")
def tokenizer() -> TinyTokenizer:
    return TinyTokenizer()


@pytest.fixture(scope="module")
def chain_sum(tmp_path_factory) -> data.Split:
    return data.load_split("gsm_symbolic/chain_sum", "test", tmp_path_factory.mktemp("tfds"))


def math_spec(batch_size: int = 4) -> data.BatchSpec:
    return data.BatchSpec(batch_size, prompt_len=160, target_len=48, template=data.SOLVE_MATH)


class ReferenceSampler:
    """Stands in for the jitted sampler: reads each prompt back and answers with the
    solution of the question it contains, recording every batch shape it is given."""

    def __init__(self, tokenizer, examples, answer=lambda example: example["target"]) -> None:
        self.tokenizer, self.examples, self.answer = tokenizer, examples, answer
        self.shapes: list[tuple] = []

    def __call__(self, prompt_BxP: np.ndarray, prompt_valid_BxP: np.ndarray) -> list[str]:
        self.shapes.append((prompt_BxP.shape, prompt_valid_BxP.shape))
        texts = [
            self.tokenizer.decode(row[valid])
            for row, valid in zip(prompt_BxP, prompt_valid_BxP, strict=True)
        ]
        return [self.answer(self._example_in(text)) for text in texts]

    def _example_in(self, text: str) -> dict:
        (example,) = [e for e in self.examples if e["input"] in text]
        return example


# ----------------------------------------------------------------------------- metrics


def test_rouge_is_100_for_identical_and_0_for_disjoint_texts():
    same = evaluation.rouge(["the cat sat on the mat"], ["the cat sat on the mat"])
    disjoint = evaluation.rouge(["alpha beta gamma"], ["delta epsilon zeta"])
    assert same == pytest.approx({"rouge1": 100.0, "rouge2": 100.0, "rougeL": 100.0})
    assert disjoint == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}


def test_rouge_is_the_mean_f_measure_of_rouge_score_times_100():
    predictions = ["the models were trained on papers", "we propose a new parsing method"]
    references = [
        "models are trained on scientific papers",
        "a novel method for parsing is proposed",
    ]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    scores = [scorer.score(r, p) for p, r in zip(predictions, references, strict=True)]
    expected = {k: 50.0 * (scores[0][k].fmeasure + scores[1][k].fmeasure) for k in scores[0]}
    got = evaluation.rouge(predictions, references)
    assert got == pytest.approx(expected)
    assert 0.0 < got["rouge2"] < got["rouge1"] < 100.0  # a partial overlap, not a trivial case


def test_repetition_of_hand_made_predictions():
    loop = "a b c a b c a b c"  # 7 trigrams, 3 distinct; 8 bigrams, 3 distinct
    assert evaluation.repetition([loop]) == pytest.approx(
        {"repeated_3gram": 100 * 4 / 7, "distinct_2": 100 * 3 / 8}
    )
    # Lowercased words: 2 trigrams, one a repeat; 3 bigrams, 1 distinct.
    assert evaluation.repetition(["The the THE the"]) == pytest.approx(
        {"repeated_3gram": 50.0, "distinct_2": 100 / 3}
    )
    # The student's loop repeats one bigram ("to be") of 9, no trigram.
    looping = "They propose to be a model to be the model"
    assert evaluation.repetition([looping]) == pytest.approx(
        {"repeated_3gram": 0.0, "distinct_2": 100 * 8 / 9}
    )
    short = {"repeated_3gram": 0.0, "distinct_2": 100.0}  # no n-gram repeats nothing
    assert evaluation.repetition([""]) == short
    assert evaluation.repetition(["word"]) == short


def test_repetition_is_the_mean_over_predictions():
    got = evaluation.repetition(["a b c a b c a b c", "", "word"])
    assert got == pytest.approx(
        {"repeated_3gram": (100 * 4 / 7) / 3, "distinct_2": (100 * 3 / 8 + 200) / 3}
    )
    with pytest.raises(ValueError, match="at least one"):
        evaluation.repetition([])


def test_summarization_metric_reports_repetition_beside_rouge():
    got = evaluation.summarization_metric(["a b c a b c a b c"], [{"target": "a b c"}])
    assert set(got) == {*evaluation.ROUGE_TYPES, "repeated_3gram", "distinct_2"}
    assert got["repeated_3gram"] == pytest.approx(100 * 4 / 7)


def test_metrics_refuse_mismatched_or_empty_inputs():
    with pytest.raises(ValueError, match="2 vs 1"):
        evaluation.rouge(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="0 vs 0"):
        evaluation.exact_match([], [])


def test_exact_match_scores_final_answers_with_the_task_scorer(chain_sum):
    examples = [chain_sum[i] for i in range(4)]
    wrong = [f"{e['target']}\n#### {int(e['answer']) + 1}" for e in examples]  # last #### wins
    assert evaluation.exact_match([e["target"] for e in examples], examples) == {
        "exact_match": 100.0,
        "answered": 100.0,
    }
    assert evaluation.exact_match(wrong, examples) == {"exact_match": 0.0, "answered": 100.0}
    one_right = [examples[0]["target"], "The answer is 5.", *wrong[2:]]
    assert evaluation.exact_match(one_right, examples) == {"exact_match": 25.0, "answered": 75.0}


def test_metrics_are_named_by_task_kind():
    assert evaluation.resolve_metric("math") is evaluation.exact_match
    summarize = evaluation.resolve_metric("summarization")
    assert summarize(["a b c"], [{"target": "a b c"}])["rougeL"] == pytest.approx(100.0)
    custom = lambda predictions, examples: {"n": len(predictions)}
    assert evaluation.resolve_metric(custom) is custom
    with pytest.raises(config.ConfigError, match="translation.*math.*summarization"):
        evaluation.resolve_metric("translation")


# ----------------------------------------------------------------------------- evaluate


def test_padded_chunks_keep_order_and_fill_the_last_batch():
    chunks = evaluation.padded_chunks(10, 4)
    assert [c.tolist() for c in chunks] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 9, 9]]
    assert [c.tolist() for c in evaluation.padded_chunks(4, 4)] == [[0, 1, 2, 3]]


def test_evaluate_scores_reference_answers_perfectly_with_one_batch_shape(chain_sum, tokenizer):
    examples = [chain_sum[i] for i in range(10)]
    sampler = ReferenceSampler(tokenizer, examples)
    result = evaluation.evaluate(sampler, chain_sum, tokenizer, math_spec(4), "math", 10)
    assert result.metrics == {"exact_match": 100.0, "answered": 100.0}
    assert result.num_examples == 10 and result.seconds > 0.0
    assert sampler.shapes == [((4, 160), (4, 160))] * 3, "the last batch is padded to full size"


def test_evaluate_drops_padded_rows_and_keeps_example_order(chain_sum, tokenizer):
    examples = [chain_sum[i] for i in range(7)]
    right = {examples[i]["index"] for i in (0, 6)}  # 6 is the last, repeated in the padding

    def answer(example):
        return example["target"] if example["index"] in right else "#### nothing"

    sampler = ReferenceSampler(tokenizer, examples, answer)
    seen = []
    record = lambda predictions, exs: seen.append((predictions, exs)) or {"n": len(predictions)}
    result = evaluation.evaluate(sampler, examples, tokenizer, math_spec(4), record)
    assert result.metrics == {"n": 7} and result.num_examples == 7
    (predictions, scored), expected = seen[0], [answer(e) for e in examples]
    assert predictions == expected and list(scored) == examples
    math = evaluation.evaluate(sampler, examples, tokenizer, math_spec(4), "math")
    assert math.metrics["exact_match"] == pytest.approx(100 * 2 / 7)  # not 5/8 with padding


def test_evaluate_returns_samples_of_the_first_examples(chain_sum, tokenizer):
    examples = [chain_sum[i] for i in range(5)]
    sampler = ReferenceSampler(tokenizer, examples, lambda e: f"guess for {e['index']}")
    result = evaluation.evaluate(
        sampler, chain_sum, tokenizer, math_spec(2), "math", max_examples=5, num_samples=2
    )
    assert result.samples == tuple(
        evaluation.Sample(e["input"], f"guess for {e['index']}", e["target"]) for e in examples[:2]
    )
    assert result.metrics == {"exact_match": 0.0, "answered": 0.0}


def test_evaluate_summarization_gives_rouge(tokenizer):
    examples = [
        {"input": f"In this paper , we study topic {i} .", "target": f"We study topic {i} ."}
        for i in range(3)
    ]
    spec = data.BatchSpec(2, prompt_len=96, target_len=16, template=data.SUMMARIZE_PAPER)
    result = evaluation.evaluate(
        ReferenceSampler(tokenizer, examples), examples, tokenizer, spec, "summarization"
    )
    assert result.metrics == pytest.approx(
        {
            "rouge1": 100.0,
            "rouge2": 100.0,
            "rougeL": 100.0,
            "repeated_3gram": 0.0,
            "distinct_2": 100.0,
        }
    )


def test_evaluate_refuses_a_sampler_that_drops_rows(chain_sum, tokenizer):
    short = lambda prompt_BxP, prompt_valid_BxP: ["#### 1"] * (len(prompt_BxP) - 1)
    with pytest.raises(ValueError, match="3 completions for 4 rows"):
        evaluation.evaluate(short, chain_sum, tokenizer, math_spec(4), "math", max_examples=4)
    with pytest.raises(ValueError, match="no examples"):
        evaluation.evaluate(short, chain_sum, tokenizer, math_spec(4), "math", max_examples=0)
