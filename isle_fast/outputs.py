"""Outputs: the one home for writing results, and for what a result may replace.

Every file and folder that isle-fast writes goes through this module.

Atomic writes
-------------
:func:`write_text`, :func:`write_json`, :func:`write_bytes` and :func:`write_file` (any writer
that takes a path: ``torch.save``, ``fig.savefig``) write to a temporary sibling and rename it into
place, so a reader sees the old file or the new one, never half of one. ``durable=True`` also
fsyncs the file and its folder (checkpoints: a resume after a power cut needs them whole).
:class:`FolderOutput` builds a folder (an export, a report, PNG predictions, a data set) in a
temporary sibling, marks it as the project's own (:data:`MARKER`) and renames it into place;
:func:`commit_dir` is that last step, shared with the store commit
(:meth:`isle_fast.stores.stack.StackWriter.commit`).

What an output may replace
--------------------------
:func:`check_output` runs before any work:

* an existing output is replaced only with ``overwrite`` (``--overwrite``), and only when the
  project wrote it (:func:`owned`): a stack store (its ``zarr.json`` attributes carry
  ``isle_format``), a folder holding :data:`MARKER` (or an empty folder), or a JSON file
  carrying the key :data:`JSON_KEY`. A folder of someone's files, or a file isle-fast did not
  write, is refused even with ``--overwrite``;
* never an input of the same command, an output inside an input folder, or an output folder
  that holds an input (paths compared after resolving symbolic links, ``.``, ``..``);
* never ``/``, the home folder, the working directory or a folder above it.

``--json FILE`` (:func:`check_json_output`) follows the same rules, with one difference a
careful user expects: re-running ``isle evaluate ... --json scores.json`` replaces the JSON an
earlier isle command wrote there (it carries :data:`JSON_KEY`) without ``--overwrite``, because
``evaluate`` has no such flag; any other existing file, a folder, and any file inside a store or
an input are refused.

Leftovers
---------
Temporaries are named ``<name>.tmp-<host>-<pid>-<random>`` (a replaced output, until it is
deleted: ``<name>.old-<host>-<pid>-<random>``), so a later run can tell whose they are.
:func:`check_output` removes the temporaries of the same output whose process is gone (same host,
pid no longer running), and names those it cannot judge (another host, an older naming) in a
warning; :func:`commit_dir` removes stale ``.old-`` siblings once the new output is in place.
:func:`leftover_note` is the text ``open_stack`` adds when a store is missing but a temporary of
it lies beside it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from isle_fast.errors import InputError, StoreError, param

__all__ = [
    "MARKER",
    "JSON_KEY",
    "Leftover",
    "owner_tag",
    "owner_state",
    "AllOrNothing",
    "FolderOutput",
    "final_path",
    "temp_path",
    "leftovers",
    "clean_stale",
    "leftover_note",
    "owned",
    "is_project_store",
    "refuse_unsafe",
    "check_replaceable_folder",
    "check_output",
    "check_json_output",
    "write_file",
    "write_text",
    "write_bytes",
    "write_json",
    "write_marker",
    "commit_dir",
    "remove_path",
]

#: The file that marks a folder as written by isle-fast (``--overwrite`` may replace it).
MARKER = ".isle-output.json"
#: The top-level key that marks a JSON file as written by isle-fast.
JSON_KEY = "isle_output"
#: Older markers of project folders that still count: the demo's.
_LEGACY_MARKERS = (".isle-demo",)

log = logging.getLogger("isle_fast")


# =========================================================================== paths and names
def _is_remote(path: str | os.PathLike) -> bool:
    s = str(path)
    return "://" in s and not s.startswith("file://")


def _local(path: str | os.PathLike) -> str:
    s = os.fspath(path)
    return s[len("file://"):] if s.startswith("file://") else s


def final_path(path: str | os.PathLike) -> Path:
    """Where a local output really goes: absolute, ``~`` expanded, symbolic links resolved.

    An output given as a link (``ens.zarr -> /big/ens.zarr``) is written beside the link's
    target and replaces it; the link stays.
    """
    return Path(os.path.realpath(os.path.abspath(os.path.expanduser(_local(path)))))


def _host() -> str:
    name = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname() or "host")
    return name[:40] or "host"


def temp_path(final: str | os.PathLike, tag: str = "tmp") -> Path:
    """A fresh sibling ``<name>.<tag>-<host>-<pid>-<random>`` of ``final`` (``tag``: ``tmp`` or ``old``)."""
    final = Path(final)
    return final.with_name(f"{final.name}.{tag}-{owner_tag()}-{uuid.uuid4().hex[:8]}")


_OWNER = re.compile(r"^(?P<host>.+)-(?P<pid>\d+)-(?P<rand>[0-9a-f]{8})$")
#: the suffixes of older versions' temporaries: a random hex, a pid, pid-nanoseconds (maybe ``.png``)
_LEGACY = re.compile(r"^([0-9a-f]{8}|[0-9a-f]{12}|\d+|\d+-\d+)(\.png)?$")


@dataclass(frozen=True)
class Leftover:
    """A temporary (``tmp``) or replaced (``old``) sibling of an output."""

    path: Path
    tag: str
    host: str | None          # None: an older naming that does not record its owner
    pid: int | None

    @property
    def state(self) -> str:
        """``'running'`` (its process is alive), ``'gone'`` (it is not) or ``'unknown'``."""
        return owner_state(self.host, self.pid)

    def describe(self) -> str:
        """``'name.tmp-... (process 123 on host h, no longer running)'``."""
        who = {"running": f"process {self.pid} on this host, still running",
               "gone": f"process {self.pid} on this host, no longer running",
               "unknown": (f"process {self.pid} on host {self.host}" if self.host else "owner unknown")}
        return f"{self.path.name} ({who[self.state]})"


def owner_tag() -> str:
    """``<host>-<pid>`` of this process, as temporaries name their owner (:func:`owner_state` reads it back)."""
    return f"{_host()}-{os.getpid()}"


def owner_state(host: str | None, pid: int | None) -> str:
    """``'running'`` (process ``pid`` on this host is alive), ``'gone'`` (it is not) or ``'unknown'`` (no owner
    recorded, or another host's)."""
    if pid is None or host != _host():
        return "unknown"
    return "running" if _alive(pid) else "gone"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:      # someone else's process: alive
        return True
    except OSError:
        return True
    return True


def leftovers(path: str | os.PathLike) -> list[Leftover]:
    """The temporary and replaced siblings of output ``path`` (today's names and older ones).

    Today's: ``<name>.tmp-<host>-<pid>-<random>`` and ``<name>.old-...``. Older versions wrote
    ``<name>.tmp-<random>`` and ``.<name>.tmp-...``; those are listed with an unknown owner.
    """
    if _is_remote(path):
        return []
    final = final_path(path)
    try:
        names = os.listdir(final.parent)
    except OSError:
        return []
    found = []
    for n in sorted(names):
        for prefix in (final.name, "." + final.name):
            for tag in ("tmp", "old"):
                head = f"{prefix}.{tag}-"
                if not n.startswith(head):
                    continue
                rest = n[len(head):]
                m = _OWNER.match(rest) if prefix == final.name else None
                if m:
                    found.append(Leftover(final.parent / n, tag, m["host"], int(m["pid"])))
                elif _LEGACY.match(rest):
                    found.append(Leftover(final.parent / n, tag, None, None))
    return found


def remove_path(p: str | os.PathLike) -> bool:
    """Delete a file, link or folder tree; True when it is gone (a failure is logged, not raised)."""
    p = Path(p)
    try:
        if p.is_symlink() or not p.is_dir():
            p.unlink(missing_ok=True)
        else:
            shutil.rmtree(p)
    except OSError as exc:
        log.warning("isle: could not remove %s: %s; delete it by hand", p, exc.strerror or exc)
        return False
    return True


def clean_stale(path: str | os.PathLike) -> list[Path]:
    """Remove the leftovers of output ``path`` whose process is gone; warn about those unjudged.

    A ``tmp`` sibling of a process that is gone is an interrupted write: removed. An ``old``
    sibling is the previous version of an output that was being replaced: removed only when the
    output itself is there (the replacement finished); otherwise it is the only copy and is named
    in a warning. Leftovers of another host or of an older naming are named, never removed.
    Returns the removed paths.
    """
    removed: list[Path] = []
    if _is_remote(path):  # no leftovers beside a remote output
        return removed
    final = final_path(path)
    for lo in leftovers(path):
        state = lo.state
        if state == "running":
            continue
        if state == "gone" and (lo.tag == "tmp" or os.path.lexists(final)):
            if remove_path(lo.path):
                log.warning("isle: removed %s, left by an interrupted run", lo.describe())
                removed.append(lo.path)
        elif lo.tag == "old" and not os.path.lexists(final):
            log.warning("isle: %s holds the previous %s (a replacement was interrupted); rename it back "
                        "to %s to keep it", lo.describe(), final.name, final.name)
        else:
            log.warning("isle: %s beside %s may be left by an interrupted run; delete it if no isle command "
                        "is writing %s", lo.describe(), final.name, final.name)
    return removed


def leftover_note(path: str | os.PathLike) -> str:
    """``'; K.zarr.tmp-... beside it ...'`` for a missing output with leftovers, else ``''``."""
    los = leftovers(path)
    if not los:
        return ""
    tmp = [lo for lo in los if lo.tag == "tmp"]
    old = [lo for lo in los if lo.tag == "old"]
    parts = []
    if tmp:
        parts.append(f"{', '.join(lo.describe() for lo in tmp)} beside it is the temporary of an interrupted "
                     "write (incomplete; the next run writing it removes it when its process is gone)")
    if old:
        name = Path(_local(path)).name
        parts.append(f"{', '.join(lo.describe() for lo in old)} beside it holds its previous version "
                     f"(a replacement was interrupted): rename it back to {name} to use it")
    return "; " + "; ".join(parts)


# =========================================================================== ownership
def _read_json(p: Path, limit: int = 64 * 2**20) -> Any:
    try:
        if p.stat().st_size > limit:
            return None
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def is_project_store(path: str | os.PathLike) -> bool:
    """Whether ``path`` (local or fsspec URL) is a Zarr group whose attributes carry ``isle_format``."""
    if _is_remote(path):
        try:
            import fsspec

            fs, root = fsspec.core.url_to_fs(str(path))
            if fs.exists(root.rstrip("/") + "/.isle-commit"):
                return True   # a commit onto an object store that was interrupted (isle_fast.stores.remote)
            with fs.open(root.rstrip("/") + "/zarr.json", "rb") as f:
                doc = json.loads(f.read(64 * 2**20))
        except Exception:
            return False
    else:
        doc = _read_json(Path(_local(path)) / "zarr.json")
    return isinstance(doc, dict) and isinstance(doc.get("attributes"), dict) and \
        "isle_format" in doc["attributes"]


def _is_project_folder(p: Path) -> bool:
    doc = _read_json(p / MARKER)
    return (isinstance(doc, dict) and JSON_KEY in doc) or any((p / m).is_file() for m in _LEGACY_MARKERS)


def _is_project_file(p: Path) -> bool:
    doc = _read_json(p)
    return isinstance(doc, dict) and JSON_KEY in doc


def owned(path: str | os.PathLike) -> bool:
    """Whether isle-fast wrote ``path``, so that ``--overwrite`` may replace it.

    True for a stack store, a folder holding :data:`MARKER` (or the demo's marker), an empty
    folder (nothing is lost) and a JSON file with the key :data:`JSON_KEY`. A symbolic link is
    judged by what it points to.
    """
    if _is_remote(path):
        return is_project_store(path)
    p = final_path(path)
    if p.is_dir():
        try:
            empty = not any(os.scandir(p))
        except OSError:
            return False
        return empty or is_project_store(p) or _is_project_folder(p)
    if p.is_file():
        return _is_project_file(p)
    return False


def _inside(child: Path, parent: Path) -> bool:
    return child != parent and parent in child.parents


def refuse_unsafe(path: str | os.PathLike, *, inputs: Iterable[Any] = (), outputs: Iterable[Any] = (),
                  flag: str = param("out")) -> Path:
    """Refuse an output path that no command may write; returns :func:`final_path` of it.

    Refused: ``/``, the home folder, the working directory or a folder above it, any input of
    the command (``inputs``: paths, URLs or stacks), a path inside an input folder and a folder
    that holds an input; the same for the command's other ``outputs`` (``--json`` inside ``--out``).

    Raises
    ------
    InputError
        Naming the argument, the path and the reason.
    """
    given = os.fspath(path) if not hasattr(path, "path") else str(path.path)
    if _is_remote(given):
        norm = given.rstrip("/")
        for inp in inputs:
            if inp is None:
                continue
            s = str(getattr(inp, "path", inp)).rstrip("/")
            if s == norm or s.startswith(norm + "/") or norm.startswith(s + "/"):
                raise InputError(f"{flag} {given} is the input {s} of this command, or holds it or lies "
                                 "inside it; a command never modifies its inputs: choose another path")
        return Path(given)
    final = final_path(given)
    if final == Path(final.anchor):
        raise InputError(f"{flag} {given} is the root folder; give a new path for the output")
    home = final_path(Path.home())
    if final == home:
        raise InputError(f"{flag} {given} is your home folder; give a new path for the output")
    cwd = final_path(os.getcwd())
    if final == cwd or _inside(cwd, final):
        raise InputError(f"{flag} {given} is the working directory or a folder above it; "
                         "give a new path for the output")
    for inp in inputs:
        if inp is None:
            continue
        raw = str(getattr(inp, "path", inp))
        if _is_remote(raw):
            continue
        r = final_path(raw)
        if final == r:
            raise InputError(f"{flag} {given} is an input of this command ({raw}); a command never modifies "
                             "its inputs: choose another path")
        if _inside(r, final):
            raise InputError(f"{flag} {given} holds the input {raw} of this command; replacing it would "
                             "delete that input: choose another path")
        if _inside(final, r):
            raise InputError(f"{flag} {given} lies inside the input {raw} of this command; a command never "
                             "modifies its inputs: choose another path")
    for other in outputs:
        if other is None or _is_remote(str(other)):
            continue
        r = final_path(str(other))
        if final == r or _inside(final, r) or _inside(r, final):
            raise InputError(f"{flag} {given} is, holds or lies inside {other}, another output of this "
                             "command; choose another path")
    return final


def check_output(path: str | os.PathLike, *, overwrite: bool = False, inputs: Iterable[Any] = (),
                 flag: str = param("out")) -> Path:
    """Fail before any work when output ``path`` may not be written; returns :func:`final_path` of it.

    Applies :func:`refuse_unsafe`, removes stale temporaries of the output
    (:func:`clean_stale`) and, when ``path`` exists, requires ``overwrite`` and :func:`owned`.

    Parameters
    ----------
    path : path or URL
        The output (store, folder or file).
    overwrite : bool
        ``--overwrite`` was given.
    inputs : iterable of path, URL or Stack
        Every input of the command.
    flag : str
        How the output is named in messages (``--out``, ``--json``, ``out``).

    Raises
    ------
    InputError
        A path no output may take (see :func:`refuse_unsafe`).
    StoreError
        ``path`` exists and ``overwrite`` is not set, or isle-fast did not write it.
    """
    given = os.fspath(path) if not hasattr(path, "path") else str(path.path)
    final = refuse_unsafe(given, inputs=inputs, flag=flag)
    if _is_remote(given):
        try:
            import fsspec

            fs, root = fsspec.core.url_to_fs(given)
            exists = fs.exists(root)
        except Exception:
            exists = False
        if exists and not overwrite:
            raise StoreError(f"{given} exists; pass {param('overwrite')} to replace it")
        if exists and not is_project_store(given):
            raise StoreError(f"{given} exists and is not an isle-fast store; refusing to replace it "
                             f"(even with {param('overwrite')})")
        return final
    clean_stale(final)
    if os.path.lexists(final):
        if not overwrite:
            raise StoreError(f"{given} exists; pass {param('overwrite')} to replace it")
        if not owned(final):
            what = "folder" if final.is_dir() else "file"
            raise StoreError(f"{given} exists and is a {what} that isle-fast did not write (no isle_format "
                             f"store, no {MARKER}); refusing to replace it even with {param('overwrite')}: move it "
                             "away or choose another path")
    return final


def check_replaceable_folder(path: Path, *, overwrite: bool, ours: Callable[[Path], bool], name: str,
                             choose: str, not_ours: str) -> bool:
    """Whether a tool's own output folder ``path`` holds something to replace (else: absent or empty).

    A file there, a non-empty folder without ``overwrite``, or one that ``ours`` does not recognise
    (its marker is missing) is an :class:`InputError`: ``name`` names the folder in messages,
    ``choose`` says what to do instead of the non-empty folder, ``not_ours`` why it is refused.
    Nothing is deleted here.
    """
    if not path.exists():
        return False
    if not path.is_dir():
        raise InputError(f"{name} exists and is not a folder")
    if not any(path.iterdir()):
        return False
    if not overwrite:
        raise InputError(f"{name} exists and is not empty; {choose}")
    if not ours(path):
        raise InputError(f"{name} is not empty and {not_ours}")
    return True


def check_json_output(path: str | os.PathLike, *, inputs: Iterable[Any] = (), outputs: Iterable[Any] = (),
                      flag: str = "--json") -> Path:
    """Fail before any work when a JSON result may not be written to ``path``; returns its final path.

    Refused: a folder, a path inside a store (``gt.zarr/zarr.json``), an input or a path inside or
    holding one (:func:`refuse_unsafe`), an existing file without the key :data:`JSON_KEY`. An
    existing JSON written by isle-fast is replaced (see the module docstring).

    Raises
    ------
    InputError
        Naming the argument, the path and the reason.
    """
    given = os.fspath(path)
    if _is_remote(given):
        raise InputError(f"{flag} {given}: write JSON to a local file")
    final = final_path(given)
    if final.is_dir():
        example = Path(given) / "scores.json"
        raise InputError(f"{flag} {given} is a folder; give a file name such as {example}")
    for anc in final.parents:
        if (anc / "zarr.json").is_file():
            raise InputError(f"{flag} {given} lies inside the store {anc}; a result never writes into a "
                             "store")
    refuse_unsafe(given, inputs=inputs, outputs=outputs, flag=flag)
    clean_stale(final)
    if os.path.lexists(final) and not _is_project_file(final):
        raise InputError(f"{flag} {given} exists and was not written by isle-fast (no {JSON_KEY!r} key); "
                         "refusing to replace it: move it away or choose another file")
    return final


# =========================================================================== atomic writes
def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_file(path: str | os.PathLike, write: Callable[[Path], Any], *, durable: bool = False) -> Path:
    """Write ``path`` atomically: ``write(tmp)`` fills a temporary sibling, which is renamed into place.

    Parameters
    ----------
    path : path
        The file to (re)place. A folder there is an error, and nothing is written.
    write : callable
        Called with the temporary path; writes the whole file (``torch.save``, ``fig.savefig``).
    durable : bool
        fsync the file before the rename and its folder after it.

    Returns
    -------
    Path
        The final path.
    """
    final = final_path(path)
    if final.is_dir():
        raise InputError(f"{os.fspath(path)} is a folder; give a file name")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(final)
    try:
        write(tmp)
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, final)
        if durable:
            _fsync_dir(final.parent)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
    return final


def write_bytes(path: str | os.PathLike, data: bytes, *, durable: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`write_file`)."""
    def w(p: Path) -> None:
        with open(p, "wb") as f:
            f.write(data)

    return write_file(path, w, durable=durable)


def write_text(path: str | os.PathLike, text: str, *, durable: bool = False) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`write_file`)."""
    return write_bytes(path, text.encode("utf-8"), durable=durable)


def _stamp(command: str) -> dict:
    from isle_fast import __version__

    return {"command": command, "version": __version__, "host": socket.gethostname(), "pid": os.getpid(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def write_json(path: str | os.PathLike, obj: Any, *, command: str | None = None, indent: int | None = 2,
               default: Callable[[Any], Any] | None = None, durable: bool = False) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically.

    With ``command`` (a dict ``obj`` only) the file gets the key :data:`JSON_KEY` (command,
    version, host, pid, time), which marks it as written by isle-fast: a later ``--json`` to the
    same path may replace it.
    """
    if command is not None:
        if not isinstance(obj, dict):
            raise TypeError("only a JSON object can carry the isle_output mark")
        obj = {**obj, JSON_KEY: _stamp(command)}
    return write_text(path, json.dumps(obj, indent=indent, default=default), durable=durable)


def write_marker(folder: str | os.PathLike, command: str) -> Path:
    """Write :data:`MARKER` into ``folder``: ``--overwrite`` may replace the folder later."""
    return write_json(Path(folder) / MARKER, {}, command=command)


def commit_dir(work: str | os.PathLike, final: str | os.PathLike, *, overwrite: bool,
               owned_by_us: Callable[[Path], bool] | None = None) -> None:
    """Move the finished folder ``work`` to ``final``, replacing what is there when allowed.

    ``final`` is renamed to an ``.old-`` sibling, ``work`` into place, then the old one is
    deleted. Whatever is at ``final`` is checked again (it may have appeared while the work ran):
    it is replaced only with ``overwrite`` and when ``owned_by_us(final)`` (default :func:`owned`).
    Stale ``.old-`` siblings of ``final`` are removed afterwards. ``work`` is left for the caller
    to remove when this raises.

    Raises
    ------
    StoreError
        ``final`` appeared while writing and may not be replaced.
    """
    work, final = Path(work), final_path(final)
    trash = None
    if os.path.lexists(final):
        if not overwrite:
            raise StoreError(f"{final} appeared while writing; not overwritten")
        if not (owned_by_us or owned)(final):
            raise StoreError(f"{final} appeared while writing and isle-fast did not write it; not replaced")
        trash = temp_path(final, "old")
        os.replace(final, trash)
    try:
        os.replace(work, final)
    except BaseException:
        if trash is not None and not os.path.lexists(final):
            os.replace(trash, final)          # put the previous version back
        raise
    if trash is not None:
        remove_path(trash)
    for lo in leftovers(final):
        if lo.tag == "old" and lo.state == "gone":
            remove_path(lo.path)


class AllOrNothing:
    """Context-manager half of an output built aside: commit on success, abort on any exception.

    Subclasses set ``done`` and define ``commit()`` and ``abort()``; Ctrl-C and SIGTERM
    (raised as exceptions here) abort too.
    """

    done: bool

    def commit(self) -> Any:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def abort(self) -> None:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            if not self.done:
                self.commit()
        else:
            self.abort()


class FolderOutput(AllOrNothing):
    """A folder output built in a temporary sibling, marked as the project's, renamed into place.

    ``out = FolderOutput(path, command="isle export", overwrite=..., inputs=[...])`` checks the
    path (:func:`check_output`) and creates ``out.work``; fill it, then :meth:`commit` (writes
    :data:`MARKER`, moves it into place) or :meth:`abort` (removes it). As a context manager it
    yields ``work`` and commits on success, aborts on any exception (Ctrl-C and SIGTERM too).
    """

    def __init__(self, path: str | os.PathLike, *, command: str, overwrite: bool = False,
                 inputs: Iterable[Any] = (), flag: str = param("out"), check: bool = True) -> None:
        if _is_remote(path):
            raise InputError(f"{flag} {os.fspath(path)}: write folders of files to a local path")
        self.command = command
        self.overwrite = overwrite
        self.final = check_output(path, overwrite=overwrite, inputs=inputs, flag=flag) if check \
            else final_path(path)
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.work = temp_path(self.final)
        self.work.mkdir()
        self.done = False

    def commit(self, owned_by_us: Callable[[Path], bool] | None = None) -> Path:
        """Mark the folder as the project's and move it into place; returns the final path."""
        try:
            write_marker(self.work, self.command)
            commit_dir(self.work, self.final, overwrite=self.overwrite, owned_by_us=owned_by_us)
        except BaseException:
            self.abort()
            raise
        self.done = True
        return self.final

    def abort(self) -> None:
        """Remove the temporary folder; what was at the final path stays."""
        if not self.done:
            self.done = True
            remove_path(self.work)

    def __enter__(self) -> Path:
        return self.work
