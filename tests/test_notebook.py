"""The Colab notebook: its helpers, its fetch cell on an uploaded archive, and (slow) the
whole notebook executed on CPU from this checkout: the tiny run, then
experiments/configs/accelerator.gin at reduced sizes."""

import pathlib
import shutil
import sys

import nbclient
import nbformat
import pytest

from experiments import gkd_arithmetic, gkd_summarize
from notebooks import colab
from opd_jax import config, distill, recipe, train_state

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "colab_tpu.ipynb"
CELLS = ["parameters", "fetch", "install", "tiny", "accelerator", "results"]


def _notebook(overrides: dict[str, object], upto: str | None = None) -> nbformat.NotebookNode:
    """The notebook with `overrides` assigned after its parameters cell (as papermill
    does), cut after the cell tagged `upto`."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    tags = [c.metadata.get("tags", [None])[0] for c in nb.cells]
    injected = nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in overrides.items()))
    nb.cells.insert(tags.index("parameters") + 1, injected)
    if upto is not None:
        del nb.cells[tags.index(upto) + 2 :]
    return nb


def _execute(nb: nbformat.NotebookNode, cwd: pathlib.Path, timeout: int = 60) -> str:
    """Runs every cell in a fresh kernel; returns all the text the cells printed."""
    client = nbclient.NotebookClient(
        nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}
    )
    client.execute()
    return "".join(
        out.get("text", "") + out.get("data", {}).get("text/markdown", "")
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.outputs
    )


def test_notebook_is_valid_and_its_cells_are_tagged():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.metadata["tags"][0] for c in code] == CELLS
    for cell in code:
        compile(cell.source, cell.metadata["tags"][0], "exec")
        assert not cell.outputs, "the notebook is stored without outputs"


def test_helpers_pick_jax_batches_and_runs_dir(tmp_path, capsys):
    jax_pin = next(
        line for line in (ROOT / "requirements.txt").read_text().splitlines() if "jax==" in line
    )
    version = jax_pin.removeprefix("jax==")
    requirements = ROOT / "requirements.txt"
    assert colab.jax_requirement("tpu", requirements) == [f"jax[tpu]=={version}"]
    assert colab.jax_requirement("gpu", requirements) == [f"jax[cuda12]=={version}"]
    assert colab.jax_requirement("cpu", requirements) == []
    with pytest.raises(colab.NotebookError, match="ACCELERATOR='tpu7'"):
        colab.jax_requirement("tpu7", requirements)
    install = colab.install_command("tpu", ROOT)
    assert install[-3:] == ["-r", str(requirements), f"jax[tpu]=={version}"]
    with pytest.raises(colab.NotebookError, match="no requirements.txt"):
        colab.install_command("cpu", tmp_path)

    assert "Schedule.batch_size = 2" in colab.tiny_params(1)
    assert "Schedule.batch_size = 8" in colab.tiny_params(8)  # a v2-8 runtime's 8 devices

    assert colab.runs_dir(tmp_path / "runs", on_drive=True) == tmp_path / "runs"
    assert "not on Colab" in capsys.readouterr().out

    colab.run([sys.executable, "-c", "print('streamed')"])
    assert "streamed" in capsys.readouterr().out
    with pytest.raises(colab.NotebookError, match="exited with 3"):
        colab.run([sys.executable, "-c", "raise SystemExit(3)"])


def test_accelerator_is_detected_from_the_runtimes_devices(monkeypatch):
    def runtime(nvidia_smi: bool, devices: list[str]) -> str:
        monkeypatch.setattr(colab.shutil, "which", lambda name: "/bin/x" if nvidia_smi else None)
        monkeypatch.setattr(
            colab.glob, "glob", lambda pattern: devices if "accel" in pattern else []
        )
        return colab.detect_accelerator()

    assert runtime(True, []) == "gpu"
    assert runtime(False, ["/dev/accel0"]) == "tpu"
    assert runtime(False, []) == "cpu"


def test_fetch_cell_unpacks_an_uploaded_archive(tmp_path):
    # A GitHub "Download ZIP": one top folder holding the checkout.
    folder = tmp_path / "upload" / "opd-jax-main"
    (folder / "notebooks").mkdir(parents=True)
    shutil.copy(ROOT / "requirements.txt", folder)
    shutil.copy(ROOT / "notebooks" / "colab.py", folder / "notebooks")
    archive = shutil.make_archive(str(tmp_path / "opd-jax"), "zip", folder.parent)
    checkout = tmp_path / "checkout"
    check = nbformat.v4.new_code_cell("print('cwd', os.getcwd(), colab.__file__)")
    nb = _notebook({"SOURCE": archive, "CHECKOUT": str(checkout)}, upto="fetch")
    nb.cells.append(nbformat.v4.new_code_cell("from notebooks import colab"))
    nb.cells.append(check)
    out = _execute(nb, tmp_path)
    assert f"cwd {checkout} {checkout / 'notebooks' / 'colab.py'}" in out

    again = _execute(_notebook({"SOURCE": archive, "CHECKOUT": str(checkout)}, "fetch"), tmp_path)
    assert f"using the code already in {checkout}" in again

    missing = _notebook({"SOURCE": str(tmp_path / "none.zip"), "CHECKOUT": str(tmp_path / "x")})
    with pytest.raises(nbclient.exceptions.CellExecutionError, match="set REPO_URL"):
        _execute(missing, tmp_path)


@pytest.mark.parametrize("module", [gkd_summarize, gkd_arithmetic], ids=["summarize", "arithmetic"])
def test_accelerator_config_applies_over_each_experiment(module):
    config.apply_gin([str(module.GIN_FILE), str(ROOT / colab.ACCELERATOR_GIN)], [])
    schedule, models = recipe.Schedule(), recipe.Models()
    assert (schedule.steps, schedule.prompt_len, schedule.test_examples) == (2000, 1024, None)
    assert (models.student_layers, models.teacher_sft_steps) == (15, 1000)
    assert distill.DistillConfig().vocab_chunk == 256
    assert train_state.OptimizerConfig().warmup_steps == 100


# accelerator.gin as it is, but for steps and sizes small enough for a CPU.
REDUCED = [
    "Models.teacher_sft_steps = 1",
    "Models.student_sft_steps = 1",
    "Schedule.steps = 1",
    "Schedule.batch_size = 2",
    "Schedule.prompt_len = 64",
    "Schedule.completion_len = 6",
    "Schedule.checkpoint_every = 1",
    "Schedule.eval_every = 1",
    "Schedule.eval_examples = 2",
    "Schedule.test_examples = 2",
    "Schedule.eval_batch_size = 2",
]


@pytest.mark.slow
def test_notebook_runs_end_to_end_on_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # the install cell checks, offline
    runs = tmp_path / "runs"
    overrides = {
        "SOURCE": str(ROOT),  # this checkout, as an uploaded folder
        "CHECKOUT": str(tmp_path / "unused"),
        "ACCELERATOR": "cpu",
        "RUNS_DIR": str(runs),
        "WORKDIR_ON_DRIVE": True,  # skipped outside Colab, with a note
        "ACCELERATOR_PARAMS": REDUCED,
    }
    out = _execute(_notebook(overrides), tmp_path, timeout=900)
    assert "accelerator: cpu" in out and "not on Colab" in out
    for run in ("gkd_summarize_tiny", "gkd_summarize_accelerator"):
        assert (runs / run / "results.json").exists(), run
    operative = (runs / "gkd_summarize_accelerator" / "operative_config.gin").read_text()
    assert "DistillConfig.vocab_chunk = 256" in operative  # from accelerator.gin
    assert "Models.student_layers = 15" in operative
    assert "| student after distillation |" in out
