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

With the no-label estimate of every image beside the labelled images,
:func:`posterior_scores` combines the two, each weighted by its error (the
labelled IoU's from this bootstrap, the estimate's fitted on the labelled
classes), and reports the posterior ``p_best`` of its choices
(``merge(..., blend_estimate=True)``, ``isle merge --blend-estimate``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from isle_fast import metrics
from isle_fast.errors import InputError, param

__all__ = ["Uncertainty", "choice_uncertainty", "selection_uncertainty", "SETTLED", "Z_SETTLE", "posterior_scores",
           "contrast_basis"]

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


# ================================================================================ labelled IoU + estimate
#: smallest error variance (IoU points squared, per contrast) allowed for the no-label estimate
MIN_ESTIMATE_VARIANCE = 0.25


def _have_any(s_q: np.ndarray) -> bool:
    """Whether any class has a labelled covariance."""
    return bool((~np.isnan(s_q).any(axis=(1, 2))).any()) if s_q.size else False


def contrast_basis(n: int) -> np.ndarray:
    """``(n, n-1)`` orthonormal contrasts (Helmert): columns orthogonal to each other and to the ones.

    A per-class offset common to every set (a no-label estimate that over-
    or under-rates a class for all sets alike) does not change a choice, so the
    combination works on these contrasts only.
    """
    q = np.zeros((n, max(n - 1, 0)))
    for j in range(1, n):
        q[:j, j - 1] = 1.0
        q[j, j - 1] = -float(j)
        q[:, j - 1] /= math.sqrt(j * (j + 1))
    return q


#: the error variances (IoU points squared, per contrast) the marginal likelihood is searched over
TAU2_GRID = np.geomspace(MIN_ESTIMATE_VARIANCE, 2.5e3, 81)


def _estimate_error_grid(l_q: np.ndarray, s_q: np.ndarray, e_q: np.ndarray,
                         fit_slope: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(tau2, a, weight)`` over :data:`TAU2_GRID`: the estimate's error variance, its GLS slope and the
    posterior weight of each (marginal likelihood of ``l_q ~ N(a e_q, S + tau2 I)``, a flat prior on tau).

    ``a`` is clipped to [0, 2] (1 without ``fit_slope``). Deterministic.
    """
    k = l_q.shape[1]
    slopes, lls = [], []
    for tau2 in TAU2_GRID:
        cov = s_q + tau2 * np.eye(k)[None]
        inv = np.linalg.inv(cov)
        a = 1.0
        if fit_slope:
            den = float(np.einsum("ci,cij,cj->", e_q, inv, e_q))
            a = float(np.clip(np.einsum("ci,cij,cj->", e_q, inv, l_q) / den, 0.0, 2.0)) if den > 0 else 0.0
        r = l_q - a * e_q
        slopes.append(a)
        lls.append(-0.5 * float(np.einsum("ci,cij,cj->", r, inv, r) + np.linalg.slogdet(cov)[1].sum()))
    # a flat prior on tau (not on log tau: the likelihood is flat as tau2 -> 0 when the labelled noise is
    # larger, and a log-flat prior would put most weight there): on the log grid, weight * tau
    ll = np.asarray(lls) + 0.5 * np.log(TAU2_GRID)
    w = np.exp(ll - ll.max())
    return TAU2_GRID.copy(), np.asarray(slopes), w / w.sum()


def posterior_scores(image_stats: Any, estimated_iou: Any, *, gt_present: Any = None, members: Any = None,
                     reps: int = 1000, seed: int = 0, average: str = "dataset",
                     prior_images: float = PRIOR_IMAGES, draws: int = 4000, fit_slope: bool = True,
                     population: int | None = None, pooled: bool = True) -> dict[str, Any]:
    """Per-class IoU from a few labelled images and the no-label estimate, weighted by their errors.

    A normal model of every class's contrasts between the sets
    (:func:`contrast_basis`: the sets' IoU less their mean):

    * labelled: ``Q'L_c ~ N(Q'T_c, S_c)``, ``L`` the IoU on the labelled
      images, ``T`` the IoU on every image (``population`` of them), ``S_c``
      the bootstrap covariance of the sets' IoU of class ``c`` (resampling the
      labelled images, the spread raised toward the pooled one as in
      :func:`choice_uncertainty`). With ``pooled`` (default) the per-image
      covariance ``n_c S_c`` is averaged over the foreground classes and
      divided by each class's ``n_c`` (labelled images with the class): a
      class in ten images has a bootstrap too noisy to weigh it by, and
      ``benchmarks/selection.py`` chose better with the pooled one. Times
      ``1 - I / population``: the labelled images are part of every image (all
      of them labelled: no sampling error). A class the labelled images lack
      has no labelled term;
    * no-label estimate (prior): ``Q'T_c ~ N(a Q'E_c, tau2 I)``. ``a`` and
      ``tau2`` are fitted on the labelled foreground classes themselves
      (empirical Bayes): the marginal likelihood ``Q'L_c ~ N(a Q'E_c, S_c +
      tau2 I)`` on a grid of ``tau2`` (:data:`TAU2_GRID`, a flat prior on
      ``tau``), ``a`` by generalised least squares at each (clipped to [0, 2];
      1 with ``fit_slope=False``); the posterior averages over the grid.

    Per ``tau2`` the posterior of ``Q'T_c`` is normal, its mean the
    precision-weighted combination: where the labelled images are few (large
    ``S_c``) the estimate decides, where they are many the labelled IoU does,
    and an estimate that disagrees with the labelled images (large ``tau2``)
    counts less everywhere. Per class the set with the highest posterior mean
    is the choice (the highest expected IoU); ``p_best`` is the posterior
    probability that it is the best set and ``expected_loss`` the expected IoU
    it loses, both from ``draws`` seeded draws of the mixture over the grid.
    Deterministic for a seed.

    Parameters
    ----------
    image_stats : (I, N, C, 2) int
        Per labelled image, set and class: intersection and union.
    estimated_iou : (N, C) float
        The no-label estimate (percent, from every image; NaN read as 0).
    gt_present : (C,) bool, optional
        Classes with labelled gt pixels (default: union > 0 somewhere).
    members : (N,) bool, optional
        Sets the choice is restricted to (default all).
    reps, seed, average, prior_images
        As :func:`choice_uncertainty`.
    draws : int
        Posterior draws for ``p_best`` and ``expected_loss``.
    fit_slope : bool
        Fit the estimate's scale ``a`` (else 1).
    population : int, optional
        Images the choice is for (every image of the sets; default: many more than labelled).
    pooled : bool
        The labelled covariance pooled over the classes per image (see above).

    Returns
    -------
    dict
        ``scores`` (N, C) posterior mean IoU (the labelled mean level of each
        class plus the posterior contrasts; non-members keep the labelled
        IoU), ``best`` (C,), ``p_best`` (C,), ``expected_loss`` (C,),
        ``labelled_weight`` (C,) the labelled term's share of the posterior
        precision (0: the estimate alone), ``slope`` and ``tau2`` (the grid's posterior mean of ``a``, the
        geometric one of ``tau2``).
    """
    stats = np.asarray(image_stats, dtype=np.int64)
    if stats.ndim != 4 or stats.shape[-1] != 2:
        raise InputError(f"per-image counts must have shape (images, sets, classes, 2), not {stats.shape}")
    n_img, n, c, _ = stats.shape
    est = np.nan_to_num(np.asarray(estimated_iou, dtype=np.float64), nan=0.0)
    if est.shape != (n, c):
        raise InputError(f"the estimate has shape {est.shape}; the labelled counts have {n} sets, {c} classes")
    members = np.ones(n, dtype=bool) if members is None else np.asarray(members, dtype=bool)
    present = (stats[..., 1].sum(axis=(0, 1)) > 0) if gt_present is None else np.asarray(gt_present, bool)
    mem = np.nonzero(members)[0]
    m = len(mem)
    full = _resampled_iou(stats, np.ones((1, max(n_img, 1)), dtype=np.int64), average)[0] if n_img else \
        np.full((n, c), np.nan)
    lab_best = np.asarray([mem[int(np.argmax(np.where(np.isnan(full[mem, k]), -np.inf, full[mem, k])))]
                           for k in range(c)], dtype=np.int64)
    q = contrast_basis(m)
    l_q = np.full((c, m - 1), np.nan)
    s_q = np.full((c, m - 1, m - 1), np.nan)
    if n_img and m > 1:
        weights = metrics.bootstrap_weights(n_img, reps, seed)
        boot = _resampled_iou(stats, weights, average)
        if prior_images > 0:
            boot = _pooled_spread(boot, stats, lab_best, members, float(prior_images), seed)
        for k in range(c):
            if not present[k] or np.isnan(full[mem, k]).any():
                continue
            b = boot[:, mem, k]
            b = b[~np.isnan(b).any(axis=1)]
            if b.shape[0] < 2:
                continue
            l_q[k] = q.T @ full[mem, k]
            s_q[k] = q.T @ np.cov(b, rowvar=False) @ q + 1e-9 * np.eye(m - 1)
    e_q = est[mem].T @ q  # (C, M-1)
    have = ~np.isnan(l_q).any(axis=1)
    fit = have.copy()
    fit[0] = False  # background: another scale, in every image
    if pooled and _have_any(s_q):
        n_c = (stats[..., 0].sum(axis=1) > 0).sum(axis=0).astype(np.float64)  # labelled images with the class
        ok = ~np.isnan(s_q).any(axis=(1, 2)) & (n_c > 0)
        ok_fg = ok.copy()
        ok_fg[0] = False
        if ok_fg.any():
            per_image = (s_q[ok_fg] * n_c[ok_fg, None, None]).mean(axis=0)
            s_q[ok & ~(np.arange(c) == 0)] = per_image[None] / n_c[ok & ~(np.arange(c) == 0), None, None]
    if population is not None and n_img:
        if population < n_img:
            raise InputError(f"population ({population}) is smaller than the labelled images ({n_img})")
        s_q = s_q * max(1.0 - n_img / float(population), 0.0) + 1e-9 * np.eye(max(m - 1, 0))[None]
    if m > 1 and fit.any():
        grid, slopes, gw = _estimate_error_grid(l_q[fit], s_q[fit], e_q[fit], fit_slope)
        keep = gw > 1e-6 * gw.max()  # the grid points that carry weight
        grid, slopes, gw = grid[keep], slopes[keep], gw[keep] / gw[keep].sum()
    else:  # nothing labelled to judge the estimate by: it decides
        grid, slopes, gw = np.array([MIN_ESTIMATE_VARIANCE]), np.array([1.0]), np.array([1.0])
    scores = np.where(members[:, None], np.nan, full)
    p_best = np.full(c, np.nan)
    loss = np.full(c, np.nan)
    lab_w = np.zeros(c)
    best = np.full(c, int(mem[0]), dtype=np.int64)
    rng = np.random.default_rng([int(seed), 11])
    z = rng.standard_normal((draws, max(m - 1, 0)))
    # every draw takes one grid point (tau2, a) with its posterior weight: a mixture of normals
    which = np.minimum(np.searchsorted(np.cumsum(gw), (np.arange(draws) + 0.5) / draws), len(gw) - 1)
    eye = np.eye(max(m - 1, 0))
    for k in range(c):
        if m == 1:
            scores[mem, k] = full[mem, k] if have[k] else est[mem, k]
            best[k] = mem[0]
            continue
        means, chols = [], []
        for tau2, a in zip(grid, slopes):
            if have[k]:
                s_inv = np.linalg.inv(s_q[k])
                prec = s_inv + eye / tau2
                cov = np.linalg.inv(prec)
                means.append(cov @ (s_inv @ l_q[k] + a * e_q[k] / tau2))
            else:
                cov = tau2 * eye
                means.append(a * e_q[k])
            chols.append(np.linalg.cholesky((cov + cov.T) / 2))
        mean = np.einsum("g,gi->i", gw, np.asarray(means))
        if have[k]:
            s_inv = np.linalg.inv(s_q[k])
            lab_w[k] = float(sum(w * np.trace(s_inv) / np.trace(s_inv + eye / t) for w, t in zip(gw, grid)))
        level = float(full[mem, k].mean()) if have[k] else float(est[mem, k].mean())
        vals = level + q @ mean
        scores[mem, k] = vals
        top = int(np.argmax(vals))  # ties: the first set
        best[k] = mem[top]
        ch = np.asarray(chols)[which]  # (draws, M-1, M-1)
        sample = (np.asarray(means)[which] + np.einsum("dij,dj->di", ch, z)) @ q.T  # (draws, M)
        p_best[k] = float((sample[:, top] >= sample.max(axis=1)).mean())
        loss[k] = float((sample.max(axis=1) - sample[:, top]).mean())
    slope = float(gw @ slopes)
    tau2 = float(np.exp(gw @ np.log(grid)))
    return {"scores": scores, "best": best, "p_best": p_best, "expected_loss": loss,
            "labelled_weight": lab_w, "slope": slope, "tau2": tau2}


# ================================================================================ labelled strata + every image's votes
#: labelled images a stratum needs before its own truth rate outweighs the rate pooled over the classes
STRATA_PRIOR_IMAGES = 3.0
#: the same for the choice: stronger pooling chooses better than it reports (the p comes from the calibrated one)
STRATA_CHOICE_PRIOR_IMAGES = 30.0
#: the truth model of the strata's prior (stratified_scores ``model``): 'staple' (the no-label STAPLE
#: posterior, only where no labelled image has the pattern) or 'semi' (STAPLE fitted with the labelled truth)
STRATA_MODELS = ("staple", "semi")
#: the default: 'semi' kept more of the full-gt gain than 'staple' at every K of ``benchmarks/selection.py``,
#: on average and on the worst data set, with the same calibration (it shares the 'staple' bootstrap)
STRATA_MODEL = "semi"
#: with ``model='semi'``: the model's weight in the prior, against the rate pooled over the classes
SEMI_MODEL_WEIGHT = 0.5
#: the context bins of the strata (:func:`context_strata`): chessboard distance (pixels) to the nearest pixel
#: where every set votes the class, at most 4, 12, 30, or farther (or nowhere in the image). Chosen in a
#: development run of the selection benchmark's oracle rows (the model's own rates per bin) among four
#: spacings, all of which raised the oracle on the worst data set; not tuned on the estimate.
CONTEXT_RADII = (4, 12, 30)


def strata_counts(gt: Any, sets: Sequence[Any], num_classes: int, allowed: Any = None) -> np.ndarray:
    """``(2, C, 2**N, 3)`` exact counts of labelled pixels by vote stratum and truth.

    A stratum is a class ``c`` and the bit mask ``m`` of the sets that predict
    it at a pixel (the ``vote_patterns`` kernel: pixels where some set votes);
    ``[..., 0]``: the stratum's pixels, ``[..., 1]``: of those, gt ``c``,
    ``[..., 2]``: gt ignore (``>= C``). Group ``[0]``: the classes an image's
    labels allow (every class without ``allowed``), ``[1]``: those they rule
    out (as :func:`isle_fast.ensemble.estimate.vote_patterns_pass` splits its
    counts). Summed over the images; three kernel calls per image.

    Parameters
    ----------
    gt : (I, H, W) uint8
    sets : sequence of N (I, H, W) uint8
    num_classes : int
    allowed : (I, C) bool, optional
        Image-level labels (background is always allowed).
    """
    from isle_fast.kernels import cpu

    g = np.asarray(gt, dtype=np.uint8)
    labs = [np.asarray(s, dtype=np.uint8) for s in sets]
    if g.ndim == 2:
        g, labs = g[None], [s[None] for s in labs]
    if any(s.shape != g.shape for s in labs):
        raise InputError(f"the sets' shapes {[s.shape for s in labs]} differ from the gt's {g.shape}")
    c, p = int(num_classes), 1 << len(labs)
    out = np.zeros((2, c, p, 3), np.int64)
    for i in range(g.shape[0]):
        s = tuple(np.ascontiguousarray(a[i:i + 1]) for a in labs)
        voting = np.zeros(g.shape[1:], bool)
        for a in s:
            voting |= a[0] < c
        gi = np.where(voting, g[i], 255).astype(np.uint8)[None]  # gt only where some set votes
        h = cpu.vote_patterns(s, c)
        pos = cpu.vote_patterns(s + (np.ascontiguousarray(gi),), c)[:, p:]
        ign = cpu.vote_patterns(tuple(np.ascontiguousarray(np.where(gi >= c, a, 255).astype(np.uint8))
                                      for a in s), c)
        ok = np.ones(c, bool) if allowed is None else np.asarray(allowed[i], bool).copy()
        ok[0] = True
        one = np.stack([h, pos, ign], axis=-1)
        out[0][ok] += one[ok]
        out[1][~ok] += one[~ok]
    return out


def context_strata(gt: Any, sets: Sequence[Any], num_classes: int, allowed: Any = None,
                   radii: Sequence[int] = CONTEXT_RADII) -> np.ndarray:
    """``(2, B, C, 2**N, 3)``: :func:`strata_counts` split by the distance to agreement, over the images.

    Bin ``b`` of a pixel's stratum (class ``c``, the sets voting it) is where its
    chessboard distance to the nearest pixel of the image that every set votes
    ``c`` on falls among ``radii`` (the ``vote_context`` kernel): ``B =
    len(radii) + 1``, the last bin farther than every radius or with no such
    pixel. Summed over the bins it is :func:`strata_counts`. Without ``gt`` only
    ``[..., 0]`` is counted (every image's context vote patterns). Group ``[0]``
    / ``[1]``: the classes the image labels allow / rule out, as there.

    Parameters
    ----------
    gt : (I, H, W) uint8, optional
    sets : sequence of N (I, H, W) uint8
    num_classes : int
    allowed : (I, C) bool, optional
        Image-level labels (background is always allowed).
    radii : sequence of int
        The bins' upper bounds (pixels, increasing).
    """
    from isle_fast.kernels import cpu

    labs = [np.asarray(a, dtype=np.uint8) for a in sets]
    g = None if gt is None else np.asarray(gt, dtype=np.uint8)
    if labs and labs[0].ndim == 2:
        labs, g = [a[None] for a in labs], (None if g is None else g[None])
    if any(a.shape != labs[0].shape for a in labs) or (g is not None and g.shape != labs[0].shape):
        raise InputError(f"the sets' shapes {[a.shape for a in labs]} differ from each other or from the "
                         f"gt's {None if g is None else g.shape}")
    c, p, b = int(num_classes), 1 << len(labs), len(radii) + 1
    out = np.zeros((2, b, c, p, 3), np.int64)
    for i in range(labs[0].shape[0]):
        one = cpu.vote_context(tuple(a[i] for a in labs), c, radii, gt=None if g is None else g[i])
        ok = np.ones(c, bool) if allowed is None else np.asarray(allowed[i], bool).copy()
        ok[0] = True
        out[0][:, ok] += one[:, ok]
        out[1][:, ~ok] += one[:, ~ok]
    return out


def _staple_truth(patterns: np.ndarray) -> np.ndarray:
    """``(2, C, P)`` the no-label model's ``P(truth = c | stratum)``: the STAPLE posterior
    (:mod:`isle_fast.ensemble.estimate`) where the class may be present, 0 where the labels rule it out."""
    from isle_fast.ensemble.estimate import _bits, _split, _staple_class

    hu, hn, n = _split(patterns)
    b = _bits(n)
    truth = np.zeros((2,) + hu.shape)
    truth[0] = np.stack([_staple_class(hu[k], b, 200, 1e-10) for k in range(hu.shape[0])])
    return truth


def _semi_staple_class(u: np.ndarray, pos: np.ndarray, neg: np.ndarray, b: np.ndarray, iters: int = 200,
                       tol: float = 1e-10) -> np.ndarray:
    """``P(truth = 1 | pattern)`` of one class by EM with the labelled pixels' truth known.

    The binary Dawid-Skene / STAPLE model of :mod:`isle_fast.ensemble.estimate`
    (:func:`isle_fast.ensemble.estimate.staple_em`, the one EM of both), fitted
    on ``u`` (``(P,)`` unlabelled pixels per vote pattern, truth latent) and the
    labelled pixels ``pos`` / ``neg`` (``(P,)``, truth the class / not the class: fixed).
    """
    from isle_fast.ensemble.estimate import staple_em

    return staple_em(u, b, iters, tol, pos=pos, neg=neg)


def _semi_staple_truth(patterns: np.ndarray, lab: np.ndarray) -> np.ndarray:
    """``(G, C, P)``: :func:`_semi_staple_class` of every class where it may be present (group 0; the
    labelled strata ``lab (G, C, P, 3)`` fixed, the other pixels of ``patterns (G, C, P)`` latent), 0 where
    the image labels rule it out."""
    from isle_fast.ensemble.estimate import _bits

    g, c, p = patterns.shape
    b = _bits(int(p).bit_length() - 1)
    truth = np.zeros((g, c, p))
    for k in range(c):
        h, pos, ign = (lab[0, k, :, j].astype(np.float64) for j in range(3))
        u = np.maximum(patterns[0, k].astype(np.float64) - h, 0.0)
        truth[0, k] = _semi_staple_class(u, pos, np.maximum(h - pos - ign, 0.0), b)
    return truth


def _strata_rates(lab: np.ndarray, seen: np.ndarray, fallback: np.ndarray, kappa: float, pool: bool,
                  mix: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """``(r_pos, r_neg)``, each ``(..., G, C, P)``: the truth rates (the class, another class) of every
    stratum from the labelled strata ``lab (..., G, C, P, 3)`` (``seen``: the labelled images with each
    stratum; ``fallback (G, C, P)``: the no-label model's truth rate; ``mix``: its weight in the prior where
    the pooled rate is defined, with ``pool``)."""
    h, pos, ign = lab[..., 0], lab[..., 1], lab[..., 2]
    neg = np.maximum(h - pos - ign, 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        # per pattern, over the foreground classes: the truth, ignore and other-class shares
        tot = h[..., 1:, :].sum(axis=-2, keepdims=True)
        p_pos = pos[..., 1:, :].sum(axis=-2, keepdims=True) / tot
        p_ign = ign[..., 1:, :].sum(axis=-2, keepdims=True) / tot
        if not pool:
            p_pos = np.full_like(p_pos, np.nan)
        model = fallback * (1 - np.nan_to_num(p_ign))
        prior_pos = np.where(np.isnan(p_pos), model, (1.0 - mix) * p_pos + mix * model)
        prior_pos = np.broadcast_to(prior_pos, h.shape).copy()
        prior_pos[..., 0] = fallback[..., 0] if pool else prior_pos[..., 0]  # background keeps the model's
        prior_neg = np.clip(1 - np.nan_to_num(p_ign) - prior_pos, 0.0, 1.0)
        wt = seen / (seen + kappa) if kappa > 0 else (seen > 0).astype(np.float64)
        r_pos = np.where(h > 0, wt * pos / np.where(h > 0, h, 1) + (1 - wt) * prior_pos, prior_pos)
        r_neg = np.where(h > 0, wt * neg / np.where(h > 0, h, 1) + (1 - wt) * prior_neg, prior_neg)
    return r_pos, r_neg


def _strata_iou(lab: np.ndarray, seen: np.ndarray, exact: np.ndarray, unl: np.ndarray, fallback: np.ndarray,
                kappa: float, pool: bool, bits: np.ndarray, mix: float = 0.0) -> np.ndarray:
    """``(..., N, C)`` IoU (percent): the labelled strata ``exact (G, C, P, 3)`` counted exactly, the
    unlabelled pixels ``unl (G, C, P)`` at the truth rates of :func:`_strata_rates`."""
    r_pos, r_neg = _strata_rates(lab, seen, fallback, kappa, pool, mix)
    return _iou_at_rates(exact, unl, r_pos, r_neg, bits)


def _context_iou(r_pos: np.ndarray, r_neg: np.ndarray, lab_ctx: np.ndarray, exact_ctx: np.ndarray,
                 unl_ctx: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """``(..., N, C)`` IoU (percent) with the strata's rates ``r_pos, r_neg (..., G, C, P)`` refined by the
    distance to agreement (:func:`context_strata`).

    Per context bin ``b`` and pattern ``m`` the labelled foreground pixels of ``lab_ctx (..., G, B, C, P,
    3)`` (group 0, pooled over the classes: many pixels, few rates) give the odds of the truth in the bin
    against the odds over every bin (each rate smoothed by half a pixel: ``(pos + 1/2) / (pixels + 1)``);
    a class's rate of ``m`` is multiplied in odds by that ratio in bin ``b``. Background, the classes the
    image labels rule out and a bin no labelled pixel has keep the strata's rates; another class's rate
    takes what the class's rate gives up (the ignored share kept). The labelled pixels ``exact_ctx (G, B, C,
    P, 3)`` count exactly, the others ``unl_ctx (G, B, C, P)`` at the refined rates.
    """
    hb = lab_ctx[..., 0, :, 1:, :, 0].sum(axis=-2).astype(np.float64)  # (..., B, P)
    pb = lab_ctx[..., 0, :, 1:, :, 1].sum(axis=-2).astype(np.float64)
    rb = (pb + 0.5) / (hb + 1.0)
    rm = (pb.sum(axis=-2, keepdims=True) + 0.5) / (hb.sum(axis=-2, keepdims=True) + 1.0)
    ratio = np.where(hb > 0, (rb / (1.0 - rb)) / (rm / (1.0 - rm)), 1.0)  # (..., B, P)
    n_bins = lab_ctx.shape[-4]
    rp = np.repeat(r_pos[..., None, :, :], n_bins, axis=-3)  # (..., G, B, C, P)
    r0 = r_pos[..., 0, None, 1:, :]  # (..., 1, C - 1, P): group 0, foreground
    f = ratio[..., :, None, :]  # (..., B, 1, P)
    rp[..., 0, :, 1:, :] = r0 * f / (1.0 - r0 + r0 * f)
    rn = np.maximum(r_neg[..., None, :, :] + r_pos[..., None, :, :] - rp, 0.0)
    g, c, p = unl_ctx.shape[0], unl_ctx.shape[-2], unl_ctx.shape[-1]
    lead = rp.shape[:-4]
    return _iou_at_rates(exact_ctx.reshape((g * n_bins, c, p, 3)), unl_ctx.reshape((g * n_bins, c, p)),
                         rp.reshape(lead + (g * n_bins, c, p)), rn.reshape(lead + (g * n_bins, c, p)), bits)


def _iou_at_rates(exact: np.ndarray, unl: np.ndarray, r_pos: np.ndarray, r_neg: np.ndarray,
                  bits: np.ndarray) -> np.ndarray:
    """``(..., N, C)`` IoU (percent): the labelled strata ``exact (G, C, P, 3)`` counted exactly, the
    unlabelled pixels ``unl (G, C, P)`` at the truth rates ``r_pos`` (the class) and ``r_neg`` (another
    class) of their stratum (``(..., G, C, P)``); ``bits (P, N)`` the sets voting in every pattern."""
    e_pos = exact[..., 1]
    e_neg = np.maximum(exact[..., 0] - exact[..., 1] - exact[..., 2], 0)
    tp_m = (e_pos + unl * r_pos).sum(axis=-3)  # (..., C, P): the groups summed
    fp_m = (e_neg + unl * r_neg).sum(axis=-3)
    tp = np.einsum("...cm,mn->...nc", tp_m, bits)
    fp = np.einsum("...cm,mn->...nc", fp_m, bits)
    fn = np.einsum("...cm,mn->...nc", tp_m, 1.0 - bits)
    return 100.0 * metrics.ratio(tp, tp + fp + fn)


def iou_at_rates(exact: Any, patterns: Any, rates: Any) -> np.ndarray:
    """``(N, C)`` IoU (percent) of every set at known truth rates: what :func:`stratified_scores` counts when
    each stratum's rates are given instead of estimated (an oracle, where the rates are the data's own).

    The labelled strata ``exact`` count exactly; every other pixel of ``patterns`` at the truth rates of its
    stratum in ``rates`` (counts of the same layout as ``exact``: pixels, of them the class, ignored). A
    stratum ``rates`` never saw counts as not the class.

    Parameters
    ----------
    exact : (G, C, P, 3) int
        The labelled images' strata, summed (:func:`strata_counts`).
    patterns : (G, C, P) int
        Every image's vote patterns, the labelled ones included.
    rates : (G, C, P, 3) int or float
        The strata whose rates the other pixels take.
    """
    from isle_fast.ensemble.estimate import _bits

    e = np.asarray(exact, dtype=np.int64)
    h, pos, ign = (np.asarray(rates, dtype=np.float64)[..., j] for j in range(3))
    seen = h > 0
    r_pos = np.where(seen, pos / np.where(seen, h, 1.0), 0.0)
    r_neg = np.where(seen, np.maximum(h - pos - ign, 0.0) / np.where(seen, h, 1.0), 1.0)
    unl = np.maximum(np.asarray(patterns, dtype=np.int64) - e[..., 0], 0).astype(np.float64)
    return _iou_at_rates(e, unl, r_pos, r_neg, _bits(int(e.shape[-2]).bit_length() - 1))


def stratified_scores(labelled_strata: Any, patterns: Any, *, prior_images: float = STRATA_PRIOR_IMAGES,
                      choice_prior_images: float | None = STRATA_CHOICE_PRIOR_IMAGES, pool: bool = True,
                      model: str = STRATA_MODEL, members: Any = None, reps: int = 1000,
                      seed: int = 0, context: tuple[Any, Any] | None = None) -> dict[str, Any]:
    """Per-class IoU of every set on every image, from the labelled images' truth per vote stratum.

    Every image's vote patterns (``patterns``, the no-label pass) say how many
    pixels each stratum has (class ``c`` and the sets ``m`` that predict it);
    the labelled images (``labelled_strata``, :func:`strata_counts` per image)
    say which share of a stratum's pixels is truly ``c``, another class, or
    ignored. The labelled pixels count exactly; every other pixel at its
    stratum's truth rate: the labelled rate of the class and pattern, weighted
    ``k / (k + prior_images)`` (``k`` labelled images with the stratum) against
    the rate of the pattern pooled over the foreground classes (``pool``; an
    empirical-Bayes prior: "3 of 4 sets say c" means about the same for every
    class), and the no-label STAPLE posterior where the labelled images have no
    such pattern at all (background: always its own labelled rate and STAPLE).
    A class the labelled images lack thus takes the pooled rates of its own
    votes on every image. It is a stratified, model-assisted estimate of
    every set's intersection and union; with every image labelled it is the
    full-gt IoU exactly. Per class the set with the highest estimate is the choice.

    The choice and its probability use two weights: the choice (and the
    returned ``scores``) leans harder on the pooled rates (``choice_prior_images``,
    30: in a development run of the selection benchmark's data, 8 subsets per K,
    the gain kept at K = 100 rose from 74 % to 78 % over its 7 data sets and
    from 79 % to 85 % on 6 unseen synthetic ones, 20-50 about the same), which
    chooses better but is overconfident in its own bootstrap; the uncertainty
    comes from the calibrated weight (``prior_images``, 3).

    The uncertainty: a bootstrap over the labelled images (their strata
    resampled, the pooled rates with them; the labelled pixels stay exact),
    under the ``prior_images`` weight, ``p_best`` the share of resamples where
    the chosen set scores highest (over
    those where the sets do not all score the same), ``expected_loss`` the mean
    IoU it loses to the top. Exact counts and seeded resamples: deterministic.

    Parameters
    ----------
    labelled_strata : (K, G, C, P, 3) or (G, C, P, 3) int, or ImageCounts
        Per labelled image (or summed: no bootstrap); ``G`` = 2 with image
        labels (:func:`strata_counts`), 1 without (the groups summed). Held
        sparse (:class:`~isle_fast.metrics.ImageCounts`, as the passes return
        them) whatever is given: an image holds a few classes and patterns.
    patterns : (G, C, P) or (C, P) int
        Every image's vote patterns, the labelled images included (the same grouping).
    prior_images : float
        Labelled images with a stratum at which its own rate has half the weight (0: its own rate alone),
        in the bootstrap that gives ``p_best`` and ``expected_loss``.
    choice_prior_images : float, optional
        The same for the scores and the choice (None: ``prior_images``).
    pool : bool
        Shrink toward the rate pooled over the classes (else toward the model's).
    model : {'semi', 'staple'}
        The truth model of the prior (default :data:`STRATA_MODEL`, ``semi``).
        ``staple``: the no-label STAPLE posterior
        of every image's votes, used where no labelled image has the pattern
        (with ``pool``). ``semi``: STAPLE fitted by EM on every image's votes
        with the labelled pixels' truth fixed (:func:`_semi_staple_class`: each
        set's per-class sensitivity and false-positive rate from the labelled
        truth and the unlabelled votes together); with ``pool`` the prior is
        then ``SEMI_MODEL_WEIGHT`` (0.5) of the model's rate and the rest the
        pooled rate. It is the choice's prior only: ``p_best`` and
        ``expected_loss`` stay those of the ``staple`` bootstrap (with the
        semi model in the bootstrap too, p >= 0.9 was right 84 % of the time in
        the selection benchmark, against 86 % with this one).
    members : (N,) bool, optional
    reps, seed : int
        Bootstrap resamples (0: none) and their seed.
    context : (labelled, patterns), optional
        The same strata split by the distance to agreement (:func:`context_strata`): ``labelled``
        ``(K, G, B, C, P, 3)`` per labelled image or their ImageCounts (summed over the bins:
        ``labelled_strata``), ``patterns``
        ``(G, B, C, P)`` of every image. Every unlabelled pixel is then counted at its stratum's rate
        refined by its bin (:func:`_context_iou`: the odds of the truth per bin and pattern, pooled over the
        foreground classes of the labelled images), in the choice and in the bootstrap (the ratios
        resampled with the images).

    Returns
    -------
    dict
        ``scores`` (N, C), ``best`` (C,), ``p_best`` (C,), ``expected_loss`` (C,),
        ``labelled_weight`` (C,) the mean weight of the class's own labelled rates over its voting
        pixels, ``voting_pixels`` (C,) pixels some set predicts the class on (every image).
    """
    pat = np.asarray(patterns, dtype=np.int64)
    if pat.ndim == 2:
        pat = pat[None]
    strata = _per_image(labelled_strata, pat.ndim + 1)
    if pat.ndim != 3 or strata.shape != pat.shape + (3,) or pat.shape[0] not in (1, 2):
        raise InputError(f"labelled strata of shape {(strata.num_images,) + strata.shape} do not match vote "
                         f"patterns {pat.shape}")
    if prior_images < 0:
        raise InputError(f"{param('prior_images')} must be at least 0, not {prior_images}")
    if choice_prior_images is not None and choice_prior_images < 0:
        raise InputError(f"{param('choice_prior_images')} must be at least 0, not {choice_prior_images}")
    if model not in STRATA_MODELS:
        raise InputError(f"{param('model')} must be one of {', '.join(STRATA_MODELS)}, not {model!r}")
    g, c, p = pat.shape
    n = int(p).bit_length() - 1
    members = np.ones(n, dtype=bool) if members is None else np.asarray(members, dtype=bool)
    from isle_fast.ensemble.estimate import _bits

    bits = _bits(n)
    lab = strata.total()
    unl = (pat - lab[..., 0]).astype(np.float64)
    # pattern 0 (no set votes the class) is the same false negative of every set: immaterial to a choice
    unl[..., 0] = np.maximum(unl[..., 0], 0.0)
    if (unl < 0).any():
        raise InputError("the labelled images have more votes than every image's vote patterns: "
                         "the patterns must count every image, the labelled ones included")
    fallback = _staple_truth(pat if g == 2 else np.concatenate([pat, np.zeros_like(pat)]))[:g]
    # the choice's prior model; the bootstrap keeps the no-label one (its p is the calibrated one)
    choice_fallback, mix = (_semi_staple_truth(pat, lab), SEMI_MODEL_WEIGHT) if model == "semi" else (fallback, 0.0)
    kappa = float(prior_images)
    kappa_choice = kappa if choice_prior_images is None else float(choice_prior_images)
    seen = strata.component(0).indicator().total()
    ctx = None if context is None else _context_args(context, strata, lab, pat)
    if ctx is None:
        scores = _strata_iou(lab, seen, lab, unl, choice_fallback, kappa_choice, pool, bits, mix)
    else:
        scores = _context_iou(*_strata_rates(lab, seen, choice_fallback, kappa_choice, pool, mix), ctx[1], ctx[1],
                              ctx[2], bits)
    masked = np.where(members[:, None] & ~np.isnan(scores), scores, -np.inf)
    best = np.argmax(masked, axis=0).astype(np.int64)  # ties: the first set
    p_best = np.full(c, np.nan)
    loss = np.full(c, np.nan)
    if strata.num_images > 1 and reps > 0:
        p_best, loss = _strata_bootstrap(strata, ctx, lab, unl, fallback, kappa, pool, bits, members, best, reps,
                                         seed)
    voting = pat[..., 1:].sum(axis=(0, 2)).astype(np.float64)
    wt = seen / (seen + kappa) if kappa > 0 else (seen > 0).astype(np.float64)
    share = (pat[..., 1:] * wt[..., 1:]).sum(axis=(0, 2))
    return {"scores": scores, "best": best, "p_best": p_best, "expected_loss": loss,
            "labelled_weight": metrics.ratio(share, voting), "voting_pixels": voting}


#: bytes of one batch of the strata bootstrap's resamples (their summed strata and the rates and IoU made
#: from them, about 8 float64 arrays of a resample's strata size each): N = 12 sets would need tens of GiB
#: for 1000 resamples at once
STRATA_BOOTSTRAP_BYTES = 256 * 2**20


def _strata_bootstrap(strata: metrics.ImageCounts, ctx: tuple[metrics.ImageCounts, np.ndarray, np.ndarray] | None,
                      lab: np.ndarray,
                      unl: np.ndarray, fallback: np.ndarray, kappa: float, pool: bool, bits: np.ndarray,
                      members: np.ndarray, best: np.ndarray, reps: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(p_best, expected_loss)`` of :func:`stratified_scores`: the labelled images resampled ``reps`` times,
    batch by batch (:data:`STRATA_BOOTSTRAP_BYTES`), each batch reduced before the next."""
    c = strata.shape[-3]
    wts = metrics.bootstrap_weights(strata.num_images, reps, seed)
    arrays = [strata, strata.component(0).indicator()] + ([] if ctx is None else [ctx[0]])
    per_resample = 8 * 8 * max(int(np.prod(a.shape, dtype=np.int64)) for a in arrays)
    wins = np.zeros(c, dtype=np.int64)
    n_inf = np.zeros(c, dtype=np.int64)
    lost = np.zeros(c)
    for _, (boot, seen_b, *ctx_b) in metrics.bootstrap_batches(arrays, wts,
                                                               max(1, STRATA_BOOTSTRAP_BYTES // per_resample)):
        if ctx is None:
            it = _strata_iou(boot, seen_b, lab, unl, fallback, kappa, pool, bits)  # (b, N, C)
        else:
            it = _context_iou(*_strata_rates(boot, seen_b, fallback, kappa, pool), ctx_b[0], ctx[1], ctx[2], bits)
        m_it = np.where(members[None, :, None] & ~np.isnan(it), it, -np.inf)
        top = m_it.max(axis=1)
        low = np.where(members[None, :, None] & ~np.isnan(it), it, np.inf).min(axis=1)
        ch = m_it[:, best, np.arange(c)]
        informative = np.isfinite(top) & (top > low)
        n_inf += informative.sum(axis=0)
        wins += ((ch >= top) & informative).sum(axis=0)
        lost += np.where(np.isfinite(top), top - np.where(np.isfinite(ch), ch, 0.0), 0.0).sum(axis=0)
    return np.where(n_inf > 0, wins / np.maximum(n_inf, 1), 1.0), lost / reps


def _per_image(counts: Any, ndim: int) -> metrics.ImageCounts:
    """Per-image counts (:class:`~isle_fast.metrics.ImageCounts`, or ``(K,) + shape`` with ``shape`` of
    ``ndim - 1`` axes, or one summed ``shape``: one image) held sparse."""
    if isinstance(counts, metrics.ImageCounts):
        return counts
    a = np.asarray(counts, dtype=np.int64)
    return metrics.ImageCounts.from_dense(a[None] if a.ndim == ndim - 1 else a)


def _context_args(context: tuple[Any, Any], strata: metrics.ImageCounts, lab: np.ndarray, pat: np.ndarray
                  ) -> tuple[metrics.ImageCounts, np.ndarray, np.ndarray]:
    """``(per image (K, G, B, C, P, 3), labelled sum (G, B, C, P, 3), unlabelled (G, B, C, P))`` of
    :func:`stratified_scores`'s ``context``, checked against its strata (summed: ``lab``) and patterns."""
    lab_img = _per_image(context[0], 6)
    pat_ctx = np.asarray(context[1], dtype=np.int64)
    shape = lab_img.shape
    if (len(shape) != 5 or pat_ctx.ndim != 4 or lab_img.num_images != strata.num_images
            or shape[:1] + shape[2:] != strata.shape or pat_ctx.shape != shape[:4]):
        raise InputError(f"context strata of shape {(lab_img.num_images,) + shape} and patterns {pat_ctx.shape} "
                         f"do not match the strata {(strata.num_images,) + strata.shape}")
    lab_ctx = lab_img.total()
    if not (np.array_equal(lab_ctx.sum(axis=1), lab) and np.array_equal(pat_ctx.sum(axis=1), pat)):
        raise InputError("the context strata summed over their bins differ from the strata (or the context "
                         "patterns from the patterns): they must count the same images and pixels")
    unl = (pat_ctx - lab_ctx[..., 0]).astype(np.float64)
    unl[..., 0] = np.maximum(unl[..., 0], 0.0)
    if (unl < 0).any():
        raise InputError("the labelled images have more votes in some context bin than every image's "
                         "context patterns")
    return lab_img, lab_ctx, unl


def _strata_block(g: np.ndarray, idx_j: np.ndarray, idx_k: np.ndarray, shapes: np.ndarray, allowed: np.ndarray,
                  *blocks: np.ndarray, encodings: tuple[str, ...], thresholds: tuple[float, ...],
                  num_classes: int) -> np.ndarray:
    """``(1, 1, 1)`` object: the strata of one region of the gt and every set, image by image, as
    :class:`~isle_fast.metrics.ImageCounts` of ``(2, C, 2**N, 3)``.

    A score set's padding is no vote, as in the vote pass (:func:`isle_fast.ensemble.estimate.vote_labels`).
    """
    from isle_fast.backend import task_kernels
    from isle_fast.ensemble.estimate import vote_labels

    with task_kernels("cpu") as K:
        labs = vote_labels(K, blocks, encodings, thresholds, shapes, int(idx_j[0]), int(idx_k[0]))
    per = [metrics.ImageCounts.from_dense(
        strata_counts(g[m:m + 1], [a[m:m + 1] for a in labs], num_classes, allowed[m:m + 1])[None])
        for m in range(g.shape[0])]
    return _boxed(metrics.ImageCounts.stack(per, shape=(2, num_classes, 1 << len(labs), 3)), 3)


def _boxed(value: Any, ndim: int) -> np.ndarray:
    """``value`` as the one element of an object array of ``ndim`` axes (a dask block of Python objects)."""
    out = np.empty((1,) * ndim, dtype=object)
    out[(0,) * ndim] = value
    return out


def labelled_strata_pass(stacks: Sequence[Any], gt: Any, positions: Any, *, allowed: Any = None,
                         bg_threshold: float | None = None, progress: bool = True) -> metrics.ImageCounts:
    """:func:`strata_counts` of every gt image (``(2, C, 2**N, 3)`` each, held sparse: an
    :class:`~isle_fast.metrics.ImageCounts` of ``I_gt`` images), in one pass over the gt's images.

    Parameters
    ----------
    stacks : sequence of Stack
        The sets (aligned with each other).
    gt : Stack
        A ground truth of some of their images.
    positions : (I_gt,) int
        Every gt image's position in the sets (:func:`isle_fast.ensemble.partial.gt_positions`).
    allowed : (I_gt, C) bool, optional
        Image-level labels of the gt images.
    bg_threshold : float, optional
    progress : bool
    """
    from functools import partial

    import dask.array as da

    from isle_fast.backend import dask_scheduler
    from isle_fast.ensemble.evaluate import score_threshold
    from isle_fast.ensemble.graph import blockwise_args
    from isle_fast.ensemble.partial import subset_arrays
    from isle_fast.progress import dask_progress

    c = gt.num_classes
    g, arrays = subset_arrays(stacks, gt, np.asarray(positions, dtype=np.int64))
    ok = np.ones((gt.num_images, c), bool) if allowed is None else np.asarray(allowed, dtype=bool)
    ok_da = da.from_array(ok, chunks=(g.chunks[0], (c,)))
    func = partial(_strata_block, encodings=tuple(s.encoding for s in stacks),
                   thresholds=tuple(score_threshold(s, bg_threshold) if s.encoding == "scores" else -1.0
                                    for s in stacks), num_classes=c)
    one = lambda n: 1  # noqa: E731
    idx_j, idx_k = (da.arange(n, chunks=ch, dtype=np.int64) for n, ch in zip(g.shape[1:], g.chunks[1:]))
    shapes = da.from_array(np.asarray(gt.shapes, dtype=np.int64), chunks=(g.chunks[0], (2,)))
    arr = da.blockwise(func, "ijk", g, "ijk", idx_j, "j", idx_k, "k", shapes, "iz", ok_da, "iy",
                       *blockwise_args(arrays, stacks),
                       adjust_chunks={"i": one, "j": one, "k": one}, dtype=object, concatenate=True,
                       meta=np.empty((0,) * 3, dtype=object))
    with dask_progress("strata", quiet=not progress):
        parts = arr.compute(scheduler=dask_scheduler())
    # a block's images over every region of them: their regions' counts added
    return metrics.ImageCounts.stack([metrics.ImageCounts.add(list(parts[i].ravel())) for i in range(parts.shape[0])],
                                     shape=(2, c, 1 << len(stacks), 3))


def _context_block(shapes: np.ndarray, allowed: np.ndarray, *blocks: np.ndarray, with_gt: bool,
                   encodings: tuple[str, ...], thresholds: tuple[float, ...], num_classes: int) -> np.ndarray:
    """:func:`context_strata` of a block of whole images, each over its own ``rows x cols`` (a score set's
    padding no vote): with ``with_gt`` (the gt the first block) every image's, held sparse (a ``(1,)`` object
    array of :class:`~isle_fast.metrics.ImageCounts`); without it their vote patterns summed,
    ``(1, 2, B, C, 2**N)``."""
    from isle_fast.backend import task_kernels
    from isle_fast.ensemble.estimate import vote_labels

    g = blocks[0] if with_gt else None
    sets = blocks[1:] if with_gt else blocks
    with task_kernels("cpu") as K:
        labs = vote_labels(K, sets, encodings, thresholds, shapes, 0, 0)
    shape = (2, len(CONTEXT_RADII) + 1, num_classes, 1 << len(labs), 3)
    per, summed = [], np.zeros((1,) + shape[:-1], np.int64)
    for m in range(labs[0].shape[0]):
        r, c = (int(v) for v in shapes[m])
        one = context_strata(None if g is None else g[m:m + 1, :r, :c], [a[m:m + 1, :r, :c] for a in labs],
                             num_classes, allowed[m:m + 1])
        if with_gt:
            per.append(metrics.ImageCounts.from_dense(one[None]))
        else:
            summed[0] += one[..., 0]
    return _boxed(metrics.ImageCounts.stack(per, shape=shape), 1) if with_gt else summed


def context_pass(stacks: Sequence[Any], gt: Any = None, positions: Any = None, *, allowed: Any = None,
                 bg_threshold: float | None = None, progress: bool = True) -> np.ndarray | metrics.ImageCounts:
    """The strata by distance to agreement (:func:`context_strata`) of the sets' images, in one pass.

    The distance needs the whole image, so the pass reads whole images (as many
    per task as fit in :data:`isle_fast.ensemble.graph.MAX_TASK_BYTES`, at least one),
    whatever the stores' chunks.

    Parameters
    ----------
    stacks : sequence of Stack
        The sets (aligned with each other).
    gt : Stack, optional
        A ground truth of some of their images; without it every image of the sets is counted.
    positions : (I_gt,) int, optional
        With ``gt``: every gt image's position in the sets
        (:func:`isle_fast.ensemble.partial.gt_positions`; default the same order).
    allowed : (I, C) bool, optional
        Image-level labels of the images counted (the gt's, with ``gt``).
    bg_threshold : float, optional
    progress : bool

    Returns
    -------
    ndarray of int64 or ImageCounts
        Without ``gt``: ``(2, B, C, 2**N)``, every image's context vote patterns (``[..., 0]`` summed). With
        it: every gt image's ``(2, B, C, 2**N, 3)``, held sparse (:class:`~isle_fast.metrics.ImageCounts`).
    """
    from functools import partial

    import dask.array as da

    from isle_fast.backend import dask_scheduler
    from isle_fast.ensemble.evaluate import score_threshold
    from isle_fast.ensemble.graph import MAX_TASK_BYTES, aligned_arrays, blockwise_args
    from isle_fast.ensemble.partial import SetFrame, subset_arrays
    from isle_fast.progress import dask_progress

    frame = SetFrame(stacks[0]) if gt is None else gt
    c = frame.num_classes
    if gt is None:
        g = None
        _, arrays = aligned_arrays(stacks, frame, (1,) + tuple(int(v) for v in frame.padded_shape))  # type: ignore[arg-type]
    else:
        pos = np.arange(gt.num_images, dtype=np.int64) if positions is None else np.asarray(positions, np.int64)
        g, arrays = subset_arrays(stacks, gt, pos)
    rows, cols = (int(v) for v in (arrays[0].shape[1], arrays[0].shape[2]))
    per_pixel = 1 + sum(int(np.prod(s.shape[3:], dtype=np.int64)) * s.dtype.itemsize for s in stacks)
    k = max(1, min(frame.num_images, int(MAX_TASK_BYTES // max(1, rows * cols * per_pixel))))
    whole = (k, rows, cols)
    arrays = [a.rechunk(whole if a.ndim == 3 else whole + (a.shape[3],)) for a in arrays]
    n_img = arrays[0].shape[0]
    ok = np.ones((n_img, c), bool) if allowed is None else np.asarray(allowed, dtype=bool)
    ok_da = da.from_array(ok, chunks=(arrays[0].chunks[0], (c,)))
    shapes = da.from_array(np.asarray(frame.shapes, dtype=np.int64), chunks=(arrays[0].chunks[0], (2,)))
    func = partial(_context_block, with_gt=g is not None, encodings=tuple(s.encoding for s in stacks),
                   thresholds=tuple(score_threshold(s, bg_threshold) if s.encoding == "scores" else -1.0
                                    for s in stacks), num_classes=c)
    lead = [] if g is None else [g.rechunk(whole), "ijk"]
    one = lambda n: 1  # noqa: E731
    args = [shapes, "iz", ok_da, "iy", *lead, *blockwise_args(arrays, stacks)]
    shape = (2, len(CONTEXT_RADII) + 1, c, 1 << len(stacks), 3)
    with dask_progress("context", quiet=not progress, images=n_img):
        if g is None:
            # output axes apart from the inputs' (a score set's class axis is "c")
            arr = da.blockwise(func, "igbqm", *args, new_axes=dict(zip("gbqm", shape)), adjust_chunks={"i": one},
                               dtype=np.int64, concatenate=True, meta=np.empty((0,) * 5, dtype=np.int64))
            return np.asarray(arr.sum(axis=0).compute(scheduler=dask_scheduler()), dtype=np.int64)
        arr = da.blockwise(func, "i", *args, adjust_chunks={"i": one}, dtype=object, concatenate=True,
                           meta=np.empty((0,), dtype=object))
        return metrics.ImageCounts.stack(list(arr.compute(scheduler=dask_scheduler())), shape=shape)
