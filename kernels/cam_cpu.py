"""Hot loop of CAM ingest into a class-sparse store: one CAM file's slices quantised in one pass.

Pure functions over NumPy arrays; no I/O. The orchestration is
:mod:`isle_fast.stores.cam_ingest`; the reference is the dense path it
replaces (``read_scores`` then :func:`isle_fast.stores.stack.quantize_scores`
on the full ``H x W x C`` stack), checked for equality in ``tests/test_cams.py``.

:func:`cam_slots_u8` works on the file's own slices (the background and the
K classes of the file, K + 1 values a pixel) instead of the C-class stack:
the classes a file does not hold are 0 there, and a 0 never wins an argmax
against the background (index 0, >= 0) nor is at 255, so
:func:`isle_fast.kernels.store_cpu.quantize_u8` on the full stack gives the
same values for the file's classes and 0 for the others.
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["cam_slots_u8"]


@njit(inline="always", nogil=True, cache=True)
def _clamp(v, lo, hi):  # pragma: no cover - jitted
    return lo if v < lo else (hi if v > hi else v)


@njit(nogil=True, cache=True)
def _cam_slots_kernel(f, take, bg_index, bg_value, q, present, stats):  # pragma: no cover - jitted
    """See :func:`cam_slots_u8`; ``stats`` = [finite (1/0), min, max, bg q min, bg q max] (float64)."""
    p_count = f.shape[1]
    j_count = take.shape[0]
    zero = f.dtype.type(0.0)
    one = f.dtype.type(1.0)
    scale = f.dtype.type(255.0)
    finite = True
    lo = zero
    hi = zero
    bq_lo = 255
    bq_hi = 0
    for p in range(p_count):
        if bg_index >= 0:
            b = f[bg_index, p]
            if not np.isfinite(b):
                finite = False
            if b < lo:
                lo = b
            if b > hi:
                hi = b
        else:
            b = bg_value
        fbest = _clamp(b, zero, one)
        qb = np.uint8(np.rint(fbest * scale))
        qbest = qb
        win = -1
        qwin = -1
        for j in range(j_count):
            v = f[take[j], p]
            if not np.isfinite(v):
                finite = False
            if v < lo:
                lo = v
            if v > hi:
                hi = v
            v = _clamp(v, zero, one)
            b8 = np.uint8(np.rint(v * scale))
            q[j, p] = b8
            if v > fbest:
                fbest = v
                win = j
            if b8 > qbest:
                qbest = b8
                qwin = j
        if qwin != win:  # rounding moved the argmax: raise the winner, or lower the ties at 255 below it
            if win < 0:
                if qb < 255:
                    qb += 1
            elif q[win, p] < 255:
                q[win, p] += 1
            else:
                if qb == 255:
                    qb = np.uint8(254)
                for j in range(win):
                    if q[j, p] == 255:
                        q[j, p] = 254
        for j in range(j_count):
            if q[j, p] > 0:
                present[j] = True
        if qb < bq_lo:
            bq_lo = qb
        if qb > bq_hi:
            bq_hi = qb
    stats[0] = 1.0 if finite else 0.0
    stats[1] = lo
    stats[2] = hi
    stats[3] = bq_lo
    stats[4] = bq_hi


def cam_slots_u8(f: np.ndarray, take: np.ndarray, bg_index: int, bg_value: float
                 ) -> tuple[np.ndarray, np.ndarray, bool, float, float, int, int]:
    """Quantise a CAM file's slices to ``uint8`` as the dense path would, keeping every pixel's argmax.

    Parameters
    ----------
    f : (S, P) float32 or float64 array
        The file's score entry, one row per slice (any strides: an ``H x W x
        S`` entry seen as ``(S, H * W)`` works without a copy).
    take : (J,) int64 array
        The rows of ``f`` holding the foreground classes, in ascending class
        order.
    bg_index : int
        The row of the file's own background slice, or -1: the background is
        ``bg_value`` at every pixel (the threshold in front of the CAMs).
    bg_value : float
        The background score when ``bg_index`` is -1 (in ``f``'s float type, as the
        dense path stores it).

    Returns
    -------
    q : (J, P) uint8
        ``round(255 * clip(score, 0, 1))`` of the foreground rows, the argmax fix
        of :func:`isle_fast.kernels.store_cpu.quantize_u8` applied over the
        background and these rows.
    present : (J,) bool
        Rows with a value above 0 after quantisation (the classes a class-sparse
        store keeps).
    finite : bool
        No NaN / Inf in the rows read (background row and ``take``).
    lo, hi : float
        Smallest and largest raw value of those rows (0 included, as
        ``arr.min(initial=0)``): the range check of the dense path.
    bg_lo, bg_hi : int
        Smallest and largest quantised background value (equal when the
        background is one constant, as a class-sparse store needs).
    """
    if f.ndim != 2 or f.dtype not in (np.float32, np.float64):
        raise ValueError(f"cam_slots_u8 needs an (S, P) float32 / float64 array, not {f.dtype} {f.shape}")
    take = np.ascontiguousarray(take, dtype=np.int64)
    q = np.empty((take.shape[0], f.shape[1]), np.uint8)
    present = np.zeros(take.shape[0], np.bool_)
    stats = np.zeros(5, np.float64)
    if f.shape[1] == 0:
        return q, present, True, 0.0, 0.0, 255, 0
    _cam_slots_kernel(f, take, int(bg_index), f.dtype.type(bg_value), q, present, stats)
    return q, present, bool(stats[0]), float(stats[1]), float(stats[2]), int(stats[3]), int(stats[4])
