"""Scores from confusion counts: the one definition of IoU, precision, recall and mIoU.

Every score the project reports comes from here: :func:`isle_fast.evaluate`
(step 2), the subset analysis, the report, the training validation
(:func:`isle_fast.training.train.evaluate_model`) and the demo.

Conventions
-----------
* ``counts[..., t, p]``: pixels of gt class ``t`` predicted ``p``; shape
  ``(..., C, C+1)``, the last column counts abstentions (a prediction of 255).
  Pixels whose gt is 255 (ignore, padding) are never counted.
* true positives ``tp = counts[t, t]``; false positives ``fp``: pixels
  predicted ``c`` whose gt is another class; false negatives ``fn``: gt pixels
  of ``c`` predicted as something else or abstained.
* IoU of class ``c``: ``tp / (tp + fp + fn)``, in percent. A class absent from
  both the gt and the prediction has an empty union: its IoU is undefined,
  NaN (JSON ``null``), never 0.
* mIoU: the mean over the classes whose IoU is defined (NaN classes are
  skipped, the usual ``nanmean`` and the VOC convention); NaN when no class
  is defined.
* precision ``tp / (tp + fp)``, recall ``tp / (tp + fn)``, percent; NaN where
  the denominator is 0.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "AveragedIoU",
    "ratio",
    "nanmean",
    "true_positives",
    "false_positives",
    "false_negatives",
    "iou",
    "miou",
    "precision",
    "recall",
    "intersection_union",
    "iou_from_stats",
    "bootstrap_weights",
    "ImageCounts",
    "bootstrap_batches",
    "bootstrap_sums",
    "bootstrap_miou_diff",
    "jsonable",
]


def ratio(num: Any, den: Any) -> np.ndarray:
    """``num / den`` as float64, NaN where ``den`` is 0 (no warning)."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def nanmean(x: Any, axis: int = -1) -> np.ndarray:
    """Mean over ``axis`` of the values that are not NaN; NaN where there are none (no warning)."""
    x = np.asarray(x, dtype=np.float64)
    ok = ~np.isnan(x)
    n = ok.sum(axis=axis)
    s = np.where(ok, x, 0.0).sum(axis=axis)
    return np.where(n > 0, s / np.maximum(n, 1), np.nan)


def _square(counts: Any) -> tuple[np.ndarray, int]:
    counts = np.asarray(counts)
    if counts.ndim < 2 or counts.shape[-1] != counts.shape[-2] + 1:
        raise ValueError(f"confusion counts must have shape (..., C, C+1), not {counts.shape}")
    return counts, counts.shape[-2]


def true_positives(counts: Any) -> np.ndarray:
    """``(..., C)`` pixels of class ``c`` predicted ``c``."""
    counts, c = _square(counts)
    return np.diagonal(counts[..., :c], axis1=-2, axis2=-1).copy()


def false_positives(counts: Any) -> np.ndarray:
    """``(..., C)`` pixels predicted ``c`` whose gt is another (not ignored) class."""
    counts, c = _square(counts)
    return counts[..., :c].sum(axis=-2) - true_positives(counts)


def false_negatives(counts: Any) -> np.ndarray:
    """``(..., C)`` gt pixels of ``c`` predicted as another class or abstained."""
    counts, _ = _square(counts)
    return counts.sum(axis=-1) - true_positives(counts)


def iou(counts: Any) -> np.ndarray:
    """``(..., C)`` IoU in percent from confusion counts; NaN where the union is empty.

    Parameters
    ----------
    counts : array_like of int, shape (..., C, C+1)
        Confusion counts (rows: gt class, columns: prediction, last: abstained).

    Returns
    -------
    ndarray of float64, shape (..., C)

    Examples
    --------
    >>> iou([[5, 1, 0, 0], [2, 3, 0, 1], [0, 0, 0, 0]]).round(1).tolist()
    [62.5, 42.9, nan]
    """
    tp = true_positives(counts)
    return 100.0 * ratio(tp, tp + false_positives(counts) + false_negatives(counts))


def miou(iou_values: Any) -> np.ndarray:
    """Mean IoU over the last axis, skipping undefined (NaN) classes; NaN where none is defined.

    Examples
    --------
    >>> float(miou([62.5, 40.0, float("nan")]))
    51.25
    """
    return nanmean(iou_values, axis=-1)


def precision(counts: Any) -> np.ndarray:
    """``(..., C)`` percent: ``tp / (tp + fp)``; NaN for a class never predicted."""
    tp = true_positives(counts)
    return 100.0 * ratio(tp, tp + false_positives(counts))


def recall(counts: Any) -> np.ndarray:
    """``(..., C)`` percent: ``tp / (tp + fn)`` (abstentions are misses); NaN for a class not in the gt."""
    tp = true_positives(counts)
    return 100.0 * ratio(tp, tp + false_negatives(counts))


def intersection_union(counts: Any) -> np.ndarray:
    """``(..., C, 2)`` int64: the intersection (``tp``) and the union (``tp + fp + fn``) of every class."""
    tp = true_positives(counts)
    return np.stack([tp, tp + false_positives(counts) + false_negatives(counts)], axis=-1)


def iou_from_stats(stats: Any) -> np.ndarray:
    """IoU in percent from ``(..., 2)`` intersection / union pairs; NaN where the union is 0."""
    stats = np.asarray(stats)
    return 100.0 * ratio(stats[..., 0], stats[..., 1])


def bootstrap_weights(num_images: int, reps: int, seed: int) -> np.ndarray:
    """``(reps, I)`` int64: how often each image is drawn in each resample (with replacement).

    The one resampling of the project (deterministic for a ``seed``): row ``b``
    is a multinomial draw of ``I`` images, uniform over the images.
    """
    rng = np.random.default_rng(seed)
    n = max(1, int(num_images))
    return rng.multinomial(int(num_images), np.full(n, 1.0 / n), size=int(reps)).astype(np.int64)


@dataclass(frozen=True)
class ImageCounts:
    """Per-image counts held sparse: the non-zero entries of an ``(I,) + shape`` int64 count array.

    The labelled images' vote strata are ``2**N`` patterns wide per class and
    image (``(2, C, 2**N, 3)``, five times that with the distance bins), but an
    image holds a few classes and patterns: at N = 12 sets and 21 classes one
    synthetic image had about 600 non-zero entries of 2 million. Dense, 1,000
    labelled images would take 19 GiB; held here, a few MiB.

    Attributes
    ----------
    shape : tuple of int
        One image's shape.
    num_images : int
    image, index, value : (E,) int64
        Every non-zero entry: its image (non-decreasing), its flat index in ``shape``
        (increasing within an image) and its count.
    """

    shape: tuple[int, ...]
    num_images: int
    image: np.ndarray
    index: np.ndarray
    value: np.ndarray

    @classmethod
    def from_dense(cls, counts: Any) -> "ImageCounts":
        """The non-zero entries of ``(I,) + shape`` counts."""
        a = np.asarray(counts)
        if a.ndim < 1:
            raise ValueError(f"per-image counts need an image axis, not shape {a.shape}")
        flat = a.reshape(a.shape[0], int(np.prod(a.shape[1:], dtype=np.int64)))
        image, index = np.nonzero(flat)
        return cls(tuple(int(v) for v in a.shape[1:]), int(a.shape[0]), image.astype(np.int64),
                   index.astype(np.int64), flat[image, index].astype(np.int64))

    @classmethod
    def stack(cls, parts: Sequence["ImageCounts"], shape: Sequence[int] | None = None) -> "ImageCounts":
        """The images of ``parts``, one after the other (``shape``: of no part at all)."""
        if not parts:
            if shape is None:
                raise ValueError("stacking no per-image counts needs their shape")
            return cls(tuple(shape), 0, *(np.zeros(0, np.int64) for _ in range(3)))
        one = parts[0].shape
        if any(p.shape != one for p in parts):
            raise ValueError(f"per-image counts of shapes {sorted({p.shape for p in parts})} do not stack")
        offsets = np.cumsum([0] + [p.num_images for p in parts])
        return cls(one, int(offsets[-1]), np.concatenate([p.image + o for p, o in zip(parts, offsets)]),
                   np.concatenate([p.index for p in parts]), np.concatenate([p.value for p in parts]))

    @classmethod
    def add(cls, parts: Sequence["ImageCounts"]) -> "ImageCounts":
        """The sum of counts of the same images (entries of the same image and index added)."""
        if not parts or any(p.shape != parts[0].shape or p.num_images != parts[0].num_images for p in parts):
            raise ValueError("adding per-image counts needs one or more of the same images and shape")
        size = int(np.prod(parts[0].shape, dtype=np.int64))
        key = np.concatenate([p.image * size + p.index for p in parts])
        keys, inverse = np.unique(key, return_inverse=True)
        value = _exact_bincount(inverse, np.concatenate([p.value for p in parts]), keys.size)
        keep = value != 0
        return cls(parts[0].shape, parts[0].num_images, keys[keep] // size, keys[keep] % size, value[keep])

    @property
    def nbytes(self) -> int:
        return int(self.image.nbytes + self.index.nbytes + self.value.nbytes)

    def dense(self) -> np.ndarray:
        """``(I,) + shape`` int64."""
        out = np.zeros((self.num_images, int(np.prod(self.shape, dtype=np.int64))), np.int64)
        out[self.image, self.index] = self.value
        return out.reshape((self.num_images,) + self.shape)

    def total(self) -> np.ndarray:
        """``shape``: the counts summed over the images (exact, int64)."""
        return _exact_bincount(self.index, self.value, int(np.prod(self.shape, dtype=np.int64))).reshape(self.shape)

    def take(self, images: Any) -> "ImageCounts":
        """The images ``images`` (positions, in that order; repeats allowed)."""
        pos = np.asarray(images, dtype=np.int64).reshape(-1)
        if pos.size and (pos.min() < 0 or pos.max() >= self.num_images):
            raise IndexError(f"images {pos.tolist()} out of range for {self.num_images} images")
        starts = np.searchsorted(self.image, np.arange(self.num_images + 1))
        rows = [np.arange(starts[i], starts[i + 1]) for i in pos]
        sel = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        image = np.repeat(np.arange(pos.size, dtype=np.int64), [r.size for r in rows])
        return ImageCounts(self.shape, int(pos.size), image, self.index[sel], self.value[sel])

    def sum_axis(self, axis: int) -> "ImageCounts":
        """Every image's counts summed over its ``axis`` (of ``shape``)."""
        axis = axis % len(self.shape)
        coords = list(np.unravel_index(self.index, self.shape))
        del coords[axis]
        shape = self.shape[:axis] + self.shape[axis + 1:]
        index = np.ravel_multi_index(coords, shape) if shape else np.zeros_like(self.index)
        return ImageCounts.add([ImageCounts(shape, self.num_images, self.image, index.astype(np.int64),
                                            self.value)])

    def component(self, k: int) -> "ImageCounts":
        """``[..., k]`` of every image: the last axis taken at ``k``."""
        last = self.shape[-1]
        keep = self.index % last == k
        return ImageCounts(self.shape[:-1], self.num_images, self.image[keep], self.index[keep] // last,
                           self.value[keep])

    def indicator(self) -> "ImageCounts":
        """1 where an image counts anything (its non-zero entries), so :meth:`total` is the images per entry."""
        return ImageCounts(self.shape, self.num_images, self.image, self.index, np.ones_like(self.value))


def _exact_bincount(index: np.ndarray, value: np.ndarray, size: int) -> np.ndarray:
    """``value`` summed by ``index`` into ``size`` int64 bins: exact while every bin and value stays below 2**53
    (pixel counts; ``np.bincount`` sums float64, many times faster than ``np.add.at``)."""
    return np.rint(np.bincount(index, weights=value.astype(np.float64), minlength=size)).astype(np.int64)


#: entries of one product of a sparse :func:`bootstrap_batches` part (times the batch's resamples)
_SPARSE_PRODUCT_ENTRIES = 1 << 22
#: a sparse part whose entries fill at least this share of its images x columns is summed as a dense product
_DENSE_SHARE = 0.125


def _sparse_weighted_sums(counts: ImageCounts, order: np.ndarray, cols: np.ndarray, col_of: np.ndarray,
                          wb: np.ndarray) -> np.ndarray:
    """``(b, prod(shape))`` int64: ``wb @ counts`` for the resamples ``wb`` (``(b, I)``), entry by entry in pieces
    (entries ``order``ed by column, ``col_of`` each one's position in the non-zero columns ``cols``)."""
    out = np.zeros((wb.shape[0], int(np.prod(counts.shape, dtype=np.int64))), np.int64)
    step = max(1, _SPARSE_PRODUCT_ENTRIES // max(1, wb.shape[0]))
    image, value = counts.image[order], counts.value[order].astype(np.float64)
    for e0 in range(0, order.size, step):
        e1 = min(e0 + step, order.size)
        piece = col_of[e0:e1]
        starts = np.flatnonzero(np.r_[True, piece[1:] != piece[:-1]])
        summed = np.add.reduceat(wb[:, image[e0:e1]] * value[e0:e1], starts, axis=1)
        out[:, cols[piece[starts]]] += np.rint(summed).astype(np.int64)
    return out


def bootstrap_batches(image_stats: Sequence[Any], weights: Any, batch: int = 256
                      ) -> Iterator[tuple[slice, list[np.ndarray]]]:
    """Per-image counts of several arrays summed over the resamples, ``batch`` resamples at a time.

    Yields ``(rows, sums)``: the resamples ``rows`` of ``weights`` (``(B, I)``)
    and, for every ``(I, ...)`` array (or :class:`ImageCounts`) of ``image_stats``,
    its ``(len(rows), ...)`` sums. Exact: integer weights and counts, summed as float64 (exact below
    2**53) and returned as int64. Only the entries some image counts enter the
    product (per-image strata are mostly zero), so the cost and memory follow
    what the images hold, and a caller that reduces every batch before the next
    (:func:`isle_fast.ensemble.uncertainty.stratified_scores`) holds one batch.
    """
    w = np.asarray(weights)
    if batch < 1:
        raise ValueError(f"batch must be at least 1, not {batch}")
    parts: list[tuple] = []
    for a in image_stats:
        if isinstance(a, ImageCounts):
            cols, col_of = np.unique(a.index, return_inverse=True)
            width = int(np.prod(a.shape, dtype=np.int64))
            if a.value.size >= _DENSE_SHARE * a.num_images * cols.size:   # the columns' product is dense
                dense = np.zeros((a.num_images, cols.size))
                dense[a.image, col_of] = a.value
                parts.append((a.shape, width, cols, dense))
                continue
            order = np.argsort(col_of, kind="stable")
            parts.append((a, order, cols, col_of[order]))
            continue
        stats = np.asarray(a)
        flat = stats.reshape(stats.shape[0], -1)
        cols = np.flatnonzero(flat.any(axis=0))
        parts.append((stats.shape[1:], flat.shape[1], cols, flat[:, cols].astype(np.float64)))
    for b0 in range(0, w.shape[0], batch):
        rows = slice(b0, min(b0 + batch, w.shape[0]))
        wb = w[rows].astype(np.float64)
        sums = []
        for part in parts:
            if isinstance(part[0], ImageCounts):
                counts, order, cols, col_of = part
                sums.append(_sparse_weighted_sums(counts, order, cols, col_of, wb).reshape(
                    (wb.shape[0],) + counts.shape))
                continue
            shape, width, cols, dense = part
            out = np.zeros((wb.shape[0], width), dtype=np.int64)
            out[:, cols] = np.rint(wb @ dense).astype(np.int64)
            sums.append(out.reshape((wb.shape[0],) + shape))
        yield rows, sums


def bootstrap_sums(image_stats: Any, weights: Any, batch: int = 256) -> np.ndarray:
    """Per-image counts summed over every resample: ``(B, ...)`` from ``(I, ...)`` counts and ``(B, I)`` weights.

    Exact (:func:`bootstrap_batches`, in batches of ``batch`` resamples).
    """
    stats = np.asarray(image_stats)
    w = np.asarray(weights)
    out = np.empty((w.shape[0],) + stats.shape[1:], dtype=np.int64)
    for rows, (sums,) in bootstrap_batches([stats], w, batch):
        out[rows] = sums
    return out


def bootstrap_miou_diff(image_stats: Any, reps: int, seed: int) -> tuple[float, float]:
    """95 % interval of mIoU(model 0) - mIoU(model 1) over images resampled with replacement.

    Parameters
    ----------
    image_stats : array_like, shape (I, 2, C, 2)
        Per image, model and class: the intersection and the union.
    reps : int
        Bootstrap resamples.
    seed : int
        Seed of the resampling.

    Returns
    -------
    (float, float)
        The 2.5 and 97.5 percentiles of the difference, in mIoU points. A
        resample's IoU is dataset-level: its summed intersections over its
        summed unions (:func:`iou_from_stats`, :func:`miou`).
    """
    summed = bootstrap_sums(image_stats, bootstrap_weights(np.shape(image_stats)[0], reps, seed))
    m = miou(iou_from_stats(summed))  # (B, 2)
    lo, hi = np.nanpercentile(m[:, 0] - m[:, 1], [2.5, 97.5])
    return float(lo), float(hi)


def jsonable(x: Any) -> Any:
    """``x`` with arrays as lists, NumPy scalars as Python numbers and NaN as None (JSON ``null``)."""
    if isinstance(x, np.ndarray):
        return [jsonable(v) for v in x.tolist()]
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return None if math.isnan(float(x)) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


class AveragedIoU:
    """IoU and mIoU of confusion counts, averaged the way ``average`` says (a mixin).

    The class sets ``counts`` (``(..., C, C+1)`` int64, :func:`iou`'s input), ``image_stats``
    (``(I, ..., C, 2)`` per-image intersection and union, or None) and ``average``
    (``'dataset'`` or ``'image'``). Shared by an evaluation (``(N, C)`` scores) and a threshold
    sweep (``(N, T, C)``): one definition of the two averages.
    """

    counts: np.ndarray
    image_stats: np.ndarray | None
    average: str

    @property
    def dataset_iou(self) -> np.ndarray:
        """IoU in percent from the summed counts (the standard definition); NaN where undefined."""
        return iou(self.counts)

    @property
    def image_iou(self) -> np.ndarray | None:
        """Mean per-image IoU in percent over the images with union > 0 (None without per-image counts)."""
        if self.image_stats is None:
            return None
        return nanmean(iou_from_stats(self.image_stats), axis=0)

    @property
    def iou(self) -> np.ndarray:
        """IoU in percent, averaged as :attr:`average` says; NaN where undefined."""
        if self.average == "image" and self.image_stats is not None:
            return self.image_iou  # type: ignore[return-value]
        return self.dataset_iou

    @property
    def miou(self) -> np.ndarray:
        """Mean IoU in percent over the classes whose IoU is defined."""
        return miou(self.iou)
