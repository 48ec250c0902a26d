"""A ground truth that labels only some of the images (ISLE with a labelled subset).

The sets must agree with each other (same ids, order, shapes, classes), but
the ground truth may hold any subset of their ids, in any order: step 2
(evaluate, select) then runs on those images, aligned by id, and step 3
(merge) writes every image of the sets.

* :func:`gt_positions` checks the gt against the sets and returns, for every
  gt image, its position in the sets (``None`` when the gt covers every
  image in the sets' order: the usual aligned pass).
* :func:`subset_arrays` gives the sets' Dask arrays reduced to those images,
  in the gt's order and cropped to the common padded shape, so the fused
  evaluate kernels see the same pixels of every store.
* :class:`SetFrame` stands in for the gt where the merge only needs the
  layout of the images (ids, shapes, chunks): the first set's.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from isle_fast.errors import AlignmentError
from isle_fast.stores.stack import Stack, _skip_bad_hint, check_aligned

__all__ = ["gt_positions", "check_gt_subset", "subset_arrays", "SetFrame"]


def gt_positions(gt: Stack, sets: Sequence[Stack]) -> np.ndarray | None:
    """Positions (in the sets) of every gt image, or None when the gt is aligned with the sets.

    Parameters
    ----------
    gt : Stack
        The ground truth; its ids must be a subset of the sets' ids (any order).
    sets : sequence of Stack
        The pseudo-label sets (already checked to be aligned with each other).

    Returns
    -------
    ndarray of int64, shape (I_gt,), or None

    Raises
    ------
    AlignmentError
        A gt id that no set holds (the first few are named, with their count),
        a repeated gt id, an image whose shape differs, or other classes.
    """
    ref = sets[0]
    if gt.ids == ref.ids:
        check_aligned([gt, *sets])
        return None
    index = {v: i for i, v in enumerate(ref.ids)}
    missing = [v for v in gt.ids if v not in index]
    if missing:
        shown = ", ".join(repr(v) for v in missing[:5])
        raise AlignmentError(f"the ground truth {gt.path} has {len(missing)} image id(s) that are not in the "
                             f"sets ({ref.path}): {shown}{' ...' if len(missing) > 5 else ''}"
                             f"{_skip_bad_hint(*sets)}")
    if len(set(gt.ids)) != len(gt.ids):
        seen: set[str] = set()
        dup = next(v for v in gt.ids if v in seen or seen.add(v))  # type: ignore[func-returns-value]
        raise AlignmentError(f"the ground truth {gt.path} holds image id {dup!r} twice")
    pos = np.asarray([index[v] for v in gt.ids], dtype=np.int64)
    shapes = np.asarray(ref.shapes)[pos]
    bad = np.nonzero((np.asarray(gt.shapes) != shapes).any(axis=1))[0] if len(pos) else np.zeros(0, np.int64)
    if len(bad):
        i = int(bad[0])
        raise AlignmentError(f"image {gt.ids[i]!r} is {tuple(int(v) for v in gt.shapes[i])} in {gt.path} but "
                             f"{tuple(int(v) for v in shapes[i])} in {ref.path}")
    if gt.classes != ref.classes:
        raise AlignmentError(f"{ref.path} has classes {ref.classes}, {gt.path} has {gt.classes}")
    return pos


def check_gt_subset(gt: Stack, sets: Sequence[Stack]) -> None:
    """Raise :class:`AlignmentError` unless the sets agree and the gt labels a subset of their images."""
    check_aligned(list(sets))
    gt_positions(gt, sets)


def subset_arrays(stacks: Sequence[Stack], gt: Stack, positions: np.ndarray) -> tuple[Any, list[Any]]:
    """The gt and the sets' images at ``positions`` as Dask arrays on the gt's chunk grid.

    Both are cropped to the smaller padded shape (every image fits in both:
    its shape is the same in the gt and the sets), so block ``(i, j, k)`` of
    every array covers the same pixels of the same images.
    """
    rows = min(gt.padded_shape[0], stacks[0].padded_shape[0])
    cols = min(gt.padded_shape[1], stacks[0].padded_shape[1])
    g = gt.to_dask()[:, :rows, :cols]
    k, hc, wc = (int(v) for v in gt.chunks[:3])
    g = g.rechunk((k, min(hc, rows) or 1, min(wc, cols) or 1))
    out = []
    for s in stacks:
        a = s.to_dask()[positions][:, :rows, :cols]
        target = g.chunks if s.encoding == "labels" else g.chunks + ((a.shape[-1],),)
        out.append(a.rechunk(target))
    return g, out


class SetFrame:
    """The image layout of a set (ids, shapes, chunks, classes) where a merge needs the gt's.

    With a partial ground truth the ensemble covers every image of the sets:
    the merge takes its grid from the first set. A score set's class axis is
    left out (:meth:`to_dask` is one class slice, used only for its chunks).
    """

    kind = "frame"
    encoding = "labels"

    def __init__(self, stack: Stack):
        self._stack = stack
        self.path = stack.path
        self.ids = stack.ids
        self.shapes = stack.shapes
        self.classes = stack.classes
        self.padded_shape = stack.padded_shape
        self.num_images = stack.num_images
        self.num_classes = stack.num_classes
        self.shape = tuple(stack.shape[:3])
        self.chunks = tuple(stack.chunks[:3])

    def to_dask(self) -> Any:
        a = self._stack.to_dask()
        return a if self._stack.encoding == "labels" else a[..., 0]

    def chunk_spec(self) -> Any:
        return self._stack.chunk_spec() if self._stack.encoding == "labels" else None
