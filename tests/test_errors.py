"""User errors (``isle_fast.errors``): an InputError is also a ValueError, so Python callers can
catch a bad argument the usual way; the CLI still prints it as one line."""

from __future__ import annotations

import pytest

import isle_fast as il
from isle_fast.errors import AlignmentError, InputError, IsleError, StoreError, param


def test_input_error_is_a_value_error():
    assert issubclass(InputError, ValueError) and issubclass(InputError, IsleError)
    assert not issubclass(StoreError, ValueError) and issubclass(AlignmentError, StoreError)
    with pytest.raises(ValueError, match="at least one pseudo-label set"):
        il.evaluate([], "gt.zarr")
    with pytest.raises(ValueError, match="^backend must be one of"):
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


# -- library messages name the parameter, the CLI the flag -------------------------------------

def test_param_reads_as_the_parameter_and_as_the_flag():
    import pickle

    from isle_fast.errors import param

    e = InputError(f"{param('bg_threshold')} must be finite; or {param('backend', 'gpu')}")
    assert str(e) == "bg_threshold must be finite; or backend='gpu'"
    assert e.for_cli() == "--bg-threshold must be finite; or --backend gpu"
    assert e.for_cli({"backend": "--be"}) == "--bg-threshold must be finite; or --be gpu"
    again = pickle.loads(pickle.dumps(e))       # as a worker process hands it back
    assert str(again) == str(e) and again.for_cli() == e.for_cli()
    assert StoreError("plain text").for_cli() == "plain text"


@pytest.mark.parametrize("call, api, flag", [
    (lambda: il.resolve_backend("tpu"), "backend must be one of", "--backend must be one of"),
    (lambda: il.evaluate(["s.zarr"], "gt.zarr", average="mean"), "average must be one of",
     "--average must be one of"),
    (lambda: il.evaluate(["s.zarr"], "gt.zarr", bg_threshold=float("nan")), "bg_threshold must be a finite",
     "--bg-threshold must be a finite"),
    (lambda: il.merge(["s.zarr"], "gt.zarr", "out.zarr", strategy="best"), "strategy must be one of",
     "--strategy must be one of"),
    (lambda: il.merge(["s.zarr"], "gt.zarr", "out.zarr", policy="vote"), "policy must be one of",
     "--policy must be one of"),
])
def test_api_messages_name_the_parameter(call, api, flag):
    with pytest.raises(InputError) as info:
        call()
    assert str(info.value).startswith(api) and "--" not in str(info.value)
    assert info.value.for_cli().startswith(flag)


def test_cli_prints_the_flag(tmp_path, capsys):
    from isle_fast import cli

    code = cli.main(["predict", str(tmp_path / "run"), "--images", "i.zarr",
                     "--out", str(tmp_path / "o.zarr"), "--window", "8"])
    err = capsys.readouterr().err
    assert code == 2 and "error: --window must be at least 16 pixels" in err, err
    with pytest.raises(InputError, match="^window must be at least 16 pixels"):
        il.predict(tmp_path / "run", "i.zarr", tmp_path / "o.zarr", window=8)


def test_cli_prints_the_flags_of_training_options(tmp_path, capsys):
    from isle_fast import cli

    code = cli.main(["train", "--images", "i.zarr", "--labels", "l.zarr", "--out", str(tmp_path / "run"),
                     "--batch-size", "1", "--workers", "-1"])
    err = capsys.readouterr().err
    assert code == 2 and "error: --batch-size must be at least 2" in err and "use --accum" in err, err
    code = cli.main(["train", "--images", "i.zarr", "--labels", "l.zarr", "--out", str(tmp_path / "run"),
                     "--workers", "-1"])
    err = capsys.readouterr().err
    assert code == 2 and "error: --workers must be at least 0" in err, err     # the setting is num_workers


def _diverge():
    from isle_fast.training.train import Diverged

    raise Diverged(f"training loss became nan at step 3; lower {param('lr')}")


@pytest.mark.parametrize("call, api, flag", [
    (lambda: il.estimate(["s.zarr"], method="mean"), "method must be one of", "--estimator must be one of"),
    (lambda: il.sweep_thresholds(["s.zarr"], "gt.zarr", thresholds="0.9:0.1:0.1"),
     "thresholds: the range '0.9:0.1:0.1' ends", "--bg-threshold: the range '0.9:0.1:0.1' ends"),
    (lambda: il.merge(["s.zarr"], "gt.zarr", "out.zarr", bg_threshold="0.1:x:0.1"),
     "bg_threshold: a range is START:STOP:STEP", "--bg-threshold: a range is START:STOP:STEP"),
    (_diverge, "lower lr", "lower --lr"),
])
def test_messages_that_named_a_flag_name_the_parameter(call, api, flag):
    """Messages that used to name the flag (``--estimator``, ``--bg-threshold``, ``lower --lr``): the API
    reads the parameter, the command line (:func:`isle_fast.cli.cli_message`) the flag the user typed."""
    from isle_fast.cli import cli_message

    with pytest.raises(IsleError) as info:
        call()
    assert api in str(info.value) and "--" not in str(info.value), str(info.value)
    assert flag in cli_message(info.value), cli_message(info.value)


def test_a_switch_reads_as_name_true_and_as_the_bare_flag():
    """``param(name, True)``: ``skip_bad=True`` for a Python caller, ``--skip-bad`` on the command line; a
    reason kept as text (a skipped file's, in the provenance) reads as the API does."""
    from isle_fast.errors import plain
    from isle_fast.stores.ingest_engine import _bad_error

    e = _bad_error([("a", "a.png", "not a PNG")])
    assert str(e) == "a.png: image 'a': not a PNG; nothing was written (skip_bad=True writes the rest)"
    assert e.for_cli().endswith("nothing was written (--skip-bad writes the rest)")
    assert plain(e.template) == str(e)
