"""isle_fast.ensemble.merge: the chunked ensemble equals a per-image NumPy merge; policies, strategies, export."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from isle_fast.cli import main
from isle_fast.ensemble.evaluate import evaluate
from isle_fast.ensemble.merge import POLICIES, ensemble_scores, gt_presence, image_choice, merge, merge_images
from isle_fast.ensemble.report import export_pngs
from isle_fast.ensemble.selection import select
from isle_fast.errors import StoreError
from isle_fast.stores.png import voc_palette
from isle_fast.stores.stack import open_stack
from tests import reference as ref
from tests.conftest import write_stack

SHAPES = [(7, 5), (6, 8), (8, 8), (2, 3), (5, 6)]
C = 4


def label_imgs(rng, shapes=SHAPES, c=C, p_abstain=0.15):
    vals = np.array(list(range(c)) + [255], np.uint8)
    p = np.r_[np.full(c, (1 - p_abstain) / c), p_abstain]
    return [rng.choice(vals, size=s, p=p) for s in shapes]


def score_imgs(rng, dtype, shapes=SHAPES, c=C):
    return [rng.integers(0, 5, size=s + (c,)).astype(dtype) for s in shapes]


@pytest.fixture
def data(tmp_path, rng):
    """gt + three label sets with different chunkings."""
    gt_imgs = label_imgs(rng, p_abstain=0.1)
    gt = write_stack(str(tmp_path / "gt"), gt_imgs, kind="gt", num_classes=C, chunks=(2, 8, 8))
    sets, imgs = [], []
    for k, ch in enumerate([(1, 4, 4), (3, 8, 8), (5, 3, 5)]):
        im = label_imgs(rng)
        imgs.append(im)
        sets.append(write_stack(str(tmp_path / f"s{k}"), im, num_classes=C, chunks=ch, name="ABC"[k]))
    return tmp_path, gt, gt_imgs, sets, imgs


def check_padding(stack):
    arr = np.asarray(stack.array[:])
    for i, (h, w) in enumerate(stack.shapes):
        assert (arr[i, h:, :] == 255).all() and (arr[i, :, w:] == 255).all()


@pytest.mark.parametrize("policy", list(POLICIES))
def test_label_merge_equals_reference(data, policy):
    root, gt, gt_imgs, sets, imgs = data
    res = merge(sets, gt, str(root / f"ens-{policy}"), policy=policy, backend="cpu", progress=False)
    ev = evaluate(sets, gt, backend="cpu", progress=False)
    sel = select(ev)
    np.testing.assert_array_equal(res.selection.best, sel.best)
    prio = np.where(np.isnan(ev.iou), -1.0, ev.iou)
    ens = res.stack
    assert ens.kind == "ensemble" and ens.encoding == "labels"
    assert ens.ids == gt.ids and np.array_equal(ens.shapes, gt.shapes)
    for i in range(len(SHAPES)):
        want = ref.merge_labels([im[i] for im in imgs], sel.best, prio, POLICIES[policy])
        np.testing.assert_array_equal(ens.read_image(i), want)
    check_padding(ens)
    prov = ens.provenance
    assert prov["policy"] == policy and prov["strategy"] == "class"
    assert prov["selection"] == sel.mapping()
    assert set(prov["scores"]) == {"A", "B", "C"} and len(prov["scores"]["A"]) == C
    assert prov["scores_array"] is None and ensemble_scores(ens) is None
    # the in-memory merge of a few images (used by the report figure) agrees
    few = merge_images(sets, sel, [1, 3], policy=policy, backend="cpu")
    np.testing.assert_array_equal(few[0], ens.read_image(1))
    np.testing.assert_array_equal(few[1], ens.read_image(3))


def test_subset_merge_uses_only_member_sets(data):
    root, gt, gt_imgs, sets, imgs = data
    res = merge(sets, gt, str(root / "ens2"), subset=["C", "A"], backend="cpu", progress=False)
    ev = evaluate(sets, gt, backend="cpu", progress=False)
    sel = select(ev, sets=["A", "C"])
    assert set(res.selection.mapping().values()) <= {"A", "C"}
    prio = np.where(np.isnan(ev.iou), -1.0, ev.iou)[[0, 2]]
    local = sel.kernel_selection()
    for i in range(len(SHAPES)):
        want = ref.merge_labels([imgs[0][i], imgs[2][i]], local, prio, 0)
        np.testing.assert_array_equal(res.stack.read_image(i), want)
    assert res.stack.provenance["members"] == ["A", "C"]


@pytest.mark.parametrize("dtype,bg", [("uint8", None), ("float16", 0.6), ("float32", None)])
def test_score_merge_equals_reference(tmp_path, rng, dtype, bg):
    gt_imgs = label_imgs(rng, p_abstain=0.1)
    gt = write_stack(str(tmp_path / "gt"), gt_imgs, kind="gt", num_classes=C, chunks=(2, 4, 8))
    imgs = [score_imgs(rng, dtype) for _ in range(3)]
    sets = [write_stack(str(tmp_path / f"s{k}"), im, encoding="scores", score_dtype=dtype, num_classes=C,
                        chunks=(k + 1, 8, 3, C), name="ABC"[k]) for k, im in enumerate(imgs)]
    res = merge(sets, gt, str(tmp_path / "ens"), backend="cpu", bg_threshold=bg, progress=False)
    scale = 255.0 if dtype == "uint8" else 1.0
    thr = -1.0 if bg is None else bg * scale
    sel = res.selection.best
    merged = ensemble_scores(res.stack)
    assert merged is not None and str(merged.dtype) == dtype
    assert res.stack.provenance["scores_array"] == "scores"
    for i, (h, w) in enumerate(SHAPES):
        lab, sc = ref.merge_scores([im[i] for im in imgs], sel, 0, thr)
        np.testing.assert_array_equal(res.stack.read_image(i), lab)
        np.testing.assert_array_equal(np.asarray(merged[i, :h, :w]), sc)
        assert (np.asarray(merged[i, h:]) == 0).all() and (np.asarray(merged[i, :, w:]) == 0).all()
    check_padding(res.stack)


def test_mixed_dtype_scores_merge_as_float32(tmp_path, rng):
    gt = write_stack(str(tmp_path / "gt"), label_imgs(rng), kind="gt", num_classes=C)
    u8 = score_imgs(rng, "uint8")
    f16 = score_imgs(rng, "float16")
    a = write_stack(str(tmp_path / "a"), u8, encoding="scores", num_classes=C, name="A")
    b = write_stack(str(tmp_path / "b"), f16, encoding="scores", score_dtype="float16", num_classes=C, name="B")
    res = merge([a, b], gt, str(tmp_path / "ens"), backend="cpu", progress=False)
    merged = ensemble_scores(res.stack)
    assert str(merged.dtype) == "float32"
    for i, (h, w) in enumerate(SHAPES):
        lab, sc = ref.merge_scores([u8[i].astype(np.float32) / np.float32(255), f16[i].astype(np.float32)],
                                   res.selection.best, 0)
        np.testing.assert_array_equal(res.stack.read_image(i), lab)
        np.testing.assert_array_equal(np.asarray(merged[i, :h, :w]), sc)


def test_mixed_encodings_decode_scores_then_merge_labels(tmp_path, rng):
    gt = write_stack(str(tmp_path / "gt"), label_imgs(rng), kind="gt", num_classes=C, chunks=(3, 8, 8))
    la = label_imgs(rng)
    sb = score_imgs(rng, "uint8")
    a = write_stack(str(tmp_path / "a"), la, num_classes=C, name="A")
    b = write_stack(str(tmp_path / "b"), sb, encoding="scores", num_classes=C, chunks=(1, 8, 8, C), name="B")
    for policy in POLICIES:
        res = merge([a, b], gt, str(tmp_path / f"ens-{policy}"), policy=policy, bg_threshold=0.01,
                    backend="cpu", progress=False)
        ev = res.evaluation
        prio = np.where(np.isnan(ev.iou), -1.0, ev.iou)
        for i in range(len(SHAPES)):
            want = ref.merge_labels([la[i], ref.decode_scores(sb[i], 0.01 * 255)], res.selection.best, prio,
                                    POLICIES[policy])
            np.testing.assert_array_equal(res.stack.read_image(i), want)
        assert ensemble_scores(res.stack) is None


def test_image_strategy_hand_made(stack_factory):
    # classes: bg, x, y. Set A is perfect on x, set B perfect on y (selection x->A, y->B).
    # Image-level labels (gt): img0 has x and y, img1 only y, img2 only bg.
    # x is in 1 image, y in 2 images -> y ranks first. img0 -> B, img1 -> B, img2 -> best mIoU set.
    g = [np.array([[1, 1, 2, 2]], np.uint8), np.array([[0, 2, 2, 0]], np.uint8), np.array([[0, 0, 0, 0]], np.uint8)]
    a = [np.array([[1, 1, 0, 0]], np.uint8), np.array([[0, 1, 1, 0]], np.uint8), np.array([[0, 0, 0, 0]], np.uint8)]
    b = [np.array([[0, 2, 2, 2]], np.uint8), np.array([[0, 2, 2, 0]], np.uint8), np.array([[2, 0, 0, 0]], np.uint8)]
    gt = stack_factory("gt", g, kind="gt", num_classes=3, chunks=(2, 1, 4))
    sa = stack_factory("a", a, num_classes=3, name="A")
    sb = stack_factory("b", b, num_classes=3, name="B", chunks=(1, 1, 2))
    res = merge([sa, sb], gt, str(os.path.dirname(gt.path)) + "/ens", strategy="image", backend="cpu",
                progress=False)
    assert res.selection.mapping() == {"c1": "A", "c2": "B"}
    best_miou = "AB"[int(np.argmax(res.evaluation.miou))]
    assert res.info["rank"] == ["c2", "c1"]
    assert res.info["instances"] == {"c1": 1, "c2": 2}
    src = {"A": a, "B": b}
    np.testing.assert_array_equal(res.stack.read_image(0), b[0])
    np.testing.assert_array_equal(res.stack.read_image(1), b[1])
    np.testing.assert_array_equal(res.stack.read_image(2), src[best_miou][2])
    assert res.stack.provenance["strategy"] == "image"
    presence = gt_presence(gt, backend="cpu")
    np.testing.assert_array_equal(presence, [[False, True, True], [True, False, True], [True, False, False]])
    choice, _ = image_choice(presence, res.selection, res.evaluation.miou)
    assert list(choice[:2]) == [1, 1]


def test_existing_output_kept_and_failed_merge_leaves_nothing(data, monkeypatch):
    root, gt, gt_imgs, sets, imgs = data
    out = str(root / "ens")
    first = merge(sets, gt, out, backend="cpu", progress=False)
    before = np.asarray(first.stack.array[:])
    with pytest.raises(StoreError, match="exists"):
        merge(sets[:1], gt, out, backend="cpu", progress=False)
    import isle_fast.ensemble.merge as m

    def boom(*a, **k):
        raise RuntimeError("kernel failed")

    monkeypatch.setattr(m, "merge_chunk", boom)
    with pytest.raises(RuntimeError):
        merge(sets, gt, out, overwrite=True, backend="cpu", progress=False)
    with pytest.raises(RuntimeError):
        merge(sets, gt, str(root / "never"), backend="cpu", progress=False)
    assert not os.path.exists(root / "never")
    assert not [p for p in os.listdir(root) if ".tmp-" in p]
    np.testing.assert_array_equal(np.asarray(open_stack(out).array[:]), before)


def test_distributed_merge_equals_local(data):
    distributed = pytest.importorskip("distributed")
    root, gt, gt_imgs, sets, imgs = data
    local = merge(sets, gt, str(root / "local"), backend="cpu", progress=False)
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                                  dashboard_address=":0") as cluster, distributed.Client(cluster):
        dist = merge([s.path for s in sets], gt.path, str(root / "dist"), backend="cpu", progress=False)
    np.testing.assert_array_equal(np.asarray(dist.stack.array[:]), np.asarray(local.stack.array[:]))


def test_export_pngs(data):
    root, gt, gt_imgs, sets, imgs = data
    res = merge(sets, gt, str(root / "ens"), backend="cpu", progress=False)
    out = root / "png"
    info = export_pngs(res.stack, out, backend="cpu", progress=False)
    assert info["images"] == len(SHAPES)
    pal = voc_palette()
    assert pal.shape == (256, 3) and tuple(pal[255]) == (224, 224, 192)
    for i, img_id in enumerate(res.stack.ids):
        with Image.open(out / f"{img_id}.png") as im:
            assert im.mode == "P"
            np.testing.assert_array_equal(np.asarray(im), res.stack.read_image(i))
            assert im.getpalette()[:6] == pal[:2].ravel().tolist()
    with pytest.raises(StoreError, match="exists"):
        export_pngs(res.stack, out, progress=False)
    export_pngs(sets[0], out, overwrite=True, progress=False)
    with Image.open(out / f"{sets[0].ids[0]}.png") as im:
        np.testing.assert_array_equal(np.asarray(im), imgs[0][0])
    assert not [p for p in os.listdir(root) if ".tmp-" in p]


def test_cli_merge_and_export(data, capsys):
    root, gt, gt_imgs, sets, imgs = data
    out, js = str(root / "E"), str(root / "m.json")
    rc = main(["merge", *[s.path for s in sets], "--gt", gt.path, "--out", out, "--sets", "A,B",
               "--policy", "order", "--json", js, "--backend", "cpu", "--quiet"])
    assert rc == 0
    assert capsys.readouterr().out == ""  # --quiet: nothing but errors
    doc = json.loads(open(js).read())
    assert set(doc["selection"].values()) <= {"A", "B"}
    assert doc["ensemble"]["members"] == ["A", "B"] and doc["ensemble"]["policy"] == "order"
    ens = open_stack(out)
    assert ens.provenance["policy"] == "order"
    ev = evaluate([ens], gt, backend="cpu", progress=False)
    assert doc["ensemble"]["miou"] == pytest.approx(float(ev.miou[0]))
    rc = main(["merge", *[s.path for s in sets], "--gt", gt.path, "--out", out, "--quiet"])
    assert rc == 2 and "exists" in capsys.readouterr().err
    rc = main(["merge", sets[0].path, "--gt", gt.path, "--out", str(root / "F"), "--sets", "Z", "--quiet"])
    assert rc == 2 and "'Z'" in capsys.readouterr().err
    rc = main(["export", out, "--out", str(root / "png"), "--quiet"])
    # the folder holds one PNG per image and the marker that isle wrote it (.isle-output.json)
    assert rc == 0 and sorted(os.listdir(root / "png")) == sorted([".isle-output.json"] +
                                                                  [f"{i}.png" for i in open_stack(out).ids])


def test_task_memory_cap_changes_nothing_but_the_grid(tmp_path, rng, monkeypatch):
    import isle_fast.ensemble.graph as G

    gt_imgs = label_imgs(rng)
    gt = write_stack(str(tmp_path / "gt"), gt_imgs, kind="gt", num_classes=C, chunks=(5, 8, 8))
    imgs = [score_imgs(rng, "float32") for _ in range(2)]
    sets = [write_stack(str(tmp_path / f"s{k}"), im, encoding="scores", score_dtype="float32", num_classes=C,
                        chunks=(2, 8, 8, C)) for k, im in enumerate(imgs)]
    assert G.work_chunks(sets, gt) == (5, 8, 8)
    big = merge(sets, gt, str(tmp_path / "big"), backend="cpu", progress=False)
    ev_big = evaluate(sets, gt, backend="cpu", progress=False)
    # one image's region of gt + two float32 score stacks is 64 * (1 + 2 * 16) bytes
    monkeypatch.setattr(G, "MAX_TASK_BYTES", 64 * 33 * 2)
    assert G.work_chunks(sets, gt) == (2, 8, 8)
    small = merge(sets, gt, str(tmp_path / "small"), backend="cpu", progress=False)
    assert small.stack.chunks == (2, 8, 8) and big.stack.chunks == (5, 8, 8)
    np.testing.assert_array_equal(np.asarray(small.stack.array[:]), np.asarray(big.stack.array[:]))
    np.testing.assert_array_equal(np.asarray(ensemble_scores(small.stack)[:]),
                                  np.asarray(ensemble_scores(big.stack)[:]))
    np.testing.assert_array_equal(evaluate(sets, gt, backend="cpu", progress=False).counts, ev_big.counts)


@pytest.mark.slow
def test_distributed_process_workers(data, process_cluster):
    """Worker processes: tasks pickle the kernels' backend name and the output Zarr arrays."""
    distributed = pytest.importorskip("distributed")
    root, gt, gt_imgs, sets, imgs = data
    local = merge(sets, gt, str(root / "local"), backend="cpu", progress=False)
    with distributed.Client(process_cluster):
        dist = merge([s.path for s in sets], gt.path, str(root / "dist"), backend="cpu", progress=False)
    np.testing.assert_array_equal(dist.evaluation.counts, local.evaluation.counts)
    np.testing.assert_array_equal(np.asarray(dist.stack.array[:]), np.asarray(local.stack.array[:]))


def test_merge_to_and_from_fsspec_urls(data):
    root, gt, gt_imgs, sets, imgs = data
    local = merge(sets, gt, str(root / "local"), backend="cpu", progress=False)
    url = f"memory://isle-merge-{os.getpid()}-{id(data)}"
    msets = [write_stack(f"{url}/s{k}", im, num_classes=C, name="ABC"[k]) for k, im in enumerate(imgs)]
    mgt = write_stack(f"{url}/gt", gt_imgs, kind="gt", num_classes=C, chunks=(2, 8, 8))
    remote = merge([s.path for s in msets], mgt.path, f"{url}/ens", backend="cpu", progress=False)
    assert remote.stack.path == f"{url}/ens"
    np.testing.assert_array_equal(np.asarray(open_stack(f"{url}/ens").array[:]), np.asarray(local.stack.array[:]))


@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("chunks", [(2, 8, 8), (3, 4, 5), (7, 12, 12)])
def test_local_merge_equals_reference_and_dask(tmp_path, rng, policy, chunks):
    """Stores chunked alike merge on the local thread pool (no Dask, direct chunk writes), tiles included."""
    import dask

    import isle_fast.ensemble.merge as m

    gt_imgs = label_imgs(rng, p_abstain=0.1)
    gt = write_stack(str(tmp_path / "gt"), gt_imgs, kind="gt", num_classes=C, chunks=chunks)
    imgs = [label_imgs(rng, p_abstain=0.05) for _ in range(3)]
    sets = [write_stack(str(tmp_path / f"s{k}"), im, num_classes=C, chunks=chunks, name="ABC"[k])
            for k, im in enumerate(imgs)]
    calls = []
    orig = m._local_merge
    m_local = lambda *a, **k: calls.append(orig(*a, **k)) or calls[-1]  # noqa: E731
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(m, "_local_merge", m_local)
        res = merge(sets, gt, str(tmp_path / "local"), policy=policy, backend="cpu", progress=False)
    assert calls and calls[0] is not None and res.stack.chunks == gt.chunks   # the local pass ran
    with dask.config.set(scheduler="sync"):                    # a configured scheduler: the Dask graph
        via_dask = merge(sets, gt, str(tmp_path / "dask"), policy=policy, backend="cpu", progress=False)
    np.testing.assert_array_equal(np.asarray(res.stack.array[:]), np.asarray(via_dask.stack.array[:]))
    sel = res.selection
    prio = np.where(np.isnan(res.evaluation.iou), -1.0, res.evaluation.iou)
    for i in range(len(SHAPES)):
        want = ref.merge_labels([im[i] for im in imgs], sel.best, prio, POLICIES[policy])
        np.testing.assert_array_equal(res.stack.read_image(i), want)
    check_padding(res.stack)
# ---------------------------------------------------------------- image-level labels
def _drop_reference(img: np.ndarray, allowed_row: np.ndarray) -> np.ndarray:
    """Plain NumPy: a claim (pixel value or score slice) of a class the image is not labelled with goes."""
    out = img.copy()
    if img.ndim == 2:
        for c in range(len(allowed_row)):
            if c > 0 and not allowed_row[c]:
                out[img == c] = 0
    else:
        for c in range(1, len(allowed_row)):
            if not allowed_row[c]:
                out[..., c] = 0
    return out


def test_drop_absent_claims_equals_reference(rng):
    from isle_fast.ensemble.merge import drop_absent_claims

    for _ in range(20):
        c = int(rng.integers(2, 9))
        blk = rng.choice(np.r_[np.arange(c), 255].astype(np.uint8), size=(3, 5, 7))
        allowed = rng.random((3, c)) < 0.5
        got = drop_absent_claims(blk, "labels", allowed)
        assert got.dtype == np.uint8
        for m in range(3):
            np.testing.assert_array_equal(got[m], _drop_reference(blk[m], np.r_[True, allowed[m, 1:]]))
        sc = rng.random((3, 5, 7, c)).astype(np.float16)
        got = drop_absent_claims(sc, "scores", allowed)
        for m in range(3):
            np.testing.assert_array_equal(got[m], _drop_reference(sc[m], np.r_[True, allowed[m, 1:]]))
        assert (got[..., 0] == sc[..., 0]).all()  # background is never dropped


@pytest.mark.parametrize("kind", ["labels", "scores"])
def test_merge_with_image_labels_equals_merging_dropped_sets(data, tmp_path, rng, kind):
    """merge(image_labels=L) == merge of the sets with every claim outside L dropped first."""
    root, gt, gt_imgs, sets, imgs = data
    if kind == "scores":
        imgs = [score_imgs(rng, np.uint8) for _ in range(2)]
        sets = [write_stack(str(tmp_path / f"sc{k}"), im, num_classes=C, encoding="scores", name="PQ"[k],
                            chunks=(2, 4, 4, C)) for k, im in enumerate(imgs)]
    allowed = rng.random((len(SHAPES), C)) < 0.5
    allowed[:, 0] = True
    ev = evaluate(sets, gt, backend="cpu", progress=False)
    res = merge(sets, gt, str(root / f"ens-il-{kind}"), evaluation=ev, image_labels=allowed, backend="cpu",
                progress=False)
    dropped = [[_drop_reference(im[i], allowed[i]) for i in range(len(SHAPES))] for im in imgs]
    enc = "labels" if kind == "labels" else "scores"
    dsets = [write_stack(str(tmp_path / f"d{k}"), im, num_classes=C, encoding=enc, name=sets[k].name)
             for k, im in enumerate(dropped)]
    want = merge(dsets, gt, str(root / f"ens-d-{kind}"), evaluation=ev, backend="cpu", progress=False)
    for i in range(len(SHAPES)):
        got = res.stack.read_image(i)
        np.testing.assert_array_equal(got, want.stack.read_image(i))
        vals = np.unique(got[got != 255])
        assert allowed[i, vals].all()
    assert res.stack.provenance["image_labels"] == "array"
    few = merge_images(sets, res.selection, [0, 2], backend="cpu", image_labels=allowed)
    np.testing.assert_array_equal(few[1], res.stack.read_image(2))


def test_image_strategy_ranks_by_image_labels(stack_factory):
    """The naive variant ranks classes by the image labels when given, not by the gt masks."""
    gt = stack_factory("gt", [np.array([[1, 2]], np.uint8), np.array([[2, 0]], np.uint8),
                              np.array([[0, 0]], np.uint8)], kind="gt", num_classes=3)
    a = [np.array([[1, 1]], np.uint8), np.array([[1, 0]], np.uint8), np.array([[1, 2]], np.uint8)]
    b = [np.array([[2, 2]], np.uint8), np.array([[2, 2]], np.uint8), np.array([[2, 1]], np.uint8)]
    sa = stack_factory("a", a, num_classes=3, name="A")
    sb = stack_factory("b", b, num_classes=3, name="B")
    # labels: class 1 in every image (also where the gt has none: labels from annotations), class 2 in none
    labels = np.array([[1, 1, 0], [1, 1, 0], [1, 1, 0]], bool)
    res = merge([sa, sb], gt, str(os.path.dirname(gt.path)) + "/ens", strategy="image", backend="cpu",
                image_labels=labels, progress=False)
    assert res.info["instances"] == {"c1": 3, "c2": 0} and res.info["rank"] == ["c1", "c2"]
    best1 = res.selection.mapping()["c1"]
    src = {"A": a, "B": b}[best1]
    for i in range(3):
        want = _drop_reference(src[i], labels[i])
        np.testing.assert_array_equal(res.stack.read_image(i), want)


@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("per_image", [False, True])
@pytest.mark.parametrize("chunks,strategy,labels", [((2, 8, 8), "class", False), ((3, 4, 5), "class", False),
                                                    ((2, 8, 8), "class", True), ((2, 8, 8), "image", False)])
def test_merge_counter_counts_like_evaluate(tmp_path, rng, policy, per_image, chunks, strategy, labels):
    """``merge(counter=...)``: the counts made in the merge kernel's pass (class strategy, whole images or
    tiles, image labels) or after it (image strategy) equal ``evaluate`` of the stored ensemble; the store is
    the one a merge without a counter writes, byte for byte."""
    from isle_fast.ensemble.evaluate import ChunkCounts

    gt = write_stack(str(tmp_path / "gt"), label_imgs(rng, p_abstain=0.1), kind="gt", num_classes=C,
                     chunks=chunks)
    sets = [write_stack(str(tmp_path / f"s{k}"), label_imgs(rng), num_classes=C, chunks=chunks, name="ABC"[k])
            for k in range(3)]
    kw = dict(policy=policy, strategy=strategy, backend="cpu", progress=False,
              image_labels=rng.random((len(SHAPES), C)) < 0.7 if labels else None)
    counter = ChunkCounts(gt, backend="cpu", per_image=per_image)
    res = merge(sets, gt, str(tmp_path / "ens"), counter=counter, **kw)
    assert res.each_chunk_ran
    plain = merge(sets, gt, str(tmp_path / "plain"), **kw)
    assert np.array_equal(np.asarray(res.stack.array[:]), np.asarray(plain.stack.array[:]))
    check_padding(res.stack)
    direct = evaluate([res.stack], gt, backend="cpu", progress=False, per_image=per_image)
    fused = counter.evaluation(res.stack)
    assert np.array_equal(fused.counts, direct.counts)
    assert (fused.image_stats is None) == (not per_image)
    if per_image:
        assert np.array_equal(fused.image_stats, direct.image_stats)
    with pytest.raises(ValueError, match="another gt"):
        merge(sets, gt, str(tmp_path / "other"), counter=ChunkCounts(sets[0], backend="cpu"), **kw)


@pytest.mark.parametrize("average", ["dataset", "image"])
@pytest.mark.parametrize("chunks", [(2, 8, 8), (3, 4, 5)])
def test_each_chunk_sees_the_stored_ensemble_and_counts_like_evaluate(tmp_path, rng, average, chunks):
    """``merge(each_chunk=...)`` gets each chunk as stored; ``ChunkCounts`` of them equal ``evaluate``."""
    from isle_fast.ensemble.evaluate import ChunkCounts

    gt = write_stack(str(tmp_path / "gt"), label_imgs(rng, p_abstain=0.1), kind="gt", num_classes=C,
                     chunks=chunks)
    sets = [write_stack(str(tmp_path / f"s{k}"), label_imgs(rng), num_classes=C, chunks=chunks, name="ABC"[k])
            for k in range(3)]
    counter = ChunkCounts(gt, average=average, backend="cpu")
    seen = {}

    def each_chunk(start, labels):
        counter.add(start, labels)
        seen[start] = labels.copy()

    res = merge(sets, gt, str(tmp_path / "ens"), backend="cpu", progress=False, each_chunk=each_chunk)
    assert res.each_chunk_ran
    stored = np.asarray(res.stack.array[:])
    grid = [range(0, n, c) for n, c in zip(stored.shape, chunks)]
    assert sorted(seen) == sorted((i, r, c) for i in grid[0] for r in grid[1] for c in grid[2])
    for (i, r, c), lab in seen.items():
        assert np.array_equal(stored[i:i + lab.shape[0], r:r + lab.shape[1], c:c + lab.shape[2]], lab)
    direct = evaluate([res.stack], gt, average=average, backend="cpu", progress=False)
    fused = counter.evaluation(res.stack)
    assert np.array_equal(fused.counts, direct.counts) and fused.set_names == direct.set_names
    assert (fused.image_stats is None) == (direct.image_stats is None)
    if direct.image_stats is not None:
        assert np.array_equal(fused.image_stats, direct.image_stats)
    assert np.array_equal(fused.iou, direct.iou, equal_nan=True)
    with pytest.raises(RuntimeError, match="expected"):          # a chunk that never came is an error
        ChunkCounts(gt, average=average, backend="cpu").evaluation(res.stack)
