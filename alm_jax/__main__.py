"""Main job: train an MLP on a bundled UCI set with ALM, next to Adam.

    python -m alm_jax --dataset yacht --time-budget 30
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def _parse(argv):
    from .datasets import UCI_DATASETS
    from ._inner import INNER_SOLVERS
    from ._policies import POLICIES

    p = argparse.ArgumentParser(prog="python -m alm_jax", description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="yacht", choices=UCI_DATASETS)
    p.add_argument("--split", type=int, default=0, help="fixed train/test split, 0..19")
    p.add_argument("--width", type=int, default=50)
    p.add_argument("--depth", type=int, default=1, help="number of hidden layers")
    p.add_argument("--activation", default="tanh", choices=["tanh", "relu", "softplus", "sigmoid", "gelu"])
    p.add_argument("--policy", default=None, choices=sorted(POLICIES), help="default: the library's")
    p.add_argument("--inner", default="cg", choices=sorted(INNER_SOLVERS))
    p.add_argument("--time-budget", type=float, default=30.0, help="seconds per method, compilation included")
    p.add_argument("--max-steps", type=int, default=None, help="cap on ALM updates (LM iterations)")
    p.add_argument("--max-inner-steps", type=int, default=None, help="default: the inner solver's")
    p.add_argument("--adam-lr", type=float, default=1e-2)
    p.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--compilation-cache", default=None, metavar="DIR",
                   help="keep compiled programs in DIR for later runs (JAX's persistent compilation cache)")
    return p.parse_args(argv)


def _configure_jax(args):
    import jax

    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    if args.compilation_cache:
        # Every program counts, even the small ones: the budget includes compilation.
        jax.config.update("jax_compilation_cache_dir", args.compilation_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


def main(argv=None) -> int:
    args = _parse(argv)
    _configure_jax(args)
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import numpy as np

    from . import fit
    from ._baselines import train_adam
    from .datasets import load_uci

    dtype = jnp.float64 if args.dtype == "float64" else jnp.float32
    data = load_uci(args.dataset, args.split, dtype=np.dtype(args.dtype))
    act = {"tanh": jnp.tanh, "relu": jax.nn.relu, "softplus": jax.nn.softplus,
           "sigmoid": jax.nn.sigmoid, "gelu": jax.nn.gelu}[args.activation]
    model = eqx.nn.MLP(data.x_train.shape[1], 1, args.width, args.depth, activation=act,
                       dtype=dtype, key=jax.random.key(args.seed))
    m, n_test = len(data.x_train), len(data.x_test)
    print(f"alm_jax: {args.dataset} split {args.split} (train {m}, test {n_test}), "
          f"MLP {data.x_train.shape[1]}-{'-'.join([str(args.width)] * args.depth)}-1 {args.activation}, "
          f"{args.dtype}, policy {args.policy or 'default'}, inner {args.inner}, budget {args.time_budget:g} s per method, "
          f"device {jax.devices()[0].platform}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")

    t0 = time.perf_counter()
    result = fit(model, data.x_train, data.y_train, time_budget=args.time_budget, max_steps=args.max_steps,
                 progress=not args.no_progress, policy=args.policy, max_inner_steps=args.max_inner_steps, inner=args.inner)
    alm_seconds = time.perf_counter() - t0
    hist = result.history
    if len(hist.mse):
        every = max(1, len(hist.mse) // 10)
        print("   step   time(s)   train MSE (std.)   ||h||      beta      damping")
        for i in list(range(0, len(hist.mse), every)) + ([len(hist.mse) - 1] if (len(hist.mse) - 1) % every else []):
            print(f"  {i + 1:5d}  {hist.time[i]:8.2f}   {hist.mse[i]:15.4e}  {hist.h_norm[i]:9.2e}  "
                  f"{hist.beta[i]:8.1e}  {hist.damping[i]:9.2e}")

    adam = train_adam(model, data.x_train, data.y_train, time_budget=alm_seconds, learning_rate=args.adam_lr)

    def report(mdl):
        pred_tr = np.asarray(jax.vmap(mdl)(data.x_train))
        pred_te = np.asarray(jax.vmap(mdl)(data.x_test))
        mse_units = float(np.mean((pred_tr - data.y_train) ** 2) * data.y_std[0] ** 2)
        return mse_units, data.rmse_in_units(pred_te, data.y_test)

    rows = [(f"ALM + {args.inner}", len(hist.mse), alm_seconds, *report(result.model)),
            (f"Adam (lr {args.adam_lr:g})", adam.steps, adam.seconds, *report(adam.model))]
    print(f"\nresults on {args.dataset} (train MSE and test RMSE in the data's units)")
    print(f"  {'method':22s} {'steps':>7s} {'wall s':>8s} {'train MSE':>12s} {'test RMSE':>10s}")
    for name, steps, secs, mse, rmse in rows:
        print(f"  {name:22s} {steps:7d} {secs:8.1f} {mse:12.4g} {rmse:10.4g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
