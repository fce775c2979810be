"""State elimination for one hidden layer in closed form (Woodbury).

With a single hidden layer the states' normal matrix is a diagonal plus a
rank-n_y term,

    H = D + Cᵀ C,   D = diag(ω² + μ_z),   C = diag(c_out) W_out   (n_y × n),

so with U = D⁻¹Cᵀ and K = I + C D⁻¹ Cᵀ (n_y × n_y):

    H⁻¹ = D⁻¹ − U K⁻¹ Uᵀ
    P   = I − J_u H⁻¹ J_uᵀ,   J_u = [diag(ω); C]:
    P_ss = I − diag(ω² / (ω² + μ_z)) + (ωU) K⁻¹ (ωU)ᵀ,   P_so = −(ωU) K⁻¹,   P_oo = K⁻¹

Per sample this costs O(n·n_y²) instead of the O(n³) of a Cholesky
factorisation, which on CPU would otherwise dominate the whole step.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp

from ._blocktri import Projector
from ._linearise import Linearisation


class WoodburyFactor(NamedTuple):
    # A leading layer axis of length 1 keeps the sample axis second, as in
    # the block-tridiagonal factor, so chunked results are stitched alike.
    d_inv: jnp.ndarray  # (1, m, n) D⁻¹
    u: jnp.ndarray  # (1, m, n, ny) D⁻¹ Cᵀ
    k_inv: jnp.ndarray  # (1, m, ny, ny)


def factor(lin: Linearisation, mu_z) -> WoodburyFactor:
    omega, c_mat = lin.omega, lin.c_mat
    d_inv = 1 / (omega * omega + mu_z)
    u = d_inv[0][:, :, None] * jnp.swapaxes(c_mat, -1, -2)
    k = jnp.eye(c_mat.shape[1], dtype=omega.dtype) + c_mat @ u
    return WoodburyFactor(d_inv, u[None], jnp.linalg.inv(k)[None])


def projector(lin: Linearisation, fac: WoodburyFactor) -> Projector:
    omega = lin.omega[0]
    n = omega.shape[-1]
    wu = omega[:, :, None] * fac.u[0]
    wuk = wu @ fac.k_inv[0]
    diag = 1 - omega * omega * fac.d_inv[0]
    ss = diag[:, :, None] * jnp.eye(n, dtype=omega.dtype) + wuk @ jnp.swapaxes(wu, -1, -2)
    return Projector(ss[None, None], -wuk[None], fac.k_inv[0])


def solve(fac: WoodburyFactor, rhs):
    """H⁻¹ rhs for rhs of shape (1, m, n, q)."""
    b = rhs[0]
    u, k_inv = fac.u[0], fac.k_inv[0]
    x = fac.d_inv[0][..., None] * b - u @ (k_inv @ (jnp.swapaxes(u, -1, -2) @ b))
    return x[None]
