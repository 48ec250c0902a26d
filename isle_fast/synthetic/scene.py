"""A small synthetic scene for refinement tests and benchmarks: coloured rectangles on a dark
background, their true labels and blurry, shifted CAM-like scores (:func:`synthetic_scene`)."""

from __future__ import annotations

import numpy as np

__all__ = ["synthetic_scene"]


def synthetic_scene(height: int, width: int, num_classes: int = 4, objects: int = 3, *,
                    blur: float = 6.0, shift: int = 3, noise: float = 0.05,
                    rng: np.random.Generator | int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A clean RGB image of a few coloured rectangles, its true labels and blurry CAM-like scores.

    Parameters
    ----------
    height, width : int
        Image size.
    num_classes : int
        C, background included; object classes are drawn from ``1..C-1``.
    objects : int
        Number of rectangles.
    blur : float
        Std (pixels) of the Gaussian blur applied to the true masks to make the scores.
    shift : int
        The scores are shifted by up to this many pixels (CAMs are not aligned with edges).
    noise : float
        Uniform noise amplitude added to the scores.
    rng : Generator or int, optional

    Returns
    -------
    rgb : (h, w, 3) uint8
        Every class has its own flat colour plus a little noise.
    gt : (h, w) uint8
    scores : (h, w, C) float32 in [0, 1]
        Blurry foreground slices (max-normalised per class) and background ``1 - max fg``.
    """
    rng = np.random.default_rng(rng)
    gt = np.zeros((height, width), dtype=np.uint8)
    for _ in range(objects):
        c = int(rng.integers(1, num_classes))
        h0 = int(rng.integers(max(2, height // 5), max(3, height // 2)))
        w0 = int(rng.integers(max(2, width // 5), max(3, width // 2)))
        y0 = int(rng.integers(0, max(1, height - h0)))
        x0 = int(rng.integers(0, max(1, width - w0)))
        gt[y0:y0 + h0, x0:x0 + w0] = c
    palette = rng.integers(30, 226, size=(num_classes, 3))
    palette[0] = (20, 20, 20)
    rgb = np.clip(palette[gt] + rng.normal(0, 3, size=gt.shape + (3,)), 0, 255).astype(np.uint8)
    scores = np.zeros((height, width, num_classes), dtype=np.float32)
    radius = max(1, int(3 * blur))
    xs = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (xs / max(blur, 1e-6)) ** 2)
    kernel /= kernel.sum()
    for c in range(1, num_classes):
        m = (gt == c).astype(np.float32)
        if not m.any():
            continue
        dy, dx = (int(v) for v in rng.integers(-shift, shift + 1, size=2))
        m = np.roll(m, (dy, dx), axis=(0, 1))
        # the centre of the full convolution: np.convolve's "same" for rows longer than the kernel,
        # and still the row's length when the image is smaller than the kernel ("same" is not then)
        m = np.apply_along_axis(lambda r: np.convolve(r, kernel)[radius:radius + r.size], 0, m)
        m = np.apply_along_axis(lambda r: np.convolve(r, kernel)[radius:radius + r.size], 1, m)
        m = np.clip(m + rng.uniform(-noise, noise, size=m.shape), 0, None)
        scores[..., c] = m / max(float(m.max()), 1e-6)
    scores[..., 0] = 1.0 - scores[..., 1:].max(axis=-1)
    return rgb, gt, scores.astype(np.float32)
