"""``isle refine SET --images IMG --with affinity,crf --out REFINED``: step 1 of ISLE.

Runs a chain of refinements (built-ins ``affinity`` and ``crf``, anything
registered with :func:`isle_fast.refinement.chain.register_refinement` or declared in
the ``isle_fast.refinements`` entry-point group) over every image of a set
and writes a new store; the input is never modified. ``--preset`` picks the
dense CRF's settings among the public code's (:mod:`isle_fast.refinement.crf`).
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="SET", nargs="?", help="the set to refine (a labels or scores store)")
    parser.add_argument("--images", metavar="IMG", help="the RGB store (kind images) aligned with SET")
    parser.add_argument("--with", dest="chain", default="crf", metavar="NAMES",
                        help="refinements to apply, in order, comma-separated (default: crf). "
                             "Built-in: affinity, crf; --list shows all")
    parser.add_argument("--out", metavar="REFINED", help="the output store (appears only when complete)")
    parser.add_argument("--param", action="append", default=[], metavar="NAME.KEY=VALUE",
                        help="a refinement parameter, e.g. crf.iterations=5, affinity.backbone=resnet18 "
                             "(repeatable; values are parsed as JSON where possible)")
    parser.add_argument("--preset", choices=("auto", "psa", "irn", "pydensecrf-example"), default=None,
                        help="the dense CRF's settings, as the public code calls pydensecrf. "
                             "auto (default) chooses per input: label maps -> irn, scores -> psa. "
                             "irn = IRN's crf_inference_label (Gaussian sxy 3 / compat 3, bilateral "
                             "sxy 50 / srgb 5 / compat 10, gt_prob 0.7, 10 iterations); psa = PSA's "
                             "crf_inference for scores (bilateral sxy 80 / srgb 13 / compat 10, "
                             "10 iterations); pydensecrf-example = pydensecrf's examples/inference.py "
                             "(as psa, 5 iterations, its feature order). --param crf.KEY=VALUE still "
                             "overrides one setting (e.g. crf.bi_sxy=60). With image-level labels in SET, "
                             "the CRF uses exactly each image's labelled classes (crf.keep)")
    parser.add_argument("--name", help="name of the refined set (default: SET's name + '+' + chain)")
    parser.add_argument("--workers", type=int, default=None, help="parallel workers (default: CPU count)")
    parser.add_argument("--images-per-task", type=int, default=None, help="images per Dask task / output chunk")
    parser.add_argument("--score-dtype", choices=("uint8", "float16", "float32"), default=None,
                        help="storage type of a scores output (default: the input's)")
    parser.add_argument("--layout", choices=("auto", "sparse", "dense"), default="auto",
                        help="layout of a scores output: sparse = a class-sparse store (per image the classes "
                             "its refined scores hold, the background slice per pixel; uint8), dense = every "
                             "class slice. auto (default) follows SET: a class-sparse SET (CAM ingest's "
                             "default) is refined as such, only its images' classes and background going "
                             "through the CRF / random walk, and written class-sparse. Both hold the same "
                             "scores")
    parser.add_argument("--device", default="auto", help="torch device for AffinityNet (auto, cpu, cuda)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted AffinityNet training")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out store")
    parser.add_argument("--list", action="store_true", help="list the available refinements and exit")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or summary")


def run(args: argparse.Namespace) -> int:
    from isle_fast.errors import InputError
    from isle_fast.refinement.chain import available_refinements, get_refinement, parse_chain, refine_stack

    if args.list:
        for name in available_refinements():
            doc = (get_refinement(name).__doc__ or "").strip().splitlines()
            print(f"{name:12s} {doc[0] if doc else ''}")
        return 0
    if not args.source:
        raise InputError("give the SET store to refine (or --list)")
    if not args.out:
        raise InputError("--out REFINED is required (refine writes a new store)")
    params = list(args.param)
    if args.preset is not None:
        if "crf" not in parse_chain(args.chain):
            raise InputError(f"--preset sets the crf refinement's settings, but crf is not in "
                             f"--with {args.chain}")
        given = [p.partition("=")[2].strip() for p in params if p.partition("=")[0].strip() == "crf.preset"]
        if given and given[-1] != args.preset:
            raise InputError(f"--preset {args.preset} and --param crf.preset={given[-1]} disagree; give one")
        params.append(f"crf.preset={args.preset}")
    from isle_fast.cluster import current_client

    client = current_client()   # --scheduler ADDRESS (isle_fast/cli.py connected it); else a local name
    local = args.scheduler if client is None and args.scheduler else "auto"
    refine_stack(args.source, args.images, args.out, args.chain, params, workers=args.workers,
                 scheduler=local, client=client, images_per_task=args.images_per_task, name=args.name,
                 score_dtype=args.score_dtype, overwrite=args.overwrite, resume=args.resume,
                 device=args.device, progress=not args.quiet, layout=args.layout)
    return 0
