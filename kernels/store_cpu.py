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


@njit(inline="always", nogil=True, cache=True)
def _clamp(v, lo, hi):  # pragma: no cover - jitted
    return lo if v < lo else (hi if v > hi else v)


@njit(inline="always", nogil=True, cache=True)
def _keep_row_argmax(f, q, i, lo, hi, top):  # pragma: no cover - jitted
    """Row ``i``: when ``q``'s argmax differs from clamped ``f``'s, raise the winner one step (0 / 1 fixed).

    ``top`` is ``q``'s largest value (255, or the bits of 1.0): a winner already
    there stays, and the lower classes at ``top`` go one step down instead.
    """
    c = f.shape[1]
    win = 0
    qwin = 0
    fbest = _clamp(f[i, 0], lo, hi)
    qbest = q[i, 0]
    for k in range(1, c):
        v = _clamp(f[i, k], lo, hi)
        if v > fbest:
            fbest = v
            win = k
        b = q[i, k]
        if b > qbest:
            qbest = b
            qwin = k
    if qwin == win:
        return 0
    if q[i, win] < top:
        q[i, win] += 1
    else:
        for k in range(win):
            if q[i, k] == top:
                q[i, k] = top - 1
    return 1


@njit(nogil=True, cache=True)
def _quantize_u8_kernel(f, out, lo, hi, scale):  # pragma: no cover - jitted
    n, c = f.shape
    top = np.uint8(255)
    fixed = 0
    for i in range(n):
        for k in range(c):
            out[i, k] = np.uint8(np.rint(_clamp(f[i, k], lo, hi) * scale))
        fixed += _keep_row_argmax(f, out, i, lo, hi, top)
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
        for k in range(c):
            if bits[i, k] == sign:  # -0 -> +0, so that the bits order like the values
                bits[i, k] = zero
        fixed += _keep_row_argmax(f, bits, i, lo, hi, one)
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
