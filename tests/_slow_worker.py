"""``dask worker --preload`` module for tests/test_cluster.py: slows each chunk task on the worker.

A worker started with it sleeps before decoding each label file and before each merge chunk task,
so a test can kill a worker while an ingest or a merge is in the middle of its chunks. The
results are unchanged (the wrapped functions are called as they are).
"""

from __future__ import annotations

import functools
import os
import time

DELAY = float(os.environ.get("ISLE_TEST_TASK_DELAY", "0.05"))


def _slow(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        time.sleep(DELAY)
        return fn(*args, **kwargs)

    return wrapper


def dask_setup(worker=None) -> None:
    """Called by ``dask worker`` once the module is loaded."""
    from isle_fast.ensemble import merge
    from isle_fast.stores import formats, ingest

    formats.read_label = ingest.read_label = _slow(formats.read_label)
    merge._merge_block = _slow(merge._merge_block)            # the Dask graph's merge task
    merge._local_merge_task = _slow(merge._local_merge_task)  # the direct chunk pass's
