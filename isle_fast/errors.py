"""Exceptions that mean "the user gave us something wrong".

The command line prints these as one clear line (no traceback) and exits with
status 2. Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["IsleError", "InputError", "StoreError", "AlignmentError"]


class IsleError(Exception):
    """Base class of every error that is the user's to fix."""


class InputError(IsleError, ValueError):
    """An input file, array or argument is malformed; the message names it.

    Also a :class:`ValueError`, so callers can catch bad arguments the usual way.
    """


class StoreError(IsleError):
    """A store is missing, incomplete, of another format version, or inconsistent."""


class AlignmentError(StoreError):
    """Stores of one data set disagree on ids, order, shapes or classes."""
