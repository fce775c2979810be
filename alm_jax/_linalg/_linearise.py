"""Linearisation of the lifted residual at the current point, per sample.

For every sample the residual rows are the N hidden stages and the output.
With ω the constraint row weights (1 for a scalar penalty) and φ' the
activation slopes at the current pre-activations s_a:

    stage a rows:  r_a = ω_a ⊙ (z_{a+1} − φ(s_a) + λ_a/σ_a)
                   ∂r_a/∂z_{a+1} = diag(ω_a)
                   ∂r_a/∂z_a     = −Ã_a,  Ã_a = diag(ω_a φ'(s_a)) W_a   (a ≥ 1)
                   ∂r_a/∂W̃_a    = diag(c_a) (rows ⊗ z̃_aᵀ),  c_a = −ω_a φ'(s_a)
    output rows:   r_N = r(φ_out(s_N), y)/√β
                   ∂r_N/∂z_N     = C = c_N W_N
                   ∂r_N/∂W̃_N    = c_N (rows ⊗ z̃_Nᵀ),  c_N = L diag(φ_out'(s_N))/√β

where W̃ = [W b] and z̃ = [z; 1] (no 1 appended when the layer has no bias),
and (r, L) is the loss's Gauss–Newton residual and factor (`_losses`): for
the squared loss r = φ_out(s_N) − y and L = I, so c_N is diagonal; for
cross-entropy it is a dense n_y × n_y matrix per sample.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from .._chain import ChainSpec, DenseParams
from .._lifted import penalty_split


class Linearisation(NamedTuple):
    omega: jnp.ndarray  # (N, m, n) constraint row weights
    r_h: jnp.ndarray  # (N, m, n) stage residuals
    r_o: jnp.ndarray  # (m, ny) output residual (the loss's GGN residual / √β)
    c_h: jnp.ndarray  # (N, m, n) weight-Jacobian row scaling, stages
    c_o: jnp.ndarray  # (m, ny, ny) ∂r_o/∂s_out: the output rows' factor
    s_hid: jnp.ndarray  # (N-1, m, n) ω_a φ'(s_a), a = 1..N-1: Ã_a = diag(s_hid) W_a
    w_hid: jnp.ndarray  # (N-1, n, n) W_a, a = 1..N-1 (shared by all samples)
    c_mat: jnp.ndarray  # (m, ny, n) C
    w_out: jnp.ndarray  # (ny, n) W_out, so that C = c_o W_out
    zt_in: jnp.ndarray  # (m, kF) z̃_0
    zt_hid: jnp.ndarray  # (N-1, m, kH) z̃_1..z̃_{N-1}
    zt_out: jnp.ndarray  # (m, kO) z̃_N
    loss: jnp.ndarray  # (m,) ℓ(ŷ_j, y_j) at the current outputs


# The sample axis of every field; None where the field is shared by all samples.
SAMPLE_AXES = Linearisation(omega=1, r_h=1, r_o=0, c_h=1, c_o=0, s_hid=1, w_hid=None, c_mat=0, w_out=None,
                            zt_in=0, zt_hid=1, zt_out=0, loss=0)


def every_kth(a, axis, k, offset):
    """Samples offset, offset + k, … of `a` along `axis` (⌊m/k⌋ of them; `offset` < k may be traced).

    A reshape and one dynamic index rather than a gather: the samples
    need not be in random order, and nothing is copied element by element.
    """
    if axis is None or k == 1:
        return a
    b = a.shape[axis] // k
    a = jax.lax.slice_in_dim(a, 0, b * k, axis=axis)
    a = a.reshape(a.shape[:axis] + (b, k) + a.shape[axis + 1:])
    return jax.lax.dynamic_index_in_dim(a, offset, axis=axis + 1, keepdims=False)


def subsample(lin: Linearisation, k: int, offset) -> Linearisation:
    """The linearisation of every k-th sample from `offset` (`every_kth`)."""
    return Linearisation(*(every_kth(a, ax, k, offset) for a, ax in zip(lin, SAMPLE_AXES)))


def _augment(z, use_bias):
    if not use_bias:
        return z
    ones = jnp.ones(z.shape[:-1] + (1,), z.dtype)
    return jnp.concatenate([z, ones], axis=-1)


def linearise(params: DenseParams, spec: ChainSpec, x, y, Z, Lam, sigma, beta=None) -> Linearisation:
    """Linearise at (params, Z); `beta` overrides the reference penalty max σ."""
    if beta is None:
        beta, w = penalty_split(sigma)
    else:
        w = None if jnp.ndim(sigma) == 0 else jnp.sqrt(sigma / beta)
    s0 = x @ params.w_in.T
    if params.b_in is not None:
        s0 = s0 + params.b_in
    sh = jnp.einsum("amk,aok->amo", Z[:-1], params.w_hid)
    if params.b_hid is not None:
        sh = sh + params.b_hid[:, None, :]
    pre = jnp.concatenate([s0[None], sh], axis=0)
    phi, dphi = spec.act_and_grad(pre)
    so = Z[-1] @ params.w_out.T
    if params.b_out is not None:
        so = so + params.b_out
    phio, dphio = spec.final_act_and_grad(so)

    omega = jnp.ones_like(Z) if w is None else w
    inv_sb = 1 / jnp.sqrt(beta)
    r_h = omega * (Z - phi + Lam / sigma)
    r_fac, l_fac = spec.loss.factor(phio, y)
    r_o = r_fac * inv_sb
    c_h = -omega * dphi
    c_o = l_fac * (dphio * inv_sb)[:, None, :]
    c_mat = jnp.einsum("mab,bk->mak", c_o, params.w_out)
    return Linearisation(
        omega=omega,
        r_h=r_h,
        r_o=r_o,
        c_h=c_h,
        c_o=c_o,
        s_hid=(omega * dphi)[1:],
        w_hid=params.w_hid,
        c_mat=c_mat,
        w_out=params.w_out,
        zt_in=_augment(x, spec.use_bias),
        zt_hid=_augment(Z[:-1], spec.use_bias),
        zt_out=_augment(Z[-1], spec.use_final_bias),
        loss=spec.loss.value(phio, y),
    )
