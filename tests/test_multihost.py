"""Two processes on 127.0.0.1 joined by jax.distributed (launch/local_multihost.sh): GKD
steps end with the same params on both hosts and as in one process, and a checkpoint
written by 2 processes restores in 1 and the other way round. Slow: each process
compiles the steps on a shared CPU."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from test_recipe import TINY, _final_params

pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "mesh_worker.py"
LAUNCH = ROOT / "launch" / "local_multihost.sh"
PARAMS_ATOL = 1e-4  # fp32: two devices reduce the batch in another order than one


def _worker(out: pathlib.Path, processes: int, *args: str) -> list[dict[str, np.ndarray]]:
    """Runs the worker's GKD mode in `processes` processes; each one's params."""
    command = [sys.executable, str(WORKER), "gkd", str(out), *args]
    if processes > 1:
        command = ["bash", str(LAUNCH), str(processes), *command]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    subprocess.run(command, env=env, check=True, cwd=ROOT, timeout=3600)
    summaries = [json.loads((out / f"summary_{i}.json").read_text()) for i in range(processes)]
    assert all(s["processes"] == processes for s in summaries)
    return [dict(np.load(out / f"params_{i}.npz")) for i in range(processes)]


def _assert_equal(a, b):
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_two_hosts_agree_with_each_other_and_with_one(tmp_path):
    one = _worker(tmp_path / "one", 1)[0]
    host0, host1 = _worker(tmp_path / "two", 2)
    _assert_equal(host0, host1)
    for name in one:
        np.testing.assert_allclose(host0[name], one[name], atol=PARAMS_ATOL, err_msg=name)

    # A checkpoint restores whatever the process count that wrote it (0 further steps:
    # the params saved are the params restored, bit for bit).
    restored_in_one = _worker(
        tmp_path / "2to1", 1, "--restore_from", str(tmp_path / "two/ckpt"), "--steps", "0"
    )[0]
    _assert_equal(restored_in_one, host0)
    restored_in_two = _worker(
        tmp_path / "1to2", 2, "--restore_from", str(tmp_path / "one/ckpt"), "--steps", "0"
    )
    for params in restored_in_two:
        _assert_equal(params, one)


def _experiment(workdir: pathlib.Path, processes: int) -> None:
    command = [sys.executable, "-m", "experiments.gkd_summarize", f"--workdir={workdir}"]
    command += [f"--gin_param={binding}" for binding in TINY]
    if processes > 1:
        command = ["bash", str(LAUNCH), str(processes), *command]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    subprocess.run(command, env=env, check=True, cwd=ROOT, timeout=3600)


def test_experiment_on_two_hosts_ends_where_one_process_does(tmp_path):
    # The whole pipeline: per-host batches, sharded stages, collective checkpoints,
    # evaluation on both hosts and results written by process 0.
    _experiment(tmp_path / "one", 1)
    _experiment(tmp_path / "two", 2)
    one, two = (_final_params(tmp_path / name) for name in ("one", "two"))
    for (path, a), b in zip(jax.tree.leaves_with_path(one), jax.tree.leaves(two), strict=True):
        np.testing.assert_allclose(a, b, atol=PARAMS_ATOL, err_msg=jax.tree_util.keystr(path))
    results = [json.loads((tmp_path / n / "results.json").read_text()) for n in ("one", "two")]
    assert results[0] == results[1]
