"""The merge of class-sparse CAM sets at one shared threshold: merged scores dense vs class-sparse.

``isle merge --bg-threshold T`` over class-sparse score sets writes the merged stack beside the
labels, as every class slice (``--layout dense``) or class-sparse (``--layout sparse``, the
default there). This times both, alternating, in the same run (wall and CPU seconds of this
process, best of ``--repeat``), against one threshold pass of the sweep, with the sweep cache off
(each merge evaluates the sets itself) and on (the sweep kept: the merge pass alone), and checks
that the two ensembles (labels and the dense view of the scores) are equal.

Run: ``python -m benchmarks.score_merge --images 120 --side 500``; JSON ``score_merge.json``.
"""

from __future__ import annotations

import os
import shutil
import time

import numpy as np

from .cams import make_gt, write_set
from .common import bench_parser, log, quiet_progress, tmp_dir, write_json


def _timed(fn):
    c0, t0 = time.process_time(), time.perf_counter()
    r = fn()
    return r, time.perf_counter() - t0, time.process_time() - c0


def main(argv: list[str] | None = None) -> int:
    from isle_fast.ensemble.merge import ensemble_scores, merge
    from isle_fast.ensemble.sweep import sweep_thresholds
    from isle_fast.ensemble.sweep_cache import CACHE_ENV
    from isle_fast.stores.ingest import ingest_labels, ingest_scores
    from isle_fast.stores.stack import VOC_CLASSES

    p = bench_parser("score_merge", __doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=None, help="images (default 120, quick 12)")
    p.add_argument("--side", type=int, default=None, help="largest image side (default 500, quick 96)")
    p.add_argument("--bg-threshold", type=float, default=0.2)
    args = p.parse_args(argv)
    n = args.images or (12 if args.quick else 120)
    side = args.side or (96 if args.quick else 500)
    reps = args.repeat or (1 if args.quick else 2)
    root = make_gt(n, side)
    work = tmp_dir() / f"score-merge-{n}-{side}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    classes = list(VOC_CLASSES)
    old = os.environ.get(CACHE_ENV)
    rows: dict[str, dict] = {}
    try:
        with quiet_progress():
            gt = ingest_labels(root / "gt", work / "gt.zarr", kind="gt", classes=classes, quiet=True)
            stores = []
            for s in range(4):
                folder, _ = write_set(root, s, n, side)
                stores.append(ingest_scores(folder, work / f"set{s}.zarr", gt=gt, classes=classes,
                                            allow_pickle=True, quiet=True))
            t = args.bg_threshold
            os.environ[CACHE_ENV] = str(work / "cache")
            merge(stores, gt, work / "warm.zarr", bg_threshold=t, backend="cpu", progress=False)  # kernels
            out = {}
            for cache in ("off", "kept"):
                os.environ[CACHE_ENV] = "off" if cache == "off" else str(work / "cache")
                for rep in range(reps):
                    for lay in ("dense", "sparse"):
                        path = work / f"{lay}-{cache}-{rep}.zarr"
                        res, wall, cpu = _timed(lambda: merge(stores, gt, path, bg_threshold=t, backend="cpu",
                                                              progress=False, layout=lay))
                        out[lay] = res.stack
                        key = f"merge {lay} scores, sweep {cache}"
                        best = rows.get(key)
                        if best is None or wall < best["wall_s"]:
                            rows[key] = {"wall_s": wall, "cpu_s": cpu, "stored_bytes": res.stack.stored_bytes()}
                        log(f"score_merge: {key}: {wall:.2f} s wall, {cpu:.2f} CPU s")
            os.environ[CACHE_ENV] = "off"
            for rep in range(reps):
                _, wall, cpu = _timed(lambda: sweep_thresholds(stores, gt, [t], backend="cpu", progress=False))
                if "one threshold pass" not in rows or wall < rows["one threshold pass"]["wall_s"]:
                    rows["one threshold pass"] = {"wall_s": wall, "cpu_s": cpu}
            a, b = out["sparse"], out["dense"]
            equal = bool(np.array_equal(np.asarray(a.array[:]), np.asarray(b.array[:]))
                         and np.array_equal(np.asarray(ensemble_scores(a)[:]), np.asarray(ensemble_scores(b)[:])))
            layouts = [a.provenance.get("scores_layout"), b.provenance.get("scores_layout")]
    finally:
        if old is None:
            os.environ.pop(CACHE_ENV, None)
        else:
            os.environ[CACHE_ENV] = old
    for k, v in rows.items():
        print(f"{k:40s} {v['wall_s']:7.2f} s wall {v['cpu_s']:7.2f} CPU s")
    print(f"layouts {layouts}, ensembles equal: {equal}; load average {os.getloadavg()[0]:.1f}")
    path = write_json("score_merge", {"images": n, "side": side, "bg_threshold": args.bg_threshold, "steps": rows,
                                      "equal": equal, "layouts": layouts, "load_average": os.getloadavg()},
                      quick=args.quick)
    print(f"wrote {path}")
    assert equal, "the class-sparse merged scores differ from the dense ones"
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
