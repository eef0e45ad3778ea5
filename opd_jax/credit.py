"""Temporal credit (GAE-OPD) and vocabulary routing (CR-OPD) of the sampled-token gradient.

The "pg" estimator (`losses.sampled_estimate`) is a policy gradient on the per-token
reward r_t = log p(y_t) - log q(y_t) (teacher p, student q, sampled token y_t) that
credits each token with its own reward alone: its gradient is -rho_t r_t grad log q(y_t),
rho_t = q(y_t) / mu(y_t) the importance weight. This module makes two other choices of
that gradient, each a gin setting of `losses.Objective` (estimator "pg" only).

Credit: the advantage A_t that multiplies -rho_t grad log q(y_t).
  immediate     A_t = r_t                                        (the pg estimator itself)
  return_to_go  A_t = sum_{l>=0} r_{t+l}
  discounted    A_t = sum_{l>=0} gamma^l r_{t+l}
  gae           A_t = sum_{l>=0} (gamma lambda)^l delta_{t+l},  delta_t = r_t + gamma V_{t+1} - V_t
Sums stop at the completion's last real token, after which V = 0. The reverse KL of a
sequence is the sum of its per-token terms, so return-to-go credits a token with the
divergence of the continuation it leads to, not only its own: its expected gradient is
the sequence-level reverse KL's, which counts how a token changes the prefixes of later
ones, where pg's holds each prefix fixed. V is a learned value head
(`values`): a linear map of the student's final hidden state at each completion position,
trained on the lambda-returns A_t + V_t by its own optimizer. gamma = 0 gives
A_t = r_t - V_t (immediate with a baseline); lambda = 1 gives the discounted return minus
V_t, which with V = 0 and gamma = 1 is return_to_go. rho_t stays per token: it corrects
the draw of y_t, not of the tokens after it (prefixes are taken as given, as in
`losses.sampled_estimate`); on-policy rollouts at the loss temperature have rho = 1.

Routing (CR-OPD): where mass goes when A_t < 0. At such a position the pg gradient on the
student's logits is rho |A| (e_y - q): descent takes mass from y and spreads it over the
whole vocabulary in proportion to q. Routing sends it only to alternatives that are
  teacher-supported  in T_k, the teacher's k most likely tokens, and
  student-reachable  in S_k, the student's k most likely tokens:
the routed set R = (T_k ∩ S_k) \\ {y}, with target pi(z) = p(z) / sum_{z' in R} p(z')
over it. The per-token surrogate is
  A >= 0 or R empty:  -sg(rho A) log q(y)                                   (plain pg)
  A < 0, R nonempty:   sg(rho |A|) (log q(y) - sum_{z in R} pi(z) log q(z))
whose logit gradient is rho |A| (e_y - pi): the softmax normalizer's terms cancel
(sum_z pi(z) = 1), so descent moves only y's and R's logits, R's in proportion to pi.
This is our reading of "A Formula-Driven Survey of On-Policy Distillation" (2026), which
describes routing to teacher-supported, student-reachable tokens and gives no reference
implementation: the sets and the target above are our definitions.

Both change the gradient only: `surrogate` has value 0, and the update adds it to the
stop-gradient pg estimate, so the logged loss stays the sampled KL estimate whatever the
credit and routing.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import optax

from opd_jax.model import Params

CREDITS = ("immediate", "return_to_go", "discounted", "gae")
ROUTINGS = ("none", "overlap")

# ----------------------------------------------------------------------- advantages


def discounted_sum(x_BxN: jax.Array, mask_BxN: jax.Array, discount: float) -> jax.Array:
    """out_t = x_t + discount * out_{t+1} at real positions, 0 at masked ones, [B, N].

    A masked position ends the sum: completions are right-padded, so it is the end of the
    completion. A reverse scan, because the closed form through discount^-t overflows
    for small discounts; masked inputs are dropped with `where`, so padding garbage
    (inf, NaN) cannot leak into real positions.
    """
    valid_BxN = mask_BxN.astype(bool)
    x_BxN = jnp.where(valid_BxN, x_BxN, 0.0)

    def step(later_B, inputs):
        x_B, valid_B = inputs
        out_B = jnp.where(valid_B, x_B + discount * later_B, 0.0)
        return out_B, out_B

    _, out_NxB = jax.lax.scan(
        step, jnp.zeros_like(x_BxN[:, 0]), (x_BxN.T, valid_BxN.T), reverse=True
    )
    return out_NxB.T


def advantages(
    reward_BxN: jax.Array,
    mask_BxN: jax.Array,
    credit: str,
    gamma: float = 1.0,
    gae_lambda: float = 1.0,
    value_BxN: jax.Array | None = None,
) -> jax.Array:
    """A_t of the module's table for `credit`, [B, N], 0 at masked positions.

    `value_BxN` (needed by "gae" only) is V_t at each position; V after the last real
    token is 0, so the last real token's delta is r_t - V_t.
    """
    if credit not in CREDITS:
        raise ValueError(f"credit={credit!r} is not one of {CREDITS}")
    valid_BxN = mask_BxN.astype(bool)
    reward_BxN = jnp.where(valid_BxN, reward_BxN, 0.0)
    if credit == "immediate":
        return reward_BxN
    if credit != "gae":
        return discounted_sum(reward_BxN, valid_BxN, 1.0 if credit == "return_to_go" else gamma)
    if value_BxN is None:
        raise ValueError("credit='gae' needs value_BxN, the value head's V_t")
    value_BxN = jnp.where(valid_BxN, value_BxN, 0.0)
    next_value_BxN = jnp.pad(value_BxN[:, 1:], ((0, 0), (0, 1)))  # 0 past the last token
    delta_BxN = reward_BxN + gamma * next_value_BxN - value_BxN
    return discounted_sum(delta_BxN, valid_BxN, gamma * gae_lambda)


# ----------------------------------------------------------------------- value head


@flax.struct.dataclass
class ValueHead:
    """V_t = w . sg(h_t) + b and the state of its own optimizer (`value_optimizer`)."""

    params: Params  # {"w": [D], "b": []}, float32
    opt_state: optax.OptState


def value_optimizer(learning_rate: float) -> optax.GradientTransformation:
    """Adam, apart from the student's optimizer: a fresh linear head needs far larger
    steps than a pretrained student, and under one global-norm clip the value loss's
    gradient would shrink the student's."""
    return optax.adam(learning_rate)


def init_value_head(width: int, optimizer: optax.GradientTransformation) -> ValueHead:
    """Zero weights: V = 0 at the start, where GAE is the (gamma lambda)-discounted sum of
    rewards, and no random key is needed."""
    params = {"w": jnp.zeros((width,), jnp.float32), "b": jnp.zeros((), jnp.float32)}
    return ValueHead(params=params, opt_state=optimizer.init(params))


def values(params: Params, hidden_BxNxD: jax.Array) -> jax.Array:
    """V_t from the student's final-normed hidden state that predicts token t, [B, N].

    The hidden states are under stop_gradient: the value loss trains the head alone, so
    regressing returns cannot reshape the student's trunk, whose objective is the
    distillation loss.
    """
    hidden_BxNxD = jax.lax.stop_gradient(hidden_BxNxD).astype(jnp.float32)
    return hidden_BxNxD @ params["w"] + params["b"]


def value_targets(advantage_BxN: jax.Array, value_BxN: jax.Array) -> jax.Array:
    """The lambda-returns A_t + V_t the value head regresses on, without gradient."""
    return jax.lax.stop_gradient(advantage_BxN + value_BxN)


# ----------------------------------------------------------------------- routing


def routed_set(
    logp_BxCxV: jax.Array, logq_BxCxV: jax.Array, tokens_BxC: jax.Array, k: int
) -> dict[str, jax.Array]:
    """The routed set R = (T_k ∩ S_k) \\ {y} at each position, [B, C] each:
    "routed_logprob" sum_{z in R} pi(z) log q(z) with pi(z) = p(z) / sum_{z' in R} p(z')
    (0 where R is empty), differentiable in log q; "routed", 1 where R is nonempty.

    T_k and S_k are chosen and pi is computed without gradient. pi is a softmax of the
    teacher's log-probs over R, so a set whose probabilities underflow still sums to 1.
    """
    logp_BxCxV = jax.lax.stop_gradient(logp_BxCxV)
    _, teacher_top_BxCxK = jax.lax.top_k(logp_BxCxV, k)
    _, student_top_BxCxK = jax.lax.top_k(jax.lax.stop_gradient(logq_BxCxV), k)
    # R as a mask over the teacher's list (each token appears once in each list).
    shared_BxCxK = jnp.any(teacher_top_BxCxK[..., :, None] == student_top_BxCxK[..., None, :], -1)
    in_set_BxCxK = shared_BxCxK & (teacher_top_BxCxK != tokens_BxC[..., None])
    routed_BxC = jnp.any(in_set_BxCxK, axis=-1)
    logp_BxCxK = jnp.take_along_axis(logp_BxCxV, teacher_top_BxCxK, axis=-1)
    log_mass_BxCx1 = jax.nn.logsumexp(
        jnp.where(in_set_BxCxK, logp_BxCxK, -jnp.inf), axis=-1, keepdims=True
    )
    log_mass_BxCx1 = jnp.where(routed_BxC[..., None], log_mass_BxCx1, 0.0)  # -inf when empty
    pi_BxCxK = jnp.where(in_set_BxCxK, jnp.exp(logp_BxCxK - log_mass_BxCx1), 0.0)
    logq_BxCxK = jnp.take_along_axis(logq_BxCxV, teacher_top_BxCxK, axis=-1)
    return {
        "routed_logprob": jnp.sum(pi_BxCxK * logq_BxCxK, axis=-1),
        "routed": routed_BxC.astype(jnp.float32),
    }


def routes(advantage_BxN: jax.Array, routed_BxN: jax.Array) -> jax.Array:
    """Where routing replaces the plain gradient: a negative advantage and a nonempty R."""
    return (advantage_BxN < 0) & (routed_BxN > 0)


# ----------------------------------------------------------------------- surrogate


def surrogate(
    advantage_BxN: jax.Array,
    student_logprob_BxN: jax.Array,
    sampler_logprob_BxN: jax.Array,
    valid_BxN: jax.Array,
    routed_logprob_BxN: jax.Array | None = None,
    routed_BxN: jax.Array | None = None,
) -> jax.Array:
    """Per-token term of value 0 whose gradient is the module's surrogate's, [B, N].

    Inputs are the advantage A_t (held fixed), the student's log q(y_t) at the loss
    temperature, the sampler's log mu(y_t), and, for routing, `routed_set`'s two values.
    Without them, the gradient is -rho A grad log q(y): with A = r, exactly pg's.
    Positions outside `valid_BxN` are zeroed before the math, as in
    `losses.sampled_estimate`, so a padding token's extreme ratio cannot become NaN.
    """
    sg = jax.lax.stop_gradient
    keep = lambda x: jnp.where(valid_BxN.astype(bool), x, 0.0)
    log_q_BxN = keep(student_logprob_BxN)
    rho_BxN = jnp.exp(sg(log_q_BxN - keep(sampler_logprob_BxN)))
    direction_BxN = log_q_BxN - sg(log_q_BxN)  # value 0, gradient grad(log q(y))
    if routed_logprob_BxN is not None:
        routed_logprob_BxN = keep(routed_logprob_BxN)
        away_BxN = routed_logprob_BxN - sg(routed_logprob_BxN)  # value 0
        direction_BxN -= jnp.where(routes(advantage_BxN, routed_BxN), away_BxN, 0.0)
    return sg(-rho_BxN * keep(advantage_BxN)) * direction_BxN
