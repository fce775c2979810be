"""The structured step for general layer chains (`_layers.LayerSpec`).

Same elimination as `_schur`, without assuming dense layers. Per sample j the
residual rows are ρ_j = [r(ŷ_j, y_j)/√β ; w ⊙ (h_j + λ_j/σ_j)] (output, then
the D constraint rows). The states' block J_u,j ((n_y + D) × D) comes from
`jax.jacfwd` on that one sample (small), and

    H_j = J_u,jᵀ J_u,j + μ_z I    (D × D, inverted per sample by Cholesky)
    P_j = I − J_u,j H_j⁻¹ J_u,jᵀ
    S   = Σ_j J_θ,jᵀ P_j J_θ,j + μ_θ I,    S dθ = −Σ_j J_θ,jᵀ P_j ρ_j
    dz_j = −H_j⁻¹ J_u,jᵀ (ρ_j + J_θ,j dθ)

Exact (`structured_step`): J_θ,j is formed by forward-mode differentiation
over chunks of samples and S accumulated chunk by chunk, O(m·(n_y + D)·P²)
time and O(chunk·(n_y + D)·P + P²) memory: no Kronecker shortcut, so the
`eqx.nn.MLP` path is faster for plain dense chains. Matrix free
(`matfree_step`): S v through one `jax.jvp` and one `jax.vjp` of the batched
residual per CG iteration, memory O(P + m·D²).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import lineax as lx
from jax.flatten_util import ravel_pytree
from jax.scipy.linalg import cho_solve

from .._layers import LayerSpec, sample_constraints, sample_output
from .._lifted import penalty_split
from ._schur import solve_spd

# Elements of the per-chunk weight Jacobian (n_y + D) × P per sample; ~256 MiB in float64.
_JAC_BUDGET = 1 << 25


def _rows(flat_params, u, x, y, lam, sig, unravel, spec: LayerSpec, beta, sig_scalar):
    """ρ for one sample: [r/√β ; w ⊙ (h + λ/σ)]."""
    params = unravel(flat_params)
    r = spec.loss.residual(sample_output(params, spec, u), y) / jnp.sqrt(beta)
    c = sample_constraints(params, spec, x, u) + lam / sig
    if not sig_scalar:
        c = jnp.sqrt(sig / beta) * c
    return jnp.concatenate([r, c])


def _setup(params, spec, x, y, Z, Lam, sigma):
    flat, unravel = ravel_pytree(params)
    beta = penalty_split(sigma)[0]
    sig_scalar = jnp.ndim(sigma) == 0
    sig = jnp.broadcast_to(sigma, Z.shape)[0] if not sig_scalar else jnp.zeros((Z.shape[1], 0), Z.dtype)

    def rho(fp, u, xj, yj, lj, sj):
        return _rows(fp, u, xj, yj, lj, sigma if sig_scalar else sj, unravel, spec, beta, sig_scalar)

    data = (Z[0], x, y, Lam[0], sig)
    return flat, unravel, rho, data


def _state_blocks(flat, rho, data, mu_z):
    """Per sample: ρ_j, J_u,j and H_j⁻¹ (formed once from the Cholesky factor).

    The explicit inverse turns every later solve into a batched matrix
    product, which XLA:CPU runs far faster than batched triangular solves
    (as in `_blocktri`); H_j is well conditioned (H ⪰ J_uᵀJ_u ≻ 0, see there).
    """

    def one(u, xj, yj, lj, sj):
        r = rho(flat, u, xj, yj, lj, sj)
        ju = jax.jacfwd(rho, argnums=1)(flat, u, xj, yj, lj, sj)
        eye = jnp.eye(u.shape[0], dtype=u.dtype)
        h = ju.T @ ju + mu_z * eye
        return r, ju, cho_solve((jnp.linalg.cholesky(h), True), eye)

    return jax.vmap(one)(*data)


def _project(ju, hinv, e):
    """P e = e − J_u H⁻¹ J_uᵀ e for every sample (e: (m, rows, q))."""
    return e - ju @ (hinv @ (jnp.swapaxes(ju, -1, -2) @ e))


def _jt_apply(flat, rho, data, v):
    """J_θ v for all samples, (m, rows)."""
    return jax.jvp(lambda fp: jax.vmap(lambda *d: rho(fp, *d))(*data), (flat,), (v,))[1]


def _back_substitute(flat, rho, data, r, ju, hinv, dflat):
    rhs = r + _jt_apply(flat, rho, data, dflat)
    return -jnp.einsum("mab,mrb,mr->ma", hinv, ju, rhs)


def _chunk_size(spec: LayerSpec, m, rows):
    per_sample = max(1, rows * spec.n_weights)
    chunk = max(1, min(m, _JAC_BUDGET // per_sample))
    n_chunks = -(-m // chunk)
    return -(-m // n_chunks), n_chunks


def _pad(a, total):
    return jnp.pad(a, [(0, total - a.shape[0])] + [(0, 0)] * (a.ndim - 1))


@functools.partial(jax.jit, static_argnames=("spec", "chunk"))
def structured_step(params, spec: LayerSpec, x, y, Z, Lam, sigma, mu_w, mu_z, chunk=None):
    """Exact minimiser of ‖J d + ρ‖² + μ_w‖dθ‖² + μ_z‖dZ‖² (module docstring)."""
    flat, unravel, rho, data = _setup(params, spec, x, y, Z, Lam, sigma)
    r, ju, hinv = _state_blocks(flat, rho, data, mu_z)
    m, rows = r.shape
    p = flat.size
    if chunk is None:
        chunk, n_chunks = _chunk_size(spec, m, rows)
    else:
        chunk = int(min(chunk, m))
        n_chunks = -(-m // chunk)
    total = chunk * n_chunks
    # Padded samples carry a zero mask; their residual and weight-Jacobian rows are zeroed
    # (their H⁻¹ is padded with zeros, so they contribute nothing).
    mask = _pad(jnp.ones((m,), x.dtype), total)
    blocks = [_pad(a, total).reshape((n_chunks, chunk) + a.shape[1:]) for a in (*data, r, ju, hinv)]
    sig_blk = blocks[4]
    if sig_blk.shape[-1]:
        sig_blk = sig_blk + (1 - mask.reshape(n_chunks, chunk))[..., None]  # keeps λ/σ finite when padded
    xs = (blocks[0], blocks[1], blocks[2], blocks[3], sig_blk, blocks[5], blocks[6], blocks[7],
          mask.reshape(n_chunks, chunk))

    def body(acc, blk):
        u, xj, yj, lj, sj, rj, juj, cj, mj = blk
        jt = jax.vmap(lambda *d: jax.jacfwd(rho)(flat, *d))(u, xj, yj, lj, sj) * mj[:, None, None]
        q = _project(juj, cj, jt)
        s_c = jnp.einsum("mrp,mrq->pq", jt, q)
        g_c = jnp.einsum("mrp,mr->p", q, rj * mj[:, None])
        return (acc[0] + s_c, acc[1] + g_c), None

    init = (jnp.zeros((p, p), x.dtype), jnp.zeros((p,), x.dtype))
    (s_mat, g), _ = jax.lax.scan(body, init, xs)
    dflat = -solve_spd(0.5 * (s_mat + s_mat.T), g, mu_w)
    du = _back_substitute(flat, rho, data, r, ju, hinv, dflat)
    return unravel(dflat), du[None]


@functools.partial(jax.jit, static_argnames=("spec", "max_steps"))
def matfree_step(params, spec: LayerSpec, x, y, Z, Lam, sigma, mu_w, mu_z, rtol, max_steps=100):
    """Inexact minimiser by CG on the reduced system, S applied by jvp/vjp; returns (dparams, dZ, steps)."""
    flat, unravel, rho, data = _setup(params, spec, x, y, Z, Lam, sigma)
    r, ju, hinv = _state_blocks(flat, rho, data, mu_z)

    def batched(fp):
        return jax.vmap(lambda *d: rho(fp, *d))(*data)

    _, vjp = jax.vjp(batched, flat)

    def s_apply(v):
        e = _jt_apply(flat, rho, data, v)
        return vjp(_project(ju, hinv, e[..., None])[..., 0])[0] + mu_w * v

    g = vjp(_project(ju, hinv, r[..., None])[..., 0])[0]
    struct = jax.ShapeDtypeStruct(g.shape, g.dtype)
    op = lx.FunctionLinearOperator(s_apply, struct, tags=lx.positive_semidefinite_tag)
    sol = lx.linear_solve(op, -g, lx.CG(rtol=rtol, atol=0.0, max_steps=max_steps), throw=False)
    du = _back_substitute(flat, rho, data, r, ju, hinv, sol.value)
    return unravel(sol.value), du[None], sol.stats["num_steps"]


def initial_damping(params, spec: LayerSpec, x, y, Z, Lam, sigma, tau=1e-3, probes=8):
    """τ·max diag(J_θᵀJ_θ), the diagonal estimated from Rademacher probes (E[(J_θᵀv)²] = diag)."""
    flat, unravel, rho, data = _setup(params, spec, x, y, Z, Lam, sigma)

    def batched(fp):
        return jax.vmap(lambda *d: rho(fp, *d))(*data)

    r, vjp = jax.vjp(batched, flat)
    v = jax.random.rademacher(jax.random.key(0), (probes,) + r.shape, r.dtype)
    diag = jnp.mean(jax.vmap(lambda e: vjp(e)[0] ** 2)(v), axis=0)
    top = jnp.max(diag) if diag.size else jnp.zeros((), r.dtype)
    return tau * jnp.maximum(top, jnp.finfo(r.dtype).tiny)
