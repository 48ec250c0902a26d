"""Settings defined once (``isle_fast.options``): one dataclass makes the checks, the argparse options
and the docs, and they agree."""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from isle_fast.errors import InputError
from isle_fast.options import (
    add_arguments,
    build,
    cli_flags,
    flag_of,
    namespace_options,
    option,
    parameters_doc,
)


@dataclass
class _Demo:
    src: str = option(help="input store", group="data", metavar="SRC")
    size: int = option(8, help="tile side", group="data", minimum=2, why="tiles need two pixels")
    rate: float | None = option(None, help="a rate", group="math", minimum=0.0, maximum=1.0)
    mode: str = option("a", help="the mode", group="math", choices=("a", "b"))
    span: tuple[float, float] = option(
        (0.5, 2.0), help="a range", group="math", flag="--range", metavar=("LO", "HI")
    )
    keep: bool = option(True, help="keep it", group="math", flag="--no-keep", cli_help="drop it")
    fast: bool | None = option(None, help="go fast", group="math", cli_help=("fast", "slow"))
    verbose: bool = option(False, help="talk", group="math")
    workers: int = option(2, help="workers", group="data", flag="--jobs", parse=lambda t: int(t) * 10)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_arguments(p, _Demo)
    return p


def test_python_values_are_checked_and_converted():
    d = build(_Demo, {"src": Path("/x"), "size": 3.0, "span": [1, 2], "fast": 1})
    assert (d.src, d.size, d.span, d.fast, d.rate, d.mode, d.keep) == (
        "/x",
        3,
        (1.0, 2.0),
        True,
        None,
        "a",
        True,
    )
    for values, match in [
        ({}, "--src is required"),
        ({"src": "s", "size": 1}, "--size must be at least 2, not 1: tiles need two pixels"),
        ({"src": "s", "size": 2.5}, "--size must be a whole number"),
        ({"src": "s", "size": "3"}, "--size must be a whole number"),
        ({"src": "s", "rate": 1.5}, r"--rate must be in \[0, 1\], not 1.5"),
        ({"src": "s", "mode": "c"}, "--mode must be one of a, b, not 'c'"),
        ({"src": "s", "span": (1,)}, "--range must be 2 values"),
        ({"src": "s", "keep": "yes"}, "--no-keep must be True or False"),
        ({"src": 3}, "--src must be a string or a path"),
        ({"src": "s", "colour": 1}, "unknown setting colour; the settings are: src, size"),
    ]:
        with pytest.raises(InputError) as info:
            build(_Demo, values)
        # the command line names the flag, a Python caller the parameter
        assert re.search(match, info.value.for_cli(cli_flags())), info.value.for_cli(cli_flags())
        assert "--" not in str(info.value)


def test_command_line_defaults_are_the_dataclass_defaults():
    args = _parser().parse_args(["--src", "s"])
    assert build(_Demo, namespace_options(args, _Demo)) == _Demo(src="s")


def test_command_line_flags_and_their_values():
    args = _parser().parse_args(
        [
            "--src",
            "s",
            "--size",
            "4",
            "--rate",
            "0.5",
            "--mode",
            "b",
            "--range",
            "1",
            "3",
            "--no-keep",
            "--no-fast",
            "--verbose",
            "--jobs",
            "3",
        ]
    )
    d = build(_Demo, namespace_options(args, _Demo))
    assert d == _Demo(
        src="s", size=4, rate=0.5, mode="b", span=(1.0, 3.0), keep=False, fast=False, verbose=True, workers=30
    )
    assert _parser().parse_args(["--src", "s", "--fast"]).fast is True
    with pytest.raises(SystemExit):
        _parser().parse_args(["--src", "s", "--mode", "c"])
    assert flag_of(_Demo, "workers") == "--jobs" and flag_of(_Demo, "size") == "--size"


def test_help_and_docs_come_from_the_same_text():
    text = _parser().format_help()
    assert "tile side (default 8)" in text and "drop it" in text and "--range LO HI" in text
    assert "fast" in text and "slow" in text
    doc = parameters_doc(_Demo)
    for name in (
        "src : str",
        "size : int, default 8",
        "rate : float, optional",
        "mode : {'a', 'b'}",
        "span : (float, float), default (0.5, 2.0)",
        "Tile side. Command line: ``--size``.",
    ):
        assert name in doc, name


def test_mutable_defaults_are_refused():
    with pytest.raises(TypeError, match="immutable"):
        option([1, 2], help="x", group="g")
