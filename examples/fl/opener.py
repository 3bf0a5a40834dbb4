"""Opener of the federated example's data manager: how its data samples are read.

A sample is a CSV file: a header line, then one row per patient with the 30 features of
scikit-learn's breast-cancer dataset and the label (1 benign, 0 malignant) last. The
functions import this file from their task's `input/` and call `load`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray


def load(paths: Sequence[str]) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """The samples' features and labels, rows in the order of `paths`."""
    rows = np.vstack([np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2) for path in paths])
    return rows[:, :-1], rows[:, -1]
