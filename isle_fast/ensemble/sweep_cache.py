"""The threshold sweep's counts kept between commands: ``isle evaluate --bg-threshold S`` then
``isle merge --bg-threshold S`` costs one sweep pass and one merge pass, not two sweeps.

What is kept
------------
The confusion counts ``(N, T, C, C+1)`` of a sweep (dataset average only: the per-image
statistics of ``average='image'`` grow with the images and are not kept), one ``.npz`` file per
sweep in the cache folder (:func:`cache_dir`: ``$ISLE_SWEEP_CACHE``, else
``$XDG_CACHE_HOME/isle-fast/sweeps``, else ``~/.cache/isle-fast/sweeps``; ``ISLE_SWEEP_CACHE=off``
turns it off). The inputs are never written to (isle's rule), so the counts live there and not in
a store's folder.

The key
-------
The sha256 of: this recipe's version, every store's :func:`store_digest` (the gt's and every
set's, in order), each set's counting plan (its mode and the stored levels or units each
threshold compares), the thresholds, the number of classes and the average. A store's digest is
the sha256 of its metadata files (``zarr.json`` of the group and of every array), which hold the
identity checksum and the crc32c of every chunk recorded at commit: a store re-made, re-ingested
or changed in any chunk has another digest, so its sweeps are counted again. A store without those
checksums (an uncommitted one, an older one, chunks without crc32c) or not on a local disk has no
digest and is never cached.

Bounded
-------
The folder is kept under :data:`MAX_ENV` megabytes (``$ISLE_SWEEP_CACHE_MB``, default
:data:`DEFAULT_MAX_MB`): after each save the least recently used sweeps (a file's modification
time, renewed whenever it is loaded) are removed until the rest fit. Only this module's own files
are ever removed: ``<64 hex digits>.npz`` and the temporaries of its writes, older than an hour
(a killed write's); anything else in the folder is left alone and not counted.

Never trusted if damaged
------------------------
A cache file holds its key and the sha256 of its counts; a file that does not load, whose key is
not the one asked for, whose counts have the wrong shape or dtype or do not match their checksum
is ignored: the sweep is counted again and the file replaced. Writes are atomic (a temporary file
renamed into place), and a cache folder that cannot be written only costs the next sweep.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = ["CACHE_ENV", "MAX_ENV", "DEFAULT_MAX_MB", "cache_dir", "max_bytes", "store_digest", "sweep_key",
           "load_counts", "save_counts", "prune"]

#: Environment variable: the cache folder, or ``off`` (also ``0``, ``none``, empty) for no cache.
CACHE_ENV = "ISLE_SWEEP_CACHE"
#: Version of the key recipe and the file layout: a change makes every kept sweep be counted again.
RECIPE = 1
_OFF = {"", "0", "off", "none", "no", "false"}
#: Environment variable: the most megabytes the cache folder keeps (see the module notes).
MAX_ENV = "ISLE_SWEEP_CACHE_MB"
#: The default bound: about a thousand 4-set VOC sweeps (0.24 MB each), 70 of COCO's 81 classes.
DEFAULT_MAX_MB = 256
_OURS = re.compile(r"^[0-9a-f]{64}\.npz$")
_OUR_TEMPORARY = re.compile(r"^[0-9a-f]{64}\.npz\.tmp-.+$")
_TEMPORARY_AGE_S = 3600.0


def cache_dir() -> Path | None:
    """The cache folder (see the module notes), or None when turned off."""
    v = os.environ.get(CACHE_ENV)
    if v is not None:
        return None if v.strip().lower() in _OFF else Path(v)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "isle-fast" / "sweeps"


def max_bytes() -> int:
    """The cache folder's bound in bytes (:data:`MAX_ENV`, else :data:`DEFAULT_MAX_MB`).

    Raises
    ------
    InputError
        :data:`MAX_ENV` is not a number of megabytes >= 0.
    """
    from isle_fast.errors import InputError

    v = os.environ.get(MAX_ENV)
    if v is None or not v.strip():
        return DEFAULT_MAX_MB * 2**20
    try:
        mb = float(v)
    except ValueError:
        mb = -1.0
    if not mb >= 0:
        raise InputError(f"{MAX_ENV}={v!r}: give the sweep cache's bound in megabytes (a number >= 0)")
    return int(mb * 2**20)


def store_digest(stack: Any) -> str | None:
    """sha256 of a committed local store's metadata files (identity checksum, every chunk's crc32c), or None.

    None: a remote store, one not complete, without an identity checksum, or with an array whose
    chunks carry a crc32c but no manifest of them (a change of its data would go unseen).
    """
    from isle_fast.stores.chunks import MANIFEST_ATTR
    from isle_fast.stores.stack import IDENTITY_ATTR, is_remote

    path = str(getattr(stack, "path", ""))
    if not path or is_remote(path) or not os.path.isdir(path):
        return None
    h = hashlib.sha256()
    found = False
    for folder, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if d != "c" and not d.startswith("."))  # "c": chunk keys
        if "zarr.json" not in files:
            continue
        try:
            raw = Path(folder, "zarr.json").read_bytes()
            doc = json.loads(raw)
        except (OSError, ValueError):
            return None
        attrs = doc.get("attributes") or {}
        rel = os.path.relpath(folder, path)
        if rel == ".":
            if not attrs.get("complete") or IDENTITY_ATTR not in attrs:
                return None
            found = True
        elif doc.get("node_type") == "array" and "crc32c" in json.dumps(doc.get("codecs", [])) \
                and MANIFEST_ATTR not in attrs:
            return None
        h.update(rel.encode() + b"\0" + hashlib.sha256(raw).digest())
    return h.hexdigest() if found else None


def sweep_key(stacks: Sequence[Any], gt: Any, plans: Sequence[Any], thresholds: Sequence[float], *,
              num_classes: int, average: str) -> str | None:
    """The cache key of a sweep (sha256 hex), or None when it is not cached (a store without a digest,
    ``average='image'``)."""
    if average != "dataset":
        return None
    if cache_dir() is not None:
        max_bytes()      # a bad bound is an error before the pass, not after it
    digests = [store_digest(s) for s in [gt, *stacks]]
    if any(d is None for d in digests):
        return None
    doc = {
        "recipe": RECIPE,
        "stores": digests,
        "plans": [[p.mode, list(p.levels), [float(u) for u in p.units]] for p in plans],
        "thresholds": [float(t) for t in thresholds],
        "classes": int(num_classes),
        "average": average,
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def _file(key: str) -> Path | None:
    d = cache_dir()
    return None if d is None else d / f"{key}.npz"


def _checksum(counts: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(counts).tobytes()).hexdigest()


def load_counts(key: str | None, shape: tuple[int, ...]) -> np.ndarray | None:
    """The kept counts of ``key`` (int64, ``shape``), or None: not kept, or the file is damaged."""
    f = None if key is None else _file(key)
    if f is None or not f.is_file():
        return None
    try:
        with np.load(f, allow_pickle=False) as z:
            k = str(z["key"][()])
            digest = str(z["sha256"][()])
            counts = np.array(z["counts"])
    except Exception:  # noqa: BLE001 - any unreadable file (truncated, not a zip, wrong members) is damaged
        return None
    if k != key or counts.dtype != np.int64 or counts.shape != tuple(shape) or digest != _checksum(counts):
        return None
    try:
        os.utime(f)     # used now: the last to be pruned
    except OSError:
        pass
    return counts


def save_counts(key: str | None, counts: np.ndarray) -> Path | None:
    """Keep ``counts`` under ``key`` (atomically); the file, or None when not kept (no key, no cache
    folder, a folder that cannot be written)."""
    f = None if key is None else _file(key)
    if f is None:
        return None
    from isle_fast.outputs import write_file

    counts = np.ascontiguousarray(counts, dtype=np.int64)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez(fh, key=np.array(key), sha256=np.array(_checksum(counts)), counts=counts)

    try:
        written = write_file(f, write)
    except OSError:
        return None
    prune(written.parent, keep=written)
    return written


def prune(folder: str | os.PathLike, *, keep: str | os.PathLike | None = None, limit: int | None = None) -> int:
    """Remove the least recently used sweeps of ``folder`` until the rest fit ``limit`` bytes; files removed.

    ``limit``: :func:`max_bytes` when None. ``keep`` (the file just written) is never removed. Only this
    module's files are looked at (see the module notes); a file another process removes or renews
    meanwhile is no error.
    """
    limit = max_bytes() if limit is None else int(limit)
    now = time.time()
    kept = None if keep is None else os.path.abspath(keep)
    files: list[tuple[float, int, str]] = []
    removed = 0
    try:
        entries = list(os.scandir(os.fspath(folder)))
    except OSError:
        return 0
    for e in entries:
        try:
            if not e.is_file(follow_symlinks=False):
                continue
            st = e.stat(follow_symlinks=False)
        except OSError:
            continue
        if _OURS.match(e.name):
            if os.path.abspath(e.path) != kept:
                files.append((st.st_mtime, st.st_size, e.path))
            else:
                limit -= st.st_size
        elif _OUR_TEMPORARY.match(e.name) and now - st.st_mtime > _TEMPORARY_AGE_S:
            try:
                os.unlink(e.path)
                removed += 1
            except OSError:
                pass
    total = sum(size for _, size, _ in files)
    for _, size, path in sorted(files):      # oldest first
        if total <= limit:
            break
        try:
            os.unlink(path)
            removed += 1
        except OSError:
            continue
        total -= size
    return removed
