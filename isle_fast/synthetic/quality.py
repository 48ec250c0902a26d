"""Quality matrices of the simulated sets: the paper's components and its Tables 1, 3 and 4
(:data:`PAPER_SETS`, :data:`TABLE1_BEST`, :data:`PAPER_PSEUDO_IOU`) and :func:`default_quality`."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from isle_fast.errors import InputError
from isle_fast.stores.stack import VOC_CLASSES
from isle_fast.synthetic.samples import FG, NUM_CLASSES

__all__ = ["PAPER_SETS", "TABLE1_BEST", "PAPER_PSEUDO_IOU", "SOFT_BASE_QUALITY", "default_quality"]

#: The paper's four component methods (set names used by default).
PAPER_SETS: tuple[str, ...] = ("puzzlecam", "clims", "pmm", "drs")

#: Table 1 of the paper: which component is best on which foreground class.
TABLE1_BEST: dict[str, str] = {
    "bus": "pmm", "car": "pmm",
    "bottle": "drs", "chair": "drs", "train": "drs",
    "bicycle": "clims", "boat": "clims", "diningtable": "clims", "motorbike": "clims",
    "person": "clims", "sofa": "clims", "tvmonitor": "clims",
    "aeroplane": "puzzlecam", "bird": "puzzlecam", "cat": "puzzlecam", "cow": "puzzlecam",
    "dog": "puzzlecam", "horse": "puzzlecam", "pottedplant": "puzzlecam", "sheep": "puzzlecam",
}

#: Tables 3 and 4 of the paper: per-class IoU (%) of the final pseudo labels on VOC2012 train,
#: rows in :data:`PAPER_SETS` order, columns in :data:`~isle_fast.stores.stack.VOC_CLASSES` order.
PAPER_PSEUDO_IOU: np.ndarray = np.array([  # the paper's table: a row a line
    # bkg  aero  bike  bird  boat  bottle bus  car   cat   chair cow   table dog   horse motor person plant sheep sofa train  tv  # noqa: E501
    [88.6, 79.2, 43.7, 89.0, 61.8, 72.1, 83.3, 76.0, 92.0, 29.5, 86.0, 44.0, 91.6, 83.1, 80.1, 42.8, 68.9, 92.6, 53.4, 64.8, 42.6],  # noqa: E501
    [89.8, 71.2, 45.4, 81.7, 70.2, 67.6, 84.0, 75.7, 90.0, 20.3, 84.2, 57.8, 86.9, 80.9, 80.8, 72.7, 48.4, 90.3, 56.5, 68.1, 58.4],  # noqa: E501
    [89.5, 76.8, 43.9, 88.1, 65.8, 76.0, 84.2, 78.0, 91.2, 30.6, 84.3, 48.5, 89.3, 82.0, 79.0, 61.4, 66.5, 89.9, 54.4, 66.4, 38.6],  # noqa: E501
    [90.1, 78.9, 45.3, 85.8, 68.4, 80.8, 83.8, 77.4, 90.6, 31.5, 84.0, 41.2, 88.7, 80.0, 79.8, 65.4, 62.6, 89.9, 55.0, 77.0, 41.3],  # noqa: E501
])

#: Mean quality of the default soft sets (raw CAMs are worse than refined pseudo labels).
SOFT_BASE_QUALITY = 0.40

def default_quality(
    set_names: Sequence[str] = PAPER_SETS,
    *,
    best: Mapping[str, str] | None = None,
    base: float = 0.62,
    gain: float = 0.12,
    spread: float = 0.08,
    seed: int = 0,
) -> np.ndarray:
    """A quality matrix in which every set is best on different classes and mean quality is close.

    Parameters
    ----------
    set_names : sequence of str
        The sets (rows).
    best : mapping class name -> set name, optional
        Which set is best on which foreground class. Default: the paper's
        Table 1 (:data:`TABLE1_BEST`) when ``set_names`` are the paper's four
        methods (any order, case-insensitive), else class ``c`` goes to set
        ``(c - 1) % N``.
    base : float
        Mean quality of every set (rows are shifted to have this mean over
        the foreground, as the paper's components have close mIoU).
    gain : float
        How much the best set of a class is above ``base`` (before the shift).
    spread : float
        The other sets of a class are ``base - U(0, spread)`` (before the shift),
        and always at least ``gain / 2`` below the best set.
    seed : int
        Seed of the jitter.

    Returns
    -------
    ndarray, (N, 21), float64
        Column 0 (background) is NaN: background quality is not set, its IoU
        follows from the foreground errors.
    """
    names = [str(s) for s in set_names]
    n = len(names)
    if n < 1:
        raise InputError("default_quality needs at least one set name")
    lower = [s.lower() for s in names]
    if best is None:
        if sorted(lower) == sorted(PAPER_SETS):
            best = {c: names[lower.index(s)] for c, s in TABLE1_BEST.items()}
        else:
            best = {VOC_CLASSES[c]: names[(c - 1) % n] for c in range(1, NUM_CLASSES)}
    rng = np.random.default_rng([int(seed), 11])
    q = np.full((n, NUM_CLASSES), np.nan)
    best_idx = np.zeros(NUM_CLASSES, dtype=np.int64)
    for c in range(1, NUM_CLASSES):
        cname = VOC_CLASSES[c]
        if cname not in best:
            raise InputError(f"best: no set given for class {cname!r}")
        if best[cname] not in names:
            raise InputError(f"best: set {best[cname]!r} (class {cname!r}) is not one of {names}")
        b = names.index(best[cname])
        best_idx[c] = b
        q[:, c] = base - rng.uniform(0.0, spread, size=n)
        q[b, c] = base + gain
    # shift the non-best entries of every row so that every row has mean `base`
    for i in range(n):
        others = [c for c in range(1, NUM_CLASSES) if best_idx[c] != i]
        if not others:
            continue
        delta = (base * FG - np.nansum(q[i, 1:])) / len(others)
        for c in others:
            q[i, c] = min(q[i, c] + delta, q[best_idx[c], c] - gain / 2)
    return np.clip(q, 0.0, 1.0)


def _as_quality(quality: Any, n: int, what: str) -> np.ndarray:
    q = np.asarray(quality, dtype=np.float64)
    if q.ndim == 1 and q.shape[0] == n:
        q = np.repeat(q[:, None], NUM_CLASSES, axis=1)
    if q.ndim != 2 or q.shape[0] != n or q.shape[1] not in (FG, NUM_CLASSES):
        raise InputError(f"{what} must have shape ({n}, {FG}) or ({n}, {NUM_CLASSES}) "
                         f"(sets x classes), or ({n},); got {q.shape}")
    if q.shape[1] == FG:
        q = np.concatenate([np.full((n, 1), np.nan), q], axis=1)
    q = q.copy()
    q[:, 0] = np.nan
    fg = q[:, 1:]
    if fg.size and (not np.all(np.isfinite(fg)) or fg.min() < 0 or fg.max() > 1):
        raise InputError(f"{what}: foreground qualities must lie in [0, 1]")
    return q
