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
