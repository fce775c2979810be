"""Matrix-free structured step: conjugate gradients on the reduced weight system.

The exact step (`_schur`) forms S = Σ_j J_θ,jᵀ P_j J_θ,j + μ_θ I, P² numbers.
Here S is only applied (DESIGN.md §4.4):

    S v = J_θᵀ P (J_θ v) + μ_θ v,     P e = e − J_u H⁻¹ J_uᵀ e

where J_θ v and J_θᵀ w are the Kronecker forms of the dense layers (GEMMs over
the sample axis) and H⁻¹ reuses the per-sample block factor. One product costs
about two passes over the data; memory is O(P + m·N·n²), whatever P² is.
The states follow as in the exact step, dZ = −H⁻¹J_uᵀ(r + J_θ dθ), with
H⁻¹J_uᵀJ_θ dθ accumulated by CG from its products instead of another solve.

With one hidden layer the product is `_onelayer_product`'s: the same
algebra with the elimination in closed form, on arrays laid out with the
samples last, where XLA:CPU's GEMMs over the samples ran faster.

CG (`pcg`) can be preconditioned (`precondition=True`, the inner `cg`'s
default for an MLP) by per-layer Kronecker factors
(K-FAC style, Martens & Grosse 2015): layer a's diagonal block Σ_j (z̃z̃ᵀ) ⊗ (c P_j[a,a] c) is
approximated by m·(A_a ⊗ G_a), A_a the mean of z̃z̃ᵀ and G_a the mean of
c P[a,a] c (exact for one hidden layer, `_onelayer.stage_output_grams`;
exact in the condensing limit for deeper chains,
`_blocktri.stage_output_grams`), inverted exactly through the
eigenvectors of A_a and G_a.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .._chain import ChainSpec
from . import _blocktri, _curvature, _onelayer, _onelayer_product
from ._linearise import Linearisation, every_kth, linearise, subsample
from ._schur import elimination, layer_blocks, num_weights, unflatten_weights, weight_jvp, weight_vjp

# Bytes the explicit reduced system may take before `auto` goes matrix-free.
_EXPLICIT_BYTES_CPU = 2 << 30
_EXPLICIT_FRACTION_ACCEL = 0.25
# The forcing term's cap η_max (`forcing_term`): the inner `cg`'s default.
FORCING_MAX = 0.1


def pcg(apply, b, rtol, max_steps, precondition=None, has_aux=False):
    """Preconditioned CG for S x = b from x = 0, stopped by a norm-wise test; returns (x, steps).

    With `has_aux`, `apply(v)` returns (S v, T v) for a linear map T, and
    the result is (x, steps, T x), T x accumulated from the products at no
    further cost (x = Σ α_k p_k, so T x = Σ α_k T p_k).

    The test is lineax's with atol = rtol·rms(b) under the RMS norm: CG stops
    once rms(r / (rtol·(rms(b) + |b|))) ≤ 1, i.e. whenever ‖r‖ ≤ rtol‖b‖ and
    never with rms(r) > rtol·(rms(b) + max|b|), and the last update passes
    the same test at the iterate's scale. lineax's own CG did not fit, for
    three measured reasons:

    * its test is componentwise (|r_i| ≤ rtol·|b_i| for every i, atol = 0),
      which a component with b_i ≈ 0 never passes, so CG ran to its cap
      whatever the forcing term (the norm-wise test trained 0.73× as low on
      the UCI sets at 10 s);
    * its periodic recomputation of the true residual is a `lax.cond` in
      the loop, which on XLA:CPU made every iteration ≈ 3× slower (12 → 4 ms
      at m = 7373, P = 501) whether or not the branch ran; here the
      recursive residual is kept (a drifted one only ends CG early or late,
      and the LM gain ratio still judges the step);
    * it starts with a product S·x_0 even for x_0 = 0: one product of ≈ 2.5
      ms on UCI kin8nm, in an update of ≈ 50–65 ms (10–20 % more updates in
      the same time; benchmarks/RESULTS.md).
    """
    pre = (lambda v: v) if precondition is None else precondition
    atol = rtol * _rms(b)

    def converged(r, dx, x):
        return (_rms(r / (atol + rtol * jnp.abs(b))) <= 1) & (_rms(dx / (atol + rtol * jnp.abs(x))) <= 1)

    def cond(c):
        x, r, _, gamma, dx, k, _ = c
        return (gamma > 0) & (k < max_steps) & ~converged(r, dx, x)

    # Each iteration preconditions first and multiplies second, from p = 0
    # and γ = 1: the usual order computes M b once before the loop, which
    # put a second copy of the preconditioner into the compiled program
    # (15 of 190 fused kernels of a 1×50 network's `update`). The arithmetic is
    # the same; γ = zᵀr = 0 (r = 0) gives α = 0 and ends the loop.
    def body(c):
        x, r, p, gamma, _, k, tx = c
        z = pre(r)
        gamma_new = jnp.vdot(z, r)
        p = z + (gamma_new / gamma) * p
        sp, tp = apply(p) if has_aux else (apply(p), None)
        curv = jnp.vdot(p, sp)
        alpha = jnp.where(curv > 0, gamma_new / jnp.where(curv > 0, curv, 1), 0)
        tx = None if tx is None else tx + alpha * tp
        # γ = 0 ends the loop at a direction of nonpositive curvature (an
        # indefinite S, `second_order`): the iterate so far is the step.
        return x + alpha * p, r - alpha * sp, p, jnp.where(curv > 0, gamma_new, 0), alpha * p, k + 1, tx

    one = jnp.ones((), b.dtype)
    tx0 = None
    if has_aux:
        t_shape = jax.eval_shape(lambda v: apply(v)[1], b)
        tx0 = jnp.zeros(t_shape.shape, t_shape.dtype)
    init = (jnp.zeros_like(b), b, jnp.zeros_like(b), one, jnp.full_like(b, jnp.inf), jnp.asarray(0, jnp.int32), tx0)
    x, *_, steps, tx = jax.lax.while_loop(cond, body, init)
    return (x, steps, tx) if has_aux else (x, steps)


def step_limit(max_steps, cap):
    """CG's product limit: the static `max_steps`, or a traced `cap` below it."""
    return max_steps if cap is None else jnp.minimum(cap, max_steps)


def forcing_term(grad, forcing_max):
    """η = min(η_max, √‖∇f‖), ∇f a pytree, f = ½‖r‖² (Dembo, Eisenstat & Steihaug 1982)."""
    return jnp.minimum(forcing_max, jnp.sqrt(optax.tree_utils.tree_norm(grad)))


def residual_gradient(lin: Linearisation):
    """∇f = Jᵀr of f = ½‖r‖² over the weights and the states, from the linearisation.

    Two GEMM passes; a separate backward pass through the residual had been
    one forward and one backward pass more per update, only for the
    forcing term.
    """
    g_w = weight_vjp(lin, lin.r_h, lin.r_o)
    g_z = _blocktri.apply_jut(lin, lin.r_h[..., None], lin.r_o[..., None])[..., 0]
    return g_w, g_z


def _rms(v):
    return jnp.sqrt(jnp.mean(v * v))


def explicit_fits(spec: ChainSpec) -> bool:
    """Whether the P × P reduced system (and its Cholesky factor) fits the budget.

    On an accelerator the budget is a quarter of the device's memory; on CPU,
    2 GiB (P ≈ 16 000 in float64).
    """
    p = num_weights(spec)
    need = 2 * p * p * jnp.dtype(spec.dtype).itemsize
    limit = _EXPLICIT_BYTES_CPU
    dev = jax.devices()[0]
    if dev.platform != "cpu":
        stats = dev.memory_stats() or {}
        if "bytes_limit" in stats:
            limit = _EXPLICIT_FRACTION_ACCEL * stats["bytes_limit"]
    return need <= limit


def apply_ju(lin: Linearisation, u):
    """J_u u for state directions u (N, m, n): stage rows (N, m, n), output rows (m, ny)."""
    out_h = lin.omega * u
    if u.shape[0] > 1:
        out_h = out_h.at[1:].add(-lin.s_hid * jnp.einsum("amk,aok->amo", u[:-1], lin.w_hid))
    # C_j u = c_j (W_out u): a GEMM over the samples (see `_onelayer`).
    return out_h, jnp.einsum("mab,mb->ma", lin.c_o, u[-1] @ lin.w_out.T)


def _project(lin, fac, elim, e_h, e_o):
    """(P e, t) per sample: P e = e − J_u t, t = H⁻¹ J_uᵀ e."""
    t = elim.solve(fac, _blocktri.apply_jut(lin, e_h[..., None], e_o[..., None]))[..., 0]
    jh, jo = apply_ju(lin, t)
    return (e_h - jh, e_o - jo), t


def _layer_factors(spec, lin, fac):
    """Eigen-decompositions of the Kronecker factors (A_a, G_a) of every layer block."""
    m = lin.r_o.shape[0]
    if spec.depth == 1:
        g_in, g_out = _onelayer.stage_output_grams(lin, fac)
        gs = [g_in, jnp.zeros((0,) + g_in.shape, g_in.dtype), g_out]
    else:
        g_h, g_out = _blocktri.stage_output_grams(lin)
        gs = [g_h[0], g_h[1:], g_out]
    As = [lin.zt_in.T @ lin.zt_in / m,
          jnp.einsum("gmk,gml->gkl", lin.zt_hid, lin.zt_hid) / m,
          lin.zt_out.T @ lin.zt_out / m]
    return [(_eigh(g), _eigh(a)) for g, a in zip(gs, As)]


def _eigh(a):
    if a.shape[-1] == 1:  # one output: no LAPACK call to compile
        return a[..., 0], jnp.ones_like(a)
    return jnp.linalg.eigh(a)


def _kron_inverse(eig_g, eig_a, v, m, mu):
    """(m·A ⊗ G + μ I)⁻¹ v for v shaped (..., out, in) (row-major layer blocks)."""
    (lg, ug), (la, ua) = eig_g, eig_a
    ugt = jnp.swapaxes(ug, -1, -2)
    t = ugt @ v @ ua
    t = t / (m * jnp.maximum(lg, 0)[..., :, None] * jnp.maximum(la, 0)[..., None, :] + mu)
    return ug @ t @ jnp.swapaxes(ua, -1, -2)


def _preconditioner(spec, factors, m, mu):
    blocks = layer_blocks(unflatten_weights(jnp.zeros((num_weights(spec),), spec.dtype), spec))
    bounds = np.cumsum([0] + [b.size for b in blocks])

    def apply(v):
        parts = []
        for (eg, ea), blk, a, b in zip(factors, blocks, bounds[:-1], bounds[1:]):
            if b > a:  # no hidden-to-hidden block with one hidden layer
                parts.append(_kron_inverse(eg, ea, v[a:b].reshape(blk.shape), m, mu).reshape(-1))
        return jnp.concatenate(parts)

    return apply


@functools.partial(jax.jit, static_argnames=("spec", "max_steps", "precondition", "solve_dtype", "stride"))
def matfree_step(params, spec: ChainSpec, x, y, Z, Lam, sigma, mu_w, mu_z, rtol=None, max_steps=100,
                 precondition=False, forcing_max=FORCING_MAX, solve_dtype=None, curvature_weight=None, cap=None,
                 stride=1, offset=0):
    """Inexact minimiser of ‖J d + r‖² + μ_w‖dθ‖² + μ_z‖dZ‖² by CG on the reduced system.

    CG stops at relative residual ≈ rtol (the norm-wise test of `pcg`)
    or after `max_steps` products (or `cap`, a traced count, if fewer);
    rtol None takes the forcing term min(forcing_max, √‖∇f‖)
    (`forcing_term`, from the model-dtype linearisation). `solve_dtype`
    (None: the model's) is the dtype CG and its products run in; the step
    is returned in the model's dtype.
    `curvature_weight` τ (None: Gauss–Newton) adds τ·C, the stage rows'
    second-order term (`_curvature`, one hidden layer), to the reduced
    system; C may be indefinite, and CG then stops at a direction of
    nonpositive curvature.
    `stride` k > 1 (static) builds CG's products, and its preconditioner,
    from every k-th sample from `offset` (traced, < k), scaled by m/⌊m/k⌋:
    S_B = (m/b) Σ_{j∈B} J_θ,jᵀ P_j J_θ,j + μ_θ I. The right-hand side, the
    forcing term and the states' back-substitution use every sample, so
    the step is dθ = −S_B⁻¹ g for the whole problem's reduced gradient g.

    Returns:
        (dparams, dZ, cg_steps).
    """
    lin = linearise(params, spec, x, y, Z, Lam, sigma)
    curv = None if curvature_weight is None else _curvature.curvature(lin, params, spec, curvature_weight)
    if rtol is None:
        rtol = forcing_term(residual_gradient(lin), forcing_max)
    if solve_dtype is not None:
        # Mixed precision: the step only has to reach the forcing term and
        # the LM gain ratio is still computed in the model's dtype; float32
        # products ran 2.3–2.4× faster on XLA:CPU, at a floor of ≈ κ(S)·ε₃₂
        # on the step (benchmarks/RESULTS.md, Round 8).
        lin, curv = jax.tree_util.tree_map(lambda a: a.astype(solve_dtype), (lin, curv))
        mu_w, mu_z, rtol = (jnp.asarray(v).astype(solve_dtype) for v in (mu_w, mu_z, rtol))
    elim = elimination(spec)
    fac = elim.factor(lin, mu_z)
    m = x.shape[0]
    stride = min(stride, m)
    lin_s, curv_s, fac_s, scale = lin, curv, fac, None
    if stride > 1:
        lin_s = subsample(lin, stride, offset)
        curv_s = None if curv is None else every_kth(curv, 0, stride, offset)
        fac_s = elim.subsample(fac, stride, offset)
        scale = jnp.asarray(m / (m // stride), lin.r_o.dtype)

    if spec.depth == 1:
        data = _onelayer_product.prepare(lin_s, fac_s, curv_s)

        def product(v):
            t_in, _, t_out = layer_blocks(unflatten_weights(v, spec))
            g_in, g_out, t = _onelayer_product.apply(data, t_in, t_out)
            return jnp.concatenate([g_in.reshape(-1), g_out.reshape(-1)]), t

        def states_layout(t):  # t, accumulated by CG with the samples last, as (1, m, n)
            return t.T[None]
    else:
        def product(v):
            dtheta = unflatten_weights(v, spec)
            e_h, e_o = weight_jvp(lin_s, dtheta, spec)
            (p_h, p_o), t = _project(lin_s, fac_s, elim, e_h, e_o)
            return weight_vjp(lin_s, p_h, p_o), t

        def states_layout(t):
            return t

    def s_apply(v):
        out, t = product(v)
        return (out if scale is None else scale * out) + mu_w * v, t

    (pr_h, pr_o), t_r = _project(lin, fac, elim, lin.r_h, lin.r_o)
    g = weight_vjp(lin, pr_h, pr_o)
    pre = None
    if precondition:
        pre = _preconditioner(spec, _layer_factors(spec, lin_s, fac_s), m, mu_w)
    # The states' back-substitution dZ = −H⁻¹J_uᵀ(r + J_θ dθ) = −(t_r + T dθ)
    # with T = H⁻¹J_uᵀJ_θ, which every product S p already applies: CG
    # accumulates T dθ, and no further state solve is compiled or run.
    # A subsample's products have T dθ for its own samples only: one more
    # pass over all of them then gives it.
    if stride == 1:
        value, steps, t_d = pcg(s_apply, -g, rtol, step_limit(max_steps, cap), pre, has_aux=True)
        t_d = states_layout(t_d)
    else:
        value, steps = pcg(lambda v: s_apply(v)[0], -g, rtol, step_limit(max_steps, cap), pre)
        _, t_d = _project(lin, fac, elim, *weight_jvp(lin, unflatten_weights(value, spec), spec))
    return unflatten_weights(value.astype(spec.dtype), spec), (-(t_r + t_d)).astype(spec.dtype), steps
