"""Per-sample elimination of the states: block-tridiagonal Cholesky sweeps.

With the states' Jacobian J_u (block lower-bidiagonal over layers, see
`_linearise`) and state damping μ_z, the normal matrix

    H = J_uᵀ J_u + μ_z I

is block tridiagonal over the N hidden layers:

    H[i, i]   = diag(ω_i²) + μ_z I + Ã_{i+1}ᵀ Ã_{i+1}    (i < N−1)
    H[N−1,N−1]= diag(ω_{N−1}²) + μ_z I + Cᵀ C
    H[i, i+1] = −Ã_{i+1}ᵀ diag(ω_{i+1})

H ⪰ J_uᵀJ_u ≻ 0 even for μ_z = 0, because the stage rows of J_u form a unit
(block) lower-triangular matrix; so the condensing limit μ_z → 0 (Albersmeyer
& Diehl 2010) needs no special case. H = L Lᵀ with L block lower-bidiagonal,
found by a forward `lax.scan` over layers (a Riccati recursion); solves are a
forward and a backward scan. Every array carries the sample axis, so each
scan step is a batch of small dense factorisations.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.linalg import solve_triangular

from ._linearise import Linearisation


class BlockTriFactor(NamedTuple):
    chol: jnp.ndarray  # (N, m, n, n) diagonal Cholesky blocks L_i
    kt: jnp.ndarray  # (N, m, n, n) K_iᵀ = L_i⁻¹ H[i, i+1] (last one zero)


def factor(lin: Linearisation, mu_z) -> BlockTriFactor:
    omega, a_t, c_mat = lin.omega, lin.a_t, lin.c_mat
    n = omega.shape[-1]
    ata = jnp.einsum("amok,amol->amkl", a_t, a_t)
    ctc = jnp.einsum("mok,mol->mkl", c_mat, c_mat)
    diag = jnp.concatenate([ata, ctc[None]], axis=0)
    diag = diag + (omega * omega + mu_z)[..., None] * jnp.eye(n, dtype=omega.dtype)
    upper = -jnp.swapaxes(a_t, -1, -2) * omega[1:, :, None, :]
    upper = jnp.concatenate([upper, jnp.zeros_like(diag[:1])], axis=0)

    def step(corr, blocks):
        d, u = blocks
        chol = jnp.linalg.cholesky(d - corr)
        kt = solve_triangular(chol, u, lower=True)
        return jnp.swapaxes(kt, -1, -2) @ kt, (chol, kt)

    _, (chol, kt) = jax.lax.scan(step, jnp.zeros_like(diag[0]), (diag, upper))
    return BlockTriFactor(chol, kt)


def solve(fac: BlockTriFactor, rhs):
    """Solve H X = rhs for rhs of shape (N, m, n, q)."""

    def forward(carry, blocks):
        chol, kt, b = blocks
        yv = solve_triangular(chol, b - carry, lower=True)
        return jnp.swapaxes(kt, -1, -2) @ yv, yv

    _, yv = jax.lax.scan(forward, jnp.zeros_like(rhs[0]), (fac.chol, fac.kt, rhs))

    def backward(x_next, blocks):
        chol, kt, yi = blocks
        xi = solve_triangular(chol, yi - kt @ x_next, lower=True, trans="T")
        return xi, xi

    _, xs = jax.lax.scan(backward, jnp.zeros_like(rhs[0]), (fac.chol, fac.kt, yv), reverse=True)
    return xs


def apply_ju(lin: Linearisation, v):
    """J_u v for v of shape (N, m, n, q): stage rows (N, m, n, q), output rows (m, ny, q)."""
    jv_h = lin.omega[..., None] * v
    shifted = jnp.einsum("amok,amkq->amoq", lin.a_t, v[:-1])
    jv_h = jv_h.at[1:].add(-shifted)
    jv_o = jnp.einsum("mok,mkq->moq", lin.c_mat, v[-1])
    return jv_h, jv_o


def apply_jut(lin: Linearisation, e_h, e_o):
    """J_uᵀ e for stage rows e_h (N, m, n, q) and output rows e_o (m, ny, q)."""
    out = lin.omega[..., None] * e_h
    out = out.at[:-1].add(-jnp.einsum("amok,amoq->amkq", lin.a_t, e_h[1:]))
    out = out.at[-1].add(jnp.einsum("mok,moq->mkq", lin.c_mat, e_o))
    return out
