"""``isle bench [--quick] [--only NAME,...]``: run the benchmarks (same as ``python -m benchmarks``).

The benchmarks live in the ``benchmarks/`` folder of a source checkout (they
are not installed with the package); run this from the checkout.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from isle_fast.errors import InputError

HELP = "run the benchmarks (python -m benchmarks)"


def _benchmarks_main():
    try:
        return importlib.import_module("benchmarks.__main__")
    except ModuleNotFoundError as exc:
        if exc.name not in ("benchmarks", "benchmarks.__main__"):
            raise
    # Not importable from the working directory: try the checkout this package was installed from.
    root = Path(__file__).resolve().parents[2]
    if (root / "benchmarks" / "__main__.py").is_file():
        sys.path.insert(0, str(root))
        return importlib.import_module("benchmarks.__main__")
    raise InputError("the benchmarks/ folder was not found: run `isle bench` from an isle-fast source checkout")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes for every benchmark (a smoke test; the numbers mean nothing)")
    parser.add_argument("--only", default=None, metavar="NAME,...",
                        help="comma-separated subset of: kernels, ingest, compression, refine, train, gpu, "
                             "scaling, pipeline")
    parser.add_argument("--out", default=None, metavar="DIR", help="results folder (default benchmarks/results)")
    parser.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                        help="stop a benchmark module that runs longer than this")
    parser.add_argument("--summary-only", action="store_true",
                        help="run nothing: rebuild summary.json / SUMMARY.md from the results already there")


def run(args: argparse.Namespace) -> int:
    mod = _benchmarks_main()
    if args.only:
        unknown = [n for n in args.only.split(",") if n.strip() and n.strip() not in mod.MODULES]
        if unknown:
            raise InputError(f"--only: unknown benchmark(s) {', '.join(unknown)}; "
                             f"choose from {', '.join(mod.MODULES)}")
    return mod.run(args)
