"""Penalty and tolerance policies of the outer augmented Lagrangian loop.

Each factory returns a `Policy`: `init(f, h) -> state` and
`update(state, f, h) -> (state, update_multipliers)`, called after every inner
solve with the objective f = ½‖F‖² and the constraint values h at the inner
solution. Every state has `sigma` (the penalty: a scalar, or one value per
constraint) and `eps` (the inner tolerance on ‖∇_x L‖). `multiplier_bound`
is the box the multipliers are clipped to (safeguarded ALM), `inf` for none.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax.numpy as jnp

from ._checks import check_choice, check_positive


class Policy(NamedTuple):
    name: str
    init: Callable[[Any, Any], Any]
    update: Callable[[Any, Any, Any], tuple[Any, Any]]
    multiplier_bound: float


def _norm2(h):
    return jnp.sqrt(jnp.sum(h * h))


def _norm_inf(h):
    return jnp.max(jnp.abs(h))


def _grown(grow, sigma, factor, cap):
    """σ·factor (capped) where `grow`, σ elsewhere; never below σ.

    σ may already sit above the cap (the forward-loss safeguard raises it
    past the cap); growing must not pull it back down.
    """
    return jnp.where(grow, jnp.maximum(sigma, jnp.minimum(factor * sigma, cap)), sigma)


def _scalar(v, like):
    return jnp.asarray(v, dtype=like.dtype)


class BertsekasState(NamedTuple):
    sigma: Any
    eps: Any
    h_prev: Any


def bertsekas(beta0=10.0, gamma=10.0, tau=0.25, eps0=1.0, eps_factor=0.1, eps_min=1e-8,
              beta_max=1e12, feasibility_tol=1e-10, multiplier_bound=math.inf) -> Policy:
    """Classical rule: grow β when the infeasibility did not drop enough.

        β ← γβ  if ‖h_k‖ > τ‖h_{k−1}‖ and ‖h_k‖∞ > feasibility_tol,
        ε ← max(ε_min, κε)

    The feasibility test (as alpaqa's `dual_tolerance`) keeps round-off in an
    already feasible h from driving β to `beta_max`.

    References:
        D. P. Bertsekas, *Constrained Optimization and Lagrange Multiplier
        Methods*, 1982, §2.2 (γ ∈ [4, 10], τ = 0.25); Nocedal & Wright,
        *Numerical Optimization*, 2nd ed., Framework 17.3.
    """
    check_positive("beta0", beta0)
    check_positive("eps0", eps0)
    check_positive("eps_min", eps_min)
    if not gamma > 1 or not 0 < tau < 1 or not 0 < eps_factor <= 1:
        raise ValueError("bertsekas: need gamma > 1, 0 < tau < 1 and 0 < eps_factor <= 1.")

    def init(f, h):
        return BertsekasState(_scalar(beta0, f), _scalar(eps0, f), _scalar(jnp.inf, f))

    def update(s, f, h):
        hn = _norm2(h)
        grow = (hn > tau * s.h_prev) & (_norm_inf(h) > feasibility_tol)
        sigma = _grown(grow, s.sigma, gamma, beta_max)
        eps = jnp.maximum(eps_min, eps_factor * s.eps)
        return BertsekasState(sigma, eps, hn), jnp.asarray(True)

    return Policy("bertsekas", init, update, multiplier_bound)


class LancelotState(NamedTuple):
    sigma: Any
    eps: Any
    eta: Any


def lancelot(beta0=10.0, growth=100.0, eps_min=1e-8, eta_min=1e-8, beta_max=1e12,
             multiplier_bound=math.inf) -> Policy:
    """Conn–Gould–Toint test on the infeasibility (LANCELOT's rule).

    With η the feasibility target and ω = ε the gradient tolerance:
    if ‖h_k‖ ≤ η_k (success): update λ, keep β, η ← η/β^0.9, ω ← ω/β;
    else: keep λ, β ← 100β, η ← 1/β^0.1, ω ← 1/β.  Start: β_0 = 10,
    ω_0 = 1/β_0, η_0 = 1/β_0^0.1.

    References:
        A. R. Conn, N. I. M. Gould, Ph. L. Toint, "A globally convergent
        augmented Lagrangian algorithm ...", SIAM J. Numer. Anal. 28 (1991);
        Nocedal & Wright, 2nd ed., Algorithm 17.4.
    """
    check_positive("beta0", beta0)
    if not growth > 1:
        raise ValueError(f"growth: must be > 1, got {growth}.")

    def init(f, h):
        b = _scalar(beta0, f)
        return LancelotState(b, 1 / b, b ** -0.1)

    def update(s, f, h):
        ok = _norm2(h) <= s.eta
        sigma = _grown(~ok, s.sigma, growth, beta_max)
        eta = jnp.where(ok, s.eta / sigma**0.9, sigma**-0.1)
        eps = jnp.where(ok, s.eps / sigma, 1 / sigma)
        return LancelotState(sigma, jnp.maximum(eps, eps_min), jnp.maximum(eta, eta_min)), ok

    return Policy("lancelot", init, update, multiplier_bound)


class AlgencanState(NamedTuple):
    sigma: Any
    eps: Any
    h_prev: Any


def algencan(eps_opt=1e-8, gamma=10.0, tau=0.5, beta_max=1e20, feasibility_tol=1e-8,
             multiplier_bound=1e20) -> Policy:
    """Birgin–Martínez safeguarded ALM (ALGENCAN's rule).

        β_0 = 10·max(1, |f|)/max(1, ½‖h‖²),
        β ← γβ if ‖h_k‖∞ > τ‖h_{k−1}‖∞ and ‖h_k‖∞ > feasibility_tol (ε_feas)
        ε_1 = √ε_opt, then ε ← max(ε_opt, 0.1ε);   λ clipped to ±1e20.

    References:
        E. G. Birgin, J. M. Martínez, *Practical Augmented Lagrangian Methods
        for Constrained Optimization*, SIAM 2014, Alg. 4.1 and §12.
    """
    check_positive("eps_opt", eps_opt)
    if not gamma > 1 or not 0 < tau < 1:
        raise ValueError("algencan: need gamma > 1 and 0 < tau < 1.")

    def init(f, h):
        beta = 10 * jnp.maximum(1, jnp.abs(f)) / jnp.maximum(1, 0.5 * jnp.sum(h * h))
        return AlgencanState(beta, _scalar(math.sqrt(eps_opt), f), _scalar(jnp.inf, f))

    def update(s, f, h):
        hi = _norm_inf(h)
        grow = (hi > tau * s.h_prev) & (hi > feasibility_tol)
        sigma = _grown(grow, s.sigma, gamma, beta_max)
        return AlgencanState(sigma, jnp.maximum(eps_opt, 0.1 * s.eps), hi), jnp.asarray(True)

    return Policy("algencan", init, update, multiplier_bound)


class AlpaqaState(NamedTuple):
    sigma: Any  # one penalty per constraint
    eps: Any
    h_prev: Any
    first: Any


def alpaqa(penalty_factor=20.0, delta=10.0, theta=0.1, eps0=1.0, rho=0.1, eps_tol=1e-8,
           dual_tol=1e-8, max_penalty=1e9, multiplier_bound=1e9) -> Policy:
    """Per-constraint penalties as in alpaqa's ALM.

        σ_0 = 20·max(1, |f|)/max(1, ½‖h‖²) for every constraint;
        unless ‖h‖∞ ≤ dual_tol: for each i with |h_i| > θ|h_i^old| (all i at
        the first update): σ_i ← min(σ_max, max(1, Δ|h_i|/‖h‖∞)·σ_i);
        ε ← max(ρε, ε_tol), ε_0 = 1; multipliers clipped to ±1e9.

    References:
        P. Pas, M. Schuurmans, P. Patrinos, "Alpaqa: A matrix-free solver for
        nonlinear MPC and large-scale nonconvex optimization", ECC 2022;
        alpaqa's `ALMParams` defaults (Δ = 10, θ = 0.1).
    """
    check_positive("penalty_factor", penalty_factor)
    if not delta > 1 or not 0 < theta < 1 or not 0 < rho < 1:
        raise ValueError("alpaqa: need delta > 1, 0 < theta < 1, 0 < rho < 1.")

    def init(f, h):
        s0 = penalty_factor * jnp.maximum(1, jnp.abs(f)) / jnp.maximum(1, 0.5 * jnp.sum(h * h))
        return AlpaqaState(jnp.full(h.shape, s0, h.dtype), _scalar(eps0, f), jnp.zeros_like(h), jnp.asarray(True))

    def update(s, f, h):
        hi = _norm_inf(h)
        grow = (s.first | (jnp.abs(h) > theta * jnp.abs(s.h_prev))) & (hi > dual_tol)
        factor = jnp.maximum(1, delta * jnp.abs(h) / jnp.where(hi > 0, hi, 1))
        sigma = _grown(grow, s.sigma, factor, max_penalty)
        eps = jnp.maximum(rho * s.eps, eps_tol)
        return AlpaqaState(sigma, eps, h, jnp.asarray(False)), jnp.asarray(True)

    return Policy("alpaqa", init, update, multiplier_bound)


POLICIES = {"bertsekas": bertsekas, "lancelot": lancelot, "algencan": algencan, "alpaqa": alpaqa}


def default() -> Policy:
    """The library's default: Bertsekas' rule with the penalty capped at β_max = 1e3.

    Uncapped, every rule here drove β to 1e9–1e12 within ~150 LM steps on the
    UCI sets, after which LM needs a damping ∝ β and the training error
    stalls; a cap of 1e2–1e3 trained 10–20× lower in the same time
    (`benchmarks/ablation.py`, results in `benchmarks/RESULTS.md`).
    """
    return bertsekas(beta_max=1e3)


def get_policy(policy) -> Policy:
    """A `Policy` from a name (published defaults), None (`default()`), or a `Policy` itself."""
    if policy is None:
        return default()
    if isinstance(policy, Policy):
        return policy
    if not isinstance(policy, str):
        raise TypeError(f"policy: expected a name or a Policy, got {type(policy).__name__}.")
    check_choice("policy", policy, POLICIES)
    return POLICIES[policy]()
