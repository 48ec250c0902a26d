"""The kernels' argument checks (``isle_fast.kernels.checks``): one definition, so the CPU and the
GPU kernels refuse the same arguments with the same message (no kernel is launched)."""

from __future__ import annotations

import numpy as np
import pytest
import reference as R

from isle_fast.kernels import checks, cpu
from isle_fast.kernels import gpu as G


def _lab(shape=(4, 5)):
    return np.zeros(shape, np.uint8)


BAD = [
    ("confusion_labels", (_lab(), [], 3)),
    ("confusion_labels", (_lab(), _lab(), 3)),
    ("confusion_labels", (_lab(), [_lab((4, 6))], 3)),
    ("confusion_labels", (_lab(), [_lab(), _lab().astype(np.int16)], 3)),
    ("confusion_labels", (_lab().astype(np.int32), [_lab()], 3)),
    ("confusion_labels", (_lab(), [_lab()], 0)),
    ("confusion_labels", (_lab(), [_lab()], 256)),
    ("confusion_scores", (_lab(), [np.zeros((4, 5, 3), np.float64)], 3)),
    ("confusion_scores", (_lab(), [np.zeros((4, 5, 2), np.uint8)], 3)),
    ("confusion_scores", (_lab(), [np.zeros((4, 5, 3), np.float32), np.zeros((4, 5, 3), np.uint8)], 3)),
    ("decode_scores", (np.zeros((4, 3), np.int64),)),
    ("decode_scores", (np.zeros((4, 0), np.uint8),)),
    ("merge_labels", ([_lab()], [0, 1, 0], np.zeros((1, 3)), 0)),
    ("merge_labels", ([_lab()], [0, 0, 0], np.zeros((2, 3)), 0)),
    ("merge_labels", ([_lab()], [0, 0, 0], np.zeros((1, 3)), 7)),
    ("merge_scores", ([np.zeros((4, 3), np.uint8)], [0, 0], 0)),
    ("merge_scores", ([np.zeros((4, 3), np.uint8)], [0, 0, 1], 0)),
    ("subset_confusion_labels", (_lab(), [_lab(), _lab()], [[0, 1, 1]], [[1, 0]], np.zeros((2, 3)), 0, 3)),
    ("subset_confusion_labels", (_lab(), [_lab()], [[0, 0, 0]], [[0]], np.zeros((1, 3)), 0, 3)),
    ("subset_confusion_labels", (_lab(), [_lab()], [[0, 0, 5]], [[1]], np.zeros((1, 3)), 0, 3)),
    ("subset_confusion_labels", (_lab(), [_lab()], [[0, 0, 0]], [[1, 1]], np.zeros((1, 3)), 0, 3)),
    ("subset_confusion_scores", (_lab(), [np.zeros((4, 5, 3), np.uint8)], [[0, 0]], [[1]], 0, 3)),
]


@pytest.mark.parametrize("name, args", BAD, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BAD)])
def test_cpu_and_gpu_refuse_alike(name, args):
    with pytest.raises(ValueError) as on_cpu:
        getattr(cpu, name)(*args)
    with pytest.raises(ValueError) as on_gpu:
        getattr(G, name)(*args)
    assert str(on_cpu.value) == str(on_gpu.value)
    assert str(on_cpu.value).startswith(f"{name}: ")


def test_host_checks_need_numpy_and_return_contiguous_arrays():
    a = np.zeros((6, 8), np.uint8)[:, ::2]
    assert not a.flags.c_contiguous
    (b,) = checks.check_label_sets([a], a.shape, "f", host=True)
    assert b.flags.c_contiguous and np.array_equal(a, b)
    assert checks.check_label_sets([a], a.shape, "f", host=False)[0] is a  # device side: as given
    with pytest.raises(ValueError, match=r"f: sets\[0\] must be a NumPy array"):
        checks.check_label_sets([memoryview(b"abcd")], None, "f", host=True)
    with pytest.raises(ValueError, match="f: gt must be a uint8 NumPy array"):
        checks.check_gt([[0]], "f", host=True)


def test_subset_checks_name_the_sets_outside_the_subset():
    with pytest.raises(ValueError, match=r"members of subset 1: \[1\]; outside subset 1: \[0\]"):
        checks.check_subsets([[0, 0, 0], [0, 1, 0]], [[1, 0], [0, 1]], 2, 3, 1, "f")
    sels, mem = checks.check_subsets([[1, 0, 0]], [[1, 0]], 2, 3, 1, "f")  # entry 0 unused for labels
    assert sels.dtype == np.int64 and mem.dtype == bool


@pytest.mark.parametrize("dtype", [np.uint8, np.float16, np.float32])
@pytest.mark.parametrize("thr", [None, float("nan"), -1.0, 0.0, 0.3, 127.5, 255.9, 300.0, 1e9])
def test_threshold_args_match_the_reference(dtype, thr):
    use, value, raw = checks.threshold_args(thr, dtype)
    assert use == (thr is not None and thr >= 0)
    if use:
        ref = R.threshold_value(thr, dtype)
        assert value == float(ref)
        assert raw.tobytes() == ref.tobytes() and raw.dtype == (np.uint16 if dtype == np.float16 else dtype)
    else:
        assert value == 0.0 and raw.tobytes() == bytes(np.dtype(dtype).itemsize)
