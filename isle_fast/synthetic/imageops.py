"""Small vectorised image operations for the synthetic data (box / Gaussian blur, min-max filters,
the ground truth's boundary band, smooth noise); NumPy only, no SciPy."""

from __future__ import annotations

import numpy as np

__all__ = ["boundary_band"]


def _box1d(a: np.ndarray, r: int, axis: int) -> np.ndarray:
    """Mean over a window of 2r+1 along ``axis`` with edge replication."""
    if r <= 0:
        return a
    pad = [(0, 0)] * a.ndim
    pad[axis] = (r + 1, r)
    c = np.cumsum(np.pad(a, pad, mode="edge"), axis=axis, dtype=np.float64)
    n = a.shape[axis]
    hi = [slice(None)] * a.ndim
    lo = [slice(None)] * a.ndim
    hi[axis] = slice(2 * r + 1, 2 * r + 1 + n)
    lo[axis] = slice(0, n)
    return ((c[tuple(hi)] - c[tuple(lo)]) * (1.0 / (2 * r + 1))).astype(np.float32)


def _blur(a: np.ndarray, sigma: float) -> np.ndarray:
    """Approximate Gaussian blur of a 2-D array: three box passes per axis (edges replicated).

    Only the bounding box of the non-zero values, grown by the filter's reach,
    is computed; the result equals blurring the whole array.
    """
    a = np.asarray(a, dtype=np.float32)
    if sigma < 0.5:
        return a
    r = int(round((np.sqrt(4.0 * sigma * sigma / 3.0 + 1.0) - 1.0) / 2.0))
    if r <= 0:
        return a
    rows, cols = np.nonzero(a.any(axis=1))[0], np.nonzero(a.any(axis=0))[0]
    if rows.size == 0:
        return a
    m = 3 * r + 1
    y0, y1 = max(0, rows[0] - m), min(a.shape[0], rows[-1] + 1 + m)
    x0, x1 = max(0, cols[0] - m), min(a.shape[1], cols[-1] + 1 + m)
    b = a[y0:y1, x0:x1]
    for _ in range(3):
        b = _box1d(b, r, 0)
        b = _box1d(b, r, 1)
    out = np.zeros_like(a)
    out[y0:y1, x0:x1] = b
    return out


def _minmax_filter(labels: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
    """Max and min over the (2r+1)^2 square around every pixel (edges replicated)."""
    hi = labels.copy()
    lo = labels.copy()
    for axis in (0, 1):
        n = labels.shape[axis]
        pad = [(0, 0), (0, 0)]
        pad[axis] = (r, r)
        ph, pl = np.pad(hi, pad, mode="edge"), np.pad(lo, pad, mode="edge")
        out_h, out_l = hi.copy(), lo.copy()
        for s in range(2 * r + 1):
            sl = [slice(None), slice(None)]
            sl[axis] = slice(s, s + n)
            np.maximum(out_h, ph[tuple(sl)], out=out_h)
            np.minimum(out_l, pl[tuple(sl)], out=out_l)
        hi, lo = out_h, out_l
    return hi, lo


def boundary_band(labels: np.ndarray, band: int) -> np.ndarray:
    """Pixels that have a pixel of another label within Chebyshev distance ``band``.

    Parameters
    ----------
    labels : ndarray, (H, W), uint8
        A label map without ignore values.
    band : int
        Half width of the band; 0 gives an empty band.

    Returns
    -------
    ndarray, (H, W), bool
    """
    if band <= 0:
        return np.zeros(labels.shape, dtype=bool)
    hi, lo = _minmax_filter(labels, band)
    return hi != lo


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """Smooth noise in [-1, 1]: a random grid every ``cell`` pixels, smoothstep-interpolated."""
    gh, gw = int(np.ceil(h / cell)) + 2, int(np.ceil(w / cell)) + 2
    grid = rng.uniform(-1.0, 1.0, size=(gh, gw)).astype(np.float32)
    y = np.arange(h, dtype=np.float32) / cell
    x = np.arange(w, dtype=np.float32) / cell
    y0, x0 = y.astype(np.int64), x.astype(np.int64)
    fy, fx = y - y0, x - x0
    fy, fx = fy * fy * (3 - 2 * fy), fx * fx * (3 - 2 * fx)
    rows = grid[y0] * (1 - fy)[:, None] + grid[y0 + 1] * fy[:, None]
    return rows[:, x0] * (1 - fx)[None, :] + rows[:, x0 + 1] * fx[None, :]
