"""``isle run``: the whole job from folders, in one process (see :mod:`isle_fast.job`)."""

from __future__ import annotations

import argparse

HELP = "the whole job from folders: ingest (cached), refine, evaluate, merge, export PNGs, report"

_EPILOG = """\
inputs, three ways:
  isle run --gt VOC/SegmentationClassAug --set puzzlecam=pngs/puzzlecam --set clims=pngs/clims --out run
  isle run VOC --out run          a root holding SegmentationClass[Aug]/, pseudo/<set>/ (label PNGs),
                                  cams/<set>/ (CAM files) and, for refinement, JPEGImages/
  isle run job.toml               the same fields in a TOML file (see isle_fast.job.spec_from_toml)

outputs in RUN: ensemble/<id>.png, ensemble.zarr, evaluation.json, report/, run.json, cache/.
Stores in the cache are reused while their input files (names, sizes, times) are unchanged: adding a
set ingests that set only. A re-run replaces the results in RUN (only a folder isle run made).
"""


def _named(text: str) -> tuple[str, str]:
    name, sep, folder = text.partition("=")
    if not sep or not name.strip() or not folder.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=FOLDER, not {text!r}")
    return name.strip(), folder.strip()


def _names(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from isle_fast.commands.export import add_compress_argument

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = _EPILOG
    parser.add_argument("source", nargs="?", metavar="ROOT|JOB.toml",
                        help="a VOC-style root folder or a TOML job file (instead of --gt / --set)")
    parser.add_argument("--gt", metavar="DIR", help="ground-truth label PNG folder")
    parser.add_argument("--set", dest="sets", action="append", type=_named, default=[], metavar="NAME=DIR",
                        help="a label-map pseudo-label set (repeat; order = priority on ties)")
    parser.add_argument("--cams", action="append", type=_named, default=[], metavar="NAME=DIR",
                        help="a CAM / score set (.npy / .npz files; repeat)")
    parser.add_argument("-o", "--out", metavar="RUN", help="the run folder (new, or made by isle run)")
    parser.add_argument("--cache", metavar="DIR", help="where the stores are kept (default RUN/cache)")
    parser.add_argument("--ids", metavar="FILE", help="id list (default: every file of the gt folder)")
    parser.add_argument("--images", metavar="DIR",
                        help="RGB images (<id>.jpg), for refinement and the report figure")
    parser.add_argument("--classes", metavar="FILE|voc", help="class names, background first (default voc)")
    parser.add_argument("--refine", metavar="CHAIN", help="refine sets first, e.g. crf or affinity,crf")
    parser.add_argument("--refine-sets", type=_names, metavar="A,B",
                        help="sets to refine (default: every --cams set, else every set)")
    parser.add_argument("--param", dest="params", action="append", default=None, metavar="NAME.KEY=VALUE",
                        help="a refinement parameter, e.g. crf.iterations=5 (repeatable)")
    parser.add_argument("--policy", choices=("score", "order", "ignore"), default=None,
                        help="overlapping claims: higher IoU wins (default), earlier set wins, or 255")
    parser.add_argument("--strategy", choices=("class", "image"), default=None,
                        help="class-wise ISLE (default) or the paper's naive image-level variant")
    parser.add_argument("--sets", dest="subset", type=_names, metavar="A,B",
                        help="ensemble of these sets only (the paper's ISLE-2)")
    parser.add_argument("--average", choices=("dataset", "image"), default=None,
                        help="IoU averaging of the selection (default dataset)")
    parser.add_argument("--bg-threshold", type=float, default=None, metavar="T",
                        help="score sets: background score replaced by T in [0, 1]")
    parser.add_argument("--image-labels", metavar="SRC",
                        help="image-level labels (cls_labels.npy, an ids + labels file, or a store carrying "
                             "them), as isle merge: claims of classes absent from an image are dropped; with a "
                             "gt of some images the choice takes the vote strata (strata-context; strata-semi "
                             "below 25 labelled images)")
    parser.add_argument("--backend", choices=("auto", "cpu", "gpu"), default=None, help="kernel backend")
    add_compress_argument(parser)
    parser.set_defaults(compress_level=None)
    parser.add_argument("--no-report", dest="report", action="store_false", default=None,
                        help="no report/ folder (tables and figures)")
    parser.add_argument("--num-images", type=int, default=None, metavar="K",
                        help="images in the report figure")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: one per core)")
    parser.add_argument("--skip-bad", action="store_true", default=None,
                        help="leave bad images out of every store instead of failing")
    parser.add_argument("--allow-pickle", action="store_true", default=None,
                        help="read pickled .npy CAM dicts (only for files you trust)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars, step lines or summary")


def spec_from_args(args: argparse.Namespace):
    """The :class:`isle_fast.job.JobSpec` of the command line (a root or TOML file, then the options)."""
    from pathlib import Path

    from isle_fast.errors import InputError
    from isle_fast.job import JobSpec, spec_from_root, spec_from_toml

    if args.refine:
        from isle_fast.refinement.chain import parse_chain
    options = {
        "out": Path(args.out) if args.out else None, "cache": Path(args.cache) if args.cache else None,
        "ids": Path(args.ids) if args.ids else None, "images": Path(args.images) if args.images else None,
        "classes": args.classes, "refine": parse_chain(args.refine) if args.refine else None,
        "refine_sets": args.refine_sets, "params": args.params, "policy": args.policy,
        "strategy": args.strategy,
        "subset": args.subset, "average": args.average, "bg_threshold": args.bg_threshold,
        "backend": args.backend, "compress": args.compress_level, "report": args.report,
        "image_labels": Path(args.image_labels) if args.image_labels else None,
        "num_images": args.num_images, "workers": args.workers, "skip_bad": args.skip_bad,
        "allow_pickle": args.allow_pickle, "quiet": args.quiet or None,
    }
    if args.source is not None:
        if args.gt or args.sets or args.cams:
            raise InputError("give either ROOT / JOB.toml or --gt with --set / --cams, not both")
        src = Path(args.source)
        if src.suffix.lower() == ".toml" or src.is_file():
            return spec_from_toml(src, **options)
        return spec_from_root(src, **options)
    if not args.gt:
        raise InputError("give a VOC-style ROOT, a JOB.toml, or --gt DIR with --set NAME=DIR")
    if not args.out:
        raise InputError("give --out RUN (the run folder)")
    sets: dict[str, Path] = {}
    cams: dict[str, Path] = {}
    for target, pairs in ((sets, args.sets), (cams, args.cams)):
        for name, folder in pairs:
            if name in sets or name in cams:
                raise InputError(f"set name {name!r} is given twice")
            target[name] = Path(folder)
    fields = {k: v for k, v in options.items() if v is not None}
    return JobSpec(gt=Path(args.gt), sets=sets, cams=cams, **fields)


def run(args: argparse.Namespace) -> int:
    from isle_fast.job import run_job

    run_job(spec_from_args(args))
    return 0
