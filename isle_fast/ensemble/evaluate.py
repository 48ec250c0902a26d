"""ISLE step 2, first half: per-class confusion of every pseudo-label set against ground truth.

One Dask pass over the data. For every chunk of the ground truth, ONE task
reads the gt chunk once and the matching region of every set, and calls the
fused kernels (``confusion_labels`` for the label-map sets, one
``confusion_scores`` call per group of score sets with the same dtype); the
per-chunk ``(N, C, C+1)`` int64 counts are summed with a tree reduction.
Counts are exact integers, so the result never depends on the chunking, the
scheduler (threaded, ``dask.distributed``) or the backend (CPU / GPU).

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
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Sequence

import numpy as np

from isle_fast import metrics
from isle_fast.errors import InputError
from isle_fast.stores.stack import Stack, check_aligned, kind_phrase, open_stack

__all__ = ["Evaluation", "evaluate", "open_inputs", "check_bg_threshold", "AVERAGES"]

AVERAGES = ("dataset", "image")
#: Store kinds a pseudo-label set may be.
SET_KINDS = ("pseudo", "ensemble")



# -- inputs ----------------------------------------------------------------------------

def _as_stack(obj: Any, kind: Any = None) -> Stack:
    return obj if isinstance(obj, Stack) else open_stack(obj, kind=kind)


def unique_names(stacks: Sequence[Stack]) -> list[str]:
    """Set names, made unique: a repeated name gets ``-2``, ``-3``, ... appended."""
    names: list[str] = []
    for s in stacks:
        base = s.name or os.path.basename(str(s.path).rstrip("/"))
        name, k = base, 2
        while name in names:
            name, k = f"{base}-{k}", k + 1
        names.append(name)
    return names


def open_inputs(sets: Sequence[Any], gt: Any) -> tuple[list[Stack], Stack]:
    """Open (if given as paths) and check the sets and the ground truth.

    Parameters
    ----------
    sets : sequence of path, URL or Stack
        Pseudo-label sets (``labels`` or ``scores`` encoding).
    gt : path, URL or Stack
        Ground truth (``labels`` encoding).

    Returns
    -------
    (list of Stack, Stack)

    Raises
    ------
    InputError
        No sets, a store of the wrong kind or encoding (named): the gt must be
        a ``gt`` store, a set a ``pseudo`` or ``ensemble`` one (an ``images``
        store, or the ground truth itself caught by a shell glob such as
        ``*.zarr``, is refused).
    AlignmentError
        Stores disagree on ids, order, shapes or classes (names store and id).
    """
    if not sets:
        raise InputError("give at least one pseudo-label set")
    gt_stack = _as_stack(gt)
    if gt_stack.kind != "gt":
        raise InputError(f"--gt {gt_stack.path} is {kind_phrase(gt_stack.kind)}, not ground truth "
                         "(kind 'gt'; ingest ground truth with --kind gt)")
    if gt_stack.encoding != "labels":
        raise InputError(f"ground truth {gt_stack.path} has encoding {gt_stack.encoding!r}; "
                         "it must be a label store")
    stacks = [_as_stack(s) for s in sets]
    for s in stacks:
        if s.kind not in SET_KINDS:
            raise InputError(f"set {s.path} is {kind_phrase(s.kind)}; a pseudo-label set is a "
                             f"{' or '.join(repr(k) for k in SET_KINDS)} store")
        if s.encoding not in ("labels", "scores"):
            raise InputError(f"{s.path} has encoding {s.encoding!r}; a pseudo-label set holds "
                             "'labels' or 'scores'")
    check_aligned([gt_stack, *stacks])
    if gt_stack.num_images == 0:
        raise InputError(f"ground truth {gt_stack.path} holds no images")
    if gt_stack.num_classes > 254:
        raise InputError(f"{gt_stack.path}: at most 254 classes are supported")
    return stacks, gt_stack


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
        raise InputError(f"--bg-threshold must be a finite number (a score in [0, 1]), not {value!r}")
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


#: Most uncompressed bytes one task holds (gt + every set's region). The work
#: grid follows the gt's chunks but takes fewer images per task when the sets
#: are much wider than the gt (score stacks are C bytes or more per pixel).
MAX_TASK_BYTES = 128 * 2**20


def work_chunks(stacks: Sequence[Stack], gt: Stack, max_task_bytes: int | None = None) -> tuple[int, int, int]:
    """The regular ``(images, rows, cols)`` chunk grid every array is aligned to.

    The gt's chunk shape, with the image count reduced (never below 1) so that
    one task's gt region plus the same region of every set stays within
    ``max_task_bytes``. Regular, so an output store written on this grid gets
    exactly one task per Zarr chunk.
    """
    if max_task_bytes is None:
        max_task_bytes = MAX_TASK_BYTES
    k, hc, wc = (int(v) for v in gt.chunks)
    per_pixel = 1 + sum(int(np.prod(s.shape[3:], dtype=np.int64)) * s.dtype.itemsize for s in stacks)
    fit = max(1, int(max_task_bytes // max(1, hc * wc * per_pixel)))
    return (max(1, min(k, fit)), hc, wc)


def aligned_arrays(stacks: Sequence[Stack], gt: Stack, chunks: tuple[int, int, int] | None = None
                   ) -> tuple[Any, list[Any]]:
    """The gt and every set as Dask arrays on one chunk grid (:func:`work_chunks`).

    Label arrays get ``chunks``, score arrays ``chunks`` plus one chunk over
    the class axis, so block ``(i, j, k)`` of every array covers the same
    pixels. Stores chunked otherwise are rechunked (each stored chunk is still
    read once).
    """
    chunks = tuple(chunks) if chunks is not None else work_chunks(stacks, gt)
    g = gt.to_dask()
    if g.chunksize != chunks:
        g = g.rechunk(chunks)
    out = []
    for s in stacks:
        a = s.to_dask()
        target = g.chunks if s.encoding == "labels" else g.chunks + ((a.shape[-1],),)
        out.append(a if a.chunks == target else a.rechunk(target))
    return g, out


def blockwise_args(arrays: Sequence[Any], stacks: Sequence[Stack]) -> list[Any]:
    """``(array, index)`` pairs for :func:`dask.array.blockwise` (``ijk`` / ``ijkc``)."""
    args: list[Any] = []
    for a, s in zip(arrays, stacks):
        args += [a, "ijk" if s.encoding == "labels" else "ijkc"]
    return args


def _contig(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a)


# -- the per-chunk task -------------------------------------------------------------------

def _confusion_block(gt: np.ndarray, *blocks: np.ndarray, backend: str, groups: tuple[Group, ...],
                     order: tuple[int, ...], num_classes: int, per_image: bool) -> np.ndarray:
    """Counts of one chunk: ``(1, 1, 1, N, C, C+1)``, or ``(k, 1, 1, N, C, C+1)`` per image."""
    from isle_fast.backend import task_kernels

    with task_kernels(backend) as K:
        n_sets = len(order)
        by_pos = dict(zip(order, blocks))
        gt = _contig(gt)
        n_img = gt.shape[0] if per_image else 1
        out = np.zeros((n_img, 1, 1, n_sets, num_classes, num_classes + 1), dtype=np.int64)
        for grp in groups:
            arrs = [_contig(by_pos[m]) for m in grp.members]
            for m in range(n_img):
                g = gt[m:m + 1] if per_image else gt
                sets = tuple(a[m:m + 1] for a in arrs) if per_image else tuple(arrs)
                if grp.encoding == "labels":
                    res = K.confusion_labels(g, sets, num_classes)
                else:
                    res = K.confusion_scores(g, sets, num_classes, grp.threshold)
                out[m, 0, 0, list(grp.members)] = np.asarray(res)
        return out


# -- results ------------------------------------------------------------------------------

@dataclass
class Evaluation:
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

    # -- scores (percent) -----------------------------------------------------------------
    @property
    def dataset_iou(self) -> np.ndarray:
        """(N, C) IoU in percent from the summed counts (the standard definition)."""
        return metrics.iou(self.counts)

    @property
    def image_iou(self) -> np.ndarray | None:
        """(N, C) mean per-image IoU in percent over images with union > 0 (image average only)."""
        if self.image_stats is None:
            return None
        per = metrics.iou_from_stats(self.image_stats)  # (I, N, C), NaN where union == 0
        return metrics.nanmean(per, axis=0)

    @property
    def iou(self) -> np.ndarray:
        """(N, C) IoU in percent, averaged as :attr:`average` says; NaN where undefined."""
        if self.average == "image" and self.image_stats is not None:
            return self.image_iou  # type: ignore[return-value]
        return self.dataset_iou

    @property
    def miou(self) -> np.ndarray:
        """(N,) mean IoU in percent over the classes whose IoU is defined."""
        return metrics.miou(self.iou)

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

    def table(self, selection: Any = None) -> str:
        """A plain-text per-class IoU table; the chosen set of each class is marked ``*``."""
        sel = selection if selection is not None else self.select()
        iou = self.iou
        width = max(10, *(len(c) for c in self.classes))
        cols = [n[:12] for n in self.set_names]
        colw = max(7, *(len(c) for c in cols)) + 1
        lines = ["class".ljust(width) + "".join(c.rjust(colw) for c in cols)]
        for c, cname in enumerate(self.classes):
            cells = []
            for n in range(len(self.set_names)):
                v = iou[n, c]
                mark = "*" if int(sel.best[c]) == n and sel.members[n] else " "
                cells.append(("-" if np.isnan(v) else f"{v:.1f}").rjust(colw - 1) + mark)
            lines.append(cname.ljust(width) + "".join(cells))
        lines.append("mIoU".ljust(width) + "".join(
            ("-" if np.isnan(v) else f"{v:.1f}").rjust(colw - 1) + " " for v in self.miou))
        return "\n".join(lines)


# -- the pass -----------------------------------------------------------------------------

def confusion_graph(stacks: Sequence[Stack], gt: Stack, *, backend: str, bg_threshold: float | None,
                    per_image: bool):
    """The lazy Dask array of per-chunk counts (see :func:`evaluate`).

    Returns a ``(bi, bj, bk, N, C, C+1)`` array (one entry per chunk of the
    gt) or, with ``per_image``, ``(I, bj, bk, N, C, C+1)``.
    """
    import dask.array as da

    c = gt.num_classes
    groups = tuple(group_sets(stacks, bg_threshold))
    order = tuple(m for g in groups for m in g.members)
    g, arrays = aligned_arrays(stacks, gt)
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

def dask_requested() -> bool:
    """Whether the user asked Dask to schedule: a ``dask.distributed`` client, or a configured scheduler.

    ``DASK_SCHEDULER`` in the environment, or ``dask.config`` ``scheduler``
    (when Dask is imported; with ``dask.config.set(scheduler=...)``).
    """
    if os.environ.get("DASK_SCHEDULER"):
        return True
    if "dask" in sys.modules:
        import dask

        if dask.config.get("scheduler", None) is not None:
            return True
    from isle_fast.stores.parallel import _current_client

    return _current_client() is not None


def local_specs(stacks: Sequence[Stack], gt: Stack) -> list[Any] | None:
    """Direct-reader specs of the gt and every set when one task per gt chunk can read them all, else None.

    That needs every store on local disk in the plain Zstd layout, the sets
    chunked like the gt (score sets: the whole class axis in one chunk), and
    the gt's chunks small enough for one task (:func:`work_chunks`). Another
    Dask scheduler chosen by the user means the Dask graph; a ``dask.distributed``
    client does not: the same chunk tasks then run on its workers
    (:func:`chunk_executor`), which read the stores on the shared file system.
    """
    from isle_fast.cluster import current_client

    if dask_requested() and current_client() is None:
        return None
    specs = [gt.chunk_spec()] + [s.chunk_spec() for s in stacks]
    if any(sp is None for sp in specs) or 0 in gt.shape:
        return None
    want = tuple(gt.chunks)
    if work_chunks(stacks, gt) != want:
        return None
    for st in stacks:
        if tuple(st.chunks[:3]) != want or (st.encoding == "scores" and st.chunks[3] != st.shape[3]):
            return None
    return specs


def chunk_executor(n_tasks: int) -> Any:
    """Where the chunk tasks of the direct passes run: on the workers of the active
    ``dask.distributed`` client (:class:`~isle_fast.stores.parallel.ClusterExecutor`), else on
    a thread per core here (:class:`~isle_fast.stores.parallel.ThreadExecutor`)."""
    from isle_fast.cluster import current_client
    from isle_fast.stores.parallel import ClusterExecutor, ThreadExecutor, default_workers

    client = current_client()
    if client is not None:
        return ClusterExecutor(client)
    return ThreadExecutor(max(1, min(default_workers(), n_tasks)))


def _local_task(specs: Sequence[Any], tails: Sequence[tuple], block: tuple[int, int, int],
                shape: tuple[int, int, int], **kernel: Any) -> np.ndarray:
    """One gt chunk: read it and the same chunk of every set (direct reader), then count it."""
    from isle_fast.stores.chunks import read_chunk

    g = read_chunk(specs[0], block_id=block, block_info={None: {"chunk-shape": shape}})
    blocks = [read_chunk(specs[1 + m], block_id=block + (0,) * len(tails[m]),
                          block_info={None: {"chunk-shape": shape + tails[m]}}) for m in kernel["order"]]
    return _confusion_block(g, *blocks, **kernel)


def _local_counts(specs: Sequence[Any], tails: Sequence[tuple], block: tuple[int, int, int],
                  shape: tuple[int, int, int], **kernel: Any) -> tuple[np.ndarray, np.ndarray | None]:
    """:func:`_local_task` reduced where it ran: ``(counts (N, C, C+1), per-image stats or None)``.

    The chunk's counts are summed in the task, so a cluster worker sends back one small table
    instead of the per-image counts of every image of its chunk.
    """
    out = _local_task(specs, tails, block, shape, **kernel)
    stats = metrics.intersection_union(out[:, 0, 0]) if kernel["per_image"] else None
    return out.sum(axis=(0, 1, 2)), stats


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

    c = gt.num_classes
    groups = tuple(group_sets(stacks, bg_threshold))
    order = tuple(m for g in groups for m in g.members)
    tails = [tuple(int(v) for v in st.shape[3:]) for st in stacks]
    n, h, w = (int(v) for v in gt.shape)
    k, hc, wc = (int(v) for v in gt.chunks)
    tasks = []
    for i in range(-(-n // k)):
        for j in range(-(-h // hc)):
            for l in range(-(-w // wc)):
                tasks.append(((i, j, l), (min(k, n - i * k), min(hc, h - j * hc), min(wc, w - l * wc))))
    fn = partial(_local_counts, specs, tails, backend=backend, groups=groups, order=order, num_classes=c,
                 per_image=per_image)
    counts = np.zeros((len(stacks), c, c + 1), dtype=np.int64)
    stats = np.zeros((n, len(stacks), c, 2), dtype=np.int64) if per_image else None
    with chunk_executor(len(tasks)) as ex, \
            bar(total=len(tasks), desc="evaluate", unit="chunk", quiet=not progress) as pb:
        for t, (part, part_stats) in ex.imap(fn, tasks):
            counts += part
            if stats is not None:
                i0 = tasks[t][0][0] * k
                stats[i0:i0 + part_stats.shape[0]] += part_stats
            pb.update(1)
    return counts, stats


def evaluate(sets: Sequence[Any], gt: Any, *, average: str = "dataset", backend: str = "auto",
             bg_threshold: float | None = None, progress: bool = True) -> Evaluation:
    """Per-class confusion counts and scores of every set against the ground truth, in one pass.

    Parameters
    ----------
    sets : sequence of path, fsspec URL or Stack
        The pseudo-label sets; label maps and score stacks may be mixed.
    gt : path, fsspec URL or Stack
        Ground-truth label store (255 = ignore).
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

    Returns
    -------
    Evaluation

    Notes
    -----
    Never loads a whole stack: each task holds one chunk of the gt and the
    same region of every set. Works unchanged on a ``dask.distributed``
    cluster (the active client is used) and on fsspec URLs.
    """
    from isle_fast.backend import resolve_backend

    if average not in AVERAGES:
        raise InputError(f"--average must be one of {', '.join(AVERAGES)}, not {average!r}")
    bg_threshold = check_bg_threshold(bg_threshold)
    t0 = time.perf_counter()
    be = resolve_backend(backend)
    stacks, gt_stack = open_inputs(sets, gt)
    per_image = average == "image"
    specs = local_specs(stacks, gt_stack)
    if specs is not None:
        counts, image_stats = local_pass(specs, stacks, gt_stack, backend=be, bg_threshold=bg_threshold,
                                         per_image=per_image, progress=progress)
    else:
        counts, image_stats = _dask_pass(stacks, gt_stack, backend=be, bg_threshold=bg_threshold,
                                         per_image=per_image, progress=progress)
    return Evaluation(
        classes=list(gt_stack.classes),
        set_names=unique_names(stacks),
        counts=np.asarray(counts, dtype=np.int64),
        average=average,
        image_stats=None if image_stats is None else np.asarray(image_stats, dtype=np.int64),
        set_paths=[s.path for s in stacks],
        gt_path=gt_stack.path,
        backend=be,
        seconds=time.perf_counter() - t0,
    )


def _dask_pass(stacks: Sequence[Stack], gt: Stack, *, backend: str, bg_threshold: float | None,
               per_image: bool, progress: bool) -> tuple[Any, Any]:
    """The evaluate pass as a Dask graph (any scheduler, cluster, fsspec store): ``(counts, image_stats)``."""
    import dask

    from isle_fast.backend import dask_scheduler
    from isle_fast.progress import dask_progress

    graph = confusion_graph(stacks, gt, backend=backend, bg_threshold=bg_threshold, per_image=per_image)
    with dask_progress("evaluate", quiet=not progress):
        if per_image:
            per_img = graph.sum(axis=(1, 2))  # (I, N, C, C+1), chunked by images
            n, c = len(stacks), gt.num_classes
            stats = per_img.map_blocks(metrics.intersection_union,
                                       chunks=(per_img.chunks[0], (n,), (c,), (2,)),
                                       dtype=np.int64)
            return dask.compute(per_img.sum(axis=0), stats, scheduler=dask_scheduler())
        (counts,) = dask.compute(graph.sum(axis=(0, 1, 2)), scheduler=dask_scheduler())
        return counts, None
