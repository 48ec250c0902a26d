"""Benchmarks: the shared helpers are right, and ``python -m benchmarks --quick`` runs end to end.

No timing assertions: the smoke test only checks that every benchmark module
that exists runs on tiny sizes and that the combined summary is written.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from benchmarks import common
from benchmarks.__main__ import MODULES, available
from isle_fast.cli import main as isle_main
from tests import reference as ref

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------
@given(a=st.floats(-2, 3), b=st.floats(-5, 5))
def test_fit_exponent_recovers_power_law(a, b):
    x = np.array([1, 2, 4, 8, 16, 32], float)
    f = common.fit_exponent(x, np.exp(b) * x ** a)
    assert f["exponent"] == pytest.approx(a, abs=1e-9)
    assert f["points"] == 6


def test_fit_exponent_drops_bad_points():
    f = common.fit_exponent([1, 2, 0, 4], [1, 2, 5, -1])
    assert f["points"] == 2 and f["exponent"] == pytest.approx(1.0)
    assert np.isnan(common.fit_exponent([1], [1])["exponent"])


@given(a=st.floats(0, 2), k=st.sampled_from([-1.5, -1.0, -0.5, 0.4, 1.0, 1.37, 2.0]))
def test_fit_power_offset_recovers_fixed_cost_and_exponent(a, k):
    x = np.geomspace(1, 1000, 6)
    f = common.fit_power_offset(x, a + x ** k)
    assert f["exponent"] == pytest.approx(k, abs=0.011)
    assert f["fixed"] == pytest.approx(a, abs=0.02 * (1 + a))
    assert f["rel_rms"] < 0.02 and f["points"] == 6


def test_fit_power_offset_sees_a_flat_series_and_needs_three_points():
    f = common.fit_power_offset([1, 2, 4, 8, 16], [1.0, 1.01, 0.99, 1.0, 1.02])
    assert f["varying_share_peak"] < 0.1
    g = common.fit_power_offset([1, 4, 16, 64], [4.0, 1.0, 0.25, 0.0625])   # pure 1/x: all varying
    assert g["exponent"] == pytest.approx(-1.0, abs=0.011) and g["varying_share_peak"] > 0.9
    assert np.isnan(common.fit_power_offset([1, 2], [1, 2])["exponent"])


def test_scaling_fixed_cost_no_longer_hides_linear_growth():
    """The old evaluate-in-images slope 0.64 came from a fixed cost; the offset fit reports k = 1."""
    from benchmarks import scaling

    x = [128, 256, 512, 1024, 2048]
    rows = [{"x": n, "size": n, "evaluate": 0.15 + 2e-4 * n, "merge": 0.3 + 4e-4 * n, "select": 2e-4}
            for n in x]
    by = {f["key"]: f for f in scaling.fits("images", rows)}
    assert by["evaluate"]["slope"] < 0.8 and by["evaluate"]["exponent"] == pytest.approx(1.0, abs=0.02)
    assert by["evaluate"]["verdict"] == "agrees with the paper"
    assert by["select"]["flat"] and by["select"]["verdict"].startswith("as expected")
    flat = [{"x": c, "size": c, "evaluate": 0.2, "merge": 0.3} for c in (2, 6, 21, 61, 151)]
    by = {f["key"]: f for f in scaling.fits("classes", flat)}
    assert by["evaluate"]["exponent"] == pytest.approx(0.0, abs=1e-6)
    assert by["evaluate"]["verdict"].startswith("differs from the paper, as expected")
    quick = scaling.fits("classes", flat[:2], quick=True)
    assert all(f["verdict"].startswith("quick mode") for f in quick)


def test_scaling_verdicts():
    from benchmarks.scaling import Claim, verdict

    c = Claim("x", 1.0, 0.0, "fused kernel")
    assert verdict(1.1, c) == "agrees with the paper"
    assert verdict(0.05, c) == "differs from the paper, as expected: fused kernel"
    assert verdict(2.0, c).startswith("differs from the paper (1) and from expected (0)")
    assert verdict(0.9, Claim("y", None, 1.0, "pixels")) == "as expected (pixels)"
    assert verdict(0.3, Claim("y", None, 1.0, "", "png")) == "differs from expected 1: png"
    assert verdict(float("nan"), c) == "too few points to fit"


def test_scaling_sweeps_cover_every_step_and_have_sizes():
    from benchmarks import scaling

    keys = {k for spec in scaling.SWEEPS.values() for k in spec["series"]}
    for step in ("ingest", "refine", "evaluate", "select", "merge", "train_step", "predict"):
        assert step in keys, step
    full, quick = scaling._sizes(False), scaling._sizes(True)
    for name in scaling.SWEEPS:
        assert len(full[name]) >= 2 and len(quick[name]) == 2, name
        if not name.endswith("workers"):
            assert len(full[name]) >= 4, name          # enough points for the fixed + power fit
    # the deployment claim is measured, not only stated
    assert scaling.SWEEPS["train_sets"]["series"]["train_step"].paper == 0.0
    assert scaling.SWEEPS["predict_sets"]["series"]["predict"].expected == 0.0


def test_scaling_quick_subset_writes_json_and_plots(tmp_path, monkeypatch):
    """``python -m benchmarks.scaling --quick --only ...`` on a few sweeps: JSON with fits, one PNG per sweep."""
    from benchmarks import scaling

    monkeypatch.setenv("ISLE_BENCH_RESULTS", str(tmp_path / "res"))
    monkeypatch.setenv("ISLE_BENCH_TMP", str(tmp_path / "cache"))
    assert scaling.main(["--quick", "--only", "sets,ingest_images,refine_pixels"]) == 0
    doc = json.loads((tmp_path / "res" / "scaling.json").read_text())
    assert doc["quick"] is True and set(doc["sweeps"]) == {"sets", "ingest_images", "refine_pixels"}
    assert {f["key"] for f in doc["fits"]} >= {"evaluate", "merge", "ingest", "refine"}
    assert doc["machine"]["load_average_1m"] is not None and doc["load_average_1m_after_sweep"]
    for name in ("sets", "ingest_images", "refine_pixels"):
        assert (tmp_path / "res" / f"scaling_{name}.png").read_bytes()[:4] == b"\x89PNG"


def test_best_of_keeps_minimum_and_value():
    calls = []

    def fn():
        calls.append(1)
        time.sleep(0.001 * len(calls))
        return len(calls)

    t = common.best_of(fn, k=3, warmup=1)
    assert len(calls) == 4 and t.value == 4
    assert t.best == min(t["runs"]) and len(t["runs"]) == 3


def test_write_json_has_machine_and_is_plain_json(tmp_path, monkeypatch):
    monkeypatch.setenv("ISLE_BENCH_RESULTS", str(tmp_path))
    t = common.best_of(lambda: np.arange(3), k=1, warmup=0)
    p = common.write_json("x", {"t": t, "a": np.arange(3), "n": np.float32(1.5), "bad": float("nan")})
    doc = json.loads(p.read_text())
    assert doc["benchmark"] == "x" and doc["machine"]["cpu"] and doc["machine"]["usable_cores"] >= 1
    assert "numpy" in doc["machine"]["versions"]
    assert doc["a"] == [0, 1, 2] and doc["n"] == 1.5 and doc["bad"] is None and "value" not in doc["t"]


def test_tables():
    rows = [{"a": 1, "b": 0.5}, {"a": 22, "b": None}]
    text = common.format_table(rows)
    assert text.splitlines()[0].split() == ["a", "b"] and "-" in text.splitlines()[-1]
    md = common.markdown_table(rows)
    assert md.splitlines()[1] == "| --- | --- |" and md.count("\n") == 3


def test_peak_memory_sees_an_allocation():
    with common.PeakMemory(interval=0.005) as pm:
        a = np.ones(200 * 2**20, np.uint8)
        time.sleep(0.1)
        del a
    assert pm.peak - pm.baseline > 150 * 2**20


def test_plot_loglog_writes_png(tmp_path):
    p = common.plot_loglog(tmp_path / "p.png", {"s": ([1, 2, 4], [1, 4, 16])}, xlabel="x")
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 5), sets=st.integers(1, 4), c=st.integers(2, 30))
def test_synth_block_invariants(seed, n, sets, c):
    shapes = common.synth_shapes(n, 40, seed)
    gt, ss = common.synth_block(seed, shapes, (40, 40), c, sets)
    gt2, _ = common.synth_block(seed, shapes, (40, 40), c, sets)
    assert np.array_equal(gt, gt2)                         # deterministic
    assert len(ss) == sets
    rows = np.arange(40)[None, :, None] < shapes[:, 0][:, None, None]
    cols = np.arange(40)[None, None, :] < shapes[:, 1][:, None, None]
    inside = rows & cols
    for a in [gt, *ss]:
        assert a.dtype == np.uint8 and a.shape == (n, 40, 40)
        assert (a[~inside] == 255).all()                   # padding
        v = a[inside]
        assert ((v < c) | (v == 255)).all()
    for a in ss:
        assert (a[inside] < c).all()                       # sets never abstain inside an image


@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 4), c=st.integers(2, 12))
def test_reference_helpers_match_the_kernel_contract(seed, n, c):
    """The benchmarks' references (public bincount loop, NumPy Algorithm 3) equal tests/reference.py."""
    rng = np.random.default_rng(seed)
    gt = rng.integers(0, c, size=(9, 11)).astype(np.uint8)
    gt[rng.random(gt.shape) < 0.1] = 255
    sets = [rng.integers(0, c, size=gt.shape).astype(np.uint8) for _ in range(n)]
    want = ref.confusion_labels(gt, sets, c)
    for k, s in enumerate(sets):
        assert np.array_equal(common.wsss_confusion(gt, s, c), want[k, :, :c])
    abst = [s.copy() for s in sets]
    for s in abst:
        s[rng.random(s.shape) < 0.2] = 255
    selection = rng.integers(0, n, size=c).astype(np.int64)
    priority = rng.integers(0, 3, size=(n, c)).astype(np.float64)   # many ties
    assert np.array_equal(common.numpy_merge_image(abst, selection, priority, c),
                          ref.merge_labels(abst, selection, priority, 0))


def test_make_label_stores_is_cached(tmp_path):
    a = common.make_label_stores(tmp_path, 5, n_sets=2, max_side=24, num_classes=4, chunk_images=2)
    b = common.make_label_stores(tmp_path, 5, n_sets=2, max_side=24, num_classes=4, chunk_images=2)
    assert a["generated"] and not b["generated"] and a["gt"] == b["gt"] and len(a["sets"]) == 2
    assert a["chunks"] == [2, 24, 24]


# --------------------------------------------------------------------------------------
# runners
# --------------------------------------------------------------------------------------
def test_unknown_benchmark_is_a_clean_error(capsys):
    assert isle_main(["bench", "--only", "nope"]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "Traceback" not in err


def test_summary_only_collects_earlier_results(tmp_path, monkeypatch, capsys):
    """``isle bench --summary-only`` runs nothing and puts the results already there into the summary."""
    monkeypatch.setenv("ISLE_BENCH_RESULTS", str(tmp_path))
    common.write_json("scaling", {"headline": [common.headline_row("x", 1.0, "ref", 4.0)]})
    assert isle_main(["bench", "--summary-only", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["modules"]["scaling"]["status"] == "earlier result"
    assert summary["modules"]["scaling"]["headline"][0]["speedup"] == 4.0
    assert summary["modules"]["pipeline"]["status"] == "not run"
    assert "| scaling.json | x |" in (tmp_path / "SUMMARY.md").read_text()


def test_module_list_matches_files():
    for name in ("scaling", "pipeline", "e2e"):
        assert name in MODULES and available(name)


@pytest.mark.slow
def test_score_merge_quick(tmp_path, monkeypatch):
    """``python -m benchmarks.score_merge --quick``: both layouts timed, the ensembles equal, JSON written."""
    from benchmarks import score_merge

    monkeypatch.setenv("ISLE_BENCH_RESULTS", str(tmp_path / "res"))
    monkeypatch.setenv("ISLE_BENCH_TMP", str(tmp_path / "cache"))
    assert score_merge.main(["--quick"]) == 0
    doc = json.loads((tmp_path / "res" / "score_merge.json").read_text())
    assert doc["quick"] is True and doc["equal"] is True and doc["layouts"] == ["sparse", "dense"]
    want = {"merge sparse scores, sweep off", "merge dense scores, sweep kept", "one threshold pass"}
    assert want <= set(doc["steps"])


@pytest.mark.slow
def test_coco_quick(tmp_path, monkeypatch):
    """``python -m benchmarks.coco --quick``: threaded, 1 and 2 workers equal; the projection is written."""
    from benchmarks import coco

    monkeypatch.setenv("ISLE_BENCH_RESULTS", str(tmp_path / "res"))
    monkeypatch.setenv("ISLE_BENCH_TMP", str(tmp_path / "cache"))
    assert coco.main(["--quick"]) == 0
    doc = json.loads((tmp_path / "res" / "coco.json").read_text())
    assert doc["quick"] is True and doc["classes"] == 81 and doc["coco_images"] == 82081
    assert [r["workers"] for r in doc["cluster"]] == [1, 2]
    assert all(r["counts_equal"] and r["ensemble_equal"] and r["peak_rss_worker"] > 0 for r in doc["cluster"])
    for r in doc["cluster"]:   # CPU seconds by process: the workers did the chunk work, the others some
        assert set(r["cpu_seconds"]) == {"client", "scheduler", "nannies", "workers"}
        assert r["cpu_seconds"]["workers"] > 0 and r["cpu_seconds"]["scheduler"] > 0
        assert r["cpu_total"] == pytest.approx(sum(r["cpu_seconds"].values()))
        assert r["overhead_cpu"] == pytest.approx(r["cpu_total"] - doc["threaded"]["cpu_seconds"])
    proj = doc["projection"]
    assert proj["chunks"] == 8 and [r["workers"] for r in proj["at_coco_size"]][:3] == [1, 2, 4]
    assert coco.projection(1.0, 0.5, 5, [1, 2, 5]) == [{"workers": 1, "seconds": 3.5},
                                                      {"workers": 2, "seconds": 2.5},
                                                      {"workers": 5, "seconds": 1.5}]


@pytest.mark.slow
def test_e2e_quick(tmp_path, monkeypatch):
    """``python -m benchmarks.e2e --quick``: every measurement runs; label maps and counts are equal."""
    from benchmarks import e2e

    monkeypatch.setenv("ISLE_BENCH_RESULTS", str(tmp_path / "res"))
    monkeypatch.setenv("ISLE_BENCH_TMP", str(tmp_path / "cache"))
    assert e2e.main(["--quick"]) == 0
    doc = json.loads((tmp_path / "res" / "e2e.json").read_text())
    assert doc["quick"] is True
    job = doc["jobs"][0]
    assert job["identical_label_maps"] == job["images"] == 48
    assert job["best"]["plain"] > 0 and job["best"]["isle_cold"] > 0 and job["floor_seconds"] > 0
    assert doc["evaluate"][0]["counts_equal"] is True
    assert doc["fast_start"]["local"]["first_task"] > 0 and "numpy" in doc["fast_start"]["import_seconds"]
    assert "dask" not in doc["fast_start"]["import_seconds"]           # isle evaluate never imports Dask
    assert set(doc["png_compression"]) == {"rle", "1", "6", "9"}
    assert {"target_met"} <= set(doc["headline"][0]) and len(doc["headline"]) == 4
    assert (tmp_path / "res" / "e2e.png").read_bytes()[:4] == b"\x89PNG"


#: modules whose ``--quick`` run has a test of its own (module -> the test file and the test's name): the
#: smoke run below leaves them out rather than run them twice (the gpu one runs without a device; with one,
#: the wheel test below runs ``isle bench --only gpu --quick``)
OWN_QUICK_TEST = {
    "e2e": ("test_benchmarks.py", "test_e2e_quick"),
    "coco": ("test_benchmarks.py", "test_coco_quick"),
    "selection": ("test_benchmarks.py", "test_selection_quick"),
    "score_storage": ("test_benchmarks.py", "test_score_storage_quick_counts_the_decode_plain_rounding_gets_wrong"),
    "cams": ("test_sweep.py", "test_cams_benchmark_quick"),
    "gpu": ("test_kernels_gpu.py", "test_gpu_benchmark_without_device_says_skipped"),
}


@pytest.mark.slow
def test_quick_smoke(tmp_path):
    """``python -m benchmarks --quick`` runs every benchmark module that exists and writes the summary
    (the modules of :data:`OWN_QUICK_TEST` are run by their own tests)."""
    env = dict(os.environ, ISLE_BENCH_TMP=str(tmp_path / "cache"), ISLE_PROGRESS="0")
    run = [m for m in MODULES if m not in OWN_QUICK_TEST]
    for m, (file, test) in OWN_QUICK_TEST.items():   # the run that covers it exists
        assert f"def {test}(" in (REPO / "tests" / file).read_text(), (m, file, test)
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--only", ",".join(run),
                           "--out", str(tmp_path / "res")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    summary_path = tmp_path / "res" / "summary.json"
    assert summary_path.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(summary_path.read_text())
    failed = {n: m for n, m in summary["modules"].items() if n in run and m["status"] not in ("ok", "not built")}
    assert all(summary["modules"][n]["status"] == "not run" for n in OWN_QUICK_TEST), summary["modules"]
    assert proc.returncode == 0 and not failed, "\n".join(
        f"benchmarks.{n}: {m['status']} (exit {m.get('returncode')})\n" + "\n".join(m.get("stdout_tail", [])[-12:])
        for n, m in failed.items()) + proc.stderr[-2000:]
    assert summary["quick"] is True
    for name in run:
        status = summary["modules"][name]["status"]
        assert status == ("ok" if available(name) else "not built"), (name, summary["modules"][name])
    md = (tmp_path / "res" / "SUMMARY.md").read_text()
    assert "## pipeline" in md and "## scaling" in md
    assert (tmp_path / "res" / "pipeline.json").exists() and (tmp_path / "res" / "scaling_images.png").exists()


def test_score_storage_quick_counts_the_decode_plain_rounding_gets_wrong(tmp_path, monkeypatch, capsys):
    """The ingest benchmark of score storage: every store dtype decodes like IRN's evaluation of the files,
    the plainly rounded uint8 stacks do not, and they are no smaller than the argmax-keeping ones."""
    from benchmarks import score_storage

    monkeypatch.setenv("ISLE_BENCH_RESULTS", str(tmp_path / "res"))
    monkeypatch.setenv("ISLE_BENCH_TMP", str(tmp_path / "tmp"))
    assert score_storage.main(["--quick"]) == 0
    doc = json.loads((tmp_path / "res" / "score_storage.json").read_text())
    rows = {r["storage"].split(" (")[0]: r for r in doc["rows"]}
    assert [rows[f"ingest, {d}"]["pixels_wrong"] for d in ("uint8", "float16", "float32")] == [0, 0, 0]
    assert rows["uint8, plain rint"]["pixels_wrong"] > 0
    assert rows["ingest, uint8"]["bytes_on_disk"] < rows["ingest, float16"]["bytes_on_disk"]
    assert "decoded unlike IRN" in capsys.readouterr().out


def test_benchmark_modules_import_each_other_relatively():
    """Installed, the modules are the package ``isle_fast_benchmarks``: an absolute ``benchmarks.``
    import would load some other installed package of that name (or fail)."""
    import re

    for path in sorted((REPO / "benchmarks").glob("*.py")):
        for line in path.read_text(encoding="utf-8").splitlines():
            assert not re.match(r"\s*(from|import) benchmarks\b", line), f"{path.name}: {line.strip()}"


def _wheel_venv(tmp_path: Path) -> Path:
    """A throwaway venv with the isle-fast wheel built from this checkout (other packages via a .pth)."""
    import shutil

    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "results", "*.egg-info")
    for name in ("isle_fast", "kernels", "benchmarks"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    for name in ("setup.py", "README.md"):
        shutil.copy2(REPO / name, src / name)
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(wheels), str(src)], check=True, capture_output=True, timeout=600)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = next(venv.glob("lib/python*/site-packages"))
    deps = Path(np.__file__).resolve().parents[1]          # the site-packages that holds the dependencies
    (site / "deps.pth").write_text(f"{deps}\n")
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed",
                    "--prefix", str(venv), *map(str, wheels.glob("*.whl"))], check=True, capture_output=True,
                   timeout=600)
    return venv


@pytest.mark.slow
def test_isle_bench_runs_from_an_installed_wheel(tmp_path):
    """``isle bench`` from a wheel: the benchmarks are packaged (``isle_fast_benchmarks``), a foreign
    ``benchmarks`` package in the working directory is never imported, results go to the working
    directory."""
    venv = _wheel_venv(tmp_path)
    work = tmp_path / "work"
    (work / "benchmarks").mkdir(parents=True)
    (work / "benchmarks" / "__init__.py").write_text("raise SystemExit('imported the wrong benchmarks')\n")
    drop = ("PYTHONPATH", "ISLE_BENCH_RESULTS", "NUMBA_ENABLE_CUDASIM")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["ISLE_PROGRESS"] = "0"
    code = "import isle_fast, isle_fast_benchmarks as b; print(isle_fast.__file__); print(b.__file__)"
    where = subprocess.run([str(venv / "bin" / "python"), "-c", code], cwd=work, env=env, capture_output=True,
                           text=True, timeout=120)
    assert where.returncode == 0, where.stderr[-2000:]
    assert all(line.startswith(str(venv)) for line in where.stdout.split()), where.stdout
    isle = str(venv / "bin" / "isle")
    proc = subprocess.run([isle, "bench", "--only", "gpu", "--quick"], cwd=work, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((work / "benchmark-results" / "summary.json").read_text())
    assert summary["modules"]["gpu"]["status"] == "ok", summary["modules"]["gpu"]
    assert (work / "benchmark-results" / "gpu.json").is_file() and "wrong benchmarks" not in proc.stderr
    site = next(venv.glob("lib/python*/site-packages"))
    assert not (site / "isle_fast_benchmarks" / "results").exists()   # results are not packaged
    proc = subprocess.run([isle, "bench", "--summary-only", "--out", str(tmp_path / "res")], cwd=work,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and (tmp_path / "res" / "SUMMARY.md").is_file(), proc.stderr[-2000:]


def test_selection_study_on_a_tiny_synthetic_set():
    """benchmarks.selection: K rows and no-label rows; the K = I - 1 choice is nearly the full-gt one."""
    from benchmarks import selection

    data = selection.synthetic(0, "spread", 30, 40)
    res = selection.study(data, trials=2, reps=20, ks=(10, 29))
    modes = [r["mode"] for r in res["rows"]]
    assert modes[:4] == ["K=10", "K=10 + estimate", "K=29", "K=29 + estimate"]
    assert "none: staple" in modes and "none: pairwise" in modes
    assert res["full_gt_gain"] == res["full_gt_ensemble_miou"] - res["best_single_miou"]
    k29 = res["rows"][2]
    assert 0.0 <= k29["agree"] <= 1.0 and k29["iou_lost"] >= 0.0
    assert k29["agree"] >= res["rows"][0]["agree"] - 0.35  # more labels are not much worse
    summary = selection.summarize([res])
    assert {r["mode"] for r in summary} == set(modes)


def test_selection_rate_scores_at_the_data_sets_own_rates_are_the_full_gt_iou():
    """benchmarks.selection.rate_scores: at the strata's own truth rates, with no image labelled, every
    set's IoU is the full-gt IoU (each stratum's pixels split as the gt splits them); with every image
    labelled, it is the full-gt IoU whatever the rates."""
    from benchmarks import selection
    from isle_fast import metrics

    data = selection.synthetic(1, "close", 24, 40)
    pre = selection.precompute(data)
    full = metrics.iou(pre["counts"].sum(axis=0))
    own = pre["strata"].sum(axis=0)
    pat = pre["patterns"]["labels"]
    np.testing.assert_allclose(selection.rate_scores(own, np.zeros_like(own), pat), full, rtol=1e-12, atol=1e-9)
    other = selection.model_strata(data, 30)
    assert not np.array_equal(other, own)
    np.testing.assert_allclose(selection.rate_scores(other, own, pat), full, rtol=1e-12, atol=1e-9)


def test_selection_model_strata_is_a_new_sample_of_the_same_model():
    """benchmarks.selection.model_strata: deterministic, about the requested size, and the model's rates
    (the same quality matrix) rather than the data set's own images."""
    from benchmarks import selection

    data = selection.synthetic(2, "spread", 20, 40)
    a = selection.model_strata(data, 500)
    assert np.array_equal(a, selection.model_strata(data, 500))
    assert a.shape == (2, 21, 16, 3) and (a[..., 1] <= a[..., 0]).all() and (a[..., 2] <= a[..., 0]).all()
    # of the pixels not ignored, a stratum where every set votes the class is mostly the class, one where one
    # set alone votes it mostly not
    fg = a[0, 1:].sum(axis=0)
    rate = fg[:, 1] / (fg[:, 0] - fg[:, 2])
    assert rate[15] > 0.85 and rate[1] < 0.5 and rate[2] < 0.5 and rate[4] < 0.5 and rate[8] < 0.5


def test_selection_paper_quality_keeps_the_papers_best_sets_and_margins():
    """benchmarks.selection._paper_quality: per class the paper's best component has the lowest miss rate,
    and a wider margin in Tables 3-4 is a higher miss rate."""
    from benchmarks import selection
    from isle_fast.synthetic.quality import PAPER_PSEUDO_IOU

    miss, conf = selection._paper_quality(4, 21, 0, 40)
    assert miss.shape == conf.shape == (4, 21) and (miss >= 0).all() and (miss <= 0.85 + 1e-12).all()
    for k in range(1, 21):
        order = np.argsort(-PAPER_PSEUDO_IOU[:, k], kind="stable")
        assert np.all(np.diff(miss[order, k]) >= -1e-12), k
        assert miss[order[0], k] == pytest.approx(selection.PAPER_BEST_MISS)


@pytest.mark.slow
def test_selection_quick(tmp_path, monkeypatch):
    """``python -m benchmarks.selection --quick``: tables, JSON with the targets, and the plot."""
    from benchmarks import selection

    monkeypatch.setenv("ISLE_BENCH_RESULTS", str(tmp_path / "res"))
    monkeypatch.setenv("ISLE_BENCH_TMP", str(tmp_path / "cache"))
    assert selection.main(["--quick", "--trials", "2", "--reps", "30", "--images", "40", "--voc-images", "12"]) == 0
    doc = json.loads((tmp_path / "res" / "selection.json").read_text())
    assert doc["quick"] is True and set(doc["targets"]) == {
        "k100_gain_kept>=0.90", "none_gain_kept>=0.70_every_data_set", "none_never_below_best", "p90_right>=0.85"}
    assert (tmp_path / "res" / "selection.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "res" / "selection_oracle.png").read_bytes()[:4] == b"\x89PNG"
    md = (tmp_path / "res" / "selection.md").read_text()
    assert "## Targets" in md and "## Oracle" in md and "model rates (oracle)" in md
    assert {r["data"] for r in doc["oracle"]} >= {"mean", "worst"}
