"""Process-wide settings, made once and explicitly where the program starts, never on import.

Importing any module of isle-fast changes no environment variable, no warnings filter
and no Numba setting (``tests/test_process.py``). What the program needs is done here:

* :func:`prepare_process` (``isle``'s main calls it first; :func:`isle_fast.backend.resolve_backend`,
  which every pipeline function calls, calls it too, so library callers get it on
  their first call): ``ISLE_FORCE_CUDASIM=1`` turns Numba's CUDA simulator on
  (``NUMBA_ENABLE_CUDASIM=1``, and Numba's configuration is read again if Numba was
  already imported, as long as ``numba.cuda`` was not).
* ``prepare_process(gpu=True)`` (:func:`isle_fast.backend.get_kernels` for the GPU backend,
  before any GPU kernel compiles): points ``CUDA_HOME`` at the NVVM of the
  ``nvidia-cuda-nvcc-cu12`` wheel when there is no CUDA toolkit (``pip install
  isle-fast[gpu]``; an explicit ``CUDA_HOME`` / ``CUDA_PATH``, conda or ``/usr/local/cuda``
  wins), and silences Numba's "Grid size ... under-utilization" warning (small chunks
  legitimately launch small grids; Numba would warn on every call).

Each step runs at most once per process. Numba's per-thread thread count is not
process state: the CPU kernels set it for one call only
(:func:`isle_fast.kernels.cpu.numba_threads`).
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys
import threading
import warnings

__all__ = ["FORCE_CUDASIM_ENV", "prepare_process", "pip_nvvm_root"]

#: Environment variable that turns Numba's CUDA simulator on for the GPU backend (tests, no GPU).
FORCE_CUDASIM_ENV = "ISLE_FORCE_CUDASIM"

_LOCK = threading.Lock()
_DONE: set[str] = set()


def prepare_process(gpu: bool = False) -> None:
    """Make the process-wide settings isle-fast needs (each once; see the module docstring).

    Parameters
    ----------
    gpu : bool
        Also prepare Numba's CUDA target (NVVM location, launch warnings): the GPU
        backend is about to be used.
    """
    with _LOCK:
        if "cudasim" not in _DONE:
            _force_cudasim()
            _DONE.add("cudasim")
        if gpu and "gpu" not in _DONE:
            from numba.core.errors import NumbaPerformanceWarning

            _use_pip_nvvm()
            warnings.filterwarnings("ignore", message=r"Grid size .* will likely result in GPU under-utilization",
                                    category=NumbaPerformanceWarning)
            _DONE.add("gpu")


_YES = ("1", "true", "yes")


def _force_cudasim() -> None:
    """Honour ``ISLE_FORCE_CUDASIM=1`` while it can still take effect (before numba.cuda loads)."""
    if os.environ.get(FORCE_CUDASIM_ENV, "") not in _YES or "numba.cuda" in sys.modules:
        return  # off, or too late: backend.simulator_enabled() reports the truth
    if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
        os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
        if "numba" in sys.modules:  # numba already read its config: make it read it again
            from numba.core import config

            config.reload_config()


def _simulator() -> bool:
    config = sys.modules.get("numba.core.config")
    if config is not None:
        return bool(getattr(config, "ENABLE_CUDASIM", False))
    return os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"


def pip_nvvm_root() -> str | None:
    """The ``nvidia-cuda-nvcc-cu12`` wheel's folder when it holds NVVM and libdevice, else None."""
    try:
        spec = importlib.util.find_spec("nvidia.cuda_nvcc")
    except (ImportError, ValueError):
        return None
    for root in (spec.submodule_search_locations or []) if spec else []:
        if glob.glob(os.path.join(root, "nvvm", "lib64", "libnvvm.so*")) and os.path.isdir(
            os.path.join(root, "nvvm", "libdevice")
        ):
            return root
    return None


def _use_pip_nvvm() -> None:
    """Let Numba's CUDA target compile with the NVVM of the ``nvidia-cuda-nvcc-cu12`` wheel.

    Numba's built-in CUDA target finds NVVM / libdevice only in conda, ``CUDA_HOME`` or a
    system toolkit (``/usr/local/cuda``), and caches the paths at the first compile; with
    none of those, ``CUDA_HOME`` is pointed at the wheel before that.
    """
    if _simulator() or os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    if os.path.isdir("/usr/local/cuda/nvvm") or os.path.exists(os.path.join(sys.prefix, "conda-meta")):
        return
    root = pip_nvvm_root()
    if root:
        os.environ["CUDA_HOME"] = root
