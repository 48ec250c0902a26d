"""``isle demo``: make a synthetic VOC-like data set and run every pipeline step on it.

The demo is a list of steps (:data:`STEPS`). Each step is a function that
takes the shared :class:`DemoContext`, does its work, and returns the path of
what it wrote (or ``None``); :func:`run` times every step and ends with a
table of step, seconds and output. Add a pipeline step by writing one more
``step_*`` function and appending it to :data:`STEPS` (a step can read what
earlier steps left in ``ctx.stores`` / ``ctx.results``).

The output folder is created fresh: a non-empty folder is refused unless
``--overwrite`` is given *and* the folder holds an earlier demo (its
``.isle-demo`` marker), so the demo never deletes a folder it did not make.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import InputError

HELP = "make a synthetic VOC-like data set and run the whole pipeline"

MARKER = ".isle-demo"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo-out", metavar="DIR",
                        help="output folder, created fresh (default: demo-out)")
    parser.add_argument("--images", type=int, default=None, metavar="N",
                        help="number of synthetic images, train + val (default 64; 16 with --quick)")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default 0)")
    parser.add_argument("--quick", action="store_true",
                        help="a small, fast run (16 images of 64-96 px) for smoke tests")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier demo in --out (only a folder an earlier demo made)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


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
        :class:`~isle_fast.datasets.SyntheticDataset`); steps add their outputs here.
    results : dict
        Anything a step wants to report or hand on (JSON-ready values end up
        in ``demo_summary.json``).
    """

    out: Path
    args: argparse.Namespace
    n_images: int
    size_range: tuple[int, int]
    quiet: bool
    dataset: Any = None
    stores: dict[str, str] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------- steps
def step_data(ctx: DemoContext) -> Path:
    """Make the synthetic VOC-like data set (file tree + stores) and a preview PNG."""
    from ..datasets import make_voc_like, preview_png

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
    return ds.root


def step_ingest(ctx: DemoContext) -> Path | None:
    """Ingest the JPEG / PNG / CAM tree into stores and check they equal the generated ones.

    Uses :mod:`isle_fast.ingest` (the training split, as listed in
    ``ImageSets/Segmentation/train.txt``); skipped when that module is absent.
    """
    try:
        from .. import ingest
    except ImportError:
        ctx.results["ingest"] = "isle_fast.ingest is not available in this build; skipped"
        return None
    import numpy as np

    from ..store import open_stack

    ds = ctx.dataset
    dest = ctx.out / "ingested"
    train_list = str(ds.paths["train_list"])
    q = True  # the info step lists the stores; ingest's own summaries would repeat it
    made: dict[str, str] = {}
    gt = ingest.ingest_labels(ds.paths["gt"], dest / "gt.zarr", ids=train_list, kind="gt", quiet=q)
    made["train/gt"] = gt.path
    made["train/images"] = ingest.ingest_images(ds.paths["images"], dest / "images.zarr", gt=gt, quiet=q).path
    for name, folder in ds.paths["pseudo"].items():
        made[f"train/pseudo/{name}"] = ingest.ingest_labels(
            folder, dest / "pseudo" / f"{name}.zarr", gt=gt, name=name, quiet=q).path
    for name, folder in ds.paths["cams"].items():
        made[f"train/cams/{name}"] = ingest.ingest_scores(
            folder, dest / "cams" / f"{name}.zarr", gt=gt, name=name, allow_pickle=True, quiet=q).path
    # the ingested stores must hold exactly what the generator wrote directly
    mismatched = []
    for key, path in made.items():
        a, b = open_stack(path), open_stack(ctx.stores[key])
        same = a.ids == b.ids and np.array_equal(a.shapes, b.shapes) and all(
            np.array_equal(a.read_image(i), b.read_image(i)) for i in range(a.num_images))
        if not same:
            mismatched.append(key)
    ctx.results["ingest"] = {"stores": made, "identical_to_direct": not mismatched, "mismatched": mismatched}
    if not ctx.quiet:
        print(f"ingested {len(made)} stores from {ds.root}; identical to the generated stores: "
              f"{'yes' if not mismatched else 'NO'}")
    if mismatched:
        raise RuntimeError(f"ingested stores differ from the generated ones: {', '.join(mismatched)}")
    return dest


def step_info(ctx: DemoContext) -> Path:
    """Describe every store (as isle info does) and write stores.json."""
    from ..store import open_stack

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


#: The demo's steps, in order: (name, function). Later pipeline steps are appended here.
STEPS: list[tuple[str, Callable[[DemoContext], Any]]] = [
    ("data", step_data),
    ("ingest", step_ingest),
    ("info", step_info),
]


# --------------------------------------------------------------------------------- driver
def _write_json(path: Path, obj: Any) -> None:
    import os

    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


def _prepare(out: Path, overwrite: bool) -> None:
    if out.exists():
        if not out.is_dir():
            raise InputError(f"--out {out} exists and is not a folder")
        if any(out.iterdir()):
            if not overwrite:
                raise InputError(f"--out {out} exists and is not empty; choose another folder or pass "
                                 "--overwrite to replace an earlier demo there")
            if not (out / MARKER).is_file():
                raise InputError(f"--out {out} is not empty and was not made by isle demo (no {MARKER}); "
                                 "refusing to delete it even with --overwrite")
            shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by isle demo; --overwrite may replace this folder\n")


def run(args: argparse.Namespace) -> int:
    from ..progress import Timer

    n = args.images if args.images is not None else (16 if args.quick else 64)
    if n < 2:
        raise InputError(f"--images must be at least 2 (train and val), got {n}")
    out = Path(args.out)
    _prepare(out, args.overwrite)
    ctx = DemoContext(out=out, args=args, n_images=n, size_range=(64, 96) if args.quick else (120, 200),
                      quiet=args.quiet)
    table: list[dict[str, Any]] = []
    total = Timer()
    for name, fn in STEPS:
        t = Timer()
        if not ctx.quiet:
            print(f"== {name}: {(fn.__doc__ or '').strip().splitlines()[0]}", flush=True)
        result = fn(ctx)
        table.append({"step": name, "seconds": round(t.seconds, 3),
                      "output": str(result) if result is not None else "-"})
        _write_json(out / "demo_summary.json", {"steps": table, "results": ctx.results})
    _write_json(out / "demo_summary.json", {"steps": table, "results": ctx.results,
                                            "total_seconds": round(total.seconds, 3)})
    width = max(len(r["step"]) for r in table)
    print(f"\nisle demo: {len(table)} steps in {total.seconds:.1f} s; everything is in {out}")
    print(f"  {'step'.ljust(width)}  {'seconds':>8}  output")
    for r in table:
        print(f"  {r['step'].ljust(width)}  {r['seconds']:>8.2f}  {r['output']}")
    sys.stdout.flush()
    return 0
