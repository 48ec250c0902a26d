"""Memory and time of the strata bootstrap (``stratified_scores``) as the number of sets grows.

``python -m benchmarks.strata_memory [--quick]``

A labelled subset's choice (``isle merge --gt <some images>``, the default
``strata-semi`` and ``strata-context``) resamples the labelled images' vote
strata 1000 times. A resample's strata are ``2**N`` patterns wide per class,
so all resamples at once grow 4x with every two sets. ``stratified_scores``
now reduces them batch by batch
(:data:`isle_fast.ensemble.uncertainty.STRATA_BOOTSTRAP_BYTES`); the
reference in the same run is the one batch of every resample (the code
before, that bound set to infinity), up to N = 8 (above it would take more
than this machine's memory can spare).

Data: 100 labelled images, 21 classes, image labels (2 groups), the context's
4 distance bins, every per-image count drawn at random (Poisson, a quarter of
the entries non-zero: denser than real strata, where an image holds a few
classes and patterns, so a worst case). Each measurement runs in a fresh
process; ``peak_rss_mib`` is its peak resident memory, inputs included
(``inputs_mib``). The two paths' ``p_best`` are checked equal.

Held strata (``held`` in the JSON): the labelled images' per-image strata
themselves, which the passes now return sparse
(:class:`isle_fast.metrics.ImageCounts`): at N = 12 sets each image's context
strata are 15 MiB dense, so 1,000 labelled images took 15 GiB (the code
before; ``dense_mib``, their size, since it cannot run here). Measured on
synthetic scenes (:func:`benchmarks.common.synth_block`, 200 x 200 pixels at
most, 21 classes, image labels, independent per-set errors): the bytes held
(``sparse_mib``), and ``stratified_scores`` with the context and 1000
resamples, in a fresh process (``seconds``, ``peak_rss_mib``).

Writes ``benchmarks/results/strata_memory.json``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from typing import Any

import numpy as np

from .common import bench_parser, format_table, headline_row, log, write_json

IMAGES, CLASSES, BINS, REPS = 100, 21, 4, 1000
#: the largest N the one-batch reference runs at (N = 10 with the context would want about 12 GiB)
REFERENCE_MAX_SETS = 8


def _inputs(n_sets: int, images: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-image context strata ``(K, 2, B, C, 2**N, 3)`` and every image's context patterns."""
    rng = np.random.default_rng(n_sets)
    shape = (images, 2, BINS, CLASSES, 1 << n_sets)
    h = rng.poisson(0.3, size=shape)
    pos = rng.binomial(h, 0.5)
    lab = np.stack([h, pos, rng.binomial(h - pos, 0.1)], axis=-1).astype(np.int64)
    pat = lab[..., 0].sum(axis=0) + rng.poisson(2.0, size=shape[1:])
    return lab, pat


def child(n_sets: int, context: bool, whole: bool, images: int, reps: int) -> dict[str, Any]:
    """One measurement, in this (fresh) process."""
    from isle_fast.ensemble import uncertainty

    lab, pat = _inputs(n_sets, images)
    strata, patterns = lab.sum(axis=2), pat.sum(axis=1)
    if not context:
        lab = pat = None
    if whole:
        uncertainty.STRATA_BOOTSTRAP_BYTES = 1 << 62  # every resample in one batch: the code before
    t0 = time.perf_counter()
    res = uncertainty.stratified_scores(strata, patterns, reps=reps, seed=0,
                                        context=None if lab is None else (lab, pat))
    seconds = time.perf_counter() - t0
    inputs = strata.nbytes + patterns.nbytes + (0 if lab is None else lab.nbytes + pat.nbytes)
    return {"seconds": seconds, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "inputs_mib": inputs / 2**20, "p_best": [float(v) for v in res["p_best"]]}


def _fresh(flag: str, *values: int) -> dict[str, Any]:
    """One measurement (``--child`` or ``--held`` with ``values``) in a fresh process: its JSON line."""
    cmd = [sys.executable, "-m", f"{__package__ or 'benchmarks'}.strata_memory", flag, ",".join(map(str, values))]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _run(n_sets: int, context: bool, whole: bool, images: int, reps: int) -> dict[str, Any]:
    return _fresh("--child", n_sets, int(context), int(whole), images, reps)


HELD_SIDE = 200


def held_child(n_sets: int, images: int, reps: int) -> dict[str, Any]:
    """The labelled strata of ``images`` synthetic scenes held sparse, and the strata choice from them."""
    from isle_fast.ensemble import uncertainty
    from isle_fast.metrics import ImageCounts

    from .common import synth_block, synth_quality, synth_shapes

    parts = []
    for b0 in range(0, images, 100):  # scenes made 100 at a time, so the peak is the choice's, not theirs
        n = min(100, images - b0)
        gt, sets = synth_block(1000 * n_sets + b0, synth_shapes(n, HELD_SIDE, seed=b0), (HELD_SIDE, HELD_SIDE),
                               CLASSES, n_sets, quality=synth_quality(n_sets, CLASSES, seed=n_sets))
        allowed = np.stack([np.bincount(g[g < CLASSES], minlength=CLASSES) > 0 for g in gt])
        parts += [ImageCounts.from_dense(uncertainty.context_strata(
            gt[i:i + 1], [a[i:i + 1] for a in sets], CLASSES, allowed[i:i + 1])[None]) for i in range(n)]
    per = ImageCounts.stack(parts)
    # every image's patterns: the labelled ones and three times as many unlabelled ones like them
    patterns = 4 * per.total()[..., 0]
    t0 = time.perf_counter()
    uncertainty.stratified_scores(per.sum_axis(1), patterns.sum(axis=1), reps=reps, seed=0, model="semi",
                                  context=(per, patterns))
    seconds = time.perf_counter() - t0
    return {"sets": n_sets, "images": images, "sparse_mib": round(per.nbytes / 2**20, 2),
            "dense_mib": round(images * 8 * int(np.prod(per.shape)) / 2**20),
            "entries_per_image": round(per.value.size / images), "seconds": round(seconds, 2),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def _held(n_sets: int, images: int, reps: int) -> dict[str, Any]:
    return _fresh("--held", n_sets, images, reps)


def main(argv: list[str] | None = None) -> int:
    p = bench_parser("strata_memory", "Memory and time of the strata bootstrap as the number of sets grows.")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--held", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.held:
        print(json.dumps(held_child(*(int(v) for v in args.held.split(",")))))
        return 0
    if args.child:
        n, ctx, whole, images, reps = (int(v) for v in args.child.split(","))
        print(json.dumps(child(n, bool(ctx), bool(whole), images, reps)))
        return 0
    sizes = (4, 6) if args.quick else (4, 6, 8, 10)
    images, reps = (20, 100) if args.quick else (IMAGES, REPS)
    rows = []
    for n in sizes:
        for context in (False, True):
            ours = _run(n, context, False, images, reps)
            ref = _run(n, context, True, images, reps) if n <= REFERENCE_MAX_SETS else None
            row = {"sets": n, "context": context, "inputs_mib": round(ours["inputs_mib"], 1),
                   "peak_rss_mib": round(ours["peak_rss_mib"]), "seconds": round(ours["seconds"], 2),
                   "reference_peak_rss_mib": None if ref is None else round(ref["peak_rss_mib"]),
                   "reference_seconds": None if ref is None else round(ref["seconds"], 2),
                   "p_best_equal": None if ref is None else ours["p_best"] == ref["p_best"]}
            rows.append(row)
            log(f"[strata_memory] N={n} context={context}: {row['peak_rss_mib']} MiB in {row['seconds']} s "
                f"(one batch: {row['reference_peak_rss_mib']} MiB in {row['reference_seconds']} s)")
    print(format_table(rows))
    held = [_held(n, 50 if args.quick else 1000, reps) for n in ((8,) if args.quick else (8, 10, 12))]
    for h in held:
        log(f"[strata_memory] held: N={h['sets']}, {h['images']} labelled images: {h['sparse_mib']} MiB "
            f"(dense {h['dense_mib']} MiB), chosen in {h['seconds']} s at {h['peak_rss_mib']} MiB peak")
    print(format_table(held))
    if any(r["p_best_equal"] is False for r in rows):
        log("[strata_memory] the batched and the one-batch bootstrap differ")
        return 1
    big = [r for r in rows if r["reference_peak_rss_mib"] is not None][-1]
    headline = [headline_row(f"strata bootstrap, N={big['sets']}, context={big['context']}, {reps} resamples",
                             big["seconds"], "every resample in one batch", big["reference_seconds"],
                             peak_rss_mib=big["peak_rss_mib"], reference_peak_rss_mib=big["reference_peak_rss_mib"])]
    top = held[-1]
    headline.append(headline_row(f"labelled strata held sparse, N={top['sets']}, {top['images']} images, context",
                                 top["seconds"], "dense per-image strata (their size)", None,
                                 held_mib=top["sparse_mib"], dense_mib=top["dense_mib"],
                                 peak_rss_mib=top["peak_rss_mib"]))
    write_json("strata_memory", {"images": images, "classes": CLASSES, "bins": BINS, "reps": reps, "rows": rows,
                                 "held": held, "held_side": HELD_SIDE, "headline": headline}, quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
