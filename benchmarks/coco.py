"""COCO scale: evaluate + select + merge over 82,081 images of 81 classes, threaded and on a cluster.

``python -m benchmarks.coco [--quick] [--images N] [--max-side S] [--sets N] [--chunk-images K] [--no-cluster]``

The WSSS COCO benchmark trains on the 82,081 images of COCO 2014 train (about 640 x 480, 80 object
classes + background). This benchmark makes a synthetic data set of that size (4 pseudo-label sets +
ground truth, 81 classes, image shapes (0.66..1) x 640 by 640: the same generator as the VOC-scale
pipeline benchmark, :func:`benchmarks.common.make_label_stores`, made once and cached under
``benchmarks/results/tmp/``; ``--images`` scales it down, and the size used is printed and written)
and measures, in one run:

1. **Threaded**: :func:`benchmarks.pipeline.run_pipeline` (evaluate -> select -> merge, the
   ensemble store written) on Dask's threaded scheduler, with the peak resident memory of the
   process. Targets: under 3 minutes on this 2-core machine, peak under 2 GiB.
2. **Cluster workers sweep**: the same on a ``dask.distributed`` cluster of 1 and of 2 worker
   processes (1 thread each; ``LocalCluster``, the same worker processes ``dask worker`` starts),
   the peak resident memory of every worker process (the largest is reported), the counts and the
   ensemble checked equal to the threaded run's.
3. **Projection** (a model, not a measurement): the fixed cost of a run on the cluster (the same
   pipeline on 8 tiny images: opening stores, building graphs, committing) and the cost per chunk
   task (the 1-worker run minus the fixed cost, over its chunk tasks) give
   ``T(N) = fixed + per_chunk x ceil(chunks / N)`` for N workers, at the size measured and scaled to
   82,081 images. The 2-worker measurement is printed next to the model's T(2) to show how well it
   holds here: on this machine the scheduler, the client and both workers share 2 cores, so T(2)
   measured includes that contention, which a cluster with a core per worker does not have. The
   model assumes the storage keeps up with N workers (a shared file system or object store that
   scales); it is an upper bound on the speed-up for that reason.

Writes ``coco.json`` (and prints the tables).
"""

from __future__ import annotations

import math
import shutil
import time
from typing import Any

import numpy as np

from .common import (
    PeakMemory,
    bench_parser,
    fmt_bytes,
    format_table,
    headline_row,
    log,
    make_label_stores,
    tmp_dir,
    write_json,
)
from .pipeline import ensemble_equal, run_pipeline, with_cluster

COCO_TRAIN = 82081
COCO_CLASSES = 81
COCO_SIDE = 640


def _chunk_tasks(data: dict[str, Any]) -> int:
    """Chunk tasks of one pass (the gt's chunks: every set is chunked like it)."""
    k = int(data["chunks"][0])
    return math.ceil(int(data["images"]) / k)


def projection(fixed: float, per_chunk: float, chunks: int, workers: list[int]) -> list[dict[str, Any]]:
    """``T(N) = fixed + per_chunk * ceil(chunks / N)`` for each N in ``workers``."""
    return [{"workers": n, "seconds": fixed + per_chunk * math.ceil(chunks / n)} for n in workers]


def main(argv: list[str] | None = None) -> int:
    p = bench_parser("coco", __doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=None, help=f"images (default {COCO_TRAIN}; quick 120)")
    p.add_argument("--max-side", type=int, default=None, help=f"largest side (default {COCO_SIDE}; quick 96)")
    p.add_argument("--sets", type=int, default=4, help="pseudo-label sets (default 4)")
    p.add_argument("--chunk-images", type=int, default=None,
                   help="images per chunk (default: the stores' default, ~8 MiB chunks; quick 16)")
    p.add_argument("--no-cluster", action="store_true", help="threaded only (no workers sweep, no projection)")
    args = p.parse_args(argv)
    quick = args.quick
    n_img = args.images or (120 if quick else COCO_TRAIN)
    side = args.max_side or (96 if quick else COCO_SIDE)
    root = tmp_dir()
    free = shutil.disk_usage(root).free
    from isle_fast.backend import tune_allocator

    tune_allocator()
    log(f"[coco] data: {n_img:,} images up to {side}x{side}, {COCO_CLASSES} classes, {args.sets} sets + gt "
        f"(cached in {root}; {fmt_bytes(free)} free there)")
    k = args.chunk_images or (16 if quick else None)
    data = make_label_stores(root, n_img, n_sets=args.sets, max_side=side, num_classes=COCO_CLASSES, seed=15,
                             chunk_images=k)
    log(f"[coco] data {'generated' if data['generated'] else 'reused'} in {data['seconds']:.1f} s: "
        f"{fmt_bytes(data['raw_bytes'])} raw, {fmt_bytes(data['stored_bytes'])} stored")
    tiny = make_label_stores(root, 8, n_sets=args.sets, max_side=32, num_classes=COCO_CLASSES, seed=1)
    work = root / "coco-out"
    work.mkdir(exist_ok=True)
    chunks = _chunk_tasks(data)

    run_pipeline(tiny, work / "warm.zarr")   # kernels compiled / loaded before timing
    log("[coco] threaded scheduler")
    with PeakMemory() as pm:
        ref = run_pipeline(data, work / "threaded.zarr")
    threaded = {k: ref[k] for k in ("evaluate", "select", "merge", "total")}
    threaded.update({"peak_rss": pm.peak, "baseline_rss": pm.baseline})
    print(f"\nCOCO scale: {n_img:,} images up to {side}x{side} ({n_img / COCO_TRAIN:.1%} of COCO train), "
          f"{COCO_CLASSES} classes, {args.sets} sets + gt, {chunks} chunk tasks per pass "
          f"({fmt_bytes(data['raw_bytes'])} raw, {fmt_bytes(data['stored_bytes'])} stored)")
    print(format_table([{"step": k, "seconds": threaded[k]} for k in ("evaluate", "select", "merge", "total")]))
    print(f"threaded: peak RSS {fmt_bytes(pm.peak)}; target < 3 min: "
          f"{'met' if threaded['total'] < 180 else 'MISSED'}{'' if n_img == COCO_TRAIN else ' (at this size)'}; "
          f"< 2 GiB: {'met' if pm.peak < 2 * 2**30 else 'MISSED'}")

    sweep: list[dict[str, Any]] = []
    model: dict[str, Any] = {}
    if not args.no_cluster:
        fixed_runs = []
        for nw in (1, 2):
            log(f"[coco] cluster: {nw} worker process(es) x 1 thread")

            def timed_tiny() -> float:
                t0 = time.perf_counter()
                run_pipeline(tiny, work / "tiny.zarr")
                return time.perf_counter() - t0

            def both() -> tuple[dict[str, Any], float]:
                fixed = min(timed_tiny() for _ in range(2))   # the cost of a run that has almost no chunks
                return run_pipeline(data, work / f"cluster{nw}.zarr"), fixed

            ((res, fixed), secs), pmc = with_cluster(nw, 1, None, both,
                                                     lambda: run_pipeline(tiny, work / "warm.zarr"))
            fixed_runs.append(fixed)
            sweep.append({"workers": nw, "seconds": res["total"], "evaluate": res["evaluate"],
                          "merge": res["merge"], "peak_rss_worker": pmc.peak_child,
                          "peak_rss_client": pmc.peak_self, "fixed_seconds": fixed,
                          "counts_equal": bool(np.array_equal(res["counts"], ref["counts"])),
                          "ensemble_equal": ensemble_equal(res["ensemble"], ref["ensemble"])})
        print("\nOn a dask.distributed cluster (worker processes, 1 thread each; peak_rss_worker: the largest "
              "worker process; this machine's 2 cores are shared by the client, the scheduler and the workers)")
        print(format_table([{**r, "peak_rss_worker": fmt_bytes(r["peak_rss_worker"]),
                             "peak_rss_client": fmt_bytes(r["peak_rss_client"])} for r in sweep],
                           ["workers", "seconds", "evaluate", "merge", "fixed_seconds", "peak_rss_worker",
                            "peak_rss_client", "counts_equal", "ensemble_equal"]))
        fixed = fixed_runs[0]
        per_chunk = max(0.0, (sweep[0]["seconds"] - fixed) / chunks)
        full_chunks = math.ceil(chunks * COCO_TRAIN / n_img)
        ns = [1, 2, 4, 8, 16, 32, 64]
        model = {"fixed_seconds": fixed, "per_chunk_seconds": per_chunk, "chunks": chunks,
                 "full_chunks": full_chunks,
                 "formula": "T(N) = fixed + per_chunk * ceil(chunks / N)",
                 "at_measured_size": projection(fixed, per_chunk, chunks, ns),
                 "at_coco_size": projection(fixed, per_chunk, full_chunks, ns),
                 "model_T2_vs_measured": {"model": fixed + per_chunk * math.ceil(chunks / 2),
                                          "measured": sweep[1]["seconds"]}}
        rows = [{"workers": a["workers"], f"T at {n_img:,} images": a["seconds"],
                 f"T at {COCO_TRAIN:,} images": b["seconds"]}
                for a, b in zip(model["at_measured_size"], model["at_coco_size"])]
        print(f"\nPROJECTION (a model from this run, not a measurement): T(N) = {fixed:.2f} s fixed + "
              f"{per_chunk * 1000:.1f} ms per chunk task x ceil(chunks / N); {chunks} chunks measured, "
              f"{full_chunks} at COCO size; assumes a core per worker and storage that keeps up")
        print(format_table(rows))
        if per_chunk == 0.0:
            print("(the 1-worker run took no longer than the fixed cost: too small a size for a projection)")
        print(f"model T(2) {model['model_T2_vs_measured']['model']:.2f} s vs measured "
              f"{sweep[1]['seconds']:.2f} s (the difference: 2 workers + scheduler + client on 2 cores)")

    headline = [headline_row(f"COCO-scale evaluate+select+merge, {n_img:,} images <= {side}px, "
                             f"{COCO_CLASSES} classes, {args.sets} sets (threaded)", threaded["total"],
                             peak_rss_mib=round(pm.peak / 2**20))]
    for r in sweep:
        headline.append(headline_row(f"COCO-scale on {r['workers']} dask worker(s)", r["seconds"],
                                     "threaded scheduler", threaded["total"],
                                     peak_rss_worker_mib=round(r["peak_rss_worker"] / 2**20)))
    path = write_json("coco", {"images": n_img, "coco_images": COCO_TRAIN, "max_side": side,
                               "classes": COCO_CLASSES, "sets": args.sets, "chunks": data["chunks"],
                               "raw_bytes": data["raw_bytes"], "stored_bytes": data["stored_bytes"],
                               "disk_free_bytes": free, "threaded": threaded, "cluster": sweep,
                               "projection": model, "headline": headline}, quick=quick)
    print(f"\nwritten: {path}")
    shutil.rmtree(work, ignore_errors=True)
    ok = all(r["counts_equal"] and r["ensemble_equal"] for r in sweep)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
