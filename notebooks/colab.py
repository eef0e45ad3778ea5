"""What the Colab notebooks do once the checkout is in place: find the accelerator, install
the requirements with the matching jax, choose the runs' directory (on Google Drive if
asked), and run an experiment as a subprocess whose output streams into the cell.

Standard library only: the notebook imports it before anything is installed. JAX is
never imported in the notebook's own process, which would hold the TPU that the
experiments need.
"""

from __future__ import annotations

import codecs
import glob
import os
import pathlib
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence

ACCELERATORS = ("tpu", "gpu", "cpu")
JAX_EXTRAS = {"tpu": "tpu", "gpu": "cuda12", "cpu": None}
DRIVE_MOUNT = "/content/drive"
DRIVE_RUNS = "MyDrive/opd-jax/runs"
ACCELERATOR_GIN = "experiments/configs/accelerator.gin"

# A few steps at toy sizes through every stage (fine-tune, distill, evaluate, report):
# proof that the install, the data and the devices work before the real run starts.
TINY = (
    "Models.student_layers = 1",
    "Models.student_sft_steps = 1",
    "Models.teacher_sft_steps = 0",
    "Schedule.steps = 2",
    "Schedule.prompt_len = 64",
    "Schedule.completion_len = 6",
    "Schedule.checkpoint_every = 2",
    "Schedule.eval_every = 2",
)


class NotebookError(RuntimeError):
    """A step of the notebook that cannot go on; the message says what to change."""


def detect_accelerator() -> str:
    """The runtime's accelerator: "gpu" with nvidia-smi, "tpu" with TPU devices, else "cpu"."""
    if shutil.which("nvidia-smi"):
        return "gpu"
    if glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"):
        return "tpu"
    return "cpu"


def jax_requirement(accelerator: str, requirements: pathlib.Path) -> list[str]:
    """The jax with the accelerator's plugin, at the version requirements.txt pins."""
    if accelerator not in ACCELERATORS:
        raise NotebookError(f"ACCELERATOR={accelerator!r} is not one of {ACCELERATORS}")
    extra = JAX_EXTRAS[accelerator]
    if extra is None:
        return []
    for line in requirements.read_text().splitlines():
        if line.startswith("jax=="):
            return [f"jax[{extra}]=={line.removeprefix('jax==').strip()}"]
    raise NotebookError(f"{requirements} pins no jax version (a line 'jax==...')")


def install_command(accelerator: str, checkout: pathlib.Path) -> list[str]:
    """pip install of requirements.txt and the accelerator's jax, in this Python."""
    requirements = checkout / "requirements.txt"
    if not requirements.exists():
        raise NotebookError(f"{checkout} has no requirements.txt: is it an opd-jax checkout?")
    extra = jax_requirement(accelerator, requirements)
    return [sys.executable, "-m", "pip", "install", "-q", "-r", str(requirements), *extra]


def on_colab() -> bool:
    """Whether this kernel runs in Google Colab."""
    try:
        import google.colab  # noqa: F401
    except ImportError:
        return False
    return True


def runs_dir(local: str | os.PathLike[str], on_drive: bool) -> pathlib.Path:
    """Where the runs go: `local`, or Google Drive's MyDrive/opd-jax/runs (mounted here)
    when `on_drive`, so checkpoints outlive the runtime. Outside Colab Drive is skipped
    with a note."""
    if on_drive and on_colab():
        from google.colab import drive

        drive.mount(DRIVE_MOUNT)
        directory = pathlib.Path(DRIVE_MOUNT) / DRIVE_RUNS
    else:
        if on_drive:
            print(f"not on Colab: no Drive to mount, the runs stay in {local}")
        directory = pathlib.Path(local)
    directory.mkdir(parents=True, exist_ok=True)
    return directory.resolve()


def tiny_params(devices: int) -> list[str]:
    """TINY with batches that split evenly over `devices` (8 on a v2-8 or v3-8 runtime)."""
    batch = devices * max(1, -(-2 // devices))
    sizes = ("batch_size", "eval_batch_size", "eval_examples", "test_examples")
    return [*TINY, *(f"Schedule.{name} = {batch}" for name in sizes)]


def experiment_command(
    module: str,
    workdir: str | os.PathLike[str],
    gin_files: Sequence[str] = (),
    gin_params: Sequence[str] = (),
) -> list[str]:
    """`python -m module` with its workdir, gin files and bindings as flags."""
    return [
        sys.executable,
        "-m",
        module,
        f"--workdir={workdir}",
        *(f"--gin_file={path}" for path in gin_files),
        *(f"--gin_param={binding}" for binding in gin_params),
    ]


def run(command: Sequence[str], cwd: str | os.PathLike[str] | None = None) -> None:
    """Runs `command`, its output streaming into the cell as it comes (progress bars
    included); a failure raises NotebookError with the exit status."""
    print("$", shlex.join(command), flush=True)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    with subprocess.Popen(
        command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    ) as process:
        assert process.stdout is not None
        while chunk := process.stdout.read1(4096):
            sys.stdout.write(decoder.decode(chunk))
            sys.stdout.flush()
    if process.returncode != 0:
        raise NotebookError(f"the command exited with {process.returncode}; its output is above")


def device_count(checkout: str | os.PathLike[str] | None = None) -> int:
    """The devices JAX sees, asked of a separate process (see the module's docstring)."""
    code = "import jax; print(jax.devices()); print(jax.device_count())"
    out = subprocess.run([sys.executable, "-c", code], cwd=checkout, capture_output=True, text=True)
    if out.returncode != 0:
        last = out.stderr.strip().splitlines()[-1:] or [f"exit status {out.returncode}"]
        raise NotebookError(f"jax did not start: {last[0]}")
    devices, count = out.stdout.strip().splitlines()[-2:]
    print(devices)
    return int(count)
