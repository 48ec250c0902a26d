"""``isle export STORE --out DIR``: write a label store as VOC palette PNGs."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from isle_fast.backend import add_backend_argument

    parser.add_argument("store", metavar="ENSEMBLE", help="ensemble (or any label / score) store")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for <id>.png (must not exist)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing folder when done")
    add_backend_argument(parser)  # (decodes score stores)
    parser.add_argument("--quiet", action="store_true", help="no progress bar or summary")


def run(args: argparse.Namespace) -> int:
    from isle_fast.progress import summary
    from isle_fast.ensemble.report import export_pngs

    res = export_pngs(args.store, args.out, overwrite=args.overwrite, backend=args.backend,
                      progress=not args.quiet)
    summary("isle export: done", {"images": res["images"], "seconds": f"{res['seconds']:.2f}",
                                  "output": res["path"]}, quiet=args.quiet)
    return 0
