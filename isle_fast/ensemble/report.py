"""The paper's tables and figures for any data, and VOC-palette PNG export.

:func:`report` writes into one folder (built in a temporary sibling and
renamed into place when complete):

``tables.md`` / ``report.json``
    * per-class IoU of every set and of the ensemble (the paper's Tables 3-4),
    * the best-set matrix (Table 1: a check mark where a set is chosen for a class),
    * ensemble vs its members (Table 2 without training): mIoU, classes won,
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
``report.html``
    all of the above in one self-contained page (figures embedded as data
    URIs, no scripts, no links out: readable offline, mailed as one file),
    with the provenance: inputs, versions, options (:func:`html_report`).

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

from isle_fast.ensemble.evaluate import Evaluation, check_bg_threshold, evaluate
from isle_fast.ensemble.graph import open_inputs, unique_names
from isle_fast.ensemble.selection import select
from isle_fast.errors import InputError, param
from isle_fast.metrics import jsonable
from isle_fast.outputs import FolderOutput

__all__ = ["report", "export_pngs", "html_report", "ChunkExport"]

#: Store kinds ``report(ensemble=...)`` accepts: ours, or one made elsewhere and ingested as a set.
ENSEMBLE_KINDS = ("ensemble", "pseudo")


# -- helpers ------------------------------------------------------------------------------

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


class ChunkExport:
    """:func:`export_pngs` fed with label chunks already in memory: the same folder, files and bytes.

    ``isle run`` hands every ensemble chunk to :meth:`write` as the merge makes
    it (:func:`isle_fast.ensemble.merge.merge`'s ``each_chunk``), so the store is
    not read back for the PNGs. The folder is built in a temporary sibling
    (:class:`isle_fast.outputs.FolderOutput`); :meth:`commit` checks that every
    image was written and moves it into place, :meth:`abort` removes it.

    Parameters
    ----------
    out : path
        Output folder; must not exist unless ``overwrite``.
    ids : sequence of str
        Image ids (files ``<id>.png``), in store order.
    shapes : (I, 2) array
        True image sizes.
    compress : {'rle', 0..9}
    overwrite : bool
    inputs : sequence
        Paths the folder must not replace or enter (:func:`isle_fast.outputs.check_output`).
    """

    def __init__(self, out: str | os.PathLike, ids: Sequence[str], shapes: Any, *,
                 compress: str | int = "rle", overwrite: bool = False, inputs: Sequence[Any] = ()):
        from isle_fast.stores.export import LabelPngWriter, png_options

        png_options(compress)
        rel = [_safe_relpath(i) for i in ids]
        self.t0 = time.perf_counter()
        self.compress = str(compress)
        self.folder = FolderOutput(out, command="isle export", overwrite=overwrite, inputs=list(inputs))
        try:
            self.writer = LabelPngWriter(self.folder.work, [str(r.with_name(r.name + ".png")) for r in rel],
                                         shapes, compress=compress)
        except BaseException:
            self.folder.abort()
            raise

    def write(self, start: int, block: np.ndarray) -> int:
        """Encode images ``start ..`` of ``block`` (padded, whole images); see :class:`LabelPngWriter`."""
        return self.writer.write(start, block)

    def commit(self) -> dict:
        """Move the folder into place; returns what :func:`export_pngs` returns.

        Raises
        ------
        RuntimeError
            Not every image was written (the folder is removed).
        """
        n = len(self.writer.job.files)
        if self.writer.images != n:
            self.abort()
            raise RuntimeError(f"exported {self.writer.images} of {n} images")
        final = self.folder.commit()
        return {"images": n, "path": str(final), "seconds": time.perf_counter() - self.t0,
                "bytes": self.writer.bytes, "compress": self.compress}

    def abort(self) -> None:
        """Remove the temporary folder."""
        self.folder.abort()


# -- tables -------------------------------------------------------------------------------

def _fmt(v: Any, digits: int = 1) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "-"
    return f"{v:.{digits}f}"


def md_cell(text: str) -> str:
    """``text`` safe in a Markdown table cell: ``|`` escaped, line breaks as spaces."""
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    out = ["| " + " | ".join(md_cell(h) for h in header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    out += ["| " + " | ".join(md_cell(c) for c in r) + " |" for r in rows]  # a set named 'a|b' keeps its row
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


#: widest figure, in inches (at the figures' 110 dpi: about 1,800 px with the legend)
MAX_WIDTH_IN = 14.0


def _bar_chart(path: Path, classes: list[str], names: list[str], iou: np.ndarray,
               no_gt: Sequence[bool] | None = None) -> None:
    plt = _plt()
    c = len(classes)
    n = len(names)
    width = 0.8 / max(n, 1)
    # about 0.12 in per bar, within [8, MAX_WIDTH_IN] in: VOC's 21 classes x 5 bars fit a page
    fig, ax = plt.subplots(figsize=(min(MAX_WIDTH_IN, max(8.0, 0.12 * c * max(n, 1) + 1.5)), 4.5),
                           layout="constrained")
    x = np.arange(c)
    cmap = plt.get_cmap("tab10")
    for k in range(n):
        ax.bar(x - 0.4 + width * (k + 0.5), np.nan_to_num(iou[k], nan=0.0), width, label=names[k],
               color=cmap(k % 10), edgecolor="black" if k == n - 1 else None, linewidth=0.5)
    labels = [f"{name} (no gt)" if no_gt is not None and no_gt[j] else name for j, name in enumerate(classes)]
    ax.set_xticks(x)
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=8)
    if no_gt is not None:
        for tick, missing in zip(ax.get_xticklabels(), no_gt):
            if missing:
                tick.set_color("grey")
    ax.set_xlim(-0.6, c - 0.4)
    ax.set_ylabel("IoU (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Per-class IoU")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)  # beside the bars
    fig.savefig(path, dpi=110, bbox_inches="tight")  # long class / set names widen the canvas
    plt.close(fig)


def _heat_table(path: Path, classes: list[str], names: list[str], iou: np.ndarray, miou: np.ndarray,
                no_gt: Sequence[bool] | None = None) -> None:
    """The IoU table as a heat map with a colour bar; a class without gt pixels is a hatched grey
    column saying "no gt" (its IoU is undefined, not 0), an undefined cell is grey with "-"."""
    from matplotlib.patches import Rectangle

    plt = _plt()
    data = np.concatenate([iou, miou[:, None]], axis=1)
    missing = np.zeros(data.shape[1], dtype=bool)
    if no_gt is not None:
        missing[:len(classes)] = np.asarray(no_gt, dtype=bool)
    cols = list(classes) + ["mIoU"]
    shown = np.ma.masked_array(data, mask=np.isnan(data) | missing[None, :])
    cmap = plt.get_cmap("viridis").with_extremes(bad="#d9d9d9")
    fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(cols) + 3), 0.45 * len(names) + 1.8), layout="constrained")
    im = ax.imshow(shown, cmap=cmap, vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels(cols, rotation=60, ha="right", fontsize=8)
    for tick, gone in zip(ax.get_xticklabels(), missing):
        if gone:
            tick.set_color("grey")
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=8)
    col_max = np.where(np.isnan(data), -np.inf, data).max(axis=0)
    for col in np.nonzero(missing)[0]:
        ax.add_patch(Rectangle((col - 0.5, -0.5), 1, data.shape[0], facecolor="none", edgecolor="grey",
                               hatch="///", linewidth=0))
    for r in range(data.shape[0]):
        for j in range(data.shape[1]):
            v = data[r, j]
            if missing[j]:
                ax.text(j, r, "no gt", ha="center", va="center", fontsize=6, color="black",
                        bbox=dict(facecolor="#d9d9d9", edgecolor="none", pad=0.5))
                continue
            ax.text(j, r, _fmt(v), ha="center", va="center", fontsize=7,
                    color="black" if (np.isnan(v) or v >= 55) else "white",
                    fontweight="bold" if (not np.isnan(v) and v == col_max[j]) else "normal")
    fig.colorbar(im, ax=ax, label="IoU (%)", fraction=0.03, pad=0.01)
    ax.set_title("Per-class IoU (%)" + ("; hatched: no ground-truth pixels, IoU undefined" if missing.any() else ""))
    fig.savefig(path, dpi=110, bbox_inches="tight")  # long class / set names widen the canvas
    plt.close(fig)


def _subset_chart(path: Path, names: list[str], miou: np.ndarray, sizes: np.ndarray, best: int | None = None) -> None:
    """mIoU of every subset's ensemble, coloured by the number of sets; the best subset ``best`` is
    outlined in red, labelled with its mIoU and named in the title."""
    from matplotlib.patches import Patch

    plt = _plt()
    fig, ax = plt.subplots(figsize=(min(MAX_WIDTH_IN, max(6, 0.35 * len(names) + 3)), 4), layout="constrained")
    cmap = plt.get_cmap("viridis")
    top = max(int(sizes.max()), 1)
    colour = lambda s: cmap(s / (top + 0.5))  # noqa: E731
    bars = ax.bar(range(len(names)), np.nan_to_num(miou, nan=0.0), color=[colour(s) for s in sizes])
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=70, ha="right", fontsize=7)
    ax.set_ylabel("ensemble mIoU (%)")
    finite = miou[~np.isnan(miou)]
    if finite.size:
        lo = max(0.0, float(finite.min()) - 5)
        ax.set_ylim(lo, min(100.0, float(finite.max()) + 3))
    title = "Ensemble of every subset of the sets"
    handles = [Patch(color=colour(s), label=f"{s} set{'s' if s > 1 else ''}")
               for s in sorted(set(int(v) for v in sizes))]
    if best is not None and not np.isnan(miou[best]):
        bars[best].set_edgecolor("red")
        bars[best].set_linewidth(2.0)
        ax.annotate(f"best {miou[best]:.1f}", (best, float(miou[best])), xytext=(0, 3), textcoords="offset points",
                    ha="center", va="bottom", fontsize=7, color="red", fontweight="bold")
        ax.get_xticklabels()[best].set_color("red")
        ax.get_xticklabels()[best].set_fontweight("bold")
        title += f"; best: {names[best]}"
        handles.append(Patch(facecolor="none", edgecolor="red", linewidth=2.0, label="best subset"))
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    ax.set_title(title)
    fig.savefig(path, dpi=110, bbox_inches="tight")  # long class / set names widen the canvas
    plt.close(fig)


def _samples_figure(path: Path, images: list[np.ndarray], columns: list[tuple[str, list[np.ndarray]]],
                    ids: list[str], class_names: Sequence[str] | None = None) -> None:
    plt = _plt()
    from isle_fast.stores.png import voc_palette

    pal = voc_palette()
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
    if class_names is not None:  # a key to the colours: every class shown, and ignore
        from matplotlib.patches import Patch

        shown = sorted(set().union(*(np.unique(m).tolist() for _, masks in columns for m in masks)))
        handles = [Patch(facecolor=pal[v] / 255.0, edgecolor="black", linewidth=0.3,
                         label=class_names[v] if v < len(class_names) else ("ignore" if v == 255 else str(v)))
                   for v in shown]
        fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 12), fontsize=7,
                   frameon=False)
    fig.savefig(path, dpi=110, bbox_inches="tight")  # long class / set names widen the canvas
    plt.close(fig)


# -- images from a folder ---------------------------------------------------------------

_RGB_EXTS = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")


def _is_image_folder(path: Any) -> bool:
    """A local folder of images (not a store): ``report(images=)`` reads the few it draws from it."""
    p = Path(str(path))
    return "://" not in str(path) and p.is_dir() and not (p / "zarr.json").exists()


def _folder_images(folder: Path, ids: Sequence[str], shapes: Sequence[tuple[int, int]]) -> list[np.ndarray]:
    """``<id>.jpg`` (or .jpeg / .png) of each id from ``folder`` as RGB, checked against the gt size."""
    from PIL import Image

    out = []
    for image_id, (h, w) in zip(ids, shapes):
        path = next((folder / f"{image_id}{e}" for e in _RGB_EXTS if (folder / f"{image_id}{e}").is_file()), None)
        if path is None:
            raise InputError(f"{param('images')} {folder}: no {image_id}.jpg / .png for image id {image_id!r}")
        try:
            with Image.open(path) as im:
                rgb = np.asarray(im.convert("RGB"))
        except OSError as exc:
            raise InputError(f"{path}: cannot be read as an image ({exc})") from None
        if rgb.shape[:2] != (h, w):
            raise InputError(f"{path} is {rgb.shape[1]} x {rgb.shape[0]} pixels; the ground truth of "
                             f"{image_id!r} is {w} x {h}")
        out.append(rgb)
    return out


# -- report.html ------------------------------------------------------------------------

#: figure file -> caption, in the page's order
FIGURES = {
    "per_class_iou.png": "Per-class IoU of every set and the ensemble.",
    "iou_table.png": "The per-class IoU table as a heat map; bold: best in the column; hatched: no ground truth.",
    "subsets.png": "mIoU of the ensemble of every subset of the sets; the best subset outlined in red.",
    "samples.png": "Images side by side: every set, the ensemble and the ground truth (cf. the paper's Fig. 3).",
}

_CSS = """body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:2em auto;max-width:1400px;
padding:0 1em;color:#222}table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 6px;text-align:right}th{background:#f2f2f2}
td:first-child,th:first-child{text-align:left}figure{margin:1em 0 2em}img{max-width:100%;height:auto}
figcaption{color:#555;font-size:13px}code{background:#f4f4f4;padding:0 3px}
.scroll{overflow-x:auto}dl{display:grid;grid-template-columns:max-content auto;gap:2px 1em;font-size:13px}
dt{font-weight:600}dd{margin:0}"""


def _inline(text: str) -> str:
    """One line of our Markdown (``**bold**``, ```code```, ``\\|``) as HTML, escaped."""
    import html
    import re

    out = html.escape(text.replace("\\|", "|").replace("\\\\", "\\"), quote=False)
    out = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", out)
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", out)


def _md_to_html(md: str) -> str:
    """The Markdown that :func:`report` writes (headings, pipe tables, paragraphs) as HTML."""
    import re

    out: list[str] = []
    table: list[list[str]] = []

    def flush() -> None:
        if not table:
            return
        head, *body = table
        out.append('<div class="scroll"><table><thead><tr>' + "".join(f"<th>{_inline(c)}</th>" for c in head)
                   + "</tr></thead><tbody>")
        out.extend("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in body)
        out.append("</tbody></table></div>")
        table.clear()

    for line in md.splitlines():
        s = line.strip()
        if s.startswith("|") and s.endswith("|"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", s[1:-1])]
            if not all(re.fullmatch(r"-{3,}", c) for c in cells):
                table.append(cells)
            continue
        flush()
        if s.startswith("## "):
            out.append(f"<h2>{_inline(s[3:])}</h2>")
        elif s.startswith("# "):
            out.append(f"<h1>{_inline(s[2:])}</h1>")
        elif s:
            out.append(f"<p>{_inline(s)}</p>")
    flush()
    return "\n".join(out)


def _versions() -> dict[str, str]:
    import platform
    from importlib import metadata

    from isle_fast import __version__

    found = {"isle-fast": __version__, "python": platform.python_version()}
    for dist in ("numpy", "zarr", "dask", "numba", "matplotlib"):
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[dist] = "not installed"
    return found


def _dl(items: dict[str, Any]) -> str:
    import html

    return "<dl>" + "".join(f"<dt>{html.escape(str(k))}</dt><dd>{html.escape('-' if v is None else str(v))}</dd>"
                            for k, v in items.items()) + "</dl>"


def html_report(folder: str | os.PathLike, markdown: str, *, inputs: dict[str, Any], options: dict[str, Any],
                files: Sequence[str] = ()) -> str:
    """``report.html``: the tables of ``markdown`` and the figures of ``folder`` in one page.

    Self-contained: the CSS is inline, every figure is embedded as a ``data:image/png;base64``
    URI, there is no script and no link out, so the page reads the same offline, mailed, or
    archived. The provenance closes it: the inputs, the versions of isle-fast and its libraries,
    the options and the files of the report.

    Parameters
    ----------
    folder : path
        Where the figures are: those of :data:`FIGURES` (those missing are left out), then any
        other ``*.png`` there, captioned with its file name.
    markdown : str
        The text of ``tables.md``.
    inputs, options : dict
        Shown as given (``None`` as ``-``).
    files : sequence of str
        The report's files.

    Returns
    -------
    str
        The HTML document.
    """
    import base64
    import html
    from datetime import datetime, timezone

    folder = Path(folder)
    body = [_md_to_html(markdown), "<h2>Figures</h2>"]
    others = sorted(p.name for p in folder.glob("*.png") if p.name not in FIGURES)  # any other figure too
    for name, caption in [*FIGURES.items(), *((o, o[:-4].replace("_", " ")) for o in others)]:
        p = folder / name
        if not p.is_file():
            continue
        data = base64.b64encode(p.read_bytes()).decode("ascii")
        body.append(f'<figure id="{name[:-4]}"><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}">'
                    f"<figcaption>{html.escape(caption)} (<code>{name}</code>)</figcaption></figure>")
    made = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body += ["<h2>Provenance</h2>", "<h3>Inputs</h3>", _dl(inputs), "<h3>Versions</h3>", _dl(_versions()),
             "<h3>Options</h3>", _dl(options), "<h3>Files</h3>", _dl({"written": made, "files": ", ".join(files)})]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>ISLE report</title><style>{_CSS}</style></head><body>\n" + "\n".join(body)
            + "\n</body></html>\n")


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
        An ``images`` store aligned with the sets, or a folder of ``<id>.jpg`` / ``.png`` (only the
        images drawn are read); enables ``samples.png``.
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
        ``path``, ``files``, ``seconds``, the ensemble mIoU and the best member (``best_member``,
        ``best_member_miou``).
    """
    from isle_fast.backend import resolve_backend
    from isle_fast.ensemble.merge import gt_presence, merge_images
    from isle_fast.ensemble.subsets import MAX_SETS, subset_analysis
    from isle_fast.stores.stack import Stack, check_aligned, kind_phrase, open_stack

    t0 = time.perf_counter()
    bg_threshold = check_bg_threshold(bg_threshold)
    be = resolve_backend(backend)
    stacks, gt_stack = open_inputs(sets, gt)
    ens_stack = None
    if ensemble is not None:
        ens_stack = ensemble if isinstance(ensemble, Stack) else open_stack(ensemble)
        if ens_stack.kind not in ENSEMBLE_KINDS:
            kinds = " or ".join(repr(k) for k in ENSEMBLE_KINDS)
            raise InputError(f"{param('ensemble')} {ens_stack.path} is {kind_phrase(ens_stack.kind)}; "
                             "an ensemble is "
                             f"an {kinds} store (an ensemble made elsewhere may be ingested as a "
                             "pseudo-label set)")
    img_stack = img_folder = None
    from isle_fast.ensemble.partial import gt_positions

    partial_gt = gt_positions(gt_stack, stacks) is not None  # the gt labels some of the images
    if images is not None and not isinstance(images, Stack) and _is_image_folder(images):
        img_folder = Path(images)  # the few images drawn are read from it: no images store needed
    elif images is not None:
        img_stack = images if isinstance(images, Stack) else open_stack(images, kind="images")
        check_aligned([stacks[0] if partial_gt else gt_stack, img_stack], same_classes=False)
    n = len(stacks)
    folder = FolderOutput(out, command="isle report", overwrite=overwrite,
                          inputs=[*stacks, gt_stack, ens_stack, img_stack, img_folder])
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
        names = unique_names(stacks)
        ens_choice = ensemble_choice(ens_stack, ev.classes, names) if ens_stack is not None else None
        sa = None
        if n <= MAX_SETS and not partial_gt:
            sa = subset_analysis(stacks, gt_stack, evaluation=ev, policy=policy, backend=be,
                                 bg_threshold=bg_threshold, progress=progress)
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
        best_col = np.where(np.isnan(iou), -np.inf, iou).max(axis=0) if n else np.empty(0)
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
               "\n" + " ".join(
                   ([f"Background slice (score sets): {names[int(sel.best[0])]}."]
                    if any(s.encoding == "scores" for s in stacks) else [])  # label sets have no slice
                   + ([] if not absent else
                      [f"Classes without ground-truth pixels ({', '.join(absent)}) cannot be scored and go to "
                       f"the first set, {names[sel.member_indices[0]]}."]))
               + "\n"]

        comp = _component_summary(ev, sel)
        best_k = int(np.argmax(np.where(np.isnan(miou), -np.inf, miou))) if n else 0
        rows = [[c["set"], _fmt(c["miou"]), str(len(c["classes_won"])), _fmt(c["mean_margin"], 2)]
                for c in comp]
        if ens_name is not None and ens_miou is not None:
            rows.append([_ens_label(ens_name), _fmt(ens_miou), "-",
                         f"{ens_miou - float(miou[best_k]):+.2f} vs {names[best_k]}"])
        md += ["## Ensemble vs its members (Table 2, pseudo-labels, no training)\n",
               _md_table(["method", "mIoU", "classes won", "mean margin in won classes"], rows), ""]

        if sa is not None:
            smiou = sa.miou
            top = sa.best()
            rows = []
            for si, sname in enumerate(sa.names()):
                mem = np.nonzero(sa.members[si])[0]
                best_member = max((float(miou[m]) for m in mem if not np.isnan(miou[m])), default=float("nan"))
                cells = [sname, str(len(mem)), _fmt(smiou[si], 2), _fmt(smiou[si] - best_member, 2)]
                rows.append([f"**{c}**" for c in cells] if si == top else cells)
            best_line = f"\nBest subset (bold): **{md_cell(sa.names()[top])}**, mIoU {_fmt(smiou[top], 2)}"
            if top != len(smiou) - 1:
                best_line += (f", {smiou[top] - smiou[-1]:+.2f} over the ensemble of all {n} sets: fewer sets "
                              "make the better ensemble here")
            note = best_line + ".\n" + ("" if ev.average == "dataset" else
                                        "\nSubset ensembles are scored with dataset-level IoU; the gain compares "
                                        "with the members' image-averaged mIoU above.\n")
            md += ["## Ensemble of every subset\n",
                   _md_table(["subset", "sets", "mIoU", "gain over best member"], rows), note]
        if ens_choice is not None:
            md += ensemble_choice_markdown(ens_choice, sel, unc, names)
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
        doc["ensemble_choice"] = None if ens_choice is None else {
            k: (jsonable(v) if isinstance(v, np.ndarray) else v) for k, v in ens_choice.items()}
        (work / "report.json").write_text(json.dumps(doc, indent=2), encoding="utf-8")

        # -- figures ----------------------------------------------------------------------
        bar_names = names + ([ens_name] if ens_name is not None else [])
        bar_iou = np.concatenate([iou, ens_iou[None]], axis=0) if ens_name is not None else iou
        bar_miou = np.concatenate([miou, [ens_miou]]) if ens_name is not None else miou
        no_gt = [int(v) == 0 for v in ev.gt_pixels]
        _bar_chart(work / "per_class_iou.png", classes, bar_names, bar_iou, no_gt=no_gt)
        _heat_table(work / "iou_table.png", classes, bar_names, bar_iou, np.asarray(bar_miou, dtype=float),
                    no_gt=no_gt)
        if sa is not None:
            _subset_chart(work / "subsets.png", sa.names(), sa.miou, sa.members.sum(axis=1), best=sa.best())
        if unc is not None:
            uncertainty_figure(work / "choice_uncertainty.png", unc, ensemble=ens_choice)
        if (img_stack is not None or img_folder is not None) and gt_stack.num_images and not partial_gt:
            presence = gt_presence(gt_stack, backend=be)
            picks = _pick_images(presence, max(1, num_images))
            ids = [gt_stack.ids[i] for i in picks]
            cols: list[tuple[str, list[np.ndarray]]] = []
            for k, st in enumerate(stacks):
                masks = []
                for i in picks:
                    a = st.read_image(i)
                    if st.encoding == "scores":
                        from isle_fast.backend import get_kernels

                        thr = -1.0 if bg_threshold is None else float(bg_threshold) * st.score_scale
                        a = np.asarray(get_kernels(be).decode_scores(np.ascontiguousarray(a[None]), thr))[0]
                    masks.append(a)
                cols.append((names[k], masks))
            if ens_stack is not None and ens_name is not None:
                cols.append((ens_name, [ens_stack.read_image(i) for i in picks]))
            else:
                cols.append(("ensemble", merge_images(stacks, sel, picks, policy=policy, backend=be,
                                                      bg_threshold=bg_threshold)))
            cols.append(("ground truth", [gt_stack.read_image(i) for i in picks]))
            if img_stack is not None:
                rgb = [img_stack.read_image(i) for i in picks]
            else:
                assert img_folder is not None
                rgb = _folder_images(img_folder, ids, [(int(gt_stack.shapes[i][0]), int(gt_stack.shapes[i][1]))
                                                       for i in picks])
            _samples_figure(work / "samples.png", rgb, cols, ids,
                            class_names=classes)
        options = {"policy": policy, "average": average, "backend": be, "bg_threshold": bg_threshold,
                   "num_images": num_images if images is not None else None,
                   "subset analysis": sa is not None}
        inputs = {**{f"set {names[k]}": s.path for k, s in enumerate(stacks)}, "ground truth": gt_stack.path,
                  "ensemble": ens_stack.path if ens_stack is not None else ens_source,
                  "images": img_stack.path if img_stack is not None else
                  (str(img_folder) if img_folder is not None else None)}
        files = sorted([p.name for p in work.iterdir()] + ["report.html"])
        (work / "report.html").write_text(
            html_report(work, "\n".join(md) + "\n", inputs=inputs, options=options, files=files),
            encoding="utf-8")
        final = folder.commit()
    except BaseException:
        folder.abort()
        raise
    return {"path": str(final), "files": files, "seconds": time.perf_counter() - t0,
            "ensemble_miou": ens_miou, "best_member": names[best_k] if n else None,
            "best_member_miou": float(miou[best_k]) if n else None}



# -- the uncertainty of every choice (issue 16) ------------------------------------------------

def choice_uncertainty_or_none(ev: Evaluation, sel: Any, reps: int = 1000, seed: int = 0) -> Any:
    """The bootstrap uncertainty of ``sel`` (:mod:`isle_fast.ensemble.uncertainty`), or None without
    per-image counts (an evaluation handed in without them)."""
    from isle_fast.ensemble.uncertainty import selection_uncertainty

    if ev.image_stats is None or ev.image_stats.shape[0] == 0:
        return None
    return selection_uncertainty(ev, sel, reps=reps, seed=seed)


#: the modes of a gt of some images whose choice is not the labelled IoU's (merge's ``subset_selection``)
_OWN_CHOICE_MODES = ("strata", "strata-semi", "strata-context", "posterior")


def ensemble_choice(ens_stack: Any, classes: Sequence[str], names: Sequence[str]) -> dict[str, Any] | None:
    """The choice an ensemble store was merged with from a gt of some images, with its own uncertainty (its
    provenance: ``subset_selection``, ``selection``, ``strata`` or ``blend_posterior``), or None where the
    ensemble took the labelled IoU's choice (or was made elsewhere).

    Returns ``{"mode", "labelled_images", "best" (C,) set index (-1: a set not among ``names``), "p_best"
    (C,), "expected_loss" (C,)}``.
    """
    prov = ens_stack.provenance or {}
    mode = prov.get("subset_selection")
    own = prov.get("blend_posterior" if mode == "posterior" else "strata")
    mapping = prov.get("selection")
    if mode not in _OWN_CHOICE_MODES or not isinstance(own, dict) or not isinstance(mapping, dict):
        return None
    pos = {name: k for k, name in enumerate(names)}
    chosen = [prov.get("background_set")] + [mapping.get(c) for c in classes[1:]]
    best = np.array([pos.get(str(v), -1) for v in chosen], dtype=np.int64)

    def per_class(key: str) -> np.ndarray:
        vals = own.get(key) or []
        out = np.full(len(classes), np.nan)
        for j, v in enumerate(vals[:len(classes)]):
            out[j] = np.nan if v is None else float(v)
        return out

    return {"mode": mode, "labelled_images": prov.get("labelled_images"), "best": best,
            "p_best": per_class("p_best"), "expected_loss": per_class("expected_loss")}


def ensemble_choice_markdown(choice: dict[str, Any], sel: Any, unc: Any, names: Sequence[str]) -> list[str]:
    """The ``tables.md`` section of :func:`ensemble_choice`: per class the ensemble's set, its p(best) and
    expected loss, beside what the labelled IoU alone chooses (bold where the two differ)."""
    classes = list(sel.classes)
    rows, differ = [], 0
    for j, cname in enumerate(classes):
        b, lab = int(choice["best"][j]), int(sel.best[j])
        differ += b != lab
        p_lab = "-" if unc is None else _fmt(unc.p_best[j], 2)
        cells = [cname, names[b] if b >= 0 else "?", _fmt(choice["p_best"][j], 2), _fmt(choice["expected_loss"][j], 2),
                 names[lab], p_lab]
        rows.append([f"**{c}**" for c in cells] if b != lab else cells)
    how = ("the posterior of the labelled IoU and the no-label estimate" if choice["mode"] == "posterior" else
           "the labelled images' truth per vote stratum applied to every image's votes"
           + (", refined by the distance to agreement" if choice["mode"] == "strata-context" else ""))
    note = (f"\nThe ensemble chose from {choice['labelled_images']} labelled images and every image "
            f"(`{choice['mode']}`: {how}); its p(best) and expected loss come from its own bootstrap over the "
            f"labelled images. The labelled IoU alone (the tables above, and the uncertainty below) would choose "
            f"otherwise in {differ} of {len(classes)} classes (bold); the ensemble's mIoU comes from its own "
            "choice.\n")
    return ["## The ensemble's choice\n",
            _md_table(["class", "ensemble's set", "p(best)", "expected loss", "labelled IoU alone", "its p(best)"],
                      rows), note]


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


def uncertainty_figure(path: Path, unc: Any, ensemble: dict[str, Any] | None = None) -> None:
    """``choice_uncertainty.png``: per class the bootstrap 95 % IoU interval of every set, the chosen
    set's drawn bold with a star at its midpoint, and p(best) above each class; with ``ensemble``
    (:func:`ensemble_choice`) a ring on the set the ensemble took where that differs."""
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
        if ensemble is not None:
            took = (ensemble["best"] == k) & (unc.best != k) & ok
            ax.plot(xs[took], ((lo + hi) / 2)[took], "o", markerfacecolor="none", markeredgecolor="black",
                    markersize=9, label=None)
    for j in range(c):
        if not np.isnan(unc.p_best[j]):
            ax.text(j, 101, f"{unc.p_best[j]:.2f}", ha="center", va="bottom", fontsize=7,
                    color="black" if unc.p_best[j] >= 0.9 else "red")
    ax.set_xticks(np.arange(c))
    ax.set_xticklabels(unc.classes, rotation=60, ha="right")
    ax.set_ylabel("IoU (%), bootstrap 95% interval")
    ax.set_ylim(0, 108)
    ax.set_title(f"Choice per class (bold, *) and p(best) above; {unc.labelled} labelled images"
                 + ("" if ensemble is None else f"; o: the ensemble's other choice ({ensemble['mode']})"))
    ax.legend(fontsize=8, ncol=min(n, 4), loc="lower right")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
