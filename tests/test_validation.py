"""Every gin-configurable setting is checked when its config is built: a bad value fails in
one line that names the binding and, for a choice, lists the valid values; an entry point
exits with that line."""

import dataclasses
import pathlib
import re
import sys
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

import opd_jax
from experiments import gkd_summarize
from opd_jax import (
    config,
    distill,
    fixes,
    gkd,
    lora,
    mesh,
    opsd,
    probe,
    recipe,
    study,
    train_state,
    validation,
)

# Every gin configurable of the package (a test below keeps the list complete).
CONFIGURABLES = [
    recipe.Task,
    recipe.Models,
    recipe.Schedule,
    recipe.RolloutSampling,
    distill.DistillConfig,
    gkd.MixtureConfig,
    fixes.ColdStart,
    fixes.PromptSelection,
    probe.TeacherProbe,
    opsd.PrivilegedContext,
    opsd.SelfTeacher,
    lora.LoraConfig,
    train_state.OptimizerConfig,
    mesh.Layout,
    mesh.make_mesh,
    study.Study,
]


def build_all() -> None:
    """Builds every configurable from the bindings gin holds."""
    for configurable in CONFIGURABLES:
        configurable()


def _error_of(binding: str) -> str:
    """The one-line error of building the configurable `binding` sets."""
    config.apply_gin([], [binding])
    name = binding.split(".")[0]
    configurable = next(c for c in CONFIGURABLES if c.__name__ == name)
    with pytest.raises((config.ConfigError, mesh.MeshError)) as err:
        configurable()
    return config.error_line(err.value)


def test_the_list_holds_every_configurable():
    pattern = re.compile(r"@gin\.configurable\n(?:@.*\n)*(?:class|def) (\w+)")
    package = pathlib.Path(opd_jax.__file__).parent
    defined = {name for path in package.rglob("*.py") for name in pattern.findall(path.read_text())}
    assert defined == {c.__name__ for c in CONFIGURABLES}


BAD_VALUES = {  # binding -> its one-line error (the README's table)
    'DistillConfig.divergence="kl"': (
        "DistillConfig.divergence='kl' is not one of forward_kl, reverse_kl, jsd"
    ),
    'Schedule.steps="ten"': "Schedule.steps='ten' must be an integer >= 1",
    "Schedule.eval_examples=0": "Schedule.eval_examples=0 must be an integer >= 1 or None",
    'Schedule.cut_prompts="cut"': "Schedule.cut_prompts='cut' is not one of warn, refuse",
    'Task.metric="rouge2"': (
        "Task.metric: unknown metric 'rouge2'; known: ['bleu', 'chrf', 'exact_match', 'math', "
        "'rouge', 'summarization'], or 'module:function'"
    ),
    'Models.use_lora="yes"': "Models.use_lora='yes' must be True or False",
    'Models.student_layers="two"': (
        "Models.student_layers='two' must be an integer, a tuple of integers or None"
    ),
    "Models.student_layers=0": "Models.student_layers=0 must be an integer >= 1",
    "MixtureConfig.on_policy_fraction=1.5": (
        "MixtureConfig.on_policy_fraction=1.5 must be a number in [0, 1]"
    ),
    "OptimizerConfig.learning_rate=0": "OptimizerConfig.learning_rate=0 must be a number > 0",
    "RolloutSampling.top_p=0": "RolloutSampling.top_p=0 must be a number in (0, 1]",
    'SelfTeacher.weights="frozen"': "SelfTeacher.weights='frozen' is not one of fixed, ema, live",
    "LoraConfig.targets=('q', 'query')": (
        "LoraConfig.targets=('q', 'query') must name one or more of q, k, v, o, gate, up, down"
    ),
    'make_mesh.shape="2,2,1"': (
        "make_mesh.shape='2,2,1' must be a tuple of integers ('data', 'fsdp', 'tensor')"
    ),
}


@pytest.mark.parametrize("binding", BAD_VALUES)
def test_a_bad_value_fails_in_one_line_naming_its_binding(binding):
    assert _error_of(binding) == BAD_VALUES[binding]


FIELDS = [
    (configurable, field.name)
    for configurable in CONFIGURABLES
    if dataclasses.is_dataclass(configurable)
    for field in dataclasses.fields(configurable)
]


@pytest.mark.parametrize(
    "configurable, field", FIELDS, ids=[f"{c.__name__}.{f}" for c, f in FIELDS]
)
def test_every_field_refuses_a_value_of_another_type(configurable, field):
    """A number where the field takes text, else text."""
    takes_text = "str" in str(typing.get_type_hints(configurable)[field])
    wrong = 3 if takes_text else "x"
    binding = f"{configurable.__name__}.{field}"
    message = _error_of(f"{binding}={wrong!r}".replace("'", '"'))
    assert message.startswith(f"{binding}={wrong!r} ")


@pytest.mark.parametrize(
    "binding, message",
    [
        ('Schedule.steps="ten"', BAD_VALUES['Schedule.steps="ten"']),
        ('DistillConfig.divergence="kl"', BAD_VALUES['DistillConfig.divergence="kl"']),
        ("Schedule.stepz=3", "--gin_param 'Schedule.stepz=3': Configurable 'Schedule' doesn't "),
        ("Shedule.steps=3", "--gin_param 'Shedule.steps=3': No configurable matching 'Shedule'"),
        (
            'Models.teacher="/no/such/dir"',
            "Models.teacher: /no/such/dir is not a packaged model name (gemma3-270m, "
            "smollm2-135m-instruct), a checkpoint directory (with config.json) or a GGUF file",
        ),
    ],
)
def test_an_entry_point_exits_with_the_line_and_writes_nothing(
    binding, message, tmp_path, monkeypatch
):
    monkeypatch.setattr(sys, "argv", ["gkd_summarize", f"--gin_param={binding}"])
    with pytest.raises(SystemExit) as exit_:
        recipe.main("test", gkd_summarize.GIN_FILE, str(tmp_path / "work"))
    assert str(exit_.value).startswith(f"error: {message}")
    assert "\n" not in str(exit_.value)
    assert not (tmp_path / "work").exists()


# ------------------------------------------------------------------------- helpers


@pytest.mark.parametrize(
    "hint, value, words",
    [
        (int | tuple[int, ...] | None, (1, "2"), "an integer, a tuple of integers or None"),
        (tuple[float, ...], [0.5], "a tuple of numbers"),
        (Mapping[str, Sequence[Any]], {"a": 1}, "a mapping of strings to sequences"),
        (bool, 1, "True or False"),
        (float, True, "a number"),
    ],
)
def test_types_are_checked_and_named(hint, value, words):
    @dataclasses.dataclass
    class Toy:
        field: hint

    with pytest.raises(config.ConfigError) as err:
        validation.check_types(Toy(value))
    assert str(err.value) == f"Toy.field={value!r} must be {words}"


def test_different_tokenizers_stop_the_run_in_one_line(tiny_teacher_dir, tmp_path, monkeypatch):
    models = ['Models.teacher="gemma3-270m"', f'Models.student="{tiny_teacher_dir}"']
    monkeypatch.setattr(sys, "argv", ["gkd_summarize", *(f"--gin_param={b}" for b in models)])
    with pytest.raises(SystemExit) as exit_:
        recipe.main("test", gkd_summarize.GIN_FILE, str(tmp_path / "work"))
    assert str(exit_.value) == (
        "error: teacher and student tokenizers differ (teacher vs student: 262144 vs 49152 "
        "tokens): distillation compares next-token distributions id by id, and "
        "cross-tokenizer distillation is not supported yet"
    )
    assert not (tmp_path / "work").exists()
