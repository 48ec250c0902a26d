"""Hot loops of the refinement stage (AffinityNet random walk), compiled with Numba.

Pure functions over NumPy arrays; no I/O, no Zarr, no Dask. The orchestration
lives in :mod:`isle_fast.refinement.affinity` and :mod:`isle_fast.refinement.chain`.

The random walk works on a *neighbourhood stencil* instead of a dense
``N x N`` transition matrix: pixel ``(y, x)`` of an ``h x w`` grid is linked to
the pixels ``(y + dy_k, x + dx_k)`` for the ``K`` offsets ``(dy_k, dx_k)`` of
a disc (AffinityNet's radius), so one step costs ``O(h w K C)`` instead of
``O((h w)^2 C)``.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

__all__ = ["disc_offsets", "random_walk", "normalise_rows"]


def disc_offsets(radius: int, half: bool = False) -> np.ndarray:
    """Integer offsets ``(dy, dx)`` with ``dy^2 + dx^2 < radius^2``, as an ``(K, 2)`` int64 array.

    Parameters
    ----------
    radius : int
        AffinityNet's radius (5 in the paper); ``radius <= 1`` gives only ``(0, 0)``.
    half : bool
        Only one offset of every ``+-`` pair and no ``(0, 0)``: AffinityNet's
        training pairs (each unordered pair once): ``dy > 0``, or ``dy == 0``
        and ``dx > 0``.

    Returns
    -------
    (K, 2) int64 array
        Row-major order (``dy`` then ``dx`` ascending). The full disc contains
        ``(0, 0)`` and every offset together with its negation.
    """
    r = int(radius)
    out = []
    for dy in range(-r + 1, r):
        for dx in range(-r + 1, r):
            if dy * dy + dx * dx >= r * r and not (dy == 0 and dx == 0):
                continue
            if half and not (dy > 0 or (dy == 0 and dx > 0)):
                continue
            out.append((dy, dx))
    if not out and not half:
        out.append((0, 0))
    return np.asarray(out, dtype=np.int64).reshape(-1, 2)


@njit(parallel=True, nogil=True, cache=True)
def normalise_rows(weights: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Row-normalise a stencil of affinities into transition probabilities.

    Parameters
    ----------
    weights : (h, w, K) float32
        ``weights[y, x, k]`` = affinity of pixel ``(y, x)`` to ``(y + dy_k, x + dx_k)``.
    offsets : (K, 2) int64

    Returns
    -------
    (h, w, K) float32
        Weights with neighbours outside the grid set to 0, divided by their
        sum over ``k`` (a row of zeros stays zero).
    """
    h, w, k_n = weights.shape
    out = np.zeros((h, w, k_n), dtype=np.float32)
    for y in prange(h):
        for x in range(w):
            s = 0.0
            for k in range(k_n):
                yy = y + offsets[k, 0]
                xx = x + offsets[k, 1]
                if 0 <= yy < h and 0 <= xx < w:
                    s += weights[y, x, k]
            if s > 0.0:
                for k in range(k_n):
                    yy = y + offsets[k, 0]
                    xx = x + offsets[k, 1]
                    if 0 <= yy < h and 0 <= xx < w:
                        out[y, x, k] = weights[y, x, k] / s
    return out


@njit(parallel=True, nogil=True, cache=True)
def _step(trans: np.ndarray, offsets: np.ndarray, v: np.ndarray, out: np.ndarray) -> None:
    h, w, k_n = trans.shape
    c_n = v.shape[2]
    for y in prange(h):
        for x in range(w):
            for c in range(c_n):
                out[y, x, c] = 0.0
            for k in range(k_n):
                t = trans[y, x, k]
                if t == 0.0:
                    continue
                yy = y + offsets[k, 0]
                xx = x + offsets[k, 1]
                if 0 <= yy < h and 0 <= xx < w:
                    for c in range(c_n):
                        out[y, x, c] += t * v[yy, xx, c]


def random_walk(trans: np.ndarray, offsets: np.ndarray, v: np.ndarray, steps: int) -> np.ndarray:
    """Apply a stencil transition matrix ``steps`` times: ``v <- T v``.

    ``(T v)[y, x, c] = sum_k trans[y, x, k] * v[y + dy_k, x + dx_k, c]``
    (neighbours outside the grid contribute nothing). With ``T`` the
    row-normalised affinity (:func:`normalise_rows`) this is AffinityNet's
    random walk ``T^steps v``.

    Parameters
    ----------
    trans : (h, w, K) float32
    offsets : (K, 2) int64
    v : (h, w, C) float32
        The vectors to walk (CAMs with their background slice).
    steps : int
        Number of multiplications (``2^logt``).

    Returns
    -------
    (h, w, C) float32
    """
    trans = np.ascontiguousarray(trans, dtype=np.float32)
    offsets = np.ascontiguousarray(offsets, dtype=np.int64)
    a = np.ascontiguousarray(v, dtype=np.float32).copy()
    b = np.empty_like(a)
    for _ in range(int(steps)):
        _step(trans, offsets, a, b)
        a, b = b, a
    return a
