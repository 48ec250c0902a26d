"""A synthetic PASCAL-VOC-like data set with simulated WSSS pseudo-label sets.

Every demo, test and benchmark of isle-fast runs on this data. It imitates
what a user of ISLE has: RGB images of the 20 VOC classes, ground truth with
VOC's 255 band along object boundaries, and several *component* pseudo-label
sets (the paper's PuzzleCAM, CLIMS, PMM, DRS) whose quality differs per
class, plus *soft* sets (class activation maps) in the ``.npy`` dict form the
public WSSS code bases write.

What is simulated
-----------------
Images
    A smooth, low-saturation background with fine noise, and 1 to
    ``max_objects`` objects (ellipses, rectangles, convex polygons, blobs;
    each class prefers one shape). Every class has a fixed colour pair and
    texture (stripes, checks, dots, rings or blotches, with its own period
    and orientation), the same for every seed, so a small CNN can learn the
    classes and a CRF / random walk on the RGB finds object edges. Later
    objects occlude earlier ones. Images are JPEG-encoded (quality 95) and
    decoded once, so the arrays, the stores and ``JPEGImages`` hold the very
    same pixels.
Ground truth
    The label map with 255 on every pixel that has a pixel of another label
    within Chebyshev distance ``band`` (default 2, a band about 4 px wide, as
    in VOC; 1 for images under 120 px). Image borders are not boundaries.
Hard pseudo-label sets
    For set ``n`` and class ``c`` the caller gives a quality
    ``q = quality[n, c]`` in [0, 1] (error ``e = 1 - q``). Every object of
    class ``c`` is missed with probability ``0.9 e^2``; the union of the
    others is blurred (sigma ``0.5 e r``, ``r`` the objects' mean radius),
    perturbed by smooth noise (amplitude ``0.5 e``) and thresholded at
    ``0.5 -/+ 0.4 e`` (each set has a fixed over- or under-segmentation
    tendency per class), which erodes or dilates it and roughens its
    boundary; with probability ``0.8 e^2`` a part of an object (up to all
    of it, more with larger ``e``) is given to another class: another class of
    the same image if there is one (WSSS labels only hold the image's tags),
    else background (or, with ``tags_only=False``, a look-alike class:
    cat/dog, cow/sheep, bus/car, ...). With
    probability ``e`` a false-positive blob of the class (radius up to
    ``0.4 e r``) is added on predicted background, and with the set's
    ``abstain`` probability the uncertain zone around the predicted boundary
    becomes 255 (a set that abstains). ``q = 1`` reproduces the true labels
    exactly.

    The random decisions (miss, confuse, false positive) use *common random
    numbers*: the same uniform draw per object for every set, compared with a
    threshold that grows with ``e``. A set of higher quality therefore never
    misses an object that a set of lower quality keeps, and measured per-class
    IoU follows quality even on a few dozen images (the tests check this),
    up to boundary noise and spill-over of other classes' errors
    (over-segmentation into a neighbour, confusion). Roughly, on 64 images of
    120-200 px with one quality for all classes, foreground mIoU is 100, 97,
    94, 84, 71, 53, 43, 25 % for quality 1.0, 0.9, ..., 0.3.
Soft sets (CAMs)
    For set ``m`` and each class present in the image, a score map: every
    object of the class is blurred (sigma ``(0.08 + 0.3 e) r``) so scores
    are high inside and fade beyond the boundary, multiplied by a focus on a
    random discriminative part (exponent ``1.5 e``) and by smooth noise;
    an object is only weakly activated (x 0.35) with probability ``0.45 e^2``;
    other objects get weak activations (confusion, amplitude up to ``0.6 e``)
    and a false-positive bump is added; each map is divided by its maximum, as CAM
    code does. Written in PuzzleCAM's layout, as the paper's components
    (PuzzleCAM, CLIMS, PMM, DRS, all on PuzzleCAM's code) write theirs:
    ``{"keys": np.pad(keys + 1, (1, 0)) (the background 0, then the image's
    classes, 1-based), "cam": (K, ceil(H/4), ceil(W/4)) float32 (every 4th
    pixel, the stride-4 map), "hr_cam": (K, H, W) float32}`` with ``np.save``
    (a pickled dict; :func:`load_cam_npy` reads it with the restricted
    unpickler). ``OUT/cls_labels.npy`` holds the image-level labels of every
    image in the public ``cls_labels.npy`` form (a pickled dict id ->
    float32[20], 1 = present; the ids are strings here, since synthetic ids
    are not VOC's numbers). An image's labels are the classes visible in it,
    so they agree with its ground truth. In score stores the
    background slice is the constant :data:`CAM_BG_THRESHOLD` (0.15, IRN's
    ``cam_eval_thres``, also the default of ``isle ingest scores``), so the
    argmax decodes a pixel as foreground where its best CAM exceeds 0.15
    (near the best constant threshold for these CAMs). Roughly, decoded
    this way, CAMs of quality 0.7, 0.5, 0.3 reach 95, 78, 53 % foreground
    mIoU.

Quality maps monotonically to IoU but not to an exact IoU value; the true
quality matrices are saved in ``dataset.json`` so a demo can compare the set
that ISLE selects with the set that is truly best.

Layout written by :func:`make_voc_like`::

    OUT/dataset.json                      parameters, classes, quality matrices, paths
    OUT/JPEGImages/<id>.jpg
    OUT/SegmentationClass/<id>.png        VOC palette PNG, 255 = ignore
    OUT/pseudo/<set>/<id>.png             palette PNG, every image
    OUT/cams/<set>/<id>.npy               CAM dict (PuzzleCAM layout), every image
    OUT/cls_labels.npy                    image-level labels of every image
    OUT/ImageSets/Segmentation/train.txt, val.txt
    OUT/stores/train/images.zarr, gt.zarr, pseudo/<set>.zarr, cams/<set>.zarr
    OUT/stores/val/images.zarr, gt.zarr

The stores are split the way the paper uses the data: pseudo labels are
scored and merged on the training images, and the trained model is
evaluated on ``val``. Ids are ``synth_000000``, ``synth_000001``, ...; every
image, its size and its ground truth depend only on ``(seed, index)``, so
``n_images`` can grow without changing the first images (the train / val
split does change). The pseudo-label sets also depend on the sets and their
qualities.
"""

from __future__ import annotations

import colorsys
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from isle_fast.errors import InputError
from isle_fast.outputs import write_bytes
from isle_fast.stores.stack import IGNORE_INDEX, VOC_CLASSES

__all__ = [
    "PAPER_SETS",
    "TABLE1_BEST",
    "PAPER_PSEUDO_IOU",
    "SyntheticDataset",
    "Sample",
    "make_voc_like",
    "default_quality",
    "voc_palette",
    "write_label_png",
    "read_label_png",
    "save_cam_npy",
    "load_cam_npy",
    "save_cls_labels",
    "boundary_band",
    "cam_scores",
    "preview_png",
]

NUM_CLASSES = len(VOC_CLASSES)  # 21, background included
FG = NUM_CLASSES - 1

#: The paper's four component methods (set names used by default).
PAPER_SETS: tuple[str, ...] = ("puzzlecam", "clims", "pmm", "drs")

#: Table 1 of the paper: which component is best on which foreground class.
TABLE1_BEST: dict[str, str] = {
    "bus": "pmm", "car": "pmm",
    "bottle": "drs", "chair": "drs", "train": "drs",
    "bicycle": "clims", "boat": "clims", "diningtable": "clims", "motorbike": "clims",
    "person": "clims", "sofa": "clims", "tvmonitor": "clims",
    "aeroplane": "puzzlecam", "bird": "puzzlecam", "cat": "puzzlecam", "cow": "puzzlecam",
    "dog": "puzzlecam", "horse": "puzzlecam", "pottedplant": "puzzlecam", "sheep": "puzzlecam",
}

#: Tables 3 and 4 of the paper: per-class IoU (%) of the final pseudo labels on VOC2012 train,
#: rows in :data:`PAPER_SETS` order, columns in :data:`~isle_fast.stores.stack.VOC_CLASSES` order.
PAPER_PSEUDO_IOU: np.ndarray = np.array([
    # bkg  aero  bike  bird  boat  bottle bus  car   cat   chair cow   table dog   horse motor person plant sheep sofa train  tv
    [88.6, 79.2, 43.7, 89.0, 61.8, 72.1, 83.3, 76.0, 92.0, 29.5, 86.0, 44.0, 91.6, 83.1, 80.1, 42.8, 68.9, 92.6, 53.4, 64.8, 42.6],
    [89.8, 71.2, 45.4, 81.7, 70.2, 67.6, 84.0, 75.7, 90.0, 20.3, 84.2, 57.8, 86.9, 80.9, 80.8, 72.7, 48.4, 90.3, 56.5, 68.1, 58.4],
    [89.5, 76.8, 43.9, 88.1, 65.8, 76.0, 84.2, 78.0, 91.2, 30.6, 84.3, 48.5, 89.3, 82.0, 79.0, 61.4, 66.5, 89.9, 54.4, 66.4, 38.6],
    [90.1, 78.9, 45.3, 85.8, 68.4, 80.8, 83.8, 77.4, 90.6, 31.5, 84.0, 41.2, 88.7, 80.0, 79.8, 65.4, 62.6, 89.9, 55.0, 77.0, 41.3],
])

#: Look-alike classes, used for confusion when an image has no other class.
CONFUSERS: dict[str, str] = {
    "aeroplane": "bird", "bird": "aeroplane", "bicycle": "motorbike", "motorbike": "bicycle",
    "boat": "aeroplane", "bottle": "pottedplant", "pottedplant": "bottle", "bus": "car",
    "car": "bus", "train": "bus", "cat": "dog", "dog": "cat", "cow": "sheep", "sheep": "cow",
    "horse": "cow", "chair": "sofa", "sofa": "chair", "diningtable": "chair", "person": "sofa",
    "tvmonitor": "diningtable",
}

SHAPES = ("ellipse", "rectangle", "polygon", "blob")
TEXTURES = ("stripes", "checks", "dots", "rings", "blotches")
_STYLE_SEED = 20230901  # class signatures are the same for every data set seed
CAM_STRIDE = 4
#: Background score of the CAM score stores (IRN's ``cam_eval_thres``; ingest's default too).
CAM_BG_THRESHOLD = 0.15
#: Mean quality of the default soft sets (raw CAMs are worse than refined pseudo labels).
SOFT_BASE_QUALITY = 0.40
JPEG_QUALITY = 95


# ----------------------------------------------------------------------------------------------
# palette and file helpers
# ----------------------------------------------------------------------------------------------
def voc_palette() -> np.ndarray:
    """The PASCAL VOC colour map.

    Returns
    -------
    ndarray, shape (256, 3), uint8
        Colour of every label value: the standard bit-interleaving VOC map
        (bits 0, 1, 2 of the label go to the top bits of R, G, B, then the
        next three bits, ...). Background 0 is black; 255 (ignore) is
        (224, 224, 192), as in VOC's PNGs.
    """
    idx = np.arange(256, dtype=np.int64)
    pal = np.zeros((256, 3), dtype=np.int64)
    c = idx.copy()
    for j in range(8):
        for ch in range(3):
            pal[:, ch] |= ((c >> ch) & 1) << (7 - j)
        c >>= 3
    return pal.astype(np.uint8)


def _png_bytes(labels: np.ndarray) -> bytes:
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(labels, dtype=np.uint8), mode="P")
    img.putpalette(voc_palette().ravel().tolist())
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def write_label_png(path: str | os.PathLike, labels: np.ndarray) -> None:
    """Write a label map as a VOC palette PNG (atomically: temp file + rename).

    Parameters
    ----------
    path : str or path-like
        Output file; parent folders are created.
    labels : ndarray, (H, W), integer
        Label values 0..255 (255 = ignore, drawn in VOC's ignore colour).
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise InputError(f"{path}: a label map must be 2-D, got shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise InputError(f"{path}: label values must lie in 0..255")
    write_bytes(Path(path), _png_bytes(labels.astype(np.uint8)))


def read_label_png(path: str | os.PathLike) -> np.ndarray:
    """Read a palette (or grey) label PNG as its ``(H, W)`` uint8 label values (not colours)."""
    from PIL import Image

    with Image.open(path) as img:
        if img.mode not in ("P", "L"):
            raise InputError(f"{path}: expected a palette or greyscale label PNG, got mode {img.mode}")
        return np.array(img, dtype=np.uint8)


def save_cam_npy(path: str | os.PathLike, keys: np.ndarray, high_res: np.ndarray,
                 stride: int = CAM_STRIDE, layout: str = "puzzlecam") -> None:
    """Write CAMs in a public WSSS ``.npy`` dict form (atomically).

    Parameters
    ----------
    path : str or path-like
        Output ``.npy`` file.
    keys : ndarray, (K,), int
        The image's foreground classes, 0-based over the foreground (class k + 1).
    high_res : ndarray, (K, H, W), float
        Full-resolution scores in [0, 1].
    stride : int
        The ``"cam"`` entry is ``high_res[:, ::stride, ::stride]``.
    layout : {'puzzlecam', 'irn'}
        ``puzzlecam`` (the default, the paper's components):
        ``{"keys": np.pad(keys + 1, (1, 0)), "cam", "hr_cam"}``; ``irn``:
        ``{"keys": keys, "cam", "high_res"}``.
    """
    buf = io.BytesIO()
    hr = np.asarray(high_res, dtype=np.float32)
    k = np.asarray(keys, dtype=np.int64)
    if layout == "puzzlecam":
        d = {"keys": np.pad(k + 1, (1, 0), mode="constant"), "cam": hr[:, ::stride, ::stride].copy(),
             "hr_cam": hr}
    elif layout == "irn":
        d = {"keys": k, "cam": hr[:, ::stride, ::stride].copy(), "high_res": hr}
    else:
        raise InputError(f"layout must be 'puzzlecam' or 'irn', not {layout!r}")
    np.save(buf, np.asarray(d, dtype=object), allow_pickle=True)  # what np.save makes of a dict
    write_bytes(Path(path), buf.getvalue())


def load_cam_npy(path: str | os.PathLike) -> dict:
    """Load a CAM ``.npy`` dict as saved, with the restricted unpickler (nothing in it runs)."""
    from isle_fast.stores.formats import BadInput, load_pickle_npy

    try:
        obj = load_pickle_npy(path)
    except BadInput as exc:
        raise InputError(f"{path}: {exc}") from None
    if not isinstance(obj, dict):
        raise InputError(f"{path}: not a CAM dict (.npy of a pickled dict)")
    return obj


def save_cls_labels(path: str | os.PathLike, labels: Mapping[str, Sequence[int]],
                    num_classes: int = NUM_CLASSES) -> None:
    """Write image-level labels in the public ``cls_labels.npy`` form: a pickled dict id -> float32[C - 1].

    ``labels`` maps an image id to its foreground classes (1-based class indices).
    """
    out = {}
    for image_id, classes in labels.items():
        row = np.zeros(num_classes - 1, dtype=np.float32)
        row[np.asarray(list(classes), dtype=np.int64) - 1] = 1.0
        out[str(image_id)] = row
    buf = io.BytesIO()
    np.save(buf, np.asarray(out, dtype=object), allow_pickle=True)  # what np.save makes of a dict
    write_bytes(Path(path), buf.getvalue())


# ----------------------------------------------------------------------------------------------
# small vectorised image operations (no SciPy here)
# ----------------------------------------------------------------------------------------------
def _box1d(a: np.ndarray, r: int, axis: int) -> np.ndarray:
    """Mean over a window of 2r+1 along ``axis`` with edge replication."""
    if r <= 0:
        return a
    pad = [(0, 0)] * a.ndim
    pad[axis] = (r + 1, r)
    c = np.cumsum(np.pad(a, pad, mode="edge"), axis=axis, dtype=np.float64)
    n = a.shape[axis]
    hi = [slice(None)] * a.ndim
    lo = [slice(None)] * a.ndim
    hi[axis] = slice(2 * r + 1, 2 * r + 1 + n)
    lo[axis] = slice(0, n)
    return ((c[tuple(hi)] - c[tuple(lo)]) * (1.0 / (2 * r + 1))).astype(np.float32)


def _blur(a: np.ndarray, sigma: float) -> np.ndarray:
    """Approximate Gaussian blur of a 2-D array: three box passes per axis (edges replicated).

    Only the bounding box of the non-zero values, grown by the filter's reach,
    is computed; the result equals blurring the whole array.
    """
    a = np.asarray(a, dtype=np.float32)
    if sigma < 0.5:
        return a
    r = int(round((np.sqrt(4.0 * sigma * sigma / 3.0 + 1.0) - 1.0) / 2.0))
    if r <= 0:
        return a
    rows, cols = np.nonzero(a.any(axis=1))[0], np.nonzero(a.any(axis=0))[0]
    if rows.size == 0:
        return a
    m = 3 * r + 1
    y0, y1 = max(0, rows[0] - m), min(a.shape[0], rows[-1] + 1 + m)
    x0, x1 = max(0, cols[0] - m), min(a.shape[1], cols[-1] + 1 + m)
    b = a[y0:y1, x0:x1]
    for _ in range(3):
        b = _box1d(b, r, 0)
        b = _box1d(b, r, 1)
    out = np.zeros_like(a)
    out[y0:y1, x0:x1] = b
    return out


def _minmax_filter(labels: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
    """Max and min over the (2r+1)^2 square around every pixel (edges replicated)."""
    hi = labels.copy()
    lo = labels.copy()
    for axis in (0, 1):
        n = labels.shape[axis]
        pad = [(0, 0), (0, 0)]
        pad[axis] = (r, r)
        ph, pl = np.pad(hi, pad, mode="edge"), np.pad(lo, pad, mode="edge")
        out_h, out_l = hi.copy(), lo.copy()
        for s in range(2 * r + 1):
            sl = [slice(None), slice(None)]
            sl[axis] = slice(s, s + n)
            np.maximum(out_h, ph[tuple(sl)], out=out_h)
            np.minimum(out_l, pl[tuple(sl)], out=out_l)
        hi, lo = out_h, out_l
    return hi, lo


def boundary_band(labels: np.ndarray, band: int) -> np.ndarray:
    """Pixels that have a pixel of another label within Chebyshev distance ``band``.

    Parameters
    ----------
    labels : ndarray, (H, W), uint8
        A label map without ignore values.
    band : int
        Half width of the band; 0 gives an empty band.

    Returns
    -------
    ndarray, (H, W), bool
    """
    if band <= 0:
        return np.zeros(labels.shape, dtype=bool)
    hi, lo = _minmax_filter(labels, band)
    return hi != lo


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """Smooth noise in [-1, 1]: a random grid every ``cell`` pixels, smoothstep-interpolated."""
    gh, gw = int(np.ceil(h / cell)) + 2, int(np.ceil(w / cell)) + 2
    grid = rng.uniform(-1.0, 1.0, size=(gh, gw)).astype(np.float32)
    y = np.arange(h, dtype=np.float32) / cell
    x = np.arange(w, dtype=np.float32) / cell
    y0, x0 = y.astype(np.int64), x.astype(np.int64)
    fy, fx = y - y0, x - x0
    fy, fx = fy * fy * (3 - 2 * fy), fx * fx * (3 - 2 * fx)
    rows = grid[y0] * (1 - fy)[:, None] + grid[y0 + 1] * fy[:, None]
    return rows[:, x0] * (1 - fx)[None, :] + rows[:, x0 + 1] * fx[None, :]


# ----------------------------------------------------------------------------------------------
# class signatures (fixed for every seed)
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _ClassStyle:
    colour_a: np.ndarray  # (3,) float 0..255
    colour_b: np.ndarray
    texture: str
    period: float
    angle: float
    shape: str


def _class_styles() -> list[_ClassStyle | None]:
    rng = np.random.default_rng(_STYLE_SEED)
    hues = (np.arange(FG) * 7 % FG) / FG  # spread neighbours in index over the hue circle
    styles: list[_ClassStyle | None] = [None]
    for c in range(1, NUM_CLASSES):
        h = hues[c - 1]
        sat, val = 0.55 + 0.4 * rng.random(), 0.55 + 0.4 * rng.random()
        a = np.array(colorsys.hsv_to_rgb(h, sat, val)) * 255
        hb = (h + rng.uniform(0.12, 0.45)) % 1.0
        b = np.array(colorsys.hsv_to_rgb(hb, 0.3 + 0.6 * rng.random(), 0.25 + 0.7 * rng.random())) * 255
        styles.append(_ClassStyle(
            colour_a=a.astype(np.float32), colour_b=b.astype(np.float32),
            texture=TEXTURES[(c - 1) % len(TEXTURES)],
            period=float(rng.uniform(5.0, 14.0)), angle=float(rng.uniform(0, np.pi)),
            shape=SHAPES[(c - 1) % len(SHAPES)],
        ))
    return styles


_STYLES = _class_styles()


# ----------------------------------------------------------------------------------------------
# quality matrices
# ----------------------------------------------------------------------------------------------
def default_quality(
    set_names: Sequence[str] = PAPER_SETS,
    *,
    best: Mapping[str, str] | None = None,
    base: float = 0.62,
    gain: float = 0.12,
    spread: float = 0.08,
    seed: int = 0,
) -> np.ndarray:
    """A quality matrix in which every set is best on different classes and mean quality is close.

    Parameters
    ----------
    set_names : sequence of str
        The sets (rows).
    best : mapping class name -> set name, optional
        Which set is best on which foreground class. Default: the paper's
        Table 1 (:data:`TABLE1_BEST`) when ``set_names`` are the paper's four
        methods (any order, case-insensitive), else class ``c`` goes to set
        ``(c - 1) % N``.
    base : float
        Mean quality of every set (rows are shifted to have this mean over
        the foreground, as the paper's components have close mIoU).
    gain : float
        How much the best set of a class is above ``base`` (before the shift).
    spread : float
        The other sets of a class are ``base - U(0, spread)`` (before the shift),
        and always at least ``gain / 2`` below the best set.
    seed : int
        Seed of the jitter.

    Returns
    -------
    ndarray, (N, 21), float64
        Column 0 (background) is NaN: background quality is not set, its IoU
        follows from the foreground errors.
    """
    names = [str(s) for s in set_names]
    n = len(names)
    if n < 1:
        raise InputError("default_quality needs at least one set name")
    lower = [s.lower() for s in names]
    if best is None:
        if sorted(lower) == sorted(PAPER_SETS):
            best = {c: names[lower.index(s)] for c, s in TABLE1_BEST.items()}
        else:
            best = {VOC_CLASSES[c]: names[(c - 1) % n] for c in range(1, NUM_CLASSES)}
    rng = np.random.default_rng([int(seed), 11])
    q = np.full((n, NUM_CLASSES), np.nan)
    best_idx = np.zeros(NUM_CLASSES, dtype=np.int64)
    for c in range(1, NUM_CLASSES):
        cname = VOC_CLASSES[c]
        if cname not in best:
            raise InputError(f"best: no set given for class {cname!r}")
        if best[cname] not in names:
            raise InputError(f"best: set {best[cname]!r} (class {cname!r}) is not one of {names}")
        b = names.index(best[cname])
        best_idx[c] = b
        q[:, c] = base - rng.uniform(0.0, spread, size=n)
        q[b, c] = base + gain
    # shift the non-best entries of every row so that every row has mean `base`
    for i in range(n):
        others = [c for c in range(1, NUM_CLASSES) if best_idx[c] != i]
        if not others:
            continue
        delta = (base * FG - np.nansum(q[i, 1:])) / len(others)
        for c in others:
            q[i, c] = min(q[i, c] + delta, q[best_idx[c], c] - gain / 2)
    return np.clip(q, 0.0, 1.0)


def _as_quality(quality: Any, n: int, what: str) -> np.ndarray:
    q = np.asarray(quality, dtype=np.float64)
    if q.ndim == 1 and q.shape[0] == n:
        q = np.repeat(q[:, None], NUM_CLASSES, axis=1)
    if q.ndim != 2 or q.shape[0] != n or q.shape[1] not in (FG, NUM_CLASSES):
        raise InputError(f"{what} must have shape ({n}, {FG}) or ({n}, {NUM_CLASSES}) "
                         f"(sets x classes), or ({n},); got {q.shape}")
    if q.shape[1] == FG:
        q = np.concatenate([np.full((n, 1), np.nan), q], axis=1)
    q = q.copy()
    q[:, 0] = np.nan
    fg = q[:, 1:]
    if fg.size and (not np.all(np.isfinite(fg)) or fg.min() < 0 or fg.max() > 1):
        raise InputError(f"{what}: foreground qualities must lie in [0, 1]")
    return q


# ----------------------------------------------------------------------------------------------
# one image
# ----------------------------------------------------------------------------------------------
@dataclass
class _Object:
    cls: int
    mask: np.ndarray  # full shape mask (before occlusion)
    visible: np.ndarray  # what is left after later objects are drawn on top
    cy: float
    cx: float
    radius: float


@dataclass
class Sample:
    """One generated image with everything derived from it.

    Attributes
    ----------
    id : str
    image : ndarray, (H, W, 3) uint8
        Pixels after the JPEG round trip (exactly what ``JPEGImages`` holds).
    jpeg : bytes
        The encoded JPEG file.
    labels : ndarray, (H, W) uint8
        True labels without the ignore band.
    gt : ndarray, (H, W) uint8
        Ground truth: ``labels`` with 255 in the boundary band.
    pseudo : dict str -> ndarray (H, W) uint8
        The hard pseudo-label sets (255 = abstain).
    cams : dict str -> dict
        The soft sets, each ``{"keys", "high_res"}`` (``"cam"`` is made when writing).
    present : ndarray of int
        Foreground classes present in ``labels`` (1-based), sorted.
    """

    id: str
    image: np.ndarray
    jpeg: bytes
    labels: np.ndarray
    gt: np.ndarray
    pseudo: dict[str, np.ndarray]
    cams: dict[str, dict]
    present: np.ndarray


@dataclass(frozen=True)
class _Spec:
    seed: int
    shapes: np.ndarray
    ids: tuple[str, ...]
    set_names: tuple[str, ...]
    quality: np.ndarray
    abstain: np.ndarray
    soft_set_names: tuple[str, ...]
    soft_quality: np.ndarray
    bias: np.ndarray  # (N, C) +1 over-segments, -1 under-segments
    max_objects: int
    band: int
    tags_only: bool


def _shape_mask(kind: str, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray,
                cy: float, cx: float, r: float) -> np.ndarray:
    dy, dx = yy - cy, xx - cx
    t = rng.uniform(0, np.pi)
    u = dx * np.cos(t) + dy * np.sin(t)
    v = -dx * np.sin(t) + dy * np.cos(t)
    if kind == "ellipse":
        a, b = r, r * rng.uniform(0.5, 1.0)
        return (u / a) ** 2 + (v / b) ** 2 <= 1.0
    if kind == "rectangle":
        a, b = r * rng.uniform(0.65, 1.0), r * rng.uniform(0.4, 0.9)
        return (np.abs(u) <= a) & (np.abs(v) <= b)
    if kind == "polygon":
        k = int(rng.integers(3, 8))
        # keep vertices apart so the polygon is not degenerate
        ang = np.sort((np.arange(k) * 2 * np.pi / k + rng.uniform(-0.4, 0.4, size=k) * np.pi / k) + t)
        rad = r * rng.uniform(0.75, 1.05, size=k)
        vy, vx = rad * np.sin(ang), rad * np.cos(ang)
        inside = np.ones(yy.shape, dtype=bool)
        for i in range(k):
            j = (i + 1) % k
            cross = (vx[j] - vx[i]) * (dy - vy[i]) - (vy[j] - vy[i]) * (dx - vx[i])
            inside &= cross >= 0
        return inside
    # blob: a wobbly radius
    theta = np.arctan2(v, u)
    rr = np.ones_like(theta)
    for k in (2, 3, 5):
        rr = rr + rng.uniform(0.0, 0.18) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    return np.hypot(u, v) <= r * 0.85 * rr


def _texture(style: _ClassStyle, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray,
             cy: float, cx: float) -> np.ndarray:
    """Pattern weight in [0, 1] in the object's own frame (the texture moves with the object)."""
    t = style.angle + rng.uniform(-0.2, 0.2)
    per = style.period * rng.uniform(0.85, 1.15)
    dy, dx = yy - cy, xx - cx
    u = dx * np.cos(t) + dy * np.sin(t)
    v = -dx * np.sin(t) + dy * np.cos(t)
    w = 2 * np.pi / per
    if style.texture == "stripes":
        p = 0.5 + 0.5 * np.sin(w * u)
    elif style.texture == "checks":
        p = 0.5 + 0.5 * np.tanh(4 * np.sin(w * u) * np.sin(w * v))
    elif style.texture == "dots":
        p = ((np.cos(w * u) + np.cos(w * v)) > 0.9).astype(np.float32)
    elif style.texture == "rings":
        p = 0.5 + 0.5 * np.sin(w * np.hypot(u, v))
    else:
        h, wd = yy.shape
        p = (_smooth_noise(rng, h, wd, per * 0.7) > 0.0).astype(np.float32)
    return p.astype(np.float32)


def _scene(rng: np.random.Generator, h: int, w: int, max_objects: int
           ) -> tuple[np.ndarray, np.ndarray, list[_Object]]:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    # background: smooth low-saturation colour field with some fine grain
    bg = np.empty((h, w, 3), dtype=np.float32)
    base = rng.uniform(70, 190)
    tint = rng.uniform(-25, 25, size=3)
    for ch in range(3):
        bg[..., ch] = base + tint[ch] + 35 * _smooth_noise(rng, h, w, rng.uniform(40, 90))
    bg += 10 * _smooth_noise(rng, h, w, 3.0)[..., None]
    img = bg
    labels = np.zeros((h, w), dtype=np.uint8)

    n_obj = int(rng.integers(1, max_objects + 1))
    n_cls = int(rng.integers(1, min(3, n_obj) + 1))
    classes = rng.choice(np.arange(1, NUM_CLASSES), size=n_cls, replace=False)
    obj_classes = np.concatenate([classes, rng.choice(classes, size=n_obj - n_cls)])
    side = min(h, w)
    objects: list[_Object] = []
    for c in obj_classes:
        c = int(c)
        style = _STYLES[c]
        assert style is not None
        r = float(side * rng.uniform(0.14, 0.32))
        cy, cx = float(rng.uniform(0.15 * h, 0.85 * h)), float(rng.uniform(0.15 * w, 0.85 * w))
        kind = style.shape if rng.random() < 0.7 else SHAPES[int(rng.integers(len(SHAPES)))]
        mask = _shape_mask(kind, rng, yy, xx, cy, cx, r)
        if not mask.any():
            continue
        p = _texture(style, rng, yy, xx, cy, cx)[..., None]
        colour = style.colour_a * (1 - p) + style.colour_b * p
        gy, gx = rng.normal(size=2)
        shade = 1.0 + 0.15 * np.tanh(((yy - cy) * gy + (xx - cx) * gx) / (r + 1e-6))[..., None]
        colour = colour * shade * rng.uniform(0.9, 1.1)
        img = np.where(mask[..., None], colour, img)
        labels[mask] = c
        for o in objects:
            o.visible &= ~mask
        objects.append(_Object(c, mask, mask.copy(), cy, cx, r))
    img = img + rng.normal(0.0, 3.0, size=img.shape).astype(np.float32)
    objects = [o for o in objects if o.visible.any()]
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), labels, objects


def _jpeg_round_trip(img: np.ndarray) -> tuple[np.ndarray, bytes]:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img, mode="RGB").save(buf, format="JPEG", quality=JPEG_QUALITY)
    data = buf.getvalue()
    with Image.open(io.BytesIO(data)) as im:
        return np.array(im.convert("RGB"), dtype=np.uint8), data


def _other_class(c: int, present: np.ndarray, u: float, tags_only: bool) -> int:
    others = [int(p) for p in present if p != c]
    if others:
        return others[int(u * len(others)) % len(others)]
    return 0 if tags_only else VOC_CLASSES.index(CONFUSERS[VOC_CLASSES[c]])


def _blob(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float,
          r: float) -> np.ndarray:
    """A blob mask, computed on its bounding box only (same random draws as a full-image call)."""
    h, w = yy.shape
    y0, y1 = int(np.clip(np.floor(cy - 1.6 * r), 0, h)), int(np.clip(np.ceil(cy + 1.6 * r) + 1, 0, h))
    x0, x1 = int(np.clip(np.floor(cx - 1.6 * r), 0, w)), int(np.clip(np.ceil(cx + 1.6 * r) + 1, 0, w))
    out = np.zeros((h, w), dtype=bool)
    out[y0:y1, x0:x1] = _shape_mask("blob", rng, yy[y0:y1, x0:x1], xx[y0:y1, x0:x1], cy, cx, r)
    return out


def _hard_set(spec: _Spec, n: int, objects: list[_Object], labels: np.ndarray, present: np.ndarray,
              events: np.ndarray, fp_events: dict[int, float], rng: np.random.Generator) -> np.ndarray:
    """One hard pseudo-label map for set ``n``."""
    h, w = labels.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    pred = np.zeros((h, w), dtype=np.uint8)
    unsure = np.zeros((h, w), dtype=bool)
    # classes are drawn in the order of their top-most object, so occlusion matches the image
    order = sorted(present.tolist(), key=lambda c: max(j for j, o in enumerate(objects) if o.cls == c))
    for c in order:
        e = 1.0 - spec.quality[n, c]
        noise = _smooth_noise(rng, h, w, max(4.0, 0.1 * min(h, w)))  # drawn for every class: stable streams
        mine = [j for j, o in enumerate(objects) if o.cls == c]
        if e <= 0:
            for j in mine:
                pred[objects[j].visible] = c
            continue
        kept = [j for j in mine if events[j, 0] >= 0.9 * e * e]  # common random numbers: nested misses
        if not kept:
            continue
        union = np.zeros((h, w), dtype=bool)
        for j in kept:
            union |= objects[j].visible
        radius = float(np.mean([objects[j].radius for j in kept]))
        sigma = 0.5 * e * radius
        blurred = _blur(union, sigma)
        field_ = blurred + 0.5 * e * noise * (blurred > 0.02)
        thr = 0.5 - 0.4 * e * spec.bias[n, c]
        mask = field_ > thr
        unsure |= (np.abs(field_ - thr) < (0.05 + 0.25 * e)) & (blurred > 0.02)
        cls_map = np.full((h, w), c, dtype=np.uint8)
        for j in kept:
            o = objects[j]
            _, u_conf, u_part, u_dir = events[j]
            if u_conf < 0.8 * e * e:
                # give a part of the object to another class: a half-plane cut through it
                frac = min(1.0, 0.3 + 1.4 * e * u_part)
                ang = 2 * np.pi * u_dir
                proj = (yy - o.cy) * np.sin(ang) + (xx - o.cx) * np.cos(ang)
                near = _blur(o.visible, sigma + 2.0) > 0.02
                other = _other_class(c, present, u_part, spec.tags_only)
                cls_map[near & (proj > o.radius * (1.0 - 2.0 * frac))] = other
        pred[mask] = cls_map[mask]
    # false positives: blobs of present classes on predicted background
    for c in present:
        e = 1.0 - spec.quality[n, c]
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        r_obj = max((o.radius for o in objects if o.cls == c), default=min(h, w) * 0.2)
        rad = max(2.0, 0.4 * e * r_obj * rng.uniform(0.5, 1.0))
        blob = _blob(rng, yy, xx, cy, cx, rad)
        if e > 0 and fp_events[int(c)] < e:
            pred[blob & (pred == 0)] = c
    if rng.random() < spec.abstain[n]:
        pred[unsure] = IGNORE_INDEX
    return pred


def _soft_set(spec: _Spec, m: int, objects: list[_Object], present: np.ndarray,
              events: np.ndarray, rng: np.random.Generator, h: int, w: int) -> dict:
    """CAMs of soft set ``m``: ``{"keys": (K,), "high_res": (K, H, W) float32}``."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    maps = []
    for c in present:
        c = int(c)
        e = 1.0 - spec.soft_quality[m, c]
        noise = _smooth_noise(rng, h, w, max(4.0, 0.1 * min(h, w)))
        mine = [j for j, o in enumerate(objects) if o.cls == c]
        union = np.zeros((h, w), dtype=bool)
        for j in mine:
            union |= objects[j].visible
        radius = float(np.mean([objects[j].radius for j in mine]))
        act = _blur(union, (0.08 + 0.3 * e) * radius)
        # focus on a discriminative part of every object: a bump around a random point of it
        focus = np.zeros((h, w), dtype=np.float32)
        for j in mine:
            o = objects[j]
            ys, xs = np.nonzero(o.visible)
            k = int(rng.integers(len(ys)))
            bump = np.exp(-((yy - ys[k]) ** 2 + (xx - xs[k]) ** 2) / (2 * (0.7 * o.radius) ** 2))
            weak = 0.35 if events[j, 0] < 0.45 * e * e else 1.0  # a weakly activated (missed) object
            focus = np.maximum(focus, weak * bump ** (1.5 * e))
        cam = act * focus
        # confusion: weak activation on the objects of other classes
        for j, o in enumerate(objects):
            if o.cls != c and e > 0:
                cam = np.maximum(cam, 0.6 * e * events[j, 1] * _blur(o.visible, 0.3 * o.radius))
        cam = cam * (1.0 + 0.4 * e * noise)
        # a false-positive activation somewhere
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        rad = min(h, w) * (0.05 + 0.15 * e)
        fp = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * rad * rad)) * 0.7 * e * rng.random()
        cam = np.maximum(cam, fp)
        cam = np.clip(cam, 0.0, None)
        peak = float(cam.max())
        maps.append(cam / peak if peak > 0 else cam)
    keys = np.asarray(present, dtype=np.int64) - 1
    hr = np.stack(maps).astype(np.float32) if maps else np.zeros((0, h, w), np.float32)
    return {"keys": keys, "high_res": hr}


def _generate(spec: _Spec, i: int) -> Sample:
    h, w = (int(v) for v in spec.shapes[i])
    rng = np.random.default_rng([spec.seed, i, 0])
    img, labels, objects = _scene(rng, h, w, spec.max_objects)
    image, jpeg = _jpeg_round_trip(img)
    gt = labels.copy()
    gt[boundary_band(labels, spec.band)] = IGNORE_INDEX
    present = np.unique(labels[labels > 0]).astype(np.int64)
    ev_rng = np.random.default_rng([spec.seed, i, 1])
    events = ev_rng.random(size=(max(len(objects), 1), 4))
    fp_u = ev_rng.random(size=NUM_CLASSES)
    fp_events = {c: float(fp_u[c]) for c in range(NUM_CLASSES)}
    pseudo = {}
    for n, name in enumerate(spec.set_names):
        pseudo[name] = _hard_set(spec, n, objects, labels, present, events, fp_events,
                                 np.random.default_rng([spec.seed, i, 2, n]))
    cams = {}
    for m, name in enumerate(spec.soft_set_names):
        cams[name] = _soft_set(spec, m, objects, present, events,
                               np.random.default_rng([spec.seed, i, 3, m]), h, w)
    return Sample(spec.ids[i], image, jpeg, labels, gt, pseudo, cams, present)


def cam_scores(cam: Mapping[str, np.ndarray], num_classes: int = NUM_CLASSES,
               bg_threshold: float | None = None) -> np.ndarray:
    """A CAM dict as an ``(H, W, C)`` float32 score stack.

    Parameters
    ----------
    cam : mapping
        ``{"keys": (K,), "high_res": (K, H, W)}`` as written by :func:`save_cam_npy`.
    num_classes : int
        C, background included.
    bg_threshold : float, optional
        The constant background slice; default :data:`CAM_BG_THRESHOLD` (0.15,
        IRN's ``cam_eval_thres`` and the default of :func:`isle_fast.stores.ingest.ingest_scores`,
        so a score store made here equals one ingested from ``cams/<set>``).

    Returns
    -------
    ndarray, (H, W, C), float32
        Absent classes are 0.
    """
    thr = CAM_BG_THRESHOLD if bg_threshold is None else float(bg_threshold)
    hr = np.asarray(cam["high_res"], dtype=np.float32)
    _, h, w = hr.shape
    out = np.zeros((h, w, num_classes), dtype=np.float32)
    out[..., 0] = thr
    for slot, key in enumerate(np.asarray(cam["keys"], dtype=np.int64)):
        out[..., int(key) + 1] = hr[slot]
    return out


# ----------------------------------------------------------------------------------------------
# the data set
# ----------------------------------------------------------------------------------------------
@dataclass
class SyntheticDataset:
    """A generated data set: where it was written and (optionally) its arrays.

    Attributes
    ----------
    root : Path or None
        The output folder (None when nothing was written).
    ids, train_ids, val_ids : list of str
        All image ids (in order) and the split.
    shapes : ndarray, (I, 2) int64
        H, W of every image, in ``ids`` order.
    classes : tuple of str
        The 21 VOC classes, background first.
    set_names, soft_set_names : tuple of str
    quality : ndarray, (N, 21)
        True per-class quality of the hard sets (column 0 NaN).
    soft_quality : ndarray, (M, 21)
        True per-class quality of the soft sets (column 0 NaN).
    abstain : ndarray, (N,)
        Probability per image that a hard set marks its uncertain zone 255.
    seed : int
    params : dict
        Every generation parameter (what ``dataset.json`` holds).
    paths : dict
        ``images``, ``gt``, ``pseudo`` ({set: folder}), ``cams`` ({set: folder}),
        ``train_list``, ``val_list``, ``json`` (absent when no tree was written).
    stores : dict
        Store paths by key: ``train/images``, ``train/gt``, ``train/pseudo/<set>``,
        ``train/cams/<set>``, ``val/images``, ``val/gt`` (empty when no stores were written).
    samples : list of Sample or None
        All generated samples, in ``ids`` order, when ``keep_arrays`` was set.
    """

    root: Path | None
    ids: list[str]
    train_ids: list[str]
    val_ids: list[str]
    shapes: np.ndarray
    classes: tuple[str, ...]
    set_names: tuple[str, ...]
    soft_set_names: tuple[str, ...]
    quality: np.ndarray
    soft_quality: np.ndarray
    abstain: np.ndarray
    seed: int
    params: dict
    paths: dict = field(default_factory=dict)
    stores: dict = field(default_factory=dict)
    samples: list[Sample] | None = None
    _spec: _Spec | None = field(default=None, repr=False)

    @property
    def num_images(self) -> int:
        """Number of images (train + val)."""
        return len(self.ids)

    def sample(self, i: int | str) -> Sample:
        """Image ``i`` (position or id) with its labels, pseudo-label sets and CAMs.

        Returned from memory when the arrays were kept, else generated again
        (bit-identical: every image depends only on the seed and its index).
        """
        if isinstance(i, str):
            try:
                i = self.ids.index(i)
            except ValueError:
                raise InputError(f"image id {i!r} is not in this data set") from None
        if self.samples is not None:
            return self.samples[i]
        assert self._spec is not None
        return _generate(self._spec, i)

    def true_best(self) -> dict[str, str]:
        """For every foreground class, the hard set with the highest true quality (first on ties)."""
        return {VOC_CLASSES[c]: self.set_names[int(np.argmax(self.quality[:, c]))]
                for c in range(1, NUM_CLASSES)}


def _is_data_set_folder(p: Path) -> bool:
    """An empty folder or one made by :func:`make_voc_like` (its ``dataset.json``): replaceable."""
    return p.is_dir() and (not any(p.iterdir()) or (p / "dataset.json").is_file())


def _prepare_out(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists():
        if not out_dir.is_dir():
            raise InputError(f"{out_dir} exists and is not a folder")
        if any(out_dir.iterdir()):
            if not overwrite:
                raise InputError(f"{out_dir} exists and is not empty; choose another folder "
                                 "or pass overwrite (--overwrite) to replace a data set made here")
            if not _is_data_set_folder(out_dir):
                raise InputError(f"{out_dir} is not empty and holds no dataset.json; refusing to "
                                 "replace a folder that this tool did not make")


class _Buffered:
    """Writes a store in whole chunks (one Zarr write per chunk, not per image)."""

    def __init__(self, writer, chunk: int, fill) -> None:
        self.writer = writer
        self.chunk = chunk
        self.array_shape = writer.array.shape
        self.fill = fill
        self.start = 0
        self.items: list[np.ndarray] = []

    def add(self, data: np.ndarray) -> None:
        self.items.append(data)
        if len(self.items) == self.chunk:
            self.flush()

    def flush(self) -> None:
        if not self.items:
            return
        block = np.full((len(self.items),) + tuple(self.array_shape[1:]), self.fill,
                        dtype=self.writer.array.dtype)
        for k, d in enumerate(self.items):
            block[k, :d.shape[0], :d.shape[1]] = d
        self.writer.write_block(self.start, block)
        self.start += len(self.items)
        self.items = []

    def commit(self):
        self.flush()
        return self.writer.commit()


def make_voc_like(
    out_dir: str | os.PathLike | None = None,
    *,
    n_images: int = 64,
    n_val: int | None = None,
    set_names: Sequence[str] = PAPER_SETS,
    quality: Any = None,
    abstain: float | Sequence[float] = 0.2,
    soft_sets: Sequence[str] = ("pmm_cam", "drs_cam"),
    soft_quality: Any = None,
    size_range: tuple[int, int] = (120, 200),
    max_objects: int = 4,
    band: int | None = None,
    tags_only: bool = True,
    seed: int = 0,
    write_tree: bool = True,
    write_stores: bool = True,
    keep_arrays: bool = True,
    overwrite: bool = False,
    quiet: bool = True,
) -> SyntheticDataset:
    """Make a synthetic VOC-like data set with simulated pseudo-label sets.

    See the module docstring for what is simulated and the folder layout.

    Parameters
    ----------
    out_dir : str or path-like, optional
        Output folder; must not exist or be empty (or hold an earlier data
        set, with ``overwrite``). The data set is written into a temporary
        sibling and renamed into place when complete. ``None`` writes nothing.
    n_images : int
        Images in total (train + val).
    n_val : int, optional
        Images in the validation split (chosen at random with the seed);
        default ``n_images // 4`` (16 of 64).
    set_names : sequence of str
        Names of the hard pseudo-label sets.
    quality : array-like, optional
        Per-set, per-class quality in [0, 1]: shape ``(N, 20)`` (foreground
        classes) or ``(N, 21)`` (column 0 ignored) or ``(N,)`` (one value per
        set). Default :func:`default_quality` ``(set_names, seed=seed)``: each
        set best on different classes (Table 1 of the paper for the default
        names), close mean quality.
    abstain : float or sequence of float
        Per set: probability per image that the set marks the uncertain zone
        around its predicted boundaries 255 (abstains).
    soft_sets : sequence of str
        Names of the soft (CAM) sets; empty for none.
    soft_quality : array-like, optional
        As ``quality``, for the soft sets; default :func:`default_quality`
        with ``base=0.4`` (CAMs decode to roughly 55-75 % foreground IoU at
        the 0.15 background threshold, blurry enough that a CRF / random walk
        helps) and class ``c`` best in soft set ``(c - 1) % M``.
    size_range : (int, int)
        Inclusive range of image height and width (drawn independently);
        ``(375, 500)`` gives VOC-sized images.
    max_objects : int
        Objects per image are drawn from 1..max_objects (of 1 to 3 classes).
    band : int, optional
        Half width of the 255 boundary band in the ground truth (0: none);
        default 2 (a band about 4 px wide, like VOC's), 1 when the largest
        image side is under 120 px.
    tags_only : bool
        Hard sets only predict classes of the image's tags, as WSSS pseudo
        labels made from image-level labels do: a confused part of an object
        goes to another class of the image, or to background when the image
        has one class. ``False`` gives it to a look-alike class instead
        (cat/dog, cow/sheep, ...), which then also costs that class IoU.
    seed : int
        Everything is determined by the seed.
    write_tree, write_stores : bool
        Write the VOC-style file tree / the stack stores (needs ``out_dir``).
    keep_arrays : bool
        Keep every :class:`Sample` in memory (``SyntheticDataset.samples``);
        without it, :meth:`SyntheticDataset.sample` regenerates on demand.
    overwrite : bool
        Replace an earlier data set in ``out_dir`` (only a folder with a
        ``dataset.json``).
    quiet : bool
        No progress bar.

    Returns
    -------
    SyntheticDataset
    """
    from isle_fast.progress import progress

    n_images = int(n_images)
    n_val = n_images // 4 if n_val is None else int(n_val)
    if n_images < 1:
        raise InputError(f"n_images must be at least 1, got {n_images}")
    if not 0 <= n_val < n_images:
        raise InputError(f"n_val must be in 0..n_images-1 (training needs images), got {n_val}")
    names = tuple(str(s) for s in set_names)
    soft = tuple(str(s) for s in soft_sets)
    for group, what in ((names, "set_names"), (soft, "soft_sets")):
        if len(set(group)) != len(group):
            raise InputError(f"{what} has a repeated name: {list(group)}")
        for s in group:
            if not s or "/" in s or s.startswith("."):
                raise InputError(f"{what}: {s!r} is not a usable folder name")
    if not names and not soft:
        raise InputError("make_voc_like needs at least one hard or soft set")
    lo, hi = (int(v) for v in size_range)
    if not 16 <= lo <= hi:
        raise InputError(f"size_range must satisfy 16 <= min <= max, got {size_range}")
    if max_objects < 1:
        raise InputError(f"max_objects must be at least 1, got {max_objects}")
    if band is None:
        band = 1 if hi < 120 else 2
    if band < 0:
        raise InputError(f"band must be >= 0, got {band}")
    q = _as_quality(default_quality(names, seed=seed) if quality is None and names else
                    (quality if quality is not None else np.zeros((0, FG))), len(names), "quality")
    sq = _as_quality(default_quality(soft, seed=seed + 1, base=SOFT_BASE_QUALITY,
                                     best={VOC_CLASSES[c]: soft[(c - 1) % len(soft)]
                                           for c in range(1, NUM_CLASSES)})
                     if soft_quality is None and soft else
                     (soft_quality if soft_quality is not None else np.zeros((0, FG))),
                     len(soft), "soft_quality")
    ab = np.broadcast_to(np.asarray(abstain, dtype=np.float64), (len(names),)).copy() \
        if np.ndim(abstain) == 0 else np.asarray(abstain, dtype=np.float64)
    if ab.shape != (len(names),) or (ab.size and (ab.min() < 0 or ab.max() > 1)):
        raise InputError(f"abstain must be one probability or one per set ({len(names)}), in [0, 1]")

    # every image's size comes from its own stream, so adding images never changes earlier ones
    shapes = np.array([np.random.default_rng([int(seed), i, 4]).integers(lo, hi + 1, size=2)
                       for i in range(n_images)], dtype=np.int64).reshape(n_images, 2)
    bias = np.random.default_rng([int(seed), 8]).choice(np.array([-1.0, 1.0]), size=(len(names), NUM_CLASSES))
    perm = np.random.default_rng([int(seed), 9]).permutation(n_images)
    ids = tuple(f"synth_{i:06d}" for i in range(n_images))
    val_set = set(int(k) for k in perm[:n_val])
    train_idx = [i for i in range(n_images) if i not in val_set]
    val_idx = sorted(val_set)
    spec = _Spec(int(seed), shapes, ids, names, q, ab, soft, sq, bias, int(max_objects), int(band),
                 bool(tags_only))
    params = {
        "generator": "isle_fast.synthetic.datasets.make_voc_like", "seed": int(seed), "n_images": n_images,
        "n_val": n_val, "size_range": [lo, hi], "max_objects": int(max_objects), "band": int(band),
        "tags_only": bool(tags_only),
        "set_names": list(names), "soft_sets": list(soft), "abstain": ab.tolist(),
        "quality": _json_matrix(q), "soft_quality": _json_matrix(sq), "classes": list(VOC_CLASSES),
    }
    ds = SyntheticDataset(
        root=None, ids=list(ids), train_ids=[ids[i] for i in train_idx], val_ids=[ids[i] for i in val_idx],
        shapes=shapes, classes=tuple(VOC_CLASSES), set_names=names, soft_set_names=soft, quality=q,
        soft_quality=sq, abstain=ab, seed=int(seed), params=params, _spec=spec)

    if out_dir is None:
        ds.samples = [_generate(spec, i) for i in range(n_images)] if keep_arrays else None
        return ds

    from isle_fast.outputs import FolderOutput, refuse_unsafe

    final = Path(out_dir)
    refuse_unsafe(final, flag="out_dir")
    _prepare_out(final, overwrite)
    dest = FolderOutput(final, command="make_voc_like", overwrite=True, check=False)
    work = dest.work
    try:
        samples = _write_all(ds, spec, work, train_idx, val_idx, write_tree, write_stores,
                             keep_arrays, progress(total=n_images, desc="synthetic data", unit="img",
                                                   quiet=quiet))
        rel_paths, rel_stores = _layout(names, soft, write_tree, write_stores)
        rel_stores = {k: v for k, v in rel_stores.items() if (work / v).is_dir()}  # no val stores when n_val=0
        meta = dict(params, train_ids=ds.train_ids, val_ids=ds.val_ids,
                    true_best=ds.true_best() if names else {},
                    paths=rel_paths, stores=rel_stores)
        write_bytes(work / "dataset.json", json.dumps(meta, indent=1).encode())
        # what is there was checked by _prepare_out (empty, or an earlier data set): replaced
        dest.commit(owned_by_us=_is_data_set_folder)
    except BaseException:
        dest.abort()
        raise
    ds.root = final
    ds.samples = samples
    ds.paths = _absolute(final, rel_paths)
    ds.stores = {k: str(final / v) for k, v in rel_stores.items()}
    ds.paths["json"] = final / "dataset.json"
    return ds


def _json_matrix(q: np.ndarray) -> list[list[float | None]]:
    return [[None if not np.isfinite(v) else round(float(v), 6) for v in row] for row in q]


def _layout(names: Sequence[str], soft: Sequence[str], tree: bool, stores: bool) -> tuple[dict, dict]:
    paths: dict[str, Any] = {}
    if tree:
        paths = {
            "images": "JPEGImages", "gt": "SegmentationClass",
            "pseudo": {s: f"pseudo/{s}" for s in names}, "cams": {s: f"cams/{s}" for s in soft},
            "train_list": "ImageSets/Segmentation/train.txt",
            "val_list": "ImageSets/Segmentation/val.txt",
            "cls_labels": "cls_labels.npy",
        }
    st: dict[str, str] = {}
    if stores:
        st["train/images"] = "stores/train/images.zarr"
        st["train/gt"] = "stores/train/gt.zarr"
        for s in names:
            st[f"train/pseudo/{s}"] = f"stores/train/pseudo/{s}.zarr"
        for s in soft:
            st[f"train/cams/{s}"] = f"stores/train/cams/{s}.zarr"
        st["val/images"] = "stores/val/images.zarr"
        st["val/gt"] = "stores/val/gt.zarr"
    return paths, st


def _absolute(root: Path, rel: dict) -> dict:
    out: dict[str, Any] = {}
    for k, v in rel.items():
        out[k] = {kk: root / vv for kk, vv in v.items()} if isinstance(v, dict) else root / v
    return out


def _write_all(ds: SyntheticDataset, spec: _Spec, work: Path, train_idx: list[int], val_idx: list[int],
               write_tree: bool, write_stores: bool, keep: bool, bar) -> list[Sample] | None:
    from isle_fast.stores.stack import create_stack, quantize_scores

    rel_paths, rel_stores = _layout(spec.set_names, spec.soft_set_names, write_tree, write_stores)
    writers: dict[str, _Buffered] = {}
    split_of = {i: "train" for i in train_idx}
    split_of.update({i: "val" for i in val_idx})
    if write_stores:
        prov = {"source": "isle_fast.synthetic.datasets.make_voc_like", "seed": spec.seed}
        for key, rel in rel_stores.items():
            split, kind = key.split("/")[:2]
            idx = train_idx if split == "train" else val_idx
            if not idx:
                continue
            shp = spec.shapes[idx]
            ids = [spec.ids[i] for i in idx]
            name = key.rsplit("/", 1)[-1] if kind in ("pseudo", "cams") else f"{kind}-{split}"
            if kind == "images":
                w = create_stack(work / rel, kind="images", classes=VOC_CLASSES, ids=ids, shapes=shp,
                                 name=name, provenance=dict(prov, split=split))
                fill = 0
            elif kind == "gt":
                w = create_stack(work / rel, kind="gt", classes=VOC_CLASSES, ids=ids, shapes=shp,
                                 name=name, provenance=dict(prov, split=split))
                fill = IGNORE_INDEX
            elif kind == "pseudo":
                n = spec.set_names.index(name)
                w = create_stack(work / rel, kind="pseudo", classes=VOC_CLASSES, ids=ids, shapes=shp,
                                 name=name, provenance=dict(prov, split=split, simulated="hard",
                                                            quality=_json_matrix(spec.quality[n:n + 1])[0]))
                fill = IGNORE_INDEX
            else:
                m = spec.soft_set_names.index(name)
                w = create_stack(work / rel, kind="pseudo", classes=VOC_CLASSES, ids=ids, shapes=shp,
                                 name=name, encoding="scores", score_dtype="uint8",
                                 provenance=dict(prov, split=split, simulated="cam",
                                                 bg_threshold=CAM_BG_THRESHOLD,
                                                 quality=_json_matrix(spec.soft_quality[m:m + 1])[0]))
                fill = 0
            writers[key] = _Buffered(w, int(w.array.chunks[0]), fill)
    samples: list[Sample] = [] if keep else None  # type: ignore[assignment]
    image_labels: dict[str, list[int]] = {}
    try:
        lists: dict[str, list[str]] = {"train": [], "val": []}
        # stores are filled split by split, in id order: go over the images in that order
        for i in list(train_idx) + list(val_idx):
            s = _generate(spec, i)
            split = split_of[i]
            lists[split].append(s.id)
            image_labels[s.id] = [int(c) for c in s.present]
            if write_tree:
                write_bytes(work / rel_paths["images"] / f"{s.id}.jpg", s.jpeg)
                write_bytes(work / rel_paths["gt"] / f"{s.id}.png", _png_bytes(s.gt))
                for name, lab in s.pseudo.items():
                    write_bytes(work / rel_paths["pseudo"][name] / f"{s.id}.png", _png_bytes(lab))
                for name, cam in s.cams.items():
                    save_cam_npy(work / rel_paths["cams"][name] / f"{s.id}.npy", cam["keys"], cam["high_res"])
            if write_stores:
                writers[f"{split}/images"].add(s.image)
                writers[f"{split}/gt"].add(s.gt)
                if split == "train":
                    for name, lab in s.pseudo.items():
                        writers[f"train/pseudo/{name}"].add(lab)
                    for name, cam in s.cams.items():
                        sc = cam_scores(cam)
                        writers[f"train/cams/{name}"].add(quantize_scores(sc))  # as ingest stores it
            if keep:
                samples.append(s)
            bar.update(1)
        for buffered in writers.values():
            buffered.commit()
        if write_tree:
            for split in ("train", "val"):
                text = "".join(f"{x}\n" for x in sorted(lists[split]))
                write_bytes(work / rel_paths[f"{split}_list"], text.encode())
            save_cls_labels(work / rel_paths["cls_labels"], dict(sorted(image_labels.items())))
    except BaseException:
        for buffered in writers.values():
            buffered.writer.abort()
        raise
    finally:
        bar.close()
    if keep:
        samples.sort(key=lambda s: s.id)
    return samples


def preview_png(ds: SyntheticDataset, path: str | os.PathLike, n: int = 4) -> Path:
    """Write a preview of the first ``n`` images: image, ground truth, every hard set, every soft set.

    Parameters
    ----------
    ds : SyntheticDataset
    path : str or path-like
        The PNG to write (atomically).
    n : int
        Rows (images).

    Returns
    -------
    Path
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pal = voc_palette()
    n = max(1, min(n, ds.num_images))
    cols = ["image", "ground truth"] + [f"{s} (hard)" for s in ds.set_names] + \
        [f"{s} (CAM max)" for s in ds.soft_set_names]
    fig, axes = plt.subplots(n, len(cols), figsize=(1.9 * len(cols), 1.9 * n), squeeze=False)
    for r in range(n):
        s = ds.sample(r)
        panels = [s.image, pal[s.gt]] + [pal[s.pseudo[k]] for k in ds.set_names]
        for k in ds.soft_set_names:
            hr = s.cams[k]["high_res"]
            panels.append(hr.max(axis=0) if len(hr) else np.zeros(s.gt.shape, np.float32))
        for c, (ax, im) in enumerate(zip(axes[r], panels)):
            ax.imshow(im, cmap="jet" if im.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(cols[c], fontsize=7)
        axes[r][0].set_ylabel(s.id, fontsize=6)
    fig.tight_layout()
    from isle_fast.outputs import write_file

    out = Path(path)
    try:
        write_file(out, lambda p: fig.savefig(p, dpi=110, format="png"))
    finally:
        plt.close(fig)
    return out
