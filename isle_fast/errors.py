"""Exceptions that mean "the user gave us something wrong".

The command line prints these as one clear line (no traceback) and exits with
status 2. Everything else is a bug and keeps its traceback.

A message names an argument with :func:`param`: a Python caller reads the
parameter (``average must be one of ...``, ``backend='gpu': ...``), while the
command line shows the flag the user typed (``--average must be one of ...``,
``--backend gpu: ...``) through :meth:`IsleError.for_cli`.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

__all__ = ["IsleError", "InputError", "StoreError", "AlignmentError", "param", "plain"]

_OPEN, _SEP, _CLOSE = "\x1f", "\x1e", "\x1d"
_PARAM = re.compile(f"{_OPEN}([^{_SEP}{_CLOSE}]*)(?:{_SEP}([^{_SEP}]*){_SEP}([^{_CLOSE}]*))?{_CLOSE}")
_NO_VALUE = object()


def param(name: str, value: Any = _NO_VALUE) -> str:
    """How a message names the argument ``name`` (optionally with the ``value`` given).

    In the message a Python caller reads: ``name``, or ``name=<repr(value)>``.
    On the command line (:meth:`IsleError.for_cli`): the flag, ``--name-with-dashes``
    or the one the CLI maps the name to, and ``--flag value``; for ``value`` True (a
    switch such as ``upsample=True``) the flag alone, ``--upsample``.

    Examples
    --------
    >>> from isle_fast.errors import InputError, param
    >>> str(InputError(f"{param('average')} must be one of dataset, image"))
    'average must be one of dataset, image'
    >>> InputError(f"{param('backend', 'gpu')}: no CUDA device").for_cli()
    '--backend gpu: no CUDA device'
    >>> e = InputError(f"pass {param('upsample', True)} to resize it")
    >>> str(e), e.for_cli()
    ('pass upsample=True to resize it', 'pass --upsample to resize it')
    """
    if value is _NO_VALUE:
        return f"{_OPEN}{name}{_CLOSE}"
    typed = "" if value is True else str(value)
    return f"{_OPEN}{name}{_SEP}{value!r}{_SEP}{typed}{_CLOSE}"


def plain(message: str) -> str:
    """``message`` as a Python caller reads it: every :func:`param` in it as the parameter's name.

    For a reason kept as text rather than raised (a skipped file's, in a store's provenance or a
    summary), where no :class:`IsleError` renders it.

    Examples
    --------
    >>> plain(f"pass {param('upsample', True)} to resize it")
    'pass upsample=True to resize it'
    """
    return _render(message, None)


def _render(template: str, flags: Mapping[str, str] | None) -> str:
    def one(m: re.Match) -> str:
        name, shown, typed = m.group(1), m.group(2), m.group(3)
        if flags is None:
            return name if shown is None else f"{name}={shown}"
        flag = flags.get(name) or "--" + name.replace("_", "-")
        return flag if not typed else f"{flag} {typed}"

    return _PARAM.sub(one, template)


class IsleError(Exception):
    """Base class of every error that is the user's to fix."""

    def __init__(self, *args: Any) -> None:
        if args and isinstance(args[0], str) and _OPEN in args[0]:
            self.template = args[0]
            args = (_render(args[0], None),) + args[1:]
        super().__init__(*args)

    def for_cli(self, flags: Mapping[str, str] | None = None) -> str:
        """The message with every :func:`param` shown as its command-line flag.

        ``flags`` maps parameter names to flags where the flag is not
        ``--`` + the name with dashes.
        """
        template = getattr(self, "template", None)
        return str(self) if template is None else _render(template, flags or {})


class InputError(IsleError, ValueError):
    """An input file, array or argument is malformed; the message names it.

    Also a :class:`ValueError`, so callers can catch bad arguments the usual way.
    """


class StoreError(IsleError):
    """A store is missing, incomplete, of another format version, or inconsistent."""


class AlignmentError(StoreError):
    """Stores of one data set disagree on ids, order, shapes or classes."""
