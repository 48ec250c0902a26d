"""Stack stores: atomic commit, refusal of broken / foreign stores, alignment checks, overwrite, round trips."""

from __future__ import annotations

import os

import numpy as np
import pytest
from _scores import tricky_scores
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import quantize_scores_u8

from isle_fast.errors import AlignmentError, InputError, StoreError
from isle_fast.stores.stack import (
    FORMAT_VERSION,
    TARGET_CHUNK_BYTES,
    check_aligned,
    create_stack,
    default_chunks,
    default_compressors,
    open_stack,
)

CLASSES = ["bg", "a", "b"]


def small(path, ids=("x", "y"), shapes=((3, 4), (2, 5)), value=1, **kw):
    with create_stack(path, kind=kw.pop("kind", "pseudo"), classes=kw.pop("classes", CLASSES), ids=ids,
                      shapes=shapes, **kw) as w:
        for i, (h, wd) in enumerate(shapes):
            tail = w.array.shape[3:]
            w.write_image(i, np.full((h, wd) + tail, value, dtype=w.array.dtype))
    return open_stack(path)


def test_round_trip_and_padding(tmp_path):
    s = small(tmp_path / "s.zarr")
    assert s.ids == ["x", "y"] and s.padded_shape == (3, 5) and s.name == "s"
    assert (s.read_image("y") == 1).all() and s.read_image("y").shape == (2, 5)
    full = s.array[:]
    assert (full[0, :, 4] == 255).all() and (full[1, 2] == 255).all()
    assert s.valid_mask(0, 2).sum() == 12 + 10
    assert s.describe()["pixels"] == 22


def test_exception_inside_create_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with create_stack(tmp_path / "s.zarr", kind="gt", classes=CLASSES, ids=["a"], shapes=[(2, 2)]) as w:
            w.write_image(0, np.zeros((2, 2), np.uint8))
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_abort_keeps_old_store_on_overwrite(tmp_path):
    small(tmp_path / "s.zarr", value=1)
    with pytest.raises(RuntimeError):
        with create_stack(tmp_path / "s.zarr", kind="gt", classes=CLASSES, ids=["z"], shapes=[(1, 1)],
                          overwrite=True):
            raise RuntimeError("boom")
    s = open_stack(tmp_path / "s.zarr")
    assert s.ids == ["x", "y"] and s.kind == "pseudo"
    assert os.listdir(tmp_path) == ["s.zarr"]


def test_overwrite_semantics(tmp_path):
    small(tmp_path / "s.zarr")
    with pytest.raises(StoreError, match=r"s\.zarr exists.*overwrite"):
        small(tmp_path / "s.zarr")
    s = small(tmp_path / "s.zarr", ids=("q",), shapes=((1, 2),), value=2, overwrite=True, kind="gt")
    assert s.ids == ["q"] and s.kind == "gt" and (s.read_image(0) == 2).all()
    assert os.listdir(tmp_path) == ["s.zarr"]


def test_open_refuses_missing_foreign_incomplete_and_other_versions(tmp_path):
    import zarr

    with pytest.raises(StoreError, match="nothere.zarr does not exist"):
        open_stack(tmp_path / "nothere.zarr")
    (tmp_path / "plain").mkdir()
    with pytest.raises(StoreError, match="plain is a folder but not a store"):
        open_stack(tmp_path / "plain")
    zarr.open_group(str(tmp_path / "foreign.zarr"), mode="w", zarr_format=3).attrs["x"] = 1
    with pytest.raises(StoreError, match="foreign.zarr.*not an isle-fast stack store"):
        open_stack(tmp_path / "foreign.zarr")
    small(tmp_path / "old.zarr")
    g = zarr.open_group(str(tmp_path / "old.zarr"), mode="r+")
    g.attrs["isle_format"] = FORMAT_VERSION + 1
    with pytest.raises(StoreError, match=f"old.zarr has isle_format {FORMAT_VERSION + 1}"):
        open_stack(tmp_path / "old.zarr")
    g.attrs["isle_format"] = FORMAT_VERSION
    g.attrs["complete"] = False
    with pytest.raises(StoreError, match="old.zarr is incomplete"):
        open_stack(tmp_path / "old.zarr")
    # a temp folder of a write in progress is refused too
    w = create_stack(tmp_path / "w.zarr", kind="gt", classes=CLASSES, ids=["a"], shapes=[(1, 1)])
    with pytest.raises(StoreError, match="incomplete"):
        open_stack(w.work_path)
    with pytest.raises(StoreError, match="w.zarr does not exist"):
        open_stack(tmp_path / "w.zarr")
    w.abort()
    with pytest.raises(StoreError, match="is a 'pseudo' store; expected gt"):
        g.attrs["complete"] = True
        open_stack(tmp_path / "old.zarr", kind="gt")


def test_create_rejects_bad_arguments(tmp_path):
    with pytest.raises(InputError, match="appears twice"):
        create_stack(tmp_path / "s", kind="gt", classes=CLASSES, ids=["a", "a"], shapes=[(1, 1), (1, 1)])
    with pytest.raises(InputError, match="kind must be"):
        create_stack(tmp_path / "s", kind="nope", classes=CLASSES, ids=["a"], shapes=[(1, 1)])
    with pytest.raises(InputError, match="1 ids but 2 shapes"):
        create_stack(tmp_path / "s", kind="gt", classes=CLASSES, ids=["a"], shapes=[(1, 1), (1, 1)])
    with pytest.raises(InputError, match="255 classes"):
        create_stack(tmp_path / "s", kind="gt", classes=[str(i) for i in range(256)], ids=["a"], shapes=[(1, 1)])
    assert os.listdir(tmp_path) == []


def test_check_aligned_names_store_and_id(tmp_path):
    a = small(tmp_path / "a.zarr")
    b = small(tmp_path / "b.zarr", ids=("x", "q"))
    with pytest.raises(AlignmentError, match=r"b\.zarr lacks image id 'y'.*a\.zarr"):
        check_aligned([a, b])
    c = small(tmp_path / "c.zarr", ids=("y", "x"), shapes=((2, 5), (3, 4)))
    with pytest.raises(AlignmentError, match=r"c\.zarr has the image ids of .*a\.zarr in another order"):
        check_aligned([a, c])
    d = small(tmp_path / "d.zarr", shapes=((3, 4), (2, 4)))
    with pytest.raises(AlignmentError, match=r"image 'y' is \(2, 4\) in .*d\.zarr but \(2, 5\) in .*a\.zarr"):
        check_aligned([a, d])
    e = small(tmp_path / "e.zarr", classes=["bg", "a", "c"])
    with pytest.raises(AlignmentError, match=r"e\.zarr has classes"):
        check_aligned([a, e])
    check_aligned([a, e], same_classes=False)
    f = small(tmp_path / "f.zarr", padded_shape=(4, 6))
    with pytest.raises(AlignmentError, match=r"f\.zarr is padded to \(4, 6\)"):
        check_aligned([a, f])
    check_aligned([a, small(tmp_path / "g.zarr", kind="gt")])


def test_default_chunks():
    assert default_chunks(100, 375, 500) == (min(100, TARGET_CHUNK_BYTES // (375 * 500)), 375, 500)
    big = default_chunks(3, 20000, 30000)
    assert big[0] == 1 and big[1] % 256 == 0 and big[1] * big[2] <= TARGET_CHUNK_BYTES
    assert default_chunks(2, 8000, 8000, channels=21)[-1] == 21


def test_default_compressors_are_zarr_codecs():
    for enc in (None, "labels", "scores", "rgb"):
        comp = default_compressors(enc)
        assert comp and all(hasattr(c, "to_dict") for c in comp)


def test_scores_and_rgb_layouts(tmp_path):
    s = small(tmp_path / "s.zarr", encoding="scores", value=200)
    assert s.array.shape == (2, 3, 5, 3) and s.score_scale == 255.0 and (s.array[1, 2] == 0).all()
    f = small(tmp_path / "f.zarr", encoding="scores", score_dtype="float16", value=0.5)
    assert f.score_scale == 1.0 and f.array.dtype == np.float16
    im = small(tmp_path / "i.zarr", kind="images", value=9)
    assert im.encoding == "rgb" and im.array.shape[-1] == 3
    for st_ in (s, f, im):
        d = st_.describe()
        assert d["stored_bytes"] > 0 and d["images"] == 2


@settings(max_examples=20)
@given(st.data())
def test_write_block_round_trip_random_chunks(tmp_path_factory, data):
    root = tmp_path_factory.mktemp("s")
    n = data.draw(st.integers(1, 6))
    shapes = np.array([[data.draw(st.integers(1, 9)), data.draw(st.integers(1, 9))] for _ in range(n)])
    hp, wp = shapes.max(axis=0)
    chunks = (data.draw(st.integers(1, 7)), data.draw(st.integers(1, 10)), data.draw(st.integers(1, 10)))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31)))
    full = np.full((n, hp, wp), 255, np.uint8)
    for i, (h, w) in enumerate(shapes):
        full[i, :h, :w] = rng.integers(0, 3, (h, w))
    split = data.draw(st.integers(0, n))
    with create_stack(root / "s.zarr", kind="pseudo", classes=CLASSES, ids=[f"i{k}" for k in range(n)],
                      shapes=shapes, chunks=chunks) as w:
        w.write_block(0, full[:split])
        w.write_block(split, full[split:])
    s = open_stack(root / "s.zarr")
    np.testing.assert_array_equal(s.array[:], full)
    np.testing.assert_array_equal(s.to_dask().compute(), full)
    for i, (h, w) in enumerate(shapes):
        np.testing.assert_array_equal(s.read_image(f"i{i}"), full[i, :h, :w])


# -- fast chunk reads (Stack.to_dask) -------------------------------------------------------

def _stack_with(path, value_fn, *, encoding="labels", compressors=None, chunks=(2, 3, 4)):
    shapes = np.array([[5, 7], [3, 4], [6, 2]])
    kw = dict(kind="pseudo", classes=CLASSES, ids=["a", "b", "c"], shapes=shapes, chunks=chunks)
    if encoding == "scores":
        kw.update(encoding="scores", chunks=chunks + (3,), score_dtype="float16")
    if compressors is not None:
        kw["compressors"] = compressors
    with create_stack(path, **kw) as w:
        for i, (h, wd) in enumerate(shapes):
            w.write_image(i, value_fn((h, wd) + w.array.shape[3:]).astype(w.array.dtype))
    return open_stack(path)


@pytest.mark.parametrize("encoding,compressors", [("labels", None), ("labels", ()), ("scores", None)])
def test_to_dask_fast_path_equals_zarr(tmp_path, encoding, compressors):
    import dask.array as da

    rng = np.random.default_rng(3)
    s = _stack_with(tmp_path / "s.zarr", lambda shp: rng.integers(0, 3, shp), encoding=encoding,
                    compressors=compressors)
    x = s.to_dask()
    assert x.name.startswith("isle-read-")       # the fast reader serves the default layout
    assert x.chunks == da.from_zarr(s.array).chunks
    np.testing.assert_array_equal(x.compute(), s.array[:])


# -- a store knows its chunks: missing / damaged / misplaced chunks are errors on every read path --
# (deliberate change: a missing chunk used to read as the fill value, 255, in to_dask and everywhere else)

def _readers(monkeypatch):
    """Every way a store's main array is read: the direct chunk reader, Zarr's path, one image."""
    import dask.array as da

    import isle_fast.stores.stack as S

    def zarr_fallback(s):
        monkeypatch.setattr(S, "_fast_chunk_spec", lambda array: None)
        try:
            return s.to_dask().compute()
        finally:
            monkeypatch.undo()

    return {
        "to_dask (direct reader)": lambda s: s.to_dask().compute(),
        "to_dask (from_zarr fallback)": zarr_fallback,
        "array[...] (Zarr)": lambda s: s.array[...],
        "read_image": lambda s: [s.read_image(i) for i in range(s.num_images)],
        "from_zarr(array)": lambda s: da.from_zarr(s.array).compute(),
    }


OLD_STYLE = "zstd only (a store written before checksums)"


@pytest.mark.parametrize("codecs", ["default", OLD_STYLE])
def test_missing_chunk_is_an_error_naming_store_array_chunk_and_images(tmp_path, monkeypatch, codecs):
    from zarr.codecs import ZstdCodec

    comp = None if codecs == "default" else (ZstdCodec(level=3),)
    _stack_with(tmp_path / "s.zarr", lambda shp: np.ones(shp), compressors=comp)
    victim = tmp_path / "s.zarr" / "labels" / "c" / "1" / "0" / "0"
    assert victim.exists()
    victim.unlink()
    for what, read in _readers(monkeypatch).items():
        with pytest.raises(StoreError) as err:
            read(open_stack(tmp_path / "s.zarr"))
        msg = str(err.value)
        for needle in (str(tmp_path / "s.zarr"), "'labels'", "c/1/0/0", "image 'c'", "missing"):
            assert needle in msg, (what, msg)


@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "garbage", "empty"])
def test_damaged_chunk_is_an_error_naming_it_on_every_read_path(tmp_path, monkeypatch, damage):
    s = _stack_with(tmp_path / "s.zarr", lambda shp: np.arange(np.prod(shp)).reshape(shp) % 3)
    victim = tmp_path / "s.zarr" / "labels" / "c" / "0" / "1" / "0"
    raw = bytearray(victim.read_bytes())
    if damage == "flip a byte":
        raw[len(raw) // 2] ^= 0x40
    elif damage == "truncate":
        raw = raw[: len(raw) - 3]
    elif damage == "garbage":
        raw = bytearray(b"\x28\xb5\x2f\xfd garbage")
    else:
        raw = bytearray()
    victim.write_bytes(bytes(raw))
    for what, read in _readers(monkeypatch).items():
        with pytest.raises(StoreError) as err:
            read(open_stack(tmp_path / "s.zarr"))
        msg = str(err.value)
        for needle in ("'labels'", "c/0/1/0", "images 'a' to 'b'", "damaged"):
            assert needle in msg, (what, msg)
    del s


def test_old_style_damaged_chunk_is_named_where_it_fails_to_decode(tmp_path, monkeypatch):
    """Without checksums a damaged chunk is found where Zstandard fails on it, and still named."""
    from zarr.codecs import ZstdCodec

    _stack_with(tmp_path / "s.zarr", lambda shp: np.ones(shp), compressors=(ZstdCodec(level=3),))
    (tmp_path / "s.zarr" / "labels" / "c" / "0" / "0" / "0").write_bytes(b"\x28\xb5\x2f\xfd garbage")
    for what, read in _readers(monkeypatch).items():
        with pytest.raises(StoreError, match=r"c/0/0/0.*images 'a' to 'b'.*damaged"):
            read(open_stack(tmp_path / "s.zarr"))


def test_swapped_chunks_are_caught_by_the_chunk_manifest(tmp_path, monkeypatch):
    """Two whole chunk files swapped: each passes its own checksum; only the store's record of them tells."""
    rng = np.random.default_rng(0)
    _stack_with(tmp_path / "s.zarr", lambda shp: rng.integers(0, 3, shp))
    folder = tmp_path / "s.zarr" / "labels" / "c" / "0"
    a, b = folder / "0" / "0", folder / "1" / "0"          # both full (2, 3, 4) chunks
    ra, rb = a.read_bytes(), b.read_bytes()
    assert ra != rb
    a.write_bytes(rb)
    b.write_bytes(ra)
    for what, read in _readers(monkeypatch).items():
        with pytest.raises(StoreError, match=r"c/0/[01]/0.*recorded when the store was written"):
            read(open_stack(tmp_path / "s.zarr"))


def test_every_chunk_is_written_even_all_fill_and_checksummed(tmp_path):
    """Chunks of pure padding (all 255) and an id list of one empty string are written and recorded."""
    import json

    from isle_fast.stores.chunks import MANIFEST_ATTR

    with create_stack(tmp_path / "s.zarr", kind="gt", classes=CLASSES, ids=["", "b"], shapes=[(1, 1), (1, 1)],
                      chunks=(1, 1, 1), padded_shape=(2, 3)) as w:
        w.write_image(0, np.zeros((1, 1), np.uint8))
        w.write_image(1, np.zeros((1, 1), np.uint8))
    root = tmp_path / "s.zarr"
    for name, n_chunks in (("labels", 2 * 2 * 3), ("ids", 1), ("shapes", 1)):
        meta = json.loads((root / name / "zarr.json").read_text())
        assert meta["codecs"][-1]["name"] == "crc32c", name
        assert len(meta["attributes"][MANIFEST_ATTR]) == n_chunks, name
        files = [p for p in (root / name).rglob("*") if p.is_file() and p.name != "zarr.json"]
        assert len(files) == n_chunks, name
    s = open_stack(root)
    assert s.ids == ["", "b"] and (s.array[:, 1:, :] == 255).all()


def test_store_without_checksums_or_manifest_still_opens_and_reads(tmp_path):
    """Stores written before checksums (no crc32c codec, no manifest attribute) open and read as before."""
    import json

    from zarr.codecs import ZstdCodec

    from isle_fast.stores.chunks import MANIFEST_ATTR

    rng = np.random.default_rng(1)
    s = _stack_with(tmp_path / "s.zarr", lambda shp: rng.integers(0, 3, shp),
                    compressors=(ZstdCodec(level=3),))
    want = s.array[...]
    for name in ("labels", "ids", "shapes"):
        meta_path = tmp_path / "s.zarr" / name / "zarr.json"
        meta = json.loads(meta_path.read_text())
        meta["attributes"].pop(MANIFEST_ATTR, None)
        meta_path.write_text(json.dumps(meta))
    old = open_stack(tmp_path / "s.zarr")
    np.testing.assert_array_equal(old.to_dask().compute(), want)
    np.testing.assert_array_equal(old.array[...], want)
    assert old.ids == ["a", "b", "c"]


def test_default_codec_chains_end_with_crc32c():
    from zarr.codecs import Crc32cCodec

    for enc in (None, "labels", "scores", "rgb"):
        assert isinstance(default_compressors(enc)[-1], Crc32cCodec)
        assert not any(isinstance(c, Crc32cCodec) for c in default_compressors(enc, checksum=False))


# -- open_stack checks the metadata, ids and shapes against the arrays ----------------------

def _record_manifests(group):
    try:
        from isle_fast.stores.chunks import record_manifests
    except ImportError:  # an isle-fast without chunk manifests (to show these tests fail there)
        return
    record_manifests(group)


def _edit_array(store, name, values=None, **meta_changes):
    """Rewrite one array of a committed store (data and / or zarr.json keys), keeping its manifest true."""
    import json

    import zarr

    if values is not None:
        g = zarr.open_group(str(store), mode="r+")
        arr = g[name]
        if values.shape != arr.shape:
            arr.resize(values.shape)
        arr[...] = values
        _record_manifests(g)
    if meta_changes:  # a hand-made store: no manifest
        p = store / name / "zarr.json"
        meta = json.loads(p.read_text())
        meta.update(meta_changes)
        meta["attributes"].pop("isle_chunk_crc32c", None)
        p.write_text(json.dumps(meta))


def test_open_refuses_repeated_ids(tmp_path):
    small(tmp_path / "s.zarr", ids=("x", "y"))
    _edit_array(tmp_path / "s.zarr", "ids", np.asarray(["x", "x"], dtype=object))
    with pytest.raises(StoreError, match=r"s\.zarr: image id 'x' appears twice"):
        open_stack(tmp_path / "s.zarr")


@pytest.mark.parametrize("shapes,needle", [
    (np.array([[3, 4], [-2, 5]], np.int32), r"image 'y' has shape \(-2, 5\).*at least 1"),
    (np.array([[3, 4], [0, 5]], np.int32), r"image 'y' has shape \(0, 5\)"),
    (np.array([[3, 9], [2, 5]], np.int32),
     r"image 'x' is 3 x 9 in 'shapes' but array 'labels' is padded to 3 x 5"),
])
def test_open_refuses_shapes_outside_the_array(tmp_path, shapes, needle):
    small(tmp_path / "s.zarr")
    _edit_array(tmp_path / "s.zarr", "shapes", shapes)
    with pytest.raises(StoreError, match=needle):
        open_stack(tmp_path / "s.zarr")


def test_open_refuses_labels_inconsistent_with_ids(tmp_path):
    small(tmp_path / "s.zarr")
    _edit_array(tmp_path / "s.zarr", "labels", shape=[3, 3, 5])
    with pytest.raises(StoreError, match=r"array 'labels' holds 3 images but 'ids' has 2"):
        open_stack(tmp_path / "s.zarr")
    small(tmp_path / "t.zarr")
    _edit_array(tmp_path / "t.zarr", "shapes", np.array([[3, 4], [2, 5], [1, 1]], np.int32))
    with pytest.raises(StoreError, match=r"'shapes' has 3 rows but 'ids' has 2 images"):
        open_stack(tmp_path / "t.zarr")


def test_open_refuses_a_bool_labels_array_and_broken_array_metadata(tmp_path):
    small(tmp_path / "s.zarr")
    _edit_array(tmp_path / "s.zarr", "labels", data_type="bool", fill_value=False)
    with pytest.raises(StoreError, match=r"array 'labels' has dtype bool; a labels store holds uint8"):
        open_stack(tmp_path / "s.zarr")
    small(tmp_path / "t.zarr")
    _edit_array(tmp_path / "t.zarr", "labels", chunk_grid={"name": "regular",
                                                           "configuration": {"chunk_shape": [1, 1]}})
    with pytest.raises(StoreError, match=r"t\.zarr: array 'labels'"):
        open_stack(tmp_path / "t.zarr")
    small(tmp_path / "u.zarr")
    (tmp_path / "u.zarr" / "labels" / "zarr.json").write_text("{not json")
    with pytest.raises(StoreError, match=r"u\.zarr"):
        open_stack(tmp_path / "u.zarr")


@pytest.mark.parametrize("member", ["ids", "shapes"])
@pytest.mark.parametrize("damage", ["delete", "garbage", "flip"])
def test_damaged_ids_or_shapes_chunk_is_a_store_error(tmp_path, member, damage):
    small(tmp_path / "s.zarr")
    chunk = tmp_path / "s.zarr" / member / "c" / "0"
    if member == "shapes":
        chunk = chunk / "0"
    if damage == "delete":
        chunk.unlink()
    elif damage == "garbage":
        chunk.write_bytes(b"\x00" * 9)
    else:
        raw = bytearray(chunk.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        chunk.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match=rf"s\.zarr: array '{member}', chunk c/0"):
        open_stack(tmp_path / "s.zarr")


def test_damaged_manifest_attribute_is_a_store_error(tmp_path):
    import json

    from isle_fast.stores.chunks import MANIFEST_ATTR

    small(tmp_path / "s.zarr")
    p = tmp_path / "s.zarr" / "labels" / "zarr.json"
    meta = json.loads(p.read_text())
    meta["attributes"][MANIFEST_ATTR] = ["x"]
    p.write_text(json.dumps(meta))
    with pytest.raises(StoreError, match=rf"array 'labels': attribute '{MANIFEST_ATTR}' is damaged"):
        open_stack(tmp_path / "s.zarr")


# -- check_stack: every chunk of every array ------------------------------------------------

def test_check_stack_names_every_bad_chunk_and_passes_a_good_store(tmp_path):
    from isle_fast.stores.chunks import check_stack

    rng = np.random.default_rng(2)
    s = _stack_with(tmp_path / "s.zarr", lambda shp: rng.integers(0, 3, shp))
    good = check_stack(s, progress=False)
    assert good.ok and good.chunks == {"ids": 1, "shapes": 1, "labels": 8} and all(good.manifests.values())
    c = tmp_path / "s.zarr" / "labels" / "c"
    (c / "1" / "1" / "1").unlink()
    raw = bytearray((c / "0" / "0" / "1").read_bytes())
    raw[3] ^= 1
    (c / "0" / "0" / "1").write_bytes(bytes(raw))
    bad = check_stack(open_stack(tmp_path / "s.zarr"), progress=False)
    assert not bad.ok and len(bad.problems) == 2
    assert any("c/1/1/1" in p and "missing" in p for p in bad.problems)
    assert any("c/0/0/1" in p and "damaged" in p for p in bad.problems)


def test_to_dask_remote_store_uses_zarr(tmp_path):
    pytest.importorskip("fsspec")
    s = _stack_with("memory://fast-path-test.zarr", lambda shp: np.full(shp, 2))
    x = s.to_dask()
    assert not x.name.startswith("isle-read-")
    np.testing.assert_array_equal(x.compute(), s.array[:])


def test_zstd_content_size_matches_numcodecs():
    from numcodecs import Zstd

    from isle_fast.stores.stack import _zstd_content_size

    rng = np.random.default_rng(0)
    for n in (0, 1, 255, 256, 257, 65791, 65792, 1 << 20):
        for level in (1, 3):
            assert _zstd_content_size(Zstd(level).encode(rng.integers(0, 4, n).astype(np.uint8))) == n
    assert _zstd_content_size(b"not zstd") is None


@settings(max_examples=40)
@given(seed=st.integers(0, 2**31), n=st.integers(1, 200), c=st.integers(1, 12),
       dtype=st.sampled_from(["uint8", "float16", "float32"]), src=st.sampled_from([np.float32, np.float64]))
def test_quantize_scores_keeps_every_argmax_in_every_dtype(seed, n, c, dtype, src):
    """Each store dtype keeps the float argmax (first index wins ties); uint8 is the kernel's reference."""
    from isle_fast.stores.stack import quantize_scores

    s = tricky_scores(seed, n, c, 4, src).reshape(n, 1, c)
    q = quantize_scores(s, dtype)
    assert q.dtype == np.dtype(dtype) and q.shape == s.shape
    f = np.clip(s, 0, 1)
    np.testing.assert_array_equal(np.argmax(q, -1), np.argmax(f, -1))
    assert float(q.max(initial=0)) <= (255 if dtype == "uint8" else 1.0) and float(q.min(initial=0)) >= 0
    if dtype == "uint8":
        np.testing.assert_array_equal(q, quantize_scores_u8(s))
    else:  # at most two representable steps from the value (one for rounding, one for the fix)
        step = np.spacing(f.astype(dtype)).astype(np.float64)
        assert (np.abs(q.astype(np.float64) - f.astype(np.float64)) <= 2 * step + 1e-12).all()
    if dtype == "float32" and src == np.float32:
        np.testing.assert_array_equal(q, f)


def test_quantize_scores_rejects_other_dtypes():
    from isle_fast.stores.stack import quantize_scores

    with pytest.raises(InputError, match="uint8, float16 or float32"):
        quantize_scores(np.zeros((2, 3), np.float32), "int16")


def test_a_class_deleted_from_the_attributes_is_damage_not_another_store(tmp_path):
    """Deleting one name from ``classes`` leaves a store that is consistent in itself (its labels
    may all be below the new class count), so only the identity checksum written at commit tells
    that every later class name moved; a store written before the checksum still opens."""
    import json

    _stack_with(tmp_path / "s.zarr", lambda shp: np.ones(shp))
    meta = tmp_path / "s.zarr" / "zarr.json"
    doc = json.loads(meta.read_text())
    assert "isle_identity_crc32c" in doc["attributes"]
    del doc["attributes"]["classes"][1]
    meta.write_text(json.dumps(doc))
    with pytest.raises(StoreError, match="classes.*do not match the checksum"):
        open_stack(tmp_path / "s.zarr")
    del doc["attributes"]["isle_identity_crc32c"]  # as written before the checksum existed
    meta.write_text(json.dumps(doc))
    assert len(open_stack(tmp_path / "s.zarr").classes) == len(CLASSES) - 1


def test_ids_metadata_claiming_billions_is_an_error_not_an_allocation(tmp_path):
    import json

    _stack_with(tmp_path / "s.zarr", lambda shp: np.ones(shp))
    meta = tmp_path / "s.zarr" / "ids" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["shape"] = [4_247_762_216]
    meta.write_text(json.dumps(doc))
    with pytest.raises(StoreError, match="is damaged|disagree on the number of images"):
        open_stack(tmp_path / "s.zarr")


@pytest.mark.parametrize("key,value", [("chunk_key_encoding", True), ("codecs", None),
                                       ("chunk_grid", 7), ("shape", "x")])
def test_array_metadata_of_an_unexpected_shape_is_a_store_error(tmp_path, key, value):
    """The fast open (no Zarr) meets a damaged ``ids/zarr.json`` (the fuzz set keys to true / null):
    it hands the store to Zarr's path, which names the problem; never an AttributeError."""
    import json

    _stack_with(tmp_path / "s.zarr", lambda shp: np.ones(shp))
    meta = tmp_path / "s.zarr" / "ids" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc[key] = value
    meta.write_text(json.dumps(doc))
    with pytest.raises(StoreError):
        open_stack(tmp_path / "s.zarr")


def test_missing_chunk_is_an_error_when_threads_open_the_group_at_once(tmp_path, monkeypatch):
    """Two threads that open a fast-opened stack's Zarr group at the same moment (Dask threads share one
    Stack in refine) each got a group; the array came from one and its chunk names were registered on the
    other's store, so a missing chunk read as the fill value (a deleted set chunk refined to another result,
    exit 0, found once by the damage fuzz). The interleaving is forced here: every ``group`` access opens
    a new group, as a second thread's assignment would make it."""
    import threading

    import isle_fast.stores.stack as S

    _stack_with(tmp_path / "s.zarr", lambda shp: np.ones(shp))
    (tmp_path / "s.zarr" / "labels" / "c" / "1" / "0" / "0").unlink()
    monkeypatch.setattr(S.Stack, "group", property(lambda self: S._zarr_group(self.path)))
    with pytest.raises(StoreError, match="missing"):
        open_stack(tmp_path / "s.zarr").array[...]
    monkeypatch.undo()

    # and for real: many threads reading a freshly opened stack at once all see the error
    for _ in range(20):
        s = open_stack(tmp_path / "s.zarr")
        start, errors = threading.Barrier(6), []

        def read():
            start.wait()
            try:
                s.array[...]
            except StoreError as exc:
                errors.append(exc)

        threads = [threading.Thread(target=read) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(errors) == 6
