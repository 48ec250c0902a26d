"""Ingest (large) TIFFs, one image per file, read and written tile by tile (:func:`ingest_tiff`)."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from isle_fast.errors import InputError, StoreError
from isle_fast.progress import progress
from isle_fast.stores.formats import TIFF_EXTS, BadInput, stem
from isle_fast.stores.ingest import (
    _check_classes,
    _check_out,
    _common_prov,
    _folder_inputs,
    _reference,
    options_doc,
    read_ids,
)
from isle_fast.stores.ingest_arrays import _validate_block
from isle_fast.stores.ingest_engine import (
    _bad_error,
    _default_workers,
    _Item,
    _ordered,
    nothing_left,
    record_skipped,
    shrink,
    summarize,
)
from isle_fast.stores.stack import Stack, create_stack

__all__ = ["ingest_tiff"]


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


def _copy_tiff(path: str, arr: Any, pos: int, hw: tuple[int, int], fill: Any, pool: ThreadPoolExecutor,
               workers: int, check: tuple[str, int, np.dtype]) -> str | None:
    """One TIFF into image ``pos`` of the store array, region by region; the reason it is bad, or None.

    With tile chunks (one image per chunk) every chunk region is read, checked
    (``check``: encoding, class count, store dtype; :func:`_validate_block`) and written by
    ``pool``; with several images per chunk the image is assembled from tile-sized reads.
    """
    import tifffile
    import zarr

    enc, c, dt = check
    h, wd = hw
    k, th, tw = (int(v) for v in arr.chunks[:3])
    h_pad, w_pad = (int(v) for v in arr.shape[1:3])
    tail = tuple(arr.shape[3:])
    store = tifffile.imread(path, aszarr=True)
    try:
        zin: Any = zarr.open(store, mode="r")  # a group (pyramid) or an array
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
                with closing(_ordered(pool, tile, regions, 2 * workers)) as tiles:
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
    return err


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

    out : path or URL
        The store to write.
    {common}
    encoding : {'labels', 'scores'}, optional
        Default from the first file's rank: ``H x W`` is labels, ``H x W x C`` scores.
    score_dtype : {'uint8', 'float16', 'float32'}
        The scores' storage type (see :func:`~isle_fast.stores.ingest.ingest_scores`).

    Returns
    -------
    Stack
    """
    _check_out(out, overwrite, *([src] if isinstance(src, (str, os.PathLike)) else src), gt, ids, classes)
    w = _default_workers(workers)
    if isinstance(src, (str, os.PathLike)) and Path(src).is_dir():
        ref0, names, items, missing, ids_file = _folder_inputs(src, TIFF_EXTS, "TIFF", ids, classes, gt, workers)
    else:
        paths = [src] if isinstance(src, (str, os.PathLike)) else list(src)
        ids_file = str(ids) if isinstance(ids, (str, os.PathLike)) else None
        if isinstance(ids, (str, os.PathLike)):
            id_list = read_ids(ids)
        else:
            id_list = list(ids) if ids is not None else [stem(p) for p in paths]
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
        raise nothing_left(out, bad, "TIFF")
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
            bar = progress(total=len(keep), desc=f"ingest tiff {enc}", unit="img", quiet=quiet)
            pos = 0
            for it in keep:
                h, wd = shapes[it.id]
                err = _copy_tiff(it.ref, arr, pos, shapes[it.id], fill, pool, w, (enc, c, dt))
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
                raise nothing_left(out, bad + late_bad, "TIFF")
            if late_bad:  # the images were written in order at 0, 1, ...: only the tail goes
                shrink(writer, kept_ids, kept_shapes)
            record_skipped(writer, bad + late_bad)
            stack = writer.commit()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    summarize(f"isle ingest: TIFF {enc} -> {kind} store", stack, bad + late_bad, pixels,
              time.perf_counter() - t0, quiet=quiet)
    return stack


ingest_tiff.__doc__ = (ingest_tiff.__doc__ or "").replace("{common}", options_doc(skip=("provenance",)))
