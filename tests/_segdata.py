"""Tiny synthetic segmentation stores for the training tests (images + labels + gt).

Each image is noisy grey background with one or two coloured shapes; class 1 is
red-ish, class 2 green-ish, so a small network learns them in a few dozen steps.
"""

from __future__ import annotations

import numpy as np

from isle_fast.stores.stack import create_stack

CLASSES = ["background", "red", "green"]


def make_sample(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    img = rng.normal(120, 20, size=(h, w, 3))
    lab = np.zeros((h, w), np.uint8)
    for _ in range(int(rng.integers(1, 3))):
        c = int(rng.integers(1, 3))
        bh, bw = int(rng.integers(h // 4, h // 2 + 1)), int(rng.integers(w // 4, w // 2 + 1))
        y, x = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
        colour = (220, 40, 40) if c == 1 else (40, 200, 60)
        img[y:y + bh, x:x + bw] = rng.normal(colour, 20, size=(bh, bw, 3))
        lab[y:y + bh, x:x + bw] = c
    return np.clip(img, 0, 255).astype(np.uint8), lab


def make_stores(root, n: int = 12, seed: int = 0, size=(40, 72), chunk: int = 3,
                label_chunk: int | None = None, scores: bool = False, prefix: str = "train"):
    """Write ``{prefix}-images.zarr`` and ``{prefix}-labels.zarr`` under ``root``; returns both paths.

    Shapes vary per image (odd sizes included); chunks hold ``chunk`` images.
    With ``scores`` the label store is a one-hot ``scores`` store instead.
    """
    rng = np.random.default_rng(seed)
    shapes = rng.integers(size[0], size[1] + 1, size=(n, 2))
    ids = [f"{prefix}{i:03d}" for i in range(n)]
    samples = [make_sample(rng, int(h), int(w)) for h, w in shapes]
    hp, wp = int(shapes[:, 0].max()), int(shapes[:, 1].max())
    ipath, lpath = f"{root}/{prefix}-images.zarr", f"{root}/{prefix}-labels.zarr"
    with create_stack(ipath, kind="images", classes=CLASSES, ids=ids, shapes=shapes,
                      chunks=(chunk, hp, wp, 3)) as wr:
        for i, (img, _) in enumerate(samples):
            wr.write_image(i, img)
    lc = label_chunk or chunk
    if scores:
        with create_stack(lpath, kind="pseudo", classes=CLASSES, ids=ids, shapes=shapes,
                          encoding="scores", chunks=(lc, hp, wp, len(CLASSES))) as wr:
            for i, (_, lab) in enumerate(samples):
                wr.write_image(i, (np.eye(len(CLASSES), dtype=np.uint8)[lab] * 200))
    else:
        with create_stack(lpath, kind="gt", classes=CLASSES, ids=ids, shapes=shapes,
                          chunks=(lc, hp, wp)) as wr:
            for i, (_, lab) in enumerate(samples):
                wr.write_image(i, lab)
    return ipath, lpath
