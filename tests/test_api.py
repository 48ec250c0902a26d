"""The public API: every name in ``__all__`` resolves, and ``import isle_fast`` stays light."""

from __future__ import annotations

import subprocess
import sys

import isle_fast


def test_every_public_name_resolves():
    for name in isle_fast.__all__:
        assert getattr(isle_fast, name) is not None, name


def test_unknown_name_is_an_attribute_error():
    import pytest

    with pytest.raises(AttributeError):
        isle_fast.no_such_function  # noqa: B018


def test_import_does_not_pull_torch_or_dask():
    code = "import sys, isle_fast; print('torch' in sys.modules, 'dask' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
