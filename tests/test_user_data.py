"""A user's own data and metrics: JSONL, JSON, CSV, Parquet and `datasets` folders read
through `load_split` into array_record, a chat messages column, rebuilds on edit, the
one-line errors, sacrebleu's BLEU and chrF, and a metric imported by path."""

import csv
import json
import os
import pathlib
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sacrebleu

from experiments import gkd_user_data
from opd_jax import config, data, evaluation, recipe

ROWS = [{"question": f"Question {i}?", "answer": f"Answer {i}.", "n": i} for i in range(5)]
PAIRS = sorted((r["question"], r["answer"]) for r in ROWS)
CONVERSATIONS = [
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ],
    [
        {"role": "user", "content": "Hi."},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Capital of Italy?"},
        {"role": "assistant", "content": "Rome."},
    ],
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_json(path, rows):
    path.write_text(json.dumps(rows))
    return path


def write_json_lines_as_json(path, rows):
    """What `datasets`' to_json writes: one object per line in a .json file."""
    return write_jsonl(path, rows)


def write_csv(path, rows):
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_saved_dataset(path, rows):
    import datasets as hf_datasets

    hf_datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


def examples(split):
    return [split[i] for i in range(len(split))]


def pairs(split):
    return sorted((e["input"], e["target"]) for e in examples(split))


@pytest.mark.parametrize(
    ("write", "name"),
    [
        (write_jsonl, "d.jsonl"),
        (write_json, "d.json"),
        (write_json_lines_as_json, "d.json"),
        (write_csv, "d.csv"),
        (write_parquet, "d.parquet"),
        (write_saved_dataset, "saved"),
    ],
    ids=["jsonl", "json", "json-lines", "csv", "parquet", "save_to_disk"],
)
def test_each_format_loads_its_rows_through_load_split(tmp_path, write, name):
    path = write(tmp_path / name, ROWS)
    split = data.load_split(str(path), "train", tmp_path / "tfds", "question", "answer")
    assert pairs(split) == PAIRS
    assert sorted(e["n"] for e in examples(split)) == ["0", "1", "2", "3", "4"]  # as text
    assert split.files[0].startswith(str(tmp_path / "tfds" / "user_files"))
    assert ".array_record" in split.files[0]


def test_saved_dataset_dict_keeps_its_splits(tmp_path):
    import datasets as hf_datasets

    saved = hf_datasets.DatasetDict(
        {
            "train": hf_datasets.Dataset.from_list(ROWS[:3]),
            "test": hf_datasets.Dataset.from_list(ROWS[3:]),
        }
    )
    saved.save_to_disk(str(tmp_path / "saved"))
    load = lambda s: data.load_split(str(tmp_path / "saved"), s, tmp_path, "question", "answer")
    assert pairs(load("train")) == PAIRS[:3]
    assert pairs(load("test")) == PAIRS[3:]


def test_splits_from_a_mapping_of_globs_and_files(tmp_path):
    for i in (0, 1):
        write_jsonl(tmp_path / f"train-{i}.jsonl", ROWS[2 * i : 2 * i + 2])
    write_csv(tmp_path / "test.csv", ROWS[4:])
    files = {"train": str(tmp_path / "train-*.jsonl"), "test": str(tmp_path / "test.csv")}
    load = lambda s: data.load_split(files, s, tmp_path / "tfds", "question", "answer")
    assert pairs(load("train")) == PAIRS[:4]
    assert pairs(load("test")) == PAIRS[4:]


def test_one_file_is_sliced_into_disjoint_splits(tmp_path):
    path = str(write_jsonl(tmp_path / "d.jsonl", ROWS))
    slices = ["train[:60%]", "train[60%:80%]", "train[80%:]"]
    loaded = [pairs(data.load_split(path, s, tmp_path, "question", "answer")) for s in slices]
    assert [len(p) for p in loaded] == [3, 1, 1]
    assert sorted(sum(loaded, [])) == PAIRS


def test_an_edited_file_is_built_anew_and_an_unchanged_one_read_back(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    load = lambda: data.load_split(str(path), "train", tmp_path, "question", "answer")
    first = load()
    assert load().files == first.files
    write_jsonl(path, [{**ROWS[0], "answer": "Edited."}])
    edited = load()
    assert edited.files != first.files
    assert pairs(edited) == [(ROWS[0]["question"], "Edited.")]


def test_messages_column_makes_input_target_and_history(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in CONVERSATIONS])
    split = data.load_split(str(path), "train", tmp_path, messages_key="messages")
    by_target = {e["target"]: e for e in examples(split)}
    assert sorted(by_target) == ["Paris.", "Rome."]
    assert by_target["Paris."]["input"] == "Capital of France?"
    assert json.loads(by_target["Paris."]["history"]) == CONVERSATIONS[0][:1]
    assert json.loads(by_target["Rome."]["history"]) == CONVERSATIONS[1][:2]
    assert json.loads(by_target["Rome."]["messages"]) == CONVERSATIONS[1]

    template = data.PromptTemplate("{input}", conversation=True)
    assert data.prompt_turns(by_target["Rome."], template) == CONVERSATIONS[1][:3]
    assert data.prompt_turns(by_target["Paris."], template) == CONVERSATIONS[0][:2]
    replaced = data.PromptTemplate("Answer: {input}", system="Be exact.", conversation=True)
    assert data.prompt_turns(by_target["Paris."], replaced) == [
        {"role": "system", "content": "Be exact."},
        {"role": "user", "content": "Answer: Capital of France?"},
    ]


def test_messages_in_a_csv_cell_and_a_parquet_list(tmp_path):
    rows = [{"id": str(i), "messages": m} for i, m in enumerate(CONVERSATIONS)]
    write_csv(tmp_path / "chat.csv", [{**r, "messages": json.dumps(r["messages"])} for r in rows])
    write_parquet(tmp_path / "chat.parquet", rows)
    for name in ("chat.csv", "chat.parquet"):
        split = data.load_split(str(tmp_path / name), "train", tmp_path, messages_key="messages")
        assert sorted(e["target"] for e in examples(split)) == ["Paris.", "Rome."]


def test_task_reads_user_files_with_its_prompt_and_metric(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in CONVERSATIONS])
    task = recipe.Task(
        dataset=str(path),
        train_split="train",
        eval_split="train",
        test_split="train",
        messages_key="messages",
        metric="exact_match",
        primary_metric="exact_match",
        data_dir=str(tmp_path / "tfds"),
    )
    splits = task.splits()
    assert [len(s) for s in splits.values()] == [2, 2, 2]
    assert task.template() == data.PromptTemplate("{input}", conversation=True)
    example = splits["test"][0]
    assert task.reward(f" {example['target'].lower()} ", example) == 1.0
    assert task.reward("Madrid", example) == 0.0


def test_the_example_experiment_reads_its_data_file(tmp_path, monkeypatch):
    monkeypatch.chdir(pathlib.Path(gkd_user_data.__file__).parents[1])  # paths are relative
    monkeypatch.setenv("OPD_JAX_DATA", str(tmp_path))
    config.apply_gin([str(gkd_user_data.GIN_FILE)], [])
    task = recipe.Task()
    splits = task.splits()
    assert [len(s) for s in splits.values()] == [24, 8, 8]
    example = splits["test"][0]
    assert task.template().instruction.format_map(example).startswith("What is the capital of")
    assert task.reward(example["target"], example) == 1.0


# ----------------------------------------------------------------------------- errors


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(data.MissingDatasetError, match=f"no such file or folder: {missing}$"):
        data.load_split(str(missing), "train", tmp_path, "question", "answer")
    with pytest.raises(data.MissingDatasetError, match="no file matches .*nope-\\*.jsonl"):
        data.load_split(str(tmp_path / "nope-*.jsonl"), "train", tmp_path, "q", "a")


def test_missing_field_names_it_and_lists_the_columns(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    expected = (
        f"target_key 'summary' is not a column of {path}; its columns: ['question', 'answer', 'n']"
    )
    with pytest.raises(data.MissingFieldError, match=re.escape(expected)):
        data.load_split(str(path), "train", tmp_path, "question", "summary")


def test_unknown_name_is_one_line_naming_where_it_looked(tmp_path):
    with pytest.raises(data.MissingDatasetError) as error:
        data.load_split("no_such_dataset", "train", tmp_path)
    message = str(error.value)
    where = os.path.abspath("no_such_dataset")
    assert message == (
        f"dataset 'no_such_dataset' is not prepared in {tmp_path}, and no data file or folder "
        f"{where} exists either"
    )
    assert error.value.__cause__ is None and error.value.__suppress_context__  # no catalogue
    assert isinstance(error.value, config.ConfigError)  # an entry point prints one line


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"question": "q", "answer": "a"}\n{"question": "q"}\n', "d.jsonl row 2 has no 'answer'"),
        ('{"question": "q", "answer": "a"}\n{"question": \n', "d.jsonl line 2: not valid JSON"),
        (
            '{"question": "q", "answer": "a"}\n[1, 2]\n',
            "d.jsonl line 2: a row must be a JSON object",
        ),
    ],
    ids=["missing-value", "bad-json", "not-an-object"],
)
def test_bad_row_is_named_by_file_and_row(tmp_path, content, expected):
    (tmp_path / "d.jsonl").write_text(content)
    with pytest.raises(data.DataError, match=re.escape(expected)):
        data.load_split(str(tmp_path / "d.jsonl"), "train", tmp_path, "question", "answer")


def test_bad_conversation_is_named_by_file_and_row(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATIONS[0][:2]}])
    with pytest.raises(data.DataError) as error:
        data.load_split(str(path), "train", tmp_path, messages_key="messages")
    assert str(error.value) == (
        f"{path} row 1: a conversation must end with a user turn and the assistant's reply, "
        "not ['system', 'user']"
    )


def test_messages_key_refuses_input_and_target_keys(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATIONS[0]}])
    with pytest.raises(data.DataError, match="leave input_key and target_key unset"):
        data.load_split(str(path), "train", tmp_path, "question", None, "messages")


def test_unknown_format_and_split_are_named(tmp_path):
    (tmp_path / "d.txt").write_text("Question 0?\n")
    formats = ".jsonl, .json, .csv, .parquet, .arrow"
    expected = f"{tmp_path / 'd.txt'}: unknown data format; use one of {formats}"
    with pytest.raises(data.DataError, match=re.escape(expected)):
        data.load_split(str(tmp_path / "d.txt"), "train", tmp_path, "question", "answer")
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    expected = (
        f"dataset '{path}': Unknown split 'validation'. Should be one of ['train']. "
        '(one path is the split "train": slice it, e.g. "train[:80%]")'
    )
    with pytest.raises(data.DataError, match=re.escape(expected)):
        data.load_split(str(path), "validation", tmp_path, "question", "answer")


def test_user_data_needs_an_instruction_with_input(tmp_path):
    task = recipe.Task(dataset=str(tmp_path / "d.jsonl"), input_key="question")
    with pytest.raises(config.ConfigError, match="Task.instruction: dataset .* has no default"):
        task.template()
    with pytest.raises(config.ConfigError, match=re.escape("must contain {input} exactly once")):
        data.PromptTemplate("Answer the question.")


# ----------------------------------------------------------------------------- metrics

HYPOTHESES = ["the cat sat on the mat", "a quick brown fox jumps", "hello world"]
REFERENCES = ["the cat is on the mat", "the quick brown fox jumped", "hello there world"]


def test_bleu_and_chrf_are_sacrebleus_corpus_scores():
    bleu = sacrebleu.corpus_bleu(HYPOTHESES, [REFERENCES]).score
    chrf = sacrebleu.corpus_chrf(HYPOTHESES, [REFERENCES]).score
    assert 0.0 < bleu < 100.0 and 0.0 < chrf < 100.0
    assert evaluation.bleu(HYPOTHESES, REFERENCES) == {"bleu": pytest.approx(bleu)}
    assert evaluation.chrf(HYPOTHESES, REFERENCES) == {"chrf": pytest.approx(chrf)}
    # One prediction alone (a reward) gets sentence BLEU: as a corpus it has no 4-gram match.
    assert sacrebleu.corpus_bleu(HYPOTHESES[2:], [REFERENCES[2:]]).score == 0.0
    one = sacrebleu.sentence_bleu(HYPOTHESES[2], [REFERENCES[2]]).score
    assert one > 0.0
    assert evaluation.bleu(HYPOTHESES[2:], REFERENCES[2:]) == {"bleu": pytest.approx(one)}


def test_metric_kinds_score_against_each_examples_target():
    examples = [{"target": r} for r in REFERENCES]
    scores = {
        kind: evaluation.resolve_metric(kind)(HYPOTHESES, examples)
        for kind in ("exact_match", "rouge", "bleu", "chrf")
    }
    assert scores["bleu"] == evaluation.bleu(HYPOTHESES, REFERENCES)
    assert scores["chrf"] == evaluation.chrf(HYPOTHESES, REFERENCES)
    assert scores["rouge"] == evaluation.rouge(HYPOTHESES, REFERENCES)
    assert scores["exact_match"] == {"exact_match": 0.0}
    same = evaluation.resolve_metric("exact_match")(
        ["  Paris ", "rome!"], [{"target": "paris."}, {"target": "Rome"}]
    )
    assert same == {"exact_match": 100.0}
    assert evaluation.text_exact_match(["Paris", "Pari s"], ["paris", "paris"]) == {
        "exact_match": 50.0
    }


def test_user_metric_by_import_path_scores_and_rewards():
    metric = evaluation.resolve_metric("user_metric:word_overlap")
    examples = [{"target": "a b"}, {"target": "c d"}]
    assert metric(["a b", "c x"], examples) == {"word_overlap": 75.0}
    task = recipe.Task(metric="user_metric:word_overlap", primary_metric="word_overlap")
    assert task.reward("a x", examples[0]) == 0.5


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (
            "no_such_module:score",
            "Task.metric: metric 'no_such_module:score': cannot import 'no_such_module': ModuleNotFoundError: No module named 'no_such_module'",
        ),
        (
            "user_metric:nope",
            "Task.metric: metric 'user_metric:nope': module 'user_metric' has no function 'nope'",
        ),
    ],
)
def test_bad_metric_path_is_one_line_at_start_up(path, expected):
    with pytest.raises(config.ConfigError) as error:
        recipe.Task(metric=path)
    assert str(error.value).splitlines()[0] == expected  # gin appends its own line


def test_user_metric_out_of_range_is_refused():
    metric = evaluation.resolve_metric("user_metric:out_of_range")
    with pytest.raises(
        ValueError, match=re.escape("'user_metric:out_of_range' returned {'score': 150.0}")
    ):
        metric(["a"], [{"target": "a"}])
