"""Settings defined once: dataclass fields that also make the Python API, the CLI and the docs.

A settings dataclass declares each setting as a field made by :func:`option`: its type
(the annotation), its default, a help text and what the command line needs (flag,
metavar, choices, bounds). From that one definition

* :func:`build` checks and converts keyword arguments of a Python call (unknown names,
  types, choices and bounds give an :class:`~isle_fast.errors.InputError` naming the
  setting by its parameter name; the command line shows its flag, :func:`cli_flags`),
* :func:`add_arguments` adds the argparse options of a command, and :func:`namespace_options`
  reads them back as keyword arguments,
* :func:`parameters_doc` writes the numpydoc ``Parameters`` entries of the function
  that takes them.

Used by :mod:`isle_fast.training.config` (``isle train`` / :func:`isle_fast.train`).
"""

from __future__ import annotations

import argparse
import dataclasses
import numbers
import os
import textwrap
import types
import typing
from collections.abc import Callable, Iterable
from typing import Any

from isle_fast.errors import InputError, param

__all__ = [
    "option",
    "settings_fields",
    "flag_of",
    "cli_flags",
    "build",
    "add_arguments",
    "namespace_options",
    "parameters_doc",
    "resumable",
]

_META = "isle_option"


@dataclasses.dataclass(frozen=True)
class _Spec:
    help: str
    group: str
    flag: str | None
    metavar: str | tuple[str, ...] | None
    choices: tuple | None
    minimum: float | None
    maximum: float | None
    why: str
    required: bool
    parse: Callable[[str], Any] | None
    cli_help: str | tuple[str, str] | None
    resumable: bool
    doc_type: str | None
    cli: bool


def option(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    group: str,
    flag: str | None = None,
    metavar: str | tuple[str, ...] | None = None,
    choices: Iterable | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    why: str = "",
    parse: Callable[[str], Any] | None = None,
    cli_help: str | tuple[str, str] | None = None,
    resumable: bool = False,
    doc_type: str | None = None,
    cli: bool = True,
) -> Any:
    """A dataclass field that is also a documented, checked command-line option.

    Parameters
    ----------
    default : optional
        The default (no default: the setting is required). A tuple default is
        copied per instance.
    help : str
        One sentence for the docs and ``--help``; the default is added to ``--help``.
    group : str
        The ``--help`` section.
    flag : str, optional
        The command-line flag (default ``--`` + the name with dashes). For a bool
        that defaults to True, a ``--no-...`` flag that turns it off.
    metavar, choices
        As in argparse; ``choices`` are also checked for Python callers.
    minimum, maximum : float, optional
        Bounds (inclusive), checked for every caller; ``why`` is added to the message.
    parse : callable, optional
        Command-line text -> value (e.g. ``'none'`` -> None), instead of the type's.
    cli_help : str or (str, str), optional
        ``--help`` text when it must differ from ``help`` (e.g. for a ``--no-...`` flag);
        for a bool that may be None (automatic), the texts of ``--x`` and ``--no-x``.
    resumable : bool
        May change when a run is resumed without changing its result.
    doc_type : str, optional
        The type as the docs write it (``path or sequence of str, optional``), where the
        annotation's own name would not read well.
    cli : bool
        False for a setting of the Python API only: no argparse option, no flag in the docs.
    """
    spec = _Spec(
        help=help,
        group=group,
        flag=flag,
        metavar=metavar,
        choices=None if choices is None else tuple(choices),
        minimum=minimum,
        maximum=maximum,
        why=why,
        required=default is dataclasses.MISSING,
        parse=parse,
        cli_help=cli_help,
        resumable=resumable,
        doc_type=doc_type,
        cli=cli,
    )
    meta = {_META: spec}
    if default is dataclasses.MISSING:
        return dataclasses.field(metadata=meta)
    if isinstance(default, (list, dict, set)):
        raise TypeError("option defaults must be immutable (use a tuple)")
    return dataclasses.field(default=default, metadata=meta)


def settings_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of a settings dataclass made by :func:`option`, in declaration order."""
    return [f for f in dataclasses.fields(cls) if _META in f.metadata]


def _spec(f: dataclasses.Field) -> _Spec:
    return f.metadata[_META]


#: Classes whose settings were built or added to a parser: :func:`cli_flags` reads their flags.
_SEEN: list[type] = []


def _seen(cls: type) -> None:
    if cls not in _SEEN:
        _SEEN.append(cls)


def cli_flags() -> dict[str, str]:
    """``{setting: flag}`` of the settings met so far whose flag is not ``--`` + the name with dashes.

    Messages name a setting as the parameter (:func:`isle_fast.errors.param`); the
    command line shows these flags instead (:meth:`isle_fast.errors.IsleError.for_cli`).
    """
    out: dict[str, str] = {}
    for cls in _SEEN:
        for f in settings_fields(cls):
            flag = flag_of(cls, f.name)
            if flag != "--" + f.name.replace("_", "-"):
                out[f.name] = flag
    return out


def flag_of(cls: type, name: str) -> str:
    """The command-line flag of setting ``name`` of ``cls``."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return _spec(f).flag or "--" + name.replace("_", "-")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _split_optional(tp: Any) -> tuple[Any, bool]:
    """(the type without None, whether None is allowed)."""
    args = typing.get_args(tp)
    if (typing.get_origin(tp) in (typing.Union, types.UnionType)) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]), True
    return tp, False


def _convert(value: Any, tp: Any, flag: str) -> Any:
    """``value`` as type ``tp`` (int, float, bool, str or a fixed tuple of those), or InputError."""
    base, optional = _split_optional(tp)
    if value is None:
        if optional:
            return None
        raise InputError(f"{flag} must be given (not None)")
    if typing.get_origin(base) is tuple:
        elems = typing.get_args(base)
        if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
            raise InputError(f"{flag} must be {len(elems)} values, not {value!r}")
        vals = tuple(value)
        if len(vals) != len(elems):
            raise InputError(f"{flag} must be {len(elems)} values, not {len(vals)}: {value!r}")
        return tuple(_convert(v, t, flag) for v, t in zip(vals, elems))
    if base is bool:
        if isinstance(value, (bool, numbers.Integral)) and value in (0, 1):
            return bool(value)
        raise InputError(f"{flag} must be True or False, not {value!r}")
    if base is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)
        if isinstance(value, numbers.Real) and float(value).is_integer():
            return int(float(value))
        raise InputError(f"{flag} must be a whole number, not {value!r}")
    if base is float:
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            return float(value)
        raise InputError(f"{flag} must be a number, not {value!r}")
    if base is str:
        if isinstance(value, (str, os.PathLike)):
            return os.fspath(value) if isinstance(value, os.PathLike) else value
        raise InputError(f"{flag} must be a string or a path, not {value!r}")
    return value


def _check(value: Any, spec: _Spec, flag: str) -> None:
    if value is None:
        return
    if spec.choices is not None and value not in spec.choices:
        raise InputError(f"{flag} must be one of {', '.join(map(str, spec.choices))}, not {value!r}")
    why = f": {spec.why}" if spec.why else ""
    if spec.minimum is not None and spec.maximum is not None and not spec.minimum <= value <= spec.maximum:
        raise InputError(f"{flag} must be in [{spec.minimum:g}, {spec.maximum:g}], not {value}{why}")
    if spec.minimum is not None and value < spec.minimum:
        raise InputError(f"{flag} must be at least {spec.minimum:g}, not {value}{why}")
    if spec.maximum is not None and value > spec.maximum:
        raise InputError(f"{flag} must be at most {spec.maximum:g}, not {value}{why}")


def build(cls: type, values: dict[str, Any]) -> Any:
    """An instance of the settings dataclass ``cls`` from keyword arguments, every value checked.

    Raises
    ------
    InputError
        An unknown setting (the known ones are listed), a missing required one, or a
        value of the wrong type, outside its choices or its bounds (named by its flag).
    """
    _seen(cls)
    fields = {f.name: f for f in settings_fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise InputError(
            f"unknown setting{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
            f"the settings are: {', '.join(fields)}"
        )
    hints = _hints(cls)
    out: dict[str, Any] = {}
    for name, f in fields.items():
        spec, flag = _spec(f), param(name)
        if name not in values:
            if spec.required:
                raise InputError(f"{flag} is required")
            continue
        out[name] = _convert(values[name], hints[name], flag)
        _check(out[name], spec, flag)
    return cls(**out)


def _default_text(value: Any) -> str:
    if isinstance(value, tuple):
        return " ".join(map(str, value))
    return str(value)


def add_arguments(parser: argparse.ArgumentParser, *classes: type) -> None:
    """Add every setting of ``classes`` to ``parser`` (one argument group per ``group``)."""
    groups: dict[str, Any] = {}
    for cls in classes:
        _seen(cls)
        hints = _hints(cls)
        for f in settings_fields(cls):
            spec = _spec(f)
            if not spec.cli:
                continue
            if spec.group not in groups:
                groups[spec.group] = parser.add_argument_group(spec.group)
            g = groups[spec.group]
            flag = flag_of(cls, f.name)
            base, optional = _split_optional(hints[f.name])
            text = spec.cli_help or spec.help
            default = None if spec.required else f.default
            kw: dict[str, Any] = {"dest": f.name}
            if base is bool:
                if optional:  # tri-state: --x / --no-x, default None (automatic)
                    on, off = text if isinstance(text, tuple) else (text, f"not {flag}")
                    g.add_argument(flag, action="store_true", default=None, help=on, **kw)
                    g.add_argument("--no-" + flag[2:], action="store_false", help=off, **kw)
                elif default is True:  # --no-x turns it off
                    g.add_argument(flag, action="store_false", default=True, help=text, **kw)
                else:
                    g.add_argument(flag, action="store_true", default=False, help=text, **kw)
                continue
            if spec.required:
                kw["required"] = True
            else:
                kw["default"] = default
                if default is not None:
                    text = f"{text} (default {_default_text(default)})"
            if typing.get_origin(base) is tuple:
                elems = typing.get_args(base)
                kw.update(nargs=len(elems), type=spec.parse or elems[0])
            elif spec.parse is not None:
                kw["type"] = spec.parse
            elif base in (int, float):
                kw["type"] = base
            if spec.choices is not None:
                kw["choices"] = spec.choices
            if spec.metavar is not None:
                kw["metavar"] = spec.metavar
            elif spec.choices is None:
                kw["metavar"] = flag[2:].upper().replace("-", "_")
            g.add_argument(flag, help=text, **kw)


def namespace_options(args: argparse.Namespace, *classes: type) -> dict[str, Any]:
    """The settings of ``classes`` parsed by :func:`add_arguments`, as keyword arguments."""
    return {
        f.name: getattr(args, f.name)
        for cls in classes
        for f in settings_fields(cls)
        if hasattr(args, f.name)
    }


def _type_text(tp: Any) -> str:
    base, optional = _split_optional(tp)
    if typing.get_origin(base) is tuple:
        text = "(" + ", ".join(getattr(t, "__name__", str(t)) for t in typing.get_args(base)) + ")"
    else:
        text = getattr(base, "__name__", str(base))
    return text + (", optional" if optional else "")


def parameters_doc(*classes: type, skip: Iterable[str] = (), indent: str = "    ") -> str:
    """numpydoc ``Parameters`` entries (``name : type, default ...``, help) of the settings of ``classes``."""
    skip = set(skip)
    lines: list[str] = []
    for cls in classes:
        hints = _hints(cls)
        for f in settings_fields(cls):
            if f.name in skip:
                continue
            spec = _spec(f)
            head = f"{f.name} : {spec.doc_type or _type_text(hints[f.name])}"
            if spec.choices is not None:
                head = f"{f.name} : {{{', '.join(repr(c) for c in spec.choices)}}}"
            if not spec.required and f.default is not None:
                head += f", default {f.default!r}"
            lines.append(indent + head)
            text = (
                spec.help[:1].upper()
                + spec.help[1:].rstrip(".")
                + "."
                + (f" Command line: ``{flag_of(cls, f.name)}``." if spec.cli else "")
            )
            lines.append(
                textwrap.fill(
                    text, width=92, initial_indent=indent + "    ", subsequent_indent=indent + "    "
                )
            )
    return "\n".join(lines)


def resumable(cls: type) -> set[str]:
    """Names of the settings of ``cls`` that may change on resume."""
    return {f.name for f in settings_fields(cls) if _spec(f).resumable}
