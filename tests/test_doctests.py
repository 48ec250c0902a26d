"""The ``Examples`` of the public functions the README's Python API section shows run as written."""

from __future__ import annotations

import doctest
import importlib
import io
import tempfile

import pytest

#: functions whose numpydoc ``Examples`` section is run here (each example builds its own tiny data set)
DOCUMENTED = (
    "isle_fast.stores.stack.open_stack",
    "isle_fast.ensemble.evaluate.evaluate",
    "isle_fast.ensemble.selection.select",
    "isle_fast.ensemble.merge.merge",
    "isle_fast.ensemble.subsets.subset_analysis",
    "isle_fast.errors.param",
)


@pytest.mark.parametrize("name", DOCUMENTED)
def test_examples_run_as_written(name, tmp_path, monkeypatch):
    module, _, attr = name.rpartition(".")
    obj = getattr(importlib.import_module(module), attr)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))   # the examples' folders go in the test's
    tests = doctest.DocTestFinder(recurse=False).find(obj, name, globs={})
    assert tests and tests[0].examples, f"{name} has no Examples section"
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    out = io.StringIO()
    for t in tests:
        runner.run(t, out=out.write)
    assert runner.failures == 0, out.getvalue()
