"""Score storage at CAM ingest: what keeping every pixel's argmax costs, against plain rounding and floats.

``python -m benchmarks.score_storage [--quick] [--images N]``

Data: N IRN-style CAM files (``{"keys", "cam", "high_res"}`` pickled ``.npy``,
1-3 smooth max-normalised blobs plus noise, 375 x 500; 21 VOC classes),
written once to ``benchmarks/results/tmp`` (cached between runs).

Measured (best of k after a warm-up, one worker):

* ``isle ingest scores`` into ``uint8`` (the default: ``quantize_scores``,
  argmax kept), ``float16`` and ``float32``: seconds per image, bytes on disk,
  and the pixels whose decode (the stored background slice, argmax) differs
  from IRN's ``eval_cam.py`` on the files (pad the 0.15 threshold, argmax);
* the quantisation step alone on the same decoded stacks: plain
  ``np.rint(255 * s)`` (what ingest did before) against ``quantize_scores``,
  and the pixels plain rounding decodes differently (the exact ties it makes),
  with the size of a store of the plainly rounded stacks.

Writes ``benchmarks/results/score_storage.json``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .common import (
    bench_parser,
    best_of,
    dir_bytes,
    fill_once,
    format_table,
    headline_row,
    scratch,
    tmp_dir,
    write_json,
)

THRESHOLD = 0.15


def make_cams(n: int, h: int, w: int, seed: int = 5) -> Path:
    """Write (or reuse) ``n`` IRN-style CAM files; returns the folder."""
    def write(folder: Path) -> None:
        rng = np.random.default_rng(seed)
        yy, xx = np.mgrid[:h, :w] / max(h, w)
        for i in range(n):
            k = int(rng.integers(1, 4))
            keys = np.sort(rng.choice(20, k, replace=False))
            cams = []
            for _ in range(k):
                cy, cx, r = rng.random(3) * [0.75, 1.0, 0.3] + [0.0, 0.0, 0.1]
                c = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r)) + 0.05 * rng.random((h, w))
                cams.append((c / c.max()).astype(np.float32))  # max-normalised, as IRN's make_cam saves them
            hr = np.stack(cams)
            np.save(folder / f"2007_{i:06d}.npy", {"keys": keys, "cam": hr[:, ::4, ::4], "high_res": hr})

    return fill_once(tmp_dir() / f"score-storage-cams-{n}-{h}x{w}-{seed}", write)


def irn_decode(path: Path) -> np.ndarray:
    d = np.load(path, allow_pickle=True).item()
    cams = np.pad(d["high_res"], ((1, 0), (0, 0), (0, 0)), mode="constant", constant_values=THRESHOLD)
    return np.pad(d["keys"] + 1, (1, 0), mode="constant")[np.argmax(cams, axis=0)]


def main(argv: list[str] | None = None) -> int:
    from isle_fast.kernels.cpu import decode_scores
    from isle_fast.stores.formats import read_scores
    from isle_fast.stores.ingest import ingest_scores
    from isle_fast.stores.ingest_arrays import ingest_arrays
    from isle_fast.stores.stack import VOC_CLASSES, quantize_scores

    p = bench_parser("score_storage", __doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=None, help="CAM files (default 100, quick 6)")
    args = p.parse_args(argv)
    quick = args.quick
    n = args.images or (6 if quick else 100)
    h, w = (60, 80) if quick else (375, 500)
    k = args.repeat or (1 if quick else 3)
    folder = make_cams(n, h, w)
    files = sorted(folder.glob("*.npy"))
    truth = {f.stem: irn_decode(f) for f in files}
    classes = list(VOC_CLASSES)
    with scratch("score-storage-out") as work:
        rows = []
        for dtype in ("uint8", "float16", "float32"):
            out = work / f"{dtype}.zarr"
            # one warm-up run (page cache, Numba), then the best of k
            timing = best_of(lambda: ingest_scores(folder, out, classes=classes, allow_pickle=True,
                                                   score_dtype=dtype, bg_threshold=THRESHOLD, workers=1,
                                                   overwrite=True, quiet=True), k)
            best, st = timing.best, timing.value
            wrong = sum(int((decode_scores(st.read_image(i)) != truth[i]).sum()) for i in st.ids)
            label = f"ingest, {dtype}" + (" (default, argmax kept)" if dtype == "uint8" else "")
            rows.append({"storage": label, "ms_per_image": 1e3 * best / n, "bytes_on_disk": dir_bytes(out),
                         "pixels_wrong": wrong})
        # the quantisation step alone, on the stacks ingest hands over
        stacks = [read_scores(str(f), len(classes), allow_pickle=True, bg_threshold=THRESHOLD) for f in files]
        times = {}
        for name, fn in (("plain", lambda s: np.rint(s * 255.0).astype(np.uint8)), ("kept", quantize_scores)):
            timing = best_of(lambda fn=fn: [fn(s) for s in stacks], k)
            times[name] = (timing.best, timing.value)
        plain = times["plain"][1]
        plain_wrong = sum(int((decode_scores(q) != truth[f.stem]).sum()) for q, f in zip(plain, files))
        plain_store = work / "plain.zarr"
        ingest_arrays(plain, plain_store, ids=[f.stem for f in files], classes=classes, encoding="scores",
                      quiet=True)
        pixels = sum(t.size for t in truth.values())
        rows.append({"storage": "uint8, plain rint (before)", "ms_per_image": None,
                     "bytes_on_disk": dir_bytes(plain_store), "pixels_wrong": plain_wrong})
        print(f"{n} IRN-style CAM files of {h} x {w} ({pixels / 1e6:.1f} Mpix), threshold {THRESHOLD}, "
              "1 worker")
        print(format_table([{"storage": r["storage"],
                             "ms/image": "-" if r["ms_per_image"] is None else f"{r['ms_per_image']:.1f}",
                             "MB on disk": f"{r['bytes_on_disk'] / 1e6:.2f}",
                             "decoded unlike IRN": f"{r['pixels_wrong']} px "
                                                   f"({100 * r['pixels_wrong'] / pixels:.3f} %)"}
                            for r in rows]))
        step = {name: 1e3 * t / n for name, (t, _) in times.items()}
        print(f"quantisation step alone: plain rint {step['plain']:.1f} ms/image, "
              f"quantize_scores {step['kept']:.1f} ms/image")
        headline = [headline_row(f"uint8 quantisation keeping argmax, {h}x{w}x21", times["kept"][0] / n,
                                 "plain np.rint(255 s)", times["plain"][0] / n,
                                 plain_pixels_wrong=plain_wrong, pixels=pixels)]
        path = write_json("score_storage", {"images": n, "shape": [h, w], "threshold": THRESHOLD,
                                            "rows": rows, "quantize_ms_per_image": step,
                                            "headline": headline, "repeat": k}, quick=quick)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
