"""Shared by tests/test_cluster.py and tests/test_s3.py: label-PNG folders for the CLI, store and file
comparisons (bit for bit)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from isle_fast.stores.stack import open_stack

PALETTE = [v for i in range(256) for v in ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256)]


def _png(path: Path, a: np.ndarray) -> None:
    im = Image.fromarray(a, mode="P")
    im.putpalette(PALETTE)
    im.save(path, compress_level=1)


def make_folders(root: Path) -> Path:
    """Under ``root``: a gt folder, three noisy pseudo-label folders (label PNGs, 6 classes, odd sizes),
    RGB images and ``classes.txt``; returns ``root``."""
    rng = np.random.default_rng(15)
    names = ["gt", "a", "b", "c", "rgb"]
    for n in names:
        (root / n).mkdir()
    for i in range(40):
        h, w = int(rng.integers(40, 61)), int(rng.integers(50, 71))
        gt = np.zeros((h, w), np.uint8)
        for _ in range(3):
            y, x = int(rng.integers(0, h - 10)), int(rng.integers(0, w - 10))
            gt[y:y + int(rng.integers(5, 20)), x:x + int(rng.integers(5, 20))] = rng.integers(1, 6)
        gt[rng.random((h, w)) < 0.02] = 255
        _png(root / "gt" / f"im{i:03d}.png", gt)
        for s, p in zip("abc", (0.1, 0.2, 0.3)):
            noisy = gt.copy()
            flip = rng.random((h, w)) < p
            noisy[flip] = rng.integers(0, 6, size=int(flip.sum()))
            noisy[noisy == 255] = 0
            _png(root / s / f"im{i:03d}.png", noisy)
        Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(root / "rgb" / f"im{i:03d}.png")
    (root / "classes.txt").write_text("background\nc1\nc2\nc3\nc4\nc5\n")
    return root


def _same_store(a: Path, b: Path) -> None:
    x, y = open_stack(a), open_stack(b)
    assert x.ids == y.ids and np.array_equal(x.shapes, y.shapes)
    assert x.classes == y.classes and x.encoding == y.encoding
    assert x.array.dtype == y.array.dtype and x.array.shape == y.array.shape
    assert np.array_equal(np.asarray(x.array[:]), np.asarray(y.array[:]))


def _same_files(a: Path, b: Path) -> None:
    """Every PNG byte for byte (not isle's ownership marker: it records when it was written)."""
    fa = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file() and p.name != ".isle-output.json")
    fb = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file() and p.name != ".isle-output.json")
    assert fa == fb and fa
    for p in fa:
        assert (a / p).read_bytes() == (b / p).read_bytes(), p


def _scores(path: Path) -> dict:
    """The JSON's numbers and selection (without the store paths, which differ by folder)."""
    d = json.loads(path.read_text())
    sets = {n: {k: v for k, v in s.items() if k != "path"} for n, s in d["sets"].items()}
    return {"classes": d["classes"], "sets": sets, "selection": d["selection"], "gt_pixels": d["gt_pixels"]}
