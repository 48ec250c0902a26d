"""The one backend switch: which kernel module runs the hot loops.

``backend="cpu"`` uses :mod:`isle_fast.kernels.cpu` (Numba), ``"gpu"`` uses
:mod:`isle_fast.kernels.gpu` (``numba.cuda`` kernels, CuPy for device arrays),
``"auto"`` picks the GPU when CuPy is installed and sees a CUDA device (and
Numba's CUDA target can use it). Orchestration code asks this module for the
kernels; it never imports a kernel module itself. Both kernel modules accept
NumPy arrays and return NumPy results for them, so Dask graphs over host
chunks are the same for both backends.

The chunks' type decides too (:func:`chunk_backend`, as dask-image dispatches on
a Dask array's ``_meta``): a task handed chunks in GPU memory (CuPy, or a Dask
array of CuPy chunks) runs the GPU kernels on them where they are, with no copy
to the host and back; :func:`to_host` brings a (small) result back.

Testing without a GPU
---------------------
Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``) runs the very
``numba.cuda`` kernels of the GPU backend in Python threads on the CPU (very
slowly: tiny data only). When it is enabled, :func:`gpu_available` is true, so
``--backend gpu`` / ``auto`` run the whole pipeline through the GPU path. The
variable must be set before Numba is imported; ``ISLE_FORCE_CUDASIM=1`` does
that for you at the first call of :func:`resolve_backend` (or ``isle``'s start),
as long as :mod:`numba.cuda` is not imported yet (e.g.
``ISLE_FORCE_CUDASIM=1 isle evaluate ... --backend gpu``): see
:mod:`isle_fast.process`, the one place that changes process-wide settings.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
from types import ModuleType
from typing import TYPE_CHECKING, Any

from isle_fast.errors import InputError, param
from isle_fast.process import FORCE_CUDASIM_ENV, prepare_process

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "BACKENDS",
    "FORCE_CUDASIM_ENV",
    "resolve_backend",
    "get_kernels",
    "gpu_available",
    "simulator_enabled",
    "describe_backend",
    "task_kernels",
    "is_device_array",
    "chunk_backend",
    "to_host",
    "tune_allocator",
    "dask_scheduler",
    "add_backend_argument",
]

BACKENDS = ("auto", "cpu", "gpu")


def simulator_enabled() -> bool:
    """Whether ``numba.cuda`` runs in Numba's CPU simulator (``NUMBA_ENABLE_CUDASIM=1``).

    Before Numba is imported the environment variable is the answer (it is
    what Numba will read), so asking costs no Numba import (0.13-0.2 s).
    """
    prepare_process()
    if "numba" not in sys.modules:
        try:
            return int(os.environ.get("NUMBA_ENABLE_CUDASIM", "0") or 0) != 0
        except ValueError:
            pass
    from numba.core import config

    return bool(config.ENABLE_CUDASIM)


def _no_gpu_here() -> bool:
    """Cheap certain "no": CuPy is not installed, or (Linux) no NVIDIA / WSL GPU device node exists."""
    import importlib.util

    if "cupy" in sys.modules:
        return False
    if importlib.util.find_spec("cupy") is None:
        return True
    return sys.platform.startswith("linux") and not any(
        os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/dxg"))


@functools.lru_cache(maxsize=1)
def _real_gpu() -> bool:
    if _no_gpu_here():
        return False
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() <= 0:
            return False
    except Exception:
        return False
    try:
        from numba import cuda

        return bool(cuda.is_available())
    except Exception:
        return False


def gpu_available() -> bool:
    """Whether the GPU backend can run here.

    True when CuPy is importable and sees at least one CUDA device that Numba's CUDA target can
    use, or when Numba's CUDA simulator is enabled (see the module docstring).
    """
    return simulator_enabled() or _real_gpu()


# kept for callers that clear the cache in tests (the real-device probe is cached)
gpu_available.cache_clear = _real_gpu.cache_clear  # type: ignore[attr-defined]


def resolve_backend(backend: str = "auto") -> str:
    """``'cpu'`` or ``'gpu'`` for a requested backend; an unusable ``'gpu'`` is an error.

    Parameters
    ----------
    backend : {"auto", "cpu", "gpu"}
        ``auto`` picks ``gpu`` when :func:`gpu_available`, else ``cpu``.

    Raises
    ------
    InputError
        For an unknown name, or ``gpu`` without a usable device.
    """
    prepare_process()
    if backend not in BACKENDS:
        raise InputError(f"{param('backend')} must be one of {', '.join(BACKENDS)}, not {backend!r}")
    if backend == "auto":
        return "gpu" if gpu_available() else "cpu"
    if backend == "gpu" and not gpu_available():
        raise InputError(f"{param('backend', 'gpu')}: no CUDA device visible to CuPy / Numba (install "
                         f"isle-fast[gpu] on a machine with an NVIDIA GPU, or use {param('backend', 'cpu')})")
    return backend


def get_kernels(backend: str = "auto") -> ModuleType:
    """The kernel module for ``backend`` (after :func:`resolve_backend`).

    Both modules expose the same functions (``confusion_labels``, ``confusion_scores``,
    ``decode_scores``, ``merge_labels``, ``merge_scores``, ``subset_confusion_labels``,
    ``subset_confusion_scores``) and constants (``SCORE``, ``ORDER``, ``IGNORE``).
    """
    name = resolve_backend(backend)
    if name == "gpu":
        prepare_process(gpu=True)  # before any GPU kernel compiles
        from isle_fast.kernels import gpu

        return gpu
    from isle_fast.kernels import cpu

    return cpu


def is_device_array(a: Any) -> bool:
    """Whether ``a`` lives in GPU memory: a CuPy or Numba device array, or a Dask array of such chunks.

    Anything exposing ``__cuda_array_interface__`` is a device array, and so is the
    device array of Numba's CUDA simulator; a Dask array is judged by its ``_meta``
    (the type of its chunks), as dask-image dispatches.
    """
    if type(a).__module__.split(".", 1)[0] == "dask" and hasattr(a, "_meta"):
        a = a._meta
    if hasattr(a, "__cuda_array_interface__"):
        return True
    kind = type(a)
    return kind.__name__ == "FakeCUDAArray" and kind.__module__.startswith("numba.")


def chunk_backend(backend: str, *arrays: Any) -> str:
    """``'cpu'`` or ``'gpu'`` for data ``arrays``: chunks in GPU memory run on the GPU.

    Host arrays (NumPy) leave the choice to :func:`resolve_backend`. Device arrays
    (CuPy, Numba device arrays, Dask arrays of them) run on the GPU kernels, which
    take them without a copy to the host; ``backend='cpu'`` cannot read them.

    Raises
    ------
    InputError
        An unknown backend, or ``cpu`` for arrays in GPU memory.
    """
    if not any(is_device_array(a) for a in arrays):
        return resolve_backend(backend)
    if backend not in BACKENDS:
        resolve_backend(backend)  # names the choices
    if backend == "cpu":
        raise InputError(f"{param('backend', 'cpu')}: the arrays are in GPU memory (CuPy chunks); use "
                         f"{param('backend', 'gpu')} or {param('backend', 'auto')}, or move them to the host")
    prepare_process(gpu=True)
    return "gpu"


def to_host(a: Any) -> np.ndarray:
    """``a`` as a NumPy array: device arrays copied to the host (CuPy ``.get()``, Numba ``copy_to_host``)."""
    import numpy as np

    if is_device_array(a):
        get = getattr(a, "get", None) or getattr(a, "copy_to_host")
        return np.asarray(get())
    return np.asarray(a)


@contextlib.contextmanager
def task_kernels(backend: str = "auto", *blocks: Any):
    """The kernel module for one Dask task, with CPU kernels on the calling thread only.

    Dask already runs one task per core (threads or worker processes); a Numba
    parallel region inside every task would put twice as many busy threads as
    cores on the machine (an OpenMP team per Dask thread, spinning while it
    waits), which slowed the VOC-scale pipeline down. Within the ``with`` block
    the calling thread's Numba thread count is 1 (Numba keeps it per thread);
    it is restored afterwards. GPU kernels are returned unchanged. ``blocks`` are
    the task's chunks: in GPU memory they choose the GPU kernels (:func:`chunk_backend`).

    Yields
    ------
    module
        As :func:`get_kernels`.
    """
    name = chunk_backend(backend, *blocks)
    kernels = get_kernels(name)
    if name != "cpu":
        yield kernels
        return
    with kernels.numba_threads(1):
        yield kernels


#: Environment variable: ``0`` leaves the C allocator as it is (see :func:`tune_allocator`).
TUNE_MALLOC_ENV = "ISLE_TUNE_MALLOC"


def tune_allocator(mmap_threshold: int = 64 << 20, trim_threshold: int = 512 << 20) -> bool:
    """Let the process reuse freed chunk buffers instead of page-faulting fresh ones (glibc only).

    Every Dask task allocates a few chunk-sized arrays (8 MiB for 33 VOC images
    of uint8) and frees them. glibc serves allocations that large with ``mmap``
    and gives them back to the kernel on ``free``, so the next chunk pays a page
    fault for every 4 KiB page again (what that costs at VOC scale: the
    README, "How it is fast", from ``python -m benchmarks.pipeline``,
    ``io_choices``). It raises glibc's ``M_MMAP_THRESHOLD`` (chunk buffers come from the heap) and
    ``M_TRIM_THRESHOLD`` (freed heap memory is kept up to ``trim_threshold``
    bytes: the cost, a higher resident size by at most that much).

    The ``isle`` command calls it at start. Library users may call it once;
    on a ``dask.distributed`` cluster run it on the workers too
    (``client.run(tune_allocator)``). ``ISLE_TUNE_MALLOC=0`` turns it off.

    Returns
    -------
    bool
        Whether the allocator was changed (False off glibc, or when disabled).
    """
    if os.environ.get(TUNE_MALLOC_ENV, "1") in ("0", "false", "no") or not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3   # from glibc's malloc.h
    return bool(mallopt(m_mmap_threshold, int(mmap_threshold)) and mallopt(m_trim_threshold, int(trim_threshold)))


def dask_scheduler():
    """The ``scheduler=`` to give ``dask.compute``: Dask's threaded scheduler, unless the user chose.

    Without a scheduler argument Dask tries ``import distributed`` on every
    compute to look for a client (0.22 s of imports for a run on one
    machine). When ``distributed`` has not been imported no client can exist,
    so the threaded scheduler is named directly; when it has been imported, or
    a scheduler is configured (``dask.config``), ``None`` leaves the choice to
    Dask as before.
    """
    import dask

    if "distributed" in sys.modules or dask.config.get("scheduler", None) is not None:
        return None
    from dask.threaded import get

    return get


def describe_backend(backend: str = "auto") -> str:
    """One line naming what ``backend`` runs on, for summaries (e.g. ``'gpu (NVIDIA H100 ...)'``)."""
    name = resolve_backend(backend)
    if name == "cpu":
        try:
            import numba

            return f"cpu (numba {numba.__version__}, {numba.get_num_threads()} threads)"
        except Exception:
            return "cpu"
    if simulator_enabled():
        return "gpu (numba CUDA simulator, no device)"
    try:
        import cupy

        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        dev = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
        return f"gpu ({dev}, CuPy {cupy.__version__})"
    except Exception:
        return "gpu"


def add_backend_argument(parser: argparse.ArgumentParser) -> None:
    """Add the common ``--backend {auto,cpu,gpu}`` option to a subcommand's parser."""
    parser.add_argument(
        "--backend", choices=BACKENDS, default="auto",
        help="where the array kernels run: cpu (Numba), gpu (CUDA; needs isle-fast[gpu] and an "
             "NVIDIA GPU) or auto (gpu when one is usable, else cpu); results are identical")
