"""isle_fast.ensemble.uncertainty.stratified_scores: labelled truth per vote stratum on every image's votes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from isle_fast import metrics
from isle_fast.ensemble.uncertainty import strata_counts, stratified_scores
from isle_fast.errors import InputError
from isle_fast.kernels import cpu


def reference_strata(gt, sets, c, allowed=None):
    """Pixel by pixel (plain NumPy): per class the sets' bit mask, and the gt there."""
    n = len(sets)
    out = np.zeros((2, c, 1 << n, 3), np.int64)
    for i in range(gt.shape[0]):
        labs = np.stack([s[i].reshape(-1) for s in sets])
        g = gt[i].reshape(-1)
        voting = (labs < c).any(axis=0)
        for k in range(c):
            grp = 0 if allowed is None or k == 0 or allowed[i, k] else 1
            mask = ((labs == k) * (1 << np.arange(n))[:, None]).sum(axis=0)
            for m, gv in zip(mask[voting], g[voting]):
                out[grp, k, m, 0] += 1
                out[grp, k, m, 1] += int(gv == k)
                out[grp, k, m, 2] += int(gv >= c)
    return out


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 4), c=st.integers(1, 5), shape=st.tuples(st.integers(1, 3), st.integers(1, 9),
                                                                  st.integers(1, 11)),
       seed=st.integers(0, 2**31 - 1), labels=st.booleans())
def test_strata_counts_equal_numpy(n, c, shape, seed, labels):
    rng = np.random.default_rng(seed)
    vals = np.array(list(range(c)) + [255, c], np.uint8)
    gt = rng.choice(vals, size=shape)
    sets = [rng.choice(vals, size=shape) for _ in range(n)]
    allowed = rng.random((shape[0], c)) < 0.6 if labels else None
    got = strata_counts(gt, sets, c, allowed=allowed)
    np.testing.assert_array_equal(got, reference_strata(gt, sets, c, allowed))
    # the strata's pixels are the vote patterns of every image (split by the labels)
    h = sum(cpu.vote_patterns(tuple(s[i:i + 1] for s in sets), c) for i in range(shape[0]))
    np.testing.assert_array_equal(got[..., 0].sum(axis=0), h)


def _case(seed=0, images=40, c=4, n=3, side=12):
    rng = np.random.default_rng(seed)
    gt = rng.integers(0, c, size=(images, side, side)).astype(np.uint8)
    gt[:, 0] = 255
    gt[images // 2:][gt[images // 2:] == c - 1] = 0  # the last class only in the first half
    sets = []
    for k in range(n):
        s = gt.copy()
        flip = rng.random(gt.shape) < 0.1 + 0.1 * k
        s[flip] = rng.integers(0, c, size=int(flip.sum()))
        s[s == 255] = 0
        s[images // 2:][s[images // 2:] == c - 1] = 0  # nor does any set vote it elsewhere
        sets.append(s)
    per = np.stack([strata_counts(gt[i:i + 1], [s[i:i + 1] for s in sets], c) for i in range(images)])
    patterns = per[..., 0].sum(axis=0)
    return gt, sets, per, patterns


def full_iou(gt, sets, c):
    counts = cpu.confusion_labels(gt, tuple(sets), c)
    return metrics.iou(counts)


def test_every_image_labelled_gives_the_full_gt_iou_and_choice():
    gt, sets, per, patterns = _case()
    res = stratified_scores(per, patterns, reps=50, seed=1)
    ref = full_iou(gt, sets, 4)
    np.testing.assert_allclose(res["scores"], ref, rtol=0, atol=1e-9)
    assert (res["best"] == np.nanargmax(ref, axis=0)).all()
    # every pixel is labelled: no resample can change the IoU, so every choice is certain
    assert np.all(res["p_best"][~np.isnan(res["p_best"])] == 1.0)
    assert np.all(res["labelled_weight"][1:] > 0)


def test_iou_at_the_strata_own_rates_is_the_full_gt_iou():
    """``iou_at_rates``: no image labelled, every pixel at its stratum's own truth rates, gives each set's
    full-gt IoU (every stratum splits as the gt splits it); every image labelled, the same whatever the rates;
    rates of other strata give another IoU."""
    from isle_fast.ensemble.uncertainty import iou_at_rates

    gt, sets, per, patterns = _case(seed=3)
    full = full_iou(gt, sets, 4)
    own = per.sum(axis=0)
    np.testing.assert_allclose(iou_at_rates(np.zeros_like(own), patterns, own), full, rtol=1e-12, atol=1e-9)
    other = per[:5].sum(axis=0)
    np.testing.assert_allclose(iou_at_rates(own, patterns, other), full, rtol=1e-12, atol=1e-9)
    assert not np.allclose(iou_at_rates(np.zeros_like(own), patterns, other), full, equal_nan=True)


def test_a_class_the_labelled_images_lack_is_estimated_from_its_votes():
    gt, sets, per, patterns = _case()
    sub = np.arange(20, 40)  # the last class is in none of these
    assert per[sub][:, 0, 3, :, 1].sum() == 0
    res = stratified_scores(per[sub], patterns, reps=50, seed=0)
    assert np.isfinite(res["scores"][:, 3]).all()
    assert res["labelled_weight"][3] == 0.0  # none of its strata has a labelled pixel
    # the sets' noise grows with their index: the estimate still ranks them from the votes alone
    assert res["best"][3] == 0
    ref = full_iou(gt, sets, 4)
    assert np.all(np.abs(res["scores"][:, 1:3] - ref[:, 1:3]) < 5)


def test_deterministic_and_more_labels_are_closer():
    gt, sets, per, patterns = _case(seed=3)
    a = stratified_scores(per[:10], patterns, reps=40, seed=2)
    b = stratified_scores(per[:10], patterns, reps=40, seed=2)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    ref = full_iou(gt, sets, 4)
    more = stratified_scores(per[:30], patterns, reps=0)
    assert np.nanmean(np.abs(more["scores"] - ref)) <= np.nanmean(np.abs(a["scores"] - ref)) + 1e-9
    assert np.isnan(more["p_best"]).all()  # reps=0: no bootstrap


def test_image_labels_group_and_members():
    gt, sets, _, _ = _case(seed=5)
    allowed = np.stack([[(gt[i] == k).any() for k in range(4)] for i in range(gt.shape[0])])
    per = np.stack([strata_counts(gt[i:i + 1], [s[i:i + 1] for s in sets], 4, allowed[i:i + 1])
                    for i in range(gt.shape[0])])
    res = stratified_scores(per[:15], per[..., 0].sum(axis=0), reps=30, members=np.array([False, True, True]))
    assert set(res["best"].tolist()) <= {1, 2}
    full = stratified_scores(per, per[..., 0].sum(axis=0), reps=0)
    np.testing.assert_allclose(full["scores"], full_iou(gt, sets, 4), atol=1e-9)


def test_bad_arguments_are_named():
    _, _, per, patterns = _case()
    with pytest.raises(InputError, match="do not match"):
        stratified_scores(per[..., :2], patterns)
    with pytest.raises(InputError, match="more votes"):
        stratified_scores(per, per[:5, ..., 0].sum(axis=0))
    with pytest.raises(InputError, match="prior_images"):
        stratified_scores(per, patterns, prior_images=-1)


def test_the_choice_prior_picks_the_set_and_the_bootstrap_judges_it():
    gt, sets, per, patterns = _case(seed=7)
    sub = per[:8]
    a = stratified_scores(sub, patterns, reps=60, seed=4, choice_prior_images=300.0)
    b = stratified_scores(sub, patterns, reps=60, seed=4, choice_prior_images=300.0)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    # the choice's scores are the estimate with the choice's prior
    same = stratified_scores(sub, patterns, reps=0, prior_images=300.0, choice_prior_images=None)
    np.testing.assert_allclose(a["scores"], same["scores"], atol=1e-12)
    assert (a["best"] == np.nanargmax(np.where(np.isnan(a["scores"]), -np.inf, a["scores"]), axis=0)).all()
    p = a["p_best"][~np.isnan(a["p_best"])]
    assert ((p >= 0) & (p <= 1)).all()
    # p is the share of the calibrated bootstrap's resamples in which the chosen set is on top: a set
    # the calibrated bootstrap never ranks first gets 0, whatever the choice's own estimate says
    calib = stratified_scores(sub, patterns, reps=60, seed=4, choice_prior_images=None)
    for c in range(4):
        if a["best"][c] == calib["best"][c]:
            assert a["p_best"][c] == calib["p_best"][c]
    # every image labelled: both priors give the full-gt IoU and choice
    full = stratified_scores(per, patterns, reps=20, choice_prior_images=300.0)
    ref = full_iou(gt, sets, 4)
    np.testing.assert_allclose(full["scores"], ref, atol=1e-9)
    assert (full["best"] == np.nanargmax(ref, axis=0)).all()
    with pytest.raises(InputError, match="choice_prior_images"):
        stratified_scores(per, patterns, choice_prior_images=-1)


# ------------------------------------------------------------------ the semi-supervised STAPLE prior
def _expected_patterns(pi, sens, fpr, total):
    """Exact expected pixels per vote pattern and truth under the binary Dawid-Skene model."""
    from isle_fast.ensemble.estimate import _bits

    b = _bits(len(sens))
    p1 = pi * np.prod(np.where(b == 1, sens, 1 - sens), axis=1)
    p0 = (1 - pi) * np.prod(np.where(b == 1, fpr, 1 - fpr), axis=1)
    return total * p1, total * p0, b


def _staple_reference(h, b, iters=200, tol=1e-10):
    """The no-label binary Dawid-Skene EM written out plainly (the loop ``estimate`` had before the shared one)."""
    tot = h.sum()
    if tot <= 0:
        return np.zeros(h.shape[0])
    w = b.mean(axis=1)
    prev = None
    for _ in range(iters):
        pos = (h * w).sum()
        neg = tot - pos
        pi = np.clip(pos / tot, 1e-9, 1 - 1e-9)
        sens = np.clip((h * w) @ b / max(pos, 1e-9), 1e-9, 1 - 1e-9)
        fpr = np.clip((h * (1 - w)) @ b / max(neg, 1e-9), 1e-9, 1 - 1e-9)
        l1 = np.log(pi) + np.log(np.where(b == 1, sens, 1 - sens)).sum(axis=1)
        l0 = np.log(1 - pi) + np.log(np.where(b == 1, fpr, 1 - fpr)).sum(axis=1)
        w = 1.0 / (1.0 + np.exp(np.clip(l0 - l1, -700, 700)))
        params = np.concatenate([[pi], sens, fpr])
        if prev is not None and np.max(np.abs(params - prev)) < tol:
            break
        prev = params
    return w


def test_semi_staple_without_labels_is_staple():
    from isle_fast.ensemble.estimate import _bits, _staple_class
    from isle_fast.ensemble.uncertainty import _semi_staple_class

    rng = np.random.default_rng(3)
    for n in (2, 3, 4):
        h = rng.integers(0, 500, size=1 << n).astype(np.float64)
        zero = np.zeros_like(h)
        want = _staple_reference(h, _bits(n))
        np.testing.assert_allclose(_semi_staple_class(h, zero, zero, _bits(n)), want, rtol=0, atol=1e-9)
        np.testing.assert_allclose(_staple_class(h, _bits(n), 200, 1e-10), want, rtol=0, atol=1e-9)
    assert (_semi_staple_class(np.zeros(4), np.zeros(4), np.zeros(4), _bits(2)) == 0).all()
    assert (_staple_class(np.zeros(4), _bits(2), 200, 1e-10) == 0).all()


@settings(max_examples=30, deadline=None)
@given(n=st.integers(3, 4), seed=st.integers(0, 2**31 - 1), share=st.floats(0.05, 0.9))
def test_semi_staple_recovers_the_model_posterior(n, seed, share):
    """Exact expected counts of a known model, some labelled: the fit is the model's posterior."""
    from isle_fast.ensemble.uncertainty import _semi_staple_class

    rng = np.random.default_rng(seed)
    pi = rng.uniform(0.1, 0.5)
    sens = rng.uniform(0.7, 0.95, size=n)
    fpr = rng.uniform(0.02, 0.2, size=n)
    p1, p0, b = _expected_patterns(pi, sens, fpr, 1e6)
    truth = p1 / (p1 + p0)
    w = _semi_staple_class((1 - share) * (p1 + p0), share * p1, share * p0, b, iters=2000, tol=1e-13)
    np.testing.assert_allclose(w, truth, atol=1e-5)


def test_semi_staple_takes_the_labelled_truth_where_the_votes_cannot_tell():
    """Two sets agree against the third: whether that pattern is truly the class is what the labelled
    pixels say (the unlabelled votes are the same in both cases)."""
    from isle_fast.ensemble.estimate import _bits
    from isle_fast.ensemble.uncertainty import _semi_staple_class

    b = _bits(3)
    u = np.zeros(8)
    u[[0, 7, 3]] = [6000.0, 2000.0, 1000.0]  # pattern 3: sets 0 and 1 say yes, set 2 no
    pos, neg = np.zeros(8), np.zeros(8)
    pos[7], neg[0] = 200.0, 600.0
    pos[3], neg[3] = 2700.0, 300.0  # in the labelled images that pattern is mostly truly the class
    high = _semi_staple_class(u, pos, neg, b)[3]
    pos[3], neg[3] = 300.0, 2700.0  # ... or mostly not
    low = _semi_staple_class(u, pos, neg, b)[3]
    assert high > 0.9 and low < 0.5


def test_semi_model_every_image_labelled_and_bad_model_named():
    gt, sets, per, patterns = _case(seed=9)
    full = stratified_scores(per, patterns, reps=20, model="semi")
    ref = full_iou(gt, sets, 4)
    np.testing.assert_allclose(full["scores"], ref, atol=1e-9)
    assert (full["best"] == np.nanargmax(ref, axis=0)).all()
    a = stratified_scores(per[:12], patterns, reps=30, seed=1, model="semi")
    b = stratified_scores(per[:12], patterns, reps=30, seed=1, model="semi")
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    other = stratified_scores(per[:12], patterns, reps=0, model="staple")
    assert not np.allclose(a["scores"], other["scores"])  # the prior model is used
    assert np.nanmean(np.abs(a["scores"] - ref)) < 5
    with pytest.raises(InputError, match="model"):
        stratified_scores(per, patterns, model="dawid")
