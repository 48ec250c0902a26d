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
                        help="ensemble of these sets only (e.g. the paper's ISLE-2)")
    parser.add_argument("--name", help="name of the ensemble set (default: folder name)")
    parser.add_argument("--json", metavar="FILE", help="write the scores, selection and ensemble as JSON")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing ensemble store")
    parser.add_argument("--no-score", action="store_true",
                        help="do not evaluate the new ensemble against the gt afterwards")


def run(args: argparse.Namespace) -> int:
    from isle_fast.ensemble.evaluate import evaluate
    from isle_fast.ensemble.merge import merge
    from isle_fast.progress import Timer, summary
    from isle_fast.commands.evaluate import parse_subset
    from isle_fast.outputs import check_json_output

    if args.json:  # before the work: never a folder, a store's file, an input, --out or a foreign file
        check_json_output(args.json, inputs=[*args.sets, args.gt], outputs=[args.out])
    t = Timer()
    res = merge(args.sets, args.gt, args.out, policy=args.policy, strategy=args.strategy,
                subset=parse_subset(args.subset), average=args.average, backend=args.backend,
                bg_threshold=args.bg_threshold, name=args.name, overwrite=args.overwrite,
                progress=not args.quiet, image_labels=args.image_labels)
    ev, sel = res.evaluation, res.selection
    print(ev.table(sel))
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
    if not args.no_score:
        ens = evaluate([res.stack], args.gt, average=args.average, backend=args.backend,
                       progress=not args.quiet)
        best = max((m for m, ok in zip(ev.miou, sel.members) if ok), default=float("nan"))
        e_miou = float(ens.miou[0])
        print(f"ensemble mIoU {e_miou:.2f} (best member {best:.2f}, {e_miou - best:+.2f})")
        extra["ensemble"].update({"miou": e_miou, "iou": [None if v != v else float(v) for v in ens.iou[0]]})
        rows["ensemble mIoU"] = f"{e_miou:.2f} ({e_miou - best:+.2f} over the best member)"
    if args.json:
        ev.write_json(args.json, sel, command="isle merge", **extra)
        rows["json"] = args.json
    rows["seconds"] = f"{t.seconds:.2f}"
    summary("isle merge: done", rows, quiet=args.quiet)
    return 0
