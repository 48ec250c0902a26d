"""Stack stores: atomic commit, refusal of broken / foreign stores, alignment checks, overwrite, round trips."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from _scores import tricky_scores
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
from reference import quantize_scores_u8

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
    with pytest.raises(StoreError, match="plain is not a Zarr v3 group"):
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


def test_to_dask_missing_chunk_reads_fill_value_and_damaged_chunk_is_named(tmp_path):
    s = _stack_with(tmp_path / "s.zarr", lambda shp: np.ones(shp))
    folder = tmp_path / "s.zarr" / "labels" / "c"
    victim = folder / "1" / "0" / "0"
    assert victim.exists()
    victim.unlink()                               # a chunk never written reads as the fill value (255)
    got = s.to_dask().compute()
    np.testing.assert_array_equal(got[2:4, 0:3, 0:4], np.full((1, 3, 4), 255, np.uint8)[:, :, :])
    damaged = folder / "0" / "0" / "0"
    damaged.write_bytes(b"\x28\xb5\x2f\xfd garbage")
    with pytest.raises(StoreError, match=r"c/0/0/0"):
        s.to_dask().compute()


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
