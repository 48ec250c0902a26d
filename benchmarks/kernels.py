"""Throughput of the CPU kernels of ISLE steps 2 and 3 against plain NumPy, in the same run.

``python -m benchmarks.kernels [--quick] [--out DIR] [--repeat K] [--images I] [--threads T]``

Data (generated here, seeded, in memory): VOC-sized label maps (``I`` images of
375 x 500, 21 classes) with 1-3 smooth objects per image and a 2-pixel 255
band around object boundaries in the ground truth (as VOC draws it); every
pseudo-label set redraws the same objects with its own errors (shifted / grown
/ shrunk outlines, missed objects, confused classes, false-positive blobs, an
occasional abstention rectangle, 255), which gives 80-95 % pixel agreement with
the ground truth. Score stacks (uint8 and float16, ``(I, H, W, 21)``) are
CAM-like noise with a bump at each set's label.

Every kernel is measured next to a plain NumPy reference on the same arrays:

* confusion: the per-image, per-set masked ``np.bincount`` of the public WSSS
  repositories (``mask = (gt >= 0) & (gt < C); np.bincount(C * gt[mask] + pred[mask])``);
* merge: Algorithm 3 vectorised over whole stacks with NumPy (one pass per class);
* decode: ``np.argmax(axis=-1)``;
* subsets: the reference merge + bincount once per subset.

Rates: pixel-pairs / s = pixels x sets (confusion), pixels / s (merge, decode),
and for subset analysis pixels / s over all subsets at once. Timings are the
BEST of k runs after a warm-up (the machine may be shared: noise only adds
time). Besides wall-clock time we record the process CPU time of each run
(all threads): ``cpu_ratio`` = reference CPU seconds / ours, the work saved,
which a busy shared machine distorts much less than wall time; the load
average is printed with the table. Results are checked equal to the
references before they are reported.

Writes ``<out>/kernels.json`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import itertools
import os
import sys
import time
from typing import Any, Callable, Sequence

import numba
import numpy as np

from isle_fast.kernels import cpu

from .common import bench_parser, format_table, headline_row, log, write_json

C = 21


# --------------------------------------------------------------------------- synthetic data

def _blob(yy, xx, cy, cx, ry, rx, phases, amps):
    dy, dx = (yy - cy) / ry, (xx - cx) / rx
    theta = np.arctan2(dy, dx)
    wobble = 1.0 + sum(a * np.sin(k * theta + p) for k, (a, p) in enumerate(zip(amps, phases), start=2))
    return np.hypot(dy, dx) < wobble


def make_labels(n_images: int, h: int, w: int, n_sets: int, seed: int = 0) -> tuple[np.ndarray, tuple]:
    """Ground truth (I, h, w) and ``n_sets`` pseudo-label sets, uint8, VOC-like (see module doc)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    gt = np.zeros((n_images, h, w), np.uint8)
    sets = tuple(np.zeros((n_images, h, w), np.uint8) for _ in range(n_sets))
    for i in range(n_images):
        objs = []
        for _ in range(int(rng.integers(1, 4))):
            objs.append(dict(cls=int(rng.integers(1, C)), cy=rng.uniform(0.2, 0.8) * h, cx=rng.uniform(0.2, 0.8) * w,
                             ry=rng.uniform(0.1, 0.35) * h, rx=rng.uniform(0.1, 0.35) * w,
                             phases=rng.uniform(0, 2 * np.pi, 4), amps=rng.uniform(0, 0.15, 4)))
        g = np.zeros((h, w), np.uint8)
        for o in objs:
            g[_blob(yy, xx, o["cy"], o["cx"], o["ry"], o["rx"], o["phases"], o["amps"])] = o["cls"]
        edge = np.zeros((h, w), bool)
        edge[1:, :] |= g[1:, :] != g[:-1, :]
        edge[:, 1:] |= g[:, 1:] != g[:, :-1]
        band = edge.copy()
        band[1:, :] |= edge[:-1, :]
        band[:-1, :] |= edge[1:, :]
        band[:, 1:] |= edge[:, :-1]
        band[:, :-1] |= edge[:, 1:]
        gt[i] = np.where(band, 255, g)
        for n in range(n_sets):
            s = sets[n][i]
            for o in objs:
                if rng.random() < 0.08:          # missed object
                    continue
                cls = o["cls"] if rng.random() > 0.1 else int(rng.integers(1, C))
                grow = rng.uniform(0.85, 1.2)
                m = _blob(yy, xx, o["cy"] + rng.normal(0, 0.03) * h, o["cx"] + rng.normal(0, 0.03) * w,
                          o["ry"] * grow, o["rx"] * grow, o["phases"] + rng.normal(0, 0.3, 4), o["amps"])
                s[m] = cls
            if rng.random() < 0.3:               # false-positive blob
                s[_blob(yy, xx, rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.03, 0.1) * h,
                        rng.uniform(0.03, 0.1) * w, rng.uniform(0, 6, 4), rng.uniform(0, 0.2, 4))] = rng.integers(1, C)
            if rng.random() < 0.05:              # the set abstains on a rectangle
                y0, x0 = int(rng.integers(0, h - 20)), int(rng.integers(0, w - 20))
                s[y0:y0 + int(rng.integers(10, h // 4 + 11)), x0:x0 + int(rng.integers(10, w // 4 + 11))] = 255
    return gt, sets


def make_scores(labels: np.ndarray, dtype, seed: int) -> np.ndarray:
    """CAM-like (I, h, w, C) scores: noise in [0, 90), plus 150 at ``labels`` (uint8 units; float16 / 255)."""
    rng = np.random.default_rng(seed)
    s = rng.integers(0, 90, labels.shape + (C,), dtype=np.uint8)
    lab = np.minimum(labels, C - 1)
    np.put_along_axis(s, lab[..., None], np.take_along_axis(s, lab[..., None], -1) + 150, axis=-1)
    if dtype == np.uint8:
        return s
    return (s / np.float32(255)).astype(dtype)


# --------------------------------------------------------------------------- references

def ref_confusion(gt: np.ndarray, sets: Sequence[np.ndarray], num_classes: int = C) -> np.ndarray:
    """Per image and per set, the masked bincount of the public WSSS repositories -> (N, C, C)."""
    out = np.zeros((len(sets), num_classes, num_classes), np.int64)
    for i in range(gt.shape[0]):
        g = gt[i]
        for n, s in enumerate(sets):
            p = s[i]
            mask = (g >= 0) & (g < num_classes)
            out[n] += np.bincount(num_classes * g[mask].astype(int) + p[mask],
                                  minlength=num_classes ** 2)[: num_classes ** 2].reshape(num_classes, num_classes)
    return out


def ref_confusion_scores(gt, sets, num_classes=C):
    """Per image and per set: argmax, then the masked bincount."""
    return ref_confusion(gt, [np.argmax(s, axis=-1).astype(np.uint8) for s in sets], num_classes)


def ref_merge(sets: Sequence[np.ndarray], selection, priority, policy: int) -> np.ndarray:
    """Algorithm 3 with NumPy over whole stacks: one vectorised pass per class (np.where / masks)."""
    nc = len(selection)
    out = np.zeros(sets[0].shape, np.uint8)
    claims = np.zeros(sets[0].shape, np.uint8)
    if policy == cpu.SCORE:
        order = sorted(range(1, nc), key=lambda k: (priority[selection[k], k], -k))  # lowest first: winner last
    else:
        order = sorted(range(1, nc), key=lambda k: (-selection[k], -k))
    for k in order:
        m = sets[int(selection[k])] == k
        out[m] = k
        claims += m
    abstain = np.ones(sets[0].shape, bool)
    for s in sets:
        abstain &= s >= nc
    out[(claims == 0) & abstain] = 255
    if policy == cpu.IGNORE:
        out[claims >= 2] = 255
    return out


def ref_merge_scores(sets, selection):
    """Copy slice c of set selection[c], then argmax (policy SCORE)."""
    merged = np.empty(sets[0].shape, sets[0].dtype)
    for c in range(sets[0].shape[-1]):
        merged[..., c] = sets[int(selection[c])][..., c]
    return np.argmax(merged, axis=-1).astype(np.uint8), merged


def ref_subsets(gt, sets, sels, members, priority, policy):
    out = np.zeros((len(sels), C, C + 1), np.int64)
    for s in range(len(sels)):
        idx = np.flatnonzero(members[s])
        local = {int(g): j for j, g in enumerate(idx)}
        sel = np.array([local.get(int(v), 0) for v in sels[s]])
        merged = ref_merge([sets[j] for j in idx], sel, priority[idx], policy)
        out[s, :, :C] = ref_confusion(gt, [np.where(merged == 255, 0, merged)])[0]   # 255 -> column C:
        valid = gt < C                                                                # counted apart
        out[s, :, :C][:, 0] -= np.bincount(gt[valid & (merged == 255)], minlength=C)[:C]
        out[s, :, C] = np.bincount(gt[valid & (merged == 255)], minlength=C)[:C]
    return out


def all_subsets(n_sets: int, priority: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every non-empty subset; its selection = the member with the highest priority per class."""
    members = np.array([m for m in itertools.product([0, 1], repeat=n_sets) if any(m)], bool)
    sels = np.zeros((len(members), C), np.int64)
    for s, m in enumerate(members):
        idx = np.flatnonzero(m)
        sels[s] = idx[np.argmax(priority[idx], axis=0)]
    return sels, members


# --------------------------------------------------------------------------- driver

def timed(fn: Callable[[], Any], k: int, warmup: int = 1) -> dict[str, Any]:
    """Best wall time and best process CPU time (all threads) of k runs after ``warmup`` runs."""
    value = None
    for _ in range(warmup):
        value = fn()
    walls, cpus = [], []
    for _ in range(max(1, k)):
        c0, t0 = time.process_time(), time.perf_counter()
        value = fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return {"best": min(walls), "median": float(np.median(walls)), "cpu_best": min(cpus), "runs": walls,
            "value": value}


def _row(name: str, data: str, units: float, unit: str, ours: dict, ref: dict | None, ref_name: str,
         equal: bool | None) -> dict[str, Any]:
    r = {"kernel": name, "data": data, "unit": unit,
         "ours_s": ours["best"], "ours_rate": units / ours["best"],
         "reference": ref_name,
         "ref_s": ref["best"] if ref else None,
         "ref_rate": units / ref["best"] if ref else None,
         "speedup": (ref["best"] / ours["best"]) if ref else None,
         "ours_cpu_s": ours["cpu_best"], "ref_cpu_s": ref["cpu_best"] if ref else None,
         "cpu_ratio": (ref["cpu_best"] / ours["cpu_best"]) if (ref and ours["cpu_best"] > 0) else None,
         "equal": equal}
    return r


def _fmt_rate(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    if v >= 1e9:
        return f"{v / 1e9:.2f} G{unit}/s"
    return f"{v / 1e6:.1f} M{unit}/s"


def main(argv: Sequence[str] | None = None) -> int:
    p = bench_parser("kernels", __doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    p.add_argument("--images", type=int, default=None, help="label-map images per run (default 256)")
    p.add_argument("--threads", type=int, default=None, help="Numba threads (default: all)")
    args = p.parse_args(argv)
    if args.out:
        os.environ["ISLE_BENCH_RESULTS"] = str(args.out)
    if args.threads:
        numba.set_num_threads(args.threads)
    q = args.quick
    k = args.repeat or (2 if q else 5)
    h, w = (60, 80) if q else (375, 500)
    n_img = args.images or (4 if q else 256)
    n_scores = 2 if q else 16
    n_sub = 2 if q else 32
    threads = numba.get_num_threads()
    from isle_fast.backend import tune_allocator

    tuned = tune_allocator()  # as the isle command does; ours and the references share it
    rows: list[dict[str, Any]] = []

    def bench(name, data, units, unit, ours_fn, ref_fn, ref_name, check, k_ref=None):
        log(f"  {name} ({data}) ...")
        ours = timed(ours_fn, k=k, warmup=1)
        ref = timed(ref_fn, k=k_ref or max(1, k // 2), warmup=0) if ref_fn else None
        equal = bool(check(ours["value"], ref["value"])) if (ref and check) else None
        rows.append(_row(name, data, units, unit, ours, ref, ref_name, equal))

    t0 = time.perf_counter()
    load0 = os.getloadavg()
    log(f"kernels benchmark: {n_img} images {h}x{w}, C={C}, Numba threads={threads}, best of {k}")
    log("generating label maps ...")
    gt, sets4 = make_labels(n_img, h, w, 4, seed=1)
    npx = gt.size
    agree = [float(np.mean(s == gt)) for s in sets4]
    rng = np.random.default_rng(2)
    priority = rng.random((8, C))
    sel4 = np.argmax(priority[:4], axis=0).astype(np.int64)
    desc = f"{n_img} x {h}x{w} labels"

    # step 2: confusion of label sets (fused, 4 sets) vs the per-image bincount; the reference masks
    # only gt (as the public repositories do), so these sets get no abstentions (255 -> 0)
    conf4 = tuple(np.where(s == 255, 0, s).astype(np.uint8) for s in sets4)
    bench("confusion_labels", f"{desc}, 4 sets", npx * 4, "pair",
          lambda: cpu.confusion_labels(gt, conf4, C),
          lambda: ref_confusion(gt, conf4), "per-image np.bincount",
          lambda a, b: np.array_equal(a[:, :, :C], b))
    bench("confusion_labels", f"{desc}, 1 set", npx, "pair",
          lambda: cpu.confusion_labels(gt, conf4[:1], C),
          lambda: ref_confusion(gt, conf4[:1]), "per-image np.bincount",
          lambda a, b: np.array_equal(a[:, :, :C], b))
    conf4 = None  # free it (the lambdas above have run)
    n_noise = max(1, n_img // 8)
    noise = tuple(rng.integers(0, C, gt[:n_noise].shape).astype(np.uint8) for _ in range(4))
    bench("confusion_labels", f"{n_noise} images of random noise (worst case), 4 sets", gt[:n_noise].size * 4,
          "pair", lambda: cpu.confusion_labels(gt[:n_noise], noise, C),
          lambda: ref_confusion(gt[:n_noise], noise), "per-image np.bincount",
          lambda a, b: np.array_equal(a[:, :, :C], b))

    # step 3: merge of label sets
    for pol, pname in ((cpu.SCORE, "SCORE"), (cpu.IGNORE, "IGNORE")):
        bench(f"merge_labels {pname}", f"{desc}, 4 sets", npx, "pix",
              lambda: cpu.merge_labels(sets4, sel4, priority[:4], pol),
              lambda: ref_merge(sets4, sel4, priority[:4], pol), "NumPy Algorithm 3 (per-class np masks)",
              np.array_equal)
    bench("merge_labels SCORE", f"{n_noise} images of random noise (worst case), 4 sets", gt[:n_noise].size, "pix",
          lambda: cpu.merge_labels(noise, sel4, priority[:4], cpu.SCORE),
          lambda: ref_merge(noise, sel4, priority[:4], cpu.SCORE), "NumPy Algorithm 3 (per-class np masks)",
          np.array_equal)

    # subsets of label sets (ensemble of every subset)
    gsub = gt[:n_sub]
    sub4 = tuple(s[:n_sub] for s in sets4)
    sels, members = all_subsets(4, priority[:4])
    bench("subset_confusion_labels", f"{n_sub} images, 4 sets, all {len(sels)} subsets", gsub.size, "pix",
          lambda: cpu.subset_confusion_labels(gsub, sub4, sels, members, priority[:4], cpu.SCORE, C),
          lambda: ref_subsets(gsub, sub4, sels, members, priority[:4], cpu.SCORE),
          "per subset: NumPy merge + bincount", np.array_equal, k_ref=1)
    n8 = max(1, n_sub // 4)
    g8, sets8 = make_labels(n8, h, w, 8, seed=3)
    sels8, members8 = all_subsets(8, priority)
    bench("subset_confusion_labels", f"{n8} images, 8 sets, all {len(sels8)} subsets", g8.size, "pix",
          lambda: cpu.subset_confusion_labels(g8, sets8, sels8, members8, priority, cpu.SCORE, C),
          lambda: ref_subsets(g8, sets8, sels8, members8, priority, cpu.SCORE),
          "per subset: NumPy merge + bincount", np.array_equal, k_ref=1)
    g8 = sets8 = None

    # scores: decode, confusion, merge, subsets
    gs = gt[:n_scores]
    for dt in (np.uint8, np.float16):
        dname = np.dtype(dt).name
        sc = tuple(make_scores(s[:n_scores], dt, seed=10 + n) for n, s in enumerate(sets4))
        sdesc = f"{n_scores} x {h}x{w}x{C} {dname} scores"
        bench(f"decode_scores {dname}", sdesc, gs.size, "pix",
              lambda: cpu.decode_scores(sc[0]),
              lambda: np.argmax(sc[0], axis=-1).astype(np.uint8), "np.argmax", np.array_equal)
        bench(f"confusion_scores {dname}", f"{sdesc}, 4 sets", gs.size * 4, "pair",
              lambda: cpu.confusion_scores(gs, sc, C),
              lambda: ref_confusion_scores(gs, sc), "per-image np.argmax + np.bincount",
              lambda a, b: np.array_equal(a[:, :, :C], b))
        bench(f"merge_scores {dname} SCORE", f"{sdesc}, 4 sets", gs.size, "pix",
              lambda: cpu.merge_scores(sc, sel4, cpu.SCORE),
              lambda: ref_merge_scores(sc, sel4), "NumPy slice copy + np.argmax",
              lambda a, b: np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]))
        if dt == np.uint8:
            n3 = max(1, n_scores // 4)
            g3 = gs[:n3]
            sc3 = tuple(s[:n3] for s in sc[:3])
            sels3, members3 = all_subsets(3, priority[:3])
            sels3[:, 0] = [np.flatnonzero(m)[0] for m in members3]

            def ref_sub_scores():
                out = np.zeros((len(sels3), C, C), np.int64)
                for s in range(len(sels3)):
                    lab, _ = ref_merge_scores(sc3, sels3[s])
                    out[s] = ref_confusion(g3, [lab])[0]
                return out

            bench(f"subset_confusion_scores {dname}", f"{n3} images, 3 sets, all {len(sels3)} subsets",
                  g3.size, "pix",
                  lambda: cpu.subset_confusion_scores(g3, sc3, sels3, members3, cpu.SCORE, C),
                  ref_sub_scores, "per subset: NumPy merge + argmax + bincount",
                  lambda a, b: np.array_equal(a[:, :, :C], b), k_ref=1)
        sc = None

    table = [{"kernel": r["kernel"], "data": r["data"], "ours": _fmt_rate(r["ours_rate"], r["unit"]),
              "reference": r["reference"], "ref": _fmt_rate(r["ref_rate"], r["unit"]),
              "speedup": f"{r['speedup']:.1f}x" if r["speedup"] else "-",
              "cpu_ratio": f"{r['cpu_ratio']:.1f}x" if r["cpu_ratio"] else "-",
              "equal": r["equal"]} for r in rows]
    load = os.getloadavg()
    print(f"\nCPU kernels vs NumPy, best of {k} wall-clock (shared machine: noisy; load average "
          f"{load0[0]:.1f} at start, {load[0]:.1f} at end on {os.cpu_count()} CPUs), Numba threads={threads}, "
          f"set agreement with gt {min(agree):.0%}-{max(agree):.0%}")
    print(format_table(table))
    heads = [headline_row(f"{r['kernel']} ({r['data']})", r["ours_s"], r["reference"], r["ref_s"],
                          rate=r["ours_rate"], unit=r["unit"] + "/s") for r in rows[:1] + rows[3:4]]
    path = write_json("kernels", {"config": {"images": n_img, "height": h, "width": w, "classes": C,
                                             "threads": threads, "allocator_tuned": tuned, "repeat": k,
                                             "set_agreement": agree,
                                             "load_average_start": load0, "load_average_end": os.getloadavg()},
                                  "rows": rows, "headline": heads}, quick=q)
    print(f"\nwrote {path} in {time.perf_counter() - t0:.0f} s")
    if not all(r["equal"] is not False for r in rows):
        print("ERROR: a kernel disagreed with its reference", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
