"""Gain ratio of one LM step, with the trial states Z + dZ and rolled out.

Runs the default ALM (without rolled-out trial states unless `--warmup-rollout`,
as for the table in RESULTS.md) for `--updates` updates on a UCI split, then,
from that point, takes the damped step at μ·f for several factors f (state damping
μ·ratio) and prints the gain ratio ρ = actual / predicted decrease of the
merit for both trial points: states Z + dZ, and states rolled out through
the new weights with the linearised constraint values (`lm(rollout=True)`).

    python benchmarks/gain_ratio.py --dataset energy --updates 300
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

jax.config.update("jax_enable_x64", True)

import alm_jax  # noqa: E402
from alm_jax._inner._base import tree_add  # noqa: E402
from alm_jax._inner._lm import LMOptions, _step_model, damped_step  # noqa: E402
from alm_jax._lifted import forward_states_stacked, merit  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="energy")
    ap.add_argument("--split", type=int, default=0)
    ap.add_argument("--updates", type=int, default=300)
    ap.add_argument("--width", type=int, default=50)
    ap.add_argument("--depth", type=int, default=1)
    ap.add_argument("--factors", type=float, nargs="*", default=[1.0, 0.1, 0.01])
    ap.add_argument("--ratios", type=float, nargs="*", default=[1e-6, 1.0], help="state damping ratios μ_z/μ_θ")
    ap.add_argument("--warmup-rollout", action="store_true", help="reach the point with rollout=True")
    args = ap.parse_args(argv)

    data = alm_jax.datasets.load_uci(args.dataset, split=args.split)
    x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    model = eqx.nn.MLP(x.shape[1], 1, args.width, args.depth, activation=jnp.tanh, key=jax.random.key(args.split))
    solver = alm_jax.alm(rollout=args.warmup_rollout)
    state = solver.init(model, x, y)
    update = jax.jit(solver.update)
    for _ in range(args.updates):
        state, info = update(state, x, y)
    spec, lam, sigma = state.spec, state.multipliers, state.policy.sigma

    @jax.jit
    def ratios(params, Z, mu, state_ratio):
        opts = LMOptions(linear_solver="cg", cg_rtol=1e-3, cg_max_steps=500)
        dp, dz = damped_step(params, Z, spec, x, y, lam, sigma, mu, state_ratio * mu, opts)
        # f, the predicted decrease and h + J_h d exactly as `lm_iteration` takes them
        model = _step_model(params, Z, spec, x, y, lam, sigma, dp, dz, rollout=True)
        f0, pred, defects = model.objective, model.predicted, model.defects
        p1 = tree_add(params, dp)
        plain = merit(p1, Z + dz, spec, x, y, lam, sigma)
        rolled = merit(p1, forward_states_stacked(p1, spec, x, defects=defects), spec, x, y, lam, sigma)
        return pred, (f0 - plain) / pred, (f0 - rolled) / pred

    mu = state.inner.damping
    print(f"{args.dataset} split {args.split}, {args.depth}x{args.width}, after {args.updates} updates: "
          f"train MSE {float(info.mse):.3e}, beta {float(info.beta):.0e}, mu {float(mu):.3e}")
    print(f"{'mu factor':>10} {'state ratio':>12} {'predicted':>11} {'rho (Z+dZ)':>12} {'rho (rolled)':>13}")
    for f in args.factors:
        for r in args.ratios:
            pred, rho_plain, rho_rolled = ratios(state.params, state.states, mu * f, r)
            print(f"{f:10g} {r:12g} {float(pred):11.3e} {float(rho_plain):12.4g} {float(rho_rolled):13.4g}")


if __name__ == "__main__":
    main()
