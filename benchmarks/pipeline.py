"""VOC scale end to end: evaluate + select + merge over compressed Zarr stores on local disk.

``python -m benchmarks.pipeline [--quick] [--images N] [--max-side S] [--sets N]``

What it measures, all in one run:

1. **End to end at VOC scale** (default 10,582 images up to 500 x 500, 4
   pseudo-label sets + ground truth, synthetic label maps written straight
   into compressed stores and cached under ``benchmarks/results/tmp/``):
   ``isle_fast.ensemble.evaluate.evaluate`` -> ``isle_fast.ensemble.selection.select`` ->
   ``isle_fast.ensemble.merge.merge`` on the threaded scheduler, with the peak resident
   memory of the process tree sampled by a thread (psutil). Target < 60 s,
   memory bounded by the chunking (< 2 GiB whatever the data set size).
2. **References on the same data** (the first ``--ref-images`` images, copied
   into their own stores so ours and the references see exactly the same
   pixels): the evaluation loop of the public WSSS repositories (PIL decode of
   palette PNGs + masked ``np.bincount`` per image), the same bincount on
   arrays already in memory, torchmetrics' ``multiclass_confusion_matrix``
   (if installed), a plain NumPy Algorithm 3 merge (PIL decode, per-class loop,
   PNG encode) and SimpleITK ``LabelVoting`` (if installed; majority voting, a
   different and simpler ensemble, shown as a throughput yardstick). The
   reference counts and merged labels are checked EQUAL to ours.
3. **Dask**: the threaded scheduler vs a ``dask.distributed`` LocalCluster of
   1 and 2 worker processes; then out of core: a LocalCluster whose workers
   get ``--memory-limit`` each over a data set several times that size
   (it completes; peak memory of every process is reported).

Writes ``pipeline.json`` and ``pipeline.png`` to ``benchmarks/results/``.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .common import (
    PeakMemory,
    bench_parser,
    best_of,
    export_pngs,
    fmt_bytes,
    fmt_seconds,
    format_table,
    headline_row,
    log,
    make_label_stores,
    numpy_merge_image,
    read_png,
    results_dir,
    tmp_dir,
    write_json,
    wsss_confusion,
    wsss_evaluate_pngs,
)

VOC_TRAIN_AUG = 10582


# --------------------------------------------------------------------------------------
# our pipeline
# --------------------------------------------------------------------------------------
def run_pipeline(data: dict[str, Any], out: str | Path, backend: str = "cpu") -> dict[str, Any]:
    """evaluate -> select -> merge once; seconds of each step and the results."""
    from isle_fast.ensemble.evaluate import evaluate
    from isle_fast.ensemble.merge import merge
    from isle_fast.ensemble.selection import select

    t0 = time.perf_counter()
    ev = evaluate(data["sets"], data["gt"], backend=backend, progress=False)
    t1 = time.perf_counter()
    sel = select(ev)
    t2 = time.perf_counter()
    res = merge(data["sets"], data["gt"], str(out), evaluation=ev, backend=backend, progress=False,
                overwrite=True)
    t3 = time.perf_counter()
    return {"evaluate": t1 - t0, "select": t2 - t1, "merge": t3 - t2, "total": t3 - t0,
            "counts": ev.counts, "selection": sel, "ensemble": res.stack.path, "miou": ev.miou}


def best_steps(fn: Callable[[], dict[str, Any]], k: int) -> dict[str, Any]:
    """Run :func:`run_pipeline` ``k`` times; each step's best seconds, the last run's results."""
    res: dict[str, Any] = {}
    best: dict[str, float] = {}
    for _ in range(max(1, k)):
        res = fn()
        for step in ("evaluate", "select", "merge", "total"):
            best[step] = min(best.get(step, np.inf), res[step])
    return {**res, **best}


def subset_stores(data: dict[str, Any], k: int, folder: Path) -> dict[str, Any]:
    """The first ``k`` images of every store of ``data``, as stores of their own (cached)."""
    from isle_fast.stores.stack import create_stack, open_stack

    names = ["gt"] + [Path(p).stem for p in data["sets"]]
    paths = [data["gt"]] + list(data["sets"])
    out = {"gt": str(folder / "gt.zarr"), "sets": [str(folder / f"{n}.zarr") for n in names[1:]], "images": k}
    try:
        for p in [out["gt"], *out["sets"]]:
            open_stack(p)
        return out
    except Exception:
        shutil.rmtree(folder, ignore_errors=True)
    for name, src, dst in zip(names, paths, [out["gt"], *out["sets"]]):
        st = open_stack(src)
        with create_stack(dst, kind=st.kind, classes=st.classes, ids=st.ids[:k], shapes=st.shapes[:k],
                          name=name, padded_shape=st.padded_shape) as w:
            step = st.chunks[0]
            for start in range(0, k, step):
                w.write_block(start, np.asarray(st.array[start:min(k, start + step)]))
    return out


def ensemble_equal(a: str, b: str) -> bool:
    """Whether two label stores hold the same labels (chunk by chunk, bounded memory)."""
    import dask.array as da

    from isle_fast.stores.stack import open_stack

    x, y = open_stack(a), open_stack(b)
    if x.array.shape != y.array.shape:
        return False
    return bool(da.all(x.to_dask() == y.to_dask().rechunk(x.to_dask().chunks)).compute())


# --------------------------------------------------------------------------------------
# I/O choices: the direct chunk reader and the allocator setting, each on and off
# --------------------------------------------------------------------------------------
_IO_CHILD = r"""
import json, os, sys, time
import isle_fast.stores.stack as S
from isle_fast.backend import tune_allocator
from __PACKAGE__.pipeline import run_pipeline
if os.environ["ISLE_BENCH_DIRECT"] == "0":
    S._fast_chunk_spec = lambda array: None      # every read through dask.array.from_zarr
tune_allocator()                                # honours ISLE_TUNE_MALLOC, as the isle command does
data, warm, out = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
run_pipeline(warm, out)                         # warm-up: kernels from the Numba cache
from isle_fast.ensemble.evaluate import evaluate
from isle_fast.ensemble.merge import merge
t0, c0 = time.perf_counter(), time.process_time()
ev = evaluate(data["sets"], data["gt"], backend="cpu", progress=False)
t1, c1 = time.perf_counter(), time.process_time()
merge(data["sets"], data["gt"], out, evaluation=ev, backend="cpu", progress=False, overwrite=True)
t2, c2 = time.perf_counter(), time.process_time()
print(json.dumps({"evaluate_s": t1 - t0, "merge_s": t2 - t1, "evaluate_cpu_s": c1 - c0, "merge_cpu_s": c2 - c1}))
"""


def io_choices(data: dict[str, Any], warm: dict[str, Any], work: Path) -> list[dict[str, Any]]:
    """Wall and process CPU seconds of evaluate + merge on ``data`` with the direct chunk reader and
    the allocator setting each on and off (a fresh process per combination: the allocator is
    process-wide; ``warm`` loads the kernels first)."""
    import json
    import subprocess
    import sys

    rows = []
    for direct, tuned in ((True, True), (False, True), (True, False), (False, False)):
        env = dict(os.environ, ISLE_BENCH_DIRECT="1" if direct else "0", ISLE_TUNE_MALLOC="1" if tuned else "0")
        # the package is benchmarks (checkout) or isle_fast_benchmarks (installed)
        child = _IO_CHILD.replace("__PACKAGE__", __package__ or "benchmarks")
        proc = subprocess.run([sys.executable, "-c", child, json.dumps(data, default=str),
                               json.dumps(warm, default=str), str(work / "io-ensemble.zarr")],
                              env=env, cwd=str(Path(__file__).resolve().parent.parent),
                              capture_output=True, text=True, check=True)
        t = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append({"chunk_reads": "direct" if direct else "zarr", "allocator": "tuned" if tuned else "glibc default",
                     **t, "total_s": t["evaluate_s"] + t["merge_s"],
                     "total_cpu_s": t["evaluate_cpu_s"] + t["merge_cpu_s"]})
    for r in rows:
        r["wall_over_default"] = r["total_s"] / rows[0]["total_s"]
    return rows


# --------------------------------------------------------------------------------------
# references
# --------------------------------------------------------------------------------------
def references(sub: dict[str, Any], ours: dict[str, Any], repeat: int) -> tuple[list[dict], dict[str, Any]]:
    """Time the reference implementations on the subset; check they agree with ours."""
    from isle_fast.stores.stack import open_stack

    gt = open_stack(sub["gt"])
    names = [Path(p).stem for p in sub["sets"]]
    c = gt.num_classes
    pngs = export_pngs({"gt": sub["gt"], **dict(zip(names, sub["sets"]))}, Path(sub["gt"]).parent / "png")
    ids = pngs["ids"]
    folder = Path(pngs["folder"])
    rows: list[dict] = []
    checks: dict[str, Any] = {}

    # arrays in memory (for the in-memory references)
    gts = [read_png(folder / "gt" / f"{i}.png") for i in ids]
    preds = [[read_png(folder / n / f"{i}.png") for i in ids] for n in names]

    # evaluation: public loop with PIL decode
    t = best_of(lambda: wsss_evaluate_pngs(folder, ids, names, c), k=repeat, warmup=0)
    ref_counts = t.value
    checks["wsss_counts_equal"] = bool(np.array_equal(ref_counts, ours["counts"][:, :, :c])
                                       and not ours["counts"][:, :, c].any())
    rows.append({"step": "evaluate", "implementation": "public WSSS loop: PIL decode + np.bincount",
                 "seconds": t.best})

    def inmem() -> np.ndarray:
        h = np.zeros((len(names), c, c), np.int64)
        for j in range(len(ids)):
            for n in range(len(names)):
                h[n] += wsss_confusion(gts[j], preds[n][j], c)
        return h

    t = best_of(inmem, k=repeat, warmup=0)
    rows.append({"step": "evaluate", "implementation": "np.bincount, arrays already in memory", "seconds": t.best})

    try:
        import torch
        from torchmetrics.functional.classification import multiclass_confusion_matrix

        tg = [torch.from_numpy(g) for g in gts]            # uint8, zero copy (torchmetrics takes it)
        tp = [[torch.from_numpy(p) for p in pp] for pp in preds]

        def tm() -> np.ndarray:
            h = np.zeros((len(names), c, c), np.int64)
            for j in range(len(ids)):
                for n in range(len(names)):
                    h[n] += multiclass_confusion_matrix(tp[n][j], tg[j], num_classes=c, ignore_index=255,
                                                        validate_args=False).numpy()
            return h

        t = best_of(tm, k=repeat, warmup=0)
        checks["torchmetrics_counts_equal"] = bool(np.array_equal(t.value, ref_counts))
        rows.append({"step": "evaluate", "implementation": "torchmetrics multiclass_confusion_matrix, in memory",
                     "seconds": t.best})
    except ImportError:
        rows.append({"step": "evaluate", "implementation": "torchmetrics (not installed: skipped)", "seconds": None})

    # merge: plain NumPy Algorithm 3, PNG in and out
    sel = ours["selection"]
    kernel_sel = sel.kernel_selection()
    priority = sel.priority()
    out_dir = folder.parent / "ref-merge"
    out_dir.mkdir(exist_ok=True)

    def np_merge_pngs() -> list[np.ndarray]:
        from PIL import Image

        merged = []
        for i in ids:
            p = [read_png(folder / n / f"{i}.png") for n in names]
            m = numpy_merge_image(p, kernel_sel, priority, c)
            Image.fromarray(m, mode="P").save(out_dir / f"{i}.png")
            merged.append(m)
        return merged

    t = best_of(np_merge_pngs, k=repeat, warmup=0)
    ens = open_stack(ours["ensemble"])
    checks["numpy_merge_equal"] = bool(all(np.array_equal(m, ens.read_image(j)) for j, m in enumerate(t.value)))
    rows.append({"step": "merge", "implementation": "NumPy Algorithm 3: PIL decode + per-class loop + PNG encode",
                 "seconds": t.best})
    t = best_of(lambda: [numpy_merge_image([preds[n][j] for n in range(len(names))], kernel_sel, priority, c)
                         for j in range(len(ids))], k=repeat, warmup=0)
    rows.append({"step": "merge", "implementation": "NumPy Algorithm 3, arrays in memory", "seconds": t.best})
    try:
        import SimpleITK as sitk

        def vote() -> None:
            for j in range(len(ids)):
                sitk.LabelVoting([sitk.GetImageFromArray(preds[n][j]) for n in range(len(names))], 255)

        t = best_of(vote, k=repeat, warmup=0)
        rows.append({"step": "merge", "implementation": "SimpleITK LabelVoting (majority vote), in memory",
                     "seconds": t.best})
    except ImportError:
        rows.append({"step": "merge", "implementation": "SimpleITK LabelVoting (not installed: skipped)",
                     "seconds": None})
    return rows, checks


# --------------------------------------------------------------------------------------
# dask
# --------------------------------------------------------------------------------------
def with_cluster(n_workers: int, threads: int, memory_limit: str | None, fn: Callable[[], Any],
                 warm: Callable[[], Any]) -> tuple[Any, PeakMemory]:
    """Run ``fn`` on a fresh LocalCluster (process workers) after ``warm`` (untimed, loads the kernels)."""
    from dask.distributed import Client, LocalCluster

    kw: dict[str, Any] = {"n_workers": n_workers, "threads_per_worker": threads, "processes": True,
                          "dashboard_address": ":0"}
    if memory_limit:
        kw["memory_limit"] = memory_limit
    with LocalCluster(**kw) as cluster, Client(cluster) as client:
        from isle_fast.backend import tune_allocator

        client.run(tune_allocator)  # on the workers, as the isle command does for itself
        warm()
        with PeakMemory() as pm:
            t0 = time.perf_counter()
            value = fn()
            value = (value, time.perf_counter() - t0)
    return value, pm


def main(argv: list[str] | None = None) -> int:
    p = bench_parser("pipeline", __doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=None, help=f"images (default {VOC_TRAIN_AUG}; quick 200)")
    p.add_argument("--max-side", type=int, default=None, help="largest image side (default 500; quick 64)")
    p.add_argument("--sets", type=int, default=4, help="pseudo-label sets (default 4)")
    p.add_argument("--ref-images", type=int, default=None,
                   help="images the references and ours are timed on side by side (default 500; quick 50)")
    p.add_argument("--memory-limit", default=None, help="per-worker memory limit of the out-of-core run "
                   "(default 1GiB; quick 600MiB)")
    p.add_argument("--no-dask", action="store_true", help="skip the dask.distributed comparison")
    args = p.parse_args(argv)
    quick = args.quick
    n_img = args.images or (200 if quick else VOC_TRAIN_AUG)
    side = args.max_side or (64 if quick else 500)
    k_ref = min(n_img, args.ref_images or (50 if quick else 500))
    repeat = args.repeat or (1 if not quick else 1)
    mem_limit = args.memory_limit or ("600MiB" if quick else "1GiB")
    root = tmp_dir()
    from isle_fast.backend import tune_allocator

    tuned = tune_allocator()  # what the isle command does at start (ISLE_TUNE_MALLOC=0 to compare)
    log(f"[pipeline] allocator tuned: {tuned}")

    log(f"[pipeline] data: {n_img} images up to {side}x{side}, {args.sets} sets + gt (cached in {root})")
    data = make_label_stores(root, n_img, n_sets=args.sets, max_side=side, seed=0)
    log(f"[pipeline] data {'generated' if data['generated'] else 'reused'} in {data['seconds']:.1f} s: "
        f"{fmt_bytes(data['raw_bytes'])} raw, {fmt_bytes(data['stored_bytes'])} stored")
    tiny = make_label_stores(root, 8, n_sets=args.sets, max_side=32, seed=1)
    work = root / "pipeline-out"
    work.mkdir(exist_ok=True)

    # 0. warm up: kernels compiled / loaded from the Numba cache before timing
    run_pipeline(tiny, work / "warm.zarr")

    # 1. end to end, threaded scheduler
    log("[pipeline] end to end (threaded scheduler)")
    with PeakMemory() as pm:
        main_run = best_steps(lambda: run_pipeline(data, work / "ensemble.zarr"), repeat)
    e2e = {k: main_run[k] for k in ("evaluate", "select", "merge", "total")}
    e2e.update({"peak_rss": pm.peak, "baseline_rss": pm.baseline, "raw_bytes": data["raw_bytes"],
                "stored_bytes": data["stored_bytes"], "images": n_img, "max_side": side, "sets": args.sets,
                "chunks": data["chunks"],
                "padded_pixels_per_second": data["raw_bytes"] / (args.sets + 1) / e2e["total"]})
    e2e_rows = [{"step": k, "seconds": e2e[k]} for k in ("evaluate", "select", "merge", "total")]
    print(f"\nEnd to end, {n_img} images up to {side}x{side}, {args.sets} sets + gt "
          f"({fmt_bytes(data['raw_bytes'])} raw, {fmt_bytes(data['stored_bytes'])} compressed), threaded scheduler")
    print(format_table(e2e_rows))
    print(f"peak RSS {fmt_bytes(pm.peak)} (process at start {fmt_bytes(pm.baseline)}); "
          f"target < 60 s: {'met' if e2e['total'] < 60 else 'MISSED'}; memory < 2 GiB: "
          f"{'met' if pm.peak < 2 * 2**30 else 'MISSED'}")

    # 2. dask (before the references: they grow this process's heap)
    dask_rows: list[dict] = []
    ooc: dict[str, Any] = {}
    if not args.no_dask:
        log("[pipeline] dask: threaded vs LocalCluster(1), LocalCluster(2)")
        dask_rows.append({"scheduler": "threaded (2 threads)", "seconds": e2e["total"], "peak_rss": pm.peak,
                          "peak_rss_worker": None, "peak_rss_client": pm.peak_self, "counts_equal": True})
        for nw, th in (() if quick else ((1, 2), (2, 1))):
            (res, secs), pmc = with_cluster(nw, th, None, lambda: run_pipeline(data, work / "cluster.zarr"),
                                            lambda: run_pipeline(tiny, work / "warm.zarr"))
            dask_rows.append({"scheduler": f"distributed LocalCluster {nw} worker(s) x {th} thread(s)",
                              "seconds": secs, "peak_rss": pmc.peak, "peak_rss_worker": pmc.peak_child,
                              "peak_rss_client": pmc.peak_self,
                              "counts_equal": bool(np.array_equal(res["counts"], main_run["counts"]))})
        log(f"[pipeline] out of core: 2 workers x {mem_limit}")
        (res, secs), pmc = with_cluster(2, 1, mem_limit, lambda: run_pipeline(data, work / "ooc.zarr"),
                                        lambda: run_pipeline(tiny, work / "warm.zarr"))
        from dask.utils import parse_bytes

        limit = parse_bytes(mem_limit)
        ooc = {"memory_limit_per_worker": limit, "workers": 2, "raw_bytes": data["raw_bytes"],
               "data_over_limit": data["raw_bytes"] / limit, "seconds": secs, "peak_rss_tree": pmc.peak,
               "peak_rss_worker": pmc.peak_child,
               "counts_equal": bool(np.array_equal(res["counts"], main_run["counts"])),
               "ensemble_equal": ensemble_equal(res["ensemble"], main_run["ensemble"])}
        dask_rows.append({"scheduler": f"distributed 2 workers x 1 thread, memory_limit {mem_limit} each",
                          "seconds": secs, "peak_rss": pmc.peak, "peak_rss_worker": pmc.peak_child,
                          "peak_rss_client": pmc.peak_self, "counts_equal": ooc["counts_equal"]})
        print(f"\nDask schedulers, evaluate + select + merge, {n_img} images (peak_rss: whole process tree; "
              f"peak_rss_worker: the largest worker process; peak_rss_client: this process, scheduler included)")
        print(format_table([{**r, "peak_rss": fmt_bytes(r["peak_rss"]),
                             "peak_rss_worker": fmt_bytes(r.get("peak_rss_worker")),
                             "peak_rss_client": fmt_bytes(r.get("peak_rss_client"))} for r in dask_rows],
                           ["scheduler", "seconds", "peak_rss", "peak_rss_worker", "peak_rss_client",
                            "counts_equal"]))
        print(f"out of core: data {fmt_bytes(data['raw_bytes'])} raw = {ooc['data_over_limit']:.1f}x the "
              f"{mem_limit} per-worker limit; completed in {fmt_seconds(secs)}, largest worker peak "
              f"{fmt_bytes(pmc.peak_child)}; counts equal "
              f"{ooc['counts_equal']}, ensemble equal {ooc['ensemble_equal']}")

    # 3. references on the same data
    log(f"[pipeline] references on the first {k_ref} images")
    sub = subset_stores(data, k_ref, root / f"subset-{Path(data['root']).name}-{k_ref}")
    ours_sub = best_steps(lambda: run_pipeline(sub, work / "subset-ensemble.zarr"), 3)
    ref_rows, checks = references(sub, ours_sub, repeat)
    steps = {"evaluate": ours_sub["evaluate"], "merge": ours_sub["merge"]}
    table = []
    for r in ref_rows:
        ours_s = steps[r["step"]]
        table.append({"step": r["step"], "reference": r["implementation"], "reference_s": r["seconds"],
                      "isle_fast_s": ours_s,
                      "speedup": (r["seconds"] / ours_s) if r["seconds"] else None})
    print(f"\nReferences vs isle-fast on the same {k_ref} images ({args.sets} sets; isle-fast reads compressed "
          f"Zarr, runs Dask + Numba; merge includes writing the ensemble store)")
    print(format_table(table))
    print("checks: " + ", ".join(f"{k}={v}" for k, v in checks.items()))

    # 4. the I/O choices, each on and off, end to end on the whole data set
    log("[pipeline] chunk reader and allocator, each on and off")
    io_rows = io_choices(data, tiny, work)
    print(f"\nevaluate + merge, {n_img} images, threaded scheduler, a fresh process each: direct chunk reads "
          "vs Zarr's read path, tuned allocator vs glibc's defaults (wall and process CPU seconds)")
    print(format_table(io_rows, ["chunk_reads", "allocator", "evaluate_s", "merge_s", "total_s", "total_cpu_s",
                                 "wall_over_default"]))

    headline = [
        headline_row(f"evaluate+select+merge, {n_img} images <= {side}px, {args.sets} sets (threaded)",
                     e2e["total"], peak_rss_mib=round(pm.peak / 2**20)),
    ]
    for r in table:
        if r["reference_s"]:
            headline.append(headline_row(f"{r['step']}, {k_ref} images", r["isle_fast_s"], r["reference"],
                                         r["reference_s"]))
    for r in dask_rows[1:]:
        headline.append(headline_row(f"end to end on {r['scheduler']}", r["seconds"], "threaded scheduler",
                                     e2e["total"], peak_rss_mib=round(r["peak_rss"] / 2**20)))
    path = write_json("pipeline", {"end_to_end": e2e, "references": table, "reference_images": k_ref,
                                   "checks": checks, "dask": dask_rows, "out_of_core": ooc,
                                   "allocator_tuned": tuned, "io_choices": io_rows,
                                   "data": {k: v for k, v in data.items() if k != "classes"},
                                   "headline": headline}, quick=quick)
    _plot(results_dir() / "pipeline.png", table, k_ref)
    print(f"\nwritten: {path}, {results_dir() / 'pipeline.png'}")
    shutil.rmtree(work, ignore_errors=True)
    ok = all(checks.values()) and (not ooc or (ooc["counts_equal"] and ooc["ensemble_equal"]))
    return 0 if ok else 1


def _plot(path: Path, table: list[dict], k: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in table if r["reference_s"]]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(rows) + 1.8), dpi=110)
    labels, vals, colors = [], [], []
    for step in ("evaluate", "merge"):
        sub = [r for r in rows if r["step"] == step]
        if not sub:
            continue
        labels.append(f"isle-fast {step}")
        vals.append(sub[0]["isle_fast_s"])
        colors.append("tab:green")
        for r in sub:
            labels.append(r["reference"])
            vals.append(r["reference_s"])
            colors.append("tab:gray")
    ax.barh(range(len(vals)), vals, color=colors)
    ax.set_yticks(range(len(vals)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel(f"seconds for {k} images (log scale)")
    ax.set_title("isle-fast vs reference implementations, same data", fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(".pipeline.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


if __name__ == "__main__":
    raise SystemExit(main())
