"""Every GPU kernel, run under Numba's CUDA simulator, equals the NumPy reference exactly.

Tiny arrays (a few hundred pixels) and few hypothesis examples: the simulator runs each
CUDA thread as a Python thread. The test hooks ``_SHARED_BINS`` (shared-memory table
budget) and ``_CHUNK_PIXELS`` (host pipeline chunk) force the other code paths: tables
counted in several launches, the global-atomics fallback, and many pipeline chunks with
odd tails on both streams.
"""

from __future__ import annotations

import contextlib
import itertools
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import reference as R
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import cuda

from isle_fast import backend
from isle_fast.kernels import gpu as G

pytestmark = pytest.mark.cudasim

FEW = settings(max_examples=8, deadline=None)

seeds = st.integers(0, 2**32 - 1)
shapes = st.lists(st.integers(1, 9), min_size=1, max_size=3).filter(lambda s: np.prod(s) <= 300)
modes = st.sampled_from(["default", "grouped", "global", "chunked"])
policies = st.sampled_from([G.SCORE, G.ORDER, G.IGNORE])
score_dtypes = st.sampled_from([np.uint8, np.float16, np.float32])
thresholds = st.sampled_from([-1.0, 0.0, 0.3, 0.5, 1.0, 127.5, 300.0])


@contextlib.contextmanager
def mode(name: str, C: int, rng: np.random.Generator):
    """Force a code path of the GPU module for the duration of a call."""
    saved = (G._SHARED_BINS, G._CHUNK_PIXELS)
    try:
        if name == "grouped":          # one or two tables per launch
            G._SHARED_BINS = C * (C + 1) * int(rng.integers(1, 3))
        elif name == "global":         # no table fits: global uint64 atomics
            G._SHARED_BINS = 0
        elif name == "chunked":        # many host-pipeline chunks, odd tail
            G._CHUNK_PIXELS = int(rng.integers(1, 40))
        yield
    finally:
        G._SHARED_BINS, G._CHUNK_PIXELS = saved


def label_map(rng: np.random.Generator, shape, C: int) -> np.ndarray:
    """Labels in [0, C), 255, and other values >= C; half the time piecewise constant (runs)."""
    a = rng.integers(0, C, shape)
    r = rng.random(shape)
    a = np.where(r < 0.15, 255, a)
    if C < 255:                       # other abstentions: just above C, and far above
        big = np.minimum(np.array([C, C + 1, C + 2, 254]), 254)[rng.integers(0, 4, shape)]
        a = np.where((r >= 0.15) & (r < 0.25), big, a)
    a = a.astype(np.uint8)
    if rng.random() < 0.5:            # runs of equal values along the last axis
        a.reshape(-1, a.shape[-1])[:, 1::2] = a.reshape(-1, a.shape[-1])[:, 0:-1:2]
    return a


def score_stack(rng: np.random.Generator, shape, C: int, dtype) -> np.ndarray:
    """Scores from a small pool (ties are common); float16 adds -0, subnormals, -1, inf, max."""
    if dtype == np.uint8:
        pool = np.array([0, 1, 50, 127, 128, 200, 255], np.uint8)
    else:
        pool = np.array([0.0, 0.25, 0.3, 0.5, 1.0], dtype)
        if dtype == np.float16:
            pool = np.concatenate([pool, np.array([-0.0, 6e-8, 1e-5, -1.0, np.inf, 65504.0], np.float16)])
    return pool[rng.integers(0, pool.size, tuple(shape) + (C,))]


def same(a: np.ndarray, b: np.ndarray) -> None:
    assert isinstance(a, np.ndarray)
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(a, b)


def test_simulator_is_on_and_backend_picks_gpu():
    assert G.SIMULATOR and backend.simulator_enabled() and backend.gpu_available()
    assert backend.resolve_backend("auto") == "gpu"
    assert backend.get_kernels("auto") is G


@FEW
@given(seed=seeds, shape=shapes, C=st.integers(1, 6), N=st.integers(1, 4), m=modes)
def test_confusion_labels(seed, shape, C, N, m):
    rng = np.random.default_rng(seed)
    gt = label_map(rng, shape, C)
    sets = [label_map(rng, shape, C) for _ in range(N)]
    with mode(m, C, rng):
        got = G.confusion_labels(gt, sets, C)
    same(got, R.confusion_labels(gt, sets, C))


@FEW
@given(seed=seeds, shape=shapes, C=st.integers(1, 5), N=st.integers(1, 3), dtype=score_dtypes,
       thr=thresholds, m=modes)
def test_confusion_scores(seed, shape, C, N, dtype, thr, m):
    rng = np.random.default_rng(seed)
    gt = label_map(rng, shape, C)
    sets = [score_stack(rng, shape, C, dtype) for _ in range(N)]
    with mode(m, C, rng):
        got = G.confusion_scores(gt, sets, C, thr)
    same(got, R.confusion_scores(gt, sets, C, thr))


@FEW
@given(seed=seeds, shape=shapes, C=st.integers(1, 6), dtype=score_dtypes, thr=thresholds,
       chunked=st.booleans())
def test_decode_scores(seed, shape, C, dtype, thr, chunked):
    rng = np.random.default_rng(seed)
    scores = score_stack(rng, shape, C, dtype)
    with mode("chunked" if chunked else "default", C, rng):
        got = G.decode_scores(scores, thr)
    same(got, R.decode_scores(scores, thr))


def test_half_decode_is_exact_for_every_bit_pattern():
    bits = np.arange(1 << 16, dtype=np.uint16)
    bits = bits[~np.isnan(bits.view(np.float16))]

    @cuda.jit
    def kernel(h, out):
        for i in range(cuda.grid(1), h.shape[0], cuda.gridsize(1)):
            out[i] = G._read_half(h, i)

    out = np.zeros(bits.size, np.float64)
    kernel[4, 32](bits, out)
    np.testing.assert_array_equal(out, bits.view(np.float16).astype(np.float64))
    assert np.array_equal(np.signbit(out), np.signbit(bits.view(np.float16)))


@FEW
@given(seed=seeds, shape=shapes, C=st.integers(1, 6), N=st.integers(1, 4), policy=policies,
       chunked=st.booleans())
def test_merge_labels(seed, shape, C, N, policy, chunked):
    rng = np.random.default_rng(seed)
    sets = [label_map(rng, shape, C) for _ in range(N)]
    selection = rng.integers(0, N, C)
    priority = rng.choice([0.0, 0.5, 1.0], (N, C))          # ties are common
    with mode("chunked" if chunked else "default", C, rng):
        got = G.merge_labels(sets, selection, priority, policy)
    same(got, R.merge_labels(sets, selection, priority, policy))


@FEW
@given(seed=seeds, shape=shapes, C=st.integers(1, 5), N=st.integers(1, 3), dtype=score_dtypes,
       thr=thresholds, policy=policies, chunked=st.booleans())
def test_merge_scores(seed, shape, C, N, dtype, thr, policy, chunked):
    rng = np.random.default_rng(seed)
    sets = [score_stack(rng, shape, C, dtype) for _ in range(N)]
    selection = rng.integers(0, N, C)
    with mode("chunked" if chunked else "default", C, rng):
        labels, merged = G.merge_scores(sets, selection, policy, thr)
    ref_labels, ref_merged = R.merge_scores(sets, selection, policy, thr)
    same(labels, ref_labels)
    assert merged.dtype == ref_merged.dtype and merged.shape == ref_merged.shape
    np.testing.assert_array_equal(merged.view(np.uint8), ref_merged.view(np.uint8))   # bit for bit


def subsets(rng: np.random.Generator, N: int, C: int, first: int):
    """Random subsets of the N sets (all of them when few) with selections inside each subset."""
    combos = [c for r in range(1, N + 1) for c in itertools.combinations(range(N), r)]
    pick = rng.permutation(len(combos))[: int(rng.integers(1, len(combos) + 1))]
    members = np.zeros((pick.size, N), bool)
    selections = np.zeros((pick.size, C), np.int64)
    for s, k in enumerate(pick):
        members[s, list(combos[k])] = True
        selections[s] = rng.choice(combos[k], C)
        if first == 1:
            selections[s, 0] = rng.integers(0, N)             # unused for label sets
    return selections, members


@FEW
@given(seed=seeds, shape=shapes, C=st.integers(1, 5), N=st.integers(1, 3), policy=policies, m=modes)
def test_subset_confusion_labels(seed, shape, C, N, policy, m):
    rng = np.random.default_rng(seed)
    gt = label_map(rng, shape, C)
    sets = [label_map(rng, shape, C) for _ in range(N)]
    selections, members = subsets(rng, N, C, first=1)
    priority = rng.choice([0.0, 0.5, 1.0], (N, C))
    with mode(m, C, rng):
        got = G.subset_confusion_labels(gt, sets, selections, members.astype(np.uint8), priority, policy, C)
    same(got, R.subset_confusion_labels(gt, sets, selections, members, priority, policy, C))


@FEW
@given(seed=seeds, shape=shapes, C=st.integers(1, 4), N=st.integers(1, 3), dtype=score_dtypes,
       thr=thresholds, policy=policies, m=modes)
def test_subset_confusion_scores(seed, shape, C, N, dtype, thr, policy, m):
    rng = np.random.default_rng(seed)
    gt = label_map(rng, shape, C)
    sets = [score_stack(rng, shape, C, dtype) for _ in range(N)]
    selections, members = subsets(rng, N, C, first=0)
    with mode(m, C, rng):
        got = G.subset_confusion_scores(gt, sets, selections, members, policy, C, thr)
    same(got, R.subset_confusion_scores(gt, sets, selections, members, policy, C, thr))


def test_device_arrays_in_give_device_arrays_out(rng):
    C, N, shape = 4, 3, (5, 11)
    gt = label_map(rng, shape, C)
    sets = [label_map(rng, shape, C) for _ in range(N)]
    scores = [score_stack(rng, shape, C, np.float16) for _ in range(N)]
    sel = rng.integers(0, N, C)
    prio = rng.random((N, C))
    d = cuda.to_device
    got = G.confusion_labels(d(gt), [d(s) for s in sets], C)
    assert not isinstance(got, np.ndarray)
    same(got.copy_to_host(), R.confusion_labels(gt, sets, C))
    got = G.confusion_scores(d(gt), [d(s) for s in scores], C, 0.3)
    same(got.copy_to_host(), R.confusion_scores(gt, scores, C, 0.3))
    same(G.decode_scores(d(scores[0])).copy_to_host(), R.decode_scores(scores[0]))
    same(G.merge_labels([d(s) for s in sets], sel, prio, G.SCORE).copy_to_host(),
         R.merge_labels(sets, sel, prio, G.SCORE))
    labels, merged = G.merge_scores([d(s) for s in scores], sel, G.ORDER, 0.5)
    ref_labels, ref_merged = R.merge_scores(scores, sel, G.ORDER, 0.5)
    same(labels.copy_to_host(), ref_labels)
    np.testing.assert_array_equal(merged.copy_to_host().view(np.uint16), ref_merged.view(np.uint16))
    sels, mem = subsets(rng, N, C, first=0)
    same(G.subset_confusion_scores(d(gt), [d(s) for s in scores], sels, mem, G.SCORE, C).copy_to_host(),
         R.subset_confusion_scores(gt, scores, sels, mem, G.SCORE, C))
    same(G.subset_confusion_labels(d(gt), [d(s) for s in sets], sels, mem, prio, G.IGNORE, C).copy_to_host(),
         R.subset_confusion_labels(gt, sets, sels, mem, prio, G.IGNORE, C))


def test_empty_inputs(rng):
    C = 3
    gt = np.zeros((0, 4), np.uint8)
    sets = [gt.copy(), gt.copy()]
    scores = [np.zeros((0, 4, C), np.float32)] * 2
    same(G.confusion_labels(gt, sets, C), np.zeros((2, C, C + 1), np.int64))
    same(G.confusion_scores(gt, scores, C), np.zeros((2, C, C + 1), np.int64))
    same(G.decode_scores(scores[0]), np.zeros((0, 4), np.uint8))
    same(G.merge_labels(sets, np.zeros(C, np.int64), np.zeros((2, C)), G.SCORE), np.zeros((0, 4), np.uint8))
    labels, merged = G.merge_scores(scores, np.zeros(C, np.int64), G.SCORE)
    same(labels, np.zeros((0, 4), np.uint8))
    same(merged, scores[0])


def test_concurrent_calls_from_threads(rng):
    """Dask's threaded scheduler calls kernels from several threads at once."""
    C, shape = 5, (6, 7)
    jobs = [(label_map(rng, shape, C), [label_map(rng, shape, C) for _ in range(2)]) for _ in range(6)]
    with mode("chunked", C, rng), ThreadPoolExecutor(3) as pool:
        got = list(pool.map(lambda j: G.confusion_labels(j[0], j[1], C), jobs))
    for g, (gt, sets) in zip(got, jobs):
        same(g, R.confusion_labels(gt, sets, C))


def test_non_contiguous_and_big_labels(rng):
    """Strided views, 3-D gt, label values between C and 254 (abstentions)."""
    C = 3
    base = rng.integers(0, 256, (6, 10, 8)).astype(np.uint8)
    gt = base[:, ::2, 1::2]
    sets = [np.asarray(rng.integers(0, 256, (6, 5, 4)), np.uint8).T.copy().T for _ in range(3)]
    same(G.confusion_labels(gt, sets, C), R.confusion_labels(gt, sets, C))
    sel = np.array([0, 2, 1])
    same(G.merge_labels(sets, sel, np.ones((3, C)), G.IGNORE), R.merge_labels(sets, sel, np.ones((3, C)), G.IGNORE))

