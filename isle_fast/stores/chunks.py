"""What a store knows about its chunks: every one present, checksummed, and in its place.

A store isle-fast writes holds every chunk of every array: its writers run with Zarr's
``write_empty_chunks`` on (Zarr v3 otherwise skips a chunk that is all fill value and reads
it back as fill, so a deleted chunk file of a set would read as "ignore" everywhere and
the set would score 0 without a word). So a chunk that is not there is damage, never
data, and every read path says so: a :class:`~isle_fast.errors.StoreError` naming the
store, the array, the chunk and the images it holds.

Three checks, each catching what the others cannot:

* **checksums**: new stores end every codec chain with Zarr v3's ``crc32c`` codec (4
  bytes per chunk, :func:`checksum_codec`): flipped bytes and truncated chunks fail it;
* **the chunk manifest**: at commit (:func:`record_manifests`), the crc32c of every
  chunk, in the C order of the chunk grid, goes into the array's attributes
  (:data:`MANIFEST_ATTR`). A chunk file copied or swapped into another chunk's place
  carries a valid checksum, of the wrong chunk; only the manifest tells. Writing it
  reads 4 bytes per chunk;
* **presence**: :class:`CheckedStore` wraps the Zarr store of an opened stack, so that a
  missing chunk, or one whose checksum is not the manifest's, raises instead of reading
  as fill; :class:`CheckedArray` is the ``zarr.Array`` every ``Stack`` hands out, whose
  reads turn a chunk that fails to decode (or fails its checksum) into an error naming
  it. The direct chunk reader behind ``Stack.to_dask`` (:func:`read_chunk`) does all
  three checks itself, on the bytes it has read anyway.

Stores written before checksums existed (no ``crc32c`` codec, no manifest) open and read
as before, and a missing chunk is an error for them too; their damaged chunks are found
only where the codec fails to decode them. :func:`check_stack` (``isle info --check``)
reads and verifies every chunk of every array of a store.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from isle_fast.errors import IsleError, StoreError

__all__ = [
    "MANIFEST_ATTR",
    "ChunkNames",
    "CheckedStore",  # noqa: F822 (made on first use: module __getattr__)
    "CheckedArray",  # noqa: F822
    "StoreCheck",
    "checksum_codec",
    "record_manifests",
    "check_stack",
]

#: Array attribute holding the crc32c of every chunk (C order of the chunk grid), written at commit.
MANIFEST_ATTR = "isle_chunk_crc32c"

#: Files of an array folder that are metadata, not chunks (Zarr v3 and v2 names).
_METADATA_FILES = frozenset({"zarr.json", ".zarray", ".zattrs", ".zgroup", ".zmetadata"})


def checksum_codec():
    """Zarr v3's ``crc32c`` codec: the last link of every codec chain of a new store."""
    from zarr.codecs import Crc32cCodec

    return Crc32cCodec()


def _has_checksum(codecs: Sequence[Any]) -> bool:
    from zarr.codecs import Crc32cCodec

    return bool(codecs) and isinstance(codecs[-1], Crc32cCodec)


# -- naming and checking one chunk ------------------------------------------------------------

@dataclass(frozen=True)
class ChunkNames:
    """What it takes to find, check and name the chunks of one array (small and picklable).

    ``row_ids`` holds the first and last image id of every chunk row (the chunks along
    the image axis), so that a message can say which images a bad chunk holds.
    """

    store: str
    array: str
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    key_encoding: Any                       # the array's Zarr chunk key encoding
    crc: tuple[int, ...] | None = None      # the manifest, when the store has one
    row_ids: tuple[tuple[str, str], ...] | None = None

    @property
    def grid(self) -> tuple[int, ...]:
        """Chunks along every axis."""
        return tuple(-(-s // c) if s else 0 for s, c in zip(self.shape, self.chunks))

    @property
    def num_chunks(self) -> int:
        return int(np.prod(self.grid, dtype=np.int64))

    def key(self, coords: Sequence[int]) -> str:
        """The chunk's key inside the array folder, e.g. ``c/1/0/0``."""
        return self.key_encoding.encode_chunk_key(tuple(int(c) for c in coords))

    def coords(self, key: str) -> tuple[int, ...] | None:
        """Grid coordinates of the chunk stored under ``key``, or None if ``key`` names no chunk."""
        sep = str(getattr(self.key_encoding, "separator", "/"))
        if getattr(self.key_encoding, "name", "default") == "default":  # "c/1/0/0" (zarr's own decoder
            if key == "c":                                              # mis-splits the "/" form)
                return () if not self.grid else None
            if not key.startswith("c" + sep):
                return None
            key = key[2:]
        try:
            coords = tuple(int(c) for c in key.split(sep))
        except ValueError:
            return None
        grid = self.grid
        if len(coords) != len(grid) or any(not 0 <= c < g for c, g in zip(coords, grid)):
            return None
        return coords

    def expected_crc(self, coords: Sequence[int]) -> int | None:
        if self.crc is None:
            return None
        return self.crc[int(np.ravel_multi_index(tuple(coords), self.grid))]

    def where(self, coords: Sequence[int]) -> str:
        """``STORE: array 'labels', chunk c/1/0/0 (images 'a' to 'b')``."""
        text = f"{self.store}: array {self.array!r}, chunk {self.key(coords)}"
        if self.row_ids is not None and coords and int(coords[0]) < len(self.row_ids):
            first, last = self.row_ids[int(coords[0])]
            text += f" (image {first!r})" if first == last else f" (images {first!r} to {last!r})"
        return text

    def missing(self, coords: Sequence[int]) -> StoreError:
        return StoreError(f"{self.where(coords)} is missing: a store isle-fast wrote holds every chunk, "
                          "so it was deleted or the store was copied incompletely")

    def damaged(self, coords: Sequence[int], why: str) -> StoreError:
        return StoreError(f"{self.where(coords)} is damaged: {why}")


def row_ids(ids: Sequence[str], rows: int) -> tuple[tuple[str, str], ...]:
    """First and last id of every run of ``rows`` images (the chunk rows of an array)."""
    rows = max(1, int(rows))
    n = len(ids)
    return tuple((str(ids[i]), str(ids[min(i + rows, n) - 1])) for i in range(0, n, rows))


def verify_tail(names: ChunkNames, coords: Sequence[int], raw: Any) -> None:
    """Raise unless the chunk's last 4 bytes (its crc32c) are those the manifest recorded."""
    expected = names.expected_crc(coords)
    if expected is None:
        return
    tail = bytes(memoryview(raw)[-4:]) if len(raw) >= 4 else b""
    if tail != int(expected).to_bytes(4, "little"):
        got = f"{int.from_bytes(tail, 'little'):08x}" if tail else "none (fewer than 4 bytes)"
        raise names.damaged(coords, f"its checksum {got} is not the {int(expected):08x} recorded when the "
                                    "store was written (the file was replaced, swapped with another chunk "
                                    "or cut short)")


def verify_crc(names: ChunkNames, coords: Sequence[int], raw: bytes) -> np.ndarray:
    """Check a chunk's crc32c trailer; returns the bytes before it (a read-only view)."""
    import google_crc32c

    view = np.frombuffer(raw, dtype=np.uint8)
    if len(view) < 4:
        raise names.damaged(coords, f"{len(view)} bytes, too short to hold its crc32c checksum")
    body = view[:-4]
    if google_crc32c.value(body).to_bytes(4, "little") != view[-4:].tobytes():
        raise names.damaged(coords, "its crc32c checksum does not match its bytes")
    return body


def _reason(exc: BaseException) -> str:
    text = str(exc)
    if "checksum" in text.lower():
        return "its crc32c checksum does not match its bytes"
    return f"it cannot be decoded ({type(exc).__name__}: {text})"


def _passes(exc: BaseException) -> bool:
    """Errors that are not a damaged chunk: the user's own (already named), the environment's, memory."""
    return isinstance(exc, (IsleError, OSError, MemoryError))


# -- the Zarr read path -----------------------------------------------------------------------
# Zarr is imported only when a store is opened through it: the classes below are made on first
# use (module ``__getattr__``), so that opening a store with the direct reader needs no Zarr.

_CLASSES: dict[str, Any] = {}


def _zarr_classes() -> dict[str, Any]:
    """``CheckedStore`` and ``CheckedArray``, made (and Zarr imported) on first use."""
    if _CLASSES:
        return _CLASSES
    import zarr
    from zarr.storage import WrapperStore

    class CheckedStore(WrapperStore):
        """A read-only Zarr store wrapper on which a missing chunk is an error, not the fill value.

        ``arrays`` maps the group's array names to their :class:`ChunkNames`; keys of those
        arrays that are not metadata files are chunks. A chunk whose last 4 bytes are not the
        manifest's checksum is an error too (checked on the bytes Zarr reads anyway). Keys of
        arrays not (yet) registered pass through untouched.
        """

        def __init__(self, store: Any, arrays: dict[str, ChunkNames] | None = None):
            super().__init__(store)
            self.arrays: dict[str, ChunkNames] = {} if arrays is None else arrays

        def _with_store(self, store: Any) -> "CheckedStore":
            return type(self)(store, self.arrays)

        def _chunk(self, key: str) -> tuple[ChunkNames | None, tuple[int, ...] | None]:
            name, _, rest = key.partition("/")
            names = self.arrays.get(name)
            if names is None or not rest or rest.rsplit("/", 1)[-1] in _METADATA_FILES:
                return None, None
            coords = names.coords(rest)
            return (names, coords) if coords is not None else (None, None)

        async def get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
            buf = await self._store.get(key, prototype, byte_range)
            names, coords = self._chunk(key)
            if names is None or coords is None:
                return buf
            if buf is None:
                raise names.missing(coords)
            if byte_range is None:
                verify_tail(names, coords, buf.as_numpy_array())
            return buf

        async def get_partial_values(self, prototype: Any, key_ranges: Any) -> list:
            key_ranges = list(key_ranges)
            out = await self._store.get_partial_values(prototype, key_ranges)
            for (key, _), buf in zip(key_ranges, out):
                names, coords = self._chunk(key)
                if names is not None and coords is not None and buf is None:
                    raise names.missing(coords)
            return out

        def __repr__(self) -> str:
            return f"CheckedStore({self._store!r})"


    def _array_class():
        import zarr

        return zarr.Array


    def _checked_read(method: str, kind: str) -> Callable:
        """A zarr.Array read method whose failures to decode a chunk raise a StoreError naming it."""
        base = getattr(_array_class(), method)

        def read(self: "CheckedArray", *args: Any, **kwargs: Any) -> Any:
            try:
                return base(self, *args, **kwargs)
            except Exception as exc:
                if _passes(exc):
                    raise
                selection = args[0] if args else kwargs.get("selection", kwargs.get("mask", Ellipsis))
                raise self._locate(kind, selection, exc) from None

        read.__name__ = method
        read.__doc__ = base.__doc__
        return read


    class CheckedArray(zarr.Array):
        """The ``zarr.Array`` a :class:`~isle_fast.stores.stack.Stack` hands out.

        The same array (a subclass, so ``dask.array.from_zarr`` and everything else take
        it), except that a chunk that fails to decode, or fails its checksum, ends in a
        :class:`StoreError` naming the store, the array, the chunk and its images instead of
        a codec's exception. Missing chunks are caught below it, by :class:`CheckedStore`.
        """

        def __init__(self, array: Any, names: ChunkNames | None = None):
            super().__init__(getattr(array, "_async_array", array))
            self._names = names

        def with_config(self, config: Any) -> "CheckedArray":
            return CheckedArray(super().with_config(config), self._names)

        get_basic_selection = _checked_read("get_basic_selection", "basic")
        get_orthogonal_selection = _checked_read("get_orthogonal_selection", "orthogonal")
        get_mask_selection = _checked_read("get_mask_selection", "any")
        get_coordinate_selection = _checked_read("get_coordinate_selection", "any")
        get_block_selection = _checked_read("get_block_selection", "block")

        def _locate(self, kind: str, selection: Any, exc: BaseException) -> BaseException:
            """The error naming the first chunk of ``selection`` that fails to read (after a failed read)."""
            names = self._names
            if names is None:
                return StoreError(f"array {self.path!r} of {self.store}: a chunk is damaged: {_reason(exc)}")
            for coords in self._touched(kind, selection, names.grid):
                try:
                    _array_class().get_block_selection(self, coords)
                except Exception as again:
                    if isinstance(again, IsleError):
                        return again
                    if _passes(again):
                        return again
                    return names.damaged(coords, _reason(again))
            return StoreError(f"{names.store}: array {names.array!r}: reading failed: {_reason(exc)}")

        def _touched(self, kind: str, selection: Any,
                     grid_shape: tuple[int, ...]) -> Iterator[tuple[int, ...]]:
            """Chunk coordinates a selection reads (every chunk when that is not easily known)."""
            try:
                from zarr.core.indexing import BasicIndexer, BlockIndexer, OrthogonalIndexer

                grid = self.metadata.chunk_grid
                indexers: dict[str, Any] = {"basic": BasicIndexer, "block": BlockIndexer,
                                            "orthogonal": OrthogonalIndexer}
                indexer = indexers[kind](selection, self.shape, grid)
                coords = [tuple(int(c) for c in p.chunk_coords) for p in indexer]
            except Exception:
                coords = [tuple(int(c) for c in idx) for idx in np.ndindex(*grid_shape)]
            return iter(coords)

    for cls in (CheckedStore, CheckedArray):  # picklable by name, found through __getattr__
        cls.__qualname__ = cls.__name__
    _CLASSES.update(CheckedStore=CheckedStore, CheckedArray=CheckedArray)
    return _CLASSES


def __getattr__(name: str) -> Any:
    if name in ("CheckedStore", "CheckedArray"):
        return _zarr_classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# -- writing: every chunk there, its checksum recorded ----------------------------------------

def record_manifests(group: Any) -> None:
    """At commit: check that every array holds every chunk and record each chunk's crc32c.

    Arrays whose codec chain does not end in ``crc32c`` (a caller's own compressors)
    get no manifest, but must still hold every chunk. Reads 4 bytes per chunk.

    Raises
    ------
    RuntimeError
        A chunk was never written: a bug of the writer, which must not commit.
    """
    from zarr.abc.store import SuffixByteRequest
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    store = group.store
    root = _local_root(store)
    for name, arr in group.arrays():
        grid = tuple(-(-s // c) if s else 0 for s, c in zip(arr.shape, arr.chunks))
        enc = arr.metadata.chunk_key_encoding
        coords = list(np.ndindex(*grid))
        keys = [f"{arr.path}/{enc.encode_chunk_key(c)}" for c in coords]
        if root is not None:      # a local folder: 4 bytes read per chunk file, no asyncio round trip
            tails: list[Any] = [_file_tail(os.path.join(root, *k.split("/"))) for k in keys]
        else:
            tails = sync(store.get_partial_values(default_buffer_prototype(),
                                                  [(k, SuffixByteRequest(4)) for k in keys])) if keys else []
            tails = [None if t is None else bytes(t.as_numpy_array()) for t in tails]
        for k, t in zip(keys, tails):
            if t is None:
                raise RuntimeError(f"{k} was never written; the store is not complete")
        if _has_checksum(list(arr.metadata.codecs)):
            crc = [int.from_bytes(t, "little") for t in tails]
            arr.attrs.update({MANIFEST_ATTR: crc})


def _local_root(store: Any) -> str | None:
    """The folder of a Zarr ``LocalStore`` (chunk keys are relative paths in it), else None."""
    try:
        from zarr.storage import LocalStore
    except ImportError:  # pragma: no cover - zarr always has it
        return None
    return str(store.root) if isinstance(store, LocalStore) else None


def _file_tail(path: str) -> bytes | None:
    """The last 4 bytes of a chunk file (all of it when shorter), or None when there is no such file."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - 4))
            return f.read()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None


def read_manifest(store: str, name: str, arr: Any, grid: tuple[int, ...]) -> tuple[int, ...] | None:
    """The manifest of an opened array, checked (a damaged one is a StoreError naming the array)."""
    value = arr.attrs.get(MANIFEST_ATTR)
    if value is None:
        return None
    n = int(np.prod(grid, dtype=np.int64))
    if (not isinstance(value, list) or len(value) != n
            or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**32 for v in value)):
        raise StoreError(f"{store}: array {name!r}: attribute {MANIFEST_ATTR!r} is damaged "
                         f"(expected {n} checksums, one per chunk)")
    return tuple(value)


# -- the direct chunk reader ------------------------------------------------------------------

@dataclass(frozen=True)
class ChunkSpec:
    """What :func:`read_chunk` needs to decode one stored chunk of a local array (small and picklable)."""

    folder: str                 # the array's folder on local disk
    chunk_shape: tuple
    dtype: str
    compressed: bool            # Zstandard (else raw bytes)
    checksum: bool              # a crc32c trailer follows
    names: ChunkNames


def fast_chunk_spec(array: Any, names: ChunkNames | None) -> ChunkSpec | None:
    """A :class:`ChunkSpec` when ``array`` is a local, unsharded array of plain (Zstd) chunks."""
    try:
        from zarr.codecs import BytesCodec, Crc32cCodec, ZstdCodec
        from zarr.storage import LocalStore

        meta = array.metadata
        store: Any = array.store
        while isinstance(store, _zarr_classes()["CheckedStore"]):
            store = store._store
        if names is None or not isinstance(store, LocalStore) or getattr(meta, "zarr_format", 3) != 3:
            return None
        codecs = list(meta.codecs)
        if not codecs or not isinstance(codecs[0], BytesCodec):
            return None
        dt = np.dtype(array.dtype)
        if dt.kind not in "biuf":
            return None
        if dt.itemsize > 1 and not (str(getattr(codecs[0].endian, "value", codecs[0].endian)) == "little"
                                    and np.little_endian):
            return None
        checksum = isinstance(codecs[-1], Crc32cCodec)
        rest = codecs[1:-1] if checksum else codecs[1:]
        if not rest:
            compressed = False
        elif len(rest) == 1 and isinstance(rest[0], ZstdCodec) and not rest[0].checksum:
            compressed = True
        else:
            return None
        folder = os.path.join(str(store.root), array.path) if array.path else str(store.root)
        return ChunkSpec(folder=folder, chunk_shape=tuple(int(c) for c in array.chunks), dtype=dt.str,
                         compressed=compressed, checksum=checksum, names=names)
    except Exception:  # an unexpected Zarr layout: the general path
        return None


@dataclass(frozen=True)
class DefaultKeys:
    """Zarr v3's ``default`` chunk key encoding (``c/1/0/0``), for stores opened without Zarr."""

    separator: str = "/"
    name: str = "default"

    def encode_chunk_key(self, coords: Sequence[int]) -> str:
        return self.separator.join(("c",) + tuple(str(int(c)) for c in coords))


def doc_codecs(doc: dict) -> tuple[bool, bool] | None:
    """``(compressed, checksum)`` of a ``zarr.json`` document the direct reader can read, else None.

    The layouts :func:`fast_chunk_spec` accepts: ``bytes`` (little endian), at most one
    ``zstd`` without its own checksum, then optionally ``crc32c``.
    """
    try:
        if doc.get("zarr_format") != 3 or doc.get("storage_transformers"):
            return None
        key = doc.get("chunk_key_encoding") or {}
        if key.get("name") != "default" or (doc.get("chunk_grid") or {}).get("name") != "regular":
            return None
        codecs = [dict(c) for c in (doc.get("codecs") or [])]
        if not codecs or codecs[0].get("name") != "bytes":
            return None
        dt = doc["data_type"]
        dt = np.dtype(str(dt["name"] if isinstance(dt, dict) else dt))
        endian = (codecs[0].get("configuration") or {}).get("endian", "little")
        if dt.itemsize > 1 and not (endian == "little" and np.little_endian):
            return None
        checksum = codecs[-1].get("name") == "crc32c" and len(codecs) > 1
        rest = codecs[1:-1] if checksum else codecs[1:]
        if not rest:
            return False, checksum
        if (len(rest) == 1 and rest[0].get("name") == "zstd"
                and not (rest[0].get("configuration") or {}).get("checksum", False)):
            return True, checksum
        return None
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def zstd_content_size(raw: Any) -> int | None:
    """The decompressed size a Zstandard frame header declares, or None (RFC 8878, 3.1.1.1)."""
    raw = memoryview(raw)
    if len(raw) < 6 or bytes(raw[:4]) != b"\x28\xb5\x2f\xfd":
        return None
    fhd = raw[4]
    single = (fhd >> 5) & 1
    fcs_flag = fhd >> 6
    pos = 5 + (0 if single else 1) + (0, 1, 2, 4)[fhd & 3]
    size = (1 if single else 0, 2, 4, 8)[fcs_flag]
    if size == 0 or len(raw) < pos + size:
        return None
    value = int.from_bytes(raw[pos:pos + size], "little")
    return value + 256 if size == 2 else value


def decode_chunk(spec: ChunkSpec, coords: Sequence[int]) -> np.ndarray:
    """One stored chunk, checked and decoded into a new array of the full chunk shape.

    Raises
    ------
    StoreError
        The chunk is missing, fails its checksum or the manifest's, or does not decode
        to a chunk of this shape and type (the message names store, array, chunk, images).
    """
    names = spec.names
    path = os.path.join(spec.folder, *names.key(coords).split("/"))
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise names.missing(coords) from None
    verify_tail(names, coords, raw)
    body = verify_crc(names, coords, raw) if spec.checksum else np.frombuffer(raw, dtype=np.uint8)
    full = np.empty(spec.chunk_shape, dtype=np.dtype(spec.dtype))
    try:
        if spec.compressed:
            from numcodecs import Zstd

            if zstd_content_size(body) == full.nbytes:
                Zstd().decode(body, out=full)
            else:  # size not in the header (or wrong): decode, then check the length
                data = np.frombuffer(Zstd().decode(body), dtype=np.uint8)
                full.reshape(-1).view(np.uint8)[:] = data
        else:
            full.reshape(-1).view(np.uint8)[:] = np.frombuffer(body, dtype=np.uint8)
    except Exception as e:
        raise names.damaged(coords, f"it is not a {spec.chunk_shape} {spec.dtype} chunk "
                                    f"({type(e).__name__}: {e})") from None
    return full


def read_chunk(spec: ChunkSpec, block_id: tuple = (), block_info: Any = None) -> np.ndarray:
    """One stored chunk as a Dask block (edge chunks cut to the array's shape)."""
    shape = tuple(block_info[None]["chunk-shape"])
    full = decode_chunk(spec, block_id)
    if shape == spec.chunk_shape:
        return full
    return np.ascontiguousarray(full[tuple(slice(0, s) for s in shape)])


def dask_chunks(array: Any) -> tuple:
    """Dask ``chunks`` of an array on its stored chunk grid (edge chunks cut to the shape)."""
    out = []
    for n, c in zip(array.shape, array.chunks):
        c = max(1, int(c))
        out.append(tuple(min(c, n - s) for s in range(0, n, c)) or (0,))
    return tuple(out)


# -- checking a whole store (isle info --check) -----------------------------------------------

@dataclass
class StoreCheck:
    """What :func:`check_stack` found.

    Attributes
    ----------
    path : str
    chunks : dict
        Array name -> chunks read and verified.
    checksums : dict
        Array name -> whether its chunks carry crc32c checksums.
    manifests : dict
        Array name -> whether the store recorded every chunk's checksum.
    problems : list of str
        One line per missing or damaged chunk, naming it.
    """

    path: str
    chunks: dict[str, int]
    checksums: dict[str, bool]
    manifests: dict[str, bool]
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def total(self) -> int:
        return sum(self.chunks.values())

    def to_json(self) -> dict:
        return {"ok": self.ok, "chunks": self.chunks, "checksums": self.checksums,
                "manifests": self.manifests, "problems": self.problems}


def check_stack(stack: Any, *, workers: int | None = None, progress: bool = True) -> StoreCheck:
    """Read and verify every chunk of every array of a store.

    Every chunk is read and decoded, its crc32c and the manifest's checksum compared
    where the store has them; nothing stops at the first problem.

    Parameters
    ----------
    stack : path, URL or Stack
        The store (opening it already checks its metadata, ids and shapes).
    workers : int, optional
        Reading threads (default: the CPU count, at most 8).
    progress : bool
        Show a progress bar over the chunks.

    Returns
    -------
    StoreCheck
        Use ``.ok``; ``.problems`` names every missing or damaged chunk.
    """
    from concurrent.futures import ThreadPoolExecutor

    from isle_fast.progress import progress as bar
    from isle_fast.stores.stack import Stack, open_stack

    st = stack if isinstance(stack, Stack) else open_stack(stack)
    jobs: list[tuple[Callable[[], object], ChunkNames, tuple[int, ...]]] = []
    chunks, checksums, manifests = {}, {}, {}
    for name in st.array_names:
        arr = st.member(name)
        names = arr._names
        spec = fast_chunk_spec(arr, names)
        checksums[name] = _has_checksum(list(arr.metadata.codecs))
        manifests[name] = names.crc is not None
        chunks[name] = names.num_chunks
        for coords in np.ndindex(*names.grid):
            if spec is not None:
                jobs.append((partial(decode_chunk, spec, coords), names, coords))
            else:
                jobs.append((partial(arr.get_block_selection, coords), names, coords))

    def run(job: tuple[Callable[[], object], ChunkNames, tuple[int, ...]]) -> str | None:
        fn, names, coords = job
        try:
            fn()
        except IsleError as exc:
            return str(exc)
        except OSError as exc:
            return f"{names.where(coords)} cannot be read: {exc}"
        return None

    n_workers = workers or min(8, os.cpu_count() or 1)
    problems: list[str] = []
    with bar(total=len(jobs), desc=f"check {st.name}", unit="chunk", quiet=not progress) as pb, \
            ThreadPoolExecutor(max_workers=max(1, n_workers)) as pool:
        for found in pool.map(run, jobs):
            if found is not None:
                problems.append(found)
            pb.update(1)
    return StoreCheck(path=st.path, chunks=chunks, checksums=checksums, manifests=manifests,
                      problems=problems)


def names_for(store: str, name: str, arr: Any, ids: Sequence[str] | None = None) -> ChunkNames:
    """:class:`ChunkNames` of an opened array (its manifest checked)."""
    shape = tuple(int(s) for s in arr.shape)
    chunks = tuple(int(c) for c in arr.chunks)
    names = ChunkNames(store=store, array=name, shape=shape, chunks=chunks,
                       key_encoding=arr.metadata.chunk_key_encoding)
    names = replace(names, crc=read_manifest(store, name, arr, names.grid))
    if ids is not None and len(shape) >= 1 and shape[0] == len(ids):
        names = replace(names, row_ids=row_ids(ids, chunks[0]))
    return names
