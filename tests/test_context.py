"""Vote strata by their distance to agreement: the vote_context kernel equals NumPy; the context-refined
strata estimate on known cases."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from isle_fast.kernels import cpu
from tests.test_estimate import reference_vote_patterns


def reference_vote_context(sets, c, radii, gt=None):
    """Per class and pixel: the chessboard distance to every pixel all sets vote the class on, brute force."""
    labs = np.stack(sets)  # (N, H, W)
    n, h, w = labs.shape
    b_count = len(radii) + 1
    out = np.zeros((b_count, c, 1 << n, 3), np.int64)
    voting = (labs < c).any(axis=0)
    yy, xx = np.mgrid[0:h, 0:w]
    for k in range(c):
        mask = ((labs == k) * (1 << np.arange(n))[:, None, None]).sum(axis=0)
        every = (labs == k).all(axis=0)
        if every.any():
            ys, xs = np.nonzero(every)
            d = np.maximum(np.abs(yy[..., None] - ys), np.abs(xx[..., None] - xs)).min(axis=-1)
        else:
            d = np.full((h, w), np.iinfo(np.int64).max)
        b = np.full((h, w), b_count - 1)
        for j in range(len(radii) - 1, -1, -1):
            b[d <= radii[j]] = j
        sel = voting
        np.add.at(out[:, k, :, 0], (b[sel], mask[sel]), 1)
        if gt is not None:
            pos = sel & (gt == k)
            ign = sel & (gt >= c)
            np.add.at(out[:, k, :, 1], (b[pos], mask[pos]), 1)
            np.add.at(out[:, k, :, 2], (b[ign], mask[ign]), 1)
    return out


@settings(max_examples=80, deadline=None)
@given(n=st.integers(1, 4), c=st.integers(1, 5), shape=st.tuples(st.integers(0, 23), st.integers(0, 29)),
       radii=st.lists(st.integers(0, 12), min_size=1, max_size=4, unique=True), seed=st.integers(0, 2**31 - 1),
       blobs=st.booleans(), with_gt=st.booleans())
def test_vote_context_equals_numpy(n, c, shape, radii, seed, blobs, with_gt):
    rng = np.random.default_rng(seed)
    radii = sorted(radii)
    vals = np.array(list(range(c)) + [255, 200, c], np.uint8)
    sets = []
    base = rng.choice(vals, size=shape)
    for _ in range(n):
        a = rng.choice(vals, size=shape)
        if blobs:  # mostly one map with some noise: large regions every set agrees on, as in real sets
            a = np.where(rng.random(shape) < 0.8, base, a).astype(np.uint8)
        sets.append(a)
    gt = rng.choice(vals, size=shape) if with_gt else None
    got = cpu.vote_context(tuple(sets), c, radii, gt=gt)
    np.testing.assert_array_equal(got, reference_vote_context(sets, c, radii, gt))
    # summed over the bins: the vote patterns
    np.testing.assert_array_equal(got.sum(axis=0)[..., 0], reference_vote_patterns(sets, c))


def test_vote_context_bins_a_known_case():
    # one set votes class 1 on columns 0..5, the other on 0..2: they agree on 0..2
    a = np.zeros((1, 8), np.uint8)
    b = np.zeros((1, 8), np.uint8)
    a[0, :6] = 1
    b[0, :3] = 1
    out = cpu.vote_context((a, b), 2, (1, 2))
    # class 1: agreement (pattern 3) at distance 0 on 3 pixels; set 0 alone at distances 1, 2, 3
    assert out[0, 1, 3, 0] == 3
    assert (out[0, 1, 1, 0], out[1, 1, 1, 0], out[2, 1, 1, 0]) == (1, 1, 1)
    # columns 6, 7 vote background in both: pattern 0 of class 1, 3 and 4 pixels from the agreement
    assert out[2, 1, 0, 0] == 2


def test_vote_context_checks_its_arguments():
    a = np.zeros((2, 3), np.uint8)
    with pytest.raises(ValueError, match="increasing"):
        cpu.vote_context((a, a), 3, (4, 2))
    with pytest.raises(ValueError, match="2-D"):
        cpu.vote_context((a[None], a[None]), 3, (4,))
    with pytest.raises(ValueError, match="gt must be uint8"):
        cpu.vote_context((a, a), 3, (4,), gt=np.zeros((3, 3), np.uint8))
    with pytest.raises(ValueError, match="at most 12"):
        cpu.vote_context((a,) * 13, 3, (4,))


# ================================================================================ context_strata + stratified_scores
from isle_fast import metrics  # noqa: E402
from isle_fast.ensemble.uncertainty import context_strata, strata_counts, stratified_scores  # noqa: E402
from isle_fast.errors import InputError  # noqa: E402


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 4), c=st.integers(1, 5), shape=st.tuples(st.integers(1, 3), st.integers(1, 13),
                                                                  st.integers(1, 17)),
       seed=st.integers(0, 2**31 - 1), labels=st.booleans(), with_gt=st.booleans())
def test_context_strata_split_the_strata_by_bin(n, c, shape, seed, labels, with_gt):
    rng = np.random.default_rng(seed)
    vals = np.array(list(range(c)) + [255, c], np.uint8)
    gt = rng.choice(vals, size=shape)
    sets = [np.where(rng.random(shape) < 0.7, gt, rng.choice(vals, size=shape)).astype(np.uint8)
            for _ in range(n)]
    allowed = rng.random((shape[0], c)) < 0.6 if labels else None
    radii = (1, 3)
    got = context_strata(gt if with_gt else None, sets, c, allowed=allowed, radii=radii)
    want = np.zeros_like(got)
    for i in range(shape[0]):
        one = reference_vote_context([s[i] for s in sets], c, radii, gt[i] if with_gt else None)
        for k in range(c):
            grp = 0 if allowed is None or k == 0 or allowed[i, k] else 1
            want[grp][:, k] += one[:, k]
    np.testing.assert_array_equal(got, want)
    strata = strata_counts(gt, sets, c, allowed=allowed)
    np.testing.assert_array_equal(got.sum(axis=1)[..., 0], strata[..., 0])
    if with_gt:
        np.testing.assert_array_equal(got.sum(axis=1), strata)


SLOTS = ((2, 2), (2, 50), (50, 2), (50, 50))  # 10 x 10 objects, 38 pixels apart (past every radius)


def _rings_case():
    """Set 0 finds every object of class 1 and a 2-pixel ring of false positives around each; set 1 is
    exact but misses objects. The labelled images (10) have 3 found objects and 1 missed, the others (30)
    1 found and 3 missed: the truth of "set 0 alone" is mostly ring in the first, mostly object in the
    second, and its distance to where both sets agree tells the two apart."""
    images, side = 40, 64
    gt = np.zeros((images, side, side), np.uint8)
    s0 = np.zeros_like(gt)
    s1 = np.zeros_like(gt)
    for i in range(images):
        found = 3 if i < 10 else 1
        for j, (y, x) in enumerate(SLOTS):
            gt[i, y:y + 10, x:x + 10] = 1
            s0[i, max(0, y - 2):y + 12, max(0, x - 2):x + 12] = 1
            if j < found:
                s1[i, y:y + 10, x:x + 10] = 1
    sets = [s0, s1]
    per = np.stack([strata_counts(gt[i:i + 1], [s[i:i + 1] for s in sets], 2) for i in range(images)])
    ctx = np.stack([context_strata(gt[i:i + 1], [s[i:i + 1] for s in sets], 2) for i in range(images)])
    return gt, sets, per, ctx


def test_context_tells_the_ring_from_the_missed_object():
    gt, sets, per, ctx = _rings_case()
    full = metrics.iou(cpu.confusion_labels(gt, tuple(sets), 2))
    assert full[0, 1] > full[1, 1]  # set 0 is the better set of class 1
    lab = np.arange(10)
    plain = stratified_scores(per[lab], per[..., 0].sum(axis=0), reps=0)
    refined = stratified_scores(per[lab], per[..., 0].sum(axis=0), reps=0,
                                context=(ctx[lab], ctx[..., 0].sum(axis=0)))
    assert plain["best"][1] == 1  # the strata alone take the ring rate of the labelled images everywhere
    assert refined["best"][1] == 0
    assert np.all(np.abs(refined["scores"][:, 1] - full[:, 1]) < np.abs(plain["scores"][:, 1] - full[:, 1]))


def test_context_with_every_image_labelled_or_one_bin_changes_nothing():
    gt, sets, per, ctx = _rings_case()
    patterns, ctx_pat = per[..., 0].sum(axis=0), ctx[..., 0].sum(axis=0)
    every = stratified_scores(per, patterns, reps=20, context=(ctx, ctx_pat))
    np.testing.assert_allclose(every["scores"], metrics.iou(cpu.confusion_labels(gt, tuple(sets), 2)), atol=1e-9)
    # every pixel in one bin: the refined rates are the strata's own, the bootstrap too
    one = np.zeros_like(ctx)
    one[:, :, 0] = ctx.sum(axis=2)
    lab = np.arange(0, 40, 3)
    a = stratified_scores(per[lab], patterns, reps=30, seed=4)
    b = stratified_scores(per[lab], patterns, reps=30, seed=4, context=(one[lab], one[..., 0].sum(axis=0)))
    np.testing.assert_allclose(b["scores"], a["scores"], rtol=0, atol=1e-9)
    np.testing.assert_array_equal(b["best"], a["best"])
    np.testing.assert_allclose(b["p_best"], a["p_best"], rtol=0, atol=1e-12)


def test_context_that_does_not_match_is_named():
    _, _, per, ctx = _rings_case()
    patterns, ctx_pat = per[..., 0].sum(axis=0), ctx[..., 0].sum(axis=0)
    with pytest.raises(InputError, match="do not match"):
        stratified_scores(per[:5], patterns, context=(ctx[:5, :, :, :1], ctx_pat))
    with pytest.raises(InputError, match="differ from the strata"):
        stratified_scores(per[:5], patterns, context=(ctx[20:25], ctx_pat))


def test_the_bootstrap_in_batches_gives_the_same_uncertainty(monkeypatch):
    from isle_fast.ensemble import uncertainty

    gt, sets, per, ctx = _rings_case()
    patterns, ctx_pat = per[..., 0].sum(axis=0), ctx[..., 0].sum(axis=0)
    lab = np.arange(0, 40, 3)
    for context in (None, (ctx[lab], ctx_pat)):
        whole = stratified_scores(per[lab], patterns, reps=60, seed=5, context=context)
        monkeypatch.setattr(uncertainty, "STRATA_BOOTSTRAP_BYTES", 1)  # one resample a batch
        one = stratified_scores(per[lab], patterns, reps=60, seed=5, context=context)
        monkeypatch.undo()
        np.testing.assert_array_equal(one["p_best"], whole["p_best"])  # counts of resamples: exact
        np.testing.assert_allclose(one["expected_loss"], whole["expected_loss"], rtol=1e-12, atol=1e-12)
        np.testing.assert_array_equal(one["scores"], whole["scores"])


def test_the_bootstrap_holds_one_batch_of_resamples(monkeypatch):
    """Many sets: a resample's strata are 2**N patterns wide, and 1000 resamples at once took 3 GiB at N = 8
    with the context (``python -m benchmarks.strata_memory``). Here N = 7 and 400 resamples: the inputs are
    3 MiB, all resamples at once held 181 MiB, batches of 4 MiB hold 6 MiB."""
    import tracemalloc

    from isle_fast.ensemble import uncertainty

    rng = np.random.default_rng(0)
    k, g, b, c, p = 20, 2, 4, 6, 1 << 7
    h = rng.poisson(0.5, size=(k, g, b, c, p))
    pos = rng.binomial(h, 0.5)
    lab_ctx = np.stack([h, pos, rng.binomial(h - pos, 0.1)], axis=-1).astype(np.int64)
    pat_ctx = lab_ctx[..., 0].sum(axis=0) + rng.poisson(3.0, size=(g, b, c, p))
    strata, pat = lab_ctx.sum(axis=2), pat_ctx.sum(axis=1)
    monkeypatch.setattr(uncertainty, "STRATA_BOOTSTRAP_BYTES", 4 * 2**20)
    tracemalloc.start()
    try:
        res = stratified_scores(strata, pat, reps=400, seed=1, context=(lab_ctx, pat_ctx))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert np.isfinite(res["p_best"]).all()
    assert peak < 24 * 2**20, f"peak {peak / 2**20:.0f} MiB"
