"""Progress bars and end-of-run summaries, one look for every command.

Long work shows a tqdm bar on stderr (hidden when ``quiet`` or with
``ISLE_PROGRESS=0``; redrawn every 30 s when stderr is not a terminal); every command ends with
:func:`summary`: what was done, how long it took, where the output is.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

__all__ = ["progress", "dask_progress", "summary", "Timer"]


def _enabled(quiet: bool) -> bool:
    return not quiet and os.environ.get("ISLE_PROGRESS", "1") != "0"


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
             unit: str = "it", quiet: bool = False, **kwargs: Any):
    """A tqdm bar on stderr (a no-op wrapper when ``quiet``).

    When stderr is not a terminal (a batch job's log file) the bar is redrawn at
    most every 30 s instead of 10 times a second, so logs get a line now and
    then rather than thousands of carriage-return updates.
    """
    from tqdm.auto import tqdm

    kwargs.setdefault("mininterval", 0.1 if _isatty(sys.stderr) else 30.0)
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not _enabled(quiet),
                file=sys.stderr, dynamic_ncols=True, leave=False, **kwargs)


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # replaced or closed streams
        return False


@contextmanager
def dask_progress(desc: str = "", quiet: bool = False) -> Iterator[None]:
    """Show a tqdm bar over the tasks of every Dask computation inside the block.

    Works with the local schedulers (a callback per finished task) and on a
    ``dask.distributed`` client: there every computation inside the block that
    leaves the scheduler to Dask runs on the cluster and the bar counts the
    tasks the cluster finishes (:func:`isle_fast.cluster.cluster_get`).
    """
    if not _enabled(quiet):
        yield
        return
    if "distributed" in sys.modules:
        from isle_fast.cluster import cluster_get, current_client

        client = current_client()
        if client is not None:
            import dask

            bar = progress(desc=desc, unit="task")
            try:
                with dask.config.set(scheduler=cluster_get(client, bar)):
                    yield
            finally:
                bar.close()
            return
    from dask.callbacks import Callback

    bar = progress(desc=desc, unit="task")

    class _Bar(Callback):
        def _start_state(self, dsk, state):
            bar.total = (bar.total or 0) + len(state["ready"]) + len(state["waiting"]) + len(state["running"])
            bar.refresh()

        def _posttask(self, key, result, dsk, state, worker_id):
            bar.update(1)

    try:
        with _Bar():
            yield
    finally:
        bar.close()


class Timer:
    """Wall-clock seconds since creation: ``t = Timer(); ...; t.seconds``."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start


def summary(title: str, rows: dict[str, Any], *, quiet: bool = False, file=None) -> None:
    """Print a short aligned summary block (to stdout by default)."""
    if quiet:
        return
    if "distributed" in sys.modules:     # on a cluster: name the scheduler and its workers
        from isle_fast.cluster import summary_row

        rows = {**rows, **summary_row()}
    out = file or sys.stdout
    width = max((len(k) for k in rows), default=0)
    print(title, file=out)
    for k, v in rows.items():
        print(f"  {k.ljust(width)}  {v}", file=out)
