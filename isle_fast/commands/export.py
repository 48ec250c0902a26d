"""``isle export STORE --out DIR``: write a label store as VOC palette PNGs."""

from __future__ import annotations

import argparse


def add_compress_argument(parser: argparse.ArgumentParser) -> None:
    """``--compress-level`` (shared with ``isle run``)."""
    from isle_fast.stores.export import COMPRESS_CHOICES, DEFAULT_COMPRESS

    parser.add_argument("--compress-level", dest="compress_level", choices=COMPRESS_CHOICES,
                        default=DEFAULT_COMPRESS, metavar="{rle,0..9}",
                        help="PNG compression: 'rle' = zlib's run-length strategy (default: 2.5x "
                             "level 6's speed on VOC label maps for files 17%% larger), or a zlib level "
                             "0-9 (PIL's usual default is 6)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from isle_fast.backend import add_backend_argument

    parser.add_argument("store", metavar="ENSEMBLE", help="ensemble (or any label / score) store")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for <id>.png (must not exist)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing folder when done")
    add_backend_argument(parser)  # (decodes score stores)
    add_compress_argument(parser)
    parser.add_argument("--workers", type=int, default=None,
                        help="worker processes encoding PNGs (default: one per core)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or summary")


def run(args: argparse.Namespace) -> int:
    from isle_fast.ensemble.report import export_pngs
    from isle_fast.errors import InputError
    from isle_fast.progress import summary

    if args.workers is not None and args.workers < 1:
        raise InputError(f"--workers must be at least 1, not {args.workers}")
    res = export_pngs(args.store, args.out, overwrite=args.overwrite, backend=args.backend,
                      progress=not args.quiet, compress=args.compress_level, workers=args.workers)
    rate = res["images"] / res["seconds"] if res["seconds"] > 0 else float("nan")
    summary("isle export: done", {"images": f"{res['images']:,}", "seconds": f"{res['seconds']:.2f}",
                                  "throughput": f"{rate:,.0f} images/s",
                                  "PNG bytes": (f"{res['bytes'] / 2**20:,.2f} MiB "
                                                f"(compression {res['compress']})"),
                                  "output": res["path"]}, quiet=args.quiet)
    return 0
