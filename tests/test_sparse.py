"""Class-sparse score stores (isle_fast.stores.sparse): the dense view EQUALS the dense store; the sparse
sweep kernel EQUALS the dense one; damaged keys or layout attributes are errors."""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from isle_fast.cli import main
from isle_fast.ensemble.evaluate import evaluate
from isle_fast.ensemble.merge import ensemble_scores
from isle_fast.ensemble.sweep import sweep_thresholds
from isle_fast.errors import InputError, StoreError
from isle_fast.kernels import cpu
from isle_fast.stores.sparse import sparsify
from isle_fast.stores.stack import open_stack
from tests import reference as ref
from tests.conftest import write_stack

seeds = st.integers(0, 2**32 - 1)


def _keys(rng, n, C, K):
    keys = np.zeros((n, K), np.uint8)
    for m in range(n):
        k = int(rng.integers(0, min(K, C - 1) + 1))
        keys[m, :k] = np.sort(rng.choice(np.arange(1, C), k, replace=False))
    return keys


@given(seeds)
def test_sparse_bins_equal_dense_bins(seed):
    rng = np.random.default_rng(seed)
    C = int(rng.choice([2, 3, 5, 21]))
    n, h, w = (int(rng.choice([1, 2, 3, 7])) for _ in range(3))
    gt = rng.integers(0, C, (n, h, w)).astype(np.uint8)
    gt[rng.random(gt.shape) < 0.2] = 255
    cams, keys, dense = [], [], []
    for _ in range(int(rng.integers(1, 4))):
        K = int(rng.integers(1, 4))
        kk = _keys(rng, n, C, K)
        vals = np.array([0, 0, 1, 37, 38, 200, 255], np.uint8) if rng.random() < 0.5 else np.arange(256)
        a = rng.choice(vals, (n, h, w, K)).astype(np.uint8)
        a[..., :][np.broadcast_to((kk == 0)[:, None, None, :], a.shape)] = 0  # unused slots hold 0
        cams.append(a)
        keys.append(kk)
        dense.append(ref.densify_sparse(a, kk, C, background=int(rng.integers(0, 256))))
    got = cpu.confusion_score_bins_sparse(gt, tuple(cams), tuple(keys), C)
    np.testing.assert_array_equal(got, ref.confusion_score_bins(gt, tuple(dense), C))


def test_sparse_kernel_argument_checks():
    gt = np.zeros((1, 2, 2), np.uint8)
    with pytest.raises(ValueError, match="keys of shape"):
        cpu.confusion_score_bins_sparse(
            gt, (np.zeros((1, 2, 2, 2), np.uint8),), (np.zeros((1, 3), np.uint8),), 3
        )
    with pytest.raises(ValueError, match="a key >= 3"):
        cpu.confusion_score_bins_sparse(
            gt, (np.zeros((1, 2, 2, 1), np.uint8),), (np.full((1, 1), 3, np.uint8),), 3
        )


def _cam_images(rng, shapes, C, background=38):
    imgs = []
    for h, w in shapes:
        a = np.zeros((h, w, C), np.uint8)
        a[..., 0] = background
        for c in rng.choice(np.arange(1, C), int(rng.integers(0, min(3, C - 1) + 1)), replace=False):
            a[..., c] = rng.choice(np.array([0, 37, 38, 39, 51, 52, 255], np.uint8), (h, w))
        imgs.append(a)
    return imgs


@st.composite
def store_cases(draw):
    n = draw(st.integers(1, 5))
    C = draw(st.integers(2, 6))
    shapes = [(draw(st.integers(1, 9)), draw(st.integers(1, 9))) for _ in range(n)]
    pad = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    chunks = (draw(st.integers(1, 3)), draw(st.integers(1, 9)), draw(st.integers(1, 9)))
    return n, C, shapes, pad, chunks, draw(st.integers(0, 2**31))


def _build(root, n, C, shapes, pad, chunks, seed, n_sets=2):
    rng = np.random.default_rng(seed)
    padded = (max(h for h, _ in shapes) + pad[0], max(w for _, w in shapes) + pad[1])
    gt_imgs = [rng.choice(np.array(list(range(C)) + [255], np.uint8), size=s) for s in shapes]
    gt = write_stack(
        os.path.join(root, "gt"), gt_imgs, kind="gt", num_classes=C, chunks=chunks, padded_shape=padded
    )
    dense, sparse = [], []
    for k in range(n_sets):
        d = write_stack(
            os.path.join(root, f"d{k}"),
            _cam_images(rng, shapes, C),
            encoding="scores",
            num_classes=C,
            chunks=chunks + (C,),
            padded_shape=padded,
            name=f"set{k}",
        )
        dense.append(d)
        sparse.append(sparsify(d, os.path.join(root, f"s{k}.zarr")))
    return gt, dense, sparse


@settings(max_examples=10)
@given(store_cases())
def test_dense_view_equals_the_dense_store(case):
    with tempfile.TemporaryDirectory() as root:
        _, dense, sparse = _build(root, *case, n_sets=1)
        d, s = dense[0], open_stack(sparse[0].path)
        assert s.score_layout == "sparse" and d.score_layout == "dense"
        assert s.shape == d.shape and s.dtype == d.dtype and s.num_classes == d.num_classes
        np.testing.assert_array_equal(s.array[:], np.asarray(d.array[:]))
        np.testing.assert_array_equal(np.asarray(s.to_dask()), np.asarray(d.to_dask()))
        np.testing.assert_array_equal(s.array[-1, 1:, ::2, 1:], np.asarray(d.array[-1, 1:, ::2, 1:]))
        for i in range(s.num_images):
            np.testing.assert_array_equal(s.read_image(i), d.read_image(i))
        # grows with the classes present, not with C
        assert s.sparse_keys.shape[1] == max(
            1,
            int(
                max(
                    (d.read_image(i)[..., 1:].reshape(-1, d.num_classes - 1).any(axis=0).sum())
                    for i in range(d.num_images)
                )
            ),
        )


@settings(max_examples=10)
@given(store_cases(), st.sampled_from(["dataset", "image"]))
def test_sparse_sweep_equals_dense_sweep_and_evaluate(case, average):
    ts = (0.0, 0.15, 37 / 255, 38 / 255, 0.2, 0.5, 1.0)
    with tempfile.TemporaryDirectory() as root:
        gt, dense, sparse = _build(root, *case)
        a = sweep_thresholds(sparse, gt, ts, average=average, backend="cpu", progress=False)
        b = sweep_thresholds(dense, gt, ts, average=average, backend="cpu", progress=False)
        np.testing.assert_array_equal(a.counts, b.counts)
        assert a.levels == b.levels
        mixed = sweep_thresholds(
            [sparse[0], dense[1]], gt, ts, average=average, backend="cpu", progress=False
        )
        np.testing.assert_array_equal(mixed.counts, b.counts)
        for k, t in enumerate(a.thresholds):
            ev = evaluate(sparse, gt, bg_threshold=t, average=average, backend="cpu", progress=False)
            np.testing.assert_array_equal(a.counts[:, k], ev.counts)
        ev = evaluate(sparse, gt, backend="cpu", progress=False)  # the stored background slice
        np.testing.assert_array_equal(ev.counts, evaluate(dense, gt, backend="cpu", progress=False).counts)


def test_merge_and_best_on_sparse_stores_equal_dense(tmp_path):
    from isle_fast.ensemble.merge import merge

    gt, dense, sparse = _build(str(tmp_path), 4, 4, [(6, 5), (4, 4), (7, 3), (2, 2)], (1, 1), (2, 4, 4), 3)
    for bg in (None, "best"):
        a = merge(sparse, gt, str(tmp_path / f"a{bg}.zarr"), bg_threshold=bg, backend="cpu", progress=False)
        b = merge(dense, gt, str(tmp_path / f"b{bg}.zarr"), bg_threshold=bg, backend="cpu", progress=False)
        np.testing.assert_array_equal(np.asarray(a.stack.array[:]), np.asarray(b.stack.array[:]))


def test_background_must_be_constant(tmp_path):
    rng = np.random.default_rng(0)
    imgs = _cam_images(rng, [(3, 3), (2, 4)], 4)
    imgs[1][1, 1, 0] = 9
    d = write_stack(str(tmp_path / "d"), imgs, encoding="scores", num_classes=4, ids=["a", "b"])
    with pytest.raises(InputError, match="image 'b' has a background slice that is not the constant 38"):
        sparsify(d, str(tmp_path / "s.zarr"))
    assert not (tmp_path / "s.zarr").exists()


def _sparse_store(tmp_path):
    rng = np.random.default_rng(1)
    d = write_stack(
        str(tmp_path / "d"), _cam_images(rng, [(3, 3), (2, 4), (4, 4)], 5), encoding="scores", num_classes=5
    )
    return sparsify(d, str(tmp_path / "s.zarr"))


def test_damaged_keys_chunk_is_an_error(tmp_path):
    s = _sparse_store(tmp_path)
    chunk = next(
        p for p in (tmp_path / "s.zarr" / "keys").rglob("*") if p.is_file() and p.name != "zarr.json"
    )
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match="keys"):
        open_stack(s.path)
    chunk.unlink()
    with pytest.raises(StoreError, match="keys"):
        open_stack(s.path)


@pytest.mark.parametrize("attr, value", [("score_layout", "dense"), ("background_level", 12)])
def test_layout_attributes_are_in_the_identity_checksum(tmp_path, attr, value):
    s = _sparse_store(tmp_path)
    meta = tmp_path / "s.zarr" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"][attr] = value
    meta.write_text(json.dumps(doc))
    with pytest.raises(StoreError, match="checksum"):
        open_stack(s.path)


def test_keys_out_of_order_are_an_error(tmp_path):
    from isle_fast.stores.sparse import check_keys

    with pytest.raises(StoreError, match="image 1"):
        check_keys("x", np.array([[1, 2], [3, 1]], np.uint8), 5)
    with pytest.raises(StoreError, match="image 0"):
        check_keys("x", np.array([[0, 2]], np.uint8), 5)
    with pytest.raises(StoreError, match="image 0"):
        check_keys("x", np.array([[5, 0]], np.uint8), 5)
    check_keys("x", np.array([[1, 4], [2, 0], [0, 0]], np.uint8), 5)


def test_info_shows_the_layout(tmp_path, capsys):
    s = _sparse_store(tmp_path)
    assert main(["info", s.path, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["score_layout"] == "sparse" and doc["classes_per_image"]["max"] == s.sparse_keys.shape[1]


# -- ingest: class-sparse is the default for CAM files ------------------------------------------

def _irn_folder(tmp_path, rng):
    from PIL import Image

    from isle_fast.stores.ingest import ingest_labels

    shapes = {"a": (9, 7), "b": (5, 12), "c": (8, 8)}
    (tmp_path / "gt").mkdir()
    (tmp_path / "cams").mkdir()
    for i, (h, w) in shapes.items():
        Image.fromarray(rng.integers(0, 3, (h, w)).astype(np.uint8)).save(tmp_path / "gt" / f"{i}.png")
        keys = np.sort(rng.choice(20, int(rng.integers(1, 4)), replace=False))
        hr = rng.random((keys.size, h, w)).astype(np.float32)
        np.save(tmp_path / "cams" / f"{i}.npy", {"keys": keys, "cam": hr[:, ::4, ::4], "high_res": hr})
    classes = [f"k{c}" for c in range(21)]
    gt = ingest_labels(tmp_path / "gt", tmp_path / "gt.zarr", kind="gt", classes=classes, quiet=True)
    return gt, classes


def test_cam_ingest_is_class_sparse_by_default(tmp_path, rng, capsys):
    from isle_fast.stores.ingest import ingest_scores

    gt, classes = _irn_folder(tmp_path, rng)
    s = ingest_scores(tmp_path / "cams", tmp_path / "s.zarr", gt=gt, classes=classes, quiet=True)
    d = ingest_scores(tmp_path / "cams", tmp_path / "d.zarr", gt=gt, classes=classes, quiet=True,
                      score_layout="dense")
    assert s.score_layout == "sparse" and d.score_layout == "dense"
    assert s.provenance["score_layout"] == "sparse"
    assert (s.name, d.name) == ("s", "d")       # the store's name, not its temporary's
    np.testing.assert_array_equal(s.array[:], np.asarray(d.array[:]))
    # K = the most classes any image has (here 1-3 of 21)
    assert s.sparse_keys.shape[1] == int((s.sparse_keys > 0).sum(axis=1).max()) <= 3
    assert s.cams_meta.shape == d.shape[:3] + (s.sparse_keys.shape[1],)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cams", "d.zarr", "gt", "gt.zarr", "s.zarr"]  # no temp
    # float scores and --score-layout dense stay dense; sparse float is refused
    f = ingest_scores(tmp_path / "cams", tmp_path / "f.zarr", gt=gt, classes=classes, quiet=True,
                      score_dtype="float16")
    assert f.score_layout == "dense"
    with pytest.raises(InputError, match="uint8"):
        ingest_scores(tmp_path / "cams", tmp_path / "g.zarr", gt=gt, classes=classes, quiet=True,
                      score_dtype="float16", score_layout="sparse")
    # the command line, and isle info shows the layout
    assert main(["ingest", "scores", str(tmp_path / "cams"), "--gt", gt.path,
                 "--out", str(tmp_path / "cli.zarr")]) == 0
    assert "class-sparse" in capsys.readouterr().out
    assert main(["info", str(tmp_path / "cli.zarr")]) == 0
    assert "sparse" in capsys.readouterr().out


def test_crf_refine_reads_a_sparse_store_like_the_dense_one(tmp_path):
    pytest.importorskip("pydensecrf")
    from isle_fast.refinement.chain import refine_stack

    rng = np.random.default_rng(4)
    shapes = [(12, 10), (9, 14), (11, 11)]
    d = write_stack(str(tmp_path / "d"), _cam_images(rng, shapes, 5), encoding="scores", num_classes=5)
    s = sparsify(d, str(tmp_path / "s.zarr"))
    img = write_stack(str(tmp_path / "img"), [rng.integers(0, 256, sh + (3,)).astype(np.uint8) for sh in shapes],
                      kind="images", encoding="rgb", num_classes=5)
    a = refine_stack(s, img, tmp_path / "a.zarr", "crf", workers=1, progress=False)
    b = refine_stack(d, img, tmp_path / "b.zarr", "crf", workers=1, progress=False)
    np.testing.assert_array_equal(np.asarray(a.array[:]), np.asarray(b.array[:]))


def test_files_with_their_own_background_stay_dense(tmp_path, rng):
    from isle_fast.stores.ingest import ingest_scores

    gt, classes = _irn_folder(tmp_path, rng)
    (tmp_path / "probs").mkdir()
    for i, (h, w) in zip(gt.ids, gt.shapes):
        p = rng.random((21, int(h), int(w))).astype(np.float32)
        np.save(tmp_path / "probs" / f"{i}.npy", p / p.sum(axis=0))
    s = ingest_scores(tmp_path / "probs", tmp_path / "p.zarr", gt=gt, classes=classes, quiet=True)
    assert s.score_layout == "dense" and s.name == "p"
    with pytest.raises(InputError, match="not the constant"):
        ingest_scores(tmp_path / "probs", tmp_path / "q.zarr", gt=gt, classes=classes, quiet=True,
                      score_layout="sparse")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cams", "gt", "gt.zarr", "p.zarr", "probs"]


def test_missing_cams_chunk_is_an_error_on_the_sweep_and_the_dense_view(tmp_path):
    gt, _, sparse = _build(str(tmp_path), 3, 4, [(6, 5), (4, 4), (7, 3)], (0, 0), (1, 7, 5), 0, n_sets=1)
    chunk = sorted(p for p in (tmp_path / "s0.zarr" / "cams").rglob("*") if p.is_file() and p.name != "zarr.json")[0]
    chunk.unlink()
    s = open_stack(sparse[0].path)
    with pytest.raises(StoreError, match="array 'cams', chunk .* is missing"):
        sweep_thresholds([s], gt, "0.1,0.2", progress=False)
    with pytest.raises(StoreError, match="array 'cams', chunk .* is missing"):
        s.read_image(0)
    assert main(["info", s.path, "--check"]) == 2


def test_sweep_of_sparse_stores_aligned_with_the_gt_runs_without_dask(tmp_path):
    """A gt with the default chunks and sparse stores (whose cams take the label stores' default chunks)
    go through the direct thread pass, with the same counts as evaluate()."""
    from isle_fast.ensemble.sweep import _local_specs, _plans

    rng = np.random.default_rng(9)
    shapes = [(6, 5), (4, 4), (7, 3), (5, 5)]
    gt = write_stack(str(tmp_path / "gt"), [rng.choice(np.array([0, 1, 2, 3, 255], np.uint8), size=s)
                                             for s in shapes], kind="gt", num_classes=4)
    sparse = [sparsify(write_stack(str(tmp_path / f"d{k}"), _cam_images(rng, shapes, 4), encoding="scores",
                                   num_classes=4), str(tmp_path / f"s{k}.zarr")) for k in range(2)]
    ts = (0.1, 0.15, 0.2, 0.5)
    assert _local_specs(sparse, gt, _plans(sparse, ts)) is not None
    sw = sweep_thresholds(sparse, gt, ts, average="image", backend="cpu", progress=False)
    for k, t in enumerate(sw.thresholds):
        ev = evaluate(sparse, gt, bg_threshold=t, average="image", backend="cpu", progress=False)
        np.testing.assert_array_equal(sw.counts[:, k], ev.counts)
        np.testing.assert_array_equal(sw.image_stats[:, :, k], ev.image_stats)


def test_evaluate_at_reads_sparse_sets_directly_with_the_same_counts(tmp_path, monkeypatch):
    import isle_fast.stores.sparse as sparse_mod
    from isle_fast.ensemble.sweep import evaluate_at

    gt, dense, sparse = _build(str(tmp_path), 3, 4, [(6, 5), (4, 4), (7, 3)], (1, 0), (2, 4, 4), 8)
    for t in (None, 0.0, 0.15, 0.2, 1.0):
        want = evaluate(sparse, gt, bg_threshold=t, backend="cpu", progress=False)
        got = evaluate_at(sparse + [dense[0]], gt, t, backend="cpu", progress=False)
        np.testing.assert_array_equal(got.counts[:2], want.counts)
        assert got.set_names[:2] == want.set_names
    stored = {av: evaluate(dense, gt, average=av, backend="cpu", progress=False) for av in ("dataset", "image")}
    # with a threshold, or without one when every score set is class-sparse, the dense view is not made
    monkeypatch.setattr(sparse_mod, "densify", lambda *a, **k: (_ for _ in ()).throw(AssertionError("dense")))
    evaluate_at(sparse, gt, 0.2, backend="cpu", progress=False)
    for av, want in stored.items():  # no threshold: foreground above each store's background level
        got = evaluate_at(sparse, gt, None, average=av, backend="cpu", progress=False)
        np.testing.assert_array_equal(got.counts, want.counts)
        np.testing.assert_array_almost_equal(got.miou, want.miou)


# -- the class-sparse kernels: decode + (gt, argmax, bin) in one sweep, the merge of N sets ------------


def _ref_inside(gt_shape, shapes):
    n, h, w = gt_shape
    return (np.arange(h)[None, :, None] < shapes[:, 0, None, None]) & (
        np.arange(w)[None, None, :] < shapes[:, 1, None, None]
    )


def _ref_sparse_bins(gt, cams, keys, C, lut, shapes):
    """Plain NumPy: the dense stack, the first of the largest foreground slices, counted inside and gt < C."""
    B = int(lut.max()) + 1
    out = np.zeros((len(cams), C, C, B), np.int64)
    keep = _ref_inside(gt.shape, shapes) & (gt < C)
    for s, (c, k) in enumerate(zip(cams, keys)):
        d = ref.densify_sparse(c, k, C).astype(np.int64)
        if C > 1:
            a, m = 1 + np.argmax(d[..., 1:], axis=-1), np.max(d[..., 1:], axis=-1)
        else:
            a = m = np.zeros(gt.shape, np.int64)
        np.add.at(out[s], (gt[keep].astype(np.int64), a[keep], lut[s][m[keep]].astype(np.int64)), 1)
    return out


def _ref_sparse_merge(cams, keys, levels, sel, pri, pol, shapes, C):
    """Plain NumPy: every set decoded at its level (the dense decode), merged by the reference merge."""
    labs = [ref.decode_scores(ref.densify_sparse(c, k, C), float(v)) for c, k, v in zip(cams, keys, levels)]
    out = ref.merge_labels(labs, sel, pri, pol).astype(np.uint8)
    out[~_ref_inside(out.shape, shapes)] = 255
    return out


def _sparse_case(rng, C, n_sets):
    n, h, w = (int(rng.choice([1, 2, 3, 5, 7])) for _ in range(3))
    gt = rng.integers(0, C, (n, h, w)).astype(np.uint8)
    gt[rng.random(gt.shape) < 0.2] = 255
    cams, keys = [], []
    for _ in range(n_sets):
        K = int(rng.integers(1, 6))
        kk = _keys(rng, n, C, K)  # some images have 0 present classes
        vals = np.array([0, 0, 1, 37, 38, 200, 255], np.uint8) if rng.random() < 0.5 else np.arange(256)
        a = rng.choice(vals, (n, h, w, K)).astype(np.uint8)
        if rng.random() < 0.7:  # unused slots hold 0 as written, else anything: never read
            a[np.broadcast_to((kk == 0)[:, None, None, :], a.shape)] = 0
        cams.append(a)
        keys.append(kk)
    # each image's true rows / columns in the block (the rest is padding, never read)
    shapes = np.stack([rng.integers(0, h + 1, n), rng.integers(0, w + 1, n)], axis=1).astype(np.int64)
    if rng.random() < 0.3:
        shapes[:] = (h, w)
    return gt, cams, keys, shapes


@settings(max_examples=60)
@given(seeds)
def test_sparse_score_bins_equal_the_numpy_reference(seed):
    from isle_fast.ensemble.sweep import counts_at_bins, level_bins

    rng = np.random.default_rng(seed)
    C = int(rng.choice([1, 2, 3, 5, 21]))
    N = int(rng.integers(1, 5))
    gt, cams, keys, shapes = _sparse_case(rng, C, N)
    levels = [np.sort(rng.choice(np.array([0, 1, 36, 37, 38, 199, 200, 254, 255]), int(rng.integers(1, 6))))
              for _ in range(N)]
    tabs = [level_bins(lv) for lv in levels]
    lut = np.stack([t for t, _ in tabs]) if rng.random() < 0.7 else np.tile(np.arange(256), (N, 1))
    got = cpu.sparse_score_bins(gt, tuple(cams), tuple(keys), C, lut, shapes)
    np.testing.assert_array_equal(got, _ref_sparse_bins(gt, cams, keys, C, lut, shapes))
    if lut.max() == 255:  # the identity: the 256-level bins of the dense kernel, on the whole block
        whole = cpu.sparse_score_bins(gt, tuple(cams), tuple(keys), C, lut)
        np.testing.assert_array_equal(whole, cpu.confusion_score_bins_sparse(gt, tuple(cams), tuple(keys), C))
    # chunk boundaries: images split, rows split; the counts add up
    cut = int(rng.integers(0, gt.shape[0] + 1))
    parts = [cpu.sparse_score_bins(gt[a:b], tuple(c[a:b] for c in cams), tuple(k[a:b] for k in keys), C, lut,
                                   shapes[a:b]) for a, b in ((0, cut), (cut, gt.shape[0]))]
    np.testing.assert_array_equal(parts[0] + parts[1], got)
    r = int(rng.integers(0, gt.shape[1] + 1))
    top = np.stack([np.minimum(shapes[:, 0], r), shapes[:, 1]], axis=1)
    low = np.stack([np.maximum(shapes[:, 0] - r, 0), shapes[:, 1]], axis=1)
    parts = [cpu.sparse_score_bins(gt[:, :r], tuple(c[:, :r] for c in cams), tuple(keys), C, lut, top),
             cpu.sparse_score_bins(gt[:, r:], tuple(c[:, r:] for c in cams), tuple(keys), C, lut, low)]
    np.testing.assert_array_equal(parts[0] + parts[1], got)
    # every threshold of the sweep from its bins = one decode per threshold (the public scripts' way)
    sweep_lut = np.stack([t for t, _ in tabs])
    bins = cpu.sparse_score_bins(gt, tuple(cams), tuple(keys), C, sweep_lut, shapes)
    masked = np.where(_ref_inside(gt.shape, shapes), gt, np.uint8(255))
    for s in range(N):
        want = ref.confusion_score_sweep(masked, (ref.densify_sparse(cams[s], keys[s], C),), C, levels[s])[0]
        np.testing.assert_array_equal(counts_at_bins(bins[s], tabs[s][1]), want)


@settings(max_examples=60)
@given(seeds, st.sampled_from([0, 1, 2]))
def test_merge_sparse_labels_equals_the_numpy_reference(seed, policy):
    rng = np.random.default_rng(seed)
    C = int(rng.choice([2, 3, 5, 21]))
    N = int(rng.integers(1, 5))
    _, cams, keys, shapes = _sparse_case(rng, C, N)
    levels = rng.choice(np.array([0, 1, 37, 38, 200, 254, 255]), N)
    sel = rng.integers(0, N, C)
    pri = rng.choice(np.array([0.1, 0.5, 0.5, 0.9]), (N, C))
    got = cpu.merge_sparse_labels(tuple(cams), tuple(keys), levels, sel, pri, policy, shapes)
    np.testing.assert_array_equal(got, _ref_sparse_merge(cams, keys, levels, sel, pri, policy, shapes, C))
    whole = np.full(shapes.shape, 0) + np.array(cams[0].shape[1:3])
    np.testing.assert_array_equal(cpu.merge_sparse_labels(tuple(cams), tuple(keys), levels, sel, pri, policy),
                                  _ref_sparse_merge(cams, keys, levels, sel, pri, policy, whole, C))


def _wide_case(rng, C, N):
    """Rows wide enough for the vectorised decode loops (their main body and remainder), every slot
    count K = 1..8 (the literal strides 1..6 and the run-time one), all used-slot counts 0..K, gt values
    >= C (not only 255), padding, 1..7 sets (the 4 / 2 / 1 groups of the count)."""
    n, h = int(rng.integers(1, 4)), int(rng.integers(1, 4))
    w = int(rng.choice([33, 64, 97, 130, 257]))
    gt = rng.integers(0, C, (n, h, w)).astype(np.uint8)
    gt[rng.random(gt.shape) < 0.1] = 255
    gt[rng.random(gt.shape) < 0.05] = rng.integers(C, 256)
    if rng.random() < 0.3:  # long runs of one gt class and one score: repeated bins
        gt[:] = rng.integers(0, C)
    cams, keys = [], []
    for _ in range(N):
        K = int(rng.integers(1, 9))
        kk = _keys(rng, n, C, K)
        a = rng.integers(0, 256, (n, h, w, K)).astype(np.uint8)
        if rng.random() < 0.3:
            a[:] = rng.choice(np.array([0, 37, 38, 255], np.uint8), (n, 1, 1, K))
        elif rng.random() < 0.3:
            a = rng.choice(np.array([0, 0, 1, 37, 38, 255], np.uint8), a.shape)  # ties, all-zero pixels
        if rng.random() < 0.5:
            a[np.broadcast_to((kk == 0)[:, None, None, :], a.shape)] = 0
        cams.append(a)
        keys.append(kk)
    shapes = np.stack([rng.integers(0, h + 1, n), rng.integers(0, w + 1, n)], axis=1).astype(np.int64)
    if rng.random() < 0.4:
        shapes[:] = (h, w)
    return gt, cams, keys, shapes


@settings(max_examples=40, deadline=None)
@given(seeds)
def test_sparse_kernels_on_wide_rows_equal_the_numpy_reference(seed):
    from isle_fast.ensemble.sweep import level_bins

    rng = np.random.default_rng(seed)
    C = int(rng.choice([1, 2, 7, 21]))
    N = int(rng.integers(1, 8))
    gt, cams, keys, shapes = _wide_case(rng, C, N)
    pick = rng.random()
    if pick < 0.3:
        lut = np.tile(np.arange(256), (N, 1))  # 256 bins
    elif pick < 0.4:
        lut = np.zeros((N, 256), np.int64)  # one bin
    else:
        lut = np.stack([level_bins(np.sort(rng.choice(256, int(rng.integers(1, 20)), replace=False)))[0]
                        for _ in range(N)])
    got = cpu.sparse_score_bins(gt, tuple(cams), tuple(keys), C, lut, shapes)
    np.testing.assert_array_equal(got, _ref_sparse_bins(gt, cams, keys, C, lut, shapes))
    if C > 1:
        levels = rng.integers(0, 256, N)
        sel = rng.integers(0, N, C)
        pri = rng.random((N, C))
        for policy in (0, 1, 2):
            np.testing.assert_array_equal(
                cpu.merge_sparse_labels(tuple(cams), tuple(keys), levels, sel, pri, policy, shapes),
                _ref_sparse_merge(cams, keys, levels, sel, pri, policy, shapes, C),
            )


def test_sparse_kernels_refuse_bad_arguments():
    gt = np.zeros((1, 2, 2), np.uint8)
    cams, keys = (np.zeros((1, 2, 2, 2), np.uint8),), (np.zeros((1, 2), np.uint8),)
    lut = np.zeros((1, 256), np.uint8)
    with pytest.raises(ValueError, match="keys of shape"):
        cpu.sparse_score_bins(gt, cams, (np.zeros((1, 3), np.uint8),), 3, lut)
    with pytest.raises(ValueError, match="level_bins must be"):
        cpu.sparse_score_bins(gt, cams, keys, 3, np.zeros((2, 256), np.uint8))
    with pytest.raises(ValueError, match="non-decreasing"):
        cpu.sparse_score_bins(gt, cams, keys, 3, np.tile(np.arange(256)[::-1], (1, 1)).astype(np.uint8))
    with pytest.raises(ValueError, match="shapes must be"):
        cpu.sparse_score_bins(gt, cams, keys, 3, lut, np.zeros((2, 2), np.int64))
    with pytest.raises(ValueError, match="levels must be"):
        cpu.merge_sparse_labels(cams, keys, [300], np.zeros(3, np.int64), np.ones((1, 3)), 0)
    with pytest.raises(ValueError, match="a key >= 3"):
        cpu.merge_sparse_labels(cams, (np.full((1, 2), 3, np.uint8),), [0], np.zeros(3, np.int64), np.ones((1, 3)), 0)
    np.testing.assert_array_equal(gt, 0)  # inputs are never modified


@settings(max_examples=5)
@given(store_cases(), st.sampled_from(["dataset", "image"]))
def test_sweep_with_a_gt_of_some_images_equals_evaluate(case, average):
    """A gt labelling a shuffled subset of the sets' ids: the sweep (sparse, dense, mixed) equals the
    one-decode-per-threshold reference on those images and ``evaluate`` at each threshold (which
    aligns by id)."""
    from isle_fast.ensemble.sweep import evaluate_at

    n, C, shapes, pad, chunks, seed = case
    ts = (0.0, 38 / 255, 0.5)
    with tempfile.TemporaryDirectory() as root:
        full, dense, sparse = _build(root, *case)
        rng = np.random.default_rng(seed)
        sub = [int(v) for v in rng.permutation(n)[: int(rng.integers(1, n + 1))]]
        gt_imgs = [full.read_image(i) for i in sub]
        gt = write_stack(os.path.join(root, "gt-part"), gt_imgs, kind="gt", num_classes=C,
                         ids=[full.ids[i] for i in sub], chunks=(1, 4, 4),
                         padded_shape=full.padded_shape if sub == list(range(n)) else None)
        sw = {name: sweep_thresholds(sets, gt, ts, average=average, backend="cpu", progress=False)
              for name, sets in (("sparse", sparse), ("dense", dense), ("mixed", [sparse[0], dense[1]]))}
        np.testing.assert_array_equal(sw["sparse"].counts, sw["dense"].counts)
        np.testing.assert_array_equal(sw["mixed"].counts, sw["dense"].counts)
        g = np.concatenate([a.reshape(-1) for a in gt_imgs])
        for s, d in enumerate(dense):
            x = np.concatenate([d.read_image(i).reshape(-1, C) for i in sub])
            want = ref.confusion_score_sweep(g, (x,), C, [t * 255 for t in ts])[0]
            np.testing.assert_array_equal(sw["dense"].counts[s], want)
        for k, t in enumerate(ts):
            ev = evaluate(sparse, gt, bg_threshold=t, average=average, backend="cpu", progress=False)
            np.testing.assert_array_equal(sw["sparse"].counts[:, k], ev.counts)
            if average == "image":
                np.testing.assert_array_equal(sw["sparse"].image_stats[:, :, k], ev.image_stats)
        # a sparse set's one-threshold evaluation goes through the sweep, aligned by id too
        np.testing.assert_array_equal(evaluate_at(sparse, gt, ts[1], backend="cpu", progress=False).counts,
                                      sw["sparse"].counts[:, 1])


def _aligned_sparse(root, rng, shapes, C, n_sets):
    """A gt with the default chunks and class-sparse sets (their ``cams`` take the label stores' default
    chunks): chunked alike, so the merge takes its direct pass."""
    gt = write_stack(os.path.join(root, "gt"), [rng.choice(np.array(list(range(C)) + [255], np.uint8), size=s)
                                                for s in shapes], kind="gt", num_classes=C)
    dense = [write_stack(os.path.join(root, f"d{k}"), _cam_images(rng, shapes, C), encoding="scores",
                         num_classes=C, name=f"set{k}") for k in range(n_sets)]
    sparse = [sparsify(d, os.path.join(root, f"s{k}.zarr")) for k, d in enumerate(dense)]
    return gt, dense, sparse


@pytest.mark.parametrize("policy, strategy, labels", [("score", "class", False), ("order", "class", True),
                                                      ("ignore", "class", False), ("score", "image", False)])
def test_merge_at_each_sets_threshold_reads_sparse_slots_and_equals_dense(tmp_path, monkeypatch, policy,
                                                                         strategy, labels):
    """The merge at per-set thresholds of class-sparse sets runs the direct pass on the stored slots (the
    dense view is never made) and writes the ensemble of the dense stores, exactly."""
    import isle_fast.stores.sparse as sparse_mod
    from isle_fast.ensemble.merge import merge

    rng = np.random.default_rng(5)
    shapes = [(9, 7), (6, 8), (9, 8), (3, 2), (8, 8)]
    C = 5
    gt, dense, sparse = _aligned_sparse(str(tmp_path), rng, shapes, C, 3)
    thr = {"set0": 37 / 255, "set1": 0.2, "set2": 0.0}
    from isle_fast.ensemble import merge as merge_mod
    from isle_fast.ensemble.sweep import ThresholdSweep

    real = merge_mod.make_plan

    def per_set(stacks, selection, **kw):  # each set at its own threshold, whatever the sweep found best
        kw["set_thresholds"] = [thr[s.name] for s in stacks]
        return real(stacks, selection, **kw)

    monkeypatch.setattr(merge_mod, "make_plan", per_set)
    assert ThresholdSweep  # the sweep runs as usual; only the thresholds of the plan are forced
    allowed = rng.random((len(shapes), C)) < 0.7 if labels else None
    kw = dict(bg_threshold="0.1,0.2", backend="cpu", progress=False, policy=policy, strategy=strategy,
              image_labels=allowed)
    b = merge(dense, gt, str(tmp_path / "b.zarr"), **kw)
    monkeypatch.setattr(sparse_mod, "densify", lambda *a, **k: (_ for _ in ()).throw(AssertionError("dense")))
    a = merge(sparse, gt, str(tmp_path / "a.zarr"), **kw)
    assert a.plan.mode == "labels" and len(set(a.plan.thresholds)) > 1
    np.testing.assert_array_equal(np.asarray(a.stack.array[:]), np.asarray(b.stack.array[:]))


@settings(max_examples=16)
@given(store_cases(), st.sampled_from([None, 0.0, 0.15, 38 / 255, 0.2, 1.0]), st.sampled_from(["score", "order",
                                                                                               "ignore"]))
# one image whose chosen sets hold no class: every key 0, the fill value (its chunk was once never written)
@example(case=(1, 2, [(1, 1)], (0, 0), (1, 1, 1), 2), bg=None, policy="score")
def test_score_merge_at_one_threshold_reads_the_slots_and_equals_dense(case, bg, policy):
    """A score ensemble of class-sparse sets at one shared threshold: merged from the stored slots on the
    local pass (no dense view), labels and merged stack equal to the merge of the dense stores."""
    from isle_fast.ensemble import merge as merge_mod
    from isle_fast.ensemble.merge import merge

    with tempfile.TemporaryDirectory() as root:
        gt, dense, sparse = _build(root, *case, n_sets=3)
        if len(called_grid := tuple(int(v) for v in sparse[0].cams_meta.chunks[:3])) and case[5] % 2:
            # half the cases: a gt chunked like the slots, so the local pass reads them directly
            a0 = np.asarray(gt.array[:])
            gt = write_stack(os.path.join(root, "gt2"), [a0[i, :h, :w] for i, (h, w) in enumerate(gt.shapes)],
                             kind="gt", num_classes=case[1], chunks=called_grid, padded_shape=tuple(gt.padded_shape))
        called = []
        real = merge_mod._gather_sparse_scores

        def spy(*a, **k):
            called.append(1)
            return real(*a, **k)

        merge_mod._gather_sparse_scores = spy
        try:
            a = merge(sparse, gt, os.path.join(root, "a.zarr"), bg_threshold=bg, policy=policy, backend="cpu",
                      progress=False)
        finally:
            merge_mod._gather_sparse_scores = real
        b = merge(dense, gt, os.path.join(root, "b.zarr"), bg_threshold=bg, policy=policy, backend="cpu",
                  progress=False)
        # the stored slots of a gt chunk are read directly where the stores are chunked alike (else the
        # Dask graph of the dense view, the same ensemble)
        local = merge_mod._member_specs([open_stack(x.path) for x in sparse], gt) is not None
        assert a.plan.mode == "scores" and bool(called) == local
        np.testing.assert_array_equal(np.asarray(a.stack.array[:]), np.asarray(b.stack.array[:]))
        # the slot pass writes the merged stack class-sparse; its dense view is the dense merge's stack
        sa, sb = ensemble_scores(a.stack), ensemble_scores(b.stack)
        assert a.stack.provenance["scores_layout"] == ("sparse" if local else "dense")
        assert ("scores_cams" in a.stack.array_names) == local and ("scores" in a.stack.array_names) != local
        assert b.stack.provenance["scores_layout"] == "dense"
        assert sa.dtype == sb.dtype and a.stack.attrs["score_scale"] == b.stack.attrs["score_scale"]
        assert tuple(sa.shape) == tuple(sb.shape)
        np.testing.assert_array_equal(np.asarray(sa[:]), np.asarray(sb[:]))
        np.testing.assert_array_equal(np.asarray(sa[1:, 1:, :, 1:]), np.asarray(sb[1:, 1:, :, 1:]))
        assert a.stack.provenance["scores_array"] == "scores"
        if local:  # the dense layout on request: the same stack, as every class slice
            d = merge(sparse, gt, os.path.join(root, "d.zarr"), bg_threshold=bg, policy=policy, backend="cpu",
                      progress=False, layout="dense")
            assert "scores" in d.stack.array_names and d.stack.provenance["scores_layout"] == "dense"
            np.testing.assert_array_equal(np.asarray(d.stack.member("scores")[:]), np.asarray(sb[:]))


def test_score_merge_at_one_threshold_on_aligned_stores_is_the_slot_pass(tmp_path, monkeypatch):
    from isle_fast.ensemble import merge as merge_mod
    from isle_fast.ensemble.merge import merge

    gt0, dense, sparse = _build(str(tmp_path), 4, 4, [(6, 5), (4, 4), (7, 3), (2, 2)], (1, 1), (2, 4, 4), 3,
                                n_sets=3)
    # a gt chunked like the sparse stores' slots: the local pass reads them directly
    grid = tuple(int(v) for v in sparse[0].cams_meta.chunks[:3])
    a0 = np.asarray(gt0.array[:])
    gt = write_stack(str(tmp_path / "gt2"), [a0[i, :h, :w] for i, (h, w) in enumerate(gt0.shapes)], kind="gt",
                     num_classes=4, chunks=grid, padded_shape=tuple(gt0.padded_shape))
    assert merge_mod._member_specs([open_stack(x.path) for x in sparse], gt) is not None
    monkeypatch.setattr(merge_mod, "aligned_arrays", None)  # the Dask graph (dense view) is not built
    for bg in (None, 0.2):
        a = merge(sparse, gt, str(tmp_path / f"a{bg}.zarr"), bg_threshold=bg, backend="cpu", progress=False)
        monkeypatch.undo()
        b = merge(dense, gt, str(tmp_path / f"b{bg}.zarr"), bg_threshold=bg, backend="cpu", progress=False)
        monkeypatch.setattr(merge_mod, "aligned_arrays", None)
        np.testing.assert_array_equal(np.asarray(a.stack.array[:]), np.asarray(b.stack.array[:]))
        np.testing.assert_array_equal(np.asarray(ensemble_scores(a.stack)[:]),
                                      np.asarray(b.stack.member("scores")[:]))
        assert a.stack.provenance["scores_layout"] == "sparse" and "scores" not in a.stack.array_names


def test_class_sparse_score_ensemble_background_level_is_in_the_identity_checksum(tmp_path):
    """The background level of an ensemble's class-sparse merged scores gives every dense-view pixel's
    slice 0: edited by hand, the store opened and served other scores; now it fails the checksum."""
    from isle_fast.ensemble.merge import merge

    gt0, _, sparse = _build(str(tmp_path), 4, 4, [(6, 5), (4, 4), (7, 3), (2, 2)], (1, 1), (2, 4, 4), 3,
                            n_sets=2)
    grid = tuple(int(v) for v in sparse[0].cams_meta.chunks[:3])
    a0 = np.asarray(gt0.array[:])
    gt = write_stack(str(tmp_path / "gt2"), [a0[i, :h, :w] for i, (h, w) in enumerate(gt0.shapes)], kind="gt",
                     num_classes=4, chunks=grid, padded_shape=tuple(gt0.padded_shape))
    a = merge(sparse, gt, str(tmp_path / "a.zarr"), bg_threshold=0.2, backend="cpu", progress=False)
    assert "scores_cams" in a.stack.array_names
    meta = tmp_path / "a.zarr" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["scores_background_level"] = int(doc["attributes"]["scores_background_level"]) + 1
    meta.write_text(json.dumps(doc))
    with pytest.raises(StoreError, match="scores_background_level.*checksum"):
        open_stack(str(tmp_path / "a.zarr"))

def test_class_sparse_score_ensemble_reads_downstream(tmp_path, capsys):
    """``isle merge --layout``: the class-sparse merged stack is shown by ``isle info`` (and passes its
    check), evaluating the ensemble equals the dense merge's, and ``sparse``
    over a dense member is a user error."""
    gt0, dense, sparse = _build(str(tmp_path), 4, 4, [(6, 5), (4, 4), (7, 3), (2, 2)], (1, 1), (2, 4, 4), 3,
                                n_sets=3)
    grid = tuple(int(v) for v in sparse[0].cams_meta.chunks[:3])
    a0 = np.asarray(gt0.array[:])
    gt = write_stack(str(tmp_path / "gt2"), [a0[i, :h, :w] for i, (h, w) in enumerate(gt0.shapes)], kind="gt",
                     num_classes=4, chunks=grid, padded_shape=tuple(gt0.padded_shape))
    out_s, out_d = str(tmp_path / "s.zarr"), str(tmp_path / "d.zarr")
    assert main(["merge", *[s.path for s in sparse], "--gt", gt.path, "--out", out_s, "--bg-threshold", "0.2",
                 "--layout", "sparse", "-q"]) == 0
    assert main(["merge", *[s.path for s in sparse], "--gt", gt.path, "--out", out_d, "--bg-threshold", "0.2",
                 "--layout", "dense", "-q"]) == 0
    capsys.readouterr()
    assert main(["info", out_s, "--check"]) == 0
    assert "scores_layout: sparse" in capsys.readouterr().out
    es, ed = open_stack(out_s), open_stack(out_d)
    assert "scores_cams" in es.array_names and "scores" not in es.array_names
    np.testing.assert_array_equal(np.asarray(ensemble_scores(es)[:]), np.asarray(ensemble_scores(ed)[:]))
    va, vb = evaluate([es], gt, backend="cpu", progress=False), evaluate([ed], gt, backend="cpu", progress=False)
    np.testing.assert_array_equal(va.iou, vb.iou)
    with pytest.raises(InputError, match="dense score store"):
        from isle_fast.ensemble.merge import merge

        merge([dense[0], sparse[1]], gt, str(tmp_path / "x.zarr"), bg_threshold=0.2, layout="sparse",
              backend="cpu", progress=False)
    assert not os.path.exists(tmp_path / "x.zarr")


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 3), st.integers(2, 7), st.sampled_from(["score", "order", "ignore"]),
       st.sampled_from([-1.0, 0.0, 38.0, 76.5, 255.0]), st.booleans())
def test_sparse_scores_chunk_equals_the_dense_merge_chunk(seed, n_sets, c, policy, thr, drop):
    """Each image merged on its own classes' slots: the labels of :func:`merge_chunk` on the same blocks,
    and the slots of its merged stack (every other class 0, one background level), for every policy,
    threshold (or none: the background set's level) and with absent classes dropped."""
    from isle_fast.backend import task_kernels
    from isle_fast.ensemble.merge import POLICIES, MergePlan, merge_chunk, sparse_scores_chunk

    rng = np.random.default_rng(seed)
    n, h, w = 3, 5, 4
    blocks, levels = [], []
    for _ in range(n_sets):
        k = int(rng.integers(1, c))
        keys = np.zeros((n, k), np.uint8)
        for m in range(n):
            cls = np.sort(rng.choice(np.arange(1, c), size=int(rng.integers(0, k + 1)), replace=False))
            keys[m, :cls.size] = cls
        cams = rng.integers(0, 256, (n, h, w, k)).astype(np.uint8) * (keys > 0)[:, None, None, :]
        blocks.append((cams.astype(np.uint8), keys))
        levels.append(int(rng.integers(0, 256)) if thr < 0 else int(min(255, thr)))
    sel = tuple(int(v) for v in rng.integers(0, n_sets, c))
    plan = MergePlan(mode="scores", strategy="class", encodings=("scores",) * n_sets, scales=(255.0,) * n_sets,
                     cast=False, selection=sel, priority=tuple((1.0,) * c for _ in range(n_sets)),
                     policy=POLICIES[policy], thresholds=(thr,) * n_sets, num_classes=c, drop_absent=drop)
    allowed = rng.random((n, c)) < 0.6 if drop else None
    present = np.zeros((n, c), bool)
    for s, (_, keys) in enumerate(blocks):
        held = np.zeros((n, c), bool)
        held[np.arange(n)[:, None], keys] = True
        present |= held & (np.asarray(sel) == s)[None, :]
    present[:, 0] = False
    kk = max(1, int(present.sum(1).max()))
    out_keys = np.zeros((n, kk), np.uint8)
    for m in range(n):
        cls = np.flatnonzero(present[m])
        out_keys[m, :cls.size] = cls
    with task_kernels("cpu") as K:
        lab, sc = merge_chunk(K, plan, blocks, None, allowed, levels, np.full((n, 2), (h, w), np.int64))
        level = int(np.asarray(sc)[0, 0, 0, 0])
        lab2, slots = sparse_scores_chunk(K, plan, blocks, out_keys, level, allowed)
    np.testing.assert_array_equal(np.asarray(lab2), np.asarray(lab))
    from isle_fast.stores.sparse import densify

    np.testing.assert_array_equal(densify(slots, out_keys, level, c), np.asarray(sc))


def test_stores_committed_before_the_identity_version_still_open(tmp_path):
    """A store committed before version 2 of the identity checksum (no version attribute, the checksum
    of the version-1 keys) opens as before; dropping the version of a version-2 store is damage."""
    from isle_fast.stores.stack import IDENTITY_ATTR, IDENTITY_VERSION_ATTR, identity_crc32c

    s = _sparse_store(tmp_path)
    meta = tmp_path / "s.zarr" / "zarr.json"
    doc = json.loads(meta.read_text())
    assert doc["attributes"][IDENTITY_VERSION_ATTR] == 2
    del doc["attributes"][IDENTITY_VERSION_ATTR]
    meta.write_text(json.dumps(doc))
    with pytest.raises(StoreError, match="checksum"):
        open_stack(s.path)
    doc["attributes"][IDENTITY_ATTR] = identity_crc32c(doc["attributes"])   # as version 1 wrote it
    meta.write_text(json.dumps(doc))
    assert open_stack(s.path).score_layout == "sparse"
