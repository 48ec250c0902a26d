"""``isle run`` (isle_fast.job): the whole job from folders, the fingerprinted cache, kills, equality.

The job must give exactly what the separate commands give (``isle ingest`` x N,
``isle merge``, ``isle export``, ``isle report``), reuse a cached store only
while its input files are unchanged, and never leave a result that looks
complete after a kill.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from isle_fast.cli import main
from isle_fast.job import JobSpec, run_job, spec_from_root, spec_from_toml
from isle_fast.stores.stack import open_stack

REPO = Path(__file__).resolve().parents[1]
SETS = ("alpha", "beta", "gamma")


def _palette() -> list[int]:
    from isle_fast.stores.png import voc_palette

    return np.asarray(voc_palette(), dtype=np.uint8).ravel().tolist()


def save_png(path: Path, a: np.ndarray) -> None:
    im = Image.fromarray(a.astype(np.uint8), mode="P")
    im.putpalette(_palette())
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


def make_tree(root: Path, n: int = 40, seed: int = 0, sets: tuple[str, ...] = SETS) -> Path:
    """A VOC-style root: SegmentationClass/ + pseudo/<set>/, objects of a few classes, per-set errors."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        h, w = int(rng.integers(30, 61)), int(rng.integers(40, 81))
        gt = np.zeros((h, w), np.uint8)
        for _ in range(int(rng.integers(1, 4))):
            y0, x0 = int(rng.integers(0, h - 8)), int(rng.integers(0, w - 8))
            dy, dx = int(rng.integers(6, h // 2 + 6)), int(rng.integers(6, w // 2 + 6))
            gt[y0:y0 + dy, x0:x0 + dx] = rng.integers(1, 9)
        saved = gt.copy()
        saved[rng.random((h, w)) < 0.02] = 255
        save_png(root / "SegmentationClass" / f"im{i:03d}.png", saved)
        for k, s in enumerate(sets):
            p = gt.copy()
            cls = rng.integers(1, 9)
            p[(gt == cls) & (rng.random((h, w)) < 0.3 + 0.1 * k)] = 0       # each set misses other classes
            noise = rng.random((h, w)) < 0.03
            p[noise] = rng.integers(0, 9, size=int(noise.sum()))
            save_png(root / "pseudo" / s / f"im{i:03d}.png", p)
    return root


@pytest.fixture
def tree(tmp_path):
    return make_tree(tmp_path / "voc")


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def pngs(folder: Path) -> dict[str, np.ndarray]:
    return {p.stem: np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))}


def run_doc(run: Path) -> dict:
    return json.loads((run / "run.json").read_text())


# --------------------------------------------------------------------------------- equality
def test_run_equals_the_separate_commands(tree, tmp_path, capsys):
    run = tmp_path / "run"
    rc, out, err = run_cli(capsys, "run", tree, "--out", run, "--workers", "2")
    assert rc == 0, err
    assert "isle run: done" in out and "ensemble mIoU" in out and "3 made" not in out
    sep = tmp_path / "sep"
    gt = sep / "gt.zarr"
    assert main(["ingest", "labels", str(tree / "SegmentationClass"), "--kind", "gt", "-o", str(gt),
                 "-q"]) == 0
    stores = []
    for s in SETS:
        assert main(["ingest", "labels", str(tree / "pseudo" / s), "--gt", str(gt),
                     "-o", str(sep / f"{s}.zarr"), "-q"]) == 0
        stores.append(str(sep / f"{s}.zarr"))
    assert main(["merge", *stores, "--gt", str(gt), "--out", str(sep / "ens.zarr"), "--quiet",
                 "--json", str(sep / "merge.json")]) == 0
    assert main(["export", str(sep / "ens.zarr"), "--out", str(sep / "pngs"), "--quiet"]) == 0
    assert main(["report", *stores, "--gt", str(gt), "--ensemble", str(sep / "ens.zarr"), "--out",
                 str(sep / "report"), "--quiet"]) == 0
    # the ensemble: store, PNGs (bytes: same encoder, same level), scores, selection, report tables
    assert np.array_equal(open_stack(run / "ensemble.zarr").array[:], open_stack(sep / "ens.zarr").array[:])
    a, b = sorted((run / "ensemble").glob("*.png")), sorted((sep / "pngs").glob("*.png"))
    assert [p.name for p in a] == [p.name for p in b] and len(a) == 40
    assert all(p.read_bytes() == q.read_bytes() for p, q in zip(a, b))
    ev, mj = json.loads((run / "evaluation.json").read_text()), json.loads((sep / "merge.json").read_text())
    assert ev["selection"] == mj["selection"]
    for s in SETS:
        assert ev["sets"][s]["tp"] == mj["sets"][s]["tp"] and ev["sets"][s]["iou"] == mj["sets"][s]["iou"]
    assert ev["ensemble"]["miou"] == pytest.approx(mj["ensemble"]["miou"], abs=1e-12)
    ra = json.loads((run / "report" / "report.json").read_text())
    rb = json.loads((sep / "report" / "report.json").read_text())
    for key in ("classes", "sets", "subsets"):
        if key in rb:
            assert _strip_paths(ra[key]) == _strip_paths(rb[key]), key
    doc = run_doc(run)
    assert doc["made"] == ["gt.zarr", "alpha.zarr", "beta.zarr", "gamma.zarr"] and doc["reused"] == []
    assert set(doc["seconds"]) >= {"ingest", "evaluate", "merge", "export", "report", "total"}
    assert set(doc["cpu_seconds"]) == set(doc["seconds"])       # CPU per step: this process + its workers
    assert all(v >= 0 for v in doc["cpu_seconds"].values()) and doc["cpu_seconds"]["total"] > 0


def _strip_paths(x):
    if isinstance(x, dict):
        return {k: _strip_paths(v) for k, v in x.items() if k not in ("path", "store", "source", "seconds")}
    if isinstance(x, list):
        return [_strip_paths(v) for v in x]
    return x


def test_toml_and_flags_give_the_same_run(tree, tmp_path, capsys):
    job = tmp_path / "job.toml"
    job.write_text('gt = "voc/SegmentationClass"\nout = "r1"\n[sets]\n'
                   + "".join(f'{s} = "voc/pseudo/{s}"\n' for s in SETS)
                   + '[merge]\npolicy = "order"\n[report]\nenabled = false\n[export]\ncompress_level = "1"\n')
    assert run_cli(capsys, "run", job)[0] == 0
    argv = ["run", "--gt", tree / "SegmentationClass", *sum((["--set", f"{s}={tree / 'pseudo' / s}"]
                                                               for s in SETS), []),
            "--out", tmp_path / "r2", "--policy", "order", "--no-report", "--compress-level", "1"]
    assert run_cli(capsys, *argv)[0] == 0
    assert not (tmp_path / "r1" / "report").exists()
    assert pngs(tmp_path / "r1" / "ensemble").keys() == pngs(tmp_path / "r2" / "ensemble").keys()
    for p in (tmp_path / "r1" / "ensemble").glob("*.png"):
        assert p.read_bytes() == (tmp_path / "r2" / "ensemble" / p.name).read_bytes()
    assert run_doc(tmp_path / "r1")["spec"]["policy"] == "order"


@pytest.mark.parametrize("average", ["dataset", "image"])
def test_the_fused_ensemble_pass_equals_the_separate_one(tree, tmp_path, capsys, average):
    """Counting and encoding each ensemble chunk inside the merge gives the store, PNGs and scores that
    the separate evaluate and export passes give (forced by a Dask scheduler: the merge's graph then runs)."""
    argv = ["run", tree, "--no-report", "--average", average, "--workers", "2"]
    import dask

    assert run_cli(capsys, *argv, "--out", tmp_path / "fused")[0] == 0
    with dask.config.set(scheduler="sync"):        # (not DASK_SCHEDULER: Dask keeps it once imported)
        assert run_cli(capsys, *argv, "--out", tmp_path / "separate")[0] == 0
    a, b = run_doc(tmp_path / "fused"), run_doc(tmp_path / "separate")
    assert (a["ensemble_pass"], b["ensemble_pass"]) == ("fused", "separate")
    assert a["ensemble_miou"] == b["ensemble_miou"] and a["png_bytes"] == b["png_bytes"]
    fa, fb = sorted((tmp_path / "fused" / "ensemble").glob("*.png")), sorted((tmp_path / "separate" /
                                                                              "ensemble").glob("*.png"))
    assert [p.name for p in fa] == [p.name for p in fb] and len(fa) == 40
    assert all(p.read_bytes() == q.read_bytes() for p, q in zip(fa, fb))
    assert (tmp_path / "fused" / "ensemble" / ".isle-output.json").is_file()
    ea = json.loads((tmp_path / "fused" / "evaluation.json").read_text())["ensemble"]
    eb = json.loads((tmp_path / "separate" / "evaluation.json").read_text())["ensemble"]
    assert ea == eb
    assert np.array_equal(open_stack(tmp_path / "fused" / "ensemble.zarr").array[:],
                          open_stack(tmp_path / "separate" / "ensemble.zarr").array[:])


def test_a_failing_fused_export_leaves_no_folder(tree, tmp_path, capsys, monkeypatch):
    """An error while the merge encodes PNGs fails the run and leaves no ensemble, PNG or staging folder."""
    from isle_fast.stores import export

    def broken(self, start, block):
        real(self, start, block.copy()[:1])                 # some PNGs are written, then the disk is full
        raise OSError("disk full (simulated)")

    real = export.LabelPngWriter.write
    monkeypatch.setattr(export.LabelPngWriter, "write", broken)
    with pytest.raises(OSError, match="disk full"):
        run_job(spec_from_root(tree, out=tmp_path / "run", report=False, quiet=True, workers=2))
    left = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert left == sorted([".isle-output.json", ".isle-run.lock", "cache"]), left


# --------------------------------------------------------------------------------- the cache
def test_unchanged_inputs_reuse_every_store(tree, tmp_path, capsys):
    run = tmp_path / "run"
    assert run_cli(capsys, "run", tree, "--out", run, "--no-report")[0] == 0
    first = pngs(run / "ensemble")
    chunk = next((run / "cache" / "beta.zarr" / "labels" / "c").rglob("*"))
    stamp = chunk.stat().st_mtime_ns
    rc, out, _ = run_cli(capsys, "run", tree, "--out", run, "--no-report")
    assert rc == 0 and "0 made, 4 reused" in out
    doc = run_doc(run)
    assert doc["made"] == [] and sorted(doc["reused"]) == sorted(["gt.zarr", "alpha.zarr", "beta.zarr",
                                                                    "gamma.zarr"])
    assert chunk.stat().st_mtime_ns == stamp                    # not written again
    assert pngs(run / "ensemble").keys() == first.keys()
    assert all(np.array_equal(a, first[k]) for k, a in pngs(run / "ensemble").items())


def test_a_new_set_ingests_only_that_set(tree, tmp_path, capsys):
    run = tmp_path / "run"
    assert run_cli(capsys, "run", tree, "--out", run, "--no-report")[0] == 0
    for f in sorted((tree / "pseudo" / "alpha").glob("*.png")):    # a fourth set: alpha, shifted
        save_png(tree / "pseudo" / "delta" / f.name, np.roll(np.asarray(Image.open(f)), 2, axis=1))
    assert run_cli(capsys, "run", tree, "--out", run, "--no-report")[0] == 0
    doc = run_doc(run)
    assert doc["made"] == ["delta.zarr"] and len(doc["reused"]) == 4
    assert "delta" in doc["sets"]


def test_a_changed_file_is_ingested_again(tree, tmp_path, capsys):
    run = tmp_path / "run"
    assert run_cli(capsys, "run", tree, "--out", run, "--no-report")[0] == 0
    f = tree / "pseudo" / "beta" / "im007.png"
    a = np.asarray(Image.open(f)).copy()
    a[:5, :5] = 8
    save_png(f, a)
    assert run_cli(capsys, "run", tree, "--out", run, "--no-report")[0] == 0
    doc = run_doc(run)
    assert doc["made"] == ["beta.zarr"]
    assert np.array_equal(open_stack(run / "cache" / "beta.zarr").read_image("im007"), a)
    # a changed gt file: the gt and every set (their ids and padding come from the gt)
    g = tree / "SegmentationClass" / "im003.png"
    os.utime(g, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert run_cli(capsys, "run", tree, "--out", run, "--no-report")[0] == 0
    assert len(run_doc(run)["made"]) == 4


# --------------------------------------------------------------------------------- kills
_SLOW_SAVES = r"""
import sys, time
from isle_fast.stores import png
_orig = png.encode_palette_png
def _slow(*a, **k):
    time.sleep(0.03)
    return _orig(*a, **k)
png.encode_palette_png = _slow   # export encodes every PNG with it (in the worker processes too)
from isle_fast.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _kill_during_export(argv: list, run: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_SAVES, *map(str, argv)], cwd=REPO,
                            env=dict(os.environ, ISLE_PROGRESS="0"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    t0 = time.monotonic()
    while True:
        staged = (list(run.glob(".staging*/ensemble/*.png"))
                  + list(run.glob(".staging*/ensemble.tmp-*/*.png")))
        if staged:
            break
        if proc.poll() is not None:
            pytest.fail(f"the run ended (rc {proc.returncode}) before exporting: {proc.stderr.read()[-800:]}")
        assert time.monotonic() - t0 < 120, "the run never started exporting"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_a_killed_run_leaves_nothing_complete_and_a_rerun_works(tree, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["run", tree, "--out", run, "--no-report", "--workers", "2"]
    _kill_during_export(argv, run)
    assert not (run / "run.json").exists()
    assert not (run / "ensemble").exists() and not (run / "ensemble.zarr").exists()
    for p in (run / "cache").glob("*.zarr*"):      # what the cache holds is complete or not a store
        if p.name.endswith(".zarr"):
            assert open_stack(p).num_images == 40
    assert run_cli(capsys, *argv)[0] == 0
    assert not list(run.glob(".staging*"))           # the killed run's temporary folder is gone
    clean = tmp_path / "clean"
    assert run_cli(capsys, "run", tree, "--out", clean, "--no-report")[0] == 0
    a, b = pngs(run / "ensemble"), pngs(clean / "ensemble")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_a_killed_rerun_keeps_the_previous_results(tree, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["run", tree, "--out", run, "--no-report", "--workers", "2"]
    assert run_cli(capsys, *argv)[0] == 0
    before = (run / "run.json").read_text()
    first = pngs(run / "ensemble")
    _kill_during_export(argv + ["--policy", "order"], run)
    assert (run / "run.json").read_text() == before        # the results there are the ones run.json names
    now = pngs(run / "ensemble")
    assert now.keys() == first.keys() and all(np.array_equal(now[k], first[k]) for k in now)


# --------------------------------------------------------------------------------- user mistakes
@pytest.mark.parametrize("case", ["foreign_out", "missing_set", "both_forms", "overlap", "bad_toml", "dup",
                                  "no_sets", "bad_subset"])
def test_user_mistakes_are_one_line_exit_2(tree, tmp_path, capsys, case):
    run = tmp_path / "run"
    if case == "foreign_out":
        run.mkdir()
        (run / "mine.txt").write_text("keep me")
        argv, needle = ["run", tree, "--out", run], "not made by isle run"
    elif case == "missing_set":
        argv, needle = ["run", "--gt", tree / "SegmentationClass", "--set", f"x={tmp_path / 'nope'}",
                        "--out", run], "nope"
    elif case == "both_forms":
        argv, needle = ["run", tree, "--gt", tree / "SegmentationClass", "--out", run], "not both"
    elif case == "overlap":
        argv, needle = ["run", tree, "--out", tree / "pseudo" / "alpha" / "run"], "overlap"
    elif case == "bad_toml":
        (tmp_path / "j.toml").write_text('gt = "voc/SegmentationClass"\nout = "r"\ncolour = 3\n'
                                         '[sets]\na = "x"\n')
        argv, needle = ["run", tmp_path / "j.toml"], "colour"
    elif case == "dup":
        argv, needle = ["run", "--gt", tree / "SegmentationClass", "--set", f"a={tree / 'pseudo' / 'alpha'}",
                        "--set", f"a={tree / 'pseudo' / 'beta'}", "--out", run], "twice"
    elif case == "no_sets":
        argv, needle = ["run", "--gt", tree / "SegmentationClass", "--out", run], "at least one"
    else:
        argv, needle = ["run", tree, "--out", run, "--sets", "alpha,zeta"], "zeta"
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 2, (out, err)
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("isle run: ") or "error" in ln]
    assert lines[-1].startswith("isle run: error: ") and needle in lines[-1], err
    assert "Traceback" not in err
    if case == "foreign_out":
        assert sorted(p.name for p in run.iterdir()) == ["mine.txt"]
    elif case != "overlap":
        assert not (run / "run.json").exists()


def test_library_spec_from_root_and_toml(tree, tmp_path):
    spec = spec_from_root(tree, out=tmp_path / "r")
    assert list(spec.sets) == list(SETS) and spec.gt == tree / "SegmentationClass" and spec.images is None
    job = tmp_path / "j.toml"
    job.write_text('gt = "voc/SegmentationClass"\n[cams]\nirn = "cams/irn"\n[refine]\nchain = "crf"\n')
    s2 = spec_from_toml(job, out=tmp_path / "r2")
    assert s2.cams == {"irn": tmp_path / "cams" / "irn"} and s2.refine == ["crf"]
    res = run_job(JobSpec(gt=tree / "SegmentationClass", sets={"beta": tree / "pseudo" / "beta"},
                          out=tmp_path / "lib", report=False, quiet=True))
    assert res.images == 40 and res.sets == ["beta"] and set(res.selection.values()) == {"beta"}
