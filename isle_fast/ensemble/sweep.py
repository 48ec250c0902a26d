"""Every background threshold in one pass: the mIoU curve of score sets and each set's best threshold.

The public CAM evaluations (IRN ``eval_cam.py``, PuzzleCAM ``evaluate.py``)
re-read every file once per background threshold. Here one pass over the
data gives the confusion counts at every threshold, exactly.

How a threshold decides a pixel
-------------------------------
With a background threshold the decode (:func:`isle_fast.evaluate` with
``bg_threshold``, the kernels' ``decode_scores``) replaces the background
slice by the threshold and takes the argmax, the first index winning ties.
So a pixel is foreground class ``a`` iff ``a`` is the first of the largest
foreground slices (1..C-1) and its score ``m`` is *strictly above* the
threshold; a tie with the threshold is background. The stored background
slice is not read.

Thresholds and stored levels
----------------------------
A threshold ``T`` (a [0, 1] score) is compared in the store's units: a
``uint8`` store with ``score_scale`` S (255) compares the level
``L = floor(clip(T * S, 0, 255))`` (``T * S`` in float64) with the stored
integer score, which is the same as comparing ``T * S`` itself. So ``T``
and ``T'`` with the same ``L`` decode identically, and a threshold exactly on
a level ``k / 255`` is the level its float product floors to (``0.2 * 255`` is
``51.00000000000001``: level 51; pixels with score 51 are background).
One pass counts ``(gt, a, m)`` for every pixel
(:func:`isle_fast.kernels.cpu.confusion_score_bins`); the counts at level
``L`` are then ``a`` for the pixels with ``m > L`` and background for the
others (:func:`counts_at_levels`): equal, bit for bit, to
``evaluate(..., bg_threshold=T)`` for every ``T`` of the sweep.

Class-sparse stores (:mod:`isle_fast.stores.sparse`) are counted from their
stored slots and keys (:func:`isle_fast.kernels.cpu.sparse_score_bins`),
without making the dense stack: one sweep per chunk decodes the K stored slots
of every pixel inside its image (the padding is not read) and counts ``(gt,
a, bin)``, the bin of ``m`` being the number of the sweep's distinct levels
below it (:func:`level_bins`; ``T + 1`` bins instead of 256, so the
histogram stays in cache), and :func:`counts_at_bins` gives every
threshold. A ground truth of some of the images (any order,
:mod:`isle_fast.ensemble.partial`) is swept on those images, aligned by id.

``float16`` / ``float32`` score stores have no levels: they are evaluated
once per threshold (exact too, but one decode per threshold). Label-map sets
do not depend on the threshold (one count, the same at every threshold).

The best threshold of a set is the one with the highest mIoU, the lowest
threshold winning ties.

The counts of a sweep are kept (:mod:`isle_fast.ensemble.sweep_cache`, keyed by
the stores' metadata checksums and the thresholds): ``isle evaluate
--bg-threshold S`` followed by ``isle merge --bg-threshold S`` makes one sweep
pass; the merge only reads the chunks to write the ensemble.
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
from isle_fast.errors import InputError, param
from isle_fast.stores.stack import Stack

__all__ = [
    "evaluate_at",
    "ThresholdSweep",
    "sweep_thresholds",
    "parse_thresholds",
    "counts_at_levels",
    "counts_at_bins",
    "level_bins",
    "threshold_levels",
    "BEST",
    "BEST_GRID",
]

#: ``--bg-threshold best``: the thresholds searched, 0.00, 0.01, ..., 1.00.
BEST = "best"
BEST_GRID: tuple[float, ...] = tuple(round(k / 100, 2) for k in range(101))


def _check_one(v: float, text: str, name: str = "bg_threshold") -> float:
    if not math.isfinite(v) or not 0.0 <= v <= 1.0:
        raise InputError(f"{param(name)}: {text!r} is not a finite number in [0, 1] (a score)")
    return v


def parse_thresholds(spec: Any, name: str = "bg_threshold") -> tuple[float, ...]:
    """A threshold sweep from ``'best'``, ``'A:B:STEP'`` (A to B inclusive), ``'T1,T2,...'`` or a sequence.

    Values are [0, 1] scores; a range's values are rounded to 12 decimals
    (``0.05:0.80:0.05`` gives exactly the floats ``0.05, 0.1, 0.15, ...``
    a user would type). ``'best'`` is :data:`BEST_GRID`. Repeats are dropped,
    the order is ascending. Messages name the caller's parameter ``name``.

    Raises
    ------
    InputError
        Text that is not a threshold, a value outside [0, 1], a non-positive
        step, an empty sweep.
    """
    if isinstance(spec, str):
        text = spec.strip()
        if text.lower() == BEST:
            return BEST_GRID
        if ":" in text:
            parts = text.split(":")
            if len(parts) != 3:
                raise InputError(f"{param(name)}: a range is START:STOP:STEP, not {spec!r}")
            try:
                a, b, step = (float(p) for p in parts)
            except ValueError:
                raise InputError(
                    f"{param(name)}: a range is START:STOP:STEP of numbers, not {spec!r}"
                ) from None
            _check_one(a, parts[0], name)
            _check_one(b, parts[1], name)
            if not math.isfinite(step) or step <= 0:
                raise InputError(f"{param(name)}: the step of {spec!r} must be a positive number")
            if b < a:
                raise InputError(f"{param(name)}: the range {spec!r} ends before it starts")
            n = int(math.floor((b - a) / step + 1e-9))
            if n > 100_000:
                raise InputError(f"{param(name)}: the range {spec!r} has more than 100000 thresholds")
            values = [round(a + k * step, 12) for k in range(n + 1)]
        else:
            values = []
            for p in text.split(","):
                try:
                    values.append(float(p))
                except ValueError:
                    raise InputError(f"{param(name)}: {p.strip()!r} is not a number (in {spec!r})") from None
            for v, p in zip(values, text.split(",")):
                _check_one(v, p.strip(), name)
    else:
        values = []
        for v in spec:
            if isinstance(v, bool):
                raise InputError(f"{param(name)}: {v!r} is not a threshold")
            try:
                values.append(_check_one(float(v), str(v), name))
            except (TypeError, ValueError):
                raise InputError(f"{param(name)}: {v!r} is not a threshold") from None
    if not values:
        raise InputError(f"{param(name)}: the sweep holds no threshold")
    return tuple(sorted(set(values)))


def is_sweep(spec: Any) -> bool:
    """Whether a ``bg_threshold`` asks for a sweep: ``'best'``, a range or list text, or a sequence.

    Other text is not a sweep (a single threshold's checks name what is wrong with it).
    """
    if isinstance(spec, str):
        t = spec.strip()
        return t.lower() == BEST or ":" in t or "," in t
    return isinstance(spec, (list, tuple, np.ndarray))


def threshold_levels(thresholds: Sequence[float], score_scale: float) -> np.ndarray:
    """The stored ``uint8`` level each threshold compares (see the module notes), as int64.

    Exactly what a single-threshold evaluation compares: the kernels' ``threshold_value``
    of ``T * score_scale``.
    """
    from isle_fast.kernels.checks import threshold_value

    return np.array([int(threshold_value(float(t) * score_scale, np.uint8)) for t in thresholds], np.int64)


def counts_at_levels(bins: np.ndarray, levels: Sequence[int]) -> np.ndarray:
    """Confusion counts at every level from ``(..., C, C, 256)`` bins: ``(..., T, C, C + 1)``.

    ``bins[..., t, a, m]``: pixels of gt ``t`` with foreground argmax ``a`` at value ``m``
    (:func:`isle_fast.kernels.cpu.confusion_score_bins`). At level ``L`` such a pixel is
    predicted ``a`` when ``m > L`` and background (0) otherwise; column C (abstained) is 0.
    """
    bins = np.asarray(bins, dtype=np.int64)
    lv = np.asarray(levels, dtype=np.int64)
    if bins.shape[-1] != 256 or bins.shape[-2] != bins.shape[-3]:
        raise ValueError(f"bins must have shape (..., C, C, 256), not {bins.shape}")
    if lv.ndim != 1 or (lv.size and (lv.min() < 0 or lv.max() > 255)):
        raise ValueError("levels must be a 1-d sequence of integers in 0..255")
    return counts_at_bins(bins, lv + 1)


def counts_at_bins(bins: np.ndarray, starts: Sequence[int] | np.ndarray) -> np.ndarray:
    """Confusion counts at every threshold from ``(..., C, C, B)`` bins: ``(..., T, C, C + 1)``.

    ``bins[..., t, a, b]``: pixels of gt ``t`` with foreground argmax ``a`` whose max is in bin
    ``b`` (:func:`level_bins`); at threshold ``k`` such a pixel is predicted ``a`` when
    ``b >= starts[k]`` and background (0) otherwise (``starts[k] == B``: background everywhere).
    """
    bins = np.asarray(bins, dtype=np.int64)
    st = np.asarray(starts, dtype=np.int64)
    B = bins.shape[-1]
    if bins.ndim < 3 or bins.shape[-2] != bins.shape[-3]:
        raise ValueError(f"bins must have shape (..., C, C, B), not {bins.shape}")
    if st.ndim != 1 or (st.size and (st.min() < 1 or st.max() > B)):
        raise ValueError(f"starts must be a 1-d sequence of integers in 1..{B}")
    C = bins.shape[-2]
    # above[..., t, a, b] = pixels in bins >= b (b = B: none)
    above = np.cumsum(bins[..., ::-1], axis=-1)[..., ::-1]
    above = np.concatenate([above, np.zeros(above.shape[:-1] + (1,), np.int64)], axis=-1)
    sel = np.moveaxis(above[..., st], -1, -3)  # (..., T, C, C)
    out = np.zeros(sel.shape[:-1] + (C + 1,), np.int64)
    rows = bins.sum(axis=(-1, -2))  # (..., C)
    out[..., 1:C] = sel[..., 1:]
    out[..., 0] = rows[..., None, :] - sel[..., 1:].sum(axis=-1)
    return out


def level_bins(levels: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """The score bins of a sweep's levels: ``(table (256,) uint8, starts (T,) int64)``.

    ``table[m]`` is the number of distinct levels below ``m``, so a pixel with foreground max ``m``
    is foreground at level ``L`` (``m > L``) exactly when its bin is ``>= starts[k]``, the position
    of ``L = levels[k]`` among the distinct levels plus one. ``B = distinct levels + 1`` bins.
    """
    lv = np.asarray(levels, dtype=np.int64)
    uniq = np.unique(lv)
    table = np.searchsorted(uniq, np.arange(256), side="left").astype(np.uint8)
    return table, np.searchsorted(uniq, lv, side="left").astype(np.int64) + 1


# -- the per-chunk task -------------------------------------------------------------------------


@dataclass(frozen=True)
class _SetPlan:
    """How one set is counted: ``'labels'`` (once), ``'bins'`` / ``'sparse'`` (uint8 levels), ``'scores'``."""

    mode: str
    levels: tuple[int, ...] = ()  # bins
    units: tuple[float, ...] = ()  # scores: thresholds in stored units


def _plans(stacks: Sequence[Stack], thresholds: Sequence[float], stored_background: bool = False
           ) -> tuple[_SetPlan, ...]:
    """How each set is counted; ``stored_background``: a class-sparse set at its store's background
    level (its dense view's background slice: no threshold) instead of the thresholds'."""
    from isle_fast.stores.sparse import BACKGROUND_ATTR

    out = []
    for s in stacks:
        if s.encoding == "labels":
            out.append(_SetPlan("labels"))
        elif s.score_layout == "sparse" and stored_background:
            out.append(_SetPlan("sparse", levels=(int(s.attrs[BACKGROUND_ATTR]),) * len(thresholds)))
        elif s.score_layout == "sparse":
            out.append(
                _SetPlan("sparse", levels=tuple(int(v) for v in threshold_levels(thresholds, s.score_scale)))
            )
        elif np.dtype(s.dtype) == np.uint8:
            out.append(
                _SetPlan("bins", levels=tuple(int(v) for v in threshold_levels(thresholds, s.score_scale)))
            )
        else:
            out.append(_SetPlan("scores", units=tuple(float(t) * s.score_scale for t in thresholds)))
    return tuple(out)


def _sweep_block(
    gt: np.ndarray,
    *blocks: np.ndarray,
    backend: str,
    plans: tuple[_SetPlan, ...],
    n_thr: int,
    num_classes: int,
    per_image: bool,
    shapes: np.ndarray | None = None,
) -> np.ndarray:
    """Counts of one chunk at every threshold: ``(1 or k, 1, 1, N, T, C, C+1)``.

    ``shapes`` (local pass): rows and columns of each image inside the chunk; the class-sparse
    kernel does not read the rest (padding, 255 in the gt, is never counted either way).
    """
    from isle_fast.backend import task_kernels
    from isle_fast.kernels import cpu

    C = num_classes
    gt = np.ascontiguousarray(gt)
    n_img = gt.shape[0] if per_image else 1
    out = np.zeros((n_img, 1, 1, len(plans), n_thr, C, C + 1), dtype=np.int64)
    it = iter(np.ascontiguousarray(b) for b in blocks)
    arrs = [(next(it), next(it)) if pl.mode == "sparse" else next(it) for pl in plans]  # sparse: (cams, keys)
    sparse_n = [n for n, pl in enumerate(plans) if pl.mode == "sparse"]
    if sparse_n:  # every class-sparse set in one decode + count sweep, on the bins of its own levels
        tables = [level_bins(plans[n].levels) for n in sparse_n]
        lut = np.zeros((len(sparse_n), 256), np.uint8)
        for j, (t, _) in enumerate(tables):
            lut[j] = t
    with task_kernels(backend) as K:
        for m in range(n_img):
            g = gt[m : m + 1] if per_image else gt
            if per_image:
                part = [
                    (a[0][m : m + 1], a[1][m : m + 1]) if isinstance(a, tuple) else a[m : m + 1] for a in arrs
                ]
            else:
                part = arrs
            # all uint8 sets in one fused pass each layout (CPU kernels: the bins are host histograms)
            bins_sets = tuple(p for p, pl in zip(part, plans) if pl.mode == "bins")
            if bins_sets:
                bins = cpu.confusion_score_bins(g, bins_sets, C)
            if sparse_n:
                g3 = g.reshape((-1,) + g.shape[-2:])
                sh = None if shapes is None else (shapes[m : m + 1] if per_image else shapes)
                sbins = cpu.sparse_score_bins(
                    g3, tuple(part[n][0] for n in sparse_n), tuple(part[n][1] for n in sparse_n), C, lut, sh
                )
            b = sb = 0
            for n, (a, pl) in enumerate(zip(part, plans)):
                if pl.mode == "labels":
                    out[m, 0, 0, n] = np.asarray(K.confusion_labels(g, (a,), C))[0][None]
                elif pl.mode == "bins":
                    out[m, 0, 0, n] = counts_at_levels(bins[b], pl.levels)
                    b += 1
                elif pl.mode == "sparse":
                    out[m, 0, 0, n] = counts_at_bins(sbins[sb], tables[sb][1])
                    sb += 1
                else:
                    for k, u in enumerate(pl.units):
                        out[m, 0, 0, n, k] = np.asarray(K.confusion_scores(g, (a,), C, u))[0]
    return out


def _local_sweep_task(
    specs: Sequence[Any],
    tails: Sequence[tuple],
    keys: Sequence[np.ndarray | None],
    images_per_chunk: int,
    image_shapes: np.ndarray,
    tile: tuple[int, int],
    block: tuple[int, int, int],
    shape: tuple[int, int, int],
    **kernel: Any,
) -> np.ndarray:
    """One gt chunk: read it and the same chunk of every set (a class-sparse set: its slots and keys).

    ``image_shapes`` (I, 2): every image's rows and columns; ``tile``: the chunks' rows and columns.
    """
    from isle_fast.stores.chunks import read_chunk

    g = read_chunk(specs[0], block_id=block, block_info={None: {"chunk-shape": shape}})
    i0 = block[0] * images_per_chunk
    blocks: list[np.ndarray] = []
    for m in range(len(tails)):
        blocks.append(
            read_chunk(
                specs[1 + m],
                block_id=block + (0,) * len(tails[m]),
                block_info={None: {"chunk-shape": shape + tails[m]}},
            )
        )
        km = keys[m]
        if km is not None:
            blocks.append(km[i0 : i0 + shape[0]])
    origin = np.array([block[1] * tile[0], block[2] * tile[1]], np.int64)
    inside = np.clip(image_shapes[i0 : i0 + shape[0]] - origin, 0, np.array(shape[1:], np.int64))
    return _sweep_block(g, *blocks, shapes=inside, **kernel)


def _local_specs(stacks: Sequence[Stack], gt: Stack, plans: Sequence[_SetPlan]) -> list[Any] | None:
    """Direct-reader specs of the gt and every set (a class-sparse set: its ``cams``) for a pass without
    Dask, or None: every store local, plain Zstd, chunked like the gt (one chunk over the class / slot axis)."""
    from isle_fast.ensemble.graph import local_specs
    from isle_fast.stores.sparse import _cams_spec

    dense = [s for s, p in zip(stacks, plans) if p.mode != "sparse"]
    base = local_specs(dense, gt) if dense else local_specs([], gt)
    if base is None:
        return None
    it = iter(base[1:])
    specs = [base[0]]
    for s, p in zip(stacks, plans):
        if p.mode != "sparse":
            specs.append(next(it))
            continue
        cm = s.cams_meta
        spec = _cams_spec(s)
        if spec is None or tuple(cm.chunks[:3]) != tuple(gt.chunks) or cm.chunks[3] != cm.shape[3]:
            return None
        specs.append(spec)
    return specs


def _local_sweep(
    specs: Sequence[Any], stacks: Sequence[Stack], gt: Stack, *, progress: bool, **kernel: Any
) -> tuple[np.ndarray, np.ndarray | None]:
    """The sweep on a thread pool here, one task per gt chunk (as :func:`isle_fast.evaluate`'s local pass)."""
    from isle_fast.ensemble.graph import chunk_tasks
    from isle_fast.progress import progress as bar
    from isle_fast.stores.parallel import ThreadExecutor, default_workers

    c = gt.num_classes
    tails = [tuple(int(v) for v in st.shape[3:]) for st in stacks]
    n, h, w = (int(v) for v in gt.shape)
    k, hc, wc = (int(v) for v in gt.chunks)
    tasks = chunk_tasks(gt)
    keys = [s.sparse_keys if p.mode == "sparse" else None for s, p in zip(stacks, kernel["plans"])]
    tails = [(int(s.cams_meta.shape[3]),) if p.mode == "sparse" else t
             for s, p, t in zip(stacks, kernel["plans"], tails)]
    fn = partial(_local_sweep_task, specs, tails, keys, k, np.asarray(gt.shapes, np.int64), (hc, wc), **kernel)
    T = kernel["n_thr"]
    counts = np.zeros((len(stacks), T, c, c + 1), dtype=np.int64)
    stats = np.zeros((n, len(stacks), T, c, 2), dtype=np.int64) if kernel["per_image"] else None
    with (
        ThreadExecutor(max(1, min(default_workers(), len(tasks)))) as ex,
        bar(total=len(tasks), desc="threshold sweep", unit="chunk", quiet=not progress) as pb,
    ):
        for t, out in ex.imap(fn, tasks):
            counts += out.sum(axis=(0, 1, 2))
            if stats is not None:
                i0 = tasks[t][0][0] * k
                stats[i0 : i0 + out.shape[0]] += metrics.intersection_union(out[:, 0, 0])
            pb.update(1)
    return counts, stats


def _dask_sweep(
    stacks: Sequence[Stack], gt: Stack, *, progress: bool, positions: np.ndarray | None = None, **kernel: Any
) -> tuple[np.ndarray, np.ndarray | None]:
    """The sweep as a Dask graph (any scheduler, cluster, fsspec store).

    ``positions`` (a gt of some images, :func:`isle_fast.ensemble.partial.gt_positions`): the sets'
    images at the gt's ids, in its order, cropped to the common padded shape (as ``evaluate``).
    """
    import dask
    import dask.array as da

    from isle_fast.backend import dask_scheduler
    from isle_fast.ensemble.graph import aligned_arrays, blockwise_args
    from isle_fast.progress import dask_progress

    c = gt.num_classes
    per_image = kernel["per_image"]
    sparse = [n for n, pl in enumerate(kernel["plans"]) if pl.mode == "sparse"]
    letters = "fghlmnopqrstuvwxyz"
    if len(sparse) > len(letters):
        raise InputError(f"at most {len(letters)} class-sparse sets in one threshold sweep")
    dense = [n for n in range(len(stacks)) if n not in sparse]
    if positions is None:
        g, dense_arrays = aligned_arrays([stacks[n] for n in dense], gt)
    else:
        from isle_fast.ensemble.partial import subset_arrays

        # (the sets' padded shape comes from the first set: a class-sparse one's dense view is not computed)
        g, dense_arrays = subset_arrays([stacks[n] for n in dense] or [stacks[0]], gt, positions)
        dense_arrays = dense_arrays[: len(dense)]
    dense_args = blockwise_args(dense_arrays, [stacks[n] for n in dense])
    args: list[Any] = []
    for n in range(len(stacks)):
        if n in sparse:  # the stored slots and keys, on the gt's grid: no dense stack is made
            from isle_fast.stores.sparse import cams_dask

            st = stacks[n]
            k = int(st.sparse_keys.shape[1])
            ax = letters[sparse.index(n)]
            cams = cams_dask(st)
            skeys = st.sparse_keys
            if positions is not None:
                cams = cams[positions][:, : g.shape[1], : g.shape[2]]
                skeys = skeys[positions]
            target = g.chunks + ((k,),)
            cams = cams if cams.chunks == target else cams.rechunk(target)
            keys = da.from_array(skeys, chunks=(g.chunks[0], (k,)))
            args += [cams, "ijk" + ax, keys, "i" + ax]
        else:
            j = dense.index(n)
            args += dense_args[2 * j : 2 * j + 2]
    one = lambda n: 1  # noqa: E731
    graph = da.blockwise(
        partial(_sweep_block, **kernel),
        "ijkaebd",
        g,
        "ijk",
        *args,
        new_axes={"a": len(stacks), "e": kernel["n_thr"], "b": c, "d": c + 1},
        adjust_chunks={"i": (lambda n: n) if per_image else one, "j": one, "k": one},
        dtype=np.int64,
        concatenate=True,
        meta=np.empty((0,) * 7, dtype=np.int64),
    )
    with dask_progress("threshold sweep", quiet=not progress):
        if per_image:
            per_img = graph.sum(axis=(1, 2))  # (I, N, T, C, C+1), chunked by images
            n, t = len(stacks), kernel["n_thr"]
            stats = per_img.map_blocks(
                metrics.intersection_union, chunks=(per_img.chunks[0], (n,), (t,), (c,), (2,)), dtype=np.int64
            )
            return dask.compute(per_img.sum(axis=0), stats, scheduler=dask_scheduler())
        (counts,) = dask.compute(graph.sum(axis=(0, 1, 2)), scheduler=dask_scheduler())
        return counts, None


# -- the result ---------------------------------------------------------------------------------


@dataclass
class ThresholdSweep(metrics.AveragedIoU):
    """Confusion counts of N sets at T background thresholds, from one pass.

    Attributes
    ----------
    thresholds : tuple of float
        The [0, 1] thresholds, ascending.
    classes, set_names, set_paths, gt_path, average, backend, seconds
        As in :class:`isle_fast.ensemble.evaluate.Evaluation`.
    counts : ndarray, int64, (N, T, C, C+1)
        ``counts[n, k]`` equals ``evaluate(..., bg_threshold=thresholds[k]).counts[n]``.
    encodings : list of str
        ``'labels'`` or ``'scores'`` per set (label sets do not depend on the threshold).
    levels : list of (list of int or None)
        The stored ``uint8`` level each threshold compares, per set (None: not a uint8 score set).
    image_stats : ndarray, int64, (I, N, T, C, 2), optional
        Per-image intersection and union (``average='image'``).
    from_cache : bool
        The counts were kept from an earlier sweep of the same stores and thresholds
        (:mod:`isle_fast.ensemble.sweep_cache`): no pass over the data was made.
    """

    thresholds: tuple[float, ...]
    classes: list[str]
    set_names: list[str]
    counts: np.ndarray
    encodings: list[str]
    levels: list[list[int] | None]
    average: str = "dataset"
    image_stats: np.ndarray | None = None
    set_paths: list[str] = field(default_factory=list)
    gt_path: str = ""
    backend: str = "cpu"
    seconds: float = 0.0
    #: the counts came from the sweep cache (:mod:`isle_fast.ensemble.sweep_cache`), no pass was made
    from_cache: bool = False

    def evaluation(self, indices: Sequence[int]) -> Any:
        """The :class:`Evaluation` of every set ``n`` at ``thresholds[indices[n]]`` (no new pass)."""
        from isle_fast.ensemble.evaluate import Evaluation

        idx = np.asarray(indices, dtype=np.int64)
        n = np.arange(len(self.set_names))
        return Evaluation(
            classes=list(self.classes),
            set_names=list(self.set_names),
            counts=self.counts[n, idx].copy(),
            average=self.average,
            image_stats=None if self.image_stats is None else self.image_stats[:, n, idx].copy(),
            set_paths=list(self.set_paths),
            gt_path=self.gt_path,
            backend=self.backend,
            seconds=self.seconds,
        )

    # iou (N, T, C) and miou (N, T), the curve of every set: metrics.AveragedIoU

    @property
    def best_index(self) -> np.ndarray:
        """(N,) position of each set's best threshold (highest mIoU, lowest threshold on ties)."""
        m = np.where(np.isnan(self.miou), -np.inf, self.miou)
        return np.argmax(m, axis=1)

    @property
    def best_thresholds(self) -> list[float | None]:
        """Each score set's best threshold; None for label sets (the threshold does not apply)."""
        return [
            None if e == "labels" else float(self.thresholds[int(k)])
            for e, k in zip(self.encodings, self.best_index)
        ]

    def best_evaluation(self) -> Any:
        """The :class:`Evaluation` of every set at its own best threshold."""
        return self.evaluation([int(v) for v in self.best_index])

    def to_json(self) -> dict:
        """``{"thresholds", "sets": {name: {"miou": curve, "best_threshold", "best_miou", "levels"}}}``."""
        miou = self.miou
        best = self.best_index
        sets = {}
        for n, name in enumerate(self.set_names):
            sets[name] = {
                "encoding": self.encodings[n],
                "miou": metrics.jsonable(miou[n]),
                "best_threshold": self.best_thresholds[n],
                "best_miou": metrics.jsonable(miou[n, best[n]]),
                "levels": self.levels[n],
                "path": self.set_paths[n] if n < len(self.set_paths) else None,
            }
        return {
            "thresholds": list(self.thresholds),
            "average": self.average,
            "gt": self.gt_path,
            "sets": sets,
        }

    def table(self) -> str:
        """The mIoU curve: one row per threshold, one column per set; each set's best marked ``*``."""
        miou = self.miou
        best = self.best_index
        cols = [n[:12] for n in self.set_names]
        colw = max(7, *(len(c) for c in cols)) + 1
        lines = ["threshold".ljust(10) + "".join(c.rjust(colw) for c in cols)]
        for k, t in enumerate(self.thresholds):
            cells = []
            for n in range(len(self.set_names)):
                v = miou[n, k]
                mark = "*" if best[n] == k and self.encodings[n] != "labels" else " "
                cells.append(("-" if np.isnan(v) else f"{v:.2f}").rjust(colw - 1) + mark)
            lines.append(f"{t:<10.4g}" + "".join(cells))
        bt = ["-" if v is None else f"{v:.4g}" for v in self.best_thresholds]
        lines.append("best".ljust(10) + "".join(b.rjust(colw - 1) + " " for b in bt))
        return "\n".join(lines)


def sweep_thresholds(
    sets: Sequence[Any],
    gt: Any,
    thresholds: Any = BEST,
    *,
    average: str = "dataset",
    backend: str = "auto",
    progress: bool = True,
) -> ThresholdSweep:
    """Confusion counts of every set at every background threshold, in one pass over the data.

    Parameters
    ----------
    sets : sequence of path, fsspec URL or Stack
        Pseudo-label sets (score stacks; label maps are counted once).
    gt : path, fsspec URL or Stack
        Ground-truth label store.
    thresholds : 'best', str or sequence of float
        The sweep (:func:`parse_thresholds`): ``'best'`` (0.00..1.00 by 0.01),
        ``'0.05:0.80:0.05'``, ``'0.1,0.2'`` or numbers in [0, 1].
    average : {'dataset', 'image'}
    backend : {'auto', 'cpu', 'gpu'}
        Backend of the label-map and float-score kernels; the uint8 level
        histograms are counted by the CPU kernel.
    progress : bool

    Returns
    -------
    ThresholdSweep
        ``counts[:, k]`` equals ``evaluate(sets, gt, bg_threshold=thresholds[k]).counts``.
    """
    from isle_fast.backend import resolve_backend
    from isle_fast.ensemble.evaluate import AVERAGES
    from isle_fast.ensemble.graph import open_inputs

    if average not in AVERAGES:
        raise InputError(f"{param('average')} must be one of {', '.join(AVERAGES)}, not {average!r}")
    ts = parse_thresholds(thresholds, "thresholds")
    t0 = time.perf_counter()
    be = resolve_backend(backend)
    stacks, gt_stack = open_inputs(sets, gt)
    return _sweep(stacks, gt_stack, ts, _plans(stacks, ts), average=average, backend=be, progress=progress,
                  t0=t0)


def _sweep(stacks: Sequence[Stack], gt_stack: Stack, ts: tuple[float, ...], plans: tuple[_SetPlan, ...], *,
           average: str, backend: str, progress: bool, t0: float) -> ThresholdSweep:
    """The pass of :func:`sweep_thresholds` with the sets' plans given."""
    from isle_fast.ensemble.graph import unique_names
    from isle_fast.ensemble.partial import gt_positions

    be = backend
    positions = gt_positions(gt_stack, stacks)  # a gt of some images: the sets' images at its ids
    kernel = dict(
        backend=be, plans=plans, n_thr=len(ts), num_classes=gt_stack.num_classes, per_image=average == "image"
    )
    from isle_fast.ensemble import sweep_cache

    c = gt_stack.num_classes
    key = sweep_cache.sweep_key(stacks, gt_stack, plans, ts, num_classes=c, average=average)
    counts = sweep_cache.load_counts(key, (len(stacks), len(ts), c, c + 1))
    stats = None
    cached = counts is not None
    if counts is None:
        specs = _local_specs(stacks, gt_stack, plans) if positions is None else None
        if specs is not None:
            counts, stats = _local_sweep(specs, stacks, gt_stack, progress=progress, **kernel)
        else:
            counts, stats = _dask_sweep(stacks, gt_stack, progress=progress, positions=positions, **kernel)
        sweep_cache.save_counts(key, np.asarray(counts, dtype=np.int64))
    return ThresholdSweep(
        thresholds=ts,
        classes=list(gt_stack.classes),
        set_names=unique_names(stacks),
        counts=np.asarray(counts, dtype=np.int64),
        encodings=[s.encoding for s in stacks],
        levels=[list(p.levels) if p.mode in ("bins", "sparse") else None for p in plans],
        average=average,
        image_stats=None if stats is None else np.asarray(stats, dtype=np.int64),
        set_paths=[s.path for s in stacks],
        gt_path=gt_stack.path,
        backend=be,
        seconds=time.perf_counter() - t0,
        from_cache=cached,
    )


def write_sweep_json(path: str | os.PathLike, sweep: ThresholdSweep, doc: dict, *, command: str) -> None:
    """Write ``doc`` with the sweep under ``"threshold_sweep"`` atomically (isle's JSON output rules)."""
    from isle_fast.outputs import check_json_output, write_json

    check_json_output(path, inputs=[*sweep.set_paths, sweep.gt_path or None])
    write_json(path, {**doc, "threshold_sweep": sweep.to_json()}, command=command)


def evaluate_at(sets: Sequence[Any], gt: Any, bg_threshold: float | None, *, average: str = "dataset",
                backend: str = "auto", progress: bool = True, per_image: bool = False) -> Any:
    """:func:`isle_fast.evaluate`, through the one-threshold sweep where a set is class-sparse.

    The sweep reads a class-sparse store's slots and keys directly (the plain pass reads its
    dense view), also against a gt of some images; the counts are equal (tests/test_sparse.py).
    Without a threshold, every score set class-sparse: the sweep at each store's background level
    (what its stored background slice decodes to). Without class-sparse sets, without a threshold
    and a dense score set, or asked for the per-image counts (``per_image``: the sweep keeps
    none), this is :func:`isle_fast.evaluate`.
    """
    from isle_fast.ensemble.evaluate import check_bg_threshold, evaluate
    from isle_fast.ensemble.graph import _as_stack
    from isle_fast.stores.sparse import constant_background

    t = check_bg_threshold(bg_threshold)
    stacks = [_as_stack(s) for s in sets]
    layouts = [getattr(s, "score_layout", "dense") for s in stacks if s.encoding == "scores"]
    sparse = "sparse" in layouts
    # foreground > the stored level; a store whose background is stored per pixel (refined) has none
    stored = t is None and sparse and all(v == "sparse" for v in layouts) and all(
        constant_background(s) is not None for s in stacks if s.encoding == "scores")
    if (t is None and not stored) or (t is not None and not 0 <= t <= 1) or not sparse or per_image:
        return evaluate(stacks, gt, average=average, backend=backend, bg_threshold=t, progress=progress,
                        per_image=per_image)
    if stored:
        from isle_fast.backend import resolve_backend
        from isle_fast.ensemble.evaluate import AVERAGES
        from isle_fast.ensemble.graph import open_inputs

        if average not in AVERAGES:
            raise InputError(f"--average must be one of {', '.join(AVERAGES)}, not {average!r}")
        t0 = time.perf_counter()
        opened, gt_stack = open_inputs(stacks, gt)
        sw = _sweep(opened, gt_stack, (0.0,), _plans(opened, (0.0,), stored_background=True), average=average,
                    backend=resolve_backend(backend), progress=progress, t0=t0)
    else:
        sw = sweep_thresholds(stacks, gt, [t], average=average, backend=backend, progress=progress)
    return sw.evaluation([0] * len(stacks))
