"""The CAM file layouts of the public WSSS code, recognised from the file itself.

Every layout below is what that code's own ``np.save`` writes (read with the
search tool in the projects' repositories: IRN ``step/make_cam.py`` /
``step/eval_cam.py``, PuzzleCAM ``inference_classification.py`` /
``inference_rw.py`` / ``evaluate.py``, SEAM ``infer_SEAM.py`` /
``evaluation.py``, PSA ``infer_cls.py``), and each is decoded the way that
code's evaluation decodes it.

``irn``
    ``{"keys": K foreground classes, 0-based (key k is class k + 1), "cam":
    K x h x w (stride 4, a torch tensor in IRN's own files), "high_res": K x H
    x W}``. Evaluation: a constant background slice in front, argmax,
    ``np.pad(keys + 1, (1, 0))[argmax]``.
``puzzlecam``
    ``{"keys": np.pad(keys + 1, (1, 0)), "cam": ..., "hr_cam": K x H x W}``:
    the keys hold the background (0) first and the foreground classes
    1-based, the arrays only the K foreground slices; the random-walk output
    is ``{"keys": the same keys, "rw": K x H x W}`` (PuzzleCAM's
    ``inference_rw.py`` propagates the foreground ``cam`` only, and its
    ``evaluate.py`` / ``make_pseudo_labels.py`` pad ``rw`` with the threshold
    exactly like ``hr_cam``). Evaluation: ``keys[argmax(pad(cams, thr))]``.
    A file whose arrays hold one slice per key (``K + 1``: a background
    slice of its own) is read with that background slice.
``seam``
    ``{class index (0-based foreground): H x W}`` for the image's classes
    (SEAM's and PSA's ``out_cam``). Evaluation: ``tensor[key + 1] = map``,
    background = threshold.
``psa-crf``
    ``{0: background, k + 1: class k}``: the dense-CRF probabilities PSA's
    and SEAM's ``_crf_with_alpha`` save (``out_la_crf``, ``out_ha_crf``,
    ``out_crf``). They sum to 1 over the keys at every pixel. Read as they
    are: the background slice is the file's own.

Plain arrays (no keys) are ``C x H x W`` / ``H x W x C`` (all classes, the
file's own background slice) or ``C - 1`` foreground slices; with the
image's image-level labels, also ``L`` slices for its ``L`` labelled classes
in class order, and only the labelled classes of a ``C - 1`` / ``C`` array
keep their scores (the public code computes CAMs for the labelled classes
only).

Where the file does not say which layout it is, the image-level labels
decide when given (the layout whose classes are the image's labels), else
the file is refused with a message naming the layouts and ``--cam-layout``:

* a keys dict whose ``cam`` (or unnamed) array has one slice per key and
  whose keys start with 0: IRN with class 1 (aeroplane), or PuzzleCAM with a
  background slice; ``high_res`` says IRN, ``hr_cam`` / ``rw`` say PuzzleCAM;
* a dict keyed by class index that has a key 0 and more than one key, whose
  maps do not sum to 1 at every pixel: SEAM CAMs with class 1, or a
  background-first dict like PSA's CRF output (one whose maps sum to 1 is
  taken as ``psa-crf``; one without a key 0 is always ``seam``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from isle_fast.errors import param

__all__ = ["CAM_LAYOUTS", "LAYOUT_CHOICES", "CamSlices", "interpret", "HIGH_RES_KEYS", "LOW_RES_KEYS",
           "PLAIN_KEYS"]

#: The CAM layouts by name (``--cam-layout``); ``auto`` recognises them from the file.
CAM_LAYOUTS = ("irn", "puzzlecam", "seam", "psa-crf")
LAYOUT_CHOICES = ("auto",) + CAM_LAYOUTS

#: Names of the full-resolution entries, in order of preference, and of the stride-4 one.
HIGH_RES_KEYS = ("high_res", "hr_cam", "rw")
LOW_RES_KEYS = ("cam",)
PLAIN_KEYS = ("scores", "probs", "prob", "prediction", "pred")

#: CRF probabilities sum to 1 over the keys; further than this from 1 somewhere means "not a CRF output".
SUM_TOLERANCE = 1e-3

_FAMILY = {"high_res": "irn", "hr_cam": "puzzlecam", "rw": "puzzlecam"}


class BadCam(Exception):
    """The file's layout is wrong or ambiguous; ``str(exc)`` is the reason (the caller adds the file)."""


@dataclass(frozen=True)
class CamSlices:
    """Where a file's class slices are and which class each one is.

    Attributes
    ----------
    layout : str
        ``irn``, ``puzzlecam``, ``seam``, ``psa-crf``, or for plain arrays
        ``full``, ``foreground``, ``image-labels``.
    entry : str
        The member read (``high_res``, ``hr_cam``, ``rw``, ``cam``, a plain
        array's name, ``''`` for a bare array or a dict keyed by class).
    axis : int or None
        Channel axis of the entry (0 or 2); None for a 2-D single slice or a
        dict keyed by class.
    take : tuple of int
        Positions along ``axis`` (or dict keys, in this order) to read.
    classes : tuple of int
        The class of every slice read; 0 is a background slice of the file.
    low_res : bool
        The entry is the stride-4 ``cam``.
    """

    layout: str
    entry: str
    axis: int | None
    take: tuple[int, ...]
    classes: tuple[int, ...]
    low_res: bool

    @property
    def own_background(self) -> bool:
        """Whether the file supplies the background slice (else it is the threshold)."""
        return 0 in self.classes

    def extract(self, value: Any) -> np.ndarray:
        """The slices read from the entry's data, ``(K, h, w)``, in :attr:`classes` order."""
        if self.axis is None and isinstance(value, Mapping):
            return np.stack([_array(value[k]) for k in self.take]) if self.take else np.zeros((0, 0, 0))
        arr = _array(value)
        if self.axis is None:
            return arr[None]
        if self.axis == 2:
            arr = np.moveaxis(arr, 2, 0)
        return arr[list(self.take)]


def _array(v: Any) -> np.ndarray:
    if hasattr(v, "detach"):  # a torch tensor from a file read with --allow-pickle
        v = v.detach().cpu().numpy()
    return np.asarray(v)


# --------------------------------------------------------------------------- keys
def class_keys(raw: Any, what: str = "keys") -> np.ndarray:
    """Integer class keys from a file's ``keys`` (or dict keys); fractions and repeats are errors."""
    arr = _array(raw)
    if arr.ndim > 1:
        raise BadCam(f"{what} have shape {arr.shape}; expected a flat list of class indices")
    arr = arr.reshape(-1)
    if arr.dtype.kind == "b" or arr.dtype.kind not in "iuf":
        raise BadCam(f"{what} {arr.tolist()[:8]} are not class indices (dtype {arr.dtype})")
    if arr.dtype.kind == "f":
        bad = ~np.isfinite(arr) | (arr != np.round(arr))
        if bad.any():
            raise BadCam(f"{what} {arr.tolist()[:8]} hold {float(arr[bad][0])!r}, which is not a whole "
                         f"number; class indices are never fractions (the file is damaged or not a CAM file)")
    out = arr.astype(np.int64)
    if len(np.unique(out)) != len(out):
        raise BadCam(f"{what} {out.tolist()} repeat a class")
    return out


def _dict_keys(d: Mapping) -> np.ndarray:
    vals = []
    for k in d:
        if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, float, np.integer, np.floating)):
            raise BadCam(f"a dict keyed by class index has the key {k!r}")
        vals.append(k)
    return class_keys(np.asarray(vals), "dict keys")


def is_class_dict(members: Mapping) -> bool:
    """Whether ``members`` is a dict keyed by class index (SEAM / PSA) rather than by array name."""
    return bool(members) and all(isinstance(k, (int, float, np.integer, np.floating))
                                 and not isinstance(k, (bool, np.bool_)) for k in members)


# --------------------------------------------------------------------------- helpers
def _ambiguous(what: str, options: Sequence[str]) -> BadCam:
    opts = " or ".join(param("cam_layout", o) for o in options)
    return BadCam(f"is ambiguous: {what}; pick the layout with {opts}, or give the "
                  f"image-level labels ({param('image_labels')}) to decide per image")


def _labels_pick(cands: list[tuple[str, Any, tuple[int, ...]]], labels: frozenset[int] | None):
    """The one candidate whose foreground classes are the image's labels, or None."""
    if labels is None:
        return None
    hits = [c for c in cands if frozenset(k for k in c[2] if k > 0) == labels]
    return hits[0] if len(hits) == 1 else None


def _shape_options(shape: tuple[int, ...], expect: tuple[int, int] | None,
                   low_res: bool) -> list[tuple[int, int]]:
    """``(axis, slices)`` readings of a 3-D array whose other two axes can be the image."""
    out: list[tuple[int, int]] = []
    if len(shape) != 3:
        return out
    for axis in (0, 2):
        spatial = tuple(s for i, s in enumerate(shape) if i != axis)
        if expect is not None and not low_res and spatial != tuple(expect):
            continue
        out.append((axis, int(shape[axis])))
    return out


# --------------------------------------------------------------------------- the layouts
def _keyed(entry: str, shape: tuple[int, ...], keys: np.ndarray, c: int, layout: str,
           labels: frozenset[int] | None, expect: tuple[int, int] | None) -> CamSlices:
    low = entry in LOW_RES_KEYS
    k = len(keys)
    if len(shape) == 2:
        options: list[tuple[Any, int]] = [(None, 1)]
    elif len(shape) != 3:
        raise BadCam(f"score array {entry!r} has shape {shape}; expected K x H x W")
    else:
        options = _shape_options(shape, expect, low)
        if not options:
            assert expect is not None, "without an image size every 3-D shape has a reading"
            raise BadCam(f"scores have shape {shape}, which does not match the image size "
                         f"{expect[0]} x {expect[1]}")
    starts_bg = k > 0 and keys[0] == 0
    cands: list[tuple[str, Any, tuple[int, ...]]] = []
    range_errors = []
    for axis, n in options:
        if n == k:
            if keys.min(initial=0) >= 0 and keys.max(initial=-1) < c - 1:
                cands.append(("irn", axis, tuple(int(v) + 1 for v in keys)))
            else:
                range_errors.append(f"keys {keys.tolist()} are outside [0, {c - 1}) (IRN: 0-based foreground "
                                    f"classes, key k is class k+1); the class count disagrees")
        if starts_bg and n in (k - 1, k):
            fg = keys[1:]
            if fg.min(initial=1) >= 1 and fg.max(initial=0) < c:
                classes = tuple(int(v) for v in (fg if n == k - 1 else keys))
                cands.append(("puzzlecam", axis, classes))
            else:
                range_errors.append(f"keys {keys.tolist()} are outside [1, {c}) after the background key 0 "
                                    f"(PuzzleCAM: 1-based foreground classes); the class count disagrees")
    if layout != "auto":
        cands = [x for x in cands if x[0] == layout]
    if not cands:
        if range_errors:
            raise BadCam(range_errors[0])
        n_desc = " or ".join(str(n) for _, n in options)
        if layout == "puzzlecam" and not starts_bg:
            raise BadCam(f"keys {keys.tolist()} do not start with the background key 0, so this is not the "
                         f"PuzzleCAM layout ({param('cam_layout', 'puzzlecam')})")
        raise BadCam(f"has {k} keys but its scores have shape {shape} ({n_desc} slices)"
                     + (f" (image is {expect[0]} x {expect[1]})" if expect else "")
                     + "; IRN files hold one slice per key, PuzzleCAM files one slice per key after the "
                       "background key 0")
    # the same layout and classes read along axis 0 or 2 (K equals an image side and no gt to tell):
    # the public code writes K x H x W, so axis 0
    first: dict[tuple[str, tuple[int, ...]], tuple[str, Any, tuple[int, ...]]] = {}
    for cand in cands:
        first.setdefault((cand[0], cand[2]), cand)
    cands = list(first.values())
    if len(cands) > 1:
        family = _FAMILY.get(entry)
        named = [x for x in cands if x[0] == family]
        pick = named[0] if len(named) == 1 else _labels_pick(cands, labels)
        if pick is None:
            desc = "; ".join(f"{name}: classes {list(cl)}" for name, _, cl in cands)
            raise _ambiguous(f"keys {keys.tolist()} with {k} slices in {entry!r} fit more than one layout "
                             f"({desc}; class 0 = a background slice in the file)",
                             sorted({x[0] for x in cands}))
        cands = [pick]
    name, axis, classes = cands[0]
    return CamSlices(name, entry, axis, tuple(range(len(classes))), classes, low)


def _plain(entry: str, shape: tuple[int, ...], c: int, labels: frozenset[int] | None,
           expect: tuple[int, int] | None) -> CamSlices:
    low = entry in LOW_RES_KEYS
    if len(shape) != 3:
        raise BadCam(f"score array {entry or ''} has shape {shape}; expected C x H x W or H x W x C"
                     .replace("  ", " "))
    options = _shape_options(shape, expect, low)
    if not options:
        assert expect is not None, "without an image size every 3-D shape has a reading"
        raise BadCam(f"scores have shape {shape}, which does not match the image size {expect[0]} x "
                     f"{expect[1]}")
    lab = sorted(labels) if labels is not None else None
    for axis, n in options:
        if n == c:
            keep = [0] + (lab if lab is not None else list(range(1, c)))
            return CamSlices("full", entry, axis, tuple(keep), tuple(keep), low)
        if n == c - 1:
            keep = lab if lab is not None else list(range(1, c))
            return CamSlices("foreground", entry, axis, tuple(k - 1 for k in keep), tuple(keep), low)
        if lab is not None and n == len(lab):
            return CamSlices("image-labels", entry, axis, tuple(range(n)), tuple(lab), low)
    ns = " or ".join(str(n) for _, n in options)
    more = f", or {len(lab)} slices for the image's {len(lab)} labelled classes" if lab is not None else ""
    raise BadCam(f"scores have shape {shape}: {ns} slices, but the class count disagrees with the {c} "
                 f"classes (expected {c} slices, or {c - 1} foreground slices{more}; or a 'keys' entry)")


def _class_dict(members: Mapping, c: int, layout: str, labels: frozenset[int] | None,
                expect: tuple[int, int] | None) -> CamSlices:
    keys = _dict_keys(members)
    order = sorted(members, key=lambda k: float(k))
    keys = np.sort(keys)
    shapes = {tuple(_array(members[k]).shape) for k in order}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise BadCam(f"a dict keyed by class index must hold H x W maps of one size; it holds "
                     f"{sorted(shapes)}")
    shape = next(iter(shapes))
    if expect is not None and shape != tuple(expect):
        raise BadCam(f"maps are {shape[0]} x {shape[1]} but the image is {expect[0]} x {expect[1]}")
    cands: list[tuple[str, Any, tuple[int, ...]]] = []
    errors = []
    if keys.min() >= 0 and keys.max() < c - 1:
        cands.append(("seam", None, tuple(int(k) + 1 for k in keys)))
    else:
        errors.append(f"dict keys {keys.tolist()} are outside [0, {c - 1}) (SEAM: 0-based foreground "
                      f"classes, key k is class k+1); the class count disagrees")
    if keys[0] == 0 and len(keys) >= 2 and keys.max() < c:
        cands.append(("psa-crf", None, tuple(int(k) for k in keys)))
    elif keys[0] == 0 and len(keys) >= 2:
        errors.append(f"dict keys {keys.tolist()} are outside [0, {c}) (PSA CRF: 0 = background, k = class "
                      f"k); the class count disagrees")
    if layout != "auto":
        forced = [x for x in cands if x[0] == layout]
        if not forced:
            if layout == "psa-crf" and keys[0] != 0:
                raise BadCam(f"dict keys {keys.tolist()} have no background key 0, so this is not a PSA / "
                             f"SEAM CRF output ({param('cam_layout', 'psa-crf')})")
            if layout in ("irn", "puzzlecam"):
                raise BadCam(f"is a dict keyed by class index (SEAM / PSA), not the {layout} layout "
                             f"(which has a 'keys' entry)")
            raise BadCam(errors[0] if errors else f"does not fit {param('cam_layout', layout)}")
        cands = forced
    if not cands:
        raise BadCam(errors[0])
    if len(cands) > 1:
        maps = np.stack([_array(members[k]).astype(np.float64) for k in order])
        if maps.size and np.abs(maps.sum(axis=0) - 1.0).max() <= SUM_TOLERANCE:
            cands = [x for x in cands if x[0] == "psa-crf"]
        else:
            pick = _labels_pick(cands, labels)
            if pick is None:
                raise _ambiguous(f"a dict keyed by class index with keys {keys.tolist()} can be SEAM / PSA "
                                 f"CAMs (key k is class k+1, so 0 is class 1) or a background-first dict "
                                 f"like PSA's CRF output (0 = background, k = class k), and its maps do not "
                                 f"sum to 1 as CRF probabilities do", ["seam", "psa-crf"])
            cands = [pick]
    name, _, classes = cands[0]
    take = tuple(order)
    return CamSlices(name, "", None, take, classes, False)


def pick_entry(members: Mapping[str, Any]) -> tuple[str, Any, Any]:
    """The score entry of a named-member file: ``(name, value, keys or None)``."""
    keys = members.get("keys")
    for name in HIGH_RES_KEYS + LOW_RES_KEYS:
        if name in members:
            return name, members[name], keys
    if keys is not None:
        others = [n for n in members if n != "keys"]
        if len(others) == 1:
            return others[0], members[others[0]], keys
        raise BadCam(f"has 'keys' but none of {HIGH_RES_KEYS + LOW_RES_KEYS}; members: {sorted(members)}")
    if len(members) == 1:
        name, v = next(iter(members.items()))
        return name, v, None
    for name in PLAIN_KEYS + ("arr_0",):
        if name in members:
            return name, members[name], None
    raise BadCam(f"has several arrays {sorted(members)} and none is named "
                 f"{HIGH_RES_KEYS + LOW_RES_KEYS + PLAIN_KEYS}")


def interpret(members: Mapping[Any, Any], num_classes: int, *, layout: str = "auto",
              labels: Sequence[int] | frozenset[int] | None = None,
              expect: tuple[int, int] | None = None) -> CamSlices:
    """Recognise a CAM file's layout and where its class slices are.

    Parameters
    ----------
    members : mapping
        The file's content: array name -> array (or anything with ``.shape``
        for entries other than ``keys``: a header is enough), a bare array as
        ``{'': array}``, or a dict keyed by class index (SEAM / PSA).
    num_classes : int
        C, background included.
    layout : {'auto', 'irn', 'puzzlecam', 'seam', 'psa-crf'}
        ``auto`` recognises the layout; a name forces it (and is checked).
    labels : sequence of int, optional
        The image's image-level labels (foreground class indices, 1-based):
        decide ambiguous layouts, and which classes a plain array holds.
    expect : (int, int), optional
        The image size (from the ground truth).

    Returns
    -------
    CamSlices

    Raises
    ------
    BadCam
        The layout is wrong for the file, or ambiguous (the message names the
        layouts and ``--cam-layout``).
    """
    if layout not in LAYOUT_CHOICES:
        raise BadCam(f"cam layout must be one of {', '.join(LAYOUT_CHOICES)}, not {layout!r}")
    lab = None if labels is None else frozenset(int(v) for v in labels if int(v) > 0)
    if is_class_dict(members):
        return _class_dict(members, num_classes, layout, lab, expect)
    if not members:
        raise BadCam("holds an empty dict")
    if layout in ("seam", "psa-crf"):
        raise BadCam(f"holds named arrays {sorted(map(str, members))}, not a dict keyed by class index "
                     f"(the {layout} layout)")
    entry, value, keys = pick_entry(members)
    shape = tuple(int(s) for s in getattr(value, "shape", np.shape(value)))
    if keys is not None:
        return _keyed(entry, shape, class_keys(keys), num_classes, layout, lab, expect)
    if layout in ("irn", "puzzlecam"):
        raise BadCam(f"has no 'keys' entry, so it is not the {layout} layout; members: "
                     f"{sorted(map(str, members))}")
    return _plain(entry, shape, num_classes, lab, expect)
