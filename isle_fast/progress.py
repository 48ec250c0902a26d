"""Progress bars and end-of-run summaries, one look for every command.

Long work shows progress on stderr in the units a user thinks in (images, or steps of
training), never Dask's tasks; hidden when ``quiet`` or with ``ISLE_PROGRESS=0``.

* On a terminal: a tqdm bar, redrawn up to 10 times a second.
* Elsewhere (a batch job's log file, a pipe): a plain line now and then, at each tenth of the
  work done (at most one a second) or every :data:`LOG_EVERY` seconds, with the count, the rate
  and the time left, and one line when the work ends; never tqdm's carriage-return frames.
* :func:`one_bar`: a command made of several passes (``isle merge``: evaluate, write, score)
  shows one bar over all of them; the passes' own bars become its stages.

Every command ends with :func:`summary`: what was done, how long it took, where the output is.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

__all__ = ["progress", "dask_progress", "one_bar", "summary", "Timer", "Bar"]

#: seconds between two lines of a bar written to a log file (not a terminal)
LOG_EVERY = 10.0

#: the :func:`one_bar` now shown, if any (bars are made by the main thread); None: a quiet one
_SHARED: list["_Shared | None"] = []


def _enabled(quiet: bool) -> bool:
    return not quiet and os.environ.get("ISLE_PROGRESS", "1") != "0"


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # replaced or closed streams
        return False


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class Bar:
    """A progress display with tqdm's interface as isle uses it (``update``, ``total``, ``refresh``,
    ``set_postfix``, ``close``, iteration, ``with``); made by :func:`progress`.

    Progress may be fractional (:meth:`advance`); the display shows whole units.
    """

    def __init__(self, iterable: Iterable | None = None, *, total: float | None = None, desc: str = "",
                 unit: str = "it", quiet: bool = False, initial: float = 0, **kwargs: Any) -> None:
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.iterable, self.desc, self.unit = iterable, desc, unit
        self._total, self.n, self._initial = total, float(initial), float(initial)
        self.enabled = _enabled(quiet) and not (_SHARED and _SHARED[-1] is None)
        self._tqdm = None
        self._stage: _Shared | None = None
        self._postfix = ""
        self._closed = False
        self._t0 = self._last = time.perf_counter()
        self._next_tenth = 1
        self.passes: tuple[int, float] | None = None  # a one_bar's (passes, units per pass)
        self.file = sys.stderr
        self.log_mode = self.enabled and not _SHARED and not _isatty(self.file)
        if not self.enabled:
            return
        if _SHARED:
            stage = self._stage = _SHARED[-1]
            assert stage is not None  # enabled only when the shared bar is on
            stage.begin(self)
        elif not self.log_mode:
            from tqdm.auto import tqdm

            kwargs.setdefault("mininterval", 0.1)
            self._tqdm = tqdm(total=total, desc=desc, unit=unit, file=self.file, dynamic_ncols=True,
                              leave=False, initial=int(initial), **kwargs)

    # -- tqdm's interface ------------------------------------------------------------------
    @property
    def total(self) -> float | None:
        return self._total

    @total.setter
    def total(self, value: float | None) -> None:
        self._total = value
        if self._tqdm is not None:
            self._tqdm.total = value

    @property
    def mininterval(self) -> float:
        """Seconds between two redraws: a terminal's 0.1, a log file's ~:data:`LOG_EVERY`."""
        return self._tqdm.mininterval if self._tqdm is not None else LOG_EVERY

    def update(self, n: float = 1) -> None:
        """``n`` more units done."""
        self.advance(n)

    def advance(self, n: float) -> None:
        """``n`` (possibly fractional) more units done."""
        if not self.enabled or self._closed:
            return
        before = self.n
        self.n += n
        if self._tqdm is not None:
            step = int(self.n) - int(before)
            if step:
                self._tqdm.update(step)
        elif self._stage is not None:
            self._stage.moved(self)
        else:
            self._maybe_log()

    def set_fraction(self, fraction: float) -> None:
        """Set the progress to ``fraction`` of ``total`` (for work measured another way)."""
        if self._total:
            self.advance(max(0.0, min(1.0, fraction)) * float(self._total) - self.n)

    def refresh(self) -> None:
        if self._tqdm is not None:
            self._tqdm.refresh()

    def set_postfix(self, refresh: bool = True, **kw: Any) -> None:
        self._postfix = ", ".join(f"{k}={v}" for k, v in kw.items())
        if self._tqdm is not None:
            self._tqdm.set_postfix(refresh=refresh, **kw)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._tqdm is not None:
            self._tqdm.close()
        elif self._stage is not None:
            self._stage.end(self)
        elif self.log_mode and self.n > self._initial:
            self._write(done=True)

    def __enter__(self) -> "Bar":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __iter__(self) -> Iterator[Any]:
        try:
            for item in self.iterable or ():
                yield item
                self.update(1)
        finally:
            self.close()

    # -- log-file lines ---------------------------------------------------------------------
    def line(self, done: bool = False) -> str:
        """The plain line written to a log file: count, share, rate, time left (or taken)."""
        secs = time.perf_counter() - self._t0
        n = int(self.n)
        rate = (self.n - self._initial) / secs if secs > 0 else 0.0
        head = f"{self.desc}: " if self.desc else ""
        count = f"{n:,}/{int(self._total):,} {self.unit}" if self._total else f"{n:,} {self.unit}"
        if done and self.passes is not None:
            passes = self.passes[0]
            count = f"{passes} pass{'es' if passes != 1 else ''} over {int(self.passes[1]):,} {self.unit}"
        if self._total and not done:
            count += f" ({100.0 * self.n / self._total:.0f}%)"
        parts = [count, f"{rate:,.1f} {self.unit}/s"]
        if done:
            parts.append(f"done in {_duration(secs)}")
        elif self._total and rate > 0:
            parts.append(f"ETA {_duration((self._total - self.n) / rate)}")
        if self._postfix:
            parts.append(self._postfix)
        return head + ", ".join(parts)

    def _maybe_log(self) -> None:
        now = time.perf_counter()
        tenth = int(10 * self.n / self._total) if self._total else 0
        finished = bool(self._total) and self.n >= (self._total or 0)  # the line at close says it
        if not finished and (now - self._last >= LOG_EVERY or (tenth >= self._next_tenth and now - self._last >= 1.0)):
            self._write()
        if tenth >= self._next_tenth:
            self._next_tenth = tenth + 1

    def _write(self, done: bool = False) -> None:
        self._last = time.perf_counter()
        try:
            print(self.line(done), file=self.file, flush=True)
        except (OSError, ValueError):
            pass


class _Shared:
    """The state of a :func:`one_bar`: each bar made inside it is a stage worth ``per_stage`` units."""

    def __init__(self, bar: Bar, per_stage: float, stages: int) -> None:
        self.bar, self.per_stage, self.stages = bar, per_stage, stages
        self.base = 0.0
        self.started = 0
        self.desc = bar.desc

    def begin(self, inner: Bar) -> None:
        self.started += 1
        if self.started > self.stages:  # more passes than announced: the bar grows
            self.stages = self.started
            self.bar.total = self.per_stage * self.stages
        what = f"{inner.desc}, " if inner.desc and inner.desc != self.desc else ""
        self.bar.desc = f"{self.desc} ({what}pass {self.started}/{self.stages})"  # why the count is N x images
        self.bar.passes = (self.started, self.per_stage)
        if self.bar._tqdm is not None:
            self.bar._tqdm.set_description(self.bar.desc, refresh=False)

    def moved(self, inner: Bar) -> None:
        share = min(1.0, inner.n / inner.total) if inner.total else 0.0
        self.bar.advance(self.base + share * self.per_stage - self.bar.n)

    def end(self, inner: Bar) -> None:
        self.base += self.per_stage
        self.bar.advance(self.base - self.bar.n)


@contextmanager
def one_bar(desc: str, *, units: float, stages: int, unit: str = "img", quiet: bool = False) -> Iterator[Bar]:
    """One bar for a command of several passes (``isle merge``: evaluate, write, score).

    Every bar made inside the block (by :func:`progress` / :func:`dask_progress`) is one stage of
    it, worth ``units`` (e.g. the data set's images), whatever that bar counts; the bar's total is
    ``units * stages`` (grown if more stages come) and its label names the running stage. A quiet
    one silences the bars inside it too.
    """
    bar = Bar(total=units * max(1, stages), desc=desc, unit=unit, quiet=quiet)
    _SHARED.append(_Shared(bar, float(units), max(1, stages)) if bar.enabled else None)  # None: all quiet
    try:
        yield bar
    finally:
        _SHARED.pop()
        bar.desc = desc
        bar.close()


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
             unit: str = "it", quiet: bool = False, **kwargs: Any) -> Bar:
    """A progress :class:`Bar` on stderr (a no-op when ``quiet``): tqdm on a terminal, plain
    lines in a log file, a stage of the enclosing :func:`one_bar` if there is one."""
    return Bar(iterable, total=total, desc=desc, unit=unit, quiet=quiet, **kwargs)


@contextmanager
def dask_progress(desc: str = "", quiet: bool = False, *, images: int | None = None) -> Iterator[None]:
    """Progress of every Dask computation inside the block, in images.

    ``images`` is the number of images the block's computations go through: the bar counts
    them, each finished task moving it by its share of the graph (tasks of one graph do
    comparable work per image chunk), so a user sees ``merge: 700/1,449 img``, not Dask's task
    count. Without ``images`` the bar shows the share done in percent. Works with the local
    schedulers (a callback per finished task) and on a ``dask.distributed`` client: there every
    computation inside the block that leaves the scheduler to Dask runs on the cluster, and the
    bar moves as the cluster finishes its tasks (:func:`isle_fast.cluster.cluster_get`; a lost
    worker's re-run tasks show as work still to do).
    """
    if not _enabled(quiet):
        yield
        return
    bar = progress(desc=desc, total=images if images else 100, unit="img" if images else "%")
    if "distributed" in sys.modules:
        from isle_fast.cluster import cluster_get, current_client

        client = current_client()
        if client is not None:
            import dask

            try:
                with dask.config.set(scheduler=cluster_get(client, _TaskShare(bar))):
                    yield
            finally:
                bar.close()
            return
    from dask.callbacks import Callback

    tasks = {"total": 0, "done": 0}

    class _Bar(Callback):
        def _start_state(self, dsk, state):
            tasks["total"] += len(state["ready"]) + len(state["waiting"]) + len(state["running"])

        def _posttask(self, key, result, dsk, state, worker_id):
            tasks["done"] += 1
            bar.set_fraction(tasks["done"] / max(1, tasks["total"]))

    try:
        with _Bar():
            yield
    finally:
        bar.close()


class _TaskShare:
    """What :func:`isle_fast.cluster.cluster_get` moves (tasks finished of all, over every computation
    of the block), shown on ``bar`` as that share of its images."""

    disable = False

    def __init__(self, bar: Bar) -> None:
        self.bar, self.total, self.n = bar, 0, 0

    def refresh(self) -> None:
        self.bar.set_fraction(self.n / max(1, self.total))


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
