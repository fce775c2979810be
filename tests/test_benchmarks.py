"""Every benchmark script still imports against the library as it is now.

The scripts take minutes and are not run here; importing them catches what
a refactor of the library's private modules breaks (a script importing a
helper that was removed failed only when someone next ran it).
"""

import importlib
import os
import pathlib

import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPTS = sorted(p.stem for p in BENCHMARKS.glob("*.py"))


def test_scripts_found():
    assert {"uci_suite", "ablation", "compile_cost", "gain_ratio"} <= set(SCRIPTS)


@pytest.mark.parametrize("name", SCRIPTS)
def test_benchmark_script_imports(name, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    # Some scripts extend XLA_FLAGS when imported; later subprocesses must not see that.
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
    module = importlib.import_module(name)
    assert callable(module.main)


def _compare_module(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module("compare")


# Four splits. Adam has the lowest mean train MSE (2 against L-BFGS's 2.5); L-BFGS
# the lowest test RMSE. Expected values worked by hand (see each case).
_PEERS = {"lbfgs": {"train_mse": [1, 2, 3, 4], "test_rmse": [1, 1, 1, 1]},
          "adam": {"train_mse": [2, 2, 2, 2], "test_rmse": [2, 2, 2, 2]}}


@pytest.mark.parametrize("train, test, ratio, lower_on, train_met, test_met", [
    # log ratios to Adam: log .5, log .5, log 2, 0 -> exp(-log 2 / 4); below min(L-BFGS, Adam) = [1, 2, 2, 2]
    # on split 2 only; test gap [.1, -.1, .2, 0]: mean .05 within its s.e. .0645.
    ([1, 1, 4, 2], [1.1, 0.9, 1.2, 1.0], 2 ** -0.25, 1, True, True),
    # 1.5x Adam everywhere, never lowest; test gap .3 on every split has s.e. 0.
    ([3, 3, 3, 3], [1.3, 1.3, 1.3, 1.3], 1.5, 0, False, False),
    # lowest on every split; a test gap of exactly 0 meets the target.
    ([0.5, 0.5, 0.5, 0.5], [1, 1, 1, 1], 0.25, 4, True, True),
])
def test_compare_against_best_peer(monkeypatch, train, test, ratio, lower_on, train_met, test_met):
    compare = _compare_module(monkeypatch)
    (row,) = compare.compare({"toy": {**_PEERS, "alm": {"train_mse": train, "test_rmse": test}}})
    assert row["best_peer"] == "adam" and row["best_test_peer"] == "lbfgs"
    assert row["ratio"] == pytest.approx(ratio, rel=1e-12)
    assert row["lower_on"] == lower_on
    assert (row["train_target"], row["test_target"]) == (train_met, test_met)
    assert "toy | alm" in compare.table([row])


def test_compare_merges_runs_and_renames(monkeypatch, tmp_path):
    compare = _compare_module(monkeypatch)
    import json

    def write(name, results):
        d = tmp_path / name
        d.mkdir()
        (d / "results.json").write_text(json.dumps({"meta": {}, "results": results}))
        return str(d)

    peers = write("peers", {"toy": {**_PEERS, "alm": {"train_mse": [3] * 4, "test_rmse": [1] * 4}}})
    variant = write("variant", {"toy": {"alm": {"train_mse": [1] * 4, "test_rmse": [1] * 4}}})
    merged = compare.load([peers, variant + ":alm_f32"])
    assert set(merged["toy"]) == {"lbfgs", "adam", "alm", "alm_f32"}
    rows = {r["arm"]: r for r in compare.compare(merged)}
    assert rows["alm"]["train_target"] is False and rows["alm_f32"]["train_target"] is True
    with pytest.raises(ValueError, match="more than one source"):
        compare.load([peers, variant])


def test_basin_curvature_at_a_least_squares_fit(monkeypatch):
    """`basin.curvature` on a linear model (an MLP without hidden layers) at its
    least-squares fit: f = mean (Xw − y)² has ∇f = 0 there and ∇²f = (2/m) XᵀX
    (X with a column of ones for the bias), so its extreme eigenvalues are known.
    Float64; the gradient is round-off of a solve of condition ≈ 10 (bound 1e-12)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
    basin = importlib.import_module("basin")
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(0)
    m, n = 40, 3
    x = rng.normal(size=(m, n))
    y = x @ np.array([1.0, -2.0, 0.5]) + 0.3 + 0.1 * rng.normal(size=m)
    X = np.hstack([x, np.ones((m, 1))])
    w = np.linalg.lstsq(X, y, rcond=None)[0]
    model = eqx.nn.MLP(n, 1, 4, 0, key=jax.random.key(0))
    model = eqx.tree_at(lambda mo: (mo.layers[0].weight, mo.layers[0].bias), model,
                        (jnp.asarray(w[:n])[None, :], jnp.asarray(w[n:])))
    grad, lo, hi = basin.curvature(model, jnp.asarray(x), jnp.asarray(y)[:, None], max_weights=100)
    eig = np.linalg.eigvalsh(2 / m * X.T @ X)
    assert grad < 1e-12
    assert lo == pytest.approx(eig[0], rel=1e-12) and hi == pytest.approx(eig[-1], rel=1e-12)
    assert basin.curvature(model, jnp.asarray(x), jnp.asarray(y)[:, None], max_weights=3)[1:] == (None, None)
