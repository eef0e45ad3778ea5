"""The launchers: local processes get the coordinator flags and fail together; the TPU
pod launcher runs the module on every worker (checked through its DRY_RUN output)."""

import pathlib
import subprocess

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"


def _run(*command: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=60, env=env)


def test_local_multihost_passes_each_process_its_flags():
    run = _run("bash", str(LAUNCH / "local_multihost.sh"), "3", "echo", "ran")
    assert run.returncode == 0, run.stderr
    lines = sorted(run.stdout.splitlines())
    assert len(lines) == 3
    for i, line in enumerate(lines):
        assert line.startswith(f"[{i}] ran --coordinator_address=127.0.0.1:")
        assert line.endswith(f"--num_processes=3 --process_id={i}")
    ports = {line.split("127.0.0.1:")[1].split()[0] for line in lines}
    assert len(ports) == 1, "one coordinator for all processes"


def test_local_multihost_stops_the_others_when_one_fails():
    script = 'case "$*" in *process_id=1*) exit 3;; *) sleep 50;; esac'
    run = _run("bash", str(LAUNCH / "local_multihost.sh"), "2", "bash", "-c", script, "x")
    assert run.returncode == 3
    assert "process 1 exited with 3; stopping the others" in run.stderr


def test_tpu_pod_runs_the_module_on_all_workers():
    run = _run(
        "bash",
        str(LAUNCH / "tpu_pod.sh"),
        "opd-v4",
        "us-central2-b",
        "v4-32",
        "experiments.gkd_summarize",
        "--workdir=gs://bucket/run",
        env={"DRY_RUN": "1", "PATH": "/usr/bin:/bin"},
    )
    assert run.returncode == 0, run.stderr
    create, scp, ssh = run.stdout.splitlines()
    assert "tpu-vm create opd-v4 --zone=us-central2-b --accelerator-type=v4-32" in create
    assert "--worker=all" in scp and "--worker=all" in ssh
    jax_version = next(
        line.split("==")[1]
        for line in (ROOT / "requirements.txt").read_text().splitlines()
        if line.startswith("jax==")
    )
    assert f"jax\\[tpu\\]=={jax_version}" in ssh
    assert "experiments.gkd_summarize\\ --distributed\\ --workdir=gs://bucket/run" in ssh


def test_launchers_without_arguments_print_usage():
    for script in ("local_multihost.sh", "tpu_pod.sh", "gpu_slurm.sh"):
        run = _run("bash", str(LAUNCH / script))
        assert run.returncode == 2, script
        assert "launch/" in run.stderr or "usage" in run.stderr, script
