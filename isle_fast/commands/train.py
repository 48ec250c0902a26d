"""``isle train --images IMG --labels LABELS --out RUN``: train DeepLabV3+ (ISLE step 4)."""

from __future__ import annotations

import argparse

HELP = "step 4: train DeepLabV3+ on a label store"


def _weights(text: str) -> str | None:
    return None if text.lower() == "none" else text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("data")
    g.add_argument("--images", required=True, metavar="IMG", help="training images store (kind images)")
    g.add_argument("--labels", required=True, metavar="LABELS",
                   help="training label store: the ensemble or any set (scores stores are decoded by argmax)")
    g.add_argument("--val-images", metavar="IMG", help="validation images store")
    g.add_argument("--val-gt", metavar="GT", help="validation ground-truth store")
    g.add_argument("--out", required=True, metavar="RUN", help="run folder (checkpoints, metrics, curves)")
    g.add_argument("--crop", type=int, default=512, help="training crop side (default 512)")
    g.add_argument("--scale", type=float, nargs=2, default=(0.5, 2.0), metavar=("MIN", "MAX"),
                   help="random scale range (default 0.5 2.0)")
    g.add_argument("--no-flip", action="store_true", help="no random horizontal flips")
    g.add_argument("--fg-crop", type=float, default=0.0, metavar="P",
                   help="probability that a crop is centred on a random object (class drawn uniformly among "
                        "the image's classes); default 0: uniform crops, as in the paper")
    g.add_argument("--workers", type=int, default=2, help="DataLoader worker processes (default 2)")
    g.add_argument("--window", type=int, default=2,
                   help="chunk groups shuffled together (larger: more random, more memory; default 2)")
    m = parser.add_argument_group("model")
    m.add_argument("--backbone", default="resnet50",
                   choices=("resnet50", "resnet101", "resnet18", "resnet34", "resnet18_w32", "resnet18_w16"),
                   help="ResNet backbone (default resnet50, as in the paper; resnet18, or the narrow "
                        "resnet18_w32 / resnet18_w16 from random weights, for quick CPU runs)")
    m.add_argument("--weights", default="imagenet", type=_weights, metavar="imagenet|none|PATH",
                   help="backbone weights: torchvision ImageNet (needs a download once), none, or a "
                        "state-dict file (default imagenet)")
    m.add_argument("--output-stride", type=int, default=16, choices=(8, 16, 32), help="default 16")
    m.add_argument("--head-channels", type=int, default=256, help="ASPP / decoder width (default 256)")
    o = parser.add_argument_group("optimisation")
    o.add_argument("--steps", type=int, default=30000, help="optimiser steps (default 30000)")
    o.add_argument("--batch-size", type=int, default=16, help="images per micro-batch (default 16)")
    o.add_argument("--accum", type=int, default=1, help="micro-batches per optimiser step (default 1)")
    o.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd", help="default sgd")
    o.add_argument("--lr", type=float, default=None,
                   help="head learning rate (default 0.01 for sgd, 1e-4 for adamw); poly decay, power 0.9")
    o.add_argument("--backbone-lr-mult", type=float, default=None,
                   help="backbone lr = lr x this (default 0.1 with pretrained weights, else 1)")
    o.add_argument("--momentum", type=float, default=0.9)
    o.add_argument("--weight-decay", type=float, default=1e-4)
    o.add_argument("--power", type=float, default=0.9, help="poly schedule power (default 0.9)")
    o.add_argument("--amp", dest="amp", action="store_true", default=None,
                   help="mixed precision: float16 on CUDA (default on there), bfloat16 on CPU (default off)")
    o.add_argument("--no-amp", dest="amp", action="store_false", help="full float32")
    o.add_argument("--seed", type=int, default=0, help="seed of init, data order and augmentation")
    o.add_argument("--deterministic", action="store_true",
                   help="deterministic algorithms (bitwise-reproducible resume; slower on GPU)")
    o.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default auto)")
    o.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch CPU threads (default: one per core that other processes leave idle; on a "
                        "shared machine a thread per core makes every operation wait for a busy one)")
    r = parser.add_argument_group("run")
    r.add_argument("--val-every", type=int, default=1000, help="validate every N steps (0: at the end)")
    r.add_argument("--ckpt-every", type=int, default=1000, help="checkpoint every N steps (0: at the end)")
    r.add_argument("--log-every", type=int, default=10, help="log loss / lr / images/s every N steps")
    r.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    r.add_argument("--overwrite", action="store_true", help="start afresh in an --out that holds a run")
    r.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="stop after N steps of this call (checkpointed; --resume continues)")
    r.add_argument("--quiet", action="store_true", help="no progress bar or summary")


def run(args: argparse.Namespace) -> int:
    from isle_fast.training.train import train

    train(args.images, args.labels, args.out, val_images=args.val_images, val_gt=args.val_gt,
          backbone=args.backbone, weights=args.weights, output_stride=args.output_stride,
          head_channels=args.head_channels, crop=args.crop, scale_range=tuple(args.scale),
          flip=not args.no_flip, fg_crop=args.fg_crop, steps=args.steps, batch_size=args.batch_size,
          accum=args.accum,
          optimizer=args.optimizer, lr=args.lr, backbone_lr_mult=args.backbone_lr_mult,
          momentum=args.momentum, weight_decay=args.weight_decay, power=args.power, amp=args.amp,
          seed=args.seed, deterministic=args.deterministic, window=args.window, num_workers=args.workers,
          val_every=args.val_every, ckpt_every=args.ckpt_every, log_every=args.log_every,
          device=args.device, threads=args.threads, resume=args.resume, overwrite=args.overwrite,
          stop_after=args.stop_after,
          quiet=args.quiet)
    return 0
