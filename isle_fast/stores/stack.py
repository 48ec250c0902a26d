"""Stack stores: the data model (README.md, "Data model") on Zarr v3.

A *stack* is the paper's ``ps_i in R^{H x W x C}`` for every image ``i`` of a
data set. It lives in one Zarr v3 group:

======== ====================== ==================================================
member   shape, dtype           meaning
======== ====================== ==================================================
attrs                           ``isle_format``, ``kind``, ``name``, ``classes``,
                                ``ignore_index``, ``encoding``, ``complete``,
                                ``provenance``
ids      (I,) str               image ids, in order
shapes   (I, 2) int32           true H, W of every image (arrays are padded)
labels   (I, H, W) uint8        encoding ``labels``: hard set as a label map
scores   (I, H, W, C) u8 / f16  encoding ``scores``: soft per-class scores
rgb      (I, H, W, 3) uint8     kind ``images``
======== ====================== ==================================================

Padding is ``ignore_index`` (255) in ``labels`` and 0 in ``scores`` / ``rgb``;
``shapes`` says where the data ends, so padding never counts as data.

A store holds every chunk of every array, each ending in a crc32c checksum, and
records every chunk's checksum at commit (:mod:`isle_fast.stores.chunks`): a
missing, damaged or misplaced chunk is an error naming it on every read path,
never the fill value. :func:`open_stack` checks the metadata, the ids (unique)
and the shapes against the arrays before anything is read.

Both encodings are views of one logical H x W x C stack
(:meth:`Stack.as_dask`), but a hard set is never inflated to C bytes per pixel
on disk or on the hot path: kernels read the label map directly.

Writing is all-or-nothing. :func:`create_stack` writes into a temporary
sibling folder and :meth:`StackWriter.commit` marks the group ``complete`` and
renames it into place; :func:`open_stack` refuses a store that is not
complete. On an fsspec URL (no atomic rename) only the ``complete`` flag
guards the store.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np

if TYPE_CHECKING:
    from zarr.core.array_spec import ArrayConfigParams

from isle_fast.errors import AlignmentError, InputError, IsleError, StoreError, param
from isle_fast.outputs import AllOrNothing
from isle_fast.stores.chunks import (
    ChunkNames,
    ChunkSpec,
    DefaultKeys,
    checksum_codec,
    dask_chunks,
    doc_codecs,
    fast_chunk_spec,
    names_for,
    read_chunk,
    read_manifest,
    record_manifests,
    row_ids,
    verify_crc,
    verify_tail,
    zstd_content_size,
)

__all__ = [
    "FORMAT_VERSION",
    "IGNORE_INDEX",
    "KINDS",
    "ENCODINGS",
    "VOC_CLASSES",
    "SCORE_SCALE",
    "quantize_scores",
    "Stack",
    "StackWriter",
    "create_stack",
    "open_stack",
    "default_chunks",
    "default_compressors",
    "check_aligned",
    "is_remote",
]

FORMAT_VERSION = 1
IGNORE_INDEX = 255
KINDS = ("pseudo", "gt", "images", "ensemble")
ENCODINGS = ("labels", "scores", "rgb")

#: The 21 PASCAL VOC 2012 classes, background first.
VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car",
    "cat", "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person",
    "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)

#: Uncompressed bytes a chunk aims for. Small enough that a 2-core worker keeps
#: a few chunks of every input in flight within a few hundred MiB, large enough
#: that per-chunk overhead (task, decompression call) is negligible.
TARGET_CHUNK_BYTES = 8 * 2**20

#: Tile side for images too large to hold several per chunk (remote sensing,
#: slides): tiles are multiples of this.
TILE_QUANTUM = 256

# ``uint8`` scores hold round(score * SCORE_SCALE); a score of 1.0 is 255 (see quantize_scores).
SCORE_SCALE = 255.0

#: Zarr array config of every writer: write a chunk even when it is all fill value
#: (a store holds every chunk).
WRITE_EVERY_CHUNK: ArrayConfigParams = {"write_empty_chunks": True}


SCORE_DTYPES = (np.dtype(np.uint8), np.dtype(np.float16), np.dtype(np.float32))


def quantize_scores(scores: np.ndarray, dtype: Any = np.uint8) -> np.ndarray:
    """[0, 1] scores ``(..., C)`` in a store's score dtype, with every pixel's argmax kept exactly.

    ``uint8`` holds ``round(255 * score)``; ``float16`` / ``float32`` the
    nearest value. Rounding alone would turn two classes closer than one step
    (1/255 in ``uint8``) into a tie that the argmax gives to the lower class:
    on IRN-style CAMs 0.49 % of the pixels then decoded differently from the
    float files. So where a pixel's argmax changed, its winning class is raised
    by one step (or, when it is already at the top value, 255 / 1.0, the lower
    classes tied with it are lowered by one step): for every pixel
    ``np.argmax(quantize_scores(s), -1) == np.argmax(s, -1)``, first index
    winning ties as in ``np.argmax``. No value moves by more than 1.5 steps
    (0.5 steps where nothing is fixed).

    With CAMs whose background slice is the constant threshold (CAM ingest),
    this is the public evaluation's decode (pad the threshold in front, argmax)
    of the float scores, exactly; re-thresholding at another value
    (``evaluate --bg-threshold``) compares the stored values, whose precision
    is one step (use ``float32`` storage to re-threshold exactly).

    Parameters
    ----------
    scores : (..., C) float array
        Finite scores; values outside [0, 1] are clipped first.
    dtype : {'uint8', 'float16', 'float32'}

    Returns
    -------
    ndarray of ``dtype``, same shape (a new array; ``scores`` is not modified).
    """
    dt = np.dtype(dtype)
    if dt not in SCORE_DTYPES:
        raise InputError(f"score dtype must be uint8, float16 or float32, not {dtype!r}")
    s = np.asarray(scores)
    if s.dtype.kind != "f" or s.dtype.itemsize < 4:
        s = s.astype(np.float32)
    if s.ndim < 1 or s.shape[-1] < 1:
        raise InputError(f"scores need a class axis, got shape {s.shape}")
    c = s.shape[-1]
    from isle_fast.kernels.store_cpu import keep_argmax_float, quantize_u8

    flat = s.reshape(-1, c)
    if dt == np.uint8:  # one compiled pass (NumPy reference: tests/reference.py)
        return quantize_u8(flat)[0].reshape(s.shape)
    q = np.clip(flat, 0.0, 1.0).astype(dt, order="C")
    if dt != s.dtype:  # float16, or float32 from float64: the cast rounds
        keep_argmax_float(flat, q)
    return q.reshape(s.shape)


def is_remote(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an fsspec URL (``s3://``, ``memory://``, ...) rather than a local path."""
    s = str(path)
    return "://" in s and not s.startswith("file://")


def kind_phrase(kind: str) -> str:
    """``"a 'pseudo' store"`` / ``"an 'images' store"``, for messages."""
    return f"{'an' if str(kind)[:1] in 'aeiou' else 'a'} {kind!r} store"


def absolute_location(path: str | os.PathLike) -> str:
    """``path`` as any process can open it: a URL unchanged, a local path made absolute.

    Tasks that open a store by its path on ``dask.distributed`` workers need it (the workers
    run in another working directory).
    """
    return str(path) if is_remote(path) else str(_local(path))


def _local(path: str | os.PathLike) -> Path:
    """The local path of a store, absolute: what Zarr opens and what tasks sent to cluster workers
    (another working directory) read and write."""
    s = str(path)
    return Path(s[len("file://"):] if s.startswith("file://") else s).absolute()


def default_compressors(encoding: str | None = None, *, checksum: bool = True) -> tuple:
    """Compressor chain used for an array unless the caller gives one: Zarr v3 ``zstd``, then ``crc32c``.

    ``labels`` and ``rgb`` (and ``None``): Zstandard level 3. ``scores``:
    Zstandard level 1. Every chain ends with the ``crc32c`` codec (a 4-byte
    checksum per chunk, verified on every read; ``checksum=False`` leaves it
    out, for benchmarks). What it costs on the read path: ``python -m
    benchmarks.compression`` (``checksum_cost``). Chosen by ``python -m benchmarks.compression`` (results
    in ``benchmarks/results/compression.json``) on VOC-sized synthetic label
    maps (132 images of up to 500 x 500 in 33-image chunks, ground-truth-like
    with the 255 void band and pseudo-label-like) and CAM-like score stacks
    (uint8 and float16, 21 classes), timing every codec on one core with
    thread CPU time, interleaved, best of 7 (the machine was shared). The rule:
    fewest stored bytes among codecs that decode at >= 1 GB/s per core and
    encode at >= 1 GB/s (labels) / >= 400 MB/s (scores) per core.

    * Label maps: plain Zstd 3 stores them 130x (ground-truth-like) and 170x
      (pseudo-label-like) smaller than raw, encoding at 3.4-4.1 GB/s and
      decoding at 5.7-6.6 GB/s per core. The former default, Blosc(zstd, 3,
      noshuffle), is worse on every axis there (123x / 161x, 1.2-1.9 GB/s
      encode, 3.6-3.7 GB/s decode); Blosc(zstd, 5) stores ~9 % fewer bytes but
      encodes 11-16x slower (0.25-0.31 GB/s), which would make merges and ingests
      compression-bound; LZ4 is faster still but 3.4-3.7x larger. Byte / bit
      shuffle cannot help 1-byte values (bitshuffle roughly halved the ratio).
      For comparison, PNG holds the same maps only 77x / 98x smaller.
    * Scores: Zstd 1 gave the best ratio of all candidates (9.0x uint8, 9.4x
      float16), decoding at 1.4-1.9 GB/s and encoding at 0.59-0.82 GB/s per
      core; the only faster encoder (Blosc LZ4) stores 2.3-2.5x more bytes,
      and a score pixel is C bytes, so bytes dominate. The encode bar is lower
      than for labels because loading and quantising CAM files (float32, 4x
      the stored bytes) is slower than this encoder.
    * ``rgb`` was not measured separately: photographs compress little with
      any lossless codec, and Zstd 3 decodes far faster than training reads.
    """
    from zarr.codecs import ZstdCodec

    zstd = ZstdCodec(level=1 if encoding == "scores" else 3)
    return (zstd, checksum_codec()) if checksum else (zstd,)


def default_chunks(
    n_images: int, height: int, width: int, channels: int | None = None, itemsize: int = 1,
    target_bytes: int = TARGET_CHUNK_BYTES,
) -> tuple[int, ...]:
    """Chunk shape for an ``(I, H, W[, C])`` array.

    Whole images per chunk while an image is smaller than ``target_bytes``;
    otherwise one image per chunk cut into square spatial tiles (multiples of
    256 pixels). The class / colour axis is never split, so a chunk always
    holds the whole H x W x C stack of its pixels.

    Parameters
    ----------
    n_images, height, width : int
        Array shape (padded).
    channels : int, optional
        Size of the trailing class / colour axis, if any.
    itemsize : int
        Bytes per element.
    target_bytes : int
        Uncompressed bytes a chunk aims for.

    Returns
    -------
    tuple of int
        The chunk shape, same rank as the array.
    """
    c = channels or 1
    pixel_bytes = c * itemsize
    image_bytes = max(1, height * width * pixel_bytes)
    if image_bytes <= target_bytes:
        k = int(max(1, min(n_images, target_bytes // image_bytes)))
        shape: tuple[int, ...] = (k, max(height, 1), max(width, 1))
    else:
        side = int(np.sqrt(target_bytes / pixel_bytes))
        side = max(TILE_QUANTUM, side // TILE_QUANTUM * TILE_QUANTUM)
        shape = (1, min(height, side), min(width, side))
    return shape + ((channels,) if channels is not None else ())


@dataclass(frozen=True)
class _Layout:
    array: str
    dtype: np.dtype
    channels: int | None
    fill: int | float


def _layout(kind: str, encoding: str, n_classes: int, score_dtype: str) -> _Layout:
    if encoding == "labels":
        return _Layout("labels", np.dtype(np.uint8), None, IGNORE_INDEX)
    if encoding == "scores":
        dt = np.dtype(score_dtype)
        if dt not in (np.dtype(np.uint8), np.dtype(np.float16), np.dtype(np.float32)):
            raise InputError(f"score_dtype must be uint8, float16 or float32, not {score_dtype!r}")
        return _Layout("scores", dt, n_classes, 0)
    if encoding == "rgb":
        return _Layout("rgb", np.dtype(np.uint8), 3, 0)
    raise InputError(f"encoding must be one of {ENCODINGS}, not {encoding!r}")


def _check_attrs(path: str, attrs: dict) -> None:
    """Raise :class:`StoreError` naming the store when an attribute has the wrong type or value.

    Stores come from other people's disks: a hand-edited or foreign attribute
    must end in a clear error, never in a TypeError deep inside a step.
    """
    def bad(key: str, expected: str) -> StoreError:
        return StoreError(f"{path}: attribute {key!r} is {attrs.get(key)!r}; expected {expected}")

    if attrs.get("kind") not in KINDS:
        raise bad("kind", f"one of {', '.join(KINDS)}")
    if attrs.get("encoding") not in ENCODINGS:
        raise bad("encoding", f"one of {', '.join(ENCODINGS)}")
    if not isinstance(attrs.get("name"), str):
        raise bad("name", "a string")
    classes = attrs.get("classes")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise bad("classes", "a non-empty list of class names")
    if len(classes) > 255:
        raise bad("classes", "at most 255 names (255 is the ignore value)")
    if len(set(classes)) != len(classes):
        raise bad("classes", "class names that are all different")
    ignore = attrs.get("ignore_index", IGNORE_INDEX)
    if isinstance(ignore, bool) or ignore != IGNORE_INDEX:
        raise bad("ignore_index", str(IGNORE_INDEX))
    if not isinstance(attrs.get("provenance", {}), dict):
        raise bad("provenance", "a mapping")
    scale = attrs.get("score_scale", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise bad("score_scale", "a positive number")


@dataclass(frozen=True)
class ArrayMeta:
    """Shape, chunks and dtype of a store's main array, and its metadata document (``zarr.json``)."""

    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    dtype: np.dtype
    doc: dict

    @classmethod
    def of(cls, array: Any) -> "ArrayMeta":
        """From an open Zarr array."""
        return cls(tuple(int(v) for v in array.shape), tuple(int(c) for c in array.chunks),
                   np.dtype(array.dtype), dict(array.metadata.to_dict()))

    @classmethod
    def from_doc(cls, doc: Any) -> "ArrayMeta | None":
        """From a ``zarr.json`` document of a numeric or string array; None for anything unexpected."""
        try:
            if doc.get("node_type") != "array" or doc.get("zarr_format") != 3:
                return None
            shape = tuple(int(v) for v in doc["shape"])
            chunks = tuple(int(v) for v in doc["chunk_grid"]["configuration"]["chunk_shape"])
            dt = doc["data_type"]
            name = str(dt["name"] if isinstance(dt, dict) else dt)
            dtype = np.dtype(object) if name == "string" else np.dtype(name)
            if len(chunks) != len(shape) or any(c < 1 for c in chunks) or dtype.kind not in "uifO":
                return None
            return cls(shape, chunks, dtype, doc)
        except (KeyError, TypeError, ValueError, AttributeError):
            return None


@dataclass(frozen=True)
class _LightStore:
    """What :class:`Stack` needs, read from a local store without Zarr (see :func:`_open_light`)."""

    attrs: dict
    ids: np.ndarray
    shapes: np.ndarray
    meta: ArrayMeta
    names: ChunkNames               # the main array's chunk names (its manifest checked)
    spec: ChunkSpec                 # the direct reader of the main array
    array_names: list[str]


def _read_doc(path: Path) -> dict | None:
    import json

    try:
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _light_names(store: str, name: str, meta: ArrayMeta) -> ChunkNames:
    """:class:`ChunkNames` of an array from its document, the manifest checked as on Zarr's path."""
    from types import SimpleNamespace

    key = meta.doc.get("chunk_key_encoding") or {}
    names = ChunkNames(store=store, array=name, shape=meta.shape, chunks=meta.chunks,
                       key_encoding=DefaultKeys((key.get("configuration") or {}).get("separator", "/")))
    attrs = SimpleNamespace(attrs=meta.doc.get("attributes") or {})
    return replace(names, crc=read_manifest(store, name, attrs, names.grid))


def _small_array(folder: Path, meta: ArrayMeta, names: ChunkNames) -> np.ndarray | None:
    """A one-chunk array (``ids``, ``shapes``) read, checked and decoded without Zarr; None otherwise.

    Codecs ``bytes`` or ``vlen-utf8``, then at most ``zstd``, then ``crc32c``: the layout
    :func:`create_stack` writes. The chunk must be present and pass its crc32c and the
    manifest's; anything else (another layout, a missing or damaged chunk) is left to Zarr's
    path, which names the problem.
    """
    doc = meta.doc
    key = doc.get("chunk_key_encoding") or {}
    if key.get("name") != "default" or any(s > c for s, c in zip(meta.shape, meta.chunks)):
        return None
    codecs = [dict(c) for c in doc.get("codecs") or []]
    names_ = [c.get("name") for c in codecs]
    checksum = names_[-1:] == ["crc32c"]
    body_names = names_[:-1] if checksum else names_
    if body_names not in (["bytes"], ["bytes", "zstd"], ["vlen-utf8"], ["vlen-utf8", "zstd"]):
        return None
    if "zstd" in body_names and (codecs[1].get("configuration") or {}).get("checksum", False):
        return None
    if 0 in meta.shape:
        return np.empty(meta.shape, dtype=object if body_names[0] == "vlen-utf8" else meta.dtype)
    coords = (0,) * len(meta.shape)
    try:
        raw = (folder / names.key(coords).replace("/", os.sep)).read_bytes()
        verify_tail(names, coords, raw)
        body = verify_crc(names, coords, raw) if checksum else np.frombuffer(raw, dtype=np.uint8)
        if "zstd" in body_names:
            from numcodecs import Zstd

            body = Zstd().decode(body)
        if body_names[0] == "vlen-utf8":
            from numcodecs import VLenUTF8

            values = np.asarray(VLenUTF8().decode(body), dtype=object)
        else:
            if (codecs[0].get("configuration") or {}).get("endian", "little") != "little":
                return None
            values = np.frombuffer(body, dtype=meta.dtype.newbyteorder("<"))
        values = values.reshape(meta.chunks)
    except (IsleError, OSError, KeyError, TypeError, ValueError, AttributeError, RuntimeError):
        return None
    return values[tuple(slice(0, s) for s in meta.shape)]


def _open_light(folder: Path, spath: str, encoding: str, attrs: dict) -> _LightStore | None:
    """The members of a local store read straight from their files, or None when Zarr should read them.

    Opening a store this way needs no Zarr import (0.15-0.25 s) and no asyncio round
    trips: the ``zarr.json`` documents and the one-chunk ``ids`` and ``shapes`` arrays are
    plain JSON and Zstd, their chunks checked against their crc32c and the store's manifest.
    Anything unusual (another layout, a missing or damaged member or chunk, metadata
    Zarr might read otherwise) returns None and the store is opened through Zarr, which
    reports the problem with the same message as always. The checks of ids, shapes and
    the main array (:class:`Stack`) run the same on both paths.
    """
    try:
        metas: dict[str, ArrayMeta] = {}
        array_names = ["ids", "shapes", encoding]
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            if not entry.is_dir() or not os.path.exists(os.path.join(entry.path, "zarr.json")):
                continue
            doc = _read_doc(Path(entry.path) / "zarr.json")
            if doc is None or doc.get("zarr_format") != 3:
                return None
            if doc.get("node_type") == "array":
                meta = ArrayMeta.from_doc(doc)
                if meta is None:
                    return None
                metas[entry.name] = meta
                if entry.name not in array_names:
                    array_names.append(entry.name)
        if any(n not in metas for n in ("ids", "shapes", encoding)):
            return None
        main = metas[encoding]
        codecs = doc_codecs(main.doc)
        if codecs is None or main.dtype.kind == "O":
            return None
        small = []
        for name in ("ids", "shapes"):
            values = _small_array(folder / name, metas[name], _light_names(spath, name, metas[name]))
            if values is None:
                return None
            small.append(values)
        ids, shapes = small
        names = _light_names(spath, encoding, main)
        if len(main.shape) >= 1 and ids.ndim == 1 and main.shape[0] == len(ids):
            names = replace(names, row_ids=row_ids([str(v) for v in ids.tolist()], main.chunks[0]))
        spec = ChunkSpec(folder=str(folder / encoding), chunk_shape=main.chunks, dtype=main.dtype.str,
                         compressed=codecs[0], checksum=codecs[1], names=names)
    except (IsleError, OSError):
        return None
    return _LightStore(attrs=attrs, ids=ids, shapes=shapes, meta=main, names=names, spec=spec,
                       array_names=array_names)


#: dtypes each encoding's array may hold
_DTYPES: dict[str, tuple[np.dtype, ...]] = {
    "labels": (np.dtype(np.uint8),),
    "scores": (np.dtype(np.uint8), np.dtype(np.float16), np.dtype(np.float32)),
    "rgb": (np.dtype(np.uint8),),
}


#: Group attribute holding the crc32c of the attributes that say what the data means (written at commit).
IDENTITY_ATTR = "isle_identity_crc32c"
_IDENTITY_KEYS = ("kind", "encoding", "classes", "ignore_index", "score_scale")
#: in the checksum only when the store has them (class-sparse score stores, :mod:`isle_fast.stores.sparse`)
_IDENTITY_KEYS_IF_SET = ("score_layout", "background_level")
#: Group attribute: the version of the identity checksum's key set (absent: version 1, the keys above).
#: Version 2 adds ``scores_background_level`` (an ensemble's class-sparse merged ``scores``: the slice 0
#: of every pixel of their dense view), and the version itself; stores committed before keep version 1.
IDENTITY_VERSION_ATTR = "isle_identity_version"
IDENTITY_VERSION = 2
_IDENTITY_KEYS_IF_SET_V2 = _IDENTITY_KEYS_IF_SET + ("scores_background_level", IDENTITY_VERSION_ATTR)


def _identity_keys(attrs: dict) -> tuple[str, ...]:
    optional = _IDENTITY_KEYS_IF_SET_V2 if attrs.get(IDENTITY_VERSION_ATTR) == 2 else _IDENTITY_KEYS_IF_SET
    return _IDENTITY_KEYS + tuple(k for k in optional if k in attrs)


def identity_crc32c(attrs: dict) -> int:
    """crc32c of the attributes that give the stored numbers their meaning (kind, encoding, classes,
    ignore index, score scale, and a class-sparse store's layout and background levels): a class
    deleted from ``classes`` would shift every later class name and still open as a consistent store;
    the checksum tells."""
    import google_crc32c

    ident = {k: attrs.get(k) for k in _identity_keys(attrs)}  # older stores: their key set, unchanged crc
    doc = json.dumps(ident, sort_keys=True, separators=(",", ":"))
    return int(google_crc32c.value(doc.encode("utf-8")))


def _check_identity(path: str, attrs: dict) -> None:
    """The identity checksum, where the store has one (stores written before it existed have none)."""
    if IDENTITY_ATTR not in attrs:
        return
    if attrs[IDENTITY_ATTR] != identity_crc32c(attrs):
        keys = _identity_keys(attrs)
        raise StoreError(f"{path}: its attributes {', '.join(keys)} do not match the checksum "
                         f"written when it was made ({IDENTITY_ATTR}); the store's metadata is damaged")


def _check_image_counts(path: str, ids: Any, shapes: Any, main: Any, encoding: str) -> None:
    """``ids``, ``shapes`` and the main array agree on the number of images, from their metadata
    alone: a damaged ``zarr.json`` claiming billions of ids must be an error, not an allocation."""
    counts = {"ids": ids.shape, "shapes": shapes.shape, encoding: main.shape}
    n = {name: int(shape[0]) if len(shape) else None for name, shape in counts.items()}
    if len(ids.shape) == 1 and len(shapes.shape) and n["shapes"] != n["ids"]:
        raise StoreError(f"{path}: 'shapes' has {n['shapes']} rows but 'ids' has {n['ids']} images")
    if len(set(n.values())) != 1:
        desc = ", ".join(f"'{name}' {tuple(counts[name])}" for name in n)
        raise StoreError(f"{path}: its arrays disagree on the number of images ({desc}); the store's "
                         "metadata is damaged")


def _read_ids(path: str, arr: Any) -> list[str]:
    """The ``ids`` array (a CheckedArray, or its values), checked: one string per image, no id twice."""
    dt = np.dtype(arr.dtype)
    if arr.ndim != 1 or dt.kind not in "OUT":
        raise StoreError(f"{path}: array 'ids' is {dt} of shape {tuple(arr.shape)}; "
                         "expected one string per image")
    ids = [str(s) for s in np.asarray(arr[...]).tolist()]
    if len(set(ids)) != len(ids):
        first: dict[str, int] = {}
        for i, s in enumerate(ids):
            if s in first:
                raise StoreError(f"{path}: image id {s!r} appears twice in 'ids' (positions {first[s]} "
                                 f"and {i}); ids must be unique")
            first[s] = i
    return ids


def _read_shapes(path: str, arr: Any, ids: list[str]) -> np.ndarray:
    """The ``shapes`` array (a CheckedArray, or its values), checked: one (height, width) >= 1 per id."""
    dt = np.dtype(arr.dtype)
    if arr.ndim != 2 or arr.shape[1] != 2 or dt.kind not in "iu":
        raise StoreError(f"{path}: array 'shapes' is {dt} of shape {tuple(arr.shape)}; "
                         "expected (images, 2) integers")
    if arr.shape[0] != len(ids):
        raise StoreError(f"{path}: 'shapes' has {arr.shape[0]} rows but 'ids' has {len(ids)} images")
    shapes = np.asarray(arr[...], dtype=np.int64).reshape(-1, 2)
    bad = np.nonzero((shapes < 1).any(axis=1))[0]
    if len(bad):
        i = int(bad[0])
        hw = tuple(int(v) for v in shapes[i])
        raise StoreError(f"{path}: image {ids[i]!r} has shape {hw} in 'shapes'; "
                         "heights and widths must be at least 1")
    return shapes


def _check_main_array(stack: "Stack") -> None:
    """The main array agrees with its encoding, the ids, the shapes and the classes.

    Uses ``Stack.shape`` / ``Stack.dtype`` (the array's metadata), so it runs the same
    whether the store was opened through Zarr or from its documents.
    """
    shape, enc, path = stack.shape, stack.encoding, stack.path
    dt = np.dtype(stack.dtype)
    ndim = 3 if enc == "labels" else 4
    if len(shape) != ndim:
        raise StoreError(f"{path}: array {enc!r} has shape {tuple(shape)}; a {enc} array has {ndim} axes")
    if dt not in _DTYPES[enc]:
        raise StoreError(f"{path}: array {enc!r} has dtype {dt}; a {enc} store holds "
                         f"{' or '.join(str(d) for d in _DTYPES[enc])}")
    n = len(stack.ids)
    if shape[0] != n:
        raise StoreError(f"{path}: array {enc!r} holds {shape[0]} images but 'ids' has {n}")
    h_pad, w_pad = (int(v) for v in shape[1:3])
    over = np.nonzero((stack.shapes[:, 0] > h_pad) | (stack.shapes[:, 1] > w_pad))[0]
    if len(over):
        i = int(over[0])
        h, w = (int(v) for v in stack.shapes[i])
        raise StoreError(f"{path}: image {stack.ids[i]!r} is {h} x {w} in 'shapes' but array {enc!r} "
                         f"is padded to {h_pad} x {w_pad}")
    if enc == "scores" and shape[3] != stack.num_classes:
        raise StoreError(f"{path}: array 'scores' has {shape[3]} class slices but the store names "
                         f"{stack.num_classes} classes")
    if enc == "rgb" and shape[3] != 3:
        raise StoreError(f"{path}: array 'rgb' has {shape[3]} colour channels; expected 3")


class Stack:
    """A complete stack store, opened read-only.

    Use :func:`open_stack` to get one. Attributes mirror the group's attrs:
    ``kind``, ``name``, ``classes``, ``ignore_index``, ``encoding``,
    ``provenance``; ``ids`` (list of str) and ``shapes`` ((I, 2) int array)
    are read once and kept in memory. ``array`` and :meth:`member` are
    :class:`~isle_fast.stores.chunks.CheckedArray` objects: a missing or damaged
    chunk is an error naming it, never the fill value.
    """

    def __init__(self, path: str | os.PathLike, group: Any = None, light: "_LightStore | None" = None):
        self.path = str(path)
        self._group = group
        self._lock = threading.RLock()
        self._array: Any = None  # a class-sparse store's dense view, made on first use
        if light is not None:   # read from the JSON documents and two small chunks, without Zarr
            attrs = dict(light.attrs)
        else:
            attrs = dict(group.attrs)
        self.attrs = attrs
        _check_attrs(self.path, attrs)
        _check_identity(self.path, attrs)
        self.kind: str = attrs["kind"]
        self.name: str = attrs["name"]
        self.classes: list[str] = list(attrs["classes"])
        self.ignore_index: int = int(attrs.get("ignore_index", IGNORE_INDEX))
        self.encoding: str = attrs["encoding"]
        self.provenance: dict = dict(attrs.get("provenance", {}))
        self._members: dict[str, Any] = {}
        if light is not None:
            self.ids: list[str] = _read_ids(self.path, light.ids)
            self.shapes: np.ndarray = _read_shapes(self.path, light.shapes, self.ids)
            self.meta: ArrayMeta = light.meta
            self._names: ChunkNames = light.names
            self._spec: ChunkSpec | None = light.spec
            self.array_names: list[str] = list(light.array_names)
            _check_main_array(self)
            return
        ids_array, shapes_array = self.member("ids"), self.member("shapes")
        sparse = self.score_layout == "sparse"
        main_name = "cams" if sparse else self.encoding
        arr = self.member(main_name)
        _check_image_counts(self.path, ids_array, shapes_array, arr, main_name)  # before reading any
        self.ids = _read_ids(self.path, ids_array)
        self.shapes = _read_shapes(self.path, shapes_array, self.ids)
        self.meta = ArrayMeta.of(arr)
        self._names = arr._names
        self._spec = fast_chunk_spec(arr, arr._names)
        if sparse:
            self._open_sparse(arr)
        _check_main_array(self)
        try:  # every array of the group (an ensemble's scores, anything else), for isle info --check
            others = sorted(str(n) for n in group.array_keys() if n not in self._members)
        except Exception as exc:
            raise StoreError(f"{self.path}: the metadata of an array is damaged "
                             f"({type(exc).__name__}: {exc})") from None
        stored = ["cams", "keys"] + [n for n in ("background",) if n in self._members]
        self.array_names = ["ids", "shapes"] + (stored if sparse else [self.encoding]) + others

    def _open_sparse(self, cams: Any) -> None:
        """A class-sparse store (:mod:`isle_fast.stores.sparse`): keys read and checked, the logical meta."""
        from isle_fast.stores.sparse import BACKGROUND_ATTR, BACKGROUND_MEMBER, BACKGROUND_STORED, check_keys

        if self.encoding != "scores":
            raise StoreError(f"{self.path}: score_layout 'sparse' needs encoding 'scores', "
                             f"not {self.encoding!r}")
        level = self.attrs.get(BACKGROUND_ATTR)
        if level != BACKGROUND_STORED and (isinstance(level, bool) or not isinstance(level, int)
                                           or not 0 <= level <= 255):
            raise StoreError(f"{self.path}: attribute {BACKGROUND_ATTR!r} is {level!r}; "
                             f"expected a level 0..255 or {BACKGROUND_STORED!r}")
        cm = self.meta
        if level == BACKGROUND_STORED:   # refined scores: the background slice is stored per pixel
            bg = self.member(BACKGROUND_MEMBER)
            if tuple(bg.shape) != tuple(cm.shape[:3]) or np.dtype(bg.dtype) != np.uint8:
                raise StoreError(f"{self.path}: array {BACKGROUND_MEMBER!r} is {bg.dtype} of shape "
                                 f"{tuple(bg.shape)}; expected {tuple(cm.shape[:3])} uint8 (images, H, W)")
        if len(cm.shape) != 4 or cm.dtype != np.uint8 or cm.chunks[3] != cm.shape[3]:
            raise StoreError(f"{self.path}: array 'cams' is {cm.dtype} of shape {cm.shape} "
                             f"(chunks {cm.chunks}); expected (images, H, W, K) uint8, one chunk over K")
        keys_arr = self.member("keys")
        if tuple(keys_arr.shape) != (cm.shape[0], cm.shape[3]):
            raise StoreError(f"{self.path}: array 'keys' has shape {tuple(keys_arr.shape)}; expected "
                             f"{(cm.shape[0], cm.shape[3])} (images, K of 'cams')")
        keys = np.asarray(keys_arr[...])
        check_keys(self.path, keys, self.num_classes)
        self.sparse_keys: np.ndarray = keys
        self.cams_meta: ArrayMeta = cm
        self.meta = ArrayMeta(cm.shape[:3] + (self.num_classes,), cm.chunks[:3] + (self.num_classes,),
                              np.dtype(np.uint8), cm.doc)
        self._spec = None   # the direct reader reads stored chunks; the dense view is made per block

    @property
    def score_layout(self) -> str:
        """``'dense'`` (every class slice stored) or ``'sparse'`` (only the classes present in each image)."""
        return str(self.attrs.get("score_layout", "dense"))

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        del state["_lock"]  # a Stack travels to worker processes; its lock does not
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()

    # -- the Zarr objects, opened on first use ---------------------------------------
    @property
    def group(self) -> Any:
        """The store's Zarr group, read-only, on a :class:`CheckedStore` (opened on first use)."""
        if self._group is None:
            with self._lock:  # Dask threads share one Stack: open the group once
                if self._group is None:
                    self._group = _zarr_group(self.path)
        return self._group

    @property
    def array(self) -> Any:
        """The main array (``labels``, ``scores`` or ``rgb``) as a CheckedArray, opened on first use.

        A class-sparse score store gives its logical dense ``(I, H, W, C)`` stack
        (:class:`isle_fast.stores.sparse.SparseView`, read on indexing).
        """
        if self.score_layout == "sparse":
            if self._array is None:
                from isle_fast.stores.sparse import SparseView

                self._array = SparseView(self)
            return self._array
        return self.member(self.encoding)

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the main array, ``(I, H, W[, C])`` (from its metadata; no Zarr needed)."""
        return self.meta.shape

    @property
    def dtype(self) -> np.dtype:
        """dtype of the main array."""
        return self.meta.dtype

    def member(self, name: str) -> Any:
        """One array of the store's group (``ids``, ``shapes``, the main array, an ensemble's ``scores``).

        A :class:`~isle_fast.stores.chunks.CheckedArray`. Raises :class:`StoreError` naming
        the store and array when it is absent or its metadata (zarr.json, the chunk
        manifest) is damaged.
        """
        arr = self._members.get(name)
        if arr is not None:
            return arr
        with self._lock:
            arr = self._members.get(name)
            return arr if arr is not None else self._open_member(name)

    def _open_member(self, name: str) -> Any:
        from isle_fast.stores import chunks

        group = self.group
        try:
            raw = group[name]
            # ids is unset while __init__ opens the ids and shapes arrays themselves
            names = names_for(self.path, name, raw, getattr(self, "ids", None))
        except IsleError:
            raise
        except KeyError:
            raise StoreError(f"{self.path} lacks its {name!r} array") from None
        except Exception as exc:
            raise StoreError(f"{self.path}: array {name!r}: its metadata (zarr.json) is damaged "
                             f"({type(exc).__name__}: {exc})") from None
        if not hasattr(raw, "chunks"):
            raise StoreError(f"{self.path}: {name!r} is a group, not an array")
        # the chunk names go to the store this very array reads through (a group opened by another
        # thread has a store of its own, whose registration would not guard this array)
        store = raw.store
        if not isinstance(store, chunks.CheckedStore):
            raise StoreError(f"{self.path}: array {name!r} is not read through a checked store")
        store.arrays[name] = names
        arr = self._members[name] = chunks.CheckedArray(raw, names)
        return arr

    # -- sizes ---------------------------------------------------------------------
    @property
    def num_images(self) -> int:
        """Number of images I."""
        return len(self.ids)

    @property
    def num_classes(self) -> int:
        """Number of classes C (background included)."""
        return len(self.classes)

    @property
    def padded_shape(self) -> tuple[int, int]:
        """(H, W) of the padded arrays."""
        return tuple(int(s) for s in self.meta.shape[1:3])  # type: ignore[return-value]

    @property
    def chunks(self) -> tuple[int, ...]:
        """Chunk shape of the main array."""
        return self.meta.chunks

    def chunk_spec(self) -> ChunkSpec | None:
        """The direct chunk reader's spec of the main array (checks presence, crc32c, manifest), or None.

        None when the store is not local plain Zstd: read it through :attr:`array` then.
        """
        if self.score_layout == "sparse":   # stored chunks are not the dense view's
            return None
        if _fast_chunk_spec is not _FAST_CHUNK_SPEC:  # switched off or replaced (benchmarks, tests)
            return _fast_chunk_spec(self.array)
        return self._spec

    @property
    def score_scale(self) -> float:
        """Divide stored ``uint8`` scores by this to get [0, 1] scores (1.0 for float stores)."""
        return float(self.attrs.get("score_scale", 1.0))

    @property
    def image_labels(self) -> np.ndarray | None:
        """The image-level labels stored with this stack: ``(I, C)`` bool (column 0 True), or None.

        Row ``i`` says which classes image ``ids[i]`` contains (its tags, WSSS's
        supervision). A store gets them from ``isle ingest labels/scores
        --image-labels`` (:mod:`isle_fast.stores.image_labels`). Read once.
        """
        if not hasattr(self, "_image_labels"):
            arr = None
            if "image_labels" in self.array_names:
                try:
                    arr = np.asarray(self.group["image_labels"][:])
                except Exception as exc:
                    raise StoreError(f"{self.path}: its image_labels array cannot be read: {exc}") from None
                if arr.dtype != bool or arr.shape != (self.num_images, self.num_classes):
                    raise StoreError(f"{self.path}: image_labels has shape {arr.shape} and dtype "
                                     f"{arr.dtype}; expected ({self.num_images}, {self.num_classes}) bool")
            self._image_labels = arr
        return self._image_labels

    def __len__(self) -> int:
        return self.num_images

    def __repr__(self) -> str:
        return (f"Stack({self.path!r}, kind={self.kind!r}, encoding={self.encoding!r}, "
                f"images={self.num_images}, classes={self.num_classes})")

    # -- reading -------------------------------------------------------------------
    def index_of(self, image_id: str) -> int:
        """Position of ``image_id``; :class:`InputError` naming the id and store if absent."""
        try:
            return self._index[image_id]
        except AttributeError:
            self._index: dict[str, int] = {s: i for i, s in enumerate(self.ids)}
            return self.index_of(image_id)
        except KeyError:
            raise InputError(f"image id {image_id!r} is not in store {self.path}") from None

    def read_image(self, i: int | str) -> np.ndarray:
        """The unpadded array of one image (``(h, w)`` or ``(h, w, C|3)``), by position or id."""
        if isinstance(i, str):
            i = self.index_of(i)
        h, w = (int(v) for v in self.shapes[i])
        return np.asarray(self.array[i, :h, :w])

    def to_dask(self):
        """The stored array (``labels``, ``scores`` or ``rgb``) as a Dask array on the store's chunks.

        A store on local disk whose chunks are plain Zstandard (our default
        layout) is read by :func:`isle_fast.stores.chunks.read_chunk`: the chunk file is read and
        decompressed straight into the block. Zarr's general read path (an
        asyncio event loop and an extra copy) cost more CPU and kept the two
        Dask threads less busy: at VOC scale evaluate + merge took 16.0 s (21.1
        CPU seconds) through it and 8.8 s (15.1) here (``python -m
        benchmarks.pipeline``, ``io_choices``). Anything else (fsspec URLs,
        other codecs, sharding) goes through :func:`dask.array.from_zarr`. Both
        give the same array, and both raise a :class:`StoreError` naming the
        chunk when one is missing, fails its crc32c or the store's record of
        it, or does not decode.
        """
        import dask.array as da
        from dask.base import tokenize

        if self.score_layout == "sparse":
            from isle_fast.stores.sparse import dense_dask

            return dense_dask(self)
        spec = self.chunk_spec()
        if spec is None or 0 in self.shape:
            return da.from_zarr(self.array)
        name = f"isle-read-{tokenize(spec, self.shape)}"
        return da.map_blocks(partial(read_chunk, spec=spec), chunks=dask_chunks(self.meta),
                             dtype=self.dtype, meta=np.empty((0,) * len(self.shape), self.dtype),
                             name=name)

    def as_dask(self):
        """The logical ``(I, H, W, C)`` stack as a Dask array.

        For ``scores`` this is the stored array. For ``labels`` the one-hot
        planes are made per chunk, lazily; use it for inspection, not on hot
        paths (the kernels read the label map itself). Padding and ignore
        pixels are all-zero in the one-hot view.
        """
        import dask.array as da

        arr = self.to_dask()
        if self.encoding != "labels":
            return arr
        c = self.num_classes

        def one_hot(block: np.ndarray) -> np.ndarray:
            return (block[..., None] == np.arange(c, dtype=np.uint8)).astype(np.uint8)

        return da.map_blocks(one_hot, arr, dtype=np.uint8, new_axis=3,
                             chunks=arr.chunks + ((c,),))

    def valid_mask(self, start: int, stop: int) -> np.ndarray:
        """Boolean ``(stop-start, H, W)`` mask that is True inside each image's true shape."""
        h_pad, w_pad = self.padded_shape
        rows = np.arange(h_pad)[None, :, None] < self.shapes[start:stop, 0][:, None, None]
        cols = np.arange(w_pad)[None, None, :] < self.shapes[start:stop, 1][:, None, None]
        return rows & cols

    # -- description ---------------------------------------------------------------
    def stored_bytes(self) -> int:
        """Bytes the store takes on its file system."""
        if is_remote(self.path):
            import fsspec

            fs, root = fsspec.core.url_to_fs(self.path)
            return int(fs.du(root))
        total = 0
        for dirpath, _, files in os.walk(_local(self.path)):
            for f in files:
                total += os.path.getsize(os.path.join(dirpath, f))
        return total

    def describe(self) -> dict:
        """Everything ``isle info`` prints, as a JSON-ready dict."""
        nbytes = int(np.prod(self.array.shape)) * self.array.dtype.itemsize
        stored = self.stored_bytes()
        hs, ws = self.shapes[:, 0], self.shapes[:, 1]
        return {
            "path": self.path,
            "kind": self.kind,
            "name": self.name,
            "encoding": self.encoding,
            **({"score_layout": self.score_layout} if self.encoding == "scores" else {}),
            **({"classes_per_image": {"max": int(self.sparse_keys.shape[1]),
                                      "mean": float((self.sparse_keys > 0).sum(axis=1).mean())
                                      if self.num_images else 0.0}}
               if self.score_layout == "sparse" else {}),
            **({"background_level": self.attrs.get("background_level")} if self.score_layout == "sparse" else {}),
            "dtype": str(self.array.dtype),
            "classes": self.classes,
            "images": self.num_images,
            "padded_shape": list(self.array.shape),
            "chunks": list(self.chunks),
            "image_height": {"min": int(hs.min()) if len(hs) else 0, "max": int(hs.max(initial=0))},
            "image_width": {"min": int(ws.min()) if len(ws) else 0, "max": int(ws.max(initial=0))},
            "pixels": int((hs * ws).sum()),
            "uncompressed_bytes": nbytes,
            "stored_bytes": stored,
            "compression_ratio": (nbytes / stored) if stored else None,
            "compressors": [_codec_name(c) for c in (self.array.compressors or ())],
            "provenance": self.provenance,
        }


def _codec_name(codec: Any) -> str:
    d: dict[str, Any] = codec.to_dict() if hasattr(codec, "to_dict") else {"name": str(codec)}
    conf = d.get("configuration", {})
    keep = {k: v for k, v in conf.items() if k in ("cname", "clevel", "level", "shuffle")}
    return d.get("name", "?") + (f"({', '.join(f'{k}={v}' for k, v in keep.items())})" if keep else "")


def open_stack(path: str | os.PathLike, kind: str | Sequence[str] | None = None) -> Stack:
    """Open a complete stack store read-only.

    Parameters
    ----------
    path : str or path-like
        Local folder or fsspec URL of the Zarr group.
    kind : str or sequence of str, optional
        Expected kind(s); another kind is an error naming the store.

    Returns
    -------
    Stack

    Raises
    ------
    StoreError
        The store is missing, not an isle-fast store, of another format
        version, incomplete (an interrupted write), or of the wrong kind; its
        metadata is damaged (attributes, an array's zarr.json, the chunks of
        ``ids`` / ``shapes``); its ids repeat; its shapes, array shape or dtype
        disagree with each other or the encoding. Each message names the store
        and what is wrong. Chunks of the main array are checked when read.

    Examples
    --------
    >>> import tempfile, isle_fast as il
    >>> ds = il.make_voc_like(tempfile.mkdtemp() + "/voc", n_images=12, size_range=(40, 60), soft_sets=())
    >>> gt = il.open_stack(ds.stores["train/gt"])
    >>> gt.kind, gt.encoding, gt.num_images, gt.num_classes
    ('gt', 'labels', 9, 21)
    """
    spath = str(path)
    if not is_remote(spath) and not _local(spath).exists():
        from isle_fast.outputs import leftover_note

        raise StoreError(f"store {spath} does not exist{leftover_note(spath)}")
    if not is_remote(spath) and not (_local(spath) / "zarr.json").exists():
        hint = not_a_store_hint(_local(spath), spath)
        if hint:
            raise StoreError(hint)
    group = None
    doc = None if is_remote(spath) else _read_doc(_local(spath) / "zarr.json")
    if isinstance(doc, dict) and doc.get("node_type") == "group" and doc.get("zarr_format") == 3 \
            and isinstance(doc.get("attributes", {}), dict):
        attrs = dict(doc.get("attributes", {}))
    else:   # not a plain local v3 group: let Zarr open it (and say what is wrong)
        group = _zarr_group(spath)
        attrs = dict(group.attrs)
    if "isle_format" not in attrs:
        raise StoreError(f"{spath} is a Zarr group but not an isle-fast stack store (no isle_format attribute)")
    if attrs["isle_format"] != FORMAT_VERSION:
        raise StoreError(
            f"{spath} has isle_format {attrs['isle_format']!r}; this isle-fast reads format "
            f"{FORMAT_VERSION}. Re-ingest it with this version.")
    if not attrs.get("complete", False):
        raise StoreError(f"{spath} is incomplete (its write was interrupted); delete it and run again")
    _check_attrs(spath, attrs)
    if kind is not None:
        kinds = (kind,) if isinstance(kind, str) else tuple(kind)
        if attrs["kind"] not in kinds:
            raise StoreError(f"{spath} is {kind_phrase(attrs['kind'])}; expected {' or '.join(kinds)}")
    light = None
    if group is None:
        try:
            light = _open_light(_local(spath), spath, attrs["encoding"], attrs)
        except IsleError:
            raise
        except (AttributeError, KeyError, IndexError, TypeError, ValueError, OverflowError):
            # metadata of a shape the fast open does not expect (damaged, or written by another
            # tool): Zarr's path reads it, or names what is wrong with it
            light = None
    if light is not None:
        return Stack(spath, light=light)
    return Stack(spath, group if group is not None else _zarr_group(spath))


#: file suffix -> (what the files are, the ``isle ingest`` format that reads them)
_SOURCE_FILES = {".png": ("PNG", "labels"), ".jpg": ("JPEG", "images"), ".jpeg": ("JPEG", "images"),
                 ".npy": ("NPY", "scores"), ".npz": ("NPZ", "scores"), ".tif": ("TIFF", "tiff"),
                 ".tiff": ("TIFF", "tiff")}


def not_a_store_hint(local: Path, spath: str) -> str | None:
    """What to say when ``local`` (no ``zarr.json``) is given where a store is expected: a folder or
    file of PNGs / JPEGs / CAMs gets the command that makes a store of it, instead of Zarr's jargon;
    ``None`` for anything else (Zarr's own message then)."""
    if local.is_file():
        what = _SOURCE_FILES.get(local.suffix.lower())
        if what is None:
            return f"{spath} is a file, not a store (a store is a folder made by isle ingest)"
        return (f"{spath} is a {what[0]} file, not a store: a store is made from a folder of such files, "
                f"e.g. isle ingest {what[1]} {local.parent} -o {local.parent.name or 'set'}.zarr")
    if not local.is_dir() or (local / ".zgroup").exists() or (local / ".zarray").exists():
        return None  # a Zarr v2 node: Zarr's message says what it is
    counts: dict[str, int] = {}
    for n, entry in enumerate(os.scandir(local)):
        if n >= 10_000:
            break
        suffix = os.path.splitext(entry.name)[1].lower()
        if suffix in _SOURCE_FILES:
            counts[suffix] = counts.get(suffix, 0) + 1
    if not counts:
        return (f"{spath} is a folder but not a store (no zarr.json); stores are made by isle ingest "
                "(or give the source folders to isle run)")
    suffix = max(counts, key=lambda k: counts[k])
    files, fmt = _SOURCE_FILES[suffix]
    name = (local.name or "set").removesuffix(".zarr")
    example = {"labels": f"isle ingest labels {spath} --gt GT.zarr -o {name}.zarr (ground truth: "
                         f"isle ingest labels {spath} --kind gt -o gt.zarr)",
               "images": f"isle ingest images {spath} --gt GT.zarr -o images.zarr",
               "scores": f"isle ingest scores {spath} --gt GT.zarr -o {name}.zarr",
               "tiff": f"isle ingest tiff {spath} --gt GT.zarr -o {name}.zarr"}[fmt]
    flag = "--cams" if fmt == "scores" else "--set"
    run = "" if fmt in ("images", "tiff") else \
        f" or give the folders to isle run (isle run --gt GT_DIR {flag} NAME=DIR -o RUN), which ingests them"
    return (f"{spath} is a folder of {files} files, not a store: ingest it first ({example}){run}")


def _zarr_group(spath: str) -> Any:
    """The store's group, read-only, on a CheckedStore (a missing chunk is an error, never the fill value)."""
    import zarr

    from isle_fast.stores.chunks import CheckedStore

    try:
        plain = zarr.open_group(spath if is_remote(spath) else str(_local(spath)), mode="r")
        # the same group on a store that refuses to read a missing chunk as the fill value
        return zarr.open_group(CheckedStore(plain.store), path=plain.path, mode="r")
    except Exception as exc:  # zarr raises several types for "not a group"
        if is_remote(spath):
            from isle_fast.stores.remote import bucket_problem

            problem = bucket_problem(spath)
            if problem is not None:
                raise StoreError(problem) from None
            if "No group found" in str(exc):
                raise StoreError(f"store {spath} does not exist (no root zarr.json there: never written, or "
                                 "its write never completed)") from None
        raise StoreError(f"{spath} is not a Zarr v3 group: {str(exc).splitlines()[0] if str(exc) else exc!r}") \
            from None


class StackWriter(AllOrNothing):
    """Writes one stack store; all-or-nothing.

    Made by :func:`create_stack`. Fill it with :meth:`write_image` (one image,
    padded here) or :meth:`write_block` (a padded run of images), then
    :meth:`commit`. Used as a context manager it commits on success and
    removes everything on an exception.
    """

    def __init__(self, final_path: str, work_path: str, group: Any, layout: _Layout,
                 overwrite: bool):
        self.path = final_path
        self.work_path = work_path
        self.group = group
        # write_empty_chunks: a store holds every chunk (Zarr would skip an all-fill chunk and read it
        # back as fill, so a deleted chunk could not be told from one never written; see
        # isle_fast.stores.chunks); it is also faster: Zarr's test "is this chunk all fill value?" costs
        # ~30x the Zstd encode of a label chunk (measured: 100 ms vs 3 ms wall per 8 MiB chunk)
        self.array = group[layout.array].with_config(WRITE_EVERY_CHUNK)
        self.layout = layout
        self.shapes = np.asarray(group["shapes"][:], dtype=np.int64)
        self.overwrite = overwrite
        self.done = False

    # -- filling -------------------------------------------------------------------
    def write_image(self, i: int, data: np.ndarray) -> None:
        """Write image ``i`` (unpadded, shape must equal ``shapes[i]``); padding is filled here."""
        h, w = (int(v) for v in self.shapes[i])
        if data.shape[:2] != (h, w):
            raise InputError(f"image {i} has shape {data.shape[:2]}, store expects {(h, w)}")
        full = np.full(self.array.shape[1:], self.layout.fill, dtype=self.array.dtype)
        full[:h, :w] = data
        self.array[i] = full

    def write_block(self, start: int, block: np.ndarray) -> None:
        """Write already padded images ``start : start + len(block)``."""
        self.array[start:start + block.shape[0]] = block

    def set_provenance(self, **items: Any) -> None:
        """Merge ``items`` into the store's provenance attribute."""
        prov = dict(self.group.attrs.get("provenance", {}))
        prov.update(items)
        self.group.attrs["provenance"] = prov

    # -- finishing -----------------------------------------------------------------
    def commit(self) -> Stack:
        """Record every chunk's checksum, mark the store complete, move it into place; returns it opened."""
        if self.done:
            raise StoreError(f"{self.path} was already committed or aborted")
        record_manifests(self.group)  # every chunk there; its checksum recorded where it belongs
        self.group.attrs[IDENTITY_VERSION_ATTR] = IDENTITY_VERSION
        self.group.attrs[IDENTITY_ATTR] = identity_crc32c(dict(self.group.attrs))
        self.group.attrs["complete"] = True
        if self.work_path != self.path:
            try:
                if is_remote(self.path):
                    from isle_fast.stores.remote import commit_prefix

                    commit_prefix(self.work_path, self.path, overwrite=self.overwrite)
                else:
                    from isle_fast.outputs import commit_dir

                    commit_dir(_local(self.work_path), _local(self.path), overwrite=self.overwrite)
            except BaseException:
                self.abort()
                raise
        self.done = True
        return open_stack(self.path)

    def abort(self) -> None:
        """Remove what was written; the final path is left as it was."""
        if self.done:
            return
        self.done = True
        if self.work_path != self.path and is_remote(self.work_path):
            from isle_fast.stores.remote import remove_prefix

            try:
                remove_prefix(self.work_path)
            except Exception:  # noqa: BLE001 - never hides the error that made us abort
                pass
        elif self.work_path != self.path:
            from isle_fast.outputs import remove_path

            remove_path(_local(self.work_path))
        else:
            try:
                import fsspec

                fs, root = fsspec.core.url_to_fs(self.work_path)
                fs.rm(root, recursive=True)
            except Exception:
                pass

    def __enter__(self) -> "StackWriter":
        return self


def create_stack(
    path: str | os.PathLike,
    *,
    kind: str,
    classes: Sequence[str],
    ids: Sequence[str],
    shapes: np.ndarray | Sequence[Sequence[int]],
    encoding: str = "labels",
    name: str | None = None,
    score_dtype: str = "uint8",
    chunks: Sequence[int] | None = None,
    compressors: Iterable | None = None,
    provenance: dict | None = None,
    overwrite: bool = False,
    padded_shape: tuple[int, int] | None = None,
) -> StackWriter:
    """Start writing a stack store.

    Parameters
    ----------
    path : str or path-like
        Where the store will be. Local paths are written to a temporary
        sibling and renamed on commit.
    kind : {'pseudo', 'gt', 'images', 'ensemble'}
    classes : sequence of str
        Class names, background first.
    ids : sequence of str
        Image ids, in order; unique.
    shapes : (I, 2) array-like of int
        True height and width of every image.
    encoding : {'labels', 'scores', 'rgb'}
        ``rgb`` is implied by kind ``images``.
    name : str, optional
        The set's name; defaults to the store's folder name without suffix.
    score_dtype : {'uint8', 'float16', 'float32'}
        Storage type of ``scores`` (``uint8`` holds ``round(255 * score)``, see :func:`quantize_scores`).
    chunks : sequence of int, optional
        Chunk shape of the main array; :func:`default_chunks` otherwise.
    compressors : iterable of codecs, optional
        Zarr v3 compressors (bytes-to-bytes codecs, used as given: end them with
        :func:`isle_fast.stores.chunks.checksum_codec` to keep per-chunk
        checksums); :func:`default_compressors` (Zstd + crc32c) otherwise.
    provenance : dict, optional
        JSON-ready provenance (sources, parameters, tool version).
    overwrite : bool
        Replace an existing store at ``path`` (only once the new one is complete).
    padded_shape : (int, int), optional
        Padded H, W; defaults to the largest image.

    Returns
    -------
    StackWriter
    """
    import zarr

    from isle_fast import __version__

    if kind not in KINDS:
        raise InputError(f"kind must be one of {KINDS}, not {kind!r}")
    if kind == "images":
        encoding = "rgb"
    classes = [str(c) for c in classes]
    if kind != "images" and not 1 <= len(classes) <= 255:
        raise InputError(f"a stack needs 1 to 255 classes (255 is the ignore value); got {len(classes)}")
    if len(set(classes)) != len(classes):
        raise InputError(f"class names repeat: {classes}")
    ids = [str(s) for s in ids]
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        dup = next(s for s in ids if s in seen or seen.add(s))  # type: ignore[func-returns-value]
        raise InputError(f"image id {dup!r} appears twice")
    shapes_arr = np.asarray(shapes, dtype=np.int64).reshape(-1, 2)
    if shapes_arr.shape[0] != len(ids):
        raise InputError(f"{len(ids)} ids but {shapes_arr.shape[0]} shapes")
    if len(ids) and shapes_arr.min() < 1:
        raise InputError("every image needs a height and width of at least 1")
    layout = _layout(kind, encoding, len(classes), score_dtype)
    if padded_shape is None:
        padded_shape = (int(shapes_arr[:, 0].max(initial=1)), int(shapes_arr[:, 1].max(initial=1)))
    h_pad, w_pad = padded_shape
    if len(ids) and (shapes_arr[:, 0].max() > h_pad or shapes_arr[:, 1].max() > w_pad):
        raise InputError(f"an image is larger than the padded shape {padded_shape}")

    n = len(ids)
    shape = (n, h_pad, w_pad) + ((layout.channels,) if layout.channels else ())
    if chunks is None:
        chunks = default_chunks(n, h_pad, w_pad, layout.channels, layout.dtype.itemsize)
    chunks = tuple(int(c) for c in chunks)
    if len(chunks) != len(shape):
        raise InputError(f"chunks {chunks} do not match an array of rank {len(shape)}")
    chunks = tuple(max(1, min(c, s)) if s else 1 for c, s in zip(chunks, shape))

    from isle_fast.outputs import check_output, temp_path

    spath = str(path)
    remote = is_remote(spath)
    # an existing output is replaced only with overwrite and only when it is a store, an output folder
    # or a result the project wrote; never /, home or the working directory (isle_fast.outputs)
    final = check_output(spath, overwrite=overwrite)
    if remote:   # built under a temporary prefix, copied into place at commit (isle_fast/stores/remote.py)
        from isle_fast.stores.remote import check_bucket, temp_url

        check_bucket(spath)
        work = temp_url(spath)
    else:
        final.parent.mkdir(parents=True, exist_ok=True)
        work = str(temp_path(final.absolute()))   # absolute: cluster workers write into it too
    try:
        group = zarr.open_group(work, mode="w", zarr_format=3)
        comp = tuple(compressors) if compressors is not None else default_compressors(layout.array)
        group.create_array(layout.array, shape=shape, chunks=chunks, dtype=layout.dtype,
                           fill_value=layout.fill, compressors=comp)
        id_arr = group.create_array("ids", shape=(n,), dtype=str, chunks=(max(n, 1),),
                                    compressors=default_compressors()).with_config(WRITE_EVERY_CHUNK)
        if n:
            id_arr[:] = np.asarray(ids, dtype=object)
        sh = group.create_array("shapes", shape=(n, 2), dtype=np.int32, chunks=(max(n, 1), 2),
                                compressors=default_compressors()).with_config(WRITE_EVERY_CHUNK)
        if n:
            sh[:] = shapes_arr.astype(np.int32)
        attrs: dict[str, Any] = {
            "isle_format": FORMAT_VERSION,
            "kind": kind,
            "name": name or _default_name(spath),
            "classes": classes,
            "ignore_index": IGNORE_INDEX,
            "encoding": layout.array,
            "complete": False,
            "provenance": {"tool": "isle-fast", "version": __version__, **(provenance or {})},
        }
        if layout.array == "scores":
            attrs["score_scale"] = SCORE_SCALE if layout.dtype == np.uint8 else 1.0
        group.update_attributes(attrs)   # one write of zarr.json (attrs.update writes it once per key)
    except BaseException:  # Ctrl-C / SIGTERM while the skeleton is written must not leave it behind
        if not remote:
            shutil.rmtree(work, ignore_errors=True)
        else:
            from isle_fast.stores.remote import remove_prefix

            try:
                remove_prefix(work)
            except Exception:  # noqa: BLE001 - the first error is the one to report
                pass
        raise
    return StackWriter(spath, work, group, layout, overwrite)


def _default_name(path: str) -> str:
    base = path.rstrip("/").rsplit("/", 1)[-1]
    return base[:-5] if base.endswith(".zarr") else base


def _skip_bad_hint(*stacks: "Stack") -> str:
    """For a store ingested with ``--skip-bad``: how to evaluate on the ids it kept."""
    for s in stacks:
        try:
            skipped = (s.provenance or {}).get("skipped")
        except Exception:  # provenance of a damaged or foreign store: no hint
            skipped = None
        if skipped:
            return (f". {s.path} was ingested with {param('skip_bad', True)} ({len(skipped)} image(s) left out); "
                    f"to score it on the images it kept, ingest the ground truth aligned with it: "
                    f"isle ingest labels GT_DIR --kind gt --gt {s.path} -o gt-kept.zarr")
    return ""


def check_aligned(stacks: Sequence[Stack], *, same_classes: bool = True) -> None:
    """Raise :class:`AlignmentError` unless all stacks have the same ids, order, shapes (and classes).

    The message names the first store and image id that differ.
    """
    if not stacks:
        return
    ref = stacks[0]
    for s in stacks[1:]:
        if s.ids != ref.ids:
            if set(s.ids) != set(ref.ids):
                missing = sorted(set(ref.ids) - set(s.ids))
                extra = sorted(set(s.ids) - set(ref.ids))
                what = (f"lacks image id {missing[0]!r}" if missing else f"has extra image id {extra[0]!r}")
                raise AlignmentError(f"{s.path} {what} (compared with {ref.path}); "
                                     f"{len(missing)} missing, {len(extra)} extra{_skip_bad_hint(s, ref)}")
            first = next(i for i, (a, b) in enumerate(zip(ref.ids, s.ids)) if a != b)
            raise AlignmentError(f"{s.path} has the image ids of {ref.path} in another order "
                                 f"(position {first}: {s.ids[first]!r} vs {ref.ids[first]!r})")
        if not np.array_equal(s.shapes, ref.shapes):
            i = int(np.nonzero((s.shapes != ref.shapes).any(axis=1))[0][0])
            raise AlignmentError(f"image {ref.ids[i]!r} is {tuple(int(v) for v in s.shapes[i])} in {s.path} but "
                                 f"{tuple(int(v) for v in ref.shapes[i])} in {ref.path}")
        if s.padded_shape != ref.padded_shape:
            raise AlignmentError(f"{s.path} is padded to {s.padded_shape}, {ref.path} to {ref.padded_shape}")
        if same_classes and s.kind != "images" and ref.kind != "images" and s.classes != ref.classes:
            raise AlignmentError(f"{s.path} has classes {s.classes}, {ref.path} has {ref.classes}")


# -- fast chunk reads ---------------------------------------------------------------------

def _fast_chunk_spec(array: Any):
    """The direct reader's spec of ``array``, or None for Zarr's path (benchmarks switch it off here)."""
    return fast_chunk_spec(array, getattr(array, "_names", None))


_FAST_CHUNK_SPEC = _fast_chunk_spec


_zstd_content_size = zstd_content_size
