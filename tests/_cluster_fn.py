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


def keep_buffer(nbytes: int) -> int:
    """A task that leaves ``nbytes`` in this thread's kept chunk buffer (touched, so it is resident),
    as the direct passes' chunk reads do, and waits long enough for the worker to see its memory."""
    import time

    import numpy as np

    from isle_fast.stores.chunkio import thread_buffer

    if nbytes:
        thread_buffer(("test", "kept"), (nbytes,), np.uint8)[:] = 1
        time.sleep(1.0)
    return nbytes
