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
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--bg-threshold: ")) from None
    return t


def add_common(parser: argparse.ArgumentParser, *, sweep: bool = False) -> None:
    """Arguments shared by evaluate, merge and report (``sweep``: ``--bg-threshold`` may be a sweep)."""
    from isle_fast.backend import add_backend_argument

    parser.add_argument("sets", nargs="+", metavar="SET", help="pseudo-label set stores (labels or scores)")
    parser.add_argument("--gt", required=True, metavar="GT", help="ground-truth label store")
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
                        help="restrict the selection shown (and in the JSON) to these sets")


def parse_subset(text: str | None) -> list[str] | None:
    """``'A,B'`` -> ``['A', 'B']``."""
    if not text:
        return None
    return [s.strip() for s in text.split(",") if s.strip()]


def run(args: argparse.Namespace) -> int:
    from isle_fast.ensemble.sweep import evaluate_at as evaluate   # class-sparse sets read as stored
    from isle_fast.outputs import check_json_output
    from isle_fast.progress import summary

    if args.json:  # before the work: never a folder, a store's file, an input or a file isle did not write
        check_json_output(args.json, inputs=[*args.sets, args.gt])
    if isinstance(args.bg_threshold, str):
        return run_sweep(args)
    ev = evaluate(args.sets, args.gt, args.bg_threshold, average=args.average, backend=args.backend,
                  progress=not args.quiet)
    sel = ev.select(parse_subset(args.subset))
    print(ev.table(sel))
    if args.json:
        ev.write_json(args.json, sel)
    rows = {"sets": f"{len(ev.set_names)} ({', '.join(ev.set_names)})",
            "average": ev.average, "backend": ev.backend, "seconds": f"{ev.seconds:.2f}"}
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
            "thresholds": f"{len(sw.thresholds)} ({sw.thresholds[0]:g} .. {sw.thresholds[-1]:g}), one pass",
            "average": sw.average, "backend": sw.backend, "seconds": f"{sw.seconds:.2f}"}
    if args.json:
        rows["json"] = args.json
    summary("isle evaluate: done", rows, quiet=args.quiet)
    return 0
