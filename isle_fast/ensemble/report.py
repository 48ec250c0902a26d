"""The paper's tables and figures for any data, and VOC-palette PNG export.

:func:`report` writes into one folder (built in a temporary sibling and
renamed into place when complete):

``tables.md`` / ``report.json``
    * per-class IoU of every set and of the ensemble (the paper's Tables 3-4),
    * the best-set matrix (Table 1: a check mark where a set is chosen for a class),
    * ensemble vs components (Table 2 without training): mIoU, classes won,
      mean margin over the runner-up in the classes won, gain of the ensemble,
    * the subset table: mIoU of the ensemble of every subset of the sets (N <= 8).
``per_class_iou.png``
    grouped bar chart of the per-class IoU (sets and ensemble).
``iou_table.png``
    the per-class IoU table as a heat map.
``subsets.png``
    mIoU of every subset's ensemble (N <= 8).
``samples.png`` (with an images store)
    a few images side by side: image, every set, the ensemble, the ground
    truth (the paper's Fig. 3). The images with the most foreground classes
    in their gt are shown (ties: first in the store).

The ensemble row is the ``--ensemble`` store when given, otherwise the
ensemble of all sets computed by the subset pass (no store is written).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from isle_fast.errors import InputError
from isle_fast.ensemble.evaluate import (
    Evaluation,
    check_bg_threshold,
    evaluate,
    open_inputs,
    unique_names,
)
from isle_fast.ensemble.selection import select
from isle_fast.metrics import jsonable
from isle_fast.outputs import FolderOutput

__all__ = ["report", "export_pngs", "palette"]

#: Store kinds ``report(ensemble=...)`` accepts: ours, or one made elsewhere and ingested as a set.
ENSEMBLE_KINDS = ("ensemble", "pseudo")


# -- helpers ------------------------------------------------------------------------------

def palette() -> np.ndarray:
    """The VOC colour map, ``(256, 3)`` uint8 (255 = (224, 224, 192)); one definition, in datasets."""
    from isle_fast.synthetic.datasets import voc_palette

    return np.asarray(voc_palette(), dtype=np.uint8)


def _safe_relpath(image_id: str) -> Path:
    p = Path(image_id)
    if p.is_absolute() or any(part in ("..", "") for part in p.parts) or not p.parts:
        raise InputError(f"image id {image_id!r} cannot be used as a file name")
    return p


# -- export -------------------------------------------------------------------------------

def export_pngs(store: Any, out: str | os.PathLike, *, overwrite: bool = False, backend: str = "auto",
                progress: bool = True, compress: str | int = "rle", workers: int | None = None) -> dict:
    """Write every image of a label store as a VOC palette PNG ``OUT/<id>.png`` (unpadded).

    Score stores are decoded (argmax) first. The folder is written to a
    temporary sibling and renamed into place when every PNG is there. The
    PNGs are encoded by worker processes, one task per stored chunk
    (:func:`isle_fast.stores.export.write_pngs`).

    Parameters
    ----------
    store : path, URL or Stack
        An ensemble (or any labels / scores) store.
    out : path
        Output folder; must not exist unless ``overwrite``.
    overwrite : bool
    backend : {'auto', 'cpu', 'gpu'}
        For decoding score stores: ``gpu`` decodes with the GPU kernel in
        this process; otherwise the workers decode (NumPy's argmax, the same
        labels as the CPU kernel).
    progress : bool
    compress : {'rle', 0..9}
        PNG compression: zlib's run-length strategy (default; measured in
        :mod:`isle_fast.stores.export`) or a zlib level.
    workers : int, optional
        Worker processes (default: one per core).

    Returns
    -------
    dict
        ``images``, ``path``, ``seconds``, ``bytes`` (of the PNGs), ``compress``.
    """
    from isle_fast.stores.export import png_options, write_pngs
    from isle_fast.stores.stack import Stack, open_stack

    t0 = time.perf_counter()
    png_options(compress)  # a bad choice fails before anything is made
    stack = store if isinstance(store, Stack) else open_stack(store)
    if stack.encoding not in ("labels", "scores"):
        raise InputError(f"{stack.path} holds {stack.encoding!r}; export writes label maps")
    rel = [_safe_relpath(i) for i in stack.ids]
    decode = None
    if stack.encoding == "scores" and backend != "cpu":
        from isle_fast.backend import get_kernels, resolve_backend

        if resolve_backend(backend) == "gpu":
            K = get_kernels("gpu")
            decode = lambda block: K.decode_scores(block, -1.0)  # noqa: E731
    folder = FolderOutput(out, command="isle export", overwrite=overwrite, inputs=[stack])
    work = folder.work
    try:
        res = write_pngs(stack, work, [str(r.with_name(r.name + ".png")) for r in rel], compress=compress,
                         workers=workers, progress=progress, decode=decode)
        final = folder.commit()
    except BaseException:
        folder.abort()
        raise
    return {"images": stack.num_images, "path": str(final), "seconds": time.perf_counter() - t0,
            "bytes": res["bytes"], "compress": res["compress"]}


# -- tables -------------------------------------------------------------------------------

def _fmt(v: Any, digits: int = 1) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "-"
    return f"{v:.{digits}f}"


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def _component_summary(ev: Evaluation, sel: Any) -> list[dict]:
    """Per set: mIoU, classes won, mean margin over the runner-up in the classes won (Table 2 / Sec. 4)."""
    iou = ev.iou
    n, c = iou.shape
    out = []
    for k in range(n):
        won = [j for j in range(1, c) if int(sel.best[j]) == k]
        margins = []
        for j in won:
            others = [iou[m, j] for m in range(n) if m != k and not np.isnan(iou[m, j])]
            if others and not np.isnan(iou[k, j]):
                margins.append(float(iou[k, j] - max(others)))
        out.append({"set": ev.set_names[k], "miou": jsonable(ev.miou[k]),
                    "classes_won": [ev.classes[j] for j in won],
                    "mean_margin": float(np.mean(margins)) if margins else None})
    return out


def _ens_label(name: str) -> str:
    return name if "ensemble" in name.lower() else f"{name} (ensemble)"


def _pick_images(presence: np.ndarray, k: int) -> list[int]:
    counts = presence[:, 1:].sum(axis=1)
    order = sorted(range(len(counts)), key=lambda i: (-int(counts[i]), i))
    return sorted(order[:k])


# -- figures ------------------------------------------------------------------------------

def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _bar_chart(path: Path, classes: list[str], names: list[str], iou: np.ndarray) -> None:
    plt = _plt()
    c = len(classes)
    n = len(names)
    width = 0.8 / max(n, 1)
    fig, ax = plt.subplots(figsize=(max(8, 0.6 * c * max(1, n / 3)), 4.5), layout="constrained")
    x = np.arange(c)
    cmap = plt.get_cmap("tab10")
    for k in range(n):
        ax.bar(x - 0.4 + width * (k + 0.5), np.nan_to_num(iou[k], nan=0.0), width, label=names[k],
               color=cmap(k % 10), edgecolor="black" if k == n - 1 else None, linewidth=0.5)
    ax.set_xticks(x)
    ax.set_xticklabels(classes, rotation=60, ha="right")
    ax.set_ylabel("IoU (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Per-class IoU")
    ax.legend(fontsize=8, ncol=min(n, 4))
    fig.savefig(path, dpi=110, bbox_inches="tight")  # long class / set names widen the canvas
    plt.close(fig)


def _heat_table(path: Path, classes: list[str], names: list[str], iou: np.ndarray, miou: np.ndarray) -> None:
    plt = _plt()
    data = np.concatenate([iou, miou[:, None]], axis=1)
    cols = list(classes) + ["mIoU"]
    fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(cols) + 2), 0.45 * len(names) + 1.8), layout="constrained")
    ax.imshow(np.nan_to_num(data, nan=0.0), cmap="viridis", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels(cols, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=8)
    col_max = np.where(np.isnan(data), -np.inf, data).max(axis=0)
    for r in range(data.shape[0]):
        for j in range(data.shape[1]):
            v = data[r, j]
            ax.text(j, r, _fmt(v), ha="center", va="center", fontsize=7,
                    color="white" if (np.isnan(v) or v < 55) else "black",
                    fontweight="bold" if (not np.isnan(v) and v == col_max[j]) else "normal")
    ax.set_title("Per-class IoU (%)")
    fig.savefig(path, dpi=110, bbox_inches="tight")  # long class / set names widen the canvas
    plt.close(fig)


def _subset_chart(path: Path, names: list[str], miou: np.ndarray, sizes: np.ndarray) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(names) + 2), 4), layout="constrained")
    cmap = plt.get_cmap("viridis")
    top = max(int(sizes.max()), 1)
    ax.bar(range(len(names)), np.nan_to_num(miou, nan=0.0), color=[cmap(s / (top + 0.5)) for s in sizes])
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=70, ha="right", fontsize=7)
    ax.set_ylabel("ensemble mIoU (%)")
    finite = miou[~np.isnan(miou)]
    if finite.size:
        lo = max(0.0, float(finite.min()) - 5)
        ax.set_ylim(lo, min(100.0, float(finite.max()) + 3))
    ax.set_title("Ensemble of every subset of the sets")
    fig.savefig(path, dpi=110, bbox_inches="tight")  # long class / set names widen the canvas
    plt.close(fig)


def _samples_figure(path: Path, images: list[np.ndarray], columns: list[tuple[str, list[np.ndarray]]],
                    ids: list[str]) -> None:
    plt = _plt()
    pal = palette()
    rows = len(images)
    cols = 1 + len(columns)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.0 * rows + 0.4), squeeze=False,
                             layout="constrained")
    for r in range(rows):
        axes[r, 0].imshow(images[r])
        axes[r, 0].set_ylabel(ids[r], fontsize=7)
        for k, (title, masks) in enumerate(columns):
            axes[r, k + 1].imshow(pal[masks[r]])
        for k in range(cols):
            axes[r, k].set_xticks([])
            axes[r, k].set_yticks([])
    for k, title in enumerate(["image"] + [t for t, _ in columns]):
        axes[0, k].set_title(title, fontsize=8)
    fig.savefig(path, dpi=110, bbox_inches="tight")  # long class / set names widen the canvas
    plt.close(fig)


# -- the report ---------------------------------------------------------------------------

def report(sets: Sequence[Any], gt: Any, out: str | os.PathLike, *, ensemble: Any = None,
           images: Any = None, policy: str = "score", average: str = "dataset", backend: str = "auto",
           bg_threshold: float | None = None, num_images: int = 3, overwrite: bool = False,
           progress: bool = True, evaluation: Evaluation | None = None) -> dict:
    """Write the paper's tables (Markdown + JSON) and figures (PNG) for ``sets`` against ``gt``.

    Parameters
    ----------
    sets : sequence of path, URL or Stack
        The pseudo-label sets.
    gt : path, URL or Stack
        Ground truth.
    out : path
        Output folder (must not exist unless ``overwrite``).
    ensemble : path, URL or Stack, optional
        An ensemble store to report (kind ``ensemble``, or ``pseudo`` for one
        made elsewhere; a ``gt`` or ``images`` store is an InputError); otherwise
        the ensemble of all sets is scored by the subset pass (needs N <= 8).
    images : path, URL or Stack, optional
        An ``images`` store aligned with the sets; enables ``samples.png``.
    policy : {'score', 'order', 'ignore'}
        Merge policy for the computed ensembles (subset table, figure).
    average : {'dataset', 'image'}
        IoU averaging of the per-set table and the selection.
    backend : {'auto', 'cpu', 'gpu'}
    bg_threshold : float, optional
    num_images : int
        Images in ``samples.png``.
    overwrite, progress : bool
    evaluation : Evaluation, optional
        A finished evaluation of ``sets`` (then of ``ensemble``, last, when
        given) against ``gt`` with this ``average`` and ``bg_threshold``:
        skips that pass (``isle run`` has it already).

    Returns
    -------
    dict
        ``path``, ``files``, ``seconds``, the ensemble mIoU and the best component.
    """
    from isle_fast.backend import resolve_backend
    from isle_fast.ensemble.merge import gt_presence, merge_images
    from isle_fast.stores.stack import Stack, check_aligned, kind_phrase, open_stack
    from isle_fast.ensemble.subsets import MAX_SETS, subset_analysis

    t0 = time.perf_counter()
    bg_threshold = check_bg_threshold(bg_threshold)
    be = resolve_backend(backend)
    stacks, gt_stack = open_inputs(sets, gt)
    ens_stack = None
    if ensemble is not None:
        ens_stack = ensemble if isinstance(ensemble, Stack) else open_stack(ensemble)
        if ens_stack.kind not in ENSEMBLE_KINDS:
            kinds = " or ".join(repr(k) for k in ENSEMBLE_KINDS)
            raise InputError(f"--ensemble {ens_stack.path} is {kind_phrase(ens_stack.kind)}; an ensemble is "
                             f"an {kinds} store (an ensemble made elsewhere may be ingested as a "
                             "pseudo-label set)")
    img_stack = None
    from isle_fast.ensemble.partial import gt_positions

    partial_gt = gt_positions(gt_stack, stacks) is not None  # the gt labels some of the images
    if images is not None:
        img_stack = images if isinstance(images, Stack) else open_stack(images, kind="images")
        check_aligned([stacks[0] if partial_gt else gt_stack, img_stack], same_classes=False)
    n = len(stacks)
    folder = FolderOutput(out, command="isle report", overwrite=overwrite,
                          inputs=[*stacks, gt_stack, ens_stack, img_stack])
    work = folder.work
    try:
        everything = stacks + ([ens_stack] if ens_stack is not None else [])
        if evaluation is not None:
            if len(evaluation.set_names) != len(everything) or evaluation.average != average:
                raise InputError(f"the evaluation given covers {len(evaluation.set_names)} sets "
                                 f"({evaluation.average} average); the report needs {len(everything)} "
                                 f"({average})")
            ev_all = evaluation
        else:
            ev_all = evaluate(everything, gt_stack, average=average, backend=be, bg_threshold=bg_threshold,
                              progress=progress, per_image=True)
        ev = ev_all.take(range(n))
        sel = select(ev)
        unc = choice_uncertainty_or_none(ev, sel)
        sa = None
        if n <= MAX_SETS and not partial_gt:
            sa = subset_analysis(stacks, gt_stack, evaluation=ev, policy=policy, backend=be,
                                 bg_threshold=bg_threshold, progress=progress)
        names = unique_names(stacks)
        if ens_stack is not None:
            ens_name = ev_all.set_names[n]
            ens_iou, ens_miou = ev_all.iou[n], float(ev_all.miou[n])
            ens_source = ens_stack.path
        elif sa is not None:
            ens_name = "ensemble" if ev.average == "dataset" else "ensemble (dataset-level IoU)"
            ens_iou, ens_miou = sa.iou[-1], float(sa.miou[-1])
            ens_source = f"computed ({policy} policy, all sets)"
        else:
            ens_name, ens_iou, ens_miou, ens_source = None, None, None, None
        classes = ev.classes
        iou, miou = ev.iou, ev.miou

        # -- Markdown ---------------------------------------------------------------------
        md = ["# ISLE report\n", f"Ground truth: `{gt_stack.path}` ({gt_stack.num_images} images, "
              f"{len(classes)} classes). IoU in percent, {ev.average}-level average. "
              f"Ensemble: {ens_source or 'none'}.\n"]
        header = ["method"] + classes + ["mIoU"]
        rows = []
        best_col = np.where(np.isnan(iou), -np.inf, iou).max(axis=0) if n else None
        for k in range(n):
            cells = [names[k]]
            for j in range(len(classes)):
                s = _fmt(iou[k, j])
                cells.append(f"**{s}**" if n > 1 and not np.isnan(iou[k, j]) and iou[k, j] == best_col[j] else s)
            cells.append(_fmt(miou[k]))
            rows.append(cells)
        if ens_name is not None:
            rows.append([_ens_label(ens_name)] + [_fmt(v) for v in ens_iou] + [_fmt(ens_miou)])
        md += ["## Per-class IoU (Tables 3-4)\n", _md_table(header, rows), ""]

        fg = list(range(1, len(classes)))
        absent = [classes[j] for j in fg if ev.gt_pixels[j] == 0]
        rows = [[names[k]] + ["✓" if int(sel.best[j]) == k else "" for j in fg]
                + [str(sum(int(sel.best[j]) == k for j in fg))] for k in range(n)]
        md += ["## Best set per class (Table 1)\n", _md_table(["method"] + [classes[j] for j in fg]
                                                             + ["classes"], rows),
               f"\nBackground slice (score sets): {names[int(sel.best[0])]}."
               + ("" if not absent else
                  f" Classes without ground-truth pixels ({', '.join(absent)}) cannot be scored and go to "
                  f"the first set, {names[sel.member_indices[0]]}.")
               + "\n"]

        comp = _component_summary(ev, sel)
        best_k = int(np.argmax(np.where(np.isnan(miou), -np.inf, miou))) if n else 0
        rows = [[c["set"], _fmt(c["miou"]), str(len(c["classes_won"])), _fmt(c["mean_margin"], 2)]
                for c in comp]
        if ens_name is not None:
            rows.append([_ens_label(ens_name), _fmt(ens_miou), "-",
                         f"{ens_miou - float(miou[best_k]):+.2f} vs {names[best_k]}"])
        md += ["## Ensemble vs components (Table 2, pseudo-labels, no training)\n",
               _md_table(["method", "mIoU", "classes won", "mean margin in won classes"], rows), ""]

        if sa is not None:
            smiou = sa.miou
            rows = []
            for s, sname in enumerate(sa.names()):
                mem = np.nonzero(sa.members[s])[0]
                best_member = max((float(miou[m]) for m in mem if not np.isnan(miou[m])), default=float("nan"))
                rows.append([sname, str(len(mem)), _fmt(smiou[s], 2), _fmt(smiou[s] - best_member, 2)])
            note = ("" if ev.average == "dataset" else
                    "\nSubset ensembles are scored with dataset-level IoU; the gain compares with the "
                    "members' image-averaged mIoU above.\n")
            md += ["## Ensemble of every subset\n",
                   _md_table(["subset", "sets", "mIoU", "gain over best member"], rows), note]
        if unc is not None:
            md += uncertainty_markdown(unc, names)
        (work / "tables.md").write_text("\n".join(md) + "\n", encoding="utf-8")

        # -- JSON -------------------------------------------------------------------------
        doc = ev.to_json(sel)
        doc["components"] = comp
        doc["ensemble"] = (None if ens_name is None else
                           {"name": ens_name, "source": ens_source, "iou": jsonable(ens_iou),
                            "miou": jsonable(ens_miou)})
        doc["subsets"] = sa.to_json() if sa is not None else None
        doc["uncertainty"] = unc.to_json() if unc is not None else None
        (work / "report.json").write_text(json.dumps(doc, indent=2), encoding="utf-8")

        # -- figures ----------------------------------------------------------------------
        bar_names = names + ([ens_name] if ens_name is not None else [])
        bar_iou = np.concatenate([iou, ens_iou[None]], axis=0) if ens_name is not None else iou
        bar_miou = np.concatenate([miou, [ens_miou]]) if ens_name is not None else miou
        _bar_chart(work / "per_class_iou.png", classes, bar_names, bar_iou)
        _heat_table(work / "iou_table.png", classes, bar_names, bar_iou, np.asarray(bar_miou, dtype=float))
        if sa is not None:
            _subset_chart(work / "subsets.png", sa.names(), sa.miou, sa.members.sum(axis=1))
        if unc is not None:
            uncertainty_figure(work / "choice_uncertainty.png", unc)
        if img_stack is not None and gt_stack.num_images and not partial_gt:
            presence = gt_presence(gt_stack, backend=be)
            picks = _pick_images(presence, max(1, num_images))
            ids = [gt_stack.ids[i] for i in picks]
            cols: list[tuple[str, list[np.ndarray]]] = []
            for k, s in enumerate(stacks):
                masks = []
                for i in picks:
                    a = s.read_image(i)
                    if s.encoding == "scores":
                        from isle_fast.backend import get_kernels

                        thr = -1.0 if bg_threshold is None else float(bg_threshold) * s.score_scale
                        a = np.asarray(get_kernels(be).decode_scores(np.ascontiguousarray(a[None]), thr))[0]
                    masks.append(a)
                cols.append((names[k], masks))
            if ens_stack is not None:
                cols.append((ens_name, [ens_stack.read_image(i) for i in picks]))
            else:
                cols.append(("ensemble", merge_images(stacks, sel, picks, policy=policy, backend=be,
                                                      bg_threshold=bg_threshold)))
            cols.append(("ground truth", [gt_stack.read_image(i) for i in picks]))
            _samples_figure(work / "samples.png", [img_stack.read_image(i) for i in picks], cols, ids)
        files = sorted(p.name for p in work.iterdir())
        final = folder.commit()
    except BaseException:
        folder.abort()
        raise
    return {"path": str(final), "files": files, "seconds": time.perf_counter() - t0,
            "ensemble_miou": ens_miou, "best_component": names[best_k] if n else None,
            "best_component_miou": float(miou[best_k]) if n else None}


# -- the uncertainty of every choice (issue 16) ------------------------------------------------

def choice_uncertainty_or_none(ev: Evaluation, sel: Any, reps: int = 1000, seed: int = 0) -> Any:
    """The bootstrap uncertainty of ``sel`` (:mod:`isle_fast.ensemble.uncertainty`), or None without
    per-image counts (an evaluation handed in without them)."""
    from isle_fast.ensemble.uncertainty import selection_uncertainty

    if ev.image_stats is None or ev.image_stats.shape[0] == 0:
        return None
    return selection_uncertainty(ev, sel, reps=reps, seed=seed)


def uncertainty_markdown(unc: Any, names: Sequence[str]) -> list[str]:
    """The ``tables.md`` section: per class the choice, p(best), expected loss, runner-up and more images."""
    import math

    rows = []
    for c, cname in enumerate(unc.classes):
        b, r = int(unc.best[c]), int(unc.runner_up[c])
        lo, hi = unc.iou_interval[b, c]
        dlo, dhi = unc.diff_interval[r, c] if r >= 0 else (float("nan"), float("nan"))
        more = unc.more_images[c]
        rows.append([cname, names[b], _fmt(unc.p_best[c], 2), str(int(unc.class_images[c])),
                     _fmt(unc.expected_loss[c], 2),
                     f"{_fmt(lo)}-{_fmt(hi)}", names[r] if r >= 0 else "-",
                     f"{_fmt(dlo)} to {_fmt(dhi)}",
                     "-" if np.isnan(unc.p_best[c]) else ("no (tie)" if not math.isfinite(more) else str(int(more)))])
    total = unc.more_images_total()
    note = (f"\nBootstrap over the {unc.labelled} labelled images ({unc.reps} resamples, seed {unc.seed}). "
            "p(best): share of resamples in which the chosen set has the highest IoU; expected loss: mean IoU "
            "points the best set of a resample has over the chosen one; more images: labelled images to add "
            "until the margin over the runner-up is 1.645 bootstrap standard deviations (spread shrinking as "
            "1/sqrt(images)), for the choices below p = 0.9. p is optimistic for a class in few labelled "
            "images: trust it where 20 or more contain the class. "
            + ("Every choice is settled." if not unc.uncertain() else
               f"Uncertain: {', '.join(unc.classes[c] for c in unc.uncertain())}"
               + ("." if not math.isfinite(total) else f"; about {int(total)} more labelled images would "
                  "settle them all.")) + "\n")
    return ["## Uncertainty of every choice\n",
            _md_table(["class", "chosen", "p(best)", "images with it", "expected loss", "chosen IoU 95%", "runner-up",
                       "runner-up minus chosen 95%", "more images"], rows), note]


def uncertainty_figure(path: Path, unc: Any) -> None:
    """``choice_uncertainty.png``: per class the bootstrap 95 % IoU interval of every set, the chosen
    set's drawn bold with a star at its midpoint, and p(best) above each class."""
    plt = _plt()
    n, c = unc.iou_interval.shape[:2]
    fig, ax = plt.subplots(figsize=(max(8, 0.55 * c * max(1, n / 3)), 4.5), layout="constrained")
    cmap = plt.get_cmap("tab10")
    width = 0.8 / max(n, 1)
    for k in range(n):
        xs = np.arange(c) - 0.4 + width * (k + 0.5)
        lo, hi = unc.iou_interval[k, :, 0], unc.iou_interval[k, :, 1]
        ok = ~np.isnan(lo)
        chosen = (unc.best == k) & ok
        ax.vlines(xs[ok & ~chosen], lo[ok & ~chosen], hi[ok & ~chosen], color=cmap(k % 10), linewidth=1.5,
                  label=unc.set_names[k])
        ax.vlines(xs[chosen], lo[chosen], hi[chosen], color=cmap(k % 10), linewidth=4)
        ax.plot(xs[chosen], ((lo + hi) / 2)[chosen], "*", color="black", markersize=7)
    for j in range(c):
        if not np.isnan(unc.p_best[j]):
            ax.text(j, 101, f"{unc.p_best[j]:.2f}", ha="center", va="bottom", fontsize=7,
                    color="black" if unc.p_best[j] >= 0.9 else "red")
    ax.set_xticks(np.arange(c))
    ax.set_xticklabels(unc.classes, rotation=60, ha="right")
    ax.set_ylabel("IoU (%), bootstrap 95% interval")
    ax.set_ylim(0, 108)
    ax.set_title(f"Choice per class (bold, *) and p(best) above; {unc.labelled} labelled images")
    ax.legend(fontsize=8, ncol=min(n, 4), loc="lower right")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
