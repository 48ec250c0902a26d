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

Chunk folders are made up front by :func:`prepare_folders` in the process that
owns the store: a task never creates folders, so a task still running after
its store was aborted (removed) fails instead of recreating part of it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["ChunkWriteSpec", "write_spec", "prepare_folders", "write_block", "write_chunk", "chunk_path"]


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
    with open(chunk_path(spec, tuple(int(i) for i in index)), "wb") as f:
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
        with open(chunk_path(spec, (i,) + rest), "wb") as f:
            f.write(data)
        written += len(data)
    return written
