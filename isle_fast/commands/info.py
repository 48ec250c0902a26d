"""``isle info STORE [--check]``: describe a stack store; with ``--check``, verify every chunk of it."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("stores", nargs="+", metavar="STORE", help="store folder(s) or fsspec URL(s)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument("--check", action="store_true",
                        help="read and verify every chunk of every array (checksums, the store's record "
                             "of its chunks, decoding); name each missing or damaged chunk; exit 0 only "
                             "if all are good")
    parser.add_argument("--quiet", action="store_true", help="no progress bar (--check)")


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def run(args: argparse.Namespace) -> int:
    from isle_fast.errors import StoreError
    from isle_fast.stores.chunks import check_stack
    from isle_fast.stores.stack import open_stack

    infos, bad = [], []
    for p in args.stores:
        stack = open_stack(p)
        d = stack.describe()
        if args.check:
            found = check_stack(stack, progress=not args.quiet)
            d["check"] = found.to_json()
            if not found.ok:
                bad.append(f"{stack.path}: {len(found.problems)} of {found.total} chunks missing or damaged"
                           + (f": {'; '.join(found.problems[:3])}{' ...' if len(found.problems) > 3 else ''}"
                              if args.quiet else ""))  # -q prints no list: the error names them
        infos.append(d)
    if args.json:
        print(json.dumps(infos if len(infos) > 1 else infos[0], indent=2))
    else:
        for d in infos:
            _print(d)
    if bad:
        raise StoreError("; ".join(bad) + (" (listed above)" if not args.json and not args.quiet else ""))
    return 0


def _print(d: dict) -> None:
    ratio = d["compression_ratio"]
    print(f"{d['path']}")
    print(f"  kind        {d['kind']}  (name {d['name']!r})")
    print(f"  encoding    {d['encoding']} ({d['dtype']})")
    if "score_layout" in d:
        per = d.get("classes_per_image")
        bg = d.get("background_level")
        background = ("" if bg is None else "; background stored per pixel" if bg == "stored"
                      else f"; background level {bg}")
        print(f"  layout      {d['score_layout']}" + (f" (classes stored per image: up to {per['max']}, "
                                                      f"mean {per['mean']:.2f}{background})" if per else ""))
    print(f"  classes     {len(d['classes'])}: {', '.join(d['classes'])}")
    print(f"  images      {d['images']}  ({d['pixels']:,} pixels)")
    print(f"  shapes      H {d['image_height']['min']}-{d['image_height']['max']}, "
          f"W {d['image_width']['min']}-{d['image_width']['max']}; padded {tuple(d['padded_shape'])}")
    print(f"  chunks      {tuple(d['chunks'])}")
    print(f"  size        {_size(d['stored_bytes'])} on disk, {_size(d['uncompressed_bytes'])} raw"
          + (f", ratio {ratio:.1f}x" if ratio else ""))
    print(f"  compressors {', '.join(d['compressors']) or 'none'}")
    prov = d["provenance"]
    if prov:
        print("  provenance")
        for k, v in prov.items():
            text = json.dumps(v) if not isinstance(v, str) else v
            print(f"    {k}: {text if len(text) < 200 else text[:197] + '...'}")
    check = d.get("check")
    if check is not None:
        total = sum(check["chunks"].values())
        unchecked = [a for a, ok in check["checksums"].items() if not ok]
        unrecorded = [a for a, ok in check["manifests"].items() if not ok]
        how = "decoded" + ("" if len(unchecked) == len(check["checksums"]) else ", crc32c verified")
        if check["manifests"] and len(unrecorded) < len(check["manifests"]):
            how += ", compared with the store's record"
        notes = []
        if unchecked:
            notes.append(f"no checksums in {', '.join(unchecked)} (a store written before they existed)")
        elif unrecorded:
            notes.append(f"no record of the chunks of {', '.join(unrecorded)}")
        if check["ok"]:
            tail = f"; {'; '.join(notes)}" if notes else ""
            print(f"  check       all {total:,} chunks good ({how}){tail}")
        else:
            print(f"  check       {len(check['problems'])} of {total:,} chunks missing or damaged ({how}):")
            for line in check["problems"]:
                print(f"    {line}")
