"""Ingest in-memory arrays: NumPy arrays (:func:`ingest_arrays`) and Dask arrays (:func:`ingest_dask`).

Every image (or block) is checked as the file readers check theirs (:func:`_validate_block`: labels in
``[0, C)`` or 255, RGB in ``[0, 255]``, scores finite in ``[0, 1]`` or integer stored units) and
converted to the store's dtype; the bad ones are named by image id.
"""

from __future__ import annotations

import os
import time
from typing import Any, Sequence

import numpy as np

from isle_fast.errors import InputError
from isle_fast.progress import summary
from isle_fast.stores.formats import BadInput, check_labels, scores_to_store
from isle_fast.stores.ingest import _check_out, resolve_classes
from isle_fast.stores.ingest_engine import _Item, _Plan, _run
from isle_fast.stores.stack import SCORE_SCALE, Stack, create_stack

__all__ = ["ingest_arrays", "ingest_dask"]


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

        with dask_progress("ingest", quiet=quiet, images=len(shapes)):
            da.store(fixed, target, lock=False)
        stack = writer.commit()
    seconds = time.perf_counter() - t0
    px = int((shapes[:, 0] * shapes[:, 1]).sum())
    summary(f"isle ingest: dask {enc} -> {kind} store", {
        "images": f"{n:,}", "pixels": f"{px:,}", "seconds": f"{seconds:.2f}",
        "throughput": f"{n / max(seconds, 1e-9):,.1f} images/s", "store": stack.path}, quiet=quiet)
    return stack
