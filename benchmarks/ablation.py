"""ALM ablations on the UCI quick suite: one factor at a time around a base.

Each variant is an `alm_jax.fit` configuration run through `uci_suite.py`
(same data, splits, initial weights, wall-clock budget and compilation
accounting as the peers there), so its numbers compare directly with the
suite's. Factors (issue 3): penalty/tolerance policy, penalty cap and initial
penalty, inner step cap, damping of the states relative to the weights
(down to 0: the lifted-Newton/condensing step), the damping carried across
outer steps as is or rescaled by the penalty's growth, multiplier safeguarding,
the CG solve's cap and tolerance (inner `cg`), a shortened trial after a
rejected step (`backtrack`), the multiplier update (first-order or the
states' adjoint), and the inner step's curvature term (`second_order`, one
hidden layer).

    python benchmarks/ablation.py                       # 4 small sets, 2 splits, 10 s
    python benchmarks/ablation.py --datasets yacht --splits 1 --only base cap
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import uci_suite  # noqa: E402  (sets XLA_FLAGS before jax is imported)

from alm_jax import policies as P  # noqa: E402

BASE = {"policy": P.bertsekas(beta_max=1e3), "max_inner_steps": 3}


def _with(**kw):
    return {**BASE, **kw}


GROUPS = {
    "base": {"base": BASE},
    "policy": {
        "bertsekas": _with(policy=P.bertsekas()),
        "lancelot": _with(policy=P.lancelot()),
        "algencan": _with(policy=P.algencan()),
        "alpaqa": _with(policy=P.alpaqa()),
    },
    "cap": {
        "beta_max=1e2": _with(policy=P.bertsekas(beta_max=1e2)),
        "beta_max=1e4": _with(policy=P.bertsekas(beta_max=1e4)),
    },
    "beta0": {
        "beta0=1": _with(policy=P.bertsekas(beta0=1.0, beta_max=1e3)),
        "beta0=100": _with(policy=P.bertsekas(beta0=100.0, beta_max=1e3)),
    },
    "inner": {
        "inner=1": _with(max_inner_steps=1),
        "inner=10": _with(max_inner_steps=10),
        "inner=30": _with(max_inner_steps=30),
    },
    "state_damping": {
        "ratio=1": _with(state_damping_ratio=1.0),
        "ratio=1e-2": _with(state_damping_ratio=1e-2),
        "ratio=0": _with(state_damping_ratio=0.0),
    },
    "cg": {
        "max_cg_steps=10": _with(max_cg_steps=10),
        "max_cg_steps=30": _with(max_cg_steps=30),
        "cg_rtol=0.1": _with(rtol=0.1),
        "forcing_max=0.5": _with(forcing_max=0.5),
        "forcing_max=0.03": _with(forcing_max=0.03),
        "no preconditioner": _with(precondition=False),
    },
    "rollout": {
        "no rollout": _with(rollout=False),
    },
    "backtrack": {
        "backtrack": _with(backtrack=True),
    },
    "multipliers": {
        "adjoint multipliers": _with(multipliers="adjoint"),
        "first-order multipliers": _with(multipliers="first_order"),
    },
    "second_order": {
        "second_order=0.5": _with(second_order=0.5),
    },
    "damping_warm_start": {
        "rescale_damping": _with(rescale_damping=True),
    },
    "safeguard": {
        "clip=1e2": _with(policy=P.bertsekas(beta_max=1e3, multiplier_bound=1e2)),
        "no loss-gap safeguard": _with(max_loss_gap=None),
        "no stall safeguard": _with(max_stall=None),
    },
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", default=list(GROUPS), help=f"groups among {list(GROUPS)}")
    ap.add_argument("--peers", action="store_true", help="also run the suite's peers")
    args, rest = ap.parse_known_args(argv)
    variants = {name: opts for g in args.only for name, opts in GROUPS[g].items()}
    methods = list(variants) + (["optx_lm", "lbfgs", "adam"] if args.peers else [])
    if "--datasets" not in rest:
        rest += ["--datasets", "yacht", "energy", "concrete", "wine-quality-red"]
    if "--out" not in rest:
        rest += ["--out", "benchmarks/out/ablation"]
    uci_suite.main(rest + ["--methods", *methods], alm_variants=variants)


if __name__ == "__main__":
    main()
