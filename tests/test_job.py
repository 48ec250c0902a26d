"""``isle run`` (isle_fast.job): the whole job from folders, the fingerprinted cache, kills, equality.

The job must give exactly what the separate commands give (``isle ingest`` x N,
``isle merge``, ``isle export``, ``isle report``), reuse a cached store only
while its input files are unchanged, and never leave a result that looks
complete after a kill.
"""

from __future__ import annotations

import contextlib
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


# A process that takes RUN's lock as a run does (its owner tag in the file), forks a "worker" that
# keeps the lock for argv[2] seconds, and then ends at once (argv[3] == "exit") or stays (a live run).
_HOLD_LOCK = r"""
import fcntl, os, sys, time
from isle_fast.outputs import owner_tag
fd = os.open(os.path.join(sys.argv[1], ".isle-run.lock"), os.O_CREAT | os.O_RDWR, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
os.ftruncate(fd, 0)
os.write(fd, f"{owner_tag()}\n".encode())
if os.fork() == 0:          # the worker: holds the inherited lock, then ends
    time.sleep(float(sys.argv[2]))
    os._exit(0)
print("locked", flush=True)
if sys.argv[3] == "exit":
    os._exit(0)
time.sleep(600)
"""


def _hold_lock(folder: Path, seconds: float, main: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(folder), str(seconds), main],
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert proc.stdout.readline().strip() == "locked"
    if main == "exit":
        proc.wait()
    return proc


def test_a_rerun_right_after_a_kill_waits_for_the_killed_runs_workers(tree, tmp_path, capsys):
    """The killed run's forked workers still hold the lock for a moment after its main process is gone
    (this raced in ``test_a_killed_run_leaves_counts_that_a_rerun_can_trust``): the re-run waits for
    them instead of calling the folder in use."""
    run = tmp_path / "run"
    argv = ["run", tree, "--out", run, "--no-report"]
    assert run_cli(capsys, *argv)[0] == 0
    group = _hold_lock(run, 1.5, "exit")
    t0 = time.monotonic()
    rc, _, err = run_cli(capsys, *argv)
    assert rc == 0, err
    assert time.monotonic() - t0 > 1.0       # it did wait for the worker
    _stop(group)


def _stop(group: subprocess.Popen) -> None:
    """Kill what is left of a :func:`_hold_lock` process group."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group.pid, signal.SIGKILL)
    group.wait()


def _rerun_while_locked(capsys, tree: Path, run: Path, seconds: float, main: str) -> tuple[int, str, int, str]:
    """A run into RUN, then a re-run while :func:`_hold_lock` holds its lock: ``(rc, stderr, holder pid,
    run.json before)``."""
    argv = ["run", tree, "--out", run, "--no-report"]
    assert run_cli(capsys, *argv)[0] == 0
    before = (run / "run.json").read_text()
    holder = _hold_lock(run, seconds, main)
    try:
        rc, _, err = run_cli(capsys, *argv)
    finally:
        _stop(holder)
    return rc, err, holder.pid, before


def test_a_live_run_holding_the_folder_is_an_error_naming_it(tree, tmp_path, capsys):
    run = tmp_path / "run"
    rc, err, pid, before = _rerun_while_locked(capsys, tree, run, 600, "stay")
    assert rc == 2 and "Traceback" not in err
    assert "in use by another isle run" in err and f"pid {pid}" in err
    assert (run / "run.json").read_text() == before          # the live run's folder is untouched


def test_workers_of_an_ended_run_that_keep_the_lock_are_an_error_after_the_wait(tree, tmp_path, capsys,
                                                                                monkeypatch):
    from isle_fast import job

    monkeypatch.setattr(job, "LOCK_WAIT_S", 0.3)
    run = tmp_path / "run"
    rc, err, _, _ = _rerun_while_locked(capsys, tree, run, 600, "exit")
    assert rc == 2 and "Traceback" not in err
    assert "worker processes of an isle run that has ended" in err and str(run) in err


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


# --------------------------------------------------------------------------------- counted at ingest
def _run_fresh(argv: list, timeout: float = 300) -> subprocess.CompletedProcess:
    """``isle`` in a fresh process: its worker pool is forked before Numba starts, so the label sets
    are counted while they are ingested (a test process that ran Numba already takes the separate way)."""
    proc = subprocess.run([sys.executable, "-m", "isle_fast", *map(str, argv)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=dict(os.environ, ISLE_PROGRESS="0"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def _counts_of(ev_json: dict, sets) -> dict:
    return {s: {k: ev_json["sets"][s][k] for k in ("tp", "fp", "fn", "iou")} for s in sets}


@pytest.mark.parametrize("average", ["dataset", "image"])
def test_counts_made_at_ingest_equal_isle_evaluate(tree, tmp_path, capsys, average):
    """A cold run counts the sets in the ingest tasks: the same counts (and per-image figures of the
    report) as ``isle evaluate`` of the stores; a warm run (every store reused) evaluates them: the same
    again; one changed file: that set is made (and counted) again, the others evaluated."""
    run = tmp_path / "run"
    argv = ["run", tree, "--out", run, "--workers", "2", "--average", average, "-q"]
    _run_fresh(argv)
    doc = run_doc(run)
    assert doc["counted_at_ingest"] == [f"{s}.zarr" for s in SETS]
    cache = run / "cache"
    stores = [cache / f"{s}.zarr" for s in SETS]
    assert main(["evaluate", *map(str, stores), "--gt", str(cache / "gt.zarr"), "--average", average,
                 "--quiet", "--json", str(tmp_path / "ev.json")]) == 0
    ref = json.loads((tmp_path / "ev.json").read_text())
    cold = json.loads((run / "evaluation.json").read_text())
    assert _counts_of(cold, SETS) == _counts_of(ref, SETS) and cold["selection"] == ref["selection"]
    assert [cold["sets"][s]["miou"] for s in SETS] == [ref["sets"][s]["miou"] for s in SETS]
    report_cold = json.loads((run / "report" / "report.json").read_text())
    # warm: every store reused, counted by evaluate (this process)
    assert run_cli(capsys, *argv)[0] == 0
    assert run_doc(run)["made"] == [] and run_doc(run)["counted_at_ingest"] == []
    warm = json.loads((run / "evaluation.json").read_text())
    assert _counts_of(warm, SETS) == _counts_of(cold, SETS) and warm["ensemble"] == cold["ensemble"]
    report_warm = json.loads((run / "report" / "report.json").read_text())
    assert _strip_paths(report_warm) == _strip_paths(report_cold)   # per-image uncertainty included
    # one changed file: beta made and counted again, alpha and gamma evaluated
    f = tree / "pseudo" / "beta" / "im007.png"
    a = np.asarray(Image.open(f)).copy()
    a[:6, :6] = 7
    save_png(f, a)
    _run_fresh(argv)
    doc = run_doc(run)
    assert doc["made"] == ["beta.zarr"] and doc["counted_at_ingest"] == ["beta.zarr"]
    assert np.array_equal(open_stack(cache / "beta.zarr").read_image("im007"), a)
    assert main(["evaluate", *map(str, stores), "--gt", str(cache / "gt.zarr"), "--average", average,
                 "--quiet", "--json", str(tmp_path / "ev2.json")]) == 0
    mixed = json.loads((run / "evaluation.json").read_text())
    assert _counts_of(mixed, SETS) == _counts_of(json.loads((tmp_path / "ev2.json").read_text()), SETS)
    assert mixed["sets"]["beta"]["tp"] != cold["sets"]["beta"]["tp"]


def _store_doc(path: Path) -> dict:
    doc = json.loads((path / "zarr.json").read_text())["attributes"]
    prov = dict(doc.get("provenance", {}))
    prov.pop("created", None)
    return {**{k: v for k, v in doc.items() if k not in ("provenance", "isle_identity_crc32c")},
            "provenance": prov}


@pytest.mark.parametrize("per_image", [False, True])
def test_run_counted_equals_ingest_then_evaluate(tree, tmp_path, per_image):
    """:func:`run_counted` writes the stores ``ingest_labels`` writes (arrays, ids, shapes, attributes)
    and counts what ``evaluate`` counts on them, image by image; here on one worker (this process)."""
    from isle_fast.ensemble.evaluate import evaluate
    from isle_fast.stores.ingest import ingest_labels, labels_plan
    from isle_fast.stores.ingest_engine import run_counted

    gt = ingest_labels(tree / "SegmentationClass", tmp_path / "gt.zarr", kind="gt", quiet=True)
    chunks = (7,) + tuple(gt.shape[1:])                       # 6 chunks, the last one short
    gt = ingest_labels(tree / "SegmentationClass", tmp_path / "gt.zarr", kind="gt", chunks=chunks,
                       quiet=True, overwrite=True)
    plans = [labels_plan(tree / "pseudo" / s, tmp_path / "fused" / f"{s}.zarr", gt=gt, name=s, quiet=True,
                         workers=1, chunks=chunks) for s in SETS]
    res = run_counted(plans, gt, per_image=per_image, workers=1, quiet=True)
    assert res is not None
    sep = [ingest_labels(tree / "pseudo" / s, tmp_path / "sep" / f"{s}.zarr", gt=gt, name=s, quiet=True,
                         workers=1, chunks=chunks) for s in SETS]
    for a, b in zip(res.stacks, sep):
        assert np.array_equal(a.array[:], b.array[:]) and list(a.ids) == list(b.ids)
        assert np.array_equal(a.shapes, b.shapes) and a.chunks == b.chunks == gt.chunks
        assert _store_doc(Path(a.path)) == _store_doc(Path(b.path))
    ev = evaluate(sep, gt, progress=False, per_image=per_image)
    assert np.array_equal(res.counts, ev.counts)
    if per_image:
        assert res.image_stats is not None and np.array_equal(res.image_stats, ev.image_stats)
    else:
        assert res.image_stats is None


def test_run_counted_leaves_a_bad_set_to_the_separate_way(tree, tmp_path, capsys):
    """A bad image: run_counted writes nothing and says so (None); the run then ingests the separate
    way and fails with the message ``isle ingest`` gives, naming the file and the image."""
    from isle_fast.stores.ingest import ingest_labels, labels_plan
    from isle_fast.stores.ingest_engine import run_counted

    bad = tree / "pseudo" / "gamma" / "im011.png"
    save_png(bad, np.full((5, 5), 3, np.uint8))                      # the wrong size
    gt = ingest_labels(tree / "SegmentationClass", tmp_path / "gt.zarr", kind="gt", quiet=True)
    plans = [labels_plan(tree / "pseudo" / s, tmp_path / "c" / f"{s}.zarr", gt=gt, quiet=True, workers=1)
             for s in SETS]
    assert run_counted(plans, gt, workers=1, quiet=True) is None
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())
    rc, _, err = run_cli(capsys, "run", tree, "--out", tmp_path / "run", "-q")
    assert rc == 2 and "im011" in err and str(bad) in err and "5 x 5" in err


@pytest.mark.parametrize("per_image", [False, True])
def test_run_counted_with_gt_equals_ingesting_the_gt_then_the_sets(tree, tmp_path, per_image):
    """The gt in the same pass: its store and the sets' equal ``ingest_labels`` of the gt and then of
    each set against it (arrays, ids, shapes, every attribute but the time), the counts ``evaluate``'s."""
    from isle_fast.ensemble.evaluate import evaluate
    from isle_fast.stores.ingest import ingest_labels, labels_plan
    from isle_fast.stores.ingest_engine import run_counted_with_gt

    out = tmp_path / "fused"
    gt_plan = labels_plan(tree / "SegmentationClass", out / "gt.zarr", kind="gt", name="gt", quiet=True,
                          workers=1, chunks=(7, 999, 999))       # 6 chunks of whole images, the last short
    got = run_counted_with_gt(gt_plan, lambda ref: [
        labels_plan(tree / "pseudo" / s, out / f"{s}.zarr", gt=ref, name=s, quiet=True, workers=1,
                    chunks=(7, 999, 999)) for s in SETS], per_image=per_image, workers=1, quiet=True)
    assert got is not None
    gt, res = got
    sep_gt = ingest_labels(tree / "SegmentationClass", tmp_path / "sep" / "gt.zarr", kind="gt", name="gt",
                           quiet=True, workers=1, chunks=(7, 999, 999))
    sep = [ingest_labels(tree / "pseudo" / s, tmp_path / "sep" / f"{s}.zarr", gt=sep_gt, name=s, quiet=True,
                         workers=1, chunks=(7, 999, 999)) for s in SETS]
    for a, b in zip([gt, *res.stacks], [sep_gt, *sep]):
        assert np.array_equal(a.array[:], b.array[:]) and list(a.ids) == list(b.ids)
        assert np.array_equal(a.shapes, b.shapes) and a.chunks == b.chunks
        da, db = _store_doc(Path(a.path)), _store_doc(Path(b.path))
        for d, root in ((da, out), (db, tmp_path / "sep")):       # the gt store named where it is
            if d["provenance"].get("gt"):
                assert d["provenance"]["gt"] == str(root / "gt.zarr")
                d["provenance"]["gt"] = "GT"
        assert da == db
    ev = evaluate(sep, sep_gt, progress=False, per_image=per_image)
    assert np.array_equal(res.counts, ev.counts)
    assert (res.image_stats is None) == (not per_image)
    if per_image:
        assert np.array_equal(res.image_stats, ev.image_stats)
    # a bad gt header: nothing written, None
    (tree / "SegmentationClass" / "im005.png").write_bytes(b"not a png")
    gt_plan = labels_plan(tree / "SegmentationClass", tmp_path / "bad" / "gt.zarr", kind="gt", quiet=True,
                          workers=1)
    assert run_counted_with_gt(gt_plan, lambda ref: [], workers=1, quiet=True) is None
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())


# --------------------------------------------------------------------------------- cached counts
def _ev_counts(run: Path) -> dict:
    return _counts_of(json.loads((run / "evaluation.json").read_text()), SETS)


def test_a_warm_run_takes_the_counts_from_the_cache(tree, tmp_path, capsys):
    """Every store reused: the sets' counts come from ``cache/counts`` (no evaluate pass), the same
    evaluation, selection, ensemble and per-image report figures as the cold run."""
    run = tmp_path / "run"
    argv = ["run", tree, "--out", run, "--workers", "2", "--average", "image", "-q"]
    assert run_cli(capsys, *argv)[0] == 0
    assert run_doc(run)["counts_from_cache"] == []
    assert sorted(p.name for p in (run / "cache" / "counts").iterdir()) == [f"{s}.zarr.npz" for s in SETS]
    cold = json.loads((run / "evaluation.json").read_text())
    report_cold = json.loads((run / "report" / "report.json").read_text())
    import isle_fast.ensemble.evaluate as ev_mod

    calls = []
    real = ev_mod.evaluate

    def counting(*a, **k):
        calls.append(a)
        return real(*a, **k)

    ev_mod.evaluate = counting
    try:
        assert run_cli(capsys, *argv)[0] == 0
    finally:
        ev_mod.evaluate = real
    doc = run_doc(run)
    assert doc["made"] == [] and doc["counts_from_cache"] == [f"{s}.zarr" for s in SETS]
    assert calls == []                                      # no set read again
    warm = json.loads((run / "evaluation.json").read_text())
    assert _counts_of(warm, SETS) == _counts_of(cold, SETS) and warm["selection"] == cold["selection"]
    assert warm["ensemble"] == cold["ensemble"]
    assert _strip_paths(json.loads((run / "report" / "report.json").read_text())) == _strip_paths(report_cold)


def test_cached_counts_follow_the_stores(tree, tmp_path, capsys):
    """A changed input file: that set is made and counted again (its new counts are isle evaluate's),
    the others come from the cache; a changed gt: every set counted again; a damaged or foreign counts
    file is ignored (counted again, rewritten)."""
    run = tmp_path / "run"
    argv = ["run", tree, "--out", run, "--workers", "2", "--no-report", "-q"]
    assert run_cli(capsys, *argv)[0] == 0
    f = tree / "pseudo" / "beta" / "im007.png"
    a = np.asarray(Image.open(f)).copy()
    a[:6, :6] = 7
    save_png(f, a)
    assert run_cli(capsys, *argv)[0] == 0
    doc = run_doc(run)
    assert doc["made"] == ["beta.zarr"] and doc["counts_from_cache"] == ["alpha.zarr", "gamma.zarr"]
    cache = run / "cache"
    assert main(["evaluate", *(str(cache / f"{s}.zarr") for s in SETS), "--gt", str(cache / "gt.zarr"),
                 "--quiet", "--json", str(tmp_path / "ev.json")]) == 0
    assert _ev_counts(run) == _counts_of(json.loads((tmp_path / "ev.json").read_text()), SETS)
    # a damaged file and one of another set: neither is taken
    (cache / "counts" / "alpha.zarr.npz").write_bytes(b"not an npz")
    (cache / "counts" / "gamma.zarr.npz").write_bytes((cache / "counts" / "beta.zarr.npz").read_bytes())
    assert run_cli(capsys, *argv)[0] == 0
    assert run_doc(run)["counts_from_cache"] == ["beta.zarr"]
    assert _ev_counts(run) == _counts_of(json.loads((tmp_path / "ev.json").read_text()), SETS)
    assert run_cli(capsys, *argv)[0] == 0                   # rewritten: all three taken again
    assert run_doc(run)["counts_from_cache"] == [f"{s}.zarr" for s in SETS]
    g = tree / "SegmentationClass" / "im003.png"            # the gt changed: every store, every count
    os.utime(g, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert run_cli(capsys, *argv)[0] == 0
    assert run_doc(run)["counts_from_cache"] == [] and len(run_doc(run)["made"]) == 4


def test_a_killed_run_leaves_counts_that_a_rerun_can_trust(tree, tmp_path, capsys):
    """Killed while exporting (the counts were kept): the re-run takes them and gives a clean run's
    results; a counts temporary left by a killed writer is removed, never read."""
    run = tmp_path / "run"
    argv = ["run", tree, "--out", run, "--no-report", "--workers", "2"]
    _kill_during_export(argv, run)
    counts = run / "cache" / "counts"
    kept = sorted(p.name for p in counts.iterdir()) if counts.is_dir() else []
    assert set(kept) <= {f"{s}.zarr.npz" for s in SETS}     # complete files only
    from isle_fast.outputs import temp_path

    counts.mkdir(exist_ok=True)
    stale = temp_path(counts / "alpha.zarr.npz")
    stale = stale.with_name(stale.name.replace(f"-{os.getpid()}-", "-999999999-"))  # a writer that is gone
    stale.write_bytes(b"half")
    assert run_cli(capsys, *argv)[0] == 0
    assert not stale.exists()
    assert run_doc(run)["counts_from_cache"] == [s.replace(".npz", "") for s in kept]
    clean = tmp_path / "clean"
    assert run_cli(capsys, "run", tree, "--out", clean, "--no-report")[0] == 0
    assert _ev_counts(run) == _ev_counts(clean)
    a, b = pngs(run / "ensemble"), pngs(clean / "ensemble")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
