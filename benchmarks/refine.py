"""Refinement stage (ISLE step 1): dense CRF and AffinityNet random-walk timings.

``python -m benchmarks.refine [--quick]``

Measures, on synthetic VOC-sized images (500 x 375, 21 classes, a few objects
with blurry CAM-like scores):

* **CRF per image**: ``isle_fast.refinement.crf.crf_image`` (label set restricted to the
  image's classes) next to the reference, a direct pydensecrf call over all 21
  classes (what a plain script does);
* **CRF scaling** over a store with :func:`isle_fast.refinement.chain.refine_stack`:
  1 worker (in process), 2 threads, 2 processes (Dask's process pool) and, if
  it starts, a 2-process ``dask.distributed.LocalCluster``. pydensecrf holds
  the GIL, so threads cannot scale; processes can;
* **the lead's demo size**: 64 images of about 160 x 120 through
  ``refine_stack(chain=['crf'])`` with the default scheduler;
* **random walk per image** (63 x 47 grid at stride 8, radius 5, 64 steps):
  the Numba stencil kernel next to the authors' formulation, a dense
  ``N x N`` transition matrix squared ``logt`` times (torch matmul), and the
  whole AffinityNet inference (ResNet-50 forward, random weights, + walk).

Writes ``benchmarks/results/refine.json``. Timings are best-of-k wall clock on
whatever machine runs it (the JSON records the machine); ``--quick`` uses tiny
sizes and its numbers mean nothing.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from .common import bench_parser, best_of, format_table, headline_row, log, quiet_progress, write_json


def _scenes(n: int, h: int, w: int, num_classes: int, seed: int = 0):
    from isle_fast.synthetic.scene import synthetic_scene

    out = []
    for i in range(n):
        rgb, gt, sc = synthetic_scene(h, w, num_classes, objects=3, blur=max(2.0, h / 40), shift=max(1, h // 60),
                                      rng=seed + i)
        out.append((rgb, gt, sc))
    return out


def write_scene_stores(root: Path, scenes, num_classes: int):
    """``root/images.zarr`` + ``root/cams.zarr`` (uint8 scores) of synthetic CRF scenes; their paths."""
    from isle_fast.stores.stack import create_stack

    classes = ["background"] + [f"class{c}" for c in range(1, num_classes)]
    ids = [f"{i:05d}" for i in range(len(scenes))]
    shapes = [s[0].shape[:2] for s in scenes]
    img, src = root / "images.zarr", root / "cams.zarr"
    with create_stack(img, kind="images", classes=classes, ids=ids, shapes=shapes) as wr:
        for i, s in enumerate(scenes):
            wr.write_image(i, s[0])
    with create_stack(src, kind="pseudo", classes=classes, ids=ids, shapes=shapes, encoding="scores") as wr:
        for i, s in enumerate(scenes):
            wr.write_image(i, np.rint(s[2] * 255).astype(np.uint8))
    return str(img), str(src)


def _direct_crf_all_classes(rgb, sc, iterations=10):
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    h, w, c = sc.shape
    d = dcrf.DenseCRF2D(w, h, c)
    d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(np.moveaxis(sc, -1, 0))))
    d.addPairwiseGaussian(sxy=3, compat=3)
    d.addPairwiseBilateral(sxy=80, srgb=13, rgbim=np.ascontiguousarray(rgb), compat=10)
    return np.asarray(d.inference(iterations)).reshape(c, h, w).argmax(0)


def bench_crf_image(scenes, repeat: int) -> dict:
    from isle_fast.refinement.crf import crf_image

    c = scenes[0][2].shape[-1]

    def ours():
        return [crf_image(r, s, "scores", c) for r, _, s in scenes]

    def ref():
        return [_direct_crf_all_classes(r, s) for r, _, s in scenes]

    t_ours = best_of(ours, k=repeat, warmup=1)
    t_ref = best_of(ref, k=repeat, warmup=0)
    n = len(scenes)
    same = sum(int(set(np.unique(a)) <= set(np.unique(s.argmax(-1))) | {0}) for a, (_, _, s) in
               zip(t_ours["value"], scenes))
    return {"images": n, "seconds_per_image": t_ours["best"] / n,
            "reference_seconds_per_image": t_ref["best"] / n,
            "speedup": t_ref["best"] / t_ours["best"], "kept_classes_ok": same}


def bench_crf_scaling(img: str, src: str, n: int, root: Path, repeat: int, cluster: bool = True) -> list[dict]:
    from isle_fast.refinement.chain import refine_stack

    rows = []
    configs = [("1 worker (in process)", dict(workers=1, scheduler="sync")),
               ("2 threads", dict(workers=2, scheduler="threads")),
               ("2 processes", dict(workers=2, scheduler="processes"))]
    for label, kw in configs:
        out = root / f"crf-{label.split()[0]}-{kw['scheduler']}.zarr"

        def run(out=out, kw=kw):
            refine_stack(src, img, out, ["crf"], workers=kw["workers"], scheduler=kw["scheduler"],
                         images_per_task=1, overwrite=True, progress=False)

        t = best_of(run, k=repeat, warmup=0)
        rows.append({"config": label, "seconds": t["best"], "seconds_per_image": t["best"] / n})
    # a 2-process distributed LocalCluster, if one starts here
    try:
        if not cluster:
            raise RuntimeError("not in --quick mode")
        from dask.distributed import Client, LocalCluster

        t0 = time.perf_counter()
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cl, \
                Client(cl) as client:
            startup = time.perf_counter() - t0
            out = root / "crf-distributed.zarr"

            def run_d():
                refine_stack(src, img, out, ["crf"], client=client, workers=2, images_per_task=1,
                             overwrite=True, progress=False)

            t = best_of(run_d, k=repeat, warmup=1)
        rows.append({"config": "2-process LocalCluster", "seconds": t["best"], "seconds_per_image": t["best"] / n,
                     "cluster_startup_seconds": startup})
    except Exception as exc:  # no sockets, etc.
        log(f"LocalCluster skipped: {type(exc).__name__}: {exc}")
    base = rows[0]["seconds"]
    for r in rows:
        r["speedup_vs_1"] = base / r["seconds"]
    return rows


def bench_demo_size(root: Path, n: int, h: int, w: int, repeat: int) -> dict:
    from isle_fast.refinement.chain import refine_stack

    scenes = _scenes(n, h, w, 21, seed=100)
    d = root / "demo"
    d.mkdir()
    img, src = write_scene_stores(d, scenes, 21)
    res = {}
    for label, kw in (("workers=2, scheduler=auto", dict(workers=2)),
                      ("workers=2, scheduler=processes", dict(workers=2, scheduler="processes")),
                      ("workers=1", dict(workers=1))):
        def run(kw=kw):
            return refine_stack(src, img, d / "out.zarr", ["crf"], overwrite=True, progress=False, **kw)

        t = best_of(run, k=repeat, warmup=0)
        res[f"{label} (ran: {t['value'].provenance['scheduler']})"] = t["best"]
    return {"images": n, "size": [h, w], "seconds": res}


def bench_random_walk(h: int, w: int, num_classes: int, repeat: int, with_network: bool,
                      backbone: str = "resnet50") -> dict:
    import torch

    from isle_fast.kernels.refine_cpu import disc_offsets, normalise_rows, random_walk
    from isle_fast.refinement.affinity import AffinityNet, random_walk_image

    rng = np.random.default_rng(0)
    stride, radius, logt, beta = 8, 5, 6, 8.0
    gh, gw = math.ceil(h / stride), math.ceil(w / stride)
    offsets = disc_offsets(radius)
    weights = (rng.random((gh, gw, len(offsets))).astype(np.float32)) ** beta
    v = rng.random((gh, gw, num_classes)).astype(np.float32)
    trans = normalise_rows(weights, offsets)
    t_ours = best_of(lambda: random_walk(trans, offsets, v, 2 ** logt), k=repeat, warmup=1)

    # the authors' formulation: dense N x N transition, squared logt times, then one product
    n = gh * gw
    dense = np.zeros((n, n), dtype=np.float32)
    ys, xs = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
    for k, (dy, dx) in enumerate(offsets):
        yy, xx = ys + dy, xs + dx
        ok = (yy >= 0) & (yy < gh) & (xx >= 0) & (xx < gw)
        dense[(ys * gw + xs)[ok], (yy * gw + xx)[ok]] = trans[..., k][ok]
    td = torch.as_tensor(dense)
    tv = torch.as_tensor(v.reshape(n, num_classes))

    def ref():
        t = td
        for _ in range(logt):
            t = t @ t
        return (t @ tv).numpy().reshape(gh, gw, num_classes)

    t_ref = best_of(ref, k=max(1, repeat // 2), warmup=0)
    err = float(np.abs(t_ref["value"] - t_ours["value"]).max())
    out = {"grid": [gh, gw], "offsets": len(offsets), "steps": 2 ** logt, "classes": num_classes,
           "walk_seconds": t_ours["best"], "dense_squaring_seconds": t_ref["best"],
           "speedup": t_ref["best"] / t_ours["best"], "max_abs_difference": err}
    if with_network:
        torch.manual_seed(0)
        model = AffinityNet(backbone, None, stride=stride).eval()
        rgb, _, sc = _scenes(1, h, w, num_classes)[0]
        t_full = best_of(lambda: random_walk_image(model, rgb, sc, "scores", num_classes, radius=radius,
                                                   logt=logt), k=max(1, repeat // 2), warmup=1)
        out["affinitynet_image_seconds"] = t_full["best"]
        out["backbone"] = backbone
        out["torch_threads"] = torch.get_num_threads()
    return out


def main(argv=None) -> int:
    p = bench_parser("refine", __doc__.splitlines()[0])
    args = p.parse_args(argv)
    quick = args.quick
    repeat = args.repeat or (1 if quick else 3)
    h, w = (75, 100) if quick else (375, 500)
    n_img = 2 if quick else 4
    n_scale = 4 if quick else 8
    root = Path(tempfile.mkdtemp(prefix="isle-bench-refine-"))
    try:
        with quiet_progress():
            log(f"CRF per image ({n_img} images of {w} x {h}, 21 classes)")
            scenes = _scenes(n_img, h, w, 21)
            crf1 = bench_crf_image(scenes, repeat)
            log(f"CRF scaling ({n_scale} images)")
            img, src = write_scene_stores(root, _scenes(n_scale, h, w, 21, seed=50), 21)
            scaling = bench_crf_scaling(img, src, n_scale, root, repeat, cluster=not quick)
            log("CRF at the demo's size")
            demo = bench_demo_size(root, 8 if quick else 64, 60 if quick else 120, 80 if quick else 160,
                                   1 if quick else 2)
            log("random walk")
            rw = bench_random_walk(h, w, 4 if quick else 21, repeat, with_network=True,
                                   backbone="resnet18" if quick else "resnet50")
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(f"\nDense CRF, one {w} x {h} image, 21 classes (10 iterations):")
    print(format_table([{"implementation": "isle_fast.refinement.crf (image's classes only)",
                         "s/image": crf1["seconds_per_image"]},
                        {"implementation": "direct pydensecrf, all 21 classes (reference)",
                         "s/image": crf1["reference_seconds_per_image"]}]))
    print(f"  ratio {crf1['speedup']:.2f}x")
    print(f"\nCRF over a store of {n_scale} images (refine_stack, 1 image per task):")
    print(format_table(scaling, ["config", "seconds", "seconds_per_image", "speedup_vs_1"]))
    print(f"\nCRF on {demo['images']} images of {demo['size'][1]} x {demo['size'][0]} (the demo's size):")
    print(format_table([{"config": k, "seconds": v} for k, v in demo["seconds"].items()]))
    print(f"\nRandom walk, {rw['grid'][1]} x {rw['grid'][0]} grid, {rw['offsets']} neighbours, "
          f"{rw['steps']} steps, {rw['classes']} classes:")
    print(format_table([{"implementation": "stencil kernel (kernels.refine_cpu.random_walk)",
                         "seconds": rw["walk_seconds"]},
                        {"implementation": "dense N x N squared logt times (reference)",
                         "seconds": rw["dense_squaring_seconds"]}]))
    print(f"  ratio {rw['speedup']:.1f}x, max |difference| {rw['max_abs_difference']:.2e}")
    if "affinitynet_image_seconds" in rw:
        print(f"  whole AffinityNet inference per image ({rw['backbone']} forward on CPU + walk): "
              f"{rw['affinitynet_image_seconds']:.2f} s")

    best_proc = next((r for r in scaling if r["config"] == "2 processes"), None)
    thr = next((r for r in scaling if r["config"] == "2 threads"), None)
    headline = [
        headline_row("CRF, one 500x375 image" if not quick else "CRF, one image", crf1["seconds_per_image"],
                     "direct pydensecrf, all classes", crf1["reference_seconds_per_image"]),
        headline_row("CRF store, 2 processes vs 1 worker", best_proc["seconds"], "1 worker",
                     scaling[0]["seconds"]) if best_proc else None,
        headline_row("CRF store, 2 threads vs 1 worker", thr["seconds"], "1 worker",
                     scaling[0]["seconds"]) if thr else None,
        headline_row("random walk, one image (64 steps)", rw["walk_seconds"], "dense squaring (torch)",
                     rw["dense_squaring_seconds"]),
    ]
    path = write_json("refine", {"headline": [r for r in headline if r], "crf_image": crf1,
                                 "crf_scaling": scaling, "crf_demo_size": demo, "random_walk": rw,
                                 "note": "measured on a shared machine; other jobs were running"},
                      quick=quick)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
