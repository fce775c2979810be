"""Per-sample elimination of the states: block-tridiagonal Cholesky sweeps.

With the states' Jacobian J_u (block lower-bidiagonal over layers, see
`_linearise`) and state damping μ_z, the normal matrix

    H = J_uᵀ J_u + μ_z I

is block tridiagonal over the N hidden layers (s = ω φ'(pre) per stage):

    H[i, i]    = diag(ω_i² + μ_z) + Ã_{i+1}ᵀ Ã_{i+1}     (i < N−1)
    H[N−1,N−1] = diag(ω_{N−1}² + μ_z) + Cᵀ C
    H[i, i+1]  = −Ã_{i+1}ᵀ diag(ω_{i+1}),   Ã_a = diag(s_a) W_a

H ⪰ J_uᵀJ_u ≻ 0 even for μ_z = 0, because the stage rows of J_u form an
invertible block lower-triangular matrix; so the condensing limit μ_z → 0
(Albersmeyer & Diehl 2010) needs no special case. H = L Lᵀ with L block
lower-bidiagonal is found by a forward sweep over layers (a Riccati
recursion). Up to `UNROLL_MAX_DEPTH` hidden layers the sweeps are unrolled
and the blocks kept as one array per layer: XLA:CPU copied each layer's
(m, n, n) block out of the stacked array on every sweep of a `lax.scan`,
and the solve runs once per CG product (4×16 network on UCI concrete:
212 → 138 ms per update). Deeper chains keep the scans: at depth 8 the
unrolled sweeps compiled 1.4–2.7 s longer and trained no lower in 20 s
(benchmarks/RESULTS.md, Round 6).

The diagonal blocks' inverses L_i⁻¹ are formed explicitly: every later
operation is then a batched matrix product, which XLA runs several
times faster than batched triangular solves, and products with the shared
weights W_a are single large GEMMs over the sample axis.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.linalg import solve_triangular

from ._linearise import Linearisation, every_kth


# Deepest chain whose sweeps are unrolled over layers (module docstring).
UNROLL_MAX_DEPTH = 4


class BlockTriFactor(NamedTuple):
    """L_i⁻¹ and K_iᵀ = L_i⁻¹ H[i, i+1], each (m, n, n).

    Tuples over layers when the sweeps are unrolled, stacked arrays when
    they are scanned.
    """

    linv: tuple | jnp.ndarray  # N blocks
    kt: tuple | jnp.ndarray  # N-1 blocks


def _gram_scaled(s, w):
    """Wᵀ diag(s²) W for every sample: (..., m, o) × (..., o, k) → (..., m, k, k), one GEMM."""
    ww = w[..., :, :, None] * w[..., :, None, :]
    return jnp.einsum("...mo,...okl->...mkl", s * s, ww)


def _tri_inv(chol):
    eye = jnp.broadcast_to(jnp.eye(chol.shape[-1], dtype=chol.dtype), chol.shape)
    return solve_triangular(chol, eye, lower=True)


def _upper_times(linv, w, s_omega):
    """L_i⁻¹ H[i, i+1] = −L_i⁻¹ W_{i+1}ᵀ diag(s_{i+1} ω_{i+1}) (shared W: one GEMM)."""
    return -jnp.einsum("mij,oj->mio", linv, w) * s_omega[:, None, :]


def factor(lin: Linearisation, mu_z) -> BlockTriFactor:
    omega, c_mat = lin.omega, lin.c_mat
    N, m, n = omega.shape
    eye = jnp.eye(n, dtype=omega.dtype)
    base = (omega * omega + mu_z)[..., None] * eye
    last = base[-1] + jnp.einsum("mok,mol->mkl", c_mat, c_mat)
    diag = base[:-1] + _gram_scaled(lin.s_hid, lin.w_hid)
    s_omega = lin.s_hid * omega[1:]

    def step(corr, blocks):
        d, w, so = blocks
        linv = _tri_inv(jnp.linalg.cholesky(d - corr))
        kt = _upper_times(linv, w, so)
        return jnp.swapaxes(kt, -1, -2) @ kt, (linv, kt)

    corr = jnp.zeros((m, n, n), omega.dtype)
    if N <= UNROLL_MAX_DEPTH:
        linv, kt = [], []
        for i in range(N - 1):
            corr, (li, ki) = step(corr, (diag[i], lin.w_hid[i], s_omega[i]))
            linv.append(li)
            kt.append(ki)
        linv.append(_tri_inv(jnp.linalg.cholesky(last - corr)))
        return BlockTriFactor(tuple(linv), tuple(kt))

    corr, (linv, kt) = jax.lax.scan(step, corr, (diag, lin.w_hid, s_omega))
    linv_last = _tri_inv(jnp.linalg.cholesky(last - corr))
    return BlockTriFactor(jnp.concatenate([linv, linv_last[None]], 0), kt)


def subsample(fac: BlockTriFactor, k: int, offset) -> BlockTriFactor:
    """The factor of every k-th sample from `offset`: each sample's blocks are its own, so a slice, not a refactoring."""
    axis = 0 if isinstance(fac.linv, tuple) else 1  # (m, n, n) per layer, or stacked (N, m, n, n)
    return jax.tree_util.tree_map(lambda a: every_kth(a, axis, k, offset), fac)


def solve(fac: BlockTriFactor, rhs):
    """Solve H X = rhs for rhs of shape (N, m, n, q): a forward and a backward sweep over layers."""
    if isinstance(fac.linv, tuple):
        return _solve_unrolled(fac, rhs)
    kt_pad = jnp.concatenate([fac.kt, jnp.zeros_like(fac.linv[:1])], 0)
    kt_prev = jnp.concatenate([jnp.zeros_like(fac.linv[:1]), fac.kt], 0)

    def forward(y_prev, blocks):
        linv, ktp, b = blocks
        yi = linv @ (b - jnp.swapaxes(ktp, -1, -2) @ y_prev)
        return yi, yi

    _, yv = jax.lax.scan(forward, jnp.zeros_like(rhs[0]), (fac.linv, kt_prev, rhs))

    def backward(x_next, blocks):
        linv, kt, yi = blocks
        xi = jnp.swapaxes(linv, -1, -2) @ (yi - kt @ x_next)
        return xi, xi

    _, xs = jax.lax.scan(backward, jnp.zeros_like(rhs[0]), (fac.linv, kt_pad, yv), reverse=True)
    return xs


def _solve_unrolled(fac: BlockTriFactor, rhs):
    ys = [fac.linv[0] @ rhs[0]]
    for i in range(1, rhs.shape[0]):
        ys.append(fac.linv[i] @ (rhs[i] - jnp.swapaxes(fac.kt[i - 1], -1, -2) @ ys[-1]))
    xs = [jnp.swapaxes(fac.linv[-1], -1, -2) @ ys[-1]]
    for i in range(rhs.shape[0] - 2, -1, -1):
        xs.append(jnp.swapaxes(fac.linv[i], -1, -2) @ (ys[i] - fac.kt[i] @ xs[-1]))
    return jnp.stack(xs[::-1])


def _stacked(blocks):
    return jnp.stack(blocks) if isinstance(blocks, tuple) else blocks


def inverse_blocks(fac: BlockTriFactor):
    """Σ = H⁻¹ for every sample, block-major: Σ[i, j] of shape (m, n, n), (N, N, m, n, n).

    Selected inversion by a backward scan (Takahashi et al. 1973): from
    Lᵀ Σ = L⁻¹,

        Σ_{N−1,N−1} = L_{N−1}⁻ᵀ L_{N−1}⁻¹
        Σ_{i,j}     = −G_i Σ_{i+1,j}          (j > i),  G_i = L_i⁻ᵀ K_iᵀ
        Σ_{i,i}     = L_i⁻ᵀ L_i⁻¹ − Σ_{i,i+1} G_iᵀ

    and the lower blocks by symmetry. Each step is one batched product of an
    n × n block with a block row.
    """
    linv = _stacked(fac.linv)
    N, m, n, _ = linv.shape
    lt = jnp.swapaxes(linv, -1, -2)
    own = lt @ linv  # L_i⁻ᵀ L_i⁻¹
    blk = jnp.arange(N)
    last = jnp.zeros((N, m, n, n), linv.dtype).at[N - 1].set(own[-1])
    if N == 1:
        return last[None]
    g = lt[:-1] @ _stacked(fac.kt)

    def step(row_next, inputs):
        i, gi, own_i = inputs
        tmp = -jnp.einsum("mab,jmbc->jmac", gi, row_next)
        off = jax.lax.dynamic_index_in_dim(tmp, i + 1, axis=0, keepdims=False)  # Σ_{i,i+1}
        diag = own_i - off @ jnp.swapaxes(gi, -1, -2)
        row = jnp.where((blk > i)[:, None, None, None], tmp, 0)
        row = jax.lax.dynamic_update_index_in_dim(row, diag, i, axis=0)
        return row, row

    _, rows = jax.lax.scan(step, last, (blk[:-1], g, own[:-1]), reverse=True)
    upper = jnp.concatenate([rows, last[None]], 0)  # zero below the block diagonal
    lower = jnp.swapaxes(jnp.swapaxes(upper, 0, 1), -1, -2)
    below = (blk[None, :] < blk[:, None])[:, :, None, None, None]  # j < i
    return jnp.where(below, lower, upper)


class Projector(NamedTuple):
    """Blocks of P = I − J_u Σ J_uᵀ, block-major so that pair slices are contiguous."""

    ss: jnp.ndarray  # (N, N, m, n, n) stage–stage
    so: jnp.ndarray  # (N, m, n, ny) stage–output
    oo: jnp.ndarray  # (m, ny, ny) output–output


def projector(lin: Linearisation, fac: BlockTriFactor) -> Projector:
    """P = I − J_u Σ J_uᵀ for every sample.

    J_u's stage blocks are diagonal (ω) or a diagonal times a weight matrix
    shared by all samples (Ã_a = diag(s_a) W_a), so their products are
    elementwise scalings and large GEMMs over the sample axis; the output
    block C (n_y × n per sample) and the selected inversion above are the
    per-sample work.
    """
    sig = inverse_blocks(fac)  # (N_i, N_t, m, n, n)
    omega = lin.omega
    N, m, n = omega.shape
    # T = Σ J_uᵀ: stage columns (N_i, N_t, m, n, n), output columns (N_i, m, n, ny)
    t_st = sig * omega[None, :, :, None, :]
    if N > 1:
        shifted = jnp.einsum("itmak,tok->itmao", sig[:, :-1], lin.w_hid)
        t_st = t_st.at[:, 1:].add(-shifted * lin.s_hid[None, :, :, None, :])
    t_out = jnp.einsum("imak,mok->imao", sig[:, -1], lin.c_mat)
    # J_u T: stage rows
    rt_st = omega[:, None, :, :, None] * t_st
    rt_so = omega[..., None] * t_out
    if N > 1:
        rt_st = rt_st.at[1:].add(-jnp.einsum("sok,stmkb->stmob", lin.w_hid, t_st[:-1])
                                 * lin.s_hid[:, None, :, :, None])
        rt_so = rt_so.at[1:].add(-jnp.einsum("sok,smkb->smob", lin.w_hid, t_out[:-1]) * lin.s_hid[..., None])
    rt_oo = jnp.einsum("mok,mkb->mob", lin.c_mat, t_out[-1])
    dt = omega.dtype
    ss = jnp.eye(N, dtype=dt)[:, :, None, None, None] * jnp.eye(n, dtype=dt) - rt_st
    oo = jnp.eye(rt_oo.shape[-1], dtype=dt) - rt_oo
    return Projector(ss, -rt_so, oo)


def apply_jut(lin: Linearisation, e_h, e_o):
    """J_uᵀ e for stage rows e_h (N, m, n, q) and output rows e_o (m, ny, q)."""
    out = lin.omega[..., None] * e_h
    if e_h.shape[0] > 1:
        se = lin.s_hid[..., None] * e_h[1:]
        out = out.at[:-1].add(-jnp.einsum("aok,amoq->amkq", lin.w_hid, se))
    out = out.at[-1].add(jnp.einsum("mok,moq->mkq", lin.c_mat, e_o))
    return out


def stage_output_grams(lin: Linearisation):
    """Means over samples of c_a P[a,a] c_a per stage (N, n, n) and c_oᵀ P_oo c_o (n_y × n_y).

    The second Kronecker factors of the reduced system's diagonal blocks
    (`_matfree`'s preconditioner), in the condensing limit μ_z → 0. There P
    is the orthogonal projector onto the null space of J_uᵀ, which has
    dimension n_y per sample (J_u has N·n columns, N·n stage rows with an
    invertible block-triangular part, and n_y output rows): P = E (EᵀE)⁻¹ Eᵀ
    with E's output rows I and its stage rows from J_uᵀE = 0 by a backward
    sweep,

        e_{N−1} = −Cᵀ / ω_{N−1},    e_a = W_{a+1}ᵀ (s_{a+1} e_{a+1}) / ω_a,

    GEMMs with the shared weights. For μ_z > 0 the true P exceeds this one
    by O(μ_z / ω²) on range(J_u) (1e-6 μ_θ by default). It replaced four
    Rademacher probes of P, which cost four block-tridiagonal solves per
    update and ≈ 1.5 s of compilation on a 4×16 network and were noisier.

    The sweep is a `lax.scan` at every depth: unrolled, a 16×8 network's
    sweep and per-stage Grams compiled to 124 of the update's 482 fused
    kernels (benchmarks/RESULTS.md, Round 30). It runs once per update, not
    per CG product, so the block copies that keep `factor` and `solve`
    unrolled on shallow chains do not matter here.
    """
    omega, c_h = lin.omega, lin.c_h
    N, m, n = omega.shape
    ny = lin.c_o.shape[-1]
    e_last = -jnp.swapaxes(lin.c_mat, -1, -2) / omega[-1][..., None]  # (m, n, ny)

    def back(e, blocks):
        w, s, om = blocks
        e = jnp.einsum("ok,moq->mkq", w, s[..., None] * e) / om[..., None]
        return e, e

    _, es = jax.lax.scan(back, e_last, (lin.w_hid, lin.s_hid, omega[:-1]), reverse=True)
    es = jnp.concatenate([es, e_last[None]], 0)
    # EᵀE (m, ny, ny)
    gram = jnp.eye(ny, dtype=omega.dtype) + jnp.einsum("amkq,amkr->mqr", es, es)
    m_inv = 1 / gram if ny == 1 else jnp.linalg.inv(gram)
    ce = c_h[..., None] * es  # (N, m, n, ny)
    g_h = jnp.einsum("amkq,amlq->akl", ce, ce @ m_inv) / m
    g_out = jnp.einsum("mab,mac->bc", lin.c_o, m_inv @ lin.c_o) / m
    return g_h, g_out

