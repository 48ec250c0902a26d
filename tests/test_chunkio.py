"""Direct chunk writes (isle_fast.stores.chunkio) equal Zarr's own writes, byte for byte."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st
from zarr.codecs import Crc32cCodec, ZstdCodec

from isle_fast.stores.chunkio import prepare_folders, prepare_root, write_block, write_spec


def _chunk_files(root: str) -> dict[str, str]:
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            if f != "zarr.json":
                p = os.path.join(d, f)
                out[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


CODECS = {
    "zstd3": (ZstdCodec(level=3),),
    "zstd1+crc32c": (ZstdCodec(level=1), Crc32cCodec()),
    "zstd3+crc32c": (ZstdCodec(level=3), Crc32cCodec()),   # default_compressors("labels"): every new store
    "crc32c": (Crc32cCodec(),),
    "zstd-checksum": (ZstdCodec(level=2, checksum=True),),
    "raw": (),
}


@settings(max_examples=30, deadline=None)
@given(data=st.data(), codec=st.sampled_from(sorted(CODECS)), dtype=st.sampled_from(["uint8", "float16"]),
       channels=st.sampled_from([None, 1, 3]), folders=st.sampled_from(["all", "root"]))
def test_write_block_equals_zarr(tmp_path_factory, data, codec, dtype, channels, folders):
    """Odd shapes, tile chunks, edge chunks, padding: the chunk files are the ones Zarr writes, whether
    the owner made every chunk folder (``prepare_folders``) or only ``c/`` and the writes the rest."""
    n = data.draw(st.integers(1, 9))
    h, w = data.draw(st.integers(1, 23)), data.draw(st.integers(1, 23))
    k = data.draw(st.integers(1, n))
    ch, cw = data.draw(st.integers(1, h)), data.draw(st.integers(1, w))
    shape = (n, h, w) + ((channels,) if channels else ())
    chunks = (k, ch, cw) + ((channels,) if channels else ())
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31)))
    arr = (rng.random(shape) * 250).astype(dtype)
    arr[rng.random(shape) < 0.3] = 255 if dtype == "uint8" else 0
    root = tmp_path_factory.mktemp("c")
    fill = 255 if dtype == "uint8" else 0
    a = zarr.create_array(str(root / "a"), shape=shape, chunks=chunks, dtype=dtype, fill_value=fill,
                          compressors=CODECS[codec]).with_config({"write_empty_chunks": True})
    a[:] = arr
    b = zarr.create_array(str(root / "b"), shape=shape, chunks=chunks, dtype=dtype, fill_value=fill,
                          compressors=CODECS[codec])
    spec = write_spec(b)
    assert spec.direct
    (prepare_folders if folders == "all" else prepare_root)(spec)
    for s in range(0, n, k):
        write_block(spec, s, arr[s:s + k])
    assert np.array_equal(zarr.open_array(str(root / "b"))[:], arr)
    assert _chunk_files(str(root / "a")) == _chunk_files(str(root / "b"))


def test_unknown_codecs_write_through_zarr(tmp_path):
    from zarr.codecs import BloscCodec

    arr = np.arange(4 * 5 * 6, dtype=np.uint8).reshape(4, 5, 6)
    b = zarr.create_array(str(tmp_path / "b"), shape=arr.shape, chunks=(2, 5, 6), dtype="uint8",
                          compressors=(BloscCodec(cname="lz4"),))
    spec = write_spec(b)
    assert not spec.direct and spec.zarr_path
    for s in (0, 2):
        write_block(spec, s, arr[s:s + 2])
    assert np.array_equal(zarr.open_array(str(tmp_path / "b"))[:], arr)


def test_block_must_be_one_whole_chunk(tmp_path):
    b = zarr.create_array(str(tmp_path / "b"), shape=(5, 4, 4), chunks=(2, 4, 4), dtype="uint8")
    spec = write_spec(b)
    prepare_folders(spec)
    with pytest.raises(ValueError, match="multiple"):
        write_block(spec, 1, np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="whole chunk"):
        write_block(spec, 0, np.zeros((1, 4, 4), np.uint8))
    write_block(spec, 4, np.ones((1, 4, 4), np.uint8))     # the last, short chunk
    assert (zarr.open_array(str(tmp_path / "b"))[4] == 1).all()


@pytest.mark.parametrize("folders", ["all", "root"])
def test_a_task_never_recreates_a_removed_store(tmp_path, folders):
    """The owner makes ``c/`` (or every folder) up front and a write makes at most the folders below
    ``c/``: a write into a removed store fails, it does not remake it."""
    import shutil

    b = zarr.create_array(str(tmp_path / "s.tmp" / "labels"), shape=(4, 3, 3), chunks=(2, 3, 3),
                          dtype="uint8")
    spec = write_spec(b)
    (prepare_folders if folders == "all" else prepare_root)(spec)
    write_block(spec, 2, np.ones((2, 3, 3), np.uint8))
    assert (tmp_path / "s.tmp" / "labels" / "c" / "1" / "0" / "0").is_file()
    shutil.rmtree(tmp_path / "s.tmp")
    with pytest.raises(FileNotFoundError):
        write_block(spec, 0, np.zeros((2, 3, 3), np.uint8))
    assert not (tmp_path / "s.tmp").exists()


@pytest.mark.parametrize("encoding", ["labels", "scores"])
def test_default_chains_are_checksummed_and_equal_zarr(tmp_path, encoding):
    """The chains every new store gets end in crc32c; direct writes of them are Zarr's bytes."""
    from isle_fast.stores.stack import default_compressors

    chain = default_compressors(encoding)
    assert isinstance(chain[-1], Crc32cCodec)
    shape, chunks = ((5, 13, 11, 4), (2, 7, 11, 4)) if encoding == "scores" else ((5, 13, 11), (2, 7, 5))
    arr = (np.random.default_rng(1).random(shape) * 256).astype(np.uint8)
    a = zarr.create_array(str(tmp_path / "a"), shape=shape, chunks=chunks, dtype="uint8", fill_value=0,
                          compressors=chain).with_config({"write_empty_chunks": True})
    a[:] = arr
    b = zarr.create_array(str(tmp_path / "b"), shape=shape, chunks=chunks, dtype="uint8", fill_value=0,
                          compressors=default_compressors(encoding))
    spec = write_spec(b)
    assert spec.direct and spec.crc32c
    prepare_folders(spec)
    for s0 in range(0, shape[0], chunks[0]):
        write_block(spec, s0, arr[s0:s0 + chunks[0]])
    assert _chunk_files(str(tmp_path / "a")) == _chunk_files(str(tmp_path / "b"))


def test_process_ingest_writes_every_chunk_checksummed_with_a_manifest(tmp_path):
    """Ingest in worker processes (direct chunk writes): every chunk there, crc32c, manifest, Zarr's bytes."""
    from PIL import Image

    from isle_fast.stores.chunks import MANIFEST_ATTR, check_stack
    from isle_fast.stores.ingest import ingest_labels
    from isle_fast.stores.stack import open_stack

    rng = np.random.default_rng(3)
    src = tmp_path / "png"
    src.mkdir()
    for i in range(23):
        h, w = int(rng.integers(9, 40)), int(rng.integers(9, 40))
        m = rng.integers(0, 5, (h, w)).astype(np.uint8)
        m[: h // 3] = 0      # all-background rows: chunks of the fill value are written too
        Image.fromarray(m, mode="L").save(src / f"im{i:02d}.png")
    st_ = ingest_labels(src, tmp_path / "s.zarr", classes=[f"c{k}" for k in range(5)], kind="gt",
                        chunks=(4, 16, 16), workers=2, quiet=True)
    check = check_stack(st_, progress=False)
    assert check.ok, check.problems
    assert all(check.checksums.values()) and all(check.manifests.values())
    arr = st_.array
    grid = [-(-n // c) for n, c in zip(arr.shape, arr.chunks)]
    files = _chunk_files(str(tmp_path / "s.zarr" / "labels"))
    assert len(files) == int(np.prod(grid))                  # every chunk written
    assert len(arr.attrs[MANIFEST_ATTR]) == int(np.prod(grid))
    # Zarr writing the same array with the same codecs gives the same chunk files
    z = zarr.create_array(str(tmp_path / "z"), shape=arr.shape, chunks=arr.chunks, dtype="uint8",
                          fill_value=arr.fill_value, compressors=arr.compressors
                          ).with_config({"write_empty_chunks": True})
    z[:] = np.asarray(arr[:])
    assert _chunk_files(str(tmp_path / "z")) == files
    assert open_stack(tmp_path / "s.zarr").ids == [f"im{i:02d}" for i in range(23)]


def test_commit_reads_the_manifest_from_the_files_and_refuses_a_missing_chunk(tmp_path):
    """Commit's manifest is every chunk file's crc32c trailer, read from the files; a missing chunk fails."""
    from isle_fast.stores.chunks import MANIFEST_ATTR
    from isle_fast.stores.stack import create_stack

    rng = np.random.default_rng(4)
    shapes = [(12, 10)] * 7
    w = create_stack(str(tmp_path / "a.zarr"), kind="gt", classes=["bg", "x"],
                     ids=[f"i{k}" for k in range(7)], shapes=shapes, chunks=(3, 8, 8))
    spec = write_spec(w.array)
    prepare_folders(spec)
    for s0 in range(0, 7, 3):
        write_block(spec, s0, rng.integers(0, 2, size=(min(3, 7 - s0), 12, 10)).astype(np.uint8))
    st_ = w.commit()
    root = tmp_path / "a.zarr" / "labels"
    tails = []
    for idx in np.ndindex(3, 2, 2):
        data = (root / "c" / "/".join(map(str, idx))).read_bytes()
        tails.append(int.from_bytes(data[-4:], "little"))
    assert st_.array.attrs[MANIFEST_ATTR] == tails
    w = create_stack(str(tmp_path / "b.zarr"), kind="gt", classes=["bg", "x"], ids=["a", "b"],
                     shapes=[(4, 4)] * 2, chunks=(1, 4, 4))
    spec = write_spec(w.array)
    prepare_folders(spec)
    write_block(spec, 0, np.zeros((1, 4, 4), np.uint8))       # chunk 1 is never written
    with pytest.raises(RuntimeError, match="never written"):
        w.commit()
    w.abort()


# -- reading chunks into kept buffers (read_into) ------------------------------------------------

READABLE = ("zstd3", "zstd1+crc32c", "zstd3+crc32c", "crc32c", "raw")   # the layouts of the direct reader


def _read_spec(root, arr, name="a"):
    from isle_fast.stores.chunks import fast_chunk_spec, names_for

    spec = fast_chunk_spec(arr, names_for(str(root), name, arr))
    assert spec is not None
    return spec


@settings(max_examples=25, deadline=None)
@given(data=st.data(), codec=st.sampled_from(READABLE), dtype=st.sampled_from(["uint8", "float16"]),
       libzstd=st.booleans())
def test_read_into_equals_decode_chunk(tmp_path_factory, data, codec, dtype, libzstd):
    """Every chunk (edge chunks, odd shapes) read into a kept buffer equals the chunk decode_chunk reads,
    with libzstd (ctypes) and with numcodecs; the buffer is reused from chunk to chunk."""
    from isle_fast.stores import chunkio
    from isle_fast.stores.chunks import decode_chunk

    n, h, w = data.draw(st.integers(1, 9)), data.draw(st.integers(1, 23)), data.draw(st.integers(1, 23))
    chunks = (data.draw(st.integers(1, n)), data.draw(st.integers(1, h)), data.draw(st.integers(1, w)))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31)))
    arr = (rng.random((n, h, w)) * 250).astype(dtype)
    root = tmp_path_factory.mktemp("r")
    a = zarr.create_array(str(root / "a"), shape=arr.shape, chunks=chunks, dtype=dtype, fill_value=0,
                          compressors=CODECS[codec]).with_config({"write_empty_chunks": True})
    a[:] = arr
    spec = _read_spec(root, zarr.open_array(str(root / "a"), mode="r"))
    old = chunkio._ZSTD
    chunkio._ZSTD = None if libzstd else False
    try:
        buf = chunkio.thread_buffer(("test", 0), spec.chunk_shape, spec.dtype)
        for coords in np.ndindex(*[-(-s // c) for s, c in zip(arr.shape, chunks)]):
            got = chunkio.read_into(spec, coords, buf)
            assert got is buf
            assert np.array_equal(got.view(np.uint8), decode_chunk(spec, coords).view(np.uint8))
        assert chunkio.thread_buffer(("test", 0), spec.chunk_shape, spec.dtype) is buf
    finally:
        chunkio._ZSTD = old


@pytest.mark.parametrize("libzstd", [True, False])
@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "swap"])
def test_read_into_names_a_damaged_or_missing_chunk(tmp_path, monkeypatch, libzstd, damage):
    """A missing, flipped, cut or swapped chunk is the StoreError decode_chunk raises, naming store and chunk."""
    from isle_fast.errors import StoreError
    from isle_fast.stores import chunkio
    from isle_fast.stores.chunks import decode_chunk, record_manifests

    monkeypatch.setattr(chunkio, "_ZSTD", None if libzstd else False)
    root = tmp_path / "g"
    g = zarr.open_group(str(root), mode="w")
    a = g.create_array("a", shape=(4, 9, 9), chunks=(2, 9, 9), dtype="uint8", fill_value=255,
                       compressors=CODECS["zstd3+crc32c"], config={"write_empty_chunks": True})
    a[:] = np.arange(4 * 81).reshape(4, 9, 9) % 7
    record_manifests(g)
    spec = _read_spec(root, zarr.open_group(str(root), mode="r")["a"])
    assert spec.names.crc is not None
    path = root / "a" / "c" / "1" / "0" / "0"
    raw = path.read_bytes()
    if damage == "flip":
        path.write_bytes(raw[:5] + bytes([raw[5] ^ 1]) + raw[6:])
    elif damage == "truncate":
        path.write_bytes(raw[:-7])
    elif damage == "delete":
        path.unlink()
    else:
        path.write_bytes((root / "a" / "c" / "0" / "0" / "0").read_bytes())
    buf = np.empty(spec.chunk_shape, np.uint8)
    with pytest.raises(StoreError) as want:
        decode_chunk(spec, (1, 0, 0))
    with pytest.raises(StoreError) as got:
        chunkio.read_into(spec, (1, 0, 0), buf)
    assert str(got.value) == str(want.value)
    assert "chunk c/1/0/0" in str(got.value) and str(root) in str(got.value)


def test_read_into_undecodable_and_wrong_buffer(tmp_path, monkeypatch):
    """A frame that does not decode to the chunk's size is 'damaged' (no crc32c to catch it first); a buffer
    of the wrong shape, type or layout is a ValueError."""
    from numcodecs import Zstd

    from isle_fast.errors import StoreError
    from isle_fast.stores import chunkio

    a = zarr.create_array(str(tmp_path / "a"), shape=(2, 5, 5), chunks=(2, 5, 5), dtype="uint8", fill_value=0,
                          compressors=CODECS["zstd3"]).with_config({"write_empty_chunks": True})
    a[:] = 3
    spec = _read_spec(tmp_path, zarr.open_array(str(tmp_path / "a"), mode="r"))
    buf = np.empty(spec.chunk_shape, np.uint8)
    (tmp_path / "a" / "c" / "0" / "0" / "0").write_bytes(Zstd(level=3).encode(np.zeros(49, np.uint8)))
    for lib in (None, False):
        monkeypatch.setattr(chunkio, "_ZSTD", lib)
        with pytest.raises(StoreError, match=r"chunk c/0/0/0 is damaged: it is not a \(2, 5, 5\) \|u1 chunk"):
            chunkio.read_into(spec, (0, 0, 0), buf)
    for bad in (np.empty((2, 5, 4), np.uint8), np.empty((2, 5, 5), np.int16), np.empty((5, 5, 2), np.uint8).T):
        with pytest.raises(ValueError, match="read_into needs a C-contiguous"):
            chunkio.read_into(spec, (0, 0, 0), bad)


@settings(max_examples=25, deadline=None)
@given(data=st.data(), codec=st.sampled_from(READABLE), dtype=st.sampled_from(["uint8", "float16"]),
       channels=st.sampled_from([None, 3]))
def test_read_kept_equals_read_chunk(tmp_path_factory, data, codec, dtype, channels):
    """Every chunk's block (edge chunks cut along any axis, a class axis too) read into a kept buffer equals
    read_chunk's, C-contiguous; a whole chunk or a cut of its first axis is the kept buffer itself (no copy),
    the same buffer from chunk to chunk."""
    from isle_fast.stores import chunkio
    from isle_fast.stores.chunks import read_chunk

    n, h, w = data.draw(st.integers(1, 9)), data.draw(st.integers(1, 23)), data.draw(st.integers(1, 23))
    shape = (n, h, w) + ((channels,) if channels else ())
    chunks = (data.draw(st.integers(1, n)), data.draw(st.integers(1, h)), data.draw(st.integers(1, w)))
    chunks += (channels,) if channels else ()
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31)))
    arr = (rng.random(shape) * 250).astype(dtype)
    root = tmp_path_factory.mktemp("k")
    a = zarr.create_array(str(root / "a"), shape=arr.shape, chunks=chunks, dtype=dtype, fill_value=0,
                          compressors=CODECS[codec]).with_config({"write_empty_chunks": True})
    a[:] = arr
    spec = _read_spec(root, zarr.open_array(str(root / "a"), mode="r"))
    key = ("test-kept", codec)
    for coords in np.ndindex(*[-(-s // c) for s, c in zip(arr.shape, chunks)]):
        region = tuple(min(c, s - i * c) for i, c, s in zip(coords, chunks, arr.shape))
        got = chunkio.read_kept(spec, coords, region, key)
        want = read_chunk(spec, block_id=coords, block_info={None: {"chunk-shape": region}})
        assert got.shape == want.shape == region and got.flags.c_contiguous
        assert np.array_equal(got.view(np.uint8), want.view(np.uint8))
        assert np.array_equal(got, arr[tuple(slice(i * c, i * c + r) for i, c, r in zip(coords, chunks, region))])
        if region[1:] == tuple(chunks[1:]):        # decoded in place, nothing copied
            assert np.shares_memory(got, chunkio.thread_buffer(key, spec.chunk_shape, spec.dtype))


def test_read_kept_names_a_missing_chunk(tmp_path):
    """read_kept raises read_chunk's StoreError for a missing chunk, word for word."""
    from isle_fast.errors import StoreError
    from isle_fast.stores import chunkio
    from isle_fast.stores.chunks import read_chunk

    a = zarr.create_array(str(tmp_path / "a"), shape=(4, 5, 5), chunks=(2, 5, 5), dtype="uint8", fill_value=0,
                          compressors=CODECS["zstd3+crc32c"]).with_config({"write_empty_chunks": True})
    a[:] = 1
    spec = _read_spec(tmp_path, zarr.open_array(str(tmp_path / "a"), mode="r"))
    (tmp_path / "a" / "c" / "1" / "0" / "0").unlink()
    with pytest.raises(StoreError) as want:
        read_chunk(spec, block_id=(1, 0, 0), block_info={None: {"chunk-shape": (2, 5, 5)}})
    with pytest.raises(StoreError) as got:
        chunkio.read_kept(spec, (1, 0, 0), (2, 5, 5), "test-missing")
    assert str(got.value) == str(want.value)
