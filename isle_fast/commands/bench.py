"""``isle bench [--quick] [--only NAME,...]``: run the benchmarks (same as ``python -m benchmarks``).

The benchmark modules are installed with the package as ``isle_fast_benchmarks`` (the
``benchmarks/`` folder of the repository), so ``isle bench`` runs the same from a source
checkout and from an installed wheel, and never imports some other installed package
that happens to be called ``benchmarks``. From a wheel the results go to
``./benchmark-results`` (``--out`` to choose).
"""

from __future__ import annotations

import argparse
import importlib

from isle_fast.errors import InputError


def _benchmarks_main():
    try:
        return importlib.import_module("isle_fast_benchmarks.__main__")
    except ModuleNotFoundError as exc:
        if exc.name not in ("isle_fast_benchmarks", "isle_fast_benchmarks.__main__"):
            raise
    raise InputError("the benchmarks (package isle_fast_benchmarks) are not installed: reinstall isle-fast "
                     "(in a source checkout: pip install -e .)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes for every benchmark (a smoke test; the numbers mean nothing)")
    parser.add_argument("--only", default=None, metavar="NAME,...",
                        help="comma-separated subset of: kernels, ingest, compression, refine, train, gpu, "
                             "scaling, pipeline")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="results folder (default benchmarks/results in a checkout, ./benchmark-results "
                             "when installed)")
    parser.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                        help="stop a benchmark module that runs longer than this")
    parser.add_argument("--summary-only", action="store_true",
                        help="run nothing: rebuild summary.json / SUMMARY.md from the results already there")
    parser.add_argument("--quiet", action="store_true")  # help and meaning: isle_fast.cli.one_style


def run(args: argparse.Namespace) -> int:
    mod = _benchmarks_main()
    if args.only:
        unknown = [n for n in args.only.split(",") if n.strip() and n.strip() not in mod.MODULES]
        if unknown:
            raise InputError(f"--only: unknown benchmark(s) {', '.join(unknown)}; "
                             f"choose from {', '.join(mod.MODULES)}")
    return mod.run(args)
