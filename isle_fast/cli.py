"""The ``isle`` command line.

Every subcommand lives in its own module under :mod:`isle_fast.commands` and
provides ``add_arguments(parser)`` and ``run(args) -> int``; its one-line help is in
:data:`COMMANDS`.
Modules are imported only when their command runs (``isle --help`` stays fast
and a missing optional dependency only breaks its own command).

User mistakes (:class:`isle_fast.errors.IsleError`) print one line, ``isle: error: ...``,
and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from isle_fast.errors import IsleError

#: subcommand -> (module, one-line help). Order is the order of ``isle --help``.
COMMANDS: dict[str, tuple[str, str]] = {
    "ingest": ("isle_fast.commands.ingest", "turn PNG / NPY / TIFF / image folders into stack stores"),
    "info": ("isle_fast.commands.info", "describe a stack store"),
    "refine": ("isle_fast.commands.refine", "step 1: refine a set (AffinityNet random walk, dense CRF, ...)"),
    "evaluate": ("isle_fast.commands.evaluate", "step 2: per-class IoU of every set against ground truth"),
    "merge": ("isle_fast.commands.merge", "steps 2+3: select the best set per class and build the ensemble"),
    "train": ("isle_fast.commands.train", "step 4: train DeepLabV3+ on a label store"),
    "predict": ("isle_fast.commands.predict", "predict masks with a trained DeepLabV3+"),
    "export": ("isle_fast.commands.export", "write a label store as VOC palette PNGs"),
    "report": ("isle_fast.commands.report", "the paper's tables and figures for any data"),
    "bench": ("isle_fast.commands.bench", "run the benchmarks"),
    "demo": ("isle_fast.commands.demo", "make a synthetic VOC-like data set and run the whole pipeline"),
}



def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; with ``only`` set, just that subcommand's arguments are loaded."""
    from isle_fast import __version__

    parser = argparse.ArgumentParser(
        prog="isle",
        description="ISLE: class-wise ensemble of weakly supervised segmentation pseudo-labels.",
    )
    parser.add_argument("--version", action="version", version=f"isle-fast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if only is None or only == name:
            mod = _load(module, name)
            if mod is not None:
                mod.add_arguments(p)
    return parser


def _load(module: str, name: str):
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name == module:
            return None  # command not built yet
        raise


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``isle`` command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    only = command if command in COMMANDS else None
    parser = build_parser(only=only if only else "__none__")
    if not argv:
        parser.print_help()
        return 0
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    mod = _load(COMMANDS[args.command][0], args.command)
    if mod is None:
        parser.error(f"'{args.command}' is not available in this build")
    from isle_fast.backend import tune_allocator
    from isle_fast.process import prepare_process

    prepare_process()  # the process-wide settings, once, here (isle_fast/process.py), never on import
    tune_allocator()  # reuse freed chunk buffers (see its docstring); ISLE_TUNE_MALLOC=0 skips it
    try:
        return int(mod.run(args) or 0)
    except IsleError as exc:
        print(f"isle {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"isle {args.command}: interrupted; no partial output was kept", file=sys.stderr)
        return 130
    except OSError as exc:
        # The environment's to fix, not a bug: disk full, permission denied, read-only file
        # system, a folder that cannot be created. One line naming the path, no traceback.
        print(f"isle {args.command}: error: {_os_error(exc)}", file=sys.stderr)
        return 1


def _os_error(exc: OSError) -> str:
    """``No space left on device (ENOSPC): /path``-style text for an OSError."""
    import errno as _errno

    what = exc.strerror or str(exc) or type(exc).__name__
    code = f" ({_errno.errorcode[exc.errno]})" if isinstance(exc.errno, int) and exc.errno in _errno.errorcode else ""
    where = f": {exc.filename}" if exc.filename else ""
    if exc.filename2:
        where += f" -> {exc.filename2}"
    return f"{what}{code}{where}"


if __name__ == "__main__":
    raise SystemExit(main())
