"""CG's product for one hidden layer (`_onelayer_product`) against the dense lifted Jacobian.

The reference is built from forward-mode Jacobians of the lifted residual in
the weights' flat layout (`unflatten_weights`) and in the states:

    S v = J_θᵀ (I − J_u H⁻¹ J_uᵀ) J_θ v + C v,   t = H⁻¹ J_uᵀ J_θ v,   H = J_uᵀJ_u + μ_z I,

C the stage rows' Σ r_i ∇²r_i in the first layer's block, τ-weighted
(`_curvature`). In float64, with H's condition number below 1e4 here, both
sides agree to ≈ 1e-14; 1e-12 leaves margin, while a wrong block, sign,
transpose or weight gives O(1) errors.
"""

import jax
import jax.numpy as jnp
import pytest

from alm_jax._lifted import lifted_residual
from alm_jax._linalg import _curvature, _onelayer, _onelayer_product
from alm_jax._linalg._linearise import linearise
from alm_jax._linalg._schur import layer_blocks, num_weights, unflatten_weights

from _problems import subproblem

CASES = {
    # n_out, bias, loss, curvature weight τ
    "one_output": (1, True, "squared", None),
    "one_output_curvature": (1, True, "squared", 0.5),
    "two_outputs_no_bias": (2, False, "squared", None),
    "three_outputs_curvature": (3, True, "squared", 1.0),
    "cross_entropy": (3, True, "softmax_cross_entropy", 0.5),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_product_matches_the_dense_reduced_system(case):
    n_out, bias, loss, tau = CASES[case]
    params, spec, Z, p = subproblem(1, 6, n_out, m=11, seed=3, loss=loss, perturb=0.5, multiplier_scale=2.0,
                                    bias=bias)
    x, y, Lam, sigma = p.x, p.y, p.multipliers, p.sigma
    mu_z = 1e-3
    n_theta = num_weights(spec)

    def res(v, z):
        dp = unflatten_weights(v, spec)
        return lifted_residual(jax.tree_util.tree_map(jnp.add, params, dp), z, spec, x, y, Lam, sigma)

    zero = jnp.zeros((n_theta,), x.dtype)
    j_theta = jax.jacfwd(res)(zero, Z)
    j_u = jax.jacfwd(res, argnums=1)(zero, Z).reshape(j_theta.shape[0], -1)
    h = j_u.T @ j_u + mu_z * jnp.eye(j_u.shape[1], dtype=x.dtype)
    assert float(jnp.linalg.cond(h)) < 1e4
    proj = jnp.eye(j_u.shape[0], dtype=x.dtype) - j_u @ jnp.linalg.solve(h, j_u.T)
    s_ref = j_theta.T @ proj @ j_theta
    if tau is not None:
        r_h0 = res(zero, Z)[-Z.size:]
        s_ref = s_ref + tau * jax.hessian(lambda v: jnp.dot(r_h0, res(v, Z)[-Z.size:]))(zero)

    lin = linearise(params, spec, x, y, Z, Lam, sigma)
    q = None if tau is None else _curvature.curvature(lin, params, spec, tau)
    data = _onelayer_product.prepare(lin, _onelayer.factor(lin, mu_z), q)
    v = jax.random.normal(jax.random.key(7), (n_theta,), x.dtype)
    t_in, _, t_out = layer_blocks(unflatten_weights(v, spec))
    g_in, g_out, t = _onelayer_product.apply(data, t_in, t_out)

    got = jnp.concatenate([g_in.reshape(-1), g_out.reshape(-1)])
    want = s_ref @ v
    assert float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want)) < 1e-12
    t_want = jnp.linalg.solve(h, j_u.T @ (j_theta @ v)).reshape(Z.shape)[0]
    assert t.shape == (Z.shape[2], Z.shape[1])  # (n, m): the samples last
    assert float(jnp.linalg.norm(t.T - t_want) / jnp.linalg.norm(t_want)) < 1e-12
