"""User errors (``isle_fast.errors``): an InputError is also a ValueError, so Python callers can
catch a bad argument the usual way; the CLI still prints it as one line."""

from __future__ import annotations

import pytest

import isle_fast as il
from isle_fast.errors import AlignmentError, InputError, IsleError, StoreError


def test_input_error_is_a_value_error():
    assert issubclass(InputError, ValueError) and issubclass(InputError, IsleError)
    assert not issubclass(StoreError, ValueError) and issubclass(AlignmentError, StoreError)
    with pytest.raises(ValueError, match="at least one pseudo-label set"):
        il.evaluate([], "gt.zarr")
    with pytest.raises(ValueError, match="--backend must be one of"):
        il.resolve_backend("tpu")


def test_refinement_parameter_errors_keep_their_own_message():
    """A refinement's own InputError (now also a ValueError) is not re-wrapped as 'bad parameters'."""
    from isle_fast.refinement.chain import make_refinement

    with pytest.raises(InputError) as exc:
        make_refinement("crf", {"iterations": -1})
    assert str(exc.value).startswith("crf.iterations must be a whole number >= 0")


def test_the_cli_prints_an_input_error_as_one_line(capsys, tmp_path):
    from isle_fast.cli import main

    assert main(["evaluate", str(tmp_path / "a.zarr"), "--gt", str(tmp_path / "gt.zarr"), "--backend", "cpu",
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("isle evaluate: error: ") and "Traceback" not in err
