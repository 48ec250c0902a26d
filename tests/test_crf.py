"""Dense CRF refinement: the public code's calls exactly (PSA, IRN, pydensecrf's example), image labels,
the classes kept, the true shape only, read-only images."""

from __future__ import annotations

import numpy as np
import pydensecrf.densecrf as dcrf
import pytest
from _refine_data import make_scenes, miou, write_stores
from _shared import shared_data
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from pydensecrf.utils import (
    create_pairwise_bilateral,
    create_pairwise_gaussian,
    unary_from_labels,
    unary_from_softmax,
)
from reference import quantize_scores_u8

from isle_fast.cli import main
from isle_fast.errors import InputError
from isle_fast.refinement.chain import refine_stack
from isle_fast.refinement.crf import (
    AUTO_PRESET,
    PRESETS,
    DenseCRF,
    crf_image,
    crf_marginals,
    crf_settings,
    present_classes,
)
from isle_fast.stores.stack import Stack, open_stack
from isle_fast.synthetic.scene import synthetic_scene


# --------------------------------------------------------------------------------- the public calls
def psa_crf_inference(img, probs, t=10, labels=21):
    """PSA's ``tool/imutils.py::crf_inference`` as the public code calls pydensecrf (scores, C x H x W)."""
    h, w = img.shape[:2]
    d = dcrf.DenseCRF2D(w, h, labels)
    d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
    d.addPairwiseGaussian(sxy=3, compat=3)
    d.addPairwiseBilateral(sxy=80, srgb=13, rgbim=np.copy(img), compat=10)
    return np.array(d.inference(t)).reshape((labels, h, w))


def irn_crf_inference_label(img, labels, t=10, n_labels=21, gt_prob=0.7):
    """IRN's ``misc/imutils.py::crf_inference_label`` as the public code calls pydensecrf (label indices)."""
    h, w = img.shape[:2]
    d = dcrf.DenseCRF2D(w, h, n_labels)
    d.setUnaryEnergy(unary_from_labels(labels, n_labels, gt_prob=gt_prob, zero_unsure=False))
    d.addPairwiseGaussian(sxy=3, compat=3)
    d.addPairwiseBilateral(sxy=50, srgb=5, rgbim=np.ascontiguousarray(np.copy(img)), compat=10)
    return np.argmax(np.array(d.inference(t)).reshape((n_labels, h, w)), axis=0)


def textured_scene(seed, h=40, w=56, c=4):
    """A scene whose texture makes the presets' colour kernels (srgb 13 vs 5) disagree."""
    rgb, gt, sc = synthetic_scene(h, w, c, objects=3, blur=3.0, rng=seed)
    noise = np.random.default_rng(seed).normal(0, 10, rgb.shape)
    return np.clip(rgb + noise, 0, 255).astype(np.uint8), gt, sc


def _scene_with_all_classes(seed=3, h=30, w=41):
    rgb, _, sc = textured_scene(seed, h, w)
    for c in range(4):  # every class wins somewhere, so the CRF's label set is all C classes
        sc[2 + 2 * c:4 + 2 * c, 1:4, :] = 0.0
        sc[2 + 2 * c:4 + 2 * c, 1:4, c] = 1.0
    return rgb, sc


def test_scores_default_is_psa_crf_inference():
    rgb, sc = _scene_with_all_classes()
    assert set(np.unique(sc.argmax(-1))) == {0, 1, 2, 3}
    q = psa_crf_inference(rgb, np.moveaxis(sc, -1, 0), labels=4)
    labels = crf_image(rgb, sc, "scores", 4, output="labels")
    np.testing.assert_array_equal(labels, q.argmax(0).astype(np.uint8))
    marg = crf_image(rgb, sc, "scores", 4, output="scores")
    np.testing.assert_array_equal(marg, np.moveaxis(q.astype(np.float32), 0, -1))
    np.testing.assert_array_equal(marg, crf_image(rgb, sc, "scores", 4, preset="psa", output="scores"))


def test_labels_default_is_irn_crf_inference_label():
    rgb, _, sc = textured_scene(0)
    lab = sc.argmax(-1).astype(np.uint8)
    assert set(np.unique(lab)) == {0, 1, 2, 3}
    want = irn_crf_inference_label(rgb, lab, n_labels=4)
    got = crf_image(rgb, lab, "labels", 4)
    np.testing.assert_array_equal(got, want.astype(np.uint8))
    np.testing.assert_array_equal(got, crf_image(rgb, lab, "labels", 4, preset="irn"))
    # the presets really differ here, so the test tells IRN's settings from PSA's
    assert (crf_image(rgb, lab, "labels", 4, preset="psa") != want).sum() > 20


def test_labels_with_unknown_pixels_equal_pydensecrf_zero_unsure():
    rgb, sc = _scene_with_all_classes(seed=5)
    lab = sc.argmax(-1).astype(np.uint8)
    lab[10:14, 10:30] = 255  # unknown pixels: uniform unary
    shifted = np.where(lab == 255, 0, lab.astype(np.int64) + 1)  # pydensecrf's zero_unsure convention
    h, w = lab.shape
    d = dcrf.DenseCRF2D(w, h, 4)
    d.setUnaryEnergy(unary_from_labels(shifted, 4, gt_prob=0.7, zero_unsure=True))
    d.addPairwiseGaussian(sxy=3, compat=3)
    d.addPairwiseBilateral(sxy=50, srgb=5, rgbim=np.copy(rgb), compat=10)
    q = np.array(d.inference(5)).reshape(4, h, w)
    out = crf_image(rgb, lab, "labels", 4, iterations=5, output="labels")
    np.testing.assert_array_equal(out, q.argmax(0).astype(np.uint8))


# ------------------------------------------------------------------------------------- image labels
def test_image_labels_keep_what_psa_keeps():
    """PSA's ``_crf_with_alpha``: the CRF runs over background + the image's labelled classes, even one
    whose CAM never wins the argmax (keep='argmax' would drop it)."""
    rgb, _, sc = textured_scene(1, c=5)
    label = np.array([False, True, False, True])  # image-level label over the 4 foreground classes
    cams = {1: sc[..., 2], 3: sc[..., 4] * 0.01}  # cam_dict[i] for label[i]; class 4's CAM never wins
    v = np.array(list(cams.values()))
    bg = np.power(1 - np.max(v, axis=0, keepdims=True), 4)
    bgcam = np.concatenate((bg, v), axis=0).astype(np.float32)
    crf_score = psa_crf_inference(rgb, bgcam, labels=bgcam.shape[0])
    scores = np.zeros(sc.shape[:2] + (5,), np.float32)
    scores[..., 0] = bgcam[0]
    for i, key in enumerate(cams):
        scores[..., key + 1] = bgcam[i + 1]
    assert set(np.unique(scores.argmax(-1))) == {0, 2}
    got = crf_image(rgb, scores, "scores", 5, image_labels=label, output="scores")
    want = np.zeros_like(got)
    want[..., 0] = crf_score[0]
    for i, key in enumerate(cams):
        want[..., key + 1] = crf_score[i + 1]
    np.testing.assert_array_equal(got, want)
    assert got[..., 4].any()
    assert not crf_image(rgb, scores, "scores", 5, output="scores")[..., 4].any()  # argmax drops it
    full_row = np.concatenate([[False], label])  # (C,) form: the background entry is ignored
    np.testing.assert_array_equal(got, crf_image(rgb, scores, "scores", 5, image_labels=full_row,
                                                 output="scores"))


def test_image_labels_label_crf_over_the_image_keys_as_irn():
    """IRN's cam_to_ir_label: ``n_labels = len(keys)``, the image's labels + background, even a labelled
    class no pixel of the thresholded map has."""
    rgb, gt, sc = textured_scene(2, c=5)
    a = int(np.unique(gt)[1])
    b = 4 if a != 4 else 3
    keys = np.array([0, a, b])  # background + the image labels
    lab_idx = np.argmax(np.stack([np.full(sc.shape[:2], 0.3), sc[..., a], sc[..., b] * 0.0]), axis=0)
    assert set(np.unique(lab_idx)) == {0, 1}
    want = keys[irn_crf_inference_label(rgb, lab_idx, n_labels=len(keys))]
    row = np.zeros(5, bool)
    row[keys] = True
    got = crf_image(rgb, keys[lab_idx].astype(np.uint8), "labels", 5, image_labels=row)
    np.testing.assert_array_equal(got, want)
    # without the image labels the CRF has only the two classes the map holds
    assert present_classes(keys[lab_idx].astype(np.uint8), "labels", 5).tolist() == [0, a]


def test_image_labels_exclude_classes_and_check_their_form():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)
    lab = rng.choice([0, 1, 2, 255], (9, 11)).astype(np.uint8)
    row = np.array([1, 0, 1], np.int64)  # class 1 is not in the image: its pixels become unknown
    out = crf_image(rgb, lab, "labels", 3, image_labels=row, iterations=2)
    assert set(np.unique(out)) <= {0, 2}
    same = crf_image(rgb, np.where(lab == 1, 255, lab).astype(np.uint8), "labels", 3, image_labels=row,
                     iterations=2)
    np.testing.assert_array_equal(out, same)
    assert present_classes(lab, "labels", 3, keep="argmax", image_labels=row).tolist() == [0, 1, 2]
    with pytest.raises(InputError, match="3 entries .* or 2 .*shape \\(4,\\)"):
        crf_image(rgb, lab, "labels", 3, image_labels=np.ones(4, bool))
    with pytest.raises(InputError, match="booleans or 0 / 1"):
        crf_image(rgb, lab, "labels", 3, image_labels=np.array([0.5, 1.0]))
    with pytest.raises(InputError, match="keep='image' needs image-level labels"):
        crf_image(rgb, lab, "labels", 3, keep="image")


@settings(max_examples=12)
@given(seed=st.integers(0, 10_000), h=st.integers(1, 17), w=st.integers(1, 19), c=st.integers(2, 7),
       enc=st.sampled_from(["labels", "scores"]), keep=st.sampled_from(["auto", "argmax", "nonzero"]),
       with_labels=st.booleans(), features=st.sampled_from(["xy", "yx"]))
def test_crf_never_invents_a_class(seed, h, w, c, enc, keep, with_labels, features):
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    allowed = rng.random(c) < 0.5
    image_labels = rng.random(c) < 0.5 if with_labels else None
    if enc == "labels":
        choices = np.nonzero(allowed)[0]
        choices = choices if len(choices) else np.array([0])
        data = rng.choice(np.append(choices, 255), size=(h, w)).astype(np.uint8)
    else:
        data = rng.random((h, w, c)).astype(np.float32) * allowed
    kept = present_classes(data, enc, c, keep, image_labels)
    for out_enc in ("labels", "scores"):
        out = crf_image(rgb, data, enc, c, iterations=3, keep=keep, image_labels=image_labels, output=out_enc,
                        features=features)
        if out_enc == "labels":
            assert set(np.unique(out)) <= set(kept.tolist())
        else:
            absent = np.setdiff1d(np.arange(c), kept)
            assert not out[..., absent].any()
    if with_labels and keep == "auto":
        assert kept.tolist() == sorted({0} | set(np.nonzero(image_labels)[0].tolist()))
    elif enc == "labels":
        assert set(kept.tolist()) <= set(np.unique(data[data < c]).tolist()) | {0}
    elif keep in ("argmax", "auto"):
        assert set(kept.tolist()) <= set(np.unique(data.argmax(-1)).tolist()) | {0}


# ------------------------------------------------------------------------------------------ presets
def test_presets_resolve_per_input_and_overrides_win():
    assert AUTO_PRESET == {"labels": "irn", "scores": "psa"}
    irn, psa = crf_settings("auto", "labels"), crf_settings("auto", "scores")
    assert irn["preset"] == "irn" and (irn["bi_sxy"], irn["bi_srgb"], irn["bi_compat"]) == (50, 5, 10)
    assert psa["preset"] == "psa" and (psa["bi_sxy"], psa["bi_srgb"], psa["bi_compat"]) == (80, 13, 10)
    for cfg in (irn, psa):
        assert (cfg["iterations"], cfg["gauss_sxy"], cfg["gauss_compat"], cfg["gt_prob"]) == (10, 3, 3, 0.7)
    ex = crf_settings("pydensecrf-example", "labels")
    assert ex["iterations"] == 5 and ex["features"] == "yx" and ex["bi_sxy"] == 80
    assert crf_settings("irn", "scores", bi_sxy=60)["bi_sxy"] == 60.0  # a preset applies to either input
    assert crf_settings("psa", "labels", iterations=None)["iterations"] == 10
    assert set(PRESETS) == {"psa", "irn", "pydensecrf-example"}
    for bad, match in [(dict(preset="crfasrnn"), "crf.preset must be one of auto, psa, irn"),
                       (dict(iterations=-1), "iterations"), (dict(iterations=2.5), "iterations"),
                       (dict(gt_prob=1.5), "gt_prob"), (dict(bi_srgb=0), "bi_srgb"),
                       (dict(features="zx"), "features"), (dict(output="png"), "output"),
                       (dict(keep="all"), "keep"), (dict(bi_sxy="wide"), "bi_sxy must be a number")]:
        with pytest.raises(InputError, match=match):
            DenseCRF(**bad)
    with pytest.raises(InputError, match="no setting 'sigma'"):
        crf_settings("psa", "labels", sigma=3)


@pytest.mark.parametrize("encoding,preset", [("labels", "irn"), ("scores", "psa")])
def test_refine_records_the_preset_the_input_got(tmp_path, encoding, preset):
    img, src, *_ = write_stores(tmp_path, n=2, encoding=encoding)
    out = refine_stack(src, img, tmp_path / "o.zarr", "crf", {"crf.iterations": 2}, workers=1, progress=False)
    params = out.provenance["refinements"][0]["params"]
    assert params["preset"] == preset and params["iterations"] == 2 and params["keep"] == "argmax"
    assert params["bi_sxy"] == PRESETS[preset]["bi_sxy"] and params["bi_srgb"] == PRESETS[preset]["bi_srgb"]
    other = refine_stack(src, img, tmp_path / "p.zarr", "crf",
                         ["crf.preset=pydensecrf-example", "crf.bi_sxy=40"], workers=1, progress=False)
    params = other.provenance["refinements"][0]["params"]
    assert params["preset"] == "pydensecrf-example" and params["bi_sxy"] == 40 and params["iterations"] == 5


# ---------------------------------------------------------------------------- image labels in a run
def test_refine_stack_takes_image_labels_as_array_or_from_the_store(tmp_path, monkeypatch):
    img, src, rgbs, _, scores, shapes = write_stores(tmp_path, n=4, encoding="scores")
    labels = np.array([[1, 1, 0], [0, 1, 1], [1, 1, 1], [0, 0, 0]], bool)  # foreground only: (I, C-1)
    a = refine_stack(src, img, tmp_path / "a.zarr", "crf", {"crf.iterations": 2, "crf.output": "labels"},
                     workers=1, image_labels=labels, progress=False)
    assert a.provenance["image_labels"] == "given"
    assert a.provenance["refinements"][0]["params"]["keep"] == "image"
    s = open_stack(src)
    for i, (h, w) in enumerate(shapes):
        data = s.read_image(i).astype(np.float32) / 255.0
        want = crf_image(rgbs[i], data, "scores", 4, iterations=2, image_labels=labels[i])
        np.testing.assert_array_equal(a.read_image(i), want)
        assert set(np.unique(a.read_image(i))) <= {0} | {c + 1 for c in np.nonzero(labels[i])[0]}
    assert (a.read_image(3) == 0).all()  # no foreground label: background everywhere
    # a store that holds image labels (Stack.image_labels, (I, C) bool) is used without the argument
    full = np.concatenate([np.ones((4, 1), bool), labels], axis=1)
    monkeypatch.setattr(Stack, "image_labels", property(lambda self: full), raising=False)
    b = refine_stack(src, img, tmp_path / "b.zarr", "crf", {"crf.iterations": 2, "crf.output": "labels"},
                     workers=1, progress=False)
    assert b.provenance["image_labels"] == "store"
    np.testing.assert_array_equal(a.array[:], b.array[:])
    c = refine_stack(src, img, tmp_path / "c.zarr", "crf",
                     {"crf.iterations": 2, "crf.keep": "argmax", "crf.output": "labels"}, workers=1,
                     progress=False)
    assert c.provenance["refinements"][0]["params"]["keep"] == "argmax"
    with pytest.raises(InputError, match=r"shape \(3, 3\).*4 images and 4 classes.*\(4, 4\).*\(4, 3\)"):
        refine_stack(src, img, tmp_path / "d.zarr", "crf", image_labels=labels[:3], progress=False)
    assert not (tmp_path / "d.zarr").exists()


def test_keep_image_without_image_labels_is_an_input_error(tmp_path):
    img, src, *_ = write_stores(tmp_path, n=2, encoding="labels")
    with pytest.raises(InputError, match="keep='image' needs image-level labels.*set.zarr holds none"):
        refine_stack(src, img, tmp_path / "o.zarr", "crf", {"crf.keep": "image"}, workers=1, progress=False)
    assert not (tmp_path / "o.zarr").exists()


# ------------------------------------------------------------------------ images as users have them
@pytest.mark.parametrize("features", ["xy", "yx"])
def test_read_only_rgb_from_pil(features):
    """``np.asarray`` of a PIL image is read-only; pydensecrf wants a writeable buffer (it raised
    ``ValueError: buffer source array is read-only``)."""
    rgb, sc = _scene_with_all_classes()
    ro = np.asarray(Image.fromarray(rgb))
    assert not ro.flags.writeable
    got = crf_image(ro, sc, "scores", 4, features=features)
    np.testing.assert_array_equal(got, crf_image(rgb.copy(), sc, "scores", 4, features=features))
    np.testing.assert_array_equal(ro, rgb)  # never modified
    view = np.asarray(Image.fromarray(np.pad(rgb, ((0, 0), (0, 5), (0, 0)))))[:, :-5]  # read-only, strided
    np.testing.assert_array_equal(crf_image(view, sc, "scores", 4, features=features), got)


def test_bad_rgb_is_a_clear_error():
    rgb, sc = _scene_with_all_classes()
    with pytest.raises(InputError, match=r"RGB image has shape \(30, 40, 3\).*\(30, 41, 3\)"):
        crf_image(rgb[:, :40], sc, "scores", 4)
    with pytest.raises(InputError, match="integers in \\[0, 255\\]"):
        crf_image(rgb / 255.0, sc, "scores", 4)
    np.testing.assert_array_equal(crf_image(rgb.astype(np.int64), sc, "scores", 4),
                                  crf_image(rgb, sc, "scores", 4))


# ---------------------------------------------------------------------------- pydensecrf's examples
def _example(k: int):
    """Scene ``k`` of pydensecrf's examples: the image, the annotation as the example script maps it
    (each colour a label, black = unknown) in our form (0..n-1, 255 unknown), the colours, the committed
    result."""
    folder = shared_data("densecrf_examples")
    img = np.asarray(Image.open(folder / f"im{k}.png").convert("RGB"))  # read-only, as users have it
    anno = np.asarray(Image.open(folder / f"anno{k}.png").convert("RGB")).astype(np.uint32)
    out = np.asarray(Image.open(folder / f"out{k}.png").convert("RGB"))
    colour = anno[..., 0] + (anno[..., 1] << 8) + (anno[..., 2] << 16)
    colours, labels = np.unique(colour, return_inverse=True)
    labels = labels.reshape(colour.shape)
    has_unknown = bool(colours[0] == 0)
    if has_unknown:
        colours = colours[1:]
    ours = np.where(labels == 0, 255, labels - 1) if has_unknown else labels
    palette = np.stack([colours & 0xFF, (colours >> 8) & 0xFF, (colours >> 16) & 0xFF], axis=1)
    palette = palette.astype(np.uint8)
    return img, labels, has_unknown, ours.astype(np.uint8), palette, out


def _example_script(img, labels, has_unknown, n):
    """pydensecrf's ``examples/inference.py`` (its default, generic path), called directly."""
    d = dcrf.DenseCRF(img.shape[1] * img.shape[0], n)
    d.setUnaryEnergy(unary_from_labels(labels, n, gt_prob=0.7, zero_unsure=has_unknown))
    d.addPairwiseEnergy(create_pairwise_gaussian(sdims=(3, 3), shape=img.shape[:2]), compat=3,
                        kernel=dcrf.DIAG_KERNEL, normalization=dcrf.NORMALIZE_SYMMETRIC)
    d.addPairwiseEnergy(create_pairwise_bilateral(sdims=(80, 80), schan=(13, 13, 13), img=img, chdim=2),
                        compat=10, kernel=dcrf.DIAG_KERNEL, normalization=dcrf.NORMALIZE_SYMMETRIC)
    return np.argmax(d.inference(5), axis=0).reshape(img.shape[:2])


@pytest.mark.parametrize("k", [1, 2, 3])
def test_reproduces_pydensecrf_examples(k):
    """The committed ``outK.png`` of pydensecrf's example, exactly: the ``pydensecrf-example`` preset through
    the public function. (The example read its images with skimage, in RGB order; the lattice is not
    symmetric in its feature dimensions, so neither BGR nor DenseCRF2D's x, y order reproduces it.)"""
    img, labels, has_unknown, ours, palette, committed = _example(k)
    n = len(palette)
    got = crf_image(img, ours, "labels", n, preset="pydensecrf-example")
    differ = int((palette[got] != committed).any(-1).sum())
    assert differ == 0, f"{differ} pixels differ from out{k}.png"
    np.testing.assert_array_equal(got, _example_script(np.array(img), labels, has_unknown, n))
    # DenseCRF2D's feature order (what PSA / IRN call) differs from the example near ties only
    xy = crf_image(img, ours, "labels", n, preset="pydensecrf-example", features="xy")
    assert 0 < (xy != got).sum() < 0.002 * got.size


# ---------------------------------------------------------------------------------- stores and runs
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
        if encoding == "scores":  # stored keeping each pixel's argmax
            np.testing.assert_array_equal(a.read_image(i).argmax(-1), want.argmax(-1))
            want = quantize_scores_u8(want)
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


def test_cli_preset_and_help(tmp_path, capsys):
    img, src, *_ = write_stores(tmp_path, n=2, encoding="labels")
    with pytest.raises(SystemExit):
        main(["refine", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for words in ("--preset", "label maps -> irn", "scores -> psa", "crf_inference_label", "sxy 50 / srgb 5",
                  "sxy 80 / srgb 13", "pydensecrf-example", "--param crf.KEY=VALUE"):
        assert words in text, words
    assert main(["refine", src, "--images", img, "--out", str(tmp_path / "o.zarr"), "--preset", "psa",
                 "--param", "crf.iterations=2", "--workers", "1", "--quiet"]) == 0
    params = open_stack(tmp_path / "o.zarr").provenance["refinements"][0]["params"]
    assert params["preset"] == "psa" and params["bi_sxy"] == 80 and params["iterations"] == 2
    capsys.readouterr()
    assert main(["refine", src, "--images", img, "--out", str(tmp_path / "x.zarr"), "--preset", "irn",
                 "--with", "shift-not-crf"]) == 2
    err = capsys.readouterr().err
    assert "isle refine: error: --preset" in err and "crf" in err and "Traceback" not in err
    assert main(["refine", src, "--images", img, "--out", str(tmp_path / "y.zarr"), "--preset", "irn",
                 "--param", "crf.preset=psa"]) == 2
    assert "--preset irn and --param crf.preset=psa" in capsys.readouterr().err


def _run_in_pty(args, timeout=300):
    """Run a command with stdout / stderr on a pseudo-terminal (as in a user's shell); (exit code, output)."""
    import fcntl
    import os
    import pty
    import select
    import struct
    import subprocess
    import sys
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a terminal has a size
    env = {k: v for k, v in os.environ.items() if k != "ISLE_PROGRESS"}
    proc = subprocess.Popen([sys.executable, "-m", "isle_fast", *args], stdin=slave, stdout=slave, stderr=slave,
                            close_fds=True, env=env)
    os.close(slave)
    out = b""
    while True:
        ready, _, _ = select.select([master], [], [], timeout)
        if not ready:
            proc.kill()
            break
        try:
            data = os.read(master, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        out += data
    code = proc.wait(timeout)
    os.close(master)
    return code, out.decode("utf-8", errors="replace")


def test_cli_refine_real_size_under_a_terminal(tmp_path):
    """``isle refine`` as a user runs it: VOC-size images, progress on a terminal, the summary names the preset
    the label maps got (IRN's) and the output equals the library call."""
    from isle_fast.stores.stack import create_stack

    ids, shapes = ["2007_000032", "2007_000039"], [(375, 500), (333, 500)]
    scenes = [textured_scene(10 + i, h, w) for i, (h, w) in enumerate(shapes)]
    with create_stack(tmp_path / "img.zarr", kind="images", classes=["bg", "a", "b", "c"], ids=ids,
                      shapes=shapes) as wr:
        for i, (rgb, _, _) in enumerate(scenes):
            wr.write_image(i, rgb)
    with create_stack(tmp_path / "set.zarr", kind="pseudo", classes=["bg", "a", "b", "c"], ids=ids,
                      shapes=shapes) as wr:
        for i, (_, _, sc) in enumerate(scenes):
            wr.write_image(i, sc.argmax(-1).astype(np.uint8))
    code, out = _run_in_pty(["refine", str(tmp_path / "set.zarr"), "--images", str(tmp_path / "img.zarr"),
                             "--out", str(tmp_path / "out.zarr"), "--workers", "1"])
    assert code == 0, out
    assert "100%" in out and "isle refine: set -> set+crf" in out, out
    assert "preset=irn" in out and "bi_sxy=50.0" in out and "Traceback" not in out, out
    got = open_stack(tmp_path / "out.zarr")
    for i, (rgb, _, sc) in enumerate(scenes):
        keys = np.union1d([0], np.unique(sc.argmax(-1)))  # no image labels: the classes the map has
        idx = np.searchsorted(keys, sc.argmax(-1))
        want = keys[irn_crf_inference_label(rgb, idx, n_labels=len(keys))]
        np.testing.assert_array_equal(got.read_image(i), want)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), h=st.integers(1, 13), w=st.integers(1, 17), c=st.integers(2, 7),
       keep=st.sampled_from(["auto", "nonzero", "image"]), ties=st.booleans())
def test_crf_on_slots_equals_crf_on_dense_scores(seed, h, w, c, keep, ties):
    """Class-sparse CRF (each image's slots: background + its classes) = the dense CRF, exactly: the kept
    classes and every marginal; image labels may name a class the image has no slot for, and list
    slot classes they exclude."""
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    present = np.flatnonzero(rng.random(c - 1) < 0.5) + 1       # the image's classes (maybe none)
    dense = np.zeros((h, w, c), np.float32)
    dense[..., 0] = rng.random((h, w))
    dense[..., present] = rng.random((h, w, present.size))
    dense[rng.random((h, w, c)) < 0.2] = 0.0
    if ties:
        dense = np.round(dense * 3) / 3
    slots = np.concatenate([dense[..., :1], dense[..., present], np.zeros((h, w, 1), np.float32)], axis=-1)
    slot_classes = np.concatenate([[0], present, [0]])            # with an unused slot at the end
    labels = None
    if keep == "image":
        labels = rng.random(c) < 0.5
        labels[0] = True
    cfg = crf_settings("psa", "scores", iterations=3)
    k1, q1 = crf_marginals(rgb, dense, "scores", c, cfg, keep=keep, image_labels=labels)
    k2, q2 = crf_marginals(rgb, slots, "scores", c, cfg, keep=keep, image_labels=labels,
                           slot_classes=slot_classes)
    np.testing.assert_array_equal(k1, k2)
    np.testing.assert_array_equal(q1, q2)
    assert k1[0] == 0 and (keep == "image" or set(k1[1:]) <= set(present))

