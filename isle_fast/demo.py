"""The demo (``isle demo``): make a synthetic VOC-like data set and run every pipeline step on it.

The demo is a list of steps (:data:`STEPS`). Each step is a function that
takes the shared :class:`DemoContext`, does its work, and returns the path of
what it wrote (or ``None``); :func:`run_demo` times every step (wall seconds and
user CPU seconds of this process and its finished children) and ends with
``demo_summary.json`` (steps, ``headline``, every step's results), which
``isle demo`` (:mod:`isle_fast.commands.demo`) prints as a table of step,
seconds and output and the headline figures. Add a
pipeline step by writing one more ``step_*`` function and appending it to
:data:`STEPS` (a step can read what earlier steps left in ``ctx.stores`` /
``ctx.results`` / ``ctx.cache``).

The steps:

``data``, ``ingest``, ``info``
    the synthetic data set (4 hard pseudo-label sets, 2 soft CAM sets in
    PuzzleCAM's file layout, a ``cls_labels.npy`` of image-level labels, train
    and val splits), its ingestion from the PNG / JPEG / CAM file tree (the
    CAMs through the restricted unpickler, no ``--allow-pickle``; the gt
    with its image-level labels; checked equal to the generated stores) and
    a store listing.
``refine`` (ISLE step 1)
    the soft sets refined with ``--refine`` (default: the dense CRF only;
    AffinityNet, trained here from random weights because nothing is
    downloaded, costs minutes of CPU even at demo size, so it is opt-in:
    ``--refine affinity,crf``); each soft set's train mIoU before and after.
``evaluate`` (step 2)
    every candidate set (the hard sets and the refined soft sets) against
    the train gt: per-class IoU table, ``evaluation.json`` (the ``isle evaluate --json`` schema).
``merge`` (step 3)
    the class-wise ensemble of all candidates (``ensemble.zarr``) and its
    mIoU gain over the best single set; the same ensemble with the image-level
    labels (``--image-labels``: claims of classes absent from an image are
    dropped; ``ensemble_image_labels.zarr``) and its difference; an ISLE-2 style pair (the two sets
    that win the most classes, as the paper's ISLE-2 kept its two biggest
    contributors; ``ensemble_isle2.zarr``); the ensemble of every subset in
    one pass (``subsets.json``).
``report``
    :func:`isle_fast.ensemble.report.report` over the candidates, the ensemble and the
    images: Markdown / JSON tables and PNG figures in ``report/``.
``run``
    the same job as one command, :func:`isle_fast.job.run_job` (``isle run``), from
    the file tree to ``run/ensemble/*.png``; its ensemble is checked equal to the
    steps' one, then it runs again and reuses every cached store.
``train`` (step 4)
    DeepLabV3+ trained twice with the same seed and settings, on the ensemble
    and on the best single set, each scored on the val split by ``predict`` +
    ``evaluate`` (final checkpoint, not the best-on-val one, so val is not
    used for model selection). The difference comes with a 95 % bootstrap
    interval over the val images; it does not cover seed-to-seed training
    noise, which on the CPU budget of the demo (a narrow ResNet-18 from random
    weights, :data:`TRAIN_DEFAULT`: about a minute per model) is large: the
    same run with another seed can move val mIoU by 10 points. The verdict
    says so. ``--skip-train`` stops after the report.

The output folder is created fresh: a non-empty folder is refused unless
``--overwrite`` is given *and* the folder holds an earlier demo (its
``.isle-demo`` marker), so the demo never deletes a folder it did not make.
"""

from __future__ import annotations

import argparse
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from isle_fast.errors import InputError, param

MARKER = ".isle-demo"

#: DeepLabV3+ settings of the demo's training step: a CPU-sized version of the paper's recipe (SGD,
#: momentum 0.9, poly decay; nothing is downloaded, so the backbone starts from random weights).
#: Why these: a ResNet-18 at quarter width (``resnet18_w16``, 16-128 channels, about 16x fewer
#: multiply-adds than ResNet-18) at output stride 32 with a 64-channel head runs about 70 crops of
#: 64 px per second on one core, so 600 steps of 8 crops (100 epochs of the 48 training images) fit
#: in about a minute per model; a full-width ResNet-18 gets about 4x fewer steps in that time and,
#: measured on the demo data, still predicts only background after 150 steps. From random weights a
#: high learning rate learns the classes: on a half-width net (resnet18_w32, 300 steps) AdamW at
#: 2e-3 reached val mIoU 12 (all-background 5.5) and SGD at 0.05 reached 32. Scales 0.5-1.0 keep
#: more objects inside a 64 px crop (0.75-1.25 did worse). One torch thread: the demo's val figures
#: are then the same on every run of a machine (the thread count changes results in the last bits,
#: and an automatic count follows the load), and a model this small gains little from a second
#: core (197 vs 159 images/s idle) but loses much when another job holds it (53 vs 151 images/s;
#: benchmarks/results/train.json). ``--quick`` uses TRAIN_QUICK (a smoke test: it does not learn).
TRAIN_DEFAULT: dict[str, Any] = dict(backbone="resnet18_w16", output_stride=32, head_channels=64,
                                     steps=600, crop=64, batch_size=8, scale_range=(0.5, 1.0),
                                     optimizer="sgd", lr=0.1, threads=1)
TRAIN_QUICK: dict[str, Any] = dict(backbone="resnet18_w16", output_stride=32, head_channels=32, steps=6,
                                   crop=48, batch_size=4, scale_range=(0.5, 1.0), optimizer="sgd", lr=0.1,
                                   threads=1)

#: AffinityNet settings when ``--refine`` includes ``affinity`` (CPU-sized: ResNet-18 from random
#: weights, a few epochs of small crops). The paper's ResNet-50 setting is ``isle refine``'s default.
AFFINITY_DEFAULT: dict[str, Any] = dict(backbone="resnet18", weights="none", epochs=2, crop=128,
                                        batch_size=8)
AFFINITY_QUICK: dict[str, Any] = dict(backbone="resnet18", weights="none", epochs=1, crop=64,
                                      batch_size=4)


@dataclass
class DemoContext:
    """What the steps share.

    Attributes
    ----------
    out : Path
        The demo's output folder.
    args : argparse.Namespace
        The command-line arguments.
    n_images : int
    size_range : (int, int)
    quiet : bool
    dataset : SyntheticDataset or None
        Set by :func:`step_data`.
    stores : dict str -> str
        Store paths by key (``train/gt``, ``train/pseudo/<set>``, ...; see
        :class:`~isle_fast.synthetic.datasets.SyntheticDataset`); steps add their outputs here.
    results : dict
        Anything a step wants to report or hand on (JSON-ready values end up
        in ``demo_summary.json``).
    cache : dict
        Objects steps hand on that are not JSON (the evaluation, the selection,
        the refinement chain); not written anywhere.
    """

    out: Path
    args: argparse.Namespace
    n_images: int
    size_range: tuple[int, int]
    quiet: bool
    dataset: Any = None
    stores: dict[str, str] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    cache: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------- steps
def step_data(ctx: DemoContext) -> Path:
    """Make the synthetic VOC-like data set (file tree + stores) and a preview PNG."""
    from isle_fast.synthetic.datasets import make_voc_like, preview_png

    ds = make_voc_like(ctx.out / "data", n_images=ctx.n_images, seed=ctx.args.seed,
                       size_range=ctx.size_range, keep_arrays=False, quiet=ctx.quiet)
    ctx.dataset = ds
    ctx.stores.update(ds.stores)
    preview_png(ds, ctx.out / "data_preview.png")
    ctx.results["data"] = {
        "images": ds.num_images, "train": len(ds.train_ids), "val": len(ds.val_ids),
        "sets": list(ds.set_names), "soft_sets": list(ds.soft_set_names),
        "true_best": ds.true_best(), "preview": str(ctx.out / "data_preview.png"),
    }
    assert ds.root is not None, "make_voc_like was given a folder"
    return ds.root


def step_ingest(ctx: DemoContext) -> Path | None:
    """Ingest the JPEG / PNG / CAM tree into stores and check they equal the generated ones.

    Uses :mod:`isle_fast.stores.ingest` (the training split, as listed in
    ``ImageSets/Segmentation/train.txt``); skipped when that module is absent.
    """
    try:
        from isle_fast.stores import ingest
    except ImportError:
        ctx.results["ingest"] = "isle_fast.stores.ingest is not available in this build; skipped"
        return None
    import numpy as np

    from isle_fast.stores.stack import open_stack

    ds = ctx.dataset
    dest = ctx.out / "ingested"
    train_list = str(ds.paths["train_list"])
    q = True  # the info step lists the stores; ingest's own summaries would repeat it
    made: dict[str, str] = {}
    labels = str(ds.paths["cls_labels"])
    gt = ingest.ingest_labels(ds.paths["gt"], dest / "gt.zarr", ids=train_list, kind="gt",
                              image_labels=labels, quiet=q)
    made["train/gt"] = gt.path
    made["train/images"] = ingest.ingest_images(ds.paths["images"], dest / "images.zarr", gt=gt, quiet=q).path
    for name, folder in ds.paths["pseudo"].items():
        made[f"train/pseudo/{name}"] = ingest.ingest_labels(
            folder, dest / "pseudo" / f"{name}.zarr", gt=gt, name=name, quiet=q).path
    for name, folder in ds.paths["cams"].items():
        made[f"train/cams/{name}"] = ingest.ingest_scores(
            folder, dest / "cams" / f"{name}.zarr", gt=gt, name=name, image_labels=labels, quiet=q).path
    # the ingested stores must hold exactly what the generator wrote directly
    mismatched = []
    for key, path in made.items():
        a, b = open_stack(path), open_stack(ctx.stores[key])
        same = a.ids == b.ids and np.array_equal(a.shapes, b.shapes) and all(
            np.array_equal(a.read_image(i), b.read_image(i)) for i in range(a.num_images))
        if not same:
            mismatched.append(key)
    ctx.results["ingest"] = {"stores": made, "identical_to_direct": not mismatched, "mismatched": mismatched,
                             "cam_layout": "puzzlecam", "image_labels": labels}
    if not ctx.quiet:
        print(f"ingested {len(made)} stores from {ds.root}; identical to the generated stores: "
              f"{'yes' if not mismatched else 'NO'}")
    if mismatched:
        raise RuntimeError(f"ingested stores differ from the generated ones: {', '.join(mismatched)}")
    for key, path in made.items():   # the CAM sets go on as ingested: class-sparse (sweep, refine, merge)
        if key.startswith("train/cams/"):
            ctx.stores[key] = path
    return dest


def step_info(ctx: DemoContext) -> Path:
    """Describe every store (as isle info does) and write stores.json."""
    from isle_fast.stores.stack import open_stack

    rows = []
    for key, path in ctx.stores.items():
        d = open_stack(path).describe()
        rows.append({"store": key, "path": path, "kind": d["kind"], "encoding": d["encoding"],
                     "images": d["images"], "stored_bytes": d["stored_bytes"],
                     "compression_ratio": d["compression_ratio"]})
    out = ctx.out / "stores.json"
    _write_json(out, rows)
    if not ctx.quiet:
        print(f"{'store':<28} {'kind':<7} {'encoding':<8} {'images':>6} {'on disk':>10} {'ratio':>7}")
        for r in rows:
            ratio = f"{r['compression_ratio']:.1f}x" if r["compression_ratio"] else "-"
            print(f"{r['store']:<28} {r['kind']:<7} {r['encoding']:<8} {r['images']:>6} "
                  f"{r['stored_bytes'] / 1024:>8.0f} K {ratio:>7}")
    ctx.results["info"] = rows
    return out


# ------------------------------------------------------------------------ ISLE pipeline steps
def _hard_sets(ctx: DemoContext) -> list[tuple[str, str]]:
    """``(name, store)`` of the hard (label-map) pseudo-label sets of the training split, in order."""
    return [(k.split("/", 2)[2], p) for k, p in ctx.stores.items() if k.startswith("train/pseudo/")]


def _soft_sets(ctx: DemoContext) -> list[tuple[str, str]]:
    """``(name, store)`` of the soft (CAM score) sets of the training split, in order."""
    return [(k.split("/", 2)[2], p) for k, p in ctx.stores.items() if k.startswith("train/cams/")]


def _candidate_sets(ctx: DemoContext) -> list[tuple[str, str]]:
    """The sets the ensemble chooses from: the hard sets, then every soft set (refined when refined)."""
    soft = [(name, ctx.stores.get(f"train/refined/{name}", path)) for name, path in _soft_sets(ctx)]
    return _hard_sets(ctx) + soft


def _r(x: Any, nd: int = 2) -> float | None:
    """A JSON-friendly rounded float (None for NaN)."""
    import math

    x = float(x)
    return None if math.isnan(x) else round(x, nd)


def step_threshold_sweep(ctx: DemoContext) -> Path | None:
    """Every background threshold of the CAM sets in one pass; each set's best threshold (thresholds.json)."""
    from isle_fast.ensemble.sweep import sweep_thresholds

    soft = _soft_sets(ctx)
    if not soft:
        ctx.results["threshold_sweep"] = "the data set has no soft sets"
        return None
    sw = sweep_thresholds([p for _, p in soft], ctx.stores["train/gt"], "0.05:0.80:0.05", progress=False)
    doc = sw.to_json()
    out = ctx.out / "thresholds.json"
    _write_json(out, doc)
    ctx.results["threshold_sweep"] = {name: {"best_threshold": d["best_threshold"],
                                             "best_miou": _r(d["best_miou"])}
                                      for name, d in doc["sets"].items()}
    if not ctx.quiet:
        for name, d in ctx.results["threshold_sweep"].items():
            print(f"{name:<12} best background threshold {d['best_threshold']:g} "
                  f"(train mIoU {d['best_miou']}) of {len(sw.thresholds)} in one pass")
    return out


def step_refine(ctx: DemoContext) -> Path | None:
    """ISLE step 1: refine the soft (CAM) sets against the RGB images; score each before and after."""
    from isle_fast.ensemble.evaluate import evaluate
    from isle_fast.refinement.chain import refine_stack, shutdown_pool

    chain = ctx.cache["chain"]
    soft = _soft_sets(ctx)
    if not soft:
        ctx.results["refine"] = "the data set has no soft sets; nothing to refine"
        return None
    if not chain:
        ctx.results["refine"] = {"chain": [], "note": "--refine none: the soft sets are used as they are"}
        if not ctx.quiet:
            print("--refine none: the soft sets go to the ensemble unrefined")
        return None
    affinity_note = None
    params: dict[str, Any] = {}
    if "affinity" in chain:
        params["affinity"] = dict(AFFINITY_QUICK if ctx.args.quick else AFFINITY_DEFAULT, seed=ctx.args.seed)
    else:
        affinity_note = ("AffinityNet skipped: training it from random weights costs minutes of CPU even at "
                         "demo size (about 60 s of walk alone for 48 images on one core); "
                         "add it with --refine affinity,crf")
        if not ctx.quiet:
            print(affinity_note)
    images = ctx.stores["train/images"]
    dest = ctx.out / "refined"
    dest.mkdir(exist_ok=True)
    made = []
    try:
        for name, path in soft:
            out = dest / f"{name}.zarr"
            refine_stack(path, images, out, chain=chain, params=params, name=f"{name}+{'+'.join(chain)}",
                         device=ctx.args.device, progress=False)
            ctx.stores[f"train/refined/{name}"] = str(out)
            made.append(str(out))
    finally:
        shutdown_pool()  # worker processes end here, so their CPU time is counted in this step
    ev = evaluate([p for _, p in soft] + made, ctx.stores["train/gt"], progress=False)
    m = len(soft)
    sets: dict[str, Any] = {}
    for i, (name, _) in enumerate(soft):
        before, after = float(ev.miou[i]), float(ev.miou[m + i])
        sets[name] = {"before": _r(before), "after": _r(after), "gain": _r(after - before),
                      "store": made[i], "refined_name": ev.set_names[m + i]}
        if not ctx.quiet:
            flag = "" if after > before else "   WARNING: refinement did not raise the mIoU"
            print(f"{name:<12} train mIoU {before:5.1f} -> {after:5.1f} after {'+'.join(chain)} "
                  f"({after - before:+.1f}){flag}")
    ctx.results["refine"] = {"chain": chain, "params": params, "sets": sets, "note": affinity_note}
    return dest


def step_evaluate(ctx: DemoContext) -> Path:
    """ISLE step 2: per-class IoU of every set (hard + refined soft) on the train split; evaluation.json."""
    from isle_fast.ensemble.evaluate import evaluate

    sets = _candidate_sets(ctx)
    ev = evaluate([p for _, p in sets], ctx.stores["train/gt"], progress=False)
    sel = ev.select()
    path = ctx.out / "evaluation.json"
    ev.write_json(path, sel)
    ctx.cache["evaluation"] = ev
    ctx.cache["selection"] = sel
    ctx.cache["sets"] = sets
    best = int(_nanargmax(ev.miou))
    ctx.results["evaluate"] = {
        "json": str(path),
        "miou": {n: _r(v) for n, v in zip(ev.set_names, ev.miou)},
        "selection": sel.mapping(),
        "classes_won": sel.counts(),
        "best_single_set": ev.set_names[best],
        "best_single_miou": _r(ev.miou[best]),
        "stores": {n: p for n, (_, p) in zip(ev.set_names, sets)},
    }
    if not ctx.quiet:
        print("per-class IoU (%) on the train split; * = the set chosen for that class")
        print(ev.table(sel))
        won = ", ".join(f"{n} {k}" for n, k in sel.counts().items())
        print(f"classes won: {won}")
    return path


def _nanargmax(x: Any) -> int:
    import numpy as np

    x = np.asarray(x, dtype=np.float64)
    return int(np.argmax(np.where(np.isnan(x), -np.inf, x)))


def step_merge(ctx: DemoContext) -> Path:
    """ISLE step 3: the class-wise ensemble (Algorithm 3), its gain, an ISLE-2 pair and every subset."""
    import numpy as np

    from isle_fast.ensemble.evaluate import evaluate
    from isle_fast.ensemble.merge import merge
    from isle_fast.ensemble.subsets import subset_analysis

    ev, sel, sets = ctx.cache["evaluation"], ctx.cache["selection"], ctx.cache["sets"]
    gt = ctx.stores["train/gt"]
    paths = [p for _, p in sets]
    names = list(ev.set_names)
    ens_path = ctx.out / "ensemble.zarr"
    merge(paths, gt, ens_path, evaluation=ev, name="isle", progress=False)
    ctx.stores["train/ensemble"] = str(ens_path)

    # ISLE-2 (the paper's ensemble of its two strongest contributors): the two sets winning the most classes
    won = sel.counts()
    pair = sorted(range(len(names)), key=lambda n: (-won.get(names[n], 0), n))[:2]
    pair_names = [names[n] for n in sorted(pair)]
    isle2_path = ctx.out / "ensemble_isle2.zarr"
    merge(paths, gt, isle2_path, evaluation=ev, subset=pair_names, name="isle2", progress=False)
    ctx.stores["train/ensemble_isle2"] = str(isle2_path)

    # the same ensemble with the image-level labels (WSSS's supervision): claims of absent classes dropped
    labels_path = str(ctx.dataset.paths["cls_labels"]) if ctx.dataset is not None else None
    il_path = ctx.out / "ensemble_image_labels.zarr"
    if labels_path:
        merge(paths, gt, il_path, evaluation=ev, name="isle+image-labels", image_labels=labels_path,
              progress=False)
        ctx.stores["train/ensemble_image_labels"] = str(il_path)
    ens_ev = evaluate([str(ens_path), str(isle2_path)] + ([str(il_path)] if labels_path else []), gt,
                      progress=False)
    ens_miou, isle2_miou = float(ens_ev.miou[0]), float(ens_ev.miou[1])
    il_miou = float(ens_ev.miou[2]) if labels_path else float("nan")
    best = _nanargmax(ev.miou)
    best_name, best_miou = names[best], float(ev.miou[best])
    gain = ens_miou - best_miou
    ctx.cache["best_single"] = (best_name, paths[best])

    # every subset's ensemble in one pass (no stores written)
    sa = subset_analysis(paths, gt, evaluation=ev, progress=False)
    sub_path = ctx.out / "subsets.json"
    _write_json(sub_path, sa.to_json())
    sub_names, sub_miou = sa.names(), sa.miou
    by_size = {}
    for k in range(1, len(names) + 1):
        row = sa.best(size=k)
        by_size[k] = {"subset": sub_names[row], "miou": _r(sub_miou[row])}
    full = int(np.nonzero(sa.members.all(axis=1))[0][0])
    agrees = bool(abs(float(sub_miou[full]) - ens_miou) < 1e-6)

    # classes where the ensemble beats every single set
    iou_sets, iou_ens = ev.iou, ens_ev.iou[0]
    beats = [ev.classes[c] for c in range(1, len(ev.classes))
             if not np.isnan(iou_ens[c]) and iou_ens[c] > np.nanmax(np.where(np.isnan(iou_sets[:, c]), -1,
                                                                             iou_sets[:, c]))]
    ctx.results["merge"] = {
        "ensemble": str(ens_path), "ensemble_miou": _r(ens_miou),
        "best_single_set": best_name, "best_single_miou": _r(best_miou), "ensemble_gain": _r(gain),
        "ensemble_iou": [_r(v) for v in iou_ens],
        "isle2": {"sets": pair_names, "store": str(isle2_path), "miou": _r(isle2_miou),
                  "gain": _r(isle2_miou - best_miou)},
        "image_labels": ({"store": str(il_path), "labels": labels_path, "miou": _r(il_miou, 4),
                          "gain_over_ensemble": _r(il_miou - ens_miou, 4)} if labels_path else None),
        "subsets": {"json": str(sub_path), "count": int(len(sub_names)), "best_by_size": by_size,
                    "all_sets_equals_ensemble_store": agrees},
        "classes_above_every_set": beats,
    }
    if not ctx.quiet:
        print(f"ensemble mIoU {ens_miou:.1f} vs best single set {best_name} {best_miou:.1f}: {gain:+.1f}")
        print(f"ISLE-2 ({' + '.join(pair_names)}, the two sets winning the most classes): "
              f"mIoU {isle2_miou:.1f} ({isle2_miou - best_miou:+.1f} over {best_name})")
        if labels_path:
            print(f"with the image-level labels (claims of absent classes dropped): mIoU {il_miou:.2f} "
                  f"({il_miou - ens_miou:+.2f} over the ensemble)")
        print(f"subset analysis ({len(sub_names)} subsets, one pass; best of each size):")
        for k, v in by_size.items():
            print(f"  {k} set{'s' if k > 1 else ' '}  {v['miou']:5.1f}  {v['subset']}")
        if not agrees:
            print(f"  WARNING: the subset pass scores all sets at {float(sub_miou[full]):.2f}, the ensemble "
                  f"store at {ens_miou:.2f}")
    _few_labels(ctx, paths, gt, best_miou, gain, labels_path)
    return ens_path


def _few_labels(ctx: DemoContext, paths: list[str], gt: str, best_miou: float, gain: float,
                labels_path: str | None, k: int = 12) -> None:
    """Issue 16: the ensemble selected from ``k`` labelled training images, and from none (estimated from
    the sets and the image-level labels); both scored on every training image beside the full-gt gain."""
    import numpy as np

    from isle_fast.ensemble.estimate import DEFAULT_ESTIMATOR
    from isle_fast.ensemble.evaluate import evaluate
    from isle_fast.ensemble.merge import merge
    from isle_fast.stores.stack import create_stack, open_stack

    full = open_stack(gt)
    pick = np.sort(np.random.default_rng(ctx.args.seed).choice(full.num_images, size=min(k, full.num_images),
                                                               replace=False))
    gt_k = ctx.out / f"gt_{len(pick)}_labelled.zarr"
    w = create_stack(str(gt_k), kind="gt", classes=full.classes, ids=[full.ids[i] for i in pick],
                     shapes=full.shapes[pick], chunks=(4, *full.padded_shape), padded_shape=full.padded_shape,
                     overwrite=True)
    for j, i in enumerate(pick):
        w.write_image(j, full.read_image(int(i)))
    w.commit()
    few = merge(paths, str(gt_k), ctx.out / "ensemble_few_labels.zarr", name=f"isle-{len(pick)}-labels",
                overwrite=True, progress=False, subset_selection="labelled")
    # the default with a gt of some images: the labelled images with every image's votes (with image labels
    # strata-semi for these few, strata-context from CONTEXT_MIN_IMAGES; the posterior without them)
    both = merge(paths, str(gt_k), ctx.out / "ensemble_few_labels_estimate.zarr",
                 name=f"isle-{len(pick)}-labels-estimate", image_labels=labels_path,
                 overwrite=True, progress=False)
    none = merge(paths, None, ctx.out / "ensemble_no_labels.zarr", name="isle-no-labels",
                 image_labels=labels_path, overwrite=True, progress=False)
    scored = evaluate([few.stack, both.stack, none.stack], gt, progress=False).miou
    res = {"labelled_images": int(len(pick)), "few_gain": _r(float(scored[0]) - best_miou),
           "few_estimate_gain": _r(float(scored[1]) - best_miou),
           "none_gain": _r(float(scored[2]) - best_miou), "full_gain": _r(gain), "estimator": DEFAULT_ESTIMATOR,
           "subset_selection": both.stack.provenance.get("subset_selection"),
           "image_labels": labels_path}
    ctx.results["merge"]["few_labels"] = res
    if not ctx.quiet:
        print(f"ensemble gain over the best single set: full gt {gain:+.1f}, {len(pick)} labelled images "
              f"{res['few_gain']:+.1f} alone, {res['few_estimate_gain']:+.1f} with every image's votes (the default, "
              f"{res['subset_selection']}), "
              f"no pixel labels ({DEFAULT_ESTIMATOR}{' + image labels' if labels_path else ''}) "
              f"{res['none_gain']:+.1f}")


def step_report(ctx: DemoContext) -> Path:
    """The paper's tables (Markdown / JSON) and figures (PNG) for the sets and the ensemble."""
    from isle_fast.ensemble.report import report

    paths = [p for _, p in ctx.cache["sets"]]
    out = ctx.out / "report"
    info = report(paths, ctx.stores["train/gt"], out, ensemble=ctx.stores["train/ensemble"],
                  images=ctx.stores["train/images"], progress=False)
    files = sorted(str(f) for f in info.get("files", [])) if isinstance(info, dict) else []
    ctx.results["report"] = {"path": str(out), "files": files}
    if not ctx.quiet:
        print(f"report: {', '.join(Path(f).name for f in files) or '(see folder)'}")
    return out


def _affinity_params(ctx: DemoContext) -> list[str]:
    """The refine step's AffinityNet settings as ``--param`` strings."""
    import json

    settings = dict(AFFINITY_QUICK if ctx.args.quick else AFFINITY_DEFAULT, seed=ctx.args.seed)
    return [f"affinity.{k}={json.dumps(v)}" for k, v in settings.items()]


def step_run(ctx: DemoContext) -> Path:
    """The same job as one command (``isle run``): file tree to ensemble PNGs, then a cached re-run."""
    import numpy as np

    from isle_fast.job import JobSpec, run_job
    from isle_fast.stores.stack import open_stack

    ds = ctx.dataset
    chain = ctx.cache["chain"]
    spec = JobSpec(gt=Path(ds.paths["gt"]), ids=Path(ds.paths["train_list"]),
                   images=Path(ds.paths["images"]),
                   sets={n: Path(f) for n, f in ds.paths["pseudo"].items()},
                   cams={n: Path(f) for n, f in ds.paths["cams"].items()}, refine=list(chain),
                   params=_affinity_params(ctx) if "affinity" in chain else [], allow_pickle=True,
                   out=ctx.out / "run", quiet=True)
    first = run_job(spec)
    second = run_job(JobSpec(**{**spec.__dict__, "report": False}))
    same = bool(np.array_equal(open_stack(ctx.out / "run" / "ensemble.zarr").array[:],
                               open_stack(ctx.stores["train/ensemble"]).array[:]))
    ctx.results["run"] = {"out": str(ctx.out / "run"), "seconds": first.seconds,
                          "rerun_seconds": second.seconds,
                          "stores_reused_on_rerun": second.reused, "ensemble_miou": first.ensemble_miou,
                          "identical_to_the_steps": same}
    if not ctx.quiet:
        print(f"isle run {ds.root} --ids {Path(ds.paths['train_list']).name} --images ... "
              f"--refine {','.join(chain) or 'none'}: {first.seconds['total']:.1f} s, ensemble mIoU "
              f"{first.ensemble_miou:.1f}, the same ensemble as the steps above: "
              f"{'yes' if same else 'NO'}; "
              f"re-run {second.seconds['total']:.1f} s ({len(second.reused)} stores reused, "
              f"{len(second.made)} made)")
    if not same:
        raise RuntimeError("isle run made another ensemble than the separate steps")
    return ctx.out / "run"


def _train_config(ctx: DemoContext) -> dict[str, Any]:
    """The training step's ``train()`` settings: :data:`TRAIN_DEFAULT` (or TRAIN_QUICK), ``--train-steps``."""
    cfg = dict(TRAIN_QUICK if ctx.args.quick else TRAIN_DEFAULT)
    if ctx.args.train_steps is not None:
        cfg["steps"] = ctx.args.train_steps
    return cfg


def _train_and_predict(ctx: DemoContext, cfg: dict[str, Any], seed: int, run_key: str, labels: str,
                       run_dir: Path) -> tuple[dict[str, Any], str]:
    """One DeepLabV3+ trained on ``labels`` and its final checkpoint's val prediction: (record, prediction)."""
    from isle_fast.training.predict import predict
    from isle_fast.training.train import train

    if not ctx.quiet:
        print(f"training DeepLabV3+ ({cfg['backbone']}, random init, {cfg['optimizer'].upper()} "
              f"lr {cfg['lr']}, {cfg['steps']} steps of {cfg['batch_size']} crops of {cfg['crop']} px) "
              f"on {run_key}", flush=True)
    res = train(ctx.stores["train/images"], labels, run_dir, val_images=ctx.stores["val/images"],
                val_gt=ctx.stores["val/gt"], weights="none", seed=seed, num_workers=0, val_every=0,
                ckpt_every=0, log_every=10,
                device=ctx.args.device, quiet=ctx.quiet, **cfg)
    pred = predict(run_dir, ctx.stores["val/images"], run_dir / "val_pred.zarr", which="final",
                   device=ctx.args.device, threads=cfg["threads"], quiet=True, name=f"deeplab[{run_key}]")
    # the demo never resumes: drop the resume state (model + optimiser moments, ~3x the weights) and
    # best.pt (validation ran only at the last step, so it equals final.pt); final.pt stays
    for name in ("last.pt", "best.pt"):
        (run_dir / name).unlink(missing_ok=True)
    record = {"labels": labels, "seed": seed, "run": str(run_dir), "final_loss": _r(res.final_loss, 4),
              "trainer_val_miou": _r(res.final_miou), "background_miou": _r(res.background_miou),
              "val_pred": pred.path,
              "seconds": _r(res.seconds, 1)}
    return record, pred.path


def _val_comparison(ctx: DemoContext, preds: list[str], n_seeds: int) -> tuple[Any, Any, float, float]:
    """The val mIoU of every model and the interval of the difference: ``(per model, per seed, lo, hi)``.

    ``preds`` are in the order (seed 0: ensemble, single), (seed 1: ensemble, single), ...; the 95 %
    bootstrap interval of (ensemble - single) is computed here once.
    """
    import numpy as np

    from isle_fast import metrics
    from isle_fast.ensemble.evaluate import evaluate

    ev = evaluate(preds, ctx.stores["val/gt"], average="image", progress=False)
    per_run = metrics.miou(ev.dataset_iou)  # dataset-level IoU, as everywhere else in the demo
    per_seed = np.asarray(per_run, dtype=np.float64).reshape(n_seeds, 2)
    # the interval resamples val images; with several seeds each image's intersections and unions are
    # summed over the seeds (the pooled IoU), so it still covers only the choice of images
    assert ev.image_stats is not None, "average='image' keeps the per-image statistics"
    stats = np.asarray(ev.image_stats).reshape((len(ev.image_stats), n_seeds, 2) + ev.image_stats.shape[2:])
    lo, hi = metrics.bootstrap_miou_diff(stats.sum(axis=1), 2000, ctx.args.seed)
    return per_run, per_seed, lo, hi


def _train_verdict(val_miou: Any, per_seed: Any, lo: float, hi: float, bg: float | None,
                   best_name: str) -> str:
    """What the val comparison says, in words (noise, no conclusion, or which model is better)."""
    n_seeds = len(per_seed)
    diff = float(val_miou[0] - val_miou[1])
    if bg is not None and max(float(val_miou[0]), float(val_miou[1])) <= bg:
        verdict = (f"no conclusion: neither model beats predicting background everywhere ({bg:.1f}); far "
                   "too little training to compare them (raise --train-steps)")
    elif lo <= 0.0 <= hi:
        verdict = ("within noise: the 95% bootstrap interval over the val images contains 0 (and "
                   + ("one training seed" if n_seeds == 1 else f"{n_seeds} training seeds")
                   + " on a tiny CPU budget add noise the interval does not cover)")
    else:
        better = "ensemble" if diff > 0 else best_name
        verdict = (f"the {better}-trained model is better on these val images (bootstrap interval excludes 0; "
                   + ("one training seed, so seed-to-seed noise is not covered)" if n_seeds == 1 else
                      f"mean of {n_seeds} seeds; the seeds' own spread is not in the interval)"))
    if n_seeds > 1:
        wins = int((per_seed[:, 0] > per_seed[:, 1]).sum())
        verdict += ("; per seed: " + ", ".join(f"{a:.1f} vs {b:.1f}" for a, b in per_seed)
                    + f" (ensemble ahead in {wins} of {n_seeds})")
    return verdict


def step_train(ctx: DemoContext) -> Path | None:
    """ISLE step 4: DeepLabV3+ trained on the ensemble and on the best single set, scored on val."""
    if ctx.args.skip_train:
        ctx.results["train"] = "skipped (--skip-train)"
        return None
    if "val/images" not in ctx.stores:
        ctx.results["train"] = "skipped: the data set has no val split"
        return None
    cfg = _train_config(ctx)
    best_name, best_path = ctx.cache["best_single"]
    labels = {"ensemble": ctx.stores["train/ensemble"], best_name: best_path}
    dest = ctx.out / "train"
    runs: dict[str, Any] = {}
    preds = []
    seeds = [ctx.args.seed + k for k in range(getattr(ctx.args, "train_seeds", 1))]
    jobs = [(seed, key, lab) for seed in seeds for key, lab in labels.items()]
    for seed, key, lab in jobs:
        run_key = key if len(seeds) == 1 else f"{key} seed {seed}"
        run_dir = dest / (key.replace("+", "_").replace("/", "_") + ("" if len(seeds) == 1 else f"-seed{seed}"))
        runs[run_key], pred = _train_and_predict(ctx, cfg, seed, run_key, lab, run_dir)
        preds.append(pred)
    per_run, per_seed, lo, hi = _val_comparison(ctx, preds, len(seeds))
    val_miou = per_seed.mean(axis=0)
    for i, (seed, key, _lab) in enumerate(jobs):
        runs[key if len(seeds) == 1 else f"{key} seed {seed}"]["val_miou"] = _r(per_run[i])
    n_val = len(ctx.dataset.val_ids) if ctx.dataset is not None else None
    bg = next((r["background_miou"] for r in runs.values() if r.get("background_miou") is not None), None)
    verdict = _train_verdict(val_miou, per_seed, lo, hi, bg, best_name)
    res = ctx.results["train"] = {
        "config": {**cfg, "weights": "none"},
        "runs": runs, "val_images": n_val,
        "val_miou_ensemble": _r(val_miou[0]), "val_miou_single": _r(val_miou[1]), "single_set": best_name,
        "val_gain": _r(float(val_miou[0] - val_miou[1])), "val_gain_95ci": [_r(lo), _r(hi)], "verdict": verdict,
        "seeds": seeds, "val_miou_per_seed": [[_r(a), _r(b)] for a, b in per_seed],
    }
    if not ctx.quiet:
        # the figures as stored (and as the closing headline prints them), so the two lines agree
        (ci_lo, ci_hi), gain = res["val_gain_95ci"], res["val_gain"]
        print(f"val mIoU ({n_val} images{'' if len(seeds) == 1 else f', mean of {len(seeds)} seeds'}): "
              f"trained on the ensemble {res['val_miou_ensemble']:.1f}, on {best_name} "
              f"{res['val_miou_single']:.1f}: {gain:+.1f} (95% CI {ci_lo:+.1f} .. {ci_hi:+.1f}); {verdict}")
    return dest


#: The demo's steps, in order: (name, function). Later pipeline steps are appended here.
STEPS: list[tuple[str, Callable[[DemoContext], Any]]] = [
    ("data", step_data),
    ("ingest", step_ingest),
    ("info", step_info),
    ("threshold_sweep", step_threshold_sweep),
    ("refine", step_refine),
    ("evaluate", step_evaluate),
    ("merge", step_merge),
    ("report", step_report),
    ("run", step_run),
    ("train", step_train),
]


# --------------------------------------------------------------------------------- driver
def _write_json(path: Path, obj: Any) -> None:
    from isle_fast.outputs import write_json

    write_json(path, obj, indent=1, default=str)


def _prepare(out: Path, overwrite: bool) -> None:
    from isle_fast.outputs import check_replaceable_folder, refuse_unsafe, write_marker

    refuse_unsafe(out)   # never /, home, the working directory or a folder above it
    if check_replaceable_folder(
            out, overwrite=overwrite, ours=lambda p: (p / MARKER).is_file(), name=f"{param('out')} {out}",
            choose=f"choose another folder or pass {param('overwrite')} to replace an earlier demo there",
            not_ours=f"was not made by isle demo (no {MARKER}); refusing to delete it even with "
                     f"{param('overwrite')}"):
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by isle demo; --overwrite may replace this folder\n")
    write_marker(out, "isle demo")  # any isle command's --overwrite may replace it, as any output folder


def _cpu_seconds() -> float:
    """User CPU seconds of this process and of the child processes it has waited for."""
    import resource

    return (resource.getrusage(resource.RUSAGE_SELF).ru_utime
            + resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime)


def _parse_refine(text: str) -> list[str]:
    """``--refine`` as a list of registered refinement names (empty for ``none``)."""
    from isle_fast.refinement.chain import get_refinement, parse_chain

    if text.strip().lower() in ("", "none"):
        return []
    chain = parse_chain(text)
    for name in chain:
        get_refinement(name)  # InputError naming the refinement when it is unknown
    return chain


def headline(results: dict[str, Any]) -> dict[str, Any]:
    """The figures the demo is about, from the steps' results (missing ones are None)."""
    refine = results.get("refine")
    merge = results.get("merge") or {}
    train = results.get("train")
    out: dict[str, Any] = {
        "refine_gain": ({n: v["gain"] for n, v in refine["sets"].items()}
                        if isinstance(refine, dict) and "sets" in refine else None),
        "ensemble_miou": merge.get("ensemble_miou"),
        "best_single_set": merge.get("best_single_set"),
        "best_single_miou": merge.get("best_single_miou"),
        "ensemble_gain": merge.get("ensemble_gain"),
        "isle2_miou": (merge.get("isle2") or {}).get("miou"),
    }
    if isinstance(train, dict):
        out.update({"val_miou_ensemble": train["val_miou_ensemble"], "val_miou_single": train["val_miou_single"],
                    "val_single_set": train["single_set"], "val_gain": train["val_gain"],
                    "val_gain_95ci": train["val_gain_95ci"], "val_verdict": train["verdict"]})
    else:
        out.update({"val_miou_ensemble": None, "val_miou_single": None, "val_note": train})
    return out


def check_arguments(args: argparse.Namespace) -> tuple[int, list[str]]:
    """Check the demo's arguments before any work: ``(number of images, refinement chain)``.

    Raises
    ------
    InputError
        Naming the argument that is out of range, or the unknown refinement.
    """
    n = args.images if args.images is not None else (16 if args.quick else 64)
    if n < 2:
        raise InputError(f"{param('images')} must be at least 2 (train and val), got {n}")
    if args.train_steps is not None and args.train_steps < 1:
        raise InputError(f"{param('train_steps')} must be at least 1, got {args.train_steps}")
    if args.train_seeds < 1:
        raise InputError(f"{param('train_seeds')} must be at least 1, got {args.train_seeds}")
    return n, _parse_refine(args.refine)


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    """Run every step of :data:`STEPS` in a fresh output folder; the summary they leave.

    Parameters
    ----------
    args : argparse.Namespace
        The options of ``isle demo`` (its command-line names: ``out``, ``images``, ``seed``,
        ``quick``, ``refine``, ``skip_train``, ``train_steps``, ``train_seeds``, ``device``,
        ``overwrite``, ``quiet``).

    Returns
    -------
    dict
        What ``demo_summary.json`` holds: ``steps`` (step, seconds, user CPU seconds, output),
        ``headline`` (:func:`headline`), ``results`` (every step's) and the totals.

    Raises
    ------
    InputError
        For arguments out of range, an unknown refinement or an output folder it may not use,
        before any work.
    """
    from isle_fast.progress import Timer

    n, chain = check_arguments(args)
    out = Path(args.out)
    _prepare(out, args.overwrite)
    ctx = DemoContext(out=out, args=args, n_images=n, size_range=(64, 96) if args.quick else (120, 200),
                      quiet=args.quiet)
    ctx.cache["chain"] = chain
    table: list[dict[str, Any]] = []
    total, cpu0 = Timer(), _cpu_seconds()

    def summary_doc(final: bool) -> dict[str, Any]:
        doc: dict[str, Any] = {"steps": table, "headline": headline(ctx.results), "results": ctx.results}
        if final:
            doc["total_seconds"] = round(total.seconds, 3)
            doc["total_user_cpu_seconds"] = round(_cpu_seconds() - cpu0, 3)
        return doc

    for name, fn in STEPS:
        t, c = Timer(), _cpu_seconds()
        if not ctx.quiet:
            print(f"== {name}: {(fn.__doc__ or '').strip().splitlines()[0]}", flush=True)
        result = fn(ctx)
        table.append({"step": name, "seconds": round(t.seconds, 3), "user_cpu_seconds": round(_cpu_seconds() - c, 3),
                      "output": str(result) if result is not None else "-"})
        _write_json(out / "demo_summary.json", summary_doc(False))
    doc = summary_doc(True)
    _write_json(out / "demo_summary.json", doc)
    return doc
