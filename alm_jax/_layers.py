"""General layered models: z_{a+1} = f_a(θ_a, z_a) for any differentiable layers.

Besides `eqx.nn.MLP` (the dense chain of `_chain`, with the Kronecker-structured
step) a model may be any chain of per-sample layers: an `eqx.nn.Sequential`, or
a list of equinox modules and `(apply_fn, params)` pairs, each mapping one
sample's vector to a vector of any width (dense layers, layer norm, residual
blocks z + f(θ, z), ...). With z_0 = x and layers f_0..f_N,

    h_a = z_{a+1} − f_a(θ_a, z_a)    a = 0..N−1,       ŷ = f_N(θ_N, z_N),

so the states are the outputs of every layer but the last. Per sample they are
concatenated into one vector of length D = Σ_a n_{a+1}, and stacked as
(1, m, D), so that multipliers, per-constraint penalties, sharding and the
outer loop treat them exactly as the dense chain's (N, m, n) states.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._losses import SQUARED, Loss


class Layer(eqx.Module):
    """A layer given as a pure function and its parameters: z ↦ fn(params, z).

    `alm_jax.fit` and `alm_jax.alm` accept a list of these (or plain
    `(fn, params)` pairs, converted to `Layer`) as a model.
    """

    fn: Callable = eqx.field(static=True)
    params: Any

    def __call__(self, z, *, key=None):
        return self.fn(self.params, z)


class _Frozen(NamedTuple):
    """A pytree's non-array part kept hashable (a module's static part may hold dicts)."""

    treedef: Any
    leaves: tuple

    @classmethod
    def of(cls, tree):
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        return cls(treedef, tuple(leaves))

    def thaw(self):
        return jax.tree_util.tree_unflatten(self.treedef, self.leaves)


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """Static description of a general layer chain (hashable, so it can be jit-static)."""

    statics: tuple  # per layer, the non-array part (eqx.partition), frozen
    widths: tuple  # state widths n_1..n_N
    n_in: int
    n_out: int
    n_weights: int
    treedef: Any  # treedef of eqx.filter(model, eqx.is_inexact_array)
    skeleton: Any  # the model's non-array part, frozen, to rebuild it
    dtype: Any
    loss: Loss = SQUARED
    scalar_in: bool = False
    scalar_out: bool = False

    @property
    def depth(self) -> int:
        return len(self.widths)

    @property
    def offsets(self) -> tuple:
        return tuple(int(v) for v in np.cumsum((0,) + self.widths))

    def layer(self, params, a):
        return eqx.combine(params[a], self.statics[a].thaw())


def as_sequential(model):
    """An `eqx.nn.Sequential` from a Sequential or a list of modules / (fn, params) pairs."""
    if isinstance(model, eqx.nn.Sequential):
        return model
    if not isinstance(model, (list, tuple)):
        raise TypeError(
            "model: expected an equinox.nn.MLP, an equinox.nn.Sequential, or a list of equinox modules "
            f"and (apply_fn, params) pairs; got {type(model).__name__}."
        )
    layers = []
    for i, item in enumerate(model):
        if isinstance(item, tuple) and len(item) == 2 and callable(item[0]) and not isinstance(item, eqx.Module):
            item = Layer(item[0], item[1])
        if not callable(item):
            raise TypeError(f"model[{i}]: expected a callable layer or an (apply_fn, params) pair, "
                            f"got {type(item).__name__}.")
        layers.append(item)
    return eqx.nn.Sequential(layers)


def layer_chain(model, n_in: int):
    """Split a general layered model into per-layer weights and a static spec.

    Raises:
        TypeError: unsupported model, or weights of mixed dtypes / no weights.
        ValueError: fewer than two layers, or a layer that does not map a
            vector to a vector.
    """
    seq = as_sequential(model)
    layers = tuple(seq.layers)
    if len(layers) < 2:
        raise ValueError(f"model: need at least two layers (one hidden state), got {len(layers)}.")
    leaves = [leaf for leaf in jax.tree_util.tree_leaves(seq) if eqx.is_inexact_array(leaf)]
    dtypes = {leaf.dtype for leaf in leaves}
    if len(dtypes) != 1:
        raise TypeError(f"model: the weights must share one float dtype, got {sorted(map(str, dtypes)) or 'none'}.")
    dtype = dtypes.pop()
    parts = [eqx.partition(layer, eqx.is_inexact_array) for layer in layers]
    widths, shape = [], jax.ShapeDtypeStruct((n_in,), dtype)
    for a, layer in enumerate(layers):
        try:
            out = eqx.filter_eval_shape(lambda f, z: f(z), layer, shape)
        except Exception as err:
            raise ValueError(f"model: layer {a} ({type(layer).__name__}) fails on a vector of width "
                             f"{shape.shape[0]}: {err}") from err
        if not isinstance(out, jax.ShapeDtypeStruct) or out.ndim != 1:
            raise ValueError(f"model: layer {a} ({type(layer).__name__}) must map a vector to a vector; "
                             f"got {getattr(out, 'shape', out)} from width {shape.shape[0]}.")
        widths.append(int(out.shape[0]))
        shape = jax.ShapeDtypeStruct(out.shape, dtype)
    params = tuple(p for p, _ in parts)
    filtered, skeleton = eqx.partition(seq, eqx.is_inexact_array)
    spec = LayerSpec(
        statics=tuple(_Frozen.of(s) for _, s in parts),
        widths=tuple(widths[:-1]),
        n_in=int(n_in),
        n_out=widths[-1],
        n_weights=int(sum(leaf.size for leaf in leaves)),
        treedef=jax.tree_util.tree_structure(filtered),
        skeleton=_Frozen.of(skeleton),
        dtype=dtype,
    )
    return params, spec


def layers_to_filtered(params, spec: LayerSpec):
    """Arrays of `params` laid out like `eqx.filter(model, eqx.is_inexact_array)`."""
    return jax.tree_util.tree_unflatten(spec.treedef, jax.tree_util.tree_leaves(params))


def layers_to_model(params, spec: LayerSpec):
    """Rebuild the `eqx.nn.Sequential` from per-layer weights."""
    return eqx.combine(layers_to_filtered(params, spec), spec.skeleton.thaw())


def split_states(spec: LayerSpec, u):
    """Per-layer states (…, n_a) from the concatenated (…, D) vector."""
    o = spec.offsets
    return [u[..., o[a]:o[a + 1]] for a in range(spec.depth)]


def _apply(spec, params, a, z):
    """Layer a on one sample's vector z."""
    return spec.layer(params, a)(z)


def sample_constraints(params, spec: LayerSpec, x, u):
    """h = (z_{a+1} − f_a(θ_a, z_a))_a for one sample, concatenated (D,)."""
    zs = split_states(spec, u)
    prev = [x] + zs[:-1]
    return jnp.concatenate([zs[a] - _apply(spec, params, a, prev[a]) for a in range(spec.depth)])


def sample_output(params, spec: LayerSpec, u):
    return _apply(spec, params, spec.depth, split_states(spec, u)[-1])


def forward_states(params, spec: LayerSpec, x, defects=None):
    """States of the forward pass, (1, m, D); with `defects` (1, m, D), z_{a+1} = f_a(z_a) + c_a."""

    def one(xj, cj):
        zs, z = [], xj
        cs = None if cj is None else split_states(spec, cj)
        for a in range(spec.depth):
            z = _apply(spec, params, a, z)
            z = z if cs is None else z + cs[a]
            zs.append(z)
        return jnp.concatenate(zs)

    if defects is None:
        return jax.vmap(lambda xj: one(xj, None))(x)[None]
    return jax.vmap(one)(x, defects[0])[None]


def constraints(params, spec: LayerSpec, x, Z):
    return jax.vmap(lambda xj, u: sample_constraints(params, spec, xj, u))(x, Z[0])[None]


def output(params, spec: LayerSpec, Z):
    return jax.vmap(lambda u: sample_output(params, spec, u))(Z[0])
