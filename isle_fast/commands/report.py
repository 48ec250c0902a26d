"""``isle report SETS... --gt GT --out DIR``: the paper's tables and figures for any data."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from isle_fast.commands.evaluate import add_common

    add_common(parser)
    parser.add_argument("--out", required=True, metavar="DIR", help="report folder (must not exist)")
    parser.add_argument("--ensemble", metavar="E", help="an ensemble store to report (default: computed)")
    parser.add_argument("--images", metavar="IMG",
                        help="images store, or a folder of <id>.jpg / .png (only the images drawn are read): "
                             "adds the side-by-side figure")
    parser.add_argument("--num-images", type=int, default=3, metavar="K", help="images in the figure")
    parser.add_argument("--policy", choices=("score", "order", "ignore"), default="score",
                        help="merge policy of the computed ensembles")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing folder when done")


def run(args: argparse.Namespace) -> int:
    from isle_fast.commands.evaluate import no_gt
    from isle_fast.ensemble.report import report
    from isle_fast.errors import InputError
    from isle_fast.progress import one_bar, summary
    from isle_fast.stores.stack import open_stack

    if no_gt(args.gt) or args.estimator:
        raise InputError("isle report scores against pixel labels: give a --gt (one of some images works); "
                         "--gt none and --estimator are for isle evaluate and isle merge")
    with one_bar("report", units=open_stack(args.gt).num_images, stages=2, quiet=args.quiet):  # evaluate, subsets
        res = report(args.sets, args.gt, args.out, ensemble=args.ensemble, images=args.images,
                     policy=args.policy, average=args.average, backend=args.backend,
                     bg_threshold=args.bg_threshold, num_images=args.num_images, overwrite=args.overwrite,
                     progress=not args.quiet)
    rows = {"files": ", ".join(res["files"]), "seconds": f"{res['seconds']:.2f}", "output": res["path"]}
    if res["ensemble_miou"] is not None:
        rows["ensemble mIoU"] = (f"{res['ensemble_miou']:.2f} (best member {res['best_member']} "
                                 f"{res['best_member_miou']:.2f})")
    summary("isle report: done", rows, quiet=args.quiet)
    return 0
