"""Exact structured Levenberg–Marquardt step by elimination of the states.

Solves  min_d ‖J d + r‖² + μ_θ‖dθ‖² + μ_z‖dZ‖²  over weights θ and states Z.

Samples couple only through the weights, so per sample the states are
eliminated (Schur complement, DESIGN.md §4.2):

    P_j = I − J_u,j H_j⁻¹ J_u,jᵀ,     H_j = J_u,jᵀ J_u,j + μ_z I
    S   = Σ_j J_θ,jᵀ P_j J_θ,j + μ_θ I,     S dθ = −Σ_j J_θ,jᵀ P_j r_j
    dz_j = −H_j⁻¹ J_u,jᵀ (r_j + J_θ,j dθ)

H_j is block tridiagonal over layers: it is factored by a forward sweep and
P_j formed from a backward selected-inversion sweep (`_blocktri`), or, with
one hidden layer, both in closed form (`_onelayer`). For dense layers J_θ,j = diag(c)(rows ⊗ z̃ᵀ), so each block of S
is one matrix product over the sample axis (the Kronecker trick):

    S_st = Σ_j (z̃_s z̃_tᵀ) ⊗ (c_sᵀ P_j[s,t] c_t)

(c_s = diag(c_s) for a stage, the loss factor c_N for the output rows)

costing ≈ 2·m·P² flops, with no per-sample weight Jacobian (m × P) ever formed.
The sum is accumulated over chunks of samples and, with several chunks, the
states' back-substitution refactors chunk by chunk, so that peak memory is
O(P² + chunk·(N·n)²) beyond the states; S is then solved by Cholesky.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.linalg import cho_solve

from .._chain import ChainSpec, DenseParams
from .._layers import LayerSpec
from .._lifted import penalty_split
from . import _blocktri, _onelayer
from ._linearise import Linearisation, linearise

# Elements (not bytes) of per-chunk work arrays; ~512 MiB in float64.
_CHUNK_BUDGET = 1 << 26
# On CPU the per-sample passes are bound by memory traffic; chunks of about a
# thousand samples keep them closer to cache and were 5-13 % faster than one
# chunk at m = 4000 (depth 2 and 4, width 32, float64, single-threaded XLA).
_CPU_CHUNK_CAP = 1024


def _layout(spec: ChainSpec):
    n, N = spec.width, spec.depth
    k_in = spec.n_in + int(spec.use_bias)
    k_hid = n + int(spec.use_bias)
    k_out = n + int(spec.use_final_bias)
    sizes = (n * k_in, (N - 1) * n * k_hid, spec.n_out * k_out)
    return k_in, k_hid, k_out, sizes


def num_weights(spec) -> int:
    if isinstance(spec, LayerSpec):
        return spec.n_weights
    return sum(_layout(spec)[3])


def default_chunk(spec: ChainSpec, m: int) -> int:
    """Samples per chunk so that the per-chunk work arrays stay within budget."""
    n, N = spec.width, spec.depth
    n_r = N * n + spec.n_out
    per_sample = 6 * n_r * n_r + N * N * (n + 1) ** 2
    chunk = _CHUNK_BUDGET // per_sample
    if jax.default_backend() == "cpu":
        chunk = min(chunk, _CPU_CHUNK_CAP)
    chunk = max(1, min(m, chunk))
    n_chunks = -(-m // chunk)
    return -(-m // n_chunks)  # equal chunks: least padding


def elimination(spec: ChainSpec):
    """The per-sample state elimination: closed form for one hidden layer, sweeps otherwise."""
    return _onelayer if spec.depth == 1 else _blocktri


def _pair(q, z1, z2):
    """Σ_j over samples of (z1 z2ᵀ) ⊗ q for grouped stages.

    q: (G1, G2, m, o1, o2); z1: (G1, m, k1); z2: (G2, m, k2).
    Returns the (G1·o1·k1, G2·o2·k2) block with rows ordered (layer, out, in).
    """
    g1, m, k1 = z1.shape
    g2, _, k2 = z2.shape
    o1, o2 = q.shape[3], q.shape[4]
    kr = jnp.einsum("gmk,hml->ghmkl", z1, z2)
    t = jnp.einsum("ghmkl,ghmab->gakhbl", kr, q)
    return t.reshape(g1 * o1 * k1, g2 * o2 * k2)


def _pair_symmetric(q, z):
    """`_pair(q, z, z)` for a symmetric group, computing only blocks g ≤ h."""
    g, m, k = z.shape
    o = q.shape[3]
    gi, hi = np.triu_indices(g)
    kr = z[gi][:, :, :, None] * z[hi][:, :, None, :]
    t = jnp.einsum("pmkl,pmab->pakbl", kr, q[gi, hi]).reshape(len(gi), o * k, o * k)
    out = jnp.zeros((g, g, o * k, o * k), q.dtype)
    out = out.at[hi, gi].set(jnp.swapaxes(t, -1, -2)).at[gi, hi].set(t)
    return jnp.transpose(out, (0, 2, 1, 3)).reshape(g * o * k, g * o * k)


def _reduced_chunk(params, spec, x, y, Z, Lam, sigma, beta, mu_z, mask):
    """This chunk's contribution to S (without μ_θ I) and to the gradient, and its factor."""
    lin = linearise(params, spec, x, y, Z, Lam, sigma, beta)
    elim = elimination(spec)
    fac = elim.factor(lin, mu_z)
    proj = elim.projector(lin, fac)
    N = lin.omega.shape[0]
    c_h = lin.c_h * mask[None, :, None]
    c_o = lin.c_o * mask[:, None, None]
    q_ss = c_h[:, None, :, :, None] * proj.ss * c_h[None, :, :, None, :]
    q_so = c_h[..., None] * jnp.einsum("smap,mpb->smab", proj.so, c_o)
    q_oo = jnp.einsum("mpa,mpq,mqb->mab", c_o, proj.oo, c_o)
    pr_h = jnp.einsum("stmab,tmb->sma", proj.ss, lin.r_h) + jnp.einsum("smao,mo->sma", proj.so, lin.r_o)
    pr_o = jnp.einsum("smao,sma->mo", proj.so, lin.r_h) + jnp.einsum("mop,mp->mo", proj.oo, lin.r_o)

    z_in, z_out = lin.zt_in[None], lin.zt_out[None]
    blocks = {("F", "F"): _pair(q_ss[:1, :1], z_in, z_in),
              ("F", "O"): _pair(q_so[:1, None], z_in, z_out),
              ("O", "O"): _pair(q_oo[None, None], z_out, z_out)}
    names = ["F", "O"]
    if N > 1:
        names = ["F", "H", "O"]
        blocks["F", "H"] = _pair(q_ss[:1, 1:], z_in, lin.zt_hid)
        blocks["H", "H"] = _pair_symmetric(q_ss[1:, 1:], lin.zt_hid)
        blocks["H", "O"] = _pair(q_so[1:, None], lin.zt_hid, z_out)
    s_mat = jnp.block([[blocks[a, b] if (a, b) in blocks else blocks[b, a].T for b in names] for a in names])

    return s_mat, weight_vjp(lin, pr_h * mask[None, :, None], pr_o * mask[:, None]), fac


def _split_samples(arr, axis, n_chunks, chunk):
    pad = n_chunks * chunk - arr.shape[axis]
    widths = [(0, 0)] * arr.ndim
    widths[axis] = (0, pad)
    arr = jnp.pad(arr, widths)
    shape = arr.shape[:axis] + (n_chunks, chunk) + arr.shape[axis + 1 :]
    return jnp.moveaxis(arr.reshape(shape), axis, 0)


def _chunks(spec, x, y, Z, Lam, sigma, chunk):
    """Per-sample arrays split into equal chunks (the last padded), with the chunk mask."""
    m = x.shape[0]
    chunk = default_chunk(spec, m) if chunk is None else int(min(chunk, m))
    n_chunks = -(-m // chunk)
    mask = jnp.ones((m,), x.dtype)
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
    return n_chunks, xs


def reduced_system(params, spec, x, y, Z, Lam, sigma, mu_z, chunk=None):
    """S = Σ_j J_θᵀ P J_θ and g = Σ_j J_θᵀ P r, accumulated over sample chunks.

    Returns `(S, g, fac)`. With a single chunk `fac` is the per-sample block
    factor of H, reused by the state back-substitution; with several it is
    None and the back-substitution refactors chunk by chunk, so that peak
    memory stays O(P² + chunk·N·n²) beyond the states, whatever m is.
    """
    n_chunks, xs = _chunks(spec, x, y, Z, Lam, sigma, chunk)
    return _reduce(params, spec, (x, y, Z, Lam, sigma), penalty_split(sigma)[0], mu_z, n_chunks, xs)


def _reduce(params, spec, data, beta, mu_z, n_chunks, xs):
    """`reduced_system` on data already split by `_chunks`."""
    x, y, Z, Lam, sigma = data
    if n_chunks == 1:
        return _reduced_chunk(params, spec, x, y, Z, Lam, sigma, beta, mu_z, jnp.ones((x.shape[0],), x.dtype))
    p = num_weights(spec)

    def body(acc, blk):
        xc, yc, zc, lc, sc, mc = blk
        s_c, g_c, _ = _reduced_chunk(params, spec, xc, yc, zc, lc, sigma if sc is None else sc, beta, mu_z, mc)
        return (acc[0] + s_c, acc[1] + g_c), None

    init = (jnp.zeros((p, p), x.dtype), jnp.zeros((p,), x.dtype))
    (s_mat, g), _ = jax.lax.scan(body, init, xs)
    return s_mat, g, None


def back_substitute(lin: Linearisation, elim, fac, dparams: DenseParams, spec: ChainSpec):
    """dZ = −H⁻¹ J_uᵀ (r + J_θ dθ) for the samples of `lin`, given the factor of H."""
    jt_h, jt_o = weight_jvp(lin, dparams, spec)
    rhs = _blocktri.apply_jut(lin, (lin.r_h + jt_h)[..., None], (lin.r_o + jt_o)[..., None])
    return -elim.solve(fac, rhs)[..., 0]


def _state_step(params, spec, x, y, Z, Lam, sigma, beta, mu_z, dparams, fac=None):
    """`back_substitute` for these samples, factoring H unless `fac` is given."""
    lin = linearise(params, spec, x, y, Z, Lam, sigma, beta)
    elim = elimination(spec)
    if fac is None:
        fac = elim.factor(lin, mu_z)
    return back_substitute(lin, elim, fac, dparams, spec)


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


def layer_blocks(p: DenseParams):
    """The augmented blocks W̃ = [W b] of the first, hidden (stacked) and output layers."""

    def tilde(w, b):
        return w if b is None else jnp.concatenate([w, b[..., None]], axis=-1)

    return tilde(p.w_in, p.b_in), tilde(p.w_hid, p.b_hid), tilde(p.w_out, p.b_out)


def weight_vjp(lin: Linearisation, w_h, w_o):
    """J_θᵀ w for stage rows w_h (N, m, n) and output rows w_o (m, ny), as a flat weight vector."""
    cw = lin.c_h * w_h
    return jnp.concatenate([
        jnp.einsum("ma,mk->ak", cw[0], lin.zt_in).reshape(-1),
        jnp.einsum("gma,gmk->gak", cw[1:], lin.zt_hid).reshape(-1),
        jnp.einsum("moa,mo,mk->ak", lin.c_o, w_o, lin.zt_out).reshape(-1),
    ])


def weight_jvp(lin: Linearisation, dtheta: DenseParams, spec: ChainSpec):
    """J_θ dθ: stage rows (N, m, n), output rows (m, ny)."""

    t_in, t_hid, t_out = layer_blocks(dtheta)
    s_first = lin.zt_in @ t_in.T
    s_hid = jnp.einsum("amk,aok->amo", lin.zt_hid, t_hid)
    s_h = jnp.concatenate([s_first[None], s_hid], axis=0)
    return lin.c_h * s_h, jnp.einsum("mab,mb->ma", lin.c_o, lin.zt_out @ t_out.T)


# Shifts τ = √ε·10^k, k < 8; should all fail, the step is the limit of the
# shifted solve, b/τ (a scaled gradient step).
_SHIFT_RETRIES = 8


def solve_spd(s_mat, g, mu):
    """(S + μI)⁻¹ g for symmetric S ⪰ 0, robust in float32.

    Three remedies (Higham, *Accuracy and Stability of Numerical Algorithms*,
    §10.3 and §12.1): symmetric diagonal scaling to unit diagonal; when the
    Cholesky factorisation breaks down (round-off makes a singular S look
    indefinite), retries with a shift τ on the scaled diagonal, τ = √ε and
    then ten times larger each time until the solve is finite (Nocedal &
    Wright, *Numerical Optimization*, Alg. 3.3); and one step of iterative
    refinement. A step from a shifted factor is a damped step, still a
    descent direction; past the last shift, the scaled gradient.
    """
    diag = jnp.diagonal(s_mat) + mu
    d = jnp.where(diag > 0, 1 / jnp.sqrt(jnp.where(diag > 0, diag, 1)), 1)
    a = d[:, None] * s_mat * d[None, :] + jnp.diag(mu * d * d)
    b = d * g

    def solve(shift):
        chol = jnp.linalg.cholesky(a + shift * jnp.eye(a.shape[0], dtype=a.dtype))
        xs = cho_solve((chol, True), b)
        return xs + cho_solve((chol, True), b - a @ xs)

    # Breakdown is judged on the solution rather than the factor, which also
    # catches a finite factor whose vanishing pivot makes the solve overflow.
    # A float32 S assembled on an H100 had a diagonal entry of -6e-5 where
    # the CPU's was +2e-5; one retry at √ε left that solve NaN.
    jitter = jnp.sqrt(jnp.finfo(a.dtype).eps)
    ten = jnp.asarray(10, a.dtype)

    def failed(carry):
        k, xs = carry
        return (k < _SHIFT_RETRIES) & ~jnp.all(jnp.isfinite(xs))

    def retry(carry):
        k, _ = carry
        return k + 1, solve(jitter * ten ** k.astype(a.dtype))

    _, xs = jax.lax.while_loop(failed, retry, (jnp.asarray(0, jnp.int32), solve(jnp.zeros((), a.dtype))))
    xs = jnp.where(jnp.all(jnp.isfinite(xs)), xs, b / (jitter * ten**_SHIFT_RETRIES))
    return d * xs


@functools.partial(jax.jit, static_argnames=("spec", "chunk"))
def structured_step(params: DenseParams, spec: ChainSpec, x, y, Z, Lam, sigma, mu_w, mu_z, chunk=None):
    """Exact minimiser of ‖J d + r‖² + μ_w‖dθ‖² + μ_z‖dZ‖² (see module docstring).

    Returns:
        (dparams, dZ): weight step as `DenseParams`, state step shaped like Z.
    """
    beta = penalty_split(sigma)[0]
    n_chunks, xs = _chunks(spec, x, y, Z, Lam, sigma, chunk)
    s_mat, g, fac = _reduce(params, spec, (x, y, Z, Lam, sigma), beta, mu_z, n_chunks, xs)
    dvec = -solve_spd(0.5 * (s_mat + s_mat.T), g, mu_w)
    dparams = unflatten_weights(dvec, spec)
    if fac is not None:
        return dparams, _state_step(params, spec, x, y, Z, Lam, sigma, beta, mu_z, dparams, fac)

    def body(_, blk):
        xc, yc, zc, lc, sc, _mc = blk
        return None, _state_step(params, spec, xc, yc, zc, lc, sigma if sc is None else sc, beta, mu_z, dparams)

    _, dz = jax.lax.scan(body, None, xs)  # (n_chunks, N, chunk, n)
    dz = jnp.moveaxis(dz, 0, 1).reshape(dz.shape[1], -1, dz.shape[-1])[:, : x.shape[0]]
    return dparams, dz
