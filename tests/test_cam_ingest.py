"""CAM files straight into class-sparse stores (isle_fast/stores/cam_ingest.py) == the dense path, bit for bit.

The reference is the path it replaced: ``ingest_scores(score_layout="dense")`` then
:func:`isle_fast.stores.sparse.sparsify` of that store (what ``ingest_layout`` did), on random CAM
files: 0-3 classes an image (0-class images too), keys in any order, scores on the uint8 grid, half
way between two levels, at 0 and 1, just outside [0, 1], ties; odd sizes; chunk boundaries (small
chunks forced); worker processes.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from isle_fast.errors import InputError
from isle_fast.stores.cam_ingest import _dense_slots, read_cam_slots
from isle_fast.stores.formats import BadInput, read_scores
from isle_fast.stores.ingest import ingest_labels, ingest_scores
from isle_fast.stores.sparse import sparsify

C = 21


def _values(rng: np.random.Generator, shape: tuple[int, ...], style: int) -> np.ndarray:
    """CAM-like float32 scores: 0 grid, 1 half-steps (rounding ties), 2 uniform, 3 mixed with 0 / 1 / edges."""
    if style == 0:
        v = rng.integers(0, 256, shape) / 255.0
    elif style == 1:
        v = (rng.integers(0, 255, shape) + 0.5) / 255.0
    elif style == 2:
        v = rng.random(shape)
    else:
        v = rng.choice(np.array([0.0, 1.0, 0.15, 0.5 / 255, 1 - 0.5 / 255, -4e-4, 1 + 4e-4, 38 / 255]), shape)
        v = np.where(rng.random(shape) < 0.3, rng.random(shape), v)
    return v.astype(np.float32)


def _write_cams(folder, rng, n, style, *, max_side=9, max_k=3, layout="irn"):
    """``n`` CAM files of ``layout`` (irn: {"keys", "cam", "high_res"}; hwk: an H x W x K 'high_res')."""
    folder.mkdir(parents=True, exist_ok=True)
    shapes = {}
    for i in range(n):
        h, w = (int(v) for v in rng.integers(1, max_side + 1, 2))
        k = int(rng.integers(0, max_k + 1))
        keys = rng.choice(C - 1, k, replace=False)  # IRN's 0-based foreground classes, any order
        if rng.random() < 0.5:
            keys = np.sort(keys)
        hr = _values(rng, (k, h, w), style)
        if k >= 2 and rng.random() < 0.3:
            hr[1] = hr[0]  # exact ties between two classes
        if layout == "ownbg":  # PuzzleCAM keys (0 first, then 1-based classes) with a background slice
            bg = _values(rng, (1, h, w), style)
            np.save(folder / f"im{i:03d}.npy", {"keys": np.pad(keys + 1, (1, 0)),
                                                 "hr_cam": np.concatenate([bg, hr])})
            shapes[f"im{i:03d}"] = (h, w)
            continue
        if layout == "hwk":
            hr = np.ascontiguousarray(np.moveaxis(hr, 0, 2))
        np.save(folder / f"im{i:03d}.npy", {"keys": keys, "cam": hr[..., ::4, ::4], "high_res": hr})
        shapes[f"im{i:03d}"] = (h, w)
    return shapes


def _gt(tmp_path, shapes):
    (tmp_path / "gt").mkdir(exist_ok=True)
    for i, (h, w) in shapes.items():
        Image.fromarray(np.zeros((h, w), np.uint8)).save(tmp_path / "gt" / f"{i}.png")
    return ingest_labels(tmp_path / "gt", tmp_path / "gt.zarr", kind="gt", quiet=True)


def _old_path(src, out, **kw):
    """What ingest_scores(score_layout='sparse') did before: a dense store, then sparsify."""
    dense = ingest_scores(src, str(out) + ".dense", score_layout="dense", quiet=True, **kw)
    return sparsify(dense, out, provenance={**dense.provenance, "score_layout": "sparse"}, name=dense.name)


def _assert_same_store(new, old):
    for m in ("cams", "keys", "ids", "shapes"):
        a, b = new.member(m), old.member(m)
        assert tuple(a.shape) == tuple(b.shape), m
        assert tuple(a.chunks) == tuple(b.chunks), m
        assert np.array_equal(np.asarray(a[...]), np.asarray(b[...])), m
    assert new.padded_shape == old.padded_shape
    skip = {"name", "identity_crc32c"}
    assert {k: v for k, v in new.attrs.items() if k not in skip} == {k: v for k, v in old.attrs.items()
                                                                     if k not in skip}
    assert np.array_equal(new.array[...], old.array[...])


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of a few images (and tasks of a few files), so the images straddle chunk boundaries."""
    from isle_fast.stores import stack

    real = stack.default_chunks

    def few(n, h, w, channels=None, itemsize=1, target_bytes=stack.TARGET_CHUNK_BYTES):
        return real(n, h, w, channels, itemsize, target_bytes=max(1, 3 * h * w * (channels or 1) * itemsize))

    monkeypatch.setattr(stack, "default_chunks", few)


# ---------------------------------------------------------------------- one file
@settings(max_examples=60)
@given(seed=st.integers(0, 2**32 - 1), style=st.integers(0, 3),
       thr=st.sampled_from([0.0, 0.15, 0.5 / 255, 1.5 / 255, 0.999, 1.0, 0.37]),
       layout=st.sampled_from(["irn", "hwk", "ownbg"]))
def test_read_cam_slots_equals_the_dense_path(tmp_path_factory, seed, style, thr, layout):
    rng = np.random.default_rng(seed)
    folder = tmp_path_factory.mktemp("f")
    shapes = _write_cams(folder / "s", rng, 3, style, layout=layout)
    for i, hw in shapes.items():
        path = str(folder / "s" / f"{i}.npy")
        for expect in (hw, None):
            kw = dict(bg_threshold=thr, expect=expect, cam_layout="puzzlecam" if layout == "ownbg" else "auto")
            try:
                ref = _dense_slots(read_scores(path, C, **kw))
            except BadInput as exc:  # e.g. a 2-slice file of a 2-pixel-wide image: both paths refuse it alike
                with pytest.raises(BadInput) as new_exc:
                    read_cam_slots(path, C, **kw)
                assert str(new_exc.value) == str(exc)
                continue
            new = read_cam_slots(path, C, **kw)
            assert new.classes == ref.classes
            assert new.data.dtype == np.uint8 and np.array_equal(new.data, ref.data)
            assert (new.bg_lo, new.bg_hi) == (ref.bg_lo, ref.bg_hi)


@pytest.mark.parametrize("bad,match", [
    (np.nan, "is nan"),
    (np.inf, "is inf"),
    (1.5, r"outside \[0, 1\]"),
    (-0.2, r"outside \[0, 1\]"),
])
def test_bad_scores_have_the_dense_paths_message(tmp_path, bad, match):
    hr = np.full((2, 4, 5), 0.5, np.float32)
    hr[1, 2, 3] = bad
    np.save(tmp_path / "a.npy", {"keys": np.array([2, 7]), "cam": hr, "high_res": hr})
    with pytest.raises(BadInput, match=match) as new:
        read_cam_slots(str(tmp_path / "a.npy"), C, expect=(4, 5))
    with pytest.raises(BadInput) as old:
        read_scores(str(tmp_path / "a.npy"), C, expect=(4, 5))
    assert str(new.value) == str(old.value)


def test_wrong_size_and_low_res_only_have_the_dense_paths_messages(tmp_path):
    hr = np.full((1, 4, 5), 0.5, np.float32)
    np.save(tmp_path / "a.npy", {"keys": np.array([2]), "cam": hr, "high_res": hr})
    with pytest.raises(BadInput, match="does not match the image size 6 x 5") as new:
        read_cam_slots(str(tmp_path / "a.npy"), C, expect=(6, 5))
    with pytest.raises(BadInput) as old:
        read_scores(str(tmp_path / "a.npy"), C, expect=(6, 5))
    assert str(new.value) == str(old.value)
    np.save(tmp_path / "b.npy", {"keys": np.array([2]), "cam": hr})
    with pytest.raises(BadInput, match="holds only a low-resolution 'cam'; its image size is unknown"):
        read_cam_slots(str(tmp_path / "b.npy"), C)


def test_normalize_and_upsample_take_the_dense_paths_functions(tmp_path, rng):
    hr = rng.random((2, 6, 7)).astype(np.float32) * 3
    np.save(tmp_path / "a.npy", {"keys": np.array([4, 1]), "cam": hr[:, ::2, ::2], "high_res": hr})
    np.save(tmp_path / "b.npy", {"keys": np.array([4, 1]), "cam": hr[:, ::2, ::2] / 3})
    for path, kw in ((tmp_path / "a.npy", dict(normalize=True, expect=(6, 7))),
                     (tmp_path / "b.npy", dict(upsample=True, expect=(6, 7)))):
        new = read_cam_slots(str(path), C, **kw)
        ref = _dense_slots(read_scores(str(path), C, **kw))
        assert new.classes == ref.classes and np.array_equal(new.data, ref.data)


# ---------------------------------------------------------------------- whole stores
@settings(max_examples=6)
@given(seed=st.integers(0, 2**32 - 1), style=st.integers(0, 3), with_gt=st.booleans())
def test_direct_sparse_store_equals_dense_then_sparsify(tmp_path_factory, small_chunks, seed, style, with_gt):
    rng = np.random.default_rng(seed)
    root = tmp_path_factory.mktemp("r")
    shapes = _write_cams(root / "s", rng, int(rng.integers(1, 12)), style)
    kw = dict(gt=_gt(root, shapes)) if with_gt else {}
    new = ingest_scores(root / "s", root / "new.zarr", quiet=True, workers=1, **kw)
    old = _old_path(root / "s", root / "old.zarr", workers=1, **kw)
    assert new.score_layout == "sparse"
    _assert_same_store(new, old)
    assert new.provenance == old.provenance


def test_worker_processes_chunk_boundaries_and_skip_bad(tmp_path, small_chunks, rng):
    shapes = _write_cams(tmp_path / "s", rng, 14, 3, max_side=11)
    # a bad file in the middle (NaN) and an unreadable one: skipped, and named as the dense path names them
    hr = np.full((1, 5, 5), np.nan, np.float32)
    np.save(tmp_path / "s" / "im005.npy", {"keys": np.array([3]), "cam": hr, "high_res": hr})
    (tmp_path / "s" / "im009.npy").write_bytes(b"\x93NUMPY garbage")
    for with_gt in (False, True):
        if with_gt:
            shapes["im005"] = (5, 5)
            kw = dict(gt=_gt(tmp_path, shapes))
        else:
            kw = {}
        tag = f"g{int(with_gt)}"
        new = ingest_scores(tmp_path / "s", tmp_path / f"new{tag}.zarr", quiet=True, workers=2, skip_bad=True, **kw)
        old = _old_path(tmp_path / "s", tmp_path / f"old{tag}.zarr", workers=2, skip_bad=True, **kw)
        _assert_same_store(new, old)
        assert new.member("cams").chunks[0] < new.num_images  # several chunks (and tasks)
        assert new.provenance == old.provenance
        assert [s["id"] for s in new.provenance["skipped"]] == [s["id"] for s in old.provenance["skipped"]]
        with pytest.raises(InputError) as exc_new:
            ingest_scores(tmp_path / "s", tmp_path / f"x{tag}.zarr", quiet=True, workers=2, **kw)
        with pytest.raises(InputError) as exc_old:
            ingest_scores(tmp_path / "s", tmp_path / f"y{tag}.zarr", quiet=True, workers=2,
                          score_layout="dense", **kw)
        assert "im005" in str(exc_new.value) and "nothing was written" in str(exc_new.value)
        if with_gt:  # without ground truth the dense path names the file with a bad header first
            assert str(exc_new.value) == str(exc_old.value)
        assert not os.path.exists(tmp_path / f"x{tag}.zarr")
        assert not [p for p in os.listdir(tmp_path) if ".slots-" in p or ".tmp-" in p]


def test_image_labels_are_stored_and_checked_as_before(tmp_path, rng):
    shapes = _write_cams(tmp_path / "s", rng, 4, 0, max_k=2)
    labels = {}
    for i in shapes:
        d = np.load(tmp_path / "s" / f"{i}.npy", allow_pickle=True).item()
        labels[i] = sorted(int(k) + 1 for k in d["keys"])
    import json

    (tmp_path / "labels.json").write_text(json.dumps(labels))
    kw = dict(image_labels=str(tmp_path / "labels.json"), quiet=True, workers=1)
    new = ingest_scores(tmp_path / "s", tmp_path / "new.zarr", **kw)
    old = _old_path(tmp_path / "s", tmp_path / "old.zarr", image_labels=str(tmp_path / "labels.json"), workers=1)
    _assert_same_store(new, old)
    assert np.array_equal(new.image_labels, old.image_labels)
    assert new.provenance == old.provenance


def test_own_background_falls_back_to_the_dense_path(tmp_path, rng):
    """PSA's CRF output holds its own background slice: auto writes the dense store, sparse refuses."""
    (tmp_path / "s").mkdir()
    for i in range(3):
        p = rng.random((3, 4, 5)).astype(np.float32)
        p /= p.sum(axis=0)
        np.save(tmp_path / "s" / f"im{i}.npy", {0: p[0], 3: p[1], 7: p[2]})
        new = read_cam_slots(str(tmp_path / "s" / f"im{i}.npy"), C, expect=(4, 5))
        ref = _dense_slots(read_scores(str(tmp_path / "s" / f"im{i}.npy"), C, expect=(4, 5)))
        assert new.classes == ref.classes and np.array_equal(new.data, ref.data)
        assert (new.bg_lo, new.bg_hi) == (ref.bg_lo, ref.bg_hi) and new.bg_lo < new.bg_hi
    from isle_fast.stores.parallel import ProcessPool, use_pool

    with ProcessPool(2) as pool, use_pool(pool.start()):  # isle run's shared pool survives the fallback
        auto = ingest_scores(tmp_path / "s", tmp_path / "a.zarr", quiet=True)
        assert list(pool.imap(abs, [(-1,), (-2,)])) in ([(0, 1), (1, 2)], [(1, 2), (0, 1)])
    assert auto.score_layout == "dense"
    dense = ingest_scores(tmp_path / "s", tmp_path / "d.zarr", quiet=True, workers=1, score_layout="dense")
    assert np.array_equal(auto.array[...], dense.array[...])
    with pytest.raises(InputError, match="cannot be stored class-sparse"):
        ingest_scores(tmp_path / "s", tmp_path / "s.zarr", quiet=True, workers=1, score_layout="sparse")
    assert not os.path.exists(tmp_path / "s.zarr")


def test_missing_files_and_ids_outside_the_gt_as_before(tmp_path, rng):
    """A listed id without a file, and a file whose id the ground truth lacks: the dense path's errors."""
    shapes = _write_cams(tmp_path / "s", rng, 5, 0)
    gt = _gt(tmp_path, {**{k: v for k, v in shapes.items() if k != "im004"}, "extra": (3, 3)})
    ids = sorted(shapes)[:4] + ["nope"]
    for t, kw in enumerate((dict(ids=ids), dict(gt=gt), dict(gt=gt, ids=sorted(shapes)))):
        with pytest.raises(InputError) as new:
            ingest_scores(tmp_path / "s", tmp_path / "x.zarr", quiet=True, workers=1, **kw)
        with pytest.raises(InputError) as old:
            ingest_scores(tmp_path / "s", tmp_path / "y.zarr", quiet=True, workers=1, score_layout="dense", **kw)
        assert str(new.value) == str(old.value)
        a = ingest_scores(tmp_path / "s", tmp_path / f"a{t}.zarr", quiet=True, workers=1, skip_bad=True, **kw)
        b = _old_path(tmp_path / "s", tmp_path / f"b{t}.zarr", workers=1, skip_bad=True, **kw)
        _assert_same_store(a, b)
        assert a.provenance == b.provenance and a.provenance["skipped"]


@pytest.mark.parametrize("value", [np.float32(-1e-3), np.float32(1 + 1e-3), np.nextafter(np.float32(-1e-3), 0),
                                   np.nextafter(np.float32(1 + 1e-3), 2), -1e-3, 1.001, 1e-45])
def test_the_range_check_at_its_edges_is_the_dense_paths(tmp_path, value):
    """The tolerance is compared in float64, as the dense path compares ``float(arr.min())``."""
    hr = np.full((2, 3, 4), 0.25, np.float32)
    hr[1, 1, 2] = value
    np.save(tmp_path / "a.npy", {"keys": np.array([5, 9]), "cam": hr, "high_res": hr})
    try:
        ref = _dense_slots(read_scores(str(tmp_path / "a.npy"), C, expect=(3, 4)))
    except BadInput as exc:
        with pytest.raises(BadInput) as new:
            read_cam_slots(str(tmp_path / "a.npy"), C, expect=(3, 4))
        assert str(new.value) == str(exc)
    else:
        new = read_cam_slots(str(tmp_path / "a.npy"), C, expect=(3, 4))
        assert new.classes == ref.classes and np.array_equal(new.data, ref.data)
