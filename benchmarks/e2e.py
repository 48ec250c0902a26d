"""Folders to folders: ``isle run`` against a plain PIL + NumPy script on a process pool, same run.

``python -m benchmarks.e2e [--quick] [--images N[,N...]] [--sets N] [--repeat K] [--workers W] [--no-save]
[--only evaluate]``

The full measurement (the issue's two sizes, on an idle machine; the first run
also generates and caches the 10,582-image tree, several minutes)::

    python -m benchmarks.e2e --images 2400,10582 --repeat 2

(``--images 2400,10582`` and ``--repeat 2`` are the defaults.) It writes
``benchmarks/results/e2e.json`` and ``e2e.png`` (``$ISLE_BENCH_RESULTS``
overrides the folder; ``--no-save`` writes nothing, for a quick look at
another size such as ``--images 600``).

Every timed side reports wall seconds and CPU seconds (user + sys of the
process and all its children, worker processes included:
``resource.getrusage(RUSAGE_CHILDREN)`` around each fresh process, or
``RUSAGE_SELF + RUSAGE_CHILDREN`` for what runs in this process). On a busy
machine wall times are noise, but CPU seconds still compare the work each
side does; the ``*_cpu`` speedups are those ratios. The targets are judged on
wall seconds, measured on an idle machine.

Data: the 1,449 real VOC 2012 val label maps (``../shared/data/voc2012_val_gt.tar.gz``,
``../shared`` relative to the repository root, or ``$ISLE_SHARED_DATA``),
repeated for scale under the 8 flips / transposes of the square (so no two
images are the same array), as ``SegmentationClass/`` and, for every set,
``pseudo/<set>/``: the gt degraded per class with real boundaries (each set
dilates or erodes each class by its own radius, drops some objects to
background, relabels some as another class; made once for the base maps and
flipped with them: the square structuring elements commute with the flips).
All palette PNGs, cached under ``benchmarks/results/tmp/``. Without the real maps the benchmark skips
(``--quick`` then uses synthetic rectangles so the smoke test still runs
everything).

Measured, each next to its reference in the same run (whole processes, started
fresh, the reference first in every round; best of ``--repeat`` rounds):

``jobs``
    ``isle run ROOT --out RUN --no-report`` with an empty cache (the job the
    plain script does: ingest, evaluate, select, merge, export PNGs) and again
    with the cache warm; the same job written the plain way (``PLAIN_SCRIPT``
    below: pass 1 decodes gt + sets with PIL and adds ``np.bincount``
    confusions, the selection is Algorithm 2, pass 2 decodes the sets again,
    merges with per-class masks (Algorithm 3) and saves with PIL) on a
    ``multiprocessing`` pool of all cores. The label maps written by both are
    checked EQUAL. ``isle run`` with the report is timed too. Also the floor:
    ``decodes / (cores x per-core decode rate) + encodes / (cores x per-core
    encode rate)``, with PIL's rates measured here on these files (the
    issue's definition), and the same with the codec isle-fast uses.
``ingest``
    ``ingest_labels`` of the gt folder (this process, worker processes) vs the
    per-core PIL decode rate: target >= 1.8x on 2 cores.
``evaluate``
    whole-process ``isle evaluate`` of the sets from their stores vs a
    one-process loop reading the same stores with Zarr and adding
    ``np.bincount`` confusions, counts checked equal: target >= 5x.
``fast_start``
    seconds from process start to the first chunk task of ``isle evaluate``
    and to its end, for the local thread pool (default) and for the Dask pass
    (``DASK_SCHEDULER=threads``), and ``python -X importtime`` of the modules
    the command imports (target: first task < 0.3 s).
``png_compression``
    PIL's PNG encoder on these maps at ``rle`` and levels 1, 6, 9: maps/s on
    one core and KiB a file (the export default, :mod:`isle_fast.stores.export`).

Writes ``e2e.json`` and ``e2e.png`` to ``benchmarks/results/``.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from .common import (
    BENCH_DIR,
    PeakMemory,
    bench_parser,
    format_table,
    headline_row,
    log,
    results_dir,
    save_figure,
    tmp_dir,
    voc_palette,
    write_json,
)

REPO = BENCH_DIR.parent
VOC_TRAIN_AUG = 10_582
N_CLASSES = 21

#: The plain way: what a script without isle-fast does, on a process pool of all cores.
PLAIN_SCRIPT = r'''
import os, sys
from multiprocessing import Pool
import numpy as np
from PIL import Image

root, out, sets, workers = sys.argv[1], sys.argv[2], sys.argv[3].split(","), int(sys.argv[4])
C = 21
ids = sorted(f[:-4] for f in os.listdir(os.path.join(root, "SegmentationClass")) if f.endswith(".png"))


def read(folder, i):
    return np.array(Image.open(os.path.join(root, folder, i + ".png")))


def confusion(batch):
    hist = np.zeros((len(sets), C, C), np.int64)
    for i in batch:
        gt = read("SegmentationClass", i)
        mask = gt < C
        g = gt[mask].astype(np.int64) * C
        for n, s in enumerate(sets):
            pred = read(os.path.join("pseudo", s), i)
            hist[n] += np.bincount(g + pred[mask], minlength=C * C).reshape(C, C)
    return hist


def merge(batch):
    pal = PALETTE
    for i in batch:
        preds = [read(os.path.join("pseudo", s), i) for s in sets]
        lab = np.zeros(preds[0].shape, np.uint8)
        for c in ORDER:                                   # Algorithm 3: one mask per class
            lab[preds[SEL[c]] == c] = c
        im = Image.fromarray(lab, mode="P")
        im.putpalette(pal)
        im.save(os.path.join(out, i + ".png"))


def init(sel, order, pal):
    global SEL, ORDER, PALETTE
    SEL, ORDER, PALETTE = sel, order, pal


if __name__ == "__main__":
    batches = [ids[k:k + 32] for k in range(0, len(ids), 32)]
    with Pool(workers) as pool:
        hist = sum(pool.imap_unordered(confusion, batches))
    tp = np.diagonal(hist, axis1=1, axis2=2).astype(np.float64)
    union = hist.sum(axis=2) + hist.sum(axis=1) - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = 100.0 * np.where(union > 0, tp / np.where(union > 0, union, 1), np.nan)   # Algorithm 2
    masked = np.where(np.isnan(iou), -np.inf, iou)
    sel = np.argmax(masked, axis=0)
    sel[(hist[0].sum(axis=1) == 0) | np.all(np.isinf(masked), axis=0)] = 0
    prio = np.where(np.isnan(iou), -1.0, iou)
    order = sorted(range(1, C), key=lambda c: (prio[sel[c], c], -c))   # higher IoU claims win overlaps
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j); g |= ((c >> 1) & 1) << (7 - j); b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    os.makedirs(out, exist_ok=True)
    with Pool(workers, initializer=init, initargs=([int(v) for v in sel], order, pal)) as pool:
        list(pool.imap_unordered(merge, batches))
    print(" ".join(str(int(v)) for v in sel))
'''

#: The reference of the evaluate target: one process, Zarr reads, np.bincount per image.
ZARR_LOOP = r'''
import sys
import numpy as np
import zarr
gt_path, set_paths = sys.argv[1], sys.argv[2:]
C = 21
g = zarr.open_group(gt_path, mode="r")
sets = [zarr.open_group(p, mode="r")["labels"] for p in set_paths]
shapes = np.asarray(g["shapes"][:])
labels = g["labels"]
k = labels.chunks[0]
hist = np.zeros((len(sets), C, C), np.int64)
for s in range(0, labels.shape[0], k):
    gb = labels[s:s + k]
    sb = [a[s:s + k] for a in sets]
    for j in range(gb.shape[0]):
        h, w = shapes[s + j]
        gt = gb[j, :h, :w]
        mask = gt < C
        gm = gt[mask].astype(np.int64) * C
        for n in range(len(sets)):
            hist[n] += np.bincount(gm + sb[n][j, :h, :w][mask], minlength=C * C).reshape(C, C)
print(" ".join(str(int(v)) for v in hist.reshape(-1)))
'''

#: Seconds from process start to the first chunk task of ``isle evaluate`` (a probe, like the tests').
FIRST_TASK_PROBE = r'''
import os, sys, time
T0 = float(os.environ["E2E_T0"])
import isle_fast.ensemble.evaluate as E
orig = E._confusion_block
first = []
def probe(*a, **k):
    if not first:
        first.append(time.time() - T0)
    return orig(*a, **k)
E._confusion_block = probe
from isle_fast.cli import main
rc = main(sys.argv[1:])
print("FIRST_TASK %.4f END %.4f" % (first[0], time.time() - T0), file=sys.stderr)
sys.exit(rc)
'''


# ================================================================================ data
def shared_data() -> Path | None:
    """``voc2012_val_gt.tar.gz`` from ``$ISLE_SHARED_DATA`` or ``../shared/data``; None when absent."""
    for d in (os.environ.get("ISLE_SHARED_DATA"), REPO.parent / "shared" / "data"):
        if d and (Path(d) / "voc2012_val_gt.tar.gz").is_file():
            return Path(d) / "voc2012_val_gt.tar.gz"
    return None


def base_maps(tarball: Path | None, quick: bool) -> tuple[Path, str]:
    """A folder of base label maps: the real VOC val maps (extracted once), or synthetic ones (quick)."""
    if tarball is not None:
        dest = tmp_dir() / "voc2012-val-gt"
        if not (dest / ".complete").exists():
            shutil.rmtree(dest, ignore_errors=True)
            dest.mkdir(parents=True)
            with tarfile.open(tarball) as tf:
                tf.extractall(dest, filter="data")
            (dest / ".complete").write_text("ok\n")
        return dest / "SegmentationClass", "VOC 2012 val ground truth (1,449 real label maps)"
    dest = tmp_dir() / "e2e-synthetic-base"
    if not (dest / ".complete").exists():
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        rng = np.random.default_rng(0)
        for i in range(24):
            h, w = int(rng.integers(90, 121)), 160
            a = np.zeros((h, w), np.uint8)
            for _ in range(int(rng.integers(1, 4))):
                y0, x0 = int(rng.integers(0, h - 20)), int(rng.integers(0, w - 20))
                y1, x1 = y0 + int(rng.integers(15, h // 2)), x0 + int(rng.integers(15, w // 2))
                a[y0:y1, x0:x1] = 255
                a[y0 + 2:y1 - 2, x0 + 2:x1 - 2] = rng.integers(1, N_CLASSES)
            _save(dest / f"s{i:04d}.png", a)
        (dest / ".complete").write_text("ok\n")
    return dest, "synthetic rectangles (the real VOC maps are absent)"


def _save(path: Path, a: np.ndarray, **opts: Any) -> None:
    from PIL import Image

    im = Image.fromarray(np.ascontiguousarray(a, dtype=np.uint8), mode="P")
    im.putpalette(voc_palette())
    im.save(path, **opts)


def _dihedral(a: np.ndarray, r: int) -> np.ndarray:
    """The ``r``-th of the 8 flips / transposes of the square (0 = as is)."""
    r %= 8
    if r >= 4:
        a = a.T
    if r & 1:
        a = a[:, ::-1]
    if r & 2:
        a = a[::-1]
    return a


def _morph(mask: np.ndarray, radius: int) -> np.ndarray:
    """Square dilation (radius > 0) or erosion (< 0) with PIL's rank filters."""
    from PIL import Image, ImageFilter

    if radius == 0:
        return mask
    im = Image.fromarray(mask.astype(np.uint8) * 255)
    f = ImageFilter.MaxFilter(2 * radius + 1) if radius > 0 else ImageFilter.MinFilter(2 * -radius + 1)
    return np.asarray(im.filter(f)) > 127


def set_quality(n_sets: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Per set and class: boundary shift (px), object drop and relabel probabilities, confusable class."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_sets):
        out.append({"grow": rng.integers(-4, 5, size=N_CLASSES),
                    "drop": rng.uniform(0.0, 0.3, size=N_CLASSES),
                    "relabel": rng.uniform(0.0, 0.15, size=N_CLASSES),
                    "other": rng.integers(1, N_CLASSES, size=N_CLASSES)})
    return out


def degrade(gt: np.ndarray, q: dict[str, np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """A pseudo-label map from a gt map: per class, shifted boundaries, dropped or relabelled objects."""
    out = np.where(gt == 255, 0, gt).astype(np.uint8)
    for c in np.unique(gt):
        if c == 0 or c == 255:
            continue
        m = gt == c
        if rng.random() < q["drop"][c]:
            out[m] = 0
            continue
        m2 = _morph(m, int(q["grow"][c]))
        out[m & ~m2] = 0
        out[m2] = q["other"][c] if rng.random() < q["relabel"][c] else c
    return out


def _degrade_part(job: tuple) -> int:
    """Degrade base maps ``lo:hi`` for every set (a pool task): ``base_sets/<set>/<file>``."""
    base, out, files, sets, lo, hi, seed = job
    from PIL import Image

    quality = set_quality(len(sets), seed)
    for k in range(lo, hi):
        g = np.asarray(Image.open(base / files[k]))
        for n, s in enumerate(sets):
            rng = np.random.default_rng([seed, n, k])
            _save(out / s / files[k], degrade(g, quality[n], rng), compress_level=6)
    return hi - lo


def _write_part(job: tuple) -> int:
    """Write images ``lo:hi`` of the data set (a pool task): image ``k`` is base map ``k % B`` under
    the ``k // B``-th flip / transpose (the degradations commute with them: square structuring elements)."""
    base, degraded, root, files, sets, lo, hi = job
    from PIL import Image

    for k in range(lo, hi):
        src = files[k % len(files)]
        r = k // len(files)
        name = f"{k:06d}.png"
        pairs = [(base, root / "SegmentationClass")] + [(degraded / s, root / "pseudo" / s) for s in sets]
        for folder, out in pairs:
            if r % 8 == 0:
                os.link(folder / src, out / name)            # as is: the same file
            else:
                _save(out / name, _dihedral(np.asarray(Image.open(folder / src)), r), compress_level=6)
    return hi - lo


def make_dataset(n: int, n_sets: int, quick: bool, workers: int) -> dict[str, Any]:
    """The VOC-style tree of ``n`` images (cached): ``SegmentationClass/``, ``pseudo/set<k>/``."""
    from multiprocessing import get_context

    tarball = shared_data()
    base, what = base_maps(tarball, quick)
    files = sorted(p.name for p in base.glob("*.png"))
    if quick:
        files = files[:24]      # a smoke test: a few base maps, repeated under the flips
    tag = "voc" if tarball is not None else "synthetic"
    sets = [f"set{s}" for s in range(n_sets)]
    degraded = tmp_dir() / f"e2e-{tag}-base{len(files)}-{n_sets}sets-v2"
    root = tmp_dir() / f"e2e-{tag}-base{len(files)}-{n}-{n_sets}sets-v2"
    t0 = time.perf_counter()
    with get_context("fork").Pool(workers) as pool:
        if not (degraded / ".complete").exists():
            shutil.rmtree(degraded, ignore_errors=True)
            for s in sets:
                (degraded / s).mkdir(parents=True)
            jobs = [(base, degraded, files, sets, lo, min(len(files), lo + 32), 0)
                    for lo in range(0, len(files), 32)]
            for _ in pool.imap_unordered(_degrade_part, jobs):
                pass
            (degraded / ".complete").write_text("ok\n")
            log(f"[e2e] degraded {len(files)} base maps for {n_sets} sets in "
                f"{time.perf_counter() - t0:.1f} s")
        if not (root / ".complete").exists():
            shutil.rmtree(root, ignore_errors=True)
            for d in ["SegmentationClass"] + [f"pseudo/{s}" for s in sets]:
                (root / d).mkdir(parents=True)
            jobs = [(base, degraded, root, files, sets, lo, min(n, lo + 64)) for lo in range(0, n, 64)]
            for _ in pool.imap_unordered(_write_part, jobs):
                pass
            (root / ".complete").write_text("ok\n")
            log(f"[e2e] wrote {n} images x {n_sets + 1} folders in {time.perf_counter() - t0:.1f} s: {root}")
    return {"root": root, "sets": sets, "images": n, "source": what, "base_files": len(files)}


# ================================================================================ helpers
def _env() -> dict[str, str]:
    env = dict(os.environ, ISLE_PROGRESS="0")
    env.pop("DASK_SCHEDULER", None)
    return env


def _children_cpu() -> float:
    """User + sys seconds of every child process this one has waited for (their own children included)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _own_cpu() -> float:
    """User + sys seconds of this process (all threads) and of its waited-for children."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime + _children_cpu()


def _timed(argv: list[str], env: dict | None = None, timeout: float = 3600, memory: bool = False
           ) -> tuple[float, str, int, float]:
    """A fresh process running ``argv``: wall seconds, its stdout, the peak RSS of its tree (``memory``;
    else 0), and its CPU seconds (user + sys of the process and of every process below it, worker pools
    included).

    The RSS sampler walks the process table every 50 ms (psutil), which took about 0.2 s of a 2.9 s
    run on 2 cores from the program it watched (A/B runs by hand): the timed runs are not sampled, and each program's
    memory is taken in a run of its own (:func:`bench_jobs`).
    """
    t0 = time.perf_counter()
    c0 = _children_cpu()
    with (PeakMemory(interval=0.05) if memory else contextlib.nullcontext()) as pm:
        proc = subprocess.run(argv, cwd=REPO, env=env or _env(), capture_output=True, text=True,
                              timeout=timeout)
    dt = time.perf_counter() - t0
    cpu = _children_cpu() - c0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv[:4]))} failed ({proc.returncode}):\n"
                           f"{proc.stderr[-3000:]}")
    return dt, proc.stdout, max(0, pm.peak - pm.baseline) if pm is not None else 0, cpu


def _compile_bytecode() -> None:
    """Write the bytecode of isle-fast's modules, as an install does, before any timed process.

    An editable install imports the source tree, and where ``PYTHONDONTWRITEBYTECODE`` is set (it is on
    these machines) no ``__pycache__`` is ever written for modules changed since: every ``isle`` process
    of the benchmark then compiles them again (0.11 s of a 2,400-image run, about 45 modules after a
    day's commits, in a profile by hand), which a user's installed package never does.
    """
    import compileall

    import isle_fast
    import isle_fast.kernels

    for mod in (isle_fast, isle_fast.kernels):
        compileall.compile_dir(str(Path(mod.__file__).parent), quiet=1)


def _isle(*args: Any) -> list[str]:
    return [sys.executable, "-m", "isle_fast", *map(str, args)]


def per_core_rates(folder: Path, sample: int) -> dict[str, float]:
    """Files a second on one core (CPU time): PIL's decode and encode (the issue's floor) and ours."""
    from PIL import Image

    from isle_fast.stores.png import decode_label_png

    files = sorted(folder.glob("*.png"))[:sample]
    arrays: list[np.ndarray] = []
    rates: dict[str, float] = {}
    for key, read in (("decode_per_s", lambda f: np.asarray(Image.open(f))),
                      ("our_decode_per_s", lambda f: decode_label_png(f.read_bytes()))):
        best = float("inf")
        for _ in range(3):
            t0 = time.thread_time()
            arrays = [read(f) for f in files]
            best = min(best, time.thread_time() - t0)
        rates[key] = len(files) / best
    enc = png_compression([np.ascontiguousarray(a) for a in arrays], ("rle",))
    rates.update(encode_rle_per_s=enc["rle"]["pil_maps_per_s"], our_encode_rle_per_s=enc["rle"]["maps_per_s"],
                 files=len(files))
    return rates


def png_compression(arrays: list[np.ndarray], choices: tuple[str, ...] = ("rle", "1", "6", "9")) -> dict:
    """Maps/s on one core (CPU time, best of 3) and KiB a file for each compression choice.

    ``maps_per_s``: the encoder ``isle export`` runs (:func:`isle_fast.stores.png.encode_palette_png`);
    ``pil_maps_per_s``: ``PIL.Image.save`` with the same zlib settings (the same bytes for these maps).
    """
    import io

    from PIL import Image

    from isle_fast.stores.export import png_options
    from isle_fast.stores.png import encode_palette_png, zlib_options

    pal = voc_palette()
    palette = bytes(pal)
    out = {}
    for choice in choices:
        opts = png_options(choice)
        level, strategy = zlib_options(choice)

        def pil(a: np.ndarray) -> int:
            buf = io.BytesIO()
            im = Image.fromarray(a, mode="P")
            im.putpalette(pal)
            im.save(buf, format="PNG", **opts)
            return buf.tell()

        def ours(a: np.ndarray) -> int:
            return len(encode_palette_png(np.ascontiguousarray(a), palette, level, strategy))

        row: dict[str, float] = {}
        for key, fn in (("maps_per_s", ours), ("pil_maps_per_s", pil)):
            best, size = float("inf"), 0
            for _ in range(3):
                t0 = time.thread_time()
                size = sum(fn(a) for a in arrays)
                best = min(best, time.thread_time() - t0)
            row[key] = len(arrays) / best
        row["kib_per_file"] = size / len(arrays) / 1024
        out[choice] = row
    return out


def _compare_pngs(a: Path, b: Path) -> int:
    """Number of images compared; raises when a label map differs."""
    from PIL import Image

    fa, fb = sorted(p.name for p in a.glob("*.png")), sorted(p.name for p in b.glob("*.png"))
    if fa != fb:
        raise AssertionError(f"{a} and {b} hold different files ({len(fa)} vs {len(fb)})")
    for name in fa:
        x, y = np.asarray(Image.open(a / name)), np.asarray(Image.open(b / name))
        if x.shape != y.shape or not np.array_equal(x, y):
            raise AssertionError(f"label maps differ: {a / name} vs {b / name}")
    return len(fa)


# ================================================================================ the measurements
def bench_jobs(data: dict, work: Path, repeat: int, workers: int, rates: dict) -> dict:
    """``isle run`` (cold and warm cache, with and without the report) vs the plain pool script."""
    root, sets, n = data["root"], data["sets"], data["images"]
    keys = ("plain", "isle_cold", "isle_warm", "isle_report")
    runs: dict[str, list[float]] = {k: [] for k in keys}
    cpu: dict[str, list[float]] = {k: [] for k in keys}
    peaks: dict[str, int] = {}
    steps_cold: dict[str, Any] = {}

    def timed(key: str, argv: list[str], memory: bool = False) -> None:
        dt, _, pk, c = _timed(argv, memory=memory)
        runs[key].append(dt)
        cpu[key].append(c)
        if memory:
            peaks[key] = max(peaks.get(key, 0), pk)

    def plain_to(out: Path) -> list[str]:
        return [sys.executable, "-c", PLAIN_SCRIPT, str(root), str(out), ",".join(sets), str(workers)]

    # Every run writes folders of its own (the warm run a new RUN beside the cold run's cache) and nothing
    # is deleted until the section ends. ext4 without a journal (these machines' disks) skips every inode
    # freed in the last 30 s when it allocates one: a run started right after the previous round's
    # thousands of files were deleted scanned past all of them at each file it made (about 0.4 s of
    # CPU of a 2,400-image isle run, and the script's share). Waiting 30 s out was no cure: these VMs
    # page out memory left idle (DAMON), and the first run after a pause re-read its libraries (0.25-0.6
    # s slower; figures of runs by hand). A user's first run meets neither.
    made_dirs: list[Path] = []

    def fresh(name: str) -> Path:
        d = work / name
        shutil.rmtree(d, ignore_errors=True)   # a folder of the size before: deleted long before its reuse
        made_dirs.append(d)
        return d

    for r in range(repeat):
        plain = plain_to(fresh(f"plain-out-{r}"))
        run_dir = fresh("run" if r == repeat - 1 else f"run-{r}")   # the last one is the later sections' stores
        job = _isle("run", root, "--out", run_dir, "--no-report", "--workers", workers, "-q")
        warm_dir = fresh(f"run-{r}-warm")
        warm = _isle("run", root, "--out", warm_dir, "--cache", run_dir / "cache", "--no-report", "--workers",
                     workers, "-q")
        if r % 2 == 0:  # each side is the first timed run of a round in every other round
            timed("plain", plain)
        timed("isle_cold", job)
        doc = json.loads((run_dir / "run.json").read_text())
        if not steps_cold or cpu["isle_cold"][-1] <= min(cpu["isle_cold"]):
            steps_cold = {"seconds": doc["seconds"], "cpu_seconds": doc.get("cpu_seconds"),
                          "counted_at_ingest": doc.get("counted_at_ingest")}
        timed("isle_warm", warm)
        doc = json.loads((warm_dir / "run.json").read_text())
        assert not doc["made"], "the warm run ingested again"
        if r % 2 == 1:
            timed("plain", plain)
        cold_steps = ", ".join(f"{k} {v:.2f}" for k, v in steps_cold["seconds"].items())
        log(f"[e2e] {n} images, round {r + 1}: plain {runs['plain'][-1]:.2f} s "
            f"({cpu['plain'][-1]:.2f} s CPU), "
            f"isle run {runs['isle_cold'][-1]:.2f} s ({cpu['isle_cold'][-1]:.2f} s CPU) cold, "
            f"{runs['isle_warm'][-1]:.2f} s ({cpu['isle_warm'][-1]:.2f} s CPU) warm; "
            f"best cold run's steps: {cold_steps}")
    compared = _compare_pngs(work / "run" / "ensemble", work / f"plain-out-{repeat - 1}")
    steps = {"seconds": doc["seconds"], "cpu_seconds": doc.get("cpu_seconds")}
    # peak memory: a run of each kind of its own, sampled (untimed: the sampler takes CPU from what it watches)
    mem_job = _isle("run", root, "--out", fresh("run-memory"), "--no-report", "--workers", workers, "-q")
    for key, argv in (("plain", plain_to(fresh("plain-memory"))), ("isle_cold", mem_job), ("isle_warm", mem_job)):
        peaks[key] = _timed(argv, memory=True)[2]
    # the report run is timed once, sampled: its time is not a target
    timed("isle_report", _isle("run", root, "--out", work / "run", "--workers", workers, "-q"), memory=True)
    for d in made_dirs:
        if d != work / "run":           # the later sections read its stores
            shutil.rmtree(d, ignore_errors=True)
    best = {k: min(v) for k, v in runs.items() if v}
    best_cpu = {k: min(v) for k, v in cpu.items() if v}
    cores = workers
    decodes, encodes = n * (len(sets) + 1), n
    floor_cpu = decodes / rates["decode_per_s"] + encodes / rates["encode_rle_per_s"]
    floor_ours_cpu = decodes / rates["our_decode_per_s"] + encodes / rates["our_encode_rle_per_s"]
    floor, floor_ours = floor_cpu / cores, floor_ours_cpu / cores
    return {"images": n, "sets": len(sets), "workers": workers, "runs": runs, "best": best,
            "cpu_runs": cpu, "best_cpu": best_cpu,
            "speedup_cold": best["plain"] / best["isle_cold"],
            "speedup_warm": best["plain"] / best["isle_warm"],
            "speedup_cold_cpu": best_cpu["plain"] / best_cpu["isle_cold"],
            "speedup_warm_cpu": best_cpu["plain"] / best_cpu["isle_warm"],
            "floor_seconds": floor, "cold_over_floor": best["isle_cold"] / floor,
            "floor_cpu_seconds": floor_cpu, "cold_over_floor_cpu": best_cpu["isle_cold"] / floor_cpu,
            "floor_with_our_codec_seconds": floor_ours, "floor_with_our_codec_cpu_seconds": floor_ours_cpu,
            "steps_best_cold_run": steps_cold, "steps_last_warm_run": steps,
            "identical_label_maps": compared, "peak_rss": peaks,
            "target_3x": best["plain"] / best["isle_cold"] >= 3.0,
            "target_3x_cpu": best_cpu["plain"] / best_cpu["isle_cold"] >= 3.0}


def bench_ingest(data: dict, work: Path, repeat: int, workers: int, rates: dict) -> dict:
    """``ingest_labels`` of the gt folder into a new store (as a first ingest: nothing to replace).

    Each round writes a fresh path and the previous round's store is removed untimed: replacing a
    store (``overwrite``) also deletes the old one at commit, which on these disks (about 0.8 ms an
    ``rmdir``, 154 folders for 2,400 images) was 0.14 s of a 0.32 s round and is no ingest work;
    that figure is kept apart (``seconds_overwrite``: one more round into the existing store).
    """
    from isle_fast.stores.ingest import ingest_labels

    src = data["root"] / "SegmentationClass"
    n = data["images"]
    best = best_cpu = float("inf")
    last = None
    for r in range(repeat + 1):    # the first round warms the page cache
        out = work / f"ingest-{r}.zarr"
        t0, c0 = time.perf_counter(), _own_cpu()
        ingest_labels(src, out, kind="gt", workers=workers, quiet=True)
        best = min(best, time.perf_counter() - t0)
        best_cpu = min(best_cpu, _own_cpu() - c0)
        if last is not None:
            shutil.rmtree(last)
        last = out
    t0 = time.perf_counter()
    ingest_labels(src, last, kind="gt", workers=workers, overwrite=True, quiet=True)
    over = time.perf_counter() - t0
    if last is not None:        # the next size's rounds write the same names
        shutil.rmtree(last)
    rate = n / best
    per_cpu_s = n / best_cpu         # images per CPU second (this process and its workers)
    return {"images": n, "workers": workers, "seconds": best, "images_per_s": rate,
            "seconds_overwrite": over,
            "cpu_seconds": best_cpu, "images_per_cpu_s": per_cpu_s,
            "per_core_decode_per_s": rates["decode_per_s"], "x_per_core_decode": rate / rates["decode_per_s"],
            "x_per_core_decode_cpu": per_cpu_s / rates["decode_per_s"],
            "target_1_8x": rate / rates["decode_per_s"] >= 1.8}


def bench_evaluate(data: dict, work: Path, repeat: int) -> dict:
    """Whole-process ``isle evaluate`` vs a Zarr + np.bincount loop in one process (``isle run``'s stores)."""
    cache = work / "run" / "cache"
    gt = cache / "gt.zarr"
    sets = [cache / f"{s}.zarr" for s in data["sets"]]
    ours, ref, ours_cpu, ref_cpu = [], [], [], []
    counts_ref = None
    for _ in range(repeat):
        dt, out, _, c = _timed([sys.executable, "-c", ZARR_LOOP, str(gt), *map(str, sets)])
        ref.append(dt)
        ref_cpu.append(c)
        counts_ref = np.array(out.split(), dtype=np.int64)
        dt, _, _, c = _timed(_isle("evaluate", *sets, "--gt", gt, "--quiet", "--json", work / "ev.json"))
        ours.append(dt)
        ours_cpu.append(c)
    doc = json.loads((work / "ev.json").read_text())
    hist = counts_ref.reshape(len(sets), N_CLASSES, N_CLASSES)    # rows: gt class, columns: prediction
    tp_ref = np.diagonal(hist, axis1=1, axis2=2)
    equal = all(doc["sets"][s]["tp"] == tp_ref[k].tolist()
                and doc["sets"][s]["fp"] == (hist[k].sum(axis=0) - tp_ref[k]).tolist()
                and doc["sets"][s]["fn"] == (hist[k].sum(axis=1) - tp_ref[k]).tolist()
                for k, s in enumerate(data["sets"]))
    if not equal:
        raise AssertionError("isle evaluate and the Zarr + bincount loop disagree")
    return {"images": data["images"], "sets": len(sets), "ours": min(ours), "reference": min(ref),
            "runs_ours": ours, "runs_reference": ref, "speedup": min(ref) / min(ours), "counts_equal": equal,
            "cpu_ours": min(ours_cpu), "cpu_reference": min(ref_cpu), "cpu_runs_ours": ours_cpu,
            "cpu_runs_reference": ref_cpu, "speedup_cpu": min(ref_cpu) / min(ours_cpu),
            "target_5x": min(ref) / min(ours) >= 5.0}


def bench_fast_start(data: dict, work: Path, repeat: int) -> dict:
    """Start -> first task, start -> end of ``isle evaluate`` (local pool and Dask pass); import times."""
    cache = work / "run" / "cache"
    argv = ["evaluate", *[cache / f"{s}.zarr" for s in data["sets"]], "--gt", cache / "gt.zarr", "--quiet"]
    out: dict[str, Any] = {}
    for label, extra in (("local", {}), ("dask", {"DASK_SCHEDULER": "threads"})):
        firsts, ends = [], []
        for _ in range(max(3, repeat)):
            env = dict(_env(), **extra, E2E_T0=repr(time.time()))
            proc = subprocess.run([sys.executable, "-c", FIRST_TASK_PROBE, *map(str, argv)], cwd=REPO,
                                  env=env, capture_output=True, text=True, timeout=600)
            line = next(ln for ln in proc.stderr.splitlines() if ln.startswith("FIRST_TASK"))
            parts = line.split()
            firsts.append(float(parts[1]))
            ends.append(float(parts[3]))
        out[label] = {"first_task": min(firsts), "end": min(ends), "runs_first_task": firsts,
                      "runs_end": ends}
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "isle_fast", *map(str, argv)], cwd=REPO,
                          env=_env(), capture_output=True, text=True, timeout=600)
    wanted = ("numpy", "zarr", "numcodecs", "dask", "distributed", "numba", "PIL", "tqdm", "isle_fast",
              "isle_fast.ensemble.evaluate", "isle_fast.stores.stack", "isle_fast.cli")
    top: dict[str, float] = {}
    for ln in proc.stderr.splitlines():
        if ln.startswith("import time:") and ln.count("|") == 2:
            _, cum, name = (part.strip() for part in ln[len("import time:"):].split("|"))
            if name in wanted and cum.isdigit():
                top[name] = max(top.get(name, 0.0), int(cum) / 1e6)
    out["import_seconds"] = top          # cumulative; absent = not imported by the command
    out["target_first_task_0_3s"] = out["local"]["first_task"] < 0.3
    return out


def only_evaluate(data: dict, work: Path, repeat: int, workers: int) -> None:
    """``--only evaluate``: the stores of one (untimed) ``isle run``, then the evaluate and fast-start sections."""
    shutil.rmtree(work / "run", ignore_errors=True)
    _timed(_isle("run", data["root"], "--out", work / "run", "--no-report", "--workers", workers, "-q"))
    ev = bench_evaluate(data, work, repeat)
    fs = bench_fast_start(data, work, repeat)
    load = os.getloadavg()[0]
    print(f"isle evaluate, {ev['sets']} sets x {ev['images']:,} images, whole process: ours {ev['ours']:.2f} s "
          f"(runs {', '.join(f'{v:.2f}' for v in ev['runs_ours'])}), Zarr + np.bincount loop {ev['reference']:.2f} s "
          f"(runs {', '.join(f'{v:.2f}' for v in ev['runs_reference'])}): {ev['speedup']:.2f}x "
          f"(CPU {ev['cpu_ours']:.2f} s vs {ev['cpu_reference']:.2f} s: {ev['speedup_cpu']:.2f}x); "
          f"counts equal {ev['counts_equal']}; load average {load:.2f}")
    print(f"first task of isle evaluate: {fs['local']['first_task']:.3f} s, end {fs['local']['end']:.3f} s "
          f"(Dask pass {fs['dask']['first_task']:.3f} s / {fs['dask']['end']:.3f} s)")


# ================================================================================ main
def plot(path: Path, jobs: list[dict]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    labels = [f"{j['images']:,} images" for j in jobs]
    x = np.arange(len(jobs))
    width = 0.2
    series = [("plain PIL + NumPy pool", [j["best"]["plain"] for j in jobs]),
              ("isle run (cold cache)", [j["best"]["isle_cold"] for j in jobs]),
              ("isle run (warm cache)", [j["best"]["isle_warm"] for j in jobs]),
              ("decode + encode floor", [j["floor_seconds"] for j in jobs])]
    for k, (name, ys) in enumerate(series):
        ax.bar(x + (k - 1.5) * width, ys, width, label=name)
    ax.set_xticks(x, labels)
    ax.set_ylabel("seconds (whole process)")
    ax.set_title("folders to folders: gt + 4 sets of label PNGs -> ensemble PNGs", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = bench_parser("e2e", __doc__.splitlines()[0])
    p.add_argument("--images", default=None,
                   help=f"comma-separated sizes (default 2400,{VOC_TRAIN_AUG}; quick 48)")
    p.add_argument("--sets", type=int, default=4, help="pseudo-label sets (default 4)")
    p.add_argument("--workers", type=int, default=None, help="processes for both sides (default: every core)")
    p.add_argument("--no-save", dest="save", action="store_false",
                   help="print the tables only; do not write e2e.json / e2e.png")
    p.add_argument("--only", choices=("evaluate",), default=None,
                   help="run one section only: 'evaluate' makes the stores with one `isle run` (untimed), then "
                        "times the evaluate section and the fast start (nothing is saved)")
    args = p.parse_args(argv)
    if args.only:
        args.save = False
    quick = args.quick
    from isle_fast.stores.parallel import default_workers

    workers = args.workers or default_workers()
    _compile_bytecode()
    if shared_data() is None and not quick:
        print("e2e: skipped: ../shared/data/voc2012_val_gt.tar.gz (the real VOC label maps) is absent; "
              "set ISLE_SHARED_DATA to its folder, or run --quick (synthetic maps)")
        if args.save:
            write_json("e2e", {"skipped": "real VOC label maps absent", "headline": []}, quick=quick)
        return 0
    sizes = ([int(v) for v in args.images.split(",")] if args.images
             else [48] if quick else [2400, VOC_TRAIN_AUG])
    repeat = args.repeat or (1 if quick else 2)
    work = tmp_dir() / f"e2e-work-{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"workers": workers, "repeat": repeat, "jobs": [], "ingest": [], "evaluate": []}
    headline = []
    try:
        first = True
        for n in sizes:
            data = make_dataset(n, args.sets, quick, workers)
            results["data"] = {"source": data["source"], "base_files": data["base_files"]}
            if args.only == "evaluate":
                only_evaluate(data, work, repeat, workers)
                continue
            rates = per_core_rates(data["root"] / "SegmentationClass", 60 if quick else 500)
            results.setdefault("per_core_rates", {})[str(n)] = rates
            job = bench_jobs(data, work, repeat, workers, rates)
            results["jobs"].append(job)
            ing = bench_ingest(data, work, repeat, workers, rates)
            results["ingest"].append(ing)
            ev = bench_evaluate(data, work, repeat)
            results["evaluate"].append(ev)
            if first:
                results["fast_start"] = bench_fast_start(data, work, repeat)
                from PIL import Image

                arrays = [np.asarray(Image.open(f)) for f in
                          sorted((data["root"] / "SegmentationClass").glob("*.png"))[:50 if quick else 1449]]
                results["png_compression"] = png_compression(arrays)
                first = False
            headline += [
                headline_row(f"folders to folders, {n:,} images, {args.sets} sets (isle run, cold cache)",
                             job["best"]["isle_cold"], f"plain PIL + NumPy on a {workers}-process pool",
                             job["best"]["plain"], over_floor=job["cold_over_floor"],
                             cpu_seconds=job["best_cpu"]["isle_cold"],
                             reference_cpu_seconds=job["best_cpu"]["plain"],
                             speedup_cpu=job["speedup_cold_cpu"], target_met=job["target_3x"]),
                headline_row(f"ingest {n:,} label PNGs ({workers} workers)", ing["seconds"],
                             "PIL decode, one core", n / ing["per_core_decode_per_s"],
                             cpu_seconds=ing["cpu_seconds"], target_met=ing["target_1_8x"]),
                headline_row(f"isle evaluate, {args.sets} sets x {n:,} images, whole process", ev["ours"],
                             "Zarr read + np.bincount loop, one process", ev["reference"],
                             cpu_seconds=ev["cpu_ours"], reference_cpu_seconds=ev["cpu_reference"],
                             speedup_cpu=ev["speedup_cpu"], target_met=ev["target_5x"]),
            ]
        if args.only:
            return 0
        fs = results["fast_start"]
        headline.append(headline_row("isle evaluate: process start -> first task", fs["local"]["first_task"],
                                     "the Dask pass (DASK_SCHEDULER=threads)", fs["dask"]["first_task"],
                                     target_met=fs["target_first_task_0_3s"]))
        rows = []
        for job, ing, ev in zip(results["jobs"], results["ingest"], results["evaluate"]):
            rows.append({"images": job["images"], "plain s": f"{job['best']['plain']:.2f}",
                         "isle run s": f"{job['best']['isle_cold']:.2f}",
                         "x plain": f"{job['speedup_cold']:.2f}", "warm s": f"{job['best']['isle_warm']:.2f}",
                         "floor s": f"{job['floor_seconds']:.2f}", "x floor": f"{job['cold_over_floor']:.2f}",
                         "ingest x decode": f"{ing['x_per_core_decode']:.2f}",
                         "evaluate x": f"{ev['speedup']:.2f}"})
        print(format_table(rows))
        cpu_rows = []
        for job, ing, ev in zip(results["jobs"], results["ingest"], results["evaluate"]):
            cpu_rows.append({"images": job["images"], "plain CPU s": f"{job['best_cpu']['plain']:.2f}",
                             "isle run CPU s": f"{job['best_cpu']['isle_cold']:.2f}",
                             "x plain": f"{job['speedup_cold_cpu']:.2f}",
                             "warm CPU s": f"{job['best_cpu']['isle_warm']:.2f}",
                             "floor CPU s": f"{job['floor_cpu_seconds']:.2f}",
                             "x floor": f"{job['cold_over_floor_cpu']:.2f}",
                             "ingest img/CPU s": f"{ing['images_per_cpu_s']:.0f}",
                             "evaluate x": f"{ev['speedup_cpu']:.2f}"})
        print("CPU seconds (user + sys, worker processes included):")
        print(format_table(cpu_rows))
        print(f"first task of isle evaluate: {fs['local']['first_task']:.3f} s (Dask pass "
              f"{fs['dask']['first_task']:.3f} s); end {fs['local']['end']:.3f} s "
              f"({fs['dask']['end']:.3f} s)")
        print("PNG compression, one core: " + ", ".join(
            f"{k}: {v['maps_per_s']:.0f}/s (PIL {v['pil_maps_per_s']:.0f}/s) {v['kib_per_file']:.2f} KiB"
            for k, v in results["png_compression"].items()))
        results["headline"] = headline
        if args.save:
            path = write_json("e2e", results, quick=quick)
            plot(results_dir() / "e2e.png", results["jobs"])
            print(f"wrote {path}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
