"""ISLE's selection with few or no pixel labels, against the selection with every label.

``python -m benchmarks.selection [--quick] [--trials T] [--images N]``

Data sets (each: a ground truth and N = 4 pseudo-label sets, all in memory):

``synthetic``
    :func:`benchmarks.common.synth_block` scenes (rectangles on a grid, VOC's
    2-pixel ignore boundary) for several seeds and two quality matrices:
    ``spread`` (each set's per-class miss / confusion rates drawn
    independently, the sets far apart) and ``close`` (every rate within
    +-0.02 of a common value: sets within about a point or two of mIoU, as the
    paper's four components span 1.6 mIoU), and ``paper``: the paper's own
    components, Tables 3-4, placed on the generator's IoU scale (per class the
    best component at one miss rate, every other one below it by its margin in
    the tables, :func:`_paper_quality`): the sets' mIoU span 2-3 points, and
    per class they differ as the paper's do (by 0.1 to 30 points), where in
    ``close`` every class is a near tie.
``voc``
    The 1,449 real VOC 2012 val label maps (``../shared/data/voc2012_val_gt.tar.gz``)
    degraded per set and class with :func:`benchmarks.e2e.degrade` (boundaries
    shifted, objects dropped or relabelled); skipped when ``../shared`` is absent.

For every data set the full-gt choice (Algorithm 2 on every image) and its
ensemble (the score policy, merged and scored on every image) are the
reference. Then, for K = 10, 25, 50, 100, 200 labelled images (``--trials``
random subsets each, seeded) and for no pixel labels (every estimator of
:mod:`isle_fast.ensemble.estimate`, with the image-level labels taken from
the gt as VOC's ``cls_labels.npy`` are; and without them), and K labelled
images with the estimate of every image: ``K=... + estimate`` (the fixed
weight ``n_c / (n_c + 10)``, :func:`isle_fast.ensemble.estimate.blend_scores`)
and ``K=... + estimate, posterior`` (each weighted by its error,
:func:`isle_fast.ensemble.uncertainty.posterior_scores`, what ``merge
--blend-estimate`` does; ``(no image labels)``: the estimate without them), and ``K=... + strata``
(:func:`isle_fast.ensemble.uncertainty.stratified_scores` with its default prior model
:data:`~isle_fast.ensemble.uncertainty.STRATA_MODEL`, the STAPLE model fitted with the labelled truth
(``model='semi'``): ``--subset-selection strata-semi``, what ``isle merge`` does by default with a gt
of fewer than 25 images and image labels; the labelled images' truth rate per vote stratum applied to
every image's vote patterns; ``K=... + strata, staple``: its other prior model, the no-label STAPLE
posterior, ``--subset-selection strata``, the default before 2026-12-02; ``K=... + strata, context``: the
same rates refined by each pixel's distance to where every set agrees on the class,
:func:`isle_fast.ensemble.uncertainty.context_strata` and ``stratified_scores(context=...)``,
``--subset-selection strata-context``, the default from 25 labelled images on (since 2026-12-03)).
A class the labelled subset lacks is chosen from the estimate in every ``+`` mode (its pixels for the
selection are the votes; before, such a class fell to the first set):

* ``agree``: share of the foreground classes (with gt pixels) chosen as with full gt;
* ``iou_lost``: mean over those classes of full-gt IoU(full-gt choice) minus
  full-gt IoU(this choice), points;
* ``gain_kept``: (ensemble mIoU of this choice - best single set's mIoU) /
  (full-gt ensemble mIoU - best single set's mIoU), both scored on every
  image with full gt; averaged over the trials;
* ``below_best``: trials whose ensemble is below the best single set;
* calibration: of the choices reported at p >= 0.9 (K: the bootstrap of
  :func:`isle_fast.ensemble.uncertainty.choice_uncertainty` on the subset;
  posterior: its ``p_best``), the share that are the full-gt choice (or as
  good: equal full-gt IoU).

Oracle rows (``--oracle-images``, default 6000): ``K=... + strata, model rates (oracle)`` and ``none:
model rates (oracle)`` give every vote stratum the truth rate of the model that made the data (a new sample
of that many images, :func:`model_strata`), with the K labelled images exact (:func:`rate_scores`): what
the strata would reach with unlimited labelled images of the same kind, so how much of the gap to a target
better rate estimates could close at all.

Ensembles are scored from the distinct (gt, set labels) tuples of every
pixel, weighted by their pixels (:func:`joint_labels`; exact, the same counts
as merging image by image). A reduced run for development (about 10 min on
the busy 2-core machine; the README quotes it): ``--images 300 --trials 8 --reps 200 --voc-images 600``.

Targets (issue 16), judged on what ``isle merge`` takes by default (:func:`auto_mode`: ``K=100 + strata,
context``, ``strata-context``; the calibration over every K, ``strata-semi`` below 25): K = 100 keeps >= 90 % of
the gain; no labels keeps >= 70 % and never falls below the best single set; p >= 0.9 is right >= 85 % of the time.

Writes ``selection.json``, ``selection.md``, ``selection.png`` and (with the oracle rows)
``selection_oracle.png`` to ``benchmarks/results/``.
"""

from __future__ import annotations

import sys
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from isle_fast.ensemble.estimate import DEFAULT_ESTIMATOR
from isle_fast.ensemble.merge import CONTEXT_MIN_IMAGES
from isle_fast.ensemble.uncertainty import STRATA_MODEL

from .common import bench_parser, format_table, log, markdown_table, results_dir, save_figure, write_json

KS = (10, 25, 50, 100, 200)


def auto_mode(k: int) -> str:
    """The row of what ``isle merge``'s ``auto`` takes with a gt of ``k`` images and image labels."""
    return f"K={k} + strata" + (", context" if k >= CONTEXT_MIN_IMAGES else "")
#: the modes of the oracle rows (:func:`model_strata`)
ORACLE_K = "K={k} + strata, model rates (oracle)"
ORACLE_NONE = "none: model rates (oracle)"
N_SETS = 4
SETTLED = 0.9


# ================================================================================ data
def _close_quality(n_sets: int, c: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rates within +-0.02 of a common per-class value: sets within small margins."""
    rng = np.random.default_rng(seed + 104729)
    base_miss = rng.uniform(0.08, 0.25, size=c)
    base_conf = rng.uniform(0.02, 0.08, size=c)
    miss = np.clip(base_miss[None] + rng.uniform(-0.02, 0.02, size=(n_sets, c)), 0, 1)
    conf = np.clip(base_conf[None] + rng.uniform(-0.02, 0.02, size=(n_sets, c)), 0, 1)
    miss[:, 0] = rng.uniform(0.0, 0.03, size=n_sets)
    return miss, conf


#: miss rate of the best set of every class in the ``paper`` quality (the others: by the paper's margins)
PAPER_BEST_MISS = 0.05
PAPER_CONFUSION = 0.03


@lru_cache(maxsize=4)
def _miss_curve(side: int, c: int = 21) -> tuple[np.ndarray, np.ndarray]:
    """Mean foreground IoU (percent) of a synthetic set against its cell miss rate (confusion
    :data:`PAPER_CONFUSION`), measured on 3 x 300 pilot scenes of their own seeds: the generator's
    IoU scale, to place the paper's margins on it."""
    from isle_fast import metrics
    from isle_fast.kernels import cpu

    from .common import synth_block, synth_shapes

    grid = np.linspace(0.0, 0.85, 3 * N_SETS)
    curve = np.zeros(grid.size)
    for r in range(3):
        g = grid[r * N_SETS:(r + 1) * N_SETS]
        miss = np.repeat(g[:, None], c, axis=1)
        miss[:, 0] = 0.01
        conf = np.full((N_SETS, c), PAPER_CONFUSION)
        seed = 7_000_001 + r
        gt, sets = synth_block(seed, synth_shapes(300, side, seed=seed), (side, side), c, N_SETS,
                               quality=(miss, conf))
        counts = cpu.confusion_labels(np.ascontiguousarray(gt), tuple(np.ascontiguousarray(a) for a in sets), c)
        curve[r * N_SETS:(r + 1) * N_SETS] = np.nanmean(metrics.iou(counts)[:, 1:], axis=1)
    return grid, curve


def _paper_quality(n_sets: int, c: int, seed: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """The paper's Tables 3-4 on the generator's scale: per class, the best component at a miss rate of
    :data:`PAPER_BEST_MISS`, every other one below it by its margin in the tables (IoU points), through the
    generator's IoU-against-miss curve (:func:`_miss_curve`); confusion :data:`PAPER_CONFUSION`."""
    from isle_fast.synthetic.quality import PAPER_PSEUDO_IOU

    if n_sets != PAPER_PSEUDO_IOU.shape[0] or c != PAPER_PSEUDO_IOU.shape[1]:
        raise ValueError(f"the paper's tables have {PAPER_PSEUDO_IOU.shape} sets x classes, not ({n_sets}, {c})")
    grid, curve = _miss_curve(side, c)
    top = float(np.interp(PAPER_BEST_MISS, grid, curve))
    margin = PAPER_PSEUDO_IOU.max(axis=0, keepdims=True) - PAPER_PSEUDO_IOU  # (N, C) points below the best
    target = np.maximum(top - margin, curve.min())
    miss = np.interp(-target, -curve, grid)  # the curve falls with the miss rate
    rng = np.random.default_rng(seed + 65537)
    miss[:, 0] = rng.uniform(0.0, 0.03, size=n_sets)
    return miss, np.full((n_sets, c), PAPER_CONFUSION)


def synthetic(seed: int, quality: str, n_images: int, side: int, c: int = 21) -> dict[str, Any]:
    """One synthetic data set: per-image views of the gt and of every set."""
    from .common import synth_block, synth_quality, synth_shapes

    shapes = synth_shapes(n_images, side, seed=seed)
    q = (synth_quality(N_SETS, c, seed=seed) if quality == "spread" else
         _paper_quality(N_SETS, c, seed, side) if quality == "paper" else _close_quality(N_SETS, c, seed))
    gt, sets = synth_block(seed, shapes, (side, side), c, N_SETS, quality=q)
    return {"name": f"synthetic-{quality}-s{seed}", "gts": [gt[i] for i in range(n_images)],
            "sets": [[s[i] for i in range(n_images)] for s in sets], "classes": c,
            "model": {"kind": "synthetic", "seed": seed, "quality": q, "side": side}}


def voc(n_images: int | None, seed: int = 0) -> dict[str, Any] | None:
    """The real VOC val maps degraded per set and class (None without ``../shared``)."""
    from PIL import Image

    from .e2e import N_CLASSES, base_maps, degrade, set_quality, shared_data

    tarball = shared_data()
    if tarball is None:
        return None
    folder, _ = base_maps(tarball, quick=False)
    files = sorted(p for p in folder.iterdir() if p.suffix == ".png")
    rest = files[n_images:] if n_images else []  # the maps left out: the oracle's scenes
    if n_images:
        files = files[:n_images]
    quality = set_quality(N_SETS, seed=seed)
    rng = np.random.default_rng(seed + 17)
    gts, sets = [], [[] for _ in range(N_SETS)]
    for f in files:
        g = np.array(Image.open(f), dtype=np.uint8)
        gts.append(g)
        for n in range(N_SETS):
            sets[n].append(degrade(g, quality[n], rng))
    return {"name": f"voc-val-degraded-s{seed}", "gts": gts, "sets": sets, "classes": N_CLASSES,
            "model": {"kind": "voc", "seed": seed, "quality": quality, "other_maps": rest}}


# ================================================================================ counts
def model_strata(data: dict[str, Any], n_images: int) -> np.ndarray | None:
    """``(2, C, 2**N, 3)`` labelled strata (:func:`isle_fast.ensemble.uncertainty.strata_counts`) of a new
    sample of about ``n_images`` images drawn from the model that made ``data``: the generating model's own
    truth rate of every stratum, as close as ``n_images`` gets (the oracle rows of :func:`study`).

    Synthetic data sets: new scenes with the same quality matrix (their own seeds, never the data set's).
    VOC: the val maps the data set left out (``--voc-images``), degraded with new random draws of the same
    per-set, per-class degradation, as often as it takes; None when it uses every map (the data set's own
    maps degraded again would know its scenes, and in a development run that oracle kept far more of the
    gain than the one from new maps).
    """
    from isle_fast.ensemble.uncertainty import strata_counts

    from .common import synth_block, synth_shapes
    from .e2e import degrade

    c, m = data["classes"], data["model"]
    out = np.zeros((2, c, 1 << N_SETS, 3), np.int64)

    def add(g: np.ndarray, s: list[np.ndarray]) -> None:
        ok = np.zeros(c, bool)
        ok[np.unique(g[g < c])] = True
        ok[0] = True
        out[...] += strata_counts(g[None], [a[None] for a in s], c, allowed=ok[None])

    if m["kind"] == "synthetic":
        block = 250
        for part in range(max(1, -(-n_images // block))):
            seed = 1_000_003 + 1_000 * int(m["seed"]) + part
            gt, sets = synth_block(seed, synth_shapes(block, m["side"], seed=seed), (m["side"], m["side"]), c,
                                   N_SETS, quality=m["quality"])
            for i in range(block):
                add(gt[i], [s[i] for s in sets])
        return out
    from PIL import Image

    if not m["other_maps"]:
        return None
    maps = [np.array(Image.open(f), dtype=np.uint8) for f in m["other_maps"][:n_images]]
    for r in range(max(1, -(-n_images // len(maps)))):
        rng = np.random.default_rng([int(m["seed"]), 1_000_003, r])
        for g in maps:
            add(g, [degrade(g, m["quality"][n], rng) for n in range(N_SETS)])
    return out


def rate_scores(rates: np.ndarray, exact: np.ndarray, patterns: np.ndarray) -> np.ndarray:
    """``(N, C)`` IoU (percent): the labelled strata ``exact (2, C, P, 3)`` counted exactly, every other
    pixel of ``patterns (2, C, P)`` at the truth rates of the strata ``rates (2, C, P, 3)`` (a stratum the
    rates never saw counts as not the class), as the strata estimate counts them."""
    from isle_fast.ensemble.uncertainty import iou_at_rates

    return iou_at_rates(exact, patterns, rates)


def precompute(data: dict[str, Any]) -> dict[str, Any]:
    """Per-image counts (exact), vote patterns (with and without image labels) and the full-gt reference."""
    from isle_fast import metrics
    from isle_fast.ensemble.uncertainty import CONTEXT_RADII, context_strata, strata_counts
    from isle_fast.kernels import cpu

    c = data["classes"]
    gts, sets = data["gts"], data["sets"]
    n_img = len(gts)
    counts = np.zeros((n_img, N_SETS, c, c + 1), np.int64)
    presence = np.zeros((n_img, c), bool)
    pat_labels = np.zeros((2, c, 1 << N_SETS), np.int64)  # [1]: classes the image labels rule out
    pat_plain = np.zeros((c, 1 << N_SETS), np.int64)
    strata = np.zeros((n_img, 2, c, 1 << N_SETS, 3), np.int64)  # per image: labelled pixels by vote stratum
    context = np.zeros((n_img, 2, len(CONTEXT_RADII) + 1, c, 1 << N_SETS, 3), np.int64)  # ... and context bin
    for i in range(n_img):
        g = np.ascontiguousarray(gts[i][None])
        s = tuple(np.ascontiguousarray(sets[n][i][None]) for n in range(N_SETS))
        counts[i] = cpu.confusion_labels(g, s, c)
        presence[i] = counts[i, 0].sum(axis=1) > 0
        h = cpu.vote_patterns(s, c)
        pat_plain += h
        ok = presence[i].copy()
        ok[0] = True
        pat_labels[0][ok] += h[ok]
        pat_labels[1][~ok] += h[~ok]
        strata[i] = strata_counts(g, s, c, allowed=ok[None])
        context[i] = context_strata(g, s, c, allowed=ok[None])
    stats = metrics.intersection_union(counts)  # (I, N, C, 2)
    joint, joint_n = joint_labels(gts, sets)
    gt_px = counts[:, 0].sum(axis=2)  # (I, C)
    full_iou = metrics.iou(counts.sum(axis=0))
    return {"counts": counts, "stats": stats, "gt_px": gt_px, "presence": presence, "full_iou": full_iou,
            "patterns": {"labels": pat_labels, "plain": pat_plain}, "strata": strata, "context": context,
            "context_patterns": context[..., 0].sum(axis=0), "joint": joint,
            "joint_pixels": joint_n}


def joint_labels(gts: list[np.ndarray], sets: list[list[np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """The distinct ``(gt, set 0, ..., set N-1)`` label tuples of every pixel and how many pixels have each.

    The label merge decides every pixel from the sets' labels there alone, so an
    ensemble's confusion counts are those of the merged tuples weighted by their
    pixels: exact, and thousands of tuples instead of millions of pixels.
    """
    parts = []
    for i, g in enumerate(gts):
        key = g.astype(np.uint64)
        for n in range(len(sets)):
            key = (key << np.uint64(8)) | sets[n][i].astype(np.uint64)
        parts.append(np.unique(key.ravel(), return_counts=True))
    keys = np.concatenate([p[0] for p in parts])
    cnt = np.concatenate([p[1] for p in parts]).astype(np.int64)
    uniq, inv = np.unique(keys, return_inverse=True)
    pixels = np.bincount(inv, weights=cnt, minlength=uniq.size).astype(np.int64)
    cols = [((uniq >> np.uint64(8 * (len(sets) - j))) & np.uint64(255)).astype(np.uint8)
            for j in range(len(sets) + 1)]
    return np.stack(cols), pixels


def select_from(scores: np.ndarray, gt_px: np.ndarray, c: int):
    from isle_fast.ensemble.selection import select

    return select(scores=scores, gt_pixels=gt_px, set_names=[f"set{n}" for n in range(N_SETS)],
                  classes=[f"c{k}" for k in range(c)])


def ensemble_miou(data: dict[str, Any], sel: Any, pre: dict[str, Any] | None = None) -> float:
    """mIoU of the score-policy ensemble of ``sel`` over every image, with full gt.

    With ``pre`` (:func:`precompute`) from the merged distinct label tuples
    weighted by their pixels (the same counts, exactly; checked by the tests),
    else image by image.
    """
    from isle_fast import metrics
    from isle_fast.kernels import cpu

    c = data["classes"]
    ksel = sel.kernel_selection()
    prio = sel.priority()
    total = np.zeros((c, c + 1), np.int64)
    if pre is not None:
        joint, pixels = pre["joint"], pre["joint_pixels"]
        s = tuple(np.ascontiguousarray(joint[1 + n][None]) for n in range(N_SETS))
        merged = np.asarray(cpu.merge_labels(s, ksel, prio, 0)).ravel().astype(np.int64)
        g = joint[0].astype(np.int64)
        ok = g < c
        np.add.at(total, (g[ok], np.minimum(merged[ok], c)), pixels[ok])
        return float(metrics.miou(metrics.iou(total)))
    for i, g in enumerate(data["gts"]):
        s = tuple(np.ascontiguousarray(data["sets"][n][i][None]) for n in range(N_SETS))
        merged = np.asarray(cpu.merge_labels(s, ksel, prio, 0))
        total += cpu.confusion_labels(np.ascontiguousarray(g[None]), (merged,), c)[0]
    return float(metrics.miou(metrics.iou(total)))


# ================================================================================ the study
def study(data: dict[str, Any], trials: int, reps: int, ks: tuple[int, ...], oracle_images: int = 0
          ) -> dict[str, Any]:
    from isle_fast import metrics
    from isle_fast.ensemble.estimate import ESTIMATORS, PRIOR_ESTIMATOR, blend_scores, estimate_from_patterns
    from isle_fast.ensemble.uncertainty import (
        STRATA_MODELS,
        choice_uncertainty,
        posterior_scores,
        stratified_scores,
    )

    t0 = time.perf_counter()
    pre = precompute(data)
    c = data["classes"]
    n_img = len(data["gts"])
    full_iou = pre["full_iou"]
    full_sel = select_from(full_iou, pre["gt_px"].sum(axis=0), c)
    fg = [k for k in range(1, c) if pre["gt_px"][:, k].sum() > 0]
    singles = metrics.miou(full_iou)
    best_single = float(np.nanmax(singles))
    full_ens = ensemble_miou(data, full_sel)
    gain = full_ens - best_single
    cache: dict[tuple, float] = {}

    def judge(sel: Any) -> dict[str, float]:
        key = tuple(int(v) for v in sel.best) + tuple(np.round(sel.priority(), 9).ravel().tolist())
        if key not in cache:
            cache[key] = ensemble_miou(data, sel, pre)
        ens = cache[key]
        good = [full_iou[int(sel.best[k]), k] >= full_iou[int(full_sel.best[k]), k] for k in fg]
        lost = [full_iou[int(full_sel.best[k]), k] - full_iou[int(sel.best[k]), k] for k in fg]
        return {"agree": float(np.mean(good)), "iou_lost": float(np.mean(lost)), "ensemble_miou": ens,
                "gain_kept": (ens - best_single) / gain if gain > 0 else float("nan"),
                "below_best": float(ens < best_single - 1e-9)}

    rows, post_rows, strata_rows = [], [], []
    rng = np.random.default_rng(12345)
    prior = estimate_from_patterns(pre["patterns"]["labels"], PRIOR_ESTIMATOR)  # every image's votes
    prior_plain = estimate_from_patterns(pre["patterns"]["plain"], PRIOR_ESTIMATOR)
    voting = pre["patterns"]["plain"][:, 1:].sum(axis=1)  # pixels some set predicts the class on
    # the oracle of every estimate from vote strata: the generating model's own truth rate of every stratum
    # (a new sample of oracle_images images), the labelled images exact
    model_rates = model_strata(data, oracle_images) if oracle_images and "model" in data else None
    if oracle_images and model_rates is None:
        log(f"[selection] {data['name']}: no oracle rows (no scenes of its model outside the data set)")
    oracle_rows = []
    for k in ks:
        if k >= n_img:
            continue
        per, calib_n, calib_right, blended, oracle = [], 0, 0, [], []
        posts: dict[str, dict[str, Any]] = {}
        strata: dict[str, dict[str, Any]] = {}
        for t in range(trials):
            sub = np.sort(rng.choice(n_img, size=k, replace=False))
            sub_counts = pre["counts"][sub].sum(axis=0)
            sel = select_from(metrics.iou(sub_counts), sub_counts.sum(axis=2)[0], c)
            per.append(judge(sel))
            unc = choice_uncertainty(pre["stats"][sub], sel.best, gt_present=sub_counts[0].sum(axis=1) > 0,
                                     reps=reps, seed=t)
            # a class the labelled images lack is still chosen from the estimate: its pixels are the votes
            est_px = sub_counts.sum(axis=2)[0] + voting
            if model_rates is not None:
                exact = pre["strata"][sub].sum(axis=0)
                at_rates = rate_scores(model_rates, exact, pre["patterns"]["labels"])
                oracle.append(judge(select_from(at_rates, est_px, c)))
            mixed = blend_scores(metrics.iou(sub_counts), unc["class_images"], prior)
            blended.append(judge(select_from(mixed, est_px, c)))
            for variant, est in (("", prior), (" (no image labels)", prior_plain)):
                post = posterior_scores(pre["stats"][sub], est, gt_present=sub_counts[0].sum(axis=1) > 0,
                                        reps=reps, seed=t, population=n_img, pooled=True)
                post_sel = select_from(post["scores"], est_px, c)
                got = posts.setdefault(variant, {"per": [], "n": 0, "right": 0})
                got["per"].append(judge(post_sel))
                for cls in fg:
                    if post["p_best"][cls] >= SETTLED:
                        got["n"] += 1
                        got["right"] += int(full_iou[int(post_sel.best[cls]), cls] >=
                                            full_iou[int(full_sel.best[cls]), cls])
            for variant, st, pat, model, ctx in (
                    ("", pre["strata"][sub], pre["patterns"]["labels"], STRATA_MODEL, None),
                    (" (no image labels)", pre["strata"][sub].sum(axis=1, keepdims=True),
                     pre["patterns"]["plain"][None], STRATA_MODEL, None),
                    *[(f", {m}", pre["strata"][sub], pre["patterns"]["labels"], m, None)
                      for m in STRATA_MODELS if m != STRATA_MODEL],
                    (", context", pre["strata"][sub], pre["patterns"]["labels"], STRATA_MODEL,
                     (pre["context"][sub], pre["context_patterns"]))):
                strat = stratified_scores(st, pat, reps=reps, seed=t, model=model, context=ctx)
                strat_sel = select_from(strat["scores"], strat["voting_pixels"], c)
                got = strata.setdefault(variant, {"per": [], "n": 0, "right": 0})
                got["per"].append(judge(strat_sel))
                for cls in fg:
                    if strat["p_best"][cls] >= SETTLED:
                        got["n"] += 1
                        got["right"] += int(full_iou[int(strat_sel.best[cls]), cls] >=
                                            full_iou[int(full_sel.best[cls]), cls])
            for cls in fg:
                if unc["p_best"][cls] >= SETTLED:
                    calib_n += 1
                    calib_right += int(full_iou[int(sel.best[cls]), cls] >= full_iou[int(full_sel.best[cls]), cls])
        rows.append(_row(data["name"], f"K={k}", per, calib_n, calib_right))
        rows.append(_row(data["name"], f"K={k} + estimate", blended, 0, 0))
        for variant, got in posts.items():
            post_rows.append(_row(data["name"], f"K={k} + estimate, posterior{variant}", got["per"], got["n"],
                                  got["right"]))
        for variant, got in strata.items():
            strata_rows.append(_row(data["name"], f"K={k} + strata{variant}", got["per"], got["n"], got["right"]))
        if oracle:
            oracle_rows.append(_row(data["name"], ORACLE_K.format(k=k), oracle, 0, 0))
    rows.extend(post_rows)
    rows.extend(strata_rows)
    if model_rates is not None:
        pat = pre["patterns"]["labels"]
        none_scores = rate_scores(model_rates, np.zeros_like(model_rates), pat)
        oracle_rows.append(_row(data["name"], ORACLE_NONE,
                                 [judge(select_from(none_scores, voting, c))], 0, 0))
    rows.extend(oracle_rows)
    for method in ESTIMATORS:
        for variant in ("labels", "plain"):
            est = estimate_from_patterns(pre["patterns"][variant], method)
            pat = pre["patterns"][variant]
            sel = select_from(est, (pat[0] if pat.ndim == 3 else pat)[:, 1:].sum(axis=1), c)
            rows.append(_row(data["name"], f"none: {method}" + ("" if variant == "labels" else
                                                              " (no image labels)"), [judge(sel)], 0, 0))
    log(f"[selection] {data['name']}: {n_img} images, gain {gain:.2f} in {time.perf_counter() - t0:.1f} s")
    for r in rows:
        log(f"[selection]   {r['mode']:34s} agree {r['agree']:.2f}  lost {r['iou_lost']:.2f}  gain kept "
            f"{r['gain_kept']:.2f}  below best {r['below_best']}  p>=0.9 right {r['p90_right']} of {r['p90_choices']}")
    return {"name": data["name"], "images": n_img, "best_single_miou": best_single, "full_gt_ensemble_miou":
            full_ens, "full_gt_gain": gain, "set_miou": [float(v) for v in singles], "rows": rows}


def _row(dataset: str, mode: str, per: list[dict], n: int, right: int) -> dict[str, Any]:
    mean = {k: float(np.nanmean([p[k] for p in per])) for k in per[0]}
    return {"data": dataset, "mode": mode, "trials": len(per), "agree": mean["agree"],
            "iou_lost": mean["iou_lost"], "ensemble_miou": mean["ensemble_miou"],
            "gain_kept": mean["gain_kept"], "min_gain_kept": float(np.nanmin([p["gain_kept"] for p in per])),
            "below_best": int(sum(p["below_best"] for p in per)),
            "p90_choices": n, "p90_right": (right / n) if n else None}


# ================================================================================ output
ORACLE_COLS = ["data", "full_gt_gain", "k100", "k100_oracle", "none", "none_oracle"]
ORACLE_TEXT = (
    "Every estimate here (labelled or not) scores the unlabelled pixels by their vote stratum (class, sets "
    "voting it, image labels). `model rates (oracle)` gives each stratum the truth rate of the model that made "
    "the data, taken from a new sample of {n} images of the same model (synthetic: new scenes with the same "
    "quality matrix; VOC: the val maps the data set leaves out, degraded the same way), and counts the K "
    "labelled images exactly: what an estimate of the stratum rates would reach with unlimited labelled "
    "images of the same kind (not these). It is not a strict bound (an estimate can pass it on one data set "
    "by chance), but where it is far below a target, better rate estimates cannot reach the target: the gain "
    "left is how these particular images came out (which set happened to miss which object), which only "
    "their own gt shows. `k100`: what merge takes with 100 labelled images (K=100 + strata, context); `none`: "
    "the default no-label estimator.")


def oracle_table(studies: list[dict], k_mode: str, none_mode: str) -> list[dict[str, Any]]:
    """Per data set: the default K=100 and no-label rows beside their oracle rows (empty without them)."""
    out = []
    for s in studies:
        by = {r["mode"]: r["gain_kept"] for r in s["rows"]}
        k_oracle, none_oracle = by.get(ORACLE_K.format(k=100)), by.get(ORACLE_NONE)
        if k_oracle is None and none_oracle is None:
            continue
        out.append({"data": s["name"], "full_gt_gain": s["full_gt_gain"], "k100": by.get(k_mode),
                    "k100_oracle": k_oracle, "none": by.get(none_mode), "none_oracle": none_oracle})
    if out:
        def over(fn: Any, k: str) -> float | None:
            vals = [r[k] for r in out if r[k] is not None]
            return float(fn(vals)) if vals else None
        keys = ("full_gt_gain", "k100", "k100_oracle", "none", "none_oracle")
        out = out + [{"data": "mean", **{k: over(np.mean, k) for k in keys}},
                     {"data": "worst", **{k: over(np.min, k) for k in keys}}]
    return out


def summarize(studies: list[dict]) -> list[dict[str, Any]]:
    """Per mode, across data sets: mean gain kept, worst data set, calibration pooled."""
    modes: dict[str, list[dict]] = {}
    for s in studies:
        for r in s["rows"]:
            modes.setdefault(r["mode"], []).append(r)
    out = []
    for mode, rs in modes.items():
        n = sum(r["p90_choices"] for r in rs)
        right = sum((r["p90_right"] or 0) * r["p90_choices"] for r in rs)
        out.append({"mode": mode, "data_sets": len(rs), "agree": float(np.mean([r["agree"] for r in rs])),
                    "iou_lost": float(np.mean([r["iou_lost"] for r in rs])),
                    "gain_kept": float(np.nanmean([r["gain_kept"] for r in rs])),
                    "worst_data_set_gain_kept": float(np.nanmin([r["gain_kept"] for r in rs])),
                    "below_best": int(sum(r["below_best"] for r in rs)),
                    "p90_right": (right / n) if n else None, "p90_choices": n})
    return out


def plot(path: Path, studies: list[dict]) -> Path:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    cmap = plt.get_cmap("tab10")
    for j, s in enumerate(studies):
        kr = [r for r in s["rows"] if r["mode"].startswith("K=") and "+" not in r["mode"]]
        ax.plot([int(r["mode"][2:]) for r in kr], [100 * r["gain_kept"] for r in kr], "o-", color=cmap(j % 10),
                label=f"{s['name']} (gain {s['full_gt_gain']:.2f})")
        kb = [r for r in s["rows"] if r["mode"] in {auto_mode(k) for k in KS}]
        ax.plot([int(r["mode"][2:].split()[0]) for r in kb], [100 * r["gain_kept"] for r in kb], "s--",
                color=cmap(j % 10), linewidth=0.8, markersize=3)
        for r in s["rows"]:
            if r["mode"] == f"none: {DEFAULT_ESTIMATOR}":
                ax.axhline(100 * r["gain_kept"], color=cmap(j % 10), linestyle=":", linewidth=1)
    ax.axhline(90, color="black", linewidth=0.8)
    ax.axhline(70, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xscale("log")
    ax.set_xlabel(f"labelled images K (dashed: K + strata, context from K = {CONTEXT_MIN_IMAGES}, the default; "
                  f"dotted: no pixel labels, {DEFAULT_ESTIMATOR})")
    ax.set_ylabel("share of the full-gt ensemble gain kept (%)")
    ax.set_title("ISLE selection from few or no pixel labels")
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def plot_oracle(path: Path, oracle: list[dict[str, Any]]) -> Path:
    """Bars per data set: the default K=100 and no-label modes beside their model-rate oracles."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    rows = [r for r in oracle if r["data"] not in ("mean", "worst")]
    x = np.arange(len(rows))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, (key, title) in zip(axes, (("k100", f"100 labelled images ({auto_mode(100)})"),
                                       ("none", f"no pixel labels ({DEFAULT_ESTIMATOR})"))):
        est = [100 * (r[key] if r[key] is not None else np.nan) for r in rows]
        orc = [100 * (r[f"{key}_oracle"] if r[f"{key}_oracle"] is not None else np.nan) for r in rows]
        ax.bar(x - 0.2, est, 0.4, label="the default estimate", color="tab:blue")
        ax.bar(x + 0.2, orc, 0.4, label="the model's own stratum rates (oracle)", color="tab:grey")
        ax.axhline(90 if key == "k100" else 70, color="black", linewidth=0.8, linestyle="--")
        ax.set_xticks(x)
        ax.set_xticklabels([r["data"].replace("synthetic-", "").replace("-degraded", "") for r in rows],
                           rotation=45, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
    axes[0].set_ylabel("share of the full-gt ensemble gain kept (%)")
    axes[0].legend(fontsize=8, loc="lower left")
    fig.suptitle("ISLE selection: the estimate beside what the vote strata can give (dashed: target)")
    fig.tight_layout()
    return save_figure(fig, path)


def _load() -> str:
    """The 1-minute load average (``/proc/loadavg``), or ``?``."""
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "?"


def main(argv: list[str] | None = None) -> int:
    p = bench_parser("selection", "ISLE's selection from K labelled images or none, vs full gt.")
    p.add_argument("--trials", type=int, default=None, help="random subsets per K (default 20; quick 3)")
    p.add_argument("--images", type=int, default=None, help="images per synthetic data set (default 600)")
    p.add_argument("--reps", type=int, default=None, help="bootstrap resamples (default 500; quick 100)")
    p.add_argument("--voc-images", type=int, default=None,
                   help="real VOC val maps used (default all 1,449; quick 120; 0: no VOC data set)")
    p.add_argument("--seeds", default=None,
                   help="seeds of the synthetic data sets, comma-separated (default 0,1,2; quick 0): other "
                        "seeds are data sets no choice of a default was made on")
    p.add_argument("--oracle-images", type=int, default=None,
                   help="images of the new sample that gives the model's stratum rates for the oracle rows "
                        "(default 6000; quick 250; 0: no oracle rows)")
    args = p.parse_args(argv)
    quick = args.quick
    trials = args.trials or (3 if quick else 20)
    reps = args.reps or (100 if quick else 500)
    n_img = args.images or (60 if quick else 600)
    side = 64 if quick else 160
    seeds = (tuple(int(v) for v in args.seeds.split(",")) if args.seeds else (0,) if quick else (0, 1, 2))
    ks = tuple(k for k in KS if not quick or k <= 50)
    oracle_images = args.oracle_images if args.oracle_images is not None else (250 if quick else 6000)
    studies = []
    t0 = time.perf_counter()
    for seed in seeds:
        for quality in ("spread", "close", "paper"):
            studies.append(study(synthetic(seed, quality, n_img, side), trials, reps, ks, oracle_images))
    real = None if args.voc_images == 0 else voc(args.voc_images or (40 if quick else None))
    if args.voc_images == 0:
        log("[selection] --voc-images 0: no VOC data set")
    elif real is None:
        log("[selection] ../shared/data/voc2012_val_gt.tar.gz is absent: the VOC data set is skipped")
    else:
        studies.append(study(real, trials, reps, ks, oracle_images))
    summary = summarize(studies)
    cols = ["mode", "data_sets", "agree", "iou_lost", "gain_kept", "worst_data_set_gain_kept", "below_best",
            "p90_right", "p90_choices"]
    print(format_table(summary, cols))
    print()
    detail_cols = ["data", "mode", "trials", "agree", "iou_lost", "ensemble_miou", "gain_kept", "min_gain_kept",
                   "below_best", "p90_right", "p90_choices"]
    rows = [r for s in studies for r in s["rows"]]
    print(format_table(rows, detail_cols))
    out = results_dir()
    # the targets are judged on the recommended modes: K labelled images with every image's votes (the
    # strata, as merge's auto takes them with a gt of K images, auto_mode), and the default estimator;
    # calibration: the p the strata's bootstrap reports in those rows, every K
    k_mode = auto_mode(100)
    k100 = next((r for r in summary if r["mode"] == k_mode), None)
    none = next((r for r in summary if r["mode"] == f"none: {DEFAULT_ESTIMATOR}"), None)
    post = [r for r in summary if r["mode"] in {auto_mode(k) for k in ks}]
    calib_n = sum(r["p90_choices"] for r in post)
    calib = (sum((r["p90_right"] or 0) * r["p90_choices"] for r in post) / calib_n) if calib_n else None
    targets = {
        "k100_gain_kept>=0.90": None if k100 is None else k100["gain_kept"] >= 0.90,
        "none_gain_kept>=0.70_every_data_set": None if none is None else none["worst_data_set_gain_kept"] >= 0.70,
        "none_never_below_best": None if none is None else none["below_best"] == 0,
        "p90_right>=0.85": None if calib is None else calib >= 0.85,
    }
    oracle = oracle_table(studies, k_mode, f"none: {DEFAULT_ESTIMATOR}")
    doc = {"quick": quick, "trials": trials, "reps": reps, "ks": list(ks), "seconds": time.perf_counter() - t0,
           "data_sets": [{k: v for k, v in s.items() if k != "rows"} for s in studies],
           "summary": summary, "rows": rows, "p90_right_pooled": calib, "targets": targets,
           "oracle": oracle, "oracle_images": oracle_images,
           "target_modes": {"k100": k_mode, "none": f"none: {DEFAULT_ESTIMATOR}",
                            "p90": ", ".join(auto_mode(k) for k in ks)},
           "command": "python -m benchmarks.selection " + " ".join(argv if argv is not None else sys.argv[1:]),
           "load": _load()}
    write_json("selection", doc, quick=quick)
    md = ["# ISLE selection with few or no pixel labels", "",
          f"`{doc['command']}`: {trials} subsets per K, {reps} bootstrap resamples, {n_img} images per "
          f"synthetic data set, {len(real['gts']) if real is not None else 0} VOC maps; "
          f"{doc['seconds']:.0f} s, load {doc['load']} (the figures do not depend on the load, only the time "
          "does). Synthetic sets have independent errors (real CAM sets are more alike, which makes the "
          "no-label estimate harder).", "",
          f"Targets judged on: {k_mode} (what `isle merge` does with a gt of 100 images and image labels: "
          f"the strata with the `{STRATA_MODEL}` prior refined by the distance to agreement, "
          f"`--subset-selection strata-context`, from {CONTEXT_MIN_IMAGES} labelled images on; `strata-semi` "
          f"below), none: {DEFAULT_ESTIMATOR} (the default estimator), calibration of the strata bootstrap's "
          f"p(best) over the rows of those modes, every K.", "",
          "## Across data sets", "", markdown_table(summary, cols), "", "## Per data set", "",
          markdown_table(rows, detail_cols), "", "## Targets", "",
          *[f"- {k}: {v}" for k, v in targets.items()], "",
          *(["## Oracle: the generating model's own stratum rates", "", ORACLE_TEXT.format(n=oracle_images), "",
             markdown_table(oracle, ORACLE_COLS), "", "The same as bars: `selection_oracle.png`.", ""]
            if oracle else [])]
    tmp = out / ".selection.md.tmp"
    tmp.write_text("\n".join(md), encoding="utf-8")
    tmp.replace(out / "selection.md")
    plot(out / "selection.png", studies)
    if oracle:
        plot_oracle(out / "selection_oracle.png", oracle)
    print(f"\ntargets: {targets}")
    print(f"written: {out / 'selection.json'}, {out / 'selection.md'}, {out / 'selection.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
