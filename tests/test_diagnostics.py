"""The top-k overlap diagnostics against a numpy reference on hand-made distributions,
and the per-third positions."""

import jax.numpy as jnp
import numpy as np
import pytest

from opd_jax import diagnostics


def _reference(p_V: np.ndarray, q_V: np.ndarray, token: int, k: int) -> dict[str, float]:
    teacher_top, student_top = set(np.argsort(-p_V)[:k]), set(np.argsort(-q_V)[:k])
    shared = sorted(teacher_top & student_top)
    return {
        "overlap_ratio": len(shared) / k,
        "overlap_mass_teacher": float(p_V[shared].sum()),
        "overlap_mass_student": float(q_V[shared].sum()),
        "token_in_overlap": float(token in shared),
    }


def _overlap(p_BxV: np.ndarray, q_BxV: np.ndarray, tokens_B: np.ndarray, k: int):
    logs = [jnp.log(jnp.asarray(x, jnp.float32))[:, None] for x in (p_BxV, q_BxV)]
    out = diagnostics.topk_overlap(*logs, jnp.asarray(tokens_B)[:, None], k)
    return {name: np.asarray(value[:, 0]) for name, value in out.items()}


def test_equal_sets_covering_the_vocabulary_have_ratio_and_mass_one():
    p = np.array([[0.5, 0.3, 0.2]])
    q = np.array([[0.2, 0.2, 0.6]])
    out = _overlap(p, q, np.array([1]), k=3)
    for name in ("overlap_ratio", "overlap_mass_teacher", "overlap_mass_student"):
        np.testing.assert_allclose(out[name], 1.0, rtol=1e-6)  # float32 sums of 3 terms
    assert out["token_in_overlap"][0] == 1.0


def test_disjoint_sets_have_ratio_and_mass_zero():
    p = np.array([[0.45, 0.45, 0.04, 0.03, 0.03]])
    q = np.array([[0.02, 0.03, 0.45, 0.45, 0.05]])
    out = _overlap(p, q, np.array([0]), k=2)
    for name in ("overlap_ratio", "overlap_mass_teacher", "overlap_mass_student"):
        assert out[name][0] == 0.0
    assert out["token_in_overlap"][0] == 0.0


@pytest.mark.parametrize("k", [1, 3, 6])
def test_random_distributions_match_numpy(k):
    rng = np.random.default_rng(k)
    p = rng.dirichlet(np.full(12, 0.3), size=16)
    q = rng.dirichlet(np.full(12, 0.3), size=16)
    tokens = rng.integers(0, 12, 16)
    out = _overlap(p, q, tokens, k)
    for b in range(16):
        expected = _reference(p[b], q[b], int(tokens[b]), k)
        for name, value in expected.items():
            # float32 log then exp of probabilities >= ~1e-6: relative error ~1e-7 per term
            np.testing.assert_allclose(out[name][b], value, rtol=1e-5, atol=1e-6, err_msg=name)


def test_positions_split_each_row_into_thirds_of_its_own_length():
    mask = jnp.asarray([[1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0]], jnp.float32)
    thirds = np.asarray(diagnostics.position_thirds(mask))
    np.testing.assert_array_equal(thirds[0, :6], [0, 0, 1, 1, 2, 2])
    np.testing.assert_array_equal(thirds[1, :3], [0, 1, 2])
