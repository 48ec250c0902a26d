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
    * ``.npy`` holding a pickled dict as written by IRN / PuzzleCAM / SEAM:
      ``keys`` (foreground classes present, 0-based over the foreground, so key
      ``k`` is class ``k + 1``) with ``high_res`` (or PuzzleCAM's ``hr_cam``)
      and/or ``cam``, each ``K x H x W``; ``high_res`` is preferred when both
      are present (as the IRN / PuzzleCAM evaluation does). SEAM-style dicts
      mapping an int foreground index to an ``H x W`` map are read the same way.
    * plain ``.npy`` / ``.npz`` arrays ``C x H x W`` or ``H x W x C`` (all
      classes, background included: stored as they are), ``(C-1)`` foreground
      slices (background added from the threshold), or ``K`` slices plus a
      ``keys`` array in an ``.npz``.
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

import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from isle_fast.stores.stack import IGNORE_INDEX, quantize_scores

__all__ = [
    "BadInput", "LABEL_EXTS", "SCORE_EXTS", "IMAGE_EXTS", "TIFF_EXTS",
    "voc_colormap", "label_header", "read_label", "check_labels",
    "score_header", "read_scores", "scores_to_store", "image_header", "read_image",
]

LABEL_EXTS = (".png", ".npy")
SCORE_EXTS = (".npy", ".npz")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
TIFF_EXTS = (".tif", ".tiff")

#: Values this far outside [0, 1] are float rounding (float16 CAMs), not an error; they are clipped.
SCORE_TOLERANCE = 1e-3

#: Names of the high-resolution and low-resolution CAM entries, in order of preference.
HIGH_RES_KEYS = ("high_res", "hr_cam")
LOW_RES_KEYS = ("cam",)
PLAIN_KEYS = ("scores", "probs", "prob", "prediction", "pred")


class BadInput(Exception):
    """One input is unusable; ``str(exc)`` is the reason (without the file name)."""


# --------------------------------------------------------------------------- labels
def voc_colormap(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map: ``(n, 3)`` uint8, colour of class index ``i`` in row ``i``."""
    from isle_fast.synthetic.datasets import voc_palette

    return np.asarray(voc_palette(), dtype=np.uint8)[:n].copy()


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


def label_header(path: str) -> tuple[int, int]:
    """``(H, W)`` of a label map from its header (PNG) or array header (``.npy``)."""
    if path.lower().endswith(".npy"):
        arr = _load_npy_plain(path, mmap=True)
        if arr.ndim != 2:
            raise BadInput(f"a label map must be a 2-D array, this one has shape {arr.shape}")
        return int(arr.shape[0]), int(arr.shape[1])
    with _open_pil(path) as im:
        w, h = im.size
        if im.mode not in ("P", "L", "I;16", "I", "RGB", "1"):
            raise BadInput(f"PNG mode {im.mode!r} is not a label map (palette, grayscale or VOC-coloured RGB)")
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
    # fast test first (two SIMD compares): every value >= C must be 255
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
        cm = voc_colormap(256).astype(np.int64)
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
            raise BadInput(f"RGB colour {(int(col) >> 16, (int(col) >> 8) & 255, int(col) & 255)} at row {r}, "
                           f"column {c} is not a VOC colour of the {num_classes} classes (nor the ignore colour)")
    return lut[inverse.reshape(packed.shape)]


def read_label(path: str, num_classes: int) -> np.ndarray:
    """Decode one label map (PNG or ``.npy``) to a validated ``(H, W)`` uint8 array."""
    if path.lower().endswith(".npy"):
        arr = _load_npy_plain(path)
        if arr.ndim != 2:
            raise BadInput(f"a label map must be a 2-D array, this one has shape {arr.shape}")
        return check_labels(arr, num_classes)
    im = _open_pil(path)
    try:
        with im:
            if im.mode == "RGB":
                return check_labels(_rgb_to_index(np.asarray(im), num_classes), num_classes)
            if im.mode not in ("P", "L", "I;16", "I", "1"):
                raise BadInput(f"PNG mode {im.mode!r} is not a label map (palette, grayscale or VOC-coloured RGB)")
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


# --------------------------------------------------------------------------- scores
def _npy_is_pickled(path: str) -> bool:
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                _, _, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                _, _, dtype = np.lib.format.read_array_header_2_0(f)
        except ValueError as exc:
            raise BadInput(f"not a NumPy .npy file: {exc}") from None
    return dtype.hasobject


def _load_npy_plain(path: str, mmap: bool = False) -> np.ndarray:
    try:
        if _npy_is_pickled(path):
            raise BadInput("holds pickled Python objects, not a plain array")
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except FileNotFoundError:
        raise BadInput("file does not exist") from None
    except BadInput:
        raise
    except (ValueError, OSError, EOFError) as exc:
        raise BadInput(f"corrupt or truncated .npy file: {exc}") from None


PICKLE_REFUSAL = (
    "holds a pickled Python dict (the IRN / PuzzleCAM CAM format); loading a pickle can run arbitrary "
    "code from the file, so it is refused. If you trust where the file came from, pass --allow-pickle "
    "(allow_pickle=True), or re-save it as .npz with arrays 'keys' and 'high_res'")


def _npz_members(path: str) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise BadInput("file does not exist") from None
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise BadInput("an array in the .npz holds pickled Python objects; re-save it as plain arrays") from None
        raise BadInput(f"corrupt .npz file: {exc}") from None
    except (OSError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise BadInput(f"corrupt or truncated .npz file: {exc}") from None


def _npz_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """Shapes of an .npz's members from their headers (no data read)."""
    out = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for name in zf.namelist():
                if not name.endswith(".npy"):
                    continue
                with zf.open(name) as f:
                    version = np.lib.format.read_magic(f)
                    if version == (1, 0):
                        shape, _, _ = np.lib.format.read_array_header_1_0(f)
                    else:
                        shape, _, _ = np.lib.format.read_array_header_2_0(f)
                out[name[:-4]] = tuple(int(s) for s in shape)
    except FileNotFoundError:
        raise BadInput("file does not exist") from None
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise BadInput(f"corrupt or truncated .npz file: {exc}") from None
    return out


def _as_array(v: Any) -> np.ndarray:
    if hasattr(v, "detach"):  # a torch tensor pickled by IRN ("cam": strided_cam.cpu())
        v = v.detach().cpu().numpy()
    return np.asarray(v)


def _load_raw(path: str, allow_pickle: bool) -> dict[str, Any]:
    """The members of a score file: a dict of name -> array (a plain array is ``{'': arr}``)."""
    low = path.lower()
    if low.endswith(".npz"):
        return _npz_members(path)
    try:
        pickled = _npy_is_pickled(path)
    except FileNotFoundError:
        raise BadInput("file does not exist") from None
    if not pickled:
        return {"": _load_npy_plain(path)}
    if not allow_pickle:
        raise BadInput(PICKLE_REFUSAL)
    try:
        obj = np.load(path, allow_pickle=True)
        if obj.shape == ():
            obj = obj.item()
    except Exception as exc:  # unpickling can raise anything
        raise BadInput(f"cannot be unpickled: {type(exc).__name__}: {exc}") from None
    if isinstance(obj, dict):
        if obj and all(isinstance(k, (int, np.integer)) for k in obj):  # SEAM: {fg index: H x W cam}
            keys = sorted(int(k) for k in obj)
            return {"keys": np.asarray(keys), "high_res": np.stack([_as_array(obj[k]) for k in keys])}
        return {str(k): v for k, v in obj.items()}
    if isinstance(obj, np.ndarray) and obj.dtype != object:
        return {"": obj}
    raise BadInput(f"holds a pickled {type(obj).__name__}, not a dict of CAMs or an array")


def _pick(members: dict[str, Any], path: str) -> tuple[str, Any, np.ndarray | None]:
    """Choose the score entry of a file: (name, value, keys or None)."""
    keys = members.get("keys")
    for name in HIGH_RES_KEYS + LOW_RES_KEYS:
        if name in members:
            return name, members[name], (None if keys is None else _as_array(keys).astype(np.int64).ravel())
    if keys is not None:
        raise BadInput(f"has 'keys' but none of {HIGH_RES_KEYS + LOW_RES_KEYS}; members: {sorted(members)}")
    if len(members) == 1:
        name, v = next(iter(members.items()))
        return name, v, None
    for name in PLAIN_KEYS + ("arr_0",):
        if name in members:
            return name, members[name], None
    raise BadInput(f"has several arrays {sorted(members)} and none is named "
                   f"{HIGH_RES_KEYS + LOW_RES_KEYS + PLAIN_KEYS}")


def _layout(shape: tuple[int, ...], num_classes: int, keys: np.ndarray | None,
            expect: tuple[int, int] | None, name: str) -> tuple[int, str]:
    """(channel axis, meaning) of a score array; meaning is 'full', 'fg' or 'keys'."""
    if len(shape) == 2 and keys is not None and len(keys) == 1:
        return -1, "keys2d"
    if len(shape) != 3:
        raise BadInput(f"score array {name or ''} has shape {shape}; expected C x H x W or H x W x C".replace("  ", " "))
    nk = None if keys is None else len(keys)
    options = []
    for axis in (0, 2):
        n = shape[axis]
        spatial = tuple(s for i, s in enumerate(shape) if i != axis)
        if expect is not None and spatial != tuple(expect):
            continue
        if nk is not None:
            if n == nk:
                options.append((axis, "keys"))
        elif n == num_classes:
            options.append((axis, "full"))
        elif n == num_classes - 1:
            options.append((axis, "fg"))
    if not options:
        if nk is not None:
            raise BadInput(f"has {nk} keys but its scores have shape {shape}"
                           + (f" (image is {expect[0]} x {expect[1]})" if expect else ""))
        if expect is not None and not any(tuple(s for i, s in enumerate(shape) if i != a) == tuple(expect)
                                          for a in (0, 2)):
            raise BadInput(f"scores have shape {shape}, which does not match the image size "
                           f"{expect[0]} x {expect[1]}")
        raise BadInput(f"scores have shape {shape}: the class count disagrees with the {num_classes} classes "
                       f"(expected {num_classes} slices, or {num_classes - 1} foreground slices)")
    return options[0]


def score_header(path: str, num_classes: int, allow_pickle: bool,
                 expect: tuple[int, int] | None = None) -> tuple[int, int]:
    """``(H, W)`` of a score file, reading only headers where the format allows."""
    low = path.lower()
    if low.endswith(".npy") and not _npy_is_pickled_safe(path):
        arr = _load_npy_plain(path, mmap=True)
        shapes = {"": tuple(arr.shape)}
    elif low.endswith(".npz"):
        shapes = _npz_shapes(path)
    else:
        arr3 = read_scores(path, num_classes, allow_pickle=allow_pickle, expect=expect, normalize=True,
                           bg_threshold=0.0)
        return int(arr3.shape[0]), int(arr3.shape[1])
    name, shape, keys = _pick(shapes, path)
    if keys is not None:  # keys are data: read them
        keys = _npz_members(path)["keys"].astype(np.int64).ravel()
    axis, meaning = _layout(tuple(shape), num_classes, keys, expect, name)
    if meaning == "keys2d":
        return int(shape[0]), int(shape[1])
    spatial = [s for i, s in enumerate(shape) if i != axis]
    return int(spatial[0]), int(spatial[1])


def _npy_is_pickled_safe(path: str) -> bool:
    try:
        return _npy_is_pickled(path)
    except FileNotFoundError:
        raise BadInput("file does not exist") from None


def _upsample(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of ``(K, h, w)`` float maps to ``(K, H, W)`` (half-pixel centres, align_corners=False)."""
    from PIL import Image

    h, w = size
    out = np.empty((arr.shape[0], h, w), dtype=np.float32)
    for k in range(arr.shape[0]):
        im = Image.fromarray(np.ascontiguousarray(arr[k], dtype=np.float32), mode="F")
        out[k] = np.asarray(im.resize((w, h), Image.BILINEAR))
    return out


def read_scores(path: str, num_classes: int, *, allow_pickle: bool = False, bg_threshold: float = 0.15,
                normalize: bool = False, expect: tuple[int, int] | None = None,
                upsample: bool = False) -> np.ndarray:
    """Load one score file as a validated full ``(H, W, C)`` float32 stack in [0, 1].

    Parameters
    ----------
    path : str
        ``.npy`` (plain array or pickled dict) or ``.npz``.
    num_classes : int
        C, background included.
    allow_pickle : bool
        Load pickled dicts (they can run code when loaded).
    bg_threshold : float
        Background score of foreground-only inputs.
    normalize : bool
        Max-normalise each class slice (negative values become 0, each slice
        is divided by its maximum when that is positive), as IRN does, instead
        of refusing values outside [0, 1].
    expect : (int, int), optional
        The image size (from ground truth): decides ambiguous layouts and is
        checked.
    upsample : bool
        Bilinearly resize a low-resolution ``cam`` (the only entry) to
        ``expect`` instead of refusing it.
    """
    members = _load_raw(path, allow_pickle)
    name, value, keys = _pick(members, path)
    arr = _as_array(value)
    if arr.dtype.kind not in "fiub":
        raise BadInput(f"score array {name!r} has dtype {arr.dtype}, not numbers")
    axis, meaning = _layout(tuple(arr.shape), num_classes, keys, None if name in LOW_RES_KEYS else expect, name)
    if meaning == "keys2d":
        arr = arr[None]
        axis = 0
    if axis == 2:
        arr = np.moveaxis(arr, 2, 0)
    arr = np.asarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        k, r, c = (int(v) for v in np.argwhere(~np.isfinite(arr))[0])
        raise BadInput(f"score of slice {k} at row {r}, column {c} is {arr[k, r, c]} (NaN / Inf are not scores)")
    if expect is not None and arr.shape[1:] != tuple(expect):
        if name in LOW_RES_KEYS and upsample:
            arr = _upsample(arr, expect)
        elif name in LOW_RES_KEYS:
            raise BadInput(f"holds only a low-resolution 'cam' of {arr.shape[1]} x {arr.shape[2]} but the image is "
                           f"{expect[0]} x {expect[1]}; pass --upsample (upsample=True) to resize it bilinearly, "
                           f"or save the full-resolution 'high_res'")
        else:
            raise BadInput(f"scores are {arr.shape[1]} x {arr.shape[2]} but the image is {expect[0]} x {expect[1]}")
    if normalize:
        arr = np.maximum(arr, 0.0)
        peak = arr.reshape(arr.shape[0], -1).max(axis=1)
        peak[peak <= 0] = 1.0
        arr /= peak[:, None, None]
    else:
        lo, hi = float(arr.min(initial=0.0)), float(arr.max(initial=0.0))
        if lo < -SCORE_TOLERANCE or hi > 1 + SCORE_TOLERANCE:
            raise BadInput(f"scores range over [{lo:.4g}, {hi:.4g}], outside [0, 1]; pass --normalize "
                           f"(normalize=True) to max-normalise each class slice")
        np.clip(arr, 0.0, 1.0, out=arr)
    h, w = arr.shape[1:]
    if meaning == "full":
        full = arr
    else:
        if meaning == "fg":
            keys = np.arange(num_classes - 1)
        keys = np.asarray(keys, dtype=np.int64)
        if len(keys) and (keys.min() < 0 or keys.max() >= num_classes - 1):
            raise BadInput(f"keys {keys.tolist()} are outside [0, {num_classes - 1}) (0-based foreground classes: "
                           f"key k is class k+1); the class count disagrees")
        if len(np.unique(keys)) != len(keys):
            raise BadInput(f"keys {keys.tolist()} repeat a class")
        full = np.zeros((num_classes, h, w), dtype=np.float32)
        full[0] = bg_threshold
        full[keys + 1] = arr
    return np.moveaxis(full, 0, 2)


def scores_to_store(scores: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """[0, 1] float scores in the store's dtype, each pixel's argmax kept (:func:`quantize_scores`)."""
    if dtype == np.uint8 and scores.dtype == np.uint8:
        return scores
    return quantize_scores(scores, dtype)


def stem(path: str | os.PathLike) -> str:
    """File name without its (last) extension."""
    return Path(path).name.rsplit(".", 1)[0]
