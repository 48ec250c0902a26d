"""Training throughput: the model, the data loader alone, and short end-to-end runs.

``python -m benchmarks.train [--quick] [--images N] [--demo-steps S] [--device D]``

What it measures, in one run:

1. **Data loader alone** (images/s) on a VOC-like images + labels store pair
   (``--images`` synthetic images up to 500 x 500, default chunks and
   compression, cached under ``benchmarks/results/tmp/``): our chunk-aware
   ``SegmentationDataset`` + ``ChunkBatchSampler`` (random scale, crop, flip)
   with 0 and 2 worker processes, against the **reference**: the same
   augmentation reading ``array[i]`` straight from Zarr in a plain shuffled
   order (what a per-image Dataset over a chunked store does; every image
   decodes its whole chunk). Chunk decodes per epoch are counted for ours.
2. **Model alone** (images/s): DeepLabV3+ forward + backward + SGD step on
   batches already in memory, for the demo configuration (ResNet-18, crop 96,
   batch 8) and the paper's (ResNet-50, crop 512; batch 2 on CPU, 16 on GPU),
   with torchvision's ``deeplabv3_resnet50`` (no "+" decoder) as a reference
   yardstick for the ResNet-50 row. The loader must be at least 3x faster
   than the model at the same crop (``loader_over_model``).
3. **End to end** ``isle_fast.train.train`` for ``--demo-steps`` steps of the
   demo configuration (ResNet-18, crop 96, batch 8, SGD, whole validation at
   the end): wall seconds, what the lead wires into ``isle demo``.

Writes ``train.json`` to ``benchmarks/results/``. The machine's 1-minute load
average is recorded with the results (shared machines make CPU figures noisy).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .common import (bench_parser, format_table, headline_row, log, quiet_progress, tmp_dir,
                     write_json)

CLASSES = ["background"] + [f"class{c}" for c in range(1, 21)]


def _make_store_pair(root: Path, n: int, max_side: int, seed: int = 0) -> tuple[str, str]:
    """VOC-like synthetic images (smooth colours, a few shapes, mild noise) and their labels."""
    from isle_fast.store import create_stack, open_stack

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

    def __init__(self, images: str, labels: str, crop: int):
        from isle_fast.data import SegmentationDataset

        self.aug = SegmentationDataset(images, labels, train=True, crop=crop)
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


def _time_loader(make, epochs: int) -> dict[str, float]:
    """Images/s over ``epochs`` whole epochs after one untimed warm-up epoch.

    ``make(epoch)`` returns a fresh DataLoader for that epoch (fresh worker
    processes, so every timed epoch starts with empty chunk caches: no
    cross-epoch cache hits flatter our loader). Worker start-up is timed.
    """
    stats = {}
    for _ in make(0):
        pass
    n, dt = 0, 0.0
    for e in range(1, epochs + 1):
        loader = make(e)
        t0 = time.perf_counter()
        for x, _ in loader:
            n += x.shape[0]
        dt += time.perf_counter() - t0
        ds = loader.dataset
        if hasattr(ds, "chunks_decoded") and loader.num_workers == 0:
            stats["chunks_decoded_per_epoch"] = ds.chunks_decoded
        del loader
    return {"images": n, "seconds": dt, "images_per_s": n / dt if dt > 0 else None, **stats}


def bench_loader(images: str, labels: str, crop: int, batch: int, workers: int, epochs: int) -> dict[str, Any]:
    from isle_fast.data import ChunkBatchSampler, SegmentationDataset, chunk_groups, make_loader

    def make(epoch: int):
        ds = SegmentationDataset(images, labels, train=True, crop=crop)
        s = ChunkBatchSampler(len(ds), batch, chunk_groups(len(ds), ds.image_chunk, ds.label_chunk),
                              seed=0, num_workers=workers)
        s.set_epoch(epoch)
        return make_loader(ds, s, num_workers=workers)

    r = _time_loader(make, epochs)
    ds = SegmentationDataset(images, labels, train=True, crop=crop)
    r["chunks_in_store"] = (-(-len(ds) // ds.image_chunk)) + (-(-len(ds) // ds.label_chunk))
    return r


def bench_naive_loader(images: str, labels: str, crop: int, batch: int, workers: int,
                       epochs: int) -> dict[str, Any]:
    ds = _NaiveDataset(images, labels, crop)

    def make(epoch: int):
        g = torch.Generator().manual_seed(epoch)
        return torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, drop_last=True, generator=g,
                                           num_workers=workers)

    return _time_loader(make, epochs)


def bench_model(backbone: str, crop: int, batch: int, steps: int, device: torch.device,
                reference: bool = False) -> dict[str, Any]:
    """Images/s of forward + backward + SGD step on in-memory batches."""
    from isle_fast.data import normalize
    from isle_fast.deeplab import DeepLabV3Plus

    torch.manual_seed(0)
    if reference:
        from torchvision.models.segmentation import deeplabv3_resnet50

        model = deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=len(CLASSES), aux_loss=False)
        fwd = lambda x: model(x)["out"]  # noqa: E731
    else:
        model = DeepLabV3Plus(len(CLASSES), backbone, None, 16)
        fwd = model
    model.to(device).train()
    amp = device.type == "cuda"
    if amp:
        model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    x8 = torch.randint(0, 256, (batch, 3, crop, crop), dtype=torch.uint8, device=device)
    y = torch.randint(0, len(CLASSES), (batch, crop, crop), device=device)

    def step():
        x = normalize(x8)
        if amp:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            out = fwd(x)
        loss = torch.nn.functional.cross_entropy(out.float(), y, ignore_index=255)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return {"model": "torchvision deeplabv3_resnet50" if reference else f"DeepLabV3+ {backbone} os16",
            "crop": crop, "batch": batch, "steps": steps, "seconds": dt, "images_per_s": batch * steps / dt}


def bench_demo_train(root: Path, steps: int, n_train: int = 64, n_val: int = 16) -> dict[str, Any]:
    """``train()`` in the demo configuration on small VOC-like stores; wall seconds."""
    from isle_fast.train import train

    ip, lp = _make_store_pair(root, n_train, 160, seed=1)
    vi, vg = _make_store_pair(root, n_val, 159, seed=2)
    out = root / "demo-run"
    t0 = time.perf_counter()
    res = train(ip, lp, out, val_images=vi, val_gt=vg, backbone="resnet18", weights="none", crop=96,
                batch_size=8, steps=steps, num_workers=2, val_every=0, ckpt_every=0, log_every=10,
                overwrite=True, quiet=True)
    wall = time.perf_counter() - t0
    return {"config": "resnet18 os16, crop 96, batch 8, SGD lr 0.01, 2 workers, validation at the end",
            "train_images": n_train, "val_images": n_val, "steps": steps, "wall_seconds": wall,
            "seconds_per_step": wall / steps, "projected_150_steps_seconds": 150 * wall / steps,
            "train_images_per_s": res.images_per_s,
            "val_miou": res.final_miou, "background_miou": res.background_miou}


def main(argv: list[str] | None = None) -> int:
    p = bench_parser("train", "Training throughput: model, data loader alone, end-to-end demo runs.")
    p.add_argument("--images", type=int, default=None, help="images in the loader benchmark store")
    p.add_argument("--demo-steps", type=int, default=None, help="steps of the end-to-end demo training")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    from isle_fast.predict import resolve_device

    dev = resolve_device(args.device)
    quick = args.quick
    n = args.images or (16 if quick else 128)
    demo_steps = args.demo_steps or (4 if quick else 150)
    epochs = 2
    root = tmp_dir() / "train"
    root.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()[0]
    with quiet_progress():
        log(f"store: {n} images up to 500 x 500")
        ip, lp = _make_store_pair(root, n, 500)
        configs = [("resnet18", 96, 8)]
        big_batch = 16 if dev.type == "cuda" else 2
        configs.append(("resnet50", 512, big_batch))
        model_rows, loader_rows, ratio_rows = [], [], []
        for backbone, crop, batch in configs:
            steps = 2 if (dev.type == "cpu" and crop >= 512) else (3 if quick else 10)
            if dev.type == "cuda":
                steps *= 5
            log(f"model: {backbone} crop {crop} batch {batch}, {steps} steps on {dev}")
            model_rows.append(bench_model(backbone, crop, batch, steps, dev))
            if backbone == "resnet50":
                log("model reference: torchvision deeplabv3_resnet50")
                ref_steps = 1 if dev.type == "cpu" else steps
                model_rows.append(bench_model(backbone, crop, batch, ref_steps, dev, reference=True))
            for workers in (0, 2):
                log(f"loader: crop {crop} batch {batch}, {workers} workers (ours, then reference)")
                ours = bench_loader(ip, lp, crop, batch, workers, epochs)
                ref = bench_naive_loader(ip, lp, crop, batch, workers, epochs)
                loader_rows.append({"crop": crop, "batch": batch, "workers": workers,
                                    "ours_images_per_s": ours["images_per_s"],
                                    "reference_images_per_s": ref["images_per_s"],
                                    "speedup": ours["images_per_s"] / ref["images_per_s"],
                                    "chunks_decoded": ours.get("chunks_decoded_per_epoch"),
                                    "chunks_in_store": ours.get("chunks_in_store")})
            best_loader = max(r["ours_images_per_s"] for r in loader_rows if r["crop"] == crop)
            mod = next(r for r in model_rows if r["crop"] == crop and r["model"].startswith("DeepLabV3+"))
            ratio_rows.append({"crop": crop, "model": mod["model"], "model_images_per_s": mod["images_per_s"],
                               "loader_images_per_s": best_loader,
                               "loader_over_model": best_loader / mod["images_per_s"]})
        log(f"end to end: train() demo configuration, {demo_steps} steps")
        demo = bench_demo_train(root, demo_steps, n_train=16 if quick else 64, n_val=4 if quick else 16)
    load1 = os.getloadavg()[0]

    print(f"\nDeepLabV3+ training throughput on {dev} (load average {load0:.1f} -> {load1:.1f}, "
          f"{os.cpu_count()} logical cores)\n")
    print("model alone (forward + backward + SGD step, batches in memory)")
    print(format_table(model_rows, ["model", "crop", "batch", "steps", "seconds", "images_per_s"]))
    print("\ndata loader alone: ours (chunk-aware) vs reference (one Zarr read per image, shuffled)")
    print(format_table(loader_rows, ["crop", "batch", "workers", "ours_images_per_s", "reference_images_per_s",
                                     "speedup", "chunks_decoded", "chunks_in_store"]))
    print("\nloader vs model (must be >= 3)")
    print(format_table(ratio_rows, ["crop", "model", "model_images_per_s", "loader_images_per_s",
                                    "loader_over_model"]))
    print("\nend to end: isle_fast.train.train, demo configuration")
    print(format_table([demo], ["steps", "wall_seconds", "seconds_per_step", "projected_150_steps_seconds",
                                "train_images_per_s", "val_miou", "background_miou"]))
    headline = []
    for r in loader_rows:
        if r["workers"] == 0:
            headline.append(headline_row(f"loader crop {r['crop']} (images/s, 0 workers)",
                                         None, "per-image Zarr reads", None,
                                         ours_images_per_s=r["ours_images_per_s"],
                                         reference_images_per_s=r["reference_images_per_s"],
                                         speedup=r["speedup"]))
    for r in ratio_rows:
        headline.append(headline_row(f"{r['model']} crop {r['crop']} training (images/s)", None,
                                     model_images_per_s=r["model_images_per_s"],
                                     loader_over_model=r["loader_over_model"]))
    headline.append(headline_row(f"demo training {demo['steps']} steps (resnet18, crop 96, batch 8)",
                                 demo["wall_seconds"]))
    path = write_json("train", {"device": str(dev), "store_images": n, "load_average_start": load0,
                                "load_average_end": load1, "model": model_rows, "loader": loader_rows,
                                "loader_vs_model": ratio_rows, "demo_train": demo, "headline": headline},
                      quick=quick)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
