"""``isle demo``: make a synthetic VOC-like data set and run every pipeline step on it.

The arguments and the closing table; the steps are :mod:`isle_fast.demo`'s.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from isle_fast.demo import TRAIN_DEFAULT, TRAIN_QUICK


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo-out", metavar="DIR",
                        help="output folder, created fresh (default: demo-out)")
    parser.add_argument("--images", type=int, default=None, metavar="N",
                        help="number of synthetic images, train + val (default 64; 16 with --quick)")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default 0)")
    parser.add_argument("--quick", action="store_true",
                        help="a small, fast run (16 images of 64-96 px, a few training steps) for smoke tests")
    parser.add_argument("--refine", default="crf", metavar="CHAIN",
                        help="refinement chain for the soft (CAM) sets: 'crf' (default), 'affinity,crf' "
                             "(adds a short AffinityNet training from random weights: minutes of CPU, and "
                             "affinities trained that briefly can LOWER the mIoU), 'affinity' or 'none'")
    parser.add_argument("--skip-train", action="store_true",
                        help="stop after the report (no DeepLabV3+ training)")
    parser.add_argument("--train-steps", type=int, default=None, metavar="N",
                        help=f"DeepLabV3+ optimiser steps per model (default {TRAIN_DEFAULT['steps']}; "
                             f"{TRAIN_QUICK['steps']} with --quick)")
    parser.add_argument("--train-seeds", type=int, default=1, metavar="N",
                        help="train each model with N seeds (--seed, --seed+1, ...) and compare the means: "
                             "one seed at the demo's budget moves val mIoU by about 10 points (default 1)")
    parser.add_argument("--device", default="auto", metavar="DEV",
                        help="torch device for training, prediction and AffinityNet (auto: CUDA when present)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier demo in --out (only a folder an earlier demo made)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _headline_lines(h: dict[str, Any]) -> list[str]:
    lines = []
    if h.get("refine_gain"):
        lines.append("refinement gain (train mIoU): " + ", ".join(
            f"{n} {g:+.1f}" for n, g in h["refine_gain"].items() if g is not None))
    if h.get("ensemble_miou") is not None:
        lines.append(f"ensemble mIoU {h['ensemble_miou']:.1f} vs best single set {h['best_single_set']} "
                     f"{h['best_single_miou']:.1f}: {h['ensemble_gain']:+.1f} (train split)")
    if h.get("val_miou_ensemble") is not None:
        lo, hi = h["val_gain_95ci"]
        lines.append(f"DeepLabV3+ val mIoU: ensemble-trained {h['val_miou_ensemble']:.1f}, "
                     f"{h['val_single_set']}-trained {h['val_miou_single']:.1f}: {h['val_gain']:+.1f} "
                     f"(95% CI {lo:+.1f} .. {hi:+.1f}; {h['val_verdict'].split(':')[0]})")
    elif h.get("val_note"):
        lines.append(f"training: {h['val_note']}")
    return lines


def run(args: argparse.Namespace) -> int:
    from isle_fast.demo import run_demo

    doc = run_demo(args)
    table = doc["steps"]
    width = max(len(r["step"]) for r in table)
    print(f"\nisle demo: {len(table)} steps in {doc['total_seconds']:.1f} s "
          f"({doc['total_user_cpu_seconds']:.1f} s user CPU); everything is in {Path(args.out)}")
    print(f"  {'step'.ljust(width)}  {'seconds':>8}  {'user CPU':>8}  output")
    for r in table:
        print(f"  {r['step'].ljust(width)}  {r['seconds']:>8.2f}  {r['user_cpu_seconds']:>8.2f}  {r['output']}")
    for line in _headline_lines(doc["headline"]):
        print(f"  {line}")
    sys.stdout.flush()
    return 0
