"""ISLE without pixel labels: each set's per-class quality estimated from the sets themselves.

One pass over the sets (no ground truth) counts, per class, the joint votes
of the N sets: ``patterns[0, c, m]`` pixels where exactly the sets in bit
mask ``m`` predict class ``c`` (the ``vote_patterns`` kernel, image by image;
score sets are decoded first). With image-level labels (``cls_labels.npy``
and the other sources of :mod:`isle_fast.stores.image_labels`) the pixels
of images whose labels rule class ``c`` out are counted apart, in
``patterns[1, c]``: there the truth is known (not ``c``), so every vote for
``c`` is a false positive of that set. (Dropping those votes instead, as the
merge does, hides the sets' confusions from the estimate and measured worse.)
Every estimator works on these exact counts only, so it is deterministic
and independent of chunking and scheduling.

Estimators (``method``)
-----------------------
``agreement``
    Leave-one-out consensus: for set ``n`` and class ``c``, the reference is
    "at least half of the other N-1 sets predict ``c``" (and "not ``c``" where
    the image labels rule it out); the estimate is set ``n``'s IoU against
    that reference. Needs N >= 2 (with 2 sets each is scored against the
    other, which cannot rank them: both get the same IoU).
``pairwise``
    The mean of set ``n``'s IoU against each other set taken as the truth
    (votes for ``c`` the image labels rule out are false positives of
    both): a set that agrees with every other one scores high.
``staple``
    A binary Dawid-Skene / STAPLE model per class fitted by EM on the 2**N
    vote patterns: a latent true label with prior ``pi``, each set a
    sensitivity and a specificity, sets conditionally independent given the
    truth. Initialised from the vote share, 200 EM steps at most (stops when
    no parameter moves by 1e-10). The model is fitted on the pixels where the
    class may be present only; the pixels the image labels rule out are known
    negatives (posterior 0) whose votes are exact false positives in the IoU,
    but they do not enter the fitted false-positive rates: pooled with the
    rest they dilute the rates of the images that have the class (where a
    set's false positives sit, along object boundaries), the posterior then
    says "present" wherever any set votes, and in ``benchmarks/selection.py``
    the pooled fit kept 0.569 of the gain on average against 0.726 (0.455
    against 0.714 on six held-out synthetic seeds). The estimate is the
    expected IoU of every set against the posterior truth:
    ``sum w b / sum (w b + (1-w) b + w (1-b))`` over patterns (``w`` the
    posterior, ``b`` the set's vote).
``combined``
    The mean of the ``staple`` and ``pairwise`` estimates (IoU in percent):
    the prior of the labelled-subset blend (:data:`PRIOR_ESTIMATOR`).
``rank`` (default)
    A rank vote of ``staple`` and ``pairwise``: per class each set scores its
    rank among the N sets under each of the two (0 for the lowest, N-1 for
    the highest, ties at the same rank), the score is the mean of the two
    ranks in percent of N-1, and a tie of the sum goes to the higher
    ``staple`` estimate (added at 1e-4 of its value). It is a score for the
    choice, not an IoU. Ranks keep the two estimators' different scales
    (pairwise IoU is far below the truth, STAPLE's close to it) from letting
    one overrule the other, where the mean of their values lets pairwise's
    wide spread decide. It kept the most gain in ``benchmarks/selection.py``
    on average and on the worst data set, and on six held-out synthetic
    seeds too (see the README).

The selection then takes the set with the highest estimate per class
(:func:`isle_fast.ensemble.selection.select`). How well each estimator
picks, against a full ground truth, is measured by ``benchmarks/selection.py``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Sequence

import numpy as np

from isle_fast import metrics
from isle_fast.errors import InputError, param
from isle_fast.stores.stack import Stack, check_aligned

__all__ = ["ESTIMATORS", "Estimate", "estimate", "vote_patterns_pass", "estimate_from_patterns",
           "agreement_iou", "pairwise_iou", "staple_iou", "combined_iou", "rank_score", "DEFAULT_ESTIMATOR",
           "PRIOR_ESTIMATOR", "blend_scores"]

ESTIMATORS = ("agreement", "pairwise", "staple", "combined", "rank")
#: the estimator used when none is named (the most gain kept in benchmarks/selection.py, on average and on its
#: worst data set)
DEFAULT_ESTIMATOR = "rank"
#: the estimator whose IoU is the prior of the labelled-subset blend (an IoU in percent, which ``rank`` is not)
PRIOR_ESTIMATOR = "combined"


def _bits(n: int) -> np.ndarray:
    """``(2**n, n)`` 0/1: bit ``k`` of every pattern."""
    m = np.arange(1 << n)
    return ((m[:, None] >> np.arange(n)[None, :]) & 1).astype(np.float64)


def _split(patterns: Any) -> tuple[np.ndarray, np.ndarray, int]:
    """``(unknown, known negative, N)`` from ``(C, P)`` or ``(2, C, P)`` vote counts."""
    h = np.asarray(patterns, dtype=np.int64)
    if h.ndim == 2:
        h = np.stack([h, np.zeros_like(h)])
    if h.ndim != 3 or h.shape[0] != 2 or h.shape[2] < 2 or h.shape[2] & (h.shape[2] - 1):
        raise InputError(f"vote patterns must have shape (C, 2**N) or (2, C, 2**N), not {h.shape}")
    return h[0].astype(np.float64), h[1].astype(np.float64), int(h.shape[2]).bit_length() - 1


def _iou_against(unknown: np.ndarray, negative: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """``(N, C)`` IoU in percent of every set against a soft reference ``truth[c, m]`` in [0, 1]
    on the ``unknown`` pixels; every vote on the known ``negative`` pixels is a false positive."""
    c, p = unknown.shape
    b = _bits(int(p).bit_length() - 1)  # (P, N)
    tp = np.einsum("cm,cm,mn->nc", unknown, truth, b)
    fp = np.einsum("cm,cm,mn->nc", unknown, 1.0 - truth, b) + np.einsum("cm,mn->nc", negative, b)
    fn = np.einsum("cm,cm,mn->nc", unknown, truth, 1.0 - b)
    return 100.0 * metrics.ratio(tp, tp + fp + fn)


def agreement_iou(patterns: Any) -> np.ndarray:
    """``(N, C)`` estimated IoU: each set against the leave-one-out consensus of the others (percent).

    The consensus for set ``n`` says class ``c`` where at least half of the
    other sets (``2 * votes >= N - 1``) predict it.
    """
    hu, hn, n = _split(patterns)
    c, p = hu.shape
    if n < 2:
        raise InputError("the agreement estimate needs at least two sets")
    b = _bits(n)
    votes = b.sum(axis=1)
    out = np.empty((n, c))
    for k in range(n):
        others = votes - b[:, k]
        cons = (2 * others >= n - 1).astype(np.float64)  # (P,)
        out[k] = _iou_against(hu, hn, np.broadcast_to(cons, (c, p)))[k]
    return out


def pairwise_iou(patterns: Any) -> np.ndarray:
    """``(N, C)`` estimated IoU: the mean IoU of each set against every other set as the reference (percent)."""
    hu, hn, n = _split(patterns)
    if n < 2:
        raise InputError("the pairwise estimate needs at least two sets")
    b = _bits(n)
    out = np.zeros((n, hu.shape[0]))
    for k in range(n):
        acc = [_iou_against(hu, hn, np.broadcast_to(b[:, r], hu.shape))[k] for r in range(n) if r != k]
        with np.errstate(all="ignore"):
            out[k] = metrics.nanmean(np.stack(acc), axis=0)
    return out


def staple_em(u: np.ndarray, b: np.ndarray, iters: int = 200, tol: float = 1e-10, pos: np.ndarray | None = None,
              neg: np.ndarray | None = None) -> np.ndarray:
    """``P(truth = 1 | pattern)`` of one class by EM (binary Dawid-Skene / STAPLE), some pixels' truth known.

    The model: a prior, and per set a sensitivity and a false-positive rate,
    the sets conditionally independent given the truth. Fitted on ``u``
    (``(P,)`` pixels per vote pattern whose truth is latent) and, optionally,
    labelled pixels ``pos`` / ``neg`` (``(P,)``, truth the class / not the
    class: held fixed). Starts from the labelled truth share where a pattern
    has labelled pixels, else the vote share; stops when no parameter moves by
    ``tol`` (at most ``iters`` steps). Without labelled pixels it is the
    no-label STAPLE fit; all zeros when there are no pixels at all. The one EM
    of the no-label (:func:`staple_iou`) and the semi-supervised
    (:func:`isle_fast.ensemble.uncertainty.stratified_scores`) models.
    """
    u = np.asarray(u, dtype=np.float64)
    pos = np.zeros_like(u) if pos is None else np.asarray(pos, dtype=np.float64)
    neg = np.zeros_like(u) if neg is None else np.asarray(neg, dtype=np.float64)
    lab = pos + neg
    if u.sum() + lab.sum() <= 0:
        return np.zeros(u.shape[0])
    w = np.where(lab > 0, pos / np.where(lab > 0, lab, 1.0), b.mean(axis=1))  # labelled share, else vote share
    eps = 1e-9
    prev = None
    for _ in range(iters):
        t1 = pos + u * w
        t0 = neg + u * (1.0 - w)
        n1, n0 = t1.sum(), t0.sum()
        pi = np.clip(n1 / max(n1 + n0, eps), eps, 1 - eps)
        sens = np.clip(t1 @ b / max(n1, eps), eps, 1 - eps)          # P(vote | truth 1)
        fpr = np.clip(t0 @ b / max(n0, eps), eps, 1 - eps)           # P(vote | truth 0)
        l1 = np.log(pi) + b @ np.log(sens) + (1 - b) @ np.log(1 - sens)
        l0 = np.log(1 - pi) + b @ np.log(fpr) + (1 - b) @ np.log(1 - fpr)
        w = 1.0 / (1.0 + np.exp(np.clip(l0 - l1, -700, 700)))
        params = np.concatenate([[pi], sens, fpr])
        if prev is not None and np.max(np.abs(params - prev)) < tol:
            break
        prev = params
    return w


def _staple_class(h: np.ndarray, b: np.ndarray, iters: int, tol: float) -> np.ndarray:
    """Posterior ``P(truth = 1 | pattern)`` of one class by EM (binary Dawid-Skene) on the pixels ``h`` where
    the class may be present (:func:`staple_em` without labelled pixels)."""
    return staple_em(h, b, iters, tol)


def staple_iou(patterns: Any, iters: int = 200, tol: float = 1e-10) -> np.ndarray:
    """``(N, C)`` estimated IoU: each set against the per-class Dawid-Skene / STAPLE posterior (percent)."""
    hu, hn, n = _split(patterns)
    b = _bits(n)
    truth = np.stack([_staple_class(hu[k], b, iters, tol) for k in range(hu.shape[0])])
    return _iou_against(hu, hn, truth)


#: labelled images a class needs before its labelled IoU outweighs the no-label estimate (blend_scores)
BLEND_PRIOR_IMAGES = 10.0


def blend_scores(labelled_iou: Any, class_images: Any, estimated_iou: Any,
                 prior_images: float = BLEND_PRIOR_IMAGES) -> np.ndarray:
    """``(N, C)`` scores from a few labelled images with the no-label estimate as a prior.

    Per class ``c``: ``w * labelled + (1 - w) * estimated`` with
    ``w = n_c / (n_c + prior_images)`` (``n_c``: labelled images containing
    the class); the estimate alone where the labelled IoU is undefined. With
    100 labelled images it lost less IoU than either alone in
    ``benchmarks/selection.py`` (mode ``K=... + estimate``).
    """
    lab = np.asarray(labelled_iou, dtype=np.float64)
    est = np.asarray(estimated_iou, dtype=np.float64)
    n_c = np.asarray(class_images, dtype=np.float64)
    w = n_c / (n_c + float(prior_images))
    out = w[None, :] * lab + (1.0 - w[None, :]) * est
    return np.where(np.isnan(lab), est, out)


def combined_iou(patterns: Any) -> np.ndarray:
    """``(N, C)`` estimated IoU: the mean of :func:`staple_iou` and :func:`pairwise_iou` (percent; either
    alone where the other is undefined)."""
    both = np.stack([staple_iou(patterns), pairwise_iou(patterns)])
    return metrics.nanmean(both, axis=0)


def _ranks(scores: np.ndarray) -> np.ndarray:
    """``(N, C)`` rank of every set per class, 0 for the lowest (NaN lowest); tied values share the lower rank."""
    v = np.where(np.isnan(scores), -np.inf, scores)
    return (v[:, None, :] > v[None, :, :]).sum(axis=1).astype(np.float64)


def rank_score(patterns: Any) -> np.ndarray:
    """``(N, C)`` choice score: the mean rank of each set under :func:`staple_iou` and :func:`pairwise_iou`
    in percent of N-1, ties to the higher STAPLE estimate (not an IoU; see the module docstring)."""
    st, pw = staple_iou(patterns), pairwise_iou(patterns)
    n = st.shape[0]
    score = 100.0 * (_ranks(st) + _ranks(pw)) / (2.0 * (n - 1))
    undefined = np.isnan(st) & np.isnan(pw)
    return np.where(undefined, np.nan, score + 1e-4 * np.nan_to_num(st))


def estimate_from_patterns(patterns: Any, method: str = DEFAULT_ESTIMATOR) -> np.ndarray:
    """``(N, C)`` estimated IoU (percent) by ``method`` (one of :data:`ESTIMATORS`)."""
    if method not in ESTIMATORS:
        raise InputError(f"{param('method')} must be one of {', '.join(ESTIMATORS)}, not {method!r}")
    fn = {"agreement": agreement_iou, "pairwise": pairwise_iou, "staple": staple_iou,
          "combined": combined_iou, "rank": rank_score}[method]
    return fn(patterns)


@dataclass
class Estimate:
    """Per-class quality of N sets estimated without pixel labels (in place of an :class:`Evaluation`).

    Attributes
    ----------
    classes, set_names : list of str
    patterns : (2, C, 2**N) int64
        The joint vote counts the estimate comes from: ``[0]`` where the
        class may be present, ``[1]`` where the image labels rule it out.
    method : str
        The estimator.
    iou : (N, C) float64
        Estimated IoU in percent (NaN where undefined); with ``method='rank'`` the choice score.
    image_labels : str or None
        Where the image-level labels came from.
    """

    classes: list[str]
    set_names: list[str]
    patterns: np.ndarray
    method: str
    iou: np.ndarray
    image_labels: str | None = None
    set_paths: list[str] = field(default_factory=list)
    seconds: float = 0.0
    image_stats: None = None
    backend: str = "cpu"

    @property
    def average(self) -> str:
        return f"estimate ({self.method}, no pixel labels)"

    @property
    def miou(self) -> np.ndarray:
        """(N,) estimated mIoU."""
        return metrics.miou(self.iou)

    @property
    def gt_pixels(self) -> np.ndarray:
        """(C,) pixels any set predicts for the class (a class no set predicts cannot be ranked)."""
        return self.patterns[0, :, 1:].sum(axis=1)

    def select(self, sets: Sequence[str | int] | None = None):
        """The set with the highest estimate per class (:func:`isle_fast.ensemble.selection.select`)."""
        from isle_fast.ensemble.selection import select

        return select(self, sets=sets)

    def table(self, selection: Any = None) -> str:
        """Plain-text table of the estimated IoU, chosen set marked ``*``."""
        from isle_fast.ensemble.evaluate import Evaluation

        sel = selection if selection is not None else self.select()
        return Evaluation.table(_View(self), sel)  # type: ignore[arg-type]  # the same layout

    def to_json(self, selection: Any = None) -> dict:
        """Estimated per-set IoU / mIoU, the selection and the method (JSON; no pixel labels)."""
        sel = selection if selection is not None else self.select()
        return {
            "classes": list(self.classes),
            "sets": {n: {"iou_estimate": metrics.jsonable(self.iou[k]), "miou_estimate":
                         metrics.jsonable(self.miou[k]),
                         "path": self.set_paths[k] if k < len(self.set_paths) else None}
                     for k, n in enumerate(self.set_names)},
            "selection": sel.mapping(),
            "background_set": self.set_names[int(sel.best[0])],
            "gt": None,
            "estimator": self.method,
            "estimate_is": "rank score (0-100), not an IoU" if self.method == "rank" else "IoU (%)",
            "image_labels": self.image_labels,
            "voting_pixels": int(self.patterns[:, 0].sum()) if self.patterns.size else 0,
        }


class _View:
    """The attributes :meth:`Evaluation.table` reads, from an :class:`Estimate`."""

    def __init__(self, est: Estimate):
        self.classes, self.set_names, self.iou, self.miou = est.classes, est.set_names, est.iou, est.miou

    def select(self):  # pragma: no cover - table is always given a selection
        raise AssertionError


def vote_labels(K: Any, blocks: Sequence[np.ndarray], encodings: Sequence[str], thresholds: Sequence[float],
                shapes: np.ndarray, row0: int, col0: int) -> list[np.ndarray]:
    """The label maps the vote passes count, of one region of every set (C-contiguous uint8).

    A label set's block as it is; a score set's decoded by ``K`` (the task's kernels) at its threshold
    (stored units, -1: off), its padding (every slice 0, which decodes to background) set to 255, no
    vote, as a label set stores it: padding is never counted as the sets agreeing on background.
    ``shapes``: the region's images' (rows, columns); ``row0, col0``: where the region starts in the
    padded image.
    """
    from isle_fast.ensemble.merge import _fill_padding

    labs = []
    for b, e, t in zip(blocks, encodings, thresholds):
        b = np.ascontiguousarray(b)
        if e == "labels":
            labs.append(b)
            continue
        lab = np.require(np.asarray(K.decode_scores(b, t)), np.uint8, ["C", "W"])
        _fill_padding(lab, shapes, row0, col0, 255)
        labs.append(lab)
    return labs


def _votes_block(idx: np.ndarray, idx_j: np.ndarray, idx_k: np.ndarray, shapes: np.ndarray, allowed: np.ndarray,
                 *blocks: np.ndarray, encodings: tuple[str, ...], thresholds: tuple[float, ...], num_classes: int,
                 split: bool) -> np.ndarray:
    """``(1, 1, 1, 2, C, 2**N)`` vote patterns of one region of every set (``split``: image by image,
    the classes an image's labels rule out apart; a score set's padding no vote: :func:`vote_labels`)."""
    from isle_fast.backend import task_kernels
    from isle_fast.kernels import cpu

    with task_kernels("cpu") as K:
        labs = vote_labels(K, blocks, encodings, thresholds, shapes, int(idx_j[0]), int(idx_k[0]))
        p = 1 << len(labs)
        out = np.zeros((2, num_classes, p), dtype=np.int64)
        if not split:
            out[0] = cpu.vote_patterns(tuple(labs), num_classes)
        else:
            for m in range(labs[0].shape[0]):
                h = cpu.vote_patterns(tuple(a[m:m + 1] for a in labs), num_classes)
                ok = np.asarray(allowed[m], dtype=bool).copy()
                ok[0] = True
                out[0][ok] += h[ok]
                out[1][~ok] += h[~ok]
    return out[None, None, None]


def check_vote_sets(sets: Sequence[Any]) -> list[Stack]:
    """The sets a pass over their joint votes takes, opened: 2 to ``MAX_VOTE_SETS`` aligned pseudo-label sets
    of labels or scores (an :class:`InputError` naming the set or the count otherwise)."""
    from isle_fast.ensemble.graph import SET_KINDS
    from isle_fast.kernels.checks import MAX_VOTE_SETS
    from isle_fast.stores.stack import kind_phrase, open_stack

    stacks = [s if isinstance(s, Stack) else open_stack(s) for s in sets]
    if len(stacks) < 2:
        raise InputError("selection without pixel labels needs at least two sets to compare")
    if len(stacks) > MAX_VOTE_SETS:
        raise InputError(f"selection without pixel labels compares at most {MAX_VOTE_SETS} sets, "
                         f"not {len(stacks)}")
    for s in stacks:
        if s.kind not in SET_KINDS or s.encoding not in ("labels", "scores"):
            raise InputError(f"set {s.path} is {kind_phrase(s.kind)} ({s.encoding}); a pseudo-label set "
                             "is a 'pseudo' or 'ensemble' store of labels or scores")
    check_aligned(stacks)
    return stacks


def vote_patterns_pass(sets: Sequence[Any], *, image_labels: Any = None, bg_threshold: float | None = None,
                       progress: bool = True) -> tuple[np.ndarray, list[Stack], np.ndarray | None]:
    """One pass over the sets: the ``(2, C, 2**N)`` joint vote counts, the opened sets and the labels used.

    Parameters
    ----------
    sets : sequence of path, URL or Stack
        Two to twelve pseudo-label sets, aligned with each other.
    image_labels : path, Stack or (I, C) bool array, optional
        Image-level labels (:func:`isle_fast.stores.image_labels.resolve_image_labels`);
        the pixels of an image whose labels rule a class out are counted apart.
    bg_threshold : float, optional
        Background threshold of score sets ([0, 1]).
    progress : bool
    """
    import dask.array as da

    from isle_fast.backend import dask_scheduler
    from isle_fast.ensemble.evaluate import check_bg_threshold, score_threshold
    from isle_fast.ensemble.graph import aligned_arrays, blockwise_args, work_chunks
    from isle_fast.ensemble.partial import SetFrame
    from isle_fast.progress import dask_progress

    bg_threshold = check_bg_threshold(bg_threshold)
    stacks = check_vote_sets(sets)
    frame = SetFrame(stacks[0])
    c = frame.num_classes
    allowed = None
    if image_labels is not None:
        from isle_fast.stores.image_labels import resolve_image_labels

        allowed = resolve_image_labels(image_labels, frame.ids, frame.classes, where=f"the set {frame.path}")
    grid = work_chunks(stacks, frame)  # type: ignore[arg-type]  # a SetFrame stands for the gt's layout
    g, arrays = aligned_arrays(stacks, frame, grid)  # type: ignore[arg-type]
    idx, idx_j, idx_k = (da.arange(n, chunks=ch, dtype=np.int64) for n, ch in zip(g.shape, g.chunks))
    shapes = da.from_array(np.asarray(frame.shapes, dtype=np.int64), chunks=(g.chunks[0], (2,)))
    allowed_np = allowed if allowed is not None else np.ones((frame.num_images, c), dtype=bool)
    allowed_da = da.from_array(allowed_np, chunks=(g.chunks[0], (c,)))
    func = partial(_votes_block, encodings=tuple(s.encoding for s in stacks),
                   thresholds=tuple(score_threshold(s, bg_threshold) if s.encoding == "scores" else -1.0
                                    for s in stacks),
                   num_classes=c, split=allowed is not None)
    one = lambda n: 1  # noqa: E731
    arr = da.blockwise(func, "ijkscm", idx, "i", idx_j, "j", idx_k, "k", shapes, "iz", allowed_da, "iy",
                       *blockwise_args(arrays, stacks),
                       new_axes={"s": 2, "c": c, "m": 1 << len(stacks)},
                       adjust_chunks={"i": one, "j": one, "k": one}, dtype=np.int64, concatenate=True,
                       meta=np.empty((0,) * 6, dtype=np.int64))
    with dask_progress("votes", quiet=not progress):
        patterns = np.asarray(arr.sum(axis=(0, 1, 2)).compute(scheduler=dask_scheduler()), dtype=np.int64)
    return patterns, stacks, allowed


def estimate(sets: Sequence[Any], *, method: str = DEFAULT_ESTIMATOR, image_labels: Any = None,
             bg_threshold: float | None = None, progress: bool = True) -> Estimate:
    """Estimate every set's per-class IoU without pixel labels (see the module docstring).

    Parameters
    ----------
    sets : sequence of path, URL or Stack
        Two to twelve pseudo-label sets (labels or scores), aligned.
    method : {'agreement', 'pairwise', 'staple', 'combined', 'rank'}
        The estimator (``rank`` gives a choice score, not an IoU).
    image_labels : path, Stack or (I, C) bool array, optional
        Image-level labels of the sets' images (recommended: WSSS has them).
    bg_threshold : float, optional
    progress : bool

    Returns
    -------
    Estimate
    """
    if method not in ESTIMATORS:
        raise InputError(f"{param('method')} must be one of {', '.join(ESTIMATORS)}, not {method!r}")
    t0 = time.perf_counter()
    patterns, stacks, _ = vote_patterns_pass(sets, image_labels=image_labels, bg_threshold=bg_threshold,
                                             progress=progress)
    from isle_fast.ensemble.graph import unique_names
    from isle_fast.ensemble.merge import _labels_source

    return Estimate(classes=list(stacks[0].classes), set_names=unique_names(stacks), patterns=patterns,
                    method=method, iou=estimate_from_patterns(patterns, method),
                    image_labels=_labels_source(image_labels), set_paths=[s.path for s in stacks],
                    seconds=time.perf_counter() - t0)
