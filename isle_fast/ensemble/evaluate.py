"""ISLE step 2, first half: per-class confusion of every pseudo-label set against ground truth.

One Dask pass over the data. For every chunk of the ground truth, ONE task
reads the gt chunk once and the matching region of every set, and calls the
fused kernels (``confusion_labels`` for the label-map sets, one
``confusion_scores`` call per group of score sets with the same dtype); the
per-chunk ``(N, C, C+1)`` int64 counts are summed with a tree reduction.
Counts are exact integers, so the result never depends on the chunking, the
scheduler (threaded, ``dask.distributed``) or the backend (CPU / GPU).

On this machine (stores on local disk, chunked alike) the same tasks run on a
thread pool without Dask (:func:`local_pass`): each thread decodes the chunks
into buffers it keeps (:func:`isle_fast.stores.chunkio.read_into`) and label
sets are counted over every image's own region (``confusion_labels_images``:
the padding, ignore in the gt, is not read; every image's counts in one call).

Stores may be chunked differently: every set is rechunked to the gt's chunks
(the class axis of a score set is always one chunk), so a task sees the same
pixels of every store.

Conventions
-----------
* ``counts[n, t, p]``: pixels with gt class ``t`` and prediction ``p`` of set
  ``n``; column ``C`` counts abstentions (255 in a label set). gt 255 (ignore
  and padding) is skipped.
* IoU of class ``c``: ``tp / (tp + fp + fn)`` with ``fn`` including
  abstentions; undefined (NaN, JSON ``null``) when the union is empty.
* mIoU: the mean over classes whose IoU is defined (NaN classes are skipped,
  the usual ``nanmean`` convention). Both come from :mod:`isle_fast.metrics`,
  the one definition every score of the project uses.
* ``average="image"`` (the paper's Algorithm 2 as written): the IoU of class
  ``c`` is the mean of the per-image IoUs over the images where ``c`` is in
  the gt or predicted by that set (per-image union > 0); images where the
  class appears in neither do not count (they would add an undefined 0/0).
  Precision, recall, coverage and the counts stay dataset-level.
* coverage of class ``c``: ``1 - abstained / gt pixels of c``.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Sequence

import numpy as np

from isle_fast import metrics
from isle_fast.ensemble.graph import (
    aligned_arrays,
    blockwise_args,
    chunk_executor,
    chunk_tasks,
    local_specs,
    open_inputs,
    unique_names,
)
from isle_fast.errors import InputError, param
from isle_fast.stores.stack import Stack

__all__ = ["Evaluation", "evaluate", "check_bg_threshold", "AVERAGES", "ChunkCounts"]

AVERAGES = ("dataset", "image")


# -- inputs ----------------------------------------------------------------------------

def check_bg_threshold(value: Any) -> float | None:
    """``bg_threshold`` checked: None or a finite number (:class:`InputError` for nan, inf, text, bools).

    The command line accepts only scores, [0, 1] (``--bg-threshold``); the library
    also keeps its two edge meanings, tested against the reference kernels: a
    negative value is "off" (as None) and one above 1 makes background win
    wherever it is compared.
    """
    if value is None:
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = float("nan")
    if isinstance(value, bool) or not math.isfinite(v):
        raise InputError(f"{param('bg_threshold')} must be a finite number (a score in [0, 1]), "
                         f"not {value!r}")
    return v


def score_threshold(stack: Stack, bg_threshold: float | None) -> float:
    """``bg_threshold`` (a [0, 1] score) in the stored units of ``stack``; -1.0 means off."""
    if bg_threshold is None or bg_threshold < 0:
        return -1.0
    return float(bg_threshold) * stack.score_scale


@dataclass(frozen=True)
class Group:
    """Sets handed to one fused kernel call: all label maps, or score stacks of one dtype."""

    encoding: str           # "labels" or "scores"
    members: tuple[int, ...]  # positions in the caller's set list
    threshold: float = -1.0   # background threshold in stored units (scores only)


def group_sets(stacks: Sequence[Stack], bg_threshold: float | None) -> list[Group]:
    """Split sets into fused groups: one for label maps, one per (dtype, scale) of score sets."""
    groups: list[Group] = []
    labels = tuple(i for i, s in enumerate(stacks) if s.encoding == "labels")
    if labels:
        groups.append(Group("labels", labels))
    keys: dict[tuple[str, float], list[int]] = {}
    for i, s in enumerate(stacks):
        if s.encoding == "scores":
            keys.setdefault((str(s.dtype), s.score_scale), []).append(i)
    for members in keys.values():
        groups.append(Group("scores", tuple(members), score_threshold(stacks[members[0]], bg_threshold)))
    return groups


def _contig(a: Any) -> Any:
    from isle_fast.backend import is_device_array

    return a if is_device_array(a) else np.ascontiguousarray(a)


# -- the per-chunk task -------------------------------------------------------------------

def tile_shapes(shapes: np.ndarray, start: tuple[int, int, int], size: tuple[int, int, int]) -> np.ndarray:
    """``(k, 2)`` rows and columns of every image's own region inside the tile at ``start`` of ``size``.

    ``shapes`` are the stack's true ``(height, width)`` of every image; the rest of a
    padded array is padding, which no count includes.
    """
    i0, r0, c0 = (int(v) for v in start)
    k, th, tw = (int(v) for v in size)
    sh = np.asarray(shapes[i0:i0 + k], dtype=np.int64)
    out = np.empty((k, 2), dtype=np.int64)
    out[:, 0] = np.clip(sh[:, 0] - r0, 0, th)
    out[:, 1] = np.clip(sh[:, 1] - c0, 0, tw)
    return out


def _confusion_block(gt: np.ndarray, *blocks: np.ndarray, backend: str, groups: tuple[Group, ...],
                     order: tuple[int, ...], num_classes: int, per_image: bool,
                     shapes: np.ndarray | None = None) -> np.ndarray:
    """Counts of one chunk: ``(1, 1, 1, N, C, C+1)``, or ``(k, 1, 1, N, C, C+1)`` per image.

    Chunks in GPU memory (CuPy) stay there: the GPU kernels count them (:func:`task_kernels`).
    ``shapes`` (:func:`tile_shapes`, optional): each image's region in the chunk; the CPU
    kernel of label sets then skips the padding around it (``confusion_labels_images``, the
    counts of every image in one call). The counts are the same: padding is ignore (255) in gt.
    """
    from isle_fast.backend import task_kernels, to_host

    with task_kernels(backend, gt, *blocks) as K:
        n_sets = len(order)
        by_pos = dict(zip(order, blocks))
        gt = _contig(gt)
        n_img = gt.shape[0] if per_image else 1
        out = np.zeros((n_img, 1, 1, n_sets, num_classes, num_classes + 1), dtype=np.int64)
        images = getattr(K, "confusion_labels_images", None) if shapes is not None and gt.ndim == 3 else None
        for grp in groups:
            arrs = [_contig(by_pos[m]) for m in grp.members]
            if grp.encoding == "labels" and images is not None:
                res = images(gt, tuple(arrs), shapes, num_classes, per_image=per_image)
                out[:, 0, 0, list(grp.members)] = res if per_image else res[None]
                continue
            for m in range(n_img):
                g = gt[m:m + 1] if per_image else gt
                sets = tuple(a[m:m + 1] for a in arrs) if per_image else tuple(arrs)
                if grp.encoding == "labels":
                    res = K.confusion_labels(g, sets, num_classes)
                else:
                    res = K.confusion_scores(g, sets, num_classes, grp.threshold)
                out[m, 0, 0, list(grp.members)] = to_host(res)
        return out


# -- results ------------------------------------------------------------------------------

@dataclass
class Evaluation(metrics.AveragedIoU):
    """Per-class scores of N sets against one ground truth.

    Attributes
    ----------
    classes : list of str
        Class names, background first (C of them).
    set_names : list of str
        Set names (unique), in the order given.
    counts : ndarray, int64, (N, C, C+1)
        ``counts[n, t, p]``: pixels of gt class ``t`` predicted ``p`` by set ``n``
        (column C: abstained). Summed over the whole data set.
    average : {'dataset', 'image'}
        How :attr:`iou` is averaged (see the module docstring).
    image_stats : ndarray, int64, (I, N, C, 2), optional
        Per-image intersection and union (only for ``average='image'``).
    set_paths : list of str
        Where each set came from.
    gt_path : str
    seconds : float
        Wall-clock time of the pass.
    """

    classes: list[str]
    set_names: list[str]
    counts: np.ndarray
    average: str = "dataset"
    image_stats: np.ndarray | None = None
    set_paths: list[str] = field(default_factory=list)
    gt_path: str = ""
    backend: str = "cpu"
    seconds: float = 0.0

    # -- raw counts ----------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def tp(self) -> np.ndarray:
        """(N, C) true positives."""
        return metrics.true_positives(self.counts)

    @property
    def fp(self) -> np.ndarray:
        """(N, C) pixels predicted ``c`` whose gt is another (non-ignored) class."""
        return metrics.false_positives(self.counts)

    @property
    def fn(self) -> np.ndarray:
        """(N, C) gt pixels of ``c`` predicted as something else or abstained."""
        return metrics.false_negatives(self.counts)

    @property
    def abstained(self) -> np.ndarray:
        """(N, C) gt pixels of ``c`` where the set abstained (255)."""
        return self.counts[:, :, self.num_classes].copy()

    @property
    def gt_pixels(self) -> np.ndarray:
        """(C,) gt pixels of every class (same for every set)."""
        return self.counts[0].sum(axis=1)

    # -- scores (percent): dataset_iou, image_iou, iou, miou from metrics.AveragedIoU ----------
    @property
    def precision(self) -> np.ndarray:
        """(N, C) percent: tp / (tp + fp)."""
        return metrics.precision(self.counts)

    @property
    def recall(self) -> np.ndarray:
        """(N, C) percent: tp / gt pixels (abstentions count as misses)."""
        return metrics.recall(self.counts)

    @property
    def coverage(self) -> np.ndarray:
        """(N, C) percent: 1 - abstained / gt pixels of the class."""
        gt_px = self.counts.sum(axis=2)
        return 100.0 * (1.0 - metrics.ratio(self.abstained, gt_px))

    def take(self, indices: Sequence[int]) -> "Evaluation":
        """The evaluation of some of the sets only (no new pass over the data)."""
        idx = [int(i) for i in indices]
        return Evaluation(
            classes=list(self.classes), set_names=[self.set_names[i] for i in idx],
            counts=self.counts[idx].copy(), average=self.average,
            image_stats=None if self.image_stats is None else self.image_stats[:, idx].copy(),
            set_paths=[self.set_paths[i] for i in idx] if self.set_paths else [],
            gt_path=self.gt_path, backend=self.backend, seconds=self.seconds)

    # -- selection --------------------------------------------------------------------------
    def select(self, sets: Sequence[str | int] | None = None):
        """The best set per class (see :func:`isle_fast.ensemble.selection.select`)."""
        from isle_fast.ensemble.selection import select

        return select(self, sets=sets)

    def to_json(self, selection: Any = None) -> dict:
        """The evaluation JSON (``isle evaluate --json``): classes, per-set iou / miou / tp / fp / fn
        (+ precision, recall, coverage, path), the selection, background set, average, gt and gt pixels.

        IoU values are percent; undefined values are ``null``.
        """
        sel = selection if selection is not None else self.select()
        iou, miou = self.iou, self.miou
        tp, fp, fn = self.tp, self.fp, self.fn
        prec, rec, cov = self.precision, self.recall, self.coverage
        sets = {}
        for n, name in enumerate(self.set_names):
            sets[name] = {
                "iou": metrics.jsonable(iou[n]),
                "miou": metrics.jsonable(miou[n]),
                "tp": metrics.jsonable(tp[n]),
                "fp": metrics.jsonable(fp[n]),
                "fn": metrics.jsonable(fn[n]),
                "precision": metrics.jsonable(prec[n]),
                "recall": metrics.jsonable(rec[n]),
                "coverage": metrics.jsonable(cov[n]),
                "path": self.set_paths[n] if n < len(self.set_paths) else None,
            }
        return {
            "classes": list(self.classes),
            "sets": sets,
            "selection": sel.mapping(),
            "background_set": self.set_names[int(sel.best[0])],
            "average": self.average,
            "gt": self.gt_path,
            "gt_pixels": metrics.jsonable(self.gt_pixels),
        }

    def write_json(self, path: str | os.PathLike, selection: Any = None, *, command: str = "isle evaluate",
                   **extra: Any) -> None:
        """Write :meth:`to_json` (plus ``extra`` keys) atomically to ``path``.

        The file carries the key ``isle_output`` (command, version, time), so a later run may replace
        it; an existing file without it, a folder, a file inside a store and any input are refused
        (:func:`isle_fast.outputs.check_json_output`).
        """
        from isle_fast.outputs import check_json_output, write_json

        doc = self.to_json(selection)
        doc.update(extra)
        check_json_output(path, inputs=[*self.set_paths, self.gt_path or None])
        write_json(path, doc, command=command)

    def table(self, selection: Any = None, ensemble: "Evaluation | None" = None) -> str:
        """A plain-text per-class IoU table; the chosen set of each class is marked ``*`` (and the
        last line says so). ``ensemble``: the evaluation of the ensemble, shown as a last column."""
        sel = selection if selection is not None else self.select()
        iou, miou = self.iou, self.miou
        names = list(self.set_names)
        if ensemble is not None:
            names.append(ensemble.set_names[0] if "ensemble" in ensemble.set_names[0].lower() else "ensemble")
        width = max(10, *(len(c) for c in self.classes))
        cols = [n[:12] for n in names]
        colw = max(7, *(len(c) for c in cols)) + 1
        fmt = lambda v: ("-" if np.isnan(v) else f"{v:.1f}").rjust(colw - 1)  # noqa: E731
        lines = ["class".ljust(width) + "".join(c.rjust(colw) for c in cols)]
        for c, cname in enumerate(self.classes):
            cells = []
            for n in range(len(self.set_names)):
                mark = "*" if int(sel.best[c]) == n and sel.members[n] else " "
                cells.append(fmt(iou[n, c]) + mark)
            if ensemble is not None:
                cells.append(fmt(ensemble.iou[0, c]) + " ")
            lines.append(cname.ljust(width) + "".join(cells))
        last = [*miou, *(ensemble.miou[:1] if ensemble is not None else [])]
        lines.append("mIoU".ljust(width) + "".join(fmt(v) + " " for v in last))
        key = "* the set chosen for the class (highest IoU)"
        if np.isnan(iou).any():
            key += "; - no IoU (no pixels of the class in gt or prediction)"
        lines.append(key)
        return "\n".join(lines)

    def __repr__(self) -> str:
        mious = ", ".join(f"{n} {'-' if np.isnan(v) else f'{v:.1f}'}" for n, v in zip(self.set_names, self.miou))
        return (f"<Evaluation of {len(self.set_names)} set{'s' if len(self.set_names) != 1 else ''} x "
                f"{self.num_classes} classes against {self.gt_path or 'gt'} ({self.average} average): "
                f"mIoU {mious}; .table() for every class>")


# -- the pass -----------------------------------------------------------------------------

def confusion_graph(stacks: Sequence[Stack], gt: Stack, *, backend: str, bg_threshold: float | None,
                    per_image: bool, positions: np.ndarray | None = None):
    """The lazy Dask array of per-chunk counts (see :func:`evaluate`).

    Returns a ``(bi, bj, bk, N, C, C+1)`` array (one entry per chunk of the
    gt) or, with ``per_image``, ``(I, bj, bk, N, C, C+1)``.
    """
    import dask.array as da

    c = gt.num_classes
    groups = tuple(group_sets(stacks, bg_threshold))
    order = tuple(m for g in groups for m in g.members)
    if positions is None:
        g, arrays = aligned_arrays(stacks, gt)
    else:  # a gt of some images: the sets' images at its positions (isle_fast.ensemble.partial)
        from isle_fast.ensemble.partial import subset_arrays

        g, arrays = subset_arrays(stacks, gt, positions)
    ordered = [arrays[m] for m in order]
    ordered_stacks = [stacks[m] for m in order]
    func = partial(_confusion_block, backend=backend, groups=groups, order=order, num_classes=c,
                   per_image=per_image)
    one = lambda n: 1  # noqa: E731
    return da.blockwise(
        func, "ijkabd", g, "ijk", *blockwise_args(ordered, ordered_stacks),
        new_axes={"a": len(stacks), "b": c, "d": c + 1},
        adjust_chunks={"i": (lambda n: n) if per_image else one, "j": one, "k": one},
        dtype=np.int64, concatenate=True, meta=np.empty((0,) * 6, dtype=np.int64),
    )


# -- the same pass on this machine, without Dask ---------------------------------------------

def _local_task(specs: Sequence[Any], tails: Sequence[tuple], block: tuple[int, int, int],
                shape: tuple[int, int, int], shapes: np.ndarray | None = None, **kernel: Any) -> np.ndarray:
    """One gt chunk: read it and the same chunk of every set (direct reader), then count it.

    ``shapes``: the images' regions in the chunk (:func:`tile_shapes`), for the padding-skipping kernel.
    """
    if shapes is not None and kernel["backend"] == "cpu" and not any(tails):
        # label sets on the CPU: every chunk decoded into this thread's kept buffers, counted in place
        # (the kernel skips what lies outside the tile's images: no cut-out copies of edge chunks)
        from isle_fast.stores.chunkio import read_kept

        g, *blocks = [read_kept(specs[p], block, (shape[0],) + tuple(specs[p].chunk_shape[1:]), ("chunk", p))
                      for p in (0, *(1 + m for m in kernel["order"]))]
        return _confusion_block(g, *blocks, shapes=shapes, **kernel)
    from isle_fast.stores.chunks import read_chunk

    g = read_chunk(specs[0], block_id=block, block_info={None: {"chunk-shape": shape}})
    blocks = [read_chunk(specs[1 + m], block_id=block + (0,) * len(tails[m]),
                          block_info={None: {"chunk-shape": shape + tails[m]}}) for m in kernel["order"]]
    return _confusion_block(g, *blocks, shapes=shapes, **kernel)


def _local_counts(specs: Sequence[Any], tails: Sequence[tuple], block: tuple[int, int, int],
                  shape: tuple[int, int, int], shapes: np.ndarray | None = None,
                  **kernel: Any) -> tuple[np.ndarray, np.ndarray | None]:
    """:func:`_local_task` reduced where it ran: ``(counts (N, C, C+1), per-image stats or None)``.

    The chunk's counts are summed in the task, so a cluster worker sends back one small table
    instead of the per-image counts of every image of its chunk.
    """
    out = _local_task(specs, tails, block, shape, shapes, **kernel)
    stats = metrics.intersection_union(out[:, 0, 0]) if kernel["per_image"] else None
    return out.sum(axis=(0, 1, 2)), stats


#: A table sent back from a worker, compactly: ``(shape, flat indices of its nonzero entries, their values)``,
#: indices int32 and values int32 where they fit, else int64 (:func:`pack_counts`, :func:`unpack_counts`).
Packed = tuple[tuple[int, ...], np.ndarray, np.ndarray]


def _narrow(a: np.ndarray) -> np.ndarray:
    """``a`` as int32 when every value fits, else int64 (exactly the same integers)."""
    i32 = np.iinfo(np.int32)
    if a.size == 0 or (int(a.min()) >= i32.min and int(a.max()) <= i32.max):
        return a.astype(np.int32)
    return a.astype(np.int64)


def pack_counts(a: np.ndarray) -> Packed:
    """An integer table as its nonzero entries (confusion tables of many classes are mostly zeros)."""
    flat = np.ascontiguousarray(a).reshape(-1)
    idx = np.flatnonzero(flat)
    return tuple(int(v) for v in a.shape), _narrow(idx), _narrow(flat[idx])


def unpack_counts(packed: Packed) -> np.ndarray:
    """The int64 table :func:`pack_counts` packed, equal entry for entry."""
    shape, idx, vals = packed
    out = np.zeros(shape, dtype=np.int64)
    out.reshape(-1)[idx.astype(np.intp)] = vals
    return out


def _combine_counts(results: list[tuple[np.ndarray, np.ndarray | None]]
                    ) -> tuple[Packed, list[Packed | None]]:
    """Where a batch of :func:`_local_counts` tasks ran: their counts summed (int64, exact) and every
    task's per-image stats, each packed (:func:`pack_counts`): what goes back to the caller."""
    total = np.zeros(results[0][0].shape, dtype=np.int64)
    for part, _ in results:
        total += part
    return pack_counts(total), [None if st is None else pack_counts(st) for _, st in results]


def local_pass(specs: Sequence[Any], stacks: Sequence[Stack], gt: Stack, *, backend: str,
               bg_threshold: float | None, per_image: bool, progress: bool
               ) -> tuple[np.ndarray, np.ndarray | None]:
    """The evaluate pass on a thread pool here (one task per gt chunk): ``(counts, image_stats)``.

    The same tasks as the Dask graph (:func:`confusion_graph`), run by
    :class:`isle_fast.stores.parallel.ThreadExecutor` (a thread per core, a
    few chunks in flight; on a cluster's workers when a ``distributed`` client is
    active, :func:`chunk_executor`): for a local run it needs neither Dask nor Zarr,
    which keeps their imports (about 0.3 s) out of a short command's start.
    Counts are exact integers, so they equal the Dask pass.
    """
    from isle_fast.progress import progress as bar
    from isle_fast.stores.parallel import imap_combined

    c = gt.num_classes
    groups = tuple(group_sets(stacks, bg_threshold))
    order = tuple(m for g in groups for m in g.members)
    tails = [tuple(int(v) for v in st.shape[3:]) for st in stacks]
    n, h, w = (int(v) for v in gt.shape)
    k, hc, wc = (int(v) for v in gt.chunks)
    tasks = chunk_tasks(gt)
    shapes = np.asarray(gt.shapes)
    jobs = [(b, size, tile_shapes(shapes, (b[0] * k, b[1] * hc, b[2] * wc), size)) for b, size in tasks]
    fn = partial(_local_counts, specs, tails, backend=backend, groups=groups, order=order, num_classes=c,
                 per_image=per_image)
    counts = np.zeros((len(stacks), c, c + 1), dtype=np.int64)
    stats = np.zeros((n, len(stacks), c, 2), dtype=np.int64) if per_image else None
    with chunk_executor(len(tasks)) as ex, \
            bar(total=n, desc="evaluate", unit="img", quiet=not progress) as pb:
        # the counts of a batch of chunks are summed where they ran (a cluster worker sends back one
        # compact table per batch, not a table per chunk: 870 MB a pass at COCO size before)
        for done, (part, part_stats) in imap_combined(ex, fn, jobs, _combine_counts):
            counts += unpack_counts(part)
            for t, packed in zip(done, part_stats):
                if stats is not None and packed is not None:
                    i0 = tasks[t][0][0] * k
                    st = unpack_counts(packed)
                    stats[i0:i0 + st.shape[0]] += st
                size = tasks[t][1]
                pb.advance(size[0] * size[1] * size[2] / (h * w))  # a tile's share of its images
    return counts, stats


class ChunkCounts:
    """The evaluation of one label set whose chunks arrive one at a time, already in memory (a fused pass).

    ``isle run`` counts every ensemble chunk against the gt right after the
    merge wrote it, instead of reading the ensemble back in a second pass.
    :meth:`add` runs the local pass's task on the chunk (the gt region read by
    the direct reader, the same kernel call), so :meth:`evaluation` equals
    ``evaluate([stack], gt, average=..., backend=...)`` of the store the chunks
    were written to, count for count. Thread-safe.

    Parameters
    ----------
    gt : Stack
        The ground truth, on local disk in the plain layout (``gt.chunk_spec()``
        is not None; :class:`ValueError` otherwise).
    average : {'dataset', 'image'}
    backend : {'auto', 'cpu', 'gpu'}
    per_image : bool
        Keep the per-image counts with the dataset average too (as ``evaluate(per_image=True)``).
    """

    def __init__(self, gt: Stack, *, average: str = "dataset", backend: str = "auto", per_image: bool = False):
        import threading

        from isle_fast.backend import resolve_backend

        if average not in AVERAGES:
            raise InputError(f"{param('average')} must be one of {', '.join(AVERAGES)}, not {average!r}")
        self.spec = gt.chunk_spec()
        if self.spec is None:
            raise ValueError(f"{gt.path}: chunks are counted against a local gt in the plain layout only")
        self.gt = gt
        self.average = average
        self.backend = resolve_backend(backend)
        self.t0 = time.perf_counter()
        c = gt.num_classes
        self.counts = np.zeros((1, c, c + 1), dtype=np.int64)
        keep = per_image or average == "image"
        self.stats = np.zeros((gt.num_images, 1, c, 2), dtype=np.int64) if keep else None
        self.pixels = 0
        self._shapes = np.asarray(gt.shapes)
        self._lock = threading.Lock()

    @property
    def per_image(self) -> bool:
        """Whether every image's counts are kept (:meth:`add_counts` takes them per image)."""
        return self.stats is not None

    def gt_region(self, start: tuple[int, int, int], shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        """The gt region of ``shape`` at ``start`` (on the gt's chunk grid) and each image's rows and columns
        in it (:func:`tile_shapes`): what a kernel that counts a label region needs.

        The block is this thread's kept buffer of the gt's read slot (``("chunk", 0)``): valid until the
        thread's next gt read.
        """
        from isle_fast.stores.chunkio import read_kept

        k, hc, wc = (int(v) for v in self.gt.chunks)
        i0, r0, c0 = (int(v) for v in start)
        if i0 % k or r0 % hc or c0 % wc:
            raise ValueError(f"region at {start} does not start a chunk of the gt's {self.gt.chunks} grid")
        if len(shape) != 3:
            raise ValueError(f"a label region is (images, rows, columns), not {tuple(shape)}")
        size = (int(shape[0]), int(shape[1]), int(shape[2]))
        assert self.spec is not None, "ChunkCounts needs the gt's plain chunk layout"
        g = read_kept(self.spec, (i0 // k, r0 // hc, c0 // wc), size, ("chunk", 0))
        return g, tile_shapes(self._shapes, start, size)

    def add(self, start: tuple[int, int, int], labels: np.ndarray) -> None:
        """Count the label region starting at ``start`` (image, row, column; on the gt's chunk grid)."""
        shape = tuple(int(v) for v in labels.shape)
        g, shapes = self.gt_region(start, shape)
        out = _confusion_block(g, labels, backend=self.backend, groups=(Group("labels", (0,)),), order=(0,),
                               num_classes=self.gt.num_classes, per_image=self.per_image, shapes=shapes)
        self.add_counts(start, shape, out[:, 0, 0, 0])

    def add_counts(self, start: tuple[int, int, int], shape: tuple[int, ...], counts: np.ndarray) -> None:
        """Add the counts of the label region of ``shape`` at ``start``, counted by the caller against
        :meth:`gt_region`: ``(images, C, C + 1)`` with :attr:`per_image`, else their sum ``(1, C, C + 1)``."""
        c = self.gt.num_classes
        counts = np.asarray(counts, dtype=np.int64)
        n_img = int(shape[0]) if self.per_image else 1
        if counts.shape != (n_img, c, c + 1):
            raise ValueError(f"counts of a {tuple(shape)} region must be ({n_img}, {c}, {c + 1}), "
                             f"not {counts.shape}")
        i0 = int(start[0])
        with self._lock:
            self.counts[0] += counts.sum(axis=0)
            if self.stats is not None:
                self.stats[i0:i0 + n_img] += metrics.intersection_union(counts[:, None])
            self.pixels += int(np.prod(shape))

    def evaluation(self, stack: Stack) -> Evaluation:
        """The :class:`Evaluation` of ``stack`` (the store the chunks were written to).

        Raises
        ------
        RuntimeError
            Not every chunk was counted (``stack``'s size and the pixels added differ).
        """
        expected = int(np.prod(self.gt.shape))
        if self.pixels != expected:
            raise RuntimeError(f"counted {self.pixels} pixels of {stack.path}, expected {expected}")
        return Evaluation(classes=list(self.gt.classes), set_names=unique_names([stack]),
                          counts=self.counts.copy(), average=self.average,
                          image_stats=None if self.stats is None else self.stats.copy(),
                          set_paths=[stack.path], gt_path=self.gt.path, backend=self.backend,
                          seconds=time.perf_counter() - self.t0)


def evaluate(sets: Sequence[Any], gt: Any, *, average: str = "dataset", backend: str = "auto",
             bg_threshold: float | None = None, progress: bool = True, per_image: bool = False) -> Evaluation:
    """Per-class confusion counts and scores of every set against the ground truth, in one pass.

    Parameters
    ----------
    sets : sequence of path, fsspec URL or Stack
        The pseudo-label sets; label maps and score stacks may be mixed.
    gt : path, fsspec URL or Stack
        Ground-truth label store (255 = ignore). It may label only some of
        the sets' images, in any order: they are aligned by id.
    average : {'dataset', 'image'}
        ``'dataset'``: IoU from counts summed over all images (standard).
        ``'image'``: Algorithm 2 as written, the mean per-image IoU over the
        images where the class is in the gt or predicted (union > 0).
    backend : {'auto', 'cpu', 'gpu'}
        Kernel backend; results are identical.
    bg_threshold : float, optional
        For score sets: replace the background score by this value (a [0, 1]
        score; ``uint8`` stores compare against ``255 * T``) before decoding.
        NaN, infinity and non-numbers are an InputError
        (:func:`check_bg_threshold`).
    progress : bool
        Show a progress bar (local schedulers).
    per_image : bool
        Also keep the per-image intersection and union (``image_stats``,
        for :mod:`isle_fast.ensemble.uncertainty`), from the same pass.

    Returns
    -------
    Evaluation

    Notes
    -----
    Never loads a whole stack: each task holds one chunk of the gt and the
    same region of every set. Works unchanged on a ``dask.distributed``
    cluster (the active client is used) and on fsspec URLs.

    Examples
    --------
    >>> import tempfile, isle_fast as il
    >>> ds = il.make_voc_like(tempfile.mkdtemp() + "/voc", n_images=12, size_range=(40, 60), soft_sets=())
    >>> sets = [ds.stores[f"train/pseudo/{name}"] for name in ds.set_names]
    >>> ev = il.evaluate(sets, ds.stores["train/gt"], progress=False)
    >>> ev.set_names, ev.iou.shape
    (['puzzlecam', 'clims', 'pmm', 'drs'], (4, 21))
    >>> [round(float(m), 1) for m in ev.miou]
    [72.3, 68.6, 75.1, 77.4]
    """
    from isle_fast.backend import resolve_backend

    if average not in AVERAGES:
        raise InputError(f"{param('average')} must be one of {', '.join(AVERAGES)}, not {average!r}")
    bg_threshold = check_bg_threshold(bg_threshold)
    t0 = time.perf_counter()
    be = resolve_backend(backend)
    stacks, gt_stack = open_inputs(sets, gt)
    per_image = average == "image" or bool(per_image)
    from isle_fast.ensemble.partial import gt_positions

    positions = gt_positions(gt_stack, stacks)
    specs = local_specs(stacks, gt_stack) if positions is None else None
    if specs is not None:
        counts, image_stats = local_pass(specs, stacks, gt_stack, backend=be, bg_threshold=bg_threshold,
                                         per_image=per_image, progress=progress)
    else:
        counts, image_stats = _dask_pass(stacks, gt_stack, backend=be, bg_threshold=bg_threshold,
                                         per_image=per_image, progress=progress, positions=positions)
    return Evaluation(
        classes=list(gt_stack.classes),
        set_names=unique_names(stacks, say=True),
        counts=np.asarray(counts, dtype=np.int64),
        average=average,
        image_stats=None if image_stats is None else np.asarray(image_stats, dtype=np.int64),
        set_paths=[s.path for s in stacks],
        gt_path=gt_stack.path,
        backend=be,
        seconds=time.perf_counter() - t0,
    )


def _dask_pass(stacks: Sequence[Stack], gt: Stack, *, backend: str, bg_threshold: float | None,
               per_image: bool, progress: bool, positions: np.ndarray | None = None) -> tuple[Any, Any]:
    """The evaluate pass as a Dask graph (any scheduler, cluster, fsspec store): ``(counts, image_stats)``."""
    import dask

    from isle_fast.backend import dask_scheduler
    from isle_fast.progress import dask_progress

    graph = confusion_graph(stacks, gt, backend=backend, bg_threshold=bg_threshold, per_image=per_image,
                            positions=positions)
    with dask_progress("evaluate", quiet=not progress, images=gt.num_images):
        if per_image:
            per_img = graph.sum(axis=(1, 2))  # (I, N, C, C+1), chunked by images
            n, c = len(stacks), gt.num_classes
            stats = per_img.map_blocks(metrics.intersection_union,
                                       chunks=(per_img.chunks[0], (n,), (c,), (2,)),
                                       dtype=np.int64)
            return dask.compute(per_img.sum(axis=0), stats, scheduler=dask_scheduler())
        (counts,) = dask.compute(graph.sum(axis=(0, 1, 2)), scheduler=dask_scheduler())
        return counts, None
