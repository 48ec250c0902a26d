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
    (a pickled dict; :func:`~isle_fast.synthetic.wsss_files.load_cam_npy` reads it with the restricted
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

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from isle_fast.errors import InputError, param
from isle_fast.outputs import write_bytes
from isle_fast.stores.png import label_png_bytes, voc_palette
from isle_fast.stores.stack import IGNORE_INDEX, VOC_CLASSES
from isle_fast.synthetic.quality import PAPER_SETS, SOFT_BASE_QUALITY, _as_quality, default_quality
from isle_fast.synthetic.samples import FG, NUM_CLASSES, Sample, _generate, _Spec
from isle_fast.synthetic.wsss_files import CAM_BG_THRESHOLD, cam_scores, save_cam_npy, save_cls_labels

__all__ = [
    "SyntheticDataset",
    "make_voc_like",
    "preview_png",
]


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

    def __repr__(self) -> str:
        # the samples hold every image, JPEG and label map: a repr of a line, not of megabytes
        return (f"SyntheticDataset(root={str(self.root)!r}, images={len(self.ids)} "
                f"(train {len(self.train_ids)}, val {len(self.val_ids)}), sets={list(self.set_names)}, "
                f"soft_sets={list(self.soft_set_names)}, seed={self.seed}, "
                f"arrays={'kept' if self.samples is not None else 'not kept'})")

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
    from isle_fast.outputs import check_replaceable_folder

    check_replaceable_folder(
        out_dir, overwrite=overwrite, ours=_is_data_set_folder, name=str(out_dir),
        choose=f"choose another folder or pass {param('overwrite')} to replace a data set made here",
        not_ours="holds no dataset.json; refusing to replace a folder that this tool did not make")


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
                write_bytes(work / rel_paths["gt"] / f"{s.id}.png", label_png_bytes(s.gt))
                for name, lab in s.pseudo.items():
                    write_bytes(work / rel_paths["pseudo"][name] / f"{s.id}.png", label_png_bytes(lab))
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
