"""CAM sets at VOC scale: ingest -> every background threshold in one pass -> merge at each set's best.

``python -m benchmarks.cams [--quick] [--images N] [--workers W]``

Data: N images (default 10,582, VOC ``train_aug``; ``--quick`` 24) of
VOC-like shapes (up to 500 x 500, ``--quick`` 96), a ground-truth PNG each
(1-3 object classes as blobs, a 255 band around every object) and 4 CAM sets
written the way IRN's ``make_cam.py`` writes them: one ``<id>.npy`` pickled
dict ``{"keys", "cam", "high_res"}`` per image, the image's 1-3 classes only,
float32 (max-normalised blobs of different quality per set, plus noise).
Written once to ``benchmarks/results/tmp`` (cached between runs): the CAM
files take about 2 MB an image and set at 500 x 500 (the full size, ~85 GB;
``--side`` makes smaller images).

CAM values are drawn on the ``uint8`` grid (``k / 255`` as float32), so the
default ``uint8`` store holds them without loss and the equality check below
is exact at every threshold (with real CAMs, re-thresholding ``uint8``
scores is exact for the stored precision: one level, 1/255).

Timed, in one run:

* **isle**: ``ingest_scores`` of the 4 folders (the default layout) and of
  the ground truth; :func:`isle_fast.sweep_thresholds` over 16 thresholds
  (0.05:0.80:0.05) in one pass; :func:`isle_fast.merge` with
  ``bg_threshold`` = the same sweep (each set merged at its own best
  threshold; this includes its own sweep pass). Wall and CPU seconds, peak
  resident memory. An untimed one-threshold sweep first loads the kernels
  (Numba's cache), so no step is charged for it.
* **kernel only**: ``sparse_score_bins`` (decode of the stored slots +
  ``(gt, argmax, score bin)`` counts on the sweep's bins, padding skipped)
  on the first 32 images held in memory, all cores, best of 5, in G
  set-pixels/s (image pixels x 4 sets); next to the plain NumPy decode +
  ``np.bincount`` of the same arrays, the counts asserted equal.
* **public scripts' approach** (IRN ``eval_cam.py``, PuzzleCAM
  ``evaluate.py``): for every threshold, load every CAM file, pad the
  threshold in front, argmax, map through the keys, ``np.bincount`` against
  the gt PNG; on a process pool of all cores (``--workers``). Reading the
  files is part of it, as in those scripts.

The confusion counts of both are asserted EQUAL (every set, every
threshold). Writes ``benchmarks/results/cams.json``.
"""

from __future__ import annotations

import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np

from .common import (
    PeakMemory,
    bench_parser,
    format_table,
    headline_row,
    log,
    quiet_progress,
    synth_shapes,
    tmp_dir,
    write_json,
)

THRESHOLDS = "0.05:0.80:0.05"
N_SETS = 4
C = 21


def _blobs(rng: np.random.Generator, h: int, w: int, k: int) -> np.ndarray:
    """``k`` smooth blobs in [0, 1] (max 1), ``(k, h, w)`` float64."""
    yy, xx = np.mgrid[:h, :w] / max(h, w)
    out = np.empty((k, h, w))
    for j in range(k):
        cy, cx = rng.random(2) * [h / max(h, w), w / max(h, w)]
        r = 0.08 + 0.2 * rng.random()
        out[j] = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
    return out


def _write_image(folder: Path, i: int, shape: Sequence[int], seed: int) -> None:
    from PIL import Image

    rng = np.random.default_rng([seed, i])
    h, w = (int(v) for v in shape)
    k = int(rng.integers(1, 4))
    keys = np.sort(rng.choice(C - 1, k, replace=False))  # 0-based foreground classes (IRN's keys)
    truth = _blobs(rng, h, w, k)
    fg = truth.max(axis=0)
    gt = np.where(fg > 0.5, (keys + 1)[np.argmax(truth, axis=0)], 0).astype(np.uint8)
    gt[(fg > 0.42) & (fg < 0.5)] = 255  # the VOC void band around objects
    Image.fromarray(gt).save(folder / "gt" / f"{i:06d}.png")
    for s in range(N_SETS):
        shift = rng.normal(0, 0.03 * (s + 1), (k, 1, 1))
        cam = truth * (0.7 + 0.3 * rng.random((k, 1, 1))) + shift + 0.08 * (s + 1) * rng.random((k, h, w))
        cam = np.clip(cam, 0, None)
        cam /= np.maximum(cam.reshape(k, -1).max(axis=1)[:, None, None], 1e-6)
        hr = (np.rint(cam * 255.0) / 255.0).astype(np.float32)  # on the uint8 grid (see the notes)
        np.save(folder / f"set{s}" / f"{i:06d}.npy", {"keys": keys, "cam": hr[:, ::4, ::4], "high_res": hr})


def make_data(n: int, max_side: int, seed: int = 14, workers: int = 1) -> Path:
    """Write (or reuse) the ground truth and the 4 CAM folders; returns the root."""
    root = tmp_dir() / f"cams-{n}-{max_side}-{seed}"
    if (root / ".complete").exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    for sub in ["gt"] + [f"set{s}" for s in range(N_SETS)]:
        (root / sub).mkdir(parents=True)
    shapes = synth_shapes(n, max_side, seed)
    with ProcessPoolExecutor(max(1, workers)) as ex:
        list(ex.map(_write_image, [root] * n, range(n), shapes, [seed] * n, chunksize=16))
    (root / ".complete").write_text("ok\n")
    return root


# -- the public scripts' approach -------------------------------------------------------------


def _public_one(args: tuple[str, str, tuple[float, ...], int]) -> np.ndarray:
    """One CAM file at every threshold, the file read once per threshold: ``(T, C, C)`` counts."""
    from PIL import Image

    cam_path, gt_path, thresholds, c = args
    out = np.zeros((len(thresholds), c, c), np.int64)
    gt = np.asarray(Image.open(gt_path)).astype(np.int64)
    for t, thr in enumerate(thresholds):
        d = np.load(cam_path, allow_pickle=True).item()  # eval_cam.py: np.load per threshold
        cams = np.pad(d["high_res"], ((1, 0), (0, 0), (0, 0)), mode="constant", constant_values=thr)
        keys = np.pad(d["keys"] + 1, (1, 0), mode="constant")
        pred = keys[np.argmax(cams, axis=0)].astype(np.int64)
        valid = gt < c
        out[t] = np.bincount(gt[valid] * c + pred[valid], minlength=c * c).reshape(c, c)
    return out


def public_sweep(root: Path, ids: Sequence[str], thresholds: Sequence[float], workers: int) -> np.ndarray:
    """``(N, T, C, C)`` counts the public way, on a process pool."""
    out = np.zeros((N_SETS, len(thresholds), C, C), np.int64)
    with ProcessPoolExecutor(workers) as ex:
        for s in range(N_SETS):
            jobs = [
                (str(root / f"set{s}" / f"{i}.npy"), str(root / "gt" / f"{i}.png"), tuple(thresholds), C)
                for i in ids
            ]
            for res in ex.map(_public_one, jobs, chunksize=8):
                out[s] += res
    return out


# -- ours -------------------------------------------------------------------------------------


def _timed(fn):
    t0, c0 = time.perf_counter(), time.process_time()
    value = fn()
    return value, time.perf_counter() - t0, time.process_time() - c0


# -- the kernel alone: decode + confusion of class-sparse scores, in memory ----------------------


def _numpy_sparse_bins(gt, cams, keys, shapes, lut, c):
    """The plain NumPy decode + confusion of class-sparse blocks (the kernel's reference, same bins)."""
    n, h, w = gt.shape
    inside = (np.arange(h)[None, :, None] < shapes[:, 0, None, None]) & (
        np.arange(w)[None, None, :] < shapes[:, 1, None, None]
    )
    keep = inside & (gt < c)
    t = gt[keep].astype(np.int64)
    img = np.broadcast_to(np.arange(n)[:, None, None], gt.shape)[keep]
    nb = int(lut.max()) + 1
    out = np.zeros((len(cams), c, c, nb), np.int64)
    for s, (a, k) in enumerate(zip(cams, keys)):
        v = a[keep]  # (P, K) the stored slots of every counted pixel
        j = np.argmax(v, axis=1)
        m = v[np.arange(v.shape[0]), j].astype(np.int64)
        cls = np.where(m > 0, k[img, j], 1).astype(np.int64)  # all slots 0: the first foreground class
        flat = (t * c + cls) * nb + lut[s][m]
        out[s] = np.bincount(flat, minlength=c * c * nb).reshape(c, c, nb)
    return out


def kernel_throughput(stores, gt, thresholds, images: int = 32) -> dict | None:
    """G set-pixels/s of decode + confusion (``sparse_score_bins``, the sweep's bins) on the first
    ``images`` images held in memory, all cores, best of 5; and of the plain NumPy reference on the same
    arrays (once), the counts asserted equal. None unless every set is class-sparse."""
    import numba

    from isle_fast.ensemble.sweep import level_bins, threshold_levels
    from isle_fast.kernels import cpu

    if any(st.score_layout != "sparse" for st in stores):
        return None
    n = min(images, gt.num_images)
    g = np.ascontiguousarray(gt.array[:n])
    cams = [np.ascontiguousarray(st.member("cams")[:n]) for st in stores]
    keys = [np.ascontiguousarray(st.sparse_keys[:n]) for st in stores]
    shapes = np.asarray(gt.shapes[:n], np.int64)
    lut = np.stack([level_bins(threshold_levels(thresholds, st.score_scale))[0] for st in stores])
    set_pixels = len(stores) * int((shapes[:, 0] * shapes[:, 1]).sum())
    got = cpu.sparse_score_bins(g, cams, keys, C, lut, shapes)  # compiled / loaded from the cache
    best = best_cpu = float("inf")
    for _ in range(5):
        t0, c0 = time.perf_counter(), time.process_time()
        cpu.sparse_score_bins(g, cams, keys, C, lut, shapes)
        best = min(best, time.perf_counter() - t0)
        best_cpu = min(best_cpu, time.process_time() - c0)
    t0 = time.perf_counter()
    want = _numpy_sparse_bins(g, cams, keys, shapes, lut, C)
    ref_s = time.perf_counter() - t0
    assert np.array_equal(got, want), "sparse_score_bins differs from its NumPy reference"
    return {
        "images": n,
        "set_pixels": set_pixels,
        "threads": numba.get_num_threads(),
        "kernel_s": best,
        "kernel_gpix_per_s": set_pixels / best / 1e9,
        "kernel_cpu_s": best_cpu,
        "kernel_gpix_per_cpu_s": set_pixels / max(best_cpu, 1e-9) / 1e9,
        "numpy_s": ref_s,
        "numpy_gpix_per_s": set_pixels / ref_s / 1e9,
        "counts_equal": True,
    }


def main(argv: list[str] | None = None) -> int:
    from isle_fast.ensemble.merge import merge
    from isle_fast.ensemble.sweep import parse_thresholds, sweep_thresholds
    from isle_fast.stores.ingest import ingest_labels, ingest_scores
    from isle_fast.stores.stack import VOC_CLASSES

    p = bench_parser("cams", __doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=None, help="images (default 10582, quick 24)")
    p.add_argument("--side", type=int, default=None, help="largest image side (default 500, quick 96)")
    p.add_argument("--layout", choices=("auto", "sparse", "dense"), default="auto",
                   help="score store layout of the CAM ingest (default auto: class-sparse)")
    p.add_argument("--workers", type=int, default=None, help="reference process pool (default: all cores)")
    args = p.parse_args(argv)
    quick = args.quick
    n = args.images or (24 if quick else 10582)
    side = args.side or (96 if quick else 500)
    workers = args.workers or os.cpu_count() or 1
    thresholds = parse_thresholds(THRESHOLDS)
    log(f"cams: writing / reusing {n} images x {N_SETS} CAM sets (max side {side})")
    root = make_data(n, side, workers=workers)
    ids = sorted(f.stem for f in (root / "gt").glob("*.png"))
    work = tmp_dir() / f"cams-out-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    classes = list(VOC_CLASSES)
    steps = []
    try:
        with quiet_progress(), PeakMemory() as pm:
            gt, wall, cpu = _timed(
                lambda: ingest_labels(root / "gt", work / "gt.zarr", kind="gt", classes=classes, quiet=True)
            )
            steps.append({"step": "ingest gt", "wall_s": wall, "cpu_s": cpu})

            def ingest_all():
                return [
                    ingest_scores(
                        root / f"set{s}",
                        work / f"set{s}.zarr",
                        gt=gt,
                        classes=classes,
                        allow_pickle=True,
                        quiet=True,
                        score_layout=args.layout,
                    )
                    for s in range(N_SETS)
                ]

            stores, wall, cpu = _timed(ingest_all)
            steps.append({"step": f"ingest {N_SETS} CAM sets", "wall_s": wall, "cpu_s": cpu})
            # untimed: the kernels' first call loads them from Numba's cache (or compiles them), which
            # would otherwise be charged to whichever step runs first
            sweep_thresholds(stores, gt, thresholds[:1], backend="cpu", progress=False)
            sw, wall, cpu = _timed(
                lambda: sweep_thresholds(stores, gt, thresholds, backend="cpu", progress=False)
            )
            steps.append(
                {"step": f"sweep {len(thresholds)} thresholds, one pass", "wall_s": wall, "cpu_s": cpu}
            )
            one, wall1, cpu1 = _timed(
                lambda: sweep_thresholds(stores, gt, thresholds[:1], backend="cpu", progress=False)
            )
            steps.append({"step": "one threshold, same pass", "wall_s": wall1, "cpu_s": cpu1})
            res, wall, cpu = _timed(
                lambda: merge(
                    stores,
                    gt,
                    work / "ens.zarr",
                    bg_threshold=list(thresholds),
                    backend="cpu",
                    progress=False,
                )
            )
            steps.append({"step": "merge at each set's best (sweep + merge)", "wall_s": wall, "cpu_s": cpu})
        ours_peak = pm.peak
        kernel = kernel_throughput(stores, gt, thresholds)
        layout = {st.name: {"layout": st.score_layout, "stored_bytes": st.stored_bytes()} for st in stores}
        cam_bytes = sum(f.stat().st_size for k in range(N_SETS) for f in (root / f"set{k}").glob("*.npy"))
        log(f"cams: the public scripts' approach on {workers} processes")
        ref, ref_wall, ref_cpu = _timed(lambda: public_sweep(root, ids, thresholds, workers))
        equal = bool(
            np.array_equal(sw.counts[..., :C], ref)
            and not sw.counts[..., C].any()
            and np.array_equal(one.counts[:, 0], sw.counts[:, 0])
        )
        assert equal, "the sweep's confusion counts differ from the public scripts' approach"
        pixels = int((gt.shapes[:, 0] * gt.shapes[:, 1]).sum())
        sweep_wall = steps[2]["wall_s"]
        sweep_cpu = steps[2]["cpu_s"]
        print(
            f"{n} images ({pixels / 1e6:.1f} Mpix), {N_SETS} CAM sets, {len(thresholds)} thresholds "
            f"({THRESHOLDS}); {os.cpu_count()} cores"
        )
        print(
            format_table(
                [
                    {"step": r["step"], "wall": f"{r['wall_s']:.2f} s", "cpu": f"{r['cpu_s']:.2f} s"}
                    for r in steps
                ]
            )
        )
        print(
            f"public approach ({workers} processes): {ref_wall:.2f} s wall "
            f"(this process's CPU {ref_cpu:.2f} s; the pool's is not counted)"
        )
        rate = N_SETS * pixels / sweep_wall / 1e9
        print(
            f"sweep: {rate:.3f} Gpix/s for {N_SETS} sets ({N_SETS * pixels / max(sweep_cpu, 1e-9) / 1e9:.3f} "
            f"per CPU second), {sweep_wall / max(wall1, 1e-9):.2f}x one threshold; "
            f"{ref_wall / sweep_wall:.1f}x faster than the public approach; counts equal: {equal}"
        )
        sizes = ", ".join(f"{k} {v['layout']} {v['stored_bytes'] / 2**20:.1f} MiB" for k, v in layout.items())
        print(f"stores: {sizes} (the CAM files: {cam_bytes / 2**20:.1f} MiB); peak RSS {ours_peak / 2**20:.0f} MiB")
        if kernel is not None:
            print(
                f"kernel only (decode + confusion, class-sparse uint8, {kernel['images']} images in memory, "
                f"{kernel['threads']} threads): {kernel['kernel_gpix_per_s']:.3f} G set-pixels/s for {N_SETS} "
                f"sets ({kernel['kernel_gpix_per_cpu_s']:.3f} per CPU second); NumPy reference "
                f"{kernel['numpy_gpix_per_s']:.4f} "
                f"({kernel['numpy_s'] / kernel['kernel_s']:.0f}x slower); counts equal"
            )
        merge_s = steps[4]["wall_s"]
        print(f"merge at each set's best (sweep + merge): {merge_s / sweep_wall:.2f}x the sweep")
        print(
            "best thresholds: " + ", ".join(f"{nm} {t:g}" for nm, t in zip(sw.set_names, sw.best_thresholds))
        )
        headline = [
            headline_row(
                f"threshold sweep, {N_SETS} CAM sets x {len(thresholds)} thresholds",
                sweep_wall,
                f"public scripts' approach, {workers} processes",
                ref_wall,
                counts_equal=equal,
                gpix_per_s=rate,
                sweep_over_one_threshold=sweep_wall / wall1,
            )
        ]
        path = write_json(
            "cams",
            {
                "images": n,
                "max_side": side,
                "pixels": pixels,
                "sets": N_SETS,
                "thresholds": list(thresholds),
                "workers": workers,
            "layout": args.layout,
                "steps": steps,
                "reference": {"wall_s": ref_wall, "cpu_s_parent": ref_cpu},
                "peak_rss_bytes": ours_peak,
                "stores": layout,
                "cam_file_bytes": cam_bytes,
                "counts_equal": equal,
                "kernel": kernel,
                "merge_over_sweep": steps[4]["wall_s"] / sweep_wall,
                "best_thresholds": dict(zip(sw.set_names, sw.best_thresholds)),
                "ensemble_provenance": {
                    k: res.stack.provenance.get(k) for k in ("bg_threshold", "bg_thresholds")
                },
                "headline": headline,
            },
            quick=quick,
        )
        print(f"wrote {path}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
