"""``isle predict RUN --images IMG --out STORE|DIR``: masks from a trained DeepLabV3+."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", help="run folder written by `isle train` (or a .pt checkpoint)")
    parser.add_argument("--images", required=True, metavar="IMG", help="images store to predict")
    parser.add_argument("--out", required=True, metavar="STORE|DIR",
                        help="output label store (kind pseudo; `isle evaluate` scores it) or PNG folder")
    parser.add_argument("--format", choices=("store", "png"), default="store",
                        help="a label store (default) or VOC palette PNGs named <id>.png")
    parser.add_argument("--checkpoint", choices=("best", "final", "last"), default="best",
                        help="best validation mIoU (default; falls back to final), final, or last saved")
    parser.add_argument("--flip", action="store_true", help="test-time augmentation: average with the flipped image")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0], metavar="S",
                        help="test-time scales, e.g. 0.75 1 1.25 (default 1)")
    parser.add_argument("--window", type=int, default=None, metavar="PX",
                        help="sliding-window inference with PX-pixel windows (default: whole image)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default auto)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers reading images")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="torch CPU threads (default: one per core that other processes leave idle)")
    parser.add_argument("--name", default=None, help="set name of the output store (default: folder name)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or summary")


def run(args: argparse.Namespace) -> int:
    from isle_fast.training.predict import predict

    predict(args.run, args.images, args.out, format=args.format, which=args.checkpoint, scales=args.scales,
            flip=args.flip, window=args.window, device=args.device, num_workers=args.workers, threads=args.threads,
            overwrite=args.overwrite, name=args.name, quiet=args.quiet)
    return 0
