"""Tests in this folder run the GPU kernels under Numba's CUDA simulator.

``NUMBA_ENABLE_CUDASIM=1`` must be set before Numba is imported, and the rest of the
suite imports Numba normally, so these files are collected only when the simulator is
on; ``tests/test_kernels_gpu.py::test_kernels_under_cuda_simulator`` runs this folder in
a subprocess with the variable set (``NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/gpu_sim``
runs it by hand).
"""

from __future__ import annotations

import sys
from pathlib import Path

from numba.core import config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))     # tests/: reference.py

if not config.ENABLE_CUDASIM:
    collect_ignore_glob = ["test_*.py"]
