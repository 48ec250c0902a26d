"""``isle info STORE``: describe a stack store."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("stores", nargs="+", metavar="STORE", help="store folder(s) or fsspec URL(s)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def run(args: argparse.Namespace) -> int:
    from isle_fast.stores.stack import open_stack

    infos = [open_stack(p).describe() for p in args.stores]
    if args.json:
        print(json.dumps(infos if len(infos) > 1 else infos[0], indent=2))
        return 0
    for d in infos:
        ratio = d["compression_ratio"]
        print(f"{d['path']}")
        print(f"  kind        {d['kind']}  (name {d['name']!r})")
        print(f"  encoding    {d['encoding']} ({d['dtype']})")
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
    return 0
