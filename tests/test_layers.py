"""General layer chains: the structured step equals a dense lstsq of the lifted Jacobian.

Chains mix dense layers, parameter-free activations, residual blocks
z + tanh(Wz + b), layer norm, `(apply_fn, params)` pairs and whole MLPs used as
one layer, with differing widths. The reference is built only from the public
`residual` (jax.jacfwd of the flattened residual), as in `test_structured_step`,
and the tolerance is the same 1e-10 (float64; these problems are well
conditioned, so round-off is ~1e-13 and any structural error is O(1)).
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import alm_jax
from alm_jax import _lifted
from alm_jax._linalg import _generic, matfree_step, structured_step
from alm_jax._models import to_chain
from _problems import lagrangian_state_gradient

RTOL = 1e-10


class ResBlock(eqx.Module):
    lin: eqx.nn.Linear

    def __call__(self, z, *, key=None):
        return z + jnp.tanh(self.lin(z))


class NormTanh(eqx.Module):
    norm: eqx.nn.LayerNorm

    def __call__(self, z, *, key=None):
        return jnp.tanh(self.norm(z))


def _dense_fn(p, z):
    return jax.nn.softplus(p["w"] @ z + p["b"])


def _f64(tree):
    return jax.tree_util.tree_map(lambda a: a.astype(jnp.float64) if eqx.is_inexact_array(a) else a, tree)


def make_chain(kinds, n_in, n_out, seed):
    """A list of layers from codes: ("lin", w) dense to width w (("linnb", w) without bias), ("tanh",), ("res",), ("norm",),
    ("pair", w) an (apply_fn, params) dense+softplus layer, ("mlp", w) an eqx.nn.MLP as one layer."""
    keys = iter(jax.random.split(jax.random.key(seed), 2 * len(kinds) + 2))
    layers, width = [], n_in
    for kind in kinds:
        if kind[0] in ("lin", "linnb"):
            layers.append(eqx.nn.Linear(width, kind[1], use_bias=kind[0] == "lin", key=next(keys)))
            width = kind[1]
        elif kind[0] == "tanh":
            layers.append(eqx.nn.Lambda(jnp.tanh))
        elif kind[0] == "res":
            layers.append(ResBlock(eqx.nn.Linear(width, width, key=next(keys))))
        elif kind[0] == "norm":
            norm = eqx.nn.LayerNorm(width)
            norm = eqx.tree_at(lambda n: n.weight, norm, 1 + 0.2 * jax.random.normal(next(keys), (width,)))
            layers.append(NormTanh(norm))
        elif kind[0] == "pair":
            w = jax.random.normal(next(keys), (kind[1], width)) / np.sqrt(width)
            layers.append((_dense_fn, {"w": w, "b": 0.1 * jax.random.normal(next(keys), (kind[1],))}))
            width = kind[1]
        elif kind[0] == "mlp":
            layers.append(eqx.nn.MLP(width, kind[1], 3, 1, activation=jnp.tanh, key=next(keys)))
            width = kind[1]
    layers.append(eqx.nn.Linear(width, n_out, key=next(keys)))
    return [(layer[0], _f64(layer[1])) if isinstance(layer, tuple) else _f64(layer) for layer in layers]


def make_problem(kinds, n_in, n_out, m, seed):
    chain = make_chain(kinds, n_in, n_out, seed)
    k = jax.random.split(jax.random.key(100 + seed), 4)
    x = jax.random.normal(k[0], (m, n_in), jnp.float64)
    y = jax.random.normal(k[1], (m, n_out), jnp.float64)
    states = alm_jax.forward_states(chain, x)
    noise = jax.random.split(k[2], len(states))
    states = tuple(s + 0.3 * jax.random.normal(kk, s.shape, jnp.float64) for s, kk in zip(states, noise))
    lam_keys = jax.random.split(k[3], len(states))
    lams = tuple(jax.random.normal(kk, s.shape, jnp.float64) for s, kk in zip(states, lam_keys))
    return chain, states, lams, x, y


# Jitted, as are the other references here: op by op, the Jacobian's columns
# compiled one primitive at a time, 5–10 s per problem (0.8 s jitted).
@eqx.filter_jit
def dense_reference(chain, states, lams, x, y, beta, mu_w, mu_z, loss="squared"):
    params, static = eqx.partition(chain, eqx.is_inexact_array)
    flat, unravel = ravel_pytree((params, states))
    n_theta = ravel_pytree(params)[0].size

    def res(v):
        p, s = unravel(v)
        return alm_jax.residual(eqx.combine(p, static), s, lams, x, y, beta, loss=loss)

    jac = jax.jacfwd(res)(flat)
    damp = jnp.concatenate([jnp.full(n_theta, mu_w), jnp.full(flat.size - n_theta, mu_z)])
    a = jnp.concatenate([jac, jnp.diag(jnp.sqrt(damp))])
    b = jnp.concatenate([-res(flat), jnp.zeros_like(flat)])
    return jnp.linalg.lstsq(a, b)[0]


CHAINS = {
    "lin-tanh-lin": [("lin", 5), ("tanh",)],
    "widths-change": [("lin", 6), ("tanh",), ("pair", 3), ("lin", 4), ("tanh",)],
    "residual": [("lin", 4), ("tanh",), ("res",), ("res",)],
    "layernorm": [("lin", 5), ("norm",), ("lin", 3), ("norm",)],
    "mixed": [("pair", 4), ("res",), ("norm",), ("mlp", 3), ("tanh",)],
}
SLOW = pytest.mark.slow  # kept out of the default run to hold it under ~10 minutes
CASES = [
    # chain, n_in, n_out, m, mu_w, mu_z, chunk, loss, marks
    ("lin-tanh-lin", 3, 1, 7, 1e-2, 1e-2, None, "squared", SLOW),
    ("widths-change", 2, 2, 6, 1e-3, 1e-6, None, "squared", ()),
    ("residual", 3, 2, 8, 1e-2, 0.0, 3, "squared", SLOW),  # test_step_with_per_constraint_penalties covers it
    ("layernorm", 4, 1, 6, 1e-1, 1e-4, None, "squared", SLOW),
    ("mixed", 3, 2, 7, 1e-2, 1e-3, 2, "squared", SLOW),  # the chain: next row; chunks: per_constraint[2000]
    ("mixed", 2, 3, 6, 1e-2, 1e-2, None, "softmax_cross_entropy", ()),
]


@pytest.mark.parametrize("case", [pytest.param(c[:-1], marks=c[-1], id=f"{c[0]}-{c[-2]}-{i}")
                                  for i, c in enumerate(CASES)])
def test_lm_step_matches_dense_lstsq(case):
    name, n_in, n_out, m, mu_w, mu_z, chunk, loss = case
    chain, states, lams, x, y = make_problem(CHAINS[name], n_in, n_out, m, seed=len(name) + n_out)
    if loss != "squared":
        y = jax.nn.one_hot(jnp.arange(m) % n_out, n_out, dtype=jnp.float64)
    ref = dense_reference(chain, states, lams, x, y, 3.0, mu_w, mu_z, loss)
    d = alm_jax.lm_step(chain, states, lams, x, y, 3.0, mu_w, state_damping=mu_z, chunk_size=chunk, loss=loss)
    got = ravel_pytree(d)[0]
    assert got.shape == ref.shape
    err = float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref))
    assert err <= RTOL, err


def test_matfree_step_converges_to_exact():
    chain, states, lams, x, y = make_problem(CHAINS["mixed"], 3, 2, 9, seed=1)
    params, spec = to_chain(chain, x)
    Z = jnp.concatenate(states, axis=-1)[None]
    Lam = jnp.concatenate(lams, axis=-1)[None]
    sigma, mu_w, mu_z = jnp.asarray(3.0), jnp.asarray(1e-2), jnp.asarray(1e-4)
    exact = ravel_pytree(structured_step(params, spec, x, y, Z, Lam, sigma, mu_w, mu_z))[0]
    errs = []
    for rtol in (1e-2, 1e-6, 1e-11):
        dp, dz, _ = matfree_step(params, spec, x, y, Z, Lam, sigma, mu_w, mu_z, jnp.asarray(rtol), max_steps=500)
        errs.append(float(jnp.linalg.norm(ravel_pytree((dp, dz))[0] - exact) / jnp.linalg.norm(exact)))
    assert errs[-1] <= 1e-9 and errs[-1] < errs[0], errs


def test_layer_chain_solves_in_the_model_dtype():
    """The default `cg` keeps a general layer chain's CG in its own dtype
    (its layers are user code, not cast); asking for float32 says so."""
    chain, states, lams, x, y = make_problem(CHAINS["mixed"], 3, 2, 9, seed=1)
    state = alm_jax.alm().init(chain, x, y)
    assert "f32[" not in str(jax.make_jaxpr(alm_jax.alm().update)(state, x, y))
    solver = alm_jax.alm(solve_dtype="float32")
    with pytest.raises(ValueError, match="solve_dtype=float32"):
        solver.update(solver.init(chain, x, y), x, y)


def test_layer_chain_uses_every_sample():
    """A layer chain has no subsampled products: "auto" keeps every sample,
    and a count that would subsample is refused at `init`."""
    chain, states, lams, x, y = make_problem(CHAINS["mixed"], 3, 2, 9, seed=1)
    assert alm_jax.alm(curvature_samples="auto").init(chain, x, y).inner.sample_offset is None
    with pytest.raises(ValueError, match="curvature_samples"):
        alm_jax.alm(curvature_samples=2).init(chain, x, y)


def test_forcing_gradient_of_a_layer_chain():
    """The forcing term's ∇f = Jᵀρ from the layer chain's linearisation equals
    jax.grad of ½‖lifted residual‖² (float64: 1e-12 of the largest entry)."""
    chain, states, lams, x, y = make_problem(CHAINS["mixed"], 3, 2, 9, seed=1)
    params, spec = to_chain(chain, x)
    Z = jnp.concatenate(states, axis=-1)[None]
    Lam = jnp.concatenate(lams, axis=-1)[None]
    sigma = jnp.asarray(3.0)
    g_w, g_z = jax.jit(lambda p, z: _generic._reduced(p, spec, x, y, z, Lam, sigma, 1e-3).residual_gradient())(
        params, Z)
    half_sq = lambda p, z: 0.5 * jnp.sum(_lifted.lifted_residual(p, z, spec, x, y, Lam, sigma) ** 2)  # noqa: E731
    want_w, want_z = jax.jit(jax.grad(half_sq, argnums=(0, 1)))(params, Z)
    np.testing.assert_allclose(g_w, ravel_pytree(want_w)[0], rtol=0, atol=1e-12 * float(jnp.max(jnp.abs(g_w))))
    np.testing.assert_allclose(g_z, want_z[0], rtol=0, atol=1e-12 * float(jnp.max(jnp.abs(g_z))))


@pytest.mark.parametrize("budget", [pytest.param(None, marks=SLOW), 2000])  # 2000 runs the same problem chunked
def test_step_with_per_constraint_penalties(budget, monkeypatch):
    """σ one value per constraint (ω ≠ 1 in every row factor, also in the dense layers' Kronecker
    blocks), a bias-free dense layer, and dense layers on both sides of a non-dense one: the exact
    step equals a dense lstsq of the Jacobian of the internal weighted residual. A small work budget
    makes the Kronecker sums run over sample chunks (here 2 chunks of 5 for m = 6, the second
    padded) and the other weights' columns in batches of 16 directions."""
    if budget is not None:
        monkeypatch.setattr(_generic, "_JAC_BUDGET", budget)
        jax.clear_caches()
    chain, states, lams, x, y = make_problem([("linnb", 4), ("tanh",), ("res",), ("lin", 3), ("norm",)],
                                             3, 2, 6, seed=5)
    params, spec = to_chain(chain, x)
    Z = jnp.concatenate(states, axis=-1)[None]
    Lam = jnp.concatenate(lams, axis=-1)[None]
    sigma = jnp.exp(jax.random.uniform(jax.random.key(9), Z.shape, jnp.float64, -2.0, 2.0))
    mu_w, mu_z = 1e-2, 1e-3
    flat, unravel = ravel_pytree((params, Z))
    n_theta = ravel_pytree(params)[0].size

    @jax.jit
    def reference(flat):
        res = lambda v: _lifted.lifted_residual(*unravel(v), spec, x, y, Lam, sigma)  # noqa: E731
        damp = jnp.concatenate([jnp.full(n_theta, mu_w), jnp.full(flat.size - n_theta, mu_z)])
        a = jnp.concatenate([jax.jacfwd(res)(flat), jnp.diag(jnp.sqrt(damp))])
        return jnp.linalg.lstsq(a, jnp.concatenate([-res(flat), jnp.zeros_like(flat)]))[0]

    ref = reference(flat)
    got = ravel_pytree(structured_step(params, spec, x, y, Z, Lam, sigma, jnp.asarray(mu_w), jnp.asarray(mu_z)))[0]
    assert float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref)) <= RTOL


def test_dense_layers_use_the_kronecker_assembly():
    """Which weights get matrix-free columns: only those of the non-dense layers."""
    chain, _, _, x, _ = make_problem([("linnb", 4), ("tanh",), ("res",), ("lin", 3)], 3, 2, 5, seed=0)
    params, spec = to_chain(chain, x)
    dense = _generic._dense_layers(params, spec)
    assert dense.layers == (0, 3, 4)
    assert dense.other.size == 4 * 4 + 4  # the residual block's Linear(4, 4)
    assert sorted(np.concatenate([dense.other, *dense.index])) == list(range(spec.n_weights))


@pytest.mark.parametrize("name", ["widths-change", "mixed"])
def test_rollout_states_meet_the_given_defects(name):
    chain, states, _, x, _ = make_problem(CHAINS[name], 3, 2, 5, seed=4)
    params, spec = to_chain(chain, x)
    Z = _lifted.forward_states_stacked(params, spec, x)
    c = 0.1 * jax.random.normal(jax.random.key(5), Z.shape, jnp.float64)
    rolled = _lifted.forward_states_stacked(params, spec, x, defects=c)
    np.testing.assert_allclose(_lifted.constraints_stacked(params, spec, x, rolled), c, rtol=0, atol=1e-14)


@pytest.mark.parametrize("name", ["widths-change", "mixed"])
def test_adjoint_multipliers_make_the_lagrangian_stationary_in_the_states(name):
    """As for an MLP (test_lifted.py): ∇_Z(Σℓ + ⟨λ, h⟩) = 0 at states off the forward pass,
    with the gradient taken by reverse mode through the chain's own constraints."""
    chain, states, _, x, y = make_problem(CHAINS[name], 3, 2, 5, seed=6)
    params, spec = to_chain(chain, x)
    Z = jnp.concatenate(states, axis=-1)[None]
    lam = _lifted.adjoint_multipliers(params, spec, x, y, _lifted.constraints_stacked(params, spec, x, Z))
    assert float(jnp.max(jnp.abs(lam))) > 0.05
    np.testing.assert_allclose(lagrangian_state_gradient(params, spec, x, y, Z, lam), 0, atol=1e-13)


def test_forward_states_are_feasible_and_shaped():
    chain, _, _, x, _ = make_problem(CHAINS["widths-change"], 2, 2, 5, seed=0)
    states = alm_jax.forward_states(chain, x)
    assert [s.shape for s in states] == [(5, 6), (5, 6), (5, 3), (5, 4), (5, 4)]
    h = alm_jax.constraints(chain, states, x)
    assert max(float(jnp.max(jnp.abs(v))) for v in h) == 0.0


@pytest.mark.parametrize("inner,factor", [("cg", 5), ("cg-backtrack", 5), ("cg-adjoint", 5),
                                          pytest.param("lbfgs", 2, marks=SLOW)])
def test_fit_trains_a_sequential(inner, factor):
    """60 updates on a smooth regression target: the training MSE falls by 5× (2× for the
    first-order lbfgs; `cg-backtrack` takes the shortened trial's slope and h from forward
    mode on a layer chain, `cg-adjoint` the multipliers from the chain's adjoint); the model
    comes back as a Sequential."""
    options = {}
    if inner == "cg-backtrack":
        inner = alm_jax.inner.cg(backtrack=True)
    elif inner == "cg-adjoint":
        inner, options = "cg", {"multipliers": "adjoint"}
    chain = eqx.nn.Sequential(make_chain([("lin", 8), ("tanh",), ("res",), ("norm",)], 2, 1, seed=3))
    x = jax.random.uniform(jax.random.key(0), (40, 2), jnp.float64, -2, 2)
    y = jnp.sin(x[:, :1]) * jnp.cos(x[:, 1:])
    res = alm_jax.fit(chain, x, y, inner=inner, max_steps=60, progress=False, **options)
    assert isinstance(res.model, eqx.nn.Sequential)
    mse = float(jnp.mean((jax.vmap(res.model)(x) - y) ** 2))
    assert mse == pytest.approx(res.history.mse[-1], rel=1e-10)
    assert mse < res.history.mse[0] / factor


def test_bad_layer_chains_raise():
    x = jnp.zeros((4, 3))
    lin = eqx.nn.Linear(3, 2, key=jax.random.key(0))
    with pytest.raises(ValueError, match="at least two layers"):
        alm_jax.forward_states([lin], x)
    with pytest.raises(ValueError, match="vector to a vector"):
        alm_jax.forward_states([lin, eqx.nn.Lambda(lambda z: jnp.outer(z, z))], x)
    with pytest.raises(ValueError, match="fails on a vector"):
        alm_jax.forward_states([lin, eqx.nn.Linear(5, 1, key=jax.random.key(1))], x)
    with pytest.raises(TypeError, match="callable layer"):
        alm_jax.forward_states([lin, 3.0], x)
    with pytest.raises(TypeError, match="equinox.nn.MLP"):
        alm_jax.forward_states({"a": lin}, x)
    with pytest.raises(ValueError, match=r"\(m, n_in\)"):
        alm_jax.forward_states([lin, eqx.nn.Lambda(jnp.tanh)], jnp.zeros(3))
    with pytest.raises(TypeError, match="bcd"):
        alm_jax.fit([lin, eqx.nn.Lambda(jnp.tanh), eqx.nn.Linear(2, 1, key=jax.random.key(2))], x,
                    jnp.zeros((4, 1)), inner="bcd", max_steps=1, progress=False)
