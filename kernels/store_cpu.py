"""Hot loops of writing score stores: quantisation that keeps every pixel's argmax.

Pure functions over NumPy arrays; no I/O. The orchestration (dtype choice,
validation) is :func:`isle_fast.stores.stack.quantize_scores`; the plain NumPy
reference is ``tests/reference.py`` (``quantize_scores_u8``, ``keep_argmax_float``).

* :func:`quantize_u8`: ``round(255 * s)`` and the fix in one pass.
* :func:`keep_argmax_float`: the fix alone for scores already cast to
  ``float16`` / ``float32``, on their bit patterns: for values >= 0 the bits
  order like the values (``-0`` is made ``+0`` first), and one step up or down
  is the bit pattern plus or minus one.
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["quantize_u8", "keep_argmax_float"]


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


@njit(nogil=True, cache=True)
def _keep_argmax_bits_kernel(f, bits, lo, hi, zero, one, sign):  # pragma: no cover - jitted
    n, c = f.shape
    fixed = 0
    for i in range(n):
        win = 0
        qwin = 0
        fbest = f[i, 0]
        qbest = bits[i, 0]
        for k in range(c):
            v = f[i, k]
            if v < lo:
                v = lo
            elif v > hi:
                v = hi
            b = bits[i, k]
            if b == sign:  # -0 -> +0, so that the bits order like the values
                b = zero
                bits[i, k] = zero
            if k == 0:
                fbest = v
                qbest = b
            else:
                if v > fbest:
                    fbest = v
                    win = k
                if b > qbest:
                    qbest = b
                    qwin = k
        if qwin != win:
            fixed += 1
            if bits[i, win] < one:
                bits[i, win] += 1
            else:
                for k in range(win):
                    if bits[i, k] == one:
                        bits[i, k] = one - 1
    return fixed


def keep_argmax_float(scores: np.ndarray, q: np.ndarray) -> int:
    """Raise, in place, the winner of every row whose argmax the cast to ``q``'s float type changed.

    Parameters
    ----------
    scores : (n, C) float32 or float64 array
        The scores before the cast (any strides); clipped to [0, 1] for the comparison.
    q : (n, C) float16 or float32 array, C-contiguous
        ``clip(scores, 0, 1)`` cast to the store type; modified in place: where
        the cast made the winner tie with a lower class it goes one
        representable step up (at 1.0, the lower classes at 1.0 go one step
        down), and ``-0`` becomes ``+0``.

    Returns
    -------
    int
        Rows fixed. Afterwards ``np.argmax(q, 1) == np.argmax(clip(scores, 0, 1), 1)``.
    """
    f = np.asarray(scores)
    if f.ndim != 2 or f.dtype not in (np.float32, np.float64):
        raise ValueError(f"keep_argmax_float needs (n, C) float32 / float64 scores, not {f.dtype} {f.shape}")
    if q.shape != f.shape or q.dtype not in (np.float16, np.float32) or not q.flags.c_contiguous:
        raise ValueError(f"keep_argmax_float needs a C-contiguous float16 / float32 array of shape {f.shape}")
    if f.size == 0:
        return 0
    ui = np.uint16 if q.dtype == np.float16 else np.uint32
    one = np.array(1.0, dtype=q.dtype).view(ui)[()]
    sign = ui(1 << (8 * q.dtype.itemsize - 1))
    t = f.dtype.type
    return int(_keep_argmax_bits_kernel(f, q.view(ui), t(0.0), t(1.0), ui(0), one, sign))
