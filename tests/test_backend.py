"""The backend switch (``isle_fast.backend``)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from isle_fast import backend
from isle_fast.errors import InputError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(backend, "simulator_enabled", lambda: False)
    monkeypatch.setattr(backend, "_real_gpu", lambda: False)


@pytest.fixture
def with_gpu(monkeypatch):
    monkeypatch.setattr(backend, "gpu_available", lambda: True)


def test_unknown_backend_is_named(no_gpu):
    with pytest.raises(InputError, match="'tpu'"):
        backend.resolve_backend("tpu")


def test_auto_without_gpu_is_cpu(no_gpu):
    assert not backend.gpu_available()
    assert backend.resolve_backend("auto") == "cpu"
    assert backend.resolve_backend("cpu") == "cpu"
    from isle_fast.kernels import cpu

    assert backend.get_kernels("auto") is cpu
    assert backend.get_kernels("cpu") is cpu
    assert backend.describe_backend("cpu").startswith("cpu")


def test_gpu_without_device_is_a_user_error(no_gpu):
    with pytest.raises(InputError, match="backend=.gpu.: no CUDA device"):
        backend.resolve_backend("gpu")
    with pytest.raises(InputError, match="backend=.cpu."):
        backend.get_kernels("gpu")


def test_auto_with_gpu_picks_gpu_kernels(with_gpu):
    from isle_fast.kernels import gpu

    assert backend.resolve_backend("auto") == "gpu"
    assert backend.get_kernels("auto") is gpu
    assert backend.get_kernels("gpu") is gpu
    assert backend.get_kernels("cpu") is not gpu


def test_backend_argument():
    parser = argparse.ArgumentParser()
    backend.add_backend_argument(parser)
    assert parser.parse_args([]).backend == "auto"
    assert parser.parse_args(["--backend", "gpu"]).backend == "gpu"
    with pytest.raises(SystemExit):
        parser.parse_args(["--backend", "tpu"])


def test_real_gpu_needs_cupy(monkeypatch):
    """Without an importable CuPy there is no real GPU backend."""
    backend._real_gpu.cache_clear()
    monkeypatch.setitem(sys.modules, "cupy", None)          # import cupy -> ImportError
    try:
        assert backend._real_gpu() is False
    finally:
        backend._real_gpu.cache_clear()


@pytest.mark.parametrize("import_numba_first", [False, True])
def test_force_cudasim_env_makes_the_gpu_path_available(import_numba_first):
    code = ("import numba, numpy\n" if import_numba_first else "") + (
        "from isle_fast import backend\n"
        "k = backend.get_kernels('auto')\n"
        "print(backend.resolve_backend('auto'), backend.simulator_enabled(), k.__name__, k.SIMULATOR,\n"
        "      backend.describe_backend('gpu'))\n")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    env["ISLE_FORCE_CUDASIM"] = "1"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[:4] == ["gpu", "True", "isle_fast.kernels.gpu", "True"], out.stdout
    assert "simulator" in out.stdout


@pytest.mark.cudasim
@pytest.mark.slow
def test_cli_evaluate_gpu_backend_under_forced_simulator(tmp_path):
    """``ISLE_FORCE_CUDASIM=1 isle evaluate --backend gpu`` runs the GPU kernels (simulated): same JSON as cpu."""
    import json

    import numpy as np

    from tests.conftest import write_stack

    rng = np.random.default_rng(3)
    shapes, C = [(4, 6), (5, 3)], 3

    def images():
        return [rng.choice(np.array([0, 1, 2, 255], np.uint8), size=s) for s in shapes]

    gt = str(tmp_path / "gt")
    write_stack(gt, images(), kind="gt", num_classes=C, chunks=(1, 3, 4))
    sets = []
    for k in range(2):
        sets.append(str(tmp_path / f"s{k}"))
        write_stack(sets[-1], images(), num_classes=C, chunks=(2, 2, 3), name=f"s{k}")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    env["ISLE_FORCE_CUDASIM"] = "1"
    out = {}
    for be in ("gpu", "cpu"):
        path = tmp_path / f"{be}.json"
        proc = subprocess.run([sys.executable, "-m", "isle_fast", "evaluate", *sets, "--gt", gt, "--backend", be,
                               "--json", str(path), "--quiet"], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[be] = json.loads(path.read_text())
    assert out["gpu"]["sets"] == out["cpu"]["sets"] and out["gpu"]["selection"] == out["cpu"]["selection"]


def test_task_kernels_runs_cpu_kernels_on_one_thread_and_restores():
    import numba

    from isle_fast.backend import get_kernels, task_kernels

    before = numba.get_num_threads()
    seen = []
    with task_kernels("cpu") as K:
        seen.append(numba.get_num_threads())
        assert K is get_kernels("cpu")
    assert seen == [1]
    assert numba.get_num_threads() == before


def test_task_kernels_restores_after_an_error():
    import numba

    from isle_fast.backend import task_kernels

    before = numba.get_num_threads()
    with pytest.raises(RuntimeError):
        with task_kernels("cpu"):
            raise RuntimeError("boom")
    assert numba.get_num_threads() == before


def test_tune_allocator_can_be_disabled(monkeypatch):
    from isle_fast.backend import tune_allocator

    monkeypatch.setenv("ISLE_TUNE_MALLOC", "0")
    assert tune_allocator() is False


def test_tune_allocator_on_glibc(monkeypatch):
    import platform

    from isle_fast.backend import tune_allocator

    monkeypatch.delenv("ISLE_TUNE_MALLOC", raising=False)
    glibc = platform.libc_ver()[0] == "glibc"
    assert tune_allocator() is glibc


# -- the chunks' type chooses the kernels ------------------------------------------------------

class _FakeDeviceArray:
    """Stands in for a CuPy array (CuPy is not installed here): GPU memory, ``.get()`` to the host."""

    def __init__(self, data):
        self.data = data

    @property
    def __cuda_array_interface__(self):
        return {"shape": self.data.shape, "typestr": self.data.dtype.str, "data": (0, False), "version": 3}

    def get(self):
        return self.data.copy()


def test_device_arrays_and_dask_arrays_of_them_are_recognised():
    import dask.array as da
    import numpy as np

    host = np.zeros((2, 3), np.uint8)
    dev = _FakeDeviceArray(host)
    assert backend.is_device_array(dev) and not backend.is_device_array(host)
    x = da.from_array(host, chunks=1)
    assert not backend.is_device_array(x)
    x._meta = _FakeDeviceArray(host[:0])             # what da.map_blocks(cupy.asarray) gives
    assert backend.is_device_array(x)
    np.testing.assert_array_equal(backend.to_host(dev), host)
    assert type(backend.to_host(host)) is np.ndarray


def test_chunks_in_gpu_memory_choose_the_gpu_kernels(no_gpu, monkeypatch):
    import numpy as np

    calls = []
    monkeypatch.setattr(backend, "prepare_process", lambda gpu=False: calls.append(gpu))
    host, dev = np.zeros(4, np.uint8), _FakeDeviceArray(np.zeros(4, np.uint8))
    assert backend.chunk_backend("auto", host, host) == "cpu"
    assert backend.chunk_backend("auto", host, dev) == "gpu" and calls[-1] is True   # GPU set-up first
    assert backend.chunk_backend("gpu", dev) == "gpu"       # the data are on a device: no probe needed
    with pytest.raises(InputError, match="backend='cpu': the arrays are in GPU memory") as info:
        backend.chunk_backend("cpu", dev)
    assert info.value.for_cli().startswith("--backend cpu: the arrays are in GPU memory")
    with pytest.raises(InputError, match="backend must be one of"):
        backend.chunk_backend("tpu", dev)
    chosen = []
    real = backend.get_kernels
    monkeypatch.setattr(backend, "get_kernels",
                        lambda name: chosen.append(name) or ("gpu kernels" if name == "gpu" else real(name)))
    with backend.task_kernels("auto", host, dev) as K:
        assert K == "gpu kernels"
    with backend.task_kernels("auto", host) as K:
        assert K.__name__.endswith("kernels.cpu")
    assert chosen == ["gpu", "cpu"]
