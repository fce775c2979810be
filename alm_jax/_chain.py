"""Models as chains of dense layers: the `eqx.nn.MLP` adapter.

An MLP with `N = depth` hidden layers is the chain

    z_1     = φ(W_0 x + b_0)
    z_{a+1} = φ(W_a z_a + b_a),   a = 1..N-1
    ŷ       = φ_out(W_N z_N + b_N)

Internally the weights live in a `DenseParams` NamedTuple whose hidden layers are
stacked along a leading axis, so sweeps over layers are a single `lax.scan`.
The static part of the model (activations, sizes, the eqx skeleton used to
rebuild it) lives in a hashable `ChainSpec`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ._losses import SQUARED, Loss


class DenseParams(NamedTuple):
    """Weights of a dense chain; biases are `None` where the model has none."""

    w_in: Float[Array, "n nx"]
    b_in: Optional[Float[Array, " n"]]
    w_hid: Float[Array, "N-1 n n"]
    b_hid: Optional[Float[Array, "N-1 n"]]
    w_out: Float[Array, "ny n"]
    b_out: Optional[Float[Array, " ny"]]


@dataclasses.dataclass(frozen=True)
class ChainSpec:
    """Static description of a dense chain and its loss (hashable, so it can be jit-static)."""

    activation: Callable
    final_activation: Callable
    n_in: int
    width: int
    n_out: int
    depth: int
    use_bias: bool
    use_final_bias: bool
    scalar_in: bool
    scalar_out: bool
    scan_layout: bool
    skeleton: Any  # eqx non-array part of the model, to rebuild it
    treedef: Any  # treedef of eqx.filter(model, eqx.is_inexact_array)
    dtype: Any
    loss: Loss = SQUARED  # the training loss (set by `alm(loss=...)`)

    def act(self, s):
        return _elementwise(self.activation)(s)

    def final_act(self, s):
        return _elementwise(self.final_activation)(s)

    def act_and_grad(self, s):
        return _elementwise_value_and_grad(self.activation)(s)

    def final_act_and_grad(self, s):
        return _elementwise_value_and_grad(self.final_activation)(s)


def _elementwise(f):
    # eqx.nn.MLP applies activations to scalars under vmap; do the same so that
    # any scalar function the model accepts behaves identically here.
    def apply(s):
        return jax.vmap(f)(s.reshape(-1)).reshape(s.shape)

    return apply


def _elementwise_value_and_grad(f):
    def apply(s):
        v, g = jax.vmap(jax.value_and_grad(f))(s.reshape(-1))
        return v.reshape(s.shape), g.reshape(s.shape)

    return apply


def _has_inexact_arrays(tree) -> bool:
    return any(eqx.is_inexact_array(leaf) for leaf in jax.tree_util.tree_leaves(tree))


def mlp_to_chain(model) -> tuple[DenseParams, ChainSpec]:
    """Split an `eqx.nn.MLP` into its stacked weights and a static spec.

    Raises:
        TypeError: if `model` is not an `eqx.nn.MLP`, its activations carry
            trainable arrays, or its weights mix dtypes.
        ValueError: if `model.depth < 1` (a linear model has no hidden states).
    """
    if not isinstance(model, eqx.nn.MLP):
        raise TypeError(
            f"model: expected an equinox.nn.MLP, got {type(model).__name__}."
        )
    if model.depth < 1:
        raise ValueError(
            f"model: depth must be >= 1 (a lifted problem needs hidden states), got depth={model.depth}."
        )
    if _has_inexact_arrays(model.activation) or _has_inexact_arrays(model.final_activation):
        raise TypeError(
            "model: activations with trainable parameters are not supported; "
            "use a parameter-free activation function."
        )
    filtered = eqx.filter(model, eqx.is_inexact_array)
    leaves, treedef = jax.tree_util.tree_flatten(filtered)
    dtypes = {leaf.dtype for leaf in leaves}
    if len(dtypes) != 1:
        raise TypeError(f"model: all weights must share one float dtype, got {sorted(map(str, dtypes))}.")
    dtype = dtypes.pop()

    layers = model.layers
    scan_layout = len(layers) == 3 and layers[1].weight.ndim == 3
    first, last = layers[0], layers[-1]
    if scan_layout:
        hid_w, hid_b = layers[1].weight, layers[1].bias
    else:
        hidden = layers[1:-1]
        width = first.weight.shape[0]
        if hidden:
            hid_w = jnp.stack([lay.weight for lay in hidden])
            hid_b = jnp.stack([lay.bias for lay in hidden]) if hidden[0].use_bias else None
        else:
            hid_w = jnp.zeros((0, width, width), dtype)
            hid_b = jnp.zeros((0, width), dtype) if model.use_bias else None
    if not model.use_bias:
        hid_b = None
    params = DenseParams(
        w_in=first.weight,
        b_in=first.bias,
        w_hid=hid_w,
        b_hid=hid_b,
        w_out=last.weight,
        b_out=last.bias,
    )
    skeleton = eqx.filter(model, eqx.is_inexact_array, inverse=True)
    spec = ChainSpec(
        activation=model.activation,
        final_activation=model.final_activation,
        n_in=first.weight.shape[1],
        width=first.weight.shape[0],
        n_out=last.weight.shape[0],
        depth=model.depth,
        use_bias=bool(model.use_bias),
        use_final_bias=bool(model.use_final_bias),
        scalar_in=model.in_size == "scalar",
        scalar_out=model.out_size == "scalar",
        scan_layout=scan_layout,
        skeleton=skeleton,
        treedef=treedef,
        dtype=dtype,
    )
    return params, spec


def chain_to_filtered(params: DenseParams, spec: ChainSpec):
    """Arrays of `params` laid out like `eqx.filter(model, eqx.is_inexact_array)`."""
    leaves = [params.w_in]
    if params.b_in is not None:
        leaves.append(params.b_in)
    if spec.scan_layout:
        leaves.append(params.w_hid)
        if params.b_hid is not None:
            leaves.append(params.b_hid)
    else:
        for i in range(spec.depth - 1):
            leaves.append(params.w_hid[i])
            if params.b_hid is not None:
                leaves.append(params.b_hid[i])
    leaves.append(params.w_out)
    if params.b_out is not None:
        leaves.append(params.b_out)
    return jax.tree_util.tree_unflatten(spec.treedef, leaves)


def filtered_to_chain(filtered, spec: ChainSpec) -> DenseParams:
    """Inverse of `chain_to_filtered`."""
    leaves = list(jax.tree_util.tree_leaves(filtered))
    take = iter(leaves)
    w_in = next(take)
    b_in = next(take) if spec.use_bias else None
    if spec.scan_layout:
        w_hid = next(take)
        b_hid = next(take) if spec.use_bias else None
    else:
        ws, bs = [], []
        for _ in range(spec.depth - 1):
            ws.append(next(take))
            if spec.use_bias:
                bs.append(next(take))
        n = spec.width
        w_hid = jnp.stack(ws) if ws else jnp.zeros((0, n, n), w_in.dtype)
        b_hid = (jnp.stack(bs) if bs else jnp.zeros((0, n), w_in.dtype)) if spec.use_bias else None
    w_out = next(take)
    b_out = next(take) if spec.use_final_bias else None
    return DenseParams(w_in, b_in, w_hid, b_hid, w_out, b_out)


def chain_to_model(params: DenseParams, spec: ChainSpec):
    """Rebuild the `eqx.nn.MLP` from stacked weights."""
    return eqx.combine(chain_to_filtered(params, spec), spec.skeleton)


def hidden_layers(params: DenseParams):
    """Weights of the N hidden stages a = 0..N-1 as (W, b) lists of arrays."""
    out = [(params.w_in, params.b_in)]
    for i in range(params.w_hid.shape[0]):
        out.append((params.w_hid[i], None if params.b_hid is None else params.b_hid[i]))
    return out
