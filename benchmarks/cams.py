"""CAM sets at VOC scale: ingest -> every background threshold in one pass -> merge at each set's best.

``python -m benchmarks.cams [--quick] [--images N] [--workers W] [--reference-images M]``

Data: N images (default 10,582, VOC ``train_aug``; ``--quick`` 24) of
VOC-like shapes (up to 500 x 500, ``--quick`` 96), a ground-truth PNG each
(1-3 object classes as blobs, a 255 band around every object) and 4 CAM sets
written the way IRN's ``make_cam.py`` writes them: one ``<id>.npy`` pickled
dict ``{"keys", "cam", "high_res"}`` per image, the image's 1-3 classes only,
float32 (max-normalised blobs of different quality per set, plus noise). The
CAM files take about 2 MB an image and set at 500 x 500: ~85 GB for the 4
sets at the full size, more than a shared disk should hold at once, so the
**CAM sets are on disk one at a time**: the ground truth is written once to
``benchmarks/results/tmp`` (cached between runs); then for each set in turn
its files are written (timed apart, not counted), read by a plain
``np.load(allow_pickle=True)`` loop (the file-read speed), ingested by isle,
run through the public scripts' approach (below), and deleted. The threshold
sweep and the merge then run from the 4 stores, which are smaller (each
class-sparse store holds ~1/5 of its files' bytes here, ~4 GB a set at the
full size; the noisy synthetic CAMs compress worse than real ones). Peak disk
use is one set's files (~19 GB at the full size) plus the stores so far and
the ingest's temporary slot files (~3 GB): ~37 GB at the full size, from
1.05 GiB sampled at 300 images (in the JSON as ``disk_peak_bytes``). Each set's
files are in the page cache when they are read (just written), for every
reader alike, as long as one set fits in memory (~21 GB at the full size).
``--side`` makes smaller images.

CAM values are drawn on the ``uint8`` grid (``k / 255`` as float32), so the
default ``uint8`` store holds them without loss and the equality check below
is exact at every threshold (with real CAMs, re-thresholding ``uint8``
scores is exact for the stored precision: one level, 1/255).

Timed, in one run:

* **isle**: ``ingest_scores`` of each of the 4 folders (the default layout:
  class-sparse, straight from the files) and of the ground truth; beside it,
  the plain ``np.load`` loop over the same files on the same number of
  processes (MB/s and images/s of both), and per core on the first files
  (``np.load`` vs :func:`isle_fast.stores.cam_ingest.read_cam_slots`);
  :func:`isle_fast.sweep_thresholds` over 16 thresholds (0.05:0.80:0.05) in
  one pass; :func:`isle_fast.merge` with
  ``bg_threshold`` = the same sweep (each set merged at its own best
  threshold), twice: with no sweep kept (its own sweep pass + the merge
  pass), then with the sweep kept (:mod:`isle_fast.ensemble.sweep_cache`, as
  after ``isle evaluate --bg-threshold S``: the merge pass only; the two
  ensembles asserted equal). Both are compared with one threshold's pass (the
  target: the merge <= 1.5x). The run's sweep cache is a folder of its own,
  emptied before each counted step. Wall and CPU seconds, peak resident
  memory. An untimed one-threshold sweep first loads the kernels (Numba's
  cache), so no step is charged for it.
* **kernel only**: ``sparse_score_bins`` (decode of the stored slots +
  ``(gt, argmax, score bin)`` counts on the sweep's bins, padding skipped)
  on the first 32 images held in memory, all cores, best of 5, in G
  set-pixels/s (image pixels x 4 sets); next to the plain NumPy decode +
  ``np.bincount`` of the same arrays, the counts asserted equal.
* **public scripts' approach** (IRN ``eval_cam.py``, PuzzleCAM
  ``evaluate.py``): for every threshold, load every CAM file, pad the
  threshold in front, argmax, map through the keys, ``np.bincount`` against
  the gt PNG; on a process pool of all cores (``--workers``), one set at a
  time while its files are on disk. Reading the files is part of it, as in
  those scripts. ``--reference-images M`` runs it on a random sample of M
  images (the same sample for every set; ~25 minutes at all 10,582 images on
  2 cores): its time at all images is then a **projection** (its per-image
  rate x the images), labelled so in the output and the JSON
  (``reference.projected_wall_s_all_images``), and its counts are checked
  against our sweep of a ground truth of the sample's images. Ours always
  runs on every image.

Before anything is written, the run checks that the disk under
``ISLE_BENCH_TMP`` holds its peak (:func:`disk_needed`, ~37 GB at the full
size) and says so otherwise; progress lines (with the seconds since the start)
go to stderr.

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


def _truth(i: int, shape: Sequence[int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Image ``i``'s classes (IRN's 0-based keys) and its ``(k, h, w)`` blobs: the same for the gt and every set."""
    rng = np.random.default_rng([seed, i])
    h, w = (int(v) for v in shape)
    k = int(rng.integers(1, 4))
    keys = np.sort(rng.choice(C - 1, k, replace=False))  # 0-based foreground classes (IRN's keys)
    return keys, _blobs(rng, h, w, k)


def _write_gt(folder: Path, i: int, shape: Sequence[int], seed: int) -> None:
    from PIL import Image

    keys, truth = _truth(i, shape, seed)
    fg = truth.max(axis=0)
    gt = np.where(fg > 0.5, (keys + 1)[np.argmax(truth, axis=0)], 0).astype(np.uint8)
    gt[(fg > 0.42) & (fg < 0.5)] = 255  # the VOC void band around objects
    Image.fromarray(gt).save(folder / f"{i:06d}.png")


def _write_cam(folder: Path, i: int, shape: Sequence[int], seed: int, s: int) -> int:
    """Set ``s``'s CAM file of image ``i`` (its own random stream); returns its size in bytes."""
    keys, truth = _truth(i, shape, seed)
    k, h, w = truth.shape
    rng = np.random.default_rng([seed, i, 1 + s])
    shift = rng.normal(0, 0.03 * (s + 1), (k, 1, 1))
    cam = truth * (0.7 + 0.3 * rng.random((k, 1, 1))) + shift + 0.08 * (s + 1) * rng.random((k, h, w))
    cam = np.clip(cam, 0, None)
    cam /= np.maximum(cam.reshape(k, -1).max(axis=1)[:, None, None], 1e-6)
    hr = (np.rint(cam * 255.0) / 255.0).astype(np.float32)  # on the uint8 grid (see the notes)
    path = folder / f"{i:06d}.npy"
    np.save(path, {"keys": keys, "cam": hr[:, ::4, ::4], "high_res": hr})
    return path.stat().st_size


def make_gt(n: int, max_side: int, seed: int = 14, workers: int = 1) -> Path:
    """Write (or reuse) the ground-truth PNGs; returns the root (the CAM sets go into ``root/set<s>``)."""
    root = tmp_dir() / f"cams-{n}-{max_side}-{seed}"
    if (root / ".complete").exists():
        for old in root.glob("set*"):  # CAM sets left by an interrupted run (or an older version)
            shutil.rmtree(old, ignore_errors=True)
        return root
    shutil.rmtree(root, ignore_errors=True)
    (root / "gt").mkdir(parents=True)
    shapes = synth_shapes(n, max_side, seed)
    with ProcessPoolExecutor(max(1, workers)) as ex:
        list(ex.map(_write_gt, [root / "gt"] * n, range(n), shapes, [seed] * n, chunksize=16))
    (root / ".complete").write_text("ok\n")
    return root


def write_set(root: Path, s: int, n: int, max_side: int, seed: int = 14, workers: int = 1) -> tuple[Path, int]:
    """Write CAM set ``s`` fresh into ``root/set<s>``; returns the folder and its bytes."""
    folder = root / f"set{s}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    shapes = synth_shapes(n, max_side, seed)
    with ProcessPoolExecutor(max(1, workers)) as ex:
        sizes = list(ex.map(_write_cam, [folder] * n, range(n), shapes, [seed] * n, [s] * n, chunksize=16))
    return folder, int(sum(sizes))


class DiskPeak:
    """The largest total size of the files under some folders, sampled every ``interval`` s by a thread."""

    def __init__(self, *folders: Path, interval: float = 1.0):
        import threading

        self.folders = folders
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> int:
        total = 0
        stack = [str(f) for f in self.folders]
        while stack:
            try:
                with os.scandir(stack.pop()) as it:
                    for e in it:
                        try:
                            if e.is_dir(follow_symlinks=False):
                                stack.append(e.path)
                            else:
                                total += e.stat(follow_symlinks=False).st_size
                        except OSError:  # removed while we looked
                            pass
            except OSError:
                pass
        self.peak = max(self.peak, total)
        return total

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> "DiskPeak":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


# -- the plain file-read speed ----------------------------------------------------------------


def _np_load_one(path: str) -> int:
    """``np.load(allow_pickle=True)`` of one CAM file, as the public scripts load it; returns its bytes."""
    d = np.load(path, allow_pickle=True).item()
    return int(sum(np.asarray(v).nbytes for v in d.values()))


def np_load_all(paths: Sequence[str], workers: int) -> float:
    """Wall seconds of loading every file once with ``np.load`` on a pool of ``workers`` processes."""
    t0 = time.perf_counter()
    with ProcessPoolExecutor(workers) as ex:
        for _ in ex.map(_np_load_one, paths, chunksize=16):
            pass
    return time.perf_counter() - t0


def per_core(paths: Sequence[str], limit: int = 200) -> dict:
    """One core, the first ``limit`` files: CPU ms an image of ``np.load``, isle's reader and the old one (best of 2).

    The old reader (``read_scores`` + ``quantize_scores``: the full C-class float32 stack, what the
    dense path built for every file) on the first 50 files only.

    CPU time of this process (``time.process_time``), so other load on a shared machine counts less.
    """
    from isle_fast.stores.cam_ingest import read_cam_slots

    paths = list(paths)[:limit]
    nbytes = sum(os.path.getsize(p) for p in paths)
    read_cam_slots(paths[0], C)  # compile
    out = {"files": len(paths), "bytes": nbytes}
    from isle_fast.stores.formats import read_scores
    from isle_fast.stores.stack import quantize_scores

    def dense(p: str) -> None:  # the dense path's reader: the full C-class float32 stack, quantised
        quantize_scores(read_scores(p, C), np.uint8)

    dense(paths[0])
    for name, fn, files in (("np_load", lambda p: np.load(p, allow_pickle=True).item(), paths),
                            ("read_cam_slots", lambda p: read_cam_slots(p, C), paths),
                            ("dense_reader", dense, paths[:50])):
        best = float("inf")
        for _ in range(2):
            t0 = time.process_time()
            for p in files:
                fn(p)
            best = min(best, time.process_time() - t0)
        size = sum(os.path.getsize(p) for p in files)
        out[name] = {"files": len(files), "ms_per_image": 1e3 * best / len(files), "mb_per_s": size / best / 1e6}
    return out


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


def public_sweep(folder: Path, gt_folder: Path, ids: Sequence[str], thresholds: Sequence[float],
                 workers: int) -> np.ndarray:
    """``(T, C, C)`` counts of one CAM set the public way, on a process pool."""
    out = np.zeros((len(thresholds), C, C), np.int64)
    jobs = [(str(folder / f"{i}.npy"), str(gt_folder / f"{i}.png"), tuple(thresholds), C) for i in ids]
    with ProcessPoolExecutor(workers) as ex:
        for res in ex.map(_public_one, jobs, chunksize=8):
            out += res
    return out


def reference_sample(ids: Sequence[str], m: int | None, seed: int = 14) -> list[str]:
    """The images the public approach runs on: all of them, or a random sample of ``m`` (the same for every
    set, so the sweep of a ground truth of those images checks its counts; sorted by id)."""
    if m is None or m >= len(ids):
        return list(ids)
    rng = np.random.default_rng([seed, 99])
    return sorted(str(v) for v in rng.choice(np.asarray(ids), m, replace=False))


#: CAM file bytes of one 500 x 500-ish image (1-3 classes, float32 ``high_res`` + ``cam``), measured: 1.7 MB
_FILE_BYTES_PER_IMAGE = 1.75e6
#: a class-sparse store of the synthetic CAMs holds about this share of its files' bytes (0.21-0.23 measured)
_STORE_SHARE = 0.25


def disk_needed(n: int, side: int) -> int:
    """Bytes the run needs at its peak: one set's CAM files, the 4 stores, the gt, the ingest's slot files."""
    one_set = _FILE_BYTES_PER_IMAGE * n * (side / 500) ** 2
    return int(one_set * (1 + N_SETS * _STORE_SHARE) + 0.2 * one_set + 2**30)


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
    p.add_argument("--reference-images", type=int, default=None, metavar="M",
                   help="run the public approach on a random sample of M images (the same for every set) and "
                        "project its time to all images (default: all images); ours always runs on all")
    args = p.parse_args(argv)
    quick = args.quick
    n = args.images or (24 if quick else 10582)
    side = args.side or (96 if quick else 500)
    workers = args.workers or os.cpu_count() or 1
    if args.reference_images is not None and args.reference_images < 1:
        p.error("--reference-images must be at least 1")
    thresholds = parse_thresholds(THRESHOLDS)
    need, free = disk_needed(n, side), shutil.disk_usage(tmp_dir()).free
    if need > free:
        p.error(f"{n} images of side {side} need about {need / 1e9:.0f} GB free under {tmp_dir()} "
                f"(one set's CAM files at a time, the 4 stores), {free / 1e9:.0f} GB are; "
                f"point ISLE_BENCH_TMP elsewhere or use fewer --images")
    log(f"cams: {n} images, side {side}: about {need / 1e9:.1f} GB of disk at the peak ({free / 1e9:.0f} GB free)")
    from isle_fast.ensemble.sweep_cache import CACHE_ENV

    run_t0 = time.perf_counter()
    log(f"cams: writing / reusing the ground truth of {n} images (max side {side})")
    root = make_gt(n, side, workers=workers)
    ids = sorted(f.stem for f in (root / "gt").glob("*.png"))
    if len(ids) != n:
        raise SystemExit(f"cams: {root / 'gt'} holds {len(ids)} PNGs, not {n}: remove {root} and run again")
    ref_ids = reference_sample(ids, args.reference_images)
    sampled = len(ref_ids) < n
    work = tmp_dir() / f"cams-out-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    # the sweep cache of this run only (never the user's), emptied where a step must count afresh
    cache = work / "sweep-cache"
    old_cache = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(cache)

    def elapsed() -> str:
        return f"[{time.perf_counter() - run_t0:.0f} s]"
    classes = list(VOC_CLASSES)
    steps = []
    per_set = []
    peaks = []
    ref = np.zeros((N_SETS, len(thresholds), C, C), np.int64)
    ref_wall = ref_cpu = 0.0
    cam_bytes = 0
    core: dict = {}
    try:
        with quiet_progress(), DiskPeak(root, work) as disk:
            with PeakMemory() as pm:
                gt, wall, cpu = _timed(
                    lambda: ingest_labels(root / "gt", work / "gt.zarr", kind="gt", classes=classes, quiet=True)
                )
            peaks.append(pm.peak)
            steps.append({"step": "ingest gt", "wall_s": wall, "cpu_s": cpu})
            stores = []
            for s in range(N_SETS):  # one set's CAM files on disk at a time (see the notes)
                log(f"cams: {elapsed()} set {s}: writing {n} CAM files")
                t0 = time.perf_counter()
                folder, nbytes = write_set(root, s, n, side, workers=workers)
                gen_s = time.perf_counter() - t0
                cam_bytes += nbytes
                paths = [str(folder / f"{i}.npy") for i in ids]
                if s == 0:
                    core = per_core(paths)
                load_s = np_load_all(paths, workers)
                log(f"cams: {elapsed()} set {s}: {nbytes / 1e9:.2f} GB written in {gen_s:.0f} s; isle ingest")
                with PeakMemory() as pm:
                    st, wall, cpu = _timed(
                        lambda: ingest_scores(folder, work / f"set{s}.zarr", gt=gt, classes=classes,
                                              allow_pickle=True, quiet=True, score_layout=args.layout)
                    )
                peaks.append(pm.peak)
                stores.append(st)
                log(f"cams: {elapsed()} set {s}: the public scripts' approach on {workers} processes, "
                    f"{len(ref_ids)} images" + (" (a sample)" if sampled else ""))
                ref[s], rwall, rcpu = _timed(
                    lambda: public_sweep(folder, root / "gt", ref_ids, thresholds, workers)
                )
                ref_wall += rwall
                ref_cpu += rcpu
                disk.sample()
                shutil.rmtree(folder)
                per_set.append({
                    "set": s, "cam_file_bytes": nbytes, "write_files_s": gen_s,
                    "np_load_s": load_s, "np_load_mb_per_s": nbytes / load_s / 1e6,
                    "ingest_wall_s": wall, "ingest_cpu_s": cpu, "ingest_mb_per_s": nbytes / wall / 1e6,
                    "ingest_images_per_s": n / wall, "np_load_images_per_s": n / load_s,
                    "reference_wall_s": rwall,
                })
            steps.append({"step": f"ingest {N_SETS} CAM sets", "wall_s": sum(r["ingest_wall_s"] for r in per_set),
                          "cpu_s": sum(r["ingest_cpu_s"] for r in per_set)})
            # untimed: the kernels' first call loads them from Numba's cache (or compiles them), which
            # would otherwise be charged to whichever step runs first
            log(f"cams: {elapsed()} sweep and merge from the stores")
            sweep_thresholds(stores, gt, thresholds[:1], backend="cpu", progress=False)
            shutil.rmtree(cache, ignore_errors=True)
            with PeakMemory() as pm:
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
                shutil.rmtree(cache, ignore_errors=True)  # nothing kept: the merge makes its own sweep
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
                # as after `isle evaluate --bg-threshold S`: the sweep is kept, the merge only merges
                res2, wall, cpu = _timed(
                    lambda: merge(stores, gt, work / "ens2.zarr", bg_threshold=list(thresholds), backend="cpu",
                                  progress=False)
                )
                steps.append({"step": "merge at each set's best, sweep kept (merge pass only)", "wall_s": wall,
                              "cpu_s": cpu})
            peaks.append(pm.peak)
            ens_equal = bool(np.array_equal(np.asarray(res.stack.array[:]), np.asarray(res2.stack.array[:])))
            assert ens_equal, "the merge with the kept sweep differs from the merge with its own sweep"
            if sampled:  # untimed: the sweep of a gt of the sample's images, to check the reference's counts
                gt_s = ingest_labels(root / "gt", work / "gt_sample.zarr", kind="gt", classes=classes,
                                     ids=ref_ids, quiet=True)
                sw_ref = sweep_thresholds(stores, gt_s, thresholds, backend="cpu", progress=False)
            else:
                sw_ref = sw
            log(f"cams: {elapsed()} done")
        ours_peak = max(peaks)
        kernel = kernel_throughput(stores, gt, thresholds)
        layout = {st.name: {"layout": st.score_layout, "stored_bytes": st.stored_bytes()} for st in stores}
        load_total = sum(r["np_load_s"] for r in per_set)
        ingest_total = steps[1]["wall_s"]
        equal = bool(
            np.array_equal(sw_ref.counts[..., :C], ref)
            and not sw_ref.counts[..., C].any()
            and np.array_equal(one.counts[:, 0], sw.counts[:, 0])
        )
        assert equal, "the sweep's confusion counts differ from the public scripts' approach"
        pixels = int((gt.shapes[:, 0] * gt.shapes[:, 1]).sum())
        sweep_wall = steps[2]["wall_s"]
        sweep_cpu = steps[2]["cpu_s"]
        # the public approach's time at all images: measured, or projected from its sample's per-image rate
        ref_per_image = ref_wall / (N_SETS * len(ref_ids))
        ref_full = ref_per_image * N_SETS * n
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
            f"public approach ({workers} processes): {ref_wall:.2f} s wall on {len(ref_ids)} images x {N_SETS} "
            f"sets, {1e3 * ref_per_image:.1f} ms an image and set "
            f"(this process's CPU {ref_cpu:.2f} s; the pool's is not counted)"
        )
        if sampled:
            print(f"public approach at all {n} images: {ref_full:.0f} s PROJECTED from the sample of "
                  f"{len(ref_ids)} images (not measured); counts checked on the sample")
        rate = N_SETS * pixels / sweep_wall / 1e9
        print(
            f"sweep: {rate:.3f} Gpix/s for {N_SETS} sets ({N_SETS * pixels / max(sweep_cpu, 1e-9) / 1e9:.3f} "
            f"per CPU second), {sweep_wall / max(wall1, 1e-9):.2f}x one threshold; "
            f"{ref_full / sweep_wall:.1f}x faster than the public approach"
            f"{' (projected)' if sampled else ''}; counts equal: {equal}"
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
        merge_only = steps[5]["wall_s"]
        print(f"merge at each set's best: with its own sweep {merge_s:.2f} s = {merge_s / wall1:.2f}x one threshold "
              f"pass; the sweep kept (after `isle evaluate`): {merge_only:.2f} s = {merge_only / wall1:.2f}x "
              f"one threshold pass (ensembles equal)")
        print(
            f"CAM ingest: {cam_bytes / ingest_total / 1e6:.0f} MB/s, {N_SETS * n / ingest_total:.1f} images/s; "
            f"plain np.load loop ({workers} processes): {cam_bytes / load_total / 1e6:.0f} MB/s, "
            f"{N_SETS * n / load_total:.1f} images/s (ingest = {ingest_total / load_total:.2f}x the load time)"
        )
        if core:
            print(
                f"per core (CPU time), {core['files']} files: np.load "
                f"{core['np_load']['ms_per_image']:.2f} ms an image "
                f"({core['np_load']['mb_per_s']:.0f} MB/s), isle's reader (load + check + quantise) "
                f"{core['read_cam_slots']['ms_per_image']:.2f} ms ({core['read_cam_slots']['mb_per_s']:.0f} MB/s); "
                f"the dense path's reader (full C-class stack, quantised; {core['dense_reader']['files']} files) "
                f"{core['dense_reader']['ms_per_image']:.2f} ms"
            )
        print(f"disk: CAM sets on disk one at a time; peak {disk.peak / 2**30:.2f} GiB (files + stores)")
        print(
            "best thresholds: " + ", ".join(f"{nm} {t:g}" for nm, t in zip(sw.set_names, sw.best_thresholds))
        )
        headline = [
            headline_row(
                f"threshold sweep, {N_SETS} CAM sets x {len(thresholds)} thresholds",
                sweep_wall,
                f"public scripts' approach, {workers} processes"
                + (f" (PROJECTED from a sample of {len(ref_ids)} images)" if sampled else ""),
                ref_full,
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
                "reference": {
                    "images": len(ref_ids), "sampled": sampled, "wall_s": ref_wall, "cpu_s_parent": ref_cpu,
                    "s_per_image_and_set": ref_per_image,
                    ("projected_wall_s_all_images" if sampled else "wall_s_all_images"): ref_full,
                    "note": (f"run on a random sample of {len(ref_ids)} of the {n} images (the same for every "
                             f"set); the time at all images is a PROJECTION (per-image rate x images), not "
                             f"measured; its counts equal our sweep of a gt of the sample's images")
                    if sampled else "run on every image",
                },
                "peak_rss_bytes": ours_peak,
                "stores": layout,
                "cam_file_bytes": cam_bytes,
                "cam_sets_on_disk": "one at a time: written, read (np.load loop, isle ingest, public approach), "
                                    "deleted; sweep and merge from the stores",
                "disk_peak_bytes": disk.peak,
                "per_set": per_set,
                "ingest": {"wall_s": ingest_total, "mb_per_s": cam_bytes / ingest_total / 1e6,
                           "images_per_s": N_SETS * n / ingest_total},
                "np_load_loop": {"wall_s": load_total, "workers": workers,
                                 "mb_per_s": cam_bytes / load_total / 1e6,
                                 "images_per_s": N_SETS * n / load_total},
                "per_core_read": core,
                "counts_equal": equal,
                "kernel": kernel,
                "merge_over_sweep": steps[4]["wall_s"] / sweep_wall,
                "merge_over_one_threshold": steps[4]["wall_s"] / wall1,
                "merge_kept_sweep_over_one_threshold": steps[5]["wall_s"] / wall1,
                "ensembles_equal": ens_equal,
                "wall_s_total": time.perf_counter() - run_t0,
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
        if old_cache is None:
            os.environ.pop(CACHE_ENV, None)
        else:
            os.environ[CACHE_ENV] = old_cache
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
