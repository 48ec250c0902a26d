"""The ingest engine: a described run (:class:`_Plan`) of items read, checked and written chunk by chunk.

:mod:`isle_fast.stores.ingest` (folders of files), :mod:`isle_fast.stores.ingest_arrays` (NumPy and
Dask arrays) and :mod:`isle_fast.stores.ingest_tiff` (large TIFFs) describe their inputs as items and a
reader; this module checks them against the ground truth, writes the store (on
:mod:`isle_fast.stores.parallel`), compacts it when bad images were skipped, and prints the summary.
:func:`run_counted` and :func:`run_counted_with_gt` run the plans of several label folders (and the
gt's) as one pass that also counts every set against the gt (``isle run``).
"""

from __future__ import annotations

import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Generator, Sequence

import numpy as np

from isle_fast.errors import InputError, param, plain
from isle_fast.progress import summary
from isle_fast.stores import chunkio, parallel
from isle_fast.stores.formats import BadInput
from isle_fast.stores.stack import KINDS, Stack, create_stack


@dataclass
class _Reference:
    """What ground truth says: ids, sizes, padding (and classes, for a store)."""

    source: str
    ids: list[str]
    shapes: dict[str, tuple[int, int]]
    padded: tuple[int, int] | None
    classes: list[str] | None

    @property
    def path(self) -> str:
        """Where the ground truth is (a store's path, as a ``Stack`` has it; or a folder)."""
        return self.source


def _default_workers(workers: int | None) -> int:
    if workers is not None:
        if workers < 1:
            raise InputError(f"workers must be at least 1, not {workers}")
        return int(workers)
    return max(2, min(16, (os.cpu_count() or 1) * 2))


@dataclass
class _Item:
    id: str
    source: str  # a file path, or a description for arrays
    ref: Any = None  # what the reader needs (path, array index)


@dataclass
class _Plan:
    """A fully described ingest run, executed by :func:`_run`."""

    kind: str
    encoding: str
    classes: list[str]
    items: list[_Item]
    out: str
    header: Callable[[_Item], tuple[int, int]] | None
    read: Callable[[_Item, tuple[int, int] | None], np.ndarray]
    reference: _Reference | None = None
    prebad: list[tuple[str, str, str]] = field(default_factory=list)
    name: str | None = None
    score_dtype: str = "uint8"
    chunks: Sequence[int] | None = None
    skip_bad: bool = False
    workers: int | None = None
    overwrite: bool = False
    provenance: dict = field(default_factory=dict)
    quiet: bool = False
    what: str = "images"
    in_memory: bool = False  # items are arrays of this process: threads, not worker processes
    #: called with the writer and the ids written, just before commit (extra arrays such as image labels)
    finish: Callable[[Any, list[str]], None] | None = None


def _bad_error(bad: list[tuple[str, str, str]], extra_hint: bool = True) -> InputError:
    i, f, reason = bad[0]
    more = f" ({len(bad) - 1} more problem(s))" if len(bad) > 1 else ""
    hint = f"; nothing was written ({param('skip_bad', True)} writes the rest)" if extra_hint else ""
    return InputError(f"{f}: image {i!r}: {reason}{more}{hint}")


def _ordered(pool: ThreadPoolExecutor, fn: Callable, items: Sequence,
             window: int) -> Generator[Any, None, None]:
    """``pool.map`` with at most ``window`` tasks in flight (bounded memory), results in order.

    Use it as ``with closing(_ordered(...)) as results:`` so that a consumer that stops early
    (a bad file) ends it at once, while ``pool`` still runs: its ``finally`` cancels the queued
    tasks and waits for the running ones, so nothing still running may write after that.

    Only the tasks whose :meth:`~concurrent.futures.Future.cancel` fails (running or done) are
    waited for. A queued task that was cancelled never runs, and ``wait`` would never return for
    it once ``pool.shutdown(cancel_futures=True)`` has removed it from the queue: its future stays
    ``CANCELLED`` and only a worker picking it up marks it "notified", which ``wait`` waits for.
    Waiting on all of them was the hang of ``isle ingest`` after a bad file (issue 18).
    """
    pending: deque[Future] = deque()
    it = iter(items)
    try:
        for x in it:
            pending.append(pool.submit(fn, x))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        wait([f for f in pending if not f.cancel()])  # nothing still running may write after we return


def _result(fn: Callable, *args) -> tuple[Any, str | None]:
    try:
        return fn(*args), None
    except BadInput as exc:
        return None, str(exc)
    except MemoryError:
        raise
    except Exception as exc:  # an unexpected decoder error is still this file's problem
        return None, f"cannot be read: {type(exc).__name__}: {exc}"


def admit(plan: _Plan) -> tuple[int, list[_Item], dict[str, tuple[int, int]] | None,
                                list[tuple[str, str, str]]]:
    """The start of an ingest run, dense (:func:`_run`) or class-sparse
    (:func:`isle_fast.stores.cam_ingest.ingest_cam_sparse`): the kind checked, the workers, and
    the items the ground truth admits.

    Returns ``(workers, items, shapes, bad)``: ``shapes`` the ground truth's ``(h, w)`` of every
    item kept (None without one); ``bad`` the plan's bad inputs and every id the ground truth
    does not hold. :func:`check_admitted` then says whether the run may go on.
    """
    if plan.kind not in KINDS:
        raise InputError(f"kind must be one of {KINDS}, not {plan.kind!r}")
    # the output was checked (check_output, with the inputs) by the public function before any work
    workers = parallel.default_workers() if plan.workers is None else _default_workers(plan.workers)
    ref = plan.reference
    bad: list[tuple[str, str, str]] = list(plan.prebad)
    items = list(plan.items)
    if ref is None:
        return workers, items, None, bad
    # the set must cover the ground truth's ids and hold no others
    ref_set = set(ref.ids)
    for it in items:
        if it.id not in ref_set:
            bad.append((it.id, it.source, f"id is not in the ground truth {ref.source}"))
    items = [it for it in items if it.id in ref_set]
    return workers, items, {it.id: (int(ref.shapes[it.id][0]), int(ref.shapes[it.id][1])) for it in items}, bad


def check_admitted(plan: _Plan, items: Sequence[_Item], bad: list[tuple[str, str, str]]) -> None:
    """Raise the run's error when a bad input ends it (no ``skip_bad``) or no item is left."""
    if bad and not plan.skip_bad:
        raise _bad_error(bad)
    if not items:
        raise InputError(f"nothing to ingest into {plan.out}: "
                         + (f"all {len(bad)} images are bad; first: {_bad_error(bad, False)}" if bad
                            else "no images"))


def _run(plan: _Plan) -> Stack:
    t0 = time.perf_counter()
    workers, items, ref_shapes, bad = admit(plan)
    ref = plan.reference
    shapes = {} if ref_shapes is None else ref_shapes
    if ref is None and plan.header is not None:
        heads = parallel.read_headers(partial(_checked_header, plan.header), items, workers=workers,
                                      in_memory=plan.in_memory, quiet=plan.quiet)
        keep = []
        for it, (hw, err) in zip(items, heads):
            if err is None:
                shapes[it.id] = hw
                keep.append(it)
            else:
                bad.append((it.id, it.source, err))
        items = keep
    check_admitted(plan, items, bad)
    stack, written_bad, pixels = _write(plan, items, shapes, bad, workers)
    summarize(f"isle ingest: {plan.encoding} -> {plan.kind} store", stack, bad + written_bad, pixels,
              time.perf_counter() - t0, what=plan.what, quiet=plan.quiet)
    return stack


def _checked_header(header: Callable[[_Item], tuple[int, int]], it: _Item) -> tuple[Any, str | None]:
    """``(header(it), None)`` or ``(None, reason)``: one item's header (runs in a worker)."""
    return _result(header, it)


def _checked_read(read: Callable, source_of_shape: str, it: _Item, hw: tuple[int, int]
                  ) -> tuple[np.ndarray | None, str | None]:
    """One item decoded and checked against the size from its header or the ground truth (in a worker)."""
    data, err = _result(read, it, hw)
    if err is None and tuple(data.shape[:2]) != tuple(hw):
        err = f"is {data.shape[0]} x {data.shape[1]} but {source_of_shape} says {hw[0]} x {hw[1]}"
    return data, err


def _write(plan: _Plan, items: list[_Item], shapes: dict[str, tuple[int, int]],
           bad: list[tuple[str, str, str]], workers: int) -> tuple[Stack, list[tuple[str, str, str]], int]:
    """Write the store: one task per chunk (decode + validate + write) on :mod:`isle_fast.stores.parallel`."""
    ids = [it.id for it in items]
    shape_arr = np.array([shapes[i] for i in ids], dtype=np.int64).reshape(-1, 2)
    padded = plan.reference.padded if plan.reference is not None and plan.reference.padded else None
    prov = dict(plan.provenance)
    writer = create_stack(plan.out, kind=plan.kind, classes=plan.classes, ids=ids, shapes=shape_arr,
                          encoding=plan.encoding, name=plan.name, score_dtype=plan.score_dtype,
                          chunks=plan.chunks, provenance=prov, overwrite=plan.overwrite, padded_shape=padded)
    with writer:
        arr = writer.array
        source_of_shape = "the ground truth" if plan.reference is not None else "its header"

        def failure(first: list[tuple[int, str]]) -> InputError:
            p, reason = first[0]
            return _bad_error(bad + [(items[p].id, items[p].source, reason)])

        late, pixels = parallel.ingest_chunks(
            partial(_checked_read, plan.read, source_of_shape), items, [shapes[i] for i in ids],
            chunkio.write_spec(arr), skip_bad=plan.skip_bad, failure=failure, workers=workers,
            in_memory=plan.in_memory, desc=f"ingest {plan.encoding}", quiet=plan.quiet)
        late_bad = [(items[p].id, items[p].source, reason) for p, reason in late]
        lost = {p for p, _ in late}
        kept_ids = [i for p, i in enumerate(ids) if p not in lost]
        if not kept_ids:
            raise nothing_left(plan.out, bad + late_bad, "image")
        if late_bad:  # compact: the store holds only the images that were written
            keep = [p for p in range(len(items)) if p not in lost]
            parallel.compact(arr, keep, int(arr.chunks[0]))
            shrink(writer, [ids[p] for p in keep], [shapes[ids[p]] for p in keep])
        record_skipped(writer, bad + late_bad)
        if plan.finish is not None:
            plan.finish(writer, kept_ids)
        stack = writer.commit()
    return stack, late_bad, pixels


def shrink(writer: Any, ids: list[str], shapes: Sequence[tuple[int, int]]) -> None:
    """Cut an open store to the images that were written: its first ``len(ids)`` images, these ids and sizes.

    The images themselves must already stand at positions ``0 .. len(ids) - 1`` (written there, or moved
    by :func:`isle_fast.stores.parallel.compact`).
    """
    arr = writer.array
    n = len(ids)
    arr.resize((n,) + tuple(arr.shape[1:]))
    writer.group["ids"].resize((n,))
    writer.group["ids"][:] = np.asarray(ids, dtype=object)
    writer.group["shapes"].resize((n, 2))
    writer.group["shapes"][:] = np.asarray(shapes, dtype=np.int32).reshape(-1, 2)


def record_skipped(writer: Any, bad: list[tuple[str, str, str]]) -> None:
    """The ``(id, file, reason)`` of the images left out, in the store's provenance (``skipped``)."""
    if bad:
        writer.set_provenance(skipped=[{"id": i, "file": f, "reason": plain(r)} for i, f, r in bad])


def nothing_left(out: Any, bad: list[tuple[str, str, str]], what: str) -> InputError:
    """The error of a run in which every input (``what``: image, TIFF) turned out bad."""
    return InputError(f"nothing to ingest into {out}: every {what} is bad; first: {_bad_error(bad, False)}")


def summarize(title: str, stack: Stack, bad: list[tuple[str, str, str]], pixels: int, seconds: float, *,
              what: str = "images", quiet: bool = False) -> None:
    """The end-of-run summary: images (and how many skipped), pixels, seconds, throughput, size, store."""
    if quiet:
        return      # the size walks every file of the store: not for a summary nobody sees
    size = stack.stored_bytes()
    raw = int(np.prod(stack.array.shape)) * stack.array.dtype.itemsize
    n = stack.num_images
    rows = {
        what: f"{n:,}" + (f"  ({len(bad)} skipped)" if bad else ""),
        "pixels": f"{pixels:,}",
        "seconds": f"{seconds:.2f}",
        "throughput": f"{n / seconds:,.1f} images/s, {pixels / seconds / 1e6:,.1f} Mpix/s" if seconds > 0 else "-",
        "store size": f"{size / 2**20:,.2f} MiB ({raw / max(size, 1):.1f}x smaller than raw)",
        "store": stack.path,
    }
    for i, f, reason in bad[:10]:
        rows[f"skipped {i}"] = f"{f}: {plain(reason)}"
    if len(bad) > 10:
        rows["skipped ..."] = f"{len(bad) - 10} more (see the store's provenance)"
    summary(title, rows, quiet=quiet)


# ------------------------------------------------------------------------ several sets in one pass
@dataclass
class Counted:
    """What :func:`run_counted` made: the stores, and their counts against the ground truth.

    Attributes
    ----------
    stacks : list of Stack
        The new stores, one per plan, committed.
    counts : ndarray, int64, (N, C, C+1)
        The confusion counts of every store against the gt (``Evaluation.counts``).
    image_stats : ndarray, int64, (I, N, C, 2), optional
        Per-image intersection and union (``Evaluation.image_stats``), with ``per_image``.
    """

    stacks: list[Stack]
    counts: np.ndarray
    image_stats: np.ndarray | None


def _counted_layout(plans: Sequence[_Plan], gt: Stack) -> bool:
    """Whether :func:`run_counted` can run these plans: label folders of exactly the gt's images,
    no problem found so far, a local gt in the plain layout holding whole images per chunk."""
    if not plans or gt.chunk_spec() is None or tuple(gt.chunks[1:]) != tuple(gt.shape[1:]):
        return False
    ids = list(gt.ids)
    for p in plans:
        if (p.encoding != "labels" or p.in_memory or p.reference is None or p.prebad or p.finish is not None
                or [it.id for it in p.items] != ids):
            return False
    return True


def _counted_chunk(reads: Sequence[Callable], specs: Sequence[Any], gt_spec: Any, k: int, kernel: dict, start: int,
                   items: Sequence[Sequence[Any]], shapes: Sequence[tuple[int, int]]
                   ) -> tuple[bool, np.ndarray | None, np.ndarray | None]:
    """One task of :func:`run_counted`: decode one chunk of every set, write the chunks, count them.

    ``gt_spec`` None: the first plan is the ground truth itself, counted against in memory; else the
    gt's chunk is read from its store. Returns ``(ok, counts (N, C, C+1), per-image stats or None)``;
    ``ok`` is False (nothing written by this task) when an image is bad: the caller then takes the
    separate way.
    """
    from isle_fast.ensemble.evaluate import _confusion_block
    from isle_fast.metrics import intersection_union
    from isle_fast.stores.chunkio import thread_buffer, write_block
    from isle_fast.stores.chunks import read_chunk

    blocks = []
    for n_set, (read, spec, its) in enumerate(zip(reads, specs, items)):
        m = len(its)
        # a block kept by this worker from chunk to chunk: a fresh one page-faults in every page of it
        block = thread_buffer(("counted", n_set), (m,) + tuple(spec.shape[1:]), spec.dtype)
        for j, (it, hw) in enumerate(zip(its, shapes)):
            data, err = read(it, hw)
            if err is not None:
                return False, None, None
            h, w = hw
            block[j, :h, :w] = data
            block[j, :h, w:] = spec.fill_value        # the padding only: each pixel is written once
            block[j, h:] = spec.fill_value
        blocks.append(block)
    for spec, block in zip(specs, blocks):
        write_block(spec, start, block)
    shape = blocks[0].shape
    if gt_spec is None:
        g, blocks = blocks[0], blocks[1:]
    else:
        g = read_chunk(gt_spec, block_id=(start // k, 0, 0), block_info={None: {"chunk-shape": shape}})
    # each image's own region only: the padding (ignore in the gt) is not read, the counts are the same
    out = _confusion_block(g, *blocks, shapes=np.asarray(shapes, dtype=np.int64).reshape(-1, 2), **kernel)
    stats = intersection_union(out[:, 0, 0]) if kernel["per_image"] else None
    return True, out.sum(axis=(0, 1, 2)), stats


def _fork_safe(n: int, k: int, workers: int) -> bool:
    """Whether the chunk tasks may run the counting kernel where :func:`parallel.executor_for` puts them."""
    pool = parallel.active_pool()
    if pool is not None:
        return pool.numba_safe
    # executor_for forks a new pool unless one worker, one task or a cluster
    return workers <= 1 or n <= k or parallel._current_client() is not None or parallel.numba_fork_safe()


def _create(p: _Plan, ids: list[str], shapes: Sequence[tuple[int, int]], padded: Any) -> Any:
    """The store writer of plan ``p``, as :func:`_write` creates it."""
    return create_stack(p.out, kind=p.kind, classes=p.classes, ids=ids,
                        shapes=np.asarray(shapes, dtype=np.int64).reshape(-1, 2), encoding=p.encoding,
                        name=p.name, score_dtype=p.score_dtype, chunks=p.chunks, provenance=dict(p.provenance),
                        overwrite=p.overwrite, padded_shape=padded)


def _counted_pass(plans: Sequence[_Plan], writers: list[Any], chunks: tuple[int, ...], gt_spec: Any,
                  shapes: list[tuple[int, int]], num_classes: int, per_image: bool, workers: int,
                  quiet: bool, before_pass: Callable[[], None] | None = None
                  ) -> tuple[np.ndarray, np.ndarray | None]:
    """The chunk tasks of :func:`run_counted` (``gt_spec`` None: ``plans[0]`` is the gt, in the pass);
    ``(counts, image stats)`` of the plans counted. :class:`_NotCounted` when it cannot run or an image
    was bad (every task has ended then: the pool stays usable)."""
    from isle_fast.ensemble.evaluate import Group
    from isle_fast.progress import progress

    n, k = len(shapes), int(chunks[0])
    specs = []
    for w in writers:
        spec = chunkio.write_spec(w.array)
        if not spec.direct or tuple(spec.chunk_shape) != tuple(chunks):
            raise _NotCounted
        specs.append(spec)
    for spec in specs:
        chunkio.prepare_root(spec)      # the tasks make their chunks' folders below it
    counted = len(plans) - (1 if gt_spec is None else 0)
    kernel = dict(backend="cpu", groups=(Group("labels", tuple(range(counted))),), order=tuple(range(counted)),
                  num_classes=num_classes, per_image=per_image)
    reads = [partial(_checked_read, p.read, "its header" if p.reference is None else "the ground truth")
             for p in plans]
    starts = list(range(0, n, k))
    tasks = [(s, [p.items[s:s + k] for p in plans], shapes[s:s + k]) for s in starts]
    fn = partial(_counted_chunk, reads, specs, gt_spec, k, kernel)
    counts = np.zeros((counted, num_classes, num_classes + 1), dtype=np.int64)
    stats = np.zeros((n, counted, num_classes, 2), dtype=np.int64) if per_image else None
    bad = False
    if before_pass is not None:
        before_pass()
    with parallel.executor_for(len(tasks), workers) as ex, \
            progress(total=n * len(plans), desc="ingest labels", unit="img", quiet=quiet) as bar:
        for i, (ok, part, part_stats) in ex.imap(fn, tasks):
            bar.update(len(tasks[i][2]) * len(plans))
            if not ok:   # every task still runs to its end: the pool stays usable for the separate way
                bad = True
                continue
            counts += part
            if stats is not None:
                stats[starts[i]:starts[i] + part_stats.shape[0]] += part_stats
    if bad:
        raise _NotCounted
    return counts, stats


def _summaries(plans: Sequence[_Plan], stacks: Sequence[Stack], pixels: int, seconds: float) -> None:
    for p, st in zip(plans, stacks):
        summarize(f"isle ingest: {p.encoding} -> {p.kind} store", st, [], pixels, seconds, what=p.what,
                  quiet=p.quiet)


def run_counted(plans: Sequence[_Plan], gt: Stack, *, per_image: bool = False, workers: int | None = None,
                quiet: bool = False, before_pass: Callable[[], None] | None = None) -> Counted | None:
    """Run several label-folder ingests (:func:`isle_fast.stores.ingest.labels_plan`, each against ``gt``)
    as one pass of chunk tasks, and count every set against the gt in the same tasks.

    A task decodes the images of one chunk of every set, writes those chunks and counts them
    against the gt's chunk (the kernels of :func:`isle_fast.ensemble.evaluate.evaluate`, so the
    counts equal ``evaluate(stacks, gt)``'s, count for count). The stores are the ones
    :func:`_run` would write, one by one.

    Returns None, having written nothing, when the pass cannot run (:func:`_counted_layout`, or
    worker processes forked after Numba started its threads: :func:`parallel.numba_fork_safe`) or an
    image turns out bad: the caller then ingests and evaluates the separate way, which reports
    (or, with ``skip_bad``, skips) the bad images exactly as it always does. ``before_pass()`` is
    called once the stores are created, just before the first task is sent (``isle run`` starts
    loading its kernels there: this process only waits from then on).
    """
    if not _counted_layout(plans, gt):
        return None
    n, k = gt.num_images, int(gt.chunks[0])
    wk = parallel.default_workers() if workers is None else _default_workers(workers)
    if not _fork_safe(n, k, wk):
        return None
    t0 = time.perf_counter()
    shapes = [(int(h), int(w)) for h, w in gt.shapes]
    writers: list[Any] = []
    try:
        for p in plans:
            assert p.reference is not None
            writers.append(_create(p, [it.id for it in p.items], shapes, p.reference.padded or None))
        counts, stats = _counted_pass(plans, writers, tuple(int(v) for v in gt.chunks), gt.chunk_spec(), shapes,
                                      gt.num_classes, per_image, wk, quiet, before_pass)
        stacks = [w.commit() for w in writers]
    except BaseException as exc:
        for w in writers:
            w.abort()
        if isinstance(exc, _NotCounted):
            return None
        raise
    _summaries(plans, stacks, sum(h * w for h, w in shapes), time.perf_counter() - t0)
    return Counted(stacks=stacks, counts=counts, image_stats=stats)


def run_counted_with_gt(gt_plan: _Plan, set_plans: Callable[[_Reference], list[_Plan]], *,
                        per_image: bool = False, workers: int | None = None, quiet: bool = False,
                        before_pass: Callable[[], None] | None = None) -> tuple[Stack, Counted] | None:
    """:func:`run_counted` with the ground truth ingested in the same pass: ``(gt, counted)`` or None.

    ``gt_plan``: the gt folder's plan (``labels_plan(..., kind="gt")``). Its headers are read first
    (the images' sizes, as :func:`_run` reads them); ``set_plans(reference)`` then makes the sets'
    plans against the gt store about to be written (``labels_plan(..., gt=reference)``: the
    reference says what the committed store will: ids, sizes, padding, classes, path). Each task
    decodes one chunk of the gt and of every set, writes them all and counts the sets against the
    gt's chunk in memory. The stores equal those of ``ingest_labels`` of the gt, then of each set
    against it; the counts equal ``evaluate``'s. None, with nothing written, where
    :func:`run_counted` would give None, or a header is bad.
    """
    p = gt_plan
    if (p.reference is not None or p.header is None or p.encoding != "labels" or p.in_memory or p.prebad
            or p.finish is not None or not p.items):
        return None
    wk = parallel.default_workers() if workers is None else _default_workers(workers)
    t0 = time.perf_counter()
    # here, not on the pool: the workers are loading the counting kernel meanwhile (``isle run``), and
    # a PNG's IHDR is one short read (2,400 in 0.04 s here against 0.13 s waiting for busy workers)
    heads = [_checked_header(p.header, it) for it in p.items]
    if any(err is not None for _, err in heads):
        return None
    ids = [it.id for it in p.items]
    shapes = [(int(hw[0]), int(hw[1])) for hw, _ in heads]
    writers: list[Any] = []
    try:
        gw = _create(p, ids, shapes, None)
        writers.append(gw)
        chunks = tuple(int(v) for v in gw.array.chunks)
        padded = (int(gw.array.shape[1]), int(gw.array.shape[2]))
        if not _fork_safe(len(ids), chunks[0], wk) or chunks[1:] != padded:
            raise _NotCounted
        ref = _Reference(gw.path, ids, dict(zip(ids, shapes)), padded, list(p.classes))
        plans = set_plans(ref)
        if not plans or any(q.encoding != "labels" or q.in_memory or q.prebad or q.finish is not None
                            or [it.id for it in q.items] != ids for q in plans):
            raise _NotCounted
        for q in plans:
            writers.append(_create(q, ids, shapes, padded))
        counts, stats = _counted_pass([p, *plans], writers, chunks, None, shapes, len(p.classes), per_image,
                                      wk, quiet, before_pass)
        stacks = [w.commit() for w in writers]
    except BaseException as exc:
        for w in writers:
            w.abort()
        if isinstance(exc, _NotCounted):
            return None
        raise
    _summaries([p, *plans], stacks, sum(h * w for h, w in shapes), time.perf_counter() - t0)
    return stacks[0], Counted(stacks=stacks[1:], counts=counts, image_stats=stats)


class _NotCounted(Exception):
    """The fused pass cannot go on (a bad image, another layout): take the separate way."""
