"""Running the ``isle`` commands on an existing ``dask.distributed`` cluster.

Every command that does array work takes ``--scheduler ADDRESS`` (one
definition: :func:`add_scheduler_argument`). Without it, Dask's own
configuration is honoured: the ``DASK_SCHEDULER_ADDRESS`` environment variable
or the ``scheduler-address`` key of Dask's YAML configuration files, so a
cluster started by hand (``dask scheduler`` + ``dask worker``), by
dask-jobqueue or by dask-kubernetes is found the way Dask itself finds it.

With an address, :func:`connected` opens a :class:`distributed.Client` (the
default client while the command runs). The local fast paths step aside when
a client is active (:func:`isle_fast.ensemble.graph.dask_requested`,
:func:`isle_fast.stores.parallel.executor_for`): evaluate / merge / report run
as Dask graphs on the workers, ingest / export submit one task per chunk (the
worker decodes and writes its chunk itself; the client only plans and, once
every chunk has succeeded, commits the store), refine runs its blocks there.
Progress bars count the cluster's finished tasks
(:func:`cluster_get`, used by :func:`isle_fast.progress.dask_progress`) and the
summary names the scheduler and its workers (:func:`summary_row`).

Without an address nothing changes, and ``distributed`` is never imported: this
module imports it only inside :func:`connected`.

The workers must read the inputs and write the outputs at the same paths as the
client: a shared file system (paths are made absolute before they are sent) or
URLs (``s3://...``).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from isle_fast.errors import InputError

__all__ = [
    "SCHEDULER_ENV",
    "TIMEOUT_ENV",
    "add_scheduler_argument",
    "scheduler_address",
    "address_origin",
    "connected",
    "current_client",
    "describe_cluster",
    "summary_row",
    "cluster_get",
]

#: Dask's environment variable for the scheduler address (config key ``scheduler-address``).
SCHEDULER_ENV = "DASK_SCHEDULER_ADDRESS"
#: Seconds to wait for the scheduler before giving up (default 10).
TIMEOUT_ENV = "ISLE_SCHEDULER_TIMEOUT"

_STATE: dict[str, Any] = {}


def add_scheduler_argument(parser: argparse.ArgumentParser, *, local: Sequence[str] = ()) -> None:
    """Add ``--scheduler ADDRESS`` to ``parser`` (and to every leaf of its subcommands).

    Parameters
    ----------
    parser : argparse.ArgumentParser
        A command's parser; when it has subcommands (``isle ingest labels``), each
        of them gets the option.
    local : sequence of str
        Names of local schedulers the command also accepts in place of an address
        (``isle refine``: ``auto``, ``threads``, ``processes``, ``sync``); the first
        is what the command uses when no scheduler is found.
    """
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if subs:
        for sub in subs:
            for p in dict.fromkeys(sub.choices.values()):
                add_scheduler_argument(p, local=local)
        return
    names = f" or one of {', '.join(local)} (local; default {local[0]})" if local else ""
    parser.add_argument(
        "--scheduler", metavar="ADDRESS", default=None,
        help=f"run on this dask.distributed scheduler (e.g. tcp://10.0.0.5:8786){names}; default: "
             f"${SCHEDULER_ENV} or Dask's 'scheduler-address' config, else this machine. The workers "
             "must see the same paths (a shared file system) or URLs")


def _dask_config_files() -> bool:
    """Whether any of Dask's YAML configuration locations exists (then Dask's config is read)."""
    roots = [os.environ.get("DASK_CONFIG") or str(Path("~/.config/dask").expanduser()),
             os.path.join(sys.prefix, "etc", "dask"), os.environ.get("DASK_ROOT_CONFIG") or "/etc/dask"]
    return any(os.path.isdir(r) and any(f.endswith((".yaml", ".yml")) for f in os.listdir(r))
               for r in roots if r)


def scheduler_address(given: str | None = None, *, local: Sequence[str] = ()) -> str | None:
    """The scheduler to connect to, or None to run on this machine.

    ``given`` (``--scheduler``) wins; a name in ``local`` means "this machine". Else
    ``$DASK_SCHEDULER_ADDRESS``, else the ``scheduler-address`` key of Dask's
    configuration files (read only when such a file exists, so a run without one
    never imports Dask here).
    """
    if given:
        return None if given in local else given
    env = os.environ.get(SCHEDULER_ENV, "").strip()
    if env:
        return env
    if "dask" in sys.modules or _dask_config_files():
        import dask.config

        value = dask.config.get("scheduler-address", None)
        return str(value) if value else None
    return None


def address_origin(given: str | None, *, local: Sequence[str] = ()) -> str:
    """Where :func:`scheduler_address` found its answer, for messages."""
    if given and given not in local:
        return "--scheduler"
    if os.environ.get(SCHEDULER_ENV, "").strip():
        return f"${SCHEDULER_ENV}"
    return "Dask's scheduler-address config"


def _timeout() -> float:
    text = os.environ.get(TIMEOUT_ENV, "10")
    try:
        value = float(text)
    except ValueError:
        raise InputError(f"${TIMEOUT_ENV} must be a number of seconds, not {text!r}") from None
    if not value > 0:
        raise InputError(f"${TIMEOUT_ENV} must be positive, not {text!r}")
    return value


@contextlib.contextmanager
def connected(address: str | None, *, timeout: float | None = None, origin: str = "--scheduler") -> Iterator[Any]:
    """A ``distributed.Client`` on ``address``, the default client inside the block; closed after it.

    Yields None (and imports nothing) when ``address`` is None. ``origin`` names where the address
    came from in messages (``--scheduler``, ``$DASK_SCHEDULER_ADDRESS``, ...).

    Raises
    ------
    InputError
        The scheduler cannot be reached within ``timeout`` seconds (default
        ``$ISLE_SCHEDULER_TIMEOUT``, 10), or the address is malformed; one line
        naming the address.
    """
    if not address:
        yield None
        return
    timeout = _timeout() if timeout is None else float(timeout)
    from distributed import Client

    quiet = [logging.getLogger(n) for n in ("distributed", "distributed.client", "distributed.core",
                                            "distributed.comm")]
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(logging.CRITICAL)   # a refused connection is logged before it is raised
    try:
        client = Client(address, timeout=timeout, set_as_default=True)
    except (OSError, TimeoutError, ValueError, TypeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"{origin} {address}: cannot connect to a dask scheduler there within "
                         f"{timeout:g} s ({reason})") from None
    finally:
        for lg, lv in zip(quiet, levels):
            lg.setLevel(lv)
    _STATE["client"] = client
    _STATE["address"] = address
    try:
        yield client
    finally:
        _STATE.clear()
        for lg in quiet:
            lg.setLevel(logging.CRITICAL)   # closing may log a worker's lost connection
        try:
            client.close(timeout=timeout)
        except Exception:  # noqa: BLE001 - the work is done; a slow close is not the user's problem
            pass
        finally:
            for lg, lv in zip(quiet, levels):
                lg.setLevel(lv)


def current_client() -> Any:
    """The client :func:`connected` opened, else the active ``distributed`` client, else None.

    Never imports ``distributed``.
    """
    if "client" in _STATE:
        return _STATE["client"]
    from isle_fast.stores.parallel import _current_client

    return _current_client()


def describe_cluster(client: Any) -> str:
    """``'tcp://10.0.0.5:8786 (2 workers, 4 threads)'`` for a client."""
    try:
        info = client.scheduler_info()
        workers = info.get("workers", {})
        threads = sum(int(w.get("nthreads", 0)) for w in workers.values())
        address = info.get("address") or client.scheduler.address
    except Exception:  # noqa: BLE001 - a summary line never fails the command
        return str(getattr(getattr(client, "scheduler", None), "address", "?"))
    return (f"{address} ({len(workers)} worker{'s' if len(workers) != 1 else ''}, "
            f"{threads} thread{'s' if threads != 1 else ''})")


def summary_row() -> dict[str, str]:
    """``{'cluster': ...}`` while a command runs on a cluster (:func:`connected`), else ``{}``."""
    client = _STATE.get("client")
    return {} if client is None else {"cluster": describe_cluster(client)}


def cluster_get(client: Any, bar: Any) -> Callable:
    """A Dask ``scheduler=`` function that runs a graph on ``client`` and advances ``bar``.

    The bar's total is the number of tasks the scheduler runs for the
    computation and it moves as the cluster finishes them (the scheduler's own
    progress plugin, the one ``distributed.progress`` uses), so a lost worker's
    re-run tasks show as work still to do.
    """
    from distributed import futures_of
    from distributed.diagnostics.progressbar import TextProgressBar

    class _Bar(TextProgressBar):
        base_total = 0   # what the bar showed before this computation (several run in one block)
        base_n = 0

        def _draw_bar(self, remaining: int, all: int, **kwargs: Any) -> None:  # noqa: A002
            bar.total = self.base_total + int(all)
            bar.n = self.base_n + int(all) - int(remaining)
            bar.refresh()

        def _draw_stop(self, **kwargs: Any) -> None:
            pass

    def get(dsk: Any, keys: Any, **kwargs: Any) -> Any:
        futures = client.get(dsk, keys, sync=False, **kwargs)
        if bar is not None and not bar.disable:
            p = _Bar(futures_of(futures), scheduler=client.scheduler.address, loop=client.loop, start=False)
            p.base_total, p.base_n = bar.total or 0, bar.n
            p._loop_runner.run_sync(p.listen)
        return client.gather(futures)

    return get
