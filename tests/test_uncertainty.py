"""isle_fast.ensemble.uncertainty: the bootstrap of every class's choice equals a plain loop over resamples."""

from __future__ import annotations

import json
import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from isle_fast import metrics
from isle_fast.cli import main
from isle_fast.ensemble.evaluate import evaluate
from isle_fast.ensemble.uncertainty import choice_uncertainty, selection_uncertainty
from tests.test_partial_gt import make_case


def loop_reference(stats, best, members, reps, seed):
    """p_best and expected loss, resample by resample, dataset-level IoU from summed counts."""
    w = metrics.bootstrap_weights(stats.shape[0], reps, seed)
    n, c = stats.shape[1], stats.shape[2]
    right = np.zeros(c)
    informative = np.zeros(c)
    loss = np.zeros(c)
    for b in range(reps):
        summed = np.zeros((n, c, 2), np.int64)
        for i in range(stats.shape[0]):
            summed += w[b, i] * stats[i]
        iou = np.full((n, c), np.nan)
        ok = summed[..., 1] > 0
        iou[ok] = 100.0 * summed[..., 0][ok] / summed[..., 1][ok]
        for k in range(c):
            vals = [iou[m, k] for m in range(n) if members[m] and not np.isnan(iou[m, k])]
            top = max(vals) if vals else -np.inf
            ch = iou[best[k], k]
            ch_v = -np.inf if np.isnan(ch) else ch
            if vals and min(vals) != max(vals):  # a resample where every set ties says nothing
                informative[k] += 1
                right[k] += ch_v >= top
            if np.isfinite(top):
                loss[k] += top - (0.0 if np.isnan(ch) else ch)
    return np.where(informative > 0, right / np.maximum(informative, 1), 1.0), loss / reps


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n_img=st.integers(1, 6), n=st.integers(1, 4), c=st.integers(1, 4))
def test_bootstrap_equals_loop(seed, n_img, n, c):
    rng = np.random.default_rng(seed)
    inter = rng.integers(0, 5, size=(n_img, n, c))
    union = inter + rng.integers(0, 5, size=(n_img, n, c)) * rng.integers(0, 2, size=(n_img, n, c))
    stats = np.stack([inter, np.maximum(union, inter)], axis=-1)
    best = rng.integers(0, n, size=c)
    members = rng.random(n) < 0.7
    members[best] = True
    present = np.ones(c, bool)
    res = choice_uncertainty(stats, best, members, gt_present=present, reps=40, seed=seed % 1000,
                             prior_images=0)
    p, loss = loop_reference(stats, best, members, 40, seed % 1000)
    np.testing.assert_allclose(res["p_best"], p)
    np.testing.assert_allclose(res["expected_loss"], loss, atol=1e-9)
    # deterministic
    again = choice_uncertainty(stats, best, members, gt_present=present, reps=40, seed=seed % 1000,
                               prior_images=0)
    np.testing.assert_array_equal(res["p_best"], again["p_best"])


def test_dominant_set_is_settled_and_a_close_call_is_not():
    i = 30
    stats = np.zeros((i, 3, 3, 2), np.int64)
    rng = np.random.default_rng(0)
    stats[..., 1] = 100
    stats[:, 0, 0, 0] = 90  # class 0: set 0 far ahead
    stats[:, 1, 0, 0] = 40
    stats[:, 2, 0, 0] = 30
    stats[:, :, 1, 0] = rng.integers(45, 56, size=(i, 3))  # class 1: a close call
    stats[:, :, 2, 0] = 50  # class 2: a tie
    obs = stats[..., 0].sum(0)
    best = np.array([0, int(np.argmax(obs[:, 1])), 0])
    res = choice_uncertainty(stats, best, reps=300, seed=1)
    assert res["p_best"][0] == 1.0 and res["expected_loss"][0] == 0.0 and res["more_images"][0] == 0
    assert res["p_best"][1] < 0.9 and res["expected_loss"][1] > 0
    assert 0 < res["more_images"][1] < math.inf
    assert res["p_best"][2] == 1.0  # every resample ties: the choice is as good as any
    lo, hi = res["iou_interval"][0, 0]
    assert lo == hi == 90.0


def test_cli_evaluate_shows_and_writes_the_uncertainty(tmp_path, capsys):
    rng = np.random.default_rng(5)
    sets, gt, gts, sub, c = make_case(tmp_path, rng, n_img=9, subset=[8, 1, 4, 2, 0])
    out = tmp_path / "ev.json"
    rc = main(["evaluate", *(s.path for s in sets), "--gt", gt.path, "--json", str(out), "--bootstrap", "200"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "choice (bootstrap)" in text and "p=" in text
    doc = json.loads(out.read_text())
    u = doc["uncertainty"]
    assert u["labelled_images"] == 5 and u["reps"] == 200
    ev = evaluate(sets, gt, progress=False, per_image=True)
    unc = selection_uncertainty(ev, reps=200, seed=0)
    for k, name in enumerate(ev.classes):
        assert u["classes"][name]["p_best"] == (None if np.isnan(unc.p_best[k]) else unc.p_best[k])
    assert main(["evaluate", *(s.path for s in sets), "--gt", gt.path, "--bootstrap", "-1", "--quiet"]) != 0


def test_report_has_the_uncertainty_table_and_figure(tmp_path):
    from isle_fast.ensemble.report import report

    rng = np.random.default_rng(6)
    sets, gt, gts, sub, c = make_case(tmp_path, rng, n_img=8, subset=[7, 3, 1, 5])
    res = report(sets, gt, tmp_path / "rep", progress=False)
    assert "choice_uncertainty.png" in res["files"]
    md = (tmp_path / "rep" / "tables.md").read_text()
    assert "## Uncertainty of every choice" in md and "p(best)" in md
    doc = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert doc["uncertainty"]["labelled_images"] == 4
