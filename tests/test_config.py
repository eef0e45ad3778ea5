"""gin flags: good bindings apply, bad ones fail in one line that names them."""

import re

import gin
import pytest
from test_validation import build_all

from experiments import gkd_arithmetic, gkd_summarize, opsd_math, opsd_rule
from experiments import study as study_entry
from opd_jax import config


@gin.configurable
def _toy_configurable(rate: float = 0.1, name: str = "a") -> tuple[float, str]:
    return rate, name


def test_bindings_apply_in_order(tmp_path):
    gin_file = tmp_path / "base.gin"
    gin_file.write_text("_toy_configurable.rate = 0.5\n_toy_configurable.name = 'file'\n")
    config.apply_gin([str(gin_file)], ["_toy_configurable.name = 'flag'"])
    assert _toy_configurable() == (0.5, "flag")


@pytest.mark.parametrize(
    "binding",
    ["_toy_configurable.no_such_arg = 1", "no_such_scope.rate = 1", "_toy_configurable.rate = ("],
)
def test_bad_binding_is_one_line_naming_it(binding):
    with pytest.raises(config.ConfigError) as info:
        config.apply_gin([], [binding])
    message = str(info.value)
    assert message.startswith(f"--gin_param '{binding}': ")
    assert "\n" not in message


def test_missing_gin_file_is_named(tmp_path):
    with pytest.raises(config.ConfigError, match=f"--gin_file {tmp_path}/x.gin: no such file"):
        config.apply_gin([str(tmp_path / "x.gin")], [])


def test_parse_exits_with_one_line(capsys):
    with pytest.raises(SystemExit) as info:
        config.parse("test", ["--gin_param", "_toy_configurable.nope = 2"])
    assert str(info.value).startswith("error: --gin_param '_toy_configurable.nope = 2': ")


def test_operative_config_records_used_bindings(tmp_path):
    config.apply_gin([], ["_toy_configurable.rate = 0.25"])
    _toy_configurable()
    text = config.save_operative_config(tmp_path).read_text()
    assert "_toy_configurable.rate = 0.25" in text


@pytest.mark.parametrize(
    "module, build",
    [
        (gkd_summarize, build_all),
        (gkd_arithmetic, build_all),
        (opsd_math, build_all),
        (opsd_rule, build_all),
        (study_entry, study_entry.settings),
    ],
    ids=lambda x: getattr(x, "__name__", ""),
)
def test_every_binding_help_shows_is_real(module, build):
    """`--help` of each entry point: its own example and the flag's both apply to its gin
    file and build every config."""
    text = config.flag_parser(module.__doc__).format_help()
    shown = re.findall(r"'(\w+\.\w+ ?=[^']+)'", text)
    assert len(shown) == 2, shown
    config.apply_gin([str(module.GIN_FILE)], shown)
    build()
