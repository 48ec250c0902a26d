"""The one backend switch: which kernel module runs the hot loops.

``backend="cpu"`` uses :mod:`isle_fast.kernels.cpu` (Numba), ``"gpu"`` uses
:mod:`isle_fast.kernels.gpu` (CuPy / numba.cuda), ``"auto"`` picks the GPU
when CuPy is installed and sees a device. Orchestration code asks this module
for the kernels and for the array module to hand them; it never imports a
kernel module itself.
"""

from __future__ import annotations

import functools
from types import ModuleType

from .errors import InputError

__all__ = ["BACKENDS", "resolve_backend", "get_kernels", "gpu_available"]

BACKENDS = ("auto", "cpu", "gpu")


@functools.lru_cache(maxsize=1)
def gpu_available() -> bool:
    """Whether CuPy is importable and sees at least one CUDA device."""
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def resolve_backend(backend: str = "auto") -> str:
    """``'cpu'`` or ``'gpu'`` for a requested backend; an unusable ``'gpu'`` is an error."""
    if backend not in BACKENDS:
        raise InputError(f"--backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    if backend == "auto":
        return "gpu" if gpu_available() else "cpu"
    if backend == "gpu" and not gpu_available():
        raise InputError("--backend gpu: no CUDA device visible to CuPy (install isle-fast[gpu] "
                         "on a machine with an NVIDIA GPU, or use --backend cpu)")
    return backend


def get_kernels(backend: str = "auto") -> ModuleType:
    """The kernel module for ``backend`` (after :func:`resolve_backend`)."""
    name = resolve_backend(backend)
    if name == "gpu":
        from .kernels import gpu

        return gpu
    from .kernels import cpu

    return cpu
