"""``isle ingest {labels,scores,images,tiff} SRC --out STORE``: files into stack stores."""

from __future__ import annotations

import argparse

HELP = "turn PNG / NPY / TIFF / image folders into stack stores"

_EPILOG = """\
formats:
  labels   folder of label-map PNGs (palette or grayscale, value = class index, 255 = ignore)
           or 2-D .npy arrays, one per image: <id>.png. Pseudo-label sets (--kind pseudo)
           and ground truth (--kind gt).
  scores   folder of CAM / score files: <id>.npy dicts {keys, high_res|cam} as IRN /
           PuzzleCAM write them (pickled: needs --allow-pickle), plain .npy / .npz arrays
           C x H x W or H x W x C, or C-1 foreground slices, or K slices + keys.
  images   folder of RGB images (<id>.jpg / .png) for training.
  tiff     one TIFF, a folder of TIFFs or several TIFFs: H x W label maps or H x W x C
           score stacks, read tile by tile (for images too large for memory).

examples:
  isle ingest labels VOC/SegmentationClassAug --kind gt --ids train_aug.txt --out gt.zarr
  isle ingest labels puzzlecam_pngs --gt gt.zarr --out puzzlecam.zarr
  isle ingest scores irn_cams --gt gt.zarr --allow-pickle --bg-threshold 0.15 --out irn.zarr
  isle ingest images VOC/JPEGImages --gt gt.zarr --out images.zarr
"""


def _chunks(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--chunks takes comma-separated integers like 1,512,512, not {text!r}")
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"--chunks values must be positive, not {text!r}")
    return vals


def _common(p: argparse.ArgumentParser, *, kind: bool = True, classes: bool = True) -> None:
    p.add_argument("src", metavar="SRC", nargs="+" if p.prog.endswith("tiff") else None,
                   help="source folder" + (" or TIFF file(s)" if p.prog.endswith("tiff") else ""))
    p.add_argument("-o", "--out", required=True, metavar="STORE", help="store to write (folder or fsspec URL)")
    p.add_argument("--ids", metavar="FILE",
                   help="id list file (one id per line, or 'JPEGImages/x.jpg SegmentationClassAug/x.png' lines); "
                        "default: the ground truth's ids, else every file in SRC")
    if classes:
        p.add_argument("--classes", metavar="FILE|voc", default=None,
                       help="class names, background first: 'voc' or a file with one name per line "
                            "(default: the --gt store's classes, else voc)")
    if kind:
        p.add_argument("--kind", choices=("pseudo", "gt", "ensemble"), default="pseudo",
                       help="what the store holds (default: pseudo)")
    p.add_argument("--name", help="the set's name (default: the store folder's name)")
    p.add_argument("--gt", metavar="GT", help="ground truth store or label folder: check ids and sizes against it "
                                              "and align with it")
    p.add_argument("--skip-bad", action="store_true",
                   help="leave bad images out (listed in the summary and the store's provenance) instead of failing")
    p.add_argument("--workers", type=int, default=None, help="decoding threads (default: 2 x CPUs, 2 to 16)")
    p.add_argument("--chunks", type=_chunks, default=None, metavar="K,H,W[,C]",
                   help="chunk shape of the main array (default: a few whole images, ~8 MiB, or tiles)")
    p.add_argument("--overwrite", action="store_true", help="replace STORE if it exists (once the new one is complete)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no summary")


def _score_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--score-dtype", choices=("uint8", "float16", "float32"), default="uint8",
                   help="storage type: uint8 = round(255 * score) (default), or float16 / float32")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from isle_fast.commands.evaluate import bg_threshold_arg
    from isle_fast.stores.ingest import DEFAULT_BG_THRESHOLD

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = _EPILOG
    sub = parser.add_subparsers(dest="format", metavar="FORMAT", required=True)

    p = sub.add_parser("labels", help="label-map PNG / .npy folder -> labels store",
                       description="Ingest a folder of label maps (value = class index, 255 = ignore).")
    _common(p)

    p = sub.add_parser("scores", help="CAM / score .npy / .npz folder -> scores store",
                       description="Ingest CAM / score files into a scores store (I, H, W, C). Foreground-only "
                                   "CAMs get a constant background slice (--bg-threshold), absent classes 0.")
    _common(p)
    p.add_argument("--bg-threshold", type=bg_threshold_arg, default=DEFAULT_BG_THRESHOLD, metavar="T",
                   help=f"background score of foreground-only CAMs (default {DEFAULT_BG_THRESHOLD}, "
                        "IRN's cam_eval_thres)")
    _score_options(p)
    p.add_argument("--normalize", action="store_true",
                   help="max-normalise each class slice (ReLU, divide by the maximum) instead of refusing "
                        "scores outside [0, 1]")
    p.add_argument("--allow-pickle", action="store_true",
                   help="read pickled .npy dicts (IRN / PuzzleCAM output); unpickling can run code from the file, "
                        "so only for files you trust")
    p.add_argument("--upsample", action="store_true",
                   help="bilinearly resize a low-resolution 'cam' (no 'high_res' in the file) to the --gt size")

    p = sub.add_parser("images", help="RGB JPEG / PNG folder -> images store",
                       description="Ingest RGB images (converted to RGB) into an images store.")
    _common(p, kind=False)

    p = sub.add_parser("tiff", help="(large) TIFF label maps or H x W x C score stacks, tile by tile",
                       description="Ingest TIFFs one image per file, reading and writing tile by tile.")
    _common(p)
    p.add_argument("--encoding", choices=("labels", "scores"), default=None,
                   help="default: labels for H x W TIFFs, scores for H x W x C")
    _score_options(p)


def run(args: argparse.Namespace) -> int:
    from isle_fast.stores import ingest

    common = dict(ids=args.ids, name=args.name, gt=args.gt, skip_bad=args.skip_bad, workers=args.workers,
                  chunks=args.chunks, overwrite=args.overwrite, quiet=args.quiet)
    if args.format == "labels":
        ingest.ingest_labels(args.src, args.out, classes=args.classes, kind=args.kind, **common)
    elif args.format == "scores":
        ingest.ingest_scores(args.src, args.out, classes=args.classes, kind=args.kind,
                             bg_threshold=args.bg_threshold, score_dtype=args.score_dtype,
                             normalize=args.normalize, allow_pickle=args.allow_pickle, upsample=args.upsample,
                             **common)
    elif args.format == "images":
        ingest.ingest_images(args.src, args.out, classes=args.classes, **common)
    else:
        src = args.src[0] if len(args.src) == 1 else args.src
        ingest.ingest_tiff(src, args.out, classes=args.classes, kind=args.kind, encoding=args.encoding,
                           score_dtype=args.score_dtype, **common)
    return 0
