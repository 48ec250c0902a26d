"""GPU kernel throughput as a fraction of the device's copy bandwidth, against the CPU kernels and CuPy.

``python -m benchmarks.gpu [--quick]`` measures, in one run on one machine:

* the device-to-device copy bandwidth (``cudaMemcpyAsync`` of a 1 GiB buffer; a copy reads
  and writes every byte, so the *memory traffic* rate is ``2 x bytes / s``) and the host-to-
  device bandwidth from pinned and from pageable host memory;
* every GPU kernel on device-resident (CuPy) data: seconds, the minimal memory traffic it must
  do (inputs read + outputs written), that traffic in GB/s and as a fraction of the copy
  traffic rate (1.0 = as fast as a memcpy of the same bytes);
* the same call of the CPU kernels (:mod:`isle_fast.kernels.cpu`, all cores) on host copies
  of the same data, and the obvious CuPy implementation where one exists
  (``cupy.bincount`` of ``gt * (C+1) + pred`` per set for confusion counting, ``cupy.argmax``
  for decoding); every GPU result is checked EQUAL to the CPU kernel's;
* end to end from host memory (NumPy in, NumPy out: the pinned two-stream pipeline the Dask
  orchestration uses), as GB/s of host data and as a fraction of the pinned H2D bandwidth.

It writes ``benchmarks/results/gpu.json``. Without a usable CUDA device (or without CuPy)
it prints ``no CUDA device: skipped`` and writes a JSON saying so (exit 0).
``--simulate`` (with ``NUMBA_ENABLE_CUDASIM=1``) runs the same code on tiny NumPy data through
Numba's CUDA simulator: a smoke test of this script, the numbers mean nothing.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable

import numpy as np

from .common import bench_parser, best_of, format_table, headline_row, log, write_json

NAME = "gpu"
C = 21                      # PASCAL VOC


# --------------------------------------------------------------------------------------------
# the device: CuPy, or NumPy + the simulator for --simulate
# --------------------------------------------------------------------------------------------
class Device:
    """Array module, synchronisation and bandwidth probes of the device (or of the simulator)."""

    def __init__(self, simulate: bool):
        self.simulate = simulate
        if simulate:
            self.xp = np
            self.info = {"name": "numba CUDA simulator (no device)", "simulated": True}
            return
        import cupy

        self.xp = cupy
        dev = cupy.cuda.Device()
        props = cupy.cuda.runtime.getDeviceProperties(dev.id)
        name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
        free, total = cupy.cuda.runtime.memGetInfo()
        self.info = {
            "name": name, "compute_capability": dev.compute_capability,
            "multiprocessors": int(props["multiProcessorCount"]), "memory_bytes": int(total),
            "cupy": cupy.__version__, "cuda_runtime": cupy.cuda.runtime.runtimeGetVersion(),
            "cuda_driver": cupy.cuda.runtime.driverGetVersion(), "simulated": False,
        }

    def sync(self) -> None:
        if not self.simulate:
            self.xp.cuda.Device().synchronize()

    def put(self, a: np.ndarray) -> Any:
        return np.array(a) if self.simulate else self.xp.asarray(a)

    def host(self, a: Any) -> np.ndarray:
        return np.asarray(a) if self.simulate else a.get()

    def copy_bandwidth(self, nbytes: int, k: int) -> dict[str, float]:
        """Device-to-device memcpy: bytes copied per second, and memory traffic (2x) per second."""
        src = self.xp.ones(nbytes, np.uint8)
        dst = self.xp.empty_like(src)

        def copy() -> None:
            if self.simulate:
                np.copyto(dst, src)
            else:
                dst.data.copy_from_device_async(src.data, nbytes)
            self.sync()

        t = best_of(copy, k=k).best
        return {"bytes": nbytes, "seconds": t, "copy_GBps": nbytes / t / 1e9, "traffic_GBps": 2 * nbytes / t / 1e9}

    def h2d_bandwidth(self, nbytes: int, k: int) -> dict[str, float]:
        """Host-to-device copy GB/s from pinned and from pageable memory."""
        pageable = np.ones(nbytes, np.uint8)
        if self.simulate:
            t = best_of(lambda: np.array(pageable), k=k).best
            return {"bytes": nbytes, "pinned_GBps": nbytes / t / 1e9, "pageable_GBps": nbytes / t / 1e9}
        import cupyx

        pinned = cupyx.empty_pinned((nbytes,), np.uint8)
        pinned[...] = 1
        dst = self.xp.empty(nbytes, np.uint8)

        def from_pinned() -> None:
            dst.set(pinned)
            self.sync()

        def from_pageable() -> None:
            dst.set(pageable)
            self.sync()

        tp = best_of(from_pinned, k=k).best
        tq = best_of(from_pageable, k=k).best
        return {"bytes": nbytes, "pinned_GBps": nbytes / tp / 1e9, "pageable_GBps": nbytes / tq / 1e9}


# --------------------------------------------------------------------------------------------
# data: VOC-like label maps (piecewise constant, mostly background) and float16 score stacks
# --------------------------------------------------------------------------------------------
def label_maps(rng: np.random.Generator, P: int, n_sets: int, blocky: bool = True) -> tuple[np.ndarray, list]:
    """gt and ``n_sets`` predictions, flat ``(P,)`` uint8; ``blocky``: constant 8x8-pixel runs of 64."""
    run = 64 if blocky else 1
    cells = -(-P // run)
    g = np.where(rng.random(cells) < 0.7, 0, rng.integers(1, C, cells)).astype(np.uint8)
    gt = np.repeat(g, run)[:P]
    gt[rng.random(P) < 0.05] = 255                                    # object boundaries: ignore
    sets = []
    for _ in range(n_sets):
        wrong = np.repeat(rng.random(cells) < 0.15, run)[:P]
        s = np.where(wrong, np.repeat(rng.integers(0, C, cells), run)[:P], np.where(gt == 255, 0, gt))
        s = s.astype(np.uint8)
        s[rng.random(P) < 0.02] = 255                                 # abstentions
        sets.append(s)
    return gt, sets


def score_stacks(rng: np.random.Generator, labels: list, dtype=np.float16) -> list:
    """``(P, C)`` scores peaked at each label (ties and near-ties included)."""
    out = []
    for lab in labels:
        s = (rng.random((lab.size, C), np.float32) * 0.5).astype(dtype)
        rows = np.flatnonzero(lab < C)
        s[rows, lab[rows]] += dtype(0.6)
        out.append(s)
    return out


def subsets(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Every non-empty subset of n sets, with a selection inside each."""
    members = np.array([[(m >> k) & 1 for k in range(n)] for m in range(1, 1 << n)], bool)
    sels = np.array([rng.choice(np.flatnonzero(m), C) for m in members], np.int64)
    return sels, members


# --------------------------------------------------------------------------------------------
# CuPy references
# --------------------------------------------------------------------------------------------
def cupy_confusion(xp: Any, gt: Any, preds: list) -> Any:
    """``bincount`` of ``gt * (C+1) + min(pred, C)`` over valid pixels, one pass per set."""
    valid = gt < C
    g = gt[valid].astype(np.int32) * (C + 1)
    out = []
    for p in preds:
        idx = g + xp.minimum(p[valid], C).astype(np.int32)
        out.append(xp.bincount(idx, minlength=C * (C + 1)).reshape(C, C + 1))
    return xp.stack(out)


# --------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = bench_parser(NAME, __doc__.splitlines()[0])
    p.add_argument("--simulate", action="store_true",
                   help="tiny run through Numba's CUDA simulator (needs NUMBA_ENABLE_CUDASIM=1): a smoke test")
    args = p.parse_args(argv)

    from isle_fast.backend import gpu_available, simulator_enabled

    reason = None
    if args.simulate and not simulator_enabled():
        reason = "--simulate needs NUMBA_ENABLE_CUDASIM=1 (set before Numba is imported)"
    elif not args.simulate:
        if simulator_enabled():
            reason = "NUMBA_ENABLE_CUDASIM=1 is set (simulator, no device); use --simulate"
        elif not gpu_available():
            reason = "no CUDA device visible to CuPy / Numba"
    if reason:
        print(f"no CUDA device: skipped ({reason})")
        path = write_json(NAME, {"skipped": True, "reason": reason, "headline": []}, quick=args.quick)
        print(f"wrote {path}")
        return 0

    from isle_fast.backend import get_kernels

    cpu, gpu = get_kernels("cpu"), get_kernels("gpu")  # (prepares Numba's CUDA target first)
    dev = Device(args.simulate)
    xp = dev.xp
    quick = args.quick or args.simulate
    k = args.repeat or (1 if quick else 5)
    warm = 0 if args.simulate else 1                         # simulator: correctness only, no timing
    if args.simulate:
        P_lab, P_sc, P_sub, P_subsc, copy_bytes = 256, 96, 128, 64, 1 << 16
    elif args.quick:
        P_lab, P_sc, P_sub, P_subsc, copy_bytes = 1 << 20, 1 << 17, 1 << 18, 1 << 16, 1 << 26
    else:
        P_lab, P_sc, P_sub, P_subsc, copy_bytes = 1 << 26, 1 << 22, 1 << 24, 1 << 21, 1 << 30
    N_lab, N_sc, N_sub, N_subsc = 8, 4, 4, 3
    rng = np.random.default_rng(0)

    log(f"device: {dev.info['name']}; measuring copy bandwidth")
    copy = dev.copy_bandwidth(copy_bytes, k)
    h2d = dev.h2d_bandwidth(copy_bytes, k)
    traffic_bw = copy["traffic_GBps"]

    log("generating data")
    gt_h, sets_h = label_maps(rng, P_lab, N_lab)
    rgt_h, rsets_h = label_maps(rng, P_lab, N_lab, blocky=False)
    sgt_h, slab_h = label_maps(rng, P_sc, N_sc)
    scores_h = score_stacks(rng, slab_h)
    ugt_h, usets_h = label_maps(rng, P_sub, N_sub)
    vgt_h, vlab_h = label_maps(rng, P_subsc, N_subsc)
    vscores_h = score_stacks(rng, vlab_h)
    sel_lab = rng.integers(0, N_lab, C)
    sel_sc = rng.integers(0, N_sc, C)
    prio = rng.random((N_lab, C))
    sub_sel, sub_mem = subsets(N_sub, rng)
    subsc_sel, subsc_mem = subsets(N_subsc, rng)
    prio_sub = rng.random((N_sub, C))
    thr = -1.0                                               # plain argmax, like the CuPy reference

    put = dev.put
    gt_d, sets_d = put(gt_h), [put(s) for s in sets_h]
    rgt_d, rsets_d = put(rgt_h), [put(s) for s in rsets_h]
    sgt_d, scores_d = put(sgt_h), [put(s) for s in scores_h]
    ugt_d, usets_d = put(ugt_h), [put(s) for s in usets_h]
    vgt_d, vscores_d = put(vgt_h), [put(s) for s in vscores_h]
    hb = 2                                                   # float16 bytes

    # (name, gpu call on device data, cpu call on host data, cupy reference or None, traffic bytes, pixels)
    cases: list[tuple[str, Callable, Callable, Callable | None, int, int]] = [
        (f"confusion_labels N={N_lab}", lambda: gpu.confusion_labels(gt_d, sets_d, C),
         lambda: cpu.confusion_labels(gt_h, sets_h, C), lambda: cupy_confusion(xp, gt_d, sets_d),
         (N_lab + 1) * P_lab, P_lab),
        (f"confusion_labels N={N_lab} (random pixels)", lambda: gpu.confusion_labels(rgt_d, rsets_d, C),
         lambda: cpu.confusion_labels(rgt_h, rsets_h, C), lambda: cupy_confusion(xp, rgt_d, rsets_d),
         (N_lab + 1) * P_lab, P_lab),
        (f"confusion_scores N={N_sc} f16", lambda: gpu.confusion_scores(sgt_d, scores_d, C, thr),
         lambda: cpu.confusion_scores(sgt_h, scores_h, C, thr),
         lambda: cupy_confusion(xp, sgt_d, [xp.argmax(s, axis=-1).astype(np.uint8) for s in scores_d]),
         P_sc + N_sc * P_sc * C * hb, P_sc),
        ("decode_scores f16", lambda: gpu.decode_scores(scores_d[0]), lambda: cpu.decode_scores(scores_h[0]),
         lambda: xp.argmax(scores_d[0], axis=-1).astype(np.uint8), P_sc * C * hb + P_sc, P_sc),
        (f"merge_labels N={N_lab}", lambda: gpu.merge_labels(sets_d, sel_lab, prio, gpu.SCORE),
         lambda: cpu.merge_labels(sets_h, sel_lab, prio, cpu.SCORE), None, (N_lab + 1) * P_lab, P_lab),
        (f"merge_scores N={N_sc} f16", lambda: gpu.merge_scores(scores_d, sel_sc, gpu.SCORE),
         lambda: cpu.merge_scores(scores_h, sel_sc, cpu.SCORE), None, 2 * P_sc * C * hb + P_sc, P_sc),
        (f"subset_confusion_labels N={N_sub} S={len(sub_mem)}",
         lambda: gpu.subset_confusion_labels(ugt_d, usets_d, sub_sel, sub_mem, prio_sub, gpu.SCORE, C),
         lambda: cpu.subset_confusion_labels(ugt_h, usets_h, sub_sel, sub_mem, prio_sub, cpu.SCORE, C),
         None, (N_sub + 1) * P_sub, P_sub),
        (f"subset_confusion_scores N={N_subsc} S={len(subsc_mem)} f16",
         lambda: gpu.subset_confusion_scores(vgt_d, vscores_d, subsc_sel, subsc_mem, gpu.SCORE, C),
         lambda: cpu.subset_confusion_scores(vgt_h, vscores_h, subsc_sel, subsc_mem, cpu.SCORE, C),
         None, P_subsc + N_subsc * P_subsc * C * hb, P_subsc),
    ]

    def timed(fn: Callable) -> Any:
        def run() -> Any:
            out = fn()
            dev.sync()
            return out
        return best_of(run, k=k, warmup=warm)

    def as_host(x: Any) -> Any:
        return tuple(dev.host(v) for v in x) if isinstance(x, tuple) else dev.host(x)

    rows = []
    for name, g_fn, c_fn, x_fn, traffic, pixels in cases:
        log(f"  {name}")
        tg = timed(g_fn)
        tc = best_of(c_fn, k=k, warmup=warm)
        got, want = as_host(tg.value), tc.value
        equal = (all(np.array_equal(a, b) for a, b in zip(got, want)) if isinstance(want, tuple)
                 else bool(np.array_equal(got, want)))
        tx = timed(x_fn) if x_fn is not None else None
        gbps = traffic / tg.best / 1e9
        rows.append({
            "kernel": name, "pixels": pixels, "traffic_bytes": traffic, "gpu_seconds": tg.best,
            "gpu_GBps": gbps, "fraction_of_copy": gbps / traffic_bw, "cpu_seconds": tc.best,
            "speedup_vs_cpu": tc.best / tg.best, "cupy_seconds": tx.best if tx else None,
            "speedup_vs_cupy": (tx.best / tg.best) if tx else None, "equal_to_cpu": equal,
        })

    log("end to end from host memory (pinned two-stream pipeline)")
    e2e = []
    for name, g_fn, c_fn, nbytes in [
        (f"confusion_labels N={N_lab} host->device", lambda: gpu.confusion_labels(gt_h, sets_h, C),
         lambda: cpu.confusion_labels(gt_h, sets_h, C), (N_lab + 1) * P_lab),
        (f"confusion_scores N={N_sc} f16 host->device", lambda: gpu.confusion_scores(sgt_h, scores_h, C, thr),
         lambda: cpu.confusion_scores(sgt_h, scores_h, C, thr), P_sc + N_sc * P_sc * C * hb),
        (f"merge_labels N={N_lab} host->device->host", lambda: gpu.merge_labels(sets_h, sel_lab, prio, gpu.SCORE),
         lambda: cpu.merge_labels(sets_h, sel_lab, prio, cpu.SCORE), (N_lab + 1) * P_lab),
    ]:
        log(f"  {name}")
        tg = best_of(g_fn, k=k, warmup=warm)
        tc = best_of(c_fn, k=k, warmup=warm)
        gbps = nbytes / tg.best / 1e9
        e2e.append({"step": name, "host_bytes": nbytes, "gpu_seconds": tg.best, "host_GBps": gbps,
                    "fraction_of_pinned_h2d": gbps / h2d["pinned_GBps"], "cpu_seconds": tc.best,
                    "speedup_vs_cpu": tc.best / tg.best,
                    "equal_to_cpu": bool(np.array_equal(tg.value, tc.value))})

    print(f"\n{dev.info['name']}: device copy {copy['copy_GBps']:.0f} GB/s "
          f"(memory traffic {traffic_bw:.0f} GB/s); host->device pinned {h2d['pinned_GBps']:.1f} GB/s, "
          f"pageable {h2d['pageable_GBps']:.1f} GB/s")
    print(format_table([{
        "kernel": r["kernel"], "MB": f"{r['traffic_bytes'] / 1e6:.0f}", "GPU ms": f"{r['gpu_seconds'] * 1e3:.2f}",
        "GB/s": f"{r['gpu_GBps']:.0f}", "of copy": f"{r['fraction_of_copy']:.0%}",
        "CPU ms": f"{r['cpu_seconds'] * 1e3:.1f}", "x CPU": f"{r['speedup_vs_cpu']:.1f}",
        "CuPy ms": "-" if r["cupy_seconds"] is None else f"{r['cupy_seconds'] * 1e3:.2f}",
        "x CuPy": "-" if r["speedup_vs_cupy"] is None else f"{r['speedup_vs_cupy']:.1f}",
        "equal": r["equal_to_cpu"]} for r in rows]))
    print()
    print(format_table([{
        "end to end": r["step"], "MB": f"{r['host_bytes'] / 1e6:.0f}", "GPU ms": f"{r['gpu_seconds'] * 1e3:.1f}",
        "host GB/s": f"{r['host_GBps']:.1f}", "of pinned H2D": f"{r['fraction_of_pinned_h2d']:.0%}",
        "CPU ms": f"{r['cpu_seconds'] * 1e3:.1f}", "x CPU": f"{r['speedup_vs_cpu']:.1f}",
        "equal": r["equal_to_cpu"]} for r in e2e]))

    headline = [headline_row(f"GPU {r['kernel']}", r["gpu_seconds"], "CPU kernels", r["cpu_seconds"],
                             fraction_of_copy=r["fraction_of_copy"]) for r in rows[:1]]
    headline += [headline_row(f"GPU {r['step']}", r["gpu_seconds"], "CPU kernels", r["cpu_seconds"])
                 for r in e2e[:1]]
    payload = {"skipped": False, "simulated": dev.simulate, "device": dev.info, "num_classes": C,
               "copy_bandwidth": copy, "h2d_bandwidth": h2d, "kernels": rows, "end_to_end": e2e,
               "notes": "traffic = minimal bytes read + written; fraction_of_copy = traffic rate / "
                        "(2 x device memcpy bytes/s). CPU kernels: Numba, all cores, same data, host memory.",
               "headline": headline}
    path = write_json(NAME, payload, quick=quick)
    print(f"\nwrote {path}")
    ok = all(r["equal_to_cpu"] for r in rows + e2e)
    if not ok:
        print("ERROR: a GPU result differs from the CPU kernels", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    t0 = time.perf_counter()
    rc = main()
    log(f"benchmarks.gpu: {time.perf_counter() - t0:.1f} s")
    sys.exit(rc)
