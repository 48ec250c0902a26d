"""Class-sparse score stores: only the classes present in each image are stored.

A CAM file holds the classes of its image only (IRN's ``keys``); a dense
``(I, H, W, C)`` score stack spends C bytes a pixel on them, mostly zeros.
A *class-sparse* score store (attribute ``score_layout: "sparse"``) holds

======== ====================== ==================================================
member   shape, dtype           meaning
======== ====================== ==================================================
cams     (I, H, W, K) uint8     slot ``j`` of image ``i``: the scores of class
                                ``keys[i, j]``; K = the most classes any image has
keys     (I, K) uint8           the class of every slot, ascending; 0 = unused
                                slot (its scores are 0)
attrs                           ``background_level``: the stored background score
                                of every pixel inside an image (CAM ingest's
                                threshold); padding is 0, as in a dense store;
                                or ``"stored"``: the member ``background`` holds it
background (I, H, W) uint8      only with ``background_level: "stored"`` (refined
                                scores, whose background varies per pixel: CRF
                                marginals, random-walk scores;
                                :mod:`isle_fast.refinement.chain`); 0 in the padding
======== ====================== ==================================================

next to ``ids`` and ``shapes``. Its *logical* stack is the dense ``(I, H, W,
C)`` ``uint8`` stack: slice 0 is ``background_level`` inside each image (0 in
the padding), class ``keys[i, j]`` is slot ``j``, every other class is 0.
:class:`isle_fast.stores.stack.Stack` gives that view to every reader
(``Stack.array``, ``read_image``, ``to_dask``), so refine, merge, export,
report and train read a sparse store like a dense one; the threshold sweep
(:mod:`isle_fast.ensemble.sweep`) and the merge at per-set thresholds
(:func:`isle_fast.ensemble.merge.merge`, its direct pass) read ``cams`` and
``keys`` directly, decoding only the K stored slots of each pixel inside its
image (:func:`isle_fast.kernels.cpu.sparse_score_bins`,
:func:`isle_fast.kernels.cpu.merge_sparse_labels`).

CAM ingest writes it straight from the CAM files
(:mod:`isle_fast.stores.cam_ingest`); a dense ``uint8`` score store is made
sparse by :func:`sparsify` when its background slice is one constant inside
every image (CAM ingest: the threshold); the dense view of the result equals
the dense store, bit for bit. Both write through :class:`SparseWriter`
(keys and background level up front, then whole chunks of slots, by this
process or by worker tasks). Both arrays end every chunk in a crc32c and are in the store's chunk
manifest; ``score_layout`` and ``background_level`` are in its identity
checksum. The keys are checked when the store is opened (ascending, in
1..C-1, unused slots last), so a damaged ``keys`` chunk is an error, never
another class.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from isle_fast.errors import InputError, StoreError

__all__ = [
    "SPARSE", "DENSE", "SparseWriter", "constant_background", "sparse_chunks", "sparsify", "densify",
    "check_keys", "SparseView", "BACKGROUND_STORED", "ensemble_view",
]

SPARSE = "sparse"
DENSE = "dense"
LAYOUT_ATTR = "score_layout"
BACKGROUND_ATTR = "background_level"
#: ``background_level`` of a store whose background slice varies per pixel (refined scores: CRF
#: marginals, random-walk scores): it is stored in the member ``background`` (I, H, W) uint8, 0 in
#: the padding, next to ``cams`` and ``keys`` (written by :mod:`isle_fast.refinement.chain`)
BACKGROUND_STORED = "stored"
BACKGROUND_MEMBER = "background"


def densify(
    cams: np.ndarray,
    keys: np.ndarray,
    background: int | np.ndarray,
    num_classes: int,
    valid: np.ndarray | None = None,
) -> np.ndarray:
    """The dense ``(n, h, w, C)`` uint8 block of ``cams`` ``(n, h, w, K)``, slot classes ``keys`` ``(n, K)``.

    Slice 0 is ``background`` (a level, or the stored ``(n, h, w)`` slice) where ``valid``
    ``(n, h, w)`` is True (0 elsewhere); unused slots (key 0) are skipped.
    """
    n, h, w, k = cams.shape
    out = np.zeros((n, h, w, num_classes), np.uint8)
    for m in range(n):
        for j in range(k):
            c = int(keys[m, j])
            if c:
                out[m, :, :, c] = cams[m, :, :, j]
    if valid is None:
        out[..., 0] = background
    else:
        out[..., 0] = np.where(valid, np.uint8(background), np.uint8(0))
    return out


def check_keys(path: str, keys: np.ndarray, num_classes: int) -> None:
    """Raise :class:`StoreError` unless every row of ``keys`` is ascending classes in 1..C-1, then 0s."""
    k = np.asarray(keys)
    if k.ndim != 2 or k.dtype != np.uint8:
        raise StoreError(f"{path}: array 'keys' is {k.dtype} of shape {k.shape}; expected (images, K) uint8")
    used = k > 0
    bad = (k >= num_classes).any(axis=1)
    if k.shape[1] > 1:
        bad |= (used[:, 1:] & ~used[:, :-1]).any(axis=1)  # a used slot after an unused one
        bad |= (used[:, 1:] & (k[:, 1:] <= k[:, :-1])).any(axis=1)  # not strictly ascending
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise StoreError(
            f"{path}: 'keys' of image {i} is {k[i].tolist()}: slot classes must be ascending, in "
            f"1..{num_classes - 1}, unused slots (0) last; the store is damaged"
        )


class SparseView:
    """The logical dense ``(I, H, W, C)`` uint8 stack of a class-sparse store, read on indexing.

    Supports what readers of ``Stack.array`` use: ``shape``, ``dtype``, ``chunks``, ``ndim``,
    ``compressors`` and basic indexing (integers and slices; a step on the class axis too).
    """

    def __init__(self, stack: Any):
        self._stack = stack
        self.cams = stack.member("cams")
        self.keys = stack.sparse_keys
        level = stack.attrs[BACKGROUND_ATTR]
        self.background_slice = stack.member(BACKGROUND_MEMBER) if level == BACKGROUND_STORED else None
        self.background = 0 if self.background_slice is not None else int(level)
        self.shape = tuple(stack.shape)
        self.chunks = tuple(stack.chunks)
        self.dtype = np.dtype(np.uint8)
        self.ndim = 4
        self.compressors = self.cams.compressors

    def __getitem__(self, key: Any) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        if any(k is Ellipsis for k in key):
            i = key.index(Ellipsis)
            key = key[:i] + (slice(None),) * (4 - len(key) + 1) + key[i + 1 :]
        key = key + (slice(None),) * (4 - len(key))
        img, rows, cols, cls = key
        scalar = isinstance(img, (int, np.integer))
        n = self.shape[0]
        if scalar:
            i = int(img) + (n if int(img) < 0 else 0)
            if not 0 <= i < n:
                raise IndexError(f"image {img} out of range for {n} images")
            sel = slice(i, i + 1)
        elif isinstance(img, slice):
            sel = slice(*img.indices(n))
        else:
            raise TypeError("a class-sparse store's dense view takes integers and slices")
        cams = np.asarray(self.cams[sel, rows, cols, :])
        if cams.ndim != 4:  # an integer row or column index: keep the axis, drop it at the end
            r = slice(int(rows), int(rows) + 1) if isinstance(rows, (int, np.integer)) else rows
            c = slice(int(cols), int(cols) + 1) if isinstance(cols, (int, np.integer)) else cols
            cams = np.asarray(self.cams[sel, r, c, :])
        idx = np.arange(n)[sel]
        st = self._stack
        h_pad, w_pad = self.shape[1:3]
        rr = np.arange(h_pad)[
            rows if not isinstance(rows, (int, np.integer)) else slice(int(rows), int(rows) + 1)
        ]
        cc = np.arange(w_pad)[
            cols if not isinstance(cols, (int, np.integer)) else slice(int(cols), int(cols) + 1)
        ]
        valid = (rr[None, :, None] < st.shapes[idx, 0][:, None, None]) & (
            cc[None, None, :] < st.shapes[idx, 1][:, None, None]
        )
        background: int | np.ndarray = self.background
        if self.background_slice is not None:
            background = _background_block(self.background_slice, sel, rows, cols)
        out = densify(cams, self.keys[idx], background, self.shape[3], valid)
        out = out[(slice(None), slice(None), slice(None), cls)]
        drop = tuple(0 if isinstance(k, (int, np.integer)) else slice(None) for k in (img, rows, cols))
        return out[drop]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        a = self[...]
        return a if dtype is None else a.astype(dtype)


def _background_block(arr: Any, sel: slice, rows: Any, cols: Any) -> np.ndarray:
    """The stored background slice ``(n, h, w)`` of images ``sel``, rows and columns kept as axes."""
    r = slice(int(rows), int(rows) + 1) if isinstance(rows, (int, np.integer)) else rows
    c = slice(int(cols), int(cols) + 1) if isinstance(cols, (int, np.integer)) else cols
    return np.asarray(arr[sel, r, c])


def _dense_block_stored(block: np.ndarray, background: np.ndarray, keys: np.ndarray, num_classes: int
                        ) -> np.ndarray:
    """Dask task of the dense view of a store with a stored background slice (0 in the padding)."""
    return densify(block, keys, background, num_classes)


def member_dask(stack: Any, name: str) -> Any:
    """One member array of a store as a Dask array on its chunks (the direct reader where it applies)."""
    import dask.array as da

    from isle_fast.stores.chunks import dask_chunks, fast_chunk_spec, read_chunk
    from isle_fast.stores.stack import ArrayMeta

    arr = stack.member(name)
    spec = fast_chunk_spec(arr, getattr(arr, "_names", None))
    if spec is None or 0 in arr.shape:
        return da.from_zarr(arr)
    from dask.base import tokenize

    meta = ArrayMeta.of(arr)
    return da.map_blocks(
        partial(read_chunk, spec=spec),
        chunks=dask_chunks(meta),
        dtype=meta.dtype,
        meta=np.empty((0,) * len(meta.shape), meta.dtype),
        name=f"isle-{name}-{tokenize(spec, meta.shape)}",
    )


def _dense_dask_stored(stack: Any, src: Any) -> Any:
    """:func:`dense_dask` of a store whose background slice is stored (member ``background``)."""
    import dask.array as da

    bg = member_dask(stack, BACKGROUND_MEMBER).rechunk(src.chunks[:3])
    k = int(stack.cams_meta.shape[3])
    keys = da.from_array(stack.sparse_keys, chunks=(src.chunks[0], (k,)))
    c = stack.num_classes
    return da.blockwise(
        partial(_dense_block_stored, num_classes=c),
        "ijkc",
        src,
        "ijkl",
        bg,
        "ijk",
        keys,
        "il",
        new_axes={"c": c},
        concatenate=True,
        dtype=np.uint8,
        meta=np.empty((0,) * 4, np.uint8),
    )


def _dense_block(
    block: np.ndarray,
    keys: np.ndarray,
    shapes: np.ndarray,
    background: int,
    num_classes: int,
    block_info: Any = None,
) -> np.ndarray:
    """Dask task of the dense view: one cams block -> its dense block."""
    loc = block_info[0]["array-location"]
    (i0, i1), (r0, r1), (c0, c1) = loc[0], loc[1], loc[2]
    rows = np.arange(r0, r1)[None, :, None] < shapes[i0:i1, 0][:, None, None]
    cols = np.arange(c0, c1)[None, None, :] < shapes[i0:i1, 1][:, None, None]
    return densify(block, keys[i0:i1], background, num_classes, rows & cols)


def dense_dask(stack: Any) -> Any:
    """The dense view as a Dask array on the ``cams`` chunks (with the class axis C)."""
    import dask.array as da

    cams = stack.member("cams")
    spec = _cams_spec(stack)
    if spec is not None:
        from dask.base import tokenize

        from isle_fast.stores.chunks import dask_chunks, read_chunk

        meta = stack.cams_meta
        src = da.map_blocks(
            partial(read_chunk, spec=spec),
            chunks=dask_chunks(meta),
            dtype=np.uint8,
            meta=np.empty((0,) * 4, np.uint8),
            name=f"isle-read-{tokenize(spec, meta.shape)}",
        )
    else:
        src = da.from_zarr(cams)
    if stack.attrs[BACKGROUND_ATTR] == BACKGROUND_STORED:
        return _dense_dask_stored(stack, src)
    c = stack.num_classes
    fn = partial(
        _dense_block,
        keys=stack.sparse_keys,
        shapes=stack.shapes,
        background=int(stack.attrs[BACKGROUND_ATTR]),
        num_classes=c,
    )
    return src.map_blocks(
        fn, chunks=src.chunks[:3] + ((c,),), dtype=np.uint8, meta=np.empty((0,) * 4, np.uint8)
    )


def _cams_spec(stack: Any) -> Any:
    """The direct reader's spec of the ``cams`` array, or None (Zarr's path)."""
    from isle_fast.stores.chunks import fast_chunk_spec

    arr = stack.member("cams")
    return fast_chunk_spec(arr, getattr(arr, "_names", None))


def cams_dask(stack: Any) -> Any:
    """The stored ``cams`` array as a Dask array (not densified; the sweep reads it with the keys)."""
    import dask.array as da

    spec = _cams_spec(stack)
    if spec is None:
        return da.from_zarr(stack.member("cams"))
    from dask.base import tokenize

    from isle_fast.stores.chunks import dask_chunks, read_chunk

    meta = stack.cams_meta
    return da.map_blocks(
        partial(read_chunk, spec=spec),
        chunks=dask_chunks(meta),
        dtype=np.uint8,
        meta=np.empty((0,) * 4, np.uint8),
        name=f"isle-cams-{tokenize(spec, meta.shape)}",
    )


# -- writing ------------------------------------------------------------------------------------


def sparse_chunks(n: int, h_pad: int, w_pad: int, kmax: int) -> tuple[int, int, int, int]:
    """The chunk shape of a class-sparse ``cams`` array ``(n, h_pad, w_pad, kmax)``.

    The images (and tiles) of a label store's default chunks, so a ground truth ingested with the
    defaults needs no rechunking, while one chunk stays within 4 x the usual bytes; else the usual
    chunk bytes with the K slots as the channel axis.
    """
    from isle_fast.stores.stack import TARGET_CHUNK_BYTES, default_chunks

    lab = default_chunks(n, h_pad, w_pad)
    if int(np.prod(lab)) * kmax <= 4 * TARGET_CHUNK_BYTES:
        return tuple(int(v) for v in lab) + (int(kmax),)  # type: ignore[return-value]
    return tuple(int(v) for v in default_chunks(n, h_pad, w_pad, kmax, 1))  # type: ignore[return-value]


class SparseWriter:
    """Writes one class-sparse score store, all-or-nothing: the writer of CAM ingest, refine and :func:`sparsify`.

    The slot classes of every image (``keys``) and the background level are given up front; the
    ``cams`` slots are then written in whole chunks of :attr:`chunk_images` images, here
    (:meth:`write_block`) or by worker tasks (:attr:`spec` is a picklable
    :class:`isle_fast.stores.chunkio.ChunkWriteSpec`: ``chunkio.write_block(spec, start, block)``;
    the chunk folders already exist). Used as a context manager it aborts (removes everything) on
    an exception; :meth:`commit` records the chunk manifest and moves the store into place.

    Parameters
    ----------
    out : path
        The store to write (local disk only).
    kind, classes, ids, shapes, name, padded_shape, overwrite :
        As :func:`isle_fast.stores.stack.create_stack`.
    keys : (I, K) uint8 array
        The class of every slot of every image, ascending in 1..C-1, unused slots (0) last
        (:func:`check_keys`); K >= 1.
    background : int
        The stored background score (0..255) of every pixel inside every image.
    provenance : dict, optional
        The store's provenance (``tool`` and ``version`` are added).
    image_labels : (I, C) bool array, optional
        Stored as :attr:`Stack.image_labels`.
    score_scale : float
        Stored units per score (255 for ``uint8`` scores).

    Examples
    --------
    >>> import tempfile, os, numpy as np
    >>> keys = np.array([[3, 0], [1, 2]], np.uint8)
    >>> out = os.path.join(tempfile.mkdtemp(), "s.zarr")
    >>> with SparseWriter(out, kind="pseudo", classes=["bg", "a", "b", "c"], ids=["x", "y"],
    ...                   shapes=[(2, 3), (2, 3)], keys=keys, background=38) as w:
    ...     w.write_block(0, np.full((2, 2, 3, 2), 7, np.uint8) * (keys[:, None, None, :] > 0))
    ...     st = w.commit()
    >>> st.score_layout, st.array[1, 0, 0].tolist()
    ('sparse', [38, 7, 7, 0])
    """

    def __init__(
        self,
        out: str | os.PathLike,
        *,
        kind: str,
        classes: Any,
        ids: Any,
        shapes: Any,
        keys: np.ndarray,
        background: int,
        name: str | None = None,
        padded_shape: tuple[int, int] | None = None,
        provenance: dict | None = None,
        overwrite: bool = False,
        image_labels: np.ndarray | None = None,
        score_scale: float = 255.0,
    ):
        from isle_fast.stores.chunkio import prepare_folders, write_spec
        from isle_fast.stores.stack import WRITE_EVERY_CHUNK, create_stack, default_compressors, is_remote

        if is_remote(out):
            raise InputError(f"{out}: class-sparse stores are written to local disk only")
        keys = np.asarray(keys)
        n = len(ids)
        if keys.ndim != 2 or keys.shape[0] != n or keys.shape[1] < 1:
            raise InputError(f"keys of shape {keys.shape} do not fit {n} images (expected ({n}, K), K >= 1)")
        if keys.size and (keys.dtype.kind not in "iu" or keys.min() < 0 or keys.max() > 255):
            raise InputError(f"{out}: keys must be class indices 0..255, not {keys.dtype} {keys.min()}..{keys.max()}")
        try:
            check_keys(str(out), keys.astype(np.uint8), len(classes))
        except StoreError as exc:
            raise InputError(str(exc).replace("; the store is damaged", "")) from None
        if not 0 <= int(background) <= 255:
            raise InputError(f"background level {background} is outside 0..255")
        keys = keys.astype(np.uint8)
        self.writer = create_stack(out, kind=kind, classes=classes, ids=ids, shapes=shapes, encoding="labels",
                                   name=name, padded_shape=padded_shape, provenance=provenance,
                                   overwrite=overwrite)
        try:
            g = self.writer.group
            del g["labels"]
            _, h_pad, w_pad = (int(v) for v in self.writer.array.shape)
            kmax = int(keys.shape[1])
            self.keys = keys
            self.shape = (n, h_pad, w_pad, kmax)
            chunks = sparse_chunks(n, h_pad, w_pad, kmax)
            self.cams = g.create_array("cams", shape=self.shape, chunks=chunks, dtype=np.uint8, fill_value=0,
                                       compressors=default_compressors("scores")).with_config(WRITE_EVERY_CHUNK)
            ka = g.create_array("keys", shape=(n, kmax), chunks=(max(n, 1), kmax), dtype=np.uint8,
                                fill_value=0, compressors=default_compressors()).with_config(WRITE_EVERY_CHUNK)
            if n:
                ka[:] = keys
            if image_labels is not None:
                from isle_fast.stores.image_labels import IMAGE_LABELS_MEMBER

                labels = np.asarray(image_labels, dtype=bool)
                la = g.create_array(IMAGE_LABELS_MEMBER, shape=labels.shape, chunks=labels.shape or (1, 1),
                                    dtype=bool, compressors=default_compressors()).with_config(WRITE_EVERY_CHUNK)
                la[:] = labels
            g.attrs.update({"encoding": "scores", "score_scale": score_scale, LAYOUT_ATTR: SPARSE,
                            BACKGROUND_ATTR: int(background)})
            self.spec = write_spec(self.cams)
            prepare_folders(self.spec)
        except BaseException:
            self.writer.abort()
            raise

    @property
    def chunk_images(self) -> int:
        """Images per chunk of ``cams``: every block written starts at a multiple of it."""
        return int(self.spec.chunk_shape[0])

    @property
    def group(self) -> Any:
        """The store's Zarr group (for extra members, e.g. :func:`attach_image_labels`)."""
        return self.writer.group

    def write_block(self, start: int, block: np.ndarray) -> None:
        """Write images ``start : start + len(block)``: ``(m, H, W, K)`` uint8 slots, padding 0, whole chunks."""
        from isle_fast.stores.chunkio import write_block

        write_block(self.spec, int(start), np.asarray(block, dtype=np.uint8))

    def set_provenance(self, **items: Any) -> None:
        """Merge ``items`` into the store's provenance."""
        self.writer.set_provenance(**items)

    def commit(self) -> Any:
        """Finish the store (chunk manifest, identity) and move it into place; returns it opened."""
        return self.writer.commit()

    def abort(self) -> None:
        """Remove what was written."""
        self.writer.abort()

    def __enter__(self) -> "SparseWriter":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.abort()


def constant_background(stack: Any) -> int | None:
    """A class-sparse store's one background level (0-255), or ``None`` where its background is
    stored per pixel (:data:`BACKGROUND_STORED`, refined stores) or the store is not class-sparse."""
    if getattr(stack, "score_layout", DENSE) != SPARSE:
        return None
    level = stack.attrs.get(BACKGROUND_ATTR)
    return None if level is None or level == BACKGROUND_STORED else int(level)


def sparsify(
    src: Any,
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    progress: bool = False,
    provenance: dict | None = None,
    name: str | None = None,
) -> Any:
    """Write the class-sparse store of a dense ``uint8`` score store whose background is one constant.

    Parameters
    ----------
    src : path or Stack
        A dense ``scores`` store, ``uint8``, whose background slice is the same value at every
        pixel inside every image (CAM ingest's threshold).
    out : path
        The new store (all-or-nothing, as :func:`isle_fast.stores.stack.create_stack`).
    overwrite : bool
    progress : bool
    provenance : dict, optional
        The new store's provenance (default: ``src``'s, with ``class_sparse_of``).
    name : str, optional
        The new store's set name (default: ``src``'s).

    Returns
    -------
    Stack
        The sparse store (with ``src``'s image-level labels, if any); its dense view equals ``src`` exactly.

    Raises
    ------
    InputError
        ``src`` is not a dense uint8 score store, or its background is not one constant (named image).
    """
    from isle_fast.progress import progress as bar
    from isle_fast.stores.stack import open_stack

    st = src if hasattr(src, "encoding") else open_stack(src)
    if st.encoding != "scores" or st.score_layout != DENSE or np.dtype(st.dtype) != np.uint8:
        raise InputError(f"{st.path}: only a dense uint8 score store can be made class-sparse")
    n, h_pad, w_pad, c = (int(v) for v in st.shape)
    k_img = max(1, int(st.chunks[0]))
    arr = st.array
    # pass 1: the classes of every image (any non-zero score inside it) and the background constant
    present = np.zeros((n, c), bool)
    background = None
    with bar(total=2 * n, desc="class-sparse", unit="img", quiet=not progress) as pb:
        for i0 in range(0, n, k_img):
            block = np.asarray(arr[i0 : i0 + k_img])
            for m in range(block.shape[0]):
                hh, ww = (int(v) for v in st.shapes[i0 + m])
                img = block[m, :hh, :ww]
                bg = img[..., 0]
                b0 = int(bg.flat[0])
                if background is None:
                    background = b0
                if b0 != background or not (bg == background).all():
                    raise InputError(
                        f"{st.path}: image {st.ids[i0 + m]!r} has a background slice that is not "
                        f"the constant {background}; it cannot be stored class-sparse"
                    )
                present[i0 + m, 1:] = img[..., 1:].reshape(-1, c - 1).any(axis=0)
            pb.update(block.shape[0])
        kmax = max(1, int(present[:, 1:].sum(axis=1).max(initial=0)))
        keys = np.zeros((n, kmax), np.uint8)
        for i in range(n):
            cls = np.flatnonzero(present[i])
            keys[i, : cls.size] = cls
        with SparseWriter(
            out,
            kind=st.kind,
            classes=st.classes,
            ids=st.ids,
            shapes=st.shapes,
            keys=keys,
            background=int(background or 0),
            name=name or st.name,
            padded_shape=st.padded_shape,
            provenance=provenance
            if provenance is not None
            else {**st.provenance, "class_sparse_of": st.path},
            overwrite=overwrite,
            image_labels=st.image_labels,
            score_scale=st.score_scale,
        ) as writer:
            kc = writer.chunk_images
            for i0 in range(0, n, kc):
                block = np.asarray(arr[i0 : i0 + kc])
                sl = np.zeros(block.shape[:3] + (kmax,), np.uint8)
                for m in range(block.shape[0]):
                    for j, cl in enumerate(keys[i0 + m]):
                        if cl:
                            sl[m, :, :, j] = block[m, :, :, cl]
                writer.write_block(i0, sl)
                pb.update(block.shape[0])
            return writer.commit()


LAYOUTS = ("auto", SPARSE, DENSE)


def ingest_layout(
    run_dense: Any, out: str | os.PathLike, *, layout: str, score_dtype: str, overwrite: bool, quiet: bool
) -> Any:
    """Write a score ingest as ``layout`` (see ``ingest_scores(score_layout=...)``).

    CAM ingest takes this path only where the direct one (:mod:`isle_fast.stores.cam_ingest`)
    found a background that is not one constant. ``run_dense(path, quiet)`` writes the dense
    store at ``path`` and returns it. For a
    class-sparse result it writes a dense temporary sibling of ``out`` first, converts it
    (:func:`sparsify`) and removes it; ``auto`` keeps the dense store (moved into place)
    where the sparse layout does not apply (float scores, an fsspec URL, a background slice
    that is not one constant).
    """
    from isle_fast.outputs import commit_dir, remove_path, temp_path
    from isle_fast.progress import summary
    from isle_fast.stores.stack import is_remote, open_stack

    if layout not in LAYOUTS:
        raise InputError(f"score_layout must be one of {', '.join(LAYOUTS)}, not {layout!r}")
    if layout == SPARSE and np.dtype(score_dtype) != np.uint8:
        raise InputError(f"a class-sparse score store holds uint8 scores, not {score_dtype}")
    if layout == SPARSE and is_remote(out):
        raise InputError(f"{out}: class-sparse stores are written to local disk only")
    if layout == DENSE or np.dtype(score_dtype) != np.uint8 or is_remote(out):
        return run_dense(str(out), quiet)
    dense_path = temp_path(out)
    try:
        dense = run_dense(str(dense_path), True)
        try:
            prov = {**dense.provenance, "score_layout": SPARSE}
            stack = sparsify(dense, out, overwrite=overwrite, progress=not quiet, provenance=prov)
        except InputError:
            if layout == SPARSE:
                raise
            commit_dir(dense_path, Path(str(out)), overwrite=overwrite)  # auto: the dense store as it is
            stack = open_stack(out)
    finally:
        remove_path(dense_path)
    if not quiet:
        size = stack.stored_bytes()
        rows = {
            "images": f"{stack.num_images:,}",
            "layout": stack.score_layout,
            "store": stack.path,
            "store size": f"{size / 2**20:,.2f} MiB",
        }
        if stack.score_layout == SPARSE:
            rows["classes stored"] = (
                f"up to {stack.sparse_keys.shape[1]} an image "
                f"(mean {(stack.sparse_keys > 0).sum(axis=1).mean():.2f}) of "
                f"{stack.num_classes}"
            )
        summary(
            "isle ingest: scores -> class-sparse store"
            if stack.score_layout == SPARSE
            else "isle ingest: scores store",
            rows,
            quiet=False,
        )
    return stack


#: members of an ensemble store whose merged score stack is class-sparse (the ensemble's labels are
#: its main array; ``scores_cams`` / ``scores_keys`` are the slots and keys of the ``scores`` stack,
#: the group attribute ``scores_background_level`` its background level inside every image)
ENSEMBLE_CAMS = "scores_cams"
ENSEMBLE_KEYS = "scores_keys"
ENSEMBLE_BACKGROUND_ATTR = "scores_background_level"


class _EnsembleSlots:
    """What :class:`SparseView` reads of a store, for the class-sparse ``scores`` of an ensemble."""

    def __init__(self, stack: Any):
        cams = stack.member(ENSEMBLE_CAMS)
        keys = np.asarray(stack.member(ENSEMBLE_KEYS)[...])
        n, h, w, k = (int(v) for v in cams.shape)
        c = int(stack.num_classes)
        if (tuple(keys.shape) != (n, k) or np.dtype(cams.dtype) != np.uint8 or int(cams.chunks[3]) != k
                or (n, h, w) != tuple(int(v) for v in stack.shape[:3])):
            raise StoreError(f"{stack.path}: arrays {ENSEMBLE_CAMS!r} {cams.dtype} {tuple(cams.shape)} and "
                             f"{ENSEMBLE_KEYS!r} {tuple(keys.shape)} are not the (images, H, W, K) slots and "
                             "(images, K) keys of the ensemble's scores")
        check_keys(stack.path, keys, c)
        level = stack.attrs.get(ENSEMBLE_BACKGROUND_ATTR)
        if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level <= 255:
            raise StoreError(f"{stack.path}: attribute {ENSEMBLE_BACKGROUND_ATTR!r} is {level!r}; "
                             "expected a level 0..255")
        self._cams = cams
        self.path = stack.path
        self.sparse_keys = keys
        self.attrs = {BACKGROUND_ATTR: level}
        self.shape = (n, h, w, c)
        self.chunks = tuple(int(v) for v in cams.chunks[:3]) + (c,)
        self.shapes = np.asarray(stack.shapes)

    def member(self, name: str) -> Any:
        if name != "cams":
            raise KeyError(name)
        return self._cams


def ensemble_view(stack: Any) -> SparseView | None:
    """The dense ``(I, H, W, C)`` view of an ensemble's class-sparse ``scores``, or None (none stored)."""
    if ENSEMBLE_CAMS not in getattr(stack, "array_names", ()):
        return None
    return SparseView(_EnsembleSlots(stack))

