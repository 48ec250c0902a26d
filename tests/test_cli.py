"""The ``isle`` command line: help for every subcommand, ``isle info``, ``isle ingest``, user errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from isle_fast.cli import COMMANDS, main


def run_cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_isle_help_entry_point():
    r = subprocess.run([sys.executable, "-m", "isle_fast", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for name in COMMANDS:
        assert name in r.stdout


def test_no_arguments_prints_help(capsys):
    code, out, _ = run_cli(capsys)
    assert code == 0 and "usage: isle" in out


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_subcommand_help_exits_0(capsys, name):
    with pytest.raises(SystemExit) as exc:
        main([name, "--help"])
    assert exc.value.code == 0
    assert "usage: isle" in capsys.readouterr().out


@pytest.mark.parametrize("fmt", ["labels", "scores", "images", "tiff"])
def test_ingest_format_help(capsys, fmt):
    with pytest.raises(SystemExit) as exc:
        main(["ingest", fmt, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--out" in out and "--skip-bad" in out


def write_pngs(folder, rng, n=3):
    folder.mkdir()
    data = {}
    for i in range(n):
        a = rng.integers(0, 21, (5 + i, 7)).astype(np.uint8)
        Image.fromarray(a).save(folder / f"im{i}.png")
        data[f"im{i}"] = a
    return data


def test_ingest_then_info_on_every_kind(tmp_path, capsys, rng):
    data = write_pngs(tmp_path / "lab", rng)
    (tmp_path / "img").mkdir()
    (tmp_path / "cam").mkdir()
    for i, a in data.items():
        Image.fromarray(np.stack([a] * 3, -1) * 10).save(tmp_path / "img" / f"{i}.png")
        np.savez(tmp_path / "cam" / f"{i}.npz", keys=np.array([0, 5]), high_res=rng.random((2,) + a.shape))
    (tmp_path / "ids.txt").write_text("im2\nim0\n")
    stores = {
        "gt": ["ingest", "labels", str(tmp_path / "lab"), "--kind", "gt", "--ids", str(tmp_path / "ids.txt"),
               "--out", str(tmp_path / "gt.zarr"), "-q"],
        "pseudo": ["ingest", "labels", str(tmp_path / "lab"), "--gt", str(tmp_path / "gt.zarr"),
                   "--out", str(tmp_path / "p.zarr"), "--workers", "2", "--chunks", "1,4,4"],
        "scores": ["ingest", "scores", str(tmp_path / "cam"), "--gt", str(tmp_path / "gt.zarr"),
                   "--bg-threshold", "0.3", "--score-dtype", "float16", "--out", str(tmp_path / "s.zarr"), "-q"],
        "images": ["ingest", "images", str(tmp_path / "img"), "--gt", str(tmp_path / "gt.zarr"),
                   "--out", str(tmp_path / "i.zarr"), "-q"],
    }
    for kind, argv in stores.items():
        code, out, err = run_cli(capsys, *argv)
        assert code == 0, err
        if kind == "pseudo":
            assert "throughput" in out and "p.zarr" in out
    code, out, err = run_cli(capsys, "info", *(str(tmp_path / f) for f in ("gt.zarr", "p.zarr", "s.zarr", "i.zarr")))
    assert code == 0, err
    for word in ("kind        gt", "kind        pseudo", "encoding    scores (float16)", "encoding    rgb (uint8)",
                 "images      2", "compressors", "provenance"):
        assert word in out
    code, out, err = run_cli(capsys, "info", "--json", str(tmp_path / "s.zarr"))
    d = json.loads(out)
    assert d["kind"] == "pseudo" and d["encoding"] == "scores" and d["padded_shape"] == [2, 7, 7, 21]
    assert d["provenance"]["parameters"]["bg_threshold"] == 0.3
    code, out, err = run_cli(capsys, "info", "--json", str(tmp_path / "p.zarr"))
    d = json.loads(out)
    assert d["images"] == 2 and d["chunks"] == [1, 4, 4]


@pytest.mark.parametrize("case", ["missing_store", "bad_png", "exists", "bad_ids", "pickle"])
def test_user_errors_one_line_exit_2(tmp_path, capsys, rng, case):
    write_pngs(tmp_path / "lab", rng)
    if case == "missing_store":
        argv = ["info", str(tmp_path / "nope.zarr")]
        needle = "nope.zarr"
    elif case == "bad_png":
        (tmp_path / "lab" / "im1.png").write_bytes(b"\x89PNG broken")
        argv = ["ingest", "labels", str(tmp_path / "lab"), "--out", str(tmp_path / "o.zarr"), "-q"]
        needle = "im1.png"
    elif case == "exists":
        (tmp_path / "o.zarr").mkdir()
        argv = ["ingest", "labels", str(tmp_path / "lab"), "--out", str(tmp_path / "o.zarr"), "-q"]
        needle = "o.zarr exists"
    elif case == "bad_ids":
        argv = ["ingest", "labels", str(tmp_path / "lab"), "--ids", str(tmp_path / "none.txt"),
                "--out", str(tmp_path / "o.zarr"), "-q"]
        needle = "none.txt"
    else:
        (tmp_path / "cam").mkdir()
        # a CAM dict is read by the restricted unpickler; one naming another global is refused
        import collections

        np.save(tmp_path / "cam" / "im0.npy", {"keys": np.array([1]), "high_res": np.zeros((1, 5, 7)),
                                               "c": collections.Counter("ab")})
        argv = ["ingest", "scores", str(tmp_path / "cam"), "--out", str(tmp_path / "o.zarr"), "-q"]
        needle = "--allow-pickle"
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("isle ") and needle in lines[0], err
    assert "Traceback" not in err
    if case != "exists":
        assert not any(p.startswith("o.zarr") for p in os.listdir(tmp_path))


def test_bad_chunks_argument_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["ingest", "labels", str(tmp_path), "--out", str(tmp_path / "o"), "--chunks", "a,b"])
    assert exc.value.code == 2
    assert "--chunks" in capsys.readouterr().err


def test_progress_bar_redraws_rarely_when_stderr_is_not_a_terminal(monkeypatch):
    import io

    from isle_fast import progress as P

    monkeypatch.setenv("ISLE_PROGRESS", "1")
    monkeypatch.setattr(P.sys, "stderr", io.StringIO())
    bar = P.progress(range(3), desc="x")
    assert bar.mininterval == P.LOG_EVERY and bar.log_mode
    list(bar)

    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(P.sys, "stderr", Tty())
    assert P.progress(range(3), desc="x").mininterval == 0.1


def _command_paths() -> list[list[str]]:
    """Every subcommand, and every sub-subcommand (``ingest labels`` ...)."""
    import argparse

    from isle_fast.cli import build_parser

    paths = []

    def walk(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    paths.append(path + [name])
                    walk(sub, path + [name])

    walk(build_parser(), [])
    return paths


def _parser_at(path):
    import argparse

    from isle_fast.cli import build_parser

    p = build_parser()
    for name in path:
        p = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    return p


@pytest.mark.parametrize("path", _command_paths(), ids=lambda p: " ".join(p))
def test_no_option_is_ever_abbreviated(capsys, path):
    """``--hel`` is not ``--help``, ``--ov`` is not ``--overwrite``: on every (sub)command argparse's
    prefix matching is off. A help prefix shows it: matched, it would print help and exit 0."""
    assert _parser_at(path).allow_abbrev is False, path
    with pytest.raises(SystemExit) as exc:
        main([*path, "--hel"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and "error:" in err


def test_abbreviated_overwrite_does_not_replace_anything(tmp_path, capsys, rng):
    """The case of issue 18: ``--ov`` used to mean ``--overwrite`` and replaced the store."""
    src = tmp_path / "png"
    write_pngs(src, rng)
    out = tmp_path / "s.zarr"
    assert main(["ingest", "labels", str(src), "--out", str(out), "-q"]) == 0
    before = sorted(p.name for p in out.rglob("*"))
    with pytest.raises(SystemExit) as exc:
        main(["ingest", "labels", str(src), "--out", str(out), "-q", "--ov"])
    assert exc.value.code == 2 and "unrecognized arguments: --ov" in capsys.readouterr().err
    assert sorted(p.name for p in out.rglob("*")) == before


# -- one style on every command (issue 19) ---------------------------------------------------------

def _options(parser):
    import argparse

    return {o: a for a in parser._actions if not isinstance(a, argparse._SubParsersAction)
            for o in a.option_strings}


def _leaf_paths():
    return [p for p in _command_paths() if not any(
        type(a).__name__ == "_SubParsersAction" for a in _parser_at(p)._actions)]


@pytest.mark.parametrize("path", _leaf_paths(), ids=lambda p: " ".join(p))
def test_every_command_has_one_style(path):
    """Same short flags for the same long ones, ``-q/--quiet`` on every command with the one meaning,
    no abbreviations, and no short flag used for anything else."""
    from isle_fast.cli import QUIET_HELP, SHORT_FLAGS

    parser = _parser_at(path)
    assert parser.allow_abbrev is False
    opts = _options(parser)
    assert "--quiet" in opts, f"isle {' '.join(path)} has no --quiet"
    assert opts["--quiet"].help == QUIET_HELP and opts["--quiet"].const is True
    for long, short in SHORT_FLAGS.items():
        if long in opts:
            assert opts.get(short) is opts[long], (path, long)
        else:
            assert short not in opts, (path, short)
    shorts = sorted(o for o in opts if not o.startswith("--"))
    assert set(shorts) <= {"-h", *SHORT_FLAGS.values()}, (path, shorts)


def test_unknown_flag_prints_the_subcommands_usage(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", "a.zarr", "--gt", "g.zarr", "--no-such-flag"])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert err.startswith("usage: isle evaluate") and "isle evaluate: error: unrecognized arguments: " \
        "--no-such-flag" in err
    with pytest.raises(SystemExit):
        main(["ingest", "labels", "src", "-o", "x.zarr", "--bogus"])
    err = capsys.readouterr().err
    assert err.startswith("usage: isle ingest labels") and "isle ingest labels: error:" in err


def test_errors_have_one_prefix_and_name_flags(tmp_path, capsys, rng):
    src = tmp_path / "png"
    write_pngs(src, rng)
    out = tmp_path / "s.zarr"
    assert main(["ingest", "labels", str(src), "-o", str(out), "-q"]) == 0
    assert capsys.readouterr().out == ""
    assert main(["ingest", "labels", str(src), "-o", str(out), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("isle ingest labels: error: ") and "--overwrite" in err, err
    assert "overwrite (" not in err and "overwrite=" not in err, err


def test_cli_message_translates_api_parameters_to_flags():
    from isle_fast.cli import build_parser, cli_message, leaf_parser
    from isle_fast.errors import InputError, StoreError, param

    parser = build_parser()
    leaf = leaf_parser(parser, parser.parse_args(["merge", "a", "--gt", "g", "-o", "e"]))
    err = StoreError(f"x exists; pass {param('overwrite')} to replace it")
    assert str(err) == "x exists; pass overwrite to replace it"          # what a Python caller reads
    assert cli_message(err, leaf) == "x exists; pass --overwrite to replace it"
    assert cli_message(InputError(f"{param('average', 'image')} needs ..."), leaf) == "--average image needs ..."
    assert cli_message(InputError(f"{param('subset')} names no set"), leaf) == "--sets names no set"
    assert cli_message(InputError("crf.iterations=5 and my_average=2 stay"), leaf) == \
        "crf.iterations=5 and my_average=2 stay"
    ingest = leaf_parser(parser, parser.parse_args(["ingest", "labels", "s", "-o", "x"]))
    assert cli_message(InputError(f"nothing was written ({param('skip_bad')} writes the rest)"), ingest) == \
        "nothing was written (--skip-bad writes the rest)"


@pytest.mark.parametrize("suffix, fmt", [(".png", "labels"), (".jpg", "images"), (".npy", "scores")])
def test_a_folder_where_a_store_is_expected_says_what_to_run(tmp_path, capsys, rng, suffix, fmt):
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i in range(3):
        (folder / f"x{i}{suffix}").write_bytes(b"not read")
    code, _, err = run_cli(capsys, "evaluate", str(folder), "--gt", str(folder))
    assert code == 2
    assert err.startswith(f"isle evaluate: error: {folder} is a folder of ")
    assert f"isle ingest {fmt} {folder}" in err and "Zarr" not in err and "zarr.json" not in err
    if fmt != "images":
        assert "isle run" in err
    code, _, err = run_cli(capsys, "info", str(folder / f"x0{suffix}"))
    assert code == 2 and f"isle ingest {fmt} {folder}" in err


def test_a_skip_bad_store_against_the_full_gt_says_how_to_score_it(tmp_path, capsys, rng):
    src = tmp_path / "png"
    write_pngs(src, rng, n=4)
    gt = tmp_path / "gt.zarr"
    assert main(["ingest", "labels", str(src), "--kind", "gt", "-o", str(gt), "-q"]) == 0
    bad = tmp_path / "set"
    bad.mkdir()
    for f in src.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "im1.png").write_bytes(b"not a png")
    kept = tmp_path / "set.zarr"
    assert main(["ingest", "labels", str(bad), "--gt", str(gt), "--skip-bad", "-o", str(kept), "-q"]) == 0
    code, _, err = run_cli(capsys, "evaluate", str(kept), "--gt", str(gt), "-q")
    assert code == 2 and "not in the sets" in err and "'im1'" in err, err
    assert "--skip-bad (1 image(s) left out)" in err, err
    hint = err.split("ingest the ground truth aligned with it: ")[1].strip()
    argv = hint.replace("GT_DIR", str(src)).replace("gt-kept.zarr", str(tmp_path / "kept-gt.zarr")).split()
    assert argv[0] == "isle" and main([*argv[1:], "-q"]) == 0  # the hint works as written
    assert main(["evaluate", str(kept), "--gt", str(tmp_path / "kept-gt.zarr"), "-q"]) == 0


def test_quiet_prints_nothing_on_stdout_on_any_command(capsys):
    """-q is one thing everywhere: what a command prints on stdout is dropped (here refine --list)."""
    assert main(["refine", "--list"]) == 0
    assert "crf" in capsys.readouterr().out
    assert main(["refine", "--list", "-q"]) == 0
    assert capsys.readouterr().out == ""
