"""A second-order term of the subproblem that Gauss–Newton leaves out, one hidden layer.

The subproblem's objective f = Σℓ/β + ½‖r_h‖² has the Hessian

    ∇²f = JᵀJ + Σ_i r_i ∇²r_i,

and the Gauss–Newton (LM) step drops the sum. With one hidden layer the
stage rows r_h = ω ⊙ (z − φ(s_0) + λ/σ), s_0 = W̃_0 x̃, depend on the weights
only through s_0, and x̃ is data, so their part of the sum is

    C = Σ_j diag(q_j) ⊗ x̃_j x̃_jᵀ   (the first layer's block),   q = −ω r_h φ''(s_0),

one weighted Gram matrix per hidden unit: the multipliers' estimate
ν = σ ⊙ (h + λ/σ) times the constraints' curvature, the Lagrangian Hessian
of SQP. It leaves the states' block alone, so the elimination of the states
is unchanged (`_onelayer`); in CG's product C shares J_θ's GEMM with the
first layer and J_θᵀ's contraction over the samples (`_onelayer_product`).

The output rows' part, the bilinear coupling of W_1 and z through
s_1 = W̃_1 z̃, is left out: with it the step's model was indefinite in a
saddle and trained 5× higher on UCI energy and 70× on yacht after 300
updates (benchmarks/RESULTS.md, Round 14).

Reference: J. E. Dennis, D. M. Gay, R. E. Welsch, "An adaptive nonlinear
least-squares algorithm", ACM TOMS 7 (1981); J. Nocedal, S. J. Wright,
*Numerical Optimization* (2006), §10.3 and §18.1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .._chain import ChainSpec, DenseParams
from .._layers import LayerSpec
from ._linearise import Linearisation
from ._schur import layer_blocks


def check_supported(spec):
    if isinstance(spec, LayerSpec):
        raise ValueError("second_order: needs an eqx.nn.MLP model with one hidden layer, got a layer chain.")
    if spec.depth != 1:
        raise ValueError(f"second_order: implemented for an eqx.nn.MLP with one hidden layer, got depth {spec.depth}.")


def curvature(lin: Linearisation, params: DenseParams, spec: ChainSpec, weight=1.0):
    """weight·q, shaped (m, n): C's per-sample, per-unit factor."""
    s0 = _first_layer(lin, params)
    d2phi = jax.jvp(lambda s: spec.act_and_grad(s)[1], (s0,), (jnp.ones_like(s0),))[1]
    return -weight * lin.omega[0] * lin.r_h[0] * d2phi


def _first_layer(lin: Linearisation, weights: DenseParams):
    """W̃_0 x̃, (m, n): the first layer's pre-activations s_0 for the weights, ds_0 for a change dθ."""
    return lin.zt_in @ layer_blocks(weights)[0].T


def quadratic(q, lin: Linearisation, dtheta: DenseParams):
    """½ dθᵀC dθ."""
    ds = _first_layer(lin, dtheta)
    return 0.5 * jnp.sum(q * ds * ds)
