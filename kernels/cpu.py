"""CPU kernels (Numba) for ISLE steps 2 and 3: confusion counting, score decode, merge.

Same names, semantics and argument checks (:mod:`isle_fast.kernels.checks`) as
:mod:`isle_fast.kernels.gpu`; the plain NumPy references are ``tests/reference.py``.
Counts are exact ``int64``; nothing here touches files, Zarr or Dask.

Conventions
-----------
* ``C = num_classes`` (background 0). A gt value ``>= C`` (255) is ignored; a
  set label ``>= C`` is an abstention (column ``C`` of the confusion matrix).
* Scores may be ``uint8``, ``float16`` or ``float32``; decode is argmax over
  the last axis, first index wins ties. ``bg_threshold >= 0`` replaces the
  background slice by the threshold *as stored in the scores' dtype*
  (``uint8``: clipped to [0, 255] and truncated, which compares exactly like
  the real value against integer scores; floats: rounded to nearest). NaN
  scores are not supported. ``float16`` is handled through its bit pattern
  (Numba has no CPU float16): the bits are mapped to an order-preserving
  integer key, with -0 == +0.
* Inputs are used in place when C-contiguous (``ravel`` views, no copies);
  a non-contiguous input is copied once.

Performance notes
-----------------
* The N sets reach the compiled kernels as an int64 array of data addresses
  (read with an unaligned-load intrinsic), so ONE compiled kernel serves every
  N (a tuple of arrays would compile once per N, seconds each); score kernels
  compile once per score dtype. ``cache=True`` keeps them across processes.
* Parallel over contiguous pixel ranges, one per Numba thread, with
  thread-private histograms summed at the end: the result does not depend on
  the thread count or on how the caller chunks the data (counts add up). An
  input of a single work item (< ``BLOCK`` pixels) runs on the calling thread
  (waking the pool costs more than the work). Callers that already run
  kernels from several threads (Dask) may want ``with numba_threads(1):``
  in those threads to avoid oversubscription.
* ``confusion_labels`` reads gt once per cache block (4096 words = 32 KiB)
  and walks it against one set at a time, 8 pixels (one uint64 word) per
  step: a run of repeated (gt word, set word) pairs is added once (x run
  length), a pair of uniform words is a single increment, other words are
  counted pixel by pixel. Real label maps are mostly large uniform regions,
  so most pixels cost a word compare. Histograms are indexed by raw label
  bytes (rows min(gt, C), 256 columns), so no per-pixel remapping is needed.
* ``confusion_labels_images`` is the same count over a chunk of padded images,
  each image's own ``rows x cols`` region only (the padding is never read),
  the counts of every image folded in the kernel (``per_image``): one call per
  chunk from the passes' threads. It is one ``prange`` item: compiled as a
  parallel region, the same loops measured about 2x faster than in a plain
  ``@njit`` function (Numba 0.68, this machine).
* ``merge_labels`` works on 64-pixel blocks (8 words), then on words: where
  every set has the same words and their bytes are all < C (or all 255) the
  words are copied; where every set repeats the row above (the same bytes one
  row length back) the output of the row above is copied; only the remaining
  words are merged, 8 pixels at a time: each set's word becomes a word of its
  per-pixel keys (one lookup where the word is one label), the keys' bytewise
  max is taken with SWAR arithmetic and mapped through ``lab`` (the key orders
  claims by the policy; IGNORE sums per-set codes instead, pixel by pixel, as
  do keys of C > 127). The checks OR together XORs of whole words without
  branching inside a block. On the 2,400-image VOC e2e data 71 % of the words
  are in copied blocks, 25 % repeat the row above and 3.4 % are merged; the
  row-above copy replaced a previous-block / previous-word repeat (which
  caught far fewer of the words of a failed block) and with the 8-pixel merge
  took the kernel from 0.44 to 0.35 s of one core for the 73 chunks of 33
  images (a hand measurement: 12 of them timed, x 73/12). Pixel ``j`` of a word is its byte
  ``j``: the word tricks assume a little-endian machine (checked at import).
* ``merge_count_images`` (``isle run``'s fused ensemble pass) merges a chunk of
  padded images image by image, only each image's rows (its padding is set to
  255), and counts the image against the gt right after it is merged, while its
  rows are in cache: merge, padding and count took 0.42 s against 0.57 s for
  ``merge_labels``, the padding fill and ``confusion_labels_images`` in turn
  (the same hand measurement).
* ``sparse_score_bins`` (decode + ``(gt, argmax, bin)`` counts of class-sparse uint8 slots) works
  row by row in two steps: per set, the row's max / class are decoded into uint8 rows by loops
  specialised on the slot count K (a literal stride 1..6) and on the used slots, so that LLVM
  vectorises them (a run-time stride measured ~10x slower), then the bin (table lookup, its own loop)
  and a uint32 code ``(min(gt, C), class, bin)``; then the codes of all N sets are counted, 4 sets
  interleaved per pixel (runs of one bin otherwise serialise on the increments). gt values ``>= C``
  count in a dummy gt row that is dropped (no branch per pixel). ~2x the previous fused per-pixel
  loop on the CAM benchmark's data (its "kernel only" line); ``merge_sparse_labels`` uses the same
  decode.
* ``subset_confusion_labels`` counts the distinct tuples
  ``(gt, l_1 .. l_N)`` of each chunk in a small open-addressing hash table
  (run-length first: consecutive equal tuples are one insert; the table is
  evaluated and cleared when half full) and evaluates every subset's merge
  on the distinct tuples only: exact, and O(distinct x S x N) instead of
  O(pixels x S x N). Falls back to a per-pixel evaluation of every subset
  (``method="direct"``) when the packed tuple does not fit 63 bits,
  ``(N + 1) * bits(C) > 63`` (e.g. N >= 8 with C > 63).
* ``subset_confusion_scores`` decodes the N x C scores of a pixel once and
  evaluates each subset on them: O(S x C) per pixel (exact, but slow for
  large S: 255 subsets of 8 sets is ~5000 compares per pixel).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Sequence

import numba
import numpy as np
from numba import njit, prange, types
from numba.extending import intrinsic, overload

from .checks import (
    IGNORE,
    ORDER,
    SCORE,
    confusion_labels_args,
    confusion_score_bins_args,
    confusion_score_bins_sparse_args,
    confusion_scores_args,
    decode_scores_args,
    merge_labels_args,
    merge_scores_args,
    subset_confusion_labels_args,
    subset_confusion_scores_args,
    vote_context_args,
    vote_patterns_args,
)

__all__ = [
    "SCORE", "ORDER", "IGNORE",
    "confusion_labels", "confusion_labels_images", "confusion_scores", "confusion_score_bins",
    "confusion_score_bins_sparse",
    "decode_scores",
    "merge_labels", "merge_scores", "merge_count_images",
    "sparse_score_bins", "merge_sparse_labels",
    "subset_confusion_labels", "subset_confusion_scores", "numba_threads",
    "vote_patterns", "vote_context",
]

if sys.byteorder != "little":  # pragma: no cover - every platform Numba supports today is little-endian
    raise ImportError("isle_fast.kernels.cpu reads 8 pixels as one 64-bit word and needs a little-endian CPU")

_JIT = dict(parallel=True, nogil=True, cache=True)
_JIT1 = dict(nogil=True, cache=True)

#: pixels per parallel work item (lower bound); chunks are contiguous pixel ranges
BLOCK = 1 << 16


def _i64(u: int) -> np.int64:
    """An unsigned 64-bit constant as the int64 with the same bits (Numba keeps int64 arithmetic)."""
    return np.array([u], np.uint64).view(np.int64)[0]


_ONES = _i64(0x0101010101010101)
_HIGHS = _i64(0x8080808080808080)
_EMPTY = np.int64(-1)
_HASH_MUL = _i64(0x9E3779B97F4A7C15)


# ----------------------------------------------------------------------------------------------
# raw loads: the N sets reach the kernels as an int64 array of data addresses, so one compiled
# kernel serves every N (a tuple of arrays would compile once per N: seconds each)
# ----------------------------------------------------------------------------------------------

_U8 = np.uint8(0)
_I64 = np.int64(0)


@intrinsic
def _ld(typingctx, addr, idx, like):
    """Element ``idx`` of an array of ``type(like)`` starting at integer address ``addr``."""
    if not isinstance(addr, types.Integer) or not isinstance(idx, types.Integer):
        return None
    rt = types.unliteral(like)
    sig = rt(types.int64, types.int64, like)

    def codegen(context, builder, signature, args):
        a, i, _ = args
        vt = context.get_value_type(rt)
        p = builder.inttoptr(a, vt.as_pointer())
        return builder.load(builder.gep(p, [i]), align=1)

    return sig, codegen


@intrinsic
def _ldb(typingctx, addr, off, like):
    """The ``type(like)`` value at byte offset ``off`` from integer address ``addr`` (any alignment)."""
    if not isinstance(addr, types.Integer) or not isinstance(off, types.Integer):
        return None
    rt = types.unliteral(like)
    sig = rt(types.int64, types.int64, like)

    def codegen(context, builder, signature, args):
        a, i, _ = args
        vt = context.get_value_type(rt)
        p = builder.inttoptr(a, context.get_value_type(types.uint8).as_pointer())
        q = builder.bitcast(builder.gep(p, [i]), vt.as_pointer())
        return builder.load(q, align=1)

    return sig, codegen


@intrinsic
def _stb(typingctx, addr, off, val):
    """Store ``val`` at byte offset ``off`` from integer address ``addr`` (any alignment)."""
    if not isinstance(addr, types.Integer) or not isinstance(off, types.Integer):
        return None
    vt_ = types.unliteral(val)
    sig = types.void(types.int64, types.int64, vt_)

    def codegen(context, builder, signature, args):
        a, i, v = args
        vt = context.get_value_type(vt_)
        p = builder.inttoptr(a, context.get_value_type(types.uint8).as_pointer())
        q = builder.bitcast(builder.gep(p, [i]), vt.as_pointer())
        builder.store(v, q, align=1)
        return context.get_dummy_value()

    return sig, codegen


# ----------------------------------------------------------------------------------------------
# score keys: an order-preserving number for every stored score value
# ----------------------------------------------------------------------------------------------

def _key(x):  # pragma: no cover - replaced by the overload inside jitted code
    raise NotImplementedError


@overload(_key, inline="always")
def _key_ol(x):
    if isinstance(x, types.Integer) and x.bitwidth == 16 and not x.signed:
        # float16 bit pattern -> int key ordered like the float value (-0 == +0)
        def impl(x):
            v = np.int32(x)
            m = v & 0x7FFF
            if v & 0x8000:
                return np.int32(0x8000) - m
            return np.int32(0x8000) + m
        return impl
    if isinstance(x, types.Integer):
        def impl(x):
            return np.int32(x)
        return impl
    if isinstance(x, types.Float):
        def impl(x):
            return x
        return impl
    return None


def _score_view(a: np.ndarray) -> np.ndarray:
    """The array Numba sees for a score array (float16 -> its uint16 bits)."""
    return a.view(np.uint16) if a.dtype == np.float16 else a


# ----------------------------------------------------------------------------------------------
# calling the kernels
# ----------------------------------------------------------------------------------------------

def _nchunks(npix: int) -> int:
    """Parallel work items for npix pixels: one per thread, at least BLOCK pixels each."""
    return int(max(1, min(numba.get_num_threads(), -(-npix // BLOCK))))


@contextmanager
def numba_threads(n: int) -> Iterator[int]:
    """Context manager: this thread's Numba parallel regions use at most ``n`` threads inside.

    Numba keeps the count per thread, so other threads are not affected; the previous
    count is restored on exit. The one place that changes Numba's thread count: the
    kernels below for an input of one work item, :func:`isle_fast.backend.task_kernels`
    for every Dask task.
    """
    old = numba.get_num_threads()
    n = max(1, min(int(n), numba.config.NUMBA_NUM_THREADS))
    if n != old:
        numba.set_num_threads(n)
    try:
        yield n
    finally:
        if n != old:
            numba.set_num_threads(old)


def _call(kernel, *args):
    """Run a parallel kernel; with a single chunk (the last argument) on the calling thread only.

    Waking the thread pool for a small input costs far more than the work on a busy machine.
    """
    if args[-1] == 1 and numba.get_num_threads() > 1:
        with numba_threads(1):
            return kernel(*args)
    return kernel(*args)


def _addrs(arrays: tuple) -> np.ndarray:
    """Data addresses of C-contiguous arrays (the caller keeps the arrays alive during the call)."""
    return np.array([a.__array_interface__["data"][0] for a in arrays], dtype=np.int64)


# ----------------------------------------------------------------------------------------------
# confusion of label maps
# ----------------------------------------------------------------------------------------------

@njit(inline="always", **_JIT1)
def _add_word(h, off, rowbase, gw, sw, g, a, j0, wt):  # pragma: no cover - jitted
    """Add one 8-pixel word pair (gt word gw, set word sw at pixel j0), ``wt`` times, to h[off:]."""
    g0 = gw & 0xFF
    if gw == g0 * _ONES:                       # gt uniform over the word
        grow = off + rowbase[g0]
        s0 = sw & 0xFF
        if sw == s0 * _ONES:                   # ... and the set too: one bin
            h[grow + s0] += 8 * wt
        else:
            for j in range(8):
                h[grow + _ld(a, j0 + j, _U8)] += wt
    else:
        for j in range(8):
            h[off + rowbase[g[j0 + j]] + _ld(a, j0 + j, _U8)] += wt


@njit(inline="always", **_JIT1)
def _count_pairs(h, off, rowbase, g, gaddr, a, i0, i1):  # pragma: no cover - jitted
    """Words [i0, i1) of gt against one set; runs of repeated word pairs are added once."""
    pg = _ld(gaddr, i0, _I64)
    ps = _ld(a, i0, _I64)
    pi = i0
    run = 1
    for i in range(i0 + 1, i1):
        gw = _ld(gaddr, i, _I64)
        sw = _ld(a, i, _I64)
        if gw == pg and sw == ps:
            run += 1
        else:
            _add_word(h, off, rowbase, pg, ps, g, a, pi * 8, run)
            pg = gw
            ps = sw
            pi = i
            run = 1
    _add_word(h, off, rowbase, pg, ps, g, a, pi * 8, run)


_CB = 4096   # words per cache block of the confusion kernel (32 KiB of gt, re-read once per set)


@njit(**_JIT)
def _confusion_labels_kernel(g, gaddr, ptrs, C, nchunks):  # pragma: no cover - jitted
    N = ptrs.size
    npix = g.size
    nw = npix // 8
    R = (C + 1) * 256            # one set's histogram: rows min(gt, C) (row C = ignored), 256 columns
    hist = np.zeros((nchunks, N * R), np.int64)
    rowbase = np.empty(256, np.int64)
    for v in range(256):
        rowbase[v] = min(v, C) * 256
    per = (nw + nchunks - 1) // nchunks
    for k in prange(nchunks):
        h = hist[k]
        end = min(nw, (k + 1) * per)
        for b0 in range(k * per, end, _CB):
            b1 = min(end, b0 + _CB)
            for n in range(N):
                _count_pairs(h, n * R, rowbase, g, gaddr, ptrs[n], b0, b1)
        if k == nchunks - 1:  # the tail bytes after the last full word
            for j in range(nw * 8, npix):
                for n in range(N):
                    h[n * R + rowbase[g[j]] + _ld(ptrs[n], j, _U8)] += 1
    return hist.reshape(nchunks, N, C + 1, 256)


def _fold_columns(hist: np.ndarray, C: int) -> np.ndarray:
    """(chunks, N, C + 1, 256) raw histograms -> (N, C, C + 1): rows >= C dropped, cols >= C summed."""
    out = np.empty(hist.shape[1:2] + (C, C + 1), np.int64)
    out[:, :, :C] = hist[:, :, :C, :C].sum(axis=0)
    out[:, :, C] = hist[:, :, :C, C:].sum(axis=(0, 3))
    return out


def confusion_labels(gt: np.ndarray, sets: Sequence[np.ndarray], num_classes: int) -> np.ndarray:
    """Fused confusion counts of N label sets against gt in one pass.

    Parameters
    ----------
    gt : ndarray of uint8, any shape
        Ground truth; values ``>= num_classes`` (255) are ignored.
    sets : tuple of N ndarrays of uint8, each ``gt.shape``
        Predicted labels; values ``>= num_classes`` are abstentions (column C).
    num_classes : int
        C, background included (1..255).

    Returns
    -------
    ndarray of int64, shape (N, C, C + 1)
        ``out[n, t, p]`` = number of pixels with ``gt == t`` and ``sets[n] == p``.
    """
    gt, sets, C = confusion_labels_args(gt, sets, num_classes, host=True)
    g = gt.reshape(-1)
    hist = _call(_confusion_labels_kernel, g, _addrs((g,))[0], _addrs(sets), C, _nchunks(g.size))
    return _fold_columns(hist, C)


# ----------------------------------------------------------------------------------------------
# confusion of label maps over the real region of every image (padding skipped)
# ----------------------------------------------------------------------------------------------

@njit(inline="always", **_JIT1)
def _count_span(h, off, rowbase, g, gaddr, a, p0, p1):  # pragma: no cover - jitted
    """Pixels [p0, p1) (byte offsets) of gt against one set: words from p0 (runs added once), then the tail."""
    nw = (p1 - p0) >> 3
    if nw > 0:
        pg = _ldb(gaddr, p0, _I64)
        ps = _ldb(a, p0, _I64)
        pj = p0
        run = 1
        for i in range(1, nw):
            q = p0 + 8 * i
            gw = _ldb(gaddr, q, _I64)
            sw = _ldb(a, q, _I64)
            if gw == pg and sw == ps:
                run += 1
            else:
                _add_word(h, off, rowbase, pg, ps, g, a, pj, run)
                pg = gw
                ps = sw
                pj = q
                run = 1
        _add_word(h, off, rowbase, pg, ps, g, a, pj, run)
    for j in range(p0 + 8 * nw, p1):
        h[off + rowbase[g[j]] + _ld(a, j, _U8)] += 1


@njit(**_JIT1)
def _count_image(h, rowbase, g, gaddr, ptrs, base, rows, cols, W, R):  # pragma: no cover - jitted
    """One image (rows x cols at byte ``base``, rows ``W`` apart) of gt against every set, into ``h``."""
    N = ptrs.size
    if cols == W:               # whole rows: one contiguous span, walked in cache blocks
        end = base + rows * W
        b0 = base
        while b0 < end:
            b1 = min(end, b0 + _CB * 8)
            for n in range(N):
                _count_span(h, n * R, rowbase, g, gaddr, ptrs[n], b0, b1)
            b0 = b1
    else:                       # the first ``cols`` pixels of every row
        for r in range(rows):
            b0 = base + r * W
            for n in range(N):
                _count_span(h, n * R, rowbase, g, gaddr, ptrs[n], b0, b0 + cols)


@njit(inline="always", **_JIT1)
def _fold_into(h, out, N, C, R):  # pragma: no cover - jitted
    """Add raw histograms ``h`` (N x (C + 1) x 256) into ``out`` (N, C, C + 1) and zero ``h`` again."""
    for n in range(N):
        for t in range(C):
            row = n * R + t * 256
            for p in range(C):
                out[n, t, p] += h[row + p]
            rest = 0
            for p in range(C, 256):
                rest += h[row + p]
            out[n, t, C] += rest
    h[:] = 0


@njit(**_JIT)
def _confusion_images_kernel(g, gaddr, ptrs, shapes, H, W, C, per_image):  # pragma: no cover - jitted
    # one prange item: the passes call this from one thread per chunk; compiled as a parallel region it
    # measured ~2x faster than the same loops in a plain @njit function
    N = ptrs.size
    k = shapes.shape[0]
    R = (C + 1) * 256
    out = np.zeros((k if per_image else 1, N, C, C + 1), np.int64)
    rowbase = np.empty(256, np.int64)
    for v in range(256):
        rowbase[v] = min(v, C) * 256
    for t in prange(1):
        h = np.zeros(N * R, np.int64)   # raw counts (rows min(gt, C), 256 columns), folded per image
        for m in range(k):
            rows = shapes[m, 0]
            cols = shapes[m, 1]
            base = m * H * W
            if cols == W:           # whole rows: one contiguous span, walked in cache blocks
                end = base + rows * W
                for b0 in range(base, end, _CB * 8):
                    b1 = min(end, b0 + _CB * 8)
                    for n in range(N):
                        _count_span(h, n * R, rowbase, g, gaddr, ptrs[n], b0, b1)
            else:                   # the first ``cols`` pixels of every row
                for r in range(rows):
                    b0 = base + r * W
                    for n in range(N):
                        _count_span(h, n * R, rowbase, g, gaddr, ptrs[n], b0, b0 + cols)
            if per_image:
                _fold_into(h, out[m], N, C, R)
        if not per_image:
            _fold_into(h, out[0], N, C, R)
    return out


def _image_shapes_arg(what: str, shapes: "np.typing.ArrayLike", k: int, H: int, W: int) -> np.ndarray:
    """``shapes`` checked as the ``(k, 2)`` rows and columns of k images padded to ``H x W``: int64, contiguous."""
    sh = np.asarray(shapes)
    if sh.shape != (k, 2) or sh.dtype.kind not in "iu":
        raise ValueError(f"{what}: shapes must be a ({k}, 2) integer array, not {sh.dtype} {sh.shape}")
    sh = np.ascontiguousarray(sh, dtype=np.int64)
    if k and ((sh < 0).any() or (sh[:, 0] > H).any() or (sh[:, 1] > W).any()):
        raise ValueError(f"{what}: every (rows, cols) of shapes must lie within the padded {H} x {W}")
    return sh


def confusion_labels_images(gt: np.ndarray, sets: Sequence[np.ndarray], shapes: np.ndarray, num_classes: int,
                            per_image: bool = False) -> np.ndarray:
    """:func:`confusion_labels` of a chunk of padded images, over each image's own region only.

    Image ``m`` is ``gt[m, :rows_m, :cols_m]`` (and the same region of every set):
    the padding around it is not read. On the calling thread (no parallel region):
    the passes run one such call per chunk on each of their threads.

    Parameters
    ----------
    gt : (k, H, W) uint8
        Ground truth of ``k`` images padded to ``H x W``; values ``>= num_classes`` are ignored.
    sets : tuple of N (k, H, W) uint8 arrays
        Predicted labels; values ``>= num_classes`` are abstentions (column C).
    shapes : (k, 2) integer array
        ``(rows, cols)`` of every image, ``0 <= rows <= H``, ``0 <= cols <= W``.
    num_classes : int
        C, background included (1..255).
    per_image : bool
        Counts of every image instead of their sum.

    Returns
    -------
    ndarray of int64, (N, C, C + 1), or (k, N, C, C + 1) with ``per_image``
        ``out[n, t, p]``: pixels of the images' regions with ``gt == t`` and ``sets[n] == p``.
    """
    gt, sets, C = confusion_labels_args(gt, sets, num_classes, host=True)
    what = "confusion_labels_images"
    if gt.ndim != 3:
        raise ValueError(f"{what}: gt must be (images, H, W), not shape {tuple(gt.shape)}")
    k, H, W = (int(v) for v in gt.shape)
    sh = _image_shapes_arg(what, shapes, k, H, W)
    out = _confusion_images_kernel(gt.reshape(-1), _addrs((gt,))[0], _addrs(sets), sh, H, W, C, bool(per_image))
    return out if per_image else out[0]


# ----------------------------------------------------------------------------------------------
# score decode and confusion of score stacks
# ----------------------------------------------------------------------------------------------

@njit(inline="always", **_JIT1)
def _argmax_at(addr, base, C, use_thr, thr):  # pragma: no cover - jitted
    """Decoded label of the C scores at element offset ``base`` of the array at ``addr``."""
    best = _key(thr) if use_thr else _key(_ld(addr, base, thr))
    bi = 0
    for c in range(1, C):
        v = _key(_ld(addr, base + c, thr))
        if v > best:
            best = v
            bi = c
    return bi


@njit(**_JIT)
def _decode_kernel(addr, npix, C, use_thr, thr, nchunks):  # pragma: no cover - jitted
    out = np.empty(npix, np.uint8)
    per = (npix + nchunks - 1) // nchunks
    for k in prange(nchunks):
        for i in range(k * per, min(npix, (k + 1) * per)):
            out[i] = _argmax_at(addr, i * C, C, use_thr, thr)
    return out


def decode_scores(scores: np.ndarray, bg_threshold: float = -1.0) -> np.ndarray:
    """Hard labels from a score stack: argmax over the last axis (first index wins ties).

    Parameters
    ----------
    scores : ndarray (..., C) of uint8, float16 or float32
    bg_threshold : float
        If ``>= 0`` the background slice (index 0) is replaced by this value, in
        the stored units, cast to the scores' dtype (see module notes).

    Returns
    -------
    ndarray of uint8, shape ``scores.shape[:-1]``
    """
    s, C, _, (use, _, thr) = decode_scores_args(scores, bg_threshold, host=True)
    npix = s.size // C
    out = _call(_decode_kernel, _addrs((s,))[0], npix, C, use, thr, _nchunks(npix))
    return out.reshape(s.shape[:-1])


@njit(**_JIT)
def _confusion_scores_kernel(g, ptrs, C, use_thr, thr, nchunks):  # pragma: no cover - jitted
    N = ptrs.size
    npix = g.size
    hist = np.zeros((nchunks, N, C, C + 1), np.int64)
    per = (npix + nchunks - 1) // nchunks
    for k in prange(nchunks):
        h = hist[k]
        for i in range(k * per, min(npix, (k + 1) * per)):
            t = g[i]
            if t >= C:
                continue
            for n in range(N):
                h[n, t, _argmax_at(ptrs[n], i * C, C, use_thr, thr)] += 1
    return hist


def confusion_scores(gt: np.ndarray, sets: Sequence[np.ndarray], num_classes: int,
                     bg_threshold: float = -1.0) -> np.ndarray:
    """Fused confusion counts of N score stacks (decoded by argmax) against gt.

    Parameters
    ----------
    gt : ndarray of uint8
    sets : tuple of N ndarrays ``gt.shape + (C,)``, all uint8, float16 or float32
    num_classes : int
    bg_threshold : float
        See :func:`decode_scores`.

    Returns
    -------
    ndarray of int64, shape (N, C, C + 1); column C is 0 (scores never abstain).
    """
    gt, sets, C, _, (use, _, thr) = confusion_scores_args(gt, sets, num_classes, bg_threshold, host=True)
    g = gt.reshape(-1)
    hist = _call(_confusion_scores_kernel, g, _addrs(sets), C, use, thr, _nchunks(g.size))
    return hist.sum(axis=0)


# ----------------------------------------------------------------------------------------------
# every background threshold at once: (gt, foreground argmax, foreground max) histograms
# ----------------------------------------------------------------------------------------------

@njit(**_JIT)
def _score_bins_kernel(g, ptrs, C, nchunks):  # pragma: no cover - jitted
    N = ptrs.size
    npix = g.size
    R = C * 256                      # one gt row of one set: C argmax values x 256 levels
    hist = np.zeros((nchunks, N * C * R), np.int64)
    per = (npix + nchunks - 1) // nchunks
    for k in prange(nchunks):
        h = hist[k]
        for i in range(k * per, min(npix, (k + 1) * per)):
            t = g[i]
            if t >= C:
                continue
            base = i * C
            for n in range(N):
                a = ptrs[n]
                best = 0                 # C == 1: argmax 0, level 0 (decodes to 0 at any threshold)
                bi = 0
                if C > 1:
                    best = np.int64(_ld(a, base + 1, _U8))
                    bi = 1
                    for c in range(2, C):
                        v = np.int64(_ld(a, base + c, _U8))
                        if v > best:
                            best = v
                            bi = c
                h[(n * C + t) * R + bi * 256 + best] += 1
    return hist.reshape(nchunks, N, C, C, 256)


def confusion_score_bins(gt: np.ndarray, sets: Sequence[np.ndarray], num_classes: int) -> np.ndarray:
    """Per-level histograms of N uint8 score stacks, from which every threshold's confusion follows.

    A thresholded decode (:func:`decode_scores` with ``bg_threshold = L``, a level
    0..255) gives a pixel the foreground argmax ``a`` (first of the largest of slices
    1..C-1) when its value ``m`` is ``> L`` and background otherwise (a tie goes to
    background, as the background slice comes first); the stored background slice is
    not read. So ``(gt, a, m)`` decides the pixel at every threshold.

    Parameters
    ----------
    gt : ndarray of uint8, any shape
        Ground truth; values ``>= num_classes`` (255) are ignored.
    sets : tuple of N uint8 ndarrays ``gt.shape + (C,)``
    num_classes : int
        C (1..255). With C == 1 every pixel is counted at ``a = 0, m = 0``.

    Returns
    -------
    ndarray of int64, shape (N, C, C, 256)
        ``out[n, t, a, m]`` = pixels with ``gt == t`` whose foreground argmax in set
        ``n`` is ``a`` with the value ``m`` (``a >= 1`` unless C == 1).
    """
    gt, sets, C = confusion_score_bins_args(gt, sets, num_classes, host=True)
    g = gt.reshape(-1)
    hist = _call(_score_bins_kernel, g, _addrs(sets), C, _nchunks(g.size))
    return hist.sum(axis=0)


@njit(**_JIT)
def _score_bins_sparse_kernel(g, ptrs, kptrs, ks, hw, C, nchunks):  # pragma: no cover - jitted
    N = ptrs.size
    npix = g.size
    R = C * 256
    hist = np.zeros((nchunks, N * C * R), np.int64)
    a0 = 1 if C > 1 else 0
    per = (npix + nchunks - 1) // nchunks
    for k in prange(nchunks):
        h = hist[k]
        for i in range(k * per, min(npix, (k + 1) * per)):
            t = g[i]
            if t >= C:
                continue
            img = i // hw
            for n in range(N):
                K = ks[n]
                a = ptrs[n]
                kp = kptrs[n]
                best = np.int64(0)
                bi = np.int64(a0)
                for j in range(K):          # slots hold ascending classes, unused (0) last
                    key = np.int64(_ld(kp, img * K + j, _U8))
                    if key == 0:
                        break
                    v = np.int64(_ld(a, i * K + j, _U8))
                    if v > best:
                        best = v
                        bi = key
                h[(n * C + t) * R + bi * 256 + best] += 1
    return hist.reshape(nchunks, N, C, C, 256)


def confusion_score_bins_sparse(gt: np.ndarray, cams: Sequence[np.ndarray], keys: Sequence[np.ndarray],
                                num_classes: int) -> np.ndarray:
    """:func:`confusion_score_bins` of class-sparse score stacks, read as stored (no dense stack is made).

    Parameters
    ----------
    gt : uint8 (n, h, w)
    cams : tuple of N uint8 arrays (n, h, w, K_s)
        Slot ``j`` of image ``m`` holds the scores of class ``keys[s][m, j]``.
    keys : tuple of N uint8 arrays (n, K_s)
        Per image: ascending classes in 1..C-1, unused slots (0) last
        (:func:`isle_fast.stores.sparse.check_keys`). Classes without a slot score 0.
    num_classes : int

    Returns
    -------
    ndarray of int64 (N, C, C, 256): equal to :func:`confusion_score_bins` of the dense stacks
    (every class without a slot 0; a pixel whose foreground scores are all 0 counts at ``a = 1, m = 0``).
    """
    gt, cams, keys, C = confusion_score_bins_sparse_args(gt, cams, keys, num_classes, host=True)
    g = gt.reshape(-1)
    hw = int(gt.shape[1] * gt.shape[2]) or 1
    ks = np.array([a.shape[3] for a in cams], np.int64)
    hist = _call(_score_bins_sparse_kernel, g, _addrs(cams), _addrs(keys), ks, hw, C, _nchunks(g.size))
    return hist.sum(axis=0)


# ----------------------------------------------------------------------------------------------
# class-sparse score blocks: decode + (gt, argmax, score bin) in one sweep, the merge of N sets
# ----------------------------------------------------------------------------------------------

@njit(inline="always", **_JIT1)
def _image_slots(kaddr, m, K, kk):  # pragma: no cover - jitted
    """Used slots of image ``m`` (keys at ``kaddr``, K a row): their classes into ``kk`` (uint8); the count."""
    ku = 0
    for j in range(K):
        c = _ld(kaddr, m * K + j, _U8)
        if c == 0:
            break
        kk[j] = c
        ku += 1
    return ku


# The decode loops below keep every value uint8 (no arithmetic on them: Numba would widen it to
# int64) and read slot j of pixel x at ``a + K * x + j``. Called with a literal K (1..6), the stride is
# a constant and LLVM vectorises the loop (~0.1 ns a pixel here, ~10x the same loop with a run-time
# stride, measured). Unused slots (past the image's used ones) are never read. Plain @njit helpers
# (LLVM inlines them): inline="always" compiled as fast code but took ~7x longer to compile.

@njit(**_JIT1)
def _max1(a, w, K, k0, z, mv, bv):  # pragma: no cover - jitted
    """One used slot: ``mv[x]`` its value, ``bv[x]`` its class ``k0`` (``z`` where the value is 0)."""
    for x in range(w):
        m = _ld(a, K * x, _U8)
        mv[x] = m
        bv[x] = k0 if m > 0 else z


@njit(**_JIT1)
def _max2(a, w, K, k0, k1, z, mv, bv):  # pragma: no cover - jitted
    """Two used slots: the first of the largest (class ``z`` where both are 0)."""
    for x in range(w):
        q = K * x
        m = _ld(a, q, _U8)
        b = k0 if m > 0 else z
        v = _ld(a, q + 1, _U8)
        if v > m:
            m = v
            b = k1
        mv[x] = m
        bv[x] = b


@njit(**_JIT1)
def _max3(a, w, K, k0, k1, k2, z, mv, bv):  # pragma: no cover - jitted
    """Three used slots: the first of the largest (class ``z`` where all are 0)."""
    for x in range(w):
        q = K * x
        m = _ld(a, q, _U8)
        b = k0 if m > 0 else z
        v = _ld(a, q + 1, _U8)
        if v > m:
            m = v
            b = k1
        v = _ld(a, q + 2, _U8)
        if v > m:
            m = v
            b = k2
        mv[x] = m
        bv[x] = b


@njit(**_JIT1)
def _max4(a, w, K, k0, k1, k2, k3, z, mv, bv):  # pragma: no cover - jitted
    """Four used slots: the first of the largest (class ``z`` where all are 0)."""
    for x in range(w):
        q = K * x
        m = _ld(a, q, _U8)
        b = k0 if m > 0 else z
        v = _ld(a, q + 1, _U8)
        if v > m:
            m = v
            b = k1
        v = _ld(a, q + 2, _U8)
        if v > m:
            m = v
            b = k2
        v = _ld(a, q + 3, _U8)
        if v > m:
            m = v
            b = k3
        mv[x] = m
        bv[x] = b


@njit(**_JIT1)
def _max_more(a, w, K, kj, mv, bv):  # pragma: no cover - jitted
    """One more slot (at ``a``, already offset to it, of class ``kj``) into the running max / class."""
    for x in range(w):
        v = _ld(a, K * x, _U8)
        if v > mv[x]:
            mv[x] = v
            bv[x] = kj


@njit(**_JIT1)
def _decode_slots(a, w, K, ku, kk, z, mv, bv):  # pragma: no cover - jitted
    """:func:`_decode_row` for ``1 <= ku <= K`` and one stride K (literal at the call sites)."""
    if ku == 1:
        _max1(a, w, K, kk[0], z, mv, bv)
    elif ku == 2:
        _max2(a, w, K, kk[0], kk[1], z, mv, bv)
    elif ku == 3:
        _max3(a, w, K, kk[0], kk[1], kk[2], z, mv, bv)
    else:
        _max4(a, w, K, kk[0], kk[1], kk[2], kk[3], z, mv, bv)
        for j in range(4, ku):
            _max_more(a + j, w, K, kk[j], mv, bv)


@njit(**_JIT1)
def _decode_row(a, w, K, ku, kk, z, mv, bv):  # pragma: no cover - jitted
    """Foreground max (``mv``) and its class (``bv``), both uint8, of ``w`` pixels of a class-sparse row.

    The row starts at address ``a``; ``K`` slots a pixel, the first ``ku`` used, of classes
    ``kk[:ku]`` (ascending): the first of the largest values wins, and where every used slot is 0
    (or none is used) the class is ``z`` (the dense argmax of an all-zero foreground: the first
    foreground class). Specialised on K = 1..6 (VOC images hold at most 6 classes) and on ``ku``.
    """
    if ku == 0:
        for x in range(w):
            mv[x] = 0
            bv[x] = z
    elif K == 1:
        _max1(a, w, 1, kk[0], z, mv, bv)
    elif K == 2:
        if ku == 1:
            _max1(a, w, 2, kk[0], z, mv, bv)
        else:
            _max2(a, w, 2, kk[0], kk[1], z, mv, bv)
    elif K == 3:
        if ku == 1:
            _max1(a, w, 3, kk[0], z, mv, bv)
        elif ku == 2:
            _max2(a, w, 3, kk[0], kk[1], z, mv, bv)
        else:
            _max3(a, w, 3, kk[0], kk[1], kk[2], z, mv, bv)
    elif K == 4:
        _decode_slots(a, w, 4, ku, kk, z, mv, bv)
    elif K == 5:
        _decode_slots(a, w, 5, ku, kk, z, mv, bv)
    elif K == 6:
        _decode_slots(a, w, 6, ku, kk, z, mv, bv)
    else:
        _decode_slots(a, w, K, ku, kk, z, mv, bv)      # a run-time stride: correct, not vectorised


@njit(**_JIT1)
def _count_codes(h, S, code, N, w):  # pragma: no cover - jitted
    """``h[n * S + code[n, x]] += 1`` for every set n and pixel x < w, 4 (then 2, 1) sets per pixel.

    Interleaving the sets breaks the chains of increments of one bin (a run of equal codes
    waits on each store): measured ~1.6x faster than one set's row after the other.
    """
    n = 0
    while n + 4 <= N:
        h0 = h[n * S:(n + 1) * S]
        h1 = h[(n + 1) * S:(n + 2) * S]
        h2 = h[(n + 2) * S:(n + 3) * S]
        h3 = h[(n + 3) * S:(n + 4) * S]
        c0 = code[n]
        c1 = code[n + 1]
        c2 = code[n + 2]
        c3 = code[n + 3]
        for x in range(w):
            h0[c0[x]] += 1
            h1[c1[x]] += 1
            h2[c2[x]] += 1
            h3[c3[x]] += 1
        n += 4
    if n + 2 <= N:
        h0 = h[n * S:(n + 1) * S]
        h1 = h[(n + 1) * S:(n + 2) * S]
        c0 = code[n]
        c1 = code[n + 1]
        for x in range(w):
            h0[c0[x]] += 1
            h1[c1[x]] += 1
        n += 2
    if n < N:
        h0 = h[n * S:(n + 1) * S]
        c0 = code[n]
        for x in range(w):
            h0[c0[x]] += 1


@njit(**_JIT)
def _sparse_bins_kernel(g, ptrs, kptrs, ks, shapes, lut, B, C, H, W, nchunks):  # pragma: no cover
    """Rows of (image, row) in parallel; per row: the gt once, then per set its decode (vectorised, into
    uint8 max / class rows), the bins, the code ``(min(gt, C), class, bin)``; then every set's codes
    counted, sets interleaved. A gt ``>= C`` counts in a dummy gt row ``C`` (no branch per pixel),
    dropped by the caller: per thread, ``N`` histograms ``(C + 1, C, B)``."""
    N = ptrs.size
    rows = shapes.shape[0] * H
    CB = C * B
    S = (C + 1) * CB
    hist = np.zeros((nchunks, N * S), np.int64)
    z = np.uint8(1 if C > 1 else 0)
    c8 = np.uint8(C)
    uCB = np.uint32(CB)
    uB = np.uint32(B)
    per = (rows + nchunks - 1) // nchunks
    for k in prange(nchunks):
        h = hist[k]
        kk = np.zeros(256, np.uint8)
        mv = np.zeros(W, np.uint8)
        bv = np.zeros(W, np.uint8)
        bn = np.zeros(W, np.uint8)
        tb = np.zeros(W, np.uint32)
        code = np.zeros((N, W), np.uint32)
        for r in range(k * per, min(rows, (k + 1) * per)):
            m = r // H
            if r - m * H >= shapes[m, 0]:
                continue                          # a padding row
            w = shapes[m, 1]                      # the columns after w are padding
            p0 = r * W
            gr = g[p0:p0 + w]
            for x in range(w):
                t = gr[x]
                t = t if t < c8 else c8
                tb[x] = np.uint32(t) * uCB
            for n in range(N):
                K = ks[n]
                ku = _image_slots(kptrs[n], m, K, kk)
                _decode_row(ptrs[n] + p0 * K, w, K, ku, kk, z, mv, bv)
                ln = lut[n * 256:(n + 1) * 256]
                for x in range(w):                # the table lookup on its own: keeps the next loop vector
                    bn[x] = ln[mv[x]]
                cn = code[n]
                for x in range(w):
                    cn[x] = tb[x] + np.uint32(bv[x]) * uB + np.uint32(bn[x])
            _count_codes(h, S, code, N, w)
    return hist


def sparse_score_bins(gt: np.ndarray, cams: Sequence[np.ndarray], keys: Sequence[np.ndarray],
                      num_classes: int, level_bins: np.ndarray,
                      shapes: np.ndarray | None = None) -> np.ndarray:
    """Decode + confusion of N class-sparse uint8 score blocks in one sweep: ``(gt, argmax, score bin)`` counts.

    Each pixel's K stored slots are read once per set: the first of their largest values
    ``m`` (the foreground max; classes without a slot score 0) and its class ``a``, then
    ``(gt, a, level_bins[n, m])`` is counted. With ``level_bins[n]`` the number of a sweep's
    (sorted, distinct) levels below ``m``, the pixel is ``a`` at the sweep's ``u``-th level when
    its bin is ``> u`` and background otherwise (:func:`isle_fast.ensemble.sweep.counts_at_bins`);
    the identity table gives :func:`confusion_score_bins_sparse`'s 256 bins.

    Parameters
    ----------
    gt : uint8 (n, h, w)
        Ground truth of the block; values ``>= num_classes`` (255) are ignored.
    cams : tuple of N uint8 arrays (n, h, w, K_s)
        Slot ``j`` of image ``m`` holds the scores of class ``keys[s][m, j]``.
    keys : tuple of N uint8 arrays (n, K_s)
        Ascending classes in 1..C-1, unused slots (0) last.
    num_classes : int
    level_bins : (N, 256) integers
        The bin of every stored level, per set: non-decreasing, ``level_bins[:, 0] == 0``.
    shapes : (n, 2) integers, optional
        Rows and columns of each image inside the block (the rest is padding and is not read);
        default the whole block.

    Returns
    -------
    ndarray of int64 (N, C, C, B), ``B = level_bins.max() + 1``: ``out[n, t, a, b]`` = pixels of
    gt ``t`` whose foreground argmax in set ``n`` is ``a`` with a max in bin ``b``.
    """
    from .checks import check_classes, check_gt, level_bins_args, sparse_set_args

    what = "sparse_score_bins"
    C = check_classes(num_classes, what)
    gt = np.ascontiguousarray(check_gt(gt, what, True))
    if gt.ndim != 3:
        raise ValueError(f"{what}: gt must be (images, H, W), not shape {tuple(gt.shape)}")
    cams, keys, sh = sparse_set_args(gt.shape, cams, keys, shapes, C, what)
    lut, B = level_bins_args(level_bins, len(cams), what)
    n, H, W = (int(v) for v in gt.shape)
    N = len(cams)
    if N == 0 or gt.size == 0:
        return np.zeros((N, C, C, B), np.int64)
    ks = np.array([a.shape[3] for a in cams], np.int64)
    npix = int((sh[:, 0] * sh[:, 1]).sum())
    hist = _call(_sparse_bins_kernel, gt.reshape(-1), _addrs(cams), _addrs(keys), ks, sh, lut.reshape(-1),
                 B, C, H, W, _nchunks(npix * N))
    return np.ascontiguousarray(hist.sum(axis=0).reshape(N, C + 1, C, B)[:, :C])


# ----------------------------------------------------------------------------------------------
# merge of label maps (Algorithm 3)
# ----------------------------------------------------------------------------------------------

def _merge_tables(selection: np.ndarray, priority: np.ndarray, member: np.ndarray, policy: int,
                  C: int) -> tuple[np.ndarray, np.ndarray]:
    """Lookup tables reducing a pixel to the max over sets of a per-set key.

    ``key[n, v]``: 0 = set n abstains (v >= C) or is not a member, 1 = no claim,
    ``2 + r`` = set n claims class v with rank r (the higher rank wins under the policy).
    ``lab[k]``: the merged label for a maximal key k (0 -> 255, 1 -> 0).
    """
    N = member.size
    classes = np.arange(1, C)
    owner = selection[1:]
    if policy == SCORE:   # higher priority wins; ties -> lower class: ranks ascend in (priority, -class)
        order = np.lexsort((-classes, priority[owner, classes]))
    elif policy == ORDER:  # lower set index wins (a set claims one class per pixel)
        order = np.lexsort((-classes, -owner))
    else:
        order = np.arange(C - 1)
    rank = np.empty(C, np.int64)
    rank[classes[order]] = np.arange(C - 1)
    key = np.zeros((N, 256), np.uint8)
    lab = np.zeros(256, np.uint8)
    lab[0] = 255
    lab[1] = 0
    lab[2 + rank[classes]] = classes
    for n in range(N):
        if not member[n]:
            continue
        key[n, :C] = 1
        mine = classes[owner == n]
        key[n, mine] = 2 + rank[mine]
    return key, lab


_MB = 64        # pixels per merge block (8 words); a block that fails the block checks goes word by word


_IGN_TAB = np.array([255, 0, 0, 0, 255, 255], np.uint8)  # [min(claims, 2) * 2 + (some set answers)]


@njit(inline="always", **_JIT1)
def _ignore_label(s):  # pragma: no cover - jitted
    """Branch-free decode of a summed IGNORE code."""
    claims = np.int64((s >> 16) & 0xFF)
    x = _IGN_TAB[min(claims, 2) * 2 + np.int64((s >> 24) > 0)]
    cls = np.uint8(s & 0xFF)
    return cls if claims == 1 else x


def _ignore_codes(key: np.ndarray) -> np.ndarray:
    """Per-set uint32 codes whose sum over sets decides policy IGNORE.

    bits 0-15: the claimed class (exact when one set claims), bits 16-23: number
    of claims, bits 24-31: number of sets that do not abstain (N <= 255).
    """
    N = key.shape[0]
    v = np.arange(256)
    codes = np.zeros((N, 256), np.uint32)
    codes[key >= 1] += np.uint32(1 << 24)
    claim = key >= 2
    codes[claim] += np.uint32(1 << 16) + np.broadcast_to(v, key.shape)[claim].astype(np.uint32)
    return codes.ravel()


@njit(inline="always", **_JIT1)
def _span_unclean(ptrs, p, nwords, fast):  # pragma: no cover - jitted
    """Nonzero unless the ``nwords`` words from byte ``p`` are equal in every set and each word is
    all < C or all 255 (SWAR over whole words, branch-free)."""
    a0 = ptrs[0]
    x = np.int64(0)
    for i in range(nwords):
        w = _ldb(a0, p + 8 * i, _I64)
        x |= (((w + fast) | w) & _HIGHS) & -np.int64(w != -1)
    for n in range(1, ptrs.size):
        a = ptrs[n]
        for i in range(nwords):
            x |= _ldb(a, p + 8 * i, _I64) ^ _ldb(a0, p + 8 * i, _I64)
    return x


@njit(inline="always", **_JIT1)
def _span_changed(ptrs, p, nwords, d):  # pragma: no cover - jitted
    """Nonzero unless the ``nwords`` words from byte ``p`` of every set equal those ``d`` bytes before."""
    x = np.int64(0)
    for n in range(ptrs.size):
        a = ptrs[n]
        for i in range(nwords):
            x |= _ldb(a, p + 8 * i, _I64) ^ _ldb(a, p + 8 * i - d, _I64)
    return x


@njit(inline="always", **_JIT1)
def _merge_pixel(ptrs, p, kf, lab, ki, ignore):  # pragma: no cover - jitted
    """The merged label of pixel p, through the lookup tables."""
    if ignore:
        ss = np.uint32(0)
        for n in range(ptrs.size):
            ss += ki[n * 256 + _ld(ptrs[n], p, _U8)]
        return _ignore_label(ss)
    mm = np.uint8(0)
    for n in range(ptrs.size):
        mm = max(mm, kf[n * 256 + _ld(ptrs[n], p, _U8)])
    return lab[mm]


@njit(inline="always", **_JIT1)
def _key_word(kf, n, w):  # pragma: no cover - jitted
    """Set n's merge keys of the 8 pixels of word ``w`` (one lookup where the word is one label)."""
    b = w & 0xFF
    if w == b * _ONES:
        return np.int64(kf[n * 256 + b]) * _ONES
    r = np.int64(0)
    for j in range(8):
        r |= np.int64(kf[n * 256 + ((w >> (8 * j)) & 0xFF)]) << (8 * j)
    return r


@njit(inline="always", **_JIT1)
def _byte_max(a, b):  # pragma: no cover - jitted
    """Bytewise max of two words whose bytes are all < 128 (SWAR)."""
    ge = (((a | _HIGHS) - b) >> 7) & _ONES      # 1 in the bytes where a >= b
    m = ge * 0xFF
    return (a & m) | (b & ~m)


@njit(inline="always", **_JIT1)
def _merge_word_at(ptrs, p, kf, lab, ki, ignore, swar):  # pragma: no cover - jitted
    """The merged 8 pixels from byte p as one word (pixel j is byte j).

    ``swar`` (keys < 128, not IGNORE): the max of every set's keys word by word, then the labels;
    otherwise pixel by pixel.
    """
    if swar:
        m = _key_word(kf, 0, _ldb(ptrs[0], p, _I64))
        for n in range(1, ptrs.size):
            m = _byte_max(m, _key_word(kf, n, _ldb(ptrs[n], p, _I64)))
        b = m & 0xFF
        if m == b * _ONES:
            return np.int64(lab[b]) * _ONES
        res = np.int64(0)
        for j in range(8):
            res |= np.int64(lab[(m >> (8 * j)) & 0xFF]) << (8 * j)
        return res
    res = np.int64(0)
    for j in range(8):
        res |= np.int64(_merge_pixel(ptrs, p + j, kf, lab, ki, ignore)) << (8 * j)
    return res


@njit(inline="always", **_JIT1)
def _merge_span(ptrs, oaddr, p0, p1, kf, lab, ki, ignore, swar, fast, d):  # pragma: no cover - jitted
    """Merge bytes [p0, p1) of every set into the output at address ``oaddr`` (same offsets).

    64-pixel blocks (8 words) from p0: where every set has the same words, each all < C or all
    255 (``fast >= 0``), the words are copied; where every set repeats the block ``d`` bytes
    before (the row above, for ``d`` = the row length) and that is inside [p0, p1), the output
    there is copied; otherwise word by word: the row-above copy, else the merge of the word. The
    tail bytes after the last full word are merged pixel by pixel.
    """
    nw = (p1 - p0) >> 3
    nb = nw >> 3
    for b in range(nb):
        q = p0 + 64 * b
        if fast >= 0 and _span_unclean(ptrs, q, 8, fast) == 0:
            a0 = ptrs[0]
            for i in range(8):
                _stb(oaddr, q + 8 * i, _ldb(a0, q + 8 * i, _I64))
        elif q - d >= p0 and _span_changed(ptrs, q, 8, d) == 0:
            for i in range(8):
                _stb(oaddr, q + 8 * i, _ldb(oaddr, q + 8 * i - d, _I64))
        else:
            for i in range(8):
                r = q + 8 * i
                if r - d >= p0 and _span_changed(ptrs, r, 1, d) == 0:
                    _stb(oaddr, r, _ldb(oaddr, r - d, _I64))
                else:
                    _stb(oaddr, r, _merge_word_at(ptrs, r, kf, lab, ki, ignore, swar))
    for i in range(nb * 8, nw):               # the words after the last full block
        r = p0 + 8 * i
        if r - d >= p0 and _span_changed(ptrs, r, 1, d) == 0:
            _stb(oaddr, r, _ldb(oaddr, r - d, _I64))
        else:
            _stb(oaddr, r, _merge_word_at(ptrs, r, kf, lab, ki, ignore, swar))
    for p in range(p0 + 8 * nw, p1):          # the tail bytes after the last full word
        _stb(oaddr, p, _merge_pixel(ptrs, p, kf, lab, ki, ignore))


@njit(**_JIT)
def _merge_labels_kernel(ptrs, npix, key, lab, ki, ignore, swar, fast, d, nchunks):  # pragma: no cover
    nb = npix // _MB
    out = np.empty(npix, np.uint8)
    oaddr = out.ctypes.data
    kf = key.ravel()
    per = (nb + nchunks - 1) // nchunks
    for k in prange(nchunks):
        p0 = min(nb, k * per) * _MB
        p1 = npix if k == nchunks - 1 else min(nb, (k + 1) * per) * _MB
        _merge_span(ptrs, oaddr, p0, p1, kf, lab, ki, ignore, swar, fast, d)
    return out


def _fast_add(C: int) -> int:
    """SWAR constant: ``((w + add) | w) & 0x80..80 != 0`` iff some byte of word w is >= C (C <= 128).

    -1 disables the all-sets-agree word copy (C > 128).
    """
    if C > 128:
        return -1
    return int((127 - (C - 1)) * int(_ONES))


def merge_labels(sets: Sequence[np.ndarray], selection: np.ndarray, priority: np.ndarray,
                 policy: int) -> np.ndarray:
    """Algorithm 3 on label maps: class c comes from set ``selection[c]``.

    Parameters
    ----------
    sets : tuple of N uint8 arrays of one shape
    selection : int64 (C,)
        ``selection[c]`` = set chosen for class c (c >= 1); ``selection[0]`` unused.
    priority : float64 (N, C)
        Rank of set n's claim on class c under SCORE (higher wins, ties -> lower class).
    policy : int
        SCORE, ORDER (lowest set index wins) or IGNORE (255 where >= 2 classes claim).

    Returns
    -------
    ndarray of uint8, the shape of ``sets[0]``: the claimed class; 0 where no chosen
    slice claims the pixel; 255 where every set abstains (or IGNORE conflicts).
    """
    sets, C, sel, pol, pri = merge_labels_args(sets, selection, priority, policy, host=True)
    N = len(sets)
    key, lab = _merge_tables(sel, pri, np.ones(N, bool), pol, C)
    shape = tuple(sets[0].shape)
    npix = sets[0].size
    out = _call(_merge_labels_kernel, _addrs(sets), npix, key, lab, _ignore_codes(key), pol == IGNORE,
                _swar_keys(pol, C), _fast_add(C), _repeat_offset(shape), _nchunks(npix))
    return out.reshape(shape)


def _swar_keys(policy: int, C: int) -> bool:
    """Whether the merge takes the max of the sets' keys 8 pixels at a time: keys are ``<= C``, and
    the bytewise max needs them ``< 128``; IGNORE sums per-set codes instead (pixel by pixel)."""
    return policy != IGNORE and C <= 127


def _repeat_offset(shape: tuple) -> int:
    """The byte distance at which the merge looks for repeated input: the row above (the last axis'
    length, times the smallest count that makes it at least one word), or the previous block (64 pixels)
    for a 1-D array."""
    if len(shape) < 2 or not shape[-1]:
        return _MB
    w = int(shape[-1])
    return w * -(-8 // w)


# ----------------------------------------------------------------------------------------------
# merge of label maps counted against the gt (the fused pass of ``isle run``)
# ----------------------------------------------------------------------------------------------

@njit(**_JIT)
def _merge_count_kernel(ptrs, g, gaddr, shapes, H, W, key, lab, ki, ignore, swar, fast, d, C,
                        per_image):  # pragma: no cover - jitted
    # one prange item, as _confusion_images_kernel: the fused pass calls it from one thread per chunk
    k = shapes.shape[0]
    R = (C + 1) * 256
    out = np.empty(k * H * W, np.uint8)
    oaddr = out.ctypes.data
    kf = key.ravel()
    counts = np.zeros((k if per_image else 1, 1, C, C + 1), np.int64)
    rowbase = np.empty(256, np.int64)
    for v in range(256):
        rowbase[v] = min(v, C) * 256
    for t in prange(1):
        h = np.zeros(R, np.int64)
        for m in range(k):
            rows = shapes[m, 0]
            cols = shapes[m, 1]
            base = m * H * W
            end = base + rows * W
            # the image's rows (their right padding too: cheap, all sets 255 there), then its padding 255
            _merge_span(ptrs, oaddr, base, end, kf, lab, ki, ignore, swar, fast, d)
            if cols < W:
                for r in range(rows):
                    out[base + r * W + cols:base + (r + 1) * W] = 255
            out[end:base + H * W] = 255
            # counted while the image's merged rows and gt are still in cache
            if cols == W:
                for b0 in range(base, end, _CB * 8):
                    _count_span(h, 0, rowbase, g, gaddr, oaddr, b0, min(end, b0 + _CB * 8))
            else:
                for r in range(rows):
                    b0 = base + r * W
                    _count_span(h, 0, rowbase, g, gaddr, oaddr, b0, b0 + cols)
            if per_image:
                _fold_into(h, counts[m], 1, C, R)
        if not per_image:
            _fold_into(h, counts[0], 1, C, R)
    return out, counts


def merge_count_images(sets: Sequence[np.ndarray], gt: np.ndarray, shapes: np.ndarray, selection: np.ndarray,
                       priority: np.ndarray, policy: int, per_image: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """:func:`merge_labels` of a chunk of padded images, counted against ``gt`` in the same pass.

    The merged labels are ``merge_labels(sets, ...)`` inside every image's own region
    (``shapes``) and 255 in its padding; the counts are ``confusion_labels_images(gt,
    (labels,), shapes, C, per_image)`` of them. Each image is counted right after it is
    merged, while its rows are in cache, instead of in a second pass over the chunk; the
    padding rows are not merged. On the calling thread (no parallel region), as
    :func:`confusion_labels_images`. CPU only: :mod:`isle_fast.kernels.gpu` has no such kernel
    (:func:`isle_fast.ensemble.merge.merge_chunk_counted` then merges and counts in turn).

    Parameters
    ----------
    sets : tuple of N (k, H, W) uint8 arrays
    gt : (k, H, W) uint8
        Ground truth; values ``>= C`` (255) are ignored.
    shapes : (k, 2) integer array
        ``(rows, cols)`` of every image, ``0 <= rows <= H``, ``0 <= cols <= W``.
    selection, priority, policy
        As :func:`merge_labels`; ``C = selection.size`` classes.
    per_image : bool
        Counts of every image instead of their sum.

    Returns
    -------
    labels : (k, H, W) uint8
    counts : int64 (1, C, C + 1), or (k, 1, C, C + 1) with ``per_image``
        ``counts[.., 0, t, p]``: pixels with ``gt == t`` and merged label ``p`` (column C: 255 and other
        values ``>= C``).
    """
    what = "merge_count_images"
    sets, C, sel, pol, pri = merge_labels_args(sets, selection, priority, policy, host=True)
    gt, sets, _ = confusion_labels_args(gt, sets, C, host=True)
    if gt.ndim != 3:
        raise ValueError(f"{what}: gt must be (images, H, W), not shape {tuple(gt.shape)}")
    k, H, W = (int(v) for v in gt.shape)
    sh = _image_shapes_arg(what, shapes, k, H, W)
    key, lab = _merge_tables(sel, pri, np.ones(len(sets), bool), pol, C)
    out, counts = _merge_count_kernel(_addrs(sets), gt.reshape(-1), _addrs((gt,))[0], sh, H, W, key, lab,
                                      _ignore_codes(key), pol == IGNORE, _swar_keys(pol, C), _fast_add(C),
                                      _repeat_offset((k, H, W)), C, bool(per_image))
    return out.reshape(k, H, W), counts if per_image else counts[0]


# ----------------------------------------------------------------------------------------------
# merge of score stacks
# ----------------------------------------------------------------------------------------------

@njit(**_JIT1)
def _merge_scores_range(pc, sel, policy, use_thr, thr, labels, merged, i0, i1):  # pragma: no cover
    """Pixels [i0, i1): gather the chosen slices (pc[c] = address of set sel[c]), then decode."""
    C = merged.shape[1]
    for i in range(i0, i1):
        base = i * C
        for c in range(C):
            merged[i, c] = _ld(pc[c], base + c, thr)
        if use_thr:
            merged[i, 0] = thr
    for i in range(i0, i1):
        bg = _key(merged[i, 0])
        best = 0
        if policy == SCORE:                      # argmax of the merged row, first index wins
            bestv = bg
            for c in range(1, C):
                v = _key(merged[i, c])
                if v > bestv:
                    bestv = v
                    best = c
            labels[i] = best
        else:
            bestn = 1 << 30
            cnt = 0
            for c in range(1, C):
                if _key(merged[i, c]) > bg:
                    cnt += 1
                    if policy == ORDER:
                        if sel[c] < bestn:
                            bestn = sel[c]
                            best = c
                    elif cnt == 1:
                        best = c
            labels[i] = 255 if (policy == IGNORE and cnt >= 2) else best


@njit(**_JIT)
def _merge_scores_kernel(ptrs, sel, policy, use_thr, thr, labels, merged, nchunks):  # pragma: no cover
    npix, C = merged.shape
    pc = np.empty(C, np.int64)
    for c in range(C):
        pc[c] = ptrs[sel[c]]
    per = (npix + nchunks - 1) // nchunks
    for k in prange(nchunks):
        i1 = min(npix, (k + 1) * per)
        for i0 in range(k * per, i1, 1024):      # blocks that stay in L1 between gather and decode
            _merge_scores_range(pc, sel, policy, use_thr, thr, labels, merged, i0, min(i1, i0 + 1024))


def merge_scores(sets: Sequence[np.ndarray], selection: np.ndarray, policy: int,
                 bg_threshold: float = -1.0) -> tuple[np.ndarray, np.ndarray]:
    """Algorithm 3 on score stacks: slice c of the result is slice c of set ``selection[c]``.

    Parameters
    ----------
    sets : tuple of N arrays (..., C), all uint8, float16 or float32
    selection : int64 (C,)
        Set chosen for every class, including ``selection[0]`` (the background slice).
    policy : int
        SCORE (argmax of the merged stack), ORDER (lowest ``selection[c]`` among the
        claiming classes, ties lower c) or IGNORE (255 where >= 2 classes claim).
    bg_threshold : float
        If ``>= 0`` the merged background slice is this value (cast to the dtype).

    Returns
    -------
    labels : uint8 array ``sets[0].shape[:-1]``
    merged : array ``sets[0].shape`` in the sets' dtype
    """
    sets, C, sel, pol, _, (use, _, thr) = merge_scores_args(sets, selection, policy, bg_threshold, host=True)
    shape = sets[0].shape
    npix = sets[0].size // C
    merged = np.empty(shape, sets[0].dtype)
    labels = np.empty(shape[:-1], np.uint8)
    _call(_merge_scores_kernel, _addrs(sets), sel, pol, use, thr, labels.reshape(-1),
                         _score_view(merged).reshape(npix, C), _nchunks(npix))
    return labels, merged


@njit(**_JIT)
def _merge_sparse_kernel(ptrs, kptrs, ks, shapes, lev, kf, lab, ki, ignore, C, H, W,
                         nchunks):  # pragma: no cover - jitted
    """Rows in parallel; per row: each set decoded at its level into the running max of its merge key
    (or the sum of its IGNORE codes), then the merged label; the padding stays 255."""
    N = ptrs.size
    rows = shapes.shape[0] * H
    out = np.full(rows * W, 255, np.uint8)
    per = (rows + nchunks - 1) // nchunks
    for k in prange(nchunks):
        kk = np.zeros(256, np.uint8)
        mv = np.empty(W, np.uint8)
        bv = np.empty(W, np.uint8)
        mm = np.empty(W, np.int64)
        for r in range(k * per, min(rows, (k + 1) * per)):
            m = r // H
            if r - m * H >= shapes[m, 0]:
                continue
            w = shapes[m, 1]
            p0 = r * W
            mm[:w] = 0
            for n in range(N):
                K = ks[n]
                ku = _image_slots(kptrs[n], m, K, kk)
                _decode_row(ptrs[n] + p0 * K, w, K, ku, kk, np.uint8(1), mv, bv)
                L = lev[n]
                base = n * 256
                if ignore:
                    for x in range(w):
                        mm[x] += np.int64(ki[base + (bv[x] if mv[x] > L else 0)])
                else:
                    for x in range(w):
                        mm[x] = max(mm[x], np.int64(kf[base + (bv[x] if mv[x] > L else 0)]))
            if ignore:
                for x in range(w):
                    out[p0 + x] = _ignore_label(np.uint32(mm[x]))
            else:
                for x in range(w):
                    out[p0 + x] = lab[mm[x]]
    return out


def merge_sparse_labels(cams: Sequence[np.ndarray], keys: Sequence[np.ndarray], levels: Sequence[int],
                        selection: np.ndarray, priority: np.ndarray, policy: int,
                        shapes: np.ndarray | None = None) -> np.ndarray:
    """Algorithm 3 on N class-sparse uint8 score blocks, each decoded at its own level, in one sweep.

    Equal to :func:`merge_labels` of the sets' decoded label maps: set ``n``'s pixel is the
    class of the first of its largest slots when that value is ``> levels[n]`` (the stored
    threshold level, or the store's background level), else background 0.

    Parameters
    ----------
    cams, keys : tuples of N arrays, as :func:`sparse_score_bins`
    levels : (N,) integers in 0..255
    selection : int64 (C,)
        Set chosen for every class (``selection[0]`` unused).
    priority : float64 (N, C)
    policy : int
        SCORE, ORDER or IGNORE (:func:`merge_labels`).
    shapes : (n, 2) integers, optional
        Rows and columns of each image inside the block; the padding is 255 (not read).

    Returns
    -------
    ndarray of uint8 ``cams[0].shape[:3]``.
    """
    from .checks import (
        check_classes,
        check_policy,
        check_priority,
        check_selection,
        levels_args,
        sparse_set_args,
    )

    what = "merge_sparse_labels"
    if not len(cams):
        raise ValueError(f"{what}: no sets")
    shape = tuple(np.asarray(cams[0]).shape[:3])
    C = check_classes(np.asarray(selection).size, what)
    cams, keys, sh = sparse_set_args(shape, cams, keys, shapes, C, what)
    N = len(cams)
    sel = check_selection(selection, C, N, 1, what)
    pol = check_policy(policy, what)
    pri = check_priority(priority, N, C, what)
    lv = levels_args(levels, N, what)
    n, H, W = (int(v) for v in shape)
    if n * H * W == 0:
        return np.full(shape, 255, np.uint8)
    key, lab = _merge_tables(sel, pri, np.ones(N, bool), pol, C)
    ks = np.array([a.shape[3] for a in cams], np.int64)
    npix = int((sh[:, 0] * sh[:, 1]).sum())
    out = _call(_merge_sparse_kernel, _addrs(cams), _addrs(keys), ks, sh, lv, key.reshape(-1), lab,
                _ignore_codes(key), pol == IGNORE, C, H, W, _nchunks(npix * N))
    return out.reshape(shape)


# ----------------------------------------------------------------------------------------------
# every-subset analysis
# ----------------------------------------------------------------------------------------------

@njit(**_JIT1)
def _eval_tuple(vals, s, key, lab, ignore):  # pragma: no cover - jitted
    """Merged label of subset s for the (remapped, <= C) set labels ``vals``."""
    m = 0
    cnt = 0
    for n in range(vals.size):
        kk = key[s, n, vals[n]]
        m = max(m, kk)
        cnt += kk >= 2
    return 255 if (ignore and cnt >= 2) else lab[s, m]


@njit(**_JIT1)
def _flush(keys, cnts, used, nused, out, key, lab, ignore, C, bits, N):  # pragma: no cover
    """Evaluate every subset on the distinct tuples in the table, add their counts, clear it."""
    S = key.shape[0]
    mask = (1 << bits) - 1
    vals = np.empty(N, np.int64)
    for u in range(nused):
        slot = used[u]
        kk = keys[slot]
        c = cnts[slot]
        keys[slot] = _EMPTY
        cnts[slot] = 0
        t = kk & mask
        for n in range(N):
            vals[n] = (kk >> (bits * (n + 1))) & mask
        for s in range(S):
            lv = _eval_tuple(vals, s, key, lab, ignore)
            out[s, t, min(lv, C)] += c


@njit(**_JIT)
def _subset_labels_hash_kernel(g, ptrs, key, lab, ignore, C, bits, nchunks):  # pragma: no cover
    N = ptrs.size
    S = key.shape[0]
    npix = g.size
    out = np.zeros((nchunks, S, C, C + 1), np.int64)
    remap = np.empty(256, np.int64)
    for v in range(256):
        remap[v] = min(v, C)
    per = (npix + nchunks - 1) // nchunks
    logcap = 12
    cap = 1 << logcap
    for k in prange(nchunks):
        keys = np.full(cap, _EMPTY, np.int64)
        cnts = np.zeros(cap, np.int64)
        used = np.empty(cap // 2, np.int64)
        nused = 0
        prev = _EMPTY
        run = 0
        end = min(npix, (k + 1) * per)
        for i in range(k * per, end + 1):
            if i < end:
                t = g[i]
                if t >= C:
                    continue
                kk = np.int64(t)
                for n in range(N):
                    kk |= remap[_ld(ptrs[n], i, _U8)] << (bits * (n + 1))
                if kk == prev:
                    run += 1
                    continue
            else:
                kk = _EMPTY
            if run > 0:  # insert the finished run (prev, run)
                h = ((prev * _HASH_MUL) >> (64 - logcap)) & (cap - 1)
                while keys[h] != _EMPTY and keys[h] != prev:
                    h = (h + 1) & (cap - 1)
                if keys[h] == _EMPTY:
                    if nused == cap // 2:   # table half full: evaluate and clear it
                        _flush(keys, cnts, used, nused, out[k], key, lab, ignore, C, bits, N)
                        nused = 0
                        h = ((prev * _HASH_MUL) >> (64 - logcap)) & (cap - 1)
                    keys[h] = prev
                    used[nused] = h
                    nused += 1
                cnts[h] += run
            prev = kk
            run = 1
        _flush(keys, cnts, used, nused, out[k], key, lab, ignore, C, bits, N)
    return out


@njit(**_JIT)
def _subset_labels_direct_kernel(g, ptrs, key, lab, ignore, C, nchunks):  # pragma: no cover
    N = ptrs.size
    S = key.shape[0]
    npix = g.size
    out = np.zeros((nchunks, S, C, C + 1), np.int64)
    per = (npix + nchunks - 1) // nchunks
    for k in prange(nchunks):
        vals = np.empty(N, np.int64)
        for i in range(k * per, min(npix, (k + 1) * per)):
            t = g[i]
            if t >= C:
                continue
            for n in range(N):
                vals[n] = min(_ld(ptrs[n], i, _U8), C)
            for s in range(S):
                out[k, s, t, min(_eval_tuple(vals, s, key, lab, ignore), C)] += 1
    return out


def subset_confusion_labels(gt: np.ndarray, sets: Sequence[np.ndarray], selections: np.ndarray,
                            members: np.ndarray, priority: np.ndarray, policy: int,
                            num_classes: int, *, method: str = "auto") -> np.ndarray:
    """Confusion of the label merge of every subset of sets, in one pass over the data.

    Parameters
    ----------
    gt : uint8 array
    sets : tuple of N uint8 arrays ``gt.shape``
    selections : int64 (S, C)
        Selection of subset s (entries c >= 1 must be member sets; entry 0 unused).
    members : bool (S, N)
        Which sets belong to subset s (at least one each).
    priority : float64 (N, C)
        As in :func:`merge_labels`.
    policy : int
    num_classes : int
    method : {"auto", "hash", "direct"}
        CPU-only extra: "hash" counts distinct (gt, l_1..l_N) tuples and evaluates the
        subsets on them (needs (N + 1) * bits(C) <= 63); "direct" evaluates every subset at
        every pixel; "auto" picks "hash" when it fits. Same result either way.

    Returns
    -------
    ndarray of int64 (S, C, C + 1): ``out[s]`` is the confusion of
    ``merge_labels`` restricted to subset s (merged 255 -> column C).
    """
    gt, sets, C, sels, mem, pol, pri = subset_confusion_labels_args(gt, sets, selections, members, priority,
                                                                    policy, num_classes, host=True)
    N = len(sets)
    if method not in ("auto", "hash", "direct"):
        raise ValueError(f"method must be 'auto', 'hash' or 'direct', got {method!r}")
    S = sels.shape[0]
    key = np.zeros((S, N, 256), np.uint8)
    lab = np.zeros((S, 256), np.uint8)
    for s in range(S):
        key[s], lab[s] = _merge_tables(sels[s], pri, mem[s], pol, C)  # key[s, :, C] = 0: abstains
    g = gt.reshape(-1)
    ptrs = _addrs(sets)
    bits = int(C).bit_length()
    fits = (N + 1) * bits <= 63
    if method == "hash" and not fits:
        raise ValueError(f"method='hash' needs (N + 1) * {bits} <= 63 bits, N = {N}")
    if method != "direct" and fits:
        out = _call(_subset_labels_hash_kernel, g, ptrs, key, lab, pol == IGNORE, C, bits, _nchunks(g.size))
    else:
        out = _call(_subset_labels_direct_kernel, g, ptrs, key, lab, pol == IGNORE, C, _nchunks(g.size))
    return out.sum(axis=0)


@njit(**_JIT1)
def _subset_scores_range(g, ptrs, C, sels, idx, policy, use_thr, thr, i0, i1, out):  # pragma: no cover
    """Pixels [i0, i1): decode the N x C scores once, then the merged label of every subset."""
    N = ptrs.size
    S = sels.shape[0]
    thr_key = np.float64(_key(thr))
    vals = np.empty(N * C, np.float64)
    for i in range(i0, i1):
        t = g[i]
        if t >= C:
            continue
        for n in range(N):
            a = ptrs[n]
            for c in range(C):
                vals[n * C + c] = _key(_ld(a, i * C + c, thr))
        for s in range(S):
            bg = thr_key if use_thr else vals[idx[s, 0]]
            best = 0
            if policy == SCORE:
                bestv = bg
                for c in range(1, C):
                    v = vals[idx[s, c]]
                    if v > bestv:
                        bestv = v
                        best = c
                out[s, t, best] += 1
                continue
            bestn = 1 << 30
            cnt = 0
            for c in range(1, C):
                if vals[idx[s, c]] > bg:
                    cnt += 1
                    if policy == ORDER:
                        if sels[s, c] < bestn:
                            bestn = sels[s, c]
                            best = c
                    elif cnt == 1:
                        best = c
            if policy == IGNORE and cnt >= 2:
                out[s, t, C] += 1
            else:
                out[s, t, best] += 1


@njit(**_JIT)
def _subset_scores_kernel(g, ptrs, C, sels, policy, use_thr, thr, nchunks):  # pragma: no cover
    npix = g.size
    S = sels.shape[0]
    out = np.zeros((nchunks, S, C, C + 1), np.int64)
    idx = np.empty((S, C), np.int64)           # flat index of (set sels[s, c], class c) in a pixel's values
    for s in range(S):
        for c in range(C):
            idx[s, c] = sels[s, c] * C + c
    per = (npix + nchunks - 1) // nchunks
    for k in prange(nchunks):
        _subset_scores_range(g, ptrs, C, sels, idx, policy, use_thr, thr, k * per,
                             min(npix, (k + 1) * per), out[k])
    return out


def subset_confusion_scores(gt: np.ndarray, sets: Sequence[np.ndarray], selections: np.ndarray,
                            members: np.ndarray, policy: int, num_classes: int,
                            bg_threshold: float = -1.0) -> np.ndarray:
    """Confusion of the score merge of every subset of sets, in one pass over the data.

    Parameters
    ----------
    gt : uint8 array
    sets : tuple of N score arrays ``gt.shape + (C,)``
    selections : int64 (S, C)
        Selection of subset s, ``selections[s, 0]`` = its background set (all member sets).
    members : bool (S, N)
    policy : int
    num_classes : int
    bg_threshold : float

    Returns
    -------
    ndarray of int64 (S, C, C + 1): ``out[s]`` = confusion of ``merge_scores`` over subset s
    (IGNORE conflicts, 255, are counted in column C).
    """
    gt, sets, C, sels, _, pol, _, (use, _, thr) = subset_confusion_scores_args(
        gt, sets, selections, members, policy, num_classes, bg_threshold, host=True)
    g = gt.reshape(-1)
    out = _call(_subset_scores_kernel, g, _addrs(sets), C, sels, pol, use, thr, _nchunks(g.size))
    return out.sum(axis=0)


# ----------------------------------------------------------------------------------------------
# joint votes of N label maps (no ground truth): per class, which sets predict it
# ----------------------------------------------------------------------------------------------

@njit(**_JIT)
def _vote_patterns_kernel(ptrs, npix, C, nchunks):  # pragma: no cover - jitted
    N = ptrs.size
    P = 1 << N
    hist = np.zeros((nchunks, C, P), np.int64)
    voting = np.zeros(nchunks, np.int64)
    per = (npix + nchunks - 1) // nchunks
    for k in prange(nchunks):
        h = hist[k]
        mask = np.zeros(C, np.int64)
        touched = np.empty(N, np.int64)
        cnt = 0
        for j in range(k * per, min(npix, (k + 1) * per)):
            nt = 0
            for n in range(N):
                lab = np.int64(_ld(ptrs[n], j, _U8))
                if lab < C:
                    if mask[lab] == 0:
                        touched[nt] = lab
                        nt += 1
                    mask[lab] |= np.int64(1) << n
            if nt > 0:
                cnt += 1
                for t in range(nt):
                    lab = touched[t]
                    h[lab, mask[lab]] += 1
                    mask[lab] = 0
        voting[k] = cnt
    out = hist.sum(axis=0)
    total = voting.sum()
    for c in range(C):
        out[c, 0] = total - out[c, 1:].sum()
    return out


def vote_patterns(sets: Sequence[np.ndarray], num_classes: int) -> np.ndarray:
    """Joint votes of N label maps: per class, how many pixels each subset of the sets predicts it.

    Parameters
    ----------
    sets : tuple of N ndarrays of uint8, one shape (N <= 12)
        Label maps; values ``>= num_classes`` (255) are abstentions (no vote).
    num_classes : int
        C, background included.

    Returns
    -------
    ndarray of int64, shape (C, 2**N)
        ``out[c, m]``: pixels where exactly the sets in bit mask ``m`` (bit
        ``n`` = set ``n``) predict class ``c``, over the pixels where at least
        one set votes (a pixel every set abstains on, such as padding, is not
        counted). ``out[c].sum()`` is the same for every class: those pixels.
    """
    sets, C = vote_patterns_args(sets, num_classes, host=True)
    npix = int(sets[0].size)
    return _call(_vote_patterns_kernel, _addrs(sets), npix, C, _nchunks(npix))


# ----------------------------------------------------------------------------------------------
# joint votes by their distance to where every set agrees (one image)
# ----------------------------------------------------------------------------------------------

@njit(**_JIT1)
def _vote_context_kernel(labs, gt, C, radii):  # pragma: no cover - jitted
    N, H, W = labs.shape
    P = 1 << N
    B = radii.size + 1
    far = radii[radii.size - 1] + 1  # every distance beyond the last radius is the same bin
    has_gt = gt.shape[0] > 0
    out = np.zeros((B, C, P, 3), np.int64)
    voted = np.zeros(C, np.bool_)
    voting = np.zeros((H, W), np.bool_)
    gt_hist = np.zeros((C + 1, 2), np.int64)  # over the voting pixels: gt == c (rows < C), ignore (row C)
    for y in range(H):
        for x in range(W):
            for n in range(N):
                lab = labs[n, y, x]
                if lab < C:
                    voted[lab] = True
                    voting[y, x] = True
            if voting[y, x] and has_gt:
                g = gt[y, x]
                gt_hist[min(np.int64(g), C), 0] += 1
    n_voting = np.int64(voting.sum())
    dist = np.empty((H, W), np.int64)
    for c in range(C):
        if not voted[c]:  # no set votes c in the image: pattern 0, no agreement anywhere (the last bin)
            out[B - 1, c, 0, 0] = n_voting
            if has_gt:
                out[B - 1, c, 0, 1] = gt_hist[c, 0]
                out[B - 1, c, 0, 2] = gt_hist[C, 0]
            continue
        # chessboard distance to the nearest pixel every set votes c on (two raster passes; exact), capped
        for y in range(H):
            for x in range(W):
                every = True
                for n in range(N):
                    if labs[n, y, x] != c:
                        every = False
                        break
                dist[y, x] = 0 if every else far
        for y in range(H):
            for x in range(W):
                d = dist[y, x]
                if x > 0 and dist[y, x - 1] + 1 < d:
                    d = dist[y, x - 1] + 1
                if y > 0:
                    for dx in range(-1, 2):
                        if 0 <= x + dx < W and dist[y - 1, x + dx] + 1 < d:
                            d = dist[y - 1, x + dx] + 1
                dist[y, x] = d
        for y in range(H - 1, -1, -1):
            for x in range(W - 1, -1, -1):
                d = dist[y, x]
                if x < W - 1 and dist[y, x + 1] + 1 < d:
                    d = dist[y, x + 1] + 1
                if y < H - 1:
                    for dx in range(-1, 2):
                        if 0 <= x + dx < W and dist[y + 1, x + dx] + 1 < d:
                            d = dist[y + 1, x + dx] + 1
                dist[y, x] = d
        for y in range(H):
            for x in range(W):
                if not voting[y, x]:
                    continue
                m = 0
                for n in range(N):
                    if labs[n, y, x] == c:
                        m |= 1 << n
                d = dist[y, x]
                b = B - 1
                for j in range(radii.size):
                    if d <= radii[j]:
                        b = j
                        break
                out[b, c, m, 0] += 1
                if has_gt:
                    g = gt[y, x]
                    if g == c:
                        out[b, c, m, 1] += 1
                    elif g >= C:
                        out[b, c, m, 2] += 1
    return out


def vote_context(sets: Sequence[np.ndarray], num_classes: int, radii: Sequence[int],
                 gt: np.ndarray | None = None) -> np.ndarray:
    """Joint votes of N label maps of one image, by their distance to where every set agrees.

    The :func:`vote_patterns` strata of every class ``c`` split by how far each
    pixel lies from the nearest pixel where every set predicts ``c``
    (chessboard distance, in pixels): bin ``j`` holds the pixels within
    ``radii[j]`` (and not within ``radii[j - 1]``), the last bin the pixels
    farther than every radius, and every pixel of a class no pixel of the image
    has every set agree on. With a gt, the pixels of each stratum that are
    truly ``c`` and that are ignored (gt ``>= C``) are counted too.

    Parameters
    ----------
    sets : tuple of N 2-D uint8 arrays, one shape (N <= 12)
        Label maps of one image; values ``>= num_classes`` (255) are abstentions.
    num_classes : int
        C, background included.
    radii : sequence of int
        Increasing distances ``>= 0`` (pixels), the bins' upper bounds.
    gt : 2-D uint8 array, optional
        Ground truth of the image (values ``>= num_classes`` ignored).

    Returns
    -------
    ndarray of int64, shape (len(radii) + 1, C, 2**N, 3)
        ``out[b, c, m, 0]``: pixels in bin ``b`` where exactly the sets in bit
        mask ``m`` predict ``c`` (over the pixels where some set votes, as
        :func:`vote_patterns` counts them: summed over ``b`` it is
        ``vote_patterns``); ``[..., 1]``: of those, gt ``c``; ``[..., 2]``: gt
        ignored (both 0 without ``gt``).
    """
    labs, g, C, r = vote_context_args(sets, gt, num_classes, radii)
    return _vote_context_kernel(labs, g, C, r)
