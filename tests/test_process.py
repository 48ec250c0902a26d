"""Process state (``isle_fast.process``): importing isle-fast changes nothing process-wide; the
settings are made once, explicitly, by ``prepare_process`` (the CLI's start, the library's entry)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: Snapshot of what a module could change on import: environment, warnings filters, Numba's
#: configuration and thread count. Third-party packages are imported first (their own import-time
#: changes are theirs; numba.cuda is left to the GPU kernels, which import it, so that
#: ISLE_FORCE_CUDASIM could still act), then every isle_fast module (kernels included), then the
#: snapshot again.
SNAPSHOT = r"""
import importlib, json, os, pkgutil, sys, warnings
for name in ("numpy", "numba", "dask", "dask.array", "distributed", "zarr", "torch",
             "torchvision", "PIL.Image", "tifffile", "tqdm", "matplotlib", "pydensecrf.densecrf", "psutil"):
    try:
        importlib.import_module(name)
    except Exception:
        pass
import numba
from numba.core import config

def state():
    cfg = {k: repr(getattr(config, k)) for k in dir(config) if k.isupper()}
    return {"env": dict(os.environ), "filters": [repr(f) for f in warnings.filters], "numba": cfg,
            "threads": numba.get_num_threads()}

before = state()
import isle_fast
names = [m.name for m in pkgutil.walk_packages(isle_fast.__path__, "isle_fast.") if m.name != "isle_fast.__main__"]
import isle_fast.kernels as kernels   # installed from kernels/ (not under isle_fast/ on disk)
names += [m.name for m in pkgutil.iter_modules(kernels.__path__, "isle_fast.kernels.")]
assert "isle_fast.kernels.gpu" in names and "isle_fast.training.train" in names, names
for name in names:
    importlib.import_module(name)
for name in isle_fast.__all__:
    getattr(isle_fast, name)
after = state()
def diff(a, b):
    if isinstance(a, dict):
        return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    if isinstance(a, list):
        return [x for x in b if x not in a] + [x for x in a if x not in b]
    return [a, b] if a != b else []
changed = {k: diff(before[k], after[k]) for k in before if diff(before[k], after[k])}
print(json.dumps(changed, default=str))
"""


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k not in ("NUMBA_ENABLE_CUDASIM", "ISLE_FORCE_CUDASIM")}
    e.update(env)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=e, capture_output=True, text=True,
                          timeout=300)


def test_importing_every_module_changes_no_process_state():
    # ISLE_FORCE_CUDASIM=1: before, importing backend.py set NUMBA_ENABLE_CUDASIM and reloaded Numba's
    # config, and importing kernels/gpu.py added a global warnings filter
    proc = _run(SNAPSHOT, ISLE_FORCE_CUDASIM="1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "{}", proc.stdout[-3000:]


def test_prepare_process_makes_the_settings_once():
    code = (
        "import os, warnings, numba\n"
        "from isle_fast.process import prepare_process\n"
        "prepare_process()\n"
        "from numba.core import config\n"
        "print(os.environ.get('NUMBA_ENABLE_CUDASIM'), config.ENABLE_CUDASIM)\n"
        "n = len(warnings.filters)\n"
        "prepare_process(gpu=True)\n"
        "m = len(warnings.filters)\n"
        "prepare_process(gpu=True)\n"
        "print(m - n, len(warnings.filters) - m)\n"
    )
    proc = _run(code, ISLE_FORCE_CUDASIM="1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["1", "1", "1", "0"], proc.stdout  # simulator on; one filter, added once


def test_the_cli_prepares_the_process(tmp_path):
    """``isle`` makes the settings at its start: the simulator is on before any kernel is loaded."""
    code = (
        "import sys\n"
        "from isle_fast import cli, process\n"
        "called = []\n"
        "real = process.prepare_process\n"
        "process.prepare_process = lambda *a, **k: (called.append(a or k), real(*a, **k))[1]\n"
        "cli.main(['info', sys.argv[1]])\n"
        "print(bool(called))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "missing.zarr")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.stdout.strip().splitlines()[-1] == "True", proc.stdout + proc.stderr[-2000:]


def test_task_threads_are_set_for_one_call_only():
    import numba

    from isle_fast.kernels.cpu import numba_threads

    before = numba.get_num_threads()
    with numba_threads(1) as n:
        assert n == 1 and numba.get_num_threads() == 1
    assert numba.get_num_threads() == before


def test_gpu_preparation_points_numba_at_the_nvvm_wheel(monkeypatch, tmp_path):
    from isle_fast import process

    if os.path.isdir("/usr/local/cuda/nvvm") or os.path.exists(os.path.join(sys.prefix, "conda-meta")):
        import pytest

        pytest.skip("a CUDA toolkit or conda is here: it wins over the wheel")
    for var in ("CUDA_HOME", "CUDA_PATH", "NUMBA_ENABLE_CUDASIM"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(process, "_simulator", lambda: False)
    monkeypatch.setattr(process, "pip_nvvm_root", lambda: str(tmp_path))
    process._use_pip_nvvm()
    assert os.environ["CUDA_HOME"] == str(tmp_path)
    monkeypatch.setenv("CUDA_HOME", "/opt/mine")  # an explicit CUDA_HOME wins
    process._use_pip_nvvm()
    assert os.environ["CUDA_HOME"] == "/opt/mine"
