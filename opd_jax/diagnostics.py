"""Whether on-policy distillation is working, read off each step's own logits.

"Rethinking On-Policy Distillation" (2026) finds that a small set of tokens in both the
teacher's and the student's top-k carries 97-99% of the probability mass, and that the
overlap rises in runs that work; a run whose overlap stays low is distilling through
tokens the student never proposes. These per-position values cost a top-k of each side's
logits, computed inside the update's chunked pass (`losses.token_statistics`), so they
are on by default (`DistillConfig.diagnostic_top_k`) and logged every step.

Definitions, at one position, with T_k and S_k the teacher's and the student's k most
likely tokens and the shared set O = T_k ∩ S_k:
  overlap_ratio         |O| / k: 1 when both propose the same k tokens, 0 when disjoint.
  overlap_mass_teacher  sum_{y in O} p(y), the teacher's mass on the shared set.
  overlap_mass_student  sum_{y in O} q(y), the student's.
  token_in_overlap      whether the completion's token at this position lies in O.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def topk_overlap(
    logp_BxCxV: jax.Array, logq_BxCxV: jax.Array, tokens_BxC: jax.Array, k: int
) -> dict[str, jax.Array]:
    """The module's four values per position, [B, C] each, without gradient."""
    logp_BxCxV, logq_BxCxV = jax.lax.stop_gradient((logp_BxCxV, logq_BxCxV))
    _, teacher_top_BxCxK = jax.lax.top_k(logp_BxCxV, k)
    _, student_top_BxCxK = jax.lax.top_k(logq_BxCxV, k)
    # Which of the teacher's top-k entries the student's top-k holds too: O, as a mask
    # over the teacher's list (each token appears once in each list).
    shared_BxCxK = jnp.any(teacher_top_BxCxK[..., :, None] == student_top_BxCxK[..., None, :], -1)
    mass = lambda logprob_BxCxV: jnp.sum(
        jnp.where(
            shared_BxCxK, jnp.exp(jnp.take_along_axis(logprob_BxCxV, teacher_top_BxCxK, -1)), 0.0
        ),
        axis=-1,
    )
    token_in_shared = jnp.any(shared_BxCxK & (teacher_top_BxCxK == tokens_BxC[..., None]), axis=-1)
    return {
        "overlap_ratio": jnp.sum(shared_BxCxK, axis=-1) / k,
        "overlap_mass_teacher": mass(logp_BxCxV),
        "overlap_mass_student": mass(logq_BxCxV),
        "token_in_overlap": token_in_shared.astype(jnp.float32),
    }


def position_thirds(mask_BxN: jax.Array) -> jax.Array:
    """Each completion position's third of its row's completion, 0 / 1 / 2 ([B, N] int):
    position j of a row of L real tokens is in third floor(3 j / L)."""
    length_Bx1 = jnp.maximum(jnp.sum(mask_BxN > 0, axis=1, keepdims=True), 1)
    position_1xN = jnp.arange(mask_BxN.shape[1])[None]
    return jnp.minimum(3 * position_1xN // length_Bx1, 2)
