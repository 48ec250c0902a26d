"""ISLE step 2, second half: the best set for every class (the paper's Algorithm 2).

Rules
-----
* For every class the set with the highest IoU wins; ties go to the set given
  first (Algorithm 2 keeps the first maximum: ``if score > top_c``).
* A class with no ground-truth pixels cannot be scored fairly (a set that
  never predicts it has an undefined IoU, one that wrongly predicts it has
  0); it goes to the first allowed set.
* ``sets=[...]`` restricts the choice to some sets (the paper's ISLE-2 is
  ``sets=['PuzzleCAM', 'CLIMS']``); the other sets are then not part of the
  ensemble at all.
* The background entry ``best[0]`` is the allowed set best on background. The
  label merge ignores it (background is what no chosen class claims); the
  score merge copies that set's background slice into the merged stack.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from isle_fast.errors import InputError, param

__all__ = ["Selection", "select", "resolve_members"]


@dataclass(frozen=True)
class Selection:
    """The chosen set of every class.

    Attributes
    ----------
    classes : list of str
        Class names, background first.
    set_names : list of str
        All sets that were evaluated, in order.
    best : ndarray, int64, (C,)
        ``best[c]``: position (in ``set_names``) of the set chosen for class
        ``c``; ``best[0]`` is the set best on background.
    members : ndarray, bool, (N,)
        Sets the choice was restricted to.
    scores : ndarray, float64, (N, C)
        The per-class IoU (percent) the choice was made from.
    """

    classes: list[str]
    set_names: list[str]
    best: np.ndarray
    members: np.ndarray
    scores: np.ndarray

    def __repr__(self) -> str:
        won = [(name, int((self.best[1:] == k).sum())) for k, name in enumerate(self.set_names) if self.members[k]]
        text = ", ".join(f"{name} {n}" for name, n in won)
        return (f"<Selection of {len(self.classes)} classes among {len(won)} sets: foreground classes won "
                f"{text}; .mapping() for each class>")

    @property
    def member_indices(self) -> list[int]:
        """Positions of the allowed sets, in order."""
        return [int(i) for i in np.nonzero(self.members)[0]]

    def mapping(self) -> dict[str, str]:
        """``{foreground class: set name}`` (the JSON ``selection``)."""
        return {self.classes[c]: self.set_names[int(self.best[c])] for c in range(1, len(self.classes))}

    def kernel_selection(self) -> np.ndarray:
        """``best`` renumbered to positions among :attr:`member_indices` (for the merge kernels)."""
        pos = {m: k for k, m in enumerate(self.member_indices)}
        return np.asarray([pos[int(b)] for b in self.best], dtype=np.int64)

    def priority(self) -> np.ndarray:
        """``(M, C)`` float64 claim ranks of the member sets for the SCORE policy (IoU; undefined -> -1)."""
        s = self.scores[self.members]
        return np.where(np.isnan(s), -1.0, s).astype(np.float64)

    def counts(self) -> dict[str, int]:
        """How many foreground classes every set was chosen for."""
        out = {n: 0 for n in self.set_names}
        for c in range(1, len(self.classes)):
            out[self.set_names[int(self.best[c])]] += 1
        return out

    def to_json(self) -> dict:
        return {
            "selection": self.mapping(),
            "background_set": self.set_names[int(self.best[0])],
            "sets": [self.set_names[i] for i in self.member_indices],
            "best": [int(b) for b in self.best],
        }


def _same_path(a: str, b: str) -> bool:
    import os

    if "://" in a or "://" in b:
        return a.rstrip("/") == b.rstrip("/")
    return os.path.realpath(a.rstrip("/") or "/") == os.path.realpath(b.rstrip("/") or "/")


def resolve_members(set_names: Sequence[str], sets: Sequence[str | int] | None,
                    set_paths: Sequence[str] | None = None) -> np.ndarray:
    """Boolean mask over ``set_names`` for a list of names, positions or (with ``set_paths``, where each
    set came from) paths of the stores: a name first, else a path (``None``: all).

    Raises
    ------
    InputError
        An unknown name or position (named), or an empty list.
    """
    n = len(set_names)
    mask = np.zeros(n, dtype=bool)
    if sets is None:
        mask[:] = True
        return mask
    if len(sets) == 0:
        raise InputError(f"{param('sets')}: give at least one set")
    for s in sets:
        if isinstance(s, (int, np.integer)) and not isinstance(s, bool):
            if not 0 <= int(s) < n:
                raise InputError(f"{param('sets')}: position {s} is out of range (there are {n} sets)")
            mask[int(s)] = True
        elif str(s) in set_names:
            mask[list(set_names).index(str(s))] = True
        elif set_paths and any(_same_path(str(s), str(p)) for p in set_paths):
            mask[next(k for k, p in enumerate(set_paths) if _same_path(str(s), str(p)))] = True
        else:
            raise InputError(f"{param('sets')}: no set named {s!r} (nor a store of that path); the sets are "
                             f"{', '.join(set_names)}")
    return mask


def select(evaluation: Any = None, sets: Sequence[str | int] | None = None, *,
           scores: np.ndarray | None = None, gt_pixels: np.ndarray | None = None,
           set_names: Sequence[str] | None = None, classes: Sequence[str] | None = None) -> Selection:
    """Choose the best set for every class.

    Parameters
    ----------
    evaluation : Evaluation, optional
        Source of the IoU table, class names, set names and gt pixel counts.
    sets : sequence of str or int, optional
        Restrict the choice to these sets (names, positions or, with an ``evaluation``, the stores'
        paths).
    scores, gt_pixels, set_names, classes : optional
        Give the ``(N, C)`` IoU table, the ``(C,)`` gt pixels per class and the
        names directly instead of an ``evaluation``.

    Returns
    -------
    Selection

    Examples
    --------
    >>> import tempfile, isle_fast as il
    >>> ds = il.make_voc_like(tempfile.mkdtemp() + "/voc", n_images=12, size_range=(40, 60), soft_sets=())
    >>> sets = [ds.stores[f"train/pseudo/{name}"] for name in ds.set_names]
    >>> sel = il.select(il.evaluate(sets, ds.stores["train/gt"], progress=False))
    >>> [sel.set_names[b] for b in sel.best[:3]]   # the sets chosen for background, aeroplane, bicycle
    ['drs', 'puzzlecam', 'puzzlecam']
    """
    set_paths = None
    if evaluation is not None:
        set_paths = getattr(evaluation, "set_paths", None)
        scores = evaluation.iou
        gt_pixels = evaluation.gt_pixels
        set_names = evaluation.set_names
        classes = evaluation.classes
    if scores is None or set_names is None or classes is None:
        raise InputError("select needs an evaluation or scores, set_names and classes")
    scores = np.asarray(scores, dtype=np.float64)
    n, c = scores.shape
    if gt_pixels is None:
        gt_pixels = np.ones(c, dtype=np.int64)
    members = resolve_members(list(set_names), sets, set_paths)
    masked = np.where(members[:, None] & ~np.isnan(scores), scores, -np.inf)
    first = int(np.argmax(members))
    best = np.argmax(masked, axis=0).astype(np.int64)  # argmax keeps the first maximum
    absent = (np.asarray(gt_pixels) <= 0) | np.all(np.isinf(masked), axis=0)
    best[absent] = first
    return Selection(classes=list(classes), set_names=list(set_names), best=best,
                     members=members, scores=scores)
