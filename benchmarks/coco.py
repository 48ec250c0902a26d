"""COCO scale: evaluate + select + merge over 82,081 images of 81 classes, threaded and on a cluster.

``python -m benchmarks.coco [--quick] [--voc] [--images N] [--max-side S] [--classes C] [--sets N]
[--chunk-images K] [--no-cluster]``

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
   processes, started as a user starts them (``dask scheduler`` and ``dask worker ADDRESS
   --nworkers 1 --nthreads 1``, loopback only, free ports); this process is the client. The peak
   resident memory of every worker process (the largest is reported), the counts and the ensemble
   checked equal to the threaded run's, and the **CPU seconds of every process** during the run
   (psutil): the client (this process, less the memory sampler's thread), the scheduler, the
   nannies (the ``dask worker`` processes) and the workers. The **overhead** of the cluster is the
   CPU seconds of all of them beyond the threaded run's (which does the same planning and the same
   chunk work in one process); the **contention** is the rest of the gap to the threaded wall
   time: on this 2-core machine every process shares the same 2 cores (with whatever else runs),
   so ``sum of CPU seconds / 2`` is a floor for the wall time, printed next to it.
3. **Projection** (a model, not a measurement): the fixed cost of a run on the cluster (the same
   pipeline on 8 tiny images: opening stores, building graphs, committing) and the cost per chunk
   task (the 1-worker run minus the fixed cost, over its chunk tasks) give
   ``T(N) = fixed + per_chunk x ceil(chunks / N)`` for N workers, at the size measured and scaled to
   82,081 images. The 2-worker measurement is printed next to the model's T(2) to show how well it
   holds here: on this machine the scheduler, the client and both workers share 2 cores, so T(2)
   measured includes that contention, which a cluster with a core per worker does not have. The
   model assumes the storage keeps up with N workers (a shared file system or object store that
   scales); it is an upper bound on the speed-up for that reason.

``--voc`` is the cluster-overhead measurement at VOC scale instead: 10,582 images up to 500 px,
21 classes, 4 sets (``--images`` etc. still override), written to ``coco_voc.json``.

Writes ``coco.json`` (and prints the tables).
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

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
from .pipeline import VOC_TRAIN_AUG, ensemble_equal, run_pipeline

COCO_TRAIN = 82081
COCO_CLASSES = 81
COCO_SIDE = 640
VOC_CLASSES = 21
VOC_SIDE = 500


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ProcessCluster:
    """``dask scheduler`` + ``n`` x ``dask worker ADDRESS --nworkers 1 --nthreads 1`` as processes here.

    The scheduler and the workers listen on 127.0.0.1 only. :meth:`cpu` gives the CPU seconds
    (user + system) each role has used so far; the processes are killed (with their process
    groups) when the block ends, whatever happened.
    """

    def __init__(self, workers: int, log: Path):
        self.n = workers
        self.address = f"tcp://127.0.0.1:{_free_port()}"
        self.log = log
        self.procs: list[subprocess.Popen] = []

    def _start(self, cmd: list[str]) -> subprocess.Popen:
        env = dict(os.environ, ISLE_PROGRESS="0", DASK_DISTRIBUTED__WORKER__DAEMON="False")
        env.pop("DASK_SCHEDULER_ADDRESS", None)
        with open(self.log, "ab") as out:
            p = subprocess.Popen(cmd, env=env, stdout=out, stderr=out, start_new_session=True)
        self.procs.append(p)
        return p

    def __enter__(self) -> "ProcessCluster":
        from distributed import Client

        port = self.address.rsplit(":", 1)[1]
        try:
            self._start([sys.executable, "-m", "dask", "scheduler", "--host", "127.0.0.1", "--port", port,
                         "--no-dashboard"])
            for _ in range(self.n):
                self._start([sys.executable, "-m", "dask", "worker", self.address, "--nworkers", "1",
                             "--nthreads", "1", "--host", "127.0.0.1", "--no-dashboard"])
            with Client(self.address, timeout=60) as c:
                c.wait_for_workers(self.n, timeout=120)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def stop(self) -> None:
        import signal

        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.pid, signal.SIGKILL)
            p.wait()

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far of the scheduler, the nannies (the ``dask worker`` processes) and the
        workers (their children)."""
        import psutil

        def secs(proc: Any) -> float:
            try:
                t = proc.cpu_times()
            except psutil.NoSuchProcess:
                return 0.0
            return float(t.user + t.system)

        sched = psutil.Process(self.procs[0].pid)
        nannies = [psutil.Process(p.pid) for p in self.procs[1:]]
        kids = [c for n in nannies for c in n.children(recursive=True)]
        return {"scheduler": secs(sched), "nannies": sum(secs(n) for n in nannies),
                "workers": sum(secs(c) for c in kids)}


def _client_cpu() -> float:
    """CPU seconds (user + system) of this process, every thread (the client's event loop too)."""
    t = os.times()
    return t.user + t.system


class _SampledPeak(PeakMemory):
    """:class:`PeakMemory` that also keeps its sampling thread's CPU seconds (``sampler_cpu``), so that
    they can be left out of the client's."""

    sampler_cpu = 0.0

    def _sample(self) -> None:
        try:
            super()._sample()
        finally:
            self.sampler_cpu = time.thread_time()


def on_cluster(n_workers: int, log: Path, fn: Callable[[], Any], warm: Callable[[], Any], idle: float = 5.0
               ) -> tuple[Any, float, dict[str, float], dict[str, float], PeakMemory, str]:
    """Run ``fn`` (timed) with a client on a fresh :class:`ProcessCluster` after ``warm`` (untimed).

    Returns ``(value, seconds, cpu seconds by role during fn, cpu seconds per second by role while
    the cluster sat idle for ``idle`` seconds before fn, peak memory, cluster description)``.
    """
    from distributed import Client

    from isle_fast.backend import tune_allocator
    from isle_fast.cluster import describe_cluster

    with ProcessCluster(n_workers, log) as cluster, Client(cluster.address, timeout=60) as client:
        client.run(tune_allocator)  # on the workers, as the isle command does for itself
        warm()
        what = describe_cluster(client)
        i0 = cluster.cpu()
        time.sleep(idle)    # what the scheduler, nannies and workers spend doing nothing (heartbeats, monitors)
        i1 = cluster.cpu()
        c0, k0 = _client_cpu(), cluster.cpu()
        with _SampledPeak(interval=0.1) as pm:
            t0 = time.perf_counter()
            value = fn()
            secs = time.perf_counter() - t0
        c1, k1 = _client_cpu(), cluster.cpu()
    cpu = {"client": c1 - c0 - pm.sampler_cpu, **{k: k1[k] - k0[k] for k in k0}}
    return value, secs, cpu, {k: (i1[k] - i0[k]) / idle for k in i0}, pm, what


def _chunk_tasks(data: dict[str, Any]) -> int:
    """Chunk tasks of one pass (the gt's chunks: every set is chunked like it)."""
    k = int(data["chunks"][0])
    return math.ceil(int(data["images"]) / k)


def projection(fixed: float, per_chunk: float, chunks: int, workers: list[int]) -> list[dict[str, Any]]:
    """``T(N) = fixed + per_chunk * ceil(chunks / N)`` for each N in ``workers``."""
    return [{"workers": n, "seconds": fixed + per_chunk * math.ceil(chunks / n)} for n in workers]


def main(argv: list[str] | None = None) -> int:
    p = bench_parser("coco", __doc__.split("\n")[0])
    p.add_argument("--voc", action="store_true",
                   help=f"VOC scale instead ({VOC_TRAIN_AUG:,} images <= {VOC_SIDE} px, {VOC_CLASSES} classes): "
                        "the cluster overhead; writes coco_voc.json")
    p.add_argument("--images", type=int, default=None, help=f"images (default {COCO_TRAIN}; quick 120)")
    p.add_argument("--max-side", type=int, default=None, help=f"largest side (default {COCO_SIDE}; quick 96)")
    p.add_argument("--classes", type=int, default=None, help=f"classes (default {COCO_CLASSES})")
    p.add_argument("--sets", type=int, default=4, help="pseudo-label sets (default 4)")
    p.add_argument("--chunk-images", type=int, default=None,
                   help="images per chunk (default: the stores' default, ~8 MiB chunks; quick 16)")
    p.add_argument("--no-cluster", action="store_true", help="threaded only (no workers sweep, no projection)")
    p.add_argument("--workers", default="1,2",
                   help="worker counts of the sweep (default 1,2; the projection needs 1)")
    args = p.parse_args(argv)
    quick = args.quick
    voc = args.voc
    n_img = args.images or (120 if quick else VOC_TRAIN_AUG if voc else COCO_TRAIN)
    side = args.max_side or (96 if quick else VOC_SIDE if voc else COCO_SIDE)
    n_cls = args.classes or (VOC_CLASSES if voc else COCO_CLASSES)
    full = VOC_TRAIN_AUG if voc else COCO_TRAIN
    scale = "VOC" if voc else "COCO"
    root = tmp_dir()
    free = shutil.disk_usage(root).free
    from isle_fast.backend import tune_allocator

    tune_allocator()
    log(f"[coco] data: {n_img:,} images up to {side}x{side}, {n_cls} classes, {args.sets} sets + gt "
        f"(cached in {root}; {fmt_bytes(free)} free there)")
    k = args.chunk_images or (16 if quick else None)
    data = make_label_stores(root, n_img, n_sets=args.sets, max_side=side, num_classes=n_cls, seed=15,
                             chunk_images=k)
    log(f"[coco] data {'generated' if data['generated'] else 'reused'} in {data['seconds']:.1f} s: "
        f"{fmt_bytes(data['raw_bytes'])} raw, {fmt_bytes(data['stored_bytes'])} stored")
    tiny = make_label_stores(root, 8, n_sets=args.sets, max_side=32, num_classes=n_cls, seed=1)
    # the warm-up: a chunk per image, so that every worker gets some of its tasks and loads the kernels
    warm = make_label_stores(root, 16, n_sets=args.sets, max_side=32, num_classes=n_cls, seed=2, chunk_images=1)
    work = root / f"coco-out-{scale.lower()}-{n_img}-{os.getpid()}"   # a run of its own: removed at the end
    work.mkdir(exist_ok=True)
    chunks = _chunk_tasks(data)
    load0 = os.getloadavg()[0]

    run_pipeline(warm, work / "warm.zarr")   # kernels compiled / loaded before timing
    log("[coco] threaded scheduler")
    c0 = _client_cpu()
    with _SampledPeak(interval=0.1) as pm:
        ref = run_pipeline(data, work / "threaded.zarr")
    cpu_threaded = _client_cpu() - c0 - pm.sampler_cpu
    threaded = {k: ref[k] for k in ("evaluate", "select", "merge", "total")}
    threaded.update({"peak_rss": pm.peak, "baseline_rss": pm.baseline, "cpu_seconds": cpu_threaded})
    print(f"\n{scale} scale: {n_img:,} images up to {side}x{side} ({n_img / full:.1%} of {scale} train), "
          f"{n_cls} classes, {args.sets} sets + gt, {chunks} chunk tasks per pass "
          f"({fmt_bytes(data['raw_bytes'])} raw, {fmt_bytes(data['stored_bytes'])} stored); "
          f"load average {load0:.2f} at the start")
    print(format_table([{"step": k, "seconds": threaded[k]} for k in ("evaluate", "select", "merge", "total")]))
    print(f"threaded: {cpu_threaded:.1f} CPU s, peak RSS {fmt_bytes(pm.peak)}; target < 3 min: "
          f"{'met' if threaded['total'] < 180 else 'MISSED'}{'' if n_img == COCO_TRAIN else ' (at this size)'}; "
          f"< 2 GiB: {'met' if pm.peak < 2 * 2**30 else 'MISSED'}")

    sweep: list[dict[str, Any]] = []
    model: dict[str, Any] = {}
    if not args.no_cluster:
        fixed_runs = []
        counts = sorted({int(v) for v in args.workers.split(",") if v.strip()})
        for nw in counts:
            log(f"[coco] cluster: dask scheduler + {nw} x dask worker --nworkers 1 --nthreads 1")

            def timed_tiny() -> float:
                t0 = time.perf_counter()
                run_pipeline(tiny, work / "tiny.zarr")
                return time.perf_counter() - t0

            fixed_box: list[float] = []

            def warm_and_fixed() -> None:
                for _ in range(2):
                    run_pipeline(warm, work / "warm.zarr")
                fixed_box.append(min(timed_tiny() for _ in range(2)))  # a run that has almost no chunks

            res, secs, cpu, idle_rate, pmc, what = on_cluster(nw, work / "cluster.log",
                                                   lambda: run_pipeline(data, work / f"cluster{nw}.zarr"),
                                                   warm_and_fixed)
            fixed = fixed_box[0]
            fixed_runs.append(fixed)
            total_cpu = sum(cpu.values())
            over = total_cpu - cpu_threaded   # what the cluster spends beyond the threaded run
            sweep.append({"workers": nw, "cluster": what, "seconds": res["total"], "evaluate": res["evaluate"],
                          "merge": res["merge"], "peak_rss_worker": pmc.peak_child,
                          "peak_rss_client": pmc.peak_self, "fixed_seconds": fixed,
                          "cpu_seconds": cpu, "cpu_total": total_cpu, "cpu_floor_wall": total_cpu / 2,
                          "overhead_cpu": over, "idle_cpu_per_second": idle_rate,
                          "idle_cpu_during_run": sum(idle_rate.values()) * res["total"],
                          "vs_threaded": res["total"] / threaded["total"],
                          "counts_equal": bool(np.array_equal(res["counts"], ref["counts"])),
                          "ensemble_equal": ensemble_equal(res["ensemble"], ref["ensemble"])})
        print("\nOn a dask.distributed cluster (dask scheduler + dask worker processes, 1 thread each; "
              "peak_rss_worker: the largest worker process; this machine's 2 cores are shared by the client, "
              "the scheduler and the workers)")
        print(format_table([{**r, "peak_rss_worker": fmt_bytes(r["peak_rss_worker"]),
                             "peak_rss_client": fmt_bytes(r["peak_rss_client"])} for r in sweep],
                           ["workers", "seconds", "vs_threaded", "evaluate", "merge", "fixed_seconds",
                            "peak_rss_worker", "peak_rss_client", "counts_equal", "ensemble_equal"]))
        print(f"\nCPU seconds during the run, by process (threaded run: {cpu_threaded:.1f} CPU s in "
              f"{threaded['total']:.1f} s, less the memory sampler's); overhead = all - the threaded run's CPU "
              f"seconds; floor = all / 2 cores, the wall time the run would take on 2 otherwise idle cores")
        print(format_table([{"cluster": f"{r['workers']} worker(s)", **r["cpu_seconds"], "all": r["cpu_total"],
                             "overhead": r["overhead_cpu"], "of_it_idle": r["idle_cpu_during_run"],
                             "floor_s": r["cpu_floor_wall"], "wall_s": r["seconds"]}
                            for r in sweep],
                           ["cluster", "client", "scheduler", "nannies", "workers", "all", "overhead",
                            "of_it_idle", "floor_s", "wall_s"]))
        print("of_it_idle: what the scheduler, nannies and workers spend per second when idle (measured for 5 s "
              "before the run: heartbeats, monitors) x the run's wall time; it grows with the wall time, so a "
              "contended machine inflates it")
    if sweep and sweep[0]["workers"] == 1 and 2 in [r["workers"] for r in sweep]:
        two = next(r for r in sweep if r["workers"] == 2)
        fixed = fixed_runs[0]
        per_chunk = max(0.0, (sweep[0]["seconds"] - fixed) / chunks)
        full_chunks = math.ceil(chunks * full / n_img)
        ns = [1, 2, 4, 8, 16, 32, 64]
        model = {"fixed_seconds": fixed, "per_chunk_seconds": per_chunk, "chunks": chunks,
                 "full_chunks": full_chunks,
                 "formula": "T(N) = fixed + per_chunk * ceil(chunks / N)",
                 "at_measured_size": projection(fixed, per_chunk, chunks, ns),
                 f"at_{scale.lower()}_size": projection(fixed, per_chunk, full_chunks, ns),
                 "model_T2_vs_measured": {"model": fixed + per_chunk * math.ceil(chunks / 2),
                                          "measured": two["seconds"]}}
        rows = [{"workers": a["workers"], f"T at {n_img:,} images": a["seconds"],
                 f"T at {full:,} images": b["seconds"]}
                for a, b in zip(model["at_measured_size"], model[f"at_{scale.lower()}_size"])]
        print(f"\nPROJECTION (a model from this run, not a measurement): T(N) = {fixed:.2f} s fixed + "
              f"{per_chunk * 1000:.1f} ms per chunk task x ceil(chunks / N); {chunks} chunks measured, "
              f"{full_chunks} at {scale} size; assumes a core per worker and storage that keeps up")
        print(format_table(rows))
        if per_chunk == 0.0:
            print("(the 1-worker run took no longer than the fixed cost: too small a size for a projection)")
        print(f"model T(2) {model['model_T2_vs_measured']['model']:.2f} s vs measured "
              f"{two['seconds']:.2f} s (the difference: 2 workers + scheduler + client on 2 cores)")

    load1 = os.getloadavg()[0]
    headline = [headline_row(f"{scale}-scale evaluate+select+merge, {n_img:,} images <= {side}px, "
                             f"{n_cls} classes, {args.sets} sets (threaded)", threaded["total"],
                             peak_rss_mib=round(pm.peak / 2**20))]
    for r in sweep:
        headline.append(headline_row(f"{scale}-scale on {r['workers']} dask worker(s)", r["seconds"],
                                     "threaded scheduler", threaded["total"],
                                     peak_rss_worker_mib=round(r["peak_rss_worker"] / 2**20)))
    path = write_json("coco_voc" if voc else "coco",
                      {"scale": scale, "images": n_img, "full_images": full, "coco_images": COCO_TRAIN,
                       "max_side": side,
                       "classes": n_cls, "sets": args.sets, "chunks": data["chunks"],
                       "raw_bytes": data["raw_bytes"], "stored_bytes": data["stored_bytes"],
                       "generation_seconds": data["seconds"] if data["generated"] else None,
                       "disk_free_bytes": free, "load_average_start": load0, "load_average_end": load1,
                       "threaded": threaded, "cluster": sweep, "projection": model, "headline": headline},
                      quick=quick)
    print(f"\nwritten: {path}")
    shutil.rmtree(work, ignore_errors=True)
    ok = all(r["counts_equal"] and r["ensemble_equal"] for r in sweep)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
