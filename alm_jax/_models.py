"""The models `alm_jax` trains: `eqx.nn.MLP` (dense chain, `_chain`) or a
general layer chain (`_layers`), behind one set of conversions."""

from __future__ import annotations

import equinox as eqx
import numpy as np

from ._chain import chain_to_filtered, chain_to_model, mlp_to_chain
from ._layers import LayerSpec, layer_chain, layers_to_filtered, layers_to_model, split_states


def to_chain(model, x):
    """(params, spec) of `model`; a general chain's widths are traced from x's feature count."""
    if isinstance(model, eqx.nn.MLP):
        return mlp_to_chain(model)
    shape = np.shape(x)
    if len(shape) != 2:
        raise ValueError(f"x: expected shape (m, n_in) for a layer-chain model, got shape {shape}.")
    return layer_chain(model, shape[1])


def to_model(params, spec):
    """The user's model (an `eqx.nn.MLP` or an `eqx.nn.Sequential`) with weights `params`."""
    return layers_to_model(params, spec) if isinstance(spec, LayerSpec) else chain_to_model(params, spec)


def to_filtered(params, spec):
    """`params` laid out like `eqx.filter(model, eqx.is_inexact_array)`."""
    return layers_to_filtered(params, spec) if isinstance(spec, LayerSpec) else chain_to_filtered(params, spec)


def unstack_states(spec, Z):
    """One (m, width) array per hidden state from the stacked layout."""
    return tuple(split_states(spec, Z[0])) if isinstance(spec, LayerSpec) else tuple(Z)
