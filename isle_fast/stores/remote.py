"""Stores on object stores (``s3://`` through s3fs, any fsspec URL): clear errors and an atomic commit.

An object store has no rename, so a store cannot be built in a temporary folder and moved into place
as on disk (:func:`isle_fast.outputs.commit_dir`). Instead:

1. The store is written under a temporary prefix next to the final one,
   ``<final>.tmp-<host>-<pid>-<random>/`` (:func:`temp_url`): every chunk, the manifests, and the root
   ``zarr.json`` with ``complete: true`` and the identity checksum last of all
   (:meth:`isle_fast.stores.stack.StackWriter.commit`).
2. :func:`commit_prefix` then makes the final prefix hold it: the old store's root ``zarr.json``
   is deleted first (from then on the old store no longer opens), then the rest of the old store,
   then every object of the new one is copied (server-side) except its root ``zarr.json``, which
   is copied last, and the temporary prefix is deleted. While this runs the final prefix holds a
   small ``.isle-commit`` object, so a prefix left without a ``zarr.json`` by an interrupted commit
   is still recognised as isle's to replace with ``--overwrite``.

A reader opens a store only through its root ``zarr.json`` and refuses one without ``complete: true``
(:func:`isle_fast.stores.stack.open_stack`), so at every moment the final prefix either opens as one
complete store (the old, until step 2 starts; the new, once its ``zarr.json`` is there) or not at all.
A write interrupted in step 1 leaves only the temporary prefix (never opened as a store: no
``complete``); one interrupted in step 2 leaves a final prefix without a root ``zarr.json``. The old
store is not kept once step 2 has begun (an object store cannot swap two prefixes at once).

Credentials and the endpoint come from the usual places (s3fs / botocore: ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, ``AWS_ENDPOINT_URL`` for an S3-compatible server, or
fsspec's ``FSSPEC_S3_*`` variables); on a cluster the workers need them too.
"""

from __future__ import annotations

import json
import os
import socket
import uuid
from typing import Any

from isle_fast.errors import StoreError, param

__all__ = ["is_remote", "temp_url", "bucket_problem", "check_bucket", "commit_prefix", "remove_prefix"]

#: Object written at the final prefix while :func:`commit_prefix` replaces what is there.
COMMIT_MARKER = ".isle-commit"
#: Protocols whose first path component is a bucket / container (checked before writing).
BUCKET_PROTOCOLS = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss")


def is_remote(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an fsspec URL (``s3://``, ``memory://``, ...) rather than a local path."""
    s = str(path)
    return "://" in s and not s.startswith("file://")


def temp_url(final: str) -> str:
    """A fresh sibling prefix ``<final>.tmp-<host>-<pid>-<random>`` of the URL ``final``."""
    host = socket.gethostname().split(".")[0] or "host"
    return f"{final.rstrip('/')}.tmp-{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _fs(url: str) -> tuple[Any, str]:
    import fsspec

    protocol = url.split("://", 1)[0]
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as exc:
        extra = " (pip install 'isle-fast[s3]')" if protocol in ("s3", "s3a") else ""
        raise StoreError(f"{url}: {protocol}:// URLs need the {exc.name or 'fsspec backend'} package{extra}") \
            from None
    except Exception as exc:  # noqa: BLE001 - a malformed URL or option: name it
        raise StoreError(f"{url}: {_first_line(exc)}") from None


def bucket_problem(url: str) -> str | None:
    """Why the bucket of ``url`` cannot be used (missing, access denied, endpoint unreachable), or None.

    None as well for protocols without buckets (``memory://``) and when the bucket answers.
    """
    protocol = url.split("://", 1)[0]
    fs, root = _fs(url)
    if protocol not in BUCKET_PROTOCOLS:
        return None
    bucket = root.split("/", 1)[0]
    try:
        fs.info(bucket)
    except FileNotFoundError:
        return f"{url}: bucket {bucket!r} does not exist (create it first)"
    except PermissionError as exc:
        return (f"{url}: access to bucket {bucket!r} denied ({_first_line(exc)}); check the credentials "
                "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE)")
    except Exception as exc:  # noqa: BLE001 - endpoint unreachable, bad signature, ...: one line
        return f"{url}: the object store cannot be used ({_first_line(exc)})"
    return None


def check_bucket(url: str) -> None:
    """Raise :class:`StoreError` (one line) when :func:`bucket_problem` finds one."""
    problem = bucket_problem(url)
    if problem is not None:
        raise StoreError(problem)


def remove_prefix(url: str) -> None:
    """Delete every object under ``url`` (nothing when there is none)."""
    fs, root = _fs(url)
    try:
        if fs.exists(root):
            fs.rm(root, recursive=True)
    except FileNotFoundError:
        pass


def commit_prefix(work: str, final: str, *, overwrite: bool) -> None:
    """Make ``final`` hold the complete store written under ``work`` (see the module docstring).

    Raises
    ------
    StoreError
        ``final`` holds something and ``overwrite`` is false.
    """
    fs, wroot = _fs(work)
    _, froot = _fs(final)
    wroot, froot = wroot.rstrip("/"), froot.rstrip("/")
    head, mark = "zarr.json", COMMIT_MARKER
    objects = sorted(fs.find(wroot))
    rest = [o for o in objects if o != f"{wroot}/{head}"]
    if len(rest) == len(objects):
        raise StoreError(f"{work}: no root {head} to commit")
    if fs.exists(froot) and not overwrite:
        raise StoreError(f"{final} exists; pass {param('overwrite')} to replace it")
    # the marker says "isle is committing here": a prefix left without a zarr.json by an interrupted
    # commit is still the project's to replace (isle_fast.outputs.is_project_store)
    fs.pipe_file(f"{froot}/{mark}", json.dumps({"from": work}).encode())
    try:
        fs.rm_file(f"{froot}/{head}")      # first: the old store stops opening
    except FileNotFoundError:
        pass
    old = [o for o in fs.find(froot) if o != f"{froot}/{mark}"]
    if old:
        fs.rm(old)
    if rest:
        fs.copy(rest, [froot + o[len(wroot):] for o in rest])
    fs.copy(f"{wroot}/{head}", f"{froot}/{head}")   # last: from now on the new store opens
    fs.rm_file(f"{froot}/{mark}")
    fs.invalidate_cache(froot)
    remove_prefix(work)
