"""The whole evaluate -> select -> merge pipeline through the GPU backend, under the simulator.

Tiny stores with small, uneven chunks: the Dask orchestration calls the GPU kernels on host
chunks (NumPy in, NumPy out) from its worker threads; results must equal the CPU backend's.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import write_stack

pytestmark = pytest.mark.cudasim


def _images(rng, shapes, C, kind):
    out = []
    for h, w in shapes:
        if kind == "labels":
            out.append(rng.choice(np.array(list(range(C)) + [255], np.uint8), size=(h, w)))
        else:
            out.append((rng.integers(0, 5, size=(h, w, C)) / 4).astype(kind))
    return out


def test_evaluate_and_merge_gpu_equal_cpu(tmp_path):
    from isle_fast.ensemble.evaluate import evaluate
    from isle_fast.ensemble.merge import merge

    rng = np.random.default_rng(7)
    C, shapes = 4, [(5, 7), (6, 4), (3, 9)]
    kw = dict(num_classes=C, chunks=(2, 4, 5))
    gt = write_stack(str(tmp_path / "gt"), _images(rng, shapes, C, "labels"), kind="gt", **kw)
    sets = [write_stack(str(tmp_path / f"s{k}"), _images(rng, shapes, C, "labels"), name=f"s{k}", **kw)
            for k in range(3)]
    ev_gpu = evaluate(sets, gt, backend="gpu", progress=False)
    ev_cpu = evaluate(sets, gt, backend="cpu", progress=False)
    np.testing.assert_array_equal(ev_gpu.counts, ev_cpu.counts)
    assert ev_gpu.counts.sum() > 0

    for policy in ("score", "ignore"):
        a = merge(sets, gt, str(tmp_path / f"gpu-{policy}"), policy=policy, backend="gpu", progress=False)
        b = merge(sets, gt, str(tmp_path / f"cpu-{policy}"), policy=policy, backend="cpu", progress=False)
        for i in range(len(shapes)):
            np.testing.assert_array_equal(a.stack.read_image(i), b.stack.read_image(i))


def test_evaluate_score_sets_gpu_equal_cpu(tmp_path):
    from isle_fast.ensemble.evaluate import evaluate

    rng = np.random.default_rng(8)
    C, shapes = 3, [(4, 6), (5, 5)]
    gt = write_stack(str(tmp_path / "gt"), _images(rng, shapes, C, "labels"), kind="gt", num_classes=C,
                     chunks=(1, 3, 4))
    sets = [write_stack(str(tmp_path / f"f{k}"), _images(rng, shapes, C, np.float16), encoding="scores",
                        score_dtype="float16", name=f"f{k}", num_classes=C, chunks=(1, 4, 3, C))
            for k in range(2)]
    for thr in (None, 0.5):
        ev_gpu = evaluate(sets, gt, backend="gpu", bg_threshold=thr, progress=False)
        ev_cpu = evaluate(sets, gt, backend="cpu", bg_threshold=thr, progress=False)
        np.testing.assert_array_equal(ev_gpu.counts, ev_cpu.counts)


def test_device_chunks_are_counted_where_they_are(monkeypatch):
    """A task handed chunks in GPU memory runs the GPU kernels on them; the counts equal the host chunks'."""
    from numba import cuda

    from isle_fast.backend import is_device_array, task_kernels
    from isle_fast.ensemble.evaluate import _confusion_block, group_sets
    from isle_fast.errors import InputError

    rng = np.random.default_rng(3)
    C = 4
    gt = rng.choice(np.array([0, 1, 2, 3, 255], np.uint8), size=(2, 6, 7))
    labels = rng.choice(np.array([0, 1, 2, 3, 255], np.uint8), size=(2, 6, 7))
    scores = (rng.integers(0, 5, size=(2, 6, 7, C)) / 4).astype(np.float32)

    class _Set:                                   # what group_sets reads of a store
        def __init__(self, encoding):
            self.encoding, self.dtype, self.score_scale = encoding, np.dtype(np.float32), 1.0

    from isle_fast.kernels import gpu

    kernel_inputs = []
    for name in ("confusion_labels", "confusion_scores"):
        def spy(gt_arr, arrs, *args, _real=getattr(gpu, name), **kwargs):
            kernel_inputs.append(all(is_device_array(a) for a in (gt_arr, *arrs)))
            return _real(gt_arr, arrs, *args, **kwargs)
        monkeypatch.setattr(gpu, name, spy)
    groups = tuple(group_sets([_Set("labels"), _Set("scores")], 0.3))
    kw = dict(groups=groups, order=tuple(m for g in groups for m in g.members), num_classes=C)
    host = [labels, scores]
    for per_image in (False, True):
        want = _confusion_block(gt, *[host[m] for m in kw["order"]], backend="cpu", per_image=per_image, **kw)
        kernel_inputs.clear()
        dev = [cuda.to_device(a) for a in (gt, *[host[m] for m in kw["order"]])]
        assert all(is_device_array(d) for d in dev)
        got = _confusion_block(*dev, backend="auto", per_image=per_image, **kw)
        assert kernel_inputs and all(kernel_inputs)  # the kernels got the device arrays themselves
        kernel_inputs.clear()
        assert type(got) is np.ndarray
        np.testing.assert_array_equal(got, want)
    with pytest.raises(InputError, match="backend='cpu'"):
        with task_kernels("cpu", cuda.to_device(gt)):
            pass


def test_subsets_of_device_chunks_equal_host_chunks(tmp_path, monkeypatch):
    """Every task of the subset pass handed its chunks in GPU memory: the same confusions as on the CPU."""
    from numba import cuda

    from isle_fast.backend import is_device_array
    from isle_fast.ensemble import subsets

    rng = np.random.default_rng(11)
    C, shapes = 4, [(5, 7), (6, 4), (3, 9)]
    kw = dict(num_classes=C, chunks=(2, 4, 5))
    gt = write_stack(str(tmp_path / "gt"), _images(rng, shapes, C, "labels"), kind="gt", **kw)
    sets = [write_stack(str(tmp_path / "l0"), _images(rng, shapes, C, "labels"), name="l0", **kw),
            *[write_stack(str(tmp_path / n), _images(rng, shapes, C, "float32"), name=n, encoding="scores",
                          score_dtype="float32", num_classes=C, chunks=(2, 4, 5, C)) for n in ("s1", "s2")]]
    want = subsets.subset_analysis(sets, gt, backend="cpu", progress=False)
    host_block, seen = subsets._subset_block, []

    def on_device(gt_block, *blocks, **kernel):
        dev = [cuda.to_device(np.ascontiguousarray(b)) for b in (gt_block, *blocks)]
        seen.append(all(is_device_array(d) for d in dev))
        return host_block(*dev, **kernel)

    from isle_fast.kernels import gpu

    kernel_inputs = []
    for name in ("subset_confusion_labels", "subset_confusion_scores"):
        def spy(gt_arr, arrs, *args, _real=getattr(gpu, name), **kwargs):
            kernel_inputs.append(all(is_device_array(a) for a in (gt_arr, *arrs)))
            return _real(gt_arr, arrs, *args, **kwargs)
        monkeypatch.setattr(gpu, name, spy)
    monkeypatch.setattr(subsets, "_subset_block", on_device)
    got = subsets.subset_analysis(sets, gt, backend="auto", progress=False)
    assert seen and all(seen)
    assert kernel_inputs and all(kernel_inputs)     # no copy to the host on the way to the kernels
    np.testing.assert_array_equal(got.counts, want.counts)
