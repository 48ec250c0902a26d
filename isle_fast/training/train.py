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

from isle_fast import metrics
from isle_fast.errors import InputError, IsleError, StoreError, param
from isle_fast.options import parameters_doc
from isle_fast.outputs import MARKER, owned, refuse_unsafe, write_file, write_marker, write_text
from isle_fast.progress import Timer, progress, summary
from isle_fast.training.config import (
    RESUMABLE,
    RunOptions,
    TrainConfig,
    config_from_dict,
    options_from_kwargs,
)
from isle_fast.training.data import (
    ChunkBatchSampler,
    SegmentationDataset,
    chunk_groups,
    make_loader,
    normalize,
    worker_error,
)
from isle_fast.training.deeplab import DeepLabV3Plus
from isle_fast.training.predict import predict_probs
from isle_fast.training.runtime import (
    ThreadGovernor,
    amp_dtype,
    load_checkpoint,
    resolve_device,
    resolve_threads,
    torch_threads,
    write_checkpoint,
)

__all__ = ["Diverged", "TrainResult", "train", "evaluate_model", "miou_from_confusion"]

IGNORE = 255


class Diverged(IsleError, FloatingPointError):
    """The training loss became NaN or infinite (a learning rate too high for the data): the user's to fix."""


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

    ``conf`` is ``(C, C+1)`` (rows gt, columns prediction, last column abstentions). The
    scores are :func:`isle_fast.metrics.iou` and :func:`isle_fast.metrics.miou`, as in
    ``isle evaluate``: the mean skips undefined classes, and is NaN when no class is
    defined (a validation ground truth without a labelled pixel).
    """
    iou = metrics.iou(np.asarray(conf, dtype=np.int64))
    return float(metrics.miou(iou)), metrics.jsonable(iou)


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

    Confusion counts come from ``isle_fast.backend.get_kernels("cpu").confusion_labels``;
    ``miou`` and ``background_miou`` are None (JSON ``null``) when no class is defined
    (the validation ground truth has no labelled pixel).
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
    return {"miou": metrics.jsonable(miou), "iou": iou,
            "background_miou": metrics.jsonable(_background_miou(conf)), "confusion": conf.tolist()}


# -- files ----------------------------------------------------------------------------
def _save(obj: Any, path: Path) -> None:
    """A checkpoint, atomically and fsynced (a resume after a crash needs it whole)."""
    write_file(path, lambda p: write_checkpoint(obj, p), durable=True)


def _write_metrics(run: Path, history: list[dict], val: list[dict], extra: dict) -> None:
    write_text(run / "metrics.json", json.dumps({"train": history, "val": val, **extra}, indent=1))
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
    write_text(run / "metrics.csv", buf.getvalue())
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
        curve = [math.nan if r["miou"] is None else r["miou"] for r in val]
        b.plot([r["step"] for r in val], curve, "o-", lw=1.2)
        if val[-1]["background_miou"] is not None:
            b.axhline(val[-1]["background_miou"], color="grey", ls="--", lw=1, label="all background")
            b.legend(loc="lower right")
    b.set_xlabel("step")
    b.set_ylabel("val mIoU (%)")
    b.set_title("validation mIoU")
    b.grid(alpha=0.3)
    fig.tight_layout()

    try:
        write_file(path, lambda p: fig.savefig(p, dpi=110, format="png"))
    finally:
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


def train(images: str | os.PathLike, labels: str | os.PathLike, out: str | os.PathLike,
          **options: Any) -> TrainResult:
    """Train DeepLabV3+ on ``labels`` (see the module docstring for the recipe and the run folder).

    Every keyword is a field of :class:`~isle_fast.training.config.TrainConfig` (what
    determines the model; stored in ``config.json``) or of
    :class:`~isle_fast.training.config.RunOptions` (how this call runs), the same
    settings as ``isle train``'s options; each is checked (type, choices, bounds) before
    anything is read or written.

    Parameters
    ----------
    images, labels : path
        Training images store (kind ``images``) and label store (any label
        store: ensemble, pseudo set, gt; ``scores`` stores are decoded by argmax).
    out : path
        Run folder.
{options}

    Returns
    -------
    TrainResult

    Raises
    ------
    InputError
        An unknown or bad setting (named by its ``isle train`` flag), a bad store,
        ``resume`` with other settings than the run used.
    StoreError
        ``out`` holds a run and neither ``resume`` nor ``overwrite`` is given.

    Notes
    -----
    ``threads`` (default None): one torch thread per core that other processes do not
    keep busy (:func:`isle_fast.training.runtime.resolve_threads`), re-chosen every 5 s as
    the load changes (:class:`isle_fast.training.runtime.ThreadGovernor`; the count is
    logged per row of ``metrics.csv``); torch's setting, fixed, with ``deterministic``.
    """
    timer = Timer()
    cfg, opts = options_from_kwargs({"images": images, "labels": labels, "out": out, **options})
    cfg = cfg.resolved()
    run = Path(opts.out)
    dev = resolve_device(cfg.device)
    use_amp = (dev.type == "cuda") if cfg.amp is None else bool(cfg.amp)
    ds = _open_training_data(cfg)   # a bad store is reported before anything is written
    # the run folder is never an input (nor inside / holding one), /, home or the working directory
    weights = cfg.weights if cfg.weights is not None and os.path.isfile(str(cfg.weights)) else None
    refuse_unsafe(run, inputs=[cfg.images, cfg.labels, cfg.val_images, cfg.val_gt, weights])
    ck = _resume_checkpoint(run, cfg) if opts.resume else None
    if ck is None:
        _clear_run_folder(run, opts.overwrite)
    run.mkdir(parents=True, exist_ok=True)
    if not (run / MARKER).exists():
        write_marker(run, "isle train")
    write_text(run / "config.json", json.dumps(asdict(cfg), indent=1))

    n_threads = resolve_threads(cfg.threads, dev, cfg.deterministic)
    governor = ThreadGovernor(cfg.threads is None and not cfg.deterministic and dev.type == "cpu",
                              limit=torch.get_num_threads())
    switches = _seed_everything(cfg.seed, cfg.deterministic)
    try:
        with torch_threads(n_threads):
            trainer = _Trainer(cfg, ds, run, dev, use_amp, ck)
            res = trainer.fit(opts.stop_after, opts.quiet, timer, governor)
            _summarise(res, cfg, trainer, governor, opts.quiet)  # (the thread count of the run)
            return res
    except IsleError as exc:  # e.g. a damaged chunk met by a DataLoader worker: its message, no traceback
        clean = worker_error(exc)
        if clean is exc:
            raise
        raise clean from None
    finally:
        _restore_switches(switches)


train.__doc__ = (train.__doc__ or "").replace(
    "{options}", parameters_doc(TrainConfig, RunOptions, skip=("images", "labels", "out")))


def _open_training_data(cfg: TrainConfig) -> SegmentationDataset:
    """The training dataset, every input checked (stores, alignment, classes) before a run folder is made."""
    ds = SegmentationDataset(cfg.images, cfg.labels, train=True, crop=cfg.crop, scale_range=cfg.scale_range,
                             flip=cfg.flip, fg_crop=cfg.fg_crop)
    if len(ds) < 2:
        raise InputError(f"{param('labels')} {cfg.labels} holds {len(ds)} image(s); training needs at "
                         "least 2 (BatchNorm needs more than one image per batch)")
    if cfg.val_gt is not None:
        from isle_fast.stores.stack import open_stack

        vg = open_stack(cfg.val_gt)
        if list(vg.classes) != ds.classes:
            raise InputError(f"{param('val_gt')} {cfg.val_gt} has classes {vg.classes}; "
                             f"{param('labels')} {cfg.labels} has {ds.classes}")
    return ds


#: What a run folder holds; ``--overwrite`` deletes these (and only these) before a fresh start.
RUN_FILES = ("last.pt", "best.pt", "final.pt", "metrics.json", "metrics.csv", "curves.png", "config.json",
             MARKER)


def _resume_checkpoint(run: Path, cfg: TrainConfig) -> dict:
    """The ``last.pt`` of ``run``, after checking that it was trained with the same settings as ``cfg``."""
    last = run / "last.pt"
    if not last.is_file():
        raise InputError(f"{param('resume')}: {last} does not exist (nothing to resume in {run})")
    ck = load_checkpoint(last)
    old, new = config_from_dict(ck["config"]), asdict(cfg)
    diff = [k for k in new if k not in RESUMABLE and old.get(k) != new[k]]
    if diff:
        k = diff[0]
        raise InputError(f"{param('resume')}: setting {k!r} is {new[k]!r} but the run in {run} used "
                         f"{old.get(k)!r} (resume with the same settings, or start a new run)")
    return ck


def _clear_run_folder(run: Path, overwrite: bool) -> None:
    """Make way for a new run in ``run``: refused when it holds files, unless ``overwrite`` and
    every file is one isle train wrote (the folder carries its marker, or holds only run files)."""
    if not run.exists() or (run.is_dir() and not any(run.iterdir())):
        return
    if not overwrite:
        raise StoreError(f"{run} already holds files; pass {param('resume')} to continue it or "
                         f"{param('overwrite')} to restart")
    if not (run.is_dir() and (owned(run) or {p.name for p in run.iterdir()} <= set(RUN_FILES))):
        raise StoreError(f"{run} holds files that isle train did not write (no {MARKER}); refusing to "
                         f"restart a run there even with {param('overwrite')}: choose another folder")
    for name in RUN_FILES:
        if (run / name).exists():
            (run / name).unlink()


def _build_model(cfg: TrainConfig, num_classes: int, dev: torch.device, pretrained: bool) -> DeepLabV3Plus:
    """DeepLabV3+ on ``dev`` in channels-last layout (backbone weights only for a fresh run)."""
    model = DeepLabV3Plus(num_classes, cfg.backbone, cfg.weights if pretrained else None,
                          cfg.output_stride, cfg.head_channels)
    # channels_last on every device: cuDNN and oneDNN (CPU) both run NHWC convolutions faster
    # (measured on the 2-core CPU: about 5-15 % per training step)
    model.to(dev)
    model.to(memory_format=torch.channels_last)
    return model


def _build_optimisation(cfg: TrainConfig, model: DeepLabV3Plus, dev: torch.device,
                        use_amp: bool) -> tuple[torch.optim.Optimizer, Any, torch.amp.GradScaler]:
    """The optimiser (backbone and head learning rates), the poly schedule and the GradScaler."""
    lr, backbone_mult = cfg.lr, cfg.backbone_lr_mult
    assert lr is not None and backbone_mult is not None, "train() passes cfg.resolved()"
    groups = [{"params": list(model.backbone_parameters()), "lr": lr * backbone_mult},
              {"params": list(model.head_parameters()), "lr": lr}]
    # fused: one kernel per step for all parameters (CPU and CUDA) instead of several per tensor;
    # the per-tensor AdamW update was about 15 % of a small model's CPU step
    opt: torch.optim.Optimizer
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                              fused=_fused_ok(dev))
    else:
        opt = torch.optim.AdamW(groups, lr=lr, weight_decay=cfg.weight_decay, fused=_fused_ok(dev))
    sched = torch.optim.lr_scheduler.PolynomialLR(opt, total_iters=cfg.steps, power=cfg.power)
    # loss scaling only for float16 (CUDA); bfloat16 (CPU autocast) has float32's range
    scaler = torch.amp.GradScaler(dev.type, enabled=use_amp and amp_dtype(dev.type) == torch.float16)
    return opt, sched, scaler


class _Trainer:
    """One run: data, model, optimiser and history, i.e. what a checkpoint holds, and the loop."""

    def __init__(self, cfg: TrainConfig, ds: SegmentationDataset, run: Path, dev: torch.device, use_amp: bool,
                 ck: dict | None) -> None:
        self.cfg, self.ds, self.run, self.dev, self.use_amp = cfg, ds, run, dev, use_amp
        assert ds.classes is not None, "a training dataset opens its labels"
        self.classes: list[str] = ds.classes
        groups = chunk_groups(len(ds), ds.image_chunk, ds.label_chunk)
        self.sampler = ChunkBatchSampler(len(ds), cfg.batch_size, groups, seed=cfg.seed, window=cfg.window,
                                         num_workers=cfg.num_workers)
        self.gen = torch.Generator().manual_seed(cfg.seed)  # keeps the DataLoader off the global RNG
        self.loader = make_loader(ds, self.sampler, num_workers=cfg.num_workers,
                                  pin_memory=dev.type == "cuda", generator=self.gen)
        self.model = _build_model(cfg, len(self.classes), dev, pretrained=ck is None)
        self.opt, self.sched, self.scaler = _build_optimisation(cfg, self.model, dev, use_amp)
        self.step = 0
        self.history: list[dict] = []
        self.val_hist: list[dict] = []
        self.best: dict[str, Any] = {"miou": None, "step": None}
        if ck is not None:
            self._restore(ck)

    # -- checkpoints ----------------------------------------------------------------------
    def _restore(self, ck: dict) -> None:
        self.model.load_state_dict(ck["model"])
        self.opt.load_state_dict(ck["optimizer"])
        self.sched.load_state_dict(ck["scheduler"])
        self.scaler.load_state_dict(ck["scaler"])
        _set_rng_state(ck["rng"])
        self.gen.set_state(ck["rng"]["loader"])
        self.step = int(ck["step"])
        self.history, self.val_hist, self.best = list(ck["history"]), list(ck["val"]), dict(ck["best"])

    def checkpoint(self, weights_only: bool) -> dict:
        """The weights, config and classes; with ``weights_only=False`` everything a resume needs."""
        d = {"config": asdict(self.cfg), "classes": list(self.classes), "step": self.step,
             "model": self.model.state_dict()}
        if not weights_only:
            rng = _rng_state()
            rng["loader"] = self.gen.get_state()
            d.update(optimizer=self.opt.state_dict(), scheduler=self.sched.state_dict(),
                     scaler=self.scaler.state_dict(), rng=rng, history=self.history, val=self.val_hist,
                     best=self.best)
        return d

    def final_validation(self) -> dict | None:
        """The validation row of the current step, if validation ran there."""
        last = self.val_hist[-1] if self.val_hist else None
        return last if last is not None and last["step"] == self.step else None

    def write_metrics(self) -> None:
        extra = {"config": asdict(self.cfg), "classes": self.classes, "best": self.best,
                 "final": self.final_validation()}
        _write_metrics(self.run, self.history, self.val_hist, extra)

    # -- validation -------------------------------------------------------------------------
    def validate(self) -> None:
        """Score the model on the validation split; a new best mIoU writes ``best.pt``."""
        cfg = self.cfg
        assert cfg.val_images is not None and cfg.val_gt is not None, "TrainConfig.check pairs them"
        r = evaluate_model(self.model, cfg.val_images, cfg.val_gt, num_classes=len(self.classes),
                           amp=self.use_amp, num_workers=min(cfg.num_workers, 2), quiet=True)
        row = {"step": self.step, "miou": r["miou"], "iou": r["iou"], "background_miou": r["background_miou"]}
        if self.final_validation() is not None:
            self.val_hist[-1] = row
        else:
            self.val_hist.append(row)
        if r["miou"] is not None and (self.best["miou"] is None or r["miou"] > self.best["miou"]):
            self.best.update(miou=r["miou"], step=self.step)
            _save({**self.checkpoint(True), "val_miou": r["miou"]}, self.run / "best.pt")

    # -- training ---------------------------------------------------------------------------
    def _batches(self, spe: int):
        """Micro-batches on the device, endlessly, starting where ``step`` left off."""
        epoch, pos = divmod(self.step * self.cfg.accum, spe)
        self.sampler.set_epoch(epoch, pos)
        non_blocking = self.dev.type == "cuda"
        while True:
            for x, y in self.loader:
                x = normalize(x.to(self.dev, non_blocking=non_blocking)).contiguous(
                    memory_format=torch.channels_last)
                yield x, y.to(self.dev, non_blocking=non_blocking).long()
            epoch += 1
            self.sampler.set_epoch(epoch)

    def optimiser_step(self, batches) -> tuple[float, int]:
        """One optimiser step over ``accum`` micro-batches: (its loss, images seen)."""
        cfg = self.cfg
        self.opt.zero_grad(set_to_none=True)
        step_loss, images = 0.0, 0
        for _ in range(cfg.accum):
            x, y = next(batches)
            with torch.autocast(self.dev.type, dtype=amp_dtype(self.dev.type), enabled=self.use_amp):
                logits = self.model(x)
            loss = _loss(logits, y) / cfg.accum
            self.scaler.scale(loss).backward()
            step_loss += float(loss.detach())
            images += x.shape[0]
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()
        self.step += 1
        if not math.isfinite(step_loss):
            raise Diverged(f"training loss became {step_loss} at step {self.step}; lower {param('lr')}")
        return step_loss, images

    def fit(self, stop_after: int | None, quiet: bool, timer: Timer, governor: ThreadGovernor) -> TrainResult:
        """Train up to ``steps`` (or ``stop_after`` more steps), log, validate and checkpoint on the way."""
        cfg = self.cfg
        self.model.train()
        spe = len(self.sampler)
        if spe == 0:
            raise InputError(f"{cfg.images} holds no images")
        target_step = cfg.steps if stop_after is None else min(cfg.steps, self.step + int(stop_after))
        bar = progress(total=cfg.steps, initial=self.step, desc="train", unit="step", quiet=quiet)
        window = _LogWindow()
        total_imgs, t_train = 0, time.perf_counter()
        batches = self._batches(spe)
        try:
            while self.step < target_step:
                loss, images = self.optimiser_step(batches)
                window.add(loss, images)
                total_imgs += images
                bar.update(1)
                governor.update()  # follow the machine's load (CPU, automatic thread count only)
                last_step = self.step == target_step
                if (cfg.log_every and self.step % cfg.log_every == 0) or last_step:
                    row = window.row(self.step, round(self.step * cfg.accum / spe, 3),
                                     float(self.opt.param_groups[1]["lr"]), timer)
                    self.history.append(row)
                    # redrawn at the bar's pace, not now
                    bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}",
                                    img_s=f"{row['images_per_s']:.1f}", refresh=False)
                if cfg.val_gt is not None and ((cfg.val_every and self.step % cfg.val_every == 0)
                                               or self.step == cfg.steps):
                    self.validate()
                if (cfg.ckpt_every and self.step % cfg.ckpt_every == 0) or last_step:
                    _save(self.checkpoint(False), self.run / "last.pt")
                    self.write_metrics()
        finally:
            bar.close()
            batches.close()
        train_seconds = time.perf_counter() - t_train
        finished = self.step >= cfg.steps
        if finished:
            _save(self.checkpoint(True), self.run / "final.pt")
        self.write_metrics()
        return self._result(finished, timer, total_imgs / max(train_seconds, 1e-9))

    def _result(self, finished: bool, timer: Timer, images_per_s: float) -> TrainResult:
        run, final = self.run, self.final_validation()
        paths = {"config": str(run / "config.json"), "last": str(run / "last.pt"),
                 "metrics_json": str(run / "metrics.json"), "metrics_csv": str(run / "metrics.csv"),
                 "curves_png": str(run / "curves.png")}
        if finished:
            paths["final"] = str(run / "final.pt")
        if (run / "best.pt").exists():
            paths["best"] = str(run / "best.pt")
        return TrainResult(
            run_dir=str(run), steps=self.step, best_miou=self.best["miou"], best_step=self.best["step"],
            final_miou=final["miou"] if final else None,
            background_miou=final["background_miou"] if final else None,
            final_loss=self.history[-1]["loss"] if self.history else None, seconds=timer.seconds,
            images_per_s=images_per_s, paths=paths)


class _LogWindow:
    """Loss and throughput since the last logged step."""

    def __init__(self) -> None:
        self.loss, self.steps, self.images, self.t0 = 0.0, 0, 0, time.perf_counter()

    def add(self, loss: float, images: int) -> None:
        self.loss += loss
        self.steps += 1
        self.images += images

    def row(self, step: int, epoch: float, lr: float, timer: Timer) -> dict:
        """The ``metrics.csv`` row of ``step``; the window starts afresh."""
        now = time.perf_counter()
        row = {"step": step, "epoch": epoch, "loss": self.loss / self.steps, "lr": lr,
               "images_per_s": self.images / max(now - self.t0, 1e-9), "seconds": round(timer.seconds, 2),
               "threads": torch.get_num_threads()}
        self.loss, self.steps, self.images, self.t0 = 0.0, 0, 0, now
        return row


def _summarise(res: TrainResult, cfg: TrainConfig, trainer: _Trainer, governor: ThreadGovernor,
               quiet: bool) -> None:
    """The closing summary of ``isle train``."""
    finished = res.steps >= cfg.steps
    dev = trainer.dev
    rows = {"steps": f"{res.steps} of {cfg.steps}" + ("" if finished else " (stopped; --resume continues)"),
            "model": f"DeepLabV3+ {cfg.backbone} os{cfg.output_stride}, {len(trainer.classes)} classes",
            "final loss": f"{res.final_loss:.4f}" if res.final_loss is not None else "-",
            "images/s": f"{res.images_per_s:.1f} ({dev.type}"
                        + (f", {torch.get_num_threads()} threads" if dev.type == "cpu" else "")
                        + (f", thread count followed the load {governor.changes}x"
                           if governor.changes else "")
                        + ")"}
    if res.best_miou is not None:
        rows["val mIoU"] = (f"best {res.best_miou:.2f}% (step {res.best_step}), final "
                            + (f"{res.final_miou:.2f}%" if res.final_miou is not None else "-")
                            + (f", all-background {res.background_miou:.2f}%"
                               if res.background_miou is not None else ""))
    elif trainer.val_hist:
        rows["val mIoU"] = f"undefined: {cfg.val_gt} has no labelled pixel (every gt value is 255)"
    rows["seconds"] = f"{res.seconds:.1f}"
    rows["output"] = str(res.run_dir)
    summary("isle train", rows, quiet=quiet)
