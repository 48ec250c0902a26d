"""The one definition of the scores (``isle_fast.metrics``) against masks counted by hand.

The reference (``tests/reference.py::class_scores``) scores a label map class by class from
pixel masks; :mod:`isle_fast.metrics` scores confusion counts. Every consumer (evaluate, the
subset analysis, the training validation, the demo's interval) is checked to give the same
numbers from the same counts.
"""

from __future__ import annotations

import numpy as np
import pytest
import reference as R
from hypothesis import given, settings
from hypothesis import strategies as st

from isle_fast import metrics

seeds = st.integers(0, 2**32 - 1)
shapes = st.lists(st.integers(1, 17), min_size=1, max_size=3)


def _maps(rng: np.random.Generator, shape, C: int, absent: int):
    """gt with 255 (ignore) and ``absent`` classes missing; a prediction with abstentions (>= C)."""
    present = np.arange(C)[rng.permutation(C) >= absent] if absent < C else np.arange(0)
    pool = np.concatenate([present, [255]]).astype(np.uint8)
    gt = pool[rng.integers(0, pool.size, shape)]
    pred_pool = np.concatenate([np.arange(C), [C, 200, 255]]).astype(np.uint8)
    pred = pred_pool[rng.integers(0, pred_pool.size, shape)]
    return gt, pred


def _same(a, b) -> None:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape
    assert np.array_equal(np.isnan(a), np.isnan(b)), (a, b)
    np.testing.assert_allclose(a, b, rtol=1e-12, equal_nan=True)


@given(seed=seeds, shape=shapes, C=st.integers(1, 7), absent=st.integers(0, 7))
def test_scores_equal_the_mask_reference(seed, shape, C, absent):
    rng = np.random.default_rng(seed)
    gt, pred = _maps(rng, shape, C, absent)
    counts = R.confusion_labels(gt, [pred], C)[0]
    ref = R.class_scores(gt, pred, C)
    _same(metrics.iou(counts), ref["iou"])
    _same(metrics.precision(counts), ref["precision"])
    _same(metrics.recall(counts), ref["recall"])
    _same(metrics.miou(metrics.iou(counts)), ref["miou"][0])
    inter_union = metrics.intersection_union(counts)
    _same(metrics.iou_from_stats(inter_union), ref["iou"])
    assert inter_union.dtype == np.int64


@given(seed=seeds, shape=shapes, C=st.integers(1, 6), n=st.integers(1, 4))
def test_leading_axes_score_row_by_row(seed, shape, C, n):
    rng = np.random.default_rng(seed)
    gt, _ = _maps(rng, shape, C, int(rng.integers(0, C + 1)))
    preds = [_maps(rng, shape, C, 0)[1] for _ in range(n)]
    counts = R.confusion_labels(gt, preds, C)  # (N, C, C+1)
    iou = metrics.iou(counts)
    for k in range(n):
        assert np.array_equal(iou[k], metrics.iou(counts[k]), equal_nan=True)
    assert np.array_equal(metrics.miou(iou), [float(metrics.miou(iou[k])) for k in range(n)], equal_nan=True)


def test_a_class_absent_from_gt_and_prediction_is_nan_and_skipped():
    conf = np.array([[5, 1, 0, 0], [2, 3, 0, 1], [0, 0, 0, 0]])
    iou = metrics.iou(conf)
    assert np.isnan(iou[2]) and not np.isnan(iou[:2]).any()
    assert float(metrics.miou(iou)) == pytest.approx((iou[0] + iou[1]) / 2)
    assert np.isnan(metrics.miou(metrics.iou(np.zeros((3, 4), np.int64))))  # nothing defined: NaN, not 0
    assert metrics.jsonable(iou)[2] is None


def test_every_consumer_agrees_on_the_same_counts():
    """Evaluation, SubsetAnalysis and the training validation: one formula, bit for bit."""
    from isle_fast.ensemble.evaluate import Evaluation
    from isle_fast.ensemble.subsets import SubsetAnalysis
    from isle_fast.training.train import miou_from_confusion

    rng = np.random.default_rng(4)
    C = 5
    gt, _ = _maps(rng, (40, 30), C, 2)
    preds = [_maps(rng, (40, 30), C, 0)[1] for _ in range(3)]
    counts = R.confusion_labels(gt, preds, C)
    classes = [f"c{i}" for i in range(C)]
    ev = Evaluation(classes=classes, set_names=["a", "b", "c"], counts=counts)
    sa = SubsetAnalysis(
        classes=classes,
        set_names=["a", "b", "c"],
        members=np.eye(3, dtype=bool),
        selections=np.zeros((3, C), np.int64),
        counts=counts,
    )
    assert np.array_equal(ev.iou, sa.iou, equal_nan=True) and np.array_equal(ev.miou, sa.miou, equal_nan=True)
    for k in range(3):
        miou, iou = miou_from_confusion(counts[k])
        assert miou == float(ev.miou[k])
        assert [None if np.isnan(v) else v for v in ev.iou[k]] == iou


def test_training_validation_of_nothing_is_undefined_not_zero():
    """Before: ``miou_from_confusion`` gave 0.0 where evaluate gave NaN (no class defined)."""
    from isle_fast.training.train import miou_from_confusion

    miou, iou = miou_from_confusion(np.zeros((3, 4), np.int64))
    assert np.isnan(miou) and iou == [None, None, None]


def test_bad_counts_shape_is_named():
    with pytest.raises(ValueError, match=r"\(\.\.\., C, C\+1\)"):
        metrics.iou(np.zeros((3, 3)))


# -- the bootstrap interval of the demo's comparison ------------------------------------------


def test_bootstrap_interval_of_identical_models_is_zero():
    rng = np.random.default_rng(0)
    inter = rng.integers(0, 50, size=(7, 1, 5))
    union = inter + rng.integers(0, 50, size=(7, 1, 5))
    one = np.stack([inter, union], axis=-1)
    stats = np.concatenate([one, one], axis=1)  # (I, 2, C, 2): the same model twice
    assert metrics.bootstrap_miou_diff(stats, 200, 0) == (0.0, 0.0)


def test_bootstrap_interval_brackets_the_difference_and_matches_a_loop():
    rng = np.random.default_rng(1)
    n_img, c = 9, 4
    inter = rng.integers(0, 40, size=(n_img, 2, c))
    union = inter + rng.integers(1, 40, size=(n_img, 2, c))
    stats = np.stack([inter, union], axis=-1)
    lo, hi = metrics.bootstrap_miou_diff(stats, 500, 3)

    def miou(s):
        return 100.0 * np.mean(s[..., 0].sum(0) / s[..., 1].sum(0), axis=-1)

    full = miou(stats)
    assert lo <= full[0] - full[1] <= hi
    # reference: the same multinomial resamples, summed image by image in a loop
    w = np.random.default_rng(3).multinomial(n_img, np.full(n_img, 1 / n_img), size=500)
    diffs = []
    for row in w:
        acc = np.zeros((2, c, 2))
        for i, k in enumerate(row):
            acc += k * stats[i]
        m = miou(acc[None])
        diffs.append(m[0] - m[1])
    assert (lo, hi) == pytest.approx(tuple(np.percentile(diffs, [2.5, 97.5])))


# -- the bootstrap's resampled sums, batch by batch -------------------------------------------


@settings(max_examples=40, deadline=None)
@given(images=st.integers(1, 7), reps=st.integers(1, 9), batch=st.integers(1, 10),
       shape=st.tuples(st.integers(1, 3), st.integers(1, 5)), seed=st.integers(0, 2**31 - 1),
       density=st.floats(0.0, 1.0))
def test_bootstrap_batches_equal_a_loop(images, reps, batch, shape, seed, density):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 1000, size=(images,) + shape) * (rng.random((images,) + shape) < density)
    b = rng.integers(0, 3, size=(images, 4))  # a second array, summed with the same weights
    w = metrics.bootstrap_weights(images, reps, seed)
    want_a = np.stack([sum(int(w[r, i]) * a[i] for i in range(images)) for r in range(reps)])
    want_b = np.stack([sum(int(w[r, i]) * b[i] for i in range(images)) for r in range(reps)])
    seen = np.zeros(reps, bool)
    for rows, (sa, sb) in metrics.bootstrap_batches([a, b], w, batch):
        assert sa.dtype == np.int64 and sa.shape == (rows.stop - rows.start,) + shape
        np.testing.assert_array_equal(sa, want_a[rows])
        np.testing.assert_array_equal(sb, want_b[rows])
        assert not seen[rows].any()
        seen[rows] = True
    assert seen.all()
    np.testing.assert_array_equal(metrics.bootstrap_sums(a, w, batch), want_a)


def test_bootstrap_batches_bad_batch_is_named():
    with pytest.raises(ValueError, match="batch"):
        next(metrics.bootstrap_batches([np.ones((2, 3))], np.ones((4, 2)), 0))


# -- per-image counts held sparse ----------------------------------------------------------------


def _sparse_counts(rng, images, shape, density):
    return rng.integers(0, 1000, size=(images,) + shape) * (rng.random((images,) + shape) < density)


@settings(max_examples=60, deadline=None)
@given(images=st.integers(0, 6), shape=st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 3)),
       seed=st.integers(0, 2**31 - 1), density=st.floats(0.0, 1.0), axis=st.integers(-3, 2))
def test_image_counts_equal_their_dense_array(images, shape, seed, density, axis):
    rng = np.random.default_rng(seed)
    a = _sparse_counts(rng, images, shape, density)
    s = metrics.ImageCounts.from_dense(a)
    assert s.num_images == images and s.shape == shape and (s.value != 0).all()
    np.testing.assert_array_equal(s.dense(), a)
    np.testing.assert_array_equal(s.total(), a.sum(axis=0))
    np.testing.assert_array_equal(s.sum_axis(axis).dense(), a.sum(axis=axis % 3 + 1))
    for k in range(shape[-1]):
        np.testing.assert_array_equal(s.component(k).dense(), a[..., k])
    np.testing.assert_array_equal(s.indicator().total(), (a != 0).sum(axis=0))
    pick = rng.integers(0, max(images, 1), size=int(rng.integers(0, 8))) if images else np.zeros(0, int)
    np.testing.assert_array_equal(s.take(pick).dense(), a[pick])
    b = _sparse_counts(rng, images, shape, density)
    np.testing.assert_array_equal(metrics.ImageCounts.add([s, metrics.ImageCounts.from_dense(b)]).dense(), a + b)
    halves = [metrics.ImageCounts.from_dense(a[:images // 2]), metrics.ImageCounts.from_dense(a[images // 2:])]
    np.testing.assert_array_equal(metrics.ImageCounts.stack(halves).dense(), a)


def test_image_counts_refuse_what_does_not_fit():
    one = metrics.ImageCounts.from_dense(np.ones((2, 3)))
    with pytest.raises(ValueError, match="do not stack"):
        metrics.ImageCounts.stack([one, metrics.ImageCounts.from_dense(np.ones((2, 4)))])
    with pytest.raises(ValueError, match="same images"):
        metrics.ImageCounts.add([one, metrics.ImageCounts.from_dense(np.ones((3, 3)))])
    with pytest.raises(IndexError, match="out of range"):
        one.take([2])
    assert metrics.ImageCounts.stack([], shape=(3,)).dense().shape == (0, 3)


@settings(max_examples=40, deadline=None)
@given(images=st.integers(1, 7), reps=st.integers(1, 9), batch=st.integers(1, 10),
       shape=st.tuples(st.integers(1, 3), st.integers(1, 5)), seed=st.integers(0, 2**31 - 1),
       density=st.floats(0.0, 1.0), piece=st.integers(1, 9), dense_share=st.sampled_from([0.0, 2.0]))
def test_sparse_bootstrap_batches_equal_the_dense_ones(images, reps, batch, shape, seed, density, piece,
                                                       dense_share, monkeypatch):
    rng = np.random.default_rng(seed)
    a = _sparse_counts(rng, images, shape, density)
    w = metrics.bootstrap_weights(images, reps, seed)
    with monkeypatch.context() as m:
        m.setattr(metrics, "_SPARSE_PRODUCT_ENTRIES", piece)   # products in pieces that split columns
        m.setattr(metrics, "_DENSE_SHARE", dense_share)        # 0: every part as a dense product, 2: none
        got = list(metrics.bootstrap_batches([metrics.ImageCounts.from_dense(a), a], w, batch))
    for rows, (sparse, dense) in got:
        assert sparse.dtype == np.int64
        np.testing.assert_array_equal(sparse, dense)
