"""Step 4: train DeepLabV3+ on a label store (the ISLE ensemble or any set).

Recipe (the usual DeepLabV3+ PASCAL VOC one; choices the paper leaves open
are marked *):

* data: random scale 0.5-2.0, crop 512 (padding: mean colour / label 255),
  horizontal flip, ImageNet normalisation; label 255 is ignored by the loss
  (:mod:`isle_fast.training.data`). The cross entropy is averaged over the non-ignored
  pixels of a batch (a batch with none contributes 0, never NaN).
* optimiser: SGD, momentum 0.9, weight decay 1e-4 (on all parameters),
  ``lr = 0.01`` for the head (ASPP, decoder, classifier) and
  ``lr x backbone_lr_mult`` for the ResNet: * 0.1 when the backbone starts
  from pretrained weights (the familiar "10x head" rule), 1.0 when it
  starts from random weights. Or AdamW (* default lr 1e-4, weight decay 1e-4,
  same multipliers).
* schedule: poly, ``lr_t = lr (1 - t / steps) ** 0.9`` per optimiser step.
* defaults: 30 000 steps of 16 images (* one GPU, no SyncBN), output stride 16.
* mixed precision (``torch.amp``) on by default on CUDA (float16 + GradScaler);
  on CPU only on request (``amp=True``: bfloat16 autocast, no scaler; faster only
  on CPUs with bfloat16 instructions); gradient
  accumulation over ``accum`` micro-batches of ``batch_size`` images (one
  optimiser step sees ``batch_size x accum`` images; BatchNorm sees micro-batches).
* validation: whole images at their true shape, confusion counts from the
  project's ``confusion_labels`` kernel, mIoU (%) over the classes present in
  the ground truth or the prediction (* VOC convention: a class absent from
  both does not count). The best checkpoint is the best validation mIoU.

Run folder (``out``):

``config.json``      the configuration (plain JSON)
``last.pt``          full training state every ``ckpt_every`` steps and at the end (atomic)
``best.pt``          weights + config of the best validation mIoU
``final.pt``         weights + config at the last step
``metrics.json``     training and validation history, best and final mIoU
``metrics.csv``      the same, one row per logged step
``curves.png``       loss and validation mIoU against steps

Checkpoints hold only tensors and plain Python types, so they load with
``torch.load(..., weights_only=True)``. ``resume=True`` reloads ``last.pt``
(model, optimiser, scheduler, GradScaler, RNG states, step) and the sampler
restarts at the same batch of the same epoch (orders and augmentations are a
function of ``(seed, epoch, position)``, :mod:`isle_fast.training.data`), so with
``deterministic=True`` and the same device a resumed run ends bit for bit where
an uninterrupted run would.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from isle_fast.training.data import (
    ChunkBatchSampler,
    SegmentationDataset,
    chunk_groups,
    make_loader,
    normalize,
    worker_error,
)
from isle_fast.training.deeplab import DeepLabV3Plus
from isle_fast.errors import InputError, IsleError, StoreError
from isle_fast.training.predict import (CHECKPOINT_FORMAT, ThreadGovernor, amp_dtype, predict_probs, resolve_device, resolve_threads,
                      torch_threads)
from isle_fast.progress import Timer, progress, summary

__all__ = ["TrainConfig", "TrainResult", "train", "evaluate_model", "miou_from_confusion"]

IGNORE = 255

#: Config keys that may change on --resume without changing the result.
_RESUMABLE = {"num_workers", "val_every", "ckpt_every", "log_every", "device", "threads"}


@dataclass
class TrainConfig:
    """Every setting of a training run (JSON-able; stored in checkpoints and ``config.json``)."""

    images: str
    labels: str
    val_images: str | None = None
    val_gt: str | None = None
    backbone: str = "resnet50"
    weights: str | None = "imagenet"
    output_stride: int = 16
    head_channels: int = 256
    crop: int = 512
    scale_min: float = 0.5
    scale_max: float = 2.0
    flip: bool = True
    fg_crop: float = 0.0
    steps: int = 30000
    batch_size: int = 16
    accum: int = 1
    optimizer: str = "sgd"
    lr: float | None = None
    backbone_lr_mult: float | None = None
    momentum: float = 0.9
    weight_decay: float = 1e-4
    power: float = 0.9
    amp: bool | None = None
    seed: int = 0
    deterministic: bool = False
    window: int = 2
    num_workers: int = 2
    val_every: int = 1000
    ckpt_every: int = 1000
    log_every: int = 10
    device: str = "auto"
    threads: int | None = None

    def resolved(self) -> "TrainConfig":
        """A copy with the automatic choices (lr, backbone multiplier) filled in."""
        d = asdict(self)
        if d["lr"] is None:
            d["lr"] = 0.01 if self.optimizer == "sgd" else 1e-4
        if d["backbone_lr_mult"] is None:
            pretrained = self.weights is not None and str(self.weights).lower() != "none"
            d["backbone_lr_mult"] = 0.1 if pretrained else 1.0
        return TrainConfig(**d)

    def check(self) -> None:
        """Raise :class:`InputError` naming the first bad setting."""
        if self.optimizer not in ("sgd", "adamw"):
            raise InputError(f"--optimizer must be sgd or adamw, not {self.optimizer!r}")
        for key in ("steps", "batch_size", "accum"):
            if getattr(self, key) < 1:
                raise InputError(f"--{key.replace('_', '-')} must be at least 1, not {getattr(self, key)}")
        if self.batch_size < 2:
            raise InputError(f"--batch-size must be at least 2, not {self.batch_size}: BatchNorm in the ASPP "
                             "image-pooling branch needs more than one image per micro-batch "
                             "(use --accum for a larger effective batch)")
        if self.crop < 16:
            raise InputError(f"--crop must be at least 16, not {self.crop}")
        if (self.val_images is None) != (self.val_gt is None):
            raise InputError("--val-images and --val-gt go together: give both or neither")
        if self.threads is not None and self.threads < 1:
            raise InputError(f"--threads must be at least 1, not {self.threads}")
        if not 0.0 <= self.fg_crop <= 1.0:
            raise InputError(f"--fg-crop must be a probability in [0, 1], not {self.fg_crop}")
        for key in ("val_every", "ckpt_every", "log_every", "num_workers"):
            if getattr(self, key) < 0:
                raise InputError(f"--{key.replace('_', '-')} must be >= 0, not {getattr(self, key)}")


@dataclass
class TrainResult:
    """What :func:`train` did and wrote."""

    run_dir: str
    steps: int
    best_miou: float | None
    best_step: int | None
    final_miou: float | None
    background_miou: float | None
    final_loss: float | None
    seconds: float
    images_per_s: float
    paths: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


# -- metrics --------------------------------------------------------------------------
def miou_from_confusion(conf: np.ndarray) -> tuple[float, list[float | None]]:
    """mIoU (%) and per-class IoU (%, None when the class is absent from gt and prediction).

    ``conf`` is ``(C, C+1)`` (rows gt, columns prediction, last column abstentions).
    """
    conf = np.asarray(conf, dtype=np.int64)
    c = conf.shape[0]
    tp = np.diag(conf[:, :c]).astype(np.float64)
    gt = conf.sum(axis=1)
    pred = conf[:, :c].sum(axis=0)
    union = gt + pred - tp
    iou = [float(100.0 * t / u) if u > 0 else None for t, u in zip(tp, union)]
    vals = [v for v in iou if v is not None]
    return (float(np.mean(vals)) if vals else 0.0), iou


def _background_miou(conf: np.ndarray) -> float:
    """mIoU of predicting background everywhere, from a confusion matrix."""
    c = conf.shape[0]
    gt = conf.sum(axis=1)
    trivial = np.zeros((c, c + 1), np.int64)
    trivial[:, 0] = gt
    return miou_from_confusion(trivial)[0]


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, images: str | os.PathLike, gt: str | os.PathLike, *,
                   num_classes: int, amp: bool = False, num_workers: int = 0,
                   quiet: bool = True) -> dict:
    """Whole-image validation: ``{"miou", "iou", "background_miou", "confusion"}``.

    Confusion counts come from ``isle_fast.backend.get_kernels("cpu").confusion_labels``.
    """
    from isle_fast.backend import get_kernels

    kernels = get_kernels("cpu")
    ds = SegmentationDataset(images, gt, train=False)
    if ds.num_classes != num_classes:
        raise InputError(f"validation ground truth {gt} has {ds.num_classes} classes; the model has {num_classes}")
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    loader = torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False, num_workers=num_workers,
                                         pin_memory=dev.type == "cuda")
    conf = np.zeros((num_classes, num_classes + 1), np.int64)
    for img, lab in progress(loader, total=len(ds), desc="validate", unit="img", quiet=quiet):
        pred = predict_probs(model, img, amp=amp).argmax(0).to(torch.uint8).cpu().numpy()
        conf += kernels.confusion_labels(np.ascontiguousarray(lab.numpy()), (pred,), num_classes)[0]
    model.train(was_training)
    miou, iou = miou_from_confusion(conf)
    return {"miou": miou, "iou": iou, "background_miou": _background_miou(conf), "confusion": conf.tolist()}


# -- files ----------------------------------------------------------------------------
def _atomic(path: Path, write) -> None:
    """Write ``path`` through a temporary sibling and ``os.replace`` (never half-written)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _save(obj: Any, path: Path) -> None:
    _atomic(path, lambda p: torch.save(obj, p))


def _write_text(path: Path, text: str) -> None:
    def w(p: Path) -> None:
        p.write_text(text, encoding="utf-8")

    _atomic(path, w)


def _write_metrics(run: Path, history: list[dict], val: list[dict], extra: dict) -> None:
    _write_text(run / "metrics.json", json.dumps({"train": history, "val": val, **extra}, indent=1))
    by_step: dict[int, dict] = {}
    for row in history:
        by_step.setdefault(row["step"], {}).update(row)
    for row in val:
        by_step.setdefault(row["step"], {})["val_miou"] = row["miou"]
    cols = ["step", "epoch", "loss", "lr", "images_per_s", "seconds", "threads", "val_miou"]
    buf = io.StringIO()
    wr = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    wr.writeheader()
    for step in sorted(by_step):
        wr.writerow({"step": step, **by_step[step]})
    _write_text(run / "metrics.csv", buf.getvalue())
    try:
        _plot(run / "curves.png", history, val)
    except Exception:  # a plot is a courtesy; never fail a run over it
        pass


def _plot(path: Path, history: list[dict], val: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    if history:
        a.plot([r["step"] for r in history], [r["loss"] for r in history], lw=1.2)
    a.set_xlabel("step")
    a.set_ylabel("training loss")
    a.set_title("loss")
    a.grid(alpha=0.3)
    if val:
        b.plot([r["step"] for r in val], [r["miou"] for r in val], "o-", lw=1.2)
        b.axhline(val[-1]["background_miou"], color="grey", ls="--", lw=1, label="all background")
        b.legend(loc="lower right")
    b.set_xlabel("step")
    b.set_ylabel("val mIoU (%)")
    b.set_title("validation mIoU")
    b.grid(alpha=0.3)
    fig.tight_layout()

    def w(p: Path) -> None:
        fig.savefig(p, dpi=110, format="png")

    _atomic(path, w)
    plt.close(fig)


# -- training -------------------------------------------------------------------------
def _seed_everything(seed: int, deterministic: bool) -> dict:
    """Seed every RNG; with ``deterministic`` switch torch to deterministic kernels.

    Returns the previous global switches, for :func:`_restore_switches`.
    """
    old = {"det": torch.are_deterministic_algorithms_enabled(),
           "warn": torch.is_deterministic_algorithms_warn_only_enabled(),
           "bench": torch.backends.cudnn.benchmark, "cudnn_det": torch.backends.cudnn.deterministic}
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
    return old


def _restore_switches(old: dict) -> None:
    torch.use_deterministic_algorithms(old["det"], warn_only=old["warn"])
    torch.backends.cudnn.benchmark = old["bench"]
    torch.backends.cudnn.deterministic = old["cudnn_det"]


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fused_ok(dev: torch.device) -> bool | None:
    """``fused=True`` where torch has fused optimiser kernels for the device (CPU, CUDA), else None."""
    return True if dev.type in ("cpu", "cuda") else None


def _loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    total = F.cross_entropy(logits.float(), target, ignore_index=IGNORE, reduction="sum")
    return total / (target != IGNORE).sum().clamp(min=1)


def train(images: str | os.PathLike, labels: str | os.PathLike, out: str | os.PathLike, *,
          val_images: str | os.PathLike | None = None, val_gt: str | os.PathLike | None = None,
          backbone: str = "resnet50", weights: str | os.PathLike | None = "imagenet",
          output_stride: int = 16, head_channels: int = 256, crop: int = 512,
          scale_range: tuple[float, float] = (0.5, 2.0), flip: bool = True, fg_crop: float = 0.0,
          steps: int = 30000, batch_size: int = 16, accum: int = 1, optimizer: str = "sgd",
          lr: float | None = None, backbone_lr_mult: float | None = None, momentum: float = 0.9,
          weight_decay: float = 1e-4, power: float = 0.9, amp: bool | None = None, seed: int = 0,
          deterministic: bool = False, window: int = 2, num_workers: int = 2, val_every: int = 1000,
          ckpt_every: int = 1000, log_every: int = 10, device: str = "auto", threads: int | None = None,
          resume: bool = False, overwrite: bool = False, stop_after: int | None = None,
          quiet: bool = False) -> TrainResult:
    """Train DeepLabV3+ on ``labels`` (see the module docstring for the recipe and the run folder).

    Parameters
    ----------
    images, labels : path
        Training images store (kind ``images``) and label store (any label
        store: ensemble, pseudo set, gt; ``scores`` stores are decoded by argmax).
    out : path
        Run folder.
    val_images, val_gt : path, optional
        Validation images and ground truth (together).
    backbone : {'resnet50', 'resnet18', 'resnet34', 'resnet101'}
    weights : 'imagenet', 'none' / None, or path
        Backbone initialisation (offline, 'imagenet' is a clear error).
    output_stride : {16, 8, 32}
    head_channels : int
        ASPP / decoder width (256 in the paper; smaller for quick CPU runs).
    crop : int
        Training crop side.
    scale_range : (float, float)
        Random scale range.
    flip : bool
        Random horizontal flips.
    fg_crop : float
        Probability that a crop is centred on a foreground object
        (:class:`isle_fast.training.data.SegmentationDataset`); 0 = the paper's uniform crops.
    steps : int
        Optimiser steps in total (the poly schedule's length).
    batch_size : int
        Images per micro-batch.
    accum : int
        Micro-batches per optimiser step (gradient accumulation).
    optimizer : {'sgd', 'adamw'}
    lr : float, optional
        Head learning rate (default 0.01 for SGD, 1e-4 for AdamW).
    backbone_lr_mult : float, optional
        Backbone lr = ``lr x`` this (default 0.1 with pretrained weights, else 1).
    momentum, weight_decay, power : float
        SGD momentum, weight decay, poly power.
    amp : bool, optional
        Mixed precision: float16 + GradScaler on CUDA (default on), bfloat16
        autocast on CPU (default off; pays only on CPUs with bfloat16 instructions).
    seed : int
        Seeds model init, data order and augmentation.
    deterministic : bool
        Deterministic algorithms (bitwise-reproducible resumes; slower on GPU).
    window : int
        Chunk groups shuffled together (:class:`isle_fast.training.data.ChunkBatchSampler`).
    num_workers : int
        DataLoader worker processes.
    val_every, ckpt_every, log_every : int
        Validation / checkpoint / log period in steps (0: only at the end).
    device : str
        ``auto``, ``cpu`` or ``cuda[:N]``.
    threads : int, optional
        torch CPU threads. Default: one per core that other processes do not
        keep busy (:func:`isle_fast.training.predict.resolve_threads`; on a shared
        machine an OpenMP thread per core makes every operation wait for a
        descheduled thread), re-chosen every 5 s as the load changes
        (:class:`isle_fast.training.predict.ThreadGovernor`; the count is logged per row
        of ``metrics.csv``); torch's setting, fixed, with ``deterministic``.
    resume : bool
        Continue the run in ``out`` from its ``last.pt``.
    overwrite : bool
        Start afresh in an ``out`` that already holds a run.
    stop_after : int, optional
        Stop (with a checkpoint) after this many steps of this call, before
        ``steps`` is reached; resume later.
    quiet : bool
        No progress bar or summary.

    Returns
    -------
    TrainResult
    """
    timer = Timer()
    run = Path(out)
    cfg = TrainConfig(
        images=str(images), labels=str(labels),
        val_images=None if val_images is None else str(val_images),
        val_gt=None if val_gt is None else str(val_gt),
        backbone=backbone, weights=None if weights is None else str(weights),
        output_stride=int(output_stride), head_channels=int(head_channels), crop=int(crop),
        scale_min=float(scale_range[0]), scale_max=float(scale_range[1]), flip=bool(flip),
        fg_crop=float(fg_crop),
        steps=int(steps), batch_size=int(batch_size), accum=int(accum), optimizer=optimizer, lr=lr,
        backbone_lr_mult=backbone_lr_mult, momentum=float(momentum), weight_decay=float(weight_decay),
        power=float(power), amp=amp, seed=int(seed), deterministic=bool(deterministic),
        window=int(window), num_workers=int(num_workers), val_every=int(val_every),
        ckpt_every=int(ckpt_every), log_every=int(log_every), device=device,
        threads=None if threads is None else int(threads),
    ).resolved()
    cfg.check()
    dev = resolve_device(cfg.device)
    use_amp = (dev.type == "cuda") if cfg.amp is None else bool(cfg.amp)

    ds = _open_training_data(cfg)   # a bad store is reported before anything is written

    ck = None
    if resume:
        last = run / "last.pt"
        if not last.is_file():
            raise InputError(f"--resume: {last} does not exist (nothing to resume in {run})")
        ck = torch.load(last, map_location="cpu", weights_only=True)
        old = dict(ck["config"])
        new = asdict(cfg)
        defaults = asdict(TrainConfig(images="", labels=""))  # keys added later read as their default
        diff = [k for k in new if k not in _RESUMABLE and old.get(k, defaults[k]) != new[k]]
        if diff:
            k = diff[0]
            raise InputError(f"--resume: setting {k!r} is {new[k]!r} but the run in {run} used {old.get(k)!r} "
                             "(resume with the same settings, or start a new run)")
    elif run.exists() and any(run.iterdir()):
        if not overwrite:
            raise StoreError(f"{run} already holds files; pass --resume to continue it or --overwrite to restart")
        for name in ("last.pt", "best.pt", "final.pt", "metrics.json", "metrics.csv", "curves.png", "config.json"):
            if (run / name).exists():
                (run / name).unlink()
    run.mkdir(parents=True, exist_ok=True)
    _write_text(run / "config.json", json.dumps(asdict(cfg), indent=1))

    n_threads = resolve_threads(cfg.threads, dev, cfg.deterministic)
    governor = ThreadGovernor(cfg.threads is None and not cfg.deterministic and dev.type == "cpu",
                              limit=torch.get_num_threads())
    switches = _seed_everything(cfg.seed, cfg.deterministic)
    try:
        with torch_threads(n_threads):
            return _run(cfg, ds, run, dev, use_amp, ck, stop_after, quiet, timer, governor)
    except IsleError as exc:  # e.g. a damaged chunk met by a DataLoader worker: its message, no traceback
        clean = worker_error(exc)
        if clean is exc:
            raise
        raise clean from None
    finally:
        _restore_switches(switches)


def _open_training_data(cfg: TrainConfig) -> SegmentationDataset:
    """The training dataset, every input checked (stores, alignment, classes) before a run folder is made."""
    ds = SegmentationDataset(cfg.images, cfg.labels, train=True, crop=cfg.crop,
                             scale_range=(cfg.scale_min, cfg.scale_max), flip=cfg.flip, fg_crop=cfg.fg_crop)
    if len(ds) < 2:
        raise InputError(f"--labels {cfg.labels} holds {len(ds)} image(s); training needs at least 2 "
                         "(BatchNorm needs more than one image per batch)")
    if cfg.val_gt is not None:
        from isle_fast.stores.stack import open_stack

        vg = open_stack(cfg.val_gt)
        if list(vg.classes) != list(ds.classes):
            raise InputError(f"--val-gt {cfg.val_gt} has classes {vg.classes}; --labels {cfg.labels} has "
                             f"{ds.classes}")
    return ds


def _run(cfg: TrainConfig, ds: SegmentationDataset, run: Path, dev: torch.device, use_amp: bool,
         ck: dict | None, stop_after: int | None, quiet: bool, timer: Timer,
         governor: ThreadGovernor) -> TrainResult:
    classes = ds.classes
    num_classes = len(classes)
    groups = chunk_groups(len(ds), ds.image_chunk, ds.label_chunk)
    sampler = ChunkBatchSampler(len(ds), cfg.batch_size, groups, seed=cfg.seed, window=cfg.window,
                                num_workers=cfg.num_workers)
    gen = torch.Generator().manual_seed(cfg.seed)  # keeps the DataLoader off the global RNG
    loader = make_loader(ds, sampler, num_workers=cfg.num_workers, pin_memory=dev.type == "cuda",
                         generator=gen)

    model = DeepLabV3Plus(num_classes, cfg.backbone, None if ck is not None else cfg.weights,
                          cfg.output_stride, cfg.head_channels)
    # channels_last on every device: cuDNN and oneDNN (CPU) both run NHWC convolutions faster
    # (measured on the 2-core CPU: about 5-15 % per training step)
    model.to(dev, memory_format=torch.channels_last)
    groups_p = [{"params": list(model.backbone_parameters()), "lr": cfg.lr * cfg.backbone_lr_mult},
                {"params": list(model.head_parameters()), "lr": cfg.lr}]
    # fused: one kernel per step for all parameters (CPU and CUDA) instead of several per tensor;
    # the per-tensor AdamW update was about 15 % of a small model's CPU step
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(groups_p, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                              fused=_fused_ok(dev))
    else:
        opt = torch.optim.AdamW(groups_p, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=_fused_ok(dev))
    sched = torch.optim.lr_scheduler.PolynomialLR(opt, total_iters=cfg.steps, power=cfg.power)
    # loss scaling only for float16 (CUDA); bfloat16 (CPU autocast) has float32's range
    scaler = torch.amp.GradScaler(dev.type, enabled=use_amp and amp_dtype(dev.type) == torch.float16)

    step = 0
    history: list[dict] = []
    val_hist: list[dict] = []
    best = {"miou": None, "step": None}
    if ck is not None:
        if ck.get("format") != CHECKPOINT_FORMAT:
            raise InputError(f"{run / 'last.pt'} is not an isle-fast training checkpoint")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        scaler.load_state_dict(ck["scaler"])
        _set_rng_state(ck["rng"])
        gen.set_state(ck["rng"]["loader"])
        step = int(ck["step"])
        history, val_hist, best = list(ck["history"]), list(ck["val"]), dict(ck["best"])

    def meta(weights_only: bool) -> dict:
        d = {"format": CHECKPOINT_FORMAT, "config": asdict(cfg), "classes": list(classes), "step": step,
             "model": model.state_dict()}
        if not weights_only:
            rng = _rng_state()
            rng["loader"] = gen.get_state()
            d.update(optimizer=opt.state_dict(), scheduler=sched.state_dict(), scaler=scaler.state_dict(),
                     rng=rng, history=history, val=val_hist, best=best)
        return d

    def extra() -> dict:
        return {"config": asdict(cfg), "classes": classes, "best": best,
                "final": val_hist[-1] if val_hist and val_hist[-1]["step"] == step else None}

    def validate() -> None:
        r = evaluate_model(model, cfg.val_images, cfg.val_gt, num_classes=num_classes, amp=use_amp,
                           num_workers=min(cfg.num_workers, 2), quiet=True)
        row = {"step": step, "miou": r["miou"], "iou": r["iou"], "background_miou": r["background_miou"]}
        if val_hist and val_hist[-1]["step"] == step:
            val_hist[-1] = row
        else:
            val_hist.append(row)
        if best["miou"] is None or r["miou"] > best["miou"]:
            best.update(miou=r["miou"], step=step)
            _save({**meta(True), "val_miou": r["miou"]}, run / "best.pt")

    model.train()
    spe = len(sampler)
    if spe == 0:
        raise InputError(f"{cfg.images} holds no images")
    epoch, pos = divmod(step * cfg.accum, spe)
    sampler.set_epoch(epoch, pos)
    it = iter(loader)
    target_step = cfg.steps if stop_after is None else min(cfg.steps, step + int(stop_after))
    bar = progress(total=cfg.steps, initial=step, desc="train", unit="step", quiet=quiet)
    win_loss, win_n, win_imgs, win_t = 0.0, 0, 0, time.perf_counter()
    total_imgs, t_train = 0, time.perf_counter()
    non_blocking = dev.type == "cuda"
    try:
        while step < target_step:
            opt.zero_grad(set_to_none=True)
            step_loss = 0.0
            for _ in range(cfg.accum):
                try:
                    x, y = next(it)
                except StopIteration:
                    epoch += 1
                    sampler.set_epoch(epoch)
                    it = iter(loader)
                    x, y = next(it)
                x = normalize(x.to(dev, non_blocking=non_blocking)).contiguous(memory_format=torch.channels_last)
                y = y.to(dev, non_blocking=non_blocking).long()
                with torch.autocast(dev.type, dtype=amp_dtype(dev.type), enabled=use_amp):
                    logits = model(x)
                loss = _loss(logits, y) / cfg.accum
                scaler.scale(loss).backward()
                step_loss += float(loss.detach())
                win_imgs += x.shape[0]
                total_imgs += x.shape[0]
            scaler.step(opt)
            scaler.update()
            sched.step()
            step += 1
            if not math.isfinite(step_loss):
                raise FloatingPointError(f"training loss became {step_loss} at step {step}; lower --lr")
            win_loss += step_loss
            win_n += 1
            bar.update(1)
            governor.update()  # follow the machine's load (CPU, automatic thread count only)
            last_step = step == target_step
            if (cfg.log_every and step % cfg.log_every == 0) or last_step:
                now = time.perf_counter()
                row = {"step": step, "epoch": round(step * cfg.accum / spe, 3), "loss": win_loss / win_n,
                       "lr": float(opt.param_groups[1]["lr"]), "images_per_s": win_imgs / max(now - win_t, 1e-9),
                       "seconds": round(timer.seconds, 2), "threads": torch.get_num_threads()}
                history.append(row)
                bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}",
                                img_s=f"{row['images_per_s']:.1f}", refresh=False)  # redrawn at the bar's pace
                win_loss, win_n, win_imgs, win_t = 0.0, 0, 0, now
            if cfg.val_gt is not None and ((cfg.val_every and step % cfg.val_every == 0) or step == cfg.steps):
                validate()
            if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or last_step:
                _save(meta(False), run / "last.pt")
                _write_metrics(run, history, val_hist, extra())
    finally:
        bar.close()
        del it
    train_seconds = time.perf_counter() - t_train
    finished = step >= cfg.steps
    if finished:
        _save(meta(True), run / "final.pt")
    _write_metrics(run, history, val_hist, extra())
    final = val_hist[-1] if (val_hist and val_hist[-1]["step"] == step) else None
    paths = {"config": str(run / "config.json"), "last": str(run / "last.pt"),
             "metrics_json": str(run / "metrics.json"), "metrics_csv": str(run / "metrics.csv"),
             "curves_png": str(run / "curves.png")}
    if finished:
        paths["final"] = str(run / "final.pt")
    if (run / "best.pt").exists():
        paths["best"] = str(run / "best.pt")
    res = TrainResult(
        run_dir=str(run), steps=step, best_miou=best["miou"], best_step=best["step"],
        final_miou=final["miou"] if final else None,
        background_miou=final["background_miou"] if final else None,
        final_loss=history[-1]["loss"] if history else None, seconds=timer.seconds,
        images_per_s=total_imgs / max(train_seconds, 1e-9), paths=paths)
    rows = {"steps": f"{step} of {cfg.steps}" + ("" if finished else " (stopped; --resume continues)"),
            "model": f"DeepLabV3+ {cfg.backbone} os{cfg.output_stride}, {num_classes} classes",
            "final loss": f"{res.final_loss:.4f}" if res.final_loss is not None else "-",
            "images/s": f"{res.images_per_s:.1f} ({dev.type}"
                        + (f", {torch.get_num_threads()} threads" if dev.type == "cpu" else "")
                        + (f", thread count followed the load {governor.changes}x" if governor.changes else "")
                        + ")"}
    if res.best_miou is not None:
        rows["val mIoU"] = (f"best {res.best_miou:.2f}% (step {res.best_step}), final "
                            + (f"{res.final_miou:.2f}%" if res.final_miou is not None else "-")
                            + (f", all-background {res.background_miou:.2f}%"
                               if res.background_miou is not None else ""))
    rows["seconds"] = f"{res.seconds:.1f}"
    rows["output"] = str(run)
    summary("isle train", rows, quiet=quiet)
    return res
