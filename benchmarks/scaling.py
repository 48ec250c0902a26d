"""How evaluate / select / merge grow with images, sets, classes, image size, chunk size and workers.

``python -m benchmarks.scaling [--quick] [--only images,sets,...]``

Every sweep varies one variable of a synthetic data set (cached stores under
``benchmarks/results/tmp/``) and times, best of ``--repeat``:

* the library, end to end over compressed stores: ``evaluate`` (one fused
  pass over gt + every set), ``select``, ``merge`` (reads the sets, writes
  the ensemble store);
* the kernels alone on arrays in memory (``confusion_labels``,
  ``merge_labels``): what the hot loop costs without I/O;
* in the images sweep, ``isle_fast.ingest.ingest_labels`` of the gt from a
  PNG folder next to a plain PIL decode loop over the same files;
* the references on the same arrays in memory: the public WSSS per-image
  masked ``np.bincount`` (one call per image and set) and a plain NumPy
  Algorithm 3 merge (a loop over classes).

The growth exponent of each series is the slope of a least-squares line on a
log-log scale, printed next to what the paper's section 4.2 says:
``O(eval) + O(merger) = I x N x C + I x C``, i.e. evaluation linear in
images, sets and classes, the merge linear in images and classes and
independent of the number of sets. What we measure is different on purpose:
the fused kernels do a constant amount of work per pixel and set (one table
increment, one comparison), so both are O(pixels x sets) and nearly
independent of C (only the (N, C, C+1) table grows with C); the merge reads
every chosen set, hence O(pixels x sets) too. The paper counts images, not
pixels: at a fixed image size the two agree on the image exponent (1).
Training and deployment (``isle train`` / ``isle predict``) see one label
store, whatever the number of sets; ``benchmarks/train.py`` measures them.

Writes ``scaling.json`` and ``scaling_<variable>.png`` (log-log, fitted
slopes in the legend) to ``benchmarks/results/``.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from .common import (
    bench_parser,
    fit_exponent,
    format_table,
    headline_row,
    log,
    make_label_stores,
    numpy_merge_image,
    plot_loglog,
    results_dir,
    tmp_dir,
    wsss_confusion,
    write_json,
)

#: What the paper (section 4.2) claims for each variable: (evaluate, merge) exponents.
PAPER = {
    "images": (1.0, 1.0),
    "sets": (1.0, 0.0),
    "classes": (1.0, 1.0),
    "pixels": (None, None),   # the paper counts images, not pixels
    "chunk_images": (None, None),
    "workers": (None, None),
}

#: What the fused kernels should show (evaluate, merge).
EXPECTED = {
    "images": (1.0, 1.0),
    "sets": (1.0, 1.0),
    "classes": (0.0, 0.0),
    "pixels": (1.0, 1.0),
    "chunk_images": (0.0, 0.0),
    "workers": (-1.0, -1.0),
}

SWEEPS = ("images", "sets", "classes", "pixels", "chunk_images", "workers")


def _sizes(quick: bool) -> dict[str, Any]:
    if quick:
        return {"base": {"images": 16, "side": 32, "sets": 2, "classes": 21},
                "images": [8, 16], "sets": [1, 2], "classes": [2, 21], "side": [16, 32],
                "chunk_images": [1, 8], "workers": [1, 2]}
    # large enough that per-call overhead (graph building, opening stores) is small next to the work
    return {"base": {"images": 512, "side": 256, "sets": 4, "classes": 21},
            "images": [128, 256, 512, 1024, 2048], "sets": [1, 2, 4, 8, 16], "classes": [2, 6, 21, 61, 151],
            "side": [64, 128, 256, 512], "chunk_images": [1, 4, 16, 64, 128], "workers": [1, 2]}


def _steps(data: dict[str, Any], out: Path, repeat: int, workers: int | None = None) -> dict[str, float]:
    """Best-of-``repeat`` seconds of evaluate, select, merge (each step's own minimum)."""
    import dask

    from isle_fast.evaluate import evaluate
    from isle_fast.merge import merge
    from isle_fast.selection import select

    best = {"evaluate": np.inf, "select": np.inf, "merge": np.inf}
    cfg = {"scheduler": "threads"} if workers is None else {"scheduler": "threads", "num_workers": workers}
    with dask.config.set(cfg):
        for _ in range(repeat):
            t0 = time.perf_counter()
            ev = evaluate(data["sets"], data["gt"], backend="cpu", progress=False)
            t1 = time.perf_counter()
            select(ev)
            t2 = time.perf_counter()
            merge(data["sets"], data["gt"], str(out), evaluation=ev, backend="cpu", progress=False, overwrite=True)
            t3 = time.perf_counter()
            for k, v in (("evaluate", t1 - t0), ("select", t2 - t1), ("merge", t3 - t2)):
                best[k] = min(best[k], v)
    return best


def _in_memory(data: dict[str, Any], repeat: int) -> dict[str, float]:
    """Kernels alone and the references, on the data set loaded into memory."""
    from isle_fast.evaluate import evaluate
    from isle_fast.kernels import cpu as K
    from isle_fast.selection import select
    from isle_fast.store import open_stack

    gt = open_stack(data["gt"])
    sets = [open_stack(p) for p in data["sets"]]
    c = gt.num_classes
    g = np.asarray(gt.array[:])
    s = [np.asarray(x.array[:]) for x in sets]
    sel = select(evaluate(sets, gt, backend="cpu", progress=False))
    ks, pr = sel.kernel_selection(), sel.priority()
    imgs_gt = [gt.read_image(i) for i in range(gt.num_images)]
    imgs = [[x.read_image(i) for i in range(gt.num_images)] for x in sets]
    K.confusion_labels(g[:1], [a[:1] for a in s], c)
    K.merge_labels([a[:1] for a in s], ks, pr, K.SCORE)

    def best(fn) -> float:
        runs = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            runs.append(time.perf_counter() - t0)
        return min(runs)

    def ref_eval() -> None:
        h = np.zeros((len(s), c, c), np.int64)
        for j in range(len(imgs_gt)):
            for n in range(len(s)):
                h[n] += wsss_confusion(imgs_gt[j], imgs[n][j], c)

    def ref_merge() -> None:
        for j in range(len(imgs_gt)):
            numpy_merge_image([imgs[n][j] for n in range(len(s))], ks, pr, c)

    return {
        "kernel_confusion": best(lambda: K.confusion_labels(g, s, c)),
        "kernel_merge": best(lambda: K.merge_labels(s, ks, pr, K.SCORE)),
        "ref_bincount": best(ref_eval),
        "ref_numpy_merge": best(ref_merge),
    }


def _ingest(data: dict[str, Any], repeat: int, work: Path) -> dict[str, float]:
    """``ingest_labels`` of the gt from a PNG folder vs the plain PIL decode loop over the same files."""
    from isle_fast.ingest import ingest_labels

    from .common import export_pngs, read_png

    pngs = export_pngs({"gt": data["gt"]}, Path(data["root"]) / "png")
    folder = Path(pngs["folder"]) / "gt"
    files = sorted(folder.glob("*.png"))
    runs, ref = [], []
    for _ in range(repeat):
        t0 = time.perf_counter()
        ingest_labels(folder, work / "ingest.zarr", kind="gt", overwrite=True, quiet=True)
        runs.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        [read_png(f) for f in files]
        ref.append(time.perf_counter() - t0)
    return {"ingest": min(runs), "ref_pil_decode": min(ref)}


def _dataset(root: Path, images: int, side: int, sets: int, classes: int, chunk: int | None = None) -> dict:
    return make_label_stores(root, images, n_sets=sets, max_side=side, num_classes=classes, seed=11,
                             chunk_images=chunk)


def run_sweep(var: str, sizes: dict[str, Any], repeat: int, root: Path, work: Path) -> list[dict[str, Any]]:
    base = dict(sizes["base"])
    rows = []
    values = sizes["side"] if var == "pixels" else sizes[var]
    for v in values:
        cfg = dict(base)
        chunk = None
        workers = None
        if var == "images":
            cfg["images"] = v
        elif var == "sets":
            cfg["sets"] = v
        elif var == "classes":
            cfg["classes"] = v
        elif var == "pixels":
            cfg["side"] = v
        elif var == "chunk_images":
            chunk = v
        elif var == "workers":
            workers = v
        log(f"[scaling] {var} = {v}")
        data = _dataset(root, cfg["images"], cfg["side"], cfg["sets"], cfg["classes"], chunk)
        steps = _steps(data, work / "ens.zarr", repeat, workers)
        mem = _in_memory(data, repeat) if var not in ("chunk_images", "workers") else {}
        if var == "images":
            mem.update(_ingest(data, repeat, work))
        x = v * v * cfg["images"] if var == "pixels" else v
        rows.append({"variable": var, "value": v, "x": x, "images": cfg["images"], "side": cfg["side"],
                     "sets": cfg["sets"], "classes": cfg["classes"], "chunk_images": data["chunks"][0],
                     "workers": workers or 2, **steps, **mem})
    return rows


def fits(var: str, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    x = [r["x"] for r in rows]
    paper = PAPER[var]
    expect = EXPECTED[var]
    for key, label, pi in (("evaluate", "evaluate (stores)", 0), ("merge", "merge (stores)", 1),
                           ("kernel_confusion", "kernel confusion_labels", 0), ("kernel_merge", "kernel merge_labels", 1),
                           ("ref_bincount", "reference np.bincount loop", 0),
                           ("ingest", "ingest_labels (PNG folder -> store)", 0),
                           ("ref_pil_decode", "reference PIL decode loop", 0),
                           ("ref_numpy_merge", "reference NumPy Algorithm 3", 1)):
        if not all(key in r for r in rows):
            continue
        f = fit_exponent(x, [r[key] for r in rows])
        out.append({"variable": var, "series": label, "exponent": round(f["exponent"], 3), "r2": round(f["r2"], 3),
                    "paper": paper[pi], "expected": expect[pi]})
    return out


def main(argv: list[str] | None = None) -> int:
    p = bench_parser("scaling", __doc__.split("\n")[0])
    p.add_argument("--only", default=None, help=f"comma-separated sweeps: {', '.join(SWEEPS)}")
    args = p.parse_args(argv)
    quick = args.quick
    sweeps = [s.strip() for s in args.only.split(",")] if args.only else list(SWEEPS)
    bad = [s for s in sweeps if s not in SWEEPS]
    if bad:
        p.error(f"unknown sweep(s) {bad}; choose from {SWEEPS}")
    sizes = _sizes(quick)
    repeat = args.repeat or (1 if quick else 3)
    root = tmp_dir() / "scaling"
    work = root / "out"
    work.mkdir(parents=True, exist_ok=True)
    # warm-up: kernels compiled / loaded from the Numba cache
    _steps(_dataset(root, 4, 16, 2, 21), work / "warm.zarr", 1)

    all_rows: dict[str, list] = {}
    all_fits: list[dict] = []
    for var in sweeps:
        rows = run_sweep(var, sizes, repeat, root, work)
        all_rows[var] = rows
        f = fits(var, rows)
        all_fits += f
        cols = ["value", "evaluate", "select", "merge"] + [k for k in ("kernel_confusion", "kernel_merge",
                                                                       "ref_bincount", "ref_numpy_merge",
                                                                       "ingest", "ref_pil_decode")
                                                           if k in rows[0]]
        print(f"\nSweep over {var} (seconds, best of {repeat}; base: {sizes['base']})")
        print(format_table(rows, cols))
        xlabel = {"pixels": "pixels (images x side^2)", "chunk_images": "images per chunk"}.get(var, var)
        series = {lab: ([r["x"] for r in rows], [r[k] for r in rows]) for k, lab in
                  (("evaluate", "evaluate"), ("merge", "merge"), ("kernel_confusion", "kernel confusion"),
                   ("kernel_merge", "kernel merge"), ("ref_bincount", "ref bincount loop"),
                   ("ref_numpy_merge", "ref NumPy Alg. 3"), ("ingest", "ingest (PNG -> store)"),
                   ("ref_pil_decode", "ref PIL decode")) if k in rows[0]}
        plot_loglog(results_dir() / f"scaling_{var}.png", series, xlabel=xlabel,
                    title=f"isle-fast scaling over {var}")

    print("\nGrowth exponents (log-log slope) vs the paper's section 4.2 and what the fused kernels should show")
    print(format_table(all_fits))
    headline = []
    for f in all_fits:
        if f["series"] in ("evaluate (stores)", "merge (stores)", "kernel confusion_labels"):
            headline.append(headline_row(f"growth exponent of {f['series']} in {f['variable']}", None,
                                         exponent=f["exponent"], r2=f["r2"], paper=f["paper"],
                                         expected=f["expected"]))
    for var, rows in all_rows.items():
        if var == "sets" and "ref_bincount" in rows[-1]:
            r = rows[-1]
            headline.append(headline_row(f"evaluate kernel, {r['sets']} sets, {r['images']} images "
                                         f"{r['side']}px (in memory)", r["kernel_confusion"],
                                         "np.bincount loop", r["ref_bincount"]))
            headline.append(headline_row(f"merge kernel, {r['sets']} sets (in memory)", r["kernel_merge"],
                                         "NumPy Algorithm 3", r["ref_numpy_merge"]))
    path = write_json("scaling", {"sizes": sizes, "repeat": repeat, "sweeps": all_rows, "fits": all_fits,
                                  "paper_claim": "O(eval) + O(merger) = I x N x C + I x C (section 4.2)",
                                  "headline": headline}, quick=quick)
    print(f"\nwritten: {path} and scaling_*.png in {results_dir()}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
