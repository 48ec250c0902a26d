"""Every setting of a training run, defined once: :class:`TrainConfig` and :class:`RunOptions`.

Each field (:func:`isle_fast.options.option`) carries its default, its help text and its
command-line flag, so :func:`isle_fast.train` (its keyword arguments and its docstring)
and ``isle train`` (its argparse options) are both made from these two classes. The
module does not import torch: ``isle train --help`` stays fast.

* :class:`TrainConfig`: what determines the trained model. Stored in ``config.json``
  and in every checkpoint; ``--resume`` refuses a change (except the settings marked
  resumable: workers, periods, device, threads).
* :class:`RunOptions`: how this call runs (the run folder, resume, overwrite, stop early,
  quiet); not stored.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any

from isle_fast.errors import InputError, param
from isle_fast.options import build, option, resumable, settings_fields
from isle_fast.training.backbones import RESNETS

__all__ = ["TrainConfig", "RunOptions", "options_from_kwargs", "config_from_dict", "RESUMABLE"]


def _weights(text: str) -> str | None:
    """``--weights`` text: ``none`` (any case) is no pretrained weights."""
    return None if text.lower() == "none" else text


@dataclass
class TrainConfig:
    """Every setting that determines a training run (JSON-able; stored in checkpoints and ``config.json``)."""

    images: str = option(help="training images store (kind images)", group="data", metavar="IMG")
    labels: str = option(
        help="training label store: the ensemble or any set (scores stores are decoded by argmax)",
        group="data",
        metavar="LABELS",
    )
    val_images: str | None = option(
        None, help="validation images store (given with the validation gt)", group="data", metavar="IMG"
    )
    val_gt: str | None = option(
        None,
        help="validation ground-truth store (given with the validation images)",
        group="data",
        metavar="GT",
    )
    backbone: str = option(
        "resnet50",
        group="model",
        choices=RESNETS,
        help="ResNet backbone (resnet50 as in the paper; resnet18, or the narrow "
        "resnet18_w32 / resnet18_w16 from random weights, for quick CPU runs)",
    )
    weights: str | None = option(
        "imagenet",
        group="model",
        metavar="imagenet|none|PATH",
        parse=_weights,
        help="backbone weights: torchvision ImageNet (needs a download once, a clear "
        "error offline), none, or a state-dict file",
    )
    output_stride: int = option(16, group="model", choices=(8, 16, 32), help="output stride of the backbone")
    head_channels: int = option(
        256,
        group="model",
        minimum=1,
        help="ASPP / decoder width (256 in the paper; smaller for quick CPU runs)",
    )
    crop: int = option(512, group="data", minimum=16, help="training crop side")
    scale_range: tuple[float, float] = option(
        (0.5, 2.0), group="data", flag="--scale", metavar=("MIN", "MAX"), help="random scale range"
    )
    flip: bool = option(
        True,
        group="data",
        flag="--no-flip",
        help="random horizontal flips",
        cli_help="no random horizontal flips",
    )
    fg_crop: float = option(
        0.0,
        group="data",
        metavar="P",
        minimum=0.0,
        maximum=1.0,
        help="probability that a crop is centred on a random object (class drawn "
        "uniformly among the image's classes); 0: uniform crops, as in the paper",
    )
    steps: int = option(
        30000,
        group="optimisation",
        minimum=1,
        help="optimiser steps in total (the length of the poly schedule)",
    )
    batch_size: int = option(
        16,
        group="optimisation",
        minimum=2,
        why="BatchNorm in the ASPP image-pooling branch needs more than one image per "
        f"micro-batch (use {param('accum')} for a larger effective batch)",
        help="images per micro-batch",
    )
    accum: int = option(
        1, group="optimisation", minimum=1, help="micro-batches per optimiser step (gradient accumulation)"
    )
    optimizer: str = option("sgd", group="optimisation", choices=("sgd", "adamw"), help="the optimiser")
    lr: float | None = option(
        None,
        group="optimisation",
        minimum=0.0,
        help="head learning rate (default 0.01 for sgd, 1e-4 for adamw); poly decay",
    )
    backbone_lr_mult: float | None = option(
        None,
        group="optimisation",
        minimum=0.0,
        help="backbone lr = lr x this (default 0.1 with pretrained weights, else 1)",
    )
    momentum: float = option(0.9, group="optimisation", help="SGD momentum")
    weight_decay: float = option(1e-4, group="optimisation", minimum=0.0, help="weight decay")
    power: float = option(0.9, group="optimisation", help="poly schedule power")
    amp: bool | None = option(
        None,
        group="optimisation",
        help="mixed precision: float16 + GradScaler on CUDA (default on there), "
        "bfloat16 autocast on CPU (default off; faster only with bfloat16 "
        "instructions)",
        cli_help=(
            "mixed precision: float16 on CUDA (default on there), bfloat16 on CPU (default off)",
            "full float32",
        ),
    )
    seed: int = option(0, group="optimisation", help="seed of init, data order and augmentation")
    deterministic: bool = option(
        False,
        group="optimisation",
        help="deterministic algorithms (bitwise-reproducible resume; slower on GPU)",
    )
    window: int = option(
        2, group="data", help="chunk groups shuffled together (larger: more random, more memory)"
    )
    num_workers: int = option(
        2, group="data", flag="--workers", minimum=0, resumable=True, help="DataLoader worker processes"
    )
    val_every: int = option(
        1000, group="run", minimum=0, resumable=True, help="validate every N steps (0: only at the end)"
    )
    ckpt_every: int = option(
        1000, group="run", minimum=0, resumable=True, help="checkpoint every N steps (0: only at the end)"
    )
    log_every: int = option(
        10,
        group="run",
        minimum=0,
        resumable=True,
        help="log loss / lr / images/s every N steps (0: only at the end)",
    )
    device: str = option("auto", group="optimisation", resumable=True, help="auto, cpu or cuda[:N]")
    threads: int | None = option(
        None,
        group="optimisation",
        metavar="N",
        minimum=1,
        resumable=True,
        help="torch CPU threads (default: one per core that other processes leave "
        "idle, re-chosen as the load changes; on a shared machine a thread per "
        "core makes every operation wait for a busy one)",
    )

    def resolved(self) -> TrainConfig:
        """A copy with the automatic choices (lr, backbone multiplier) filled in."""
        d = asdict(self)
        if d["lr"] is None:
            d["lr"] = 0.01 if self.optimizer == "sgd" else 1e-4
        if d["backbone_lr_mult"] is None:
            pretrained = self.weights is not None and str(self.weights).lower() != "none"
            d["backbone_lr_mult"] = 0.1 if pretrained else 1.0
        return TrainConfig(**d)

    def check(self) -> None:
        """Raise :class:`InputError` naming the first bad setting (each one, and the pairs)."""
        build(TrainConfig, asdict(self))
        if (self.val_images is None) != (self.val_gt is None):
            raise InputError(
                f"{param('val_images')} and {param('val_gt')} go "
                "together: give both or neither"
            )


@dataclass
class RunOptions:
    """How one call of :func:`isle_fast.train` runs: not part of the model's configuration."""

    out: str = option(help="run folder (checkpoints, metrics, curves)", group="data", metavar="RUN")
    resume: bool = option(
        False, group="run", help="continue the run in the run folder from its last checkpoint"
    )
    overwrite: bool = option(False, group="run", help="start afresh in a run folder that already holds a run")
    stop_after: int | None = option(
        None,
        group="run",
        metavar="N",
        minimum=0,
        help="stop after N steps of this call (checkpointed; resume continues)",
    )
    quiet: bool = option(False, group="run", help="no progress bar or summary")


#: Config keys that may change on ``resume`` without changing the result.
RESUMABLE = resumable(TrainConfig)


def options_from_kwargs(values: dict[str, Any]) -> tuple[TrainConfig, RunOptions]:
    """The checked :class:`TrainConfig` and :class:`RunOptions` of :func:`isle_fast.train`'s arguments.

    Raises
    ------
    InputError
        An unknown argument (the known ones are listed), or a bad value (named by its flag).
    """
    cfg_names = {f.name for f in settings_fields(TrainConfig)}
    run_names = {f.name for f in settings_fields(RunOptions)}
    unknown = sorted(set(values) - cfg_names - run_names)
    if unknown:
        raise InputError(
            f"train() got unknown setting{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
            f"the settings are: {', '.join([*cfg_names, *run_names])}"
        )
    cfg = build(TrainConfig, {k: v for k, v in values.items() if k in cfg_names})
    run = build(RunOptions, {k: v for k, v in values.items() if k in run_names})
    cfg.check()
    return cfg, run


def config_from_dict(d: dict[str, Any]) -> dict[str, Any]:
    """A stored configuration (``config.json``, a checkpoint's ``config``) with today's keys.

    Runs written before ``scale_range`` was one setting stored ``scale_min`` / ``scale_max``;
    keys added since read as their defaults.
    """
    d = dict(d)
    if "scale_min" in d or "scale_max" in d:
        d["scale_range"] = (d.pop("scale_min", 0.5), d.pop("scale_max", 2.0))
    if isinstance(d.get("scale_range"), list):
        d["scale_range"] = tuple(d["scale_range"])
    for f in fields(TrainConfig):
        if f.name not in d and f.default is not MISSING:
            d[f.name] = f.default
    return d
