"""Dense CRF refinement (Krähenbühl & Koltun's fully connected CRF, via pydensecrf).

The refinement registered as ``crf``. For every image of a chunk:

1. **crop** the image to its true shape (padding is never refined; the
   runner pads the result with 255 / 0 again);
2. **restrict the label set** to the classes the input has in that image,
   plus background: a CRF never invents a class. For a ``labels`` input the
   classes are the label values present (255 = unknown is not a class); for
   ``scores`` they are, with ``keep='argmax'`` (default), the classes that win
   the per-pixel argmax somewhere in the image (what the hard version of the
   set contains), or with ``keep='nonzero'`` every class whose score is
   above 0 somewhere;
3. **unary** energies over the kept classes:

   * ``scores``: ``-log(clip(p, clip, 1))`` (pydensecrf's
     ``unary_from_softmax``). Scores need not sum to 1: a per-pixel constant
     in the unary does not change the CRF;
   * ``labels``: the ``unary_from_labels`` model: the given label has
     probability ``gt_prob`` (0.7), the other kept classes share ``1 - gt_prob``;
     unknown pixels (255) get a uniform unary and are filled in by the CRF;
4. **pairwise** terms on the RGB image: a Gaussian (smoothness) kernel
   ``gauss_sxy=3, gauss_compat=3`` and a bilateral (appearance) kernel
   ``bi_sxy=80, bi_srgb=13, bi_compat=10``: the public WSSS defaults
   (AffinityNet / IRN / PuzzleCAM code);
5. ``iterations=10`` steps of mean-field inference;
6. **output**: ``output='auto'`` keeps the input's encoding (labels in ->
   the argmax label map; scores in -> the CRF marginals ``Q`` as scores, 0 for
   the classes that were not kept); ``'labels'`` or ``'scores'`` force one.

pydensecrf holds the GIL while it runs, so the refinement is ``gil_bound``:
:func:`isle_fast.refinement.chain.refine_stack` runs it in worker processes by default
(``benchmarks/refine.py`` measures threads against processes).
"""

from __future__ import annotations

import numpy as np

from isle_fast.errors import InputError
from isle_fast.refinement.chain import RefineChunk, Refinement

__all__ = ["DenseCRF", "crf_image", "crf_unary", "present_classes"]

DEFAULTS = dict(iterations=10, gauss_sxy=3.0, gauss_compat=3.0, bi_sxy=80.0, bi_srgb=13.0, bi_compat=10.0,
                gt_prob=0.7, clip=1e-5)


def present_classes(data: np.ndarray, encoding: str, num_classes: int, keep: str = "argmax") -> np.ndarray:
    """Sorted int64 array of the classes an (unpadded) image has, background (0) always included.

    Parameters
    ----------
    data : (h, w) uint8 labels or (h, w, C) float scores
    encoding : {'labels', 'scores'}
    num_classes : int
    keep : {'argmax', 'nonzero'}
        For scores: classes that win the argmax somewhere, or classes with a score above 0 somewhere.
    """
    if encoding == "labels":
        vals = np.unique(data)
        vals = vals[vals < num_classes].astype(np.int64)
    elif keep == "argmax":
        vals = np.unique(np.argmax(data, axis=-1)).astype(np.int64) if data.size else np.zeros(0, np.int64)
    elif keep == "nonzero":
        vals = np.nonzero(data.reshape(-1, data.shape[-1]).max(axis=0, initial=0) > 0)[0].astype(np.int64)
    else:
        raise InputError(f"crf.keep must be 'argmax' or 'nonzero', not {keep!r}")
    return np.union1d(np.zeros(1, np.int64), vals)


def crf_unary(data: np.ndarray, encoding: str, kept: np.ndarray, *, gt_prob: float = 0.7,
              clip: float = 1e-5) -> np.ndarray:
    """Unary energies ``(len(kept), h*w)`` float32 for the kept classes (see the module docs)."""
    n = len(kept)
    if encoding == "scores":
        p = np.clip(data[..., kept].astype(np.float32), clip, 1.0)
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


def crf_image(rgb: np.ndarray, data: np.ndarray, encoding: str, num_classes: int, *,
              iterations: int = 10, gauss_sxy: float = 3.0, gauss_compat: float = 3.0,
              bi_sxy: float = 80.0, bi_srgb: float = 13.0, bi_compat: float = 10.0,
              gt_prob: float = 0.7, clip: float = 1e-5, keep: str = "argmax",
              output: str = "labels") -> np.ndarray:
    """Dense CRF on one unpadded image.

    Parameters
    ----------
    rgb : (h, w, 3) uint8
    data : (h, w) uint8 labels or (h, w, C) float probabilities in [0, 1]
    encoding : {'labels', 'scores'}
    num_classes : int
        C, background included.
    iterations, gauss_sxy, gauss_compat, bi_sxy, bi_srgb, bi_compat, gt_prob, clip, keep
        See the module docs.
    output : {'labels', 'scores'}

    Returns
    -------
    (h, w) uint8 labels or (h, w, C) float32 marginals (0 for classes not kept).
    """
    import pydensecrf.densecrf as dcrf

    h, w = data.shape[:2]
    kept = present_classes(data, encoding, num_classes, keep)
    n = len(kept)
    if n == 1 or h * w == 0:
        q = np.ones((1, h, w), dtype=np.float32)
    else:
        crf = dcrf.DenseCRF2D(w, h, n)
        crf.setUnaryEnergy(crf_unary(data, encoding, kept, gt_prob=gt_prob, clip=clip))
        crf.addPairwiseGaussian(sxy=gauss_sxy, compat=gauss_compat)
        crf.addPairwiseBilateral(sxy=bi_sxy, srgb=bi_srgb, rgbim=np.ascontiguousarray(rgb, dtype=np.uint8),
                                 compat=bi_compat)
        q = np.asarray(crf.inference(int(iterations)), dtype=np.float32).reshape(n, h, w)
    if output == "labels":
        return kept[np.argmax(q, axis=0)].astype(np.uint8)
    out = np.zeros((h, w, num_classes), dtype=np.float32)
    out[..., kept] = np.moveaxis(q, 0, -1)
    return out


class DenseCRF(Refinement):
    """The ``crf`` refinement: :func:`crf_image` on every image of a chunk.

    Parameters
    ----------
    iterations : int
        Mean-field iterations (10).
    gauss_sxy, gauss_compat : float
        Gaussian kernel: spatial std in pixels (3) and weight (3).
    bi_sxy, bi_srgb, bi_compat : float
        Bilateral kernel: spatial std (80), colour std (13) and weight (10).
    gt_prob : float
        Confidence of a hard label (0.7); only for ``labels`` input.
    clip : float
        Smallest probability before ``-log`` (1e-5); only for ``scores`` input.
    keep : {'argmax', 'nonzero'}
        Which classes of a ``scores`` image the CRF may use (background is always kept).
    output : {'auto', 'labels', 'scores'}
        ``auto`` keeps the input's encoding.
    """

    needs_rgb = True
    gil_bound = True

    def __init__(self, iterations: int = 10, gauss_sxy: float = 3.0, gauss_compat: float = 3.0,
                 bi_sxy: float = 80.0, bi_srgb: float = 13.0, bi_compat: float = 10.0,
                 gt_prob: float = 0.7, clip: float = 1e-5, keep: str = "argmax", output: str = "auto"):
        if output not in ("auto", "labels", "scores"):
            raise InputError(f"crf.output must be auto, labels or scores, not {output!r}")
        if keep not in ("argmax", "nonzero"):
            raise InputError(f"crf.keep must be 'argmax' or 'nonzero', not {keep!r}")
        if int(iterations) < 0:
            raise InputError(f"crf.iterations must be >= 0, not {iterations}")
        if not 0.0 < float(gt_prob) < 1.0:
            raise InputError(f"crf.gt_prob must be in (0, 1), not {gt_prob}")
        self.kw = dict(iterations=int(iterations), gauss_sxy=float(gauss_sxy), gauss_compat=float(gauss_compat),
                       bi_sxy=float(bi_sxy), bi_srgb=float(bi_srgb), bi_compat=float(bi_compat),
                       gt_prob=float(gt_prob), clip=float(clip), keep=keep)
        self.output = output

    def params(self) -> dict:
        return {**self.kw, "output": self.output}

    def output_encoding(self, input_encoding: str) -> str:
        return input_encoding if self.output == "auto" else self.output

    def refine(self, chunk: RefineChunk) -> np.ndarray:
        enc = self.output_encoding(chunk.encoding)
        k, h_pad, w_pad = chunk.data.shape[:3]
        c = chunk.num_classes
        if enc == "labels":
            out = np.full((k, h_pad, w_pad), 255, dtype=np.uint8)
        else:
            out = np.zeros((k, h_pad, w_pad, c), dtype=np.float32)
        for i in range(k):
            h, w = (int(v) for v in chunk.shapes[i])
            out[i, :h, :w] = crf_image(chunk.rgb[i, :h, :w], chunk.data[i, :h, :w], chunk.encoding, c,
                                       output=enc, **self.kw)
        return out
