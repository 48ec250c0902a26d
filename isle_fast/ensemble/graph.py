"""The shared pieces of the step-2 passes (evaluate, merge, subsets): inputs, chunk grid, Dask graph.

* :func:`open_inputs` opens and checks the sets and the ground truth;
  :func:`unique_names` names the sets;
* :func:`work_chunks` is the one chunk grid every array of a pass is aligned
  to, :func:`aligned_arrays` the Dask arrays on it and :func:`blockwise_args`
  their ``dask.array.blockwise`` arguments;
* :func:`local_specs` decides whether a pass can run on the local thread pool
  without Dask (:func:`dask_requested` says when the user asked for Dask).
"""

from __future__ import annotations

import os
import sys
from typing import Any, Sequence

import numpy as np

from isle_fast.errors import InputError, param
from isle_fast.stores.stack import Stack, kind_phrase, open_stack

__all__ = ["SET_KINDS", "MAX_TASK_BYTES", "open_inputs", "unique_names", "work_chunks", "aligned_arrays",
           "blockwise_args", "dask_requested", "local_specs", "chunk_executor", "chunk_tasks"]

#: Store kinds a pseudo-label set may be.
SET_KINDS = ("pseudo", "ensemble")


# -- inputs ----------------------------------------------------------------------------

def _as_stack(obj: Any, kind: Any = None) -> Stack:
    return obj if isinstance(obj, Stack) else open_stack(obj, kind=kind)


def unique_names(stacks: Sequence[Stack], say: bool = False) -> list[str]:
    """Set names, made unique: a repeated name gets ``-2``, ``-3``, ... appended; with ``say``, each
    renaming is a warning on the ``isle_fast`` logger (the command line prints it)."""
    names: list[str] = []
    for s in stacks:
        base = s.name or os.path.basename(str(s.path).rstrip("/"))
        name, k = base, 2
        while name in names:
            name, k = f"{base}-{k}", k + 1
        if say and name != base:
            import logging

            logging.getLogger("isle_fast").warning(
                "isle: two sets are named %r; %s is called %r in the tables and the selection (choose it "
                "by that name or by its path)", base, s.path, name)
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
        The sets disagree on ids, order, shapes or classes, or the gt holds an
        id the sets lack (names store and id). The gt may hold a subset of the
        sets' ids in any order (:mod:`isle_fast.ensemble.partial`).
    """
    if not sets:
        raise InputError("give at least one pseudo-label set")
    gt_stack = _as_stack(gt)
    if gt_stack.kind != "gt":
        raise InputError(f"{param('gt')} {gt_stack.path} is {kind_phrase(gt_stack.kind)}, not ground truth "
                         f"(kind 'gt'; ingest ground truth with {param('kind', 'gt')})")
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
    from isle_fast.ensemble.partial import check_gt_subset

    check_gt_subset(gt_stack, stacks)  # the gt may label a subset of the sets' images, in any order
    if gt_stack.num_images == 0:
        raise InputError(f"ground truth {gt_stack.path} holds no images")
    if gt_stack.num_classes > 254:
        raise InputError(f"{gt_stack.path}: at most 254 classes are supported")
    return stacks, gt_stack


# -- the chunk grid and the Dask arrays on it ---------------------------------------------

#: Most uncompressed bytes one task holds (gt + every set's region). The work
#: grid follows the gt's chunks but takes fewer images per task when the sets
#: are much wider than the gt (score stacks are C bytes or more per pixel).
MAX_TASK_BYTES = 128 * 2**20


def work_chunks(stacks: Sequence[Stack], gt: Stack,
                max_task_bytes: int | None = None) -> tuple[int, int, int]:
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
    chunks = ((int(chunks[0]), int(chunks[1]), int(chunks[2])) if chunks is not None
              else work_chunks(stacks, gt))
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


def chunk_tasks(gt: Stack) -> list[tuple[tuple[int, int, int], tuple[int, int, int]]]:
    """One task per chunk of the gt's grid: ``((i, j, l) block index, (images, rows, columns) it holds)``,
    in C order; what the direct passes (evaluate, sweep, merge) hand their executor."""
    n, h, w = (int(v) for v in gt.shape[:3])
    k, hc, wc = (int(v) for v in gt.chunks[:3])
    return [((i, j, l), (min(k, n - i * k), min(hc, h - j * hc), min(wc, w - l * wc)))
            for i in range(-(-n // k)) for j in range(-(-h // hc)) for l in range(-(-w // wc))]
