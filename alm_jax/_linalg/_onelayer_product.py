"""CG's product S v for one hidden layer, with the sample axis last.

The product is `_matfree`'s J_θᵀ P J_θ v (+ C v with the curvature term),
written out for one hidden layer, where the states' elimination is the
closed form of `_onelayer`: per sample j, with s_0 = dW̃_0 x̃_j,

    e_h = c_h ⊙ s_0,  e_o = c_o dW̃_1 z̃_j,  t = H⁻¹(ω ⊙ e_h + Cᵀ e_o),
    p_h = e_h − ω ⊙ t,  p_o = e_o − C t,
    S v = [Σ_j (c_h ⊙ p_h + q ⊙ s_0) x̃_jᵀ ;  Σ_j c_oᵀ p_o z̃_jᵀ].

The per-unit factors are laid out (n, m), the transpose of
`Linearisation`'s, so that J_θᵀ's contraction over the samples is a GEMM
whose contracted axis is the minor (contiguous) one of its left operand;
with the samples first, XLA:CPU ran that contraction, (m, n)ᵀ(m, k), at
about three times the time OpenBLAS takes for the same GEMM (57 against
18 µs in float32, m = 1439, n = 50, k = 12). The curvature term's rows
q ⊙ s_0 join J_θᵀ's rows before that contraction instead of being
contracted on their own. With both, 100 products on UCI wine's 1×50
network took 20 instead of 30 ms with float32 CG and the curvature term
(the CPU's default there) and 30–31 instead of 31–32 ms in float64
Gauss–Newton (benchmarks/RESULTS.md, Round 27). The factors are
transposed once per step, outside CG's loop; x̃ and z̃ keep their layout
(transposing them too saved 2–4 % of a product and cost four more
kernels to compile).
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp

from ._linearise import Linearisation
from ._onelayer import WoodburyFactor


class ProductData(NamedTuple):
    zt_in: jnp.ndarray  # (m, kF) x̃, as in `Linearisation`
    zt_out: jnp.ndarray  # (m, kO) z̃
    c_h: jnp.ndarray  # (n, m)
    omega: jnp.ndarray  # (n, m)
    d_inv: jnp.ndarray  # (n, m) D⁻¹ of the Woodbury factor
    c_o: jnp.ndarray  # (ny, ny, m)
    k_inv: jnp.ndarray  # (ny, ny, m)
    w_out: jnp.ndarray  # (ny, n)
    q: jnp.ndarray | None  # (n, m) the curvature term's factor (`_curvature.curvature`), or None


def prepare(lin: Linearisation, fac: WoodburyFactor, q=None) -> ProductData:
    """The product's arrays for these samples, transposed once."""
    last = lambda a: jnp.moveaxis(a, 0, -1)  # noqa: E731
    return ProductData(lin.zt_in, lin.zt_out, lin.c_h[0].T, lin.omega[0].T, fac.d_inv[0].T, last(fac.c_o),
                       last(fac.k_inv[0]), fac.w_out, None if q is None else q.T)


def _times(a, v):
    """Per sample a_j v_j for a (p, q, m) and v (q, m)."""
    return jnp.einsum("abm,bm->am", a, v)


def _times_t(a, v):
    """Per sample a_jᵀ v_j for a (q, p, m) and v (q, m)."""
    return jnp.einsum("bam,bm->am", a, v)


def apply(d: ProductData, t_in, t_out):
    """S's two weight blocks for the direction (dW̃_0 (n, kF), dW̃_1 (ny, kO)), and t = H⁻¹J_uᵀJ_θ dθ, (n, m)."""
    s0 = jnp.einsum("ak,mk->am", t_in, d.zt_in)
    e_h = d.c_h * s0
    e_o = _times(d.c_o, jnp.einsum("ak,mk->am", t_out, d.zt_out))
    db = d.d_inv * (d.omega * e_h + d.w_out.T @ _times_t(d.c_o, e_o))
    # H⁻¹ = D⁻¹ − D⁻¹Cᵀ K⁻¹ C D⁻¹ (`_onelayer`), C = c_o W_out.
    t = db - d.d_inv * (d.w_out.T @ _times_t(d.c_o, _times(d.k_inv, _times(d.c_o, d.w_out @ db))))
    p_h = e_h - d.omega * t
    p_o = e_o - _times(d.c_o, d.w_out @ t)
    rows = d.c_h * p_h if d.q is None else d.c_h * p_h + d.q * s0
    return rows @ d.zt_in, _times_t(d.c_o, p_o) @ d.zt_out, t
