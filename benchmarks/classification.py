"""Classification: ALM (generalised Gauss–Newton on softmax cross-entropy) vs Adam and L-BFGS.

The bundled 8 × 8 digits (1797 images, 10 classes; `alm_jax.datasets.load_digits`),
stratified 80/20 splits, pixels standardised on the training split, one
hidden layer of 32 tanh units (2 410 weights), logits out. Every method
starts from the same initial weights and gets the same wall-clock budget,
compilation included, and minimises the mean softmax cross-entropy:

* `alm-<inner>` — this library, `alm_jax.fit(..., loss="softmax_cross_entropy",
  inner=<inner>)` with default options (any of lm, gn, cg, lbfgs, adam, bcd);
* `lbfgs`  — optax.lbfgs with its zoom line search;
* `adam`   — full-batch Adam, best of a learning-rate grid (by train loss).

Reports final train loss, train and test accuracy (mean ± standard error over
splits) and the median time to reach `--target` train loss; writes JSON and a
PNG of train loss vs seconds (split 0, all methods).

    python benchmarks/classification.py                   # quick: 3 splits, 20 s per method
    python benchmarks/classification.py --full            # 10 splits, 60 s per method
    python benchmarks/classification.py --methods alm-cg alm-lm alm-gn alm-bcd alm-lbfgs alm-adam
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from uci_suite import plot_curves  # noqa: E402  (sets XLA_FLAGS before jax is imported)
from compare import standard_error  # noqa: E402

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import alm_jax  # noqa: E402
from alm_jax._baselines import train_adam, train_lbfgs  # noqa: E402

LOSS = "softmax_cross_entropy"
ADAM_GRID = (1e-3, 3e-3, 1e-2)


def run_method(method, model, x, y, budget):
    """(trained model, times, train losses, extra) for one method."""
    if method.startswith("alm-"):
        res = alm_jax.fit(model, x, y, loss=LOSS, inner=method[4:], time_budget=budget, progress=False)
        return res.model, list(res.history.time), list(res.history.loss), None
    if method == "lbfgs":
        r = train_lbfgs(model, x, y, time_budget=budget, loss=LOSS)
        return r.model, r.times, r.losses, None
    if method == "adam":
        runs = [train_adam(model, x, y, time_budget=budget, learning_rate=lr, loss=LOSS) for lr in ADAM_GRID]
        best = min(runs, key=lambda r: r.losses[-1] if r.losses else np.inf)
        return best.model, best.times, best.losses, ADAM_GRID[runs.index(best)]
    raise ValueError(f"--methods: unknown method {method!r} (alm-<inner>, lbfgs or adam)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--splits", type=int, default=None)
    ap.add_argument("--budget", type=float, default=None, help="seconds per method and split")
    ap.add_argument("--methods", nargs="*", default=["alm-cg", "alm-lm", "lbfgs", "adam"])
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--depth", type=int, default=1)
    ap.add_argument("--target", type=float, default=0.01, help="mean train cross-entropy for time-to-target")
    ap.add_argument("--out", default="benchmarks/out/classification")
    args = ap.parse_args(argv)
    jax.config.update("jax_enable_x64", True)
    n_splits = args.splits or (10 if args.full else 3)
    budget = args.budget or (60.0 if args.full else 20.0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"command": " ".join(["python"] + (sys.argv if argv is None else ["benchmarks/classification.py", *argv])),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "device": str(jax.devices()[0]),
            "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""), "float": "float64", "budget_s": budget,
            "splits": n_splits, "width": args.width, "depth": args.depth}
    print(f"# digits: {n_splits} splits, {budget:g} s per method, {args.depth}x{args.width} tanh, float64, "
          f"XLA_FLAGS={meta['XLA_FLAGS']!r}")
    recs = {m: {"train_loss": [], "train_acc": [], "test_acc": [], "t_target": [], "steps": [], "curves": []}
            for m in args.methods}
    for split in range(n_splits):
        data = alm_jax.datasets.load_digits(split)
        model = eqx.nn.MLP(64, 10, args.width, args.depth, activation=jnp.tanh, key=jax.random.key(split))
        x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
        for method in args.methods:
            trained, times, losses, extra = run_method(method, model, x, y, budget)
            logits_tr = np.asarray(jax.vmap(trained)(x))
            logits_te = np.asarray(jax.vmap(trained)(jnp.asarray(data.x_test)))
            rec = recs[method]
            rec["train_loss"].append(float(losses[-1]) if losses else float("nan"))
            rec["train_acc"].append(data.accuracy(logits_tr, data.labels_train))
            rec["test_acc"].append(data.accuracy(logits_te, data.labels_test))
            rec["t_target"].append(next((t for t, v in zip(times, losses) if v <= args.target), None))
            rec["steps"].append(len(times))
            rec["curves"].append({"time": [float(t) for t in times], "loss": [float(v) for v in losses],
                                  "adam_lr": extra})
    print(f"\ndigits: train cross-entropy | train acc | test acc | records | median s to train loss ≤ {args.target:g}")
    for method, rec in recs.items():
        def ms(key, fmt):
            a = np.asarray(rec[key], float)
            return f"{a.mean():{fmt}} ± {standard_error(a):.1e}"

        hits = [t for t in rec["t_target"] if t is not None]
        tt = f"{np.median(hits):6.2f}" if len(hits) == len(rec["t_target"]) else f"{len(hits)}/{n_splits} reached"
        print(f"  {method:10s} {ms('train_loss', '.3e')} | {ms('train_acc', '.4f')} | {ms('test_acc', '.4f')} | "
              f"{int(np.median(rec['steps'])):6d} | {tt}")
    (out / "results.json").write_text(json.dumps({"meta": meta, "results": recs}, indent=1))
    plot_curves(recs, out / "digits.png", "digits, split 0", key="loss", ylabel="train cross-entropy (mean)")
    print(f"\n# wrote {out}/results.json and {out}/digits.png")


if __name__ == "__main__":
    main()
