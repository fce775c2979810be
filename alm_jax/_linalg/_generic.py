"""The structured step for general layer chains (`_layers.LayerSpec`).

Same elimination as `_schur`, without assuming dense layers. Per sample the
residual rows are ρ = [r(ŷ, y)/√β ; c_0 ; … ; c_{N−1}], c_a = ω_a ⊙ (h_a + λ_a/σ_a)
(ω_a = √(σ_a/β), 1 for a scalar penalty). The Jacobian blocks come from
`jax.jacfwd` on one layer and one sample at a time (small):

    A_a = ∂f_a/∂z_a  (n_{a+1} × n_a),   C = L ∂f_N/∂z_N / √β,

so J_u is block lower-bidiagonal (diag(ω_a) and −diag(ω_a)A_a, C for the
output) and H = J_uᵀJ_u + μ_z I block tridiagonal with blocks of differing
sizes, factored by a block Cholesky sweep over the layers (unrolled: widths
differ) with the inverses of the diagonal factors formed explicitly, as in
`_blocktri`. Then, as in `_schur`,

    P   = I − J_u H⁻¹ J_uᵀ,    S = Σ_j J_θᵀ P J_θ + μ_θ I,   S dθ = −Σ_j J_θᵀ P ρ
    dz  = −H⁻¹ J_uᵀ (ρ + J_θ dθ)

Both steps apply S v = J_θᵀ P J_θ v + μ_θ v through J_θ linearised once
(`jax.linearize`, its transpose for J_θᵀ) and the per-sample factor (O(m·N·n²)
per product beyond the network's own passes; memory O(P + m·N·n²)). Matrix
free (`matfree_step`): CG on S. Exact (`structured_step`): S materialised,
then Cholesky. Its blocks between plain dense layers (`eqx.nn.Linear`) are
sums over samples of Kronecker products (`_dense_gram`, one projection of
Σ n_{a+1} columns per sample and one GEMM per pair of layers, as for an
`eqx.nn.MLP`); the rows of S for every other weight come from matrix-free
products batched over weight directions, O(P_other) network passes.

The sweep over layers is unrolled (widths differ). Padding every block to the
widest and sweeping with `lax.scan` was measured and rejected: it cut the
compile time of the CG step by a quarter but made each product ~5× slower
on XLA:CPU (batched small products inside a scan).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from .._layers import LayerSpec, sample_constraints, sample_output, split_states
from .._lifted import penalty_split
from . import _probes
from ._blocktri import _tri_inv
from ._matfree import FORCING_MAX, forcing_term, pcg, step_limit
from ._schur import solve_spd

# Elements of the residual-sized work arrays of one batch of weight directions (~256 MiB in float64).
_JAC_BUDGET = 1 << 25


class Blocks(NamedTuple):
    """One sample's linearisation (vmapped: every leaf gains a leading sample axis)."""

    omega: list  # ω_a, (n_{a+1},)
    a_mat: list  # A_1 … A_{N−1}
    c_mat: jnp.ndarray  # (n_y, n_N)
    l_out: jnp.ndarray  # (n_y, n_y) L/√β, the output rows' factor (for the dense-layer assembly)


class Factor(NamedTuple):
    linv: list  # L_i⁻¹ per state block
    k: list  # K_i = L_i⁻¹ H[i, i+1]


def _rows_layout(spec: LayerSpec):
    """Row offsets of [output, c_0, …, c_{N−1}] in ρ."""
    return tuple(int(v) for v in np.cumsum((0, spec.n_out) + spec.widths))


def _weights(sig, spec, beta, sig_scalar):
    if sig_scalar:
        return [jnp.ones((n,), beta.dtype) for n in spec.widths]
    return [jnp.sqrt(s / beta) for s in split_states(spec, sig)]


def _sample_rows(params, spec: LayerSpec, x, u, y, lam, sig, beta, sig_scalar):
    """ρ for one sample; its JVP is the (generalised) Gauss–Newton Jacobian."""
    r = spec.loss.residual(sample_output(params, spec, u), y) / jnp.sqrt(beta)
    c = sample_constraints(params, spec, x, u) + lam / (beta if sig_scalar else sig)
    if not sig_scalar:
        c = jnp.sqrt(sig / beta) * c
    return jnp.concatenate([r, c])


def _sample_blocks(params, spec: LayerSpec, x, u, y, lam, sig, beta, sig_scalar) -> Blocks:
    zs = split_states(spec, u)
    prev = [x] + zs[:-1]
    # A_a = ∂f_a/∂z_a for a = 1..N−1; the first layer's input is data, not a state.
    a_mat = [jax.jacfwd(spec.layer(params, a))(prev[a]) for a in range(1, spec.depth)]
    last = spec.layer(params, spec.depth)
    l_out = spec.loss.factor(last(zs[-1]), y)[1] / jnp.sqrt(beta)
    c_mat = l_out @ jax.jacfwd(last)(zs[-1])
    return Blocks(_weights(sig, spec, beta, sig_scalar), a_mat, c_mat, l_out)


def _factor(b: Blocks, mu_z) -> Factor:
    """Block Cholesky of H = J_uᵀJ_u + μ_z I for one sample (module docstring)."""
    n = len(b.omega)
    linv, ks, corr = [], [], None
    for i in range(n):
        w2 = b.omega[i] ** 2
        d = jnp.diag(w2 + mu_z)
        if i + 1 < n:
            upper = b.a_mat[i].T * b.omega[i + 1][None, :] ** 2  # −H[i, i+1] = A_{i+1}ᵀ diag(ω_{i+1}²)
            d = d + upper @ b.a_mat[i]
        else:
            d = d + b.c_mat.T @ b.c_mat
        if corr is not None:
            d = d - corr
        li = _tri_inv(jnp.linalg.cholesky(d))
        linv.append(li)
        if i + 1 < n:
            k = -li @ upper
            ks.append(k)
            corr = k.T @ k
    return Factor(linv, ks)


def _solve(fac: Factor, rhs):
    """H⁻¹ rhs for one sample, rhs a list of (n_i, q) blocks."""
    n = len(fac.linv)
    ys = []
    for i in range(n):
        v = rhs[i] if i == 0 else rhs[i] - fac.k[i - 1].T @ ys[-1]
        ys.append(fac.linv[i] @ v)
    xs = [None] * n
    for i in reversed(range(n)):
        v = ys[i] if i == n - 1 else ys[i] - fac.k[i] @ xs[i + 1]
        xs[i] = fac.linv[i].T @ v
    return xs


def _jut(b: Blocks, rows, e):
    """J_uᵀ e for one sample: e (R, q) → list of state blocks (n_i, q)."""
    n = len(b.omega)
    cons = [e[rows[i + 1]:rows[i + 2]] for i in range(n)]
    out = []
    for i in range(n):
        v = b.omega[i][:, None] * cons[i]
        if i + 1 < n:
            v = v - b.a_mat[i].T @ (b.omega[i + 1][:, None] * cons[i + 1])
        else:
            v = v + b.c_mat.T @ e[: rows[1]]
        out.append(v)
    return out


def _ju(b: Blocks, v):
    """J_u v for one sample: list of state blocks (n_i, q) → (R, q)."""
    n = len(b.omega)
    cons = []
    for i in range(n):
        c = v[i] if i == 0 else v[i] - b.a_mat[i - 1] @ v[i - 1]
        cons.append(b.omega[i][:, None] * c)
    return jnp.concatenate([b.c_mat @ v[-1]] + cons)


def _project(b: Blocks, fac: Factor, rows, e):
    """P e = e − J_u H⁻¹ J_uᵀ e for one sample, e (R, q)."""
    return e - _ju(b, _solve(fac, _jut(b, rows, e)))


def _project_samples(blocks: Blocks, fac: Factor, rows, e):
    """`_project` for every sample: blocks and factor batched over samples, e (m, R, q)."""
    return jax.vmap(lambda bj, fj, ej: _project(bj, fj, rows, ej))(blocks, fac, e)


def _state_step(b: Blocks, fac: Factor, rows, rhs):
    """−H⁻¹ J_uᵀ rhs for one sample, concatenated (D,)."""
    return -jnp.concatenate(_solve(fac, _jut(b, rows, rhs[:, None])))[:, 0]


def _setup(params, spec, x, y, Z, Lam, sigma):
    beta = penalty_split(sigma)[0]
    sig_scalar = jnp.ndim(sigma) == 0
    sig = jnp.broadcast_to(sigma, Z.shape)[0] if not sig_scalar else jnp.zeros((Z.shape[1], 0), Z.dtype)
    return beta, sig_scalar, (x, Z[0], y, Lam[0], sig)


def _batched_rows(params, spec, data, beta, sig_scalar):
    """ρ for all samples as a function of the flat weights (for jvp/vjp)."""
    flat, unravel = ravel_pytree(params)

    def rows_of(fp):
        p = unravel(fp)
        return jax.vmap(lambda *d: _sample_rows(p, spec, *d, beta, sig_scalar))(*data)

    return flat, unravel, rows_of


def _linearise(params, spec, data, beta, sig_scalar, mu_z):
    def one(*d):
        b = _sample_blocks(params, spec, *d, beta, sig_scalar)
        return b, _factor(b, mu_z)

    return jax.vmap(one)(*data)


class _Reduced(NamedTuple):
    """What both steps share: J_θ (linearised once), its transpose, the per-sample factor and P."""

    flat: jnp.ndarray
    unravel: object
    jvp: object  # dθ ↦ J_θ dθ, (m, R)
    vjp: object
    r: jnp.ndarray
    blocks: Blocks
    fac: Factor
    rows: tuple

    def project(self, e):
        """P e for every sample, e (m, R)."""
        return _project_samples(self.blocks, self.fac, self.rows, e[..., None])[..., 0]

    def gradient(self):
        """J_θᵀ P ρ, the reduced system's right-hand side (negated)."""
        return self.vjp(self.project(self.r))[0]

    def residual_gradient(self):
        """∇f = Jᵀρ of f = ½‖ρ‖²: over the weights (flat) and the states (m, D)."""
        g_z = jax.vmap(lambda bj, ej: jnp.concatenate(_jut(bj, self.rows, ej[:, None]))[:, 0])(self.blocks, self.r)
        return self.vjp(self.r)[0], g_z

    def s_times(self, v):
        """J_θᵀ P J_θ v."""
        return self.vjp(self.project(self.jvp(v)))[0]

    def finish(self, dflat):
        """(dparams, dZ) from the weight step: the states' back-substitution, reusing the factor."""
        rhs = self.r + self.jvp(dflat)
        du = jax.vmap(lambda bj, fj, v: _state_step(bj, fj, self.rows, v))(self.blocks, self.fac, rhs)
        return self.unravel(dflat), du[None]


def _reduced(params, spec, x, y, Z, Lam, sigma, mu_z) -> _Reduced:
    beta, sig_scalar, data = _setup(params, spec, x, y, Z, Lam, sigma)
    flat, unravel, rows_of = _batched_rows(params, spec, data, beta, sig_scalar)
    r, jvp = jax.linearize(rows_of, flat)
    vjp = jax.linear_transpose(jvp, flat)
    b, fac = _linearise(params, spec, data, beta, sig_scalar, mu_z)
    return _Reduced(flat, unravel, jvp, vjp, r, b, fac, _rows_layout(spec))


class _Dense(NamedTuple):
    """Static description of the chain's plain dense layers (`eqx.nn.Linear`)."""

    layers: tuple  # layer indices a
    index: tuple  # per layer, positions of its weights in the flat vector (P_a,)
    perm: tuple  # per layer, those weights' positions in the (out, in + 1) augmented layout
    other: np.ndarray  # positions of every other weight


def _dense_layers(params, spec: LayerSpec) -> _Dense:
    sizes = [sum(leaf.size for leaf in jax.tree_util.tree_leaves(p)) for p in params]
    offs = np.cumsum([0] + sizes)
    layers, index, perm = [], [], []
    for a, p in enumerate(params):
        static = spec.statics[a].thaw()
        if type(static) is not eqx.nn.Linear or p.weight is None or p.weight.ndim != 2:
            continue
        o, k = p.weight.shape
        aug = np.arange(o * (k + 1)).reshape(o, k + 1)
        labels = eqx.tree_at(lambda q: q.weight, p, aug[:, :k])
        if p.bias is not None:
            labels = eqx.tree_at(lambda q: q.bias, labels, aug[:, k])
        layers.append(a)
        index.append(np.arange(offs[a], offs[a + 1]))
        perm.append(np.concatenate([np.ravel(leaf) for leaf in jax.tree_util.tree_leaves(labels)]))
    taken = np.concatenate(index) if index else np.zeros(0, int)
    return _Dense(tuple(layers), tuple(index), tuple(perm), np.setdiff1d(np.arange(offs[-1]), taken))


def _dense_gram(red: _Reduced, spec: LayerSpec, dense: _Dense, x, Z):
    """The dense layers' blocks of S, sums over samples of Kronecker products.

    For a dense layer a, ∂ρ/∂W_a = K_a (I ⊗ z̃_aᵀ) with z̃_a = [z_a; 1] its
    input (bias in the last column) and K_a its rows' left factor (−diag(ω_a)
    for a hidden layer, L/√β for the output). Hence

        S_ab = Σ_j (K_aᵀ P_ab K_b)_j ⊗ (z̃_a z̃_bᵀ)_j,

    with the n_{a+1} × n_{b+1} matrices K_aᵀ P_ab K_b from projecting the K_b
    columns once per sample, and each sum one GEMM over the sample axis of
    (z̃_a ⊗ z̃_b) against K_aᵀP_abK_b (the factorisation K-FAC approximates,
    Martens & Grosse 2015; here the sum is exact). Samples are taken in
    chunks that keep the work arrays within `_JAC_BUDGET` elements.

    Returns {(i, j): block} for i ≤ j over `dense.layers`, in the flat order.
    """
    rows, n_out, m = _rows_layout(spec), spec.n_out, x.shape[0]
    zs = [x] + split_states(spec, Z[0])
    spans = [(0, n_out) if a == spec.depth else (rows[a + 1], rows[a + 2]) for a in dense.layers]
    widths = [hi - lo for lo, hi in spans]
    cols = np.cumsum([0] + widths)
    ztil = [jnp.concatenate([zs[a], jnp.ones_like(zs[a][:, :1])], axis=1) for a in dense.layers]
    ins = [z.shape[1] for z in ztil]
    pairs = [(i, j) for i in range(len(widths)) for j in range(i, len(widths))]
    per_sample = 2 * rows[-1] * cols[-1] + max(ins[i] * ins[j] + widths[i] * widths[j] for i, j in pairs)
    chunk = int(max(1, min(m, _JAC_BUDGET // per_sample)))
    n_chunks = -(-m // chunk)

    def chunked(a, zero):
        """(m, …) → (n_chunks, chunk, …); padded samples repeat the last one, or are 0 if `zero`."""
        pad = [(0, n_chunks * chunk - m)] + [(0, 0)] * (a.ndim - 1)
        a = jnp.pad(a, pad) if zero else jnp.pad(a, pad, mode="edge")
        return a.reshape((n_chunks, chunk) + a.shape[1:])

    def left_factors(b: Blocks):
        om = jnp.concatenate(b.omega)
        e = jnp.zeros((rows[-1], cols[-1]), om.dtype)
        for (lo, hi), c0, a in zip(spans, cols, dense.layers):
            k_a = b.l_out if a == spec.depth else -jnp.diag(om[lo - n_out:hi - n_out])
            e = e.at[lo:hi, c0:c0 + hi - lo].set(k_a)
        return e

    def body(acc, blk):
        b, f, zt = blk
        e = jax.vmap(left_factors)(b)
        pe = _project_samples(b, f, rows, e)
        m_mat = jnp.einsum("jrp,jrq->jpq", e, pe)
        out = []
        for (i, j), s_ij in zip(pairs, acc):
            kr = (zt[i][:, :, None] * zt[j][:, None, :]).reshape(chunk, -1)
            mij = m_mat[:, cols[i]:cols[i + 1], cols[j]:cols[j + 1]].reshape(chunk, -1)
            out.append(s_ij + kr.T @ mij)  # ((k, l), (o, p))
        return tuple(out), None

    init = tuple(jnp.zeros((ins[i] * ins[j], widths[i] * widths[j]), red.flat.dtype) for i, j in pairs)
    # Padded samples get finite copies of the last sample's factors and zero inputs z̃, so they add nothing.
    xs = (jax.tree_util.tree_map(lambda a: chunked(a, False), (red.blocks, red.fac)),
          [chunked(z, True) for z in ztil])
    sums, _ = jax.lax.scan(body, init, (xs[0][0], xs[0][1], xs[1]))
    blocks = {}
    for (i, j), s_ij in zip(pairs, sums):
        t = s_ij.reshape(ins[i], ins[j], widths[i], widths[j]).transpose(2, 0, 3, 1)  # (o, k, p, l)
        t = t.reshape(widths[i] * ins[i], widths[j] * ins[j])
        blocks[i, j] = t[np.ix_(dense.perm[i], dense.perm[j])]
    return blocks


def _assemble(red: _Reduced, spec: LayerSpec, params, x, Z, chunk):
    """S = Σ_j J_θᵀ P J_θ: Kronecker blocks for dense layers, matrix-free columns for the rest."""
    p = red.flat.size
    dense = _dense_layers(params, spec)

    def columns(idx):
        if idx.size == 0:
            return jnp.zeros((0, p), red.flat.dtype)
        batch = chunk if chunk is not None else max(1, _JAC_BUDGET // max(1, red.r.size))
        eye = jnp.zeros((idx.size, p), red.flat.dtype).at[np.arange(idx.size), idx].set(1)
        return jax.lax.map(red.s_times, eye, batch_size=int(min(batch, idx.size)))

    cols = columns(dense.other)  # rows of S for the other weights
    s_mat = jnp.zeros((p, p), red.flat.dtype).at[dense.other].set(cols).at[:, dense.other].set(cols.T)
    if dense.layers:
        for (i, j), blk in _dense_gram(red, spec, dense, x, Z).items():
            s_mat = s_mat.at[np.ix_(dense.index[i], dense.index[j])].set(blk)
            s_mat = s_mat.at[np.ix_(dense.index[j], dense.index[i])].set(blk.T)
    return s_mat


@functools.partial(jax.jit, static_argnames=("spec", "chunk"))
def structured_step(params, spec: LayerSpec, x, y, Z, Lam, sigma, mu_w, mu_z, chunk=None):
    """Exact minimiser of ‖J d + ρ‖² + μ_w‖dθ‖² + μ_z‖dZ‖² (module docstring).

    S's blocks for pairs of plain dense layers (`eqx.nn.Linear`) are
    assembled as sums of Kronecker products (`_dense_gram`); the rows of S
    for every other weight come from the matrix-free product, in batches of
    weight directions sized to the memory budget (`chunk`, if given, is the
    number of directions per batch).
    """
    red = _reduced(params, spec, x, y, Z, Lam, sigma, mu_z)
    s_mat = _assemble(red, spec, params, x, Z, chunk)
    g = red.gradient()
    return red.finish(-solve_spd(0.5 * (s_mat + s_mat.T), g, mu_w))


@functools.partial(jax.jit, static_argnames=("spec", "max_steps"))
def matfree_step(params, spec: LayerSpec, x, y, Z, Lam, sigma, mu_w, mu_z, rtol=None, max_steps=100,
                 forcing_max=FORCING_MAX, cap=None):
    """Inexact minimiser by CG on the reduced system, S applied by jvp/vjp; returns (dparams, dZ, steps).

    rtol None: the forcing term min(forcing_max, √‖∇f‖) (`_matfree.forcing_term`).
    """
    red = _reduced(params, spec, x, y, Z, Lam, sigma, mu_z)
    g = red.gradient()
    if rtol is None:
        rtol = forcing_term(red.residual_gradient(), forcing_max)
    value, steps = pcg(lambda v: red.s_times(v) + mu_w * v, -g, rtol, step_limit(max_steps, cap))
    dparams, dz = red.finish(value)
    return dparams, dz, steps


def initial_damping(params, spec: LayerSpec, x, y, Z, Lam, sigma, tau=1e-3, probes=8):
    """τ·max diag(J_θᵀJ_θ), the diagonal estimated from Rademacher probes (E[(J_θᵀv)²] = diag)."""
    beta, sig_scalar, data = _setup(params, spec, x, y, Z, Lam, sigma)
    flat, _, rows_of = _batched_rows(params, spec, data, beta, sig_scalar)
    r, vjp = jax.vjp(rows_of, flat)
    v = _probes.rademacher((probes,) + r.shape, r.dtype)
    diag = jnp.mean(jax.vmap(lambda e: vjp(e)[0] ** 2)(v), axis=0)
    top = jnp.max(diag) if diag.size else jnp.zeros((), r.dtype)
    return tau * jnp.maximum(top, jnp.finfo(r.dtype).tiny)
