"""Compiled hot loops, installed as :mod:`isle_fast.kernels`.

Pure functions over NumPy (``cpu``) or CuPy (``gpu``) arrays; they know nothing
of Zarr, Dask or files. The backend switch lives in :mod:`isle_fast.backend`.
"""
