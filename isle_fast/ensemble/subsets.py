"""Which sets earn their place: the ensemble's per-class IoU for EVERY subset of the sets.

With N sets (N <= 8) there are ``2**N - 1`` non-empty subsets. The selection
of each subset comes from the single-set IoU table (evaluate first; a subset
picks, per class, its best member, exactly as :func:`isle_fast.ensemble.selection.select`
with ``sets=`` would), then ONE pass over the data computes the confusion of
every subset's ensemble with the ``subset_confusion_labels`` /
``subset_confusion_scores`` kernels. The result equals merging each subset
with :func:`isle_fast.ensemble.merge.merge` and evaluating it, without writing any
store. ISLE vs ISLE-2 for all pairs, triples, ... at once.

Subsets are ordered by size, then lexicographically by set position; the
single-set subsets reproduce the sets themselves (for label sets the
ensemble of one set is the set with its unclaimed pixels turned into
background, so it can differ slightly from the set's own score).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from functools import partial
from typing import Any, Sequence

import numpy as np

from isle_fast import metrics
from isle_fast.ensemble.evaluate import Evaluation, check_bg_threshold, evaluate, score_threshold
from isle_fast.ensemble.graph import aligned_arrays, blockwise_args, open_inputs
from isle_fast.ensemble.merge import policy_code
from isle_fast.ensemble.selection import Selection, select
from isle_fast.errors import InputError

__all__ = ["MAX_SETS", "SubsetAnalysis", "all_subsets", "subset_analysis"]

MAX_SETS = 8


def all_subsets(n: int) -> np.ndarray:
    """``(2**n - 1, n)`` bool membership of every non-empty subset, by size then position."""
    rows = []
    for k in range(1, n + 1):
        for combo in itertools.combinations(range(n), k):
            r = np.zeros(n, dtype=bool)
            r[list(combo)] = True
            rows.append(r)
    return np.asarray(rows, dtype=bool).reshape(-1, n)


@dataclass
class SubsetAnalysis:
    """Ensemble scores of every subset.

    Attributes
    ----------
    classes, set_names : list of str
    members : ndarray, bool, (S, N)
    selections : ndarray, int64, (S, C)
        Chosen set (position among all sets) per class for every subset.
    counts : ndarray, int64, (S, C, C+1)
        Confusion of every subset's ensemble against the gt.
    policy : str
    seconds : float
    """

    classes: list[str]
    set_names: list[str]
    members: np.ndarray
    selections: np.ndarray
    counts: np.ndarray
    policy: str = "score"
    seconds: float = 0.0

    def __repr__(self) -> str:
        if not len(self.members):
            return f"<SubsetAnalysis of no subsets of {', '.join(self.set_names)}>"
        b = self.best()
        return (f"<SubsetAnalysis of {len(self.members)} subsets of {', '.join(self.set_names)} "
                f"({self.policy} policy): best {self.names()[b]}, mIoU {float(self.miou[b]):.1f}>")

    def names(self) -> list[str]:
        """``'A+B'`` style name of every subset."""
        return ["+".join(self.set_names[i] for i in np.nonzero(m)[0]) for m in self.members]

    @property
    def iou(self) -> np.ndarray:
        """(S, C) dataset-level IoU in percent (NaN where undefined)."""
        return metrics.iou(self.counts)

    @property
    def miou(self) -> np.ndarray:
        """(S,) mIoU in percent over classes with a defined IoU."""
        return metrics.miou(self.iou)

    def best(self, size: int | None = None) -> int:
        """Row of the subset with the highest mIoU (of the given size; ties: earlier row)."""
        m = self.miou.copy()
        if size is not None:
            m[self.members.sum(axis=1) != size] = np.nan
        m = np.where(np.isnan(m), -np.inf, m)
        return int(np.argmax(m))

    def to_json(self) -> dict:
        iou, miou = self.iou, self.miou
        return {
            "classes": list(self.classes),
            "sets": list(self.set_names),
            "policy": self.policy,
            "subsets": [
                {"name": name, "members": [self.set_names[i] for i in np.nonzero(self.members[s])[0]],
                 "miou": metrics.jsonable(miou[s]), "iou": metrics.jsonable(iou[s]),
                 "selection": {self.classes[c]: self.set_names[int(self.selections[s, c])]
                               for c in range(1, len(self.classes))}}
                for s, name in enumerate(self.names())
            ],
        }


@dataclass(frozen=True)
class _KernelGroup:
    """Subsets handled by one kernel call: same merge mode as :func:`isle_fast.ensemble.merge.merge` would use."""

    mode: str                   # "labels" or "scores"
    cast: bool                  # scores as float32 in [0, 1] (members of different dtypes)
    positions: tuple[int, ...]  # sets handed to the kernel (positions among all sets)
    rows: tuple[int, ...]       # subsets (rows of SubsetAnalysis.members) in this group
    threshold: float            # background threshold for the scores kernel


def _kernel_groups(stacks: Sequence[Any], members: np.ndarray, bg_threshold: float | None) -> list[_KernelGroup]:
    """Partition the subsets so that each is scored exactly as merging it alone would be."""
    kind = [(str(s.array.dtype), s.score_scale) if s.encoding == "scores" else None for s in stacks]
    keys: dict[tuple, list[int]] = {}
    for r, m in enumerate(members):
        idx = [int(i) for i in np.nonzero(m)[0]]
        kinds = {kind[i] for i in idx}
        if None in kinds:
            key: tuple = ("labels", False, None)
        elif len(kinds) > 1:
            key = ("scores", True, None)
        else:
            key = ("scores", False, next(iter(kinds)))
        keys.setdefault(key, []).append(r)
    groups = []
    for (mode, cast, k), rows in keys.items():
        if mode == "labels":
            positions = tuple(range(len(stacks)))
            thr = -1.0
        elif cast:
            positions = tuple(i for i, v in enumerate(kind) if v is not None)
            thr = -1.0 if bg_threshold is None or bg_threshold < 0 else float(bg_threshold)
        else:
            positions = tuple(i for i, v in enumerate(kind) if v == k)
            thr = score_threshold(stacks[positions[0]], bg_threshold)
        groups.append(_KernelGroup(mode, cast, positions, tuple(rows), thr))
    return groups


def _subset_block(gt: np.ndarray, *blocks: np.ndarray, backend: str, groups: tuple[_KernelGroup, ...],
                  encodings: tuple[str, ...], scales: tuple[float, ...], thresholds: tuple[float, ...],
                  selections: np.ndarray, members: np.ndarray, priority: np.ndarray, policy: int,
                  num_classes: int) -> np.ndarray:
    """Confusion of every subset's ensemble on one chunk: ``(1, 1, 1, S, C, C+1)``.

    Chunks in GPU memory (CuPy) stay there: the GPU kernels count them (:func:`task_kernels`).
    """
    from isle_fast.backend import is_device_array, task_kernels, to_host

    with task_kernels(backend, gt, *blocks) as K:
        c = num_classes
        gt = gt if is_device_array(gt) else np.ascontiguousarray(gt)
        blocks = tuple(b if is_device_array(b) else np.ascontiguousarray(b) for b in blocks)
        out = np.zeros((1, 1, 1, len(members), c, c + 1), dtype=np.int64)
        decoded: dict[int, np.ndarray] = {}
        for grp in groups:
            rows = list(grp.rows)
            pos = {p: k for k, p in enumerate(grp.positions)}
            mem = np.ascontiguousarray(members[rows][:, list(grp.positions)])
            sel = np.ascontiguousarray(np.vectorize(lambda v: pos.get(int(v), 0))(selections[rows])
                                       .astype(np.int64).reshape(len(rows), c))
            if grp.mode == "labels":
                labs = []
                for p in grp.positions:
                    if encodings[p] == "labels":
                        labs.append(blocks[p])
                    else:
                        if p not in decoded:
                            decoded[p] = K.decode_scores(blocks[p], thresholds[p])
                        labs.append(decoded[p])
                prio = np.ascontiguousarray(priority[list(grp.positions)])
                res = K.subset_confusion_labels(gt, tuple(labs), sel, mem, prio, policy, c)
            else:
                arrs = tuple((blocks[p].astype(np.float32) / np.float32(scales[p])) if grp.cast else blocks[p]
                             for p in grp.positions)
                res = K.subset_confusion_scores(gt, arrs, sel, mem, policy, c, grp.threshold)
            out[0, 0, 0, rows] = to_host(res).astype(np.int64, copy=False)
        return out


def subset_analysis(sets: Sequence[Any], gt: Any, *, evaluation: Evaluation | None = None,
                    policy: str = "score", average: str = "dataset", backend: str = "auto",
                    bg_threshold: float | None = None, progress: bool = True) -> SubsetAnalysis:
    """Per-class IoU of the ensemble of every non-empty subset of ``sets``, in one pass.

    Parameters
    ----------
    sets : sequence of path, URL or Stack
        At most 8 sets.
    gt : path, URL or Stack
    evaluation : Evaluation, optional
        The single-set evaluation the selections come from (made here if
        absent, with ``average``).
    policy : {'score', 'order', 'ignore'}
        Overlap policy of the merge (as in :func:`isle_fast.ensemble.merge.merge`).
    backend : {'auto', 'cpu', 'gpu'}
    bg_threshold : float, optional
    progress : bool

    Returns
    -------
    SubsetAnalysis
        Its scores are dataset-level IoU of each subset's ensemble.

    Examples
    --------
    >>> import tempfile, isle_fast as il
    >>> ds = il.make_voc_like(tempfile.mkdtemp() + "/voc", n_images=12, size_range=(40, 60), soft_sets=())
    >>> sets = [ds.stores[f"train/pseudo/{name}"] for name in ds.set_names]
    >>> sa = il.subset_analysis(sets, ds.stores["train/gt"], progress=False)
    >>> len(sa.names()), sa.names()[-1]
    (15, 'puzzlecam+clims+pmm+drs')
    """
    import dask.array as da

    from isle_fast.backend import dask_scheduler, resolve_backend
    from isle_fast.progress import dask_progress

    t0 = time.perf_counter()
    bg_threshold = check_bg_threshold(bg_threshold)
    be = resolve_backend(backend)
    code = policy_code(policy)
    stacks, gt_stack = open_inputs(sets, gt)
    n = len(stacks)
    if n > MAX_SETS:
        raise InputError(f"subset analysis takes at most {MAX_SETS} sets ({2 ** MAX_SETS - 1} subsets); "
                         f"{n} were given")
    if evaluation is None:
        evaluation = evaluate(stacks, gt_stack, average=average, backend=be, bg_threshold=bg_threshold,
                              progress=progress)
    members = all_subsets(n)
    sels: list[Selection] = [select(evaluation, sets=[int(i) for i in np.nonzero(m)[0]]) for m in members]
    selections = np.stack([s.best for s in sels]).astype(np.int64)
    groups = tuple(_kernel_groups(stacks, members, bg_threshold))
    priority = np.where(np.isnan(evaluation.iou), -1.0, evaluation.iou).astype(np.float64)
    c = gt_stack.num_classes
    g, arrays = aligned_arrays(stacks, gt_stack)
    func = partial(_subset_block, backend=be, groups=groups,
                   encodings=tuple(st.encoding for st in stacks),
                   scales=tuple(float(st.score_scale) for st in stacks),
                   thresholds=tuple(score_threshold(st, bg_threshold) for st in stacks),
                   selections=selections, members=members.astype(np.uint8), priority=priority,
                   policy=code, num_classes=c)
    one = lambda k: 1  # noqa: E731
    graph = da.blockwise(func, "ijkabd", g, "ijk", *blockwise_args(arrays, stacks),
                         new_axes={"a": len(members), "b": c, "d": c + 1},
                         adjust_chunks={"i": one, "j": one, "k": one}, dtype=np.int64,
                         concatenate=True, meta=np.empty((0,) * 6, dtype=np.int64))
    with dask_progress("subsets", quiet=not progress, images=gt_stack.num_images):
        counts = graph.sum(axis=(0, 1, 2)).compute(scheduler=dask_scheduler())
    counts = np.asarray(counts, dtype=np.int64)
    return SubsetAnalysis(classes=list(evaluation.classes), set_names=list(evaluation.set_names),
                          members=members, selections=selections, counts=counts, policy=policy,
                          seconds=time.perf_counter() - t0)
