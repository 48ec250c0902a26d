"""Refinement plug-in interface: registry, entry points, chain runner, stores, CLI."""

from __future__ import annotations

import importlib.metadata
import os

import numpy as np
import pytest
from _refine_data import write_stores
from hypothesis import given, settings
from hypothesis import strategies as st

from isle_fast.cli import main
from isle_fast.errors import InputError, StoreError
from isle_fast.refinement.chain import (
    ENTRY_POINT_GROUP,
    RefineChunk,
    Refinement,
    SparseScores,
    apply_chain,
    available_refinements,
    compact_slots,
    dense_to_slots,
    get_refinement,
    make_chain,
    parse_chain,
    parse_params,
    refine_stack,
    register_refinement,
    shutdown_pool,
    slots_to_dense,
    unregister_refinement,
)
from isle_fast.stores.sparse import sparsify
from isle_fast.stores.stack import create_stack, open_stack, quantize_scores
from isle_fast.synthetic.scene import synthetic_scene


class Shift(Refinement):
    """Test refinement: labels + k (mod C); scores rolled by k classes. Writes junk into the padding."""

    needs_rgb = False

    def __init__(self, k: int = 1, fail_at: int = -1):
        self.k, self.fail_at = k, fail_at

    def params(self):
        return {"k": self.k}

    def refine(self, chunk: RefineChunk) -> np.ndarray:
        if self.fail_at >= 0 and chunk.start <= self.fail_at < chunk.start + len(chunk):
            raise RuntimeError("boom")
        c = chunk.num_classes
        if chunk.encoding == "labels":
            d = chunk.data.astype(np.int64)
            return np.where(d < c, (d + self.k) % c, 7).astype(np.uint8)
        return np.roll(chunk.data, self.k, axis=-1) + 0.5  # padding gets 0.5: the runner resets it


@pytest.fixture
def shift():
    register_refinement("shift", Shift, overwrite=True)
    yield
    unregister_refinement("shift")


def test_parse_params_and_chain():
    assert parse_chain("affinity, crf") == ["affinity", "crf"]
    assert parse_params(["crf.iterations=5", "crf.gt_prob=0.8", "affinity.backbone=resnet18",
                         "crf.output=labels", "affinity.train=false"]) == {
        "crf": {"iterations": 5, "gt_prob": 0.8, "output": "labels"},
        "affinity": {"backbone": "resnet18", "train": False}}
    assert parse_params({"crf.iterations": 3, "affinity": {"logt": 4}}) == {
        "crf": {"iterations": 3}, "affinity": {"logt": 4}}
    for bad in (["crf"], ["iterations=5"], ["crf.=5"]):
        with pytest.raises(InputError):
            parse_params(bad)
    with pytest.raises(InputError):
        parse_chain(" , ")


def test_registry_call_and_decorator():
    assert {"crf", "affinity"} <= set(available_refinements())

    @register_refinement("double-it")
    def factory(scale: int = 2):
        def f(chunk):
            return chunk.data * scale
        return f

    try:
        assert get_refinement("double-it") is factory
        (r,) = make_chain("double-it", ["double-it.scale=3"])
        chunk = RefineChunk(np.full((1, 2, 2, 2), 0.1, np.float32), "scores", np.array([[2, 1]]), None,
                            ("bg", "x"), ["a"])
        out = apply_chain([r], chunk)
        np.testing.assert_allclose(out.data[0, :, 0], 0.3)
        assert (out.data[0, :, 1] == 0).all()  # padding reset
        assert r.params() == {"scale": 3}
        with pytest.raises(InputError, match="already registered"):
            register_refinement("double-it", lambda: None)
        with pytest.raises(InputError, match="no parameter 'bogus'"):
            make_chain("double-it", ["double-it.bogus=1"])
    finally:
        unregister_refinement("double-it")
    with pytest.raises(InputError, match="unknown refinement 'double-it'"):
        make_chain("double-it")
    with pytest.raises(InputError, match="not in the chain"):
        make_chain("crf", ["affinity.logt=3"])
    with pytest.raises(InputError, match="letters"):
        register_refinement("a b", Shift)


class _EP:
    def __init__(self, name, value, obj=None, error=None):
        self.name, self.value, self.group, self._obj, self._error = name, value, ENTRY_POINT_GROUP, obj, error

    def load(self):
        if self._error:
            raise ImportError(self._error)
        return self._obj


def test_entry_point_refinements(monkeypatch, tmp_path):
    eps = [_EP("third-party", "pkg.mod:Shift", obj=Shift), _EP("broken", "nope.mod:x", error="No module 'nope'")]
    seen = []

    def fake_entry_points(**kw):
        seen.append(kw)
        return [e for e in eps if kw.get("group") == e.group]

    monkeypatch.setattr(importlib.metadata, "entry_points", fake_entry_points)
    try:
        assert {"third-party", "broken"} <= set(available_refinements())
        assert get_refinement("third-party") is Shift
        assert {"group": ENTRY_POINT_GROUP} in seen
        with pytest.raises(InputError, match="failed to load"):
            get_refinement("broken")
        _, src, *_ = write_stores(tmp_path, n=3, encoding="labels")
        out = refine_stack(src, None, tmp_path / "ep.zarr", ["third-party"], ["third-party.k=2"], workers=1,
                           progress=False)
        assert out.provenance["refinements"] == [{"name": "third-party", "params": {"k": 2}}]
    finally:
        unregister_refinement("third-party")


@pytest.mark.parametrize("encoding", ["labels", "scores"])
def test_chain_runner_writes_complete_store_with_provenance(tmp_path, shift, encoding):
    img, src, _, _, _, shapes = write_stores(tmp_path, n=5, encoding=encoding)
    s = open_stack(src)
    before = s.array[:].copy()
    out = refine_stack(src, img, tmp_path / "out.zarr", "shift,shift", ["shift.k=1"], workers=2,
                       scheduler="threads", images_per_task=2, name="shifted", progress=False)
    assert out.name == "shifted" and out.kind == "pseudo" and out.encoding == encoding
    assert out.ids == s.ids and (out.shapes == s.shapes).all() and out.chunks[0] == 2
    prov = out.provenance
    assert prov["refined_from"] == s.path and prov["images"] == str(img)
    assert prov["refinements"] == [{"name": "shift", "params": {"k": 1}}] * 2
    assert prov["chain"] == ["shift", "shift"] and prov["scheduler"] == "threads"
    np.testing.assert_array_equal(open_stack(src).array[:], before)  # input untouched
    for i, (h, w) in enumerate(shapes):
        if encoding == "labels":
            np.testing.assert_array_equal(out.read_image(i), (s.read_image(i) + 2) % 4)
            assert (out.array[i][h:] == 255).all() and (out.array[i][:, w:] == 255).all()
        else:
            # two steps: roll by 2, +0.5 twice, clipped to 1, stored as uint8
            want = np.rint(np.clip(np.roll(s.read_image(i) / 255.0, 2, -1) + 1.0, 0, 1) * 255)
            np.testing.assert_array_equal(out.read_image(i), want.astype(np.uint8))
            assert not out.array[i][h:].any() and not out.array[i][:, w:].any()
    assert sorted(os.listdir(tmp_path)) == ["images.zarr", "out.zarr", "set.zarr"]


def test_failure_leaves_no_output(tmp_path, shift):
    _, src, *_ = write_stores(tmp_path, n=4, encoding="labels")
    with pytest.raises(RuntimeError, match="boom"):
        refine_stack(src, None, tmp_path / "out.zarr", "shift", {"shift.fail_at": 2}, workers=1,
                     images_per_task=1, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["images.zarr", "set.zarr"]


def test_user_errors(tmp_path, shift):
    img, src, *_ = write_stores(tmp_path, n=3, encoding="labels")
    with pytest.raises(InputError, match="needs the RGB images: pass images"):
        refine_stack(src, None, tmp_path / "o.zarr", "crf", progress=False)
    with pytest.raises(InputError, match="never modifies"):
        refine_stack(src, img, src, "shift", progress=False)
    with pytest.raises(InputError, match="'images'"):
        refine_stack(src, src, tmp_path / "o.zarr", "shift", progress=False)
    with pytest.raises(InputError, match="labels or scores"):
        refine_stack(img, img, tmp_path / "o.zarr", "shift", progress=False)
    refine_stack(src, None, tmp_path / "o.zarr", "shift", workers=1, progress=False)
    with pytest.raises(StoreError, match="exists"):
        refine_stack(src, None, tmp_path / "o.zarr", "shift", workers=1, progress=False)
    refine_stack(src, None, tmp_path / "o.zarr", "shift", workers=1, progress=False, overwrite=True)
    # misaligned image store
    other = tmp_path / "other"
    other.mkdir()
    img2, *_ = write_stores(other, n=4, encoding="labels")
    with pytest.raises(StoreError):
        refine_stack(src, img2, tmp_path / "o2.zarr", "shift", workers=1, progress=False)


class SeesLabels(Refinement):
    """Test refinement: labels out, each image filled with its highest image-level class; records what
    encoding its ``prepare`` was told it gets."""

    needs_rgb = False

    def __init__(self):
        self.saw = None

    def prepare(self, context):
        self.saw = context.encoding

    def params(self):
        return {"saw": self.saw}

    def output_encoding(self, input_encoding):
        return "labels"

    def refine(self, chunk):
        out = np.full(chunk.data.shape[:3], 255, np.uint8)
        for i, (h, w) in enumerate(chunk.shapes):
            out[i, :h, :w] = np.nonzero(chunk.image_labels[i])[0].max()
        return out


@pytest.mark.parametrize("per_task,scheduler", [(1, "sync"), (3, "threads"), (2, "processes")])
def test_image_labels_reach_every_block_in_image_order(tmp_path, per_task, scheduler):
    register_refinement("sees-labels", SeesLabels, overwrite=True)
    try:
        img, src, _, _, _, shapes = write_stores(tmp_path, n=7, encoding="scores")
        labels = np.random.default_rng(1).random((7, 4)) < 0.5  # (I, C): the background column is ignored
        labels[0] = False
        out = refine_stack(src, None, tmp_path / "o.zarr", "sees-labels,sees-labels", image_labels=labels,
                           images_per_task=per_task, workers=2, scheduler=scheduler, progress=False)
        for i in range(7):
            top = max([0] + [c for c in range(1, 4) if labels[i, c]])
            assert (out.read_image(i) == top).all()
        assert [r["params"]["saw"] for r in out.provenance["refinements"]] == ["scores", "labels"]
        assert out.provenance["image_labels"] == "given"
        with pytest.raises(InputError, match="booleans or 0 / 1"):
            refine_stack(src, None, tmp_path / "x.zarr", "sees-labels", image_labels=labels * 2,
                         progress=False)
    finally:
        unregister_refinement("sees-labels")
        shutdown_pool()


def test_synthetic_scene_smaller_than_its_blur():
    """np.convolve(mode='same') returns the kernel's length when the row is shorter: a 30 x 41 scene with the
    default blur (kernel of 37) failed to broadcast."""
    for h, w in [(30, 41), (1, 1), (5, 60), (40, 56)]:
        rgb, gt, sc = synthetic_scene(h, w, 4, rng=1)
        assert rgb.shape == (h, w, 3) and gt.shape == (h, w) and sc.shape == (h, w, 4)
        assert np.isfinite(sc).all() and sc.min() >= 0 and sc.max() <= 1


def test_processes_threads_and_sync_agree(tmp_path):
    img, src, *_ = write_stores(tmp_path, n=4, encoding="scores")
    kw = dict(params={"crf.iterations": 2}, images_per_task=1, progress=False)
    a = refine_stack(src, img, tmp_path / "p.zarr", "crf", workers=2, scheduler="processes", **kw)
    b = refine_stack(src, img, tmp_path / "t.zarr", "crf", workers=2, scheduler="threads", **kw)
    c = refine_stack(src, img, tmp_path / "s.zarr", "crf", workers=1, **kw)
    d = refine_stack(src, img, tmp_path / "d.zarr", "crf", workers=2, scheduler="processes", **kw)  # pool reused
    shutdown_pool()
    # auto: a set this small runs in one process (starting workers would cost more)
    e = refine_stack(src, img, tmp_path / "e.zarr", "crf", workers=2, **kw)
    assert e.provenance["scheduler"] == "sync"
    np.testing.assert_array_equal(a.array[:], e.array[:])
    assert a.provenance["scheduler"] == "processes" and c.provenance["scheduler"] == "sync"
    np.testing.assert_array_equal(a.array[:], b.array[:])
    np.testing.assert_array_equal(a.array[:], c.array[:])
    np.testing.assert_array_equal(a.array[:], d.array[:])


def test_cli_refine(tmp_path, capsys):
    img, src, *_ = write_stores(tmp_path, n=3, encoding="scores")
    out = tmp_path / "cli.zarr"
    rc = main(["refine", src, "--images", img, "--with", "crf", "--out", str(out), "--param",
               "crf.iterations=2", "--param", "crf.output=labels", "--workers", "1"])
    assert rc == 0
    st = open_stack(out)
    assert st.encoding == "labels" and st.provenance["refinements"][0]["params"]["iterations"] == 2
    assert "isle refine" in capsys.readouterr().out
    rc = main(["refine", src, "--images", img, "--with", "crf", "--out", str(tmp_path / "x.zarr"),
               "--param", "crf.nope=1", "--quiet"])
    assert rc == 2 and "crf.nope" in capsys.readouterr().err
    assert main(["refine", "--list"]) == 0 and "crf" in capsys.readouterr().out
    assert main(["refine", src, "--images", img]) == 2  # no --out


# ----------------------------------------------------------------------------------------------
# Class-sparse score stores through the chain
# ----------------------------------------------------------------------------------------------


@st.composite
def _dense_scores(draw):
    """(k, H, W, C) float32 scores in [0, 1]: per image a random subset of classes nonzero (maybe none)."""
    k, h, w, c = (draw(st.integers(1, 4)), draw(st.integers(1, 5)), draw(st.integers(1, 6)),
                  draw(st.integers(2, 6)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    s = rng.random((k, h, w, c)).astype(np.float32)
    s[rng.random(s.shape) < 0.3] = 0.0
    s[..., 1:] *= (rng.random((k, 1, 1, c - 1)) < 0.5)      # classes absent from an image
    if rng.random() < 0.5:                                    # ties, and values on the steps
        s = np.round(s * 4) / 4
    return s


@settings(max_examples=60, deadline=None)
@given(_dense_scores())
def test_slot_helpers_equal_the_dense_scores(s):
    """NumPy reference: dense -> slots -> dense is the identity; quantizing the slots (what a class-sparse
    refine output stores) gives the dense store's values; compacting keeps exactly the nonzero classes."""
    slots, keys = dense_to_slots(s)
    k, c = s.shape[0], s.shape[-1]
    assert keys.shape == (k, slots.shape[-1] - 1)
    for m in range(k):
        want = [cl for cl in range(1, c) if s[m, ..., cl].max() > 0]
        assert [int(v) for v in keys[m] if v] == want
    np.testing.assert_array_equal(slots_to_dense(slots, keys, c), s)
    q = quantize_scores(slots, np.uint8)
    dense_q = quantize_scores(s, np.uint8)
    np.testing.assert_array_equal(slots_to_dense(q, keys, c), dense_q)
    fg, kept = compact_slots(q, keys)
    back = np.concatenate([q[..., :1], fg], axis=-1)
    np.testing.assert_array_equal(slots_to_dense(back, kept, c), dense_q)
    for m in range(k):
        assert [int(v) for v in kept[m] if v] == [cl for cl in range(1, c) if dense_q[m, ..., cl].any()]


def _cam_stores(root, n=7, seed=0, chunk=2):
    """A dense uint8 CAM store (background the constant threshold, per image a random subset of its classes,
    image 3 none at all) and its class-sparse form; images and a gt beside. Returns the paths."""
    img, _, rgbs, gts, scores, shapes = write_stores(root, n=n, seed=seed, encoding="scores", hmin=17,
                                                     hmax=31, wmin=19, wmax=37)
    rng = np.random.default_rng(seed)
    ids = [f"im{i:03d}" for i in range(n)]
    classes = ["background", "a", "b", "c"]
    h_pad, w_pad = max(h for h, _ in shapes), max(w for _, w in shapes)
    with create_stack(root / "cam.zarr", kind="pseudo", classes=classes, ids=ids, shapes=shapes,
                      encoding="scores", chunks=(chunk, h_pad, w_pad, 4)) as wr:
        for i in range(n):
            s = np.rint(scores[i] * 255).astype(np.uint8)
            s[..., 1:][..., rng.random(3) < 0.4] = 0
            if i == 3:
                s[..., 1:] = 0
            s[..., 0] = 51
            wr.write_image(i, s)
    with create_stack(root / "gt.zarr", kind="gt", classes=classes, ids=ids, shapes=shapes) as wr:
        for i in range(n):
            wr.write_image(i, gts[i].astype(np.uint8))
    sparse = sparsify(root / "cam.zarr", root / "sparse.zarr")
    assert sparse.score_layout == "sparse" and not sparse.sparse_keys[3].any()
    return img, str(root / "cam.zarr"), str(sparse.path), str(root / "gt.zarr")


def _walk_checkpoint(path) -> str:
    """A randomly initialised small AffinityNet checkpoint (loaded, not trained, by the refinement)."""
    torch = pytest.importorskip("torch")
    from isle_fast.refinement.affinity import AffinityNet, _config, _save

    torch.manual_seed(0)
    _save(str(path), AffinityNet("resnet18", None, stride=4, dim=16), None, 1, 0,
          _config("resnet18", 4, 16, 2, 1))
    return str(path)


_WALK = ["affinity.train=false", "affinity.epochs=1", "affinity.radius=2", "affinity.logt=2",
         "affinity.backbone=resnet18", "affinity.stride=4", "affinity.device=cpu"]
_CHAINS = {
    "crf": ("crf", ["crf.iterations=3"]),
    "crf-labels": ("crf", ["crf.iterations=3", "crf.output=labels"]),
    "crf-nonzero": ("crf", ["crf.iterations=3", "crf.keep=nonzero"]),
    "shift": ("shift", ["shift.k=1"]),   # a plug-in without sparse_input: it gets the dense form
    "affinity": ("affinity", _WALK),
    "affinity-stored-bg": ("affinity", _WALK + ["affinity.background=stored"]),
    "affinity,crf": ("affinity,crf", _WALK + ["crf.iterations=3"]),
}


@pytest.fixture
def one_torch_thread():
    """One torch thread while a test runs (the walk's network on tiny images; the machine is shared)."""
    torch = pytest.importorskip("torch")
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.mark.parametrize("name", list(_CHAINS))
def test_sparse_refine_equals_dense(tmp_path, request, shift, name):
    """A class-sparse set refined natively gives exactly the dense set's refined scores / labels, in either
    output layout; tasks of 3 images cross the source's 2-image chunks; image 3 has no class."""
    walk = name.startswith("affinity")
    img, dense, sparse, _ = _cam_stores(tmp_path, n=5 if walk else 7)
    chain, params = _CHAINS[name]
    if walk:
        request.getfixturevalue("one_torch_thread")
        params = [f"affinity.checkpoint={_walk_checkpoint(tmp_path / 'walk.pt')}", *params]
    kw = dict(workers=1, images_per_task=3, progress=False)
    ref = refine_stack(dense, img, tmp_path / "d.zarr", chain, params, **kw)
    out = refine_stack(sparse, img, tmp_path / "s.zarr", chain, params, **kw)
    labels = name == "crf-labels"
    assert ref.encoding == out.encoding == ("labels" if labels else "scores")
    np.testing.assert_array_equal(out.array[:], ref.array[:])
    if not labels:
        to_sparse = refine_stack(dense, img, tmp_path / "ds.zarr", chain, params, layout="sparse", **kw)
        assert ref.score_layout == "dense" and out.score_layout == to_sparse.score_layout == "sparse"
        assert out.provenance["score_layout"] == "sparse" and ref.provenance["score_layout"] == "dense"
        assert out.attrs["background_level"] == "stored"
        np.testing.assert_array_equal(to_sparse.array[:], ref.array[:])
        np.testing.assert_array_equal(to_sparse.sparse_keys, out.sparse_keys)
        # the keys are the classes the stored scores hold (as sparsify keys them), K the most an image has
        for i in range(ref.num_images):
            want = [c for c in range(1, 4) if ref.read_image(i)[..., c].any()]
            assert [int(c) for c in out.sparse_keys[i] if c] == want
        assert out.sparse_keys.shape[1] == max(1, int((out.sparse_keys > 0).sum(axis=1).max()))
        if name != "shift":   # the CRF and the walk never invent a class: image 3 stays background only
            assert not out.sparse_keys[3].any()
    if not walk:
        to_dense = refine_stack(sparse, img, tmp_path / "sd.zarr", chain, params, layout="dense", **kw)
        assert to_dense.encoding == "labels" or to_dense.score_layout == "dense"
        np.testing.assert_array_equal(to_dense.array[:], ref.array[:])
    assert out.provenance["refinements"] == ref.provenance["refinements"]
    assert out.provenance["refined_from"] == open_stack(sparse).path
    assert sorted(p.name for p in tmp_path.iterdir() if ".tmp-" in p.name) == []


def test_refined_sparse_store_views_and_info(tmp_path, capsys):
    """The dense view of a refined class-sparse store (per-pixel background) is the same through every
    reader; isle info shows its layout; its stored scores take fewer slots than classes."""
    img, dense, sparse, _ = _cam_stores(tmp_path, n=5, seed=3)
    out = refine_stack(sparse, img, tmp_path / "r.zarr", "crf", ["crf.iterations=2"], workers=1,
                       images_per_task=2, progress=False)
    full = out.array[:]
    assert full.shape == out.shape == (5,) + out.padded_shape + (4,)
    np.testing.assert_array_equal(out.to_dask().compute(), full)
    for i, (h, w) in enumerate(out.shapes):
        np.testing.assert_array_equal(out.read_image(i), full[i, :h, :w])
        assert not full[i, h:].any() and not full[i, :, w:].any()
    np.testing.assert_array_equal(out.array[1, 2, :, 0], full[1, 2, :, 0])
    np.testing.assert_array_equal(out.array[1:4, :, 3], full[1:4, :, 3])
    assert out.cams_meta.shape[3] < 3 and "background" in out.array_names
    assert main(["info", str(out.path)]) == 0
    text = capsys.readouterr().out
    assert "layout      sparse" in text and "background stored per pixel" in text
    assert main(["info", str(sparse)]) == 0 and "background level 51" in capsys.readouterr().out
    assert main(["info", "--check", "--quiet", str(out.path)]) == 0
    # a damaged attribute or a missing background array is an error, never a constant background
    import json
    import shutil

    bad = tmp_path / "bad.zarr"
    shutil.copytree(out.path, bad)
    shutil.rmtree(bad / "background")
    with pytest.raises(StoreError, match="background"):
        open_stack(bad)
    doc = json.loads((tmp_path / "r.zarr" / "zarr.json").read_text())
    doc["attributes"]["background_level"] = 51
    shutil.rmtree(bad)
    shutil.copytree(out.path, bad)
    (bad / "zarr.json").write_text(json.dumps(doc))
    with pytest.raises(StoreError, match="checksum"):
        open_stack(bad)


def test_refine_sparse_then_threshold_sweep_and_merge(tmp_path, capsys):
    """refine -> evaluate --bg-threshold A:B:STEP -> merge --bg-threshold best on class-sparse refined sets
    gives the dense refined sets' curves, best thresholds and ensemble."""
    img, dense, sparse, gt = _cam_stores(tmp_path, n=6, seed=5)
    import json

    res = {}
    for lay, src in (("dense", dense), ("sparse", sparse)):
        sets = []
        for chain, params in (("crf", ["crf.iterations=2"]), ("crf", ["crf.iterations=4"])):
            p = tmp_path / f"{lay}{len(sets)}.zarr"
            assert main(["refine", src, "--images", img, "--with", chain, "--out", str(p), "--quiet",
                         "--workers", "1", "--images-per-task", "4", "--name", f"set{len(sets)}"]
                        + [x for q in params for x in ("--param", q)]) == 0
            assert open_stack(p).score_layout == lay
            sets.append(str(p))
        js = tmp_path / f"{lay}.json"
        assert main(["evaluate", *sets, "--gt", gt, "--bg-threshold", "0.05:0.8:0.05", "--quiet",
                     "--json", str(js)]) == 0
        plain = tmp_path / f"{lay}-plain.json"
        assert main(["evaluate", *sets, "--gt", gt, "--quiet", "--json", str(plain)]) == 0
        ens = tmp_path / f"{lay}-ens.zarr"
        assert main(["merge", *sets, "--gt", gt, "--bg-threshold", "best", "--out", str(ens), "--quiet"]) == 0
        # no threshold: a refined class-sparse store has its background per pixel, no stored level
        # (the one-threshold sweep's shortcut must not take it; the demo's merge failed on it)
        plain0 = tmp_path / f"{lay}-plain0.json"
        assert main(["evaluate", *sets, "--gt", gt, "--quiet", "--bootstrap", "0", "--json", str(plain0)]) == 0
        ens0 = tmp_path / f"{lay}-ens0.zarr"
        assert main(["merge", *sets, "--gt", gt, "--out", str(ens0), "--quiet"]) == 0
        doc = json.loads(js.read_text())["threshold_sweep"]
        res[lay] = (doc, json.loads(plain.read_text()), open_stack(ens), json.loads(plain0.read_text()),
                    open_stack(ens0))
    capsys.readouterr()
    (ds, dp, de, dp0, de0), (ss, sp, se, sp0, se0) = res["dense"], res["sparse"]

    def strip(d):
        if isinstance(d, dict):
            return {k: strip(v) for k, v in d.items() if k not in ("set_paths", "gt_path", "seconds", "paths",
                                                                    "path", "command", "isle")}
        if isinstance(d, list):
            return [strip(v) for v in d]
        return d

    assert strip(ds) == strip(ss) and set(ds["sets"]) == {"set0", "set1"}
    assert any(len(set(v["miou"])) > 1 for v in ds["sets"].values())   # the threshold matters here
    assert strip(dp["sets"]) == strip(sp["sets"])
    assert strip(dp0["sets"]) == strip(sp0["sets"])
    np.testing.assert_array_equal(de0.array[:], se0.array[:])
    np.testing.assert_array_equal(de.array[:], se.array[:])
    assert se.provenance["bg_thresholds"] == de.provenance["bg_thresholds"]
    assert se.provenance["bg_threshold"] == "best"


def test_sparse_layout_errors_and_failure(tmp_path, shift, capsys):
    img, dense, sparse, _ = _cam_stores(tmp_path, n=4)
    with pytest.raises(InputError, match="uint8"):
        refine_stack(sparse, img, tmp_path / "f.zarr", "crf", layout="sparse", score_dtype="float32",
                     progress=False)
    with pytest.raises(InputError, match="label maps"):
        refine_stack(sparse, img, tmp_path / "f.zarr", "crf", ["crf.output=labels"], layout="sparse",
                     progress=False)
    with pytest.raises(InputError, match="layout"):
        refine_stack(sparse, img, tmp_path / "f.zarr", "crf", layout="csr", progress=False)
    # a float output of a class-sparse set follows the score dtype: dense
    f = refine_stack(sparse, img, tmp_path / "f.zarr", "crf", ["crf.iterations=1"], score_dtype="float32",
                     workers=1, progress=False)
    assert f.score_layout == "dense" and f.dtype == np.float32
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(RuntimeError, match="boom"):
        refine_stack(sparse, None, tmp_path / "out.zarr", "shift", {"shift.fail_at": 2}, workers=1,
                     images_per_task=1, progress=False)
    assert sorted(os.listdir(tmp_path)) == before   # no output, no blocks folder left
    with pytest.raises(SystemExit):
        main(["refine", "--help"])
    assert "--layout" in capsys.readouterr().out
    assert main(["refine", sparse, "--images", img, "--out", str(tmp_path / "c.zarr"), "--layout", "dense",
                 "--param", "crf.iterations=1", "--quiet", "--workers", "1"]) == 0
    assert open_stack(tmp_path / "c.zarr").score_layout == "dense"


def test_sparse_chunk_reaches_sparse_refinements_only(tmp_path):
    """A refinement with sparse_input gets the slots and keys; the others the dense form; a bad
    SparseScores is an error naming the refinement."""
    seen = []

    class Slots(Refinement):
        needs_rgb = False
        sparse_input = True

        def refine(self, chunk):
            seen.append(("slots", chunk.keys is not None, chunk.data.shape[-1]))
            return chunk.data * 0.5 if chunk.keys is None else SparseScores(chunk.data * 0.5, chunk.keys)

    class Dense(Refinement):
        needs_rgb = False

        def refine(self, chunk):
            seen.append(("dense", chunk.keys is not None, chunk.data.shape[-1]))
            return chunk.data

    class Bad(Refinement):
        needs_rgb = False
        sparse_input = True

        def refine(self, chunk):
            return SparseScores(chunk.data, chunk.keys[:, ::-1].copy() + 7)

    _, dense, sparse, _ = _cam_stores(tmp_path, n=4)
    src = open_stack(sparse)
    for name, cls in (("slots", Slots), ("dense", Dense), ("bad", Bad)):
        register_refinement(name, cls, overwrite=True)
    try:
        a = refine_stack(sparse, None, tmp_path / "a.zarr", "slots,dense,slots", workers=1, images_per_task=4,
                         progress=False)
        k = src.sparse_keys.shape[1]
        assert seen == [("slots", True, 1 + k), ("dense", False, 4), ("slots", False, 4)]
        b = refine_stack(dense, None, tmp_path / "b.zarr", "dense", workers=1, progress=False, layout="sparse")
        assert b.score_layout == "sparse"
        np.testing.assert_array_equal(b.array[:], open_stack(dense).array[:])
        with pytest.raises(InputError, match="'bad'"):
            refine_stack(sparse, None, tmp_path / "c.zarr", "bad", workers=1, progress=False)
        assert a.score_layout == "sparse"
    finally:
        for name in ("slots", "dense", "bad"):
            unregister_refinement(name)
