"""Readers and validators for the pseudo-label formats :mod:`isle_fast.stores.ingest` accepts.

Every reader is a pure function of one file (or one array) that returns the
image's data already converted to the store's encoding and dtype, or raises
:class:`BadInput` with a reason. :mod:`isle_fast.stores.ingest` turns a
:class:`BadInput` into an :class:`~isle_fast.errors.InputError` naming the file
and image id (or, with ``skip_bad``, into a skipped-list entry).

Formats
-------
Label maps (encoding ``labels``)
    PNG in palette (``P``) or grayscale (``L``, ``I;16``, ``I``) mode, the
    pixel value being the class index; 255 is ignore. RGB PNGs coloured with
    the PASCAL VOC colour map are mapped back to indices (the boundary colour
    (224, 224, 192) becomes 255); any other colour is an error. 2-D integer
    ``.npy`` arrays are accepted too. Any value outside ``[0, C)`` other than
    255 is an error.
Score files (encoding ``scores``)
    * ``.npy`` dicts as the public WSSS code writes them with ``np.save``:
      IRN (``keys`` 0-based + ``high_res`` / ``cam``), PuzzleCAM (``keys``
      with the background first + ``hr_cam`` / ``cam``, and its random-walk
      ``rw``), SEAM / PSA CAMs (``{class index: H x W}``) and PSA / SEAM CRF
      outputs (``{0: background, k + 1: class k}``); see
      :mod:`isle_fast.stores.cams` for each layout and how it is recognised.
      They are pickles, loaded by :mod:`isle_fast.stores.safe_pickle`, which
      builds only arrays, dicts and the like (torch tensors included) and
      refuses anything else without running it.
    * plain ``.npy`` / ``.npz`` arrays ``C x H x W`` or ``H x W x C`` (all
      classes, background included: stored as they are), ``(C-1)`` foreground
      slices (background added from the threshold), or ``K`` slices plus a
      ``keys`` array in an ``.npz``. Headers are checked against the bytes
      the file holds and against the ground truth's image size before any
      data is read, so a damaged or forged header is an error, never a huge
      allocation.
    Foreground-only inputs become a full C-class stack: the background slice is
    the constant ``bg_threshold`` and absent classes are 0, so the argmax of the
    stored stack is exactly the public evaluation code's decode (pad a constant
    slice in front, argmax, first index wins ties), in every score dtype
    (:func:`~isle_fast.stores.stack.quantize_scores` keeps each pixel's argmax).
RGB images (encoding ``rgb``)
    JPEG / PNG / anything PIL reads, converted to RGB (EXIF orientation is not
    applied: label maps are aligned with the stored pixel grid).
"""

from __future__ import annotations

import io
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from isle_fast.errors import param
from isle_fast.stores.cams import BadCam, CamSlices, interpret, is_class_dict
from isle_fast.stores.safe_pickle import UnsafePickle, load_npy_payload
from isle_fast.stores.stack import IGNORE_INDEX, quantize_scores

__all__ = [
    "BadInput", "LABEL_EXTS", "SCORE_EXTS", "IMAGE_EXTS", "TIFF_EXTS",
    "label_header", "read_label", "check_labels", "load_pickle_npy",
    "score_header", "read_scores", "scores_to_store", "image_header", "read_image",
]

LABEL_EXTS = (".png", ".npy")
SCORE_EXTS = (".npy", ".npz")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
TIFF_EXTS = (".tif", ".tiff")

#: Values this far outside [0, 1] are float rounding (float16 CAMs), not an error; they are clipped.
SCORE_TOLERANCE = 1e-3



class BadInput(Exception):
    """One input is unusable; ``str(exc)`` is the reason (without the file name)."""


# --------------------------------------------------------------------------- labels
def _open_pil(path: str):
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(path)
    except FileNotFoundError:
        raise BadInput("file does not exist") from None
    except UnidentifiedImageError:
        raise BadInput("not an image PIL can read") from None
    except OSError as exc:
        raise BadInput(f"cannot be opened: {exc}") from None


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

#: PNG (colour type, bit depth) pairs that PIL opens in a label-map mode (1, L, I;16, RGB, P).
_LABEL_PNG_TYPES = {(0, 1), (0, 2), (0, 4), (0, 8), (0, 16), (2, 8), (2, 16), (3, 1), (3, 2), (3, 4), (3, 8)}


def png_size(path: str) -> tuple[int, int] | None:
    """``(H, W)`` from a PNG's IHDR chunk (the first 33 bytes), or None unless it is a label-map PNG.

    None means "ask PIL": not a PNG, a malformed header, or a colour type that
    is not a label map (PIL's open then gives the exact error).
    """
    try:
        with open(path, "rb") as f:
            head = f.read(33)
    except OSError:
        return None
    if len(head) < 33 or head[:8] != _PNG_SIGNATURE or head[12:16] != b"IHDR" or head[8:12] != b"\0\0\0\r":
        return None
    w, h = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    depth, colour = head[24], head[25]
    if not (0 < w < 2**31 and 0 < h < 2**31) or (colour, depth) not in _LABEL_PNG_TYPES:
        return None
    return h, w


def label_header(path: str) -> tuple[int, int]:
    """``(H, W)`` of a label map from its header (PNG: the IHDR bytes alone) or array header (``.npy``)."""
    if path.lower().endswith(".npy"):
        arr = _load_npy_plain(path, mmap=True)
        if arr.ndim != 2:
            raise BadInput(f"a label map must be a 2-D array, this one has shape {arr.shape}")
        return int(arr.shape[0]), int(arr.shape[1])
    hw = png_size(path)
    if hw is not None:
        return hw
    with _open_pil(path) as im:
        w, h = im.size
        if im.mode not in ("P", "L", "I;16", "I", "RGB", "1"):
            raise BadInput(f"PNG mode {im.mode!r} is not a label map (palette, grayscale or VOC-coloured "
                           f"RGB)")
        return int(h), int(w)


def check_labels(arr: np.ndarray, num_classes: int) -> np.ndarray:
    """Validate a label map and return it as uint8; :class:`BadInput` names the first bad value and pixel."""
    if arr.dtype.kind not in "iub":
        raise BadInput(f"label values must be integers, not {arr.dtype}")
    if arr.dtype != np.uint8:
        a = arr.astype(np.int64, copy=False)
        bad = ((a < 0) | (a >= num_classes)) & (a != IGNORE_INDEX)
        if bad.any():
            r, c = (int(v) for v in np.argwhere(bad)[0][:2])
            raise BadInput(f"value {int(a[r, c])} at row {r}, column {c} is outside [0, {num_classes}) "
                           f"and not {IGNORE_INDEX} (ignore)")
        return a.astype(np.uint8)
    if num_classes < IGNORE_INDEX and arr.size and int(arr.max()) < num_classes:
        return arr  # one SIMD pass: no ignore and no bad value (most pseudo-label maps)
    # fast test next (two SIMD compares): every value >= C must be 255
    if num_classes < IGNORE_INDEX and np.count_nonzero(arr >= num_classes) != np.count_nonzero(arr == IGNORE_INDEX):
        bad = (arr >= num_classes) & (arr != IGNORE_INDEX)
        if bad.any():
            r, c = (int(x) for x in np.argwhere(bad)[0][:2])
            v = int(arr[r, c])
            raise BadInput(f"value {v} at row {r}, column {c} is outside [0, {num_classes}) "
                           f"and not {IGNORE_INDEX} (ignore)")
    return arr


_VOC_PACKED: np.ndarray | None = None


def _rgb_to_index(rgb: np.ndarray, num_classes: int) -> np.ndarray:
    global _VOC_PACKED
    if _VOC_PACKED is None:
        from isle_fast.stores.png import voc_palette

        cm = voc_palette().astype(np.int64)
        _VOC_PACKED = (cm[:, 0] << 16) | (cm[:, 1] << 8) | cm[:, 2]
    packed = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
    colours, inverse = np.unique(packed, return_inverse=True)
    lut = np.empty(len(colours), dtype=np.uint8)
    for j, col in enumerate(colours):
        hit = np.nonzero(_VOC_PACKED[:num_classes] == col)[0]
        if len(hit):
            lut[j] = hit[0]
        elif col == _VOC_PACKED[IGNORE_INDEX]:
            lut[j] = IGNORE_INDEX
        else:
            r, c = (int(x) for x in np.argwhere(packed == col)[0])
            raise BadInput(f"RGB colour {(int(col) >> 16, (int(col) >> 8) & 255, int(col) & 255)} at row "
                           f"{r}, column {c} is not a VOC colour of the {num_classes} classes (nor the "
                           f"ignore colour)")
    return lut[inverse.reshape(packed.shape)]


def _plain_png(path: str) -> np.ndarray | None:
    """The rows of a plain label PNG (:func:`isle_fast.stores.png.decode_label_png_rows`: ``(H, W + 1)``, the
    values in ``[:, 1:]``, column 0 zero), or None: PIL reads it."""
    from isle_fast.stores.png import decode_label_png_rows

    try:   # os.open / os.read: a third of the system calls of open().read() (no buffer, isatty, seeks)
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        size = os.fstat(fd).st_size
        data = os.read(fd, size + 1)        # the whole file in one read (a regular file reads short only at its end)
        if len(data) > size:                # it grew since the fstat: the rest too
            parts = [data]
            while more := os.read(fd, 1 << 20):
                parts.append(more)
            data = b"".join(parts)
    except OSError:
        return None
    finally:
        os.close(fd)
    return decode_label_png_rows(data)


def check_label_rows(rows: np.ndarray, num_classes: int) -> np.ndarray:
    """:func:`check_labels` of ``rows[:, 1:]`` (``rows``: :func:`_plain_png`'s, column 0 all zero), returned.

    The same checks and messages; the range test runs over the contiguous ``rows``, whose zero
    filter bytes are a valid label and change neither its maximum nor its verdict.
    """
    values = rows[:, 1:]
    if num_classes >= IGNORE_INDEX or not values.size:
        return check_labels(values, num_classes)
    flat = rows.reshape(-1)
    if int(flat.max()) < num_classes:
        return values           # one contiguous pass: no ignore and no bad value (most pseudo-label maps)
    # v - C wrapped to uint8: below 255 - C exactly for the bad values C <= v < 255; 0..C-1 and 255 stay >= it
    if int(np.subtract(flat, np.uint8(num_classes), dtype=np.uint8).min()) >= IGNORE_INDEX - num_classes:
        return values
    return check_labels(values, num_classes)    # names the first bad value and pixel


def read_label(path: str, num_classes: int) -> np.ndarray:
    """Decode one label map (PNG or ``.npy``) to a validated ``(H, W)`` uint8 array."""
    if path.lower().endswith(".npy"):
        arr = _load_npy_plain(path)
        if arr.ndim != 2:
            raise BadInput(f"a label map must be a 2-D array, this one has shape {arr.shape}")
        return check_labels(arr, num_classes)
    plain = _plain_png(path)
    if plain is not None:   # an 8-bit palette / grayscale PNG with unfiltered rows: decoded on zlib directly
        return check_label_rows(plain, num_classes)
    im = _open_pil(path)
    try:
        with im:
            if im.mode == "RGB":
                return check_labels(_rgb_to_index(np.asarray(im), num_classes), num_classes)
            if im.mode not in ("P", "L", "I;16", "I", "1"):
                raise BadInput(f"PNG mode {im.mode!r} is not a label map (palette, grayscale or VOC-coloured "
                               f"RGB)")
            arr = np.asarray(im)
    except BadInput:
        raise
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # truncated / corrupt data
        raise BadInput(f"corrupt or truncated image: {exc}") from None
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    return check_labels(arr, num_classes)


# --------------------------------------------------------------------------- images
def image_header(path: str) -> tuple[int, int]:
    """``(H, W)`` of an RGB image from its header."""
    with _open_pil(path) as im:
        w, h = im.size
        return int(h), int(w)


def read_image(path: str) -> np.ndarray:
    """Decode one image to ``(H, W, 3)`` uint8 RGB."""
    im = _open_pil(path)
    try:
        with im:
            rgb = im.convert("RGB") if im.mode != "RGB" else im
            arr = np.asarray(rgb)
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise BadInput(f"corrupt or truncated image: {exc}") from None
    return arr


# --------------------------------------------------------------------------- .npy / .npz files
@dataclass(frozen=True)
class _Header:
    """What an array's ``.npy`` header claims (checked against the bytes the file really holds)."""

    shape: tuple[int, ...]
    dtype: np.dtype
    fortran: bool


def _read_header(f: Any) -> tuple[_Header, int]:
    """The header of the ``.npy`` stream ``f`` (positioned at its start) and the data offset."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f, max_header_size=2**20)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f, max_header_size=2**20)
    return _Header(tuple(int(s) for s in shape), dtype, bool(fortran)), f.tell()


def _claimed_bytes(h: _Header) -> int:
    n = 1
    for s in h.shape:
        n *= s
    return n * h.dtype.itemsize


def _npy_header(path: str) -> _Header:
    """Header of a ``.npy`` file; a plain array's claimed size must be the size of the data that follows."""
    try:
        with open(path, "rb") as f:
            head, offset = _read_header(f)
    except FileNotFoundError:
        raise BadInput("file does not exist") from None
    except (ValueError, OSError, EOFError, SyntaxError) as exc:
        raise BadInput(f"not a NumPy .npy file: {exc}") from None
    if not head.dtype.hasobject:
        have = os.path.getsize(path) - offset
        if have != _claimed_bytes(head):
            raise BadInput(f"corrupt or truncated .npy file: its header claims shape {head.shape} of "
                           f"{head.dtype} ({_claimed_bytes(head):,} bytes) but {have:,} bytes follow it")
    return head


def _load_npy_plain(path: str, mmap: bool = False) -> np.ndarray:
    head = _npy_header(path)
    if head.dtype.hasobject:
        raise BadInput("holds pickled Python objects, not a plain array")
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except FileNotFoundError:
        raise BadInput("file does not exist") from None
    except (ValueError, OSError, EOFError) as exc:
        raise BadInput(f"corrupt or truncated .npy file: {exc}") from None


def _refusal(exc: UnsafePickle) -> BadInput:
    return BadInput(f"its pickle {exc}; it was refused without running anything. The CAM and label files of "
                    f"the public WSSS code (np.save of dicts of arrays) load without {param('allow_pickle')}; "
                    f"pass {param('allow_pickle', True)} only for a file you trust, to load it with Python's "
                    f"full unpickler, which can run code from the file")


def _unpickle(raw: bytes, allow_pickle: bool, full: Callable[[], Any]) -> Any:
    """Safely unpickle a ``.npy`` payload; with ``allow_pickle``, a refused one goes to ``full()``."""
    try:
        return load_npy_payload(raw)
    except UnsafePickle as exc:
        if not allow_pickle:
            raise _refusal(exc) from None
    try:
        return full()
    except Exception as exc:  # the full unpickler can raise anything
        raise BadInput(f"cannot be unpickled: {type(exc).__name__}: {exc}") from None


def load_pickle_npy(path: str | os.PathLike, allow_pickle: bool = False) -> Any:
    """The object ``np.save`` pickled into a ``.npy`` (a dict for CAM and label files), loaded safely.

    The file is read through :mod:`isle_fast.stores.safe_pickle`, which builds
    only dicts, lists, tuples, NumPy arrays / dtypes / scalars and torch tensors
    (as NumPy arrays) and refuses anything else without running it. With
    ``allow_pickle`` a file it refuses is loaded with ``np.load(...,
    allow_pickle=True)`` (Python's full unpickler: only for trusted files).
    A 0-d object array (what ``np.save`` makes of a dict) is unwrapped.

    Raises
    ------
    BadInput
        Missing, damaged, or refused (the message says what the pickle asked for).
    """
    path = str(path)
    head = _npy_header(path)
    if not head.dtype.hasobject:
        return _load_npy_plain(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise BadInput(f"cannot be read: {exc}") from None
    obj = _unpickle(raw, allow_pickle, lambda: np.load(path, allow_pickle=True))
    if isinstance(obj, np.ndarray) and obj.dtype == object and obj.shape == ():
        obj = obj.item()
    return obj


def _npz_index(path: str) -> dict[str, _Header]:
    """Headers of an ``.npz``'s members, each checked against the member's real size (no data is read)."""
    out: dict[str, _Header] = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                name = info.filename[:-4]
                # deflate cannot expand data more than about 1032:1; a directory claiming more is forged
                if info.compress_type == zipfile.ZIP_STORED:
                    plausible = info.file_size == info.compress_size
                else:
                    plausible = info.file_size <= 1100 * info.compress_size + 4096
                if not plausible:
                    raise BadInput(f"corrupt .npz file: member {name!r} claims {info.file_size:,} bytes "
                                   f"stored in {info.compress_size:,}")
                with zf.open(info) as f:
                    head, offset = _read_header(f)
                if not head.dtype.hasobject and _claimed_bytes(head) != info.file_size - offset:
                    raise BadInput(f"corrupt or truncated .npz file: the header of member {name!r} claims "
                                   f"shape {head.shape} of {head.dtype} ({_claimed_bytes(head):,} bytes) but "
                                   f"the member holds {info.file_size - offset:,}")
                out[name] = head
    except FileNotFoundError:
        raise BadInput("file does not exist") from None
    except BadInput:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, SyntaxError, KeyError) as exc:
        raise BadInput(f"corrupt or truncated .npz file: {exc}") from None
    if not out:
        raise BadInput("an .npz file without arrays")
    return out


def _npz_member(path: str, name: str, head: _Header, allow_pickle: bool) -> Any:
    """One member of an ``.npz`` (already checked by :func:`_npz_index`); object members load safely."""
    try:
        with zipfile.ZipFile(path) as zf:
            raw = zf.read(name + ".npy")
    except (zipfile.BadZipFile, OSError, EOFError, KeyError) as exc:
        raise BadInput(f"corrupt or truncated .npz file: {exc}") from None
    if head.dtype.hasobject:
        def full() -> Any:
            with np.load(path, allow_pickle=True) as z:
                return z[name]
        return _unpickle(raw, allow_pickle, full)
    try:
        return np.lib.format.read_array(io.BytesIO(raw), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise BadInput(f"corrupt .npz member {name!r}: {exc}") from None


class _ScoreFile:
    """A score file's members: headers first, data on demand (so a layout or size error costs no read)."""

    def __init__(self, path: str, allow_pickle: bool):
        self.path = path
        self.allow_pickle = allow_pickle
        self.npz = path.lower().endswith(".npz")
        self.members: dict[Any, Any]
        if self.npz:
            self.heads = _npz_index(path)
            self.members = dict(self.heads)
            if "keys" in self.members:  # keys are data: needed to recognise the layout
                self.members["keys"] = _npz_member(path, "keys", self.heads["keys"], allow_pickle)
            return
        head = _npy_header(path)
        if not head.dtype.hasobject:
            self.members = {"": head}
            return
        obj = load_pickle_npy(path, allow_pickle)
        if isinstance(obj, dict):
            self.members = dict(obj)
        elif isinstance(obj, np.ndarray) and obj.dtype != object:
            self.members = {"": obj}
        else:
            raise BadInput(f"holds a pickled {type(obj).__name__}, not a dict of CAMs or an array")
        if not is_class_dict(self.members):
            self.members = {str(k): v for k, v in self.members.items()}

    def value(self, entry: str) -> Any:
        """The data of one entry (the whole dict for a dict keyed by class)."""
        if is_class_dict(self.members):
            return self.members
        v = self.members[entry]
        if isinstance(v, _Header):
            v = (_npz_member(self.path, entry, v, self.allow_pickle) if self.npz
                 else _load_npy_plain(self.path, mmap=True))
        return v


def _interpret(sf: _ScoreFile, num_classes: int, layout: str, labels: Any,
               expect: tuple[int, int] | None) -> CamSlices:
    try:
        return interpret(sf.members, num_classes, layout=layout, labels=labels, expect=expect)
    except BadCam as exc:
        raise BadInput(str(exc)) from None


def score_header(path: str, num_classes: int, allow_pickle: bool = False,
                 expect: tuple[int, int] | None = None, *, cam_layout: str = "auto",
                 labels: Any = None) -> tuple[int, int]:
    """``(H, W)`` of a score file, from headers where the format allows (plain ``.npy`` / ``.npz``)."""
    sf = _ScoreFile(path, allow_pickle)
    sl = _interpret(sf, num_classes, cam_layout, labels, expect)
    if sl.low_res:
        raise BadInput(f"holds only a low-resolution 'cam'; its image size is unknown without the ground "
                       f"truth (give {param('gt')}, and {param('upsample', True)} to resize it)")
    if is_class_dict(sf.members):
        shape = tuple(np.shape(sf.members[sl.take[0]]))
    else:
        v = sf.members[sl.entry]
        shape = tuple(int(s) for s in getattr(v, "shape", np.shape(v)))
        if sl.axis is not None:
            shape = tuple(s for i, s in enumerate(shape) if i != sl.axis)
    return int(shape[0]), int(shape[1])


def _upsample(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of ``(K, h, w)`` float maps to ``(K, H, W)`` (half-pixel centres, align_corners=False)."""
    from PIL import Image

    h, w = size
    out = np.empty((arr.shape[0], h, w), dtype=np.float32)
    for k in range(arr.shape[0]):
        im = Image.fromarray(np.ascontiguousarray(arr[k], dtype=np.float32), mode="F")
        out[k] = np.asarray(im.resize((w, h), Image.Resampling.BILINEAR))
    return out


def read_scores(path: str, num_classes: int, *, allow_pickle: bool = False, bg_threshold: float = 0.15,
                normalize: bool = False, expect: tuple[int, int] | None = None,
                upsample: bool = False, cam_layout: str = "auto", labels: Any = None) -> np.ndarray:
    """Load one score file as a validated full ``(H, W, C)`` float32 stack in [0, 1].

    Parameters
    ----------
    path : str
        ``.npy`` (plain array or pickled dict, loaded safely: see
        :func:`load_pickle_npy`) or ``.npz``.
    num_classes : int
        C, background included.
    allow_pickle : bool
        Load pickles the safe loader refuses with Python's full unpickler
        (it can run code from the file).
    bg_threshold : float
        Background score where the file has no background slice of its own.
    normalize : bool
        Max-normalise each class slice (negative values become 0, each slice
        is divided by its maximum when that is positive), as IRN does, instead
        of refusing values outside [0, 1].
    expect : (int, int), optional
        The image size (from ground truth): decides ambiguous shapes and is
        checked before any data is read.
    upsample : bool
        Bilinearly resize a low-resolution ``cam`` (the only entry) to
        ``expect`` instead of refusing it.
    cam_layout : {'auto', 'irn', 'puzzlecam', 'seam', 'psa-crf'}
        The layout (:mod:`isle_fast.stores.cams`); ``auto`` recognises it.
    labels : sequence of int, optional
        The image's image-level labels (foreground class indices): they
        decide ambiguous layouts and which classes a file without keys holds.
    """
    sf = _ScoreFile(path, allow_pickle)
    sl = _interpret(sf, num_classes, cam_layout, labels, expect)
    arr = sl.extract(sf.value(sl.entry))
    if arr.dtype.kind not in "fiub":
        raise BadInput(f"score array {sl.entry!r} has dtype {arr.dtype}, not numbers")
    arr = np.asarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        k, r, c = (int(v) for v in np.argwhere(~np.isfinite(arr))[0])
        raise BadInput(f"score of slice {k} at row {r}, column {c} is {arr[k, r, c]} (NaN / Inf are not "
                       f"scores)")
    if expect is not None and arr.shape[1:] != tuple(expect):
        if sl.low_res and upsample:
            arr = _upsample(arr, expect)
        elif sl.low_res:
            raise BadInput(f"holds only a low-resolution 'cam' of {arr.shape[1]} x {arr.shape[2]} but the "
                           f"image is {expect[0]} x {expect[1]}; pass {param('upsample', True)} to resize "
                           f"it bilinearly, or save the full-resolution 'high_res'")
        else:
            raise BadInput(f"scores are {arr.shape[1]} x {arr.shape[2]} but the image is {expect[0]} x "
                           f"{expect[1]}")
    if normalize:
        arr = np.maximum(arr, 0.0)
        peak = arr.reshape(arr.shape[0], -1).max(axis=1, initial=0.0)
        peak[peak <= 0] = 1.0
        arr /= peak[:, None, None]
    else:
        lo, hi = float(arr.min(initial=0.0)), float(arr.max(initial=0.0))
        if lo < -SCORE_TOLERANCE or hi > 1 + SCORE_TOLERANCE:
            raise BadInput(f"scores range over [{lo:.4g}, {hi:.4g}], outside [0, 1]; pass "
                           f"{param('normalize', True)} to max-normalise each class slice")
        np.clip(arr, 0.0, 1.0, out=arr)
    h, w = arr.shape[1:]
    full = np.zeros((num_classes, h, w), dtype=np.float32)
    if not sl.own_background:
        full[0] = bg_threshold
    full[list(sl.classes)] = arr
    return np.moveaxis(full, 0, 2)


def scores_to_store(scores: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """[0, 1] float scores in the store's dtype, each pixel's argmax kept (:func:`quantize_scores`)."""
    if dtype == np.uint8 and scores.dtype == np.uint8:
        return scores
    return quantize_scores(scores, dtype)


def stem(path: str | os.PathLike) -> str:
    """File name without its (last) extension."""
    return Path(path).name.rsplit(".", 1)[0]
