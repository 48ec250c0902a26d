"""Refinement plug-in interface: registry, entry points, chain runner, stores, CLI."""

from __future__ import annotations

import importlib.metadata
import os

import numpy as np
import pytest
from _refine_data import write_stores

from isle_fast.cli import main
from isle_fast.errors import InputError, StoreError
from isle_fast.refinement.chain import (
    ENTRY_POINT_GROUP,
    RefineChunk,
    Refinement,
    apply_chain,
    available_refinements,
    get_refinement,
    make_chain,
    parse_chain,
    parse_params,
    refine_stack,
    register_refinement,
    shutdown_pool,
    unregister_refinement,
)
from isle_fast.stores.stack import open_stack
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
