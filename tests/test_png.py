"""isle_fast.stores.png: label PNGs decoded and encoded on zlib directly, checked against PIL.

The rule that keeps ingest as strict as before: whenever the fast decoder
returns an array, PIL decodes the same file to the same array; anything else
(``None``) goes to PIL, which accepts or refuses it as always.
"""

from __future__ import annotations

import io
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from isle_fast.stores.png import decode_label_png, encode_palette_png, voc_palette, zlib_options

PALETTE = np.asarray(voc_palette(), dtype=np.uint8).ravel().tolist()


def pil_png(a: np.ndarray, mode: str | None = "P", **opts) -> bytes:
    buf = io.BytesIO()
    im = Image.fromarray(a, mode=mode) if mode else Image.fromarray(a)
    if mode == "P":
        im.putpalette(PALETTE)
    im.save(buf, format="PNG", **opts)
    return buf.getvalue()


def pil_decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im)


def label_map(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    a = np.zeros((h, w), np.uint8)
    for _ in range(int(rng.integers(0, 4))):
        y, x = int(rng.integers(0, h)), int(rng.integers(0, w))
        a[y:y + int(rng.integers(1, h + 1)), x:x + int(rng.integers(1, w + 1))] = rng.choice([3, 15, 20, 255])
    noise = rng.random((h, w)) < 0.05
    a[noise] = rng.integers(0, 256, size=int(noise.sum()))
    return a


@settings(max_examples=60, deadline=None)
@given(h=st.integers(1, 70), w=st.integers(1, 70), seed=st.integers(0, 2**31),
       compress=st.sampled_from(["rle", "0", "1", "6", "9"]))
def test_encode_decode_round_trip_equals_pil(h, w, seed, compress):
    a = label_map(np.random.default_rng(seed), h, w)
    level, strategy = zlib_options(compress)
    ours = encode_palette_png(a, bytes(PALETTE), level, strategy)
    assert np.array_equal(pil_decode(ours), a)                      # PIL reads what we write
    with Image.open(io.BytesIO(ours)) as im:
        assert im.mode == "P" and im.getpalette()[:6] == PALETTE[:6]
    theirs = pil_png(a, **({"compress_level": 6, "compress_type": 3} if compress == "rle"
                           else {"compress_level": level}))
    assert np.array_equal(decode_label_png(theirs), a)              # we read what PIL writes
    assert np.array_equal(decode_label_png(ours), a)
    if len(theirs) < 60_000:                                        # one IDAT chunk: the very same bytes
        assert ours == theirs


def test_the_real_voc_maps_take_the_fast_path():
    """VOC's own files (8-bit palette, unfiltered rows) decode here, equal to PIL (when the data is there)."""
    import tarfile
    from pathlib import Path

    tar = Path(__file__).resolve().parents[2] / "shared" / "data" / "voc2012_val_gt.tar.gz"
    if not tar.is_file():
        pytest.skip("../shared/data is absent")
    with tarfile.open(tar) as tf:
        members = [m for m in tf.getmembers() if m.name.endswith(".png")][:200]
        for m in members:
            data = tf.extractfile(m).read()
            a = decode_label_png(data)
            assert a is not None and np.array_equal(a, pil_decode(data)), m.name


@pytest.mark.parametrize("case", ["gray-filtered", "16-bit", "4-bit", "rgb", "not-png"])
def test_other_pngs_are_left_to_pil(case):
    rng = np.random.default_rng(1)
    a = label_map(rng, 20, 30)
    if case == "gray-filtered":     # PIL filters grayscale rows adaptively
        data = pil_png(np.tile(np.arange(30, dtype=np.uint8), (20, 1)), mode=None)
    elif case == "16-bit":
        data = pil_png(a.astype(np.uint16), mode=None)
    elif case == "4-bit":
        data = pil_png(a % 16, bits=4)
    elif case == "rgb":
        data = pil_png(np.stack([a] * 3, -1), mode=None)
    else:
        data = b"GIF89a" + bytes(40)
    assert decode_label_png(data) is None


def test_a_grayscale_map_with_unfiltered_rows_is_decoded():
    a = label_map(np.random.default_rng(2), 9, 11)
    raw = np.concatenate([np.zeros((9, 1), np.uint8), a], axis=1).tobytes()

    def chunk(kind, body):
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    ihdr = (11).to_bytes(4, "big") + (9).to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))
    assert np.array_equal(decode_label_png(data), a) and np.array_equal(pil_decode(data), a)


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**31), cut=st.integers(0, 400), flips=st.lists(st.tuples(st.integers(0, 10**6),
                                                                                      st.integers(1, 255)),
                                                                            max_size=3))
def test_damaged_files_never_decode_to_something_pil_would_not(seed, cut, flips):
    """Truncated or byte-flipped files: None, or exactly what PIL decodes (PIL stays the judge)."""
    a = label_map(np.random.default_rng(seed), 17, 23)
    data = bytearray(pil_png(a))
    for pos, x in flips:
        data[pos % len(data)] ^= x
    if cut:
        data = data[:max(8, len(data) - cut)]
    ours = decode_label_png(bytes(data))
    if ours is not None:
        assert np.array_equal(ours, pil_decode(bytes(data)))


def test_an_over_long_stream_is_refused_without_inflating_it():
    """IDAT data that inflates to more than the image holds is not decoded (a zip bomb stops at H x (W+1) + 1)."""
    a = np.zeros((4, 4), np.uint8)
    raw = bytes(10**7)           # 10 MB of zeros for a 4 x 4 image

    def chunk(kind, body):
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", (4).to_bytes(4, "big") * 2 + bytes([8, 3, 0, 0, 0]))
            + chunk(b"PLTE", bytes(PALETTE)) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    assert decode_label_png(data) is None
    assert a.shape == (4, 4)


@settings(max_examples=80, deadline=None)
@given(h=st.integers(1, 300), w=st.integers(1, 300), seed=st.integers(0, 2**31),
       noise=st.sampled_from([0.0, 0.01, 0.3, 1.0]))
def test_zlib_ng_and_the_standard_library_give_the_same_files_and_arrays(h, w, seed, noise, monkeypatch):
    """The codec runs on zlib-ng when installed: its ``rle`` bytes and its decode equal plain zlib's."""
    from isle_fast.stores import png

    if png.INFLATE == "zlib":
        pytest.skip("zlib-ng is not installed")
    rng = np.random.default_rng(seed)
    a = label_map(rng, h, w)
    hit = rng.random((h, w)) < noise
    a[hit] = rng.integers(0, 256, size=int(hit.sum()))
    level, strategy = zlib_options("rle")
    fast = encode_palette_png(a, bytes(PALETTE), level, strategy)
    decoded_fast = decode_label_png(fast)
    with monkeypatch.context() as m:
        m.setattr(png, "_ng", zlib)
        plain = encode_palette_png(a, bytes(PALETTE), level, strategy)
        decoded_plain = decode_label_png(fast)
    assert fast == plain
    assert np.array_equal(decoded_fast, a) and np.array_equal(decoded_plain, a)


@settings(max_examples=300, deadline=None)
@given(data=st.data(), c=st.integers(1, 256))
def test_check_label_rows_equals_check_labels(data, c):
    """The range check over the contiguous decoded rows (filter bytes included) accepts and refuses exactly
    what ``check_labels`` of the values does, with the same message (the first bad pixel named)."""
    from isle_fast.stores.formats import BadInput, check_label_rows, check_labels

    h, w = data.draw(st.integers(0, 9)), data.draw(st.integers(0, 9))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    pool = data.draw(st.sampled_from(["valid", "valid+ignore", "any", "edges"]))
    if pool == "valid":
        vals = rng.integers(0, min(c, 256), (h, w))
    elif pool == "valid+ignore":
        vals = np.where(rng.random((h, w)) < 0.3, 255, rng.integers(0, min(c, 256), (h, w)))
    elif pool == "edges":       # the values around the limits: C - 1, C, 254, 255, 0
        vals = rng.choice(np.array([0, max(c - 1, 0), min(c, 255), 254, 255]), (h, w))
    else:
        vals = rng.integers(0, 256, (h, w))
    rows = np.zeros((h, w + 1), np.uint8)
    rows[:, 1:] = vals
    values = rows[:, 1:]

    def outcome(fn):
        try:
            got = fn()
        except BadInput as exc:
            return "bad", str(exc)
        return "ok", got.tobytes(), got.shape

    assert outcome(lambda: check_label_rows(rows, c)) == outcome(lambda: check_labels(values, c))


def test_decode_label_png_rows_holds_the_values_and_zero_filter_bytes():
    from isle_fast.stores.png import decode_label_png_rows

    a = np.random.default_rng(3).integers(0, 21, (17, 23)).astype(np.uint8)
    data = encode_palette_png(a, voc_palette().tobytes())
    rows = decode_label_png_rows(data)
    assert rows.shape == (17, 24) and rows.flags.c_contiguous and not rows[:, 0].any()
    assert np.array_equal(rows[:, 1:], a) and np.array_equal(decode_label_png(data), a)
