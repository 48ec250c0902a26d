"""``isle ingest {labels,scores,images,tiff,image-labels} SRC --out STORE``: files into stores."""

from __future__ import annotations

import argparse

_EPILOG = """\
formats:
  labels   folder of label-map PNGs (palette or grayscale, value = class index, 255 = ignore)
           or 2-D .npy arrays, one per image: <id>.png. Pseudo-label sets (--kind pseudo)
           and ground truth (--kind gt).
  scores   folder of CAM / score files, <id>.npy / .npz, in any layout the public WSSS
           code writes (recognised per file; --cam-layout forces one):
             irn        {keys: 0-based foreground, high_res, cam}
             puzzlecam  {keys: [0, k+1 ...] background first, hr_cam | rw, cam}
             seam       {class index (0-based foreground): H x W}  (SEAM / PSA CAMs)
             psa-crf    {0: background, k+1: class k}  (PSA / SEAM CRF outputs)
           or plain arrays C x H x W / H x W x C, C-1 foreground slices, K slices + keys.
           Pickled .npy dicts are read by a restricted unpickler (arrays, dicts, torch
           tensors; nothing else is built or run), so no --allow-pickle is needed.
  images   folder of RGB images (<id>.jpg / .png) for training.
  tiff     one TIFF, a folder of TIFFs or several TIFFs: H x W label maps or H x W x C
           score stacks, read tile by tile (for images too large for memory).
  image-labels
           image-level labels: cls_labels.npy (the file PSA / IRN / PuzzleCAM ship), a
           folder of VOC XML annotations, a CSV or JSON (id -> class names or indices),
           into an image-labels store aligned with --gt. labels / scores take the same
           sources with --image-labels and store them with the stack.

examples:
  isle ingest labels VOC/SegmentationClassAug --kind gt --ids train_aug.txt --out gt.zarr
  isle ingest labels puzzlecam_pngs --gt gt.zarr --out puzzlecam.zarr
  isle ingest scores irn_cams --gt gt.zarr --bg-threshold 0.15 --out irn.zarr
  isle ingest scores puzzlecam_cams --gt gt.zarr --image-labels cls_labels.npy --out puzzlecam.zarr
  isle ingest image-labels voc12/cls_labels.npy --gt gt.zarr --out image_labels.zarr
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


def _image_labels_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image-labels", metavar="SRC",
                   help="image-level labels to store with the stack (cls_labels.npy, a VOC XML folder, a CSV "
                        "/ JSON, or a store holding them); every image needs labels")


def _score_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--score-dtype", choices=("uint8", "float16", "float32"), default="uint8",
                   help="storage type: uint8 = round(255 * score) (default), or float16 / float32; every "
                        "type keeps each pixel's argmax, so the store decodes exactly like the files")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from isle_fast.commands.evaluate import bg_threshold_arg
    from isle_fast.stores.ingest import DEFAULT_BG_THRESHOLD

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = _EPILOG
    sub = parser.add_subparsers(dest="format", metavar="FORMAT", required=True)

    p = sub.add_parser("labels", help="label-map PNG / .npy folder -> labels store",
                       description="Ingest a folder of label maps (value = class index, 255 = ignore).")
    _common(p)
    _image_labels_option(p)

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
                   help="load a pickle the restricted unpickler refuses (one naming anything but arrays, "
                        "dicts and tensors) with Python's full unpickler; that can run code from the file, "
                        "so only for files you trust (CAM dicts of the public code need no flag)")
    p.add_argument("--upsample", action="store_true",
                   help="bilinearly resize a low-resolution 'cam' (no 'high_res' in the file) to the --gt size")
    from isle_fast.stores.cams import LAYOUT_CHOICES

    p.add_argument("--score-layout", choices=("auto", "sparse", "dense"), default="auto",
                   help="sparse: store only the classes present in each image (a CAM file's keys; uint8, "
                        "constant background); dense: every class slice; auto (default): sparse where it "
                        "applies. Readers see the same H x W x C stack either way")
    p.add_argument("--cam-layout", choices=LAYOUT_CHOICES, default="auto",
                   help="CAM file layout (default auto: recognised per file, and an ambiguous file is "
                        "refused); see the formats below")
    p.add_argument("--image-labels", metavar="SRC",
                   help="image-level labels (cls_labels.npy, a VOC XML folder, a CSV / JSON, or a store): "
                        "decide ambiguous layouts per image, give the classes of files without keys, and are "
                        "stored with the stack")

    p = sub.add_parser("images", help="RGB JPEG / PNG folder -> images store",
                       description="Ingest RGB images (converted to RGB) into an images store.")
    _common(p, kind=False)

    p = sub.add_parser("tiff", help="(large) TIFF label maps or H x W x C score stacks, tile by tile",
                       description="Ingest TIFFs one image per file, reading and writing tile by tile.")
    _common(p)
    p.add_argument("--encoding", choices=("labels", "scores"), default=None,
                   help="default: labels for H x W TIFFs, scores for H x W x C")
    _score_options(p)

    p = sub.add_parser("image-labels", help="image-level labels (cls_labels.npy, VOC XML, CSV, JSON) -> "
                                            "store",
                       description="Ingest image-level labels into an image-labels store: an (I, C) bool "
                                   "array over the --gt store's ids (or --ids, or every id of SRC), column 0 "
                                   "(background) always true. Every gt id needs labels; other ids of SRC are "
                                   "left out and counted. Use the store (or SRC itself) with --image-labels.")
    p.add_argument("src", metavar="SRC",
                   help="cls_labels.npy, a folder of VOC .xml annotations, a .csv or a .json")
    p.add_argument("-o", "--out", required=True, metavar="STORE", help="image-labels store to write")
    p.add_argument("--gt", metavar="GT", help="ground truth store: store labels for its ids, in its order")
    p.add_argument("--ids", metavar="FILE", help="without --gt: the ids to store (default: every id of SRC)")
    p.add_argument("--classes", metavar="FILE|voc", default=None,
                   help="class names, background first (default: the --gt store's classes, else voc)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="load a .npy the restricted unpickler refuses with Python's full unpickler (trusted "
                        "files only)")
    p.add_argument("--overwrite", action="store_true", help="replace STORE if it is an image-labels store")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no summary")


def run(args: argparse.Namespace) -> int:
    from isle_fast.stores import ingest

    if args.format == "image-labels":
        from isle_fast.stores.image_labels import ingest_image_labels

        ingest_image_labels(args.src, args.out, gt=args.gt, ids=args.ids, classes=args.classes,
                            overwrite=args.overwrite, allow_pickle=args.allow_pickle, quiet=args.quiet)
        return 0
    common = dict(ids=args.ids, name=args.name, gt=args.gt, skip_bad=args.skip_bad, workers=args.workers,
                  chunks=args.chunks, overwrite=args.overwrite, quiet=args.quiet)
    if args.format == "labels":
        ingest.ingest_labels(args.src, args.out, classes=args.classes, kind=args.kind,
                             image_labels=args.image_labels, **common)
    elif args.format == "scores":
        ingest.ingest_scores(args.src, args.out, classes=args.classes, kind=args.kind,
                             bg_threshold=args.bg_threshold, score_dtype=args.score_dtype,
                             normalize=args.normalize, allow_pickle=args.allow_pickle, upsample=args.upsample,
                             cam_layout=args.cam_layout, image_labels=args.image_labels,
                             score_layout=args.score_layout, **common)
    elif args.format == "images":
        ingest.ingest_images(args.src, args.out, classes=args.classes, **common)
    else:
        src = args.src[0] if len(args.src) == 1 else args.src
        from isle_fast.stores.ingest_tiff import ingest_tiff

        ingest_tiff(src, args.out, classes=args.classes, kind=args.kind, encoding=args.encoding,
                    score_dtype=args.score_dtype, **common)
    return 0
