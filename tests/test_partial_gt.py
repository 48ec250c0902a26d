"""A ground truth of some of the images, in any order: evaluate aligns by id, merge writes every image."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from isle_fast.cli import main
from isle_fast.ensemble.evaluate import evaluate
from isle_fast.ensemble.merge import merge
from isle_fast.errors import AlignmentError, InputError
from isle_fast.stores.stack import open_stack
from tests import reference as ref
from tests.conftest import write_stack


def make_case(root, rng, n_img=7, c=4, n_sets=3, chunks=(2, 5, 6), subset=None, scores=False):
    shapes = [(int(rng.integers(3, 11)), int(rng.integers(3, 13))) for _ in range(n_img)]
    gts = [rng.integers(0, c, size=s).astype(np.uint8) for s in shapes]
    for g in gts:
        g[rng.random(g.shape) < 0.1] = 255
    sets = []
    for k in range(n_sets):
        imgs = []
        for g in gts:
            a = np.where(rng.random(g.shape) < 0.6, g, rng.integers(0, c, size=g.shape)).astype(np.uint8)
            a[g == 255] = rng.integers(0, c, size=int((g == 255).sum()))
            imgs.append(a)
        if scores and k == n_sets - 1:
            imgs = [(np.eye(c, dtype=np.uint8)[a] * 200) for a in imgs]
            sets.append(write_stack(f"{root}/s{k}.zarr", imgs, encoding="scores", num_classes=c,
                                    chunks=chunks + (c,)))
        else:
            sets.append(write_stack(f"{root}/s{k}.zarr", imgs, num_classes=c, chunks=chunks))
    sub = subset if subset is not None else rng.permutation(n_img)[: max(1, n_img // 2)]
    ids = [f"img{i:03d}" for i in sub]
    gt = write_stack(f"{root}/gt.zarr", [gts[i] for i in sub], kind="gt", num_classes=c, ids=ids,
                     chunks=(int(rng.integers(1, 4)), 4, 5))
    return sets, gt, gts, list(sub), c


def _assert_strata_merge(res, want, sets, gt, tmp_path, mode):
    """The merge's provenance holds the reference's strata scores and choice; ``isle merge
    --subset-selection mode`` takes the same mode."""
    prov = res.stack.provenance
    told = np.array([[np.nan if v is None else v for v in prov["strata_scores"][k]] for k in prov["sets"]])
    np.testing.assert_allclose(told, want["scores"], rtol=1e-12)
    np.testing.assert_array_equal(res.selection.best[1:], want["best"][1:])
    out = f"{tmp_path}/{mode}-cli.zarr"
    assert main(["merge", *(s.path for s in sets), "--gt", gt.path, "--out", out,
                 "--quiet", "--no-score", "--subset-selection", mode]) == 0
    assert open_stack(out).provenance["subset_selection"] == mode


def reference(sets, gts, sub, c):
    per = np.zeros((len(sub), len(sets), c, c + 1), np.int64)
    for r, i in enumerate(sub):
        for k, s in enumerate(sets):
            h, w = gts[i].shape
            a = np.asarray(s.array[i, :h, :w])
            if s.encoding == "labels":
                per[r, k] = ref.confusion_labels(gts[i], [a], c)[0]
            else:
                per[r, k] = ref.confusion_scores(gts[i], [a], c, -1.0)[0]
    return per


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31 - 1), scores=st.booleans())
def test_partial_shuffled_gt_equals_reference_on_the_subset(tmp_path_factory, seed, scores):
    rng = np.random.default_rng(seed)
    root = tmp_path_factory.mktemp("p")
    sets, gt, gts, sub, c = make_case(root, rng, n_img=int(rng.integers(2, 8)), scores=scores)
    ev = evaluate(sets, gt, progress=False, per_image=True)
    per = reference(sets, gts, sub, c)
    np.testing.assert_array_equal(ev.counts, per.sum(axis=0))
    from isle_fast import metrics

    np.testing.assert_array_equal(ev.image_stats, metrics.intersection_union(per))


def test_full_gt_in_another_order_equals_aligned(tmp_path):
    rng = np.random.default_rng(3)
    n = 6
    sets, gt, gts, sub, c = make_case(tmp_path, rng, n_img=n, subset=list(range(n)))
    perm = [4, 1, 5, 0, 3, 2]
    gt2 = write_stack(f"{tmp_path}/gt2.zarr", [gts[i] for i in perm], kind="gt", num_classes=c,
                      ids=[f"img{i:03d}" for i in perm], chunks=(4, 4, 5))
    a, b = evaluate(sets, gt, progress=False), evaluate(sets, gt2, progress=False)
    np.testing.assert_array_equal(a.counts, b.counts)


def test_gt_ids_not_in_the_sets_are_named(tmp_path):
    rng = np.random.default_rng(1)
    sets, gt, gts, sub, c = make_case(tmp_path, rng, n_img=4, subset=[0, 1])
    bad = write_stack(f"{tmp_path}/bad.zarr", [gts[0], gts[1]], kind="gt", num_classes=c,
                      ids=["img000", "zebra"])
    with pytest.raises(AlignmentError, match="zebra"):
        evaluate(sets, bad, progress=False)
    rc = main(["evaluate", *(s.path for s in sets), "--gt", bad.path, "--quiet"])
    assert rc != 0


def test_merge_with_partial_gt_writes_every_image(tmp_path):
    rng = np.random.default_rng(7)
    n = 8
    sets, gt, gts, sub, c = make_case(tmp_path, rng, n_img=n, subset=[6, 2, 3])
    full = write_stack(f"{tmp_path}/full.zarr", gts, kind="gt", num_classes=c, chunks=(3, 6, 6))
    res = merge(sets, gt, f"{tmp_path}/ens.zarr", progress=False, subset_selection="labelled")
    assert res.stack.ids == sets[0].ids
    assert res.stack.provenance["labelled_images"] == 3
    assert res.stack.provenance["subset_selection"] == "labelled"
    # the same selection with a full gt writes the same ensemble
    other = merge(sets, full, f"{tmp_path}/ens2.zarr", progress=False, evaluation=res.evaluation)
    np.testing.assert_array_equal(np.asarray(res.stack.array[:]), np.asarray(other.stack.array[:]))
    rc = main(["merge", *(s.path for s in sets), "--gt", gt.path, "--out", f"{tmp_path}/ens3.zarr",
               "--quiet", "--no-score", "--subset-selection", "labelled"])
    assert rc == 0
    np.testing.assert_array_equal(np.asarray(open_stack(f"{tmp_path}/ens3.zarr").array[:]),
                                  np.asarray(res.stack.array[:]))


@pytest.mark.parametrize("scores", [False, True])
def test_merge_with_partial_gt_selects_from_the_strata_by_default(tmp_path, scores):
    from isle_fast.ensemble.estimate import vote_patterns_pass
    from isle_fast.ensemble.uncertainty import strata_counts, stratified_scores

    rng = np.random.default_rng(5)
    n = 9
    sets, gt, gts, sub, c = make_case(tmp_path, rng, n_img=n, subset=[4, 1, 7, 0], scores=scores)
    allowed = np.stack([[(g == k).any() for k in range(c)] for g in gts])  # image labels of every image
    allowed[2, 1] = False  # one the labels rule out
    res = merge(sets, gt, f"{tmp_path}/ens.zarr", progress=False, image_labels=allowed)
    plain = merge(sets, gt, f"{tmp_path}/plain.zarr", progress=False, subset_selection="strata")
    # the reference: the strata of every gt image from plain arrays (its own pixels: a score set's
    # padding is no vote, as in the vote pass), every image's vote patterns; the default with image labels
    # takes the semi-supervised prior, 'strata' the no-label one
    for got, labels, mode, model in ((res, allowed, "strata-semi", "semi"), (plain, None, "strata", "staple")):
        prov = got.stack.provenance
        assert prov["subset_selection"] == mode and got.stack.ids == sets[0].ids
        per = []
        for r, i in enumerate(sub):
            rows, cols = (int(v) for v in gt.shapes[r])
            a = [np.asarray(s.array[i, :rows, :cols]) for s in sets]
            a = [x if x.ndim == 2 else np.argmax(x, axis=-1).astype(np.uint8) for x in a]
            per.append(strata_counts(np.asarray(gt.array[r, :rows, :cols])[None], [x[None] for x in a], c,
                                     None if labels is None else labels[i:i + 1]))
        patterns, _, _ = vote_patterns_pass(sets, image_labels=labels, progress=False)
        want = stratified_scores(np.stack(per), patterns, reps=1000, seed=0, model=model)
        told = np.array([[np.nan if v is None else v for v in prov["strata_scores"][k]] for k in prov["sets"]])
        np.testing.assert_allclose(told, want["scores"], rtol=1e-12)
        np.testing.assert_array_equal(got.selection.best[1:], want["best"][1:])
        assert all(0.0 <= p <= 1.0 for p in prov["strata"]["p_best"] if p is not None)
    # without image labels the default is the posterior (the better of the two there, by measurement)
    post = merge(sets, gt, f"{tmp_path}/post.zarr", progress=False)
    assert post.stack.provenance["subset_selection"] == "posterior" and "blend_posterior" in post.stack.provenance
    # the CLI takes the modes by name
    assert main(["merge", *(s.path for s in sets), "--gt", gt.path, "--out", f"{tmp_path}/e2.zarr",
                 "--quiet", "--no-score", "--subset-selection", "strata"]) == 0
    np.testing.assert_array_equal(np.asarray(open_stack(f"{tmp_path}/e2.zarr").array[:]),
                                  np.asarray(plain.stack.array[:]))
    with pytest.raises(InputError, match="subset_selection"):
        merge(sets, gt, f"{tmp_path}/e4.zarr", progress=False, subset_selection="bogus")


def test_merge_strata_semi_takes_the_semi_supervised_prior(tmp_path):
    from isle_fast.ensemble.estimate import vote_patterns_pass
    from isle_fast.ensemble.uncertainty import strata_counts, stratified_scores

    rng = np.random.default_rng(8)
    sets, gt, gts, sub, c = make_case(tmp_path, rng, n_img=8, subset=[3, 6, 0])
    allowed = np.stack([[(g == k).any() for k in range(c)] for g in gts])
    res = merge(sets, gt, f"{tmp_path}/semi.zarr", progress=False, image_labels=allowed,
                subset_selection="strata-semi")
    prov = res.stack.provenance
    assert prov["subset_selection"] == "strata-semi"
    per = [strata_counts(gts[i][None], [np.asarray(s.array[i, :gts[i].shape[0], :gts[i].shape[1]])[None]
                                        for s in sets], c, allowed[i:i + 1]) for i in sub]
    patterns, _, _ = vote_patterns_pass(sets, image_labels=allowed, progress=False)
    want = stratified_scores(np.stack(per), patterns, reps=1000, seed=0, model="semi")
    _assert_strata_merge(res, want, sets, gt, tmp_path, "strata-semi")


@pytest.mark.parametrize("scores", [False, True])
def test_merge_strata_context_reads_whole_images_of_chunked_stores(tmp_path, scores):
    """The stores are chunked 5 x 6 pixels: the distance to agreement still spans each whole image, as
    :func:`context_strata` of the plain arrays has it."""
    from isle_fast.ensemble.uncertainty import context_strata, strata_counts, stratified_scores

    rng = np.random.default_rng(11)
    sets, gt, gts, sub, c = make_case(tmp_path, rng, n_img=8, subset=[5, 2, 0], scores=scores)
    assert sets[0].chunks[1:3] == (5, 6)
    allowed = np.stack([[(g == k).any() for k in range(c)] for g in gts])
    allowed[3, 2] = False
    res = merge(sets, gt, f"{tmp_path}/ctx.zarr", progress=False, image_labels=allowed,
                subset_selection="strata-context")
    prov = res.stack.provenance
    assert prov["subset_selection"] == "strata-context"

    def plain(i):
        h, w = gts[i].shape
        a = [np.asarray(s.array[i, :h, :w]) for s in sets]
        return [x if x.ndim == 2 else np.argmax(x, axis=-1).astype(np.uint8) for x in a]

    per = np.stack([strata_counts(gts[i][None], [x[None] for x in plain(i)], c, allowed[i:i + 1]) for i in sub])
    ctx = np.stack([context_strata(gts[i][None], [x[None] for x in plain(i)], c, allowed[i:i + 1]) for i in sub])
    every = sum(context_strata(None, [x[None] for x in plain(i)], c, allowed[i:i + 1])[..., 0]
                for i in range(len(gts)))
    want = stratified_scores(per, every.sum(axis=1), reps=1000, seed=0, model="semi", context=(ctx, every))
    _assert_strata_merge(res, want, sets, gt, tmp_path, "strata-context")


def test_auto_takes_the_context_from_enough_labelled_images(tmp_path, monkeypatch):
    """``auto`` with image labels: ``strata-context`` for a gt of at least ``CONTEXT_MIN_IMAGES`` images (the
    same ensemble as asked for by name), ``strata-semi`` for fewer; without image labels the posterior."""
    from isle_fast.ensemble import merge as merge_module

    rng = np.random.default_rng(13)
    sets, gt, gts, sub, c = make_case(tmp_path, rng, n_img=8, subset=[6, 1, 3, 0])
    allowed = np.stack([[(g == k).any() for k in range(c)] for g in gts])
    assert merge_module.CONTEXT_MIN_IMAGES == 25
    for at_least, want in ((4, "strata-context"), (5, "strata-semi")):
        monkeypatch.setattr(merge_module, "CONTEXT_MIN_IMAGES", at_least)
        res = merge(sets, gt, f"{tmp_path}/auto{at_least}.zarr", progress=False, image_labels=allowed)
        named = merge(sets, gt, f"{tmp_path}/named{at_least}.zarr", progress=False, image_labels=allowed,
                      subset_selection=want)
        assert res.stack.provenance["subset_selection"] == want
        assert res.stack.provenance["strata_scores"] == named.stack.provenance["strata_scores"]
        np.testing.assert_array_equal(np.asarray(res.stack.array[:]), np.asarray(named.stack.array[:]))
    plain = merge(sets, gt, f"{tmp_path}/plain.zarr", progress=False)
    assert plain.stack.provenance["subset_selection"] == "posterior"


def test_merge_blends_a_partial_gt_with_the_estimate(tmp_path):
    from isle_fast.ensemble.estimate import estimate
    from isle_fast.ensemble.selection import select
    from isle_fast.ensemble.uncertainty import posterior_scores

    rng = np.random.default_rng(11)
    sets, gt, gts, sub, c = make_case(tmp_path, rng, n_img=9, subset=[5, 0, 7])
    res = merge(sets, gt, f"{tmp_path}/ens.zarr", progress=False, blend_estimate=True)
    ev = evaluate(sets, gt, progress=False, per_image=True)
    post = posterior_scores(ev.image_stats, estimate(sets, progress=False).iou, gt_present=ev.gt_pixels > 0,
                            population=9, pooled=True)
    want = select(scores=post["scores"], gt_pixels=ev.gt_pixels, set_names=ev.set_names, classes=ev.classes)
    np.testing.assert_array_equal(res.selection.best, want.best)
    first = list(res.stack.provenance["blended_scores"].values())[0]
    np.testing.assert_allclose([np.nan if v is None else v for v in first], post["scores"][0], rtol=1e-12)
    told = res.stack.provenance["blend_posterior"]  # the p(best) of the same posterior, per class
    np.testing.assert_allclose([np.nan if v is None else v for v in told["p_best"]], post["p_best"], rtol=1e-12)
    assert told["estimate_error_variance"] == post["tau2"]
    sub = merge(sets, gt, f"{tmp_path}/ens_sub.zarr", progress=False, blend_estimate=True, subset=[0, 2])
    assert set(sub.selection.best[1:]) <= {0, 2}
    assert all(0.0 <= p <= 1.0 for p in sub.stack.provenance["blend_posterior"]["p_best"] if p is not None)
    assert "blended_scores" in res.stack.provenance and res.stack.ids == sets[0].ids
    rc = main(["merge", *(s.path for s in sets), "--gt", gt.path, "--out", f"{tmp_path}/ens2.zarr",
               "--blend-estimate", "--estimator", "pairwise", "--quiet", "--no-score"])
    assert rc == 0
    assert main(["merge", *(s.path for s in sets), "--gt", gt.path, "--out", f"{tmp_path}/ens3.zarr",
                 "--estimator", "pairwise", "--quiet"]) != 0


def test_isle_run_with_a_partial_gt_equals_merge_on_the_same_stores(tmp_path, capsys):
    """``isle run`` with a gt folder of some images: the sets' folders give the images, every image is
    merged and exported, and the ensemble is the one ``isle merge --gt PARTIAL`` makes from the same stores."""
    import json
    import shutil

    from tests.test_job import make_tree

    tree = make_tree(tmp_path / "voc", n=16, seed=3)
    gt_dir = tree / "SegmentationClass"
    for p in sorted(gt_dir.glob("*.png"))[::2]:   # keep the gt of every other image
        p.unlink()
    kept = sorted(p.stem for p in gt_dir.glob("*.png"))
    assert len(kept) == 8
    run = tmp_path / "run"
    capsys.readouterr()
    assert main(["run", str(tree), "--out", str(run), "--workers", "1", "--quiet", "--no-report"]) == 0
    doc = json.loads((run / "run.json").read_text())
    assert doc["images"] == 16
    ens = open_stack(run / "ensemble.zarr")
    assert len(ens.ids) == 16 and len(list((run / "ensemble").glob("*.png"))) == 16
    cache = type(run)(doc["files"]["cache"])
    stores = [open_stack(cache / f"{s}.zarr") for s in ("alpha", "beta", "gamma")]
    gt = open_stack(cache / "gt.zarr")
    assert list(gt.ids) == kept and all(list(s.ids) == list(ens.ids) for s in stores)
    res = merge(stores, gt, f"{tmp_path}/ens.zarr", progress=False)
    np.testing.assert_array_equal(np.asarray(res.stack.array[:]), np.asarray(ens.array[:]))
    ev = json.loads((run / "evaluation.json").read_text())
    assert ev["selection"] == res.selection.mapping()
    # the ensemble's mIoU is scored on the labelled images only
    want = evaluate([res.stack], gt, progress=False).miou[0]
    assert ev["ensemble"]["miou"] == pytest.approx(float(want), abs=1e-12)
    shutil.rmtree(run)


def _image_labels_of_tree(tree, path, classes: int = 21):
    """cls_labels.npy of a make_tree root: each image's foreground classes, from its full gt."""
    from PIL import Image

    labels = {}
    for p in sorted((tree / "SegmentationClass").glob("*.png")):
        g = np.asarray(Image.open(p))
        labels[p.stem] = np.array([(g == k).any() for k in range(1, classes)], np.float32)
    np.save(path, labels, allow_pickle=True)
    return path


def test_isle_run_with_image_labels_equals_merge_with_them(tmp_path, capsys):
    """``isle run --image-labels``: with a gt of some images the choice takes the strata (strata-semi) and the
    ensemble is ``merge(image_labels=...)``'s on the same stores; with a gt of every image the absent classes'
    claims are dropped as ``isle merge --image-labels`` drops them. Before, ``isle run`` had no such option."""
    import json

    from tests.test_job import make_tree

    tree = make_tree(tmp_path / "voc", n=16, seed=5)
    labels = _image_labels_of_tree(tree, tmp_path / "cls_labels.npy")
    # a gt of every image first: the same ensemble as isle merge --image-labels on the run's stores
    full_run = tmp_path / "full"
    assert main(["run", str(tree), "--out", str(full_run), "--workers", "1", "--quiet", "--no-report",
                 "--image-labels", str(labels)]) == 0
    cache = full_run / "cache"
    stores = [str(cache / f"{s}.zarr") for s in ("alpha", "beta", "gamma")]
    assert main(["merge", *stores, "--gt", str(cache / "gt.zarr"), "--out", str(tmp_path / "m.zarr"),
                 "--image-labels", str(labels), "--quiet", "--no-score"]) == 0
    ens = open_stack(full_run / "ensemble.zarr")
    np.testing.assert_array_equal(np.asarray(ens.array[:]), np.asarray(open_stack(tmp_path / "m.zarr").array[:]))
    plain = merge([open_stack(s) for s in stores], open_stack(cache / "gt.zarr"), f"{tmp_path}/plain.zarr",
                  progress=False)
    assert not np.array_equal(np.asarray(plain.stack.array[:]), np.asarray(ens.array[:])), \
        "the image labels changed nothing: the test cannot tell"
    assert json.loads((full_run / "run.json").read_text())["spec"]["image_labels"] == str(labels)
    # then a gt of every other image
    for p in sorted((tree / "SegmentationClass").glob("*.png"))[::2]:
        p.unlink()
    run = tmp_path / "run"
    assert main(["run", str(tree), "--out", str(run), "--workers", "1", "--quiet", "--no-report",
                 "--image-labels", str(labels)]) == 0
    ens = open_stack(run / "ensemble.zarr")
    assert ens.provenance["subset_selection"] == "strata-semi"
    cache = run / "cache"
    sets = [open_stack(cache / f"{s}.zarr") for s in ("alpha", "beta", "gamma")]
    res = merge(sets, open_stack(cache / "gt.zarr"), f"{tmp_path}/ens.zarr", progress=False,
                image_labels=str(labels))
    np.testing.assert_array_equal(np.asarray(res.stack.array[:]), np.asarray(ens.array[:]))
    assert json.loads((run / "evaluation.json").read_text())["selection"] == res.selection.mapping()


def test_isle_run_image_labels_mistakes_are_named(tmp_path, capsys):
    from isle_fast.job import spec_from_toml
    from tests.test_job import make_tree

    job = tmp_path / "job" / "job.toml"
    job.parent.mkdir()
    for body in ('image_labels = "cls.npy"', '[merge]\nimage_labels = "cls.npy"'):
        job.write_text(f'gt = "gt"\nout = "run"\n{body}\n')
        assert spec_from_toml(job).image_labels == job.parent / "cls.npy"   # relative to the file

    tree = make_tree(tmp_path / "voc", n=4, seed=1)
    capsys.readouterr()
    assert main(["run", str(tree), "--out", str(tmp_path / "run"), "--quiet",
                 "--image-labels", str(tmp_path / "nope.npy")]) == 2
    err = capsys.readouterr().err
    assert "--image-labels" in err and "nope.npy" in err and "Traceback" not in err


def test_evaluate_with_a_partial_gt_shows_the_choice_merge_makes(tmp_path, capsys):
    import json

    rng = np.random.default_rng(9)
    sets, gt, gts, sub, c = make_case(tmp_path, rng, n_img=8, subset=[3, 6, 1])
    labels = tmp_path / "labels.npy"  # cls_labels.npy style: id -> foreground classes present
    np.save(labels, {f"img{i:03d}": np.array([(g == k).any() for k in range(1, c)], np.float32)
                     for i, g in enumerate(gts)}, allow_pickle=True)
    res = merge(sets, gt, f"{tmp_path}/ens.zarr", progress=False, image_labels=str(labels))
    assert res.stack.provenance["subset_selection"] == "strata-semi"
    out = tmp_path / "ev.json"
    assert main(["evaluate", *(s.path for s in sets), "--gt", gt.path, "--image-labels", str(labels),
                 "--json", str(out), "--bootstrap", "50"]) == 0
    assert "isle merge's choice with this gt (strata-semi" in capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert doc["default_selection"]["mode"] == "strata-semi"
    assert doc["default_selection"]["selection"] == res.selection.mapping()
    # without image labels: the posterior, as merge; with a gt of every image: nothing more
    assert main(["evaluate", *(s.path for s in sets), "--gt", gt.path, "--bootstrap", "0"]) == 0
    assert "isle merge's choice with this gt (posterior" in capsys.readouterr().out
    full = write_stack(f"{tmp_path}/full.zarr", gts, kind="gt", num_classes=c)
    assert main(["evaluate", *(s.path for s in sets), "--gt", full.path, "--bootstrap", "0"]) == 0
    assert "isle merge's choice" not in capsys.readouterr().out
    assert main(["evaluate", *(s.path for s in sets), "--gt", full.path, "--quiet", "--image-labels",
                 str(labels)]) != 0


@pytest.mark.parametrize("scores", [False, True])
def test_the_strata_passes_return_every_labelled_images_strata_as_the_reference(tmp_path, scores):
    """``labelled_strata_pass`` and ``context_pass`` (chunks of 5 x 6 pixels, a score set) give every gt image's
    strata, in the gt's order, held sparse: exactly :func:`strata_counts` / :func:`context_strata` of the
    plain arrays; ``context_pass`` without a gt every image's vote patterns summed."""
    from isle_fast.ensemble.uncertainty import (
        context_pass,
        context_strata,
        labelled_strata_pass,
        strata_counts,
    )
    from isle_fast.metrics import ImageCounts

    rng = np.random.default_rng(19)
    sets, gt, gts, sub, c = make_case(tmp_path, rng, n_img=9, subset=[6, 1, 3, 0, 8], scores=scores)
    allowed = np.stack([[(g == k).any() for k in range(c)] for g in gts])
    allowed[1, 1] = False

    def plain(i):
        h, w = gts[i].shape
        a = [np.asarray(s.array[i, :h, :w]) for s in sets]
        return [x[None] if x.ndim == 2 else np.argmax(x, axis=-1).astype(np.uint8)[None] for x in a]

    per = labelled_strata_pass(sets, gt, sub, allowed=allowed[sub], progress=False)
    assert isinstance(per, ImageCounts) and per.num_images == len(sub)
    np.testing.assert_array_equal(per.dense(), np.stack([strata_counts(gts[i][None], plain(i), c, allowed[i:i + 1])
                                                         for i in sub]))
    ctx = context_pass(sets, gt, sub, allowed=allowed[sub], progress=False)
    want = np.stack([context_strata(gts[i][None], plain(i), c, allowed[i:i + 1]) for i in sub])
    assert isinstance(ctx, ImageCounts)
    np.testing.assert_array_equal(ctx.dense(), want)
    np.testing.assert_array_equal(ctx.sum_axis(1).dense(), per.dense())
    every = context_pass(sets, allowed=allowed, progress=False)
    np.testing.assert_array_equal(every, sum(context_strata(None, plain(i), c, allowed[i:i + 1])[..., 0]
                                             for i in range(len(gts))))


def test_the_labelled_strata_of_many_sets_are_held_sparse(tmp_path):
    """2**N vote patterns per class and image: with 10 sets each labelled image's context strata are 5 MiB
    dense (12 sets and 1,000 images: 19 GiB, which ran out of memory or, later, was refused). Held sparse they
    take what the images hold, and the pass's memory does not grow with the labelled images."""
    import tracemalloc

    from isle_fast.ensemble.uncertainty import context_pass

    rng = np.random.default_rng(29)
    sets, gt, gts, sub, c = make_case(tmp_path, rng, n_img=40, n_sets=10, subset=list(range(40)),
                                      chunks=(8, 16, 16))  # few chunks: little of Dask's own memory
    dense = 40 * 2 * 5 * c * 2**10 * 3 * 8
    context_pass(sets[:2], gt, sub, progress=False)          # imports and caches outside the measurement
    tracemalloc.start()
    try:
        ctx = context_pass(sets, gt, sub, progress=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert ctx.num_images == 40 and ctx.nbytes < dense / 100
    assert peak < dense / 2, (peak, dense)     # the dense strata alone took all of ``dense``


def test_the_report_shows_the_choice_the_ensemble_was_made_with(tmp_path):
    """With a gt of some images the ensemble's choice comes from the strata, not from the labelled IoU the
    report's other tables show: the report gives that choice with its own p(best) and expected loss, marks
    where it differs from the labelled IoU's, and says so in the JSON. Before, its uncertainty table showed
    only the labelled IoU's choice, one the ensemble had not made."""
    import json

    from isle_fast.ensemble.report import report
    from isle_fast.ensemble.selection import select

    rng = np.random.default_rng(21)
    sets, gt, gts, sub, c = make_case(tmp_path, rng, n_img=12, subset=[9, 2, 5, 0, 7])
    allowed = np.stack([[(g == k).any() for k in range(c)] for g in gts])
    ens = merge(sets, gt, f"{tmp_path}/ens.zarr", progress=False, image_labels=allowed)
    prov = ens.stack.provenance
    assert prov["subset_selection"] == "strata-semi"
    out = report(sets, gt, tmp_path / "rep", ensemble=ens.stack, progress=False)
    doc = json.loads((tmp_path / "rep" / "report.json").read_text())
    got = doc["ensemble_choice"]
    names = [s.name for s in sets]
    assert got["mode"] == "strata-semi" and got["labelled_images"] == 5
    assert [names[b] for b in got["best"][1:]] == [prov["selection"][k] for k in gt.classes[1:]]
    assert names[got["best"][0]] == prov["background_set"]
    np.testing.assert_allclose(got["p_best"], [np.nan if v is None else v for v in prov["strata"]["p_best"]])
    md = (tmp_path / "rep" / "tables.md").read_text()
    assert "## The ensemble's choice" in md and "`strata-semi`" in md
    labelled = select(evaluate(sets, gt, progress=False))
    differ = [k for k in range(c) if int(labelled.best[k]) != got["best"][k]]
    assert differ, "the two choices agree: the test cannot tell"
    assert f"otherwise in {len(differ)} of {c} classes" in md
    for k in differ:
        assert f"| **{gt.classes[k]}** |" in md
    assert out["path"]
    # an ensemble that took the labelled IoU's choice (a gt of every image) has no such section
    full = merge(sets, gt, f"{tmp_path}/lab.zarr", progress=False, subset_selection="labelled")
    report(sets, gt, tmp_path / "rep2", ensemble=full.stack, progress=False)
    assert json.loads((tmp_path / "rep2" / "report.json").read_text())["ensemble_choice"] is None
    assert "The ensemble's choice" not in (tmp_path / "rep2" / "tables.md").read_text()
