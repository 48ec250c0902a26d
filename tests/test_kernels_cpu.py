"""The Numba CPU kernels against the plain NumPy references (tests/reference.py): counts EQUAL."""

from __future__ import annotations

import itertools

import numba
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from isle_fast.kernels import cpu
from tests import reference as ref

DTYPES = (np.uint8, np.float16, np.float32)
THRESHOLDS = (-1.0, 0.0, 1.0, 1.5, 2.0, 2.5, 300.0)


# ------------------------------------------------------------------------------------------------
# random inputs that look like label maps (uniform runs, mostly agreeing sets) so that every code
# path of the kernels (uniform words, agreeing words, per-pixel, tails) is exercised
# ------------------------------------------------------------------------------------------------

def _shape(rng: np.random.Generator) -> tuple:
    ndim = int(rng.integers(1, 4))
    dims = [int(rng.choice([1, 2, 3, 7, 8, 9, 13, 17, 31, 40])) for _ in range(ndim)]
    return tuple(dims)


def _label_map(rng, shape, C, p_ignore, run=None):
    """Blocky class map (runs of equal labels) with some 255."""
    size = int(np.prod(shape))
    run = run or int(rng.choice([1, 3, 8, 16, 64, 300]))
    base = rng.integers(0, C, -(-size // run))
    lab = np.repeat(base, run)[:size].astype(np.uint8)
    lab[rng.random(size) < p_ignore] = 255
    return lab.reshape(shape)


def _label_sets(rng, gt, C, N):
    """N sets: gt with a random fraction of pixels changed, abstentions 255 and other values >= C."""
    sets = []
    for _ in range(N):
        s = gt.copy().reshape(-1)
        s[s >= C] = rng.integers(0, C, int((s >= C).sum()))
        flip = rng.random(s.size) < rng.choice([0.0, 0.05, 0.5, 1.0])
        s[flip] = rng.integers(0, C, int(flip.sum()))
        ab = rng.random(s.size) < rng.choice([0.0, 0.1, 0.5])
        s[ab] = 255
        if C < 255:
            other = rng.random(s.size) < 0.02
            s[other] = rng.integers(C, 256, int(other.sum()))
        sets.append(s.reshape(gt.shape))
    return tuple(sets)


def _label_case(seed, C=None, N=None, shape=None):
    rng = np.random.default_rng(seed)
    C = C or int(rng.integers(2, 31))
    N = N or int(rng.integers(1, 6))
    shape = shape or _shape(rng)
    gt = _label_map(rng, shape, C, rng.choice([0.0, 0.1, 0.6]))
    return rng, C, N, gt, _label_sets(rng, gt, C, N)


def _scores(rng, shape, C, dtype):
    """Small integer-valued scores (ties happen), negative zeros / negatives for floats."""
    s = rng.integers(0, 4, shape + (C,)).astype(dtype)
    if dtype != np.uint8:
        neg = rng.random(s.shape) < 0.2
        s[neg] = -s[neg]          # -0.0 included
        s[rng.random(s.shape) < 0.1] = dtype(0.5)
    return s


def _score_case(seed, N=None):
    rng = np.random.default_rng(seed)
    C = int(rng.integers(2, 31))
    N = N or int(rng.choice([1, 3]))
    shape = _shape(rng)
    gt = _label_map(rng, shape, C, rng.choice([0.0, 0.3]))
    dtype = DTYPES[int(rng.integers(0, 3))]
    sets = tuple(_scores(rng, shape, C, dtype) for _ in range(N))
    thr = float(rng.choice(THRESHOLDS))
    return rng, C, N, gt, sets, thr


def _selection(rng, C, N, priority_levels=3):
    sel = rng.integers(0, N, C).astype(np.int64)
    pri = rng.integers(0, priority_levels, (N, C)).astype(np.float64)   # ties on purpose
    return sel, pri


def _subsets(rng, C, N, first):
    """Every non-empty subset (or a random sample of them), selections pointing at members."""
    allm = [m for m in itertools.product([0, 1], repeat=N) if any(m)]
    take = rng.permutation(len(allm))[: int(rng.integers(1, len(allm) + 1))]
    members = np.array([allm[i] for i in take], dtype=bool)
    sels = np.zeros((len(members), C), np.int64)
    for s, m in enumerate(members):
        idx = np.flatnonzero(m)
        sels[s] = idx[rng.integers(0, idx.size, C)]
        if first == 1:
            sels[s, 0] = rng.integers(0, N)     # unused for labels: may point anywhere
    return sels, members


seeds = st.integers(0, 2**32 - 1)


# ------------------------------------------------------------------------------------------------
# confusion
# ------------------------------------------------------------------------------------------------

@given(seeds)
def test_confusion_labels_equals_reference(seed):
    _, C, N, gt, sets = _label_case(seed)
    got = cpu.confusion_labels(gt, sets, C)
    assert got.dtype == np.int64 and got.shape == (N, C, C + 1)
    assert np.array_equal(got, ref.confusion_labels(gt, sets, C))


@given(seeds)
def test_confusion_labels_chunking_does_not_matter(seed):
    rng, C, N, gt, sets = _label_case(seed)
    axis = int(rng.integers(0, gt.ndim))
    cuts = np.sort(rng.integers(0, gt.shape[axis] + 1, int(rng.integers(1, 4))))
    total = np.zeros((N, C, C + 1), np.int64)
    for a, b in zip(np.r_[0, cuts], np.r_[cuts, gt.shape[axis]]):
        sl = (slice(None),) * axis + (slice(int(a), int(b)),)
        total += cpu.confusion_labels(gt[sl], tuple(s[sl] for s in sets), C)   # non-contiguous views
    assert np.array_equal(total, cpu.confusion_labels(gt, sets, C))


def _padded_case(seed):
    """k images padded to H x W (padding of any value, not only 255), their (rows, cols), N sets."""
    rng = np.random.default_rng(seed)
    C = int(rng.integers(2, 31))
    N = int(rng.integers(1, 6))
    k = int(rng.integers(0, 5))
    H = int(rng.choice([1, 2, 7, 8, 9, 13, 17, 31, 40]))
    W = int(rng.choice([1, 2, 7, 8, 9, 13, 17, 31, 40, 67]))
    gt = _label_map(rng, (k, H, W), C, rng.choice([0.0, 0.1, 0.6]))
    sets = _label_sets(rng, gt, C, N)
    rows = rng.integers(0, H + 1, k)
    cols = np.where(rng.random(k) < 0.5, W, rng.integers(0, W + 1, k))    # whole rows often (VOC)
    rows[rng.random(k) < 0.2] = H
    return rng, C, N, gt, sets, np.stack([rows, cols], axis=1) if k else np.zeros((0, 2), np.int64)


@given(seeds)
def test_confusion_labels_images_equals_reference(seed):
    """Per image: the reference on the image's own region; the padding (any values) never counts."""
    rng, C, N, gt, sets, shapes = _padded_case(seed)
    per = cpu.confusion_labels_images(gt, sets, shapes.astype(rng.choice([np.int32, np.int64, np.uint16])), C,
                                      per_image=True)
    assert per.dtype == np.int64 and per.shape == (gt.shape[0], N, C, C + 1)
    for m, (r, c) in enumerate(shapes):
        assert np.array_equal(per[m], ref.confusion_labels(gt[m, :r, :c], [s[m, :r, :c] for s in sets], C))
    total = cpu.confusion_labels_images(gt, sets, shapes, C)
    assert total.shape == (N, C, C + 1) and np.array_equal(total, per.sum(axis=0))
    full = np.tile([gt.shape[1], gt.shape[2]], (gt.shape[0], 1))
    assert np.array_equal(cpu.confusion_labels_images(gt, sets, full, C), cpu.confusion_labels(gt, sets, C))


def test_confusion_labels_images_large_blocks():
    """Images larger than the kernel's cache block, rows that do not start on a word, a long run."""
    rng = np.random.default_rng(11)
    C, N, H, W = 21, 4, 157, 301   # 157 x 301 > 4096 words; row starts at every byte offset
    gt = _label_map(rng, (3, H, W), C, 0.01, run=700)
    sets = _label_sets(rng, gt, C, N)
    shapes = np.array([[H, W], [150, W], [H, 293]])
    per = cpu.confusion_labels_images(gt, sets, shapes, C, per_image=True)
    for m, (r, c) in enumerate(shapes):
        assert np.array_equal(per[m], ref.confusion_labels(gt[m, :r, :c], [s[m, :r, :c] for s in sets], C))


def test_confusion_labels_images_validation():
    g = np.zeros((2, 4, 5), np.uint8)
    with pytest.raises(ValueError, match=r"shapes must be a \(2, 2\) integer array"):
        cpu.confusion_labels_images(g, (g,), np.zeros((3, 2), np.int64), 3)
    with pytest.raises(ValueError, match="integer array"):
        cpu.confusion_labels_images(g, (g,), np.zeros((2, 2), np.float64), 3)
    with pytest.raises(ValueError, match="within the padded 4 x 5"):
        cpu.confusion_labels_images(g, (g,), np.array([[4, 6], [1, 1]]), 3)
    with pytest.raises(ValueError, match="within the padded"):
        cpu.confusion_labels_images(g, (g,), np.array([[-1, 2], [1, 1]]), 3)
    with pytest.raises(ValueError, match=r"\(images, H, W\)"):
        cpu.confusion_labels_images(g[0], (g[0],), np.zeros((4, 2), np.int64), 3)
    with pytest.raises(ValueError, match=r"sets\[0\] has shape"):
        cpu.confusion_labels_images(g, (g[:1],), np.zeros((2, 2), np.int64), 3)


@given(seeds)
def test_confusion_scores_equals_reference(seed):
    _, C, N, gt, sets, thr = _score_case(seed)
    got = cpu.confusion_scores(gt, sets, C, thr)
    assert np.array_equal(got, ref.confusion_scores(gt, sets, C, thr))
    assert not got[:, :, C].any()


@given(seeds)
def test_decode_scores_equals_reference(seed):
    _, C, N, gt, sets, thr = _score_case(seed, N=1)
    got = cpu.decode_scores(sets[0], thr)
    assert got.dtype == np.uint8 and got.shape == gt.shape
    assert np.array_equal(got, ref.decode_scores(sets[0], thr))


def test_decode_ties_and_threshold_units():
    s = np.array([[3, 3, 1], [1, 3, 3], [0, 0, 0], [2, 1, 2]], np.uint8)
    assert cpu.decode_scores(s).tolist() == [0, 1, 0, 0]
    # threshold 2.5 on uint8: 3 > 2.5 claims, 2 does not; the threshold replaces slice 0
    assert cpu.decode_scores(s, 2.5).tolist() == [1, 1, 0, 0]
    h = s.astype(np.float16)
    h[2] = [-0.0, 0.0, -0.0]
    assert cpu.decode_scores(h).tolist() == [0, 1, 0, 0]


# ------------------------------------------------------------------------------------------------
# merge
# ------------------------------------------------------------------------------------------------

@given(seeds, st.sampled_from([cpu.SCORE, cpu.ORDER, cpu.IGNORE]))
def test_merge_labels_equals_reference(seed, policy):
    rng, C, N, gt, sets = _label_case(seed)
    sel, pri = _selection(rng, C, N)
    got = cpu.merge_labels(sets, sel, pri, policy)
    assert got.dtype == np.uint8 and got.shape == gt.shape
    assert np.array_equal(got, ref.merge_labels(sets, sel, pri, policy))


def test_merge_labels_rules():
    # two sets, 3 classes; set 0 chosen for class 1, set 1 for class 2
    a = np.array([1, 1, 2, 0, 255, 255, 1], np.uint8)
    b = np.array([2, 0, 2, 0, 255, 0, 1], np.uint8)
    sel = np.array([0, 0, 1])
    pri = np.array([[0, 5, 0], [0, 0, 7]], float)
    assert cpu.merge_labels((a, b), sel, pri, cpu.SCORE).tolist() == [2, 1, 2, 0, 255, 0, 1]
    assert cpu.merge_labels((a, b), sel, pri, cpu.ORDER).tolist() == [1, 1, 2, 0, 255, 0, 1]
    assert cpu.merge_labels((a, b), sel, pri, cpu.IGNORE).tolist() == [255, 1, 2, 0, 255, 0, 1]


def _blocky_sets(rng, shape, C, N):
    """gt and N sets that are 2-D blocky (equal rows repeat, as real label maps): the merge's row-above
    copies run, beside sets that differ in rectangles, pixel noise, abstentions 255 and values >= C."""
    lead, H, W = shape[:-2], shape[-2] if len(shape) > 1 else 1, shape[-1]
    bh, bw = int(rng.choice([1, 2, 5, 16])), int(rng.choice([1, 3, 8, 20]))
    low = rng.integers(0, C, lead + (-(-H // bh), -(-W // bw))).astype(np.uint8)
    gt = np.repeat(np.repeat(low, bh, axis=-2), bw, axis=-1)[..., :H, :W].reshape(shape)
    gt = np.where(rng.random(shape) < rng.choice([0.0, 0.05]), 255, gt).astype(np.uint8)
    sets = []
    for _ in range(N):
        s = np.where(gt >= C, rng.integers(0, C, shape), gt).astype(np.uint8).reshape(lead + (H, W))
        for _ in range(int(rng.integers(0, 4))):      # a rectangle of another class (or abstention)
            r0, c0 = int(rng.integers(0, H)), int(rng.integers(0, W))
            v = 255 if rng.random() < 0.3 else int(rng.integers(0, C))
            s[..., r0:r0 + int(rng.integers(1, H + 1)), c0:c0 + int(rng.integers(1, W + 1))] = v
        s = s.reshape(shape)
        noise = rng.random(shape) < rng.choice([0.0, 0.01, 0.2])
        s[noise] = rng.integers(0, 256, int(noise.sum()))   # values >= C too
        sets.append(s)
    return gt, tuple(sets)


_MERGE_CLASSES = [2, 3, 21, 30, 126, 127, 128, 129, 200, 255]   # 127 / 128: the word paths' limits


@given(seeds, st.sampled_from([cpu.SCORE, cpu.ORDER, cpu.IGNORE]))
def test_merge_labels_blocky_maps_equal_reference(seed, policy):
    """Maps whose rows repeat (the row-above copies), any width (under a word too), C past 127 / 128."""
    rng = np.random.default_rng(seed)
    C = int(rng.choice(_MERGE_CLASSES))
    N = int(rng.integers(1, 6))
    ndim = int(rng.integers(1, 4))
    shape = tuple(int(rng.choice([1, 2, 3, 5, 7, 8, 9, 17, 40, 67, 130])) for _ in range(ndim))
    gt, sets = _blocky_sets(rng, shape, C, N)
    sel, pri = _selection(rng, C, N)
    got = cpu.merge_labels(sets, sel, pri, policy)
    assert got.dtype == np.uint8 and got.shape == shape
    assert np.array_equal(got, ref.merge_labels(sets, sel, pri, policy))


def _merge_count_reference(gt, sets, shapes, sel, pri, policy, C):
    """The reference merge with 255 outside each image's region, and its per-image confusion."""
    lab = ref.merge_labels(sets, sel, pri, policy).astype(np.uint8)
    per = np.zeros((gt.shape[0], 1, C, C + 1), np.int64)
    for m, (r, c) in enumerate(shapes):
        lab[m, r:] = 255
        lab[m, :, c:] = 255
        per[m] = ref.confusion_labels(gt[m, :r, :c], [lab[m, :r, :c]], C)
    return lab, per


@given(seeds, st.sampled_from([cpu.SCORE, cpu.ORDER, cpu.IGNORE]), st.booleans())
def test_merge_count_images_equals_reference(seed, policy, blocky):
    """Labels as merge_labels with the padding 255, counts as confusion_labels_images of them; padded
    chunks of odd sizes, padding of any value in the sets, gt 255, C past the word paths' limits."""
    rng, C, N, gt, sets, shapes = _padded_case(seed)
    if blocky or rng.random() < 0.3:
        C = int(rng.choice(_MERGE_CLASSES)) if rng.random() < 0.5 else C
        gt, sets = _blocky_sets(rng, gt.shape, C, N)
    sel, pri = _selection(rng, C, N)
    want, per = _merge_count_reference(gt, sets, shapes, sel, pri, policy, C)
    lab, counts = cpu.merge_count_images(sets, gt, shapes.astype(rng.choice([np.int32, np.int64])), sel, pri,
                                         policy, per_image=True)
    assert lab.dtype == np.uint8 and lab.shape == gt.shape and np.array_equal(lab, want)
    assert counts.dtype == np.int64 and np.array_equal(counts, per)
    lab1, total = cpu.merge_count_images(sets, gt, shapes, sel, pri, policy)
    assert np.array_equal(lab1, want) and np.array_equal(total, per.sum(axis=0))
    assert np.array_equal(total, cpu.confusion_labels_images(gt, (want,), shapes, C))


def test_merge_count_images_large_blocky_chunk():
    """VOC-like: images larger than the count's cache block, rows not starting on a word, portrait and
    landscape images in one padded chunk, all three policies."""
    rng = np.random.default_rng(5)
    C, N, H, W = 21, 4, 157, 301
    gt, sets = _blocky_sets(rng, (4, H, W), C, N)
    shapes = np.array([[H, W], [150, W], [H, 293], [0, 0]])
    sel, pri = _selection(rng, C, N)
    for policy in (cpu.SCORE, cpu.ORDER, cpu.IGNORE):
        want, per = _merge_count_reference(gt, sets, shapes, sel, pri, policy, C)
        lab, counts = cpu.merge_count_images(sets, gt, shapes, sel, pri, policy, per_image=True)
        assert np.array_equal(lab, want) and np.array_equal(counts, per)


def test_merge_count_images_validation():
    g = np.zeros((2, 4, 5), np.uint8)
    sel, pri = np.zeros(3, np.int64), np.zeros((1, 3))
    with pytest.raises(ValueError, match=r"shapes must be a \(2, 2\) integer array"):
        cpu.merge_count_images((g,), g, np.zeros((3, 2), np.int64), sel, pri, cpu.SCORE)
    with pytest.raises(ValueError, match="within the padded 4 x 5"):
        cpu.merge_count_images((g,), g, np.array([[4, 6], [1, 1]]), sel, pri, cpu.SCORE)
    with pytest.raises(ValueError, match=r"\(images, H, W\)"):
        cpu.merge_count_images((g[0],), g[0], np.zeros((4, 2), np.int64), sel, pri, cpu.SCORE)
    with pytest.raises(ValueError, match=r"sets\[0\] has shape"):
        cpu.merge_count_images((g[:1],), g, np.zeros((2, 2), np.int64), sel, pri, cpu.SCORE)
    with pytest.raises(ValueError, match="policy"):
        cpu.merge_count_images((g,), g, np.zeros((2, 2), np.int64), sel, pri, 7)


@given(seeds, st.sampled_from([cpu.SCORE, cpu.ORDER, cpu.IGNORE]))
def test_merge_scores_equals_reference(seed, policy):
    rng, C, N, gt, sets, thr = _score_case(seed)
    sel = rng.integers(0, N, C).astype(np.int64)
    labels, merged = cpu.merge_scores(sets, sel, policy, thr)
    rl, rm = ref.merge_scores(sets, sel, policy, thr)
    assert merged.dtype == sets[0].dtype and merged.shape == sets[0].shape
    assert np.array_equal(labels, rl)
    assert np.array_equal(merged.view(np.uint8), rm.view(np.uint8))    # bit-exact copy
    if policy == cpu.SCORE:
        assert np.array_equal(labels, cpu.decode_scores(merged))


# ------------------------------------------------------------------------------------------------
# every-subset analysis
# ------------------------------------------------------------------------------------------------

@given(seeds, st.sampled_from([cpu.SCORE, cpu.ORDER, cpu.IGNORE]), st.sampled_from(["hash", "direct"]))
def test_subset_confusion_labels_equals_reference(seed, policy, method):
    rng, C, N, gt, sets = _label_case(seed)
    sel, pri = _selection(rng, C, N)
    sels, members = _subsets(rng, C, N, first=1)
    got = cpu.subset_confusion_labels(gt, sets, sels, members, pri, policy, C, method=method)
    assert np.array_equal(got, ref.subset_confusion_labels(gt, sets, sels, members, pri, policy, C))


@given(seeds, st.sampled_from([cpu.SCORE, cpu.ORDER, cpu.IGNORE]))
def test_subset_confusion_scores_equals_reference(seed, policy):
    rng, C, N, gt, sets, thr = _score_case(seed)
    sels, members = _subsets(rng, C, N, first=0)
    got = cpu.subset_confusion_scores(gt, sets, sels, members, policy, C, thr)
    assert np.array_equal(got, ref.subset_confusion_scores(gt, sets, sels, members, policy, C, thr))


def test_subset_of_one_set_equals_confusion():
    rng, C, N, gt, sets = _label_case(7, C=6, N=3, shape=(9, 31))
    members = np.eye(N, dtype=bool)
    sels = np.repeat(np.arange(N)[:, None], C, axis=1)
    pri = np.zeros((N, C))
    got = cpu.subset_confusion_labels(gt, sets, sels, members, pri, cpu.SCORE, C)
    assert np.array_equal(got, cpu.confusion_labels(gt, sets, C))


# ------------------------------------------------------------------------------------------------
# several parallel chunks, hash-table flushes, thread count independence
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("threads,run", [(1, 700), (None, 700), (None, 5)])
def test_large_inputs_several_chunks(threads, run):
    rng = np.random.default_rng(3)
    C, N = 21, 3
    gt = _label_map(rng, (3 * cpu.BLOCK + 13,), C, 0.01 if run < 100 else 0.0002, run=run)
    sets = _label_sets(rng, gt, C, N)
    if run < 100:   # one set is noise: many distinct tuples (hash table flushes)
        sets = (sets[0], rng.integers(0, 256, gt.shape).astype(np.uint8), sets[2])
    else:           # long runs where all sets agree (word / block fast paths), a few changes; one set
        half = np.arange(gt.size) < gt.size // 2     # disagrees over whole runs in one half (repeat path)
        base = (gt, np.where(half & (gt < C), (gt + 1) % C, gt), gt)
        sets = tuple(np.where(rng.random(gt.shape) < 0.9995, b, s).astype(np.uint8) for b, s in zip(base, sets))
    sel, pri = _selection(rng, C, N)
    sels, members = _subsets(rng, C, N, first=1)
    old = numba.get_num_threads()
    try:
        numba.set_num_threads(threads or old)
        assert np.array_equal(cpu.confusion_labels(gt, sets, C), ref.confusion_labels(gt, sets, C))
        for pol in (cpu.SCORE, cpu.ORDER, cpu.IGNORE):
            assert np.array_equal(cpu.merge_labels(sets, sel, pri, pol), ref.merge_labels(sets, sel, pri, pol))
            assert np.array_equal(cpu.subset_confusion_labels(gt, sets, sels, members, pri, pol, C),
                                  ref.subset_confusion_labels(gt, sets, sels, members, pri, pol, C))
    finally:
        numba.set_num_threads(old)


@pytest.mark.parametrize("threads", [1, None])
def test_merge_labels_blocky_several_chunks(threads):
    """Several parallel work items on 2-D blocky maps: a row-above copy never reads another item's output."""
    rng = np.random.default_rng(8)
    C, N = 21, 4
    gt, sets = _blocky_sets(rng, (5, 203, 301), C, N)
    sel, pri = _selection(rng, C, N)
    old = numba.get_num_threads()
    try:
        numba.set_num_threads(threads or old)
        for pol in (cpu.SCORE, cpu.ORDER, cpu.IGNORE):
            assert np.array_equal(cpu.merge_labels(sets, sel, pri, pol), ref.merge_labels(sets, sel, pri, pol))
    finally:
        numba.set_num_threads(old)


# ------------------------------------------------------------------------------------------------
# input validation
# ------------------------------------------------------------------------------------------------

def test_validation_errors():
    gt = np.zeros((4, 5), np.uint8)
    good = np.zeros((4, 5), np.uint8)
    with pytest.raises(ValueError, match=r"sets\[1\] has shape"):
        cpu.confusion_labels(gt, (good, np.zeros((5, 4), np.uint8)), 3)
    with pytest.raises(ValueError, match="uint8"):
        cpu.confusion_labels(gt, (good.astype(np.int32),), 3)
    with pytest.raises(ValueError, match="tuple or list"):
        cpu.confusion_labels(gt, good, 3)
    with pytest.raises(ValueError, match="at least one"):
        cpu.confusion_labels(gt, (), 3)
    with pytest.raises(ValueError, match="num_classes"):
        cpu.confusion_labels(gt, (good,), 256)
    with pytest.raises(ValueError, match="expected"):
        cpu.confusion_scores(gt, (np.zeros((4, 5, 2), np.float32),), 3)
    with pytest.raises(ValueError, match="dtype"):
        cpu.confusion_scores(gt, (np.zeros((4, 5, 3), np.float32), np.zeros((4, 5, 3), np.uint8)), 3)
    with pytest.raises(ValueError, match="outside"):
        cpu.merge_labels((good,), np.array([0, 1, 0]), np.zeros((1, 3)), cpu.SCORE)
    with pytest.raises(ValueError, match="policy"):
        cpu.merge_labels((good,), np.array([0, 0, 0]), np.zeros((1, 3)), 3)
    with pytest.raises(ValueError, match="priority"):
        cpu.merge_labels((good,), np.array([0, 0, 0]), np.zeros((2, 3)), cpu.SCORE)
    with pytest.raises(ValueError, match="outside subset"):
        cpu.subset_confusion_labels(gt, (good, good), np.array([[0, 1, 1]]), np.array([[1, 0]]),
                                    np.zeros((2, 3)), cpu.SCORE, 3)
    with pytest.raises(ValueError, match="no member"):
        cpu.subset_confusion_labels(gt, (good, good), np.array([[0, 1, 1]]), np.array([[0, 0]]),
                                    np.zeros((2, 3)), cpu.SCORE, 3)
