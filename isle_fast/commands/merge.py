"""``isle merge SETS... --gt GT --out ENSEMBLE``: select per class and build the ensemble (steps 2+3)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from isle_fast.commands.evaluate import add_common

    add_common(parser, sweep=True)
    parser.add_argument("--out", required=True, metavar="ENSEMBLE", help="the ensemble store to write")
    parser.add_argument("--policy", choices=("score", "order", "ignore"), default="score",
                        help="overlapping claims: higher IoU wins (default), earlier set wins, or 255")
    parser.add_argument("--strategy", choices=("class", "image"), default="class",
                        help="class-wise ISLE (default) or the paper's naive image-level variant")
    parser.add_argument("--image-labels", metavar="SRC",
                        help="image-level labels (cls_labels.npy, a VOC XML folder, a CSV / JSON, an "
                             "image-labels store or a store carrying them): drop claims of classes absent "
                             "from an image's labels; --strategy image ranks by them instead of the gt")
    parser.add_argument("--sets", dest="subset", metavar="A,B",
                        help="ensemble of these sets only (names or store paths; e.g. the paper's ISLE-2)")
    parser.add_argument("--name", help="name of the ensemble set (default: folder name)")
    parser.add_argument("--json", metavar="FILE", help="write the scores, selection and ensemble as JSON")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing ensemble store")
    parser.add_argument("--layout", choices=("auto", "sparse", "dense"), default="auto",
                        help="layout of a score ensemble's merged stack: sparse = class-sparse (per image the "
                             "classes its chosen sets hold; needs class-sparse members), dense = every class "
                             "slice, auto (default) = sparse where possible")
    parser.add_argument("--blend-estimate", action="store_true",
                        help="with a gt of few images: choose by the posterior of each class's labelled IoU "
                             "and the no-label estimate (--estimator), each weighted by its error")
    parser.add_argument("--subset-selection",
                        choices=("auto", "strata", "strata-semi", "strata-context", "posterior", "labelled"),
                        default="auto",
                        help="how a gt of some of the images selects: strata-semi (the labelled images' "
                             "truth per vote stratum applied to every image's votes, its prior the STAPLE model "
                             "fitted with the labelled truth; the default with --image-labels and a gt of fewer "
                             "than 25 images), strata-context (the same, each pixel's rate refined by its "
                             "distance to where every set agrees on the class, its passes over whole "
                             "images; the default with --image-labels from 25 labelled images), strata "
                             "(the same, its prior the no-label STAPLE model), posterior (= --blend-estimate; "
                             "the default without --image-labels) or labelled (their IoU alone; the default "
                             "with a gt of every image)")
    parser.add_argument("--no-score", action="store_true",
                        help="do not evaluate the new ensemble against the gt afterwards")


def run(args: argparse.Namespace) -> int:
    from isle_fast.commands.evaluate import no_gt
    from isle_fast.errors import InputError
    from isle_fast.outputs import check_json_output
    from isle_fast.progress import Timer, one_bar, summary
    from isle_fast.stores.stack import open_stack

    gt = None if no_gt(args.gt) else args.gt
    if gt is not None and args.estimator and not args.blend_estimate:
        raise InputError("--estimator applies to --gt none or --blend-estimate only")
    if args.json:  # before the work: never a folder, a store's file, an input, --out or a foreign file
        check_json_output(args.json, inputs=[*args.sets, gt], outputs=[args.out])
    t = Timer()
    score = not args.no_score and gt is not None
    with one_bar("merge", units=open_stack(args.sets[0]).num_images, stages=3 if score else 2,
                 quiet=args.quiet):  # one bar for the passes: evaluate (or estimate), write, score
        res, ens = _merge_and_score(args, gt, score)
    ev, sel = res.evaluation, res.selection
    # the ensemble's per-class IoU and mIoU: the table's last column
    print(ev.table(sel, ensemble=ens) if ens is not None else ev.table(sel))
    chosen = res.stack.provenance.get("bg_thresholds")
    if chosen:
        for name, thr in chosen.items():
            if thr is not None:
                print(f"{name}: best threshold {thr:g}")
    extra: dict = {"ensemble": {"path": res.stack.path, "policy": args.policy, "strategy": args.strategy,
                                "members": [ev.set_names[i] for i in sel.member_indices],
                                "scores_array": res.stack.provenance.get("scores_array")}}
    if chosen:
        extra["ensemble"]["bg_thresholds"] = chosen
    rows = {"ensemble": res.stack.path,
            "members": ", ".join(ev.set_names[i] for i in sel.member_indices),
            "policy / strategy": f"{args.policy} / {args.strategy}"}
    if args.image_labels:
        rows["image labels"] = f"{args.image_labels} (claims of absent classes dropped)"
        extra["ensemble"]["image_labels"] = args.image_labels
    if gt is None:
        rows["selection"] = f"estimated without pixel labels ({ev.method})"
    if ens is not None:
        members = [k for k in sel.member_indices if ev.miou[k] == ev.miou[k]]
        best = max(members, key=lambda k: ev.miou[k], default=None)
        e_miou = float(ens.miou[0])
        extra["ensemble"].update({"miou": e_miou, "iou": [None if v != v else float(v) for v in ens.iou[0]]})
        if best is not None:  # the mIoU itself is in the table, once
            rows["gain"] = f"{e_miou - float(ev.miou[best]):+.2f} mIoU over the best member, {ev.set_names[best]}"
    if args.json and gt is None:
        from isle_fast.outputs import write_json

        write_json(args.json, {**ev.to_json(sel), **extra}, command="isle merge")
        rows["json"] = args.json
    elif args.json:
        ev.write_json(args.json, sel, command="isle merge", **extra)
        rows["json"] = args.json
    rows["seconds"] = f"{t.seconds:.2f}"
    summary("isle merge: done", rows, quiet=args.quiet)
    return 0


def _merge_and_score(args: argparse.Namespace, gt: str | None, score: bool):
    """The ensemble (:func:`isle_fast.ensemble.merge.merge`; ``gt`` None: selected from the no-label
    estimate) and, when ``score``, its evaluation against the gt."""
    from isle_fast.commands.evaluate import parse_subset
    from isle_fast.ensemble.evaluate import evaluate
    from isle_fast.ensemble.merge import merge

    res = merge(args.sets, gt, args.out, estimator=args.estimator, blend_estimate=args.blend_estimate,
                subset_selection=args.subset_selection,
                policy=args.policy, strategy=args.strategy, subset=parse_subset(args.subset),
                average=args.average, backend=args.backend, bg_threshold=args.bg_threshold, name=args.name,
                overwrite=args.overwrite, progress=not args.quiet, image_labels=args.image_labels,
                layout=args.layout)
    ens = None
    if score:
        ens = evaluate([res.stack], gt, average=args.average, backend=args.backend, progress=not args.quiet)
    return res, ens
