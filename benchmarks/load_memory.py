"""Peak host memory of loading a model onto an 8-way FSDP mesh, against the model's size.

    python -m benchmarks.load_memory [--models NAME...] [--dtypes float32 bfloat16]
                                     [--baseline_revision REV]

Every measurement is a fresh process with 8 forced CPU devices and a (1, 8, 1) mesh: it
imports, builds the mesh, then resets the kernel's peak-RSS mark (VmHWM) and loads the
model onto the mesh. It reports, above what the process held before the load: the peak
RSS (VmHWM), which counts the pages of a memory-mapped checkpoint file the kernel may
drop at will, and the peak anonymous memory (RssAnon, polled), what the process itself
allocated; and the model's bytes in that dtype. The process runs with glibc's mmap
threshold fixed at 64 KiB, so a freed buffer is returned at once and RssAnon follows what
is live rather than what the allocator keeps for reuse. Paths:

- "sharded": `checkpoints.load(..., shardings=Placement.params)`, straight into place;
- "whole, then placed": `checkpoints.load` onto the default device, then
  `mesh.place_params`, as runs placed params before sharded loading;
- the same "whole, then placed" with opd_jax as of `--baseline_revision` (a git revision
  exported to a scratch directory), the loader that kept every tensor on the host twice.

Sources: each packaged GGUF, and the same weights written once as an HF safetensors
directory (float32) beside the packaged file. CPU devices keep their buffers in host
memory, so the placed model itself counts here: 1.0x the model is the floor.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import pathlib
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator

from opd_jax import assets  # no jax: the measuring processes import it themselves

DEVICES = 8
MESH = (1, DEVICES, 1)
ROOT = pathlib.Path(__file__).resolve().parents[1]
MODELS = ("smollm2-135m-instruct", "gemma3-270m")
SHARDED, WHOLE = "sharded", "whole, then placed"


def _status_mib(field: str) -> float:
    """A line of /proc/self/status (VmRSS, VmHWM, RssAnon), in MiB."""
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


@contextlib.contextmanager
def _peak_anonymous_mib(every_s: float = 0.001) -> Iterator[list[float]]:
    """The highest RssAnon seen while the body runs, polled every `every_s` (the kernel
    keeps no peak of it): memory the process allocated, without the file pages a
    memory-mapped checkpoint brings in, which VmHWM counts and the kernel may drop."""
    peak = [_status_mib("RssAnon")]
    done = threading.Event()

    def poll() -> None:
        while not done.wait(every_s):
            peak[0] = max(peak[0], _status_mib("RssAnon"))

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        done.set()
        thread.join()
        peak[0] = max(peak[0], _status_mib("RssAnon"))


def measure(source: str, dtype: str, path: str) -> dict:
    """One load in this process (started with the forced devices)."""
    import jax

    from opd_jax import checkpoints, mesh

    placement = mesh.Placement(mesh.make_mesh(MESH))
    rss_before, anonymous_before = _status_mib("VmRSS"), _status_mib("RssAnon")
    pathlib.Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    began = time.perf_counter()
    with _peak_anonymous_mib() as peak_anonymous:
        if path == SHARDED:
            _, params = checkpoints.load(source, dtype, shardings=placement.params)
        else:
            config, whole = checkpoints.load(source, dtype)
            params = mesh.place_params(whole, placement.params(config))
            del whole
        jax.block_until_ready(params)
    seconds = time.perf_counter() - began
    leaves = jax.tree.leaves(params)
    assert all(len(x.sharding.device_set) == DEVICES for x in leaves)
    return {
        "peak_rss_mib": _status_mib("VmHWM") - rss_before,
        "peak_anonymous_mib": peak_anonymous[0] - anonymous_before,
        "model_mib": sum(x.nbytes for x in leaves) / 2**20,
        "seconds": seconds,
    }


def _run_child(source: str, dtype: str, path: str, code_root: pathlib.Path) -> dict:
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={DEVICES}"
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(code_root)}
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"  # freed buffers go back: RssAnon is what is live
    child = [sys.executable, str(pathlib.Path(__file__).resolve()), "--child", source, dtype, path]
    result = subprocess.run(child, env=env, capture_output=True, text=True, check=False)
    if result.returncode:
        raise RuntimeError(f"{source} {dtype} {path}:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _safetensors_dir(name: str) -> pathlib.Path:
    """The packaged GGUF as an HF safetensors directory, written once (in a child process,
    so this one stays small)."""
    directory = assets.fetch(name).parent / "safetensors"
    if not (directory / "model.safetensors").exists():
        write = (
            "import sys; from opd_jax import checkpoints; "
            "checkpoints.save_hf_dir(*checkpoints.load(sys.argv[1]), sys.argv[2])"
        )
        subprocess.run([sys.executable, "-c", write, name, str(directory)], check=True, cwd=ROOT)
    return directory


@contextlib.contextmanager
def _exported(revision: str) -> Iterator[pathlib.Path]:
    """The opd_jax package as of a git revision, in a scratch directory."""
    with tempfile.TemporaryDirectory() as scratch:
        archive = subprocess.run(
            ["git", "archive", revision, "opd_jax"], cwd=ROOT, capture_output=True, check=True
        ).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(scratch, filter="data")
        yield pathlib.Path(scratch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--baseline_revision", default=None)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(*args.child)))
        return
    with contextlib.ExitStack() as stack:
        paths = [(SHARDED, ROOT), (WHOLE, ROOT)]
        if args.baseline_revision:
            old = stack.enter_context(_exported(args.baseline_revision))
            paths.append((f"{WHOLE} ({args.baseline_revision})", old))
        print(
            "| model | source | dtype | path | peak RSS MiB | peak anonymous MiB "
            "| model MiB | peak anonymous / model | s |"
        )
        print("|---|---|---|---|---:|---:|---:|---:|---:|")
        for name in args.models:
            sources = {"GGUF": str(assets.fetch(name)), "safetensors": str(_safetensors_dir(name))}
            for (kind, source), dtype, (label, code_root) in itertools.product(
                sources.items(), args.dtypes, paths
            ):
                r = _run_child(source, dtype, SHARDED if label == SHARDED else WHOLE, code_root)
                print(
                    f"| {name} | {kind} | {dtype} | {label} | {r['peak_rss_mib']:.0f} "
                    f"| {r['peak_anonymous_mib']:.0f} | {r['model_mib']:.0f} "
                    f"| {r['peak_anonymous_mib'] / r['model_mib']:.2f}x | {r['seconds']:.1f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
