"""The data pipeline on real TFDS builds: ACLSum from its wheel, reasoning-gym tasks, a
dataset prepared elsewhere, and batches through a real byte-level BPE tokenizer."""

import dataclasses
import json
import re
import shutil

import grain
import numpy as np
import pytest
import reasoning_gym
import tensorflow_datasets as tfds
import tokenizers

from opd_jax import data, datasets
from opd_jax.datasets import aclsum

SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "Summarize the following scientific paper in three sentences.",
    "Solve the following problem step by step and end with the answer.",
    "In this paper , we propose a method for neural machine translation .",
    "The results show that our approach outperforms the baseline by 20 % .",
    "There are 12 students playing basketball and 24 playing volleyball.",
    "12 + 7 = 19\n19 - 4 = 15\n#### 15",
]


class TinyTokenizer:
    """A real byte-level BPE trained on a few sentences, behind the project's interface."""

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
def data_dir(tmp_path_factory):
    """One build of our datasets shared by the tests that only read them."""
    return tmp_path_factory.mktemp("tfds")


def shipped_rows(split: str) -> dict[str, dict]:
    with aclsum.aclsum_file(split).open(encoding="utf-8") as f:
        return {row["id"]: row for row in map(json.loads, f)}


def tiny_config(name: str, seed: int) -> datasets.ReasoningGymConfig:
    return datasets.ReasoningGymConfig(
        name=name, seed=seed, train_size=12, validation_size=4, test_size=6
    )


def build(config: datasets.ReasoningGymConfig, data_dir) -> None:
    datasets.GsmSymbolic(config=config, data_dir=str(data_dir)).download_and_prepare()


def by_index(split: data.Split) -> dict[int, dict]:
    return {e["index"]: e for e in (split[i] for i in range(len(split)))}


# ----------------------------------------------------------------------------- builders


@pytest.mark.parametrize(("split", "count"), [("train", 100), ("validation", 50), ("test", 100)])
def test_aclsum_reads_back_every_shipped_paper(data_dir, split, count):
    loaded = data.load_split("aclsum", split, data_dir)
    rows = shipped_rows(split)
    examples = {e["id"]: e for e in (loaded[i] for i in range(len(loaded)))}
    assert len(loaded) == len(rows) == count
    assert examples.keys() == rows.keys()
    for paper_id in sorted(rows)[:3]:
        row, example = rows[paper_id], examples[paper_id]
        assert example["title"] == row["title"]
        assert example["abstract"] == " ".join(row["sentences"]["abstract"])
        assert example["conclusion"] == " ".join(row["sentences"]["conclusion"])
        assert example["document"].startswith(example["abstract"] + "\n\n")
        assert example["document"].endswith(example["conclusion"])
        aspects = [row["summary"][a] for a in ("challenge", "approach", "outcome")]
        assert example["summary"] == " ".join(aspects)
        assert (example["input"], example["target"]) == (example["document"], example["summary"])
    assert list(data_dir.glob("aclsum/1.0.0/aclsum-*.array_record-*")), "written under data_dir"


def test_gsm_symbolic_reads_back_the_generator_output(tmp_path):
    config = tiny_config("tiny", seed=0)
    build(config, tmp_path)
    stream = reasoning_gym.create_dataset("gsm_symbolic", seed=config.task_seed, size=22)
    seen = set()
    for split, size in [("train", 12), ("validation", 4), ("test", 6)]:
        examples = by_index(data.load_split("gsm_symbolic/tiny", split, tmp_path))
        assert len(examples) == size
        assert set(examples) == set(config.split_ranges()[split])
        seen |= set(examples)
        for index in sorted(examples)[:3]:
            example, item = examples[index], stream[index]
            assert example["question"] == item["question"]
            assert example["answer"] == item["answer"]
            *body, last = example["solution"].splitlines()
            assert body == item["metadata"]["answer_cot"].strip().splitlines()[:-1]
            assert last == f"#### {item['answer']}"
    assert seen == set(range(22)), "splits are disjoint and cover the stream"


@pytest.mark.parametrize("task", ["gsm_symbolic", "chain_sum"])
def test_gsm_symbolic_same_seed_same_data_other_seed_other_data(tmp_path, task):
    def questions(seed, where):
        config = dataclasses.replace(tiny_config(f"s{seed}", seed), task=task)
        build(config, where)
        split = data.load_split(f"gsm_symbolic/{config.name}", "train", where)
        return [e["question"] for _, e in sorted(by_index(split).items())]

    first = questions(0, tmp_path / "a")
    again = questions(0, tmp_path / "b")
    other = questions(1, tmp_path / "a")  # reasoning-gym alone would shift seed 0's stream
    assert first == again
    assert len(set(first) & set(other)) <= 1


def test_chain_sum_solutions_are_correct_running_totals(data_dir):
    loaded = data.load_split("gsm_symbolic/chain_sum", "validation", data_dir)
    assert len(loaded) == 200
    for example in (loaded[i] for i in range(20)):
        expression = example["question"].rsplit(":", 1)[1].rstrip(" =")
        *steps, last = example["solution"].splitlines()
        assert last == f"#### {example['answer']}"
        assert int(example["answer"]) == eval(expression)  # only digits, + and -
        for step in steps:
            lhs, rhs = step.split(" = ")
            assert eval(lhs) == int(rhs)
        assert steps[-1].endswith(f"= {example['answer']}")


@pytest.mark.parametrize("name", ["gsm_symbolic", "gsm_symbolic/chain_sum"])
def test_score_answer_is_one_for_the_reference_and_zero_otherwise(data_dir, name):
    example = data.load_split(name, "test", data_dir)[0]
    wrong = str(int(example["answer"]) + 1)
    assert datasets.score_answer(example["solution"], example) == 1.0
    assert datasets.score_answer(f"so the total is\n#### {example['answer']}\n", example) == 1.0
    assert datasets.score_answer(f"#### {wrong}", example) == 0.0
    assert datasets.score_answer(f"the answer is {example['answer']}", example) == 0.0  # no ####
    raw = reasoning_gym.get_score_answer_fn(example["task"])(wrong, {"answer": example["answer"]})
    assert raw < 1.0


# ----------------------------------------------------------------------------- loading


class ToyNews(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Stands in for a dataset prepared elsewhere (xsum, cnn_dailymail): its code is not
    registered, so it can only be found through its files."""

    VERSION = tfds.core.Version("1.0.0")
    code_path = None

    def _info(self):
        text = tfds.features.Text()
        features = tfds.features.FeaturesDict({"article": text, "highlights": text})
        return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
        return {"test": self._generate_examples()}

    def _generate_examples(self):
        for i in range(5):
            yield i, {"article": f"Article {i} about the news.", "highlights": f"News {i}."}


def test_load_split_reads_any_prepared_dataset_by_name_and_keys(tmp_path):
    ToyNews(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    loaded = data.load_split("toy_news", "test", tmp_path, "article", "highlights")
    pairs = sorted((e["input"], e["target"]) for e in (loaded[i] for i in range(len(loaded))))
    assert pairs == [(f"Article {i} about the news.", f"News {i}.") for i in range(5)]
    with pytest.raises(data.MissingFieldError, match="summary.*article"):
        data.load_split("toy_news", "test", tmp_path, "article", "summary")


def test_default_data_dir_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("OPD_JAX_DATA", str(tmp_path))
    assert datasets.default_data_dir() == tmp_path
    assert len(data.load_split("gsm_symbolic/chain_sum", "validation")) == 200
    assert list(tmp_path.glob("gsm_symbolic/chain_sum/1.0.0/*-validation.array_record-*"))


def test_grain_reads_a_split(data_dir):
    loaded = data.load_split("aclsum", "validation", data_dir)
    dataset = grain.MapDataset.source(loaded)
    assert len(dataset) == 50
    assert dataset[7] == loaded[7]


@pytest.mark.parametrize("name", ["xsum", "cnn_dailymail/3.4.0", "no_such_dataset"])
def test_missing_dataset_names_it_and_the_data_dir(tmp_path, name):
    with pytest.raises(data.MissingDatasetError) as error:
        data.load_split(name, "test", tmp_path, "document", "summary")
    assert name in str(error.value) and str(tmp_path) in str(error.value)


def corrupt_missing(path):
    path.unlink()


def corrupt_garbage(path):
    path.write_bytes(b"not an array_record file")


def corrupt_truncated(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def corrupt_first_block_only(path):
    """Decodes to records with every field None rather than raising."""
    path.write_bytes(path.read_bytes()[: 1 << 16])


@pytest.mark.parametrize(
    "corrupt", [corrupt_missing, corrupt_garbage, corrupt_truncated, corrupt_first_block_only]
)
def test_broken_data_file_is_reported_by_name(data_dir, tmp_path, corrupt):
    data.load_builder("aclsum", data_dir)
    shutil.copytree(data_dir / "aclsum", tmp_path / "aclsum")
    (shard,) = (tmp_path / "aclsum" / "1.0.0").glob("aclsum-validation.array_record-*")
    corrupt(shard)
    with pytest.raises(data.CorruptDatasetError, match=re.escape(str(shard))):
        data.load_split("aclsum", "validation", tmp_path)
    assert len(data.load_split("aclsum", "test", tmp_path)) == 100, "other splits still load"


def test_broken_metadata_is_reported(data_dir, tmp_path):
    data.load_builder("aclsum", data_dir)
    shutil.copytree(data_dir / "aclsum", tmp_path / "aclsum")
    (tmp_path / "aclsum" / "1.0.0" / "dataset_info.json").write_text("{not json")
    with pytest.raises(data.CorruptDatasetError, match="'aclsum'.*bad metadata"):
        data.load_split("aclsum", "test", tmp_path)


# ----------------------------------------------------------------------------- batches


def spec(template=data.SOLVE_MATH, batch_size=4, prompt_len=192, target_len=48):
    return data.BatchSpec(batch_size, prompt_len, target_len, template)


def test_batch_shapes_padding_and_eos(data_dir, tokenizer):
    split = data.load_split("gsm_symbolic/chain_sum", "train", data_dir)
    batch = data.batch_at(split, tokenizer, spec(), seed=0, step=0)
    assert batch.prompt_BxP.shape == batch.prompt_valid_BxP.shape == (4, 192)
    assert batch.target_BxN.shape == batch.target_valid_BxN.shape == (4, 48)
    assert batch.prompt_BxP.dtype == batch.target_BxN.dtype == np.int32
    assert batch.prompt_valid_BxP.dtype == batch.target_valid_BxN.dtype == bool
    for b, example in enumerate(batch.examples):
        prompt = tokenizer.encode(data.render_prompt(example, data.SOLVE_MATH, tokenizer))
        target = tokenizer.encode(example["target"])
        pad = 192 - len(prompt)
        assert pad > 0
        assert batch.prompt_valid_BxP[b].tolist() == [False] * pad + [True] * len(prompt)
        assert batch.prompt_BxP[b, pad:].tolist() == prompt
        assert (batch.prompt_BxP[b, :pad] == tokenizer.pad_id).all()
        assert batch.target_BxN[b, : len(target) + 1].tolist() == [*target, tokenizer.eos_id]
        assert batch.target_valid_BxN[b].sum() == len(target) + 1
        assert (batch.target_BxN[b, len(target) + 1 :] == tokenizer.pad_id).all()
        generation_prompt = "<|im_end|>\n<|im_start|>assistant\n"
        assert tokenizer.decode(prompt).endswith(example["question"] + generation_prompt)
    assert [e["target"] for e in batch.examples] == [e["solution"] for e in batch.examples]


def test_long_target_is_cut_without_eos(data_dir, tokenizer):
    split = data.load_split("gsm_symbolic", "train", data_dir)
    batch = data.batch_at(split, tokenizer, spec(target_len=8), seed=0, step=0)
    for b, example in enumerate(batch.examples):
        assert batch.target_valid_BxN[b].all()
        assert batch.target_BxN[b].tolist() == tokenizer.encode(example["target"])[:8]
        assert tokenizer.eos_id not in batch.target_BxN[b]


def test_truncation_cuts_the_document_and_keeps_the_instruction(data_dir, tokenizer):
    split = data.load_split("aclsum", "test", data_dir)
    batch = data.batch_at(split, tokenizer, spec(data.SUMMARIZE_PAPER, 2, 80, 16), 0, 0)
    assert batch.prompt_valid_BxP.all(), "a long document fills the whole prompt"
    instruction = data.SUMMARIZE_PAPER.instruction.split("{input}")[0]
    for b, example in enumerate(batch.examples):
        text = tokenizer.decode(batch.prompt_BxP[b])
        head = f"<|im_start|>user\n{instruction}"
        tail = "<|im_end|>\n<|im_start|>assistant\n"
        assert text.startswith(head) and text.endswith(tail)
        kept = text[len(head) : -len(tail)]
        assert 0 < len(kept) < len(example["document"])
        assert example["document"].startswith(kept)
    with pytest.raises(ValueError, match="template alone"):
        data.encode_prompt(batch.examples[0], data.SUMMARIZE_PAPER, tokenizer, max_len=20)


def test_cut_prompts_are_counted_against_the_longest(data_dir, tokenizer):
    split = data.load_split("gsm_symbolic", "train", data_dir)
    lengths = [len(data.encode_prompt(split[i], data.SOLVE_MATH, tokenizer)) for i in range(3)]
    longest = max(lengths)
    assert data.count_cut_prompts(split, data.SOLVE_MATH, tokenizer, longest, sample=3) == (
        0,
        3,
        longest,
    )
    cut, looked_at, _ = data.count_cut_prompts(split, data.SOLVE_MATH, tokenizer, longest - 1, 3)
    assert (cut, looked_at) == (sum(n == longest for n in lengths), 3)


def test_plain_template_starts_with_bos(tokenizer):
    template = data.PromptTemplate("Q: {input}", chat=False)
    ids = data.encode_prompt({"input": "12 + 7"}, template, tokenizer, max_len=64)
    assert ids[0] == tokenizer.bos_id
    assert tokenizer.decode(ids[1:]) == "Q: 12 + 7\n\n"


def test_batch_at_step_is_a_function_of_seed_and_step(data_dir, tokenizer):
    split = data.load_split("gsm_symbolic/chain_sum", "validation", data_dir)
    steps_per_epoch = len(split) // 4  # 200 examples, 4 per batch
    resumed = [data.batch_at(split, tokenizer, spec(), seed=7, step=s) for s in (3, 4)]
    for step, batch in zip((3, 4), resumed, strict=True):
        fresh = data.batch_at(split, tokenizer, spec(), seed=7, step=step)
        assert np.array_equal(fresh.prompt_BxP, batch.prompt_BxP)
        assert np.array_equal(fresh.target_BxN, batch.target_BxN)
        assert fresh.examples == batch.examples
    assert not np.array_equal(resumed[0].indices_B, resumed[1].indices_B)

    epoch0 = [data.example_indices(s, 4, len(split), seed=7) for s in range(steps_per_epoch)]
    epoch1 = [data.example_indices(s, 4, len(split), seed=7) for s in range(50, 100)]
    assert sorted(np.concatenate(epoch0)) == list(range(200)), "each epoch visits every example"
    assert sorted(np.concatenate(epoch1)) == list(range(200))
    assert not np.array_equal(np.concatenate(epoch0), np.concatenate(epoch1))
    other_seed = data.example_indices(3, 4, len(split), seed=8)
    assert not np.array_equal(other_seed, resumed[0].indices_B)


def test_batch_at_rows_are_those_rows_of_the_whole_batch(data_dir, tokenizer):
    # A host of a multi-host run builds only its rows; they must be the whole batch's.
    split = data.load_split("gsm_symbolic/chain_sum", "validation", data_dir)
    whole = data.batch_at(split, tokenizer, spec(), seed=7, step=5)
    part = data.batch_at(split, tokenizer, spec(), seed=7, step=5, rows=slice(2, 4))
    assert np.array_equal(part.indices_B, whole.indices_B[2:4])
    assert np.array_equal(part.prompt_BxP, whole.prompt_BxP[2:4])
    assert np.array_equal(part.target_valid_BxN, whole.target_valid_BxN[2:4])
    assert part.examples == whole.examples[2:4]
