"""Which Zarr v3 compressor stack stores use: ratio, encode and decode speed on realistic data.

``python -m benchmarks.compression [--quick]``

Data (generated here, seeded): VOC-sized label maps (up to 500 x 500, padded
like a store) of two flavours, ground-truth-like (1-3 smooth objects with the
5-pixel 255 "void" band VOC draws around objects) and pseudo-label-like (the
same objects without the band, slightly eroded / dilated), and CAM-like score
stacks ``(I, H, W, 21)`` (constant background slice, 1-3 smooth class maps,
absent classes 0) stored as uint8 and as float16.

Every codec writes the same array with the store's default chunks into an
in-memory Zarr store (so disk speed does not enter) and reads it back; we
report the compression ratio (raw bytes / stored bytes) and encode / decode
throughput in raw MB/s (best of k). References measured in the same run: no
compression, and the source format of label maps (PNG, PIL's default zlib
level: bytes and decode speed).

``checksum_cost``: what the per-chunk ``crc32c`` checksum of the default codec
chains costs on the read path. The default chains are written with and
without ``crc32c`` into stack stores on local disk (page cache after the
first read), then read back whole through the two paths of
``Stack.to_dask``: the direct chunk reader (one thread, Dask's synchronous
scheduler; it verifies the crc32c and the store's record of its chunks) and
Zarr's read path (``Stack.array[...]``, Zarr's own threads; its ``crc32c``
codec verifies), and the direct reader's decode of every chunk on one thread
(``chunk decode``: its CPU column is thread CPU time, the cleanest measure of
the checksum's cost on a shared machine). Reported as raw MB per second of
wall time and per CPU second of the process, interleaved round-robin, best
round (each timing repeats the read until it lasts 0.25 s).

Writes ``benchmarks/results/compression.json``.
"""

from __future__ import annotations

import io
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .common import bench_parser, best_of, format_table, headline_row, write_json

# --------------------------------------------------------------------------- synthetic data


def voc_like_label(rng: np.random.Generator, h: int, w: int, void_band: bool = True,
                   num_classes: int = 21) -> np.ndarray:
    """One VOC-like label map: background, 1-3 smooth objects, optional 255 band (radius 2) on boundaries."""
    lab = np.zeros((h, w), np.uint8)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for _ in range(int(rng.integers(1, 4))):
        cls = int(rng.integers(1, num_classes))
        cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
        ry, rx = rng.uniform(0.1, 0.4) * h, rng.uniform(0.1, 0.4) * w
        dy, dx = (yy - cy) / ry, (xx - cx) / rx
        theta = np.arctan2(dy, dx)
        wobble = np.ones_like(theta)
        for k in range(2, 7):
            wobble += rng.uniform(0, 0.25 / k * 2) * np.sin(k * theta + rng.uniform(0, 2 * np.pi))
        lab[np.hypot(dy, dx) < wobble] = cls
    if void_band:
        edge = np.zeros((h, w), bool)
        for sy in range(-2, 3):
            for sx in range(-2, 3):
                if sy or sx:
                    shifted = np.roll(np.roll(lab, sy, 0), sx, 1)
                    edge |= shifted != lab
        lab[edge] = 255
    return lab


def voc_shapes(n: int, rng: np.random.Generator, side: int = 500) -> np.ndarray:
    """VOC-like image sizes: one side 500, the other 330..500 (70 % landscape)."""
    short = rng.integers(int(side * 0.66), side + 1, n)
    portrait = rng.random(n) < 0.3
    return np.stack([np.where(portrait, side, short), np.where(portrait, short, side)], 1)


def label_batch(n: int, seed: int = 0, side: int = 500, void_band: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """``(n, side, side)`` padded label maps (padding 255) and their true shapes."""
    rng = np.random.default_rng(seed)
    shapes = voc_shapes(n, rng, side)
    out = np.full((n, side, side), 255, np.uint8)
    for i, (h, w) in enumerate(shapes):
        out[i, :h, :w] = voc_like_label(rng, int(h), int(w), void_band)
    return out, shapes


def score_batch(n: int, seed: int = 0, side: int = 320, num_classes: int = 21) -> np.ndarray:
    """``(n, side, side, C)`` float32 CAM-like stacks in [0, 1] (background slice = 0.15)."""
    rng = np.random.default_rng(seed)
    out = np.zeros((n, side, side, num_classes), np.float32)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side
    for i in range(n):
        out[i, ..., 0] = 0.15
        for c in rng.choice(np.arange(1, num_classes), int(rng.integers(1, 4)), replace=False):
            cy, cx, s = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.08, 0.25)
            m = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
            m += 0.05 * rng.random(m.shape, dtype=np.float32)  # CAMs are not perfectly smooth
            out[i, ..., c] = m / m.max()
    return out


# --------------------------------------------------------------------------- codecs
def codecs() -> dict[str, Callable[[], tuple]]:
    """Candidate compressor chains by name (factories: a fresh codec object per use)."""
    from zarr.codecs import BloscCodec, GzipCodec, ZstdCodec

    c: dict[str, Callable[[], tuple]] = {"none": lambda: ()}
    for level in (1, 3, 5):  # higher levels encode at ~1 MB/s: too slow for ingest
        for shuffle in ("noshuffle", "bitshuffle", "shuffle"):
            c[f"blosc-zstd{level}-{shuffle}"] = (lambda lv=level, sh=shuffle:
                                                  (BloscCodec(cname="zstd", clevel=lv, shuffle=sh),))
    for level in (1, 5, 9):
        for shuffle in ("noshuffle", "bitshuffle"):
            c[f"blosc-lz4-{level}-{shuffle}"] = (lambda lv=level, sh=shuffle:
                                                 (BloscCodec(cname="lz4", clevel=lv, shuffle=sh),))
    c["blosc-lz4hc5-noshuffle"] = lambda: (BloscCodec(cname="lz4hc", clevel=5, shuffle="noshuffle"),)
    for level in (1, 3, 5):
        c[f"zstd{level}"] = lambda lv=level: (ZstdCodec(level=lv),)
    for level in (1, 6):
        c[f"gzip{level}"] = lambda lv=level: (GzipCodec(level=lv),)
    return c


def measure(data: np.ndarray, chunks: tuple[int, ...], make: Callable[[], tuple], k: int) -> dict[str, Any]:
    """Ratio and encode / decode MB/s of one codec chain on ``data`` (in-memory Zarr store)."""
    import zarr
    from zarr.storage import MemoryStore

    holder: dict[str, Any] = {}

    def encode():
        store = MemoryStore()
        arr = zarr.create_array(store, shape=data.shape, chunks=chunks, dtype=data.dtype, compressors=make(),
                                fill_value=0)
        arr[...] = data
        holder["store"], holder["arr"] = store, arr

    enc = best_of(encode, k=k, warmup=0, max_seconds=3.0)
    store = holder["store"]
    stored = sum(len(v) for v in store._store_dict.values())  # chunk bytes + metadata
    arr = zarr.open_array(store, mode="r")

    def decode():
        return arr[...]

    dec = best_of(decode, k=k, warmup=1, max_seconds=3.0)
    back = dec.pop("value")
    if not np.array_equal(back, data):
        raise AssertionError("round trip changed the data")
    mb = data.nbytes / 1e6
    return {"ratio": data.nbytes / stored, "stored_bytes": stored, "encode_MBps": mb / enc["best"],
            "decode_MBps": mb / dec["best"], "encode_s": enc["best"], "decode_s": dec["best"]}


def png_reference(batch: np.ndarray, shapes: np.ndarray, k: int) -> dict[str, Any]:
    """Bytes and decode speed of the same label maps as palette PNGs (the usual source format)."""
    from PIL import Image

    blobs = []
    t0 = time.perf_counter()
    for im, (h, w) in zip(batch, shapes):
        buf = io.BytesIO()
        Image.fromarray(im[:h, :w]).save(buf, format="PNG")
        blobs.append(buf.getvalue())
    enc_s = time.perf_counter() - t0
    raw = int((shapes[:, 0] * shapes[:, 1]).sum())

    def decode():
        for b in blobs:
            np.asarray(Image.open(io.BytesIO(b)))

    dec = best_of(decode, k=k, warmup=0)
    size = sum(len(b) for b in blobs)
    return {"ratio": raw / size, "stored_bytes": size, "encode_MBps": raw / 1e6 / enc_s,
            "decode_MBps": raw / 1e6 / dec["best"], "note": "unpadded pixels only"}


#: Candidates timed again, round-robin, after the sweep (the sweep's single timings are noisy on a shared machine).
FINALISTS = ("none", "zstd1", "zstd3", "blosc-zstd1-noshuffle", "blosc-zstd3-noshuffle", "blosc-zstd5-noshuffle",
             "blosc-zstd3-shuffle", "blosc-lz4-5-noshuffle", "blosc-lz4hc5-noshuffle")


def numcodec(name: str, itemsize: int):
    """The numcodecs object behind a finalist's Zarr codec (same library, same settings)."""
    import numcodecs

    if name == "none":
        return None
    if name.startswith("zstd"):
        return numcodecs.Zstd(level=int(name[4:]))
    if name.startswith("gzip"):
        return numcodecs.GZip(level=int(name[4:]))
    import re

    m = re.fullmatch(r"blosc-(zstd|lz4hc|lz4)-?(\d+)-(noshuffle|shuffle|bitshuffle)", name)
    cname, level, shuffle = m.group(1), int(m.group(2)), m.group(3)
    sh = {"noshuffle": numcodecs.Blosc.NOSHUFFLE, "shuffle": numcodecs.Blosc.SHUFFLE,
          "bitshuffle": numcodecs.Blosc.BITSHUFFLE}[shuffle]
    return numcodecs.Blosc(cname=cname, clevel=level, shuffle=sh, blocksize=0)


def finalists(data: np.ndarray, chunks: tuple[int, ...], rounds: int,
              names: tuple[str, ...] = FINALISTS) -> dict[str, dict[str, float]]:
    """Single-thread CPU cost of encoding / decoding every chunk with each finalist.

    Timed with ``time.thread_time`` (CPU seconds of this thread), so other
    processes on a shared machine do not inflate it, and interleaved
    round-robin; the best round counts. Reported as raw MB per CPU-second:
    the throughput of one core (Zarr decodes chunks on several threads).
    """
    names = tuple(n for n in names if not (data.dtype.itemsize == 1 and n.endswith("-shuffle")))
    blocks = []
    for idx in np.ndindex(*[int(np.ceil(s / c)) for s, c in zip(data.shape, chunks)]):
        sl = tuple(slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(idx, chunks, data.shape))
        blocks.append(np.ascontiguousarray(data[sl]))
    enc = {n: [] for n in names}
    dec = {n: [] for n in names}
    sizes = {}
    for r in range(rounds + 1):  # round 0 warms up
        for n in names:
            codec = numcodec(n, data.dtype.itemsize)
            if codec is None:
                t0 = time.thread_time()
                bufs = [b.tobytes() for b in blocks]
                t1 = time.thread_time()
                for b, blk in zip(bufs, blocks):
                    np.frombuffer(b, dtype=data.dtype).reshape(blk.shape).copy()
                t2 = time.thread_time()
            else:
                t0 = time.thread_time()
                bufs = [codec.encode(b) for b in blocks]
                t1 = time.thread_time()
                for b, blk in zip(bufs, blocks):
                    out = np.empty(blk.shape, data.dtype)
                    codec.decode(b, out=out)
                t2 = time.thread_time()
            sizes[n] = sum(len(b) for b in bufs)
            if r:
                enc[n].append(t1 - t0)
                dec[n].append(t2 - t1)
    mb = data.nbytes / 1e6
    return {n: {"encode_MBps": mb / max(min(enc[n]), 1e-9), "decode_MBps": mb / max(min(dec[n]), 1e-9),
                "codec_ratio": data.nbytes / sizes[n], "timing": "thread CPU time, one core"} for n in names}


#: A default must decode and encode at least this fast on one core (raw MB per CPU-second): decoding
#: then costs a small fraction of the kernels' time, and encoding a small fraction of an ingest or merge
#: (PNG decoding runs at ~100 MB/s per core).
#: Scores get a lower encode bar: loading, validating and quantising CAM files (float32, 4x the stored
#: bytes) runs slower than a 400 MB/s encoder, so it does not bound a score ingest.
MIN_DECODE_MBPS = 1000.0
MIN_ENCODE_MBPS = {"labels": 1000.0, "scores": 400.0}


def pick(rows_by_dataset: list[list[dict[str, Any]]], min_encode: float) -> dict[str, Any]:
    """The finalist that stores the data sets of one encoding in the fewest bytes while fast enough everywhere.

    Fast enough: single-core decode >= :data:`MIN_DECODE_MBPS` and encode >=
    ``min_encode`` MB/s on every data set of the group.
    """
    names = [r["codec"] for r in rows_by_dataset[0] if r.get("finalist") and r["codec"] != "none"]
    best = None
    for n in names:
        rs = [next(r for r in rows if r["codec"] == n) for rows in rows_by_dataset]
        fast = all(r["decode_MBps"] >= MIN_DECODE_MBPS and r["encode_MBps"] >= min_encode for r in rs)
        total = sum(r["stored_bytes"] for r in rs)
        cand = {"codec": n, "fast_enough": fast, "stored_bytes": total,
                "min_decode_MBps": min(r["decode_MBps"] for r in rs),
                "min_encode_MBps": min(r["encode_MBps"] for r in rs)}
        if fast and (best is None or total < best["stored_bytes"]):
            best = cand
    return best or {"codec": None}


def _stack_store(path: Any, data: np.ndarray, chunks: tuple[int, ...], checksum: bool) -> Any:
    """``data`` written as a stack store with the default codecs, with or without ``crc32c``."""
    from isle_fast.stores.stack import create_stack, default_compressors

    scores = data.ndim == 4
    classes = [f"c{i}" for i in range(data.shape[3] if scores else 21)]
    n, h, w = data.shape[:3]
    enc = "scores" if scores else "labels"
    with create_stack(path, kind="pseudo", classes=classes, ids=[f"i{i}" for i in range(n)],
                      shapes=[(h, w)] * n, encoding=enc, score_dtype=str(data.dtype), chunks=chunks,
                      compressors=default_compressors(enc, checksum=checksum), overwrite=True) as wr:
        wr.write_block(0, data)
    return wr.path


def _decode_every_chunk(stack: Any) -> np.ndarray:
    """Every chunk of the main array through the direct reader's decode, on this thread."""
    from isle_fast.stores.chunks import decode_chunk
    from isle_fast.stores.stack import _fast_chunk_spec

    spec = _fast_chunk_spec(stack.array)
    out = np.empty(stack.array.shape, stack.array.dtype)
    for coords in np.ndindex(*spec.names.grid):
        block = decode_chunk(spec, coords)
        sl = tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(coords, spec.chunk_shape, out.shape))
        out[sl] = block[tuple(slice(0, s.stop - s.start) for s in sl)]
    return out


def checksum_cost(datasets: dict[str, tuple[np.ndarray, tuple[int, ...]]],
                  rounds: int) -> list[dict[str, Any]]:
    """Read throughput of stores with and without ``crc32c``, through the direct reader and Zarr's path."""
    import shutil
    import tempfile

    from isle_fast.stores.stack import open_stack

    from .common import tmp_dir

    rows = []
    work = Path(tempfile.mkdtemp(prefix="checksum-", dir=tmp_dir()))
    try:
        for name, (data, chunks) in datasets.items():
            stacks = {crc: open_stack(_stack_store(work / f"{name}-{crc}.zarr", data, chunks, crc))
                      for crc in (True, False)}
            readers = {"direct": lambda st: st.to_dask().compute(scheduler="sync"),
                       "zarr": lambda st: st.array[...],
                       "chunk decode": _decode_every_chunk}
            best: dict[tuple[str, bool], tuple[float, float]] = {}
            inner: dict[str, int] = {}
            for reader, fn in readers.items():     # warm-up, check, and reads per timing (>= 0.25 s each)
                for crc, st in stacks.items():
                    t0 = time.perf_counter()
                    if not np.array_equal(fn(st), data):
                        raise AssertionError(f"{name}: {reader} read changed the data")
                    once = time.perf_counter() - t0
                    inner[reader] = max(inner.get(reader, 1), int(np.ceil(0.25 / max(once, 1e-6))))
            for _ in range(rounds):
                for reader, fn in readers.items():
                    clock = time.thread_time if reader == "chunk decode" else time.process_time
                    for crc, st in stacks.items():
                        w0, c0 = time.perf_counter(), clock()
                        for _ in range(inner[reader]):
                            fn(st)
                        wall = (time.perf_counter() - w0) / inner[reader]
                        cpu = (clock() - c0) / inner[reader]
                        old = best.get((reader, crc), (np.inf, np.inf))
                        best[reader, crc] = (min(old[0], wall), min(old[1], cpu))
            mb = data.nbytes / 1e6
            for reader in readers:
                on, off = best[reader, True], best[reader, False]
                rows.append({"data": name, "reader": reader, "raw_bytes": int(data.nbytes),
                             "reads_per_timing": inner[reader],
                             "seconds_crc32c": on[0], "seconds_without": off[0],
                             "MBps_crc32c": mb / on[0], "MBps_without": mb / off[0],
                             "cpu_MBps_crc32c": mb / on[1], "cpu_MBps_without": mb / off[1],
                             "wall_overhead": on[0] / off[0] - 1.0, "cpu_overhead": on[1] / off[1] - 1.0,
                             "stored_bytes_crc32c": stacks[True].stored_bytes(),
                             "stored_bytes_without": stacks[False].stored_bytes()})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    from isle_fast.stores.stack import default_chunks, default_compressors

    p = bench_parser("compression", __doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=None, help="label maps per data set (default 132, quick 12)")
    args = p.parse_args(argv)
    quick = args.quick
    k = args.repeat or (1 if quick else 3)
    n_lab = args.images or (12 if quick else 132)
    n_sc = 3 if quick else 12
    side = 200 if quick else 500

    datasets: dict[str, tuple[np.ndarray, tuple[int, ...]]] = {}
    gt, shapes = label_batch(n_lab, seed=1, side=side, void_band=True)
    pseudo, _ = label_batch(n_lab, seed=2, side=side, void_band=False)
    datasets["labels-gt"] = (gt, default_chunks(*gt.shape))
    datasets["labels-pseudo"] = (pseudo, default_chunks(*pseudo.shape))
    sc = score_batch(n_sc, seed=3, side=side if quick else 320)
    sc8 = np.rint(sc * 255).astype(np.uint8)
    sc16 = sc.astype(np.float16)
    datasets["scores-uint8"] = (sc8, default_chunks(sc8.shape[0], sc8.shape[1], sc8.shape[2], sc8.shape[3], 1))
    datasets["scores-float16"] = (sc16, default_chunks(sc16.shape[0], sc16.shape[1], sc16.shape[2], sc16.shape[3],
                                                       2))
    del sc

    cands = codecs()
    results: dict[str, Any] = {}
    for name, (data, chunks) in datasets.items():
        rows = []
        for cname, make in cands.items():
            r = measure(data, chunks, make, k)
            rows.append({"codec": cname, **r})
        fin = finalists(data, chunks, rounds=3 if quick else 7)
        for r in rows:
            if r["codec"] in fin:
                r.update(fin[r["codec"]])
                r["finalist"] = True
        if name.startswith("labels"):
            ref = png_reference(data, shapes if name == "labels-gt" else label_batch(n_lab, 2, side, False)[1], k)
            rows.append({"codec": "png", **ref})
        results[name] = {"shape": list(data.shape), "dtype": str(data.dtype), "chunks": list(chunks),
                         "raw_bytes": int(data.nbytes), "rows": rows}
        print(f"\n{name}: {data.shape} {data.dtype}, chunks {chunks}, {data.nbytes / 1e6:.1f} MB raw")
        print(format_table([{"codec": r["codec"] + (" *" if r.get("finalist") else ""), "ratio": f"{r['ratio']:.1f}",
                             "encode MB/s": f"{r['encode_MBps']:.0f}", "decode MB/s": f"{r['decode_MBps']:.0f}"}
                            for r in rows]))
        print("* finalist: speeds are single-core CPU MB/s (thread CPU time, best of round-robin runs); "
              "others: wall-clock through Zarr, one run, noisy on a shared machine")

    picks = {group: pick([results[n]["rows"] for n in results if n.startswith(group)], MIN_ENCODE_MBPS[group])
             for group in ("labels", "scores")}
    for group, pk in picks.items():
        print(f"\npick for {group} (fewest bytes over the {group} data sets among finalists with one-core decode "
              f">= {MIN_DECODE_MBPS:.0f} and encode >= {MIN_ENCODE_MBPS[group]:.0f} MB/s): {pk['codec']}")
    crc_rows = checksum_cost({n: datasets[n] for n in ("labels-gt", "scores-uint8")},
                             rounds=3 if quick else 7)
    print("\nchecksum_cost: reading whole stores (local disk, page cache) with and without the crc32c "
          "checksum of the default codec chains; raw MB/s of wall time and per process CPU second, best "
          "of interleaved rounds")
    print(format_table([{"data": r["data"], "reader": r["reader"],
                         "MB/s crc32c": f"{r['MBps_crc32c']:.0f}", "MB/s without": f"{r['MBps_without']:.0f}",
                         "wall cost": f"{100 * r['wall_overhead']:+.1f} %",
                         "CPU MB/s crc32c": f"{r['cpu_MBps_crc32c']:.0f}",
                         "CPU MB/s without": f"{r['cpu_MBps_without']:.0f}",
                         "CPU cost": f"{100 * r['cpu_overhead']:+.1f} %"} for r in crc_rows]))
    current = {enc: [c.to_dict() for c in default_compressors(enc)] for enc in ("labels", "scores", "rgb")}
    headline = []
    for name in datasets:
        rows = {r["codec"]: r for r in results[name]["rows"]}
        chosen = _current_name(current["scores" if name.startswith("scores") else "labels"])
        if chosen in rows:
            r = rows[chosen]
            none = rows["none"]
            mb = results[name]["raw_bytes"] / 1e6  # one-core CPU seconds to decode the data set
            headline.append(headline_row(f"{name}: {chosen} ratio {r['ratio']:.1f}x, one-core decode "
                                         f"{r['decode_MBps']:.0f} MB/s", mb / r["decode_MBps"],
                                         "uncompressed (memory copy)", mb / none["decode_MBps"], ratio=r["ratio"],
                                         decode_MBps=r["decode_MBps"]))
    for r in crc_rows:
        headline.append(headline_row(f"{r['data']}: read ({r['reader']} path) with crc32c checksums",
                                     r["seconds_crc32c"], "without", r["seconds_without"],
                                     wall_overhead=r["wall_overhead"], cpu_overhead=r["cpu_overhead"]))
    path = write_json("compression", {"datasets": results, "picks": picks, "defaults": current, "headline": headline,
                                      "checksum_cost": crc_rows, "repeat": k}, quick=quick)
    print(f"\ndefaults in store.py: {current}")
    print(f"wrote {path}")
    return 0


def _current_name(dicts: list[dict]) -> str:
    if not dicts:
        return "none"
    d = dicts[0]
    conf = d.get("configuration", {})
    if d["name"] == "blosc":
        if conf.get("cname") == "lz4":
            return f"blosc-lz4-{conf['clevel']}-{conf['shuffle']}"
        return f"blosc-{conf['cname']}{conf['clevel']}-{conf['shuffle']}"
    if d["name"] == "zstd":
        return f"zstd{conf.get('level')}"
    if d["name"] == "gzip":
        return f"gzip{conf.get('level')}"
    return d["name"]


if __name__ == "__main__":
    sys.exit(main())
