"""Ingest: turn pseudo-label sets, ground truth, CAMs, images and arrays into stack stores.

Functions
---------
:func:`ingest_labels`
    VOC-style label-map PNGs (palette / grayscale, value = class index, 255 =
    ignore) or 2-D ``.npy`` label maps; pseudo-label sets and ground truth.
:func:`ingest_scores`
    CAM / score files (``.npy`` dicts of IRN / PuzzleCAM / SEAM / PSA, read
    by a restricted unpickler; plain ``.npy`` / ``.npz`` arrays) into a
    ``scores`` store.
:func:`ingest_images`
    RGB JPEG / PNG images into an ``images`` store.
:func:`ingest_tiff`
    (Large) TIFF label maps or ``H x W x C`` score stacks, read tile by tile.
:func:`ingest_arrays`, :func:`ingest_dask`
    NumPy arrays (one per image, or one padded batch) and Dask arrays.

How files are chosen
--------------------
``src`` is a folder; image ids come from ``ids`` (a list, or a ``train_aug.txt``
style file: one id per line, or the two-column
``JPEGImages/x.jpg SegmentationClassAug/x.png`` form whose first column gives
the id), else from ``gt`` (a ground-truth store or folder: the set is checked
against it and gets its ids, order and padded shape, so the stores align), else
from the folder listing (sorted). The file of id ``x`` is ``src/x.<ext>``.

Validation and atomicity
------------------------
Every problem (an id without a file, a size that differs from the ground
truth, a value outside ``[0, C)`` other than 255, a corrupt or truncated file,
NaN / Inf or out-of-range scores, a class count that disagrees, a CAM layout
that is ambiguous, a pickle that names anything but arrays and containers) is
an :class:`~isle_fast.errors.InputError` naming the file and the image id,
and no store is written (the temporary folder is removed). With ``skip_bad=True`` the bad images are left out instead, and the
list of ``(id, file, reason)`` goes into the store's provenance (``skipped``)
and the summary.

Speed
-----
The work is one task per store chunk: a task decodes the images of one chunk
(a run of images that fills the store's first chunk axis), validates them and
writes that chunk, compressed once, straight into the temporary store
(:mod:`isle_fast.stores.chunkio`). Tasks run on worker processes, one per core
(PIL's PNG decoder holds the GIL, so threads do not scale), on the workers of
an active ``dask.distributed`` client, or in this process for a single chunk
(:mod:`isle_fast.stores.parallel`); in-memory arrays use threads. Sizes come
without decoding: from the ground truth when it is given, else from each
file's header (a PNG's IHDR). A bad image stops the run as soon as it and
every chunk before it are done (the first bad image is named, as a
sequential run would); with ``skip_bad`` the store is compacted afterwards.
A worker that dies or Ctrl-C stops the workers and removes the temporary
store. A tqdm bar shows progress; a summary (images, pixels, seconds,
throughput, store size) ends the run.
"""

from __future__ import annotations

import os
import time
from collections import deque
from contextlib import closing
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from isle_fast.errors import InputError, StoreError
from isle_fast.stores.formats import (
    IMAGE_EXTS,
    LABEL_EXTS,
    SCORE_EXTS,
    TIFF_EXTS,
    BadInput,
    check_labels,
    image_header,
    label_header,
    read_image,
    read_label,
    read_scores,
    score_header,
    scores_to_store,
    stem,
)
from isle_fast.progress import progress, summary
from isle_fast.stores import chunkio, parallel
from isle_fast.stores.stack import (
    KINDS,
    SCORE_SCALE,
    VOC_CLASSES,
    Stack,
    create_stack,
    is_remote,
    open_stack,
)

__all__ = [
    "DEFAULT_BG_THRESHOLD",
    "read_ids",
    "resolve_classes",
    "ingest_labels",
    "ingest_scores",
    "ingest_images",
    "ingest_tiff",
    "ingest_arrays",
    "ingest_dask",
]

#: Background score given to foreground-only CAMs: the ``cam_eval_thres`` default of
#: IRN's evaluation (``run_sample.py``), which PuzzleCAM-style evaluations also start from.
DEFAULT_BG_THRESHOLD = 0.15


# =========================================================================== inputs
def read_ids(path: str | os.PathLike) -> list[str]:
    """Image ids from a list file.

    One id per line (``2007_000032``), or the two-column form
    ``JPEGImages/2007_000032.jpg SegmentationClassAug/2007_000032.png`` (the id
    is the first column's file name without extension). Blank lines and lines
    starting with ``#`` are skipped; a single-column entry that ends with a
    known image / array extension loses it.

    Raises
    ------
    InputError
        The file does not exist, is empty, or repeats an id (message names the
        file and line).
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"ids file {p} does not exist")
    ids: list[str] = []
    seen: dict[str, int] = {}
    known = {e for e in LABEL_EXTS + SCORE_EXTS + IMAGE_EXTS + TIFF_EXTS}
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        first = line.split()[0]
        if len(line.split()) > 1 or "/" in first or os.path.splitext(first)[1].lower() in known:
            first = stem(first) if os.path.splitext(first)[1].lower() in known else Path(first).name
        if first in seen:
            raise InputError(f"ids file {p} line {n}: id {first!r} repeats line {seen[first]}")
        seen[first] = n
        ids.append(first)
    if not ids:
        raise InputError(f"ids file {p} holds no ids")
    return ids


def resolve_classes(classes: str | os.PathLike | Sequence[str] | None) -> list[str]:
    """Class names, background first: ``'voc'`` (the 21 VOC classes), a file (one name per line) or a list.

    In a file, line ``k`` names class ``k - 1``. A blank line between names is an
    error naming the file and line (dropping it would shift every later class);
    blank lines after the last name (a final newline) are fine. Names repeated in
    a file or a list are an error too.
    """
    if classes is None or (isinstance(classes, str) and classes.lower() == "voc"):
        return list(VOC_CLASSES)
    if isinstance(classes, (str, os.PathLike)):
        p = Path(classes)
        if not p.is_file():
            raise InputError(f"classes file {p} does not exist (give a file with one class name per line, or 'voc')")
        try:
            lines = p.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as exc:
            raise InputError(f"classes file {p} is not UTF-8 text ({exc.reason} at byte {exc.start})") \
                from None
        while lines and not lines[-1].strip():
            lines.pop()
        names: list[str] = []
        where: dict[str, int] = {}
        for k, line in enumerate(lines, 1):
            name = line.strip()
            if not name:
                raise InputError(f"classes file {p}, line {k}: blank line; line k names class k - 1, so a "
                                 "blank line would shift every later class (delete it, or name the class)")
            if name in where:
                raise InputError(f"classes file {p}, line {k}: class {name!r} is already named on line "
                                 f"{where[name]}")
            where[name] = k
            names.append(name)
        if not names:
            raise InputError(f"classes file {p} holds no class names")
        return names
    names = [str(c) for c in classes]
    if not names:
        raise InputError("classes is empty")
    seen: set[str] = set()
    for i, name in enumerate(names):
        if name in seen:
            raise InputError(f"class {name!r} appears twice in classes (position {i})")
        seen.add(name)
    return names


@dataclass
class _Reference:
    """What ground truth says: ids, sizes, padding (and classes, for a store)."""

    source: str
    ids: list[str]
    shapes: dict[str, tuple[int, int]]
    padded: tuple[int, int] | None
    classes: list[str] | None


def _reference(gt: Any, ids: list[str] | None, workers: int) -> _Reference | None:
    if gt is None:
        return None
    if isinstance(gt, Stack):
        st = gt
    elif is_remote(gt) or (Path(gt) / "zarr.json").exists():
        st = open_stack(gt)
    else:
        st = None
    if st is not None:
        shapes = {i: (int(h), int(w)) for i, (h, w) in zip(st.ids, st.shapes)}
        return _Reference(st.path, list(st.ids), shapes, st.padded_shape, list(st.classes)
                          if st.kind != "images" else None)
    d = Path(gt)
    if not d.is_dir():
        raise InputError(f"ground truth {d} is neither a stack store nor a folder")
    if ids is None:
        files = _listing(d, LABEL_EXTS + IMAGE_EXTS, "ground truth")
        use = [i for i in files]
    else:
        use = ids
    found = [(i, _find(d, i, LABEL_EXTS)) for i in use]
    shapes: dict[str, tuple[int, int]] = {}

    def head(item):
        i, f = item
        if f is None:
            return i, None
        try:
            return i, label_header(f)
        except BadInput as exc:
            raise InputError(f"{f}: ground truth of image {i!r}: {exc}") from None

    with ThreadPoolExecutor(max(1, workers)) as pool:
        for i, hw in pool.map(head, found):
            if hw is not None:
                shapes[i] = hw
    return _Reference(str(d), [i for i, f in found if f is not None], shapes, None, None)


def _listing(folder: Path, exts: Sequence[str], what: str) -> list[str]:
    if not folder.is_dir():
        raise InputError(f"{what} folder {folder} does not exist")
    by_id: dict[str, str] = {}
    for f in sorted(os.listdir(folder)):
        if os.path.splitext(f)[1].lower() in exts and not f.startswith("."):
            i = stem(f)
            if i in by_id:
                raise InputError(f"{folder}: id {i!r} has two files, {by_id[i]} and {f}; keep one")
            by_id[i] = f
    if not by_id:
        raise InputError(f"{what} folder {folder} holds no {'/'.join(exts)} files")
    return list(by_id)


def _find(folder: Path, image_id: str, exts: Sequence[str]) -> str | None:
    for e in exts:
        for cand in (e, e.upper()):
            p = folder / f"{image_id}{cand}"
            if p.is_file():
                return str(p)
    return None


def _check_out(out: Any, overwrite: bool, *inputs: Any) -> None:
    """Fail before any work when the output may not be written (:func:`isle_fast.outputs.check_output`).

    ``inputs``: the sources, ground truth, id and class files of the run (an output never
    replaces or enters one); strings that name no file (``'voc'``) are not inputs.
    """
    from isle_fast.outputs import check_output

    files = [x for x in inputs if isinstance(x, Stack)
             or (isinstance(x, (str, os.PathLike)) and (is_remote(x) or os.path.exists(x)))]
    check_output(out, overwrite=overwrite, inputs=files)


def _default_workers(workers: int | None) -> int:
    if workers is not None:
        if workers < 1:
            raise InputError(f"workers must be at least 1, not {workers}")
        return int(workers)
    return max(2, min(16, (os.cpu_count() or 1) * 2))


# =========================================================================== engine
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
    hint = "; nothing was written (--skip-bad / skip_bad=True writes the rest)" if extra_hint else ""
    return InputError(f"{f}: image {i!r}: {reason}{more}{hint}")


def _ordered(pool: ThreadPoolExecutor, fn: Callable, items: Sequence, window: int) -> Iterator[Any]:
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


def _run(plan: _Plan) -> Stack:
    t0 = time.perf_counter()
    if plan.kind not in KINDS:
        raise InputError(f"kind must be one of {KINDS}, not {plan.kind!r}")
    # the output was checked (check_output, with the inputs) by the public function before any work
    workers = parallel.default_workers() if plan.workers is None else _default_workers(plan.workers)
    ref = plan.reference
    bad: list[tuple[str, str, str]] = list(plan.prebad)
    items = plan.items
    if ref is not None:
        # the set must cover the ground truth's ids and hold no others
        ref_set = set(ref.ids)
        for it in items:
            if it.id not in ref_set:
                bad.append((it.id, it.source, f"id is not in the ground truth {ref.source}"))
        items = [it for it in items if it.id in ref_set]
        shapes = {it.id: ref.shapes[it.id] for it in items}
    else:
        shapes = {}
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
    if bad and not plan.skip_bad:
        raise _bad_error(bad)
    if not items:
        raise InputError(f"nothing to ingest into {plan.out}: "
                         + (f"all {len(bad)} images are bad; first: {_bad_error(bad, False)}" if bad
                            else "no images"))
    stack, written_bad, pixels = _write(plan, items, shapes, bad, workers)
    seconds = time.perf_counter() - t0
    bad = bad + written_bad
    size = stack.stored_bytes()
    raw = int(np.prod(stack.array.shape)) * stack.array.dtype.itemsize
    n = stack.num_images
    rows = {
        plan.what: f"{n:,}" + (f"  ({len(bad)} skipped)" if bad else ""),
        "pixels": f"{pixels:,}",
        "seconds": f"{seconds:.2f}",
        "throughput": f"{n / seconds:,.1f} images/s, {pixels / seconds / 1e6:,.1f} Mpix/s" if seconds > 0 else "-",
        "store size": f"{size / 2**20:,.2f} MiB ({raw / max(size, 1):.1f}x smaller than raw)",
        "store": stack.path,
    }
    for i, f, reason in bad[:10]:
        rows[f"skipped {i}"] = f"{f}: {reason}"
    if len(bad) > 10:
        rows["skipped ..."] = f"{len(bad) - 10} more (see the store's provenance)"
    summary(f"isle ingest: {plan.encoding} -> {plan.kind} store", rows, quiet=plan.quiet)
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
        tail = arr.shape[1:]
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
            raise InputError(f"nothing to ingest into {plan.out}: every image is bad; first: "
                             f"{_bad_error(bad + late_bad, False)}")
        if late_bad:  # compact: the store holds only the images that were written
            keep = [p for p in range(len(items)) if p not in lost]
            parallel.compact(arr, keep, int(arr.chunks[0]))
            n = len(keep)
            arr.resize((n,) + tail)
            writer.group["ids"].resize((n,))
            writer.group["ids"][:] = np.asarray([ids[p] for p in keep], dtype=object)
            writer.group["shapes"].resize((n, 2))
            writer.group["shapes"][:] = np.asarray([shapes[ids[p]] for p in keep], dtype=np.int32)
        all_bad = bad + late_bad
        if all_bad:
            writer.set_provenance(skipped=[{"id": i, "file": f, "reason": r} for i, f, r in all_bad])
        if plan.finish is not None:
            plan.finish(writer, kept_ids)
        stack = writer.commit()
    return stack, late_bad, pixels


def _select(src: str | os.PathLike, exts: Sequence[str], ids: Any, ref: _Reference | None,
            what: str) -> tuple[list[_Item], list[tuple[str, str, str]], str | None]:
    """Items of a folder source: (items, missing-file problems, ids file or None)."""
    folder = Path(src).absolute()   # the tasks may run on cluster workers in another directory
    if not folder.is_dir():
        raise InputError(f"{what} source {folder} is not a folder")
    ids_file = None
    if ids is None:
        id_list = list(ref.ids) if ref is not None else _listing(folder, exts, what)
    elif isinstance(ids, (str, os.PathLike)):
        ids_file = str(ids)
        id_list = read_ids(ids)
    else:
        id_list = [str(i) for i in ids]
        if len(set(id_list)) != len(id_list):
            raise InputError("ids repeat an id")
    items, missing = [], []
    for i in id_list:
        f = _find(folder, i, exts)
        if f is None:
            missing.append((i, str(folder / f"{i}{exts[0]}"),
                            f"no file for this id in {folder} (looked for {'/'.join(exts)})"))
        else:
            items.append(_Item(i, f, f))
    return items, missing, ids_file


def _id_list(ids: Any) -> list[str] | None:
    if ids is None:
        return None
    if isinstance(ids, (str, os.PathLike)):
        return read_ids(ids)
    return [str(i) for i in ids]


def _check_classes(classes: Any, ref: _Reference | None) -> list[str]:
    if ref is not None and ref.classes is not None:
        if classes is None:
            return ref.classes
        names = resolve_classes(classes)
        if names != ref.classes:
            raise InputError(f"classes {names} disagree with the {len(ref.classes)} classes of the ground truth "
                             f"{ref.source}: {ref.classes}")
        return names
    return resolve_classes(classes)


def _common_prov(src: Any, ids_file: str | None, gt: Any, **params: Any) -> dict:
    prov = {"source": str(src), "ids_file": ids_file, "gt": None if gt is None else str(getattr(gt, "path", gt)),
            "parameters": {k: v for k, v in params.items()}}
    return prov


def _image_labels(src: Any, items: list[_Item], names: list[str], quiet: bool, out: Any):
    """Image labels for the items (checked now, so a missing id fails before any work) and the finish hook."""
    if src is None:
        return None, None
    from isle_fast.stores.image_labels import attach_image_labels, check_not_output, read_image_labels

    check_not_output(src, out)
    labels = read_image_labels(src, names, quiet=quiet)
    labels.aligned([it.id for it in items], "the images to ingest")

    def finish(writer: Any, ids: list[str]) -> None:
        attach_image_labels(writer, labels.aligned(ids), labels.source)

    return labels, finish


# =========================================================================== public API
def ingest_labels(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    ids: str | os.PathLike | Sequence[str] | None = None,
    classes: str | os.PathLike | Sequence[str] | None = None,
    kind: str = "pseudo",
    name: str | None = None,
    gt: str | os.PathLike | Stack | None = None,
    skip_bad: bool = False,
    workers: int | None = None,
    chunks: Sequence[int] | None = None,
    overwrite: bool = False,
    quiet: bool = False,
    provenance: dict | None = None,
    image_labels: Any = None,
) -> Stack:
    """Ingest a folder of label maps (a pseudo-label set or the ground truth) into a ``labels`` store.

    Parameters
    ----------
    src : path
        Folder of PNG label maps (palette or grayscale; value = class index,
        255 = ignore; VOC-coloured RGB is mapped back) or 2-D ``.npy`` arrays,
        one per image, named ``<id>.png`` / ``<id>.npy``.
    out : path or URL
        The store to write (atomically).
    ids : path or sequence of str, optional
        Which images, in which order: an id list file (see :func:`read_ids`)
        or a list. Default: the ground truth's ids, else the folder listing.
    classes : 'voc', path or sequence of str, optional
        Class names, background first; default the ground truth store's
        classes, else VOC's 21.
    kind : {'pseudo', 'gt', 'ensemble'}
    name : str, optional
        The set's name (default: the store folder's name).
    gt : path or Stack, optional
        Ground truth (a store or a folder of label maps) to check ids and
        sizes against; the store then gets the ground truth's padded shape.
    skip_bad : bool
        Leave bad images out (listed in provenance ``skipped``) instead of failing.
    workers : int, optional
        Worker processes that decode and write chunks (default: one per core).
    chunks : sequence of int, optional
        Chunk shape ``(k, H, W)``; default :func:`~isle_fast.stores.stack.default_chunks`.
    overwrite : bool
        Replace an existing store (only once the new one is complete).
    quiet : bool
        No progress bar, no summary.
    provenance : dict, optional
        Extra JSON-ready entries for the store's provenance (``isle run``
        records its input fingerprint there).
    image_labels : path, optional
        Image-level labels to store with the stack (``cls_labels.npy``, a VOC
        XML folder, a CSV / JSON or a store; see
        :mod:`isle_fast.stores.image_labels`); every image needs labels. Read
        back as :attr:`Stack.image_labels`.

    Returns
    -------
    Stack
        The new store, opened.

    Raises
    ------
    InputError
        A bad input (message names the file and image id); nothing is written.
    """
    if kind == "images":
        raise InputError("kind 'images' takes RGB images: use ingest_images (isle ingest images)")
    _check_out(out, overwrite, src, gt, ids, classes)
    w = _default_workers(workers)
    ref = _reference(gt, _id_list(ids), w)
    names = _check_classes(classes, ref)
    items, missing, ids_file = _select(src, LABEL_EXTS, ids, ref, "label")
    c = len(names)
    _, finish = _image_labels(image_labels, items, names, quiet, out)
    plan = _Plan(
        kind=kind, encoding="labels", classes=names, items=items, out=str(out), prebad=missing,
        header=lambda it: label_header(it.ref), read=lambda it, hw: read_label(it.ref, c),
        reference=ref, name=name, chunks=chunks, skip_bad=skip_bad, workers=workers, overwrite=overwrite,
        quiet=quiet, provenance={**_common_prov(src, ids_file, gt, format="labels", skip_bad=skip_bad),
                                 **(provenance or {})},
        finish=finish,
    )
    return _run(plan)


def ingest_scores(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    ids: str | os.PathLike | Sequence[str] | None = None,
    classes: str | os.PathLike | Sequence[str] | None = None,
    kind: str = "pseudo",
    name: str | None = None,
    gt: str | os.PathLike | Stack | None = None,
    bg_threshold: float = DEFAULT_BG_THRESHOLD,
    score_dtype: str = "uint8",
    normalize: bool = False,
    allow_pickle: bool = False,
    upsample: bool = False,
    skip_bad: bool = False,
    workers: int | None = None,
    chunks: Sequence[int] | None = None,
    overwrite: bool = False,
    quiet: bool = False,
    provenance: dict | None = None,
    cam_layout: str = "auto",
    image_labels: Any = None,
) -> Stack:
    """Ingest CAM / score files into a ``scores`` store (``(I, H, W, C)``).

    Parameters
    ----------
    src : path
        Folder of ``<id>.npy`` / ``<id>.npz`` files (see
        :mod:`isle_fast.stores.formats` for the layouts understood).
    out : path or URL
        The store to write.
    bg_threshold : float
        Background score of foreground-only CAMs (default 0.15, IRN's
        ``cam_eval_thres``). Arrays that already hold all C classes keep their
        own background slice.
    score_dtype : {'uint8', 'float16', 'float32'}
        ``uint8`` stores ``round(255 * score)`` (decode with
        ``Stack.score_scale``); a float type keeps the scores (``float16``
        rounded). Every type keeps each pixel's argmax
        (:func:`isle_fast.stores.stack.quantize_scores`), so the stored stack
        decodes exactly like the public evaluation of the files (threshold
        slice in front, argmax, ties to the lower class); only ``float32``
        also re-thresholds exactly at another ``--bg-threshold`` later.
    normalize : bool
        Max-normalise each class slice (ReLU, then divide by the slice's
        maximum) instead of refusing scores outside [0, 1]. Without it values
        within 1e-3 of [0, 1] are clipped and anything further out is an error.
    allow_pickle : bool
        The CAM dicts of IRN / PuzzleCAM / SEAM / PSA are pickles, read
        without this by a restricted unpickler that builds only arrays and
        containers (:mod:`isle_fast.stores.safe_pickle`). A pickle it refuses
        (one naming anything else) is loaded with Python's full unpickler
        only with ``allow_pickle``: that can run code from the file, so only
        for files you trust.
    upsample : bool
        A file with only a low-resolution ``cam`` is bilinearly resized to the
        ground-truth size (requires ``gt``) instead of refused.
    cam_layout : {'auto', 'irn', 'puzzlecam', 'seam', 'psa-crf'}
        The CAM layout (:mod:`isle_fast.stores.cams`): ``auto`` recognises it
        from each file and refuses a file it cannot tell apart (naming the
        layouts); a name forces it for every file.
    image_labels : path, optional
        Image-level labels (see :func:`ingest_labels`): decide per image where
        a file's layout is ambiguous, give the classes of files without keys
        (``L`` slices for the image's ``L`` labelled classes; of a ``C - 1`` /
        ``C`` slice array only the labelled classes keep their scores, as the
        public code makes CAMs only for them), and are stored with the stack.

    Other parameters are those of :func:`ingest_labels`.

    Returns
    -------
    Stack
    """
    if not 0.0 <= bg_threshold <= 1.0:
        raise InputError(f"bg_threshold must lie in [0, 1], not {bg_threshold}")
    if np.dtype(score_dtype) not in (np.dtype(np.uint8), np.dtype(np.float16), np.dtype(np.float32)):
        raise InputError(f"score_dtype must be uint8, float16 or float32, not {score_dtype!r}")
    if upsample and gt is None:
        raise InputError("upsample needs the image sizes: give the ground truth (--gt)")
    _check_out(out, overwrite, src, gt, ids, classes)
    w = _default_workers(workers)
    ref = _reference(gt, _id_list(ids), w)
    names = _check_classes(classes, ref)
    items, missing, ids_file = _select(src, SCORE_EXTS, ids, ref, "score")
    c = len(names)
    if c < 2:
        raise InputError("scores need at least 2 classes (background and one foreground class)")
    from isle_fast.stores.cams import LAYOUT_CHOICES

    if cam_layout not in LAYOUT_CHOICES:
        raise InputError(f"cam_layout must be one of {', '.join(LAYOUT_CHOICES)}, not {cam_layout!r}")
    dt = np.dtype(score_dtype)
    labels, finish = _image_labels(image_labels, items, names, quiet, out)

    def present(it: _Item):
        return None if labels is None else labels.present(it.id)

    def read(it: _Item, hw):
        s = read_scores(it.ref, c, allow_pickle=allow_pickle, bg_threshold=bg_threshold, normalize=normalize,
                        expect=hw if ref is not None else None, upsample=upsample, cam_layout=cam_layout,
                        labels=present(it))
        return scores_to_store(s, dt)

    plan = _Plan(
        kind=kind, encoding="scores", classes=names, items=items, out=str(out), prebad=missing,
        header=lambda it: score_header(it.ref, c, allow_pickle, cam_layout=cam_layout, labels=present(it)),
        read=read, reference=ref, name=name,
        score_dtype=score_dtype, chunks=chunks, skip_bad=skip_bad, workers=workers, overwrite=overwrite,
        quiet=quiet,
        provenance={**_common_prov(src, ids_file, gt, format="scores", bg_threshold=bg_threshold,
                                   score_dtype=score_dtype, normalize=normalize, allow_pickle=allow_pickle,
                                   upsample=upsample, skip_bad=skip_bad, cam_layout=cam_layout,
                                   image_labels=None if labels is None else labels.source),
                    **(provenance or {})},
        finish=finish,
    )
    stack = _run(plan)
    return stack


def ingest_images(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    ids: str | os.PathLike | Sequence[str] | None = None,
    classes: str | os.PathLike | Sequence[str] | None = None,
    name: str | None = None,
    gt: str | os.PathLike | Stack | None = None,
    skip_bad: bool = False,
    workers: int | None = None,
    chunks: Sequence[int] | None = None,
    overwrite: bool = False,
    quiet: bool = False,
    provenance: dict | None = None,
) -> Stack:
    """Ingest RGB images (JPEG / PNG, ``<id>.jpg`` ...) into an ``images`` store (encoding ``rgb``).

    Grayscale / palette / RGBA images are converted to RGB. With ``gt`` the
    sizes are checked and the store aligns with the ground truth. Other
    parameters are those of :func:`ingest_labels`.
    """
    _check_out(out, overwrite, src, gt, ids, classes)
    w = _default_workers(workers)
    ref = _reference(gt, _id_list(ids), w)
    names = _check_classes(classes, ref)
    items, missing, ids_file = _select(src, IMAGE_EXTS, ids, ref, "image")
    plan = _Plan(
        kind="images", encoding="rgb", classes=names, items=items, out=str(out), prebad=missing,
        header=lambda it: image_header(it.ref), read=lambda it, hw: read_image(it.ref), reference=ref,
        name=name, chunks=chunks, skip_bad=skip_bad, workers=workers, overwrite=overwrite, quiet=quiet,
        provenance={**_common_prov(src, ids_file, gt, format="images", skip_bad=skip_bad),
                    **(provenance or {})},
    )
    return _run(plan)


# --------------------------------------------------------------------------- arrays
def _array_encoding(kind: str, encoding: str | None, ndim_image: int) -> str:
    if kind == "images":
        return "rgb"
    if encoding is not None:
        if encoding not in ("labels", "scores"):
            raise InputError(f"encoding must be 'labels' or 'scores' for kind {kind!r}, not {encoding!r}")
        return encoding
    return "labels" if ndim_image == 2 else "scores"


def _validate_block(data: np.ndarray, encoding: str, c: int, dt: np.dtype) -> np.ndarray:
    """Validate one image (or tile) and convert it to the store dtype; :class:`BadInput` on a problem."""
    if encoding == "labels":
        return check_labels(np.asarray(data), c)
    if encoding == "rgb":
        a = np.asarray(data)
        if a.ndim != 3 or a.shape[-1] != 3:
            raise BadInput(f"an RGB image needs shape H x W x 3, not {a.shape}")
        if a.dtype != np.uint8:
            if a.dtype.kind not in "iu" or a.min(initial=0) < 0 or a.max(initial=0) > 255:
                raise BadInput(f"RGB values must be integers in [0, 255] (dtype {a.dtype})")
            a = a.astype(np.uint8)
        return a
    a = np.asarray(data)
    if a.shape[-1] != c:
        raise BadInput(f"scores have {a.shape[-1]} classes on the last axis, the store has {c} "
                       f"(the class count disagrees)")
    if a.dtype.kind in "iu":  # integer scores are already in stored units, 0..255 = 0..1
        if a.min(initial=0) < 0 or a.max(initial=0) > 255:
            raise BadInput("integer scores must lie in [0, 255] (round(255 * score))")
        return a.astype(np.uint8) if dt == np.uint8 else (a / SCORE_SCALE).astype(dt)
    if a.dtype.kind != "f":
        raise BadInput(f"scores must be numbers, not {a.dtype}")
    fin = np.isfinite(a)
    if not fin.all():
        pos = tuple(int(v) for v in np.argwhere(~fin)[0])
        raise BadInput(f"score at {pos} is {a[pos]} (NaN / Inf are not scores)")
    lo, hi = float(a.min(initial=0)), float(a.max(initial=0))
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise BadInput(f"scores range over [{lo:.4g}, {hi:.4g}], outside [0, 1]")
    return scores_to_store(np.clip(a, 0.0, 1.0).astype(np.float32), dt)


def ingest_arrays(
    arrays: np.ndarray | Sequence[np.ndarray],
    out: str | os.PathLike,
    *,
    ids: Sequence[str] | None = None,
    shapes: np.ndarray | Sequence[Sequence[int]] | None = None,
    classes: str | os.PathLike | Sequence[str] | None = None,
    kind: str = "pseudo",
    encoding: str | None = None,
    name: str | None = None,
    score_dtype: str = "uint8",
    skip_bad: bool = False,
    workers: int | None = None,
    chunks: Sequence[int] | None = None,
    overwrite: bool = False,
    provenance: dict | None = None,
    quiet: bool = True,
) -> Stack:
    """Ingest in-memory NumPy arrays.

    Parameters
    ----------
    arrays : ndarray or sequence of ndarray
        One array per image (``(H, W)`` label maps, ``(H, W, C)`` scores in
        [0, 1] or integer 0..255 stored units, ``(H, W, 3)`` RGB for kind
        ``images``; sizes may differ), or one padded batch ``(I, H, W[, C])``
        together with ``shapes``.
    ids : sequence of str, optional
        Default ``'0', '1', ...``.
    shapes : (I, 2) array-like, optional
        True sizes when ``arrays`` is a padded batch (default: the full size).
    encoding : {'labels', 'scores'}, optional
        Default from the rank: 2-D images are labels, 3-D are scores.

    Other parameters are those of :func:`ingest_scores`. ``quiet`` defaults
    to True here (library use).
    """
    _check_out(out, overwrite)
    if isinstance(arrays, np.ndarray):
        if arrays.ndim < 3:
            raise InputError(f"a batch of images needs shape (I, H, W[, C]), not {arrays.shape}")
        n = arrays.shape[0]
        if shapes is None:
            shapes = np.tile(np.array(arrays.shape[1:3]), (n, 1))
        shapes = np.asarray(shapes, dtype=np.int64).reshape(-1, 2)
        if len(shapes) != n:
            raise InputError(f"{n} images but {len(shapes)} shapes")
        views = [arrays[i, :int(h), :int(w)] for i, (h, w) in enumerate(shapes)]
    else:
        views = [np.asarray(a) for a in arrays]
        if shapes is not None:
            raise InputError("shapes is only for a padded batch; a list of arrays gives its own sizes")
    if not views:
        raise InputError("no arrays to ingest")
    ids = [str(i) for i in range(len(views))] if ids is None else [str(i) for i in ids]
    if len(ids) != len(views):
        raise InputError(f"{len(views)} arrays but {len(ids)} ids")
    names = resolve_classes(classes)
    enc = _array_encoding(kind, encoding, views[0].ndim)
    want_ndim = 2 if enc == "labels" else 3
    dt = np.dtype(score_dtype)
    items = [_Item(i, f"array {n}", n) for n, i in enumerate(ids)]
    c = len(names)

    def header(it: _Item):
        a = views[it.ref]
        if a.ndim != want_ndim:
            raise BadInput(f"has shape {a.shape}; {enc} need {want_ndim}-D images")
        return int(a.shape[0]), int(a.shape[1])

    plan = _Plan(
        kind=kind, encoding=enc, classes=names, items=items, out=str(out), header=header,
        read=lambda it, hw: _validate_block(views[it.ref], enc, c, dt), name=name, score_dtype=score_dtype,
        chunks=chunks, skip_bad=skip_bad, workers=workers, overwrite=overwrite, quiet=quiet,
        provenance={"source": "numpy arrays", **(provenance or {})}, what="images", in_memory=True,
    )
    return _run(plan)


def ingest_dask(
    array: Any,
    out: str | os.PathLike,
    *,
    ids: Sequence[str] | None = None,
    shapes: np.ndarray | Sequence[Sequence[int]] | None = None,
    classes: str | os.PathLike | Sequence[str] | None = None,
    kind: str = "pseudo",
    encoding: str | None = None,
    name: str | None = None,
    score_dtype: str = "uint8",
    chunks: Sequence[int] | None = None,
    overwrite: bool = False,
    provenance: dict | None = None,
    quiet: bool = True,
) -> Stack:
    """Ingest a padded Dask array ``(I, H, W[, C])`` block by block (never whole in memory).

    The array is rechunked to the store's chunks, every block is validated
    (an :class:`InputError` names the first bad image id) and written by the
    current Dask scheduler; values outside each image's ``shapes`` are
    replaced by the padding value. ``skip_bad`` is not offered: a bad block
    fails the run and nothing is written.
    """
    import dask.array as da

    _check_out(out, overwrite)
    if not isinstance(array, da.Array):
        array = da.asarray(array)
    if array.ndim < 3:
        raise InputError(f"a batch of images needs shape (I, H, W[, C]), not {array.shape}")
    n, h_pad, w_pad = (int(s) for s in array.shape[:3])
    ids = [str(i) for i in range(n)] if ids is None else [str(i) for i in ids]
    if len(ids) != n:
        raise InputError(f"{n} images but {len(ids)} ids")
    shapes = (np.tile(np.array([h_pad, w_pad]), (n, 1)) if shapes is None
              else np.asarray(shapes, dtype=np.int64).reshape(-1, 2))
    if len(shapes) != n:
        raise InputError(f"{n} images but {len(shapes)} shapes")
    names = resolve_classes(classes)
    enc = _array_encoding(kind, encoding, array.ndim - 1)
    c = len(names)
    dt = np.dtype(score_dtype)
    t0 = time.perf_counter()
    writer = create_stack(out, kind=kind, classes=names, ids=ids, shapes=shapes, encoding=enc, name=name,
                          score_dtype=score_dtype, chunks=chunks, overwrite=overwrite,
                          padded_shape=(h_pad, w_pad),
                          provenance={"source": "dask array", **(provenance or {})})
    with writer:
        target = writer.array
        if tuple(target.shape) != tuple(array.shape):
            raise InputError(f"dask array of shape {array.shape} does not fit the store shape {target.shape} "
                             f"(check the class / colour axis)")
        fill = writer.layout.fill
        src = array.rechunk(target.chunks)

        def fix(block: np.ndarray, block_info=None) -> np.ndarray:
            loc = block_info[0]["array-location"]
            (i0, i1), (r0, _), (c0, _) = loc[0], loc[1], loc[2]
            outb = np.empty(block.shape, dtype=target.dtype)
            for j in range(i1 - i0):
                try:
                    outb[j] = _validate_block(block[j], enc, c, dt)
                except BadInput as exc:
                    raise InputError(f"dask array: image {ids[i0 + j]!r}: {exc}; nothing was written") from None
                h, w = shapes[i0 + j]
                outb[j, max(0, h - r0):] = fill
                outb[j, :, max(0, w - c0):] = fill
            return outb

        fixed = src.map_blocks(fix, dtype=target.dtype)
        from isle_fast.progress import dask_progress

        with dask_progress("ingest dask", quiet=quiet):
            da.store(fixed, target, lock=False)
        stack = writer.commit()
    seconds = time.perf_counter() - t0
    px = int((shapes[:, 0] * shapes[:, 1]).sum())
    summary(f"isle ingest: dask {enc} -> {kind} store", {
        "images": f"{n:,}", "pixels": f"{px:,}", "seconds": f"{seconds:.2f}",
        "throughput": f"{n / max(seconds, 1e-9):,.1f} images/s", "store": stack.path}, quiet=quiet)
    return stack


# --------------------------------------------------------------------------- TIFF
def _tiff_info(path: str) -> tuple[tuple[int, ...], np.dtype]:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tf:
            s = tf.series[0]
            return tuple(int(v) for v in s.shape), np.dtype(s.dtype)
    except FileNotFoundError:
        raise BadInput("file does not exist") from None
    except Exception as exc:  # tifffile raises TiffFileError and others for broken files
        raise BadInput(f"not a readable TIFF: {type(exc).__name__}: {exc}") from None


def _tiff_image_shape(shape: tuple[int, ...], encoding: str, c: int) -> tuple[int, int]:
    if encoding == "labels":
        if len(shape) != 2:
            raise BadInput(f"a label-map TIFF must be H x W, this one is {shape}")
    elif encoding == "scores":
        if len(shape) != 3 or shape[2] != c:
            raise BadInput(f"a score TIFF must be H x W x {c} (one plane per class); this one is {shape} "
                           f"(the class count disagrees)")
    elif len(shape) != 3 or shape[2] != 3:
        raise BadInput(f"an RGB TIFF must be H x W x 3, this one is {shape}")
    return int(shape[0]), int(shape[1])


def ingest_tiff(
    src: str | os.PathLike | Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    ids: str | os.PathLike | Sequence[str] | None = None,
    classes: str | os.PathLike | Sequence[str] | None = None,
    kind: str = "pseudo",
    encoding: str | None = None,
    name: str | None = None,
    gt: str | os.PathLike | Stack | None = None,
    score_dtype: str = "uint8",
    skip_bad: bool = False,
    workers: int | None = None,
    chunks: Sequence[int] | None = None,
    overwrite: bool = False,
    quiet: bool = False,
) -> Stack:
    """Ingest (large) TIFFs, one image per file, reading and writing tile by tile.

    Each TIFF (its first series) is an ``H x W`` label map (encoding
    ``labels``), an ``H x W x C`` score stack (``scores``: float in [0, 1], or
    integers already scaled 0..255) or, for kind ``images``, ``H x W x 3`` RGB.
    The encoding follows from the first file's rank unless given.

    Nothing is read whole: the TIFF is opened as a Zarr store
    (``tifffile.imread(path, aszarr=True)``) and read one output chunk region
    at a time, validated and written in that region, by a thread pool. For
    images larger than :data:`~isle_fast.stores.stack.TARGET_CHUNK_BYTES` the store
    uses spatial tile chunks (:func:`~isle_fast.stores.stack.default_chunks`), so the
    memory used is a few tiles per thread whatever the image size.

    Parameters
    ----------
    src : path or sequence of paths
        One TIFF, a folder of ``<id>.tif`` files, or a list of TIFFs (ids =
        file names without extension unless ``ids`` is given).

    Other parameters are those of :func:`ingest_labels` / :func:`ingest_scores`.
    """
    import tifffile
    import zarr

    _check_out(out, overwrite, *([src] if isinstance(src, (str, os.PathLike)) else src), gt, ids, classes)
    w = _default_workers(workers)
    if isinstance(src, (str, os.PathLike)) and Path(src).is_dir():
        ref0 = _reference(gt, _id_list(ids), w)
        items, missing, ids_file = _select(src, TIFF_EXTS, ids, ref0, "TIFF")
    else:
        paths = [src] if isinstance(src, (str, os.PathLike)) else list(src)
        ids_file = str(ids) if isinstance(ids, (str, os.PathLike)) else None
        id_list = (read_ids(ids) if ids_file else list(ids) if ids is not None else [stem(p) for p in paths])
        if len(id_list) != len(paths):
            raise InputError(f"{len(paths)} TIFF files but {len(id_list)} ids")
        items = [_Item(str(i), str(p), str(p)) for i, p in zip(id_list, paths)]
        missing = []
        ref0 = _reference(gt, [it.id for it in items], w)
    names = _check_classes(classes, ref0)
    c = len(names)
    dt = np.dtype(score_dtype)
    if not items:
        raise _bad_error(missing) if missing else InputError("no TIFF files given")
    if encoding is None:
        try:
            shape0, _ = _tiff_info(items[0].ref)
        except BadInput as exc:
            raise InputError(f"{items[0].source}: image {items[0].id!r}: {exc}") from None
        encoding = "rgb" if kind == "images" else ("labels" if len(shape0) == 2 else "scores")
    enc = "rgb" if kind == "images" else encoding
    t0 = time.perf_counter()
    bad = list(missing)
    shapes: dict[str, tuple[int, int]] = {}
    keep = []
    for it in items:
        try:
            hw = _tiff_image_shape(_tiff_info(it.ref)[0], enc, c)
            if ref0 is not None:
                if it.id not in ref0.shapes:
                    raise BadInput(f"id is not in the ground truth {ref0.source}")
                if ref0.shapes[it.id] != hw:
                    raise BadInput(f"is {hw[0]} x {hw[1]} but the ground truth says "
                                   f"{ref0.shapes[it.id][0]} x {ref0.shapes[it.id][1]}")
            shapes[it.id] = hw
            keep.append(it)
        except BadInput as exc:
            bad.append((it.id, it.source, str(exc)))
    if bad and not skip_bad:
        raise _bad_error(bad)
    if not keep:
        raise InputError(f"nothing to ingest into {out}: every TIFF is bad; first: {_bad_error(bad, False)}")
    id_order = [it.id for it in keep]
    shape_arr = np.array([shapes[i] for i in id_order], dtype=np.int64)
    padded = ref0.padded if ref0 is not None and ref0.padded else None
    prov = _common_prov(src if isinstance(src, (str, os.PathLike)) else [str(p) for p in src], ids_file, gt,
                        format="tiff", encoding=enc, score_dtype=score_dtype, skip_bad=skip_bad)
    writer = create_stack(out, kind=kind, classes=names, ids=id_order, shapes=shape_arr, encoding=enc, name=name,
                          score_dtype=score_dtype, chunks=chunks, overwrite=overwrite, padded_shape=padded,
                          provenance=prov)
    late_bad: list[tuple[str, str, str]] = []
    kept_ids: list[str] = []
    kept_shapes: list[tuple[int, int]] = []
    pixels = 0
    pool = ThreadPoolExecutor(max_workers=w, thread_name_prefix="isle-tiff")
    try:
        with writer:
            arr = writer.array
            fill = writer.layout.fill
            k, th, tw = (int(v) for v in arr.chunks[:3])
            h_pad, w_pad = (int(v) for v in arr.shape[1:3])
            tail = tuple(arr.shape[3:])
            bar = progress(total=len(keep), desc=f"ingest tiff {enc}", unit="img", quiet=quiet)
            pos = 0
            for it in keep:
                h, wd = shapes[it.id]
                store = tifffile.imread(it.ref, aszarr=True)
                try:
                    zin = zarr.open(store, mode="r")
                    if not hasattr(zin, "shape"):  # a multiscale group: level 0
                        zin = zin["0"]

                    def tile(rc, zin=zin, h=h, wd=wd, p=pos):
                        r0, c0 = rc
                        r1, c1 = min(r0 + th, h_pad), min(c0 + tw, w_pad)
                        block = np.full((r1 - r0, c1 - c0) + tail, fill, dtype=arr.dtype)
                        rr, cc = min(r1, h), min(c1, wd)
                        if rr > r0 and cc > c0:
                            data = _validate_block(np.asarray(zin[r0:rr, c0:cc]), enc, c, dt)
                            block[:rr - r0, :cc - c0] = data
                        arr[p, r0:r1, c0:c1] = block
                        return None

                    if k == 1:  # tile chunks: every region is one whole chunk, written in parallel
                        regions = [(r, q) for r in range(0, h_pad, th) for q in range(0, w_pad, tw)]
                        err = None
                        try:
                            with closing(_ordered(pool, tile, regions, 2 * w)) as tiles:
                                for _ in tiles:
                                    pass
                        except BadInput as exc:
                            err = str(exc)
                    else:  # several images per chunk: assemble the image from tile-sized reads
                        err = None
                        try:
                            data = np.full((h_pad, w_pad) + tail, fill, dtype=arr.dtype)
                            step_r, step_c = max(256, th), max(256, tw)
                            for r0 in range(0, h, step_r):
                                for c0 in range(0, wd, step_c):
                                    piece = np.asarray(zin[r0:min(r0 + step_r, h), c0:min(c0 + step_c, wd)])
                                    data[r0:r0 + piece.shape[0], c0:c0 + piece.shape[1]] = \
                                        _validate_block(piece, enc, c, dt)
                            arr[pos] = data
                        except BadInput as exc:
                            err = str(exc)
                except Exception as exc:
                    if isinstance(exc, (InputError, StoreError)):
                        raise
                    err = f"cannot be read: {type(exc).__name__}: {exc}"
                finally:
                    store.close()
                bar.update(1)
                if err is not None:
                    late_bad.append((it.id, it.source, err))
                    if not skip_bad:
                        raise _bad_error(bad + late_bad)
                    continue
                pos += 1
                pixels += h * wd
                kept_ids.append(it.id)
                kept_shapes.append((h, wd))
            bar.close()
            if not kept_ids:
                raise InputError(f"nothing to ingest into {out}: every TIFF is bad; first: "
                                 f"{_bad_error(bad + late_bad, False)}")
            if late_bad:
                n = len(kept_ids)
                arr.resize((n,) + tuple(arr.shape[1:]))
                writer.group["ids"].resize((n,))
                writer.group["ids"][:] = np.asarray(kept_ids, dtype=object)
                writer.group["shapes"].resize((n, 2))
                writer.group["shapes"][:] = np.asarray(kept_shapes, dtype=np.int32)
            if bad or late_bad:
                writer.set_provenance(skipped=[{"id": i, "file": f, "reason": r} for i, f, r in bad + late_bad])
            stack = writer.commit()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    seconds = time.perf_counter() - t0
    allbad = bad + late_bad
    rows = {"images": f"{stack.num_images:,}" + (f"  ({len(allbad)} skipped)" if allbad else ""),
            "pixels": f"{pixels:,}", "seconds": f"{seconds:.2f}",
            "throughput": f"{pixels / max(seconds, 1e-9) / 1e6:,.1f} Mpix/s",
            "store size": f"{stack.stored_bytes() / 2**20:,.2f} MiB", "store": stack.path}
    for i, f, r in allbad[:10]:
        rows[f"skipped {i}"] = f"{f}: {r}"
    summary(f"isle ingest: TIFF {enc} -> {kind} store", rows, quiet=quiet)
    return stack
