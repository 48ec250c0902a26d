"""Selection without pixel labels: the vote_patterns kernel equals NumPy; the estimators on known cases."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from isle_fast.ensemble.estimate import DEFAULT_ESTIMATOR, agreement_iou, estimate, pairwise_iou, staple_iou
from isle_fast.kernels import cpu
from tests.conftest import write_stack


def reference_vote_patterns(sets, c):
    """Per class the bit mask of the sets predicting it, pixel by pixel (plain NumPy)."""
    n = len(sets)
    labs = np.stack([s.reshape(-1) for s in sets])  # (N, P)
    voting = (labs < c).any(axis=0)
    out = np.zeros((c, 1 << n), np.int64)
    for k in range(c):
        mask = ((labs == k) * (1 << np.arange(n))[:, None]).sum(axis=0)
        np.add.at(out[k], mask[voting], 1)
    return out


@settings(max_examples=80, deadline=None)
@given(n=st.integers(1, 5), c=st.integers(1, 6), shape=st.tuples(st.integers(0, 3), st.integers(0, 40),
                                                                  st.integers(0, 70)),
       seed=st.integers(0, 2**31 - 1), runs=st.booleans())
def test_vote_patterns_equals_numpy(n, c, shape, seed, runs):
    rng = np.random.default_rng(seed)
    vals = np.array(list(range(c)) + [255, 200, c], np.uint8)
    sets = []
    for _ in range(n):
        a = rng.choice(vals, size=shape)
        if runs and a.size:  # long uniform runs, as in real label maps
            a = np.repeat(a.reshape(-1)[: -(-a.size // 16)], 16)[: a.size].reshape(shape)
        sets.append(a)
    got = cpu.vote_patterns(tuple(sets), c)
    np.testing.assert_array_equal(got, reference_vote_patterns(sets, c))
    # counts add up over any split of the pixels (chunk boundaries)
    if sets[0].size > 1:
        flat = [s.reshape(-1) for s in sets]
        cut = int(rng.integers(1, flat[0].size))
        parts = cpu.vote_patterns(tuple(f[:cut] for f in flat), c) + cpu.vote_patterns(
            tuple(f[cut:] for f in flat), c)
        np.testing.assert_array_equal(parts, got)


def test_vote_patterns_large_parallel_equals_numpy():
    rng = np.random.default_rng(0)
    sets = [rng.integers(0, 5, size=(3, 300, 301)).astype(np.uint8) for _ in range(4)]
    sets[2][0, :10] = 255
    np.testing.assert_array_equal(cpu.vote_patterns(tuple(sets), 5), reference_vote_patterns(sets, 5))


def test_vote_patterns_checks_its_arguments():
    a = np.zeros((2, 3), np.uint8)
    with pytest.raises(ValueError, match="uint8"):
        cpu.vote_patterns((a.astype(np.int16),), 3)
    with pytest.raises(ValueError, match="at most 12"):
        cpu.vote_patterns((a,) * 13, 3)


def _noisy(truth, rate, rng, c):
    a = truth.copy()
    flip = rng.random(truth.shape) < rate
    a[flip] = rng.integers(0, c, size=int(flip.sum()))
    return a


def test_known_negatives_count_as_false_positives():
    # 2 sets, 1 class + background; pattern bit n = set n votes
    unknown = np.zeros((2, 4), np.int64)
    unknown[1] = [0, 0, 0, 10]      # both sets agree on 10 pixels of class 1
    negative = np.zeros((2, 4), np.int64)
    negative[1] = [0, 5, 0, 0]      # set 0 claims class 1 on 5 pixels the image labels rule out
    est = agreement_iou(np.stack([unknown, negative]))
    assert est[0, 1] == pytest.approx(100 * 10 / 15) and est[1, 1] == pytest.approx(100.0)


@pytest.mark.parametrize("fn", [agreement_iou, pairwise_iou, staple_iou, "rank"])
def test_estimators_rank_independent_noisy_sets(fn):
    if fn == "rank":
        from isle_fast.ensemble.estimate import rank_score as fn
    rng = np.random.default_rng(1)
    c = 4
    truth = rng.integers(0, c, size=(200, 200)).astype(np.uint8)
    sets = [_noisy(truth, r, rng, c) for r in (0.1, 0.3, 0.5, 0.2)]
    est = fn(cpu.vote_patterns(tuple(sets), c))
    ranks = np.argsort(-est, axis=0)
    assert (ranks[0] == 0).all()  # the least noisy set wins every class
    true_order = [0, 3, 1, 2]
    assert all(list(ranks[:, k]) == true_order for k in range(c))


def test_estimate_api_with_image_labels(tmp_path):
    rng = np.random.default_rng(2)
    c = 3
    truths = [rng.integers(0, 2, size=(20, 25)).astype(np.uint8) for _ in range(5)]
    sets = [write_stack(f"{tmp_path}/s{k}.zarr", [_noisy(t, r, rng, c) for t in truths], num_classes=c,
                        chunks=(2, 8, 9)) for k, r in enumerate((0.1, 0.4, 0.25))]
    labels = np.zeros((5, c), bool)
    labels[:, 1] = True  # class 2 is in no image
    est = estimate(sets, image_labels=labels, progress=False)
    assert est.patterns[0, 2, 1:].sum() == 0 < est.patterns[1, 2, 1:].sum()  # class 2: known negatives
    plain = estimate(sets, progress=False)
    np.testing.assert_array_equal(plain.patterns.sum(axis=0), est.patterns.sum(axis=0))
    assert plain.patterns[1].sum() == 0
    sel = est.select()
    assert int(sel.best[1]) == 0
    doc = est.to_json(sel)
    assert doc["estimator"] == DEFAULT_ESTIMATOR and doc["gt"] is None
    assert doc["estimate_is"] == "rank score (0-100), not an IoU"
    assert "*" in est.table(sel)
    st_est = estimate(sets, method="staple", progress=False)
    assert int(st_est.select().best[1]) == 0


def test_cli_gt_none_evaluate_and_merge(tmp_path, capsys):
    import json

    from isle_fast.cli import main
    from isle_fast.ensemble.merge import merge
    from isle_fast.stores.stack import open_stack

    rng = np.random.default_rng(4)
    c = 3
    truths = [rng.integers(0, c, size=(15, 18)).astype(np.uint8) for _ in range(6)]
    sets = [write_stack(f"{tmp_path}/s{k}.zarr", [_noisy(t, r, rng, c) for t in truths], num_classes=c,
                        chunks=(4, 15, 18)) for k, r in enumerate((0.3, 0.1, 0.25))]
    paths = [s.path for s in sets]
    js = tmp_path / "e.json"
    assert main(["evaluate", *paths, "--gt", "none", "--estimator", "staple", "--json", str(js)]) == 0
    out = capsys.readouterr().out
    assert "estimated IoU" in out and "staple" in out
    doc = json.loads(js.read_text())
    assert doc["estimator"] == "staple" and set(doc["selection"].values()) == {"s1"}
    assert doc["estimate_is"] == "IoU (%)"
    assert main(["merge", *paths, "--gt", "None", "--out", f"{tmp_path}/ens.zarr", "--quiet"]) == 0
    ens = open_stack(f"{tmp_path}/ens.zarr")
    assert ens.provenance["gt"] is None and ens.provenance["estimator"] == DEFAULT_ESTIMATOR
    # the ensemble of an estimated selection is the merge of that selection
    res = merge(paths, None, f"{tmp_path}/ens2.zarr", progress=False)
    np.testing.assert_array_equal(np.asarray(ens.array[:]), np.asarray(res.stack.array[:]))
    assert main(["report", *paths, "--gt", "none", "--out", f"{tmp_path}/rep", "--quiet"]) != 0
    gt = write_stack(f"{tmp_path}/gt.zarr", truths, kind="gt", num_classes=c)
    assert main(["evaluate", *paths, "--gt", gt.path, "--quiet", "--bootstrap", "0"]) == 0
    capsys.readouterr()
    assert main(["evaluate", *paths, "--gt", "none"]) == 0  # the default: a rank score, said so
    assert "choice score" in capsys.readouterr().out
    # a rank score is no IoU: the labelled-subset blend refuses it, naming the flag
    assert main(["merge", *paths, "--gt", gt.path, "--out", f"{tmp_path}/b.zarr", "--blend-estimate",
                 "--estimator", "rank", "--quiet", "--no-score"]) != 0
    assert "--estimator 'rank'" in capsys.readouterr().err
    assert not (tmp_path / "b.zarr").exists()
    assert main(["evaluate", *paths, "--gt", gt.path, "--estimator", "staple", "--quiet"]) != 0
    assert "--gt none only" in capsys.readouterr().err


def test_blend_scores_weights_the_labelled_iou_by_images_with_the_class():
    from isle_fast.ensemble.estimate import blend_scores

    lab = np.array([[50.0, np.nan, 10.0], [40.0, 20.0, 30.0]])
    est = np.array([[30.0, 60.0, 90.0], [35.0, 10.0, 80.0]])
    out = blend_scores(lab, np.array([30, 0, 10]), est, prior_images=10)
    np.testing.assert_allclose(out[:, 0], 0.75 * lab[:, 0] + 0.25 * est[:, 0])
    np.testing.assert_allclose(out[:, 1], [60.0, 10.0])  # no labelled image: the estimate (NaN -> estimate)
    np.testing.assert_allclose(out[:, 2], 0.5 * lab[:, 2] + 0.5 * est[:, 2])


# ------------------------------------------------------------------ the labelled IoU and the estimate together
def _labelled_case(seed: int, n_img: int = 30, n: int = 3, c: int = 5):
    """Per-image intersection / union counts of ``n`` sets with class-wise different quality."""
    rng = np.random.default_rng(seed)
    union = rng.integers(50, 200, size=(n_img, n, c))
    present = rng.random((n_img, c)) < 0.5
    present[:, 0] = True
    quality = rng.uniform(0.3, 0.9, size=(n, c))
    inter = (union * np.clip(quality[None] + rng.normal(0, 0.1, size=union.shape), 0, 1)).astype(np.int64)
    stats = np.stack([inter, union], axis=-1) * present[:, None, :, None]
    return stats.astype(np.int64), 100 * quality


def test_contrast_basis_is_orthonormal_and_blind_to_a_common_offset():
    from isle_fast.ensemble.uncertainty import contrast_basis

    for n in range(1, 7):
        q = contrast_basis(n)
        assert q.shape == (n, n - 1)
        np.testing.assert_allclose(q.T @ q, np.eye(n - 1), atol=1e-12)
        np.testing.assert_allclose(np.ones(n) @ q, 0.0, atol=1e-12)


def test_posterior_follows_the_labels_when_every_image_is_labelled():
    """population = the labelled images: no sampling error is left, the labelled IoU decides exactly."""
    from isle_fast import metrics
    from isle_fast.ensemble.uncertainty import posterior_scores

    stats, _ = _labelled_case(1)
    lab = metrics.iou_from_stats(stats.sum(axis=0))
    wrong = -lab  # an estimate that ranks every class backwards
    post = posterior_scores(stats, wrong, reps=100, seed=0, population=stats.shape[0])
    np.testing.assert_array_equal(post["best"], np.argmax(lab, axis=0))
    np.testing.assert_allclose(post["scores"], lab, atol=1e-4)
    assert np.all(post["p_best"] > 0.99) and post["labelled_weight"][1:].min() > 0.999


def test_posterior_follows_the_estimate_where_no_image_is_labelled():
    from isle_fast.ensemble.uncertainty import posterior_scores

    stats, quality = _labelled_case(2)
    stats[:, :, 3] = 0  # class 3 is in no labelled image
    est = quality + np.arange(quality.shape[1])[None]  # a class offset: contrasts unchanged
    present = stats[..., 1].sum(axis=(0, 1)) > 0
    post = posterior_scores(stats, est, gt_present=present, reps=100, seed=0, population=1000)
    assert post["best"][3] == np.argmax(est[:, 3]) and post["labelled_weight"][3] == 0.0
    assert 0.0 <= post["p_best"][3] <= 1.0 and post["expected_loss"][3] >= 0.0


def test_posterior_weights_the_labels_more_with_more_labelled_images_and_is_seeded():
    from isle_fast.ensemble.uncertainty import posterior_scores

    stats, quality = _labelled_case(3, n_img=200)
    est = quality[::-1].copy()  # disagrees with the labelled images
    few = posterior_scores(stats[:10], est, reps=100, seed=4, population=10_000, pooled=True)
    many = posterior_scores(stats, est, reps=100, seed=4, population=10_000, pooled=True)
    assert many["labelled_weight"][1:].mean() > few["labelled_weight"][1:].mean()
    again = posterior_scores(stats, est, reps=100, seed=4, population=10_000, pooled=True)
    for key in ("scores", "p_best", "expected_loss", "best"):
        np.testing.assert_array_equal(many[key], again[key])
    assert many["tau2"] > 1.0  # an estimate that disagrees is given a large error


def test_posterior_rejects_bad_shapes():
    from isle_fast.ensemble.uncertainty import posterior_scores
    from isle_fast.errors import InputError

    stats, quality = _labelled_case(4)
    with pytest.raises(InputError, match="shape"):
        posterior_scores(stats[..., 0], quality)
    with pytest.raises(InputError, match="estimate"):
        posterior_scores(stats, quality[:, :2])
    with pytest.raises(InputError, match="population"):
        posterior_scores(stats, quality, population=3)


def test_combined_estimate_is_the_mean_of_staple_and_pairwise():
    from isle_fast.ensemble.estimate import combined_iou, estimate_from_patterns

    rng = np.random.default_rng(5)
    pat = rng.integers(0, 500, size=(2, 4, 8))
    pat[0, 3] = 0  # a class no set votes for: undefined in both
    pat[1, 3] = 0
    want = (staple_iou(pat) + pairwise_iou(pat)) / 2
    got = combined_iou(pat)
    np.testing.assert_allclose(got[:, :3], want[:, :3], rtol=1e-12)
    assert np.isnan(got[:, 3]).all()
    np.testing.assert_array_equal(estimate_from_patterns(pat, "combined"), got)


def test_staple_fit_ignores_known_negatives_that_no_set_votes_for():
    # known-negative pixels are exact: their votes are false positives, but they do not dilute the false-positive
    # rates fitted where the class may be present (pooled, 10**6 silent known negatives moved every estimate)
    rng = np.random.default_rng(3)
    unknown = rng.integers(0, 400, size=(3, 16))
    unknown[:, 0] = 0
    negative = np.zeros_like(unknown)
    base = staple_iou(np.stack([unknown, negative]))
    negative[:, 0] = 10**6  # pixels of images without the class where no set votes for it
    np.testing.assert_allclose(staple_iou(np.stack([unknown, negative])), base, rtol=1e-12)
    negative[1, 1] = 50  # set 0 claims class 1 on 50 ruled-out pixels: exactly 50 more false positives for set 0
    got = staple_iou(np.stack([unknown, negative]))
    np.testing.assert_allclose(got[1:, 0], base[1:, 0], rtol=1e-12)
    np.testing.assert_allclose(got[[0, 2], 2], base[[0, 2], 2], rtol=1e-12)
    assert got[0, 1] < base[0, 1]


def test_rank_score_hand_case():
    from isle_fast.ensemble.estimate import _ranks, estimate_from_patterns, rank_score

    # ties share the lower rank; NaN ranks lowest
    np.testing.assert_array_equal(_ranks(np.array([[3.0, 1.0], [1.0, 1.0], [2.0, np.nan]])),
                                  [[2, 1], [0, 1], [1, 0]])
    rng = np.random.default_rng(7)
    pat = rng.integers(0, 300, size=(2, 3, 8))
    st_, pw = staple_iou(pat), pairwise_iou(pat)
    want = 100 * (_ranks(st_) + _ranks(pw)) / 4 + 1e-4 * st_
    got = rank_score(pat)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    np.testing.assert_array_equal(estimate_from_patterns(pat, "rank"), got)
    np.testing.assert_array_equal(rank_score(pat), got)  # deterministic
    assert DEFAULT_ESTIMATOR == "rank"


def test_rank_score_chooses_a_perfect_set_and_ties_symmetric_sets_to_the_first():
    from isle_fast.ensemble.estimate import Estimate, rank_score

    rng = np.random.default_rng(2)
    c = 4
    truth = rng.integers(0, c, size=(120, 150)).astype(np.uint8)
    sets = [truth.copy(), _noisy(truth, 0.3, rng, c), _noisy(truth, 0.4, rng, c)]
    score = rank_score(cpu.vote_patterns(tuple(sets), c))
    assert (score.argmax(axis=0) == 0).all()
    same = _noisy(truth, 0.3, rng, c)
    pat = cpu.vote_patterns((same, same.copy(), _noisy(truth, 0.5, rng, c)), c)
    score = rank_score(pat)
    np.testing.assert_array_equal(score[0], score[1])  # identical sets: identical scores
    est = Estimate(classes=[f"c{k}" for k in range(c)], set_names=["a", "b", "z"], patterns=np.stack(
        [pat, np.zeros_like(pat)]), method="rank", iou=score)
    assert (est.select().best == 0).all()  # the tie goes to the first set, every time


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vote_patterns_of_score_sets_skip_their_padding(tmp_path, seed):
    """A score set's padding (every slice 0) decoded to background, and the vote pass counted it as every
    score set agreeing on background (class 0's all-sets pattern grew with the padding). The votes of
    score sets now equal those of their label maps, whose padding is 255 (no vote); tiles cut images."""
    from isle_fast.ensemble.estimate import vote_patterns_pass

    rng = np.random.default_rng(seed)
    c = 4
    shapes = [(int(rng.integers(3, 17)), int(rng.integers(3, 21))) for _ in range(5)]
    scores = [[rng.integers(0, 256, size=(h, w, c)).astype(np.uint8) for h, w in shapes] for _ in range(3)]
    for bg in (None, 0.3):
        t = -1.0 if bg is None else bg * 255.0
        as_scores = [write_stack(f"{tmp_path}/s{k}-{bg}.zarr", imgs, encoding="scores", num_classes=c,
                                 chunks=(2, 8, 9, c), padded_shape=(16, 20)) for k, imgs in enumerate(scores)]
        as_labels = [write_stack(f"{tmp_path}/l{k}-{bg}.zarr", [cpu.decode_scores(a, t) for a in imgs],
                                 num_classes=c, chunks=(2, 8, 9), padded_shape=(16, 20))
                     for k, imgs in enumerate(scores)]
        got, _, _ = vote_patterns_pass(as_scores, bg_threshold=bg, progress=False)
        want, _, _ = vote_patterns_pass(as_labels, progress=False)
        np.testing.assert_array_equal(got, want)
        assert int(want[0, 0].sum()) == sum(h * w for h, w in shapes)   # every image pixel, no padding
