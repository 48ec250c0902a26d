"""The ``isle`` command line.

Every subcommand lives in its own module under :mod:`isle_fast.commands` and
provides ``add_arguments(parser)`` and ``run(args) -> int``; its one-line help is in
:data:`COMMANDS`.
Modules are imported only when their command runs (``isle --help`` stays fast
and a missing optional dependency only breaks its own command).

User mistakes (:class:`isle_fast.errors.IsleError`) print one line, ``isle COMMAND: error: ...``
(``COMMAND`` as typed, e.g. ``ingest labels``; the same prefix as argparse's usage errors), naming
command-line flags rather than API parameters (:func:`cli_message`), and exit with status 2; no
traceback. Environment errors (disk full, read-only) exit 1.
Ctrl-C exits 130 and SIGTERM (what batch schedulers send before they kill) 143, both after
the same clean-up: every output's temporary is removed, nothing half-written is kept. A reader
that goes away (``isle evaluate ... | head -1``) ends the command quietly, exit 1.

The commands that do array work (:data:`ARRAY_COMMANDS`) take ``--scheduler ADDRESS`` and run on
that ``dask.distributed`` cluster (or the one Dask's configuration names): :mod:`isle_fast.cluster`.

Options are never abbreviated (``--ov`` is an error, not ``--overwrite``): a prefix that
happens to match today could silently mean another option once one is added.

One style on every command (:func:`one_style`, checked by a test over every parser): ``-o`` is
``--out`` and ``-q`` is ``--quiet`` wherever they exist, and ``--quiet`` means one thing: print
nothing but errors (no progress bars, tables or summaries; stdout is discarded while the command
runs). An unknown option prints the usage of the (sub)command it was given to.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import threading
from typing import Any, Sequence

from isle_fast.errors import IsleError

#: subcommand -> (module, one-line help). Order is the order of ``isle --help``.
#: Flags of the library parameters whose flag is not ``--`` + the name with dashes: an error
#: message names a parameter (:func:`isle_fast.errors.param`), the user sees the flag they typed.
FLAGS = {
    "which": "--checkpoint",       # isle predict
    "chain": "--with",             # isle refine
    "params": "--param",
    "compress": "--compress-level",
    "subset": "--sets",            # isle run (JobSpec.subset)
    "cache_dir": "--cache",
    "method": "--estimator",       # isle evaluate / merge (estimate)
    "thresholds": "--bg-threshold",  # isle evaluate (sweep_thresholds)
    "reps": "--bootstrap",         # isle evaluate (selection_uncertainty)
}

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
    "run": ("isle_fast.commands.run",
            "the whole job from folders: ingest (cached), evaluate, merge, export, report"),
    "bench": ("isle_fast.commands.bench", "run the benchmarks"),
    "demo": ("isle_fast.commands.demo", "make a synthetic VOC-like data set and run the whole pipeline"),
}


#: Commands that do array work: they take ``--scheduler ADDRESS`` (isle_fast/cluster.py), and the
#: local scheduler names they accept instead of an address (the first is the default).
ARRAY_COMMANDS: dict[str, tuple[str, ...]] = {
    "ingest": (), "refine": ("auto", "threads", "processes", "sync"), "evaluate": (), "merge": (),
    "export": (), "report": (), "run": (),
}


class Parser(argparse.ArgumentParser):
    """The parser of ``isle`` and of every subcommand: no abbreviated options.

    Subparsers are made with the class of their parent, so every level, down to
    ``isle ingest labels``, refuses prefixes.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)


#: long option -> its short form, the same on every command that has the long one.
SHORT_FLAGS: dict[str, str] = {"--out": "-o", "--quiet": "-q"}

#: the one meaning of ``--quiet``.
QUIET_HELP = "print nothing but errors: no progress bars, tables or summary"


def one_style(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Give ``parser`` and every subcommand below it the common flags (:data:`SHORT_FLAGS`, the one
    help of ``--quiet``); a short flag already taken for another option is a bug, raised here."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                one_style(sub)
            continue
        for long, short in SHORT_FLAGS.items():
            if long not in action.option_strings or short in action.option_strings:
                continue
            taken = parser._option_string_actions.get(short)
            if taken is not None:
                raise RuntimeError(f"{parser.prog}: {short} is {taken.option_strings}, not {long}")
            action.option_strings = [short, *action.option_strings]
            parser._option_string_actions[short] = action
        if "--quiet" in action.option_strings:
            action.help = QUIET_HELP
    return parser


def leaf_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The (sub)parser that parsed the last command word of ``args`` (``isle ingest labels``'s)."""
    while True:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        name = getattr(args, subs[0].dest, None) if subs else None
        if name is None or name not in subs[0].choices:
            return parser
        parser = subs[0].choices[name]


def cli_message(error: BaseException | str, parser: argparse.ArgumentParser | None = None) -> str:
    """A library error in the command line's words: every parameter the message names
    (:func:`isle_fast.errors.param`) is shown as the flag the user typed.

    The flags are those of ``parser`` (the subcommand that ran: ``overwrite`` -> ``--overwrite``,
    ``subset`` -> ``--sets``), then :data:`FLAGS` and the training settings' own flags; a name none
    of them knows is shown as ``--`` + the name with dashes. The one place where API names are
    translated.
    """
    from isle_fast.options import cli_flags

    flags: dict[str, str] = {**cli_flags(), **FLAGS}
    if parser is not None:
        for action in parser._actions:
            longs = [o for o in action.option_strings if o.startswith("--")]
            if longs and action.dest != "help":
                flags.setdefault(action.dest, longs[0])
    if isinstance(error, IsleError):
        return error.for_cli(flags)
    return str(error)


class Terminated(BaseException):
    """SIGTERM arrived: unwinds the command like Ctrl-C, so every ``except BaseException`` /
    ``finally`` clean-up runs (temporaries removed), then ``isle`` exits 143."""


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; with ``only`` set, just that subcommand's arguments are loaded."""
    from isle_fast import __version__

    parser = Parser(
        prog="isle",
        description="ISLE: class-wise ensemble of weakly supervised segmentation pseudo-labels.",
    )
    parser.add_argument("--version", action="version", version=f"isle-fast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)  # a Parser too: no abbreviations
        if only is None or only == name:
            mod = _load(module, name)
            if mod is not None:
                mod.add_arguments(p)
                if name in ARRAY_COMMANDS:
                    from isle_fast.cluster import add_scheduler_argument

                    add_scheduler_argument(p, local=ARRAY_COMMANDS[name])
    return one_style(parser)


def _load(module: str, name: str):
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name == module:
            return None  # command not built yet
        raise


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``isle`` command; returns the exit status."""
    entry = argv is None   # the ``isle`` process itself, not a Python caller
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    try:
        with _sigterm_unwinds(), _notes_on_stderr():
            rc = _main(argv)
            sys.stdout.flush()   # a reader that went away shows here, not at interpreter exit
        if entry:
            _exit_when_done(rc)
        return rc
    except BrokenPipeError as exc:
        if not _stdout_broken():
            _say(f"isle {command or ''}: error: {_os_error(exc)}")
            return 1
        # Python's docs (signal module, "Note on SIGPIPE"): point stdout at devnull so that the
        # flush at exit does not fail again with "Exception ignored ... BrokenPipeError"
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 1


def _exit_when_done(rc: int) -> None:
    """End the ``isle`` process now that its work is done, without the interpreter's module teardown.

    Python's finalisation after a Numba-using command spends 0.15-0.2 s tearing
    down modules (measured on the 2,400-image ``isle evaluate``, about a tenth of
    the whole process) and does nothing a finished command needs. Everything it
    does that matters is done here first, in the same order: the threads' exit
    hooks and a join of every non-daemon thread (``threading._shutdown``, which
    stops the thread pools), then the ``atexit`` functions (logging's flush, the
    refine pool's shutdown), then stdout and stderr are flushed. Where any of
    that is unavailable, a child process is still alive, or ``ISLE_FAST_EXIT=0``,
    the process ends the ordinary way.
    """
    shutdown = getattr(threading, "_shutdown", None)
    if os.environ.get("ISLE_FAST_EXIT", "1") == "0" or shutdown is None:
        return
    import atexit

    shutdown()
    atexit._run_exitfuncs()
    mp = sys.modules.get("multiprocessing")
    if mp is not None and mp.active_children():
        return
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        return          # the ordinary exit reports it
    os._exit(rc)


def _main(argv: list[str]) -> int:
    command = next((a for a in argv if not a.startswith("-")), None)
    only = command if command in COMMANDS else None
    parser = build_parser(only=only if only else "__none__")
    if not argv:
        parser.print_help()
        return 0
    args, extra = parser.parse_known_args(argv)
    leaf = leaf_parser(parser, args)
    if extra:  # argparse would print the top-level usage; the subcommand's says what it takes
        leaf.error(f"unrecognized arguments: {' '.join(extra)}")
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
    prog = leaf.prog  # "isle ingest labels": the prefix of argparse's errors too
    try:
        with _stdout_discarded(bool(getattr(args, "quiet", False))), _on_cluster(args):
            return int(mod.run(args) or 0)
    except IsleError as exc:
        _quiet_abandoned_coroutines()
        _say(f"{prog}: error: {cli_message(exc, leaf)}")
        return 2
    except KeyboardInterrupt:
        _quiet_abandoned_coroutines()
        _say(f"{prog}: interrupted; no partial output was kept")
        return 130
    except Terminated:
        _quiet_abandoned_coroutines()
        _say(f"{prog}: terminated (SIGTERM); no partial output was kept")
        return 143
    except BrokenPipeError:
        raise
    except OSError as exc:
        # The environment's to fix, not a bug: disk full, permission denied, read-only file
        # system, a folder that cannot be created. One line naming the path, no traceback.
        _quiet_abandoned_coroutines()
        _say(f"{prog}: error: {_os_error(exc)}")
        return 1


class _stdout_discarded:
    """With ``--quiet``: what the command prints on stdout (tables, summaries, step lines) is
    discarded; errors and warnings still reach stderr."""

    def __init__(self, active: bool) -> None:
        self.active = active

    def __enter__(self) -> "_stdout_discarded":
        if self.active:
            self.saved = sys.stdout
            sys.stdout = open(os.devnull, "w", encoding="utf-8")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.active:
            sys.stdout.close()
            sys.stdout = self.saved


def _on_cluster(args: argparse.Namespace):
    """Connected to the scheduler of ``--scheduler`` / Dask's config for an array command, else nothing."""
    import contextlib

    if args.command not in ARRAY_COMMANDS:
        return contextlib.nullcontext()
    from isle_fast.cluster import address_origin, connected, scheduler_address

    given, local = getattr(args, "scheduler", None), ARRAY_COMMANDS[args.command]
    return connected(scheduler_address(given, local=local), origin=address_origin(given, local=local))


class _notes_on_stderr(logging.Handler):
    """While active, the package's warnings (``logging.getLogger('isle_fast')``: a removed leftover of an
    interrupted run, ...) are printed as plain lines on stderr, whatever the logging set-up."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        _say(record.getMessage())

    def __enter__(self) -> "_notes_on_stderr":
        logging.getLogger("isle_fast").addHandler(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        logging.getLogger("isle_fast").removeHandler(self)


class _sigterm_unwinds:
    """While active (main thread only), SIGTERM raises :class:`Terminated` once; a second SIGTERM
    during the clean-up is ignored (SIGKILL still ends the process)."""

    def __enter__(self) -> "_sigterm_unwinds":
        self.old = None
        if threading.current_thread() is threading.main_thread():
            self.old = signal.signal(signal.SIGTERM, self._handle)
        return self

    @staticmethod
    def _handle(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated()

    def __exit__(self, *exc: Any) -> None:
        if self.old is not None:
            signal.signal(signal.SIGTERM, self.old)


def _quiet_abandoned_coroutines() -> None:
    """An interrupt or error that lands inside Zarr's sync wrapper leaves coroutines that never ran or
    never finished; their warnings and "Exception ignored" tracebacks at clean-up are noise after the
    one-line message, not a problem."""
    import inspect
    import warnings

    warnings.filterwarnings("ignore", message=r"coroutine .* was never awaited", category=RuntimeWarning)
    # an object store that failed mid-request (s3fs / aiobotocore) leaves coroutines whose clean-up at
    # exit raises "Exception ignored in: <coroutine ...>" with a traceback: noise after the one-line error
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        if not inspect.iscoroutine(getattr(unraisable, "object", None)):
            previous(unraisable)

    sys.unraisablehook = hook


def _stdout_broken() -> bool:
    """Whether stdout is a pipe whose reader has gone (poll reports POLLERR on it)."""
    import select

    try:
        fd = sys.stdout.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        return any(ev & select.POLLERR for _, ev in poller.poll(0))
    except (AttributeError, ValueError, OSError):
        return False


def _say(text: str) -> None:
    """One line on stderr; a stderr that went away too is not worth a traceback."""
    try:
        print(text, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


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
