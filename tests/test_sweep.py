"""Every background threshold in one pass (isle_fast.ensemble.sweep) EQUALS one pass per threshold."""

from __future__ import annotations

import json
import os
import tempfile

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from isle_fast.cli import main
from isle_fast.ensemble.evaluate import evaluate
from isle_fast.ensemble.sweep import (
    BEST_GRID,
    counts_at_levels,
    parse_thresholds,
    sweep_thresholds,
    threshold_levels,
)
from isle_fast.errors import InputError
from isle_fast.kernels import cpu
from tests import reference as ref
from tests.conftest import write_stack

seeds = st.integers(0, 2**32 - 1)


def _case(seed):
    """Scores on a few levels (ties between slices and with the threshold), gt with 255, odd shapes."""
    rng = np.random.default_rng(seed)
    C = int(rng.choice([1, 2, 3, 5, 21, 30]))
    N = int(rng.integers(1, 5))
    shape = tuple(int(rng.choice([1, 2, 3, 7, 9, 13, 31])) for _ in range(int(rng.integers(1, 4))))
    gt = rng.integers(0, C, shape).astype(np.uint8)
    gt[rng.random(shape) < rng.choice([0.0, 0.2])] = 255
    levels = rng.choice(np.array([0, 1, 2, 50, 51, 127, 128, 254, 255]), int(rng.integers(1, 6)))
    sets = []
    for _ in range(N):
        if rng.random() < 0.5:
            s = rng.choice(levels, shape + (C,)).astype(np.uint8)
        else:
            s = rng.integers(0, 256, shape + (C,)).astype(np.uint8)
        sets.append(s)
    return rng, C, gt, tuple(sets)


@given(seeds)
def test_score_bins_equal_reference(seed):
    _, C, gt, sets = _case(seed)
    np.testing.assert_array_equal(
        cpu.confusion_score_bins(gt, sets, C), ref.confusion_score_bins(gt, sets, C)
    )


@given(seeds)
def test_counts_at_every_level_equal_one_pass_per_threshold(seed):
    rng, C, gt, sets = _case(seed)
    levels = sorted(set(int(v) for v in rng.choice(256, int(rng.integers(1, 12)))) | {0, 255})
    got = counts_at_levels(cpu.confusion_score_bins(gt, sets, C), levels)
    np.testing.assert_array_equal(got, ref.confusion_score_sweep(gt, sets, C, levels))


@pytest.mark.parametrize("threads", [1, 2])
def test_bins_over_chunk_boundaries(threads):
    """Several parallel work items (> BLOCK pixels each), chunked calls add up to the whole."""
    rng = np.random.default_rng(7)
    C = 21
    npix = 3 * cpu.BLOCK + 11
    gt = rng.integers(0, C, npix).astype(np.uint8)
    gt[rng.random(npix) < 0.1] = 255
    sets = tuple(rng.integers(0, 40, (npix, C)).astype(np.uint8) for _ in range(4))
    with cpu.numba_threads(min(threads, numba.config.NUMBA_NUM_THREADS)):
        whole = cpu.confusion_score_bins(gt, sets, C)
    np.testing.assert_array_equal(whole, ref.confusion_score_bins(gt, sets, C))
    cut = cpu.BLOCK + 5
    parts = cpu.confusion_score_bins(gt[:cut], tuple(s[:cut] for s in sets), C) + cpu.confusion_score_bins(
        gt[cut:], tuple(s[cut:] for s in sets), C
    )
    np.testing.assert_array_equal(whole, parts)


def test_bins_refuse_float_scores():
    gt = np.zeros(4, np.uint8)
    with pytest.raises(ValueError, match="uint8"):
        cpu.confusion_score_bins(gt, (np.zeros((4, 3), np.float32),), 3)


def test_tie_with_threshold_is_background():
    # one pixel, fg max 51 at class 2 (class 1 ties it at 51: the first wins), bg slice ignored
    gt = np.array([2], np.uint8)
    s = np.array([[200, 51, 51]], np.uint8)
    c = counts_at_levels(cpu.confusion_score_bins(gt, (s,), 3), [50, 51])
    assert c[0, 0, 2].tolist() == [0, 1, 0, 0]  # level 50: 51 > 50, class 1 (first of the tie)
    assert c[0, 1, 2].tolist() == [1, 0, 0, 0]  # level 51: a tie with the threshold is background


def test_threshold_levels_are_the_single_threshold_units():
    from isle_fast.kernels.checks import threshold_value

    ts = [k / 255 for k in range(256)] + list(BEST_GRID) + [0.05 * k for k in range(21)]
    lv = threshold_levels(ts, 255.0)
    want = [int(threshold_value(t * 255.0, np.uint8)) for t in ts]
    assert lv.tolist() == want
    assert threshold_levels([0.2], 255.0).tolist() == [51]  # 0.2 * 255 = 51.00000000000001
    assert threshold_levels([1.0, 0.0], 255.0).tolist() == [255, 0]


# -- parsing ------------------------------------------------------------------------------------


def test_parse_thresholds():
    assert parse_thresholds("0.05:0.80:0.05") == tuple(round(0.05 * k, 2) for k in range(1, 17))
    assert parse_thresholds("0.05:0.80:0.05")[3] == 0.2
    assert parse_thresholds("0.3,0.1, 0.2,0.1") == (0.1, 0.2, 0.3)
    assert parse_thresholds("best") == BEST_GRID and len(BEST_GRID) == 101
    assert parse_thresholds([0.5, 0]) == (0.0, 0.5)
    assert parse_thresholds("0:1:0.5") == (0.0, 0.5, 1.0)


@pytest.mark.parametrize(
    "spec, match",
    [
        ("0.1:0.5", "START:STOP:STEP"),
        ("0.5:0.1:0.1", "ends before"),
        ("0.1:0.5:0", "positive"),
        ("0.1:2:0.1", "in \\[0, 1\\]"),
        ("0.1,x", "'x' is not a number"),
        ("nan", "in \\[0, 1\\]"),
        ("-0.1,0.2", "in \\[0, 1\\]"),
        ([True], "not a threshold"),
        ([], "no threshold"),
    ],
)
def test_parse_thresholds_errors(spec, match):
    with pytest.raises(InputError, match=match):
        parse_thresholds(spec)


# -- stores: the sweep equals evaluate() at every threshold, bit for bit -------------------------


@st.composite
def store_cases(draw):
    n_img = draw(st.integers(1, 4))
    c = draw(st.integers(2, 5))
    shapes = [(draw(st.integers(1, 9)), draw(st.integers(1, 9))) for _ in range(n_img)]
    encodings = [
        draw(st.sampled_from(("uint8", "uint8", "labels", "float16"))) for _ in range(draw(st.integers(1, 3)))
    ]
    chunk = lambda: (draw(st.integers(1, 3)), draw(st.integers(1, 10)), draw(st.integers(1, 10)))  # noqa: E731
    same = draw(st.booleans())  # one chunk grid: the local pass; else Dask rechunks
    gchunk = chunk()
    chunks = [gchunk] + [gchunk if same else chunk() for _ in encodings]
    pad = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    return n_img, c, shapes, encodings, chunks, pad, draw(st.integers(0, 2**31))


def _build(root, n_img, c, shapes, encodings, chunks, pad, seed):
    rng = np.random.default_rng(seed)
    padded = (max(h for h, _ in shapes) + pad[0], max(w for _, w in shapes) + pad[1])
    gt_imgs = [rng.choice(np.array(list(range(c)) + [255], np.uint8), size=s) for s in shapes]
    gt = write_stack(
        os.path.join(root, "gt"), gt_imgs, kind="gt", num_classes=c, chunks=chunks[0], padded_shape=padded
    )
    stores = []
    for k, e in enumerate(encodings):
        if e == "labels":
            imgs = [rng.choice(np.array(list(range(c)) + [255], np.uint8), size=s) for s in shapes]
            st_ = write_stack(
                os.path.join(root, f"s{k}"),
                imgs,
                num_classes=c,
                chunks=chunks[k + 1],
                padded_shape=padded,
                name=f"set{k}",
            )
        else:
            # levels around the thresholds 0.2 (51) and 0.5 (127): ties with the threshold
            vals = np.array([0, 50, 51, 52, 126, 127, 128, 255]) / (255.0 if e == "uint8" else 1.0)
            imgs = [rng.choice(vals, size=s + (c,)).astype(e) for s in shapes]
            st_ = write_stack(
                os.path.join(root, f"s{k}"),
                imgs,
                encoding="scores",
                score_dtype=e,
                num_classes=c,
                chunks=chunks[k + 1] + (c,),
                padded_shape=padded,
                name=f"set{k}",
            )
        stores.append(st_)
    return gt, stores


THRESHOLDS = (0.0, 0.2, 50 / 255, 51 / 255, 0.5, 127 / 255, 0.99, 1.0)


@settings(max_examples=12)
@given(store_cases(), st.sampled_from(["dataset", "image"]))
def test_sweep_equals_evaluate_at_every_threshold(case, average):
    with tempfile.TemporaryDirectory() as root:
        gt, stores = _build(root, *case)
        sw = sweep_thresholds(stores, gt, THRESHOLDS, average=average, backend="cpu", progress=False)
        assert sw.counts.shape == (len(stores), len(sw.thresholds), gt.num_classes, gt.num_classes + 1)
        for k, t in enumerate(sw.thresholds):
            ev = evaluate(stores, gt, bg_threshold=t, average=average, backend="cpu", progress=False)
            np.testing.assert_array_equal(sw.counts[:, k], ev.counts)
            np.testing.assert_array_equal(sw.miou[:, k], ev.miou)
            if average == "image":
                np.testing.assert_array_equal(sw.image_stats[:, :, k], ev.image_stats)
        best = sw.best_evaluation()
        for n, b in enumerate(sw.best_index):
            curve = np.where(np.isnan(sw.miou[n]), -np.inf, sw.miou[n])
            assert b == int(np.flatnonzero(curve == curve.max())[0])  # the lowest of the best
            np.testing.assert_array_equal(best.counts[n], sw.counts[n, b])
        for n, e in enumerate(sw.encodings):
            assert (sw.best_thresholds[n] is None) == (e == "labels")


def test_dask_pass_equals_local_pass(tmp_path, monkeypatch):
    case = (3, 4, [(5, 7), (3, 3), (9, 2)], ["uint8", "labels", "float16"], [(2, 4, 4)] * 4, (1, 0), 3)
    gt, stores = _build(str(tmp_path), *case)
    local = sweep_thresholds(stores, gt, THRESHOLDS, backend="cpu", progress=False)
    monkeypatch.setenv("DASK_SCHEDULER", "sync")
    dsk = sweep_thresholds(stores, gt, THRESHOLDS, backend="cpu", progress=False)
    np.testing.assert_array_equal(local.counts, dsk.counts)


# -- command line -------------------------------------------------------------------------------


def test_cli_evaluate_sweep_prints_curve_and_best(tmp_path, capsys):
    gt, stores = _build(
        str(tmp_path), 2, 3, [(6, 5), (4, 4)], ["uint8", "uint8"], [(2, 6, 5)] * 3, (0, 0), 11
    )
    out = str(tmp_path / "sweep.json")
    rc = main(
        [
            "evaluate",
            *[s.path for s in stores],
            "--gt",
            gt.path,
            "--bg-threshold",
            "0.05:0.80:0.05",
            "--json",
            out,
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out   # not --quiet: that prints nothing but errors
    sw = sweep_thresholds(stores, gt, "0.05:0.80:0.05", progress=False)
    doc = json.load(open(out))
    assert doc["threshold_sweep"]["thresholds"] == list(sw.thresholds)
    for n, name in enumerate(sw.set_names):
        got = doc["threshold_sweep"]["sets"][name]
        assert got["best_threshold"] == sw.best_thresholds[n]
        assert got["miou"] == pytest.approx(sw.miou[n].tolist())
        assert f"best threshold {sw.best_thresholds[n]:g}" in text
    # the per-class table and the JSON scores are each set's evaluation at its best threshold
    best = sw.best_evaluation()
    for n, name in enumerate(best.set_names):
        assert doc["sets"][name]["miou"] == pytest.approx(float(best.miou[n]))


def test_cli_single_threshold_unchanged(tmp_path, capsys):
    gt, stores = _build(str(tmp_path), 2, 3, [(6, 5), (4, 4)], ["uint8"], [(2, 6, 5)] * 2, (0, 0), 5)
    out = str(tmp_path / "one.json")
    assert (
        main(["evaluate", stores[0].path, "--gt", gt.path, "--bg-threshold", "0.2", "--json", out, "--quiet"])
        == 0
    )
    doc = json.load(open(out))
    assert "threshold_sweep" not in doc
    ev = evaluate(stores, gt, bg_threshold=0.2, progress=False)
    assert doc["sets"]["set0"]["miou"] == pytest.approx(float(ev.miou[0]))


@pytest.mark.parametrize("value", ["2", "0.1:0.5", "abc", "0.1,nan"])
def test_cli_bad_threshold_is_a_usage_error(tmp_path, capsys, value):
    gt, stores = _build(str(tmp_path), 1, 3, [(3, 3)], ["uint8"], [(1, 3, 3)] * 2, (0, 0), 1)
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", stores[0].path, "--gt", gt.path, "--bg-threshold", value, "--quiet"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--bg-threshold" in err and "Traceback" not in err


def test_merge_best_uses_each_sets_best_threshold(tmp_path, capsys):
    from isle_fast.ensemble.merge import merge
    from isle_fast.stores.stack import open_stack

    gt, stores = _build(
        str(tmp_path),
        3,
        4,
        [(6, 5), (4, 4), (7, 3)],
        ["uint8", "uint8", "labels"],
        [(3, 7, 5)] * 4,
        (0, 0),
        21,
    )
    res = merge(stores, gt, str(tmp_path / "ens.zarr"), bg_threshold="best", backend="cpu", progress=False)
    sw = sweep_thresholds(stores, gt, "best", progress=False)
    prov = open_stack(res.stack.path).provenance
    assert prov["bg_threshold"] == "best"
    assert prov["bg_thresholds"] == {n: t for n, t in zip(sw.set_names, sw.best_thresholds)}
    np.testing.assert_array_equal(res.evaluation.counts, sw.best_evaluation().counts)
    # the ensemble equals a merge of the sets decoded, each at its own threshold, as label maps
    from isle_fast.kernels import cpu as K

    members = res.selection.member_indices
    sets = []
    for m in members:
        a = np.asarray(stores[m].array[:])
        t = sw.best_thresholds[m]
        sets.append(
            a
            if t is None
            else K.decode_scores(np.ascontiguousarray(a), float(threshold_levels([t], 255.0)[0]))
        )
    sel = np.asarray(res.plan.selection, np.int64)
    pri = np.asarray(res.plan.priority, np.float64)
    want = K.merge_labels(tuple(sets), sel, pri, res.plan.policy)
    got = np.asarray(res.stack.array[:])
    for i, (h, w) in enumerate(gt.shapes):
        np.testing.assert_array_equal(got[i, :h, :w], want[i, :h, :w])
    assert (
        main(
            [
                "merge",
                *[s.path for s in stores],
                "--gt",
                gt.path,
                "--bg-threshold",
                "best",
                "--out",
                str(tmp_path / "ens2.zarr"),
                "--json",
                str(tmp_path / "merge.json"),
                "--quiet",
            ]
        )
        == 0
    )
    assert open_stack(str(tmp_path / "ens2.zarr")).provenance["bg_thresholds"] == prov["bg_thresholds"]
    assert json.load(open(tmp_path / "merge.json"))["ensemble"]["bg_thresholds"] == prov["bg_thresholds"]


def test_cams_benchmark_quick(tmp_path, monkeypatch):
    """``python -m benchmarks.cams --quick``: the sweep's counts equal the public scripts' approach."""
    from benchmarks import cams

    monkeypatch.setenv("ISLE_BENCH_RESULTS", str(tmp_path / "res"))
    monkeypatch.setenv("ISLE_BENCH_TMP", str(tmp_path / "tmp"))
    assert cams.main(["--quick", "--workers", "2"]) == 0
    doc = json.loads((tmp_path / "res" / "cams.json").read_text())
    assert doc["counts_equal"] is True and doc["quick"] is True
    assert {v["layout"] for v in doc["stores"].values()} == {"sparse"}
    assert set(doc["best_thresholds"]) == {f"set{s}" for s in range(4)}
    assert doc["ensemble_provenance"]["bg_thresholds"] == doc["best_thresholds"]
    assert doc["ensembles_equal"] is True and doc["reference"]["sampled"] is False


def test_cams_benchmark_reference_sample(tmp_path, monkeypatch):
    """``--reference-images M``: the public approach on M images, its counts checked on them, the time projected."""
    from benchmarks import cams

    monkeypatch.setenv("ISLE_BENCH_RESULTS", str(tmp_path / "res"))
    monkeypatch.setenv("ISLE_BENCH_TMP", str(tmp_path / "tmp"))
    assert cams.main(["--quick", "--images", "12", "--workers", "2", "--reference-images", "5"]) == 0
    doc = json.loads((tmp_path / "res" / "cams.json").read_text())
    r = doc["reference"]
    assert doc["counts_equal"] is True and r["sampled"] is True and r["images"] == 5
    assert r["projected_wall_s_all_images"] == pytest.approx(r["s_per_image_and_set"] * 4 * 12)
    assert "PROJECTED" in doc["headline"][0]["reference"]
    assert len(cams.reference_sample([f"{i:06d}" for i in range(12)], 5)) == 5
