"""``isle evaluate SETS... --gt GT``: per-class IoU of every set (ISLE step 2)."""

from __future__ import annotations

import argparse


def bg_threshold_arg(text: str) -> float:
    """``--bg-threshold``: a finite number in [0, 1] (2, -1, nan and inf are usage errors)."""
    import math

    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a finite number in [0, 1] (a score), not {text!r}")
    return value


def bg_threshold_spec(text: str) -> float | str:
    """``--bg-threshold`` of evaluate and merge: one threshold (a float, as :func:`bg_threshold_arg`) or a
    sweep, kept as its text: ``best``, ``A:B:STEP`` or ``T1,T2,...``
    (:func:`isle_fast.ensemble.sweep.parse_thresholds`).
    """
    t = text.strip()
    if t.lower() != "best" and ":" not in t and "," not in t:
        return bg_threshold_arg(text)
    from isle_fast.ensemble.sweep import parse_thresholds
    from isle_fast.errors import InputError

    try:
        parse_thresholds(t)
    except InputError as exc:
        raise argparse.ArgumentTypeError(exc.for_cli().removeprefix("--bg-threshold: ")) from None
    return t


def add_common(parser: argparse.ArgumentParser, *, sweep: bool = False) -> None:
    """Arguments shared by evaluate, merge and report (``sweep``: ``--bg-threshold`` may be a sweep)."""
    from isle_fast.backend import add_backend_argument

    parser.add_argument("sets", nargs="+", metavar="SET", help="pseudo-label set stores (labels or scores)")
    parser.add_argument("--gt", required=True, metavar="GT",
                        help="ground-truth label store; it may label only some of the sets' images (any "
                             "order). 'none': no pixel labels, each set's quality is estimated from the "
                             "sets (and --image-labels), see --estimator (a store named none: ./none)")
    parser.add_argument("--estimator", choices=("agreement", "pairwise", "staple", "combined", "rank"),
                        default=None,
                        help="with --gt none: leave-one-out agreement with the other sets, the mean IoU "
                             "against each other set, a per-class Dawid-Skene / STAPLE model, the mean of "
                             "the last two, or their rank vote (default: rank, the best measured, a score "
                             "rather than an IoU; see the README)")
    parser.add_argument("--average", choices=("dataset", "image"), default="dataset",
                        help="IoU from counts summed over the data set (default) or the mean "
                             "per-image IoU (Algorithm 2 as written)")
    add_backend_argument(parser)
    if sweep:
        parser.add_argument("--bg-threshold", type=bg_threshold_spec, default=None, metavar="T",
                            help="score sets: background score replaced by T in [0, 1] before decoding; "
                                 "a sweep START:STOP:STEP or T1,T2,... (one pass: the mIoU curve and each "
                                 "set's best threshold), or 'best' (each set at its own best of 0.00..1.00)")
    else:
        parser.add_argument("--bg-threshold", type=bg_threshold_arg, default=None, metavar="T",
                            help="score sets: background score replaced by T in [0, 1] before decoding")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or summary")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common(parser, sweep=True)
    parser.add_argument("--json", metavar="FILE",
                        help="write the scores as JSON (classes, per-set scores, selection)")
    parser.add_argument("--sets", dest="subset", metavar="A,B",
                        help="restrict the selection shown (and in the JSON) to these sets (names or store paths)")
    parser.add_argument("--image-labels", metavar="SRC",
                        help="with --gt none: image-level labels (cls_labels.npy, ...); claims of classes "
                             "absent from an image count as background; with a gt of some images: for the "
                             "choice isle merge makes there (the strata: strata-context, strata-semi below 25 "
                             "labelled images)")
    add_bootstrap(parser)


def no_gt(text: str) -> bool:
    """``--gt none``: no pixel labels."""
    return str(text).strip().lower() == "none"


def run_estimate(args: argparse.Namespace) -> int:
    """``isle evaluate SETS --gt none``: the estimated per-class IoU and the selection from it."""
    from isle_fast.ensemble.estimate import DEFAULT_ESTIMATOR, estimate
    from isle_fast.outputs import check_json_output, write_json
    from isle_fast.progress import summary

    if args.json:
        check_json_output(args.json, inputs=[*args.sets, args.image_labels])
    est = estimate(args.sets, method=args.estimator or DEFAULT_ESTIMATOR, image_labels=args.image_labels,
                   bg_threshold=args.bg_threshold, progress=not args.quiet)
    sel = est.select(parse_subset(args.subset))
    what = ("choice score (the mean rank of each set under staple and pairwise, 0-100; not an IoU)"
            if est.method == "rank" else "estimated IoU")
    print(f"{what} (no pixel labels, {est.method}; see the README for how far to trust it)")
    print(est.table(sel))
    if args.json:
        write_json(args.json, est.to_json(sel), command="isle evaluate")
    rows = {"sets": f"{len(est.set_names)} ({', '.join(est.set_names)})", "estimator": est.method,
            "image labels": args.image_labels or "none (give --image-labels: it helps)",
            "seconds": f"{est.seconds:.2f}"}
    if args.json:
        rows["json"] = args.json
    summary("isle evaluate: done (estimated)", rows, quiet=args.quiet)
    return 0


def add_bootstrap(parser: argparse.ArgumentParser) -> None:
    """``--bootstrap N`` and ``--seed``: the uncertainty of every choice (0: off)."""
    parser.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                        help="resamples of the labelled images for the uncertainty of every class's "
                             "choice (default 1000; 0: off)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (default 0)")


def parse_subset(text: str | None) -> list[str] | None:
    """``'A,B'`` -> ``['A', 'B']``."""
    if not text:
        return None
    return [s.strip() for s in text.split(",") if s.strip()]


def uncertain_row(unc) -> str:
    """The summary line of the bootstrap: uncertain classes and the labelled images that would settle them."""
    import math

    bad = unc.uncertain()
    if not bad:
        return f"none (every choice p >= 0.9 over {unc.labelled} labelled images)"
    more = unc.more_images_total()
    more_s = "more images cannot settle a tie" if not math.isfinite(more) else f"about {int(more)} more " \
        "labelled images would settle them"
    names = ", ".join(unc.classes[c] for c in bad[:6]) + (" ..." if len(bad) > 6 else "")
    return f"{len(bad)} of {len(unc.classes)} ({names}) p < 0.9 over {unc.labelled} labelled images; {more_s}"


def run(args: argparse.Namespace) -> int:
    from isle_fast.ensemble.sweep import evaluate_at as evaluate  # class-sparse sets read as stored
    from isle_fast.outputs import check_json_output
    from isle_fast.progress import summary

    if no_gt(args.gt):
        return run_estimate(args)
    if args.estimator:
        from isle_fast.errors import InputError

        raise InputError("--estimator applies to --gt none only")
    if args.json:  # before the work: never a folder, a store's file, an input or a file isle did not write
        check_json_output(args.json, inputs=[*args.sets, args.gt])
    if args.bootstrap < 0:
        from isle_fast.errors import InputError

        raise InputError(f"--bootstrap must be 0 (off) or a number of resamples, not {args.bootstrap}")
    if isinstance(args.bg_threshold, str):
        return run_sweep(args)
    ev = evaluate(args.sets, args.gt, args.bg_threshold, average=args.average, backend=args.backend,
                  progress=not args.quiet, per_image=args.bootstrap > 0)
    sel = ev.select(parse_subset(args.subset))
    extra: dict = {}
    rows = {"sets": f"{len(ev.set_names)} ({', '.join(ev.set_names)})",
            "average": ev.average, "backend": ev.backend, "seconds": f"{ev.seconds:.2f}"}
    if args.bootstrap > 0:
        from isle_fast.ensemble.uncertainty import selection_uncertainty

        unc = selection_uncertainty(ev, sel, reps=args.bootstrap, seed=args.seed)
        print(unc.table(ev.table(sel)))
        extra["uncertainty"] = unc.to_json()
        rows["uncertain choices"] = uncertain_row(unc)
    else:
        print(ev.table(sel))
    default = default_choice(args, ev)  # a gt of some images: the choice isle merge makes with it
    if default is not None:
        extra["default_selection"] = default
        rows["isle merge's choice"] = f"{default['mode']} (every image's votes; see above)"
    elif args.image_labels:
        from isle_fast.errors import InputError

        raise InputError("--image-labels applies to --gt none or a gt of some of the images only")
    if args.json:
        ev.write_json(args.json, sel, **extra)
    if args.json:
        rows["json"] = args.json
    summary("isle evaluate: done", rows, quiet=args.quiet)
    return 0


def run_sweep(args: argparse.Namespace) -> int:
    """``isle evaluate --bg-threshold A:B:STEP | T1,T2 | best``: the mIoU curve, each set's best threshold,
    and the per-class table of every set at its best threshold (one pass over the data)."""
    from isle_fast.ensemble.sweep import sweep_thresholds, write_sweep_json
    from isle_fast.progress import summary

    sw = sweep_thresholds(args.sets, args.gt, args.bg_threshold, average=args.average, backend=args.backend,
                          progress=not args.quiet)
    ev = sw.best_evaluation()
    sel = ev.select(parse_subset(args.subset))
    print(sw.table())
    print()
    print(ev.table(sel))
    for name, t, m in zip(sw.set_names, sw.best_thresholds, ev.miou):
        if t is not None:
            print(f"{name}: best threshold {t:g} (mIoU {m:.2f})")
    if args.json:
        write_sweep_json(args.json, sw, ev.to_json(sel), command="isle evaluate")
    rows = {"sets": f"{len(sw.set_names)} ({', '.join(sw.set_names)})",
            "thresholds": f"{len(sw.thresholds)} ({sw.thresholds[0]:g} .. {sw.thresholds[-1]:g}), "
                          + ("kept from an earlier sweep of the same stores (no pass)" if sw.from_cache
                             else "one pass"),
            "average": sw.average, "backend": sw.backend, "seconds": f"{sw.seconds:.2f}"}
    if args.json:
        rows["json"] = args.json
    summary("isle evaluate: done", rows, quiet=args.quiet)
    return 0


def default_choice(args: argparse.Namespace, ev) -> dict | None:
    """With a gt of some of the sets' images: print and return the choice ``isle merge`` makes by default
    (:func:`isle_fast.ensemble.merge.subset_choice`: the strata (``strata-context``, ``strata-semi`` below
    ``CONTEXT_MIN_IMAGES`` labelled images) with ``--image-labels``, the posterior without); None for a gt
    of every image."""
    import numpy as np

    from isle_fast.ensemble.merge import subset_choice
    from isle_fast.ensemble.partial import gt_positions
    from isle_fast.metrics import jsonable
    from isle_fast.stores.stack import open_stack

    stacks = [open_stack(p) for p in args.sets]
    gt = open_stack(args.gt)
    if gt_positions(gt, stacks) is None:
        return None
    allowed = None
    if args.image_labels:
        from isle_fast.stores.image_labels import resolve_image_labels

        allowed = resolve_image_labels(args.image_labels, stacks[0].ids, stacks[0].classes,
                                       where=f"the set {stacks[0].path}")
    mode, sel, scores, strata, posterior = subset_choice(
        stacks, gt, ev, allowed=allowed, backend=args.backend, bg_threshold=args.bg_threshold,
        progress=not args.quiet, subset=parse_subset(args.subset))
    p_best = (strata or posterior).get("p_best", np.full(len(ev.classes), np.nan))
    print(f"\nisle merge's choice with this gt ({mode}: the {gt.num_images} labelled images with the votes of "
          f"all {stacks[0].num_images}; p = its bootstrap's p(best)):")
    for c in range(1, len(ev.classes)):
        p = p_best[c]
        print(f"  {ev.classes[c]:>16s}: {ev.set_names[int(sel.best[c])]}" + ("" if p != p else f"  p={p:.2f}"))
    return {"mode": mode, "selection": sel.mapping(),
            "scores": {n: jsonable(scores[k]) for k, n in enumerate(ev.set_names)} if scores is not None else None,
            "p_best": jsonable(p_best)}
