"""A general layer chain (not an eqx.nn.MLP): cost per ALM update and training progress.

The README's example (--chain residual): Linear(6→32) – tanh – residual
block z + tanh(Wz + b) – LayerNorm – Linear(32→1); or (--chain dense)
Linear(6→32) – tanh – Linear(32→32) – tanh – LayerNorm – Linear(32→1), whose
weights sit almost all in plain dense layers (the Kronecker-assembled part of
the exact step). On UCI yacht (m = 277), trained by `alm_jax.fit` with the
`cg` (matrix-free) and `lm` (exact) inner solvers, 100 updates each, in the
JAX default dtype (float32) unless --x64.

    python benchmarks/layer_chain.py
    python benchmarks/layer_chain.py --chain dense
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from uci_suite import Residual  # noqa: E402  (sets XLA_FLAGS before jax is imported)

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import alm_jax  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--inner", nargs="*", default=["cg", "lm"])
    ap.add_argument("--x64", action="store_true")
    ap.add_argument("--chain", choices=["residual", "dense"], default="residual")
    args = ap.parse_args(argv)
    if args.x64:
        jax.config.update("jax_enable_x64", True)
    data = alm_jax.datasets.load_uci("yacht", split=0)
    w = args.width
    k = jax.random.split(jax.random.key(0), 3)
    middle = Residual(eqx.nn.Linear(w, w, key=k[1])) if args.chain == "residual" else eqx.nn.Linear(w, w, key=k[1])
    chain = [eqx.nn.Linear(6, w, key=k[0]), eqx.nn.Lambda(jnp.tanh), middle]
    chain += [eqx.nn.Lambda(jnp.tanh)] if args.chain == "dense" else []
    chain += [eqx.nn.LayerNorm(w), eqx.nn.Linear(w, 1, key=k[2])]
    n_weights = sum(a.size for a in jax.tree_util.tree_leaves(eqx.filter(chain, eqx.is_inexact_array)))
    width = w * (len(chain) - 1)
    print(f"# {args.chain} layer chain on yacht (m = {len(data.x_train)}), P = {n_weights}, states of total width {width}, "
          f"{'float64' if args.x64 else 'float32'}, XLA_FLAGS={os.environ['XLA_FLAGS']!r}, {jax.devices()[0]}")
    print("inner | updates | median s per update | first update at s | train MSE first -> last")
    for inner in args.inner:
        res = alm_jax.fit(chain, data.x_train, data.y_train, inner=inner, max_steps=args.steps, progress=False)
        h = res.history
        print(f"{inner:5s} | {len(h.mse):7d} | {np.median(np.diff(h.time)):.3f} | {h.time[0]:.2f} | "
              f"{h.mse[0]:.3g} -> {h.mse[-1]:.3g}")


if __name__ == "__main__":
    main()
