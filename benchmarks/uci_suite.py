"""UCI regression suite: ALM vs single-shooting peers at equal wall-clock.

Protocol (Hernández-Lobato & Adams 2015): standardise on the training split,
one hidden layer of 50 tanh units, the fixed splits (a few in quick mode, all
20 with --full). Every method starts from the same initial weights and gets
the same wall-clock budget, compilation included:

* `alm`    — this library, `alm_jax.fit` (default options, or --policy, --solve-dtype, --matmul-precision);
* `optx_lm` — optimistix Levenberg–Marquardt on the residual (single shooting);
* `lbfgs`  — optax.lbfgs with its zoom line search;
* `adam`   — full-batch Adam, best of a learning-rate grid (by train MSE).

Reports final train MSE (standardised), test RMSE (data units), mean ± standard
error over splits, and the median time to reach `--target` train MSE; writes
JSON and one PNG per data set (train MSE vs seconds, all methods).

    python benchmarks/uci_suite.py                  # quick: 2 splits, 10 s per method
    python benchmarks/uci_suite.py --full           # 20 splits, 60 s per method
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import alm_jax  # noqa: E402
from alm_jax._baselines import train_adam, train_lbfgs, train_optx_lm  # noqa: E402
from compare import compare, standard_error, table  # noqa: E402  (benchmarks/compare.py)

ADAM_GRID = (1e-3, 3e-3, 1e-2)


def run_alm(model, x, y, budget, options):
    res = alm_jax.fit(model, x, y, time_budget=budget, progress=False, **options)
    return res.model, list(res.history.time), list(res.history.mse)


def run_adam(model, x, y, budget):
    runs = [train_adam(model, x, y, time_budget=budget, learning_rate=lr) for lr in ADAM_GRID]
    best = min(runs, key=lambda r: r.mses[-1] if r.mses else np.inf)
    return best.model, best.times, best.mses, ADAM_GRID[runs.index(best)]


def first_time_below(times, mses, target):
    for t, v in zip(times, mses):
        if v <= target:
            return t
    return None


TEACHER = "teacher-student"


def teacher_student(split, depth, width, m=1000, n_in=8, noise=0.01):
    """Synthetic regression: y = a random deep tanh teacher (same depth and width
    as the student) of Gaussian inputs, plus noise; 80/20 split, standardised."""
    from alm_jax.datasets import RegressionData

    k = jax.random.split(jax.random.key(1000 + split), 3)
    teacher = eqx.nn.MLP(n_in, 1, width, depth, activation=jnp.tanh, key=k[0])
    x = np.asarray(jax.random.normal(k[1], (m, n_in)))
    y = np.asarray(jax.vmap(teacher)(jnp.asarray(x)))
    y = y + noise * y.std() * np.asarray(jax.random.normal(k[2], y.shape))
    n_tr = int(0.8 * m)
    mean, std = y[:n_tr].mean(0), y[:n_tr].std(0)
    y = (y - mean) / std
    return RegressionData(TEACHER, x[:n_tr], y[:n_tr], x[n_tr:], y[n_tr:], mean, std)


class Residual(eqx.Module):
    lin: eqx.nn.Linear

    def __call__(self, z, *, key=None):
        return z + jnp.tanh(self.lin(z))


def residual_chain(n_in, width, depth, key):
    """Linear–tanh–(residual block, LayerNorm)×depth–Linear, as a Sequential (a general layer chain)."""
    k = jax.random.split(key, depth + 2)
    layers = [eqx.nn.Linear(n_in, width, key=k[0]), eqx.nn.Lambda(jnp.tanh)]
    for i in range(depth):
        layers += [Residual(eqx.nn.Linear(width, width, key=k[1 + i])), eqx.nn.LayerNorm(width)]
    return eqx.nn.Sequential(layers + [eqx.nn.Linear(width, 1, key=k[-1])])


def problem(name, split, depth, width, model="mlp"):
    """A split's data (a UCI set or `TEACHER`) and its initial network, the same for every method."""
    data = teacher_student(split, depth, width) if name == TEACHER else alm_jax.datasets.load_uci(name, split)
    if model == "mlp":
        net = eqx.nn.MLP(data.x_train.shape[1], 1, width, depth, activation=jnp.tanh, key=jax.random.key(split))
    else:
        net = residual_chain(data.x_train.shape[1], width, depth, jax.random.key(split))
    return data, net


def evaluate(model, data):
    pred_tr = np.asarray(jax.vmap(model)(jnp.asarray(data.x_train)))
    pred_te = np.asarray(jax.vmap(model)(jnp.asarray(data.x_test)))
    return float(np.mean((pred_tr - data.y_train) ** 2)), data.rmse_in_units(pred_te, data.y_test)


def main(argv=None, alm_variants=None):
    """Run the suite. `alm_variants` maps extra method names to `alm_jax.fit` options."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--datasets", nargs="*", default=list(alm_jax.datasets.UCI_DATASETS),
                    help=f"UCI names, or {TEACHER!r} (synthetic, teacher as deep as the student)")
    ap.add_argument("--splits", type=int, default=None)
    ap.add_argument("--budget", type=float, default=None, help="seconds per method and split")
    ap.add_argument("--methods", nargs="*", default=["alm", "optx_lm", "lbfgs", "adam"])
    ap.add_argument("--policy", default=None, help="ALM policy (default: the library's)")
    ap.add_argument("--solve-dtype", default=None, choices=["auto", "float32", "float64"],
                    help="the inner cg's CG dtype (default: the library's, auto: float32 for one hidden layer "
                         "whose CG products use every sample, on a CPU)")
    ap.add_argument("--max-stall", default=None,
                    help="ALM's max_stall (default: the library's); 'none' turns the stall safeguard off")
    ap.add_argument("--multipliers", default=None, choices=["auto", "first_order", "adjoint"],
                    help="ALM's multiplier update (default: the library's, auto: adjoint from two hidden layers)")
    ap.add_argument("--second-order", default=None,
                    help="the inner cg's second_order weight, or 'auto' (default: the library's, auto: 0.5 for one "
                         "hidden layer whose CG products use every sample; 0: Gauss–Newton)")
    ap.add_argument("--damping-decrease", type=float, default=None,
                    help="the inner cg's damping_decrease (default: the library's, Nielsen's 1/3)")
    ap.add_argument("--curvature-samples", default=None,
                    help="the inner cg's curvature_samples: a count, 'auto' or 'none' (default: the library's, "
                         "auto: 4 per weight on a CPU, every sample on a GPU or TPU)")
    ap.add_argument("--dtype", default="float64", choices=["float32", "float64"],
                    help="the models' and data's dtype (float32: JAX's x64 mode stays off)")
    ap.add_argument("--matmul-precision", default=None,
                    help="ALM's matmul_precision (default: the library's, 'highest'); 'none' for JAX's own")
    ap.add_argument("--width", type=int, default=50)
    ap.add_argument("--depth", type=int, default=1)
    ap.add_argument("--model", choices=["mlp", "resnorm"], default="mlp",
                    help="mlp: eqx.nn.MLP; resnorm: a general layer chain Linear-tanh-(residual block, "
                         "LayerNorm)×depth-Linear given as a list of modules")
    ap.add_argument("--target", type=float, default=0.05, help="train MSE (standardised) for time-to-target")
    ap.add_argument("--out", default="benchmarks/out/uci")
    args = ap.parse_args(argv)
    jax.config.update("jax_enable_x64", args.dtype == "float64")
    n_splits = args.splits or (20 if args.full else 2)
    budget = args.budget or (60.0 if args.full else 10.0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"command": " ".join(["python"] + sys.argv), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "device": str(jax.devices()[0]), "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""), "float": args.dtype,
            "budget_s": budget, "splits": n_splits, "width": args.width, "depth": args.depth, "policy": args.policy,
            "solve_dtype": args.solve_dtype, "matmul_precision": args.matmul_precision, "max_stall": args.max_stall,
            "multipliers": args.multipliers, "second_order": args.second_order,
            "damping_decrease": args.damping_decrease, "curvature_samples": args.curvature_samples,
            "model": args.model,
            "alm_variants": {k: repr(v) for k, v in (alm_variants or {}).items()}}
    print(f"# UCI suite: {n_splits} splits, {budget:g} s per method, {args.model} {args.depth}x{args.width} tanh, {args.dtype}, "
          f"XLA_FLAGS={meta['XLA_FLAGS']!r}")
    alm_options = {k: v for k, v in (("policy", args.policy), ("solve_dtype", args.solve_dtype),
                                     ("multipliers", args.multipliers), ("damping_decrease", args.damping_decrease))
                    if v is not None}
    if args.second_order is not None:
        alm_options["second_order"] = "auto" if args.second_order.lower() == "auto" else float(args.second_order)
    if args.curvature_samples is not None:
        c = args.curvature_samples.lower()
        alm_options["curvature_samples"] = None if c == "none" else c if c == "auto" else int(c)
    if args.max_stall is not None:
        alm_options["max_stall"] = None if args.max_stall.lower() == "none" else int(args.max_stall)
    if args.matmul_precision is not None:
        alm_options["matmul_precision"] = None if args.matmul_precision.lower() == "none" else args.matmul_precision
    results = {}
    for name in args.datasets:
        per_method = {m: {"train_mse": [], "test_rmse": [], "t_target": [], "curves": []} for m in args.methods}
        for split in range(n_splits):
            data, model = problem(name, split, args.depth, args.width, args.model)
            x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
            for method in args.methods:
                extra = None
                if method == "alm":
                    trained, times, mses = run_alm(model, x, y, budget, alm_options)
                elif alm_variants and method in alm_variants:
                    trained, times, mses = run_alm(model, x, y, budget, alm_variants[method])
                elif method == "adam":
                    trained, times, mses, extra = run_adam(model, x, y, budget)
                elif method == "lbfgs":
                    r = train_lbfgs(model, x, y, time_budget=budget)
                    trained, times, mses = r.model, r.times, r.mses
                elif method == "optx_lm":
                    r = train_optx_lm(model, x, y, time_budget=budget)
                    trained, times, mses = r.model, r.times, r.mses
                else:
                    raise ValueError(f"--methods: unknown method {method!r}")
                train_mse, test_rmse = evaluate(trained, data)
                rec = per_method[method]
                rec["train_mse"].append(train_mse)
                rec["test_rmse"].append(test_rmse)
                rec["t_target"].append(first_time_below(times, mses, args.target))
                rec["curves"].append({"time": [float(t) for t in times], "mse": [float(v) for v in mses],
                                      "adam_lr": extra})
        results[name] = per_method
        print(f"\n{name}: train MSE (standardised) | test RMSE (data units) | median s to train MSE ≤ {args.target:g}"
              " | records (ALM: updates) and s to the first, medians (worst split's train MSE)")
        for method, rec in per_method.items():
            tr, te = np.asarray(rec["train_mse"]), np.asarray(rec["test_rmse"])
            hits = [t for t in rec["t_target"] if t is not None]
            tt = f"{np.median(hits):6.2f}" if len(hits) == len(rec["t_target"]) else f"{len(hits)}/{len(rec['t_target'])} reached"
            steps = np.median([len(c["time"]) for c in rec["curves"]])
            first = np.median([c["time"][0] if c["time"] else np.nan for c in rec["curves"]])
            print(f"  {method:14s} {tr.mean():.3e} ± {standard_error(tr):.1e} | {te.mean():.4g} ± {standard_error(te):.2g} | {tt} | "
                  f"{steps:.0f}, {first:.2f} s ({tr.max():.2e})")
        plot_curves(per_method, out / f"{name}.png", f"{name}, split 0")
    (out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    rows = compare(results)
    if rows:
        print("\nAgainst the best peer (issue 3's targets; benchmarks/compare.py):\n" + table(rows))
    print(f"\n# wrote {out}/results.json and one PNG per data set")


def plot_curves(per_method, path, title, key="mse", ylabel="train MSE (standardised)"):
    """Split 0's curve `key` vs seconds for every method, one PNG (skipped without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plots are optional: pip install -e ".[bench]"
        return
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for method, rec in per_method.items():
        c = rec["curves"][0]
        if c["time"]:
            ax.semilogy(c["time"], c[key], label=method)
    ax.set_xlabel("seconds (compilation included)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
