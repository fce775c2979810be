"""Exact structured Levenberg–Marquardt step by elimination of the states.

Solves  min_d ‖J d + r‖² + μ_θ‖dθ‖² + μ_z‖dZ‖²  over weights θ and states Z.

Samples couple only through the weights, so per sample the states are
eliminated (Schur complement, DESIGN.md §4.2):

    P_j = I − J_u,j H_j⁻¹ J_u,jᵀ,     H_j = J_u,jᵀ J_u,j + μ_z I
    S   = Σ_j J_θ,jᵀ P_j J_θ,j + μ_θ I,     S dθ = −Σ_j J_θ,jᵀ P_j r_j
    dz_j = −H_j⁻¹ J_u,jᵀ (r_j + J_θ,j dθ)

H_j is block tridiagonal over layers and is factored by a forward sweep
(`_blocktri`). For dense layers J_θ,j = diag(c)(rows ⊗ z̃ᵀ), so each block of S
is one matrix product over the sample axis (the Kronecker trick):

    S_st = Σ_j (z̃_s z̃_tᵀ) ⊗ (diag(c_s) P_j[s,t] diag(c_t))

costing ≈ 2·m·P² flops, with no per-sample weight Jacobian (m × P) ever formed.
The sum is accumulated over chunks of samples so that peak memory is
O(P² + chunk·(N·n)²); S is then solved by Cholesky.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.scipy.linalg import cho_factor, cho_solve

from .._chain import ChainSpec, DenseParams
from .._lifted import penalty_split
from . import _blocktri
from ._linearise import Linearisation, linearise

# Elements (not bytes) of per-chunk work arrays; ~512 MiB in float64.
_CHUNK_BUDGET = 1 << 26


def _layout(spec: ChainSpec):
    n, N = spec.width, spec.depth
    k_in = spec.n_in + int(spec.use_bias)
    k_hid = n + int(spec.use_bias)
    k_out = n + int(spec.use_final_bias)
    sizes = (n * k_in, (N - 1) * n * k_hid, spec.n_out * k_out)
    return k_in, k_hid, k_out, sizes


def num_weights(spec: ChainSpec) -> int:
    return sum(_layout(spec)[3])


def default_chunk(spec: ChainSpec, m: int) -> int:
    """Samples per chunk so that the per-chunk work arrays stay within budget."""
    n, N = spec.width, spec.depth
    n_r = N * n + spec.n_out
    per_sample = 6 * n_r * n_r + N * N * (n + 1) ** 2
    return int(max(1, min(m, _CHUNK_BUDGET // per_sample)))


def _projector(lin: Linearisation, fac) -> jnp.ndarray:
    """P_j for every sample, (m, n_r, n_r), rows/cols ordered [stages; output]."""
    omega = lin.omega
    N, m, n = omega.shape
    ny = lin.r_o.shape[-1]
    dt = omega.dtype
    eye_n = jnp.eye(n, dtype=dt)
    diag = omega[:, :, :, None, None] * jnp.eye(N, dtype=dt)[:, None, None, :, None] * eye_n[:, None, :]
    at_t = jnp.swapaxes(lin.a_t, -1, -2)
    at_t = jnp.concatenate([at_t, jnp.zeros_like(at_t[:1]) if N > 1 else jnp.zeros((1, m, n, n), dt)], 0)
    sup = -at_t[:, :, :, None, :] * jnp.eye(N, k=1, dtype=dt)[:, None, None, :, None]
    b_state = (diag + sup).reshape(N, m, n, N * n)
    b_out = jnp.zeros((N, m, n, ny), dt).at[-1].set(jnp.swapaxes(lin.c_mat, -1, -2))
    b = jnp.concatenate([b_state, b_out], axis=-1)  # J_uᵀ, (N, m, n, n_r)
    xs = _blocktri.solve(fac, b)  # H⁻¹ J_uᵀ
    jx_h, jx_o = _blocktri.apply_ju(lin, xs)
    jx = jnp.concatenate([jnp.moveaxis(jx_h, 0, 1).reshape(m, N * n, -1), jx_o], axis=1)
    return jnp.eye(N * n + ny, dtype=dt) - jx


def _pair(q, z1, z2):
    """Σ_j over samples of (z1 z2ᵀ) ⊗ q for grouped stages.

    q: (m, G1, o1, G2, o2); z1: (G1, m, k1); z2: (G2, m, k2).
    Returns the (G1·o1·k1, G2·o2·k2) block with rows ordered (layer, out, in).
    """
    g1, m, k1 = z1.shape
    g2, _, k2 = z2.shape
    o1, o2 = q.shape[2], q.shape[4]
    kr = jnp.einsum("gmk,hml->ghmkl", z1, z2)
    qt = jnp.transpose(q, (1, 3, 0, 2, 4))
    t = jnp.einsum("ghmkl,ghmab->gakhbl", kr, qt)
    return t.reshape(g1 * o1 * k1, g2 * o2 * k2)


def _reduced_chunk(params, spec, x, y, Z, Lam, sigma, beta, mu_z, mask):
    """This chunk's contribution to S (without μ_θ I) and to the gradient."""
    lin = linearise(params, spec, x, y, Z, Lam, sigma, beta)
    fac = _blocktri.factor(lin, mu_z)
    proj = _projector(lin, fac)
    N, m, n = lin.omega.shape
    ny = lin.r_o.shape[-1]
    c = jnp.concatenate([jnp.moveaxis(lin.c_h, 0, 1).reshape(m, N * n), lin.c_o], 1)
    c = c * mask[:, None]
    r = jnp.concatenate([jnp.moveaxis(lin.r_h, 0, 1).reshape(m, N * n), lin.r_o], 1)
    q = c[:, :, None] * proj * c[:, None, :]
    cpr = c * jnp.einsum("mab,mb->ma", proj, r)

    # Groups of stages: first (input-sized z̃), hidden (stacked), output.
    groups = [(lin.zt_in[None], slice(0, n), 1, n)]
    if N > 1:
        groups.append((lin.zt_hid, slice(n, N * n), N - 1, n))
    groups.append((lin.zt_out[None], slice(N * n, N * n + ny), 1, ny))

    rows = []
    for i, (z1, s1, g1, o1) in enumerate(groups):
        row = []
        for j, (z2, s2, g2, o2) in enumerate(groups):
            if j < i:
                row.append(None)
                continue
            qb = q[:, s1, s2].reshape(m, g1, o1, g2, o2)
            row.append(_pair(qb, z1, z2))
        rows.append(row)
    for i in range(len(groups)):
        for j in range(i):
            rows[i][j] = rows[j][i].T
    s_mat = jnp.block(rows)

    grads = []
    for z1, s1, g1, o1 in groups:
        cg = jnp.moveaxis(cpr[:, s1].reshape(m, g1, o1), 1, 0)
        grads.append(jnp.einsum("gma,gmk->gak", cg, z1).reshape(-1))
    return s_mat, jnp.concatenate(grads)


def _split_samples(arr, axis, n_chunks, chunk):
    pad = n_chunks * chunk - arr.shape[axis]
    widths = [(0, 0)] * arr.ndim
    widths[axis] = (0, pad)
    arr = jnp.pad(arr, widths)
    shape = arr.shape[:axis] + (n_chunks, chunk) + arr.shape[axis + 1 :]
    return jnp.moveaxis(arr.reshape(shape), axis, 0)


def reduced_system(params, spec, x, y, Z, Lam, sigma, mu_z, chunk=None):
    """S = Σ_j J_θᵀ P J_θ and g = Σ_j J_θᵀ P r, accumulated over sample chunks."""
    m = x.shape[0]
    chunk = default_chunk(spec, m) if chunk is None else int(min(chunk, m))
    n_chunks = -(-m // chunk)
    mask = jnp.ones((m,), x.dtype)
    beta = penalty_split(sigma)[0]
    if n_chunks == 1:
        return _reduced_chunk(params, spec, x, y, Z, Lam, sigma, beta, mu_z, mask)
    sig_per_sample = jnp.ndim(sigma) > 0
    xs = (
        _split_samples(x, 0, n_chunks, chunk),
        _split_samples(y, 0, n_chunks, chunk),
        _split_samples(Z, 1, n_chunks, chunk),
        _split_samples(Lam, 1, n_chunks, chunk),
        _split_samples(sigma, 1, n_chunks, chunk) if sig_per_sample else None,
        _split_samples(mask, 0, n_chunks, chunk),
    )
    if sig_per_sample:
        # Padded samples get σ = 1 so that λ/σ stays finite; they are masked out.
        pad_sigma = xs[4] + (1 - xs[5])[:, None, :, None]
        xs = xs[:4] + (pad_sigma,) + xs[5:]
    p = num_weights(spec)

    def body(acc, blk):
        xc, yc, zc, lc, sc, mc = blk
        s_c, g_c = _reduced_chunk(params, spec, xc, yc, zc, lc, sigma if sc is None else sc, beta, mu_z, mc)
        return (acc[0] + s_c, acc[1] + g_c), None

    init = (jnp.zeros((p, p), x.dtype), jnp.zeros((p,), x.dtype))
    (s_mat, g), _ = jax.lax.scan(body, init, xs)
    return s_mat, g


def unflatten_weights(vec, spec: ChainSpec) -> DenseParams:
    """Split a flat weight vector laid out as [W̃_in, W̃_hid..., W̃_out] (row-major)."""
    k_in, k_hid, k_out, sizes = _layout(spec)
    n, N, ny, nx = spec.width, spec.depth, spec.n_out, spec.n_in
    a, b = sizes[0], sizes[0] + sizes[1]
    t_in = vec[:a].reshape(n, k_in)
    t_hid = vec[a:b].reshape(N - 1, n, k_hid)
    t_out = vec[b:].reshape(ny, k_out)
    return DenseParams(
        w_in=t_in[:, :nx],
        b_in=t_in[:, nx] if spec.use_bias else None,
        w_hid=t_hid[..., :n],
        b_hid=t_hid[..., n] if spec.use_bias else None,
        w_out=t_out[:, :n],
        b_out=t_out[:, n] if spec.use_final_bias else None,
    )


def _weight_jvp(lin: Linearisation, dtheta: DenseParams, spec: ChainSpec):
    """J_θ dθ: stage rows (N, m, n), output rows (m, ny)."""

    def tilde(w, b):
        return w if b is None else jnp.concatenate([w, b[..., None]], axis=-1)

    t_in = tilde(dtheta.w_in, dtheta.b_in)
    t_hid = tilde(dtheta.w_hid, dtheta.b_hid)
    t_out = tilde(dtheta.w_out, dtheta.b_out)
    s_first = lin.zt_in @ t_in.T
    s_hid = jnp.einsum("amk,aok->amo", lin.zt_hid, t_hid)
    s_h = jnp.concatenate([s_first[None], s_hid], axis=0)
    return lin.c_h * s_h, lin.c_o * (lin.zt_out @ t_out.T)


@functools.partial(jax.jit, static_argnames=("spec", "chunk"))
def structured_step(params: DenseParams, spec: ChainSpec, x, y, Z, Lam, sigma, mu_w, mu_z, chunk=None):
    """Exact minimiser of ‖J d + r‖² + μ_w‖dθ‖² + μ_z‖dZ‖² (see module docstring).

    Returns:
        (dparams, dZ): weight step as `DenseParams`, state step shaped like Z.
    """
    s_mat, g = reduced_system(params, spec, x, y, Z, Lam, sigma, mu_z, chunk)
    s_mat = 0.5 * (s_mat + s_mat.T) + mu_w * jnp.eye(s_mat.shape[0], dtype=s_mat.dtype)
    dvec = -cho_solve(cho_factor(s_mat, lower=True), g)
    dparams = unflatten_weights(dvec, spec)

    lin = linearise(params, spec, x, y, Z, Lam, sigma)
    fac = _blocktri.factor(lin, mu_z)
    jt_h, jt_o = _weight_jvp(lin, dparams, spec)
    e_h = (lin.r_h + jt_h)[..., None]
    e_o = (lin.r_o + jt_o)[..., None]
    dZ = -_blocktri.solve(fac, _blocktri.apply_jut(lin, e_h, e_o))[..., 0]
    return dparams, dZ
