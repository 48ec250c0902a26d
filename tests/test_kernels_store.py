"""kernels/store_cpu.py: the uint8 score quantisation equals its NumPy reference and keeps every argmax."""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref
from _scores import tricky_scores
from hypothesis import given, settings
from hypothesis import strategies as st

from isle_fast.kernels.store_cpu import keep_argmax_float, quantize_u8


@settings(max_examples=60)
@given(seed=st.integers(0, 2**31), n=st.integers(0, 300), c=st.integers(1, 25), pool=st.integers(1, 6),
       dtype=st.sampled_from([np.float32, np.float64]),
       layout=st.sampled_from(["c", "classes-first", "every-2nd"]))
def test_quantize_u8_equals_reference_and_keeps_argmax(seed, n, c, pool, dtype, layout):
    s = tricky_scores(seed, n, c, pool, dtype)
    if layout == "classes-first":   # a (C, H, W) stack seen as (H * W, C): what CAM ingest hands over
        s = np.ascontiguousarray(s.T).T
    elif layout == "every-2nd":
        s = np.repeat(s, 2, axis=0)[::2]
    before = s.copy()
    q, fixed = quantize_u8(s)
    np.testing.assert_array_equal(s, before)  # the input is not modified
    want = ref.quantize_scores_u8(s)
    assert q.dtype == np.uint8 and q.flags.c_contiguous
    np.testing.assert_array_equal(q, want)
    f = np.clip(s, 0, 1)
    if n:
        np.testing.assert_array_equal(np.argmax(q, axis=1), np.argmax(f, axis=1))
        assert np.abs(q.astype(np.float64) - 255 * f.astype(np.float64)).max() <= 1.5 + 1e-6
        plain = np.rint(f * dtype(255)).astype(np.uint8)
        assert fixed == int((np.argmax(plain, axis=1) != np.argmax(f, axis=1)).sum())
    else:
        assert fixed == 0


@settings(max_examples=60)
@given(seed=st.integers(0, 2**31), n=st.integers(0, 300), c=st.integers(1, 25), pool=st.integers(1, 6),
       pair=st.sampled_from([(np.float32, np.float16), (np.float64, np.float16), (np.float64, np.float32)]),
       layout=st.sampled_from(["c", "classes-first"]), negative_zero=st.booleans())
def test_keep_argmax_float_equals_reference(seed, n, c, pool, pair, layout, negative_zero):
    src, dst = pair
    s = tricky_scores(seed, n, c, pool, src)
    if src == np.float64:  # values one float32 / float16 step apart, which the cast merges
        s = s + np.random.default_rng(seed).choice([0.0, 1e-9, 3e-5], s.shape)
    if negative_zero:
        s[s <= 0] = -0.0
    if layout == "classes-first":
        s = np.ascontiguousarray(s.T).T
    before = s.copy()
    q = np.clip(s, 0, 1).astype(dst, order="C")
    fixed = keep_argmax_float(s, q)
    np.testing.assert_array_equal(s, before)
    want = np.ascontiguousarray(ref.keep_argmax_float(s, dst))
    np.testing.assert_array_equal(q.view(np.uint8), want.view(np.uint8))  # bit for bit (+0, not -0)
    if n:
        np.testing.assert_array_equal(np.argmax(q, 1), np.argmax(np.clip(s, 0, 1), 1))
        cast = np.clip(s, 0, 1).astype(dst)
        assert fixed == int((np.argmax(cast, 1) != np.argmax(np.clip(s, 0, 1), 1)).sum())


def test_quantize_u8_fixes_the_ties_plain_rounding_makes():
    # 0.1502 > 0.15 but both round to 38: plain rounding gives the pixel to the background (lower class)
    s = np.array([[0.15, 0.1502, 0.0], [0.15, 0.1499, 0.0], [1.0, 0.9995, 0.9999], [0.9999, 0.5, 1.0]],
                 np.float32)
    q, fixed = quantize_u8(s)
    assert np.rint(s * np.float32(255)).astype(np.uint8)[0].tolist() == [38, 38, 0]
    assert q.tolist() == [[38, 39, 0], [38, 38, 0], [255, 255, 255], [254, 128, 255]]
    assert fixed == 2 and np.argmax(q, 1).tolist() == [1, 0, 0, 2]


def test_quantize_u8_rejects_what_it_cannot_take():
    with pytest.raises(ValueError, match=r"\(n, C\) float32"):
        quantize_u8(np.zeros((2, 3, 4), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        quantize_u8(np.zeros((2, 3), np.uint8))
    with pytest.raises(ValueError, match="C-contiguous float16 / float32"):
        keep_argmax_float(np.zeros((2, 3), np.float32), np.zeros((2, 3), np.uint8))
