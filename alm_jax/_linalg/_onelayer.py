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

`solve` applies U and Uᵀ through the shared W_out (C_j = c_j W_out), as
GEMMs over the sample axis, not as per-sample contractions over the n
states: XLA:CPU fused those reductions into their broadcast consumers and
recomputed them per element (8.8 ms against 1.0 ms at m = 7373, n = 50,
n_y = 1), which made this solve half of a whole `update` on UCI kin8nm.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp

from ._blocktri import Projector
from ._linearise import Linearisation, every_kth


class WoodburyFactor(NamedTuple):
    # A leading layer axis of length 1 keeps the sample axis second, as in
    # the block-tridiagonal factor, so chunked results are stitched alike.
    d_inv: jnp.ndarray  # (1, m, n) D⁻¹
    u: jnp.ndarray  # (1, m, n, ny) D⁻¹ Cᵀ
    k_inv: jnp.ndarray  # (1, m, ny, ny)
    c_o: jnp.ndarray  # (m, ny, ny) per-sample output factor, C_j = c_j W_out
    w_out: jnp.ndarray  # (ny, n)


def factor(lin: Linearisation, mu_z) -> WoodburyFactor:
    omega, c_mat = lin.omega, lin.c_mat
    d_inv = 1 / (omega * omega + mu_z)
    u = d_inv[0][:, :, None] * jnp.swapaxes(c_mat, -1, -2)
    k = jnp.eye(c_mat.shape[1], dtype=omega.dtype) + c_mat @ u
    # A batched LU for 1 × 1 matrices cost 18 kernels of compilation.
    k_inv = 1 / k if k.shape[-1] == 1 else jnp.linalg.inv(k)
    return WoodburyFactor(d_inv, u[None], k_inv[None], lin.c_o, lin.w_out)


def subsample(fac: WoodburyFactor, k: int, offset) -> WoodburyFactor:
    """The factor of every k-th sample from `offset`: each sample's block is its own, so a slice, not a refactoring."""
    return WoodburyFactor(*(every_kth(a, ax, k, offset) for a, ax in zip(fac, (1, 1, 1, 0, None))))


def projector(lin: Linearisation, fac: WoodburyFactor) -> Projector:
    omega = lin.omega[0]
    n = omega.shape[-1]
    wu = omega[:, :, None] * fac.u[0]
    wuk = wu @ fac.k_inv[0]
    diag = 1 - omega * omega * fac.d_inv[0]
    ss = diag[:, :, None] * jnp.eye(n, dtype=omega.dtype) + wuk @ jnp.swapaxes(wu, -1, -2)
    return Projector(ss[None, None], -wuk[None], fac.k_inv[0])


def solve(fac: WoodburyFactor, rhs):
    """H⁻¹ rhs = D⁻¹b − D⁻¹Cᵀ K⁻¹ C D⁻¹b for rhs of shape (1, m, n, q)."""
    db = fac.d_inv[0][..., None] * rhs[0]
    cdb = jnp.einsum("mab,mbq->maq", fac.c_o, jnp.einsum("bn,mnq->mbq", fac.w_out, db))
    t = jnp.einsum("mba,mbq->maq", fac.c_o, fac.k_inv[0] @ cdb)
    return (db - fac.d_inv[0][..., None] * jnp.einsum("an,maq->mnq", fac.w_out, t))[None]


def stage_output_grams(lin: Linearisation, fac: WoodburyFactor):
    """Means over samples of c P_ss c (n × n) and c_oᵀ P_oo c_o (n_y × n_y), exactly.

    The second Kronecker factors of the reduced system's diagonal blocks
    (`_matfree`'s preconditioner), from the closed form of P above: with
    A_j = diag(c ω) U_j,  mean_j c P_ss c = diag(mean c²(1 − ω²/(ω²+μ_z)))
    + mean_j A_j K_j⁻¹ A_jᵀ, one GEMM over the samples. Deeper chains:
    `_blocktri.stage_output_grams` (exact as μ_z → 0).
    """
    omega, c = lin.omega[0], lin.c_h[0]
    m = c.shape[0]
    a = (c * omega)[..., None] * fac.u[0]  # (m, n, ny)
    g_hid = jnp.diag(jnp.mean(c * c * (1 - omega * omega * fac.d_inv[0]), axis=0))
    g_hid = g_hid + jnp.einsum("mna,mka->nk", a, a @ fac.k_inv[0]) / m
    g_out = jnp.einsum("mab,mac->bc", lin.c_o, fac.k_inv[0] @ lin.c_o) / m
    return g_hid, g_out
