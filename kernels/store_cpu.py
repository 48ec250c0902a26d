"""Hot loop of writing score stores: ``uint8`` quantisation that keeps every pixel's argmax.

A pure function over NumPy arrays; no I/O. The orchestration (dtype choice,
validation) is :func:`isle_fast.stores.stack.quantize_scores`; the plain NumPy
reference is ``tests/reference.py`` (``quantize_scores_u8``).
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["quantize_u8"]


@njit(nogil=True, cache=True)
def _quantize_u8_kernel(f, out, lo, hi, scale):  # pragma: no cover - jitted
    n, c = f.shape
    fixed = 0
    for i in range(n):
        fbest = f[i, 0]
        win = 0
        qbest = np.uint8(0)
        qwin = 0
        for k in range(c):
            v = f[i, k]
            if v < lo:
                v = lo
            elif v > hi:
                v = hi
            q = np.uint8(np.rint(v * scale))
            out[i, k] = q
            if k == 0:
                fbest = v
                qbest = q
            else:
                if v > fbest:
                    fbest = v
                    win = k
                if q > qbest:
                    qbest = q
                    qwin = k
        if qwin != win:
            fixed += 1
            if out[i, win] < 255:
                out[i, win] += 1
            else:
                for k in range(win):
                    if out[i, k] == 255:
                        out[i, k] = 254
    return fixed


def quantize_u8(scores: np.ndarray) -> tuple[np.ndarray, int]:
    """``round(255 * clip(score, 0, 1))`` as ``uint8``, the winner of every changed argmax raised one step.

    Parameters
    ----------
    scores : (n, C) float32 or float64 array
        Any strides (e.g. a ``(C, H, W)`` stack seen as ``(H * W, C)``). The
        product ``255 * score`` is computed in the scores' own float type, as
        NumPy computes ``scores * 255.0``.

    Returns
    -------
    q : (n, C) uint8, C-contiguous
        ``np.argmax(q, 1) == np.argmax(clip(scores, 0, 1), 1)`` for every row
        (first index wins ties): where rounding made the winner tie with a
        lower class it is raised by one (or, at 255, the lower classes at 255
        are lowered to 254).
    fixed : int
        Rows that needed the fix.
    """
    f = np.asarray(scores)
    if f.ndim != 2 or f.dtype not in (np.float32, np.float64):
        raise ValueError(f"quantize_u8 needs an (n, C) float32 / float64 array, not {f.dtype} {f.shape}")
    out = np.empty(f.shape, dtype=np.uint8)
    if f.size == 0:
        return out, 0
    t = f.dtype.type
    fixed = _quantize_u8_kernel(f, out, t(0.0), t(1.0), t(255.0))
    return out, int(fixed)
