"""PNG ingest throughput: ``isle ingest labels`` vs a plain PIL + NumPy loop, in the same run.

``python -m benchmarks.ingest [--quick] [--images N]``

Data: N generated VOC-sized label maps (one side 500, the other 330..500,
objects with the 255 void band), written once as palette PNGs to
``benchmarks/results/tmp/ingest-pngs-N`` (cached between runs).

Measured (best of k rounds after a warm-up round; each round runs the reference and then ours, so
load changes on a shared machine hit all alike; wall seconds and process CPU seconds, all threads):

* reference: a plain loop, ``np.asarray(PIL.Image.open(f))`` for every file
  into a preallocated padded ``(N, 500, 500)`` uint8 array, then ``np.save``
  of that array (what a script without a store would do);
* ``isle ingest labels`` (the library call behind the command, ids from the
  folder, validation of every value, compressed Zarr store written
  atomically) with 1 thread and with the default thread count.

Reports images/s, Mpix/s, the speedup over the reference and the bytes on
disk (PNG folder, ``.npy``, store). Writes ``benchmarks/results/ingest.json``.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

from .common import (
    bench_parser,
    dir_bytes,
    fill_once,
    format_table,
    headline_row,
    scratch,
    tmp_dir,
    write_json,
)
from .compression import label_batch


def make_pngs(n: int, side: int, seed: int = 11) -> tuple[Path, int]:
    """Write (or reuse) ``n`` palette label PNGs; returns the folder and the total pixel count."""
    from PIL import Image

    from isle_fast.stores.png import voc_palette

    def write(folder: Path) -> None:
        palette = voc_palette().ravel().tolist()
        start = 0
        while start < n:  # generate in batches to bound memory
            m = min(50, n - start)
            batch, shapes = label_batch(m, seed=seed + start, side=side)
            for j, (h, w) in enumerate(shapes):
                im = Image.fromarray(batch[j, :h, :w]).convert("L")
                im.putpalette(palette)
                im.save(folder / f"{2007 + (start + j) // 10000}_{(start + j) % 10000:06d}.png")
            start += m

    folder = fill_once(tmp_dir() / f"ingest-pngs-{n}-{side}-{seed}", write)
    pixels = 0
    for f in sorted(folder.glob("*.png")):
        with Image.open(f) as im:
            pixels += im.size[0] * im.size[1]
    return folder, pixels


def reference_loop(folder: Path, out_npy: Path, side: int) -> None:
    """Plain PIL + NumPy: decode every PNG into a preallocated padded array, then np.save it."""
    from PIL import Image

    files = sorted(folder.glob("*.png"))
    arr = np.full((len(files), side, side), 255, np.uint8)
    for i, f in enumerate(files):
        a = np.asarray(Image.open(f))
        arr[i, :a.shape[0], :a.shape[1]] = a
    np.save(out_npy, arr)


def main(argv: list[str] | None = None) -> int:
    from isle_fast.stores.ingest import ingest_labels
    from isle_fast.stores.ingest_engine import _default_workers

    p = bench_parser("ingest", __doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=None, help="label PNGs (default 500, quick 24)")
    args = p.parse_args(argv)
    quick = args.quick
    n = args.images or (24 if quick else 500)
    side = 200 if quick else 500
    k = args.repeat or (1 if quick else 3)
    folder, pixels = make_pngs(n, side)
    with scratch("ingest-out") as work:
        npy = work / "ref.npy"
        store = work / "s.zarr"
        threads = list(dict.fromkeys([1, _default_workers(None)]))
        runs: dict[str, dict[str, list[float]]] = {}

        def timed(key: str, fn) -> None:
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            d = runs.setdefault(key, {"wall": [], "cpu": []})
            d["wall"].append(time.perf_counter() - t0)
            d["cpu"].append(time.process_time() - c0)

        # round-robin (reference, then ours at each thread count), so load changes hit all alike
        for r in range(k + 1):
            timed("ref", lambda: reference_loop(folder, npy, side))
            for w in threads:
                timed(f"isle-{w}", lambda w=w: ingest_labels(folder, store, overwrite=True, workers=w, quiet=True))
            if r == 0:  # warm-up round (page cache, imports)
                runs.clear()
        rows = [{"method": "PIL + NumPy loop -> np.save (reference)", "threads": 1,
                 "seconds": min(runs["ref"]["wall"]), "cpu_seconds": min(runs["ref"]["cpu"]),
                 "bytes_on_disk": dir_bytes(npy)}]
        for w in threads:
            rows.append({"method": "isle ingest labels", "threads": w, "seconds": min(runs[f"isle-{w}"]["wall"]),
                         "cpu_seconds": min(runs[f"isle-{w}"]["cpu"]), "bytes_on_disk": dir_bytes(store)})
        ref = {"best": rows[0]["seconds"]}
        for r in rows:
            r["images_per_s"] = n / r["seconds"]
            r["Mpix_per_s"] = pixels / r["seconds"] / 1e6
            r["speedup_vs_reference"] = ref["best"] / r["seconds"]
            r["cpu_ratio_vs_reference"] = r["cpu_seconds"] / rows[0]["cpu_seconds"]
        png_bytes = dir_bytes(folder)
        print(f"{n} label PNGs ({pixels / 1e6:.1f} Mpix, {png_bytes / 1e6:.1f} MB as PNG), "
              f"cpu_count={os.cpu_count()}")
        print(format_table([{"method": r["method"], "threads": r["threads"], "seconds": f"{r['seconds']:.2f}",
                             "images/s": f"{r['images_per_s']:.0f}", "Mpix/s": f"{r['Mpix_per_s']:.1f}",
                             "x reference": f"{r['speedup_vs_reference']:.2f}",
                             "CPU s": f"{r['cpu_seconds']:.2f}",
                             "MB on disk": f"{r['bytes_on_disk'] / 1e6:.1f}"} for r in rows]))
        best = min(rows[1:], key=lambda r: r["seconds"])
        headline = [headline_row(f"ingest {n} label PNGs ({best['threads']} threads)", best["seconds"],
                                 "PIL + NumPy loop + np.save", ref["best"],
                                 images_per_s=best["images_per_s"], Mpix_per_s=best["Mpix_per_s"])]
        path = write_json("ingest", {"images": n, "pixels": pixels, "png_bytes": png_bytes, "rows": rows,
                                     "headline": headline, "repeat": k}, quick=quick)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
