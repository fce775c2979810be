"""Issue 3's UCI targets, checked from `uci_suite.py` results: each ALM arm against the best peer.

For every data set and every method that is not a peer (`alm` and any
variant), against the peer with the lowest mean train MSE:

* train MSE: the paired geometric-mean ratio over splits, ± its standard
  error as a factor, and on how many splits the arm trained lower than every
  peer did on that split; the target is a mean at most the best peer's;
* test RMSE: the difference to the peer with the lowest mean test RMSE and
  the standard error of that difference over the (paired) splits; the target
  is a difference of at most one such standard error.

Results of separate runs on the same splits (peers in one, variants in
another, or data sets split across cores) are merged by data set.

    python benchmarks/compare.py benchmarks/out/r17_full_a benchmarks/out/r17_full_b
    python benchmarks/compare.py OUT_A OUT_B OUT_F32:alm_f32   # a variant run, its alm arm renamed
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

PEERS = ("optx_lm", "lbfgs", "adam")


def load(sources):
    """Merge `results.json` files (directories or files) by data set; `PATH:NAME` renames that run's `alm` arm."""
    merged: dict = {}
    for src in sources:
        path, _, rename = str(src).partition(":")
        p = Path(path)
        results = json.loads((p / "results.json" if p.is_dir() else p).read_text())["results"]
        for name, per_method in results.items():
            for method, rec in per_method.items():
                arm = rename if (rename and method == "alm") else method
                if arm in merged.setdefault(name, {}):
                    raise ValueError(f"{name}: method {arm!r} appears in more than one source; rename it (PATH:NAME)")
                merged[name][arm] = rec
    return merged


def standard_error(a):
    """The standard error of the mean of `a` (0 for a single value)."""
    return float(a.std(ddof=1) / np.sqrt(len(a))) if len(a) > 1 else 0.0


def compare(results, peers=PEERS):
    """One row per (data set, arm): the arm against the best peer (see the module docstring)."""
    rows = []
    for name, per_method in results.items():
        present = [p for p in peers if p in per_method]
        arms = [m for m in per_method if m not in peers]
        if not present or not arms:
            continue
        train = {m: np.asarray(per_method[m]["train_mse"], float) for m in per_method}
        test = {m: np.asarray(per_method[m]["test_rmse"], float) for m in per_method}
        n = min(len(train[m]) for m in present + arms)
        best = min(present, key=lambda p: train[p][:n].mean())
        best_test = min(present, key=lambda p: test[p][:n].mean())
        floor = np.min(np.stack([train[p][:n] for p in present]), axis=0)
        for arm in arms:
            a = train[arm][:n]
            log_ratio = np.log(a / train[best][:n])
            gap = test[arm][:n] - test[best_test][:n]
            rows.append({
                "dataset": name, "arm": arm, "splits": n, "best_peer": best,
                "train_mse": float(a.mean()), "train_se": standard_error(a),
                "peer_mse": float(train[best][:n].mean()), "peer_se": standard_error(train[best][:n]),
                "ratio": float(np.exp(log_ratio.mean())), "ratio_se": float(np.exp(standard_error(log_ratio))),
                "lower_on": int(np.sum(a < floor)),
                "train_target": bool(a.mean() <= train[best][:n].mean()),
                "test_rmse": float(test[arm][:n].mean()), "best_test_peer": best_test,
                "test_gap": float(gap.mean()), "test_gap_se": standard_error(gap),
                "test_target": bool(gap.mean() <= standard_error(gap)),
            })
    return rows


def table(rows) -> str:
    lines = ["| data set | arm | train MSE | best peer | ratio (paired) | lower than every peer | "
             "test RMSE gap to the best peer's (± s.e.) | targets: train, test |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['dataset']} | {r['arm']} | {r['train_mse']:.4g} ± {r['train_se']:.2g} | "
            f"{r['best_peer']} {r['peer_mse']:.4g} ± {r['peer_se']:.2g} | {r['ratio']:.3f} (×/÷ {r['ratio_se']:.3f}) | "
            f"{r['lower_on']}/{r['splits']} | {r['test_gap']:+.3g} ± {r['test_gap_se']:.2g} ({r['best_test_peer']}) | "
            f"{'met' if r['train_target'] else 'missed'}, {'met' if r['test_target'] else 'missed'} |")
    by_arm: dict = {}
    for r in rows:
        by_arm.setdefault(r["arm"], []).append(r["train_target"])
    for arm, met in by_arm.items():
        lines.append(f"\n{arm}: lowest mean train MSE on {sum(met)} of {len(met)} data sets")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sources", nargs="+", help="result directories or results.json files (PATH:NAME renames alm)")
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    rows = compare(load(args.sources))
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
