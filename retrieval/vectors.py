"""Query and gallery vectors as every index path takes them: float32, finite, L2-normalised rows (scores are cosines).

Its own module so that the index, its queries and its builder share one check without importing one another.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def normalise_rows(array: Any, name: str) -> np.ndarray:
    """float32, 2-D, finite, each row scaled to unit L2 norm (zero rows are an error); a copy of the input."""
    matrix = np.array(array, dtype=np.float32, copy=True)
    if matrix.ndim == 1:
        matrix = matrix[None, :]
    if matrix.ndim != 2 or matrix.shape[1] == 0:
        raise ValueError(f"{name} must be a 2-D array (N × D), got shape {matrix.shape}.")
    if not np.isfinite(matrix).all():
        bad = int(np.flatnonzero(~np.isfinite(matrix).all(axis=1))[0])
        raise ValueError(f"{name} row {bad} holds NaN or infinite values.")
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError(f"{name} row {int(np.flatnonzero(norms[:, 0] == 0)[0])} is all zeros: it has no direction.")
    if np.all(np.abs(norms - 1) <= 1e-5):  # already unit length: keep the exact bits (a loaded index stays identical)
        return np.ascontiguousarray(matrix)
    return np.ascontiguousarray(matrix / norms)
