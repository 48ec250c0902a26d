"""Dense CRF refinement (Krähenbühl & Koltun's fully connected CRF, via pydensecrf).

The refinement registered as ``crf``. For every image of a chunk:

1. **crop** the image to its true shape (padding is never refined; the
   runner pads the result with 255 / 0 again);
2. **restrict the label set** to the classes the image may have, plus
   background: a CRF never invents a class. With ``keep='auto'`` (default)
   these are the image's **image-level labels** when they are given (what the
   public code does: PSA runs its CRF over the classes of the image's label,
   IRN over the CAM's ``keys``, which are the image's labels), else the
   classes the input has in that image: for a ``labels`` input the label
   values present (255 = unknown is not a class), for ``scores`` the classes
   that win the per-pixel argmax somewhere (what the hard version of the set
   contains; ``keep='nonzero'``: every class whose score is above 0 somewhere).
   ``keep='image'`` insists on image-level labels. With image labels, a
   ``labels`` pixel whose class the image-level labels exclude is treated as
   unknown, and the scores of excluded classes are not used;
3. **unary** energies over the kept classes:

   * ``scores``: ``-log(clip(p, clip, 1))`` (pydensecrf's
     ``unary_from_softmax``). Scores need not sum to 1: a per-pixel constant
     in the unary does not change the CRF;
   * ``labels``: the ``unary_from_labels`` model: the given label has
     probability ``gt_prob``, the other kept classes share ``1 - gt_prob``;
     unknown pixels (255) get a uniform unary and are filled in by the CRF
     (``zero_unsure=True`` in pydensecrf's terms; an input without 255 is
     exactly IRN's ``zero_unsure=False`` call);
4. **pairwise** terms on the RGB image: a Gaussian (smoothness) kernel
   ``gauss_sxy, gauss_compat`` and a bilateral (appearance) kernel
   ``bi_sxy, bi_srgb, bi_compat``;
5. ``iterations`` steps of mean-field inference;
6. **output**: ``output='auto'`` keeps the input's encoding (labels in ->
   the argmax label map; scores in -> the CRF marginals ``Q`` as scores, 0 for
   the classes that were not kept); ``'labels'`` or ``'scores'`` force one.

Presets
-------
The settings come from a named preset (:data:`PRESETS`), each the exact call
of a public code base; any single value can still be given (``--param
crf.bi_sxy=60``) and wins over the preset:

====================== ===== =============== =================== ======= ===== ========
preset                 iter. Gaussian sxy/c. bilateral sxy/rgb/c. gt_prob clip  features
====================== ===== =============== =================== ======= ===== ========
``psa``                10    3 / 3           80 / 13 / 10        0.7     1e-5  ``xy``
``irn``                10    3 / 3           50 / 5 / 10         0.7     1e-5  ``xy``
``pydensecrf-example`` 5     3 / 3           80 / 13 / 10        0.7     1e-5  ``yx``
====================== ===== =============== =================== ======= ===== ========

* ``psa``: PSA's ``crf_inference`` (``tool/imutils.py`` of jiwoon-ahn/psa), the
  score CRF (``unary_from_softmax``) that PSA, SEAM and PuzzleCAM run on CAMs;
* ``irn``: IRN's ``crf_inference_label`` (``misc/imutils.py`` of jiwoon-ahn/irn),
  the label-map CRF (``unary_from_labels``, ``gt_prob=0.7``) IRN runs on
  thresholded CAMs;
* ``pydensecrf-example``: pydensecrf's ``examples/inference.py`` (5 iterations,
  features built with ``pydensecrf.utils``); it reproduces the example's
  committed results ``out1-3.png`` exactly (``tests/test_crf.py``).

``preset='auto'`` (default) picks what the public code runs for each input
kind: **label maps -> ``irn``, scores -> ``psa``**. (Only the settings differ:
the label set and unaries follow the input kind under every preset.)

``features`` is the order in which the pairwise features reach pydensecrf's
permutohedral lattice, which is not symmetric in its dimensions: ``xy`` is
``DenseCRF2D.addPairwiseGaussian`` / ``addPairwiseBilateral`` (features
``x, y, r, g, b``; what PSA and IRN call), ``yx`` is
``pydensecrf.utils.create_pairwise_gaussian`` / ``create_pairwise_bilateral``
with ``DenseCRF.addPairwiseEnergy`` (``y, x, r, g, b``; what the example
script calls). The two agree except near ties: on the three example scenes
``xy`` labels 38, 84 and 53 of 76,800 / 68,160 / 76,800 pixels differently.

pydensecrf holds the GIL while it runs, so the refinement is ``gil_bound``:
:func:`isle_fast.refinement.chain.refine_stack` runs it in worker processes by default
(``benchmarks/refine.py`` measures threads against processes).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from isle_fast.errors import InputError
from isle_fast.refinement.chain import PrepareContext, RefineChunk, Refinement
from isle_fast.stores.image_labels import normalize_image_labels

__all__ = ["PRESETS", "AUTO_PRESET", "DenseCRF", "crf_settings", "crf_image", "crf_marginals", "crf_unary",
           "present_classes"]

#: The public code's CRF settings by name (see the module docs).
PRESETS: dict[str, dict[str, Any]] = {
    "psa": dict(iterations=10, gauss_sxy=3.0, gauss_compat=3.0, bi_sxy=80.0, bi_srgb=13.0, bi_compat=10.0,
                gt_prob=0.7, clip=1e-5, features="xy"),
    "irn": dict(iterations=10, gauss_sxy=3.0, gauss_compat=3.0, bi_sxy=50.0, bi_srgb=5.0, bi_compat=10.0,
                gt_prob=0.7, clip=1e-5, features="xy"),
    "pydensecrf-example": dict(iterations=5, gauss_sxy=3.0, gauss_compat=3.0, bi_sxy=80.0, bi_srgb=13.0,
                               bi_compat=10.0, gt_prob=0.7, clip=1e-5, features="yx"),
}

#: ``preset='auto'``: the preset the public code uses for each input encoding.
AUTO_PRESET: dict[str, str] = {"labels": "irn", "scores": "psa"}

_KEEP = ("auto", "image", "argmax", "nonzero")
_FEATURES = ("xy", "yx")


# ----------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------
def _check_setting(key: str, value: Any) -> Any:
    """One CRF setting, converted and checked (an :class:`InputError` naming ``crf.<key>``)."""
    if key == "features":
        if value not in _FEATURES:
            raise InputError(f"crf.features must be 'xy' (DenseCRF2D, PSA / IRN) or 'yx' "
                             f"(pydensecrf.utils, its example), not {value!r}")
        return value
    try:
        num = float(value)
    except (TypeError, ValueError):
        raise InputError(f"crf.{key} must be a number, not {value!r}") from None
    if key == "iterations":
        if num != int(num) or num < 0:
            raise InputError(f"crf.iterations must be a whole number >= 0, not {value!r}")
        return int(num)
    if not np.isfinite(num):
        raise InputError(f"crf.{key} must be finite, not {value!r}")
    if key == "gt_prob" and not 0.0 < num < 1.0:
        raise InputError(f"crf.gt_prob must be in (0, 1), not {value!r}")
    if key == "clip" and not 0.0 < num <= 1.0:
        raise InputError(f"crf.clip must be in (0, 1], not {value!r}")
    if key in ("gauss_sxy", "bi_sxy", "bi_srgb") and num <= 0:
        raise InputError(f"crf.{key} must be > 0, not {value!r}")
    return num


def crf_settings(preset: str = "auto", encoding: str | None = None, **overrides: Any) -> dict[str, Any]:
    """The CRF settings of ``preset`` for an input of ``encoding``, with ``overrides`` applied.

    Parameters
    ----------
    preset : {'auto', 'psa', 'irn', 'pydensecrf-example'}
        ``auto``: :data:`AUTO_PRESET` of ``encoding`` (labels -> ``irn``, scores -> ``psa``).
    encoding : {'labels', 'scores'}, optional
        Needed for ``preset='auto'``.
    **overrides
        Any of ``iterations, gauss_sxy, gauss_compat, bi_sxy, bi_srgb, bi_compat,
        gt_prob, clip, features``; ``None`` means "from the preset".

    Returns
    -------
    dict
        ``preset`` (the resolved name) and every setting, checked.
    """
    if preset == "auto":
        if encoding not in AUTO_PRESET:
            raise InputError(f"crf.preset 'auto' needs the input encoding ('labels' or 'scores'), "
                             f"not {encoding!r}")
        preset = AUTO_PRESET[encoding]
    if preset not in PRESETS:
        raise InputError(f"crf.preset must be one of auto, {', '.join(PRESETS)}; not {preset!r}")
    out: dict[str, Any] = {"preset": preset}
    for key, default in PRESETS[preset].items():
        value = overrides.pop(key, None)
        out[key] = _check_setting(key, default if value is None else value)
    if overrides:
        bad = sorted(overrides)[0]
        raise InputError(f"the crf refinement has no setting {bad!r}; "
                         f"its settings: {', '.join(PRESETS['psa'])}")
    return out


# ----------------------------------------------------------------------------------------------
# One image
# ----------------------------------------------------------------------------------------------
def _label_row(image_labels: Any, num_classes: int) -> np.ndarray:
    """One image's labels as a (C,) bool row with background set; (C,) or foreground-only (C-1,) input."""
    row = np.asarray(image_labels)
    if row.ndim != 1 or row.shape[0] not in (num_classes, num_classes - 1):
        raise InputError(f"image labels of one image must have {num_classes} entries (one per class) or "
                         f"{num_classes - 1} (foreground only), not shape {row.shape}")
    return normalize_image_labels(row, num_classes)


def present_classes(data: np.ndarray, encoding: str, num_classes: int, keep: str = "auto",
                    image_labels: Any = None, slot_classes: np.ndarray | None = None) -> np.ndarray:
    """Sorted int64 array of the classes the CRF of one (unpadded) image uses, background (0) always included.

    Parameters
    ----------
    data : (h, w) uint8 labels or (h, w, C) float scores
        Or, with ``slot_classes``, class-sparse scores ``(h, w, 1 + K)``.
    encoding : {'labels', 'scores'}
    num_classes : int
    keep : {'auto', 'image', 'argmax', 'nonzero'}
        ``auto``: the image labels when given, else ``argmax``. ``image``: the
        image labels (required). For scores, ``argmax``: classes that win the
        argmax somewhere; ``nonzero``: classes with a score above 0 somewhere.
        For labels both mean the label values present.
    image_labels : (C,) or (C-1,) bool array, optional
        The image's image-level labels (all classes, or foreground only).
    slot_classes : (1 + K,) int array, optional
        The class of every slot of class-sparse ``data`` (slot 0 background, ascending,
        0 for an unused all-zero slot); every other class scores 0. The result is the
        dense scores' (the first of tied slots is the first of tied classes).
    """
    if keep not in _KEEP:
        raise InputError(f"crf.keep must be one of {', '.join(_KEEP)}; not {keep!r}")
    if keep == "image" and image_labels is None:
        raise InputError("crf.keep='image' needs image-level labels (refine_stack(image_labels=...) "
                         "or a store that holds them)")
    if image_labels is not None and keep in ("auto", "image"):
        return np.nonzero(_label_row(image_labels, num_classes))[0].astype(np.int64)
    if encoding == "labels":
        vals = np.unique(data)
        vals = vals[vals < num_classes].astype(np.int64)
    elif keep in ("argmax", "auto"):
        vals = np.unique(np.argmax(data, axis=-1)).astype(np.int64) if data.size else np.zeros(0, np.int64)
    else:
        vals = np.nonzero(data.reshape(-1, data.shape[-1]).max(axis=0, initial=0) > 0)[0].astype(np.int64)
    if slot_classes is not None and encoding == "scores":
        vals = np.asarray(slot_classes, np.int64)[vals]
    return np.union1d(np.zeros(1, np.int64), vals)


def _kept_scores(data: np.ndarray, kept: np.ndarray, slot_classes: np.ndarray | None) -> np.ndarray:
    """``(h, w, len(kept))`` scores of the kept classes: ``data[..., kept]``, or gathered from slots (0 if none)."""
    if slot_classes is None:
        return data[..., kept]
    pos = {int(c): j for j, c in enumerate(slot_classes) if j == 0 or c}
    out = np.zeros(data.shape[:2] + (len(kept),), dtype=data.dtype)
    for t, c in enumerate(kept):
        j = pos.get(int(c))
        if j is not None:
            out[..., t] = data[..., j]
    return out


def crf_unary(data: np.ndarray, encoding: str, kept: np.ndarray, *, gt_prob: float = 0.7,
              clip: float = 1e-5) -> np.ndarray:
    """Unary energies ``(len(kept), h*w)`` float32 for the kept classes (see the module docs).

    Scores: ``-log(clip(p, clip, 1))`` computed in the input's float type, then
    cast to float32, as ``unary_from_softmax`` does. Labels: ``unary_from_labels``;
    a label outside ``kept`` (255, or a class the image labels exclude) is unknown.
    """
    n = len(kept)
    if encoding == "scores":
        p = data[..., kept]
        if p.dtype.kind != "f":
            p = p.astype(np.float32)
        p = np.clip(p, clip, 1.0)
        return np.ascontiguousarray(-np.log(p).reshape(-1, n).T, dtype=np.float32)
    if not 0.0 < gt_prob < 1.0:
        raise InputError(f"crf.gt_prob must be in (0, 1), not {gt_prob}")
    lut = np.full(256, -1, dtype=np.int64)
    lut[kept] = np.arange(n)
    idx = lut[data.reshape(-1)]
    u = np.full((n, idx.size), -np.log((1.0 - gt_prob) / (n - 1)), dtype=np.float32)
    known = idx >= 0
    u[idx[known], np.nonzero(known)[0]] = -np.log(gt_prob)
    u[:, ~known] = -np.log(1.0 / n)
    return u


def _crf_rgb(rgb: Any, h: int, w: int) -> np.ndarray:
    """The image as pydensecrf needs it: (h, w, 3) uint8, C-contiguous and writeable (a copy if not)."""
    a = np.asarray(rgb)
    if a.shape != (h, w, 3):
        raise InputError(f"the CRF's RGB image has shape {a.shape}; the image is {h} x {w}, so it must be "
                         f"({h}, {w}, 3)")
    if a.dtype != np.uint8:
        if a.dtype.kind not in "iu" or (a.size and (a.min() < 0 or a.max() > 255)):
            raise InputError(f"the CRF's RGB image must hold integers in [0, 255] (uint8), not {a.dtype}")
        a = a.astype(np.uint8)
    # pydensecrf takes a writeable memoryview: a read-only array (np.asarray of a PIL image) is copied
    return np.require(a, np.uint8, ["C_CONTIGUOUS", "WRITEABLE"])


def crf_image(rgb: np.ndarray, data: np.ndarray, encoding: str, num_classes: int, *,
              preset: str = "auto", iterations: int | None = None, gauss_sxy: float | None = None,
              gauss_compat: float | None = None, bi_sxy: float | None = None, bi_srgb: float | None = None,
              bi_compat: float | None = None, gt_prob: float | None = None, clip: float | None = None,
              features: str | None = None, keep: str = "auto", image_labels: Any = None,
              output: str = "labels") -> np.ndarray:
    """Dense CRF on one unpadded image.

    Parameters
    ----------
    rgb : (h, w, 3) uint8
        Never modified; read-only arrays are fine.
    data : (h, w) uint8 labels (255 = unknown) or (h, w, C) float probabilities in [0, 1]
    encoding : {'labels', 'scores'}
    num_classes : int
        C, background included.
    preset : {'auto', 'psa', 'irn', 'pydensecrf-example'}
        Settings (see the module docs); ``auto``: labels -> ``irn``, scores -> ``psa``.
    iterations, gauss_sxy, gauss_compat, bi_sxy, bi_srgb, bi_compat, gt_prob, clip, features
        Override single settings of the preset (``None``: the preset's).
    keep : {'auto', 'image', 'argmax', 'nonzero'}
        Which classes the CRF may use (see :func:`present_classes`).
    image_labels : (C,) or (C-1,) bool array, optional
        The image's image-level labels; with ``keep='auto'`` the CRF uses exactly these classes.
    output : {'labels', 'scores'}

    Returns
    -------
    (h, w) uint8 labels or (h, w, C) float32 marginals (0 for classes not kept).
    """
    if output not in ("labels", "scores"):
        raise InputError(f"crf output must be labels or scores, not {output!r}")
    cfg = crf_settings(preset, encoding, iterations=iterations, gauss_sxy=gauss_sxy,
                       gauss_compat=gauss_compat, bi_sxy=bi_sxy, bi_srgb=bi_srgb, bi_compat=bi_compat,
                       gt_prob=gt_prob, clip=clip, features=features)
    kept, q = crf_marginals(rgb, data, encoding, num_classes, cfg, keep=keep, image_labels=image_labels)
    h, w = data.shape[:2]
    if output == "labels":
        return kept[np.argmax(q, axis=0)].astype(np.uint8)
    out = np.zeros((h, w, num_classes), dtype=np.float32)
    out[..., kept] = np.moveaxis(q, 0, -1)
    return out


def crf_marginals(rgb: np.ndarray, data: np.ndarray, encoding: str, num_classes: int, cfg: dict, *,
                  keep: str = "auto", image_labels: Any = None, slot_classes: np.ndarray | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The kept classes and the CRF marginals ``(len(kept), h, w)`` float32 of one unpadded image.

    ``cfg``: resolved settings (:func:`crf_settings`). With ``slot_classes``, ``data`` is the
    image's class-sparse scores ``(h, w, 1 + K)`` (see :func:`present_classes`): only its
    kept classes are gathered, and the result equals that of the dense scores exactly.
    """
    import pydensecrf.densecrf as dcrf

    h, w = data.shape[:2]
    kept = present_classes(data, encoding, num_classes, keep, image_labels, slot_classes)
    n = len(kept)
    if n == 1 or h * w == 0:
        q = np.ones((1, h, w), dtype=np.float32)
    else:
        img = _crf_rgb(rgb, h, w)
        if encoding == "scores":
            unary = crf_unary(_kept_scores(data, kept, slot_classes), encoding, np.arange(n), clip=cfg["clip"])
        else:
            unary = crf_unary(data, encoding, kept, gt_prob=cfg["gt_prob"], clip=cfg["clip"])
        if cfg["features"] == "xy":
            crf = dcrf.DenseCRF2D(w, h, n)
            crf.setUnaryEnergy(unary)
            crf.addPairwiseGaussian(sxy=cfg["gauss_sxy"], compat=cfg["gauss_compat"])
            crf.addPairwiseBilateral(sxy=cfg["bi_sxy"], srgb=cfg["bi_srgb"], rgbim=img,
                                     compat=cfg["bi_compat"])
        else:
            from pydensecrf.utils import create_pairwise_bilateral, create_pairwise_gaussian

            crf = dcrf.DenseCRF(h * w, n)
            crf.setUnaryEnergy(unary)
            crf.addPairwiseEnergy(create_pairwise_gaussian(sdims=(cfg["gauss_sxy"],) * 2, shape=(h, w)),
                                  compat=cfg["gauss_compat"])
            bilateral = create_pairwise_bilateral(sdims=(cfg["bi_sxy"],) * 2, schan=(cfg["bi_srgb"],) * 3,
                                                  img=img, chdim=2)
            crf.addPairwiseEnergy(bilateral, compat=cfg["bi_compat"])
        q = np.asarray(crf.inference(cfg["iterations"]), dtype=np.float32).reshape(n, h, w)
    return kept, q


# ----------------------------------------------------------------------------------------------
# The refinement
# ----------------------------------------------------------------------------------------------
class DenseCRF(Refinement):
    """The ``crf`` refinement: :func:`crf_image` on every image of a chunk.

    Parameters
    ----------
    preset : {'auto', 'psa', 'irn', 'pydensecrf-example'}
        The public code's settings (see the module docs); ``auto`` (default):
        label maps -> ``irn`` (IRN's ``crf_inference_label``), scores -> ``psa``
        (PSA's ``crf_inference``).
    iterations : int, optional
        Mean-field iterations (presets: 10; the example 5).
    gauss_sxy, gauss_compat : float, optional
        Gaussian kernel: spatial std in pixels and weight (presets: 3 / 3).
    bi_sxy, bi_srgb, bi_compat : float, optional
        Bilateral kernel: spatial std, colour std and weight (psa 80 / 13 / 10, irn 50 / 5 / 10).
    gt_prob : float, optional
        Confidence of a hard label (0.7); only for ``labels`` input.
    clip : float, optional
        Smallest probability before ``-log`` (1e-5); only for ``scores`` input.
    features : {'xy', 'yx'}, optional
        Pairwise feature order (see the module docs).
    keep : {'auto', 'image', 'argmax', 'nonzero'}
        Which classes of an image the CRF may use; ``auto``: the image-level
        labels when the run has them (``chunk.image_labels``), else ``argmax``.
    output : {'auto', 'labels', 'scores'}
        ``auto`` keeps the input's encoding.

    Settings left at ``None`` come from the preset.
    """

    needs_rgb = True
    gil_bound = True
    sparse_input = True

    def __init__(self, preset: str = "auto", iterations: int | None = None, gauss_sxy: float | None = None,
                 gauss_compat: float | None = None, bi_sxy: float | None = None, bi_srgb: float | None = None,
                 bi_compat: float | None = None, gt_prob: float | None = None, clip: float | None = None,
                 features: str | None = None, keep: str = "auto", output: str = "auto"):
        if output not in ("auto", "labels", "scores"):
            raise InputError(f"crf.output must be auto, labels or scores, not {output!r}")
        if keep not in _KEEP:
            raise InputError(f"crf.keep must be one of {', '.join(_KEEP)}; not {keep!r}")
        if preset != "auto" and preset not in PRESETS:
            raise InputError(f"crf.preset must be one of auto, {', '.join(PRESETS)}; not {preset!r}")
        given = dict(iterations=iterations, gauss_sxy=gauss_sxy, gauss_compat=gauss_compat, bi_sxy=bi_sxy,
                     bi_srgb=bi_srgb, bi_compat=bi_compat, gt_prob=gt_prob, clip=clip, features=features)
        self.overrides = {k: _check_setting(k, v) for k, v in given.items() if v is not None}
        self.preset = preset
        self.keep = keep
        self.output = output
        self._input_encoding: str | None = None
        self._uses_image_labels = False

    def settings(self, encoding: str) -> dict[str, Any]:
        """The resolved settings for an input of ``encoding`` (see :func:`crf_settings`)."""
        return crf_settings(self.preset, encoding, **self.overrides)

    def prepare(self, context: PrepareContext) -> None:
        self._input_encoding = context.encoding
        self._uses_image_labels = context.image_labels is not None and self.keep in ("auto", "image")
        if self.keep == "image" and context.image_labels is None:
            raise InputError(f"crf.keep='image' needs image-level labels: {context.source.path} holds none "
                             "and none were given (refine_stack(image_labels=...))")
        if context.encoding is not None:
            self.settings(context.encoding)  # a bad override fails before any image runs

    def params(self) -> dict:
        if self._input_encoding is not None:
            cfg = self.settings(self._input_encoding)
        else:
            cfg = {"preset": self.preset, **self.overrides}
        keep = self.keep
        if keep == "auto" and self._input_encoding is not None:
            keep = "image" if self._uses_image_labels else "argmax"
        return {**cfg, "keep": keep, "output": self.output}

    def output_encoding(self, input_encoding: str) -> str:
        return input_encoding if self.output == "auto" else self.output

    def refine(self, chunk: RefineChunk) -> Any:
        if chunk.keys is not None:
            return self._refine_sparse(chunk)
        enc = self.output_encoding(chunk.encoding)
        cfg = self.settings(chunk.encoding)
        preset = cfg.pop("preset")
        k, h_pad, w_pad = chunk.data.shape[:3]
        c = chunk.num_classes
        if enc == "labels":
            out = np.full((k, h_pad, w_pad), 255, dtype=np.uint8)
        else:
            out = np.zeros((k, h_pad, w_pad, c), dtype=np.float32)
        labels = chunk.image_labels
        rgb = chunk.rgb
        assert rgb is not None, "the chain hands RGB to a refinement with needs_rgb"
        for i in range(k):
            h, w = (int(v) for v in chunk.shapes[i])
            out[i, :h, :w] = crf_image(rgb[i, :h, :w], chunk.data[i, :h, :w], chunk.encoding, c,
                                       preset=preset, **cfg, keep=self.keep,
                                       image_labels=None if labels is None else labels[i], output=enc)
        return out

    def _refine_sparse(self, chunk: RefineChunk) -> Any:
        """A class-sparse chunk: each image's kept classes gathered from its slots; sparse scores out."""
        from isle_fast.refinement.chain import SparseScores

        enc = self.output_encoding(chunk.encoding)
        cfg = self.settings(chunk.encoding)
        k, h_pad, w_pad = chunk.data.shape[:3]
        labels, rgb, slots = chunk.image_labels, chunk.rgb, chunk.slot_classes()
        assert rgb is not None, "the chain hands RGB to a refinement with needs_rgb"
        results = []
        for i in range(k):
            h, w = (int(v) for v in chunk.shapes[i])
            results.append(crf_marginals(rgb[i, :h, :w], chunk.data[i, :h, :w], chunk.encoding,
                                         chunk.num_classes, cfg, keep=self.keep,
                                         image_labels=None if labels is None else labels[i],
                                         slot_classes=slots[i]))
        if enc == "labels":
            out = np.full((k, h_pad, w_pad), 255, dtype=np.uint8)
            for i, (kept, q) in enumerate(results):
                h, w = q.shape[1:]
                out[i, :h, :w] = kept[np.argmax(q, axis=0)].astype(np.uint8)
            return out
        kk = max([0] + [len(kept) - 1 for kept, _ in results])
        data = np.zeros((k, h_pad, w_pad, 1 + kk), dtype=np.float32)
        keys = np.zeros((k, kk), dtype=np.uint8)
        for i, (kept, q) in enumerate(results):
            h, w = q.shape[1:]
            data[i, :h, :w, :len(kept)] = np.moveaxis(q, 0, -1)   # kept[0] is the background
            keys[i, :len(kept) - 1] = kept[1:]
        return SparseScores(data=data, keys=keys)
