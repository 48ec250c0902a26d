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

from isle_fast.stores.chunkio import prepare_folders, write_block, write_spec


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
    "zstd-checksum": (ZstdCodec(level=2, checksum=True),),
    "raw": (),
}


@settings(max_examples=30, deadline=None)
@given(data=st.data(), codec=st.sampled_from(sorted(CODECS)), dtype=st.sampled_from(["uint8", "float16"]),
       channels=st.sampled_from([None, 1, 3]))
def test_write_block_equals_zarr(tmp_path_factory, data, codec, dtype, channels):
    """Odd shapes, tile chunks, edge chunks, padding: the chunk files are the ones Zarr writes."""
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
    prepare_folders(spec)
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


def test_a_task_never_recreates_a_removed_store(tmp_path):
    """Folders are made up front by the owner: a write into a removed store fails, it does not remake it."""
    import shutil

    b = zarr.create_array(str(tmp_path / "s.tmp" / "labels"), shape=(4, 3, 3), chunks=(2, 3, 3),
                          dtype="uint8")
    spec = write_spec(b)
    prepare_folders(spec)
    shutil.rmtree(tmp_path / "s.tmp")
    with pytest.raises(FileNotFoundError):
        write_block(spec, 0, np.zeros((2, 3, 3), np.uint8))
    assert not (tmp_path / "s.tmp").exists()
