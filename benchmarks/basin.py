"""Speed or basin: has ALM stopped at a local minimum of the training loss?

A peer that ends a budget with a lower training error may have trained
faster, or it may have reached a better minimum. This script tells the two
apart on each split: it trains the default ALM for `--budget` seconds, then
looks at the single-shooting training MSE f(θ) at the weights it returned,

* ‖∇f‖ and the extreme eigenvalues of the dense Hessian ∇²f (a local
  minimum has ∇f ≈ 0 and no negative curvature beyond round-off), and
* the least f that L-BFGS and Adam (each learning rate of
  `uci_suite.ADAM_GRID`) reach in `--extra` more seconds from there.

If the Hessian has no negative curvature and L-BFGS, a monotone descent
method, lowers f by less than `--tol` (relative), ALM has stopped at a local
minimum, and a peer that ends lower got there by another path, not by
training faster. Adam at a large rate may leave the basin; its figure says
whether it found a lower one within `--extra` seconds. Same data, splits and initial weights as
`uci_suite.py`; JSON to `--out`.

    python benchmarks/basin.py --datasets wine-quality-red --splits 10 --budget 20
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import uci_suite  # noqa: E402  (sets XLA_FLAGS before jax is imported)

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

import alm_jax  # noqa: E402
from alm_jax._baselines import train_adam, train_lbfgs  # noqa: E402


def curvature(model, x, y, max_weights):
    """‖∇f‖ and the least and largest eigenvalues of ∇²f, f = mean squared error (None past `max_weights`)."""
    params, static = eqx.partition(model, eqx.is_inexact_array)
    flat, unravel = ravel_pytree(params)

    def f(w):
        return jnp.mean((jax.vmap(eqx.combine(unravel(w), static))(x).reshape(y.shape) - y) ** 2)

    grad = float(jnp.linalg.norm(jax.grad(f)(flat)))
    if flat.size > max_weights:
        return grad, None, None
    eig = np.linalg.eigvalsh(np.asarray(jax.jit(jax.hessian(f))(flat)))
    return grad, float(eig[0]), float(eig[-1])


def continuations(model, x, y, extra):
    """The least train MSE within `extra` seconds (compilation included) of each single-shooting
    method from `model`, None for one whose first call did not finish in time."""
    runs = {"lbfgs": train_lbfgs(model, x, y, time_budget=extra)}
    for lr in uci_suite.ADAM_GRID:
        runs[f"adam {lr:g}"] = train_adam(model, x, y, time_budget=extra, learning_rate=lr)
    return {k: (min(r.mses) if r.mses else None, r.steps) for k, r in runs.items()}


def _ratio(r):
    return f"{r:.5f}" if r is not None else "no step in time"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="*", default=["wine-quality-red"])
    ap.add_argument("--splits", type=int, default=3)
    ap.add_argument("--budget", type=float, default=20.0, help="ALM's seconds, compilation included")
    ap.add_argument("--extra", type=float, default=5.0, help="seconds of each continuation")
    ap.add_argument("--tol", type=float, default=1e-3, help="relative decrease that counts as leaving the minimum")
    ap.add_argument("--depth", type=int, default=1)
    ap.add_argument("--width", type=int, default=50)
    ap.add_argument("--max-weights", type=int, default=4000, help="largest network whose Hessian is formed")
    ap.add_argument("--out", default="benchmarks/out/basin")
    args = ap.parse_args(argv)
    jax.config.update("jax_enable_x64", True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"# ALM {args.budget:g} s, then {args.extra:g} s of each continuation; {args.depth}x{args.width} tanh, "
          f"float64, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    rows = []
    for name in args.datasets:
        print(f"\n{name}: split | ALM's train MSE, updates | ‖∇f‖ | λ_min, λ_max of ∇²f | L-BFGS's / ALM's | "
              f"best Adam's / ALM's | at a local minimum")
        for split in range(args.splits):
            data, model = uci_suite.problem(name, split, args.depth, args.width)
            x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
            res = alm_jax.fit(model, x, y, time_budget=args.budget, progress=False)
            f_alm, _ = uci_suite.evaluate(res.model, data)
            grad, lo, hi = curvature(res.model, x, y, args.max_weights)
            cont = continuations(res.model, x, y, args.extra)
            lbfgs = cont["lbfgs"][0] / f_alm if cont["lbfgs"][0] is not None else None
            adams = [v for k, (v, _) in cont.items() if k != "lbfgs" and v is not None]
            adam = min(adams) / f_alm if adams else None
            # L-BFGS descends monotonically, so it measures the basin; Adam's
            # larger rates may leave it, which is reported beside.
            at_min = lbfgs is not None and lbfgs > 1 - args.tol and (lo is None or lo >= -1e-8 * hi)
            eig = f"{lo:+.1e}, {hi:.1e}" if lo is not None else "not formed"
            print(f"  {split:2d} | {f_alm:.5g}, {len(res.history.time)} | {grad:.1e} | {eig} | {_ratio(lbfgs)} | {_ratio(adam)} | "
                  f"{'yes' if at_min else 'no'}")
            sys.stdout.flush()
            rows.append({"dataset": name, "split": split, "alm_train_mse": f_alm, "updates": len(res.history.time),
                         "grad_norm": grad, "hessian_min": lo, "hessian_max": hi, "at_minimum": bool(at_min),
                         "continuations": {k: {"train_mse": v, "steps": s} for k, (v, s) in cont.items()}})
        ours = [r for r in rows if r["dataset"] == name]
        print(f"  at a local minimum on {sum(r['at_minimum'] for r in ours)}/{len(ours)} splits; mean train MSE "
              f"{np.mean([r['alm_train_mse'] for r in ours]):.5g}")
    meta = {"command": " ".join(["python"] + sys.argv), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "device": str(jax.devices()[0]), "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
            **{k: v for k, v in vars(args).items() if k != "out"}}
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"\n# wrote {out}/results.json")


if __name__ == "__main__":
    main()
