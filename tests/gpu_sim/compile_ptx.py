"""Compile every GPU kernel to PTX with the real NVVM (no GPU needed), for several set counts and dtypes.

Run as a script by ``tests/test_kernels_gpu.py::test_kernels_compile_to_ptx``. Exit 0: all
compiled; exit 77: no NVVM here (install ``nvidia-cuda-nvcc-cu12``, part of ``.[dev]``).
The CUDA simulator checks what the kernels compute; this checks that Numba's real CUDA
target accepts them (typing, tuples of arrays, closures over device functions, shared
memory and atomics) -- the part the simulator cannot see.
"""

from __future__ import annotations

import sys

import numba.cuda.dispatcher as _dispatcher
from numba import cuda
from numba import types as T

from isle_fast.kernels import gpu as G
from isle_fast.process import prepare_process


def main() -> int:
    from numba.cuda.cudadrv.libs import get_libdevice
    from numba.cuda.cudadrv.nvvm import NVVM

    prepare_process(gpu=True)  # NVVM of the nvidia-cuda-nvcc-cu12 wheel when there is no toolkit
    try:
        NVVM()
        if not get_libdevice():
            raise OSError("libdevice not found")
    except Exception as exc:           # no CUDA toolkit / nvcc wheel here
        print(f"no NVVM / libdevice: {exc}")
        return 77

    class _Device:                     # device functions ask the current device's compute capability
        compute_capability = (9, 0)

    _dispatcher.get_current_device = lambda: _Device()
    cc = (9, 0)
    u8, u16, f32 = (T.Array(t, 1, "C") for t in (T.uint8, T.uint16, T.float32))
    u64 = T.Array(T.uint64, 1, "C")
    i64_2, u8_2, f64_2 = (T.Array(t, 2, "C") for t in (T.int64, T.uint8, T.float64))
    i64, b, f64 = T.int64, T.boolean, T.float64
    jobs = []
    for N in (1, 3):
        sets = T.UniTuple(u8, N)
        jobs.append((f"confusion_labels N={N}", G._kernels("labels"),
                     (u8, T.Tuple((sets,)), i64, i64, i64, b, u64)))
        jobs.append((f"subset_confusion_labels N={N}", G._kernels("subset_labels"),
                     (u8, T.Tuple((sets, i64_2, u8_2, f64_2, i64)), i64, i64, i64, b, u64)))
        jobs.append((f"merge_labels N={N}", G._merge_labels_kernel, (sets, i64_2, u8_2, f64_2, i64, i64, u8)))
        for half, arr, raw in ((False, u8, T.uint8), (True, u16, T.uint16), (False, f32, T.float32)):
            ss = T.UniTuple(arr, N)
            jobs.append((f"confusion_scores {arr.dtype} N={N}", G._kernels("scores", half),
                         (u8, T.Tuple((ss, b, f64)), i64, i64, i64, b, u64)))
            jobs.append((f"subset_confusion_scores {arr.dtype} N={N}",
                         G._kernels("subset_scores", half),
                         (u8, T.Tuple((ss, i64_2, i64, b, f64)), i64, i64, i64, b, u64)))
            jobs.append((f"merge_scores {arr.dtype} N={N}", G._kernels("merge_scores", half),
                         (ss, i64_2, i64, b, f64, raw, i64, u8, arr)))
            if N == 1:
                jobs.append((f"decode_scores {arr.dtype}", G._kernels("decode", half), (arr, i64, b, f64, u8)))
    for name, kernel, sig in jobs:
        ptx, _ = cuda.compile_ptx(kernel.py_func, sig, cc=cc)
        assert ".entry" in ptx, name
        print(f"ok {name}: {len(ptx)} chars")
    print(f"{len(jobs)} kernels compiled to PTX for sm_{cc[0]}{cc[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
