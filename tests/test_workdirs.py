"""Workdirs anywhere and fingerprinted: a `gs://` workdir keeps its scheme, a remote
workdir (an in-memory fsspec store standing in for one) receives every log, evaluation,
fingerprint and report file, a rerun with another setting is refused in one line without
touching anything, and `--restart` removes only what a run wrote."""

import json

import fsspec
import gin
import pytest
from etils import epath
from etils.epath import backend, gpath, register
from test_recipe import TINY, _run

from experiments import gkd_summarize
from opd_jax import config, loop, paths, recipe, reporting, study


class _MemoryBackend(backend._FileSystemSpecBackend):
    """epath's fsspec backend on fsspec's in-memory file system."""

    def fs(self, path: epath.PathLike) -> fsspec.AbstractFileSystem:
        return fsspec.filesystem("memory")


@pytest.fixture
def memory(monkeypatch):
    """`memory://` paths as epath builds `gs://` ones (a URI scheme with its own backend);
    yields the (emptied) in-memory file system."""
    monkeypatch.setattr(gpath, "_URI_PREFIXES", (*gpath._URI_PREFIXES, "memory://"))
    monkeypatch.setattr(gpath, "_URI_SCHEMES", gpath._URI_SCHEMES | {"memory"})
    monkeypatch.setitem(gpath._URI_MAP_ROOT, "memory://", "/memory/")
    monkeypatch.setitem(gpath._PREFIX_TO_BACKEND, "memory", _MemoryBackend())
    monkeypatch.setitem(register._URI_PREFIXES_TO_CLS, "memory://", gpath.PosixGPath)
    fs = fsspec.filesystem("memory")
    fs.store.clear()
    yield fs
    fs.store.clear()


class _StoppedError(Exception):
    """Raised where a restarted run would start writing."""


def _snapshot(fs: fsspec.AbstractFileSystem) -> dict[str, bytes]:
    return {name: file.getvalue() for name, file in fs.store.items()}


def test_a_gs_workdir_keeps_its_scheme():
    workdir = paths.as_path("gs://bucket/run")
    assert str(workdir / "distill") == "gs://bucket/run/distill"
    assert str(paths.absolute(workdir / "distill")) == "gs://bucket/run/distill"
    assert not paths.is_local(workdir) and paths.is_local("runs/a")
    assert paths.absolute("runs/a").is_absolute()


def test_restart_flag_is_on_every_entry_point():
    assert config.flag_parser("x").parse_args(["--restart"]).restart
    assert not config.flag_parser("x").parse_args([]).restart


def test_logs_and_plots_reach_a_remote_workdir_and_resume_there(memory):
    logdir = paths.as_path("memory://bucket/run/logs")
    with reporting.MetricsWriter(logdir, enabled=True) as writer:
        writer.write(1, {"loss": 2.0})
        writer.flush()
        assert memory.exists("/bucket/run/logs/metrics.jsonl")
    with reporting.MetricsWriter(logdir, enabled=True) as writer:  # a resumed run appends
        writer.write(2, {"loss": 1.0})
    records = reporting.read_metrics(logdir / reporting.METRICS_FILE)
    assert records == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}]
    assert any("events.out.tfevents" in name for name in memory.store)
    png = reporting.plot_curves(records, ["loss"], "memory://bucket/run/curves.png")
    assert png.read_bytes().startswith(b"\x89PNG")


def test_a_study_refuses_a_finished_run_of_other_settings(tmp_path):
    files, params = [str(gkd_summarize.GIN_FILE)], ["Schedule.steps = 3"]
    gin.clear_config()
    config.apply_gin(files, [*params, "Schedule.distill_seed = 0"])
    saved = {**recipe.run_bindings(), "Schedule.steps": 7}
    finished = tmp_path / "base" / "seed0"
    finished.mkdir(parents=True)
    (finished / "results.json").write_text("[]")
    (finished / recipe.RUN_FILE).write_text(json.dumps(saved))
    with pytest.raises(config.ConfigError, match="Schedule.steps=7, not 3; .*--restart"):
        study.run(tmp_path, study.Study(seeds=(0,)), files, params, title="t")


def test_a_remote_workdir_run_is_fingerprinted_refused_and_restarted(memory, tmp_path, monkeypatch):
    # Orbax writes arrays through tensorstore, whose store follows the path's scheme
    # (gs:// or a local file), so the checkpoints of this stand-in scheme go to a local
    # folder; every other file of the run goes to the in-memory store.
    local_manager = loop.manager
    redirect = lambda directory, *args: local_manager(
        tmp_path / str(directory).removeprefix("memory://"), *args
    )
    monkeypatch.setattr(loop, "manager", redirect)
    workdir = "memory://bucket/run"
    _run(gkd_summarize.GIN_FILE, workdir)
    written = set(_snapshot(memory))
    expected = [
        "evals.json", "prefix.json", "run.json", "operative_config.gin", "student.json",
        "results.md", "results.json", "curves.png", "report.md", "diagnostics.png",
        "logs/metrics.jsonl", "distill/wall_time.json", "student_sft/wall_time.json",
    ]  # fmt: skip
    assert {f"/bucket/run/{name}" for name in expected} <= written
    evals = json.loads(memory.cat("/bucket/run/evals.json"))
    assert {"student/eval/4", "student_distilled/test/4", "teacher/test"} <= set(evals)
    assert (tmp_path / "bucket" / "run" / "distill" / "4").is_dir()
    assert not (tmp_path / "gs:").exists() and not (tmp_path / "memory:").exists()

    before = _snapshot(memory)
    checkpoints = sorted(p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file())
    with pytest.raises(config.ConfigError) as err:
        _run(gkd_summarize.GIN_FILE, workdir, ["DistillConfig.beta = 0.9"])
    assert str(err.value) == (
        "memory://bucket/run holds a run with DistillConfig.beta=0.5, not 0.9; "
        "use another --workdir, or --restart to start over"
    )
    assert _snapshot(memory) == before
    assert sorted(p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()) == checkpoints

    # --restart: what the run wrote goes (a user's file stays), then the checks pass; the
    # run is stopped where it would record its new fingerprint.
    memory.pipe("/bucket/run/notes.txt", b"mine")

    def stop(path, bindings):
        raise _StoppedError(path)

    monkeypatch.setattr(recipe, "record_bindings", stop)
    gin.clear_config()
    config.apply_gin([str(gkd_summarize.GIN_FILE)], [*TINY, "DistillConfig.beta = 0.9"])
    with pytest.raises(_StoppedError):
        recipe.run(workdir, title="test", restart=True)
    assert set(_snapshot(memory)) == {"/bucket/run/notes.txt"}
