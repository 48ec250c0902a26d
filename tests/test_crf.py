"""Dense CRF refinement: equals a direct pydensecrf call, keeps classes, refines only the true shape."""

from __future__ import annotations

import numpy as np
import pydensecrf.densecrf as dcrf
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydensecrf.utils import unary_from_labels, unary_from_softmax

from _refine_data import make_scenes, miou, write_stores
from isle_fast.refinement.crf import DenseCRF, crf_image, present_classes
from isle_fast.errors import InputError
from isle_fast.refinement.chain import refine_stack, synthetic_scene
from isle_fast.stores.stack import open_stack


def _direct(rgb, unary, n, iterations=10):
    h, w = rgb.shape[:2]
    d = dcrf.DenseCRF2D(w, h, n)
    d.setUnaryEnergy(np.ascontiguousarray(unary))
    d.addPairwiseGaussian(sxy=3, compat=3)
    d.addPairwiseBilateral(sxy=80, srgb=13, rgbim=np.ascontiguousarray(rgb), compat=10)
    return np.asarray(d.inference(iterations)).reshape(n, h, w)


def _scene_with_all_classes(seed=3, h=30, w=41):
    rgb, gt, sc = synthetic_scene(h, w, 4, objects=3, blur=3.0, rng=seed)
    # make sure every class wins somewhere (so the CRF's label set is all C classes)
    for c in range(4):
        sc[2 + 2 * c:4 + 2 * c, 1:4, :] = 0.0
        sc[2 + 2 * c:4 + 2 * c, 1:4, c] = 1.0
    return rgb, sc


def test_scores_equal_direct_pydensecrf():
    rgb, sc = _scene_with_all_classes()
    assert set(np.unique(sc.argmax(-1))) == {0, 1, 2, 3}
    q = _direct(rgb, unary_from_softmax(np.moveaxis(sc, -1, 0)), 4)
    labels = crf_image(rgb, sc, "scores", 4, output="labels")
    np.testing.assert_array_equal(labels, q.argmax(0).astype(np.uint8))
    marg = crf_image(rgb, sc, "scores", 4, output="scores")
    np.testing.assert_array_equal(marg, np.moveaxis(q.astype(np.float32), 0, -1))


def test_labels_equal_direct_pydensecrf():
    rgb, sc = _scene_with_all_classes(seed=5)
    lab = sc.argmax(-1).astype(np.uint8)
    lab[10:14, 10:30] = 255  # unknown pixels: uniform unary
    shifted = np.where(lab == 255, 0, lab.astype(np.int64) + 1)  # pydensecrf's zero_unsure convention
    q = _direct(rgb, unary_from_labels(shifted, 4, gt_prob=0.7, zero_unsure=True), 4, iterations=5)
    out = crf_image(rgb, lab, "labels", 4, iterations=5, output="labels")
    np.testing.assert_array_equal(out, q.argmax(0).astype(np.uint8))


@settings(max_examples=12)
@given(seed=st.integers(0, 10_000), h=st.integers(1, 17), w=st.integers(1, 19), c=st.integers(2, 7),
       enc=st.sampled_from(["labels", "scores"]), keep=st.sampled_from(["argmax", "nonzero"]))
def test_crf_never_invents_a_class(seed, h, w, c, enc, keep):
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    allowed = rng.random(c) < 0.5
    if enc == "labels":
        choices = np.nonzero(allowed)[0]
        choices = choices if len(choices) else np.array([0])
        data = rng.choice(np.append(choices, 255), size=(h, w)).astype(np.uint8)
    else:
        data = rng.random((h, w, c)).astype(np.float32) * allowed
    kept = present_classes(data, enc, c, keep)
    for out_enc in ("labels", "scores"):
        out = crf_image(rgb, data, enc, c, iterations=3, keep=keep, output=out_enc)
        if out_enc == "labels":
            assert set(np.unique(out)) <= set(kept.tolist())
        else:
            absent = np.setdiff1d(np.arange(c), kept)
            assert not out[..., absent].any()
    if enc == "labels":
        assert set(kept.tolist()) <= set(np.unique(data[data < c]).tolist()) | {0}
    elif keep == "argmax":
        assert set(kept.tolist()) <= set(np.unique(data.argmax(-1)).tolist()) | {0}


def test_crf_improves_iou_on_blurry_cams():
    rgbs, gts, scores, _ = make_scenes(4, seed=7, hmin=40, hmax=56, wmin=40, wmax=64)
    before = [miou(s.argmax(-1), g, 4) for s, g in zip(scores, gts)]
    after = [miou(crf_image(r, s, "scores", 4), g, 4) for r, s, g in zip(rgbs, scores, gts)]
    assert np.mean(after) > np.mean(before) + 0.02
    after_lab = [miou(crf_image(r, s.argmax(-1).astype(np.uint8), "labels", 4), g, 4)
                 for r, s, g in zip(rgbs, scores, gts)]
    assert np.mean(after_lab) > np.mean(before)


@pytest.mark.parametrize("encoding", ["scores", "labels"])
def test_store_refines_true_shape_only_and_chunking_does_not_matter(tmp_path, encoding):
    img, src, rgbs, _, _, shapes = write_stores(tmp_path, n=5, encoding=encoding)
    a = refine_stack(src, img, tmp_path / "a.zarr", ["crf"], {"crf.iterations": 3}, workers=1,
                     images_per_task=1, progress=False)
    b = refine_stack(src, img, tmp_path / "b.zarr", ["crf"], {"crf.iterations": 3}, workers=2,
                     scheduler="threads", images_per_task=3, progress=False)
    s = open_stack(src)
    assert a.encoding == encoding and a.chunks[0] == 1 and b.chunks[0] == 3
    np.testing.assert_array_equal(a.array[:], b.array[:])
    for i, (h, w) in enumerate(shapes):
        data = s.read_image(i)
        if encoding == "scores":
            data = data.astype(np.float32) / 255.0
        want = crf_image(rgbs[i], data, encoding, 4, iterations=3, output=encoding)
        if encoding == "scores":
            want = np.rint(want * 255).astype(np.uint8)
        np.testing.assert_array_equal(a.read_image(i), want)
        full = a.array[i]
        pad_val = 255 if encoding == "labels" else 0
        assert (full[h:] == pad_val).all() and (full[:, w:] == pad_val).all()


def test_output_encoding_option(tmp_path):
    img, src, *_ = write_stores(tmp_path, n=3, encoding="scores", score_dtype="float16")
    lab = refine_stack(src, img, tmp_path / "l.zarr", "crf", ["crf.output=labels", "crf.iterations=2"],
                       workers=1, progress=False)
    sc = refine_stack(src, img, tmp_path / "s.zarr", "crf", ["crf.iterations=2"], workers=1, progress=False)
    assert lab.encoding == "labels" and sc.encoding == "scores" and str(sc.array.dtype) == "float16"
    for i in range(3):
        np.testing.assert_array_equal(lab.read_image(i), sc.read_image(i).astype(np.float32).argmax(-1))


def test_bad_parameters_are_input_errors():
    with pytest.raises(InputError, match="gt_prob"):
        DenseCRF(gt_prob=1.5)
    with pytest.raises(InputError, match="output"):
        DenseCRF(output="png")
