"""Label stores written out as VOC palette PNGs, one task per chunk on worker processes.

:func:`write_pngs` is the work behind ``isle export`` (and the export step of
``isle run``): every task reads one stored chunk (the direct chunk reader of
:mod:`isle_fast.stores.stack` where the layout allows, else Zarr), decodes
score stacks to labels (argmax, first class wins ties: the kernels' decode)
and encodes the chunk's images as palette PNGs. The tasks run on worker
processes (:mod:`isle_fast.stores.parallel`), one per core.
The caller owns the output folder (a temporary sibling renamed into place:
:func:`isle_fast.ensemble.report.export_pngs`).

Compression
-----------
``compress`` is zlib's level ``0``-``9`` (PIL's default is 6) or ``rle``
(zlib's run-length strategy, ``Z_RLE``; the level does not matter to it).
Measured on the 1,449 VOC 2012 val label maps, one core, CPU time (the e2e
benchmark's ``png_compression`` repeats it): level 6 encoded 900 maps/s at
3.13 KiB a file, level 1 1,860/s at 5.37 KiB, ``rle`` 2,216/s at 3.65 KiB.
Label maps are long runs of one index, which is what ``Z_RLE`` codes; so
``rle`` is the default: 2.5x level 6's speed for files 17 % larger (and
faster and smaller than level 1). Those are PIL's encoder's figures; the
tasks encode with :func:`isle_fast.stores.png.encode_palette_png` (zlib with
the same settings, the same bytes, about 1.2x faster at every level; ``rle``
on zlib-ng, the same bytes again, about 4x faster than zlib). Every PNG reader
decodes every choice (it is plain deflate).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

__all__ = ["COMPRESS_CHOICES", "DEFAULT_COMPRESS", "png_options", "write_pngs", "LabelPngWriter"]

#: Values of ``--compress-level``: zlib levels, or zlib's run-length strategy.
COMPRESS_CHOICES = ("rle",) + tuple(str(i) for i in range(10))

#: The default, chosen by measurement (see the module docstring).
DEFAULT_COMPRESS = "rle"

_Z_RLE = 3  # zlib's Z_RLE strategy (PIL's ``compress_type``)


def png_options(compress: str | int = DEFAULT_COMPRESS) -> dict[str, int]:
    """The keyword arguments of ``PIL.Image.save(..., format="PNG")`` for a ``compress`` choice.

    Raises
    ------
    InputError
        For anything but ``rle`` or a level 0-9.
    """
    from isle_fast.errors import InputError, param

    text = str(compress).strip().lower()
    if text == "rle":
        return {"compress_level": 6, "compress_type": _Z_RLE}
    if text.isdigit() and 0 <= int(text) <= 9:
        return {"compress_level": int(text)}
    raise InputError(f"{param('compress')} must be 'rle' or a zlib level 0-9, not {compress!r}")


@dataclass(frozen=True)
class _ExportJob:
    """What every export task needs (sent once to each worker)."""

    folder: str                 # the output folder being written (the caller's temporary sibling)
    files: list[str]            # relative output file of every image
    shapes: np.ndarray          # (I, 2) true sizes
    chunk_images: int
    store: str                  # the store's path (Zarr fallback)
    array_name: str             # 'labels' or 'scores'
    spec: Any                   # the direct chunk reader's spec, or None
    spatial: tuple[int, ...]    # stored chunk shape after the image axis
    padded: tuple[int, ...]     # the array's shape after the image axis
    scores: bool
    palette: list[int]
    compress: str


_OPENED: dict[Any, Any] = {}


def _opened(store: str) -> Any:
    """The store opened once per process and store version (:func:`open_stack`, every check)."""
    try:
        key: Any = (store, os.stat(os.path.join(store, "zarr.json")).st_mtime_ns)
    except OSError:
        key = (store, None)
    st = _OPENED.get(key)
    if st is None:
        from isle_fast.stores.stack import open_stack

        _OPENED.clear()
        st = _OPENED[key] = open_stack(store)
    return st


def _read_images(job: _ExportJob, i0: int, i1: int) -> np.ndarray:
    """Images ``i0:i1`` (one image-axis chunk) as stored, padded."""
    if job.spec is None:   # Zarr's path, through the checked array (a missing chunk is a StoreError)
        return np.asarray(_opened(job.store).array[i0:i1])
    from isle_fast.stores.chunks import read_chunk

    ci = i0 // job.chunk_images
    m = i1 - i0
    grid = [range(-(-n // c)) for n, c in zip(job.padded, job.spatial)]
    if all(len(g) == 1 for g in grid):
        shape = (m,) + tuple(job.padded)
        return read_chunk(job.spec, block_id=(ci,) + (0,) * len(grid),
                           block_info={None: {"chunk-shape": shape}})
    import itertools

    out = np.empty((m,) + tuple(job.padded), dtype=np.dtype(job.spec.dtype))
    for rest in itertools.product(*grid):
        region = tuple(slice(r * c, min((r + 1) * c, n)) for r, c, n in zip(rest, job.spatial, job.padded))
        shape = (m,) + tuple(s.stop - s.start for s in region)
        out[(slice(None),) + region] = read_chunk(job.spec, block_id=(ci,) + rest,
                                                  block_info={None: {"chunk-shape": shape}})
    return out


def _write_labels(job: _ExportJob, block: np.ndarray, i0: int) -> int:
    """Encode the label maps ``block`` (images ``i0 ...``, padded) as PNGs; returns the bytes written.

    The encoder is :func:`isle_fast.stores.png.encode_palette_png` (zlib called
    directly, with the level and strategy PIL would pass; the same bytes PIL
    writes for these maps, about 1.2x faster).
    """
    from isle_fast.stores.png import encode_palette_png, zlib_options

    level, strategy = zlib_options(job.compress)
    palette = bytes(job.palette)
    written = 0
    for m in range(block.shape[0]):
        h, w = (int(v) for v in job.shapes[i0 + m])
        image = block[m, :h, :w]    # the encoder copies it into its rows: no contiguous copy first
        data = encode_palette_png(image if image.dtype == np.uint8 else image.astype(np.uint8), palette, level,
                                  strategy)
        rel = job.files[i0 + m]
        dest = os.path.join(job.folder, rel)
        if "/" in rel or os.sep in rel:
            os.makedirs(os.path.dirname(dest), exist_ok=True)
        _write_file(dest, data)
        written += len(data)
    return written


def _write_file(path: str, data: bytes) -> None:
    """``open(path, "wb").write(data)`` on the file descriptor: no buffered file object per PNG (about
    a third of the CPU time of writing 2,400 small files, measured on this machine)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def _export_chunk(job: _ExportJob, i0: int, i1: int) -> int:
    """One task: read images ``i0:i1``, decode scores (argmax), write one PNG per image."""
    block = _read_images(job, i0, i1)
    if job.scores:
        block = np.argmax(block, axis=-1).astype(np.uint8)
    return _write_labels(job, block, i0)


def _decode_and_export(job: _ExportJob, decode: Any, i0: int, i1: int) -> int:
    """:func:`_export_chunk` with a caller-given score decoder (runs in this process)."""
    block = np.asarray(decode(np.ascontiguousarray(_read_images(job, i0, i1))))
    return _write_labels(job, block, i0)


class LabelPngWriter:
    """PNGs of label blocks already in memory, as :func:`write_pngs`'s tasks write them (same encoder, bytes).

    For a fused pass: ``isle run`` encodes every ensemble chunk right after the
    merge made it, instead of reading the store back. Thread-safe (each call
    writes its own files).

    Parameters
    ----------
    folder : path
        An existing, empty folder (the caller makes it appear atomically).
    files : sequence of str
        Relative file name of every image (checked by the caller: no ``..``).
    shapes : (I, 2) array
        The true size of every image (the PNGs are cut to it).
    compress : {'rle', 0..9}
    """

    def __init__(self, folder: str | os.PathLike, files: Sequence[str], shapes: Any, *,
                 compress: str | int = DEFAULT_COMPRESS):
        import threading

        from isle_fast.synthetic.datasets import voc_palette

        png_options(compress)
        self.job = _ExportJob(folder=str(folder), files=[str(f) for f in files],
                              shapes=np.asarray(shapes, dtype=np.int64).reshape(-1, 2), chunk_images=1,
                              store="", array_name="labels", spec=None, spatial=(), padded=(), scores=False,
                              palette=np.asarray(voc_palette(), dtype=np.uint8).ravel().tolist(),
                              compress=str(compress))
        if len(self.job.files) != len(self.job.shapes):
            raise ValueError(f"{len(self.job.files)} file names for {len(self.job.shapes)} images")
        self.images = 0
        self.bytes = 0
        self._lock = threading.Lock()

    def write(self, start: int, block: np.ndarray) -> int:
        """Write images ``start ..`` from ``block`` (padded, whole images); returns the bytes written.

        Raises
        ------
        ValueError
            ``block`` is not uint8 labels or cuts an image (it must hold each image's whole size).
        """
        start = int(start)
        m = int(block.shape[0])
        if block.ndim != 3 or block.dtype != np.uint8:
            raise ValueError(f"a block of label maps is (images, rows, cols) uint8, "
                             f"not {block.dtype} {block.shape}")
        if start < 0 or start + m > len(self.job.files):
            raise ValueError(f"images {start}..{start + m - 1} are outside the {len(self.job.files)} images")
        need = self.job.shapes[start:start + m].max(axis=0) if m else np.zeros(2, np.int64)
        if block.shape[1] < need[0] or block.shape[2] < need[1]:
            raise ValueError(f"a {block.shape[1]} x {block.shape[2]} block cuts images of up to "
                             f"{need[0]} x {need[1]}")
        n = _write_labels(self.job, block, start)
        with self._lock:
            self.images += m
            self.bytes += n
        return n


def write_pngs(stack: Any, folder: str | os.PathLike, files: Sequence[str], *,
               compress: str | int = DEFAULT_COMPRESS, workers: int | None = None, progress: bool = True,
               decode: Any = None) -> dict[str, Any]:
    """Write every image of ``stack`` as a palette PNG ``folder/files[i]``, one task per stored chunk.

    Parameters
    ----------
    stack : Stack
        A ``labels`` or ``scores`` store.
    folder : path
        An existing, empty folder (the caller makes it appear atomically).
    files : sequence of str
        Relative file name of every image (checked by the caller: no ``..``).
    compress : {'rle', 0..9}
        See the module docstring.
    workers : int, optional
        Worker processes (default one per core); see :func:`isle_fast.stores.parallel.executor_for`.
    progress : bool
    decode : callable, optional
        ``decode(scores_block) -> labels`` for score stores, run in this
        process (a GPU kernel); default: NumPy's argmax in the workers.

    Returns
    -------
    dict
        ``images``, ``bytes`` (of the PNGs), ``compress``.
    """
    from functools import partial

    from isle_fast.progress import progress as bar
    from isle_fast.stores import parallel
    from isle_fast.stores.png import voc_palette
    from isle_fast.stores.stack import _local

    png_options(compress)   # a bad choice is an InputError before any work
    k = max(1, int(stack.chunks[0]))
    n = stack.num_images
    scores = stack.encoding == "scores"
    spec = stack.chunk_spec()   # the direct reader (presence, crc32c, manifest checked), or None
    job = _ExportJob(folder=str(folder), files=[str(f) for f in files], shapes=np.asarray(stack.shapes),
                     chunk_images=k, store=str(_local(stack.path)) if "://" not in stack.path else stack.path,
                     array_name=stack.encoding, spec=spec, spatial=tuple(int(c) for c in stack.chunks[1:]),
                     padded=tuple(int(s) for s in stack.shape[1:]), scores=scores and decode is None,
                     palette=voc_palette().ravel().tolist(), compress=str(compress))
    tasks = [(i0, min(n, i0 + k)) for i0 in range(0, n, k)]
    total = 0
    if decode is not None and scores:       # decoded here (e.g. on the GPU), encoded here
        ex_ctx: Any = contextlib.nullcontext(parallel.InlineExecutor())
        fn: Any = partial(_decode_and_export, job, decode)
    else:
        ex_ctx = parallel.executor_for(len(tasks), workers)
        fn = partial(_export_chunk, job)
    with ex_ctx as ex, bar(total=n, desc="export", unit="img", quiet=not progress) as pb:
        for i, nbytes in ex.imap(fn, tasks):
            total += nbytes
            pb.update(tasks[i][1] - tasks[i][0])
    return {"images": n, "bytes": total, "compress": str(compress)}
