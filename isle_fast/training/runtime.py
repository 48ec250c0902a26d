"""The torch runtime shared by training and prediction: devices, CPU threads, checkpoints.

* :func:`resolve_device` and :func:`amp_dtype`: where a model runs and the dtype of
  mixed precision there.
* :func:`resolve_threads`, :class:`ThreadGovernor`, :class:`torch_threads`: torch's CPU
  thread count, chosen from the cores other processes leave idle (and followed as the
  machine's load changes), restored afterwards.
* the checkpoint format: :data:`CHECKPOINT_FORMAT`, :func:`write_checkpoint`,
  :func:`load_checkpoint`, :func:`checkpoint_path`. A checkpoint is a dict of tensors and
  plain Python types tagged with the format, so it loads with
  ``torch.load(..., weights_only=True)`` (no code runs on load).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import IO, Any

import torch

from isle_fast.errors import InputError, param

__all__ = [
    "CHECKPOINT_FORMAT",
    "resolve_device",
    "amp_dtype",
    "busy_cores",
    "resolve_threads",
    "ThreadGovernor",
    "torch_threads",
    "write_checkpoint",
    "load_checkpoint",
    "checkpoint_path",
]

#: The ``format`` entry of every checkpoint this project writes.
CHECKPOINT_FORMAT = "isle-fast-deeplab"


# -- devices --------------------------------------------------------------------------
def resolve_device(device: str | None = "auto", name: str = param("device")) -> torch.device:
    """The torch device for ``device``: ``auto`` (or None / empty) is CUDA when available, else CPU.

    Parameters
    ----------
    device : str, optional
        ``auto``, ``cpu`` or ``cuda[:N]``.
    name : str
        The setting's name in error messages (``affinity.device`` for the AffinityNet step).

    Raises
    ------
    InputError
        An unknown device, or ``cuda`` where torch sees no CUDA device.
    """
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"{name} must be auto, cpu or cuda[:N], not {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"{name} {device}: torch sees no CUDA device here (use cpu)")
    return dev


def amp_dtype(device_type: str) -> torch.dtype:
    """Autocast dtype of mixed precision: float16 on CUDA (with a GradScaler in training), bfloat16 on CPU.

    bfloat16 has float32's exponent range, so CPU training needs no loss scaling; it
    is only faster on CPUs with native bfloat16 instructions (AVX-512 BF16 / AMX).
    """
    return torch.float16 if device_type == "cuda" else torch.bfloat16


# -- CPU threads ----------------------------------------------------------------------
def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _cpu_times() -> tuple[int, int] | None:
    """(total, idle + iowait) jiffies of all CPUs from ``/proc/stat``; None where it cannot be read."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return sum(vals[:8]), vals[3] + (vals[4] if len(vals) > 4 else 0)


class _LoadWindow:
    """Cores busy with *other* processes between two points in time (see :func:`busy_cores`)."""

    def __init__(self) -> None:
        import time

        self.start = (_cpu_times(), time.process_time(), time.perf_counter())

    def others(self) -> float | None:
        import time

        (a, own0, t0), b = self.start, _cpu_times()
        own1, t1 = time.process_time(), time.perf_counter()
        if a is None or b is None or b[0] - a[0] <= 0 or t1 <= t0:
            return None
        total, idle = b[0] - a[0], b[1] - a[1]
        busy = (total - idle) / total * (os.cpu_count() or 1)  # cores busy, all processes
        return max(0.0, busy - (own1 - own0) / (t1 - t0))


def busy_cores(seconds: float = 0.2) -> float | None:
    """Cores kept busy by *other* processes over ``seconds`` (Linux ``/proc/stat``), None elsewhere.

    The machine-wide busy time minus this process's own CPU time, in cores.
    """
    import time

    w = _LoadWindow()
    time.sleep(seconds)
    return w.others()


def _free_cores(others: float, limit: int) -> int:
    """Threads for the cores others leave idle: usable cores minus busy ones (a quarter core is noise)."""
    return max(1, min(limit, _usable_cores() - int(math.ceil(others - 0.25))))


class ThreadGovernor:
    """Re-chooses torch's CPU thread count while a long job runs, as the machine's load changes.

    :func:`resolve_threads` looks at the load once; on a shared machine other
    jobs come and go during a training run. :meth:`update` (call it between
    steps; cheap) measures, every ``period`` seconds, the cores other
    processes kept busy since the last look and sets ``torch.set_num_threads``
    to the cores left idle (at most ``limit``). Disabled (never changes
    anything) when ``enabled`` is False: an explicit ``threads``, a
    deterministic run (the thread count can change results in the last bits),
    or a device other than the CPU.
    """

    def __init__(self, enabled: bool, limit: int, period: float = 5.0):
        self.enabled = bool(enabled) and _cpu_times() is not None
        self.limit = max(1, int(limit))
        self.period = float(period)
        self.changes = 0
        self._window = _LoadWindow()

    def update(self) -> int:
        """The current thread count, changed first if the last ``period`` seconds call for it."""
        import time

        current = torch.get_num_threads()
        if not self.enabled or time.perf_counter() - self._window.start[2] < self.period:
            return current
        others = self._window.others()
        self._window = _LoadWindow()
        if others is None:
            return current
        want = _free_cores(others, self.limit)
        if want != current:
            torch.set_num_threads(want)
            self.changes += 1
        return want


def resolve_threads(threads: int | None, device: torch.device, deterministic: bool = False) -> int:
    """Intra-op threads for CPU work: ``threads`` if given, else one per core *not busy elsewhere*.

    Why: torch's CPU kernels split every operation over ``torch.get_num_threads()``
    OpenMP threads (by default one per core) and wait at a barrier for all of
    them. On a machine where other processes keep cores busy, one of those
    threads is often descheduled, and every operation waits for it (a training
    step gets several times *slower* with a thread per core than with one; the
    README's benchmark section and ``benchmarks/results/train.json`` hold the
    figures). So the automatic choice is the number of usable
    cores minus the cores other processes kept busy over 0.2 s
    (:func:`busy_cores`, rounded up), at least 1; training re-checks it every
    few seconds (:class:`ThreadGovernor`). With ``deterministic`` (or
    where the load cannot be read, or on CUDA) it is torch's current setting:
    results may differ in the last bits with the thread count, so a load-based
    choice would make reruns differ.
    """
    if threads is not None:
        if int(threads) < 1:
            raise InputError(f"{param('threads')} must be at least 1, not {threads}")
        return int(threads)
    current = torch.get_num_threads()
    if device.type != "cpu" or deterministic:
        return current
    busy = busy_cores()
    if busy is None:
        return current
    return _free_cores(busy, current)


class torch_threads:
    """Context manager: ``torch.set_num_threads(n)`` inside, the previous count restored after."""

    def __init__(self, n: int):
        self.n = int(n)

    def __enter__(self) -> int:
        self.old = torch.get_num_threads()
        if self.n != self.old:
            torch.set_num_threads(self.n)
        return self.n

    def __exit__(self, *exc) -> None:
        if torch.get_num_threads() != self.old:
            torch.set_num_threads(self.old)


# -- checkpoints ----------------------------------------------------------------------
def write_checkpoint(checkpoint: dict, f: str | os.PathLike | IO[bytes]) -> None:
    """Write ``checkpoint`` (tensors and plain Python types) tagged with :data:`CHECKPOINT_FORMAT`.

    ``f`` is a path or a binary file; the caller makes the write atomic (a temporary
    sibling renamed into place).
    """
    torch.save({**checkpoint, "format": CHECKPOINT_FORMAT}, f)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint written by :func:`write_checkpoint`, loaded with ``weights_only=True`` on the CPU.

    Raises
    ------
    InputError
        The file cannot be read, or is not an isle-fast checkpoint (both name the file).
    """
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"could not read checkpoint {path}: {exc}") from None
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"{path} is not an isle-fast DeepLabV3+ checkpoint")
    return ck


def checkpoint_path(run: str | os.PathLike, which: str = "best") -> Path:
    """The checkpoint file of a run folder (``best`` falls back to ``final`` then ``last``) or a file."""
    p = Path(run)
    if p.is_file():
        return p
    if not p.is_dir():
        raise InputError(f"run {p} does not exist (give the folder `isle train --out` wrote, or a .pt file)")
    order = {
        "best": ("best.pt", "final.pt", "last.pt"),
        "final": ("final.pt", "last.pt"),
        "last": ("last.pt",),
    }.get(which)
    if order is None:
        raise InputError(f"{param('which')} must be best, final or last, not {which!r}")
    for name in order:
        if (p / name).is_file():
            return p / name
    raise InputError(f"run {p} holds no checkpoint ({', '.join(order)}); did training finish a step?")
