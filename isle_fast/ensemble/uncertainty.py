"""How sure is each class's choice? A bootstrap over the labelled images.

The evaluate pass can keep, for every labelled image, set and class, the
intersection and union (``Evaluation.image_stats``, ``(I, N, C, 2)`` exact
counts; ``evaluate(..., per_image=True)``, the same read). A resample draws
``I`` images with replacement (:func:`isle_fast.metrics.bootstrap_weights`,
a fixed seed) and sums their counts (:func:`isle_fast.metrics.bootstrap_sums`,
exact), so every resample has a per-class IoU for every set, computed as the
evaluation computes it (``average='dataset'``: summed intersections over
summed unions; ``'image'``: the mean per-image IoU over the drawn images
where the union is not empty).

Per class ``c`` with chosen set ``s`` (the selection's ``best[c]``), over the
resamples:

* ``iou_interval[n, c]``: the 2.5 and 97.5 percentiles of set ``n``'s IoU;
* ``diff_interval[n, c]``: the same of ``IoU(n) - IoU(s)``;
* ``p_best[c]``: the share of resamples where ``s`` has the highest IoU of the
  allowed sets (ties count as best), over the resamples where the allowed
  sets do not all score the same (a resample that missed the class's images
  says nothing). NaN for a class without gt pixels;
* ``expected_loss[c]``: the mean of ``max_n IoU(n) - IoU(s)`` (IoU points);
* ``more_images[c]``: for a class with ``p_best < settled`` (0.9), how many
  more labelled images would settle it, assuming the spread shrinks as
  ``1/sqrt(images)``: with the observed margin ``d`` of ``s`` over the runner
  up and the bootstrap standard deviation ``sd`` of that difference at ``I``
  images, the margin is 1.645 standard deviations (one-sided 95 %) at
  ``I * (1.645 * sd / d)**2`` images; ``more_images`` is that minus ``I``
  (at least 1), ``inf`` when the margin is 0, 0 for settled classes. It
  is an estimate from the current spread (the margin may change with more
  images), not a guarantee;
* ``class_images[c]``: labelled images that contain the class (some set
  overlaps it).

A class seen in few labelled images has a bootstrap that cannot see the
failures those images lack, and alone it was far too sure (in
``benchmarks/selection.py`` choices at p >= 0.9 from 10 labelled images were
right a third of the time). So, before ``p_best``, every class's spread is
raised toward the spread pooled over all classes (:func:`_pooled_spread`,
``prior_images`` pseudo-images, default 10). It helps (K = 100: 62 % -> 86 %
right at p >= 0.9 in that study) but with a handful of images per class p is
still optimistic: trust it only where ``class_images`` is 20 or more.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from isle_fast import metrics
from isle_fast.errors import InputError, param

__all__ = ["Uncertainty", "choice_uncertainty", "selection_uncertainty", "SETTLED", "Z_SETTLE"]

#: A choice at or above this probability counts as settled.
SETTLED = 0.9
#: One-sided 95 % normal quantile used for :attr:`Uncertainty.more_images`.
Z_SETTLE = 1.645


@dataclass
class Uncertainty:
    """Bootstrap uncertainty of a per-class selection (see the module docstring).

    Attributes
    ----------
    classes, set_names : list of str
    best : (C,) int64
        The chosen set of every class.
    iou_interval, diff_interval : (N, C, 2) float64
        95 % intervals (percent, IoU points).
    p_best, expected_loss, more_images : (C,) float64
    runner_up : (C,) int64
        The allowed set with the second highest observed IoU (-1 with one set).
    class_images : (C,) int64
        Labelled images containing the class (some set overlaps it).
    labelled : int
        Labelled images the bootstrap resampled.
    reps, seed : int
    """

    classes: list[str]
    set_names: list[str]
    best: np.ndarray
    iou_interval: np.ndarray
    diff_interval: np.ndarray
    p_best: np.ndarray
    expected_loss: np.ndarray
    more_images: np.ndarray
    runner_up: np.ndarray
    class_images: np.ndarray
    labelled: int
    reps: int
    seed: int

    def uncertain(self) -> list[int]:
        """Classes whose choice is below :data:`SETTLED`."""
        return [c for c in range(len(self.classes)) if self.p_best[c] < SETTLED]

    def more_images_total(self) -> float:
        """Labelled images to add so that every uncertain class is settled (the largest estimate)."""
        vals = [self.more_images[c] for c in self.uncertain()]
        return float(max(vals)) if vals else 0.0

    def to_json(self) -> dict:
        """JSON fields: per class ``p_best``, ``expected_loss``, ``more_images`` (null = infinite /
        undefined), the chosen set's and the runner-up's intervals, and the bootstrap's settings."""
        per = {}
        for c, name in enumerate(self.classes):
            b, r = int(self.best[c]), int(self.runner_up[c])
            more = self.more_images[c]
            per[name] = {
                "chosen": self.set_names[b],
                "class_images": int(self.class_images[c]),
                "p_best": metrics.jsonable(self.p_best[c]),
                "expected_loss": metrics.jsonable(self.expected_loss[c]),
                "more_images": None if not math.isfinite(more) else int(more),
                "iou_interval": {n: metrics.jsonable(self.iou_interval[k, c]) for k, n in
                                 enumerate(self.set_names)},
                "runner_up": self.set_names[r] if r >= 0 else None,
                "diff_to_runner_up": metrics.jsonable(self.diff_interval[r, c]) if r >= 0 else None,
            }
        total = self.more_images_total()
        return {"classes": per, "labelled_images": self.labelled, "reps": self.reps, "seed": self.seed,
                "settled_at": SETTLED, "uncertain": [self.classes[c] for c in self.uncertain()],
                "more_images_to_settle": None if not math.isfinite(total) else int(total),
                "method": "bootstrap over labelled images (exact counts); more_images: "
                          "I * (1.645 sd / margin)^2 - I"}

    def column(self, c: int) -> str:
        """The table cell of class ``c``: ``p=0.97`` (or ``-``), the expected loss and more images."""
        p = self.p_best[c]
        if np.isnan(p):
            return "-"
        cell = f"p={p:.2f} ({int(self.class_images[c])} img) loss={self.expected_loss[c]:.2f}"
        m = self.more_images[c]
        if m > 0:
            cell += " +inf img" if not math.isfinite(m) else f" +{int(m)} img"
        return cell

    def table(self, table: str) -> str:
        """``table`` (:meth:`Evaluation.table`) with the uncertainty column appended to the class rows."""
        lines = table.split("\n")
        out = [lines[0] + "  choice (bootstrap)"]
        for c in range(len(self.classes)):
            out.append(lines[1 + c] + "  " + self.column(c))
        out.extend(lines[1 + len(self.classes):])
        return "\n".join(out)


def _resampled_iou(image_stats: np.ndarray, weights: np.ndarray, average: str) -> np.ndarray:
    """``(B, N, C)`` IoU of every resample, percent, NaN where undefined."""
    if average == "image":
        per = metrics.iou_from_stats(image_stats)  # (I, N, C)
        ok = ~np.isnan(per)
        # per-image IoUs are not integers: summed as floats (deterministic); the counts of images exactly
        w = weights.astype(np.float64)
        num = (w @ np.where(ok, per, 0.0).reshape(per.shape[0], -1)).reshape((w.shape[0],) + per.shape[1:])
        den = metrics.bootstrap_sums(ok.astype(np.int64), weights)
        return metrics.ratio(num, den)
    return metrics.iou_from_stats(metrics.bootstrap_sums(image_stats, weights))


#: pseudo-images of the pooled per-image spread every class's spread is shrunk toward (see _pooled_spread)
PRIOR_IMAGES = 10.0


def _pooled_spread(iou: np.ndarray, stats: np.ndarray, best: np.ndarray, members: np.ndarray,
                   prior: float, seed: int) -> np.ndarray:
    """Resampled IoU with every class's spread raised toward the spread pooled over the classes.

    A class in few labelled images has a bootstrap that cannot see failures
    those images lack (an object a set confuses elsewhere): alone it is far
    too sure (measured in benchmarks/selection.py). Per class and set ``n``
    the per-image variance ``v`` of ``IoU_n - IoU_chosen`` (images that
    contain the class, ``m`` of them) is shrunk toward ``v0``, the mean square
    of every such difference pooled over the foreground classes:
    ``((m - 1) v + prior v0) / (m - 1 + prior)``; where the bootstrap's
    variance of the difference is below that over ``m``, seeded normal noise
    makes up the rest. Background (class 0, in nearly every image and on
    another scale) keeps its plain bootstrap. Deterministic for a seed.
    """
    per = metrics.iou_from_stats(stats)  # (I, N, C)
    n_img, n, c = per.shape
    chosen = per[:, best, np.arange(c)]  # (I, C)
    diff = per - chosen[:, None, :]
    # images that contain the class (some set overlaps it): images where every set is 0 would add zeros
    ok = ~np.isnan(diff) & (stats[..., 0].sum(axis=1) > 0)[:, None, :]
    m = ok.sum(axis=0)  # (N, C)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        v = np.where(m >= 2, np.nanvar(np.where(ok, diff, np.nan), axis=0, ddof=1), np.nan)
    others = members[:, None] & (np.arange(n)[:, None] != best[None, :])  # (N, C)
    others[:, 0] = False  # background (in nearly every image, another scale) keeps its own bootstrap
    pooled = diff[ok & others[None]]  # every image, class and competitor pooled
    if pooled.size < 2:
        return iou
    v0 = float(np.mean(pooled ** 2))  # per-image spread of a difference around no difference
    v_eff = (np.where(np.isnan(v), 0.0, v) * np.maximum(m - 1, 0) + prior * v0) / (np.maximum(m - 1, 0) + prior)
    target = v_eff / np.maximum(m, 1)  # variance of the dataset-level difference
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        boot = np.nanvar(iou - iou[:, best, np.arange(c)][:, None, :], axis=0)
    extra = np.sqrt(np.clip(target - np.nan_to_num(boot), 0.0, None))
    extra[best, np.arange(c)] = 0.0
    extra[:, 0] = 0.0
    extra[(m >= 2) & (np.nan_to_num(v) == 0)] = 0.0  # the same IoU as the choice in every image: no spread
    rng = np.random.default_rng([int(seed), 7])
    noise = rng.standard_normal(iou.shape) * extra[None]
    return np.where(np.isnan(iou), iou, iou + noise)


def choice_uncertainty(image_stats: Any, best: Any, members: Any = None, *, gt_present: Any = None,
                       reps: int = 1000, seed: int = 0, average: str = "dataset",
                       prior_images: float = PRIOR_IMAGES) -> dict[str, np.ndarray]:
    """The bootstrap of a per-class choice from per-image counts (arrays only; see :class:`Uncertainty`).

    Parameters
    ----------
    image_stats : (I, N, C, 2) int
        Per labelled image, set and class: intersection and union.
    best : (C,) int
        The chosen set of every class.
    members : (N,) bool, optional
        Sets the choice was restricted to (default all).
    gt_present : (C,) bool, optional
        Classes with gt pixels (others get NaN); default: union > 0 somewhere.
    reps, seed : int
        Resamples and their seed.
    average : {'dataset', 'image'}
    prior_images : float
        Pseudo-images of the pooled spread (:func:`_pooled_spread`; 0: the plain bootstrap).

    Returns
    -------
    dict of arrays
        ``iou_interval``, ``diff_interval``, ``p_best``, ``expected_loss``,
        ``more_images``, ``runner_up``, ``class_images``.
    """
    stats = np.asarray(image_stats, dtype=np.int64)
    if stats.ndim != 4 or stats.shape[-1] != 2:
        raise InputError(f"per-image counts must have shape (images, sets, classes, 2), not {stats.shape}")
    n_img, n, c, _ = stats.shape
    if n_img == 0:
        raise InputError("the bootstrap needs at least one labelled image")
    best = np.asarray(best, dtype=np.int64)
    members = np.ones(n, dtype=bool) if members is None else np.asarray(members, dtype=bool)
    present = (stats[..., 1].sum(axis=(0, 1)) > 0) if gt_present is None else np.asarray(gt_present, bool)
    weights = metrics.bootstrap_weights(n_img, reps, seed)
    iou = _resampled_iou(stats, weights, average)  # (B, N, C)
    if prior_images > 0:
        iou = _pooled_spread(iou, stats, best, members, float(prior_images), seed)
    cols = np.arange(c)
    chosen = iou[:, best, cols]  # (B, C)
    masked = np.where(members[None, :, None] & ~np.isnan(iou), iou, -np.inf)
    top = masked.max(axis=1)  # (B, C)
    ch = np.where(np.isnan(chosen), -np.inf, chosen)
    right = ch >= top
    loss = np.where(np.isfinite(top), top - np.where(np.isfinite(ch), ch, 0.0), 0.0)
    loss = np.where(np.isnan(chosen) & np.isfinite(top), top, loss)
    diff = iou - chosen[:, None, :]
    with warnings.catch_warnings():  # all-NaN slices (a class no resample defines) give NaN quietly
        warnings.simplefilter("ignore", RuntimeWarning)
        iou_int = np.moveaxis(np.nanpercentile(iou, [2.5, 97.5], axis=0), 0, -1)
        diff_int = np.moveaxis(np.nanpercentile(diff, [2.5, 97.5], axis=0), 0, -1)
    # the observed IoU (all labelled images) gives the runner-up and the margin
    full = _resampled_iou(stats, np.ones((1, n_img), dtype=np.int64), average)[0]  # (N, C)
    obs = np.where(members[:, None] & ~np.isnan(full), full, -np.inf)
    runner = np.full(c, -1, dtype=np.int64)
    more = np.zeros(c, dtype=np.float64)
    # a resample where every allowed set scores the same (the class's images not drawn: all 0 or undefined)
    # says nothing about the choice: p is taken over the other resamples (1 when there are none)
    lowest = np.where(members[None, :, None] & ~np.isnan(iou), iou, np.inf).min(axis=1)
    informative = ~((top == lowest) | ~np.isfinite(top))
    n_inf = informative.sum(axis=0)
    p_best = np.where(n_inf > 0, (right & informative).sum(axis=0) / np.maximum(n_inf, 1), 1.0)
    for k in range(c):
        others = [m for m in np.nonzero(members)[0] if m != best[k]]
        if not others:
            continue
        r = int(max(others, key=lambda m: (obs[m, k], -m)))
        runner[k] = r
        if not present[k] or p_best[k] >= SETTLED:
            continue
        margin = obs[best[k], k] - obs[r, k]
        d = chosen[:, k] - iou[:, r, k]
        d = d[~np.isnan(d)]
        sd = float(d.std()) if d.size > 1 else float("nan")
        if not np.isfinite(margin) or margin <= 0 or not sd > 0:
            more[k] = math.inf
        else:
            more[k] = max(1.0, math.ceil(n_img * (Z_SETTLE * sd / margin) ** 2 - n_img))
    p_best[~present] = np.nan
    exp_loss = loss.mean(axis=0)
    exp_loss[~present] = np.nan
    return {"iou_interval": iou_int, "diff_interval": diff_int, "p_best": p_best,
            "expected_loss": exp_loss, "more_images": more, "runner_up": runner,
            "class_images": (stats[..., 0].sum(axis=1) > 0).sum(axis=0).astype(np.int64)}


def selection_uncertainty(evaluation: Any, selection: Any = None, *, reps: int = 1000,
                          seed: int = 0) -> Uncertainty:
    """The bootstrap uncertainty of ``selection`` (default: the evaluation's own) of every class.

    Parameters
    ----------
    evaluation : Evaluation
        Made with ``per_image=True`` (or ``average='image'``): it needs ``image_stats``.
    selection : Selection, optional
    reps, seed : int
        Bootstrap resamples (at least 1) and their seed.

    Returns
    -------
    Uncertainty

    Raises
    ------
    InputError
        No per-image counts, or ``reps`` below 1.
    """
    if evaluation.image_stats is None:
        raise InputError("the uncertainty needs per-image counts: evaluate(..., per_image=True)")
    if int(reps) < 1:
        raise InputError(f"{param('reps')} must be at least 1 resample, not {reps}")
    sel = selection if selection is not None else evaluation.select()
    res = choice_uncertainty(evaluation.image_stats, sel.best, sel.members,
                             gt_present=np.asarray(evaluation.gt_pixels) > 0, reps=int(reps), seed=int(seed),
                             average=evaluation.average)
    return Uncertainty(classes=list(evaluation.classes), set_names=list(evaluation.set_names),
                       best=np.asarray(sel.best, dtype=np.int64), labelled=int(evaluation.image_stats.shape[0]),
                       reps=int(reps), seed=int(seed), **res)
