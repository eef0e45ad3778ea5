"""The launchers: local processes get the coordinator flags and fail together; the TPU
pod launcher creates each accelerator type on its runtime image and starts, follows and
stops a detached job on every worker; SLURM tasks label their output. The cloud commands
are checked through the launchers' DRY_RUN output, the worker side by running it here."""

import pathlib
import shlex
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
PATH = "/usr/bin:/bin"


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


JAX_VERSION = next(
    line.split("==")[1]
    for line in (ROOT / "requirements.txt").read_text().splitlines()
    if line.startswith("jax==")
)
TPU = ["gcloud", "compute", "tpus", "tpu-vm"]
WORKER = "bash opd-jax/launch/tpu_worker.sh"
FLAGS = [
    "--gin_file=experiments/configs/accelerator.gin",
    "--gin_param=make_mesh.shape=(-1, 4, 1)",
    "--workdir=gs://bucket/run",
]


def _dry_run(script: str, *args: str, **env: str) -> list[list[str]]:
    """The commands a launcher prints under DRY_RUN=1, each split as the shell would."""
    run = _run("bash", str(LAUNCH / script), *args, env={"DRY_RUN": "1", "PATH": PATH, **env})
    assert run.returncode == 0, run.stderr
    return [shlex.split(line) for line in run.stdout.splitlines()]


@pytest.mark.parametrize(
    ("accelerator", "image"),
    [
        ("v4-32", "tpu-ubuntu2204-base"),
        ("v5litepod-16", "v2-alpha-tpuv5-lite"),
        ("v5p-8", "v2-alpha-tpuv5"),
        ("v6e-8", "v2-alpha-tpuv6e"),
    ],
)
def test_tpu_pod_run_creates_on_the_types_image_and_starts_detached_everywhere(accelerator, image):
    args = ["run", "opd", "us-east5-a", accelerator, "experiments.gkd_summarize", *FLAGS]
    create, scp, ssh = _dry_run("tpu_pod.sh", *args)
    print(*(shlex.join(c) for c in (create, scp, ssh)), sep="\n")  # the acceptance record
    assert create == [
        *TPU,
        "create",
        "opd",
        "--zone=us-east5-a",
        f"--accelerator-type={accelerator}",
        f"--version={image}",
    ]
    archive = scp[len(TPU) + 1]
    assert archive.endswith("/opd-jax.tar.gz")
    assert scp == [*TPU, "scp", archive, "opd:opd-jax.tar.gz", "--worker=all", "--zone=us-east5-a"]
    assert ssh[:-1] == [*TPU, "ssh", "opd", "--zone=us-east5-a", "--worker=all"]
    assert ssh[-1].startswith("--command=set -euo pipefail; mkdir -p opd-jax; tar -xzf")
    assert f"; {WORKER} setup; {WORKER} start " in ssh[-1]
    start = shlex.split(ssh[-1].split(f"{WORKER} start ")[1])
    assert start == ["experiments.gkd_summarize", *FLAGS]


def test_tpu_pod_follows_stops_and_deletes_on_every_worker():
    where = ["opd", "--zone=us-east5-a", "--project=proj"]
    env = {"PROJECT": "proj"}
    assert _dry_run("tpu_pod.sh", "logs", "opd", "us-east5-a", **env) == [
        [*TPU, "ssh", *where, "--worker=all", f"--command=FOLLOW=1 {WORKER} logs 50"]
    ]
    assert _dry_run("tpu_pod.sh", "logs", "opd", "us-east5-a", "200", FOLLOW="0", **env) == [
        [*TPU, "ssh", *where, "--worker=all", f"--command=FOLLOW=0 {WORKER} logs 200"]
    ]
    assert _dry_run("tpu_pod.sh", "stop", "opd", "us-east5-a", **env) == [
        [*TPU, "ssh", *where, "--worker=all", f"--command={WORKER} stop"]
    ]
    assert _dry_run("tpu_pod.sh", "delete", "opd", "us-east5-a", **env) == [
        [*TPU, "delete", *where]
    ]


def test_tpu_pod_image_override_and_spot():
    [create] = _dry_run(
        "tpu_pod.sh", "create", "opd", "z", "v5litepod-4", TPU_VERSION="my-image", SPOT="1"
    )
    assert create[-2:] == ["--version=my-image", "--spot"]


@pytest.mark.parametrize(
    "args",
    [
        ["run", "opd", "z", "v7x-8", "experiments.gkd_summarize"],
        ["create", "opd", "z", "tpu-32"],
        ["opd", "z", "v4-8", "experiments.gkd_summarize"],  # the old form, before subcommands
    ],
)
def test_tpu_pod_refuses_an_unknown_type_or_subcommand_in_one_line(args):
    run = _run("bash", str(LAUNCH / "tpu_pod.sh"), *args, env={"DRY_RUN": "1", "PATH": PATH})
    assert run.returncode == 1
    assert run.stdout == ""
    assert len(run.stderr.splitlines()) == 1 and run.stderr.startswith("error: ")


def test_tpu_worker_setup_installs_jax_for_tpu(tmp_path):
    *_, install = _dry_run("tpu_worker.sh", "setup", HOME=str(tmp_path))
    assert install == [
        ".venv/bin/pip",
        "install",
        "-q",
        "-r",
        "requirements.txt",
        f"jax[tpu]=={JAX_VERSION}",
    ]


def test_tpu_worker_starts_detached_logs_labelled_and_stops(tmp_path):
    (tmp_path / "job.py").write_text(
        "import sys, time\nprint('args', *sys.argv[1:], flush=True)\ntime.sleep(120)\n"
    )
    env = {
        "PATH": PATH,
        "HOME": str(tmp_path),
        "WORKER_ID": "3",
        "PYTHON": sys.executable,
        "PYTHONPATH": str(tmp_path),
        "FOLLOW": "0",
    }
    worker = ["bash", str(LAUNCH / "tpu_worker.sh")]
    started = _run(*worker, "start", "job", "--workdir=gs://b/r", "a b", env=env)
    assert started.returncode == 0, started.stderr
    log = tmp_path / "opd_jax_logs" / "worker-3.log"
    assert started.stdout == f"[worker 3] started pid {_pid(tmp_path)}, log {log}\n"
    again = _run(*worker, "start", "job", env=env)
    assert again.returncode == 1 and "already running" in again.stderr
    deadline = time.monotonic() + 30
    while "args" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    lines = _run(*worker, "logs", env=env).stdout.splitlines()
    assert lines[0].startswith("[worker 3] === ") and lines[0].endswith(
        "python -m job --distributed --workdir=gs://b/r a b"
    )
    assert lines[1] == "[worker 3] args --distributed --workdir=gs://b/r a b"
    pid = _pid(tmp_path)
    stopped = _run(*worker, "stop", env=env)
    assert stopped.stdout == f"[worker 3] stopped pid {pid}\n", stopped.stderr
    assert not (tmp_path / "opd_jax_logs" / "job.pid").exists()
    assert _run(*worker, "stop", env=env).stdout == "[worker 3] no job running\n"


def _pid(home: pathlib.Path) -> int:
    return int((home / "opd_jax_logs" / "job.pid").read_text())


def test_gpu_slurm_labels_each_tasks_output():
    commands = _dry_run("gpu_slurm.sh", "experiments.gkd_summarize", *FLAGS, VENV="/new/venv")
    print(*(shlex.join(c) for c in commands), sep="\n")
    assert commands == [
        ["python3", "-m", "venv", "/new/venv"],
        [
            "/new/venv/bin/pip",
            "install",
            "-q",
            "-r",
            "requirements.txt",
            f"jax[cuda12]=={JAX_VERSION}",
        ],
        [
            "srun",
            "--label",
            "--kill-on-bad-exit=1",
            "/new/venv/bin/python",
            "-m",
            "experiments.gkd_summarize",
            "--distributed",
            *FLAGS,
        ],
    ]


def test_launchers_without_arguments_print_usage():
    for script in ("local_multihost.sh", "tpu_pod.sh", "tpu_worker.sh", "gpu_slurm.sh"):
        run = _run("bash", str(LAUNCH / script))
        assert run.returncode == 2, script
        assert "launch/" in run.stderr or "usage" in run.stderr, script
