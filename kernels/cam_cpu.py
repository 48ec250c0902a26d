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
def _row_pass(row, qrow, j, fbest, qbest, win, qwin, lo, hi):  # pragma: no cover - jitted
    """One foreground row: quantise it, keep the running argmax of the floats and of the quantised
    values per pixel (first index wins ties, as ``np.argmax``); returns how many values are not in
    ``[lo, hi]`` (NaN / Inf included). Branch-free over the pixels, so it vectorises."""
    zero = row.dtype.type(0.0)
    one = row.dtype.type(1.0)
    scale = row.dtype.type(255.0)
    bad = 0
    for p in range(row.shape[0]):
        v = row[p]
        bad += not (v >= lo and v <= hi)  # compared in float64, as the dense path's range check
        c = _clamp(v, zero, one)
        b = np.uint8(np.rint(c * scale))
        qrow[p] = b
        up = c > fbest[p]
        fbest[p] = c if up else fbest[p]
        win[p] = j if up else win[p]
        uq = b > qbest[p]
        qbest[p] = b if uq else qbest[p]
        qwin[p] = j if uq else qwin[p]
    return bad


@njit(nogil=True, cache=True)
def _cam_slots_kernel(f, take, bg_index, bg_value, lo, hi, q, present, stats):  # pragma: no cover - jitted
    """See :func:`cam_slots_u8`; ``stats`` = [values outside [lo, hi], bg q min, bg q max]."""
    p_count = f.shape[1]
    j_count = take.shape[0]
    zero = f.dtype.type(0.0)
    one = f.dtype.type(1.0)
    scale = f.dtype.type(255.0)
    fbest = np.empty(p_count, f.dtype)
    qbg = np.empty(p_count, np.uint8)
    win = np.full(p_count, -1, np.int16)
    qwin = np.full(p_count, -1, np.int16)
    bad = 0
    if bg_index >= 0:
        row = f[bg_index]
        for p in range(p_count):
            v = row[p]
            bad += not (v >= lo and v <= hi)
            c = _clamp(v, zero, one)
            fbest[p] = c
            qbg[p] = np.uint8(np.rint(c * scale))
    else:
        c = _clamp(bg_value, zero, one)
        fbest[:] = c
        qbg[:] = np.uint8(np.rint(c * scale))
    qbest = qbg.copy()
    for j in range(j_count):
        bad += _row_pass(f[take[j]], q[j], j, fbest, qbest, win, qwin, lo, hi)
    # where rounding moved the argmax (rare): raise the winner, or lower the ties at 255 below it
    bq_lo = 255
    bq_hi = 0
    for p in range(p_count):
        qb = qbg[p]
        w = win[p]
        if w != qwin[p]:
            if w < 0:  # never: rounding cannot lift a class above the background it did not beat
                if qb < 255:
                    qb += 1
            elif q[w, p] < 255:
                q[w, p] += 1
            else:
                if qb == 255:
                    qb = np.uint8(254)
                for j in range(w):
                    if q[j, p] == 255:
                        q[j, p] = 254
        bq_lo = min(bq_lo, qb)
        bq_hi = max(bq_hi, qb)
    for j in range(j_count):
        seen = np.uint8(0)
        row8 = q[j]
        for p in range(p_count):
            seen |= row8[p]
        present[j] = seen > 0
    stats[0] = bad
    stats[1] = bq_lo
    stats[2] = bq_hi


def cam_slots_u8(f: np.ndarray, take: np.ndarray, bg_index: int, bg_value: float,
                 lo: float = -1e-3, hi: float = 1 + 1e-3) -> tuple[np.ndarray, np.ndarray, bool, int, int]:
    """Quantise a CAM file's slices to ``uint8`` as the dense path would, keeping every pixel's argmax.

    Parameters
    ----------
    f : (S, P) float32 or float64 array
        The file's score entry, one row per slice (any strides: an ``H x W x
        S`` entry seen as ``(S, H * W)`` works without a copy).
    take : (J,) int64 array
        The rows of ``f`` holding the foreground classes, in ascending class
        order (J < 32768).
    bg_index : int
        The row of the file's own background slice, or -1: the background is
        ``bg_value`` at every pixel (the threshold in front of the CAMs).
    bg_value : float
        The background score when ``bg_index`` is -1 (in ``f``'s float type, as the
        dense path stores it).
    lo, hi : float
        The accepted raw range (compared in float64): values outside it, NaN and
        Inf make ``in_range`` False (the dense path's checks then name the value).

    Returns
    -------
    q : (J, P) uint8
        ``round(255 * clip(score, 0, 1))`` of the foreground rows, the argmax fix
        of :func:`isle_fast.kernels.store_cpu.quantize_u8` applied over the
        background and these rows.
    present : (J,) bool
        Rows with a value above 0 after quantisation (the classes a class-sparse
        store keeps).
    in_range : bool
        Every value read (background row and ``take``) is finite and in ``[lo, hi]``.
    bg_lo, bg_hi : int
        Smallest and largest quantised background value (equal when the
        background is one constant, as a class-sparse store needs).
    """
    if f.ndim != 2 or f.dtype not in (np.float32, np.float64):
        raise ValueError(f"cam_slots_u8 needs an (S, P) float32 / float64 array, not {f.dtype} {f.shape}")
    take = np.ascontiguousarray(take, dtype=np.int64)
    q = np.empty((take.shape[0], f.shape[1]), np.uint8)
    present = np.zeros(take.shape[0], np.bool_)
    stats = np.zeros(3, np.int64)
    if f.shape[1] == 0:
        return q, present, True, 255, 0
    _cam_slots_kernel(f, take, int(bg_index), f.dtype.type(bg_value), float(lo), float(hi), q, present, stats)
    return q, present, bool(stats[0] == 0), int(stats[1]), int(stats[2])
