"""Loader for the bundled 8 × 8 handwritten digits (10-class classification)."""

from __future__ import annotations

import gzip
from importlib import resources
from typing import NamedTuple

import numpy as np

N_CLASSES = 10


class ClassificationData(NamedTuple):
    """A train/test split with standardised features and one-hot targets."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray  # one-hot, (m, classes)
    labels_train: np.ndarray  # int, (m,)
    x_test: np.ndarray
    y_test: np.ndarray
    labels_test: np.ndarray

    def accuracy(self, logits: np.ndarray, labels: np.ndarray) -> float:
        """Fraction of rows whose largest logit is the true class."""
        return float(np.mean(np.argmax(np.asarray(logits), axis=-1) == labels))


def _read():
    with resources.files(__package__).joinpath("digits", "digits.csv.gz").open("rb") as f:
        return np.loadtxt(gzip.open(f, "rt"), delimiter=",")


def load_digits(split: int = 0, test_fraction: float = 0.2, dtype=np.float64) -> ClassificationData:
    """The digits set, split stratified by class with seed `split` (any int ≥ 0).

    Features are standardised with the training split's mean and standard
    deviation (constant pixels are left unscaled); targets are one-hot.

    Raises:
        ValueError: `split` negative or not an int, or `test_fraction` outside (0, 1).
    """
    if not (isinstance(split, (int, np.integer)) and split >= 0):
        raise ValueError(f"split: must be an int >= 0, got {split!r}.")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction: must be in (0, 1), got {test_fraction!r}.")
    data = _read()
    x, labels = data[:, :-1], data[:, -1].astype(np.int64)
    rng = np.random.default_rng(split)
    test = np.zeros(len(labels), bool)
    for c in range(N_CLASSES):
        rows = np.flatnonzero(labels == c)
        test[rng.choice(rows, int(round(test_fraction * len(rows))), replace=False)] = True
    mean, std = x[~test].mean(0), x[~test].std(0)
    std = np.where(std > 0, std, 1.0)
    xs = ((x - mean) / std).astype(dtype)
    onehot = np.eye(N_CLASSES, dtype=dtype)[labels]
    return ClassificationData("digits", xs[~test], onehot[~test], labels[~test], xs[test], onehot[test], labels[test])
