"""GPU kernels (``isle_fast.kernels.gpu``).

* ``test_kernels_under_cuda_simulator`` runs ``tests/gpu_sim`` in a subprocess with
  ``NUMBA_ENABLE_CUDASIM=1`` (it must be set before Numba is imported, and this process has
  imported Numba normally): every kernel, every code path, equal to ``tests/reference.py``.
* Argument checks and the API shared with the CPU module run here (no kernel launch).
* ``@pytest.mark.gpu`` tests need a real CUDA device and CuPy; they skip cleanly without.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import reference as R

from isle_fast.backend import gpu_available, simulator_enabled
from isle_fast.kernels import gpu as G

ROOT = Path(__file__).resolve().parents[1]
API = ["SCORE", "ORDER", "IGNORE", "confusion_labels", "confusion_scores", "decode_scores",
       "merge_labels", "merge_scores", "subset_confusion_labels", "subset_confusion_scores"]


@pytest.mark.cudasim
@pytest.mark.slow
def test_kernels_under_cuda_simulator():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/gpu_sim"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, tail
    assert " passed" in tail and "skipped" not in tail.splitlines()[-1], tail


@pytest.mark.slow
def test_kernels_compile_to_ptx():
    """Numba's real CUDA target (NVVM, no device needed) accepts every kernel: what the simulator cannot check."""
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    proc = subprocess.run([sys.executable, "tests/gpu_sim/compile_ptx.py"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode == 77:
        pytest.skip("no NVVM / libdevice (CUDA toolkit or nvidia-cuda-nvcc-cu12): " + proc.stdout.strip())
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    assert "kernels compiled to PTX" in proc.stdout


@pytest.mark.parametrize("P", [1, 1000, 3 * 2**31 + 5, 2**40])
def test_grid_bounds_pixels_per_block(P):
    """uint32 shared-memory bins cannot overflow: no block counts more than 2**31 pixels."""
    for work in (None, 1 << 20):
        blocks = G._blocks(P, work_per_block=work)
        assert blocks >= 1 and -(-P // blocks) <= 2**31


def test_same_api_as_cpu_module():
    from isle_fast.kernels import cpu

    for name in API:
        assert hasattr(G, name) and hasattr(cpu, name), name
    assert (G.SCORE, G.ORDER, G.IGNORE) == (cpu.SCORE, cpu.ORDER, cpu.IGNORE) == (0, 1, 2)


@pytest.mark.parametrize("dtype", [np.uint8, np.float16, np.float32])
@pytest.mark.parametrize("thr", [0.0, 0.3, 127.5, 255.9, 300.0, 1e9])
def test_threshold_value_matches_reference(dtype, thr):
    a, b = G.threshold_value(thr, dtype), R.threshold_value(thr, dtype)
    assert a.dtype == b.dtype and a.tobytes() == b.tobytes()


def _labels(shape=(4, 5)):
    return np.zeros(shape, np.uint8)


@pytest.mark.parametrize("call, match", [
    (lambda: G.confusion_labels(_labels(), [], 3), "empty"),
    (lambda: G.confusion_labels(_labels(), _labels(), 3), "tuple or list"),
    (lambda: G.confusion_labels(_labels(), [_labels((4, 6))], 3), r"sets\[0\] has shape"),
    (lambda: G.confusion_labels(_labels(), [_labels(), _labels().astype(np.int16)], 3), "uint8"),
    (lambda: G.confusion_labels(_labels().astype(np.int32), [_labels()], 3), "gt must be a uint8"),
    (lambda: G.confusion_labels(_labels(), [_labels()], 0), "num_classes"),
    (lambda: G.confusion_labels(_labels(), [_labels()], 256), "num_classes"),
    (lambda: G.confusion_scores(_labels(), [np.zeros((4, 5, 3), np.float64)], 3), "uint8, float16 or float32"),
    (lambda: G.confusion_scores(_labels(), [np.zeros((4, 5, 2), np.uint8)], 3), "shape"),
    (lambda: G.decode_scores(np.zeros((4, 3), np.int64)), "score dtype"),
    (lambda: G.merge_labels([_labels()], [0, 1, 0], np.zeros((1, 3)), 0), "selection entries"),
    (lambda: G.merge_labels([_labels()], [0, 0, 0], np.zeros((2, 3)), 0), "priority"),
    (lambda: G.merge_labels([_labels()], [0, 0, 0], np.zeros((1, 3)), 7), "policy"),
    (lambda: G.merge_scores([np.zeros((4, 3), np.uint8)], [0, 0], 0), "selection has 2 entries"),
    (lambda: G.subset_confusion_labels(_labels(), [_labels(), _labels()], [[0, 1, 1]], [[1, 0]],
                                       np.zeros((2, 3)), 0, 3), "outside its subset"),
    (lambda: G.subset_confusion_labels(_labels(), [_labels()], [[0, 0, 0]], [[0]],
                                       np.zeros((1, 3)), 0, 3), "at least one member"),
    (lambda: G.subset_confusion_scores(_labels(), [np.zeros((4, 5, 3), np.uint8)], [[0, 0]], [[1]], 0, 3),
     r"shape \(S, 3\)"),
])
def test_bad_arguments_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# -- real device ---------------------------------------------------------------------------------

def _cupy():
    if simulator_enabled() or not gpu_available():
        pytest.skip("no CUDA device")
    return pytest.importorskip("cupy")


@pytest.mark.gpu
@pytest.mark.parametrize("chunk", [None, 1000])
def test_device_kernels_equal_reference_numpy_and_cupy(rng, chunk, monkeypatch):
    cp = _cupy()
    monkeypatch.setattr(G, "_CHUNK_PIXELS", chunk)          # 1000: many pipeline chunks on 2 streams
    C, N, shape = 21, 5, (3, 97, 131)
    gt = rng.integers(0, C, shape).astype(np.uint8)
    gt[rng.random(shape) < 0.1] = 255
    sets = [np.where(rng.random(shape) < 0.7, gt, rng.integers(0, C, shape)).astype(np.uint8) for _ in range(N)]
    for s in sets:
        s[rng.random(shape) < 0.05] = 255
    scores = [rng.random(shape + (C,)).astype(np.float16) for _ in range(3)]
    sel = rng.integers(0, N, C)
    prio = rng.random((N, C))
    ref = R.confusion_labels(gt, sets, C)
    np.testing.assert_array_equal(G.confusion_labels(gt, sets, C), ref)
    got = G.confusion_labels(cp.asarray(gt), [cp.asarray(s) for s in sets], C)
    assert isinstance(got, cp.ndarray) and got.dtype == np.int64
    np.testing.assert_array_equal(got.get(), ref)
    np.testing.assert_array_equal(G.confusion_scores(gt, scores, C, 0.5), R.confusion_scores(gt, scores, C, 0.5))
    np.testing.assert_array_equal(G.decode_scores(cp.asarray(scores[0])).get(), R.decode_scores(scores[0]))
    for policy in (G.SCORE, G.ORDER, G.IGNORE):
        np.testing.assert_array_equal(G.merge_labels(sets, sel, prio, policy), R.merge_labels(sets, sel, prio, policy))
        lab, mer = G.merge_scores(scores, sel % 3, policy)
        rlab, rmer = R.merge_scores(scores, sel % 3, policy)
        np.testing.assert_array_equal(lab, rlab)
        np.testing.assert_array_equal(mer.view(np.uint16), rmer.view(np.uint16))
    members = np.array([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]], bool)
    sels = np.array([np.where(m[s], s, np.flatnonzero(m)[0]) for m in members for s in [sel]])
    np.testing.assert_array_equal(
        G.subset_confusion_labels(gt, sets, sels, members, prio, G.SCORE, C),
        R.subset_confusion_labels(gt, sets, sels, members, prio, G.SCORE, C))
    np.testing.assert_array_equal(
        G.subset_confusion_scores(gt, scores, sels % 3, members[:, :3] | True, G.SCORE, C),
        R.subset_confusion_scores(gt, scores, sels % 3, members[:, :3] | True, G.SCORE, C))


@pytest.mark.gpu
def test_device_large_tables_use_global_atomics(rng):
    """C = 150: one table is larger than 48 KiB of shared memory."""
    _cupy()
    C, shape = 150, (64, 257)
    gt = rng.integers(0, C, shape).astype(np.uint8)
    sets = [rng.integers(0, 256, shape).astype(np.uint8) for _ in range(2)]
    np.testing.assert_array_equal(G.confusion_labels(gt, sets, C), R.confusion_labels(gt, sets, C))


# -- benchmarks/gpu.py ----------------------------------------------------------------------------

def _bench(tmp_path, *args, sim=False):
    env = dict(os.environ, ISLE_BENCH_RESULTS=str(tmp_path), ISLE_PROGRESS="0")
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    if sim:
        env["NUMBA_ENABLE_CUDASIM"] = "1"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    import json

    doc = json.loads((tmp_path / "gpu.json").read_text()) if (tmp_path / "gpu.json").exists() else None
    return proc, doc


def test_gpu_benchmark_without_device_says_skipped(tmp_path):
    if gpu_available():
        pytest.skip("a CUDA device is present: the benchmark would really run")
    proc, doc = _bench(tmp_path, "--quick")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no CUDA device: skipped" in proc.stdout
    assert doc["skipped"] is True and doc["headline"] == [] and "reason" in doc


@pytest.mark.cudasim
@pytest.mark.slow
def test_gpu_benchmark_runs_under_simulator(tmp_path):
    """The whole benchmark script on tiny data through the simulator (its GPU results equal the CPU's)."""
    proc, doc = _bench(tmp_path, "--simulate", sim=True)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert doc["skipped"] is False and doc["simulated"] is True
    names = [r["kernel"] for r in doc["kernels"]]
    for kernel in ("confusion_labels", "confusion_scores", "decode_scores", "merge_labels", "merge_scores",
                   "subset_confusion_labels", "subset_confusion_scores"):
        assert any(n.startswith(kernel) for n in names), kernel
    assert all(r["equal_to_cpu"] for r in doc["kernels"] + doc["end_to_end"])
    assert doc["copy_bandwidth"]["copy_GBps"] > 0 and doc["headline"]
