"""CAM files straight into a class-sparse store: no dense store on the way.

:func:`ingest_scores` with the class-sparse layout (the default for ``uint8``
CAM ingest) used to write a dense ``(I, H, W, C)`` temporary store and then
convert it (:func:`isle_fast.stores.sparse.sparsify`): every file became a
C-class float32 stack (84 bytes a pixel at C = 21) that was quantised, written
compressed, read back twice and written again. Here every file goes once
through :func:`read_cam_slots`: its own slices (the background and the K
classes it holds) are validated and quantised in one compiled pass
(:func:`isle_fast.kernels.cam_cpu.cam_slots_u8`), and only the classes with a
score above 0 are kept. Two passes of chunk-aligned tasks on
:mod:`isle_fast.stores.parallel` (worker processes, or a ``dask.distributed``
cluster):

1. *slots*: each task reads the files of one run of images and writes their
   kept slots, raw ``uint8`` (``k x h x w`` an image, K = its classes) to a
   file of a temporary folder next to the output; it returns the classes and
   the background level of every image. The store's K (the most classes any
   image has), and so its chunk shape, is known only once every file is read.
2. *chunks*: each task assembles one chunk of the store's ``cams`` array
   (padded, K slots) from those files and writes it
   (:class:`isle_fast.stores.sparse.SparseWriter`). The temporary folder is
   removed.

The store is the one the dense path made, bit for bit (ids, sizes, keys,
``cams`` and its chunks, background level, image labels; the provenance
differs only in what the dense path added about its temporary). Checks and
messages are those of the dense path: a file the fast pass finds bad is read
again by :func:`isle_fast.stores.formats.read_scores`, which raises the
dense path's message. Where the fast pass does not apply (``normalize``,
``upsample``) each image takes the dense path's own functions (full stack,
:func:`isle_fast.stores.stack.quantize_scores`) and keeps the same slots.

Where the background is not one constant (a file with its own background
slice: PSA's CRF output, full ``C x H x W`` arrays) the store cannot be
class-sparse: the run falls back to the dense path, which then writes the
dense store (``auto``) or fails as before (``sparse``).

One difference from the dense path without ground truth: that path read a
header of every file before any data and named the first file whose header
was bad; this one reads every file once, and without ``--skip-bad`` names
the first bad file in id order (with the same message).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from isle_fast.stores.formats import BadInput

__all__ = ["CamSlots", "read_cam_slots", "ingest_cam_sparse", "NotSparse"]


class NotSparse(Exception):
    """The images' background is not one constant: the store cannot be class-sparse."""


@dataclass
class CamSlots:
    """One image's kept class slices, as a class-sparse store holds them.

    Attributes
    ----------
    classes : tuple of int
        The classes kept (quantised score above 0 somewhere), ascending.
    data : (k, h, w) uint8
        Their scores, ``round(255 * score)`` with every pixel's argmax kept.
    bg_lo, bg_hi : int
        Smallest and largest stored background score inside the image.
    """

    classes: tuple[int, ...]
    data: np.ndarray
    bg_lo: int
    bg_hi: int


def _dense_slots(full: np.ndarray) -> CamSlots:
    """The dense path's quantised ``(h, w, C)`` stack -> its slots (what :func:`sparsify` keeps)."""
    from isle_fast.stores.stack import quantize_scores

    q = quantize_scores(full, np.uint8)
    c = q.shape[-1]
    present = q[..., 1:].reshape(-1, c - 1).any(axis=0)
    cls = tuple(int(k) + 1 for k in np.flatnonzero(present))
    data = np.ascontiguousarray(np.moveaxis(q[..., list(cls)], -1, 0))
    bg = q[..., 0]
    return CamSlots(cls, data, int(bg.min(initial=255)), int(bg.max(initial=0)))


def read_cam_slots(path: str, num_classes: int, *, allow_pickle: bool = False, bg_threshold: float = 0.15,
                   normalize: bool = False, expect: tuple[int, int] | None = None, upsample: bool = False,
                   cam_layout: str = "auto", labels: Any = None) -> CamSlots:
    """One score file as the slots of a class-sparse store, exactly as the dense path stores it.

    Parameters are those of :func:`isle_fast.stores.formats.read_scores`. Without ``expect``
    (no ground truth) a file with only a low-resolution ``cam`` is refused as the header pass
    of the dense path refuses it.

    Returns
    -------
    CamSlots
        ``classes`` / ``data`` equal the non-zero class slices of
        ``quantize_scores(read_scores(...), uint8)``, and the background range its slice 0.

    Raises
    ------
    BadInput
        With the dense path's message.
    """
    from isle_fast.kernels.cam_cpu import cam_slots_u8
    from isle_fast.stores.cams import _array
    from isle_fast.stores.formats import SCORE_TOLERANCE, _interpret, _ScoreFile, read_scores, score_header

    args = dict(allow_pickle=allow_pickle, bg_threshold=bg_threshold, normalize=normalize, expect=expect,
                upsample=upsample, cam_layout=cam_layout, labels=labels)

    def dense_error() -> BadInput:
        """The dense path's message for a file the fast pass found bad (it raises it)."""
        if expect is None:
            score_header(path, num_classes, allow_pickle, cam_layout=cam_layout, labels=labels)
        read_scores(path, num_classes, **args)
        return BadInput("cannot be read: the fast CAM reader and read_scores disagree (please report)")

    sf = _ScoreFile(path, allow_pickle)
    sl = _interpret(sf, num_classes, cam_layout, labels, expect)
    if expect is None and sl.low_res:
        raise dense_error()
    if normalize:  # the dense path's own normalisation, then its quantisation
        return _dense_slots(read_scores(path, num_classes, **args))
    value = sf.value(sl.entry)
    classes = np.asarray(sl.classes, dtype=np.int64)
    if sl.axis is None:  # a dict keyed by class (stacked in ``take`` order), or one 2-D map
        arr3 = sl.extract(value) if isinstance(value, Mapping) else _array(value)[None]
        rows = np.arange(arr3.shape[0], dtype=np.int64)
    else:
        arr = _array(value)
        arr3 = np.moveaxis(arr, 2, 0) if sl.axis == 2 else arr
        rows = np.asarray(sl.take, np.int64)
    if arr3.ndim != 3 or arr3.dtype.kind not in "fiub" or len(rows) != len(classes):
        raise dense_error()
    h, w = (int(v) for v in arr3.shape[1:])
    if expect is not None and (h, w) != tuple(expect):
        if sl.low_res and upsample:
            return _dense_slots(read_scores(path, num_classes, **args))
        raise dense_error()
    if arr3.dtype != np.float32:
        arr3 = np.asarray(arr3, dtype=np.float32)
    flat = arr3.reshape(arr3.shape[0], h * w)  # a view for C-ordered K x H x W and H x W x K entries
    order = np.argsort(classes, kind="stable")
    bg_pos = np.flatnonzero(classes == 0)
    fg = [int(i) for i in order if classes[i] != 0]
    take = rows[fg] if fg else np.zeros(0, np.int64)
    bg_index = int(rows[bg_pos[0]]) if bg_pos.size else -1
    q, present, in_range, bg_lo, bg_hi = cam_slots_u8(flat, take, bg_index, np.float32(bg_threshold),
                                                      -SCORE_TOLERANCE, 1 + SCORE_TOLERANCE)
    if not in_range:
        raise dense_error()
    keep = np.flatnonzero(present)
    kept = tuple(int(classes[fg[j]]) for j in keep)
    data = q[keep].reshape(len(keep), h, w)
    return CamSlots(kept, data, bg_lo, bg_hi)


# --------------------------------------------------------------------------- the two passes (worker tasks)
def _slots_task(read: Callable, header: Callable | None, with_shapes: bool, skip_bad: bool, folder: str,
                index: int, items: Sequence[Any], shapes: Sequence[tuple[int, int]] | None
                ) -> tuple[list, list, int, bool]:
    """Pass 1, one task: read the files of one run of images, write their slots to ``folder/<index>.u8``.

    Returns ``(bad, meta, pixels, not_sparse)``: ``bad`` lists ``(offset, reason, header shape or
    None)``; ``meta`` lists ``(offset, classes, h, w, byte offset, bg_lo, bg_hi)`` of the images read;
    ``not_sparse``: an image's background is not one constant (the task stops there: the run goes
    the dense way).
    """
    from isle_fast.stores.ingest_engine import _result

    bad: list = []
    meta: list = []
    pixels = 0
    pos = 0
    path = os.path.join(folder, f"{index}.u8")
    with open(path, "wb") as f:
        for j, it in enumerate(items):
            hw = shapes[j] if shapes is not None else None
            res, err = _result(read, it, hw)
            if err is not None:
                head = None
                if not with_shapes and header is not None:
                    head, herr = _result(header, it)
                    if herr is not None:
                        err, head = herr, None
                bad.append((j, err, head))
                if not skip_bad:
                    break
                continue
            if res.bg_lo != res.bg_hi:
                return bad, meta, pixels, True
            h, w = (int(v) for v in res.data.shape[1:])
            meta.append((j, res.classes, h, w, pos, res.bg_lo, res.bg_hi))
            if res.data.nbytes:
                f.write(np.ascontiguousarray(res.data).data.cast("B"))
            pos += res.data.nbytes
            pixels += h * w
    return bad, meta, pixels, False


def _chunk_task(spec: Any, folder: str, start: int, parts: Sequence[tuple]) -> int:
    """Pass 2, one task: assemble chunk ``start`` of ``cams`` from the slot files and write it."""
    from isle_fast.stores.chunkio import write_block

    k = int(spec.chunk_shape[0])
    m = min(k, int(spec.shape[0]) - start)
    block = np.zeros((m,) + tuple(spec.shape[1:]), np.uint8)
    handles: dict[int, Any] = {}
    try:
        for j, (task, off, kk, h, w) in enumerate(parts):
            if kk == 0:
                continue
            f = handles.get(task)
            if f is None:
                f = handles[task] = open(os.path.join(folder, f"{task}.u8"), "rb")
            f.seek(off)
            raw = np.frombuffer(f.read(kk * h * w), np.uint8).reshape(kk, h, w)
            block[j, :h, :w, :kk] = np.moveaxis(raw, 0, -1)
    finally:
        for f in handles.values():
            f.close()
    return write_block(spec, start, block)


# --------------------------------------------------------------------------- the run
def ingest_cam_sparse(plan: Any, read: Callable, header: Callable | None, *,
                      image_labels: Callable | None = None) -> Any:
    """Write ``plan`` (an ingest :class:`~isle_fast.stores.ingest_engine._Plan` of score files) class-sparse.

    Parameters
    ----------
    plan : _Plan
        The score ingest as the dense path would run it (items, ground truth, skip_bad, workers,
        provenance, the ``finish`` hook that stores image labels).
    read : callable
        ``read(item, (h, w) or None) -> CamSlots`` (:func:`read_cam_slots`); picklable with
        cloudpickle.
    header : callable
        ``header(item) -> (h, w)``: without ground truth, the size of a bad file whose data
        is bad (the dense path read it in its header pass, and the padded size counts it).
    image_labels : callable, optional
        ``image_labels(ids) -> ((I, C) bool, source)``: the image-level labels stored with the store.

    Returns
    -------
    Stack

    Raises
    ------
    NotSparse
        The background is not one constant (the caller runs the dense path instead).
    InputError
        A bad file, as the dense path words it.
    """
    from isle_fast.outputs import remove_path, temp_path
    from isle_fast.progress import progress
    from isle_fast.stores import parallel
    from isle_fast.stores.ingest_engine import _bad_error, admit, check_admitted, nothing_left
    from isle_fast.stores.sparse import SparseWriter
    from isle_fast.stores.stack import default_chunks

    t0 = time.perf_counter()
    workers, items, shapes, bad = admit(plan)
    check_admitted(plan, items, bad)
    ref = plan.reference
    # one task: the images of one chunk of a label store of this size (33 at 500 x 500)
    if ref is not None and ref.padded:
        hp, wp = ref.padded
    elif shapes:
        hp = max(s[0] for s in shapes.values())
        wp = max(s[1] for s in shapes.values())
    else:
        hp = wp = 500
    g = max(1, int(default_chunks(len(items), hp, wp)[0]))
    starts = list(range(0, len(items), g))
    tasks = [(t, items[s:s + g], None if shapes is None else [shapes[it.id] for it in items[s:s + g]])
             for t, s in enumerate(starts)]
    folder = temp_path(plan.out)  # a temporary sibling, removed below (or as a leftover of a dead run)
    folder.mkdir(parents=True)
    try:
        task_bad: dict[int, list] = {}
        meta: dict[int, list] = {}
        pixels = 0
        first_bad: int | None = None
        level: int | None = None
        not_sparse = False
        fn = partial(_slots_task, read, header, shapes is not None, plan.skip_bad, str(folder))
        # every task runs to its end (a task stops at its first image whose background is not one
        # constant): a pool shared by ``isle run`` must not be stopped for the dense fallback
        with parallel.executor_for(len(tasks), workers) as ex, \
                progress(total=len(items), desc="ingest CAMs", unit="img", quiet=plan.quiet) as bar:
            for i, (tb, tm, px, ns) in ex.imap(fn, tasks):
                bar.update(len(tasks[i][1]))
                pixels += px
                task_bad[i] = tb
                meta[i] = tm
                not_sparse |= ns
                for _, _, _, _, _, lo, _ in tm:
                    level = lo if level is None else level
                    not_sparse |= lo != level
                if tb and not plan.skip_bad:
                    first_bad = i if first_bad is None else min(first_bad, i)
                if first_bad is not None and all(j in meta for j in range(first_bad)):
                    j, reason, _ = task_bad[first_bad][0]
                    it = items[starts[first_bad] + j]
                    raise _bad_error(bad + [(it.id, it.source, reason)])
        if not_sparse:
            raise NotSparse()
        # the dense path's order: files whose header is bad (no ground truth), then those whose data is
        head_bad: list[tuple[str, str, str]] = []
        late_bad: list[tuple[str, str, str]] = []
        head_shapes: list[tuple[int, int]] = []
        for i in range(len(tasks)):
            for j, reason, head in task_bad[i]:
                it = items[starts[i] + j]
                if shapes is None and head is None:
                    head_bad.append((it.id, it.source, reason))
                else:
                    late_bad.append((it.id, it.source, reason))
                if head is not None:
                    head_shapes.append(tuple(head))
        late_bad = head_bad + late_bad
        kept = [(i, m) for i in range(len(tasks)) for m in meta[i]]
        if not kept:
            raise nothing_left(plan.out, bad + late_bad, "image")
        ids = [items[starts[i] + m[0]].id for i, m in kept]
        img_shapes = [(m[2], m[3]) for _, m in kept]
        padded = ref.padded if ref is not None and ref.padded else None
        if padded is None and ref is None and head_shapes:  # the dense path padded to every readable header
            every = img_shapes + head_shapes
            padded = (max(s[0] for s in every), max(s[1] for s in every))
        kmax = max(1, max(len(m[1]) for _, m in kept))
        keys = np.zeros((len(kept), kmax), np.uint8)
        for r, (_, m) in enumerate(kept):
            keys[r, :len(m[1])] = m[1]
        # the provenance of the dense store (what ingest recorded, the images skipped, the image labels'
        # source), then the layout, as the dense path wrote it
        prov = dict(plan.provenance)
        all_bad = bad + late_bad
        if all_bad:
            prov["skipped"] = [{"id": i, "file": f, "reason": r} for i, f, r in all_bad]
        labels_arr = None
        if image_labels is not None:
            labels_arr, prov["image_labels"] = image_labels(ids)
        prov["score_layout"] = "sparse"
        with SparseWriter(plan.out, kind=plan.kind, classes=plan.classes, ids=ids, shapes=img_shapes,
                          keys=keys, background=int(level or 0), name=plan.name, padded_shape=padded,
                          provenance=prov, overwrite=plan.overwrite, image_labels=labels_arr) as writer:
            kc = writer.chunk_images
            parts = [(i, m[4], len(m[1]), m[2], m[3]) for i, m in kept]
            ctasks = [(s, parts[s:s + kc]) for s in range(0, len(kept), kc)]
            with parallel.executor_for(len(ctasks), workers) as ex, \
                    progress(total=len(kept), desc="write sparse", unit="img", quiet=plan.quiet) as bar:
                for i, _ in ex.imap(partial(_chunk_task, writer.spec, str(folder)), ctasks):
                    bar.update(len(ctasks[i][1]))
            stack = writer.commit()
    finally:
        remove_path(folder)
    _summary(stack, all_bad, pixels, time.perf_counter() - t0, plan.quiet)
    return stack


def _summary(stack: Any, bad: list, pixels: int, seconds: float, quiet: bool) -> None:
    from isle_fast.progress import summary

    if quiet:
        return
    n = stack.num_images
    rows = {
        "images": f"{n:,}" + (f"  ({len(bad)} skipped)" if bad else ""),
        "pixels": f"{pixels:,}",
        "seconds": f"{seconds:.2f}",
        "throughput": f"{n / seconds:,.1f} images/s, {pixels / seconds / 1e6:,.1f} Mpix/s" if seconds > 0 else "-",
        "layout": stack.score_layout,
        "store": stack.path,
        "store size": f"{stack.stored_bytes() / 2**20:,.2f} MiB",
        "classes stored": f"up to {stack.sparse_keys.shape[1]} an image "
                          f"(mean {(stack.sparse_keys > 0).sum(axis=1).mean():.2f}) of {stack.num_classes}",
    }
    for i, f, reason in bad[:10]:
        rows[f"skipped {i}"] = f"{f}: {reason}"
    summary("isle ingest: scores -> class-sparse store", rows, quiet=False)
