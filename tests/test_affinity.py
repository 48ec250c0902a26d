"""AffinityNet: labels, loss, training/checkpoints and the random walk (kernel vs dense NumPy reference)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _refine_data import make_scenes, miou, write_stores
from hypothesis import given, settings
from hypothesis import strategies as st

from isle_fast.errors import InputError
from isle_fast.kernels.refine_cpu import disc_offsets, normalise_rows, random_walk
from isle_fast.refinement.affinity import (
    AffinityNet,
    AffinityNetRefinement,
    affinity_loss,
    confident_labels,
    pair_labels,
    random_walk_image,
    random_walk_torch,
    train_affinity,
    walk_input,
)
from isle_fast.refinement.chain import PrepareContext, RefineChunk, SparseScores, refine_stack
from isle_fast.stores.stack import open_stack


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny tensors: one intra-op thread is much faster on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------
# NumPy references
# ---------------------------------------------------------------------------------------------
def dense_transition(weights: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Dense (N, N) row-normalised transition matrix of a stencil of weights."""
    h, w, k_n = weights.shape
    a = np.zeros((h * w, h * w), dtype=np.float64)
    for y in range(h):
        for x in range(w):
            for k in range(k_n):
                yy, xx = y + offsets[k, 0], x + offsets[k, 1]
                if 0 <= yy < h and 0 <= xx < w:
                    a[y * w + x, yy * w + xx] += weights[y, x, k]
    s = a.sum(axis=1, keepdims=True)
    return np.divide(a, s, out=np.zeros_like(a), where=s > 0)


def pair_labels_reference(lab, offsets):
    h, w = lab.shape
    out = np.zeros((3, len(offsets), h, w), dtype=bool)
    for k, (dy, dx) in enumerate(offsets):
        for y in range(h):
            for x in range(w):
                yy, xx = y + dy, x + dx
                if not (0 <= yy < h and 0 <= xx < w):
                    continue
                a, b = lab[y, x], lab[yy, xx]
                if a == 255 or b == 255:
                    continue
                if a == b:
                    out[0 if a == 0 else 1, k, y, x] = True
                else:
                    out[2, k, y, x] = True
    return out


# ---------------------------------------------------------------------------------------------
# Offsets and the random walk kernel
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("radius", [1, 2, 3, 5])
def test_disc_offsets(radius):
    full = {tuple(o) for o in disc_offsets(radius)}
    half = {tuple(o) for o in disc_offsets(radius, half=True)}
    want = {(dy, dx) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)
            if dy * dy + dx * dx < radius * radius}
    assert full == want
    assert half | {(-a, -b) for a, b in half} | {(0, 0)} == full
    assert not half & {(-a, -b) for a, b in half}


@settings(max_examples=25)
@given(seed=st.integers(0, 10_000), h=st.integers(1, 9), w=st.integers(1, 9), radius=st.integers(1, 4),
       c=st.integers(1, 4), steps=st.integers(0, 9))
def test_random_walk_equals_dense_reference(seed, h, w, radius, c, steps):
    rng = np.random.default_rng(seed)
    offsets = disc_offsets(radius)
    weights = rng.random((h, w, len(offsets))).astype(np.float32)
    weights[rng.random(weights.shape) < 0.2] = 0.0
    v = rng.random((h, w, c)).astype(np.float32)
    trans = normalise_rows(weights, offsets)
    t_dense = dense_transition(weights.astype(np.float64), offsets)
    np.testing.assert_allclose(dense_transition(trans.astype(np.float64), offsets), t_dense, atol=1e-6)
    want = (np.linalg.matrix_power(t_dense, steps) @ v.reshape(h * w, c).astype(np.float64)).reshape(h, w, c)
    got = random_walk(trans, offsets, v, steps)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    got_t = random_walk_torch(torch.as_tensor(np.moveaxis(trans, -1, 0)), offsets,
                              torch.as_tensor(np.moveaxis(v, -1, 0)), steps)
    np.testing.assert_allclose(np.moveaxis(got_t.numpy(), 0, -1), want, rtol=1e-4, atol=1e-5)


def test_random_walk_by_repeated_squaring_equals_steps():
    """2^logt multiplications equal logt squarings of the dense transition (the paper's formulation)."""
    rng = np.random.default_rng(1)
    offsets = disc_offsets(3)
    weights = rng.random((6, 7, len(offsets))).astype(np.float32)
    trans = normalise_rows(weights, offsets)
    t = dense_transition(trans.astype(np.float64), offsets)
    for _ in range(3):
        t = t @ t
    v = rng.random((6, 7, 2)).astype(np.float32)
    np.testing.assert_allclose(random_walk(trans, offsets, v, 8), (t @ v.reshape(42, 2)).reshape(6, 7, 2),
                               rtol=1e-4, atol=1e-6)


def rgb_affinity(rgb: np.ndarray, offsets: np.ndarray, sigma: float = 10.0) -> np.ndarray:
    """A hand-made affinity from colour: exp(-||rgb_p - rgb_q||_1 / sigma) (0 outside the image)."""
    h, w, _ = rgb.shape
    r = int(np.abs(offsets).max())
    pad = np.pad(rgb.astype(np.float32), ((r, r), (r, r), (0, 0)))
    out = np.zeros((h, w, len(offsets)), dtype=np.float32)
    for k, (dy, dx) in enumerate(offsets):
        nb = pad[r + dy:r + dy + h, r + dx:r + dx + w]
        out[..., k] = np.exp(-np.abs(rgb - nb).sum(-1) / sigma)
    return out


def test_random_walk_with_rgb_affinity_improves_iou():
    rgbs, gts, scores, _ = make_scenes(4, seed=11, hmin=32, hmax=44, wmin=32, wmax=48)
    offsets = disc_offsets(3)
    before, after = [], []
    for rgb, gt, sc in zip(rgbs, gts, scores):
        v = walk_input(sc, "scores", 4, background="stored")
        trans = normalise_rows(rgb_affinity(rgb, offsets) ** 2, offsets)
        walked = random_walk(trans, offsets, v, 64)
        before.append(miou(sc.argmax(-1), gt, 4))
        after.append(miou(walked.argmax(-1), gt, 4))
    assert np.mean(after) > np.mean(before) + 0.02


# ---------------------------------------------------------------------------------------------
# Affinity labels
# ---------------------------------------------------------------------------------------------
@settings(max_examples=25)
@given(seed=st.integers(0, 10_000), h=st.integers(1, 8), w=st.integers(1, 8), radius=st.integers(1, 4))
def test_pair_labels_equal_reference(seed, h, w, radius):
    rng = np.random.default_rng(seed)
    lab = rng.choice(np.array([0, 1, 2, 255], dtype=np.uint8), size=(h, w))
    offsets = disc_offsets(radius, half=True)
    bg, fg, neg = pair_labels(lab, offsets)
    ref = pair_labels_reference(lab, offsets)
    np.testing.assert_array_equal(bg, ref[0])
    np.testing.assert_array_equal(fg, ref[1])
    np.testing.assert_array_equal(neg, ref[2])


def test_confident_labels():
    sc = np.zeros((1, 5, 3), dtype=np.float32)
    sc[0, :, 1] = [0.95, 0.5, 0.15, 0.0, 0.02]   # class 1 scores
    lab = confident_labels(sc, alpha_lo=4, alpha_hi=32)
    # 0.95 > 0.05^4: confident fg; 0.5 > 0.5^4 -> fg; 0.15 vs 0.85^4=0.52 (not fg), 0.85^32=0.0055 (not bg)
    # -> unsure; 0 -> bg; 0.02 vs 0.98^32=0.52 -> bg
    np.testing.assert_array_equal(lab[0], [1, 1, 255, 0, 0])
    hard = np.array([[0, 3, 255]], dtype=np.uint8)
    np.testing.assert_array_equal(confident_labels(hard, "labels"), hard)
    with pytest.raises(InputError):
        confident_labels(sc, alpha_lo=8, alpha_hi=4)


# ---------------------------------------------------------------------------------------------
# Network, loss, training
# ---------------------------------------------------------------------------------------------
def test_affinity_loss_decreases_on_synthetic_data():
    torch.manual_seed(0)
    rgbs, gts, _, _ = make_scenes(2, seed=3, hmin=32, hmax=32, wmin=32, wmax=32)
    model = AffinityNet("resnet18", None, stride=8, dim=64).train()
    x = torch.as_tensor(np.stack([(r.astype(np.float32) / 255 - 0.45) / 0.25 for r in rgbs]).transpose(0, 3, 1, 2))
    offsets = disc_offsets(3, half=True)
    grid = np.stack([g[4::8, 4::8] for g in gts])
    bg, fg, neg = pair_labels(grid, offsets)
    assert bg.any() and fg.any() and neg.any()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(8):
        loss, parts = affinity_loss(model(x), bg, fg, neg, offsets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    assert np.isfinite(losses).all()


def test_feature_shapes_and_strides():
    x = torch.zeros(1, 3, 37, 50)
    assert AffinityNet("resnet18", None, stride=8, dim=70)(x).shape == (1, 70, 5, 7)
    assert AffinityNet("resnet18", None, stride=4, dim=70)(x).shape == (1, 70, 10, 13)
    with pytest.raises(InputError):
        AffinityNet("resnet18", None, stride=16)


def test_walk_engines_agree_and_keep_classes():
    torch.manual_seed(0)
    model = AffinityNet("resnet18", None, stride=8, dim=32).eval()
    (rgb,), _, (sc,), _ = make_scenes(1, seed=2, hmin=37, hmax=37, wmin=45, wmax=45)
    sc[..., 3] = 0.0  # class 3 absent
    a = random_walk_image(model, rgb, sc, "scores", 4, radius=3, logt=3, engine="numba")
    b = random_walk_image(model, rgb, sc, "scores", 4, radius=3, logt=3, engine="torch")
    assert a.shape == (37, 45, 4)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert not a[..., 3].any() and a.min() >= 0 and a.max() <= 1
    lab = random_walk_image(model, rgb, sc.argmax(-1).astype(np.uint8), "labels", 4, radius=3, logt=3)
    assert set(np.unique(lab.argmax(-1))) <= set(np.unique(sc.argmax(-1)))


@pytest.mark.slow
def test_train_checkpoint_resume_and_refine(tmp_path):
    img, src, rgbs, gts, scores, shapes = write_stores(tmp_path, n=3, encoding="scores", hmin=24, hmax=32,
                                                       wmin=24, wmax=32)
    ck = str(tmp_path / "aff.pt")
    kw = dict(backbone="resnet18", weights="none", batch_size=2, crop=32, dim=56, progress=False, device="cpu")
    log: list = []
    train_affinity(open_stack(img), open_stack(src), ck, epochs=1, log=log, **kw)
    state = torch.load(ck, weights_only=True)
    assert state["epoch"] == 1 and state["step"] == 2 and state["config"]["backbone"] == "resnet18"
    # resume: one more epoch continues from step 2
    log2: list = []
    train_affinity(open_stack(img), open_stack(src), ck, epochs=2, resume=True, log=log2, **kw)
    state = torch.load(ck, weights_only=True)
    assert state["epoch"] == 2 and state["step"] == 4 and [r["step"] for r in log2] == [3, 4]

    # the refinement refuses an unfinished (interrupted) checkpoint without --resume
    cut = str(tmp_path / "cut.pt")
    state["epoch"], state["config"]["epochs"] = 1, 3
    torch.save(state, cut)
    ref = AffinityNetRefinement(checkpoint=cut, backbone="resnet18", weights="none", epochs=3, crop=32,
                                batch_size=2, device="cpu")
    with pytest.raises(InputError, match="pass resume to continue it"):
        ref.prepare(PrepareContext(open_stack(src), open_stack(img), str(tmp_path / "x.zarr")))

    # a finished checkpoint is loaded; the walk runs in the chain; classes are never invented
    out = refine_stack(src, img, tmp_path / "rw.zarr", ["affinity"],
                       {"affinity": {"checkpoint": ck, "epochs": 2, "train": False, "radius": 3, "logt": 3}},
                       workers=1, progress=False)
    assert out.encoding == "scores"
    assert out.provenance["refinements"][0]["params"]["checkpoint"] == ck
    s = open_stack(src)
    for i, (h, w) in enumerate(shapes):
        got = out.read_image(i).astype(np.float32).argmax(-1)
        assert set(np.unique(got)) <= set(np.unique(s.read_image(i).argmax(-1))) | {0}
        full = out.array[i]
        assert not full[h:].any() and not full[:, w:].any()


@pytest.mark.slow
def test_refine_chain_trains_when_no_checkpoint(tmp_path):
    img, src, *_ = write_stores(tmp_path, n=2, encoding="labels", hmin=24, hmax=28, wmin=24, wmax=28)
    out = refine_stack(src, img, tmp_path / "out.zarr", "affinity,crf",
                       ["affinity.backbone=resnet18", "affinity.weights=none", "affinity.crop=24",
                        "affinity.epochs=1", "affinity.logt=2", "crf.iterations=2"],
                       workers=1, progress=False)
    assert out.encoding == "labels"
    assert (tmp_path / "out.zarr.affinity.pt").exists()
    assert [r["name"] for r in out.provenance["refinements"]] == ["affinity", "crf"]


_WALK_MODEL: dict = {}


def _walk_model():
    """A stand-in feature network for the walk (what it uses: ``model(x)`` on the stride-4 grid and
    ``model.stride``): one random strided convolution, so the test runs the walk, not a ResNet."""
    if "m" not in _WALK_MODEL:
        torch.manual_seed(1)
        conv = torch.nn.Conv2d(3, 8, 3, stride=4, padding=1)
        model = torch.nn.Sequential(conv, torch.nn.ELU()).eval()
        model.stride = 4
        _WALK_MODEL["m"] = model
    return _WALK_MODEL["m"]


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), h=st.integers(1, 21), w=st.integers(1, 23), c=st.integers(2, 7),
       background=st.sampled_from(["alpha", "stored"]), engine=st.sampled_from(["numba", "torch"]))
def test_random_walk_on_slots_equals_walk_on_dense_scores(seed, h, w, c, background, engine):
    """The walk of an image's slots (background + its classes) is the dense walk's, exactly, for those
    classes; every other class stays 0; the refinement's class-sparse output keeps the keys."""
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    present = np.flatnonzero(rng.random(c - 1) < 0.5) + 1
    dense = np.zeros((h, w, c), np.float32)
    dense[..., 0] = rng.random((h, w))
    dense[..., present] = rng.random((h, w, present.size))
    dense[rng.random((h, w, c)) < 0.2] = 0.0
    slots = np.concatenate([dense[..., :1], dense[..., present], np.zeros((h, w, 1), np.float32)], axis=-1)
    kw = dict(radius=2, logt=2, background=background, engine=engine)
    want = random_walk_image(_walk_model(), rgb, dense, "scores", c, **kw)
    got = random_walk_image(_walk_model(), rgb, slots, "scores", slots.shape[-1], **kw)
    np.testing.assert_array_equal(got[..., 1:1 + present.size], want[..., present])
    np.testing.assert_array_equal(got[..., 0], want[..., 0])
    assert not got[..., -1].any()
    others = np.setdiff1d(np.arange(1, c), present)
    assert not want[..., others].any()
    # through the refinement: class-sparse in, SparseScores with the same keys out; labels: the dense argmax
    ref = AffinityNetRefinement(radius=2, logt=2, background=background, device="cpu")
    ref.model = _walk_model()
    keys = np.zeros((1, slots.shape[-1] - 1), np.uint8)
    keys[0, :present.size] = present
    classes = tuple(f"c{i}" for i in range(c))
    chunk = RefineChunk(data=slots[None], encoding="scores", shapes=np.array([[h, w]]), rgb=rgb[None],
                        classes=classes, ids=["x"], keys=keys)
    out = ref.refine(chunk)
    assert isinstance(out, SparseScores) and (out.keys == keys).all()
    np.testing.assert_array_equal(out.data[0], random_walk_image(_walk_model(), rgb, slots, "scores",
                                                                 slots.shape[-1], radius=2, logt=2,
                                                                 background=background))
    ref.output = "labels"
    lab = ref.refine(chunk)
    dense_lab = random_walk_image(_walk_model(), rgb, dense, "scores", c, radius=2, logt=2,
                                  background=background).argmax(-1)
    np.testing.assert_array_equal(lab[0], dense_lab)

