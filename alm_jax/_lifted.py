"""The lifted (multiple-shooting) problem: states, constraints, residual, L_β.

Unknowns are the weights θ and the hidden states Z = (z_1..z_N) of every
sample. With z_0 = x,

    h_a = z_{a+1} − φ(W_a z_a + b_a)            a = 0..N-1   (constraints)
    F   = φ_out(W_N z_N + b_N) − y                           (output residual)
    L_β = ½‖F‖² + ⟨λ, h⟩ + (β/2)‖h‖² = (β/2)‖F_β‖² − ‖λ‖²/(2β)
    F_β = [F/√β ; h + λ/β]

For a loss other than ½‖·‖² (`spec.loss`, see `_losses`), ½‖F‖² becomes
Σ_j ℓ(ŷ_j, y_j) and F its generalised Gauss–Newton residual r, whose
Jacobian is L ∂ŷ; steps are then judged by `merit`, not by ½‖F_β‖².

Internally states and multipliers are stacked as (N, m, width) arrays (for a
general layer chain, `_layers`, as (1, m, D) with D the sum of the widths). A
penalty may also be one value per constraint, σ (same shape as h); then the
least-squares residual is [F/√β ; w ⊙ (h + λ/σ)] with β = max σ and
w = √(σ/β), whose squared norm is still 2 L_σ/β + const.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from . import _layers
from ._chain import ChainSpec, DenseParams
from ._layers import LayerSpec


def _affine(z, w, b):
    s = z @ w.T
    return s if b is None else s + b


def forward_states_stacked(params: DenseParams, spec: ChainSpec, x, defects=None):
    """Hidden states of the forward pass, stacked as (N, m, width) ((1, m, D) for a `LayerSpec`).

    With `defects` c (shaped like the states), the states rolled out so that
    their constraints equal c: z_{a+1} = φ(W_a z_a + b_a) + c_a.
    """
    if isinstance(spec, LayerSpec):
        return _layers.forward_states(params, spec, x, defects)

    def plus(z, c):
        return z if c is None else z + c

    z1 = plus(spec.act(_affine(x, params.w_in, params.b_in)), None if defects is None else defects[0])

    def layer(z, wbc):
        w, b, c = wbc
        z = plus(spec.act(_affine(z, w, b)), c)
        return z, z

    _, rest = jax.lax.scan(layer, z1, (params.w_hid, params.b_hid, None if defects is None else defects[1:]))
    return jnp.concatenate([z1[None], rest], axis=0)


def constraints_stacked(params: DenseParams, spec: ChainSpec, x, Z):
    """h_a = z_{a+1} − φ(W_a z_a + b_a), stacked as (N, m, width) ((1, m, D) for a `LayerSpec`)."""
    if isinstance(spec, LayerSpec):
        return _layers.constraints(params, spec, x, Z)
    h0 = Z[0] - spec.act(_affine(x, params.w_in, params.b_in))
    s = jnp.einsum("amk,aok->amo", Z[:-1], params.w_hid)
    if params.b_hid is not None:
        s = s + params.b_hid[:, None, :]
    hr = Z[1:] - spec.act(s)
    return jnp.concatenate([h0[None], hr], axis=0)


def output_stacked(params: DenseParams, spec: ChainSpec, Z):
    """Prediction from the last lifted state, (m, n_out)."""
    if isinstance(spec, LayerSpec):
        return _layers.output(params, spec, Z)
    return spec.final_act(_affine(Z[-1], params.w_out, params.b_out))


def penalty_split(sigma):
    """Reference penalty β and per-constraint row weights w = √(σ/β) (None if scalar)."""
    if jnp.ndim(sigma) == 0:
        return sigma, None
    beta = jnp.max(sigma)
    return beta, jnp.sqrt(sigma / beta)


def _weighted_constraints(params, Z, spec, x, Lam, sigma):
    beta, w = penalty_split(sigma)
    c = constraints_stacked(params, spec, x, Z) + Lam / sigma
    return beta, (c if w is None else w * c)


def lifted_residual(params, Z, spec, x, y, Lam, sigma):
    """Least-squares residual [F/√β ; w ⊙ (h + λ/σ)] as a 1-D array (F: the loss's GGN residual)."""
    beta, c = _weighted_constraints(params, Z, spec, x, Lam, sigma)
    F = spec.loss.residual(output_stacked(params, spec, Z), y)
    return jnp.concatenate([(F / jnp.sqrt(beta)).reshape(-1), c.reshape(-1)])


def total_loss(params, spec, Z, y):
    """Σ_j ℓ(ŷ_j, y_j) at the lifted states (½‖F‖² for the squared loss)."""
    return jnp.sum(spec.loss.value(output_stacked(params, spec, Z), y))


def merit(params, Z, spec, x, y, Lam, sigma):
    """L_σ/β up to a constant: Σℓ/β + ½‖w ⊙ (h + λ/σ)‖², the objective steps are accepted on.

    For the squared loss it equals ½‖lifted_residual‖².
    """
    beta, c = _weighted_constraints(params, Z, spec, x, Lam, sigma)
    return total_loss(params, spec, Z, y) / beta + 0.5 * jnp.sum(c * c)


def adjoint_multipliers(params, spec, x, y, h):
    """The multipliers that make the Lagrangian stationary in the states at (θ, Z), given h = h(θ, Z).

    ∇_Z(Σℓ + ⟨λ, h⟩) = 0 has one solution, ∂h/∂Z being unit block lower
    triangular: λ = −∇_c Σℓ(ŷ(c)) at c = h, where ŷ(c) is the network
    rolled out with defects c (which reproduces Z at c = h, so Z itself is
    not needed), i.e. backpropagation's adjoint at the lifted states.
    """
    grad = jax.grad(lambda c: total_loss(params, spec, forward_states_stacked(params, spec, x, c), y))(h)
    return -grad


def augmented_lagrangian_stacked(params, Z, spec, x, y, Lam, sigma):
    """L_σ = Σℓ + ⟨λ, h⟩ + ½ Σ σ_i h_i² (Σℓ = ½‖F‖² for the squared loss)."""
    h = constraints_stacked(params, spec, x, Z)
    return total_loss(params, spec, Z, y) + jnp.sum(Lam * h) + 0.5 * jnp.sum(sigma * h * h)
