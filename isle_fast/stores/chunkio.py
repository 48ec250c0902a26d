"""Whole chunks written straight to a local store, as Zarr would write them.

A chunk-aligned task (ingest: decode the images of one chunk) ends with one
full chunk in memory. Writing it through Zarr costs an asyncio round trip and
an extra copy per chunk, and Zarr is not needed in a worker process at all
when the codec chain is one we know. :func:`write_spec` reads the array's
metadata (the ``zarr.json`` document) once; :func:`write_block` then encodes
and writes every chunk of one block of images with plain file writes:

* the ``bytes`` codec (little endian),
* optionally ``zstd`` (``numcodecs.Zstd``, the codec Zarr itself calls, so the
  bytes are identical), and
* optionally ``crc32c`` last (the 4-byte little-endian CRC-32C of the bytes
  before it appended, as Zarr's ``Crc32cCodec`` does).

Any other layout (sharding, other codecs, an fsspec URL) gets a spec that
writes through Zarr instead (``zarr_path``), in whatever process runs the
task. Both give the same store, byte for byte where the codecs are ours
(``tests/test_chunkio.py``).

Chunk folders: the process that owns the store makes the array's ``c/`` folder
(:func:`prepare_root`, or every folder up front: :func:`prepare_folders`); a task
makes the folders *below* ``c/`` that its chunks go into (``c/i/j``, one level at a
time, never ``c/`` itself or anything above), when the chunk file cannot be opened
for want of them. So a task still running after its store was aborted (removed)
fails instead of recreating part of it, and the owner does not make a store's
hundreds of chunk folders one after another before the first task can start
(0.15 s of mkdir for the five stores of a 2,400-image ``isle run``).

Reading: :func:`read_into` decodes one chunk of a local plain store (a
:class:`~isle_fast.stores.chunks.ChunkSpec`) into a buffer the caller keeps
(:func:`thread_buffer`: one per thread and array, reused chunk after chunk), with
every check of :func:`~isle_fast.stores.chunks.decode_chunk` (present, its crc32c,
the manifest's, its size) and the same messages. Zstandard frames are decoded by
``ZSTD_decompressDCtx`` with one decompression context per thread (libzstd through
ctypes: no context made and freed per chunk, no Python layer), else by numcodecs.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["ChunkWriteSpec", "write_spec", "prepare_folders", "prepare_root", "write_block", "write_chunk",
           "chunk_path", "read_into", "read_kept", "thread_buffer"]


@dataclass(frozen=True)
class ChunkWriteSpec:
    """How to write the chunks of one array (small and picklable: sent to every worker)."""

    shape: tuple                # the array's shape
    chunk_shape: tuple
    dtype: str                  # NumPy dtype string, little endian for the bytes codec
    fill_value: Any
    folder: str | None = None   # the array's folder on local disk (direct writes)
    separator: str = "/"
    zstd: dict | None = None    # numcodecs Zstd configuration ({"level": 3, "checksum": False}) or None
    crc32c: bool = False
    zarr_path: str | None = None  # group path or URL (writes through Zarr) when the layout is not ours
    zarr_array: str | None = None

    @property
    def direct(self) -> bool:
        """Whether chunks are encoded and written here rather than through Zarr."""
        return self.folder is not None


def _codec_plan(meta: dict) -> tuple[dict | None, bool] | None:
    """``(zstd config or None, crc32c)`` for a codec chain we can write ourselves, else None."""
    codecs = list(meta.get("codecs") or [])
    if not codecs or codecs[0].get("name") != "bytes":
        return None
    dt = np.dtype(meta_dtype(meta))
    endian = (codecs[0].get("configuration") or {}).get("endian", "little")
    if dt.itemsize > 1 and endian != "little":
        return None
    rest = codecs[1:]
    crc = False
    if rest and rest[-1].get("name") == "crc32c":
        crc = True
        rest = rest[:-1]
    if not rest:
        return None, crc
    if len(rest) == 1 and rest[0].get("name") == "zstd":
        conf = dict(rest[0].get("configuration") or {})
        return {"level": int(conf.get("level", 0)), "checksum": bool(conf.get("checksum", False))}, crc
    return None


def meta_dtype(meta: dict) -> str:
    """The NumPy dtype string of a Zarr v3 array metadata document (numeric types only)."""
    dt = meta.get("data_type")
    if isinstance(dt, dict):
        dt = dt.get("name")
    return str(np.dtype(str(dt)).newbyteorder("<").str)


def write_spec(array: Any) -> ChunkWriteSpec:
    """The :class:`ChunkWriteSpec` of a Zarr v3 array (direct writes when local and plainly encoded)."""
    meta = array.metadata.to_dict()
    shape = tuple(int(s) for s in array.shape)
    chunks = tuple(int(c) for c in array.chunks)
    dtype = np.dtype(array.dtype).newbyteorder("<").str
    fill = np.asarray(meta.get("fill_value", 0), dtype=np.dtype(dtype)).item()
    folder = None
    plan = None
    try:
        from zarr.storage import LocalStore

        key_enc = meta.get("chunk_key_encoding") or {}
        sep = (key_enc.get("configuration") or {}).get("separator", "/")
        if (isinstance(array.store, LocalStore) and key_enc.get("name") == "default"
                and meta.get("chunk_grid", {}).get("name") == "regular"):
            plan = _codec_plan(meta)
            if plan is not None:
                root = str(array.store.root)
                folder = os.path.join(root, array.path) if array.path else root
    except Exception:  # an unexpected Zarr layout: write through Zarr
        plan = None
    if plan is None or folder is None:
        store = array.store
        root = str(getattr(store, "root", "")) or str(getattr(store, "path", ""))
        fs = getattr(store, "fs", None)
        if fs is not None and root:   # an fsspec store: its URL (s3://bucket/x.zarr), not the bare key
            root = fs.unstrip_protocol(root)
        return ChunkWriteSpec(shape=shape, chunk_shape=chunks, dtype=dtype, fill_value=fill,
                              zarr_path=root or None, zarr_array=array.path)
    zstd, crc = plan
    return ChunkWriteSpec(shape=shape, chunk_shape=chunks, dtype=dtype, fill_value=fill, folder=folder,
                          separator=sep, zstd=zstd, crc32c=crc)


def _grid(spec: ChunkWriteSpec) -> list[range]:
    return [range(-(-n // c)) if n else range(0) for n, c in zip(spec.shape, spec.chunk_shape)]


def chunk_path(spec: ChunkWriteSpec, index: tuple[int, ...]) -> str:
    """The file of chunk ``index`` (default chunk key encoding: ``c/i/j/k`` or ``c.i.j.k``)."""
    key = spec.separator.join(("c",) + tuple(str(int(i)) for i in index))
    return os.path.join(spec.folder or "", *key.split("/"))


def prepare_folders(spec: ChunkWriteSpec) -> None:
    """Make every folder a chunk of the array will be written into (direct writes only)."""
    if not spec.direct or spec.separator != "/":
        return
    grid = _grid(spec)
    if any(len(g) == 0 for g in grid):
        return
    import itertools

    for lead in itertools.product(*grid[:-1]):
        os.makedirs(os.path.dirname(chunk_path(spec, lead + (0,))), exist_ok=True)


def prepare_root(spec: ChunkWriteSpec) -> None:
    """Make the array's chunk folder ``c/`` (direct writes only): the tasks make the folders below it."""
    if not spec.direct or spec.separator != "/":
        return      # ``c.i.j`` chunks lie in the array's own folder
    os.makedirs(os.path.join(spec.folder or "", "c"), exist_ok=True)


def _open_chunk(spec: ChunkWriteSpec, index: tuple[int, ...]) -> Any:
    """The chunk file ``index`` opened for writing; the folders below ``c/`` made if missing (never ``c/``)."""
    path = chunk_path(spec, index)
    try:
        return open(path, "wb")
    except FileNotFoundError:
        if spec.separator != "/" or len(index) < 2:
            raise
    folder = os.path.join(spec.folder or "", "c")
    for i in index[:-1]:        # c/i, c/i/j, ...: one level at a time, so a removed store stays removed
        folder = os.path.join(folder, str(int(i)))
        try:
            os.mkdir(folder)
        except FileExistsError:
            pass
    return open(path, "wb")


def _encode(spec: ChunkWriteSpec, chunk: np.ndarray) -> bytes:
    data: bytes | memoryview = np.ascontiguousarray(chunk, dtype=np.dtype(spec.dtype)).data.cast("B")
    if spec.zstd is not None:
        from numcodecs import Zstd

        data = Zstd(level=spec.zstd["level"], checksum=spec.zstd["checksum"]).encode(data)
    data = bytes(data)
    if spec.crc32c:
        import google_crc32c

        data += int(google_crc32c.value(data)).to_bytes(4, "little")
    return data


def write_chunk(spec: ChunkWriteSpec, index: tuple[int, ...], data: np.ndarray) -> int:
    """Write one chunk (``data`` is the chunk's region, cut at the array's edge); returns bytes written.

    Direct writes only (see :attr:`ChunkWriteSpec.direct`): the region is
    padded with the fill value to the full chunk shape, as Zarr stores edge
    chunks.
    """
    if not spec.direct:
        raise ValueError("write_chunk writes direct chunks only; use write_block for a Zarr-written array")
    if data.shape != tuple(spec.chunk_shape):
        full = np.full(spec.chunk_shape, spec.fill_value, dtype=np.dtype(spec.dtype))
        full[tuple(slice(0, s) for s in data.shape)] = data
        data = full
    raw = _encode(spec, data)
    with _open_chunk(spec, tuple(int(i) for i in index)) as f:
        f.write(raw)
    return len(raw)


def write_block(spec: ChunkWriteSpec, start: int, block: np.ndarray) -> int:
    """Write images ``start : start + len(block)`` (already padded) as whole chunks; returns bytes written.

    ``start`` must be a multiple of the chunk's image count and ``block`` must
    hold that many images (fewer only at the end of the array: the rest of the
    last chunk is filled with the fill value, as Zarr stores edge chunks).
    """
    k = spec.chunk_shape[0]
    if start % k:
        raise ValueError(f"block start {start} is not a multiple of the chunk's {k} images")
    m = block.shape[0]
    if m > k or (m < k and start + m < spec.shape[0]):
        raise ValueError(f"a block of {m} images at {start} is not one whole chunk of {k}")
    if tuple(block.shape[1:]) != tuple(spec.shape[1:]):
        raise ValueError(f"block of shape {block.shape} does not fit the array {spec.shape}")
    if not spec.direct:
        import zarr

        arr = zarr.open_array(spec.zarr_path, path=spec.zarr_array or "", mode="r+")
        arr[start:start + m] = block
        return 0
    i = start // k
    grid = _grid(spec)[1:]
    full = None   # a chunk-sized buffer, only for edge chunks (made once)
    written = 0
    import itertools

    for rest in itertools.product(*grid):
        region = tuple(slice(r * c, min((r + 1) * c, n)) for r, c, n in zip(rest, spec.chunk_shape[1:],
                                                                          spec.shape[1:]))
        part = block[(slice(None),) + region]
        if part.shape == tuple(spec.chunk_shape):
            chunk = part
        else:
            if full is None:
                full = np.empty(spec.chunk_shape, dtype=np.dtype(spec.dtype))
            full.fill(spec.fill_value)
            full[tuple(slice(0, s) for s in part.shape)] = part
            chunk = full
        data = _encode(spec, chunk)
        with _open_chunk(spec, (i,) + tuple(rest)) as f:
            f.write(data)
        written += len(data)
    return written


# -- reading chunks into buffers that are kept ----------------------------------------------

_LOCAL: Any = None          # threading.local: this thread's buffers and zstd context
_ZSTD: Any = None           # libzstd through ctypes, False when it cannot be had


def _tls() -> Any:
    global _LOCAL
    if _LOCAL is None:
        import threading

        _LOCAL = threading.local()
    return _LOCAL


def _libzstd() -> Any:
    """libzstd (ctypes) with the three functions :func:`_unzstd` calls, or False."""
    global _ZSTD
    if _ZSTD is None:
        try:
            import ctypes

            lib = ctypes.CDLL("libzstd.so.1")
            lib.ZSTD_createDCtx.restype = ctypes.c_void_p
            lib.ZSTD_createDCtx.argtypes = []
            lib.ZSTD_decompressDCtx.restype = ctypes.c_size_t
            lib.ZSTD_decompressDCtx.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t,
                                                ctypes.c_void_p, ctypes.c_size_t]
            lib.ZSTD_isError.restype = ctypes.c_uint
            lib.ZSTD_isError.argtypes = [ctypes.c_size_t]
            lib.ZSTD_getErrorName.restype = ctypes.c_char_p
            lib.ZSTD_getErrorName.argtypes = [ctypes.c_size_t]
            _ZSTD = lib
        except (OSError, AttributeError):
            _ZSTD = False
    return _ZSTD


def _unzstd(body: np.ndarray, out: np.ndarray) -> None:
    """Decode one Zstandard frame into all of ``out`` (C-contiguous); ValueError unless it fills it exactly."""
    from isle_fast.stores.chunks import zstd_content_size

    lib = _libzstd()
    if lib is False or zstd_content_size(body) != out.nbytes:
        from numcodecs import Zstd

        if zstd_content_size(body) == out.nbytes:
            Zstd().decode(body, out=out)
            return
        data = np.frombuffer(Zstd().decode(body), dtype=np.uint8)   # size not in the header: decode, compare
        if data.size != out.nbytes:
            raise ValueError(f"{data.size} bytes decoded, not {out.nbytes}")
        out.reshape(-1).view(np.uint8)[:] = data
        return
    tls = _tls()
    ctx = getattr(tls, "zstd", None)
    if ctx is None:
        ctx = tls.zstd = lib.ZSTD_createDCtx()
        if not ctx:
            raise MemoryError("ZSTD_createDCtx failed")
    n = lib.ZSTD_decompressDCtx(ctx, out.ctypes.data, out.nbytes, body.ctypes.data, body.nbytes)
    if lib.ZSTD_isError(n):
        raise ValueError(f"Zstandard: {lib.ZSTD_getErrorName(n).decode(errors='replace')}")
    if n != out.nbytes:
        raise ValueError(f"{n} bytes decoded, not {out.nbytes}")


class _Buffers(dict):
    """One thread's kept buffers (a dict that a weak set can hold, by identity: gone with its thread)."""

    __slots__ = ("__weakref__",)
    __hash__ = object.__hash__  # type: ignore[assignment]
    __eq__ = object.__eq__


_EVERY_THREADS_BUFFERS: "weakref.WeakSet[_Buffers]" = weakref.WeakSet()


def release_thread_buffers() -> int:
    """Drop the kept buffers of every thread of this process; returns the bytes they held.

    A cluster worker paused at its memory limit runs nothing, and the buffers its threads keep
    for the next chunk are memory it cannot spill: they alone can hold it paused for good
    (:class:`isle_fast.stores.parallel.ClusterStalled`). A task that still uses one keeps its own
    reference; the next :func:`thread_buffer` call makes a new one.
    """
    freed = 0
    for bufs in list(_EVERY_THREADS_BUFFERS):
        for key in list(bufs):
            buf = bufs.pop(key, None)
            freed += 0 if buf is None else int(buf.nbytes)
    return freed


def thread_buffer(key: Any, shape: tuple, dtype: Any) -> np.ndarray:
    """This thread's buffer ``key`` of ``shape`` and ``dtype`` (made on first use, then the same array).

    The caller must be done with it before it asks for the same key again on this thread.
    """
    tls = _tls()
    bufs = getattr(tls, "buffers", None)
    if bufs is None:
        bufs = tls.buffers = _Buffers()
        _EVERY_THREADS_BUFFERS.add(bufs)
    dt = np.dtype(dtype)
    buf = bufs.get(key)
    if buf is None or buf.shape != tuple(shape) or buf.dtype != dt:
        buf = bufs[key] = np.empty(shape, dtype=dt)
    return buf


def read_into(spec: Any, coords: tuple, out: np.ndarray) -> np.ndarray:
    """One stored chunk of a local plain array (``spec``: a ChunkSpec), checked, decoded into ``out``.

    ``out`` must be C-contiguous of the chunk's full shape and dtype. Returns ``out``.

    Raises
    ------
    StoreError
        The chunk is missing, fails its checksum or the manifest's, or does not
        decode to a chunk of this shape and type: the messages of
        :func:`isle_fast.stores.chunks.decode_chunk` (store, array, chunk, images).
    """
    from isle_fast.stores.chunks import verify_crc, verify_tail

    if out.shape != tuple(spec.chunk_shape) or out.dtype != np.dtype(spec.dtype) or not out.flags.c_contiguous:
        raise ValueError(f"read_into needs a C-contiguous {spec.chunk_shape} {spec.dtype} buffer, "
                         f"not {out.dtype} {out.shape}")
    names = spec.names
    path = os.path.join(spec.folder, *names.key(coords).split("/"))
    try:
        with open(path, "rb", buffering=0) as f:
            raw = f.read()
    except FileNotFoundError:
        raise names.missing(coords) from None
    verify_tail(names, coords, raw)
    body = verify_crc(names, coords, raw) if spec.checksum else np.frombuffer(raw, dtype=np.uint8)
    try:
        if spec.compressed:
            _unzstd(body, out)
        else:
            if body.size != out.nbytes:
                raise ValueError(f"{body.size} bytes, not {out.nbytes}")
            out.reshape(-1).view(np.uint8)[:] = body
    except Exception as e:
        raise names.damaged(coords, f"it is not a {spec.chunk_shape} {spec.dtype} chunk "
                                    f"({type(e).__name__}: {e})") from None
    return out


def read_kept(spec: Any, coords: tuple, shape: tuple, key: Any) -> np.ndarray:
    """:func:`isle_fast.stores.chunks.read_chunk`'s block, decoded into this thread's kept buffer ``key``.

    The chunk ``coords`` of a local plain array (``spec``: a ChunkSpec) is read with :func:`read_into`
    into :func:`thread_buffer` ``key`` (every check and message of ``read_chunk``) and cut to ``shape``
    (the chunk's region inside the array): the buffer itself, or its first images (a cut along the
    first axis of a C-contiguous buffer stays contiguous: nothing is copied); a cut along a later
    axis (an edge tile) is made C-contiguous as ``read_chunk`` makes it (copied where it is not).
    No chunk-sized array is allocated per read: a fresh one page-faults in every page it is decoded
    into (a third of the CPU time of reading the four 8 MB chunks of a merge task). The block is this
    thread's until its next read into ``key``: the caller must be done with it by then.
    """
    buf = read_into(spec, tuple(coords), thread_buffer(key, tuple(spec.chunk_shape), spec.dtype))
    shape = tuple(int(s) for s in shape)
    if shape == buf.shape:
        return buf
    if shape[1:] == buf.shape[1:]:
        return buf[:shape[0]]
    return np.ascontiguousarray(buf[tuple(slice(0, s) for s in shape)])
