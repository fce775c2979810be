"""Loaders for the bundled UCI regression sets (standard 20-split protocol)."""

from __future__ import annotations

from importlib import resources
from typing import NamedTuple

import numpy as np

UCI_DATASETS = ("concrete", "energy", "kin8nm", "power-plant", "wine-quality-red", "yacht")


class RegressionData(NamedTuple):
    """A train/test split, standardised with the training split's statistics."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    y_mean: np.ndarray
    y_std: np.ndarray

    def rmse_in_units(self, pred_std: np.ndarray, y_std_units: np.ndarray) -> float:
        """RMSE in the data's units for predictions made in standardised units."""
        pred = pred_std * self.y_std + self.y_mean
        truth = y_std_units * self.y_std + self.y_mean
        return float(np.sqrt(np.mean((pred - truth) ** 2)))


def _read(folder, fname, dtype=float):
    with resources.files(__package__).joinpath("uci", folder, fname).open("r") as f:
        return np.loadtxt(f, dtype=dtype, ndmin=1)


def load_uci(name: str, split: int = 0, dtype=np.float64) -> RegressionData:
    """Load a bundled UCI set with its fixed split `split` (0..19), standardised.

    X and y are standardised with the mean and standard deviation of the
    training split (columns with zero spread are left unscaled), the usual
    protocol of Hernández-Lobato & Adams (2015).

    Raises:
        ValueError: unknown `name` or split out of range.
    """
    if name not in UCI_DATASETS:
        raise ValueError(f"name: unknown data set {name!r}; choose one of {list(UCI_DATASETS)}.")
    n_splits = int(_read(name, "n_splits.txt", int)[0])
    if not (isinstance(split, (int, np.integer)) and 0 <= split < n_splits):
        raise ValueError(f"split: must be an int in [0, {n_splits}), got {split!r}.")
    data = _read(name, "data.txt")
    if data.ndim == 1:
        data = data[None]
    feats = _read(name, "index_features.txt", int)
    target = _read(name, "index_target.txt", int)
    train = _read(name, f"index_train_{split}.txt", int)
    test = _read(name, f"index_test_{split}.txt", int)
    x, y = data[:, feats], data[:, target].reshape(len(data), -1)
    x_mean, x_std = x[train].mean(0), x[train].std(0)
    x_std = np.where(x_std > 0, x_std, 1.0)
    y_mean, y_std = y[train].mean(0), y[train].std(0)
    y_std = np.where(y_std > 0, y_std, 1.0)

    def sx(a):
        return ((a - x_mean) / x_std).astype(dtype)

    def sy(a):
        return ((a - y_mean) / y_std).astype(dtype)

    return RegressionData(name, sx(x[train]), sy(y[train]), sx(x[test]), sy(y[test]), y_mean, y_std)
