"""Chunk-aware torch data over stack stores: augmentation, sampler order, chunk decoding, workers."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from _segdata import make_stores

from isle_fast.errors import AlignmentError, InputError
from isle_fast.stores.stack import open_stack
from isle_fast.training.data import (
    MEAN_PIXEL,
    ChunkBatchSampler,
    SegmentationDataset,
    chunk_groups,
    make_loader,
    normalize,
)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return make_stores(root, n=14, seed=0, chunk=3, label_chunk=4)


def test_chunk_groups_cover_and_respect_both_chunkings():
    g = chunk_groups(26, 3, 4)
    assert g[0] == (0, 12) and g[-1] == (24, 26)
    assert [i for a, b in g for i in range(a, b)] == list(range(26))
    for a, _ in g:
        assert a % 3 == 0 and a % 4 == 0
    # lcm too large: the larger chunk length is used
    assert chunk_groups(100, 7, 11)[1] == (11, 22)
    assert chunk_groups(0, 3, 4) == []


def test_eval_items_are_the_stored_images(stores):
    ip, lp = stores
    ds = SegmentationDataset(ip, lp, train=False)
    img_s, lab_s = open_stack(ip), open_stack(lp)
    for i in (0, 5, 13):
        x, y = ds[i]
        h, w = img_s.shapes[i]
        assert x.dtype == torch.uint8 and x.shape == (3, h, w)
        assert np.array_equal(x.numpy().transpose(1, 2, 0), img_s.read_image(i))
        assert np.array_equal(y.numpy(), lab_s.read_image(i))


def test_identity_augmentation_pads_with_mean_and_ignore(stores):
    ip, lp = stores
    ds = SegmentationDataset(ip, lp, train=True, crop=80, scale_range=(1.0, 1.0), flip=False)
    img, lab = ds.read(2)
    h, w = lab.shape
    x, y = ds[(2, 7)]
    x, y = x.numpy().transpose(1, 2, 0), y.numpy()
    assert x.shape == (80, 80, 3) and y.shape == (80, 80)
    assert np.array_equal(x[:h, :w], img) and np.array_equal(y[:h, :w], lab)
    assert (y[h:] == 255).all() and (y[:, w:] == 255).all()
    assert (x[h:] == MEAN_PIXEL).all() and (x[:, w:] == MEAN_PIXEL).all()


def test_random_augmentation_is_seeded_and_keeps_label_values(stores):
    ip, lp = stores
    ds = SegmentationDataset(ip, lp, train=True, crop=48)
    a, b = ds[(4, 123)], ds[(4, 123)]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    seen = set()
    for s in range(12):
        x, y = ds[(4, s)]
        assert x.shape == (3, 48, 48) and y.shape == (48, 48)
        seen |= set(np.unique(y.numpy()).tolist())
    assert seen <= {0, 1, 2, 255} and len(seen & {1, 2}) >= 1


def test_flip_mirrors_image_and_label(stores):
    ip, lp = stores
    ds = SegmentationDataset(ip, lp, train=True, crop=40, scale_range=(1.0, 1.0), flip=True)
    img, lab = ds.read(1)
    flips = 0
    for s in range(8):
        x, y = ds[(1, s)]
        x, y = x.numpy().transpose(1, 2, 0), y.numpy()
        rng = np.random.default_rng(s)
        rng.uniform(1.0, 1.0)
        y0 = int(rng.integers(0, lab.shape[0] - 40 + 1))
        x0 = int(rng.integers(0, lab.shape[1] - 40 + 1))
        flip = rng.random() < 0.5
        ref_x, ref_y = img[y0:y0 + 40, x0:x0 + 40], lab[y0:y0 + 40, x0:x0 + 40]
        if flip:
            ref_x, ref_y = ref_x[:, ::-1], ref_y[:, ::-1]
            flips += 1
        assert np.array_equal(x, ref_x) and np.array_equal(y, ref_y)
    assert 0 < flips < 8


def test_scores_store_is_decoded_by_argmax(tmp_path):
    ip, lp = make_stores(tmp_path, n=5, seed=3, chunk=2, scores=True, prefix="s")
    ip2, lp2 = make_stores(tmp_path, n=5, seed=3, chunk=2, prefix="l")
    a = SegmentationDataset(ip, lp, train=False)
    b = SegmentationDataset(ip2, lp2, train=False)
    assert a.classes == b.classes
    for i in range(5):
        assert torch.equal(a[i][1], b[i][1])


def test_sampler_epochs_are_seeded_permutations(stores):
    n = 14
    s = ChunkBatchSampler(n, 4, chunk_groups(n, 3, 4), seed=5)
    assert len(s) == 3
    e0, e0b, e1 = s.epoch_batches(0), s.epoch_batches(0), s.epoch_batches(1)
    assert e0 == e0b and e0 != e1
    flat = [i for b in e0 for i, _ in b]
    assert len(flat) == 12 and len(set(flat)) == 12
    # seeds are fixed per (epoch, image): resuming re-creates the same augmentations
    s.set_epoch(0, start=2)
    assert list(s) == e0[2:]
    assert list(s) == e0  # start applies to one pass only
    assert ChunkBatchSampler(3, 8).epoch_batches(0)[0].__len__() == 3  # fewer images than a batch


def test_sampler_keeps_windows_of_groups_together():
    groups = chunk_groups(40, 4, 4)  # 10 groups of 4
    s = ChunkBatchSampler(40, 4, groups, seed=1, window=2)
    order = [i for b in s.epoch_batches(0) for i, _ in b]
    for w in range(0, 40, 8):  # each run of 8 images comes from exactly two groups
        assert len({i // 4 for i in order[w:w + 8]}) == 2


def test_sampler_gives_each_worker_a_contiguous_segment():
    s1 = ChunkBatchSampler(48, 4, chunk_groups(48, 4, 4), seed=2, num_workers=1)
    s3 = ChunkBatchSampler(48, 4, chunk_groups(48, 4, 4), seed=2, num_workers=3)
    one, three = s1.epoch_batches(0), s3.epoch_batches(0)
    assert sorted(map(str, one)) == sorted(map(str, three))
    for w in range(3):  # round-robin dispatch: worker w receives batches w, w+3, ...
        assert three[w::3] == one[4 * w:4 * (w + 1)]


def test_one_epoch_decodes_each_chunk_once(stores):
    ip, lp = stores
    ds = SegmentationDataset(ip, lp, train=True, crop=32)
    s = ChunkBatchSampler(len(ds), 2, chunk_groups(len(ds), ds.image_chunk, ds.label_chunk), seed=0)
    n = sum(x.shape[0] for x, _ in make_loader(ds, s))
    assert n == 14
    assert ds.chunks_decoded == 5 + 4  # ceil(14/3) image chunks + ceil(14/4) label chunks


def test_workers_give_the_same_batches_and_the_dataset_pickles_paths(stores):
    ip, lp = stores
    ds = SegmentationDataset(ip, lp, train=True, crop=32)
    ds.read(0)
    state = pickle.dumps(ds)
    assert b"zarr" not in state.lower().replace(b".zarr", b"")  # only paths travel
    assert torch.equal(pickle.loads(state)[(3, 9)][0], ds[(3, 9)][0])
    s = ChunkBatchSampler(len(ds), 3, seed=4, num_workers=2)
    s.set_epoch(1)
    a = list(make_loader(ds, s, num_workers=0))
    s.set_epoch(1)
    b = list(make_loader(ds, s, num_workers=2))
    assert len(a) == len(b) == 4
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_misaligned_or_wrong_stores_are_named(stores, tmp_path):
    ip, lp = stores
    _, other = make_stores(tmp_path, n=5, seed=1, prefix="o")
    with pytest.raises(AlignmentError, match="images and labels"):
        SegmentationDataset(ip, other)
    with pytest.raises(InputError, match="expected kind 'images'"):
        SegmentationDataset(lp, lp)
    with pytest.raises(InputError, match="crop"):
        SegmentationDataset(ip, lp, crop=4)


def test_normalize_maps_mean_pixel_to_about_zero():
    x = torch.tensor(MEAN_PIXEL, dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 4, 4)
    y = normalize(x)
    assert y.dtype == torch.float32 and y.abs().max() < 0.01


def test_foreground_crops_contain_an_object_and_stay_seeded(stores):
    ip, lp = stores
    kw = dict(train=True, crop=16, scale_range=(1.0, 1.0), flip=False)
    uniform = SegmentationDataset(ip, lp, **kw)
    fg = SegmentationDataset(ip, lp, fg_crop=1.0, **kw)

    def has_object(y):
        return bool(((y > 0) & (y < 255)).any())

    misses = 0
    for i in range(len(fg)):
        _, lab = fg.read(i)
        if not ((lab > 0) & (lab < 255)).any():
            continue
        for s in range(6):
            x, y = fg[(i, s)]
            assert x.shape == (3, 16, 16) and has_object(y.numpy()), (i, s)
            assert torch.equal(y, fg[(i, s)][1])  # seeded
            misses += not has_object(uniform[(i, s)][1].numpy())
    assert misses > 0  # uniform 16 px crops do miss the objects: the sampler makes the difference
    # both classes of the data get centred on (classes are drawn uniformly per image)
    seen = set()
    for i in range(len(fg)):
        for s in range(4):
            seen |= set(np.unique(fg[(i, s)][1].numpy()).tolist())
    assert {1, 2} <= seen
    with pytest.raises(InputError, match="fg_crop"):
        SegmentationDataset(ip, lp, fg_crop=1.5)
