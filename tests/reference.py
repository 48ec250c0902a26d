"""Plain NumPy references of the kernel API (:mod:`isle_fast.kernels.cpu`) and of the class scores.

These are written to be obviously correct, not fast: every backend
(:mod:`isle_fast.kernels.cpu`, :mod:`isle_fast.kernels.gpu`) is compared
against them on random inputs, and the counts must be EQUAL.

Conventions (identical in every backend)
-----------------------------------------
* ``C = num_classes``, background is class 0, 255 is ignore / abstain / padding.
* Any gt value ``>= C`` is ignored; any set label ``>= C`` is an abstention
  (counted in column ``C`` of the confusion matrix).
* Score decode is ``argmax`` over the last axis, the first index wins ties.
* ``bg_threshold >= 0`` replaces the background slice by the threshold *as it
  would be stored in the scores' dtype* (see :func:`threshold_value`): for
  ``uint8`` scores the threshold is clipped to [0, 255] and truncated (which
  compares exactly like the real-valued threshold against integer scores); for
  ``float16`` / ``float32`` it is rounded to the nearest representable value.
  This makes ``decode_scores(merged)`` of a thresholded :func:`merge_scores`
  equal its labels.
* NaN scores are not supported (undefined result).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

SCORE, ORDER, IGNORE = 0, 1, 2

__all__ = [
    "SCORE", "ORDER", "IGNORE", "threshold_value",
    "confusion_labels", "confusion_scores", "decode_scores", "confusion_score_bins", "confusion_score_sweep",
    "densify_sparse",
    "merge_labels", "merge_scores",
    "subset_confusion_labels", "subset_confusion_scores", "class_scores",
    "quantize_scores_u8", "keep_argmax_float", "irn_decode", "voc_palette",
]


def threshold_value(bg_threshold: float, dtype: np.dtype) -> np.generic:
    """The background threshold as a value of the scores' dtype."""
    dtype = np.dtype(dtype)
    if dtype == np.uint8:
        return np.uint8(np.floor(np.clip(float(bg_threshold), 0.0, 255.0)))
    with np.errstate(over="ignore"):  # a threshold above float16's range is +inf, on purpose
        return dtype.type(bg_threshold)


def confusion_labels(gt: np.ndarray, sets: Sequence[np.ndarray], num_classes: int) -> np.ndarray:
    """``out[n, t, p]`` = #pixels with ``gt == t`` (< C) and ``sets[n] == p``; p >= C -> column C."""
    C = int(num_classes)
    g = np.asarray(gt).ravel().astype(np.int64)
    valid = g < C
    out = np.zeros((len(sets), C, C + 1), np.int64)
    for n, s in enumerate(sets):
        assert s.shape == gt.shape
        p = np.asarray(s).ravel().astype(np.int64)
        p = np.where(p < C, p, C)
        out[n] = np.bincount(g[valid] * (C + 1) + p[valid], minlength=C * (C + 1)).reshape(C, C + 1)
    return out


def decode_scores(scores: np.ndarray, bg_threshold: float = -1.0) -> np.ndarray:
    """argmax over the last axis (first index wins ties), background replaced by the threshold."""
    s = np.asarray(scores)
    if bg_threshold >= 0:
        s = s.copy()
        s[..., 0] = threshold_value(bg_threshold, s.dtype)
    return np.argmax(s, axis=-1).astype(np.uint8)


def confusion_scores(gt: np.ndarray, sets: Sequence[np.ndarray], num_classes: int,
                     bg_threshold: float = -1.0) -> np.ndarray:
    """Confusion of the decoded score sets (column C stays 0)."""
    for s in sets:
        assert s.shape == gt.shape + (num_classes,)
    return confusion_labels(gt, [decode_scores(s, bg_threshold) for s in sets], num_classes)


def confusion_score_bins(gt: np.ndarray, sets: Sequence[np.ndarray], num_classes: int) -> np.ndarray:
    """``out[n, t, a, m]``: pixels of gt ``t`` (< C) whose foreground argmax (first max of slices
    1..C-1) in set n is ``a`` with value ``m`` (uint8 sets; C == 1: every pixel at a = 0, m = 0)."""
    C = int(num_classes)
    g = np.asarray(gt).ravel().astype(np.int64)
    valid = g < C
    out = np.zeros((len(sets), C, C, 256), np.int64)
    for n, s in enumerate(sets):
        assert s.dtype == np.uint8 and s.shape == gt.shape + (C,)
        flat = s.reshape(-1, C).astype(np.int64)
        if C > 1:
            a = 1 + np.argmax(flat[:, 1:], axis=1)
            m = flat[np.arange(flat.shape[0]), a]
        else:
            a = np.zeros(flat.shape[0], np.int64)
            m = np.zeros(flat.shape[0], np.int64)
        np.add.at(out[n], (g[valid], a[valid], m[valid]), 1)
    return out


def densify_sparse(cams: np.ndarray, keys: np.ndarray, num_classes: int, background: int = 0) -> np.ndarray:
    """The dense ``(n, h, w, C)`` stack of class-sparse slots: class ``keys[m, j]`` is slot j, others 0."""
    n, h, w, k = cams.shape
    out = np.zeros((n, h, w, num_classes), np.uint8)
    out[..., 0] = background
    for m in range(n):
        for j in range(k):
            if keys[m, j]:
                out[m, :, :, keys[m, j]] = cams[m, :, :, j]
    return out


def confusion_score_sweep(gt: np.ndarray, sets: Sequence[np.ndarray], num_classes: int,
                          thresholds: Sequence[float]) -> np.ndarray:
    """``(N, T, C, C + 1)``: :func:`confusion_scores` once per threshold (the public scripts' approach)."""
    return np.stack([confusion_scores(gt, sets, num_classes, float(t)) for t in thresholds], axis=1)


def merge_labels(sets: Sequence[np.ndarray], selection: np.ndarray, priority: np.ndarray,
                 policy: int) -> np.ndarray:
    """Algorithm 3 on label maps (one claim per chosen (set, class) slice)."""
    C = len(selection)
    shape = sets[0].shape
    best = np.zeros(shape, np.int64)              # winning class so far (0 = none yet)
    have = np.zeros(shape, bool)                  # some claim seen
    count = np.zeros(shape, np.int64)             # number of claims
    best_key = np.zeros(shape, np.float64)        # priority (SCORE) or set index (ORDER) of `best`
    for l in range(1, C):                         # ascending class index -> ties keep the lower class
        n = int(selection[l])
        claim = sets[n] == l
        count += claim
        if policy == SCORE:
            key = float(priority[n, l])
            better = claim & (~have | (key > best_key))
        elif policy == ORDER:
            key = float(n)
            better = claim & (~have | (key < best_key))
        else:
            key = 0.0
            better = claim & ~have
        best = np.where(better, l, best)
        best_key = np.where(better, key, best_key)
        have |= claim
    all_abstain = np.ones(shape, bool)
    for s in sets:
        all_abstain &= s >= C
    out = np.where(all_abstain, 255, 0)
    out = np.where(have, best, out)
    if policy == IGNORE:
        out = np.where(count >= 2, 255, out)
    return out.astype(np.uint8)


def merge_scores(sets: Sequence[np.ndarray], selection: np.ndarray, policy: int,
                 bg_threshold: float = -1.0) -> tuple[np.ndarray, np.ndarray]:
    """Algorithm 3 on score stacks: copy slice c from set selection[c]; decode by policy."""
    C = sets[0].shape[-1]
    assert len(selection) == C
    merged = np.empty(sets[0].shape, sets[0].dtype)
    for c in range(C):
        merged[..., c] = sets[int(selection[c])][..., c]
    if bg_threshold >= 0:
        merged[..., 0] = threshold_value(bg_threshold, merged.dtype)
    shape = merged.shape[:-1]
    bg = merged[..., 0]
    best = np.zeros(shape, np.int64)
    have = np.zeros(shape, bool)
    count = np.zeros(shape, np.int64)
    for c in range(1, C):
        claim = merged[..., c] > bg
        count += claim
        if policy == SCORE:
            better = claim & (~have | (merged[..., c] > _take(merged, best)))
        elif policy == ORDER:
            better = claim & (~have | (int(selection[c]) < np.asarray(selection)[best]))
        else:
            better = claim & ~have
        best = np.where(better, c, best)
        have |= claim
    labels = best
    if policy == IGNORE:
        labels = np.where(count >= 2, 255, labels)
    return labels.astype(np.uint8), merged


def _take(merged: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """merged[..., idx] per pixel."""
    return np.take_along_axis(merged, idx[..., None], axis=-1)[..., 0]


def _subset_args(sets, selections, members, s, first=1):
    idx = np.flatnonzero(np.asarray(members[s]).astype(bool))
    assert idx.size >= 1, "empty subset"
    local = {int(g): i for i, g in enumerate(idx)}
    sel = np.array([local.get(int(v), 0) for v in selections[s]], np.int64)
    for c in range(first, len(sel)):
        assert int(selections[s][c]) in local, "selection points outside the subset"
    return idx, sel


def subset_confusion_labels(gt: np.ndarray, sets: Sequence[np.ndarray], selections: np.ndarray,
                            members: np.ndarray, priority: np.ndarray, policy: int,
                            num_classes: int) -> np.ndarray:
    """Confusion of merge_labels over member sets of every subset s -> (S, C, C+1)."""
    S = len(selections)
    out = np.zeros((S, num_classes, num_classes + 1), np.int64)
    for s in range(S):
        idx, sel = _subset_args(sets, selections, members, s)
        merged = merge_labels([sets[i] for i in idx], sel, np.asarray(priority)[idx], policy)
        out[s] = confusion_labels(gt, [merged], num_classes)[0]
    return out


def subset_confusion_scores(gt: np.ndarray, sets: Sequence[np.ndarray], selections: np.ndarray,
                            members: np.ndarray, policy: int, num_classes: int,
                            bg_threshold: float = -1.0) -> np.ndarray:
    """Confusion of merge_scores over member sets of every subset s -> (S, C, C+1)."""
    S = len(selections)
    out = np.zeros((S, num_classes, num_classes + 1), np.int64)
    for s in range(S):
        idx, sel = _subset_args(sets, selections, members, s, first=0)
        labels, _ = merge_scores([sets[i] for i in idx], sel, policy, bg_threshold)
        out[s] = confusion_labels(gt, [labels], num_classes)[0]
    return out


# ----------------------------------------------------------------------------------------------
# Score stores (kernels/store_cpu.py) and the public CAM evaluation's decode
# ----------------------------------------------------------------------------------------------
def quantize_scores_u8(scores: np.ndarray) -> np.ndarray:
    """``round(255 * clip(s, 0, 1))`` (product in the scores' float type), then, pixel by pixel, where
    the argmax changed: the float winner + 1, or at 255 the lower classes at 255 -> 254."""
    s = np.asarray(scores)
    if s.dtype.kind != "f" or s.dtype.itemsize < 4:
        s = s.astype(np.float32)
    f = np.clip(s, 0, 1)
    q = np.rint(f * s.dtype.type(255)).astype(np.uint8)
    c = s.shape[-1]
    fq, ff = q.reshape(-1, c), f.reshape(-1, c)
    for i in range(len(fq)):
        win = int(np.argmax(ff[i]))
        if int(np.argmax(fq[i])) != win:
            if fq[i, win] < 255:
                fq[i, win] += 1
            else:
                low = fq[i, :win]
                low[low == 255] = 254
    return q


def irn_decode(cams: np.ndarray, keys: np.ndarray, threshold: float) -> np.ndarray:
    """IRN's evaluation of one CAM file (``step/eval_cam.py``): pad the threshold in front of the K
    foreground CAMs (same dtype), argmax (first index wins ties), map through ``pad(keys + 1)``."""
    padded = np.pad(cams, ((1, 0), (0, 0), (0, 0)), mode="constant", constant_values=threshold)
    return np.pad(np.asarray(keys) + 1, (1, 0), mode="constant")[np.argmax(padded, axis=0)]


def keep_argmax_float(scores: np.ndarray, dtype) -> np.ndarray:
    """``clip(s, 0, 1)`` cast to float16 / float32 (``-0`` -> ``+0``), then, pixel by pixel, where the argmax
    changed: the float winner one representable step up, or at 1.0 the lower classes at 1.0 one step down."""
    s = np.asarray(scores)
    f = np.clip(s, 0, 1)
    q = f.astype(dtype) + np.zeros((), dtype)  # + 0 turns -0 into +0
    c = s.shape[-1]
    fq, ff = q.reshape(-1, c), f.reshape(-1, c)
    one = np.asarray(1.0, dtype)
    for i in range(len(fq)):
        win = int(np.argmax(ff[i]))
        if int(np.argmax(fq[i])) != win:
            if fq[i, win] < one:
                fq[i, win] = np.nextafter(fq[i, win], np.asarray(2.0, dtype))
            else:
                low = fq[i, :win]
                low[low == one] = np.nextafter(one, np.asarray(0.0, dtype))
    return q
def class_scores(gt: np.ndarray, pred: np.ndarray, num_classes: int) -> dict[str, list[float]]:
    """Per-class IoU, precision and recall (percent) of one label map, from per-class pixel masks.

    Pixels whose gt is ``>= C`` are ignored; a prediction ``>= C`` claims no class (it is a
    miss of the gt class). A score whose denominator is empty is NaN; ``miou`` is the plain
    mean of the defined IoUs (NaN when none is).
    """
    C = int(num_classes)
    valid = np.asarray(gt) < C
    g, p = np.asarray(gt)[valid], np.asarray(pred)[valid]
    out: dict[str, list[float]] = {"iou": [], "precision": [], "recall": []}
    for c in range(C):
        inter = int(np.sum((g == c) & (p == c)))
        union = int(np.sum((g == c) | (p == c)))
        predicted, present = int(np.sum(p == c)), int(np.sum(g == c))
        out["iou"].append(100.0 * inter / union if union else float("nan"))
        out["precision"].append(100.0 * inter / predicted if predicted else float("nan"))
        out["recall"].append(100.0 * inter / present if present else float("nan"))
    defined = [v for v in out["iou"] if v == v]
    out["miou"] = [sum(defined) / len(defined) if defined else float("nan")]
    return out


def voc_palette() -> np.ndarray:
    """The PASCAL VOC colour map, ``(256, 3)`` uint8, written the slow, obvious way (the devkit's bit
    interleaving, as the benchmarks' reference of the public code writes it:
    :func:`benchmarks.common.voc_palette`)."""
    from benchmarks.common import voc_palette as flat

    return np.asarray(flat(), dtype=np.uint8).reshape(256, 3)
