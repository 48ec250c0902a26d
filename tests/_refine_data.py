"""Tiny synthetic image / CAM stores for the refinement tests (rectangles on a clean RGB image)."""

from __future__ import annotations

import numpy as np

from isle_fast.stores.stack import create_stack
from isle_fast.synthetic.scene import synthetic_scene

CLASSES = ["background", "a", "b", "c"]


def make_scenes(n: int = 4, seed: int = 0, hmin: int = 24, hmax: int = 40, wmin: int = 24, wmax: int = 48,
                num_classes: int = 4):
    """``n`` scenes of different sizes: lists of rgb, gt, scores and shapes."""
    rng = np.random.default_rng(seed)
    rgbs, gts, scores, shapes = [], [], [], []
    for i in range(n):
        h, w = int(rng.integers(hmin, hmax + 1)), int(rng.integers(wmin, wmax + 1))
        r, g, s = synthetic_scene(h, w, num_classes, objects=2, blur=3.0, shift=2, rng=seed * 1000 + i)
        rgbs.append(r)
        gts.append(g)
        scores.append(s)
        shapes.append((h, w))
    return rgbs, gts, scores, shapes


def write_stores(root, n: int = 4, seed: int = 0, encoding: str = "scores", score_dtype: str = "uint8",
                 chunk: int = 2, **kw):
    """Write ``images.zarr`` and ``set.zarr`` (scores, or their argmax as labels) under ``root``.

    Returns (images_path, set_path, rgbs, gts, scores, shapes).
    """
    rgbs, gts, scores, shapes = make_scenes(n, seed, **kw)
    c = scores[0].shape[-1]
    classes = CLASSES[:c] if c <= len(CLASSES) else [f"c{i}" for i in range(c)]
    ids = [f"im{i:03d}" for i in range(n)]
    img_path, set_path = str(root / "images.zarr"), str(root / "set.zarr")
    with create_stack(img_path, kind="images", classes=classes, ids=ids, shapes=shapes,
                      chunks=(chunk, max(h for h, _ in shapes), max(w for _, w in shapes), 3)) as wr:
        for i in range(n):
            wr.write_image(i, rgbs[i])
    with create_stack(set_path, kind="pseudo", classes=classes, ids=ids, shapes=shapes, encoding=encoding,
                      score_dtype=score_dtype) as wr:
        for i in range(n):
            if encoding == "labels":
                wr.write_image(i, scores[i].argmax(-1).astype(np.uint8))
            elif score_dtype == "uint8":
                wr.write_image(i, np.rint(scores[i] * 255).astype(np.uint8))
            else:
                wr.write_image(i, scores[i].astype(score_dtype))
    return img_path, set_path, rgbs, gts, scores, shapes


def miou(pred: np.ndarray, gt: np.ndarray, num_classes: int) -> float:
    """Mean IoU over the classes present in ``gt``."""
    ious = []
    for c in range(num_classes):
        g, p = gt == c, pred == c
        if g.any():
            ious.append((g & p).sum() / (g | p).sum())
    return float(np.mean(ious))
