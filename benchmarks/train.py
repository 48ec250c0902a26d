"""Training throughput: the model, the data loader alone, and a short end-to-end run.

``python -m benchmarks.train [--quick] [--images N] [--demo-steps S] [--device D]``

What it measures, in one run:

1. **Model alone** (images/s): DeepLabV3+ forward + backward + SGD step on
   batches already in memory, for the demo's model (``isle demo``'s
   ``TRAIN_DEFAULT``: ``resnet18_w16``, output stride 32, 64-channel head,
   crop 64, batch 8), ResNet-18 (os16, crop 96, batch 8) and, without
   ``--quick``, the paper's ResNet-50 (os16, crop 512; batch 2 on CPU, 16 on
   GPU) with torchvision's ``deeplabv3_resnet50`` (no "+" decoder) as a
   yardstick. Each is timed with the trainer's settings (channels-last, fused
   SGD, threads = cores other processes leave idle,
   :func:`isle_fast.training.runtime.resolve_threads`, following the load as training
   does; ``threads`` lists every count used), on CPU also with the other
   thread count, and against the **reference**: plain PyTorch as the trainer
   ran before (contiguous tensors, per-tensor SGD, one thread per core).
   Without ``--quick`` the demo model and ResNet-18 are timed again while
   another process spins on one core (the shared-machine case), library
   settings vs the reference.
2. **Data loader alone** (images/s): our chunk-aware ``SegmentationDataset``
   + ``ChunkBatchSampler`` (random scale, crop, flip) with 0 and 2 worker
   processes (0 only with ``--quick``), against the **reference**: the same
   augmentation reading ``array[i]`` straight from Zarr in a plain shuffled
   order (every image decodes its whole chunk); on the store each model
   trains on: VOC-like images up to 500 x 500 (``--images``, cached under
   ``benchmarks/results/tmp/``) for ResNet-18/50, the demo data
   (:mod:`isle_fast.synthetic.datasets`, 120-200 px) for the demo model. The loader
   must be at least 3x faster than the model at the same crop
   (``loader_over_model``, 0 workers: what the demo uses).
3. **End to end** ``isle_fast.training.train.train`` with the demo's settings on the
   demo data (trained on its train gt, validated at the end): wall seconds,
   images/s and val mIoU next to the all-background mIoU
   (``--demo-steps``, default the demo's 600; 5 with ``--quick``), and, as
   the reference, the previous demo recipe (full-width ResNet-18, AdamW 2e-3,
   150 steps of 96 px crops; not with ``--quick``).

Writes ``train.json`` to ``benchmarks/results/``. The machine's 1-minute load
average is recorded with the results (shared machines make CPU figures noisy).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .common import bench_parser, format_table, headline_row, log, quiet_progress, tmp_dir, write_json

CLASSES = ["background"] + [f"class{c}" for c in range(1, 21)]


def _make_store_pair(root: Path, n: int, max_side: int, seed: int = 0) -> tuple[str, str]:
    """VOC-like synthetic images (smooth colours, a few shapes, mild noise) and their labels."""
    from isle_fast.stores.stack import create_stack, open_stack

    ip, lp = root / f"images-{n}-{max_side}.zarr", root / f"labels-{n}-{max_side}.zarr"
    try:
        open_stack(ip), open_stack(lp)
        return str(ip), str(lp)
    except Exception:
        pass
    rng = np.random.default_rng(seed)
    shapes = np.stack([rng.integers(max_side * 2 // 3, max_side + 1, n),
                       rng.integers(max_side * 2 // 3, max_side + 1, n)], 1)
    ids = [f"img{i:05d}" for i in range(n)]
    with create_stack(ip, kind="images", classes=CLASSES, ids=ids, shapes=shapes, overwrite=True) as wi, \
            create_stack(lp, kind="gt", classes=CLASSES, ids=ids, shapes=shapes, overwrite=True) as wl:
        for i, (h, w) in enumerate(shapes):
            yy, xx = np.mgrid[0:h, 0:w]
            base = rng.uniform(60, 200, 3)
            img = base + 40 * np.sin(yy[..., None] / rng.uniform(20, 80) + rng.uniform(0, 6, 3))
            lab = np.zeros((h, w), np.uint8)
            for _ in range(int(rng.integers(1, 4))):
                c = int(rng.integers(1, 21))
                cy, cx = rng.uniform(0, h), rng.uniform(0, w)
                r = rng.uniform(20, max_side / 3)
                m = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
                img[m] = rng.uniform(0, 255, 3)
                lab[m] = c
            img += rng.normal(0, 4, img.shape)
            wi.write_image(i, np.clip(img, 0, 255).astype(np.uint8))
            wl.write_image(i, lab)
    return str(ip), str(lp)


class _NaiveDataset(torch.utils.data.Dataset):
    """Reference: one Zarr read per image (its whole chunk decoded), same augmentation as ours."""

    def __init__(self, images: str, labels: str, crop: int, scale_range: tuple[float, float] = (0.5, 2.0)):
        from isle_fast.training.data import SegmentationDataset

        self.aug = SegmentationDataset(images, labels, train=True, crop=crop, scale_range=scale_range)
        self.images, self.labels = images, labels
        self.shapes = self.aug.shapes
        self._arrays = None

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, i: int):
        import zarr

        if self._arrays is None or self._arrays[0] != os.getpid():
            self._arrays = (os.getpid(), zarr.open_group(self.images, mode="r")["rgb"],
                            zarr.open_group(self.labels, mode="r")["labels"])
        _, rgb, lab = self._arrays
        h, w = (int(v) for v in self.shapes[i])
        img, y = self.aug.augment(np.asarray(rgb[i, :h, :w]), np.asarray(lab[i, :h, :w]),
                                  np.random.default_rng(i))
        return (torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))),
                torch.from_numpy(np.ascontiguousarray(y)))

    def __getstate__(self):
        return {**self.__dict__, "_arrays": None}


def _time_loader(loader, set_epoch, epochs: int) -> dict[str, float]:
    """Images/s over ``epochs`` whole epochs of one DataLoader after one untimed warm-up epoch.

    The loader lives across epochs as in training (``train()`` keeps its
    dataset, chunk caches and persistent workers); ``set_epoch(e)`` selects
    the order of epoch ``e``. With 0 workers the chunk decodes of the timed
    epochs are counted (per epoch).
    """
    ds = loader.dataset
    set_epoch(0)
    for _ in loader:
        pass
    before = getattr(ds, "chunks_decoded", 0)
    n, t0 = 0, time.perf_counter()
    for e in range(1, epochs + 1):
        set_epoch(e)
        for x, _ in loader:
            n += x.shape[0]
    dt = time.perf_counter() - t0
    stats = {}
    if hasattr(ds, "chunks_decoded") and loader.num_workers == 0:
        stats["chunks_decoded_per_epoch"] = (ds.chunks_decoded - before) / epochs
    return {"images": n, "seconds": dt, "images_per_s": n / dt if dt > 0 else None, **stats}


def bench_loader(images: str, labels: str, crop: int, batch: int, workers: int, epochs: int,
                 scale_range: tuple[float, float] = (0.5, 2.0)) -> dict[str, Any]:
    """Our loader: ``SegmentationDataset`` + ``ChunkBatchSampler`` through ``make_loader``, as ``train()`` builds it."""
    from isle_fast.training.data import ChunkBatchSampler, SegmentationDataset, chunk_groups, make_loader

    ds = SegmentationDataset(images, labels, train=True, crop=crop, scale_range=scale_range)
    s = ChunkBatchSampler(len(ds), batch, chunk_groups(len(ds), ds.image_chunk, ds.label_chunk),
                          seed=0, num_workers=workers)
    loader = make_loader(ds, s, num_workers=workers)
    r = _time_loader(loader, s.set_epoch, epochs)
    r["chunks_in_store"] = (-(-len(ds) // ds.image_chunk)) + (-(-len(ds) // ds.label_chunk))
    del loader
    return r


def bench_naive_loader(images: str, labels: str, crop: int, batch: int, workers: int,
                       epochs: int, scale_range: tuple[float, float] = (0.5, 2.0)) -> dict[str, Any]:
    """Reference: a plain shuffled DataLoader over :class:`_NaiveDataset` (persistent workers too)."""
    ds = _NaiveDataset(images, labels, crop, scale_range)
    g = torch.Generator().manual_seed(0)
    kw = dict(persistent_workers=True, prefetch_factor=4) if workers else {}
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, drop_last=True, generator=g,
                                         num_workers=workers, **kw)
    r = _time_loader(loader, lambda e: g.manual_seed(e), epochs)
    del loader
    return r


def bench_model(backbone: str, crop: int, batch: int, steps: int, device: torch.device, *,
                output_stride: int = 16, head_channels: int = 256, library: bool = True,
                threads: int | None = None, reference: bool = False, warmup: int = 2) -> dict[str, Any]:
    """Images/s of forward + backward + optimiser step on in-memory batches.

    ``library=True`` uses the settings ``isle_fast.training.train`` uses: channels-last
    tensors, a fused SGD step and the thread count of
    :func:`isle_fast.training.runtime.resolve_threads`, re-chosen by a
    :class:`~isle_fast.training.runtime.ThreadGovernor` as the load changes (``threads`` fixes it).
    ``library=False`` is the plain-PyTorch baseline the trainer had before:
    contiguous tensors, per-tensor SGD, torch's default threads (one per core).
    """
    from isle_fast.training.data import normalize
    from isle_fast.training.deeplab import DeepLabV3Plus
    from isle_fast.training.runtime import ThreadGovernor, resolve_threads, torch_threads

    torch.manual_seed(0)
    if reference:
        from torchvision.models.segmentation import deeplabv3_resnet50

        model = deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=len(CLASSES), aux_loss=False)
        fwd = lambda x: model(x)["out"]  # noqa: E731
    else:
        model = DeepLabV3Plus(len(CLASSES), backbone, None, output_stride, head_channels)
        fwd = model
    model.to(device).train()
    amp = device.type == "cuda"
    fmt = torch.channels_last if library else torch.contiguous_format
    model.to(memory_format=fmt)
    fused = True if library and device.type in ("cpu", "cuda") else None
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4, fused=fused)
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    x8 = torch.randint(0, 256, (batch, 3, crop, crop), dtype=torch.uint8, device=device)
    y = torch.randint(0, len(CLASSES), (batch, crop, crop), device=device)
    n_threads = (threads if threads is not None else
                 resolve_threads(None, device) if library else torch.get_num_threads())
    # as in train(): the automatic thread count follows the load while it runs
    governor = ThreadGovernor(library and threads is None and device.type == "cpu", torch.get_num_threads(),
                              period=2.0)

    def step():
        x = normalize(x8).contiguous(memory_format=fmt)
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            out = fwd(x)
        loss = torch.nn.functional.cross_entropy(out.float(), y, ignore_index=255)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    with torch_threads(n_threads):
        for _ in range(max(1, warmup)):  # warm-up: oneDNN primitive caches, allocator, optimiser state
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        used = set()
        for _ in range(steps):
            step()
            used.add(governor.update())
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    name = ("torchvision deeplabv3_resnet50" if reference
            else f"DeepLabV3+ {backbone} os{output_stride} h{head_channels}")
    return {"model": name, "settings": "library" if library else "plain torch",
            "threads": "/".join(str(t) for t in sorted(used | {n_threads})), "threads_start": n_threads,
            "crop": crop, "batch": batch, "steps": steps, "seconds": dt, "images_per_s": batch * steps / dt}


@contextlib.contextmanager
def _busy_core():
    """Another process keeps one core busy (a pure-Python spin loop) while the block runs."""
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        yield
    finally:
        spin.kill()
        spin.wait()


def _demo_data(root: Path, n_images: int) -> dict[str, str]:
    """The demo's synthetic VOC-like data (isle_fast.synthetic.datasets, seed 0), cached; its store paths."""
    import json

    from isle_fast.synthetic.datasets import make_voc_like

    out = root / f"demo-data-{n_images}"
    index = root / f"demo-data-{n_images}.json"
    if index.is_file():
        stores = json.loads(index.read_text())
        if all(os.path.isdir(p) for p in stores.values()):
            return stores
    ds = make_voc_like(out, n_images=n_images, seed=0, soft_sets=(), write_tree=False, keep_arrays=False,
                       overwrite=True)
    stores = {k: str(v) for k, v in ds.stores.items()}
    index.write_text(json.dumps(stores))
    return stores


#: The demo's training settings before this benchmark's figures led to TRAIN_DEFAULT (the reference
#: row of the end-to-end table): full-width ResNet-18, AdamW 2e-3, 150 steps of 8 crops of 96 px.
OLD_DEMO = dict(backbone="resnet18", output_stride=32, head_channels=64, steps=150, crop=96, batch_size=8,
                scale_range=(0.5, 1.0), optimizer="adamw", lr=2e-3)


def bench_demo_train(root: Path, steps: int | None, n_images: int = 64, old: bool = False) -> dict[str, Any]:
    """``train()`` with the demo's settings (``isle demo``'s TRAIN_DEFAULT, or OLD_DEMO) on the demo data."""
    from isle_fast.demo import TRAIN_DEFAULT
    from isle_fast.training.train import train

    stores = _demo_data(root, n_images)
    cfg = dict(OLD_DEMO if old else TRAIN_DEFAULT)
    if steps is not None:
        cfg["steps"] = steps
    steps = cfg["steps"]
    out = root / "demo-run"
    t0 = time.perf_counter()
    res = train(stores["train/images"], stores["train/gt"], out, val_images=stores["val/images"],
                val_gt=stores["val/gt"], weights="none", num_workers=0, val_every=0, ckpt_every=0, log_every=10,
                overwrite=True, quiet=True, **cfg)
    wall = time.perf_counter() - t0
    desc = (f"{cfg['backbone']} os{cfg['output_stride']} h{cfg['head_channels']}, crop {cfg['crop']}, batch "
            f"{cfg['batch_size']}, {cfg['optimizer']} lr {cfg['lr']}, threads {cfg.get('threads') or 'auto'}, "
            "0 workers, validation at the end, "
            "trained on the train gt")
    return {"recipe": "previous demo" if old else "demo", "config": desc, "images": n_images, "steps": steps,
            "wall_seconds": wall, "seconds_per_step": wall / steps, "train_images_per_s": res.images_per_s,
            "val_miou": res.final_miou, "background_miou": res.background_miou}


def main(argv: list[str] | None = None) -> int:
    p = bench_parser("train", "Training throughput: model, data loader alone, end-to-end demo runs.")
    p.add_argument("--images", type=int, default=None, help="images in the VOC-sized loader benchmark store")
    p.add_argument("--demo-steps", type=int, default=None, help="steps of the end-to-end demo training")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    from isle_fast.demo import TRAIN_DEFAULT
    from isle_fast.training.runtime import resolve_device

    dev = resolve_device(args.device)
    quick = args.quick
    cpu = dev.type == "cpu"
    n = args.images or (16 if quick else 128)
    demo_steps = args.demo_steps or (5 if quick else TRAIN_DEFAULT["steps"])
    n_demo = 16 if quick else 64
    epochs = 2 if quick else 3
    root = tmp_dir() / "train"
    root.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()[0]
    demo_cfg = dict(backbone=TRAIN_DEFAULT["backbone"], output_stride=TRAIN_DEFAULT["output_stride"],
                    head_channels=TRAIN_DEFAULT["head_channels"])
    # (label, model kwargs, crop, batch, loader store, steps); the demo's model first; scales: the demo's
    # (0.5-1.0) for the demo model, the paper's (0.5-2.0) for the others
    configs = [("demo", demo_cfg, TRAIN_DEFAULT["crop"], TRAIN_DEFAULT["batch_size"], "demo",
                10 if quick else 60),
               ("resnet18", dict(backbone="resnet18", output_stride=16, head_channels=256), 96, 4 if quick else 8,
                "voc", 2 if quick else 8)]
    if not quick:
        configs.append(("paper", dict(backbone="resnet50", output_stride=16, head_channels=256), 512,
                        2 if cpu else 16, "voc", 2 if cpu else 20))
    with quiet_progress():
        log(f"stores: {n} VOC-like images up to 500 x 500; the demo data ({n_demo} images of 120-200 px)")
        voc = _make_store_pair(root, n, 500)
        demo = _demo_data(root, n_demo)
        stores = {"voc": voc, "demo": (demo["train/images"], demo["train/gt"])}
        model_rows, loader_rows, ratio_rows = [], [], []
        for label, mkw, crop, batch, store, steps in configs:
            log(f"model: {mkw['backbone']} crop {crop} batch {batch}, {steps} steps on {dev}, library settings")
            wu = 1 if quick else 2
            ours = bench_model(crop=crop, batch=batch, steps=steps, device=dev, warmup=wu, **mkw)
            model_rows.append(ours)
            if cpu and not quick:  # the other thread count, to show what the automatic choice gained
                for t in sorted({1, torch.get_num_threads()} - {ours["threads_start"]}):
                    log(f"model: the same with {t} thread(s)")
                    model_rows.append(bench_model(crop=crop, batch=batch, steps=steps, device=dev, threads=t,
                                                  warmup=wu, **mkw))
            if cpu:
                log("model: the same, plain torch (contiguous, per-tensor SGD, a thread per core)")
                model_rows.append(bench_model(crop=crop, batch=batch, steps=max(1, steps // 2) if quick else steps,
                                              device=dev, library=False, warmup=wu, **mkw))
            if label == "paper":
                log("model reference: torchvision deeplabv3_resnet50")
                model_rows.append(bench_model("resnet50", crop, batch, 1 if cpu else steps, dev, reference=True))
            ip, lp = stores[store]
            for workers in ((0,) if quick else (0, 2)):
                log(f"loader: {store} store, crop {crop} batch {batch}, {workers} workers (ours, then reference)")
                scales = tuple(TRAIN_DEFAULT["scale_range"]) if store == "demo" else (0.5, 2.0)
                lo = bench_loader(ip, lp, crop, batch, workers, epochs, scales)
                ref = bench_naive_loader(ip, lp, crop, batch, workers, epochs, scales)
                loader_rows.append({"store": store, "crop": crop, "batch": batch, "workers": workers,
                                    "ours_images_per_s": lo["images_per_s"],
                                    "reference_images_per_s": ref["images_per_s"],
                                    "speedup": lo["images_per_s"] / ref["images_per_s"],
                                    "chunks_decoded": lo.get("chunks_decoded_per_epoch"),
                                    "chunks_in_store": lo.get("chunks_in_store")})
            mine = [r for r in loader_rows if r["crop"] == crop and r["store"] == store]
            ratio_rows.append({"crop": crop, "model": ours["model"], "model_images_per_s": ours["images_per_s"],
                               "loader_workers": 0, "loader_images_per_s": mine[0]["ours_images_per_s"],
                               "loader_over_model": mine[0]["ours_images_per_s"] / ours["images_per_s"],
                               "best_loader_over_model": max(r["ours_images_per_s"] for r in mine)
                               / ours["images_per_s"]})
        contended = []
        if cpu and not quick and (os.cpu_count() or 1) >= 2:
            # the shared-machine case: another process spins on one core; our threads choice vs one per core
            for label, mkw, crop, batch, store, steps in configs[:2]:
                n_steps = max(2, steps // 3)
                with _busy_core():
                    log(f"model under load (one core busy elsewhere): {mkw['backbone']}, library settings")
                    a = bench_model(crop=crop, batch=batch, steps=n_steps, device=dev, warmup=1, **mkw)
                    log(f"model under load: {mkw['backbone']}, plain torch")
                    b = bench_model(crop=crop, batch=batch, steps=n_steps, device=dev, library=False, warmup=1,
                                    **mkw)
                for r in (a, b):
                    r["load"] = "one core busy elsewhere"
                contended.append({"model": a["model"], "crop": crop, "library_threads": a["threads"],
                                  "library_images_per_s": a["images_per_s"], "plain_threads": b["threads"],
                                  "plain_images_per_s": b["images_per_s"],
                                  "speedup": a["images_per_s"] / b["images_per_s"]})
                model_rows += [a, b]
        log(f"end to end: train() with the demo's settings, {demo_steps} steps")
        demo_rows = [bench_demo_train(root, demo_steps, n_images=n_demo)]
        if not quick:
            log("end to end, reference: the previous demo recipe (resnet18, AdamW 2e-3, 150 steps, crop 96)")
            demo_rows.append(bench_demo_train(root, None, n_images=n_demo, old=True))
        demo_row = demo_rows[0]
    load1 = os.getloadavg()[0]

    print(f"\nDeepLabV3+ training throughput on {dev} (load average {load0:.1f} -> {load1:.1f}, "
          f"{os.cpu_count()} logical cores)\n")
    print("model alone (forward + backward + SGD step, batches in memory); library = channels-last, fused SGD, "
          "threads = idle cores")
    print(format_table(model_rows, ["model", "settings", "threads", "crop", "batch", "steps", "seconds",
                                    "images_per_s", "load"]))
    if contended:
        print("\nmodel alone with one core busy elsewhere (a spinning process): the trainer's thread choice "
              "vs a thread per core")
        print(format_table(contended, ["model", "crop", "library_threads", "library_images_per_s", "plain_threads",
                                       "plain_images_per_s", "speedup"]))
    print("\ndata loader alone: ours (chunk-aware) vs reference (one Zarr read per image, shuffled)")
    print(format_table(loader_rows, ["store", "crop", "batch", "workers", "ours_images_per_s",
                                     "reference_images_per_s", "speedup", "chunks_decoded", "chunks_in_store"]))
    print("\nloader (0 workers, and the best) vs model with library settings (must be >= 3)")
    print(format_table(ratio_rows, ["crop", "model", "model_images_per_s", "loader_images_per_s",
                                    "loader_over_model", "best_loader_over_model"]))
    print("\nend to end: isle_fast.training.train.train with the demo's settings on the demo data (trained on its gt)")
    print(format_table(demo_rows, ["recipe", "steps", "wall_seconds", "seconds_per_step", "train_images_per_s",
                                   "val_miou",
                                    "background_miou"]))
    headline = []
    for r in ratio_rows:
        plain = next((m for m in model_rows if m["model"] == r["model"] and m["settings"] == "plain torch"), None)
        headline.append(headline_row(f"{r['model']} crop {r['crop']} training (images/s)", None,
                                     "plain torch" if plain else None, None,
                                     model_images_per_s=r["model_images_per_s"],
                                     plain_images_per_s=plain["images_per_s"] if plain else None,
                                     speedup=r["model_images_per_s"] / plain["images_per_s"] if plain else None,
                                     loader_over_model=r["loader_over_model"]))
    for r in contended:
        headline.append(headline_row(f"{r['model']} crop {r['crop']} training with one core busy elsewhere "
                                     "(images/s)", None, "plain torch, a thread per core", None,
                                     model_images_per_s=r["library_images_per_s"],
                                     plain_images_per_s=r["plain_images_per_s"], speedup=r["speedup"]))
    for r in loader_rows:
        if r["workers"] == 0:
            headline.append(headline_row(f"loader {r['store']} store crop {r['crop']} (images/s, 0 workers)",
                                         None, "per-image Zarr reads", None,
                                         ours_images_per_s=r["ours_images_per_s"],
                                         reference_images_per_s=r["reference_images_per_s"],
                                         speedup=r["speedup"]))
    headline.append(headline_row(f"demo training, {demo_row['steps']} steps ({TRAIN_DEFAULT['backbone']}, crop "
                                 f"{TRAIN_DEFAULT['crop']}): val mIoU {demo_row['val_miou']:.1f} vs all-background "
                                 f"{demo_row['background_miou']:.1f}", demo_row["wall_seconds"]))
    if len(demo_rows) > 1:
        r = demo_rows[1]
        headline.append(headline_row(f"previous demo training, {r['steps']} steps (resnet18, AdamW, crop 96): val "
                                     f"mIoU {r['val_miou']:.1f} vs all-background {r['background_miou']:.1f}",
                                     r["wall_seconds"]))
    path = write_json("train", {"device": str(dev), "store_images": n, "demo_images": n_demo,
                                "load_average_start": load0, "load_average_end": load1, "model": model_rows,
                                "loader": loader_rows, "loader_vs_model": ratio_rows, "under_load": contended,
                                "demo_train": demo_rows,
                                "headline": headline},
                      quick=quick)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
