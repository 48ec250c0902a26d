"""isle_fast.ensemble.evaluate: fused Dask confusion counts EQUAL a per-image NumPy reference."""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from isle_fast.cli import main
from isle_fast.ensemble.evaluate import Evaluation, evaluate
from isle_fast.errors import AlignmentError, InputError
from tests import reference as ref
from tests.conftest import write_stack

ENCODINGS = ("labels", "uint8", "float16", "float32")


def random_set(rng, shapes, c, encoding):
    """Per-image arrays of one set: label maps with abstentions, or low-range scores (many ties)."""
    out = []
    for h, w in shapes:
        if encoding == "labels":
            out.append(rng.choice(np.array(list(range(c)) + [255, 200], np.uint8), size=(h, w)))
        else:
            out.append(rng.integers(0, 4, size=(h, w, c)).astype(encoding))
    return out


def reference_counts(gt_imgs, set_imgs, encodings, c, bg_threshold=None):
    """Dataset counts (N, C, C+1) and per-image (I, N, C, C+1), image by image, cropped to true shape."""
    n = len(set_imgs)
    per = np.zeros((len(gt_imgs), n, c, c + 1), np.int64)
    for i, g in enumerate(gt_imgs):
        for k in range(n):
            a = set_imgs[k][i]
            if encodings[k] == "labels":
                per[i, k] = ref.confusion_labels(g, [a], c)[0]
            else:
                thr = -1.0 if bg_threshold is None else bg_threshold * (255.0 if encodings[k] == "uint8" else 1.0)
                per[i, k] = ref.confusion_scores(g, [a], c, thr)[0]
    return per.sum(axis=0), per


def store_encoding(e):
    return ("labels", "uint8") if e == "labels" else ("scores", e)


@st.composite
def cases(draw):
    n_img = draw(st.integers(1, 4))
    c = draw(st.integers(2, 5))
    shapes = [(draw(st.integers(1, 9)), draw(st.integers(1, 9))) for _ in range(n_img)]
    n_sets = draw(st.integers(1, 3))
    encodings = [draw(st.sampled_from(ENCODINGS)) for _ in range(n_sets)]
    chunk = lambda: (draw(st.integers(1, 3)), draw(st.integers(1, 10)), draw(st.integers(1, 10)))  # noqa: E731
    chunks = [chunk() for _ in range(n_sets + 1)]
    pad = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    bg = draw(st.sampled_from([None, None, 0.0, 0.5, 2.0]))
    seed = draw(st.integers(0, 2**31))
    return n_img, c, shapes, encodings, chunks, pad, bg, seed


def build(root, n_img, c, shapes, encodings, chunks, pad, seed):
    rng = np.random.default_rng(seed)
    padded = (max(h for h, _ in shapes) + pad[0], max(w for _, w in shapes) + pad[1])
    gt_imgs = [rng.choice(np.array(list(range(c)) + [255], np.uint8), size=s) for s in shapes]
    gt = write_stack(os.path.join(root, "gt"), gt_imgs, kind="gt", num_classes=c, chunks=chunks[0],
                     padded_shape=padded)
    set_imgs, stores = [], []
    for k, e in enumerate(encodings):
        imgs = random_set(rng, shapes, c, e)
        enc, dt = store_encoding(e)
        ch = chunks[k + 1] + ((c,) if enc == "scores" else ())
        stores.append(write_stack(os.path.join(root, f"s{k}"), imgs, encoding=enc, score_dtype=dt,
                                  num_classes=c, chunks=ch, padded_shape=padded, name=f"set{k}"))
        set_imgs.append(imgs)
    return gt, gt_imgs, stores, set_imgs


@settings(max_examples=15)
@given(cases())
def test_counts_equal_reference(case):
    n_img, c, shapes, encodings, chunks, pad, bg, seed = case
    with tempfile.TemporaryDirectory() as root:
        gt, gt_imgs, stores, set_imgs = build(root, n_img, c, shapes, encodings, chunks, pad, seed)
        ev = evaluate(stores, gt, bg_threshold=bg, backend="cpu", progress=False)
        expected, _ = reference_counts(gt_imgs, set_imgs, encodings, c, bg)
        assert ev.counts.dtype == np.int64
        np.testing.assert_array_equal(ev.counts, expected)
        assert ev.counts.shape == (len(stores), c, c + 1)


@settings(max_examples=8)
@given(cases())
def test_image_average_equals_reference(case):
    n_img, c, shapes, encodings, chunks, pad, bg, seed = case
    with tempfile.TemporaryDirectory() as root:
        gt, gt_imgs, stores, set_imgs = build(root, n_img, c, shapes, encodings, chunks, pad, seed)
        ev = evaluate(stores, gt, average="image", bg_threshold=bg, backend="cpu", progress=False)
        expected, per = reference_counts(gt_imgs, set_imgs, encodings, c, bg)
        np.testing.assert_array_equal(ev.counts, expected)
        # per-image intersection and union, then the mean over images with union > 0
        tp = np.diagonal(per[..., :c], axis1=2, axis2=3)
        union = per.sum(axis=3) + per[..., :c].sum(axis=2) - tp
        np.testing.assert_array_equal(ev.image_stats[..., 0], tp)
        np.testing.assert_array_equal(ev.image_stats[..., 1], union)
        want = np.full((len(stores), c), np.nan)
        for k in range(len(stores)):
            for j in range(c):
                vals = [tp[i, k, j] / union[i, k, j] for i in range(n_img) if union[i, k, j] > 0]
                if vals:
                    want[k, j] = 100.0 * sum(vals) / len(vals)
        np.testing.assert_allclose(ev.iou, want, rtol=1e-12, equal_nan=True)


def test_metrics_hand_case(stack_factory):
    # 2 classes + abstain. gt: [0 0 1 1 255]; set: [0 1 1 255 1]
    gt = stack_factory("gt", [np.array([[0, 0, 1, 1, 255]], np.uint8)], kind="gt", num_classes=2)
    s = stack_factory("s", [np.array([[0, 1, 1, 255, 1]], np.uint8)], num_classes=2, name="S")
    ev = evaluate([s], gt, backend="cpu", progress=False)
    np.testing.assert_array_equal(ev.counts[0], [[1, 1, 0], [0, 1, 1]])
    np.testing.assert_array_equal(ev.tp[0], [1, 1])
    np.testing.assert_array_equal(ev.fp[0], [0, 1])
    np.testing.assert_array_equal(ev.fn[0], [1, 1])
    np.testing.assert_allclose(ev.iou[0], [50.0, 100.0 / 3])
    np.testing.assert_allclose(ev.miou, [(50.0 + 100.0 / 3) / 2])
    np.testing.assert_allclose(ev.precision[0], [100.0, 50.0])
    np.testing.assert_allclose(ev.recall[0], [50.0, 50.0])
    np.testing.assert_allclose(ev.coverage[0], [100.0, 50.0])


def test_absent_class_is_nan_and_skipped_in_miou(stack_factory):
    gt = stack_factory("gt", [np.array([[0, 1, 1]], np.uint8)], kind="gt", num_classes=3)
    s = stack_factory("s", [np.array([[0, 1, 0]], np.uint8)], num_classes=3)
    ev = evaluate([s], gt, backend="cpu", progress=False)
    assert np.isnan(ev.iou[0, 2])
    np.testing.assert_allclose(ev.miou, [(50.0 + 50.0) / 2])
    doc = ev.to_json()
    assert doc["sets"]["s"]["iou"][2] is None
    json.dumps(doc, allow_nan=False)


def test_json_schema(stack_factory, rng):
    shapes = [(4, 5), (3, 6)]
    gt = stack_factory("gt", random_set(rng, shapes, 3, "labels"), kind="gt", num_classes=3)
    a = stack_factory("a", random_set(rng, shapes, 3, "labels"), num_classes=3, name="A")
    b = stack_factory("b", random_set(rng, shapes, 3, "uint8"), encoding="scores", num_classes=3, name="B")
    ev = evaluate([a, b], gt, backend="cpu", progress=False)
    doc = json.loads(json.dumps(ev.to_json(), allow_nan=False))
    assert doc["classes"] == ["c0", "c1", "c2"]
    assert list(doc["sets"]) == ["A", "B"]
    for k, name in enumerate(["A", "B"]):
        entry = doc["sets"][name]
        assert len(entry["iou"]) == 3 and all(isinstance(v, float) for v in entry["iou"])
        assert entry["tp"] == ev.tp[k].tolist() and entry["fp"] == ev.fp[k].tolist()
        assert entry["fn"] == ev.fn[k].tolist()
        assert entry["miou"] == pytest.approx(float(ev.miou[k]))
    assert set(doc["selection"]) == {"c1", "c2"}
    assert set(doc["selection"].values()) <= {"A", "B"}


def test_chunking_does_not_matter(tmp_path, rng):
    shapes = [(7, 5), (6, 8), (8, 8), (2, 3), (5, 5)]
    gt_imgs = random_set(rng, shapes, 4, "labels")
    imgs = random_set(rng, shapes, 4, "float16")
    results = []
    for k, ch in enumerate([(1, 8, 8), (5, 3, 2), (2, 8, 3)]):
        gt = write_stack(str(tmp_path / f"gt{k}"), gt_imgs, kind="gt", num_classes=4, chunks=ch)
        s = write_stack(str(tmp_path / f"s{k}"), imgs, encoding="scores", score_dtype="float16",
                        num_classes=4, chunks=(3, 4, 8, 4))
        results.append(evaluate([s], gt, backend="cpu", progress=False, average="image"))
    for r in results[1:]:
        np.testing.assert_array_equal(r.counts, results[0].counts)
        np.testing.assert_array_equal(r.iou, results[0].iou)


def test_misaligned_store_is_named(stack_factory, rng):
    gt = stack_factory("gt", random_set(rng, [(3, 3), (3, 3)], 3, "labels"), kind="gt", num_classes=3)
    s = stack_factory("bad", random_set(rng, [(3, 3), (3, 3)], 3, "labels"), num_classes=3, ids=["img000", "zzz"])
    with pytest.raises(AlignmentError, match="bad.*zzz|zzz.*bad|bad"):
        evaluate([s], gt, backend="cpu", progress=False)
    t = stack_factory("shape", random_set(rng, [(3, 3), (3, 2)], 3, "labels"), num_classes=3, padded_shape=(3, 3))
    with pytest.raises(AlignmentError, match="img001"):
        evaluate([t], gt, backend="cpu", progress=False)
    with pytest.raises(InputError):
        evaluate([], gt, backend="cpu", progress=False)
    with pytest.raises(InputError, match="average"):
        evaluate([s], gt, average="pixel", backend="cpu", progress=False)


def test_duplicate_names_made_unique(stack_factory, rng):
    gt = stack_factory("gt", random_set(rng, [(3, 3)], 3, "labels"), kind="gt", num_classes=3)
    s = stack_factory("s", random_set(rng, [(3, 3)], 3, "labels"), num_classes=3, name="X")
    ev = evaluate([s, s.path], gt, backend="cpu", progress=False)
    assert ev.set_names == ["X", "X-2"]
    np.testing.assert_array_equal(ev.counts[0], ev.counts[1])


def test_distributed_and_memory_url(tmp_path, rng):
    distributed = pytest.importorskip("distributed")
    shapes = [(5, 4), (6, 6), (3, 7)]
    gt_imgs = random_set(rng, shapes, 3, "labels")
    a_imgs = random_set(rng, shapes, 3, "labels")
    b_imgs = random_set(rng, shapes, 3, "uint8")
    gt = write_stack(str(tmp_path / "gt"), gt_imgs, kind="gt", num_classes=3, chunks=(2, 6, 7))
    a = write_stack(str(tmp_path / "a"), a_imgs, num_classes=3, chunks=(1, 3, 3))
    b = write_stack(str(tmp_path / "b"), b_imgs, encoding="scores", num_classes=3, chunks=(3, 6, 7, 3))
    local = evaluate([a, b], gt, backend="cpu", progress=False)
    expected, _ = reference_counts(gt_imgs, [a_imgs, b_imgs], ["labels", "uint8"], 3)
    np.testing.assert_array_equal(local.counts, expected)
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                                  dashboard_address=":0") as cluster, distributed.Client(cluster):
        dist = evaluate([a.path, b.path], gt.path, backend="cpu", progress=False)
    np.testing.assert_array_equal(dist.counts, expected)
    # fsspec URL stores (in-memory file system)
    url = f"memory://isle-eval-{os.getpid()}-{rng.integers(1 << 30)}"
    gm = write_stack(url + "/gt", gt_imgs, kind="gt", num_classes=3, chunks=(2, 3, 3))
    am = write_stack(url + "/a", a_imgs, num_classes=3)
    bm = write_stack(url + "/b", b_imgs, encoding="scores", num_classes=3)
    mem = evaluate([am.path, bm.path], gm.path, backend="cpu", progress=False)
    np.testing.assert_array_equal(mem.counts, expected)


def test_cli_evaluate(tmp_path, rng, capsys):
    shapes = [(4, 4), (5, 3)]
    gt = write_stack(str(tmp_path / "gt"), random_set(rng, shapes, 3, "labels"), kind="gt", num_classes=3)
    a = write_stack(str(tmp_path / "a"), random_set(rng, shapes, 3, "labels"), num_classes=3, name="A")
    b = write_stack(str(tmp_path / "b"), random_set(rng, shapes, 3, "float16"), encoding="scores",
                    score_dtype="float16", num_classes=3, name="B")
    out = tmp_path / "ev.json"
    rc = main(["evaluate", a.path, b.path, "--gt", gt.path, "--json", str(out), "--backend", "cpu",
               "--quiet", "--bg-threshold", "0.5"])
    assert rc == 0
    assert capsys.readouterr().out == ""  # --quiet: nothing but errors (the JSON is still written)
    assert main(["evaluate", a.path, b.path, "--gt", gt.path, "--backend", "cpu", "--bg-threshold", "0.5"]) == 0
    text = capsys.readouterr().out
    assert "c1" in text and "mIoU" in text and "A" in text
    doc = json.loads(out.read_text())
    ev = evaluate([a, b], gt, backend="cpu", progress=False, bg_threshold=0.5)
    assert doc["sets"]["B"]["tp"] == ev.tp[1].tolist()
    # user mistakes: one line, exit 2, naming the thing
    rc = main(["evaluate", str(tmp_path / "missing"), "--gt", gt.path, "--quiet"])
    assert rc == 2
    assert "missing" in capsys.readouterr().err
    rc = main(["evaluate", a.path, "--gt", b.path, "--quiet"])
    assert rc == 2


def test_evaluation_take_and_table(stack_factory, rng):
    shapes = [(4, 4)]
    gt = stack_factory("gt", random_set(rng, shapes, 3, "labels"), kind="gt", num_classes=3)
    a = stack_factory("a", random_set(rng, shapes, 3, "labels"), num_classes=3)
    b = stack_factory("b", random_set(rng, shapes, 3, "labels"), num_classes=3)
    ev = evaluate([a, b], gt, backend="cpu", progress=False)
    only_b = ev.take([1])
    assert isinstance(only_b, Evaluation) and only_b.set_names == ["b"]
    np.testing.assert_array_equal(only_b.counts[0], ev.counts[1])
    assert "mIoU" in ev.table()


@pytest.mark.gpu
def test_gpu_backend_equals_cpu(tmp_path, rng):
    from isle_fast.backend import gpu_available
    from isle_fast.ensemble.merge import merge
    from isle_fast.ensemble.subsets import subset_analysis

    if not gpu_available():
        pytest.skip("no CUDA device")
    shapes = [(7, 5), (6, 8), (8, 8)]
    gt = write_stack(str(tmp_path / "gt"), random_set(rng, shapes, 4, "labels"), kind="gt", num_classes=4)
    a = write_stack(str(tmp_path / "a"), random_set(rng, shapes, 4, "labels"), num_classes=4, chunks=(2, 4, 4))
    b = write_stack(str(tmp_path / "b"), random_set(rng, shapes, 4, "float16"), encoding="scores",
                    score_dtype="float16", num_classes=4)
    for average in ("dataset", "image"):
        cpu = evaluate([a, b], gt, backend="cpu", average=average, progress=False)
        gpu = evaluate([a, b], gt, backend="gpu", average=average, progress=False)
        np.testing.assert_array_equal(gpu.counts, cpu.counts)
        np.testing.assert_array_equal(gpu.iou, cpu.iou)
    for policy in ("score", "order", "ignore"):
        mc = merge([a, b], gt, str(tmp_path / f"c-{policy}"), policy=policy, backend="cpu", progress=False)
        mg = merge([a, b], gt, str(tmp_path / f"g-{policy}"), policy=policy, backend="gpu", progress=False)
        np.testing.assert_array_equal(np.asarray(mg.stack.array[:]), np.asarray(mc.stack.array[:]))
        sc = subset_analysis([a, b], gt, policy=policy, backend="cpu", progress=False)
        sg = subset_analysis([a, b], gt, policy=policy, backend="gpu", progress=False)
        np.testing.assert_array_equal(sg.counts, sc.counts)


@settings(max_examples=15)
@given(cases(), st.sampled_from(["dataset", "image"]))
def test_local_pass_equals_reference_and_dask(case, average):
    """Stores chunked alike run on the local thread pool (no Dask); counts equal the reference and Dask's."""
    import dask

    from isle_fast.ensemble import graph as G

    n_img, c, shapes, encodings, chunks, pad, bg, seed = case
    chunks = [chunks[0]] * len(chunks)          # every store chunked like the gt: one task per gt chunk
    with tempfile.TemporaryDirectory() as root:
        gt, gt_imgs, stores, set_imgs = build(root, n_img, c, shapes, encodings, chunks, pad, seed)
        assert G.local_specs(stores, gt) is not None
        ev = evaluate(stores, gt, average=average, bg_threshold=bg, backend="cpu", progress=False)
        expected, per = reference_counts(gt_imgs, set_imgs, encodings, c, bg)
        np.testing.assert_array_equal(ev.counts, expected)
        with dask.config.set(scheduler="sync"):
            assert G.local_specs(stores, gt) is None      # a configured Dask scheduler is honoured
            ev2 = evaluate(stores, gt, average=average, bg_threshold=bg, backend="cpu", progress=False)
        np.testing.assert_array_equal(ev.counts, ev2.counts)
        if average == "image":
            np.testing.assert_array_equal(ev.image_stats, ev2.image_stats)


def test_local_pass_needs_no_dask(stack_factory, monkeypatch):
    from isle_fast.ensemble import evaluate as E

    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 3, size=(5, 6)).astype(np.uint8) for _ in range(7)]
    gt = stack_factory("gt", imgs, kind="gt", num_classes=3, chunks=(2, 5, 6))
    s = stack_factory("s", imgs[::-1], num_classes=3, chunks=(2, 5, 6))
    monkeypatch.setattr(E, "_dask_pass", lambda *a, **k: pytest.fail("the Dask pass ran"))
    ev = evaluate([s], gt, backend="cpu", progress=False)
    want = ref.confusion_labels(np.stack(imgs), [np.stack(imgs[::-1])], 3)[0]
    np.testing.assert_array_equal(ev.counts[0], want)
    t = stack_factory("t", imgs, num_classes=3, chunks=(3, 5, 6))   # chunked otherwise: the Dask pass
    from isle_fast.ensemble import graph as G

    assert G.local_specs([t], gt) is None


@settings(max_examples=60)
@given(st.lists(st.integers(0, 6), min_size=0, max_size=4),
       st.sampled_from([0, 1, 2**31 - 1, 2**31, 2**40]), st.integers(0, 2**32 - 1))
def test_packed_counts_unpack_to_the_same_table(shape, big, seed):
    """What a worker sends back (nonzero entries, int32 where they fit) unpacks to the table itself:
    empty and odd shapes, all zeros, values at and beyond the int32 range."""
    from isle_fast.ensemble.evaluate import pack_counts, unpack_counts

    r = np.random.default_rng(seed)
    a = np.array(r.integers(0, 4, size=shape) * (r.random(shape) < 0.3), dtype=np.int64)
    if a.size and big:
        a.reshape(-1)[r.integers(0, a.size)] = big
    packed = pack_counts(a)
    back = unpack_counts(packed)
    assert back.dtype == np.int64 and back.shape == a.shape
    np.testing.assert_array_equal(back, a)
    assert packed[2].dtype == (np.int64 if big > 2**31 - 1 and a.size else np.int32)
    assert len(packed[1]) == int(np.count_nonzero(a))


@pytest.mark.parametrize("average", ["dataset", "image"])
def test_cluster_sums_on_the_workers_and_equals_threaded(tmp_path, rng, process_cluster, average):
    """On 2 worker processes the chunk counts are summed per batch where they ran (300 one-image chunks:
    several chunks a cluster task) and the counts and per-image stats equal the threaded run's, exactly;
    81 classes, as COCO, where most of every table is zeros."""
    from dask.distributed import Client

    from isle_fast.stores.parallel import ClusterExecutor

    c = 81
    shapes = [(int(rng.integers(3, 9)), int(rng.integers(3, 9))) for _ in range(300)]
    gt_imgs = random_set(rng, shapes, c, "labels")
    sets = [write_stack(str(tmp_path / f"s{m}"), random_set(rng, shapes, c, "labels"), num_classes=c,
                        chunks=(1, 8, 8)) for m in range(3)]
    gt = write_stack(str(tmp_path / "gt"), gt_imgs, kind="gt", num_classes=c, chunks=(1, 8, 8))
    threaded = evaluate(sets, gt, average=average, backend="cpu", progress=False)
    with Client(process_cluster) as client:
        assert ClusterExecutor(client).batch_size(300) > 1
        dist = evaluate([s.path for s in sets], gt.path, average=average, backend="cpu", progress=False)
    np.testing.assert_array_equal(dist.counts, threaded.counts)
    assert dist.counts.sum() > 0
    if average == "image":
        np.testing.assert_array_equal(dist.image_stats, threaded.image_stats)
