"""Where chunk-aligned tasks run: worker processes, threads, this process, or a cluster.

Ingest and export are made of independent tasks, one per chunk (a task
decodes the images of one chunk and writes that chunk; or reads one chunk and
encodes its PNGs). PIL's PNG codec holds the GIL, so threads do not scale;
processes do. This module runs such tasks and hands their results back as they
finish, with a bounded number in flight (memory stays a few chunks per
worker).

Executors
---------
:class:`ProcessPool`
    ``n`` worker processes, each fed over its own pipe (no threads in the
    parent, so forking it later stays safe). The task function is
    cloudpickled once per worker, so closures work; arguments and results
    are pickled. A worker that dies (killed, out of memory) is noticed at
    once through its process sentinel and ends the run with
    :class:`WorkerLost`; closing the pool on an error or Ctrl-C terminates
    the workers before the caller removes what they were writing. Workers
    ignore SIGINT: Ctrl-C reaches the parent, which stops them.
    :meth:`ProcessPool.broadcast` has every worker run a warm-up call (load
    a kernel) without waiting for it. Tasks that run Numba's parallel kernels
    may go to workers only when they were forked before this process started
    Numba's threads (:func:`numba_fork_safe`, :attr:`ProcessPool.numba_safe`).
:class:`ThreadExecutor`
    A thread pool, for tasks over in-memory arrays (nothing is pickled).
:class:`InlineExecutor`
    This process, in order (one worker, or a single task: starting
    processes would cost more than it saves).
:class:`ClusterExecutor`
    The workers of the active ``dask.distributed`` client (``client.submit``);
    they must see the files and the output folder. A cluster that cannot move
    (every worker paused at its memory limit, or none left) is first asked to
    free what it keeps unused, then, still stuck, an error
    (:class:`ClusterStalled`), never a silent wait; a task that kills its worker
    each time is :class:`WorkerLost`. :func:`imap_combined` reduces each batch
    of results on the worker that made it.

:func:`executor_for` picks one: the pool made active with :func:`use_pool`
(``isle run`` starts one pool for all its steps), else a cluster when a
``distributed`` client is active, else a new process pool when there are at
least two tasks and two workers, else this process.

Start method: ``fork`` where the platform has it (a worker starts in
milliseconds with the parent's modules already imported; the tasks use only
NumPy, PIL, numcodecs and plain file I/O in the workers), else ``spawn``;
``ISLE_START_METHOD=spawn|forkserver|fork`` overrides.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import pickle
import signal
import sys
import traceback
from collections import deque
from typing import Any, Callable, Iterator, Sequence

__all__ = [
    "WorkerLost",
    "default_workers",
    "InlineExecutor",
    "ThreadExecutor",
    "ProcessPool",
    "ClusterExecutor",
    "ClusterStalled",
    "imap_combined",
    "use_pool",
    "active_pool",
    "executor_for",
    "numba_fork_safe",
]

#: Environment variable naming the multiprocessing start method of worker processes.
START_METHOD_ENV = "ISLE_START_METHOD"


class WorkerLost(OSError):
    """A worker process died while it held a task (killed by a signal, out of memory).

    An environment failure, not a user mistake: the command line prints it as
    one line and exits 1. Whatever the run was writing is removed.
    """


def default_workers() -> int:
    """Worker processes by default: one per core this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


class RemoteTraceback(Exception):
    """The traceback of an exception raised in a worker (attached as ``__cause__``)."""

    def __str__(self) -> str:
        return self.args[0] if self.args else ""


def _reraise(packed: tuple[bytes | None, str, str]) -> None:
    blob, text, tb = packed
    exc: BaseException | None = None
    if blob is not None:
        try:
            exc = pickle.loads(blob)
        except Exception:
            exc = None
    if exc is None:
        exc = RuntimeError(text)
    raise exc from RemoteTraceback(tb)


def _pack(exc: BaseException) -> tuple[bytes | None, str, str]:
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        blob = pickle.dumps(exc)
        pickle.loads(blob)
    except Exception:
        blob = None
    return blob, f"{type(exc).__name__}: {exc}", tb


def numba_fork_safe() -> bool:
    """Whether processes forked from this one now may run Numba's parallel kernels.

    A forked child inherits Numba's thread pool once this process has started it, and GNU
    OpenMP's cannot work there: Numba ends such a child (SIGTERM) at its first parallel kernel.
    So tasks that run kernels may go to worker processes only when the pool was forked before
    this process started Numba's threads (``isle`` forks its pool first), or not forked at all.
    """
    mod = sys.modules.get("numba.np.ufunc.parallel")
    return mod is None or not getattr(mod, "_is_initialized", False)


# ------------------------------------------------------------------------------ in process
class InlineExecutor:
    """Runs tasks in this process, in order (``workers`` is 1)."""

    workers = 1

    def imap(self, fn: Callable, tasks: Sequence[tuple], window: int | None = None
             ) -> Iterator[tuple[int, Any]]:
        """Yield ``(index, fn(*tasks[index]))`` for every task, in order."""
        for i, args in enumerate(tasks):
            yield i, fn(*args)

    def close(self) -> None:
        """Nothing to stop."""

    def terminate(self) -> None:
        """Nothing to stop."""

    def __enter__(self) -> "InlineExecutor":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


class ThreadExecutor:
    """A pool of ``workers`` threads; for tasks over in-memory data (nothing is pickled)."""

    def __init__(self, workers: int):
        from concurrent.futures import ThreadPoolExecutor

        self.workers = int(workers)
        self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="isle-task")

    def imap(self, fn: Callable, tasks: Sequence[tuple], window: int | None = None
             ) -> Iterator[tuple[int, Any]]:
        """Yield ``(index, result)`` as tasks finish, at most ``window`` in flight.

        On an exception (a task's, or the consumer's: ``close()`` of the
        generator) tasks that have not started are cancelled and the running
        ones are waited for (each is one chunk), so nothing writes after this
        returns.
        """
        from concurrent.futures import FIRST_COMPLETED, wait

        window = max(1, window or 2 * self.workers)
        pending: dict[Any, int] = {}
        it = iter(enumerate(tasks))
        try:
            while True:
                while len(pending) < window:
                    nxt = next(it, None)
                    if nxt is None:
                        break
                    pending[self._pool.submit(fn, *nxt[1])] = nxt[0]
                if not pending:
                    return
                done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
                for f in sorted(done, key=lambda f: pending[f]):
                    i = pending.pop(f)
                    yield i, f.result()
        finally:
            for f in pending:
                f.cancel()
            wait([f for f in pending if not f.cancelled()])

    def close(self) -> None:
        """Stop the threads (after the running tasks)."""
        self._pool.shutdown(wait=True, cancel_futures=True)

    terminate = close

    def __enter__(self) -> "ThreadExecutor":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ------------------------------------------------------------------------------ processes
def _worker_main(conn: Any) -> None:
    """A worker's loop: receive task functions and tasks, send back results; ends on None or EOF."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is the parent's to handle
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # terminate() must end a worker at once
    os.environ["ISLE_PROGRESS"] = "0"               # bars are the parent's
    fns: dict[int, Callable] = {}
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        if msg[0] == "fn":  # the function of the next run of tasks replaces the last one
            import cloudpickle

            fns = {msg[1]: cloudpickle.loads(msg[2])}
            continue
        if msg[0] == "call":  # broadcast(): run it, answer nothing; a failure is left to the tasks to meet
            import cloudpickle

            try:
                cloudpickle.loads(msg[1])()
            except Exception:  # noqa: BLE001 - a warm-up; the tasks that need it report their own errors
                pass
            continue
        _, fid, index, args = msg
        try:
            result = fns[fid](*args)
        except BaseException as exc:  # noqa: BLE001 - every failure goes back to the parent
            reply = (index, False, _pack(exc))
        else:
            reply = (index, True, result)
        try:
            conn.send(reply)
        except Exception as exc:  # an unpicklable result
            conn.send((index, False, _pack(RuntimeError(f"task {index}: result cannot be sent back: {exc}"))))


def _start_method() -> str:
    method = os.environ.get(START_METHOD_ENV, "").strip()
    if method:
        if method not in multiprocessing.get_all_start_methods():
            from isle_fast.errors import InputError

            raise InputError(f"{START_METHOD_ENV}={method!r}: this platform offers "
                             f"{', '.join(multiprocessing.get_all_start_methods())}")
        return method
    return "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"


class _Worker:
    def __init__(self, ctx: Any):
        parent, child = ctx.Pipe(duplex=True)
        self.conn = parent
        self.process = ctx.Process(target=_worker_main, args=(child,), daemon=True, name="isle-worker")
        self.process.start()
        child.close()
        self.fns: set[int] = set()
        self.tasks: deque[int] = deque()   # indices sent and not answered, in order


class ProcessPool:
    """``workers`` worker processes fed over pipes; see the module docstring.

    Use it as a context manager: leaving the block normally stops the workers
    after their current task; leaving it with an exception (a bad file,
    Ctrl-C) terminates them first, so the caller can then remove their
    output safely.
    """

    def __init__(self, workers: int | None = None, start_method: str | None = None):
        self.workers = int(workers or default_workers())
        if self.workers < 1:
            raise ValueError(f"workers must be at least 1, not {workers}")
        self.start_method = start_method or _start_method()
        self._ctx = multiprocessing.get_context(self.start_method)
        self._workers: list[_Worker] = []
        self._next_fn = 0
        self._broken: BaseException | None = None
        self._closed = False
        #: whether the workers may run Numba's parallel kernels (:func:`numba_fork_safe` when they started)
        self.numba_safe = True

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> "ProcessPool":
        """Start the workers now, not at the first task (``isle run`` forks them before any thread exists)."""
        self._ensure_started()
        return self

    def _ensure_started(self) -> None:
        if self._closed:
            raise RuntimeError("the worker pool is closed")
        if len(self._workers) < self.workers and self.start_method == "fork":
            self.numba_safe = self.numba_safe and numba_fork_safe()
        while len(self._workers) < self.workers:
            self._workers.append(_Worker(self._ctx))

    def close(self) -> None:
        """Ask every worker to stop after its current task and wait for it."""
        if self._closed:
            return
        self._closed = True
        for w in self._workers:
            with contextlib.suppress(Exception):
                w.conn.send(None)
        for w in self._workers:
            w.process.join(timeout=5)
            if w.process.is_alive():
                w.process.kill()
                w.process.join()
            w.conn.close()
        self._workers = []

    def terminate(self) -> None:
        """Stop every worker now (SIGTERM, then SIGKILL after a second) and wait until they are gone."""
        self._closed = True
        for w in self._workers:
            if w.process.is_alive():
                with contextlib.suppress(Exception):
                    w.process.terminate()
        for w in self._workers:
            w.process.join(timeout=1)
            if w.process.is_alive():
                with contextlib.suppress(Exception):
                    w.process.kill()
                w.process.join()
            with contextlib.suppress(Exception):
                w.conn.close()
        self._workers = []

    def __enter__(self) -> "ProcessPool":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None and self._broken is None:
            self.close()
        else:
            self.terminate()

    # -- running tasks ----------------------------------------------------------------------
    def _fn_id(self, fn: Callable) -> tuple[int, bytes]:
        """A new id and the cloudpickled ``fn``: every :meth:`imap` call sends its function afresh."""
        import cloudpickle

        self._next_fn += 1
        return self._next_fn, cloudpickle.dumps(fn)

    def imap(self, fn: Callable, tasks: Sequence[tuple], window: int | None = None
             ) -> Iterator[tuple[int, Any]]:
        """Yield ``(index, fn(*tasks[index]))`` as tasks finish (completion order).

        At most ``window`` tasks (default two per worker) are sent out at a
        time. A task's exception is raised here with the worker's traceback
        as its ``__cause__``; a worker that dies raises :class:`WorkerLost`.
        In both cases, and when the consumer stops early, the pool is broken:
        the caller's ``with`` block terminates it.
        """
        from multiprocessing.connection import wait

        if self._broken is not None:
            raise RuntimeError("the worker pool was stopped by an earlier failure") from self._broken
        self._ensure_started()
        fid, blob = self._fn_id(fn)
        per_worker = max(1, -(-(window or 2 * self.workers) // self.workers))
        todo = deque(enumerate(tasks))
        outstanding = 0
        finished = False
        try:
            while todo or outstanding:
                for w in self._workers:  # keep every worker's queue topped up, lowest index first
                    while todo and len(w.tasks) < per_worker:
                        index, args = todo[0]
                        try:
                            if fid not in w.fns:
                                w.conn.send(("fn", fid, blob))
                                w.fns.add(fid)
                            w.conn.send(("task", fid, index, tuple(args)))
                        except (BrokenPipeError, ConnectionError, EOFError):
                            self._lost(w)
                        todo.popleft()
                        w.tasks.append(index)
                        outstanding += 1
                by_conn = {w.conn: w for w in self._workers}
                by_sentinel = {w.process.sentinel: w for w in self._workers}
                ready = wait(list(by_conn) + list(by_sentinel))
                answered = set()
                for r in ready:
                    if r not in by_conn:
                        continue
                    w = by_conn[r]
                    answered.add(id(w))
                    try:
                        index, ok, payload = w.conn.recv()
                    except (EOFError, OSError):
                        self._lost(w)
                    w.tasks.remove(index)
                    outstanding -= 1
                    if not ok:
                        _reraise(payload)
                    yield index, payload
                for r in ready:   # a worker died: with a task, or idle (it never should)
                    died = by_sentinel.get(r)
                    if died is not None and id(died) not in answered and not died.conn.poll():
                        self._lost(died)
            finished = True
        except BaseException as exc:
            self._broken = exc
            raise
        finally:
            if not finished and self._broken is None:
                self._broken = RuntimeError("the consumer stopped before every task was done")

    def broadcast(self, fn: Callable[[], Any]) -> None:
        """Have every worker call ``fn()`` before its next task, without waiting for it (a warm-up:
        loading what the next tasks need while this process does something else). Nothing comes
        back; an exception is ignored. Needs a worker pool that has no tasks in flight."""
        import cloudpickle

        if self._broken is not None or self._closed:
            return
        self._ensure_started()
        blob = cloudpickle.dumps(fn)
        for w in self._workers:
            try:
                w.conn.send(("call", blob))
            except (BrokenPipeError, ConnectionError, EOFError):
                self._lost(w)

    def _lost(self, w: _Worker) -> None:
        w.process.join(timeout=1)
        code = w.process.exitcode
        if code is not None and code < 0:
            try:
                how = f"was killed by signal {signal.Signals(-code).name}"
            except ValueError:
                how = f"was killed by signal {-code}"
            if -code == signal.SIGKILL:
                how += " (out of memory, or killed by hand?)"
        else:
            how = f"exited with status {code}"
        task = w.tasks[0] if w.tasks else None
        raise WorkerLost(f"worker process {w.process.pid} {how} while running task {task}; "
                         "nothing was kept")


# ------------------------------------------------------------------------------ cluster
def _value(fn: Callable) -> Callable:
    """``fn`` itself: the task that holds a :class:`ClusterExecutor`'s task function on the cluster."""
    return fn


def _call_shared(fn: Callable, batch: Sequence[tuple], combine: Callable[[list], Any] = list) -> Any:
    """``combine([fn(*args) for args in batch])`` on a worker, ``fn`` being the result of the
    :func:`_value` task (:class:`ClusterExecutor`); ``combine`` reduces the batch where it ran."""
    return combine([fn(*args) for args in batch])


#: Environment variable: seconds a cluster may make no progress, every worker paused (or none
#: there), before :class:`ClusterExecutor` gives up with :class:`ClusterStalled`.
STALL_ENV = "ISLE_CLUSTER_STALL_SECONDS"
#: ... its default
STALL_SECONDS = 60.0


class ClusterStalled(OSError):
    """The cluster stopped making progress: every worker paused at its memory limit, or no worker left.

    ``distributed`` pauses a worker whose process memory passes ``distributed.worker.memory.pause``
    (80 % of its ``memory_limit``) and resumes it only once the memory falls again. Memory the worker
    holds outside its task results (library buffers, the allocator's heap) cannot be spilled, so
    such a worker stays paused for good, and with every worker paused nothing ever finishes
    (dask/distributed#5999). An environment failure like :class:`WorkerLost`: one line, exit 1,
    whatever the run was writing removed.
    """


def _stall_seconds() -> float:
    raw = os.environ.get(STALL_ENV, "").strip()
    if not raw:
        return STALL_SECONDS
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        from isle_fast.errors import InputError

        raise InputError(f"{STALL_ENV}={raw!r}: must be a number of seconds above 0")
    return value


def _mib(n: Any) -> str:
    return f"{int(n or 0) / 2**20:.0f} MiB"


class _StallWatch:
    """Notices a cluster on which nothing can run: every worker paused, or none at all, for ``patience`` s.

    At the first look at such a cluster the workers are asked to release the memory they keep
    unused (:func:`_release_memory`): often enough to resume them. Only a stall that outlasts that
    is an error."""

    def __init__(self, client: Any, patience: float):
        import time

        self.client = client
        self.patience = patience
        self._clock = time.monotonic
        self.since: float | None = None

    def progress(self) -> None:
        """A task finished: the cluster is moving."""
        self.since = None

    def check(self) -> None:
        """Called when nothing finished for a while; raises :class:`ClusterStalled` once that has lasted."""
        try:
            workers = self.client.scheduler_info(n_workers=-1).get("workers", {})
        except TypeError:  # an older distributed
            workers = self.client.scheduler_info().get("workers", {})
        stuck = not workers or all(w.get("status") in ("paused", "closing_gracefully") for w in workers.values())
        if not stuck:
            self.since = None
            return
        now = self._clock()
        if self.since is None:
            self.since = now
            with contextlib.suppress(Exception):  # the first look at a stall: free what can be freed
                self.client.run(_release_memory)
            return
        if now - self.since < self.patience:
            return
        if not workers:
            raise ClusterStalled(
                f"the cluster made no progress for {now - self.since:.0f} s: it has no worker left "
                "(workers that die while holding a task are restarted by their nanny; none came back); "
                "nothing was kept")
        parts = []
        for addr, w in sorted(workers.items()):
            mem = (w.get("metrics") or {}).get("memory")
            parts.append(f"{addr} at {_mib(mem)} of its {_mib(w.get('memory_limit'))} limit")
        raise ClusterStalled(
            f"the cluster made no progress for {now - self.since:.0f} s: every worker is paused at its "
            f"memory limit ({'; '.join(parts)}; distributed pauses a worker at "
            "distributed.worker.memory.pause, 80 % of memory_limit, and memory it cannot spill keeps it "
            "paused); give the workers a larger memory_limit or fewer threads each, or use smaller chunks "
            "(isle ingest --chunk-images); nothing was kept")


def _release_memory() -> None:
    """On a worker: give back what this process keeps but does not use (the chunk buffers its
    threads keep, ``gc``, glibc's ``malloc_trim``), so that a worker paused by memory no task
    holds can resume."""
    import ctypes
    import gc

    from isle_fast.stores.chunkio import release_thread_buffers

    release_thread_buffers()
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _lost_on_cluster(exc: BaseException, first: int, size: int) -> WorkerLost:
    """distributed's ``KilledWorker`` (the task's worker died ``allowed-failures`` times) as a :class:`WorkerLost`."""
    return WorkerLost(
        f"tasks {first}..{first + size - 1} were on a cluster worker that died each time it ran them "
        f"({exc}); a worker whose memory passes distributed.worker.memory.terminate (95 % of memory_limit) "
        "is killed by its nanny: give the workers a larger memory_limit or fewer threads each, or use "
        "smaller chunks (isle ingest --chunk-images); nothing was kept")


class ClusterExecutor:
    """Tasks on the workers of a ``dask.distributed`` client (they must share the file system).

    What a task costs besides its work (the client's submit, the scheduler's bookkeeping, a round
    trip; milliseconds, paid on the same cores on a small machine) is kept small: ``fn`` is sent to
    the cluster once (a task of its own), not inside every task, and consecutive tasks go together in one
    cluster task (:meth:`batch_size`), while leaving every worker many to balance the load. The tasks
    of a batch run one after the other in one worker thread, so a batch holds no more memory while it
    runs than one task does, besides the results (:meth:`imap_batches` reduces those where they ran).

    The executor never waits silently for a cluster that cannot move: when no task finishes and every
    worker is paused at its memory limit (or no worker is left) for ``ISLE_CLUSTER_STALL_SECONDS``
    (default 60), it cancels its tasks and raises :class:`ClusterStalled`; a task whose worker died
    each time it ran it (distributed's ``KilledWorker``) raises :class:`WorkerLost`. Both name the
    cause and what to change.
    """

    #: a cluster task holds at most this many of the caller's tasks
    MAX_BATCH = 8
    #: ... and the cluster tasks are at least this many per worker thread (for balance at the end)
    MIN_PER_WORKER = 16
    #: seconds between looks at the workers while no task finishes
    POLL_SECONDS = 1.0

    def __init__(self, client: Any):
        self.client = client
        try:
            self.workers = max(1, sum(client.nthreads().values()))
        except Exception:
            self.workers = 1

    def batch_size(self, n_tasks: int) -> int:
        """The caller's tasks per cluster task for ``n_tasks`` tasks (1 to :attr:`MAX_BATCH`)."""
        return max(1, min(self.MAX_BATCH, n_tasks // (self.workers * self.MIN_PER_WORKER)))

    def imap(self, fn: Callable, tasks: Sequence[tuple], window: int | None = None
             ) -> Iterator[tuple[int, Any]]:
        """Yield ``(index, result)`` as tasks finish; at most ``window`` cluster tasks (each of
        :meth:`batch_size` tasks) submitted at a time."""
        for indices, results in self.imap_batches(fn, tasks, list, window):
            yield from zip(indices, results)

    def imap_batches(self, fn: Callable, tasks: Sequence[tuple], combine: Callable[[list], Any],
                     window: int | None = None) -> Iterator[tuple[range, Any]]:
        """Yield ``(indices, combine([fn(*tasks[i]) for i in indices]))`` as cluster tasks finish.

        ``combine`` runs on the worker, over the results of one cluster task's batch (consecutive
        indices, :meth:`batch_size` of them), so what comes back is what it returns: a sum of the
        batch instead of one table per task. Stalls and lost workers raise as the class says.
        """
        from distributed import KilledWorker, wait

        tasks = list(tasks)
        if not tasks:
            return
        window = max(1, window or 2 * self.workers)
        size = self.batch_size(len(tasks))
        batches = iter(range(0, len(tasks), size))
        first_of: dict[Any, int] = {}
        watch = _StallWatch(self.client, _stall_seconds())
        # ``fn`` (often a partial holding the stores' chunk specs, with their manifests) goes to the
        # cluster once, as the result of a task of its own: every worker fetches it once, each task
        # carries only its own arguments and that key, and a lost copy is recomputed from the task
        shared = self.client.submit(_value, fn, pure=False)

        def submit() -> None:
            s = next(batches, None)
            if s is not None:
                first_of[self.client.submit(_call_shared, shared, tasks[s:s + size], combine, pure=False)] = s

        for _ in range(window):
            submit()
        try:
            while first_of:
                try:
                    done, _ = wait(list(first_of), timeout=self.POLL_SECONDS, return_when="FIRST_COMPLETED")
                except TimeoutError:
                    watch.check()
                    continue
                watch.progress()
                for fut in sorted(done, key=first_of.__getitem__):
                    s = first_of[fut]
                    try:
                        result = fut.result()
                    except KilledWorker as exc:
                        raise _lost_on_cluster(exc, s, min(size, len(tasks) - s)) from exc
                    del first_of[fut]
                    submit()
                    yield range(s, min(s + size, len(tasks))), result
        finally:
            self.client.cancel(list(first_of) + [shared])

    def close(self) -> None:
        """The cluster is the caller's; nothing to stop."""

    terminate = close

    def __enter__(self) -> "ClusterExecutor":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


def imap_combined(ex: Any, fn: Callable, tasks: Sequence[tuple], combine: Callable[[list], Any],
                  window: int | None = None) -> Iterator[tuple[range, Any]]:
    """``(indices, combine([fn(*tasks[i]) for i in indices]))`` from any executor, as tasks finish.

    On a :class:`ClusterExecutor` ``combine`` runs on the workers over each cluster task's batch
    (:meth:`ClusterExecutor.imap_batches`: what comes back is the reduced batch); elsewhere
    nothing is sent, and every task's result is combined alone, here.
    """
    if isinstance(ex, ClusterExecutor):
        yield from ex.imap_batches(fn, tasks, combine, window)
        return
    for i, result in ex.imap(fn, tasks, window):
        yield range(i, i + 1), combine([result])


# ------------------------------------------------------------------------------ choosing
_ACTIVE: list[ProcessPool] = []


@contextlib.contextmanager
def use_pool(pool: ProcessPool) -> Iterator[ProcessPool]:
    """Make ``pool`` the one :func:`executor_for` hands out inside the block (``isle run``)."""
    _ACTIVE.append(pool)
    try:
        yield pool
    finally:
        _ACTIVE.remove(pool)


def active_pool() -> ProcessPool | None:
    """The pool made active by :func:`use_pool`, if any."""
    return _ACTIVE[-1] if _ACTIVE else None


def _current_client() -> Any:
    """The active ``dask.distributed`` client, without importing distributed when nobody did."""
    if "distributed" not in sys.modules:
        return None
    try:
        from distributed import get_client

        return get_client()
    except (ImportError, ValueError):
        return None


@contextlib.contextmanager
def executor_for(n_tasks: int, workers: int | None = None, *, in_memory: bool = False) -> Iterator[Any]:
    """The executor for ``n_tasks`` chunk tasks (see the module docstring), closed after the block.

    Parameters
    ----------
    n_tasks : int
        How many tasks will run.
    workers : int, optional
        Worker processes (threads for ``in_memory``); default one per core.
    in_memory : bool
        The tasks read in-memory arrays of this process: threads, never processes.
    """
    n = int(workers) if workers is not None else default_workers()
    if in_memory:
        if n <= 1 or n_tasks <= 1:
            yield InlineExecutor()
            return
        with ThreadExecutor(min(n, n_tasks)) as ex:
            yield ex
        return
    pool = active_pool()
    if pool is not None:
        try:
            yield pool      # its owner closes it; after a failure nothing it runs may go on writing
        except BaseException:
            pool.terminate()
            raise
        return
    client = _current_client()
    if client is not None:
        yield ClusterExecutor(client)
        return
    if n <= 1 or n_tasks <= 1:
        yield InlineExecutor()
        return
    with ProcessPool(min(n, n_tasks)) as p:
        yield p


# ------------------------------------------------------------------------------ ingest tasks
def _header_batch(header: Callable, items: Sequence[Any]) -> list[tuple[Any, str | None]]:
    """``header(item)`` -> ``(value, error or None)`` for a batch of items (one task)."""
    return [header(it) for it in items]


def read_headers(header: Callable, items: Sequence[Any], *, workers: int | None = None,
                 in_memory: bool = False, batch: int = 256, desc: str = "headers",
                 quiet: bool = False) -> list[tuple[Any, str | None]]:
    """``header(item)`` for every item, in item order, in batches of ``batch`` items per task.

    ``header`` returns ``(value, error)`` and never raises for a bad file (the
    caller decides what a bad header means).
    """
    from functools import partial

    from isle_fast.progress import progress

    tasks = [(list(items[s:s + batch]),) for s in range(0, len(items), batch)]
    out: list[Any] = [None] * len(tasks)
    with executor_for(len(tasks), workers, in_memory=in_memory) as ex, \
            progress(total=len(items), desc=desc, unit="img", quiet=quiet) as bar:
        for i, res in ex.imap(partial(_header_batch, header), tasks):
            out[i] = res
            bar.update(len(res))
    return [r for part in out for r in part]


def _ingest_chunk(read: Callable, spec: Any, skip_bad: bool, start: int, items: Sequence[Any],
                  shapes: Sequence[tuple[int, int]]) -> tuple[list[tuple[int, str]], int]:
    """One task: decode the images of one chunk, validate them and write the chunk.

    ``read(item, (h, w))`` returns ``(array, None)`` or ``(None, reason)``.
    Returns ``(bad, pixels)``: ``bad`` lists ``(offset in the chunk, reason)``.
    A bad image leaves the fill value in its place (``skip_bad``: the caller
    compacts the store afterwards); without ``skip_bad`` the chunk is not
    written at all (the run fails).
    """
    from isle_fast.stores.chunkio import thread_buffer, write_block

    k = int(spec.chunk_shape[0])
    m = min(k, int(spec.shape[0]) - start)
    # kept by this worker from chunk to chunk (a fresh block page-faults in every page of it); every
    # pixel is written below: the image, the padding around it, or all fill for a bad image
    block = thread_buffer("ingest", (m,) + tuple(spec.shape[1:]), spec.dtype)
    fill = spec.fill_value
    bad: list[tuple[int, str]] = []
    pixels = 0
    for j, (it, hw) in enumerate(zip(items, shapes)):
        data, err = read(it, hw)
        if err is not None:
            bad.append((j, err))
            if not skip_bad:
                return bad, pixels
            block[j] = fill
            continue
        h, w = hw
        block[j, :h, :w] = data
        block[j, :h, w:] = fill
        block[j, h:] = fill
        pixels += h * w
    block[len(items):] = fill
    write_block(spec, start, block)
    return bad, pixels


def ingest_chunks(read: Callable, items: Sequence[Any], shapes: Sequence[tuple[int, int]], spec: Any, *,
                  skip_bad: bool, failure: Callable[[list[tuple[int, str]]], BaseException],
                  workers: int | None = None, in_memory: bool = False, desc: str = "ingest",
                  quiet: bool = False) -> tuple[list[tuple[int, str]], int]:
    """Decode ``items`` into the array described by ``spec``, one task per chunk, and write it.

    Parameters
    ----------
    read : callable
        ``read(item, (h, w)) -> (array | None, reason | None)``; picklable with
        cloudpickle for worker processes.
    items, shapes : sequences
        What to read and the ``(h, w)`` each image must have; item ``p`` goes
        to position ``p`` of the array.
    spec : ChunkWriteSpec
        The array's chunk layout and codecs (:func:`isle_fast.stores.chunkio.write_spec`).
    skip_bad : bool
        Keep going past bad images (their positions hold the fill value).
    failure : callable
        Without ``skip_bad``: called with ``[(position, reason)]`` of the first
        bad image (lowest position among the chunks finished so far and every
        chunk before it, so the same image is named as a sequential run would
        name) and the exception it returns is raised, once the workers are
        stopped.
    workers, in_memory :
        See :func:`executor_for`.

    Returns
    -------
    (bad, pixels)
        ``bad``: ``[(position, reason)]`` in position order; ``pixels``: of the
        images written.
    """
    from functools import partial

    from isle_fast.progress import progress
    from isle_fast.stores.chunkio import prepare_root

    k = int(spec.chunk_shape[0])
    n = len(items)
    starts = list(range(0, n, k))
    tasks = [(s, list(items[s:s + k]), [tuple(int(v) for v in hw) for hw in shapes[s:s + k]]) for s in starts]
    prepare_root(spec)      # the tasks make their chunks' folders below it
    bad: list[tuple[int, str]] = []
    pixels = 0
    first_bad_task: int | None = None
    done: set[int] = set()
    fn = partial(_ingest_chunk, read, spec, skip_bad)
    with executor_for(len(tasks), workers, in_memory=in_memory) as ex, \
            progress(total=n, desc=desc, unit="img", quiet=quiet) as bar:
        for i, (task_bad, px) in ex.imap(fn, tasks):
            done.add(i)
            bar.update(len(tasks[i][1]))
            pixels += px
            bad.extend((starts[i] + off, reason) for off, reason in task_bad)
            if task_bad and not skip_bad:
                first_bad_task = i if first_bad_task is None else min(first_bad_task, i)
            if first_bad_task is not None and all(j in done for j in range(first_bad_task)):
                raise failure([min(bad)])
    bad.sort()
    return bad, pixels


def compact(array: Any, keep: Sequence[int], chunk_images: int) -> None:
    """Move the images at positions ``keep`` (increasing) to positions ``0 .. len(keep)-1`` in place.

    Used after ``skip_bad`` left holes. Destination chunks are written in
    increasing order and every image moves to a lower (or the same) position,
    so a source chunk is always read before it is overwritten.
    """
    import numpy as np

    keep = [int(p) for p in keep]
    if keep == list(range(len(keep))):
        return
    k = int(chunk_images)
    cache: dict[int, np.ndarray] = {}

    def image(p: int) -> np.ndarray:
        c = p // k
        if c not in cache:
            for old in [o for o in cache if o < c]:
                del cache[old]
            cache[c] = np.asarray(array[c * k:min((c + 1) * k, array.shape[0])])
        return cache[c][p - c * k]

    first = next(d for d, p in enumerate(keep) if p != d)
    for d0 in range(first // k * k, len(keep), k):
        d1 = min(d0 + k, len(keep))
        block = np.stack([image(keep[d]) for d in range(d0, d1)])
        array[d0:d1] = block
