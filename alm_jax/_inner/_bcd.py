"""Block coordinate descent on the ALM subproblem (`bcd`).

For fixed states the lifted residual of stage a depends on θ_a alone, and in
a dense layer each output unit's row of W̃_a on its own residuals alone, so the
weight problem splits into one small damped least-squares problem per unit
(the output layer's units stay coupled when the loss's factor is not diagonal,
e.g. cross-entropy; it is solved as one (n_y·k)² system):

    (Σ_j c_{ja,i}² z̃_ja z̃_jaᵀ + μ_θ I) dW̃_a[i] = −Σ_j c_{ja,i} r_{ja,i} z̃_ja

For fixed weights the states decouple by sample: one block-tridiagonal
system per sample (the same factor as the exact step, without the weights).
An iteration takes the weight block, then the state block, each accepted by
its own gain ratio with its own Nielsen damping.

Reference: D. P. Bertsekas, *Nonlinear Programming*, 3rd ed., §3.7 (block
coordinate descent); the per-layer splitting is that of Carreira-Perpiñán &
Wang, "Distributed optimization of deeply nested systems", AISTATS 2014.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
from jax.scipy.linalg import cho_factor, cho_solve

from .._checks import check_int
from .._layers import LayerSpec
from .._lifted import merit
from .._linalg import _blocktri
from .._linalg._linearise import linearise
from .._linalg._matfree import apply_ju
from .._linalg._schur import elimination, layer_blocks, unflatten_weights, weight_jvp, weight_vjp
from ._base import InnerResult, InnerSolver, Problem, all_finite, keep, nielsen, tree_add, tree_where
from ._lm import initial_damping


class BCDState(NamedTuple):
    damping_w: jnp.ndarray
    nu_w: jnp.ndarray
    damping_z: jnp.ndarray
    nu_z: jnp.ndarray


def _unit_solve(c, zt, rhs, mu):
    """Per output unit: (Σ_j c² z̃z̃ᵀ + μI)⁻¹ rhs; c (..., m, o), zt (..., m, k), rhs (..., o, k)."""
    gram = jnp.einsum("...mo,...mk,...ml->...okl", c * c, zt, zt)
    gram = gram + mu * jnp.eye(zt.shape[-1], dtype=zt.dtype)
    return cho_solve(cho_factor(gram, lower=True), rhs[..., None])[..., 0]


def _output_solve(c_o, zt, rhs, mu):
    """(Σ_j (c_oᵀc_o) ⊗ z̃z̃ᵀ + μI)⁻¹ rhs for the output layer (units coupled by a non-diagonal loss factor)."""
    ny, k = rhs.shape
    cc = jnp.einsum("mpa,mpb->mab", c_o, c_o)
    gram = jnp.einsum("mab,mk,ml->akbl", cc, zt, zt).reshape(ny * k, ny * k)
    gram = gram + mu * jnp.eye(ny * k, dtype=zt.dtype)
    return cho_solve(cho_factor(gram, lower=True), rhs.reshape(-1)).reshape(ny, k)


def _weight_step(lin, spec, mu):
    g = weight_vjp(lin, lin.r_h, lin.r_o)
    g_in, g_hid, g_out = layer_blocks(unflatten_weights(g, spec))
    d_in = _unit_solve(lin.c_h[0], lin.zt_in, -g_in, mu)
    d_hid = _unit_solve(lin.c_h[1:], lin.zt_hid, -g_hid, mu)
    d_out = _output_solve(lin.c_o, lin.zt_out, -g_out, mu)
    return unflatten_weights(jnp.concatenate([d_in.reshape(-1), d_hid.reshape(-1), d_out.reshape(-1)]), spec)


def _accept(f1, f0, pred, trial_ok, damping, nu):
    """Gain-ratio test of one block's trial and Nielsen's update of its damping."""
    rho = (f0 - f1) / jnp.where(pred > 0, pred, 1)
    ok = trial_ok & jnp.isfinite(f1) & (pred > 0) & (rho > 1e-4)
    return ok, nielsen(ok, rho, damping, nu, 1e-12, 1e12)


def bcd(*, init_damping: float | None = None, max_steps: int = 5) -> InnerSolver:
    """Alternating weight and state blocks, each a damped Gauss–Newton step (see module doc).

    Use it with a growing penalty (e.g. `policy="bertsekas"`): with β capped,
    as in the default policy, the states drift from the forward pass and the
    true training error rose in our runs.

    The weight block forms one (k × k) normal matrix per output unit:
    O(m·N·n·k²) time and O(N·n·k²) memory, so it suits small to moderate widths.
    """
    max_steps = check_int("max_steps", max_steps)

    def init(params, Z, pb: Problem):
        if isinstance(pb.spec, LayerSpec):
            raise TypeError("inner='bcd' splits dense layers by unit and needs an eqx.nn.MLP model; "
                            "use 'cg', 'lm', 'gn', 'lbfgs' or 'adam' for general layer chains.")
        mu = (initial_damping(params, pb.spec, pb.x, pb.y, Z, pb.multipliers, pb.sigma)
              if init_damping is None else jnp.asarray(init_damping, pb.spec.dtype))
        two = jnp.asarray(2, pb.spec.dtype)
        return BCDState(mu, two, mu, two)

    def step(params, Z, s: BCDState, pb: Problem):
        spec = pb.spec

        def f(p, z):
            return merit(p, z, spec, pb.x, pb.y, pb.multipliers, pb.sigma)

        def model_decrease(lin, jh, jo):
            base = jnp.sum(lin.r_h ** 2) + jnp.sum(lin.r_o ** 2)
            return 0.5 * (base - jnp.sum((lin.r_h + jh) ** 2) - jnp.sum((lin.r_o + jo) ** 2))

        # Weights, states fixed.
        lin = linearise(params, spec, pb.x, pb.y, Z, pb.multipliers, pb.sigma)
        dp = _weight_step(lin, spec, s.damping_w)
        pred = model_decrease(lin, *weight_jvp(lin, dp, spec))
        p1 = tree_add(params, dp)
        ok_w, (mu_w, nu_w) = _accept(f(p1, Z), f(params, Z), pred, all_finite(dp), s.damping_w, s.nu_w)
        params = tree_where(ok_w, p1, params)

        # States, weights fixed.
        lin = linearise(params, spec, pb.x, pb.y, Z, pb.multipliers, pb.sigma)
        elim = elimination(spec)
        fac = elim.factor(lin, s.damping_z)
        rhs = _blocktri.apply_jut(lin, lin.r_h[..., None], lin.r_o[..., None])
        dz = -elim.solve(fac, rhs)[..., 0]
        pred = model_decrease(lin, *apply_ju(lin, dz))
        ok_z, (mu_z, nu_z) = _accept(f(params, Z + dz), f(params, Z), pred, all_finite(dz), s.damping_z, s.nu_z)
        Z = jnp.where(ok_z, Z + dz, Z)
        return InnerResult(params, Z, BCDState(mu_w, nu_w, mu_z, nu_z), ok_w | ok_z, mu_w)

    return InnerSolver("bcd", init, keep, step, max_steps)
