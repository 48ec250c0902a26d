"""Score arrays full of ties and near-ties after rounding (quantisation and CAM-decode tests)."""

from __future__ import annotations

import numpy as np

#: Values that make ties and near-ties after rounding to 1/255 steps: the 0.15 threshold and its
#: neighbours, exact half steps and values just either side, the ends of [0, 1] and beyond (clipped).
TRICKY = np.array([0.0, 1.0, 0.15, np.nextafter(np.float32(0.15), np.float32(0)),
                   np.nextafter(np.float32(0.15), np.float32(1)), 38.5 / 255, 38.4999 / 255, 38.5001 / 255,
                   0.5, 0.5 + 1e-4, 0.5 - 1e-4, 0.5 + 1 / 255, 254.5 / 255, 254.6 / 255, 1 - 1e-6, 1e-6,
                   0.5 / 255, -0.25, 1.25], dtype=np.float64)


def tricky_scores(seed: int, n: int, c: int, pool_size: int, dtype, lo: float = -np.inf,
                  hi: float = np.inf) -> np.ndarray:
    """``(n, c)`` scores drawn from a small pool (so many exact ties), clipped to ``[lo, hi]``."""
    rng = np.random.default_rng(seed)
    pool = np.concatenate([rng.choice(TRICKY, pool_size), rng.random(pool_size)])
    pool = np.clip(pool + rng.choice([0.0, 0.0, 1e-7, -1e-7, 1e-3], pool.shape), lo, hi)
    return rng.choice(pool, (n, c)).astype(dtype)
