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
:func:`~isle_fast.stores.ingest_tiff.ingest_tiff`
    (Large) TIFF label maps or ``H x W x C`` score stacks, read tile by tile.
:func:`~isle_fast.stores.ingest_arrays.ingest_arrays`, :func:`~isle_fast.stores.ingest_arrays.ingest_dask`
    NumPy arrays (one per image, or one padded batch) and Dask arrays.

This module reads folders of files; the run itself (checks against the ground truth, the
chunk-by-chunk write, compaction, the summary) is :mod:`isle_fast.stores.ingest_engine`'s, and
the options these functions share are defined once in :class:`IngestOptions`.

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
and no store is written (the temporary folder is removed). With ``skip_bad=True`` the bad images are
left out instead, and the list of ``(id, file, reason)`` goes into the store's provenance (``skipped``)
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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from isle_fast.errors import InputError, param
from isle_fast.options import option, parameters_doc
from isle_fast.stores.formats import (
    IMAGE_EXTS,
    LABEL_EXTS,
    SCORE_EXTS,
    TIFF_EXTS,
    BadInput,
    image_header,
    label_header,
    read_image,
    read_label,
    read_scores,
    score_header,
    scores_to_store,
    stem,
)
from isle_fast.stores.ingest_engine import _default_workers, _Item, _Plan, _Reference, _run
from isle_fast.stores.stack import VOC_CLASSES, Stack, is_remote, open_stack

__all__ = [
    "DEFAULT_BG_THRESHOLD",
    "read_ids",
    "resolve_classes",
    "ingest_labels",
    "ingest_scores",
    "ingest_images",
    "IngestOptions",
]

#: Background score given to foreground-only CAMs: the ``cam_eval_thres`` default of
#: IRN's evaluation (``run_sample.py``), which PuzzleCAM-style evaluations also start from.
DEFAULT_BG_THRESHOLD = 0.15


@dataclass(frozen=True)
class IngestOptions:
    """The options every file ingest takes, defined once (their docs come from here).

    :func:`ingest_labels`, :func:`ingest_scores`, :func:`ingest_images` and
    :func:`~isle_fast.stores.ingest_tiff.ingest_tiff` keep them as keyword arguments;
    their ``Parameters`` entries are made from these fields by
    :func:`isle_fast.options.parameters_doc`.
    """

    ids: Any = option(None, group="inputs", doc_type="path or sequence of str, optional",
                      help="which images, in which order: an id list file (see :func:`read_ids`) or a list; "
                           "default: the ground truth's ids, else the folder listing")
    classes: Any = option(None, group="inputs", doc_type="'voc', path or sequence of str, optional",
                          help="class names, background first; default the ground truth store's classes, "
                               "else VOC's 21")
    kind: str = option("pseudo", group="output", choices=("pseudo", "gt", "ensemble"),
                       help="what the store holds")
    name: Any = option(None, group="output", doc_type="str, optional",
                       help="the set's name (default: the store folder's name)")
    gt: Any = option(None, group="inputs", doc_type="path or Stack, optional",
                     help="ground truth (a store or a folder of label maps) to check ids and sizes against; "
                          "the store then gets the ground truth's padded shape")
    skip_bad: bool = option(False, group="inputs",
                            help="leave bad images out (listed in provenance ``skipped``) instead of failing")
    workers: Any = option(None, group="run", doc_type="int, optional",
                          help="worker processes that decode and write chunks (default: one per core)")
    chunks: Any = option(None, group="output", doc_type="sequence of int, optional",
                         help="chunk shape ``(k, H, W)``; default "
                              ":func:`~isle_fast.stores.stack.default_chunks`")
    overwrite: bool = option(False, group="output",
                             help="replace an existing store (only once the new one is complete)")
    quiet: bool = option(False, group="run", help="no progress bar, no summary")
    provenance: Any = option(None, group="output", doc_type="dict, optional", cli=False,
                             help="extra JSON-ready entries for the store's provenance (``isle run`` "
                                  "records its input fingerprint there)")


def options_doc(skip: Sequence[str] = ()) -> str:
    """The numpydoc ``Parameters`` entries of :class:`IngestOptions` (but ``skip``), for a docstring."""
    return parameters_doc(IngestOptions, skip=skip).strip("\n")[4:]


# =========================================================================== inputs
def read_ids(path: str | os.PathLike) -> list[str]:
    """Image ids from a list file.

    One id per line (``2007_000032``), or the two-column form
    ``JPEGImages/2007_000032.jpg SegmentationClassAug/2007_000032.png`` (the id
    is the first column's file name without extension). Blank lines and lines
    starting with ``#`` are skipped; a single-column entry that ends with a
    known image / array extension loses it. The rules of a folder listing hold:
    a UTF-8 byte-order mark is dropped, an id may hold spaces (a line is two
    columns only when both name files: a folder or a known extension), and an
    entry with a folder (``dir/x``) is its file name (``x``), which is said once
    (a warning on the ``isle_fast`` logger) unless the line is the two-column form.

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

    def names_file(text: str) -> bool:
        return "/" in text or os.path.splitext(text)[1].lower() in known

    folders: list[str] = []
    for n, line in enumerate(p.read_text(encoding="utf-8-sig").splitlines(), 1):  # -sig: a BOM is no id
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        cols = line.split()
        pair = len(cols) == 2 and names_file(cols[0]) and names_file(cols[1])  # VOC's image / mask form
        first = cols[0] if pair else line  # else the whole line: an id may hold spaces, as in a folder
        if names_file(first):
            if "/" in first and not pair:
                folders.append(first)
            first = stem(first) if os.path.splitext(first)[1].lower() in known else Path(first).name
        if first in seen:
            raise InputError(f"ids file {p} line {n}: id {first!r} repeats line {seen[first]}")
        seen[first] = n
        ids.append(first)
    if not ids:
        raise InputError(f"ids file {p} holds no ids")
    if folders:
        import logging

        logging.getLogger("isle_fast").warning(
            "isle: ids file %s: %d entr%s with a folder (e.g. %r) read as %s file name (%r)", p, len(folders),
            "y" if len(folders) == 1 else "ies", folders[0], "its" if len(folders) == 1 else "their",
            Path(folders[0]).name.rsplit(".", 1)[0] if os.path.splitext(folders[0])[1].lower() in known
            else Path(folders[0]).name)
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


def _reference(gt: Any, ids: list[str] | None, workers: int) -> _Reference | None:
    if gt is None or isinstance(gt, _Reference):   # a _Reference: the gt store isle run is writing
        return gt
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
    listing = _files_of(d)
    found = [(i, _find(d, i, LABEL_EXTS, listing)) for i in use]
    shapes = {}

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


def _files_of(folder: Path) -> set[str] | None:
    """Names of the files (symlinks followed) directly in ``folder``: one directory read, no stat per file."""
    try:
        with os.scandir(folder) as it:
            return {e.name for e in it if e.is_file()}
    except OSError:
        return None


def _find(folder: Path, image_id: str, exts: Sequence[str], files: set[str] | None = None) -> str | None:
    """The file of ``image_id`` (``<id><ext>``, extensions in order, lower case first), or None.

    ``files``: the folder's file names (:func:`_files_of`), looked up instead of a ``stat`` per
    candidate; ids naming a subfolder (``a/b``) are looked up on disk.
    """
    local = files is not None and "/" not in image_id and os.sep not in image_id
    for e in exts:
        for cand in (e, e.upper()):
            name = f"{image_id}{cand}"
            if local:   # a name in the listing: the path as str(folder / name) writes it, without pathlib
                if name in files:   # type: ignore[operator]
                    base = str(folder)
                    return name if base == "." else os.path.join(base, name)
            elif (folder / name).is_file():
                return str(folder / name)
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
    files = _files_of(folder)
    for i in id_list:
        f = _find(folder, i, exts, files)
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


def _folder_inputs(src: Any, exts: Sequence[str], what: str, ids: Any, classes: Any, gt: Any,
                   workers: int | None) -> tuple[_Reference | None, list[str], list[_Item],
                                                 list[tuple[str, str, str]], str | None]:
    """What every folder ingest starts from: ``(reference, classes, items, missing files, ids file)``.

    The ground truth (read with ``workers`` threads), the classes checked against it, and the
    items of ``src`` (files with one of ``exts``) chosen by ``ids`` (see :func:`_select`).
    """
    ref = _reference(gt, _id_list(ids), _default_workers(workers))
    names = _check_classes(classes, ref)
    items, missing, ids_file = _select(src, exts, ids, ref, what)
    return ref, names, items, missing, ids_file


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
    {common}
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
    return _run(labels_plan(src, out, ids=ids, classes=classes, kind=kind, name=name, gt=gt, skip_bad=skip_bad,
                            workers=workers, chunks=chunks, overwrite=overwrite, quiet=quiet,
                            provenance=provenance, image_labels=image_labels))


def labels_plan(src: str | os.PathLike, out: str | os.PathLike, *, ids: Any = None, classes: Any = None,
                kind: str = "pseudo", name: str | None = None, gt: Any = None, skip_bad: bool = False,
                workers: int | None = None, chunks: Sequence[int] | None = None, overwrite: bool = False,
                quiet: bool = False, provenance: dict | None = None, image_labels: Any = None) -> _Plan:
    """The checked, described run of :func:`ingest_labels` (same arguments), not yet run.

    ``isle run`` runs the plans of several sets in one pass
    (:func:`isle_fast.stores.ingest_engine.run_counted`).
    """
    if kind == "images":
        raise InputError("kind 'images' takes RGB images: use ingest_images (isle ingest images)")
    _check_out(out, overwrite, src, gt, ids, classes)
    ref, names, items, missing, ids_file = _folder_inputs(src, LABEL_EXTS, "label", ids, classes, gt, workers)
    c = len(names)
    _, finish = _image_labels(image_labels, items, names, quiet, out)
    return _Plan(
        kind=kind, encoding="labels", classes=names, items=items, out=str(out), prebad=missing,
        header=lambda it: label_header(it.ref), read=lambda it, hw: read_label(it.ref, c),
        reference=ref, name=name, chunks=chunks, skip_bad=skip_bad, workers=workers, overwrite=overwrite,
        quiet=quiet, provenance={**_common_prov(src, ids_file, gt, format="labels", skip_bad=skip_bad),
                                 **(provenance or {})},
        finish=finish,
    )


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
    score_layout: str = "auto",
) -> Stack:
    """Ingest CAM / score files into a ``scores`` store (``(I, H, W, C)``).

    Parameters
    ----------
    src : path
        Folder of ``<id>.npy`` / ``<id>.npz`` files (see
        :mod:`isle_fast.stores.formats` for the layouts understood).
    out : path or URL
        The store to write.
    {common}
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
    score_layout : {'auto', 'sparse', 'dense'}
        ``sparse``: store only the classes present in each image
        (:mod:`isle_fast.stores.sparse`; ``uint8`` only, and the background
        slice must be the constant threshold, as for foreground-only CAMs);
        ``dense``: every class slice; ``auto`` (default): sparse where it
        applies (``uint8``, local, constant background), else dense. Readers
        see the same logical stack either way. The class-sparse store is
        written straight from the files (:mod:`isle_fast.stores.cam_ingest`).

    Returns
    -------
    Stack
    """
    if not 0.0 <= bg_threshold <= 1.0:
        raise InputError(f"bg_threshold must lie in [0, 1], not {bg_threshold}")
    if np.dtype(score_dtype) not in (np.dtype(np.uint8), np.dtype(np.float16), np.dtype(np.float32)):
        raise InputError(f"score_dtype must be uint8, float16 or float32, not {score_dtype!r}")
    if upsample and gt is None:
        raise InputError(f"upsample needs the image sizes: give the ground truth ({param('gt')})")
    _check_out(out, overwrite, src, gt, ids, classes)
    ref, names, items, missing, ids_file = _folder_inputs(src, SCORE_EXTS, "score", ids, classes, gt, workers)
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
    from isle_fast.stores.sparse import ingest_layout
    from isle_fast.stores.stack import _default_name

    named = replace(plan, name=plan.name or _default_name(str(out)))   # not the temporary's name
    if score_layout in ("auto", "sparse") and dt == np.uint8 and not is_remote(out):
        # class-sparse straight from the files (isle_fast/stores/cam_ingest.py); the dense path below
        # only where the background is not one constant (it then writes dense or fails, as before)
        from isle_fast.stores.cam_ingest import NotSparse, ingest_cam_sparse, read_cam_slots

        def read_slots(it: _Item, hw):
            return read_cam_slots(it.ref, c, allow_pickle=allow_pickle, bg_threshold=bg_threshold,
                                  normalize=normalize, expect=hw if ref is not None else None, upsample=upsample,
                                  cam_layout=cam_layout, labels=present(it))

        try:
            return ingest_cam_sparse(
                named, read_slots, plan.header,
                image_labels=None if labels is None else (lambda ids: (labels.aligned(ids), labels.source)))
        except NotSparse:
            pass
    return ingest_layout(lambda dense_out, q: _run(replace(named, out=dense_out, quiet=q)), out,
                         layout=score_layout, score_dtype=score_dtype, overwrite=overwrite, quiet=quiet)


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
    sizes are checked and the store aligns with the ground truth.

    Parameters
    ----------
    src : path
        Folder of RGB images, one per image, named ``<id>.jpg`` / ``<id>.png``.
    out : path or URL
        The store to write.
    {common}

    Returns
    -------
    Stack
    """
    _check_out(out, overwrite, src, gt, ids, classes)
    ref, names, items, missing, ids_file = _folder_inputs(src, IMAGE_EXTS, "image", ids, classes, gt, workers)
    plan = _Plan(
        kind="images", encoding="rgb", classes=names, items=items, out=str(out), prebad=missing,
        header=lambda it: image_header(it.ref), read=lambda it, hw: read_image(it.ref), reference=ref,
        name=name, chunks=chunks, skip_bad=skip_bad, workers=workers, overwrite=overwrite, quiet=quiet,
        provenance={**_common_prov(src, ids_file, gt, format="images", skip_bad=skip_bad),
                    **(provenance or {})},
    )
    return _run(plan)


ingest_labels.__doc__ = (ingest_labels.__doc__ or "").replace("{common}", options_doc())
ingest_scores.__doc__ = (ingest_scores.__doc__ or "").replace("{common}", options_doc())
ingest_images.__doc__ = (ingest_images.__doc__ or "").replace("{common}", options_doc(skip=("kind",)))
