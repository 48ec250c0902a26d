"""Every CAM layout the public WSSS code writes, with files written exactly as that code writes them.

Each test builds the dict the way the project's own inference script does
(IRN ``step/make_cam.py``, PuzzleCAM ``inference_classification.py`` and
``inference_rw.py``, SEAM ``infer_SEAM.py``, PSA ``infer_cls.py``), saves it
with ``np.save``, ingests the folder (no ``--allow-pickle``), and checks the
stored stack against the values and its decode against that project's own
evaluation code (reimplemented here line for line). Stores are float32 so
the decode comparison is exact (uint8 quantisation is another matter).
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from isle_fast import cli
from isle_fast.errors import InputError, plain
from isle_fast.stores.cams import interpret
from isle_fast.stores.ingest import ingest_labels, ingest_scores

C = 21
THR = 0.15


def make_gt(tmp_path, shapes):
    (tmp_path / "gt").mkdir(exist_ok=True)
    for i, (h, w) in shapes.items():
        Image.fromarray(np.zeros((h, w), np.uint8)).save(tmp_path / "gt" / f"{i}.png")
    return ingest_labels(tmp_path / "gt", tmp_path / "gt.zarr", kind="gt", quiet=True)


def onehot(classes):
    label = np.zeros(C - 1, np.float32)
    label[[c - 1 for c in classes]] = 1
    return label


def decoded(stack, image_id):
    return np.argmax(stack.read_image(image_id), axis=-1)


SHAPES = {"2007_000032": (23, 31), "2007_000039": (18, 26), "2007_000063": (29, 17)}
LABELS = {"2007_000032": [1, 15], "2007_000039": [20], "2007_000063": [1, 8, 12]}


# ---------------------------------------------------------------------- IRN
def irn_files(folder, rng, torch):
    """IRN step/make_cam.py: keys = torch.nonzero(label)[:, 0]; 'cam' a tensor, 'high_res' numpy."""
    import torch.nn.functional as F

    folder.mkdir()
    out = {}
    for i, (h, w) in SHAPES.items():
        label = torch.from_numpy(onehot(LABELS[i]))
        strided_size = ((h + 3) // 4, (w + 3) // 4)
        outputs = torch.from_numpy(rng.random((C - 1, h // 2 + 1, w // 2 + 1)).astype(np.float32))
        strided_cam = F.interpolate(outputs[None], strided_size, mode="bilinear", align_corners=False)[0]
        highres_cam = F.interpolate(outputs[:, None], (h + 5, w + 5), mode="bilinear",
                                    align_corners=False)[:, 0, :h, :w]
        valid_cat = torch.nonzero(label)[:, 0]
        strided_cam = strided_cam[valid_cat]
        strided_cam /= F.adaptive_max_pool2d(strided_cam, (1, 1)) + 1e-5
        highres_cam = highres_cam[valid_cat]
        highres_cam /= F.adaptive_max_pool2d(highres_cam, (1, 1)) + 1e-5
        d = {"keys": valid_cat, "cam": strided_cam.cpu(), "high_res": highres_cam.cpu().numpy()}
        np.save(folder / f"{i}.npy", d)
        out[i] = d
    return out


def irn_eval(d, thr=THR):
    """IRN step/eval_cam.py."""
    cams = np.pad(d["high_res"], ((1, 0), (0, 0), (0, 0)), mode="constant", constant_values=thr)
    keys = np.pad(np.asarray(d["keys"]) + 1, (1, 0), mode="constant")
    return keys[np.argmax(cams, axis=0)]


def test_irn_layout(tmp_path, rng):
    torch = pytest.importorskip("torch")
    make_gt(tmp_path, SHAPES)
    files = irn_files(tmp_path / "cam", rng, torch)
    s = ingest_scores(tmp_path / "cam", tmp_path / "s.zarr", gt=tmp_path / "gt.zarr", score_dtype="float32",
                      quiet=True)
    for i, d in files.items():
        x = s.read_image(i)
        np.testing.assert_array_equal(x[..., 0], np.float32(THR))
        for slot, k in enumerate(np.asarray(d["keys"])):
            np.testing.assert_array_equal(x[..., k + 1], d["high_res"][slot])
        assert np.array_equal(decoded(s, i), irn_eval(d))
    assert s.provenance["parameters"]["cam_layout"] == "auto"


def test_irn_low_res_torch_cam_upsampled(tmp_path, rng):
    """Only IRN's stride-4 'cam' (a pickled torch tensor) with --upsample."""
    torch = pytest.importorskip("torch")
    make_gt(tmp_path, SHAPES)
    files = irn_files(tmp_path / "full", rng, torch)
    (tmp_path / "cam").mkdir()
    for i, d in files.items():
        np.save(tmp_path / "cam" / f"{i}.npy", {"keys": d["keys"], "cam": d["cam"]})
    # keys [0, 14] with two 'cam' slices: IRN with aeroplane, or PuzzleCAM with a background slice
    with pytest.raises(InputError, match="2007_000032.*ambiguous.*cam_layout='irn'"):
        ingest_scores(tmp_path / "cam", tmp_path / "s.zarr", gt=tmp_path / "gt.zarr", quiet=True)
    with pytest.raises(InputError, match="low-resolution 'cam'.*upsample=True"):
        ingest_scores(tmp_path / "cam", tmp_path / "s.zarr", gt=tmp_path / "gt.zarr", cam_layout="irn",
                      quiet=True)
    s = ingest_scores(tmp_path / "cam", tmp_path / "s.zarr", gt=tmp_path / "gt.zarr", upsample=True,
                      cam_layout="irn", score_dtype="float32", quiet=True)
    x = s.read_image("2007_000032")
    assert x.shape == (23, 31, C) and (x[..., [1, 15]] > 0).any() and (x[..., 0] == np.float32(THR)).all()


# ---------------------------------------------------------------------- PuzzleCAM
def puzzlecam_files(folder, rng, torch):
    """PuzzleCAM inference_classification.py: keys = np.pad(keys + 1, (1, 0)), 'cam' tensor, 'hr_cam'."""
    import torch.nn.functional as F

    folder.mkdir()
    out = {}
    for i, (h, w) in SHAPES.items():
        label = onehot(LABELS[i])
        strided_cams = torch.from_numpy(rng.random((C - 1, (h + 3) // 4, (w + 3) // 4)).astype(np.float32))
        hr_cams = torch.from_numpy(rng.random((C - 1, h, w)).astype(np.float32))
        keys = torch.nonzero(torch.from_numpy(label))[:, 0]
        strided_cams = strided_cams[keys]
        strided_cams /= F.adaptive_max_pool2d(strided_cams, (1, 1)) + 1e-5
        hr_cams = hr_cams[keys]
        hr_cams /= F.adaptive_max_pool2d(hr_cams, (1, 1)) + 1e-5
        keys = np.pad(keys + 1, (1, 0), mode="constant")
        d = {"keys": keys, "cam": strided_cams.cpu(), "hr_cam": hr_cams.cpu().numpy()}
        np.save(folder / f"{i}.npy", d)
        out[i] = d
    return out


def puzzlecam_eval(d, entry, thr=THR):
    """PuzzleCAM evaluate.py (hr_cam and rw alike)."""
    cams = np.pad(d[entry], ((1, 0), (0, 0), (0, 0)), mode="constant", constant_values=thr)
    return d["keys"][np.argmax(cams, axis=0)]


def test_puzzlecam_layout(tmp_path, rng):
    """The paper's components' format: refused before ('has 4 keys but its scores have shape ...')."""
    torch = pytest.importorskip("torch")
    make_gt(tmp_path, SHAPES)
    files = puzzlecam_files(tmp_path / "cam", rng, torch)
    s = ingest_scores(tmp_path / "cam", tmp_path / "s.zarr", gt=tmp_path / "gt.zarr", score_dtype="float32",
                      quiet=True)
    for i, d in files.items():
        x = s.read_image(i)
        np.testing.assert_array_equal(x[..., 0], np.float32(THR))
        for slot, k in enumerate(d["keys"][1:]):
            np.testing.assert_array_equal(x[..., k], d["hr_cam"][slot])
        absent = [c for c in range(1, C) if c not in d["keys"]]
        assert (x[..., absent] == 0).all()
        assert np.array_equal(decoded(s, i), puzzlecam_eval(d, "hr_cam"))


def test_puzzlecam_random_walk_rw(tmp_path, rng):
    """inference_rw.py: {"keys": cam_dict['keys'], "rw": rw_up}: the foreground slices only, as
    PuzzleCAM's evaluate.py / make_pseudo_labels.py read it (padded with the threshold like hr_cam)."""
    make_gt(tmp_path, SHAPES)
    (tmp_path / "rw").mkdir()
    files = {}
    for i, (h, w) in SHAPES.items():
        keys = np.pad(np.nonzero(onehot(LABELS[i]))[0] + 1, (1, 0), mode="constant")
        rw_up = rng.random((len(keys) - 1, h, w)).astype(np.float32)
        rw_up = rw_up / np.max(rw_up)
        d = {"keys": keys, "rw": rw_up}
        np.save(tmp_path / "rw" / f"{i}.npy", d)
        files[i] = d
    s = ingest_scores(tmp_path / "rw", tmp_path / "s.zarr", gt=tmp_path / "gt.zarr", score_dtype="float32",
                      bg_threshold=0.3, quiet=True)
    for i, d in files.items():
        assert np.array_equal(decoded(s, i), puzzlecam_eval(d, "rw", thr=0.3))


def test_puzzlecam_rw_with_its_own_background_slice(tmp_path, rng):
    """A random-walk output that propagated a background slice too (one slice per key): read as it is."""
    make_gt(tmp_path, SHAPES)
    (tmp_path / "rw").mkdir()
    files = {}
    for i, (h, w) in SHAPES.items():
        keys = np.pad(np.nonzero(onehot(LABELS[i]))[0] + 1, (1, 0), mode="constant")
        d = {"keys": keys, "rw": rng.random((len(keys), h, w)).astype(np.float32)}
        np.save(tmp_path / "rw" / f"{i}.npy", d)
        files[i] = d
    s = ingest_scores(tmp_path / "rw", tmp_path / "s.zarr", gt=tmp_path / "gt.zarr", score_dtype="float32",
                      quiet=True)
    for i, d in files.items():
        x = s.read_image(i)
        np.testing.assert_array_equal(x[..., 0], d["rw"][0])  # the file's background, not the threshold
        assert np.array_equal(decoded(s, i), d["keys"][np.argmax(d["rw"], axis=0)])


# ---------------------------------------------------------------------- SEAM / PSA CAMs
def seam_files(folder, rng, with_aeroplane=False):
    """SEAM infer_SEAM.py: cam_dict[i] = norm_cam[i] for the labelled classes (0-based foreground keys)."""
    folder.mkdir()
    out = {}
    for i, (h, w) in SHAPES.items():
        label = onehot([c for c in LABELS[i] if with_aeroplane or c != 1] or [3])
        sum_cam = rng.random((C - 1, h, w)).astype(np.float32) * label[:, None, None]
        sum_cam[sum_cam < 0] = 0
        cam_max = np.max(sum_cam, (1, 2), keepdims=True)
        cam_min = np.min(sum_cam, (1, 2), keepdims=True)
        sum_cam[sum_cam < cam_min + 1e-5] = 0
        norm_cam = (sum_cam - cam_min - 1e-5) / (cam_max - cam_min + 1e-5)
        cam_dict = {}
        for k in range(20):
            if label[k] > 1e-5:
                cam_dict[k] = norm_cam[k]
        np.save(folder / f"{i}.npy", cam_dict)
        out[i] = cam_dict
    return out


def seam_eval(d, threshold=THR):
    """SEAM evaluation.py (--type npy)."""
    h, w = list(d.values())[0].shape
    tensor = np.zeros((21, h, w), np.float32)
    for key in d.keys():
        tensor[key + 1] = d[key]
    tensor[0, :, :] = threshold
    return np.argmax(tensor, axis=0).astype(np.uint8)


def test_seam_layout(tmp_path, rng):
    make_gt(tmp_path, SHAPES)
    files = seam_files(tmp_path / "cam", rng)
    s = ingest_scores(tmp_path / "cam", tmp_path / "s.zarr", gt=tmp_path / "gt.zarr", score_dtype="float32",
                      normalize=True, quiet=True)
    for i, d in files.items():
        assert np.array_equal(decoded(s, i), seam_eval(d))


def test_seam_dict_with_aeroplane_is_ambiguous_until_told(tmp_path, rng, capsys):
    """Key 0 is aeroplane in SEAM's dicts and background in CRF dicts: refused, naming the layouts."""
    make_gt(tmp_path, SHAPES)
    files = seam_files(tmp_path / "cam", rng, with_aeroplane=True)
    with pytest.raises(InputError, match=r"2007_000032.*ambiguous.*cam_layout='seam' or cam_layout="
                                          "'psa-crf'"):
        ingest_scores(tmp_path / "cam", tmp_path / "s.zarr", gt=tmp_path / "gt.zarr", normalize=True,
                      quiet=True)
    assert not (tmp_path / "s.zarr").exists()
    rc = cli.main(["ingest", "scores", str(tmp_path / "cam"), "--gt", str(tmp_path / "gt.zarr"),
                   "--normalize", "--cam-layout", "seam", "--score-dtype", "float32",
                   "-o", str(tmp_path / "s.zarr"), "-q"])
    assert rc == 0
    from isle_fast.stores.stack import open_stack

    s = open_stack(tmp_path / "s.zarr")
    for i, d in files.items():
        assert np.array_equal(decoded(s, i), seam_eval(d))
    # the image-level labels decide per image instead
    np.save(tmp_path / "cls_labels.npy", {int(i.replace("_", "")): onehot(LABELS[i]) for i in SHAPES})
    s2 = ingest_scores(tmp_path / "cam", tmp_path / "s2.zarr", gt=tmp_path / "gt.zarr", normalize=True,
                       score_dtype="float32", image_labels=tmp_path / "cls_labels.npy", quiet=True)
    for i, d in files.items():
        assert np.array_equal(decoded(s2, i), seam_eval(d))
    assert s2.image_labels is not None and s2.image_labels[0, [0, 1, 15]].all()


# ---------------------------------------------------------------------- PSA / SEAM CRF outputs
def crf_inference(img, probs, t=10, scale_factor=1, labels=21):
    """PSA tool/imutils.py crf_inference."""
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    h, w = img.shape[:2]
    d = dcrf.DenseCRF2D(w, h, labels)
    unary = np.ascontiguousarray(unary_from_softmax(probs))
    d.setUnaryEnergy(unary)
    d.addPairwiseGaussian(sxy=3 / scale_factor, compat=3)
    d.addPairwiseBilateral(sxy=80 / scale_factor, srgb=13, rgbim=np.copy(img), compat=10)
    q = d.inference(t)
    return np.array(q).reshape((labels, h, w))


def test_psa_crf_layout_is_no_longer_shifted_by_one_class(tmp_path, rng):
    """_crf_with_alpha: {0: background, key + 1: class key}. Read before as SEAM keys: every class + 1."""
    pytest.importorskip("pydensecrf")
    make_gt(tmp_path, SHAPES)
    cams = seam_files(tmp_path / "cam", rng, with_aeroplane=True)
    (tmp_path / "crf").mkdir()
    files = {}
    for i, cam_dict in cams.items():
        h, w = SHAPES[i]
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        v = np.array(list(cam_dict.values()))
        bg_score = np.power(1 - np.max(v, axis=0, keepdims=True), 4)
        bgcam_score = np.concatenate((bg_score, v), axis=0)
        crf_score = crf_inference(img, bgcam_score, labels=bgcam_score.shape[0])
        n_crf_al = dict()
        n_crf_al[0] = crf_score[0]
        for k, key in enumerate(cam_dict.keys()):
            n_crf_al[key + 1] = crf_score[k + 1]
        np.save(tmp_path / "crf" / f"{i}.npy", n_crf_al)
        files[i] = n_crf_al
    s = ingest_scores(tmp_path / "crf", tmp_path / "s.zarr", gt=tmp_path / "gt.zarr", score_dtype="float32",
                      quiet=True)
    for i, d in files.items():
        keys = np.asarray(list(d.keys()))
        x = s.read_image(i)
        for k in keys:
            np.testing.assert_allclose(x[..., k], d[k], atol=1e-3)  # clipped to [0, 1] within 1e-3
        assert np.array_equal(decoded(s, i), keys[np.argmax(np.stack(list(d.values())), axis=0)])
        assert set(np.unique(decoded(s, i))) <= set(keys.tolist())


# ---------------------------------------------------------------------- recognition rules
def test_ambiguous_keys_with_cam_only(tmp_path, rng):
    """'cam' with keys [0, 5] and 2 slices: IRN (aeroplane, dog) or PuzzleCAM with a background slice."""
    members = {"keys": np.array([0, 5]), "cam": rng.random((2, 6, 6)).astype(np.float32)}
    from isle_fast.stores.cams import BadCam

    with pytest.raises(BadCam) as err:
        interpret(members, C)
    assert re.search(r"ambiguous.*cam_layout='irn' or cam_layout='puzzlecam'", plain(str(err.value)))
    assert interpret(members, C, layout="irn").classes == (1, 6)
    assert interpret(members, C, layout="puzzlecam").classes == (0, 5)
    assert interpret(members, C, labels=[1, 6]).layout == "irn"
    assert interpret(members, C, labels=[5]).layout == "puzzlecam"
    assert interpret({**members, "high_res": members["cam"]}, C).layout == "irn"
    assert interpret({"keys": members["keys"], "hr_cam": members["cam"]}, C).classes == (0, 5)


@pytest.mark.parametrize("keys,match", [
    (np.array([0.5, 3.0]), r"0\.5.*not a whole number"),
    (np.array([2, 2]), "repeat a class"),
    (np.array([True, False]), "not class indices"),
    (np.array([25]), r"outside \[0, 20\).*class count disagrees"),
])
def test_bad_keys_are_clear_errors(tmp_path, keys, match):
    make_gt(tmp_path, {"x": (4, 5)})
    (tmp_path / "cam").mkdir()
    np.save(tmp_path / "cam" / "x.npy", {"keys": keys, "high_res": np.zeros((len(keys), 4, 5), np.float32)})
    with pytest.raises(InputError, match=match):
        ingest_scores(tmp_path / "cam", tmp_path / "s.zarr", gt=tmp_path / "gt.zarr", quiet=True)


def test_forced_layout_that_does_not_fit(tmp_path, rng):
    from isle_fast.stores.cams import BadCam

    pz = {"keys": np.array([0, 3, 7]), "hr_cam": rng.random((2, 4, 4)).astype(np.float32)}
    with pytest.raises(BadCam, match="3 keys but its scores have shape"):
        interpret(pz, C, layout="irn")
    with pytest.raises(BadCam, match="not a dict keyed by class index"):
        interpret(pz, C, layout="seam")
    seam = {2: np.zeros((4, 4)), 6: np.ones((4, 4))}
    with pytest.raises(BadCam, match="no background key 0"):
        interpret(seam, C, layout="psa-crf")
    with pytest.raises(BadCam, match="not the irn layout"):
        interpret(seam, C, layout="irn")


def test_plain_arrays_with_image_labels(tmp_path, rng):
    """No keys: L slices are the image's L labelled classes; of C-1 slices only those keep scores."""
    make_gt(tmp_path, SHAPES)
    (tmp_path / "cam").mkdir()
    arrays = {}
    for n, (i, (h, w)) in enumerate(SHAPES.items()):
        k = len(LABELS[i]) if n % 2 == 0 else C - 1
        arrays[i] = rng.random((k, h, w)).astype(np.float32)
        np.save(tmp_path / "cam" / f"{i}.npy", arrays[i])
    np.save(tmp_path / "cls_labels.npy", {int(i.replace("_", "")): onehot(LABELS[i]) for i in SHAPES})
    with pytest.raises(InputError, match="class count disagrees"):
        ingest_scores(tmp_path / "cam", tmp_path / "s.zarr", gt=tmp_path / "gt.zarr", quiet=True)
    s = ingest_scores(tmp_path / "cam", tmp_path / "s.zarr", gt=tmp_path / "gt.zarr", score_dtype="float32",
                      image_labels=tmp_path / "cls_labels.npy", quiet=True)
    for n, i in enumerate(SHAPES):
        x = s.read_image(i)
        lab = LABELS[i]
        absent = [c for c in range(1, C) if c not in lab]
        assert (x[..., absent] == 0).all()
        src = arrays[i] if n % 2 == 0 else arrays[i][[c - 1 for c in lab]]
        np.testing.assert_array_equal(np.moveaxis(x[..., lab], 2, 0), src)


@pytest.mark.parametrize("shape,first", [((1, 1, 1), 3), ((3, 5, 3), 3), ((2, 2, 2), 3), ((1, 1, 1), 0)])
def test_one_layout_along_either_axis_reads_as_the_public_k_h_w(shape, first):
    """Without a gt to tell, an IRN array whose K equals an image side fits K x H x W and H x W x K
    with the same classes: that is not a layout ambiguity; the public code writes K x H x W."""
    keys = np.arange(shape[0]) + first  # key 0 in IRN's 'high_res' is aeroplane, not PuzzleCAM's background
    got = interpret({"keys": keys, "high_res": np.zeros(shape, np.float32)}, 21)
    assert got.layout == "irn" and got.axis == 0 and got.classes == tuple(int(k) + 1 for k in keys)


# ---------------------------------------------------------------------- the sweep of CAM sets
def test_cam_sets_sweep_with_a_partial_gt_and_merge_equal_the_public_eval(tmp_path, rng):
    """IRN CAM files (values on the uint8 grid, so the stored scores are exact) of 2 sets, ingested
    class-sparse (the default) and dense: the sweep against a gt of some images equals IRN's
    ``eval_cam.py`` run once per threshold on those images; the merge at each set's best threshold
    is the same from either layout; the benchmark's kernel line agrees with its NumPy reference."""
    from benchmarks.cams import kernel_throughput
    from isle_fast.ensemble.merge import merge
    from isle_fast.ensemble.sweep import parse_thresholds, sweep_thresholds

    shapes = {f"im{i}": (int(rng.integers(5, 30)), int(rng.integers(5, 30))) for i in range(7)}
    (tmp_path / "gt").mkdir()
    gts = {}
    for i, (h, w) in shapes.items():
        g = rng.integers(0, C, (h, w)).astype(np.uint8)
        g[rng.random((h, w)) < 0.1] = 255
        gts[i] = g
        Image.fromarray(g).save(tmp_path / "gt" / f"{i}.png")
    files = {}
    for s in range(2):
        (tmp_path / f"set{s}").mkdir()
        for i, (h, w) in shapes.items():
            keys = np.sort(rng.choice(C - 1, int(rng.integers(1, 4)), replace=False))
            hr = (rng.integers(0, 256, (keys.size, h, w)) / 255.0).astype(np.float32)
            d = {"keys": keys, "cam": hr[:, ::4, ::4], "high_res": hr}
            np.save(tmp_path / f"set{s}" / f"{i}.npy", d)
            files[s, i] = d
    classes = [f"k{c}" for c in range(C)]
    gt = ingest_labels(tmp_path / "gt", tmp_path / "gt.zarr", kind="gt", classes=classes, quiet=True)
    some = ["im5", "im1", "im3"]
    (tmp_path / "some").mkdir()
    for i in some:
        Image.fromarray(gts[i]).save(tmp_path / "some" / f"{i}.png")
    part = ingest_labels(tmp_path / "some", tmp_path / "some.zarr", kind="gt", classes=classes, quiet=True)
    sparse = [ingest_scores(tmp_path / f"set{s}", tmp_path / f"s{s}.zarr", gt=gt, classes=classes,
                            allow_pickle=True, quiet=True) for s in range(2)]
    dense = [ingest_scores(tmp_path / f"set{s}", tmp_path / f"d{s}.zarr", gt=gt, classes=classes,
                           allow_pickle=True, quiet=True, score_layout="dense") for s in range(2)]
    assert [st.score_layout for st in sparse] == ["sparse"] * 2
    ts = parse_thresholds("0.05:0.80:0.05")
    sw = sweep_thresholds(sparse, part, ts, backend="cpu", progress=False)
    np.testing.assert_array_equal(sw.counts, sweep_thresholds(dense, part, ts, backend="cpu",
                                                              progress=False).counts)
    for s in range(2):
        for k, t in enumerate(ts):
            want = np.zeros((C, C), np.int64)
            for i in part.ids:
                pred, g = irn_eval(files[s, i], t), gts[i].astype(np.int64)
                ok = g < C
                want += np.bincount(g[ok] * C + pred[ok], minlength=C * C).reshape(C, C)
            np.testing.assert_array_equal(sw.counts[s, k, :, :C], want)
    a = merge(sparse, part, tmp_path / "a.zarr", bg_threshold="best", backend="cpu", progress=False)
    b = merge(dense, part, tmp_path / "b.zarr", bg_threshold="best", backend="cpu", progress=False)
    assert a.stack.num_images == len(shapes)  # a gt of some images selects; every image is merged
    assert list(a.stack.provenance["bg_thresholds"].values()) == list(b.stack.provenance["bg_thresholds"].values())
    np.testing.assert_array_equal(np.asarray(a.stack.array[:]), np.asarray(b.stack.array[:]))
    line = kernel_throughput(sparse, gt, ts, images=5)
    assert line is not None and line["counts_equal"] and line["set_pixels"] > 0
    assert kernel_throughput(dense, gt, ts) is None
