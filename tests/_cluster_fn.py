"""A task function for the ClusterExecutor tests (importable by the workers: ``tests`` is on their path)."""

from __future__ import annotations


class CountedFn:
    """``fn(a, b) = a * b + len(payload)``; counts how often it is pickled in this process."""

    pickled = 0

    def __init__(self, payload: bytes):
        self.payload = payload

    def __call__(self, a: int, b: int) -> int:
        return a * b + len(self.payload)

    def __reduce__(self):
        type(self).pickled += 1
        return (CountedFn, (self.payload,))
