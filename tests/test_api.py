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


def test_no_public_name_is_also_a_submodule():
    """Importing a submodule sets it as an attribute of the package: a public function that
    shared its name (the old flat ``isle_fast.evaluate``) would be replaced by the module."""
    import pkgutil

    submodules = {m.name for m in pkgutil.iter_modules(isle_fast.__path__)}
    assert not submodules & set(isle_fast.__all__), submodules & set(isle_fast.__all__)


def test_public_functions_survive_importing_every_submodule():
    """The README's calls work in any order: after every submodule is imported (as a
    merge, a training run or a report imports them), each public name is still itself."""
    code = (
        "import importlib, pkgutil, isle_fast as il\n"
        "first = {n: getattr(il, n) for n in il.__all__}\n"
        "for m in pkgutil.walk_packages(il.__path__, 'isle_fast.'):\n"
        "    if not m.name.startswith('isle_fast.kernels.gpu') and m.name != 'isle_fast.__main__':\n"
        "        importlib.import_module(m.name)\n"
        "bad = [n for n in il.__all__ if getattr(il, n) is not first[n]]\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
