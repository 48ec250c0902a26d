"""Vote strata by their distance to agreement: the vote_context kernel equals NumPy; the context-refined
strata estimate on known cases."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from isle_fast.kernels import cpu
from tests.test_estimate import reference_vote_patterns


def reference_vote_context(sets, c, radii, gt=None):
    """Per class and pixel: the chessboard distance to every pixel all sets vote the class on, brute force."""
    labs = np.stack(sets)  # (N, H, W)
    n, h, w = labs.shape
    b_count = len(radii) + 1
    out = np.zeros((b_count, c, 1 << n, 3), np.int64)
    voting = (labs < c).any(axis=0)
    yy, xx = np.mgrid[0:h, 0:w]
    for k in range(c):
        mask = ((labs == k) * (1 << np.arange(n))[:, None, None]).sum(axis=0)
        every = (labs == k).all(axis=0)
        if every.any():
            ys, xs = np.nonzero(every)
            d = np.maximum(np.abs(yy[..., None] - ys), np.abs(xx[..., None] - xs)).min(axis=-1)
        else:
            d = np.full((h, w), np.iinfo(np.int64).max)
        b = np.full((h, w), b_count - 1)
        for j in range(len(radii) - 1, -1, -1):
            b[d <= radii[j]] = j
        sel = voting
        np.add.at(out[:, k, :, 0], (b[sel], mask[sel]), 1)
        if gt is not None:
            pos = sel & (gt == k)
            ign = sel & (gt >= c)
            np.add.at(out[:, k, :, 1], (b[pos], mask[pos]), 1)
            np.add.at(out[:, k, :, 2], (b[ign], mask[ign]), 1)
    return out


@settings(max_examples=80, deadline=None)
@given(n=st.integers(1, 4), c=st.integers(1, 5), shape=st.tuples(st.integers(0, 23), st.integers(0, 29)),
       radii=st.lists(st.integers(0, 12), min_size=1, max_size=4, unique=True), seed=st.integers(0, 2**31 - 1),
       blobs=st.booleans(), with_gt=st.booleans())
def test_vote_context_equals_numpy(n, c, shape, radii, seed, blobs, with_gt):
    rng = np.random.default_rng(seed)
    radii = sorted(radii)
    vals = np.array(list(range(c)) + [255, 200, c], np.uint8)
    sets = []
    base = rng.choice(vals, size=shape)
    for _ in range(n):
        a = rng.choice(vals, size=shape)
        if blobs:  # mostly one map with some noise: large regions every set agrees on, as in real sets
            a = np.where(rng.random(shape) < 0.8, base, a).astype(np.uint8)
        sets.append(a)
    gt = rng.choice(vals, size=shape) if with_gt else None
    got = cpu.vote_context(tuple(sets), c, radii, gt=gt)
    np.testing.assert_array_equal(got, reference_vote_context(sets, c, radii, gt))
    # summed over the bins: the vote patterns
    np.testing.assert_array_equal(got.sum(axis=0)[..., 0], reference_vote_patterns(sets, c))


def test_vote_context_bins_a_known_case():
    # one set votes class 1 on columns 0..5, the other on 0..2: they agree on 0..2
    a = np.zeros((1, 8), np.uint8)
    b = np.zeros((1, 8), np.uint8)
    a[0, :6] = 1
    b[0, :3] = 1
    out = cpu.vote_context((a, b), 2, (1, 2))
    # class 1: agreement (pattern 3) at distance 0 on 3 pixels; set 0 alone at distances 1, 2, 3
    assert out[0, 1, 3, 0] == 3
    assert (out[0, 1, 1, 0], out[1, 1, 1, 0], out[2, 1, 1, 0]) == (1, 1, 1)
    # columns 6, 7 vote background in both: pattern 0 of class 1, 3 and 4 pixels from the agreement
    assert out[2, 1, 0, 0] == 2


def test_vote_context_checks_its_arguments():
    a = np.zeros((2, 3), np.uint8)
    with pytest.raises(ValueError, match="increasing"):
        cpu.vote_context((a, a), 3, (4, 2))
    with pytest.raises(ValueError, match="2-D"):
        cpu.vote_context((a[None], a[None]), 3, (4,))
    with pytest.raises(ValueError, match="gt must be uint8"):
        cpu.vote_context((a, a), 3, (4,), gt=np.zeros((3, 3), np.uint8))
    with pytest.raises(ValueError, match="at most 12"):
        cpu.vote_context((a,) * 13, 3, (4,))

