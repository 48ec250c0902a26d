"""Score-file headers are checked against the bytes the file holds and the gt's size before data is read."""

from __future__ import annotations

import io
import tracemalloc
import zipfile

import numpy as np
import pytest
from PIL import Image

from isle_fast.errors import InputError
from isle_fast.stores.formats import BadInput, read_scores, score_header
from isle_fast.stores.ingest import ingest_labels, ingest_scores

C = 21


def npy_with_header(shape, dtype="<f4", data=b"") -> bytes:
    """A .npy whose header claims ``shape`` followed by ``data`` (a forged or truncated file)."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": tuple(shape)})
    return buf.getvalue() + data


def test_npy_header_claiming_more_than_the_file_holds(tmp_path):
    p = tmp_path / "x.npy"
    p.write_bytes(npy_with_header((C, 40000, 40000), data=b"\0" * 1024))  # claims 125 GiB
    tracemalloc.start()
    with pytest.raises(BadInput, match=r"header claims shape \(21, 40000, 40000\).*134,400,000,000 "
                                        "bytes.*1,024"):
        read_scores(str(p), C, expect=(4, 5))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 8 * 2**20


def test_npz_member_header_claiming_125_gib(tmp_path):
    """Issue 18: the header of an .npz member claims 125 GiB; a clear error, nothing allocated."""
    p = tmp_path / "x.npz"
    with zipfile.ZipFile(p, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("high_res.npy", npy_with_header((C, 40000, 40000), data=b"\0" * 4096))
    tracemalloc.start()
    with pytest.raises(BadInput, match=r"member 'high_res' claims shape \(21, 40000, 40000\)"):
        read_scores(str(p), C, expect=(4, 5))
    with pytest.raises(BadInput, match="member 'high_res' claims"):
        score_header(str(p), C)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 8 * 2**20


def test_consistent_header_of_the_wrong_size_is_refused_before_loading(tmp_path):
    """A real 84 MB array (compressed to kilobytes) for a 4 x 5 image: refused from its header alone."""
    p = tmp_path / "x.npz"
    np.savez_compressed(p, scores=np.zeros((C, 1000, 1000), np.float32))
    tracemalloc.start()
    with pytest.raises(BadInput, match=r"\(21, 1000, 1000\).*does not match the image size 4 x 5"):
        read_scores(str(p), C, expect=(4, 5))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 8 * 2**20


def test_forged_zip_directory_size_is_refused(tmp_path):
    """A member whose zip entry claims an expansion deflate cannot produce (over 1100:1)."""
    p = tmp_path / "x.npz"
    np.savez_compressed(p, scores=np.zeros((C, 4, 5), np.float32))
    raw = bytearray(p.read_bytes())
    with zipfile.ZipFile(p) as zf:
        info = zf.getinfo("scores.npy")
    claim = min(info.file_size * 10**6, 2**31 - 1)
    forged = claim.to_bytes(4, "little")
    # the uncompressed size field of the central directory entry (offset 24 from its signature)
    cd = raw.rfind(b"PK\x01\x02")
    raw[cd + 24:cd + 28] = forged
    p.write_bytes(bytes(raw))
    with pytest.raises(BadInput, match="(claims .* bytes stored in|corrupt)"):
        read_scores(str(p), C)


def test_truncated_plain_npy_names_the_sizes(tmp_path):
    p = tmp_path / "x.npy"
    np.save(p, np.zeros((C, 4, 5), np.float32))
    p.write_bytes(p.read_bytes()[:-8])
    with pytest.raises(BadInput, match=r"truncated .npy file.*1,680 bytes\) but 1,672"):
        read_scores(str(p), C)


def test_ingest_with_forged_header_writes_nothing(tmp_path):
    (tmp_path / "gt").mkdir()
    (tmp_path / "cam").mkdir()
    for i in ("a", "b"):
        Image.fromarray(np.zeros((4, 5), np.uint8)).save(tmp_path / "gt" / f"{i}.png")
    ingest_labels(tmp_path / "gt", tmp_path / "gt.zarr", kind="gt", quiet=True)
    np.save(tmp_path / "cam" / "a.npy", np.full((C, 4, 5), 0.5, np.float32))
    with zipfile.ZipFile(tmp_path / "cam" / "b.npz", "w") as zf:
        zf.writestr("high_res.npy", npy_with_header((3, 40000, 40000), data=b"\0" * 64))
        zf.writestr("keys.npy", npy_with_header((3,), "<i8", np.array([0, 1, 2]).tobytes()))
    with pytest.raises(InputError, match=r"b\.npz: image 'b'.*claims shape \(3, 40000, 40000\)"):
        ingest_scores(tmp_path / "cam", tmp_path / "s.zarr", gt=tmp_path / "gt.zarr", quiet=True)
    assert not (tmp_path / "s.zarr").exists()
    s = ingest_scores(tmp_path / "cam", tmp_path / "s.zarr", gt=tmp_path / "gt.zarr", skip_bad=True,
                      quiet=True)
    assert s.ids == ["a"]
