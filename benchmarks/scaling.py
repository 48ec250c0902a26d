"""How every ISLE step's cost grows: ingest, refine, evaluate, select, merge, train step, predict.

``python -m benchmarks.scaling [--quick] [--only SWEEP,...] [--repeat K]``

Each *sweep* varies one variable (images, sets, classes, pixels per image,
images per chunk, workers; for training the crop and the batch) of a
synthetic data set (cached stores under ``benchmarks/results/tmp/scaling``)
and times one step through the library's public API, best of ``--repeat``:

========================  ==========================================================
sweeps                    what is timed
========================  ==========================================================
``images`` ``sets``       ``isle_fast.ensemble.evaluate.evaluate`` (one fused pass over gt +
``classes`` ``pixels``    every set), ``selection.select`` and ``merge.merge``
``chunk_images``          (reads the sets, writes the ensemble store) over
``workers``               compressed stores; the kernels alone on arrays in memory
                          (``confusion_labels``, ``merge_labels``); the references
                          on the same arrays: the public WSSS per-image masked
                          ``np.bincount`` and a plain NumPy Algorithm 3 (a loop
                          over classes)
``ingest_images``         ``ingest.ingest_labels`` of a PNG folder into a store,
``ingest_pixels``         next to the plain PIL decode loop over the same files
``ingest_workers``
``refine_images``         ``refine.refine_stack(chain=['crf'])`` (dense CRF) store to
``refine_pixels``         store, next to a direct pydensecrf call per image over
                          all classes (arrays in memory)
``train_pixels``          one optimiser step of ``train.train`` (DeepLabV3+
``train_batch``           ResNet-18, loader + forward + backward + SGD), read
``train_sets``            from the run's own per-step log; ``train_sets`` trains
                          on the ensemble of the first N sets
``predict_images``        ``predict.predict`` of an images store into a label
``predict_pixels``        store, next to the model's forward pass alone on
``predict_sets``          arrays in memory; ``predict_sets`` uses the runs
                          trained on ensembles of N sets
========================  ==========================================================

**One thread.** Every growth sweep runs on one thread (Dask's synchronous
scheduler, ``numba.set_num_threads(1)``, ``threads=1`` for train / predict,
one decode thread, one CRF worker): the exponent then measures work, not how
many of the machine's cores a size happens to keep busy; and the fits use
this process's **CPU seconds** (wall seconds are kept in the JSON): on a
shared machine a single thread's wall time grows whenever another process
holds the core, its CPU time does not. The ``*workers`` sweeps fit wall
time, the ``train`` sweeps the best of the run's own per-step wall clock
(no setup in it; see :func:`clock`). (The first version
of this benchmark ran on two threads: 128 and 256 images took the same time
because 256 images are two chunks, one per core, which flattened the image
exponent to 0.64.) Only the ``*workers`` sweeps vary the thread count.

**Two fits.** For every series: the plain least-squares slope on a log-log
scale (``slope``) and a fit of ``t = a + b * x**k`` (``k``, fixed seconds
``a``), :func:`benchmarks.common.fit_power_offset`. Every step has a fixed
cost per call (opening stores, building the Dask graph, loading a model,
writing a store's metadata) that dominates the smallest sizes and drags the
plain slope towards 0; ``k`` is the growth of the part that depends on the
variable. Where the varying part is under 10% of the time at the largest
size (the smallest for a decreasing series) the series is *flat* and the
slope (near 0) is the measure; so it is for the series claimed flat.

**Paper vs expected.** Each exponent is printed next to the paper's claim
(section 4.2: ``O(eval) + O(merger) = I x N x C + I x C``; refinement
linear in I x N; deployment = DeepLabV3+ inference x images, independent of
the number of components) and next to what this implementation should show.
They differ on purpose in two places: the fused kernels do a constant
amount of work per pixel and set (one table increment, one gather), so
evaluate and merge do not grow with C (better than the paper's O(C)); and the
merge reads every set (a pixel where every set abstains becomes 255, which
needs all of them), so it grows with N while the paper's ``I x C`` has no N.
Each row says which of the two the measurement agrees with and why.

Writes ``scaling.json`` and one ``scaling_<sweep>.png`` per sweep (log-log,
points, the log-log line dashed, the fixed + power fit dotted) to
``benchmarks/results/``. ``--quick`` runs every sweep on two tiny sizes
(a smoke test: no fit is meaningful there).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from .common import (
    bench_parser,
    export_pngs,
    fit_exponent,
    fit_power_offset,
    format_table,
    headline_row,
    log,
    make_label_stores,
    numpy_merge_image,
    read_png,
    results_dir,
    save_figure,
    tmp_dir,
    write_json,
    wsss_confusion,
)

#: Series whose varying part is below this share of the time at the largest size count as flat.
FLAT_SHARE = 0.10
#: |measured - claimed| exponent within this counts as agreeing.
TOLERANCE = 0.3


@dataclass(frozen=True)
class Claim:
    """What one timed series should show when its sweep's variable grows."""

    label: str
    paper: float | None      # section 4.2's exponent; None: the paper says nothing
    expected: float | None   # what this implementation should show
    why: str = ""            # why expected differs from the paper (printed with the verdict)
    if_not: str = ""         # a likely reason when the measurement differs from expected


# --------------------------------------------------------------------------------------
# sizes
# --------------------------------------------------------------------------------------
def _sizes(quick: bool) -> dict[str, Any]:
    if quick:
        return {
            "base": {"images": 16, "side": 32, "sets": 2, "classes": 21},
            "images": [8, 16], "sets": [1, 2], "classes": [2, 21], "pixels": [16, 32],
            "chunk_images": [1, 8], "workers": [1, 2],
            "ingest_images": [8, 16], "ingest_pixels": [16, 32], "ingest_workers": [1, 2],
            "refine": {"images": 2, "side": 24}, "refine_images": [1, 2], "refine_pixels": [16, 24],
            "train": {"images": 4, "side": 32, "crop": 32, "batch": 2, "steps": 3, "head": 16},
            "train_pixels": [32, 48], "train_batch": [2, 3], "train_sets": [1, 2],
            "predict": {"images": 2, "side": 32, "images_pixels": 2},
            "predict_images": [1, 2], "predict_pixels": [16, 32], "predict_sets": [1, 2],
        }
    # Large enough that the work, not the per-call overhead, dominates the largest sizes;
    # small enough that the whole run stays under ~10 minutes on a shared 2-core machine.
    return {
        "base": {"images": 512, "side": 256, "sets": 4, "classes": 21},
        "images": [128, 256, 512, 1024, 2048], "sets": [1, 2, 4, 8, 16], "classes": [2, 6, 21, 61, 151],
        "pixels": [64, 128, 256, 512], "chunk_images": [1, 4, 16, 64, 128], "workers": [1, 2],
        "ingest_images": [128, 256, 512, 1024, 2048], "ingest_pixels": [64, 128, 256, 512],
        "ingest_workers": [1, 2],
        "refine": {"images": 4, "side": 96}, "refine_images": [4, 8, 16, 32, 64],
        "refine_pixels": [32, 64, 128, 256, 384],
        "train": {"images": 32, "side": 128, "crop": 64, "batch": 2, "steps": 12, "head": 64},
        "train_pixels": [64, 128, 192, 256], "train_batch": [2, 4, 8, 16], "train_sets": [1, 2, 4, 8, 16],
        "predict": {"images": 8, "side": 64, "images_pixels": 4},
        "predict_images": [8, 16, 32, 64, 128], "predict_pixels": [32, 64, 128, 256, 512],
        "predict_sets": [1, 2, 4, 8, 16],
    }


# --------------------------------------------------------------------------------------
# threads
# --------------------------------------------------------------------------------------
@contextmanager
def threads(n: int) -> Iterator[None]:
    """Run the block on ``n`` threads: Dask (synchronous for 1), Numba and torch thread counts."""
    import dask
    import numba

    old_nb = numba.get_num_threads()
    try:
        import torch

        old_t = torch.get_num_threads()
    except ImportError:  # pragma: no cover - torch is a dependency
        torch, old_t = None, None
    cfg = {"scheduler": "synchronous"} if n == 1 else {"scheduler": "threads", "num_workers": n}
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    if torch is not None:
        torch.set_num_threads(n)
    try:
        with dask.config.set(cfg):
            yield
    finally:
        numba.set_num_threads(old_nb)
        if torch is not None:
            torch.set_num_threads(old_t)


def _best(fn: Callable[[], Any], repeat: int, max_seconds: float = 20.0) -> tuple[float, float]:
    """Minimum wall and minimum process CPU seconds of up to ``repeat`` runs.

    Stops repeating once ``max_seconds`` of wall time are spent (at least one run).
    """
    wall: list[float] = []
    cpu: list[float] = []
    for _ in range(max(1, repeat)):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        if sum(wall) >= max_seconds:
            break
    return min(wall), min(cpu)


def _timed(**series: tuple[float, float]) -> dict[str, float]:
    """Row entries ``key`` (wall seconds) and ``key_cpu`` (process CPU seconds) from :func:`_best` pairs."""
    out: dict[str, float] = {}
    for k, (wall, cpu) in series.items():
        out[k] = wall
        out[f"{k}_cpu"] = cpu
    return out


@dataclass
class Ctx:
    """What every sweep needs: sizes, repeats, the data cache and a scratch folder."""

    sizes: dict[str, Any]
    repeat: int
    root: Path
    work: Path
    quick: bool
    runs: dict[int, str] | None = None   # train_sets runs: number of sets -> run folder (for predict_sets)


def _dataset(ctx: Ctx, images: int, side: int, sets: int, classes: int, chunk: int | None = None) -> dict:
    return make_label_stores(ctx.root, images, n_sets=sets, max_side=side, num_classes=classes, seed=11,
                             chunk_images=chunk)


# --------------------------------------------------------------------------------------
# evaluate / select / merge
# --------------------------------------------------------------------------------------
def _pipeline_steps(data: dict[str, Any], out: Path, repeat: int) -> dict[str, float]:
    """Best-of-``repeat`` seconds of evaluate, select and merge over the stores (each step's own minimum)."""
    from isle_fast.ensemble.evaluate import evaluate
    from isle_fast.ensemble.merge import merge
    from isle_fast.ensemble.selection import select

    best = {k: math.inf for k in ("evaluate", "select", "merge", "evaluate_cpu", "select_cpu", "merge_cpu")}
    spent = 0.0
    for _ in range(repeat):
        c0, t0 = time.process_time(), time.perf_counter()
        ev = evaluate(data["sets"], data["gt"], backend="cpu", progress=False)
        c1, t1 = time.process_time(), time.perf_counter()
        select(ev)
        c2, t2 = time.process_time(), time.perf_counter()
        merge(data["sets"], data["gt"], str(out), evaluation=ev, backend="cpu", progress=False, overwrite=True)
        c3, t3 = time.process_time(), time.perf_counter()
        for k, v in (("evaluate", t1 - t0), ("select", t2 - t1), ("merge", t3 - t2),
                     ("evaluate_cpu", c1 - c0), ("select_cpu", c2 - c1), ("merge_cpu", c3 - c2)):
            best[k] = min(best[k], v)
        spent += t3 - t0
        if spent > 30:
            break
    return best


def _in_memory(data: dict[str, Any], repeat: int) -> dict[str, float]:
    """The kernels alone and the references, on the data set loaded into memory."""
    from isle_fast.ensemble.evaluate import evaluate
    from isle_fast.ensemble.selection import select
    from isle_fast.kernels import cpu as K
    from isle_fast.stores.stack import open_stack

    gt = open_stack(data["gt"])
    sets = [open_stack(p) for p in data["sets"]]
    c = gt.num_classes
    g = np.asarray(gt.array[:])
    s = [np.asarray(x.array[:]) for x in sets]
    sel = select(evaluate(sets, gt, backend="cpu", progress=False))
    ks, pr = sel.kernel_selection(), sel.priority()
    shapes = gt.shapes
    # the references see what a per-image script sees: each image at its true size
    imgs_gt = [g[i, :h, :w] for i, (h, w) in enumerate(shapes)]
    imgs = [[a[i, :h, :w] for i, (h, w) in enumerate(shapes)] for a in s]
    K.confusion_labels(g[:1], [a[:1] for a in s], c)
    K.merge_labels([a[:1] for a in s], ks, pr, K.SCORE)

    def ref_eval() -> None:
        h = np.zeros((len(s), c, c), np.int64)
        for j in range(len(imgs_gt)):
            for n in range(len(s)):
                h[n] += wsss_confusion(imgs_gt[j], imgs[n][j], c)

    def ref_merge() -> None:
        for j in range(len(imgs_gt)):
            numpy_merge_image([imgs[n][j] for n in range(len(s))], ks, pr, c)

    fast = max(repeat, 7)   # the kernels take milliseconds: more runs make their minimum steadier
    return _timed(
        kernel_confusion=_best(lambda: K.confusion_labels(g, s, c), fast, 3.0),
        kernel_merge=_best(lambda: K.merge_labels(s, ks, pr, K.SCORE), fast, 3.0),
        ref_bincount=_best(ref_eval, repeat),
        ref_numpy_merge=_best(ref_merge, repeat),
    )


def sweep_pipeline(ctx: Ctx, var: str) -> list[dict[str, Any]]:
    """evaluate / select / merge (stores), the kernels and the references over one variable."""
    base = dict(ctx.sizes["base"])
    rows = []
    for v in ctx.sizes[var]:
        cfg = dict(base)
        chunk, workers = None, 1
        if var in ("images", "sets", "classes"):
            cfg[var] = v
        elif var == "pixels":
            cfg["side"] = v
        elif var == "chunk_images":
            chunk = v
        elif var == "workers":
            workers = v
        log(f"[scaling] {var} = {v}")
        data = _dataset(ctx, cfg["images"], cfg["side"], cfg["sets"], cfg["classes"], chunk)
        with threads(workers):
            steps = _pipeline_steps(data, ctx.work / "ens.zarr", ctx.repeat)
            mem = _in_memory(data, ctx.repeat) if var not in ("chunk_images", "workers") else {}
        x = v * v * cfg["images"] if var == "pixels" else v
        rows.append({"size": v, "x": x, "images": cfg["images"], "side": cfg["side"], "sets": cfg["sets"],
                     "classes": cfg["classes"], "chunk_images": data["chunks"][0], "workers": workers,
                     **steps, **mem})
    return rows


# --------------------------------------------------------------------------------------
# ingest
# --------------------------------------------------------------------------------------
def sweep_ingest(ctx: Ctx, var: str) -> list[dict[str, Any]]:
    """``ingest_labels`` of a PNG folder (the gt of a synthetic set) vs the plain PIL decode loop."""
    from isle_fast.stores.ingest import ingest_labels

    base = dict(ctx.sizes["base"])
    rows = []
    for v in ctx.sizes[var]:
        cfg = dict(base)
        workers = 1
        if var == "ingest_images":
            cfg["images"] = v
        elif var == "ingest_pixels":
            cfg["side"] = v
        else:
            workers = v
        log(f"[scaling] {var} = {v}")
        data = _dataset(ctx, cfg["images"], cfg["side"], cfg["sets"], cfg["classes"])
        folder = Path(export_pngs({"gt": data["gt"]}, Path(data["root"]) / "png")["folder"]) / "gt"
        files = sorted(folder.glob("*.png"))
        out = ctx.work / "ingest.zarr"
        with threads(workers):
            t = _best(lambda: ingest_labels(folder, out, kind="gt", workers=workers, overwrite=True, quiet=True),
                      ctx.repeat)
            ref = _best(lambda: [read_png(f) for f in files], ctx.repeat)
        x = v * v * cfg["images"] if var == "ingest_pixels" else v
        rows.append({"size": v, "x": x, "images": cfg["images"], "side": cfg["side"], "workers": workers,
                     "png_bytes_per_image": round(sum(f.stat().st_size for f in files) / max(1, len(files))),
                     **_timed(ingest=t, ref_pil_decode=ref)})
    return rows


# --------------------------------------------------------------------------------------
# refine (dense CRF)
# --------------------------------------------------------------------------------------
def _refine_data(ctx: Ctx, n: int, side: int) -> tuple[str, str, list]:
    """Images + CAM-like score stores of ``n`` synthetic scenes ``side x side`` (21 classes), cached."""
    from isle_fast.stores.stack import open_stack
    from isle_fast.synthetic.scene import synthetic_scene

    from .refine import write_scene_stores

    c = 21
    folder = ctx.root / f"refine-n{n}-s{side}-v1"
    img, src = folder / "images.zarr", folder / "cams.zarr"
    scenes = [synthetic_scene(side, side, c, objects=3, blur=max(2.0, side / 40), shift=max(1, side // 60),
                              rng=100 + i) for i in range(n)]
    try:
        open_stack(img), open_stack(src)
    except Exception:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        write_scene_stores(folder, scenes, c)
    return str(img), str(src), scenes


def _pydensecrf_all_classes(rgb: np.ndarray, scores: np.ndarray, iterations: int = 10) -> np.ndarray:
    """Reference: what a plain script does, one pydensecrf call per image over all C classes."""
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    h, w, c = scores.shape
    d = dcrf.DenseCRF2D(w, h, c)
    d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(np.moveaxis(scores, -1, 0))))
    d.addPairwiseGaussian(sxy=3, compat=3)
    d.addPairwiseBilateral(sxy=80, srgb=13, rgbim=np.ascontiguousarray(rgb), compat=10)
    return np.asarray(d.inference(iterations)).reshape(c, h, w).argmax(0)


def sweep_refine(ctx: Ctx, var: str) -> list[dict[str, Any]]:
    """``refine_stack(chain=['crf'])`` with one worker, store to store, vs direct pydensecrf per image."""
    from isle_fast.refinement.chain import refine_stack

    base = ctx.sizes["refine"]
    rows = []
    for v in ctx.sizes[var]:
        n, side = (v, base["side"]) if var == "refine_images" else (base["images"], v)
        log(f"[scaling] {var} = {v}")
        img, src, scenes = _refine_data(ctx, n, side)
        out = ctx.work / "crf.zarr"
        with threads(1):
            t = _best(lambda: refine_stack(src, img, out, ["crf"], workers=1, scheduler="sync",
                                           overwrite=True, progress=False), ctx.repeat)
            ref = _best(lambda: [_pydensecrf_all_classes(r, s) for r, _, s in scenes], ctx.repeat)
        x = v * v * n if var == "refine_pixels" else v
        rows.append({"size": v, "x": x, "images": n, "side": side, **_timed(refine=t, ref_pydensecrf=ref)})
    return rows


# --------------------------------------------------------------------------------------
# train step and predict
# --------------------------------------------------------------------------------------
def _images_store(data: dict[str, Any]) -> str:
    """An RGB images store aligned with a synthetic set's gt (a flat colour per class + noise), cached."""
    from isle_fast.stores.stack import create_stack, open_stack

    path = Path(data["root"]) / "images.zarr"
    try:
        open_stack(path)
        return str(path)
    except Exception:
        shutil.rmtree(path, ignore_errors=True)
    gt = open_stack(data["gt"])
    rng = np.random.default_rng(5)
    palette = rng.integers(30, 226, size=(256, 3)).astype(np.float32)
    with create_stack(path, kind="images", classes=gt.classes, ids=gt.ids, shapes=gt.shapes) as wr:
        for i in range(gt.num_images):
            a = gt.read_image(i)
            rgb = palette[a] + rng.normal(0, 6, a.shape + (3,))
            wr.write_image(i, np.clip(rgb, 0, 255).astype(np.uint8))
    return str(path)


def _train_data(ctx: Ctx) -> dict[str, Any]:
    t = ctx.sizes["train"]
    n_sets = max(ctx.sizes["train_sets"])
    data = _dataset(ctx, t["images"], t["side"], n_sets, 21)
    data["images_store"] = _images_store(data)
    return data


def _ensemble(ctx: Ctx, data: dict[str, Any], n_sets: int) -> str:
    """The ISLE ensemble of the first ``n_sets`` sets (evaluate + select + merge), cached."""
    from isle_fast.ensemble.merge import merge
    from isle_fast.stores.stack import open_stack

    out = Path(data["root"]) / f"ensemble-first{n_sets}.zarr"
    try:
        open_stack(out)
    except Exception:
        merge(data["sets"][:n_sets], data["gt"], str(out), backend="cpu", progress=False, overwrite=True)
    return str(out)


_WARM: dict[str, bool] = {}


def _train_step_seconds(ctx: Ctx, images: str, labels: str, run: Path, crop: int, batch: int,
                        cpu: bool = True) -> tuple[float, float]:
    """Wall and CPU seconds of one optimiser step of ``isle_fast.training.train.train``
    (loader + forward + backward + SGD).

    Wall: the run logs every step (``log_every=1``); the library's own
    per-step clock gives images/s, and the best step after the first counts
    (no model construction, warm-up step or checkpointing in it). CPU: the
    process CPU time of a run of ``steps`` steps minus that of a 2-step run,
    divided by the difference (construction and checkpointing cancel). With
    ``cpu=False`` only the long run happens (CPU seconds NaN).
    """
    from isle_fast.training.train import train

    t = ctx.sizes["train"]

    def run_for(steps: int) -> float:
        c0 = time.process_time()
        train(images, labels, run, backbone="resnet18", weights=None, head_channels=t["head"], crop=crop,
              scale_range=(1.0, 1.0), steps=steps, batch_size=batch, num_workers=0, log_every=1,
              ckpt_every=0, val_every=0, device="cpu", threads=1, overwrite=True, quiet=True)
        return time.process_time() - c0

    steps = max(3, int(t["steps"]))
    if cpu and not _WARM.get("train"):
        run_for(2)        # first run in the process: lazy imports and one-time setup, not counted
        _WARM["train"] = True
    short = run_for(2) if cpu else math.nan
    long = run_for(steps)
    hist = json.loads((run / "metrics.json").read_text(encoding="utf-8"))["train"]
    per_step = [batch / r["images_per_s"] for r in hist if r.get("images_per_s")]
    return min(per_step[1:] or per_step), (long - short) / (steps - 2)


def sweep_train(ctx: Ctx, var: str) -> list[dict[str, Any]]:
    """One training step over the crop, the batch, or the number of sets in the ensemble label store."""
    t = ctx.sizes["train"]
    data = _train_data(ctx)
    rows = []
    for v in ctx.sizes[var]:
        crop, batch, n_sets = t["crop"], t["batch"], 1
        if var == "train_pixels":
            crop = v
        elif var == "train_batch":
            batch = v
        else:
            n_sets = v
        log(f"[scaling] {var} = {v}")
        labels = _ensemble(ctx, data, n_sets)
        run = ctx.work / (f"run-sets{v}" if var == "train_sets" else "run")
        with threads(1):   # one run of several steps: the best step after the first is the cost
            sec = _train_step_seconds(ctx, data["images_store"], labels, run, crop, batch)
        if var == "train_sets":
            ctx.runs = {**(ctx.runs or {}), v: str(run)}
        x = crop * crop * batch if var == "train_pixels" else v
        rows.append({"size": v, "x": x, "crop": crop, "batch": batch, "sets": n_sets, **_timed(train_step=sec)})
    return rows


def _model_forward(run: str, store: str) -> Callable[[], None]:
    """Reference: the trained model's forward pass alone over the images, already in memory as tensors."""
    import torch

    from isle_fast.stores.stack import open_stack
    from isle_fast.training.data import normalize
    from isle_fast.training.predict import load_model

    model, _ = load_model(run, "final", torch.device("cpu"))
    st = open_stack(store)
    xs = []
    for i in range(st.num_images):
        a = st.read_image(i)
        xs.append(normalize(torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)[None].float()))

    def fwd() -> None:
        with torch.inference_mode():
            for x in xs:
                model(x).argmax(1)

    return fwd


def sweep_predict(ctx: Ctx, var: str) -> list[dict[str, Any]]:
    """``predict`` (images store -> label store) over images, image size, or the sets behind the model."""
    from isle_fast.training.predict import predict

    p = ctx.sizes["predict"]
    t = ctx.sizes["train"]
    ctx.runs = ctx.runs or {}   # models trained on ensembles of N sets (train_sets) are reused
    rows = []
    for v in ctx.sizes[var]:
        n, side, n_sets = p["images"], p["side"], 1
        if var == "predict_images":
            n = v
        elif var == "predict_pixels":
            n, side = p["images_pixels"], v
        else:
            n_sets = v
        log(f"[scaling] {var} = {v}")
        if n_sets not in ctx.runs:
            data = _train_data(ctx)
            run = ctx.work / f"run-sets{n_sets}"
            with threads(1):
                _train_step_seconds(ctx, data["images_store"], _ensemble(ctx, data, n_sets), run, t["crop"],
                                    t["batch"], cpu=False)
            ctx.runs[n_sets] = str(run)
        run = ctx.runs[n_sets]
        store = _images_store(_dataset(ctx, n, side, 1, 21))
        out = ctx.work / "pred.zarr"
        with threads(1):
            sec = _best(lambda: predict(run, store, out, which="final", device="cpu", threads=1, overwrite=True,
                                       quiet=True),
                        ctx.repeat)
            fwd = _best(_model_forward(run, store), ctx.repeat)
        x = v * v * n if var == "predict_pixels" else v
        rows.append({"size": v, "x": x, "images": n, "side": side, "sets": n_sets,
                     **_timed(predict=sec, ref_forward_only=fwd)})
    return rows


# --------------------------------------------------------------------------------------
# the sweeps and their claims
# --------------------------------------------------------------------------------------
_EVAL_C = ("the fused kernel does one table increment per pixel and set whatever C is (only the "
           "(N, C, C+1) table grows): better than the paper's O(C)")
_MERGE_C = ("the merge_labels kernel gathers the chosen set's label per pixel whatever C is; "
            "Algorithm 3 as written (the NumPy reference) loops over classes")
_MERGE_N = ("our merge reads every set (a pixel where every set abstains becomes 255, which needs all "
            "of them) and decompresses it; the paper's I x C counts no reading")
_CHUNK = ("no claim: a per-chunk cost (task, chunk decode, kernel call) shrinks as 1/chunk, "
          "then the work remains (k near -1 on top of a fixed a)")
_PNG = ("PNG decoding costs a per-file part plus the compressed bytes, and flat label maps compress "
        "so well that the bytes grow much slower than the pixels (png_bytes_per_image in the sweep)")
_CACHE = ("likely memory effects: a kernel's per-pixel cost over one whole in-memory array (or a large "
          "batch of feature maps) rises with its size, the smallest being partly cache-resident; the chunked "
          "store-level steps, which work on fixed-size chunks, do not show it")
_WORKERS = ("ideal parallel scaling is -1; on a shared 2-core machine the second core is only "
            "partly free (see the load average)")

SWEEPS: dict[str, dict[str, Any]] = {
    "images": {"run": sweep_pipeline, "xlabel": "images (256 px)", "series": {
        "evaluate": Claim("evaluate (stores)", 1.0, 1.0), "select": Claim("select", None, 0.0,
                                                                        "select reads only the (N, C) score table"),
        "merge": Claim("merge (stores)", 1.0, 1.0),
        "kernel_confusion": Claim("kernel confusion_labels", 1.0, 1.0, "", _CACHE),
        "kernel_merge": Claim("kernel merge_labels", 1.0, 1.0, "", _CACHE),
        "ref_bincount": Claim("reference np.bincount loop", 1.0, 1.0),
        "ref_numpy_merge": Claim("reference NumPy Algorithm 3", 1.0, 1.0)}},
    "sets": {"run": sweep_pipeline, "xlabel": "pseudo-label sets N", "series": {
        "evaluate": Claim("evaluate (stores)", 1.0, 1.0), "merge": Claim("merge (stores)", 0.0, 1.0, _MERGE_N),
        "kernel_confusion": Claim("kernel confusion_labels", 1.0, 1.0, "", _CACHE),
        "kernel_merge": Claim("kernel merge_labels", 0.0, 1.0, _MERGE_N, _CACHE),
        "ref_bincount": Claim("reference np.bincount loop", 1.0, 1.0),
        "ref_numpy_merge": Claim("reference NumPy Algorithm 3", 0.0, 0.0)}},
    "classes": {"run": sweep_pipeline, "xlabel": "classes C", "series": {
        "evaluate": Claim("evaluate (stores)", 1.0, 0.0, _EVAL_C), "merge": Claim("merge (stores)", 1.0, 0.0, _MERGE_C),
        "kernel_confusion": Claim("kernel confusion_labels", 1.0, 0.0, _EVAL_C),
        "kernel_merge": Claim("kernel merge_labels", 1.0, 0.0, _MERGE_C),
        "ref_bincount": Claim("reference np.bincount loop", 1.0, 0.0, "np.bincount is per pixel too"),
        "ref_numpy_merge": Claim("reference NumPy Algorithm 3", 1.0, 1.0)}},
    "pixels": {"run": sweep_pipeline, "xlabel": "pixels (images x side^2)", "series": {
        k: Claim(lab, None, 1.0, "the paper counts images, not pixels", _CACHE) for k, lab in (
            ("evaluate", "evaluate (stores)"), ("merge", "merge (stores)"),
            ("kernel_confusion", "kernel confusion_labels"), ("kernel_merge", "kernel merge_labels"),
            ("ref_bincount", "reference np.bincount loop"), ("ref_numpy_merge", "reference NumPy Algorithm 3"))}},
    "chunk_images": {"run": sweep_pipeline, "xlabel": "images per chunk", "series": {
        "evaluate": Claim("evaluate (stores)", None, -1.0, _CHUNK, _CHUNK),
        "merge": Claim("merge (stores)", None, -1.0, _CHUNK, _CHUNK)}},
    "workers": {"run": sweep_pipeline, "xlabel": "threads", "series": {
        "evaluate": Claim("evaluate (stores)", None, -1.0, _WORKERS, _WORKERS),
        "merge": Claim("merge (stores)", None, -1.0, _WORKERS, _WORKERS)}},
    "ingest_images": {"run": sweep_ingest, "xlabel": "images (256 px)", "series": {
        "ingest": Claim("ingest_labels (PNG folder -> store)", None, 1.0, "the paper has no ingest step"),
        "ref_pil_decode": Claim("reference PIL decode loop", None, 1.0, "the paper has no ingest step")}},
    "ingest_pixels": {"run": sweep_ingest, "xlabel": "pixels (images x side^2)", "series": {
        "ingest": Claim("ingest_labels (PNG folder -> store)", None, 1.0, "the paper has no ingest step", _PNG),
        "ref_pil_decode": Claim("reference PIL decode loop", None, 1.0, "the paper has no ingest step", _PNG)}},
    "ingest_workers": {"run": sweep_ingest, "xlabel": "decode threads", "series": {
        "ingest": Claim("ingest_labels (PNG folder -> store)", None, -1.0, _WORKERS, _WORKERS)}},
    "refine_images": {"run": sweep_refine, "xlabel": "images (96 px)", "series": {
        "refine": Claim("refine_stack CRF (1 worker)", 1.0, 1.0),
        "ref_pydensecrf": Claim("reference pydensecrf, all classes", 1.0, 1.0)}},
    "refine_pixels": {"run": sweep_refine, "xlabel": "pixels (images x side^2)", "series": {
        "refine": Claim("refine_stack CRF (1 worker)", None, 1.0, "the paper counts images, not pixels"),
        "ref_pydensecrf": Claim("reference pydensecrf, all classes", None, 1.0, "the paper counts images")}},
    "train_pixels": {"run": sweep_train, "xlabel": "pixels per step (crop^2 x batch 2)", "series": {
        "train_step": Claim("train step (DeepLabV3+ R18)", None, 1.0, "the paper counts images, not pixels",
                            _CACHE)}},
    "train_batch": {"run": sweep_train, "xlabel": "images per step (batch, crop 64)", "series": {
        "train_step": Claim("train step (DeepLabV3+ R18)", 1.0, 1.0, "", "the per-image cost rises with the "
                            "batch as the activations outgrow the CPU cache (the per-step optimiser update of "
                            "every weight is the fixed a)")}},
    "train_sets": {"run": sweep_train, "xlabel": "sets in the ensemble label store", "series": {
        "train_step": Claim("train step (DeepLabV3+ R18)", 0.0, 0.0)}},
    "predict_images": {"run": sweep_predict, "xlabel": "images (64 px)", "series": {
        "predict": Claim("predict (store -> store)", 1.0, 1.0),
        "ref_forward_only": Claim("reference model forward alone", 1.0, 1.0)}},
    "predict_pixels": {"run": sweep_predict, "xlabel": "pixels (images x side^2)", "series": {
        "predict": Claim("predict (store -> store)", None, 1.0, "the paper counts images, not pixels", _CACHE),
        "ref_forward_only": Claim("reference model forward alone", None, 1.0, "the paper counts images", _CACHE)}},
    "predict_sets": {"run": sweep_predict, "xlabel": "sets behind the trained model", "series": {
        "predict": Claim("predict (store -> store)", 0.0, 0.0),
        "ref_forward_only": Claim("reference model forward alone", 0.0, 0.0)}},
}

#: The series each sweep contributes to the summary's headline table.
HEADLINE_SERIES = ("evaluate", "select", "merge", "ingest", "refine", "train_step", "predict")


# --------------------------------------------------------------------------------------
# fits
# --------------------------------------------------------------------------------------
def verdict(measured: float | None, claim: Claim) -> str:
    """Whether ``measured`` agrees with the paper, with what we expect, or with neither."""
    if measured is None or not math.isfinite(measured):
        return "too few points to fit"

    def near(v: float | None) -> bool:
        return v is not None and abs(measured - v) <= TOLERANCE

    reason = ": " + (claim.if_not or "noise on the shared machine, or the fixed part of the call still dominates "
                                     "(see fixed_s and the plot)")
    if claim.paper is None:
        if near(claim.expected):
            return f"as expected ({claim.why})" if claim.why else "as expected"
        return f"differs from expected {claim.expected:g}{reason}"
    if near(claim.paper):
        return "agrees with the paper"
    if near(claim.expected):
        return f"differs from the paper, as expected: {claim.why}"
    return f"differs from the paper ({claim.paper:g}) and from expected ({claim.expected:g}){reason}"


def clock(name: str) -> str:
    """Which time a sweep's fits use: ``cpu`` (process CPU seconds) or ``wall``.

    The growth sweeps run on one thread, so this process's CPU time is the
    work, and unlike wall time it does not grow when another process holds
    the core (the machine is shared). The ``*workers`` sweeps need wall time
    (CPU time does not shrink with parallelism). The training step uses the
    library's own per-step wall clock, the best of ``steps - 1`` steps, which
    holds no setup; the CPU estimate (long run minus short run) is kept in the
    JSON but carries the noise of two runs' setup.
    """
    return "wall" if name.endswith("workers") or name.startswith("train") else "cpu"


def _column(name: str, key: str, rows: list[dict[str, Any]]) -> str:
    col = f"{key}_cpu" if clock(name) == "cpu" else key
    return col if rows and all(col in r for r in rows) else key


def fits(name: str, rows: list[dict[str, Any]], quick: bool = False) -> list[dict[str, Any]]:
    """Both fits and the verdict for every series of one sweep (``quick``: no verdict, sizes too small)."""
    out = []
    x = [r["x"] for r in rows]
    for key, claim in SWEEPS[name]["series"].items():
        if not rows or not all(key in r for r in rows):
            continue
        col = _column(name, key, rows)
        y = [r[col] for r in rows]
        ll = fit_exponent(x, y)
        po = fit_power_offset(x, y)
        flat = math.isfinite(po["varying_share_peak"]) and po["varying_share_peak"] < FLAT_SHARE
        if len(rows) < 3 or flat or claim.expected == 0:
            # two points: only the slope exists; flat (the variable adds < 10%) or claimed flat:
            # k of a series without a varying part means nothing, the slope (near 0) is the measure
            measured = ll["exponent"]
        else:
            measured = po["exponent"]
        out.append({
            "sweep": name, "series": claim.label, "key": key, "column": col,
            "clock": "cpu" if col.endswith("_cpu") else "wall",
            "slope": _r(ll["exponent"]), "r2": _r(ll["r2"]),
            "k": None if flat else _r(po["exponent"]), "fixed_s": _r(po["fixed"], 4),
            "fixed_share_small": _r(po["fixed_share_min"]), "flat": bool(flat),
            "t_ratio": _r(y[-1] / y[0]) if y[0] else None, "x_ratio": _r(x[-1] / x[0]),
            "exponent": _r(measured), "paper": claim.paper, "expected": claim.expected,
            "verdict": "quick mode: tiny sizes, no verdict" if quick else verdict(measured, claim),
        })
    return out


def _r(v: Any, nd: int = 3) -> Any:
    return round(float(v), nd) if v is not None and math.isfinite(float(v)) else None


def plot(name: str, rows: list[dict[str, Any]], fit_rows: list[dict[str, Any]], xlabel: str) -> Path:
    """Log-log plot of a sweep: points, the log-log line (dashed), the fixed + power fit (dotted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = results_dir() / f"scaling_{name}.png"
    fig, ax = plt.subplots(figsize=(6.8, 4.6), dpi=110)
    x = np.asarray([r["x"] for r in rows], float)
    for f in fit_rows:
        y = np.asarray([r[f.get("column", f["key"])] for r in rows], float)
        ok = (x > 0) & (y > 0)
        if not ok.any():
            continue
        if f.get("k") is not None:
            lab = f"{f['series']}: k={f['k']:.2f}, a={f['fixed_s']:.3g}s (slope {f['slope']:.2f})"
        else:
            lab = f"{f['series']}: slope {f['slope']:.2f}" if f["slope"] is not None else f["series"]
        line, = ax.plot(x[ok], y[ok], "o-", label=lab, lw=1.2)
        if ok.sum() >= 2:
            xs = np.geomspace(x[ok].min(), x[ok].max(), 30)
            ll = fit_exponent(x[ok], y[ok])
            ax.plot(xs, np.exp(ll["intercept"]) * xs ** ll["exponent"], "--", color=line.get_color(), alpha=0.45)
        if ok.sum() >= 3 and f.get("k") is not None:
            po = fit_power_offset(x[ok], y[ok])
            ax.plot(xs, po["fixed"] + po["coef"] * xs ** po["exponent"], ":", color=line.get_color(), lw=2)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("wall seconds (best of runs)" if clock(name) == "wall" else "CPU seconds, one thread (best of runs)")
    ax.set_title(f"isle-fast scaling: {name}  (dashed: log-log line; dotted: t = a + b x^k)", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def plot_overview(all_fits: list[dict[str, Any]]) -> Path | None:
    """One chart of every step's measured exponent next to the paper's claim and what we expect."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [f for f in all_fits if f["key"] in HEADLINE_SERIES and f["exponent"] is not None]
    if not rows:
        return None
    path = results_dir() / "scaling_overview.png"
    fig, ax = plt.subplots(figsize=(7.2, 0.32 * len(rows) + 1.4), dpi=110)
    y = np.arange(len(rows))[::-1]
    ax.scatter([f["exponent"] for f in rows], y, marker="o", s=36, color="tab:blue", zorder=3, label="measured")
    ax.scatter([f["expected"] if f["expected"] is not None else np.nan for f in rows], y, marker="s", s=60,
               facecolors="none", edgecolors="tab:green", lw=1.5, zorder=2, label="expected (this implementation)")
    ax.scatter([f["paper"] if f["paper"] is not None else np.nan for f in rows], y, marker="x", s=44,
               color="tab:red", zorder=2, label="paper, section 4.2")
    ax.set_yticks(y)
    ax.set_yticklabels([f"{f['key']} vs {f['sweep']}" for f in rows], fontsize=7)
    ax.axvline(0, color="grey", lw=0.6)
    ax.axvline(1, color="grey", lw=0.6, ls=":")
    ax.set_xlabel("growth exponent (t ~ a + b x^k; slope where flat)")
    ax.set_title("isle-fast: how each step's cost grows (one thread)", fontsize=9)
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return save_figure(fig, path)


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------
def _headline(all_fits: list[dict[str, Any]], all_rows: dict[str, list]) -> list[dict[str, Any]]:
    head = []
    for f in all_fits:
        if f["key"] in HEADLINE_SERIES:
            head.append(headline_row(f"{f['series']} vs {f['sweep']}", None, exponent=f["exponent"],
                                     slope=f["slope"], fixed_s=f["fixed_s"], paper=f["paper"],
                                     expected=f["expected"], verdict=f["verdict"]))
    refs = (("images", "kernel_confusion", "ref_bincount", "evaluate kernel, {images} images {side}px, {sets} sets "
             "(in memory)", "np.bincount loop"),
            ("images", "kernel_merge", "ref_numpy_merge", "merge kernel, {images} images {side}px, {sets} sets "
             "(in memory)", "NumPy Algorithm 3"),
            ("classes", "kernel_merge", "ref_numpy_merge", "merge kernel, {classes} classes (in memory)",
             "NumPy Algorithm 3"),
            ("ingest_images", "ingest", "ref_pil_decode", "ingest_labels {images} PNGs {side}px, 1 thread",
             "PIL decode loop (no store)"),
            ("refine_pixels", "refine", "ref_pydensecrf", "CRF refine_stack, {images} images {side}px, 1 worker",
             "pydensecrf, all classes"),
            ("predict_pixels", "predict", "ref_forward_only", "predict {images} images {side}px (store -> store)",
             "model forward alone"))
    for sweep, ours, ref, what, ref_name in refs:
        rows = all_rows.get(sweep)
        if rows and ours in rows[-1] and ref in rows[-1]:
            r = rows[-1]
            head.append(headline_row(what.format(**r), r[ours], ref_name, r[ref]))
    return head


def main(argv: list[str] | None = None) -> int:
    p = bench_parser("scaling", __doc__.split("\n")[0])
    p.add_argument("--only", default=None, help=f"comma-separated sweeps: {', '.join(SWEEPS)}")
    args = p.parse_args(argv)
    quick = args.quick
    names = [s.strip() for s in args.only.split(",")] if args.only else list(SWEEPS)
    bad = [s for s in names if s not in SWEEPS]
    if bad:
        p.error(f"unknown sweep(s) {bad}; choose from {', '.join(SWEEPS)}")
    sizes = _sizes(quick)
    repeat = args.repeat or (1 if quick else 3)
    root = tmp_dir() / "scaling"
    work = root / "out"
    work.mkdir(parents=True, exist_ok=True)
    ctx = Ctx(sizes=sizes, repeat=repeat, root=root, work=work, quick=quick)
    t_all = time.perf_counter()
    # warm-up: kernels compiled / loaded from the Numba cache
    with threads(1):
        _pipeline_steps(_dataset(ctx, 4, 16, 2, 21), work / "warm.zarr", 1)

    all_rows: dict[str, list] = {}
    all_fits: list[dict] = []
    loads: dict[str, float] = {}
    seconds: dict[str, float] = {}
    for name in names:
        spec = SWEEPS[name]
        t0 = time.perf_counter()
        rows = spec["run"](ctx, name)
        seconds[name] = round(time.perf_counter() - t0, 2)
        loads[name] = round(os.getloadavg()[0], 2)
        all_rows[name] = rows
        f = fits(name, rows, quick)
        all_fits += f
        keys = list(dict.fromkeys((["select"] if "select" in rows[0] else []) + list(spec["series"])))
        cols = ["size"] + [c for c in rows[0] if c == "png_bytes_per_image"] + [
            _column(name, k, rows) for k in keys if k in rows[0]]
        what = "wall seconds" if clock(name) == "wall" else "CPU seconds of this process (*_cpu; wall in the JSON)"
        print(f"\nSweep {name} ({what}, best of {repeat}; {seconds[name]:.0f} s; load average {loads[name]})")
        print(format_table(rows, cols))
        plot(name, rows, f, spec["xlabel"])

    print("\nGrowth exponents (one thread, CPU seconds except *workers and train: wall; slope: log-log least "
          "squares; k and a: t = a + b*x^k) vs the paper's section 4.2 and what this implementation should show")
    print(format_table(all_fits, ["sweep", "series", "slope", "k", "fixed_s", "fixed_share_small", "t_ratio",
                                  "x_ratio", "exponent", "paper", "expected"]))
    print("\nVerdicts (exponent = k, or the slope where the series is flat or has two points)")
    for f in all_fits:
        print(f"  {f['sweep']:15s} {f['series']:38s} {f['exponent']!s:>7}  {f['verdict']}")
    plot_overview(all_fits)
    headline = _headline(all_fits, all_rows)
    path = write_json("scaling", {
        "sizes": sizes, "repeat": repeat, "threads": "1 (Dask synchronous, Numba 1, torch 1) except *workers sweeps",
        "sweeps": all_rows, "fits": all_fits, "sweep_seconds": seconds, "load_average_1m_after_sweep": loads,
        "paper_claim": "O(eval) + O(merger) = I x N x C + I x C; O(Deployment) = DeepLabV3+ inference x images, "
                       "independent of the number of components (section 4.2)",
        "fit_note": "fits use process CPU seconds (*_cpu) except the *workers sweeps (wall) and the train "
                    "sweeps (best per-step wall time of the run's own log); "
                    "slope: least-squares line on log-log axes; k, fixed_s: t = a + b*x^k (a, b >= 0, relative "
                    "least squares); exponent = k unless the varying part is < 10% at the largest size (flat) "
                    "or there are two points, then the slope",
        "seconds": round(time.perf_counter() - t_all, 1), "headline": headline}, quick=quick)
    print(f"\nwritten: {path} and scaling_*.png in {results_dir()} ({time.perf_counter() - t_all:.0f} s)")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
