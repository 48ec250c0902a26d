"""The whole ISLE job in one call: folders in, ensemble PNGs, tables and figures out (``isle run``).

:func:`run_job` ingests the ground truth and every pseudo-label set into a
cache folder, optionally refines sets (step 1), evaluates and selects
(step 2), merges (step 3), exports the ensemble as VOC palette PNGs, writes
the paper's report, and ends with one summary; all in one process, so the
imports and the worker processes are paid for once.

Inputs (:class:`JobSpec`), three ways
--------------------------------------
* arguments: a gt folder and named set folders (``--gt DIR --set NAME=DIR``
  for label-map PNGs, ``--cams NAME=DIR`` for CAM / score files);
* a VOC-style root (:func:`spec_from_root`): ``SegmentationClassAug/`` (or
  ``SegmentationClass/``), ``pseudo/<set>/`` (label maps), ``cams/<set>/``
  (scores), ``JPEGImages/`` (used when a refinement needs RGB);
* a TOML file (:func:`spec_from_toml`) with the same fields.

The cache
---------
Every store the job makes lives in the cache folder (default ``RUN/cache``)
with a *fingerprint* in its provenance (``job_fingerprint``): a SHA-256 of
the names, sizes and modification times of the input files, the id list, the
ingest options and, for a set, the gt's fingerprint (a set's ids, order and
padding come from the gt). A store whose fingerprint still matches is reused;
any other is made again. Adding a fifth set ingests one folder; touching one
PNG of a set re-ingests that set. Refined sets are cached the same way (their
fingerprint covers the source store, the images and the refinement chain
with its parameters). Two runs never share a cache at once (a lock file).

Counted while ingested
----------------------
The label sets a run makes are ingested in one pass of chunk tasks on the
worker pool, with the gt too when it is made
(:func:`isle_fast.stores.ingest_engine.run_counted_with_gt`, else
:func:`~isle_fast.stores.ingest_engine.run_counted` against the cached gt): a
task decodes one chunk of every folder, writes the chunks and counts each set
against the gt chunk it holds, so these sets need no evaluate pass (their
counts equal ``isle evaluate``'s, count for count). Reused sets, score sets and
refined sets are evaluated as before. Any bad image, another chunk layout, or
worker processes forked after Numba started its threads
(:func:`isle_fast.stores.parallel.numba_fork_safe`) send the run the separate
way, which reports bad inputs exactly as ``isle ingest`` does. ``run.json``
lists the sets counted at ingest (``counted_at_ingest``).

Counts kept in the cache
------------------------
The counts of every label set (its confusion against the gt, and the
per-image counts when the run needs them) are kept in ``cache/counts/<set>.zarr.npz``
under a key made of both stores' identity (:func:`_store_digest`: a SHA-256
of their metadata documents, which hold every chunk's crc32c), so a warm run
(the stores reused) takes them instead of reading the sets again. A store made
again, or any other change to either store, changes the key: that set is
counted again. The file is written atomically (a killed run leaves the old
file or none); one that does not load or does not match is ignored.
``run.json`` lists the sets whose counts came from the cache
(``counts_from_cache``).

Outputs (RUN)
-------------
``ensemble/<id>.png``, ``ensemble.zarr``, ``evaluation.json`` (the
``isle evaluate --json`` schema plus the ensemble), ``report/`` (unless
``report=False``), ``run.json`` (what was run, fingerprints, what was reused, wall
and CPU seconds per step) and ``cache/``. Results are built in a temporary folder
inside RUN (:func:`isle_fast.outputs.temp_path` naming); at the end
``run.json`` is removed, each result is moved into place
(:func:`isle_fast.outputs.commit_dir`), and ``run.json`` is written last. A
killed run leaves the previous results (described by their ``run.json``) or
nothing, never a half-written result; its temporary folder is removed by the
next run (:func:`isle_fast.outputs.clean_stale`). RUN and the cache are outputs
isle wrote: each carries the project's output marker (``.isle-output.json``,
:data:`isle_fast.outputs.MARKER`). RUN must be a new or empty folder or one
isle made, never an input folder, a folder holding one, ``/``, the home or the
working directory (:func:`isle_fast.outputs.refuse_unsafe`); a re-run replaces
the results there and keeps the cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from isle_fast.errors import InputError, StoreError, param

__all__ = ["JobSpec", "JobResult", "run_job", "spec_from_root", "spec_from_toml", "fingerprint_folder"]

#: Marker file of a folder isle wrote (``isle run``'s RUN and cache): outputs.py's convention.
MARKER = ".isle-output.json"

#: The results a run replaces as a whole (``run.json`` comes last).
RESULTS = ("ensemble.zarr", "ensemble", "evaluation.json", "report")

#: Version of the fingerprint recipe: a change makes every cached store be made again.
FINGERPRINT_VERSION = 1

_LABEL_EXTS = (".png", ".npy")
_SCORE_EXTS = (".npy", ".npz")
_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


# ======================================================================================= the spec
@dataclass
class JobSpec:
    """Everything :func:`run_job` needs.

    Attributes
    ----------
    gt : Path
        Folder of ground-truth label maps (VOC palette PNGs, 255 = ignore).
    out : Path
        The run folder (see the module docstring).
    sets : dict str -> Path
        Label-map pseudo-label sets, by name, in priority order (ties go to
        earlier sets).
    cams : dict str -> Path
        Score (CAM) sets, by name, after ``sets`` in priority order.
    cache : Path, optional
        Where the stores live (default ``out/cache``); may be shared by runs.
    ids : Path, optional
        Id list (``train.txt`` forms); default: every file in ``gt``.
    images : Path, optional
        RGB images (``<id>.jpg``), needed by refinements that read RGB; the
        report then adds its side-by-side figure.
    classes : str, optional
        ``voc`` (default) or a file of class names.
    refine : list of str
        Refinement chain (``["crf"]``), empty for none.
    refine_sets : list of str, optional
        Sets to refine (default: every CAM set, or every set when there are none).
    params : list of str
        Refinement parameters, ``crf.iterations=5``.
    policy, strategy, subset, average, bg_threshold, backend :
        As ``isle merge``.
    image_labels : Path, optional
        Image-level labels (``cls_labels.npy``, an ids + labels text file, or a
        store carrying them; :mod:`isle_fast.stores.image_labels`), as ``isle merge
        --image-labels``: claims of classes absent from an image are dropped from
        the ensemble, and with a gt of some of the images the selection takes
        the strata (``strata-context``; ``strata-semi`` below 25 labelled images)
        instead of the posterior.
    compress : str
        PNG compression of the export (``rle`` or 0-9).
    report : bool
        Write ``report/``.
    num_images : int
        Images in the report's figure.
    workers : int, optional
        Worker processes (default one per core).
    skip_bad, allow_pickle : bool
        As ``isle ingest``.
    quiet : bool
        No progress bars, step lines or summary.
    """

    gt: Path
    out: Path
    sets: dict[str, Path] = field(default_factory=dict)
    cams: dict[str, Path] = field(default_factory=dict)
    cache: Path | None = None
    ids: Path | None = None
    images: Path | None = None
    classes: str | None = None
    refine: list[str] = field(default_factory=list)
    refine_sets: list[str] | None = None
    params: list[str] = field(default_factory=list)
    policy: str = "score"
    strategy: str = "class"
    subset: list[str] | None = None
    average: str = "dataset"
    bg_threshold: float | None = None
    backend: str = "auto"
    image_labels: Path | None = None
    compress: str = "rle"
    report: bool = True
    num_images: int = 3
    workers: int | None = None
    skip_bad: bool = False
    allow_pickle: bool = False
    quiet: bool = False

    @property
    def cache_dir(self) -> Path:
        """The cache folder."""
        return Path(self.cache) if self.cache is not None else Path(self.out) / "cache"

    def all_sets(self) -> list[tuple[str, Path, str]]:
        """``(name, folder, encoding)`` of every set in priority order."""
        return ([(n, Path(p), "labels") for n, p in self.sets.items()]
                + [(n, Path(p), "scores") for n, p in self.cams.items()])

    def check(self) -> None:
        """Validate names, folders and options before anything is written (:class:`InputError`)."""
        from isle_fast.ensemble.evaluate import AVERAGES
        from isle_fast.ensemble.merge import POLICIES, STRATEGIES
        from isle_fast.stores.export import png_options

        if not Path(self.gt).is_dir():
            raise InputError(f"ground-truth folder {self.gt} does not exist")
        every = self.all_sets()
        if not every:
            raise InputError(f"give at least one pseudo-label set ({param('sets')} or {param('cams')}, NAME=DIR)")
        names = [n for n, _, _ in every]
        for n in names:
            if not n or n in ("gt", "images") or "/" in n or n.startswith(".") or n != n.strip():
                raise InputError(f"set name {n!r} cannot be used (names become cache/<name>.zarr; "
                                 "'gt' and 'images' are taken)")
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise InputError(f"set name {dup[0]!r} is given twice")
        for n, p, _ in every:
            if not p.is_dir():
                raise InputError(f"set {n!r}: folder {p} does not exist")
        for what, given in ((param("ids"), self.ids), (param("images"), self.images),
                            (param("image_labels"), self.image_labels)):
            if given is not None and not Path(given).exists():
                raise InputError(f"{what} {given} does not exist")
        if self.policy not in POLICIES:
            raise InputError(f"{param('policy')} must be one of {', '.join(POLICIES)}, not {self.policy!r}")
        if self.strategy not in STRATEGIES:
            raise InputError(f"{param('strategy')} must be one of {', '.join(STRATEGIES)}, "
                             f"not {self.strategy!r}")
        if self.average not in AVERAGES:
            raise InputError(f"{param('average')} must be one of {', '.join(AVERAGES)}, not {self.average!r}")
        png_options(self.compress)
        for n in self.subset or []:
            if n not in names:
                raise InputError(f"{param('subset')} names {n!r}, which is not a set of this run "
                                 f"({', '.join(names)})")
        if self.refine:
            from isle_fast.refinement.chain import get_refinement

            for r in self.refine:
                get_refinement(r)
            for n in self.refine_sets or []:
                if n not in names:
                    raise InputError(f"{param('refine_sets')} names {n!r}, which is not a set of this run")
        if self.workers is not None and self.workers < 1:
            raise InputError(f"{param('workers')} must be at least 1, not {self.workers}")
        if self.num_images < 0:
            raise InputError(f"{param('num_images')} must be at least 0, not {self.num_images}")
        out, cache = _resolved(self.out), _resolved(self.cache_dir)
        if self.image_labels is not None and (_inside(_resolved(self.image_labels), out)
                                              or _inside(_resolved(self.image_labels), cache)):
            raise InputError(f"{param('image_labels')} {self.image_labels} lies in the run folder "
                             f"{self.out} or its cache; keep inputs elsewhere")
        for n, p, _ in every + [("gt", Path(self.gt), "labels")]:
            src = _resolved(p)
            if _inside(out, src) or _inside(src, out) or _inside(cache, src):
                raise InputError(f"{param('out')} {self.out} and input folder {p} overlap; "
                                 "write the run elsewhere")


def _resolved(p: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.path.abspath(os.fspath(p))))


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def _subfolders(folder: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted(folder.iterdir()) if p.is_dir()} if folder.is_dir() else {}


def spec_from_root(root: str | os.PathLike, **options: Any) -> JobSpec:
    """A :class:`JobSpec` for a VOC-style folder (see the module docstring); ``options`` override.

    Raises
    ------
    InputError
        No gt folder, or no ``pseudo/`` / ``cams/`` set folder.
    """
    r = Path(root)
    if not r.is_dir():
        raise InputError(f"{r} is not a folder (a VOC-style root or a .toml job file)")
    gt = next((r / g for g in ("SegmentationClassAug", "SegmentationClass") if (r / g).is_dir()), None)
    if gt is None:
        raise InputError(f"{r} holds neither SegmentationClassAug/ nor SegmentationClass/ (the ground truth)")
    sets, cams = _subfolders(r / "pseudo"), _subfolders(r / "cams")
    if not sets and not cams:
        raise InputError(f"{r} holds no set folders: put them in {r / 'pseudo'}/<set>/ (label PNGs) or "
                         f"{r / 'cams'}/<set>/ (CAM files)")
    fields: dict[str, Any] = {"gt": gt, "sets": sets, "cams": cams}
    if (r / "JPEGImages").is_dir() and options.get("refine"):   # RGB only when a refinement reads it
        fields["images"] = r / "JPEGImages"
    fields.update({k: v for k, v in options.items() if v is not None})
    if "out" not in fields:
        raise InputError(f"give {param('out')} (the run folder)")
    return JobSpec(**fields)


#: TOML keys (top level, or in a section of the same name) -> JobSpec fields.
_TOML_FIELDS = {
    "gt": "gt", "out": "out", "cache": "cache", "ids": "ids", "images": "images", "classes": "classes",
    "workers": "workers", "skip_bad": "skip_bad", "allow_pickle": "allow_pickle", "backend": "backend",
    "average": "average", "bg_threshold": "bg_threshold", "image_labels": "image_labels",
}
_TOML_SECTIONS = {
    "refine": {"chain": "refine", "sets": "refine_sets", "params": "params"},
    "merge": {"policy": "policy", "strategy": "strategy", "sets": "subset", "average": "average",
              "bg_threshold": "bg_threshold", "image_labels": "image_labels"},
    "export": {"compress_level": "compress"},
    "report": {"enabled": "report", "num_images": "num_images"},
}
_PATH_FIELDS = {"gt", "out", "cache", "ids", "images", "image_labels"}


def spec_from_toml(path: str | os.PathLike, **options: Any) -> JobSpec:
    """A :class:`JobSpec` from a TOML file; relative paths are relative to the file's folder.

    Example::

        gt = "VOC/SegmentationClassAug"
        ids = "VOC/ImageSets/Segmentation/train_aug.txt"
        out = "run"
        [sets]                    # label-map sets, in priority order
        puzzlecam = "pseudo/puzzlecam"
        clims = "pseudo/clims"
        [cams]                    # CAM / score sets
        irn = "cams/irn"
        [refine]
        chain = "crf"
        sets = ["irn"]
        params = ["crf.iterations=5"]
        [merge]
        policy = "score"
        image_labels = "VOC/cls_labels.npy"   # optional (also at the top level)
        [export]
        compress_level = "rle"
        [report]
        enabled = true

    Command-line ``options`` (not None) override the file.
    """
    import tomllib

    p = Path(path)
    try:
        doc = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"job file {p} does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"job file {p}: {exc}") from None
    base = p.parent
    fields: dict[str, Any] = {}

    def path_of(key: str, v: Any) -> Path:
        if not isinstance(v, str) or not v:
            raise InputError(f"job file {p}: {key} must be a path (a string), not {v!r}")
        q = Path(v).expanduser()
        return q if q.is_absolute() else base / q

    for key, value in doc.items():
        if key in ("sets", "cams"):
            if not isinstance(value, dict):
                raise InputError(f"job file {p}: [{key}] must be a table of name = \"folder\"")
            fields[key] = {str(n): path_of(f"{key}.{n}", v) for n, v in value.items()}
        elif key in _TOML_SECTIONS:
            if not isinstance(value, dict):
                raise InputError(f"job file {p}: [{key}] must be a table")
            for k, v in value.items():
                if k not in _TOML_SECTIONS[key]:
                    raise InputError(f"job file {p}: unknown key {key}.{k} (known: "
                                     f"{', '.join(_TOML_SECTIONS[key])})")
                f = _TOML_SECTIONS[key][k]
                fields[f] = path_of(f"{key}.{k}", v) if f in _PATH_FIELDS else v
        elif key in _TOML_FIELDS:
            fields[_TOML_FIELDS[key]] = path_of(key, value) if key in _PATH_FIELDS else value
        else:
            raise InputError(f"job file {p}: unknown key {key!r} (known: "
                             f"{', '.join(list(_TOML_FIELDS) + ['sets', 'cams'] + list(_TOML_SECTIONS))})")
    if isinstance(fields.get("refine"), str):
        from isle_fast.refinement.chain import parse_chain

        fields["refine"] = parse_chain(fields["refine"])
    for k in ("refine_sets", "subset", "params"):
        if isinstance(fields.get(k), str):
            fields[k] = [fields[k]]
    fields.update({k: v for k, v in options.items() if v is not None})
    if "gt" not in fields:
        raise InputError(f"job file {p} names no gt folder (gt = \"...\")")
    if "out" not in fields:
        raise InputError(f"job file {p} names no run folder: add out = \"...\" or give {param('out')}")
    try:
        return JobSpec(**fields)
    except TypeError as exc:
        raise InputError(f"job file {p}: {exc}") from None


# ================================================================================ fingerprints
def fingerprint_folder(folder: str | os.PathLike, exts: Sequence[str]) -> dict[str, Any]:
    """Names, sizes and modification times (ns) of the files of ``folder`` with these extensions.

    One ``stat`` per file, no reads: about 5 microseconds a file.
    """
    entries = []
    with os.scandir(os.fspath(folder)) as it:
        for e in it:
            if e.name.startswith(".") or os.path.splitext(e.name)[1].lower() not in exts:
                continue
            st = e.stat()
            entries.append((e.name, st.st_size, st.st_mtime_ns))
    entries.sort()
    return {"folder": str(_resolved(folder)), "files": len(entries),
            "digest": hashlib.sha256(json.dumps(entries).encode()).hexdigest()}


def _file_digest(path: Path | None) -> str | None:
    if path is None:
        return None
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _fingerprint(**parts: Any) -> str:
    doc = json.dumps({"v": FINGERPRINT_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(doc.encode()).hexdigest()


#: Version of the cached counts' key recipe (:func:`_counts_key`).
COUNTS_VERSION = 1


def _store_digest(path: str | os.PathLike) -> str | None:
    """SHA-256 of a committed store's metadata: its ``zarr.json`` and every array's, or None.

    An array's document holds its attributes, shape and chunk manifest (the crc32c of every chunk,
    checked at every read: :mod:`isle_fast.stores.chunks`), so the digest changes whenever the
    store's content does. None: not a local folder, or an array without a manifest (an older store).
    """
    from isle_fast.stores.chunks import MANIFEST_ATTR

    root = Path(path)
    try:
        docs = [root / "zarr.json"] + sorted(e / "zarr.json" for e in root.iterdir()
                                             if e.is_dir() and (e / "zarr.json").is_file())
        h = hashlib.sha256()
        for k, d in enumerate(docs):
            data = d.read_bytes()
            if k and b'"node_type": "array"' in data and MANIFEST_ATTR.encode() not in data:
                return None
            h.update(f"{d.parent.name if k else ''}\0{len(data)}\0".encode())
            h.update(data)
    except OSError:
        return None
    return h.hexdigest()


def _counts_key(st: Any, gt: Any) -> str | None:
    """The key of ``st``'s counts against ``gt`` in the cache, or None (not cached: a score set, whose
    counts depend on the threshold, or a store without a digest)."""
    if getattr(st, "encoding", None) != "labels":
        return None
    a, b = _store_digest(st.path), _store_digest(gt.path)
    if a is None or b is None:
        return None
    return _fingerprint(counts=COUNTS_VERSION, set=a, gt=b, classes=int(gt.num_classes),
                        images=int(gt.num_images))


def _counts_file(cache: Path, st: Any) -> Path:
    return cache / "counts" / (os.path.basename(str(st.path).rstrip("/")) + ".npz")


def _load_counts(cache: Path, st: Any, gt: Any, per_image: bool
                 ) -> tuple[np.ndarray, np.ndarray | None] | None:
    """``(counts, per-image counts or None)`` of ``st`` kept by an earlier run, or None (none kept, another
    key, per-image counts needed and not kept, a file that does not load)."""
    from isle_fast.outputs import clean_stale

    key = _counts_key(st, gt)
    f = _counts_file(cache, st)
    if f.parent.is_dir():
        clean_stale(f)          # a killed run's temporary
    if key is None or not f.is_file():
        return None
    c = int(gt.num_classes)
    try:
        with np.load(f, allow_pickle=False) as z:
            if str(z["key"]) != key:
                return None
            counts = np.array(z["counts"], dtype=np.int64)
            stats = np.array(z["stats"], dtype=np.int64) if "stats" in z.files else None
    except Exception:       # a damaged or foreign file: counted again (and rewritten)
        return None
    if counts.shape != (c, c + 1) or (stats is not None and stats.shape != (int(gt.num_images), c, 2)):
        return None
    if per_image and stats is None:
        return None
    return counts, stats


def _save_counts(cache: Path, st: Any, gt: Any, counts: np.ndarray, stats: np.ndarray | None) -> None:
    """Keep ``st``'s counts (and per-image counts) in the cache, atomically (see the module docstring)."""
    from isle_fast.outputs import clean_stale, write_file

    key = _counts_key(st, gt)
    if key is None:
        return
    f = _counts_file(cache, st)
    if f.parent.is_dir():
        clean_stale(f)
    kept = np.asarray(counts, dtype=np.int64)

    def write(p: Path) -> None:
        with open(p, "wb") as fh:
            if stats is None:
                np.savez(fh, key=np.array(key), counts=kept)
            else:
                np.savez(fh, key=np.array(key), counts=kept, stats=np.asarray(stats, dtype=np.int64))

    write_file(f, write)


# ======================================================================================== running
@dataclass
class JobResult:
    """What :func:`run_job` did: the paths, the figures, what was reused, wall and CPU seconds per step."""

    out: str
    images: int
    sets: list[str]
    selection: dict[str, str]
    miou: dict[str, float | None]
    ensemble_miou: float | None
    reused: list[str]
    made: list[str]
    seconds: dict[str, float]
    files: dict[str, str]
    cpu_seconds: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict:
        """JSON-ready dict."""
        return asdict(self)


def _children_cpu(pid: int, tick: float, depth: int = 0) -> float:
    """User + sys seconds of the live descendants of ``pid`` (Linux ``/proc``; 0 where unreadable)."""
    total = 0.0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids = [int(k) for k in f.read().split()]
        except (OSError, ValueError):
            continue
        for k in kids:
            try:
                with open(f"/proc/{k}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / tick   # utime, stime
            except (OSError, ValueError, IndexError):  # gone since the listing: its time is lost
                continue
            if depth < 4:
                total += _children_cpu(k, tick, depth + 1)
    return total


def _cpu_now() -> float:
    """CPU seconds (user + sys) of this process and of its live children (the worker pool) so far."""
    t = time.process_time()
    if sys.platform.startswith("linux"):
        try:
            t += _children_cpu(os.getpid(), float(os.sysconf("SC_CLK_TCK")))
        except (OSError, ValueError):
            pass
    return t


class _Steps:
    """Times the steps of a run (wall and CPU seconds) and prints one line per step to stderr (unless quiet).

    CPU seconds are this process's plus its worker processes' (user + sys), so a
    run on a busy machine still says how much work each step was.
    """

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.seconds: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.t0 = time.perf_counter()
        self.cpu0 = _cpu_now()

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        t, c = time.perf_counter(), _cpu_now()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t
        self.cpu[name] = self.cpu.get(name, 0.0) + _cpu_now() - c

    def say(self, text: str) -> None:
        if not self.quiet:
            print(f"isle run: {text}", file=sys.stderr, flush=True)

    @property
    def total(self) -> float:
        return time.perf_counter() - self.t0


#: Seconds a run waits for a lock whose run has ended but whose worker processes still hold it.
LOCK_WAIT_S = 30.0


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive lock on ``folder/.isle-run.lock`` (another run using the folder is an error).

    The holder writes its owner (:func:`isle_fast.outputs.owner_tag`, ``<host>-<pid>``) into the file. The
    worker processes a run forks hold its lock too, so a run that was killed (``kill -9``, a closed terminal)
    keeps the folder locked until its workers have gone, which takes them a moment or, when only the main
    process was killed, until their current task ends. When the recorded run is gone from this host
    (:func:`isle_fast.outputs.owner_state`), the lock is waited for (:data:`LOCK_WAIT_S`) instead of
    refused, so a re-run right after a kill works; a live holder is an error at once.
    """
    import fcntl

    from isle_fast.outputs import owner_state, owner_tag

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ".isle-run.lock"
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        deadline = None
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                host, pid = _lock_holder(path)
                if owner_state(host, pid) != "gone":
                    who = f" (pid {pid} on {host})" if pid is not None else ""
                    raise InputError(f"{folder} is in use by another isle run{who}; "
                                     f"wait for it to end (lock {path})") from None
                deadline = deadline or time.monotonic() + LOCK_WAIT_S
                if time.monotonic() > deadline:
                    raise InputError(
                        f"{folder} is still locked by the worker processes of an isle run that has "
                        f"ended (pid {pid}) after {LOCK_WAIT_S:.0f} s; stop them or wait until they "
                        f"finish, then run again (lock {path})") from None
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{owner_tag()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def _lock_holder(path: Path) -> tuple[str | None, int | None]:
    """The ``(host, pid)`` a lock file names (``<host>-<pid>``), or ``(None, None)`` when it names none."""
    try:
        host, _, pid = path.read_text().strip().rpartition("-")
        return (host, int(pid)) if host else (None, None)
    except (OSError, ValueError):
        return None, None


def _prepare_folder(folder: Path, flag: str, inputs: Sequence[Any], command: str) -> None:
    """Create RUN (or the cache), or accept a folder isle wrote; refuse anything else.

    :func:`isle_fast.outputs.refuse_unsafe` first (never an input, a folder holding or
    inside one, ``/``, home, the working directory), then ownership as ``--overwrite``
    judges it (:func:`isle_fast.outputs.owned`: empty, or holding the output marker; a
    stack store is not a run folder). The folder is marked as isle's own.
    """
    from isle_fast.outputs import is_project_store, owned, refuse_unsafe, write_marker

    final = refuse_unsafe(folder, inputs=inputs, flag=flag)
    if final.exists() and not final.is_dir():
        raise InputError(f"{flag} {folder} exists and is not a folder")
    if final.is_dir() and (not owned(final) or is_project_store(final)):
        raise InputError(f"{flag} {folder} exists, is not empty and was not made by isle run (no {MARKER}); "
                         "choose another folder")
    final.mkdir(parents=True, exist_ok=True)
    if not (final / MARKER).is_file():
        write_marker(final, command)


def _clean_stale(out: Path) -> None:
    """Temporaries of earlier, killed runs in RUN: the staging folder, replaced results (outputs.py)."""
    from isle_fast.outputs import clean_stale

    for name in (".staging",) + RESULTS + ("run.json",):
        clean_stale(out / name)


def _cached(path: Path, fp: str, make: Any) -> tuple[Any, bool]:
    """``(store, True)`` when the store at ``path`` has fingerprint ``fp``, else ``(make(), False)``."""
    st = _reusable(path, fp)
    return (st, True) if st is not None else (make(), False)


def _reusable(path: Path, fp: str) -> Any:
    """The store at ``path`` when it has fingerprint ``fp``, else None (:class:`InputError`: not a store)."""
    from isle_fast.stores.stack import open_stack

    if path.exists():
        try:
            st = open_stack(path)
        except StoreError:
            st = None
            doc = path / "zarr.json"
            if not doc.is_file() or b"isle_format" not in doc.read_bytes():
                raise InputError(f"{path} is in the cache folder but is not an isle-fast store; "
                                 "move it away (the cache holds only the stores isle run makes)") from None
        if st is not None and st.provenance.get("job_fingerprint") == fp:
            return st
    return None


def _quiet_stdout() -> Any:
    """The library steps print their own summaries to stdout; a run prints one summary at the end."""
    return contextlib.redirect_stdout(io.StringIO())


def _joined(a: Any, b: Any) -> Any:
    """The evaluation of ``a``'s sets followed by ``b``'s (same gt): what one pass over all would give."""
    from isle_fast.ensemble.evaluate import Evaluation

    names = list(a.set_names)
    for n in b.set_names:
        base, k, name = n, 2, n
        while name in names:
            name, k = f"{base}-{k}", k + 1
        names.append(name)
    stats = None
    if a.image_stats is not None and b.image_stats is not None:
        stats = np.concatenate([a.image_stats, b.image_stats], axis=1)
    return Evaluation(classes=list(a.classes), set_names=names, counts=np.concatenate([a.counts, b.counts]),
                      average=a.average, image_stats=stats, set_paths=list(a.set_paths) + list(b.set_paths),
                      gt_path=a.gt_path, backend=a.backend, seconds=a.seconds + b.seconds)


def _ours(p: Path) -> bool:
    """A result of an earlier run: what isle wrote (:func:`isle_fast.outputs.owned`)."""
    from isle_fast.outputs import owned

    return owned(p)


def _move_results(staging: Path, out: Path, made: Sequence[str]) -> None:
    """Replace RUN's results by the staged ones; ``run.json`` goes first (the caller writes it last).

    Each result is moved with :func:`isle_fast.outputs.commit_dir` (the old one renamed to an
    ``.old-`` sibling, the new one into place, the old one deleted); a result this run did not
    make (``--no-report``) is removed. Only what isle wrote is replaced or removed.
    """
    from isle_fast.errors import StoreError
    from isle_fast.outputs import commit_dir, remove_path, temp_path

    run_json = out / "run.json"
    if os.path.lexists(run_json):
        if not _ours(run_json):
            raise StoreError(f"{run_json} was not written by isle; not replaced")
        remove_path(run_json)
    for name in RESULTS:
        final = out / name
        if name in made:
            commit_dir(staging / name, final, overwrite=True, owned_by_us=_ours)
        elif os.path.lexists(final):
            if not _ours(final):
                raise StoreError(f"{final} was not written by isle; not removed")
            trash = temp_path(final, "old")
            os.replace(final, trash)
            remove_path(trash)


def _preload_task_modules() -> None:
    """Import what the worker tasks run (PNG codec, chunk codecs, ingest, export) before the workers fork.

    This process imports them anyway for its own steps; imported before the
    fork, every worker has them already instead of importing them again at its
    first task (about 0.1 s of CPU per worker). None of them starts a thread.
    """
    import cloudpickle  # noqa: F401 - the workers unpickle their task functions with it
    import google_crc32c  # noqa: F401
    import numcodecs  # noqa: F401

    from isle_fast.stores import chunkio, chunks, export, formats, ingest, png  # noqa: F401


def _preload_numba() -> None:
    """Import Numba and the CPU kernels and build Numba's CPU typing and target contexts, before the fork.

    Every worker counts with a Numba kernel, and each one imported Numba and built these contexts
    itself (about 0.4 s of CPU a process: 0.8 s of a 2-worker run, while this process needs them
    for its own steps anyway). Forked after this, a worker only loads the kernel from Numba's cache
    (about 0.06 s). None of it starts a thread or Numba's thread pool (loading a *parallel* kernel
    would, and GNU OpenMP then ends every forked child: :func:`~isle_fast.stores.parallel.numba_fork_safe`
    stays True, which :class:`~isle_fast.stores.parallel.ProcessPool` checks when it forks). Any
    failure is left for the steps themselves to report.
    """
    try:
        from numba.core.registry import cpu_target

        from isle_fast.backend import get_kernels

        get_kernels("cpu")
        cpu_target.target_context.refresh()
        cpu_target.typing_context.refresh()
    except Exception:  # noqa: BLE001 - a warm-up; the steps that need Numba report their own errors
        pass


class _WarmUp:
    """Load the kernels the steps after ingest need from Numba's cache, in a background thread.

    While the workers ingest, this process only waits on their pipes; importing
    Numba and loading the kernels there (about 0.4 s of a short run) takes that
    idle time instead of the evaluate step's. It holds the GIL most of that time,
    so a cold run starts it when the counted ingest pass starts (:meth:`start`
    passed as ``before_pass``), not while this process still plans and creates
    the stores (Zarr's calls wait on the GIL: 0.35 s more for 5 stores). Zarr
    itself is imported at once (:meth:`zarr`). Any failure is left for the step
    itself to report.
    """

    def __init__(self, backend: str):
        self.backend = backend
        self.started = False

    @staticmethod
    def zarr() -> None:
        """Import Zarr in a thread (the stores' writers need it soon, 0.15 s; the workers read headers)."""
        import threading

        def work() -> None:
            with contextlib.suppress(Exception):
                import zarr  # noqa: F401

        threading.Thread(target=work, name="isle-import-zarr", daemon=True).start()

    def start(self) -> None:
        """Start loading the kernels (once)."""
        if self.started:
            return
        self.started = True
        backend = self.backend

        def work() -> None:
            try:
                from isle_fast.backend import get_kernels, resolve_backend

                if resolve_backend(backend) == "cpu":
                    import numba

                    K = get_kernels("cpu")
                    old = numba.get_num_threads()
                    numba.set_num_threads(1)
                    try:
                        a = np.zeros((1, 8, 8), np.uint8)
                        K.confusion_labels(a, (a, a), 3)
                        K.merge_labels((a, a), np.zeros(3, np.int64), np.zeros((2, 3)), K.SCORE)
                        # the fused merge's kernel (merged and counted in one pass): about 15 ms from the cache
                        K.merge_count_images((a, a), a, np.array([[8, 8]]), np.zeros(3, np.int64),
                                             np.zeros((2, 3)), K.SCORE)
                        # the count of an ensemble chunk merged otherwise (ChunkCounts.add: per image region)
                        K.confusion_labels_images(a, (a,), np.full((1, 2), 8, np.int64), 3)
                    finally:
                        numba.set_num_threads(old)
            except Exception:
                pass

        import threading

        threading.Thread(target=work, name="isle-warm-up", daemon=True).start()


def run_job(spec: JobSpec) -> JobResult:
    """Run the whole ISLE job of ``spec`` (see the module docstring) and print its summary.

    Returns
    -------
    JobResult

    Raises
    ------
    InputError
        A bad input or option (named), before anything is written where possible.
    """
    from isle_fast.stores import parallel

    spec.check()
    out = Path(spec.out)
    cache = spec.cache_dir
    steps = _Steps(spec.quiet)
    from isle_fast.outputs import remove_path, temp_path

    inputs = [p for p in (spec.gt, spec.ids, spec.images, spec.image_labels,
                          *(f for _, f, _ in spec.all_sets()))
              if p is not None]
    _prepare_folder(out, "--out", inputs, "isle run")
    _prepare_folder(cache, "--cache", inputs, "isle run (store cache)")
    with _locked(out), (_locked(cache) if _resolved(cache) != _resolved(out) else contextlib.nullcontext()):
        _clean_stale(out)       # the cache's stores: create_stack cleans their temporaries (check_output)
        workers = spec.workers or parallel.default_workers()
        from isle_fast.cluster import current_client

        # on a cluster (--scheduler) the steps run on its workers; else one local pool for every step
        local_pool = workers > 1 and current_client() is None
        if local_pool:
            _preload_task_modules()
            if spec.backend != "gpu":
                _preload_numba()
        pool = parallel.ProcessPool(workers) if local_pool else None
        staging = temp_path(out / ".staging")
        try:
            with (pool.start() if pool is not None else contextlib.nullcontext()) as p, \
                    (parallel.use_pool(p) if p is not None else contextlib.nullcontext()):
                warm = _WarmUp(spec.backend)   # its threads start after the fork: the workers never see them
                warm.zarr()
                staging.mkdir()
                result = _run(spec, out, cache, staging, steps, warm)
        finally:
            remove_path(staging)
    if not spec.quiet:
        _print_summary(result)
    return result


def _run(spec: JobSpec, out: Path, cache: Path, staging: Path, steps: _Steps, warm: _WarmUp | None = None
         ) -> JobResult:
    from isle_fast.ensemble.evaluate import evaluate
    from isle_fast.ensemble.merge import merge
    from isle_fast.ensemble.report import export_pngs, report
    from isle_fast.stores import ingest

    progress = not spec.quiet
    reused: list[str] = []
    made: list[str] = []
    fps: dict[str, str] = {}
    ids_digest = _file_digest(spec.ids)
    common: dict[str, Any] = dict(skip_bad=spec.skip_bad, workers=spec.workers, overwrite=True,
                                  quiet=spec.quiet)

    def cached(key: str, path: Path, fp: str, make: Any) -> Any:
        with steps.step("ingest" if key != "refine" else "refine"):
            st, hit = _cached(path, fp, make)
        return record(st, hit, fp)

    def record(st: Any, hit: bool, fp: str) -> Any:
        name = os.path.basename(str(st.path).rstrip("/"))
        (reused if hit else made).append(name)
        fps[name] = fp
        steps.say(f"{name}: {'reused (inputs unchanged)' if hit else 'made'} ({st.num_images:,} images)")
        return st

    # -- ingest (cached) -----------------------------------------------------------------------
    gt_fp = _fingerprint(kind="gt", files=fingerprint_folder(spec.gt, _LABEL_EXTS), ids=ids_digest,
                         classes=spec.classes, skip_bad=spec.skip_bad)

    def make_gt() -> Any:
        with _quiet_stdout():
            return ingest.ingest_labels(spec.gt, cache / "gt.zarr", ids=spec.ids, classes=spec.classes,
                                        kind="gt", name="gt", provenance={"job_fingerprint": gt_fp}, **common)

    with steps.step("ingest"):
        gt = _reusable(cache / "gt.zarr", gt_fp)
    if gt is not None:
        record(gt, True, gt_fp)
    # a gt of some images only: the first set's folder gives the images, the other sets follow it
    partial_gt = _partial_gt(spec, None if gt is None else gt.ids)
    if partial_gt and gt is None:
        gt = cached("gt", cache / "gt.zarr", gt_fp, make_gt)
    ref: Any = None if partial_gt else gt
    ref_fp: dict[str, Any] = {}
    from isle_fast.stores import parallel

    pool = parallel.active_pool()
    if gt is None and pool is not None and pool.numba_safe:
        pool.broadcast(_import_kernels)     # a cold run counts in the workers: Numba imported meanwhile
    stores: dict[str, Any] = {}
    per_image = spec.report or spec.average == "image"
    todo: list[tuple[str, Path, str]] = []      # label sets to make: in one counted pass (run_counted)
    later: list[tuple[str, Path, str]] = []     # the other sets: each ingested against its reference
    for name, folder, enc in spec.all_sets():
        exts = _LABEL_EXTS if enc == "labels" else _SCORE_EXTS
        fp = _fingerprint(kind=enc, files=fingerprint_folder(folder, exts), gt=gt_fp, skip_bad=spec.skip_bad,
                          allow_pickle=spec.allow_pickle if enc == "scores" else None)
        stores[name] = None                     # made below; the dict keeps the sets' order
        if enc == "labels" and not partial_gt:
            with steps.step("ingest"):
                hit_st = _reusable(cache / f"{name}.zarr", fp)
            if hit_st is None:
                todo.append((name, folder, fp))
            else:
                stores[name] = record(hit_st, True, fp)
        else:
            later.append((name, folder, fp))
    counted = None
    if gt is None:
        both = _ingest_gt_counted(spec, cache, gt_fp, todo, common, per_image, steps, warm) if todo else None
        if both is not None:
            gt, counted = both
            record(gt, False, gt_fp)
        else:
            with steps.step("ingest"):
                gt = make_gt()
            record(gt, False, gt_fp)
        ref = gt
    for name, folder, enc in spec.all_sets():
        entry = next((t for t in later if t[0] == name), None)
        if entry is None:
            continue
        fp = entry[2] if not ref_fp else _fingerprint(
            kind=enc, files=fingerprint_folder(folder, _LABEL_EXTS if enc == "labels" else _SCORE_EXTS),
            gt=gt_fp, skip_bad=spec.skip_bad, allow_pickle=spec.allow_pickle if enc == "scores" else None,
            **ref_fp)
        own = {"classes": spec.classes} if ref is None else {}

        def make_set(name: str = name, folder: Path = folder, enc: str = enc, fp: str = fp,
                     ref: Any = ref, own: dict = own) -> Any:
            with _quiet_stdout():
                if enc == "labels":
                    return ingest.ingest_labels(folder, cache / f"{name}.zarr", gt=ref, name=name,
                                                provenance={"job_fingerprint": fp}, **own, **common)
                return ingest.ingest_scores(folder, cache / f"{name}.zarr", gt=ref, name=name,
                                            allow_pickle=spec.allow_pickle,
                                            provenance={"job_fingerprint": fp}, **own, **common)

        stores[name] = cached(name, cache / f"{name}.zarr", fp, make_set)
        if ref is None:
            ref, ref_fp = stores[name], {"partial_gt_reference": fp}
    if counted is None and todo:
        counted = _ingest_counted(spec, gt, cache, todo, common, per_image, steps, warm)
    if warm is not None:
        warm.start()      # no counted pass ran (or it did: started already)
    for name, folder, fp in todo:
        if counted is not None:
            stores[name] = record(counted.stacks[[t[0] for t in todo].index(name)], False, fp)
            continue

        def make_again(name: str = name, folder: Path = folder, fp: str = fp) -> Any:
            with _quiet_stdout():
                return ingest.ingest_labels(folder, cache / f"{name}.zarr", gt=gt, name=name,
                                            provenance={"job_fingerprint": fp}, **common)

        stores[name] = cached(name, cache / f"{name}.zarr", fp, make_again)
    images = None
    if spec.images is not None:
        image_dir = spec.images
        img_fp = _fingerprint(kind="images", files=fingerprint_folder(image_dir, _IMAGE_EXTS), gt=gt_fp,
                              **ref_fp)

        def make_images() -> Any:
            with _quiet_stdout():
                return ingest.ingest_images(image_dir, cache / "images.zarr", gt=ref, name="images",
                                            provenance={"job_fingerprint": img_fp}, **common)

        images = cached("images", cache / "images.zarr", img_fp, make_images)

    # -- step 1: refinement (cached) ------------------------------------------------------------
    candidates = dict(stores)
    if spec.refine:
        from isle_fast.refinement.chain import make_chain, parse_params, refine_stack

        if images is None:
            raise InputError(f"refinement {'+'.join(spec.refine)} needs the RGB images: give {param('images')}")
        chain_record = [{"name": r.name, "params": r.params()} for r in make_chain(spec.refine, spec.params)]
        targets = spec.refine_sets or (list(spec.cams) or list(spec.sets))
        for name in targets:
            src = stores[name]
            rname = f"{name}+{'+'.join(spec.refine)}"
            fp = _fingerprint(kind="refined", source=src.provenance.get("job_fingerprint"),
                              images=images.provenance.get("job_fingerprint"), chain=chain_record)

            def make_refined(src: Any = src, rname: str = rname, fp: str = fp) -> Any:
                with _quiet_stdout():
                    st = refine_stack(src, images, cache / f"{rname}.zarr", spec.refine,
                                      parse_params(spec.params), name=rname, overwrite=True,
                                      progress=progress)
                _set_fingerprint(st.path, fp)
                from isle_fast.stores.stack import open_stack

                return open_stack(st.path)

            candidates[name] = cached("refine", cache / f"{rname}.zarr", fp, make_refined)
    set_names = list(candidates)
    set_stacks = [candidates[n] for n in set_names]

    # -- step 2: evaluate and select ---------------------------------------------------------------
    with steps.step("evaluate"):
        known = {} if counted is None else {
            n: (counted.counts[k], None if counted.image_stats is None else counted.image_stats[:, k])
            for k, (n, _, _) in enumerate(todo) if candidates[n] is counted.stacks[k]}
        per_image_counts = spec.report or spec.average == "image"
        from_cache: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
        for n in set_names:
            if n not in known:
                kept = _load_counts(cache, candidates[n], gt, per_image_counts)
                if kept is not None:
                    from_cache[n] = kept
        ev = _evaluation(spec, set_names, set_stacks, gt, {**known, **from_cache}, progress)
        for k, n in enumerate(set_names):
            if n not in from_cache:
                _save_counts(cache, candidates[n], gt, ev.counts[k],
                             None if ev.image_stats is None else ev.image_stats[:, k])
    names = ev.set_names
    subset = None
    if spec.subset:
        subset = [names[set_names.index(n)] for n in spec.subset]

    # -- step 3: merge ---------------------------------------------------------------------------------
    # Fused when the stores allow (local, whole images per chunk): each ensemble chunk is counted
    # against the gt and encoded as PNGs while the merge holds it, instead of reading it back twice.
    counter, sink = _fused_outputs(spec, gt, staging / "ensemble", partial_gt)
    try:
        with steps.step("merge"):
            res = merge(set_stacks, gt, staging / "ensemble.zarr", policy=spec.policy, strategy=spec.strategy,
                        subset=subset, evaluation=ev, backend=spec.backend, bg_threshold=spec.bg_threshold,
                        image_labels=None if spec.image_labels is None else str(spec.image_labels),
                        name="ensemble", progress=progress,
                        each_chunk=None if sink is None else _each_chunk(sink), counter=counter)
        if counter is not None and not res.each_chunk_ran:   # the Dask graph ran: the separate passes
            sink.abort()
            counter = sink = None
    except BaseException:
        if sink is not None:
            sink.abort()
        raise
    sel = res.selection
    if counter is not None:
        ens_ev = counter.evaluation(res.stack)
    else:
        with steps.step("evaluate"):
            ens_ev = evaluate([res.stack], gt, average=spec.average, backend=spec.backend, progress=progress,
                              per_image=spec.report)
    e_miou = float(ens_ev.miou[0])
    steps.say(f"ensemble mIoU {e_miou:.2f}")
    produced = ["ensemble.zarr"]

    # -- export ------------------------------------------------------------------------------------------
    with steps.step("export"):
        if sink is not None:
            exp = sink.commit()
        else:
            exp = export_pngs(res.stack, staging / "ensemble", compress=spec.compress, workers=spec.workers,
                              progress=progress, backend=spec.backend)
    produced.append("ensemble")
    members = [names[i] for i in sel.member_indices]
    ev.write_json(staging / "evaluation.json", sel, ensemble={
        "policy": spec.policy, "strategy": spec.strategy, "members": members, "miou": e_miou,
        "iou": [None if v != v else float(v) for v in ens_ev.iou[0]], "pngs": "ensemble/"})
    produced.append("evaluation.json")

    # -- the report --------------------------------------------------------------------------------------
    if spec.report:
        with steps.step("report"):
            report(set_stacks, gt, staging / "report", ensemble=res.stack, images=images, policy=spec.policy,
                   average=spec.average, backend=spec.backend, bg_threshold=spec.bg_threshold,
                   num_images=spec.num_images, progress=progress, evaluation=_joined(ev, ens_ev))
        produced.append("report")

    # -- into place -------------------------------------------------------------------------------------
    miou = {n: (None if v != v else round(float(v), 4)) for n, v in zip(names, ev.miou)}
    result = JobResult(
        out=str(out), images=ref.num_images, sets=list(names), selection=sel.mapping(), miou=miou,
        ensemble_miou=round(e_miou, 4), reused=reused, made=made, seconds={}, files={
            "ensemble_pngs": str(out / "ensemble"), "ensemble_store": str(out / "ensemble.zarr"),
            "evaluation": str(out / "evaluation.json"), "cache": str(cache),
            **({"report": str(out / "report")} if spec.report else {})})
    _move_results(staging, out, produced)
    result.seconds = {k: round(v, 3) for k, v in steps.seconds.items()}
    result.seconds["total"] = round(steps.total, 3)
    result.cpu_seconds = {k: round(v, 3) for k, v in steps.cpu.items()}
    result.cpu_seconds["total"] = round(_cpu_now() - steps.cpu0, 3)
    doc = {"tool": "isle-fast", "command": "isle run", "spec": _spec_json(spec), "fingerprints": fps,
           "png_bytes": exp["bytes"], "compress": exp["compress"],
           "ensemble_pass": "fused" if counter is not None else "separate",
           "counted_at_ingest": [f"{n}.zarr" for n in known],
           "counts_from_cache": [os.path.basename(str(candidates[n].path).rstrip("/")) for n in from_cache],
           **result.to_json()}
    from isle_fast.outputs import write_json

    write_json(out / "run.json", doc, command="isle run")
    return result


def _partial_gt(spec: JobSpec, gt_ids: Any = None) -> bool:
    """Whether the gt labels only some of the images: no ids file, and the first set's folder holds ids the
    gt lacks besides all of the gt's (then the sets' folders give the images and the gt's subset scores
    them, as ``isle evaluate`` / ``isle merge`` with a partial gt do).

    ``gt_ids``: the gt store's ids; ``None`` before the gt is ingested (then the gt folder's listing).
    """
    from isle_fast.stores.ingest import _listing

    if spec.ids is not None:
        return False
    name, folder, enc = spec.all_sets()[0]
    found = set(_listing(folder, _LABEL_EXTS if enc == "labels" else _SCORE_EXTS, f"set {name}"))
    have = set(_listing(spec.gt, _LABEL_EXTS, "gt") if gt_ids is None else gt_ids)
    return have < found


def _fused_outputs(spec: JobSpec, gt: Any, pngs: Path, partial_gt: bool = False) -> tuple[Any, Any]:
    """``(ChunkCounts, ChunkExport)`` for the fused merge pass, or ``(None, None)`` where it cannot run.

    It needs what the merge's local pass needs (local stores in the plain layout, no Dask scheduler
    asked for), chunks that hold whole images (PNGs are written per chunk) and a gt of every image.
    """
    from isle_fast.ensemble.evaluate import ChunkCounts
    from isle_fast.ensemble.graph import dask_requested
    from isle_fast.ensemble.report import ChunkExport

    if (partial_gt or dask_requested() or gt.chunk_spec() is None
            or tuple(gt.chunks[1:]) != tuple(gt.shape[1:])):
        return None, None
    counter = ChunkCounts(gt, average=spec.average, backend=spec.backend, per_image=spec.report)
    return counter, ChunkExport(pngs, gt.ids, gt.shapes, compress=spec.compress)


def _ingest_counted(spec: JobSpec, gt: Any, cache: Path, todo: Sequence[tuple[str, Path, str]],
                    common: dict[str, Any], per_image: bool, steps: _Steps, warm: _WarmUp | None = None) -> Any:
    """The label sets of ``todo`` ingested in one pass that also counts them against the gt
    (:func:`isle_fast.stores.ingest_engine.run_counted`), or None: then they are made one by one
    (and evaluated) the separate way, which also reports any bad input exactly as ``isle ingest``."""
    from isle_fast.stores import ingest, parallel
    from isle_fast.stores.ingest_engine import run_counted

    pool = parallel.active_pool()
    if pool is not None and pool.numba_safe:    # the counting kernel loads in the workers meanwhile
        pool.broadcast(_load_counting_kernel)
    with steps.step("ingest"), _quiet_stdout():
        plans = [ingest.labels_plan(folder, cache / f"{name}.zarr", gt=gt, name=name,
                                    provenance={"job_fingerprint": fp}, **common) for name, folder, fp in todo]
        return run_counted(plans, gt, per_image=per_image, workers=spec.workers, quiet=spec.quiet,
                           before_pass=None if warm is None else warm.start)


def _ingest_gt_counted(spec: JobSpec, cache: Path, gt_fp: str, todo: Sequence[tuple[str, Path, str]],
                       common: dict[str, Any], per_image: bool, steps: _Steps, warm: _WarmUp | None = None
                       ) -> Any:
    """The gt and the label sets of ``todo`` in one counted pass
    (:func:`isle_fast.stores.ingest_engine.run_counted_with_gt`): ``(gt, counted)``, or None (then the
    gt is ingested on its own, and the sets after it)."""
    from isle_fast.stores import ingest, parallel
    from isle_fast.stores.ingest_engine import run_counted_with_gt

    def set_plans(ref: Any) -> list:
        pool = parallel.active_pool()
        if pool is not None and pool.numba_safe:    # the workers load it while the sets are planned here
            pool.broadcast(_load_counting_kernel)
        return [ingest.labels_plan(folder, cache / f"{name}.zarr", gt=ref, name=name,
                                   provenance={"job_fingerprint": fp}, **common) for name, folder, fp in todo]

    with steps.step("ingest"), _quiet_stdout():
        gt_plan = ingest.labels_plan(spec.gt, cache / "gt.zarr", ids=spec.ids, classes=spec.classes, kind="gt",
                                     name="gt", provenance={"job_fingerprint": gt_fp}, **common)
        return run_counted_with_gt(gt_plan, set_plans, per_image=per_image, workers=spec.workers,
                                   quiet=spec.quiet, before_pass=None if warm is None else warm.start)


def _import_kernels() -> None:
    """Import Numba and the CPU kernels (about 0.2 s of CPU; starts no thread), in a worker process."""
    from isle_fast.backend import get_kernels

    get_kernels("cpu")


def _load_counting_kernel() -> None:
    """Load the confusion kernel from Numba's cache (about 0.4 s of CPU), in a worker process."""
    from isle_fast.backend import get_kernels

    K = get_kernels("cpu")
    a = np.zeros((1, 8, 8), np.uint8)
    with K.numba_threads(1):
        K.confusion_labels_images(a, (a, a), np.array([[8, 8]]), 3)   # the kernel of the counted pass


def _evaluation(spec: JobSpec, set_names: Sequence[str], set_stacks: Sequence[Any], gt: Any,
                known: dict[str, tuple[np.ndarray, np.ndarray | None]], progress: bool) -> Any:
    """``evaluate(set_stacks, gt, ...)``, taking the counts of the sets in ``known`` (counted while they
    were ingested) instead of reading them again; the other sets are evaluated. Counts are exact
    integers, so the result is the one evaluation of every set would give."""
    from isle_fast.backend import resolve_backend
    from isle_fast.ensemble.evaluate import Evaluation, evaluate
    from isle_fast.ensemble.graph import open_inputs, unique_names

    kw: dict[str, Any] = dict(average=spec.average, backend=spec.backend, bg_threshold=spec.bg_threshold,
                              progress=progress, per_image=spec.report)
    if not known:
        return evaluate(set_stacks, gt, **kw)
    t0 = time.perf_counter()
    open_inputs(set_stacks, gt)                 # the checks evaluate makes
    n, c = len(set_stacks), gt.num_classes
    per_image = spec.report or spec.average == "image"
    counts = np.zeros((n, c, c + 1), dtype=np.int64)
    stats = np.zeros((gt.num_images, n, c, 2), dtype=np.int64) if per_image else None
    rest = [i for i, name in enumerate(set_names) if name not in known]
    if rest:
        part = evaluate([set_stacks[i] for i in rest], gt, **kw)
        counts[rest] = part.counts
        if stats is not None:
            stats[:, rest] = part.image_stats
    for i, name in enumerate(set_names):
        if name in known:
            counts[i] = known[name][0]
            if stats is not None:
                stats[:, i] = known[name][1]
    return Evaluation(classes=list(gt.classes), set_names=unique_names(set_stacks, say=True), counts=counts,
                      average=spec.average, image_stats=stats, set_paths=[s.path for s in set_stacks],
                      gt_path=gt.path, backend=resolve_backend(spec.backend), seconds=time.perf_counter() - t0)


def _each_chunk(sink: Any) -> Any:
    """The merge's ``each_chunk``: write the ensemble chunk's PNGs (the merge counted it: its ``counter``)."""
    def each_chunk(start: tuple[int, int, int], labels: np.ndarray) -> None:
        sink.write(start[0], labels)

    return each_chunk


def _set_fingerprint(path: str, fp: str) -> None:
    """Record ``fp`` in a committed store's provenance (a refined store; written by :func:`refine_stack`)."""
    from isle_fast.outputs import write_text

    doc_path = Path(path) / "zarr.json"
    doc = json.loads(doc_path.read_text())
    doc.setdefault("attributes", {}).setdefault("provenance", {})["job_fingerprint"] = fp
    write_text(doc_path, json.dumps(doc, indent=2))


def _spec_json(spec: JobSpec) -> dict:
    def plain(v: Any) -> Any:
        if isinstance(v, Path):
            return str(v)
        return {n: str(p) for n, p in v.items()} if isinstance(v, dict) else v

    return {k: plain(v) for k, v in asdict(spec).items()}


def _print_summary(r: JobResult) -> None:
    from isle_fast.progress import summary

    won: dict[str, int] = {}
    for name in r.selection.values():
        won[name] = won.get(name, 0) + 1
    scored = [(n, v) for n, v in r.miou.items() if v is not None]
    best = max(scored, key=lambda t: t[1], default=None)
    rows = {
        "images": f"{r.images:,}",
        "sets": ", ".join(f"{n} {v:.1f}" if v is not None else n for n, v in r.miou.items()) + " (mIoU)",
        "selection": ", ".join(f"{n} {k} classes" for n, k in won.items()),
        "ensemble mIoU": f"{r.ensemble_miou:.2f}" + (
            f" ({r.ensemble_miou - best[1]:+.2f} over the best set, {best[0]})"
            if best is not None and r.ensemble_miou is not None else ""),
        "stores": f"{len(r.made)} made, {len(r.reused)} reused (inputs unchanged) in {r.files['cache']}",
        "seconds": f"{r.seconds['total']:.2f} (" + ", ".join(f"{k} {v:.2f}" for k, v in r.seconds.items()
                                                            if k != "total") + ")",
        "ensemble PNGs": r.files["ensemble_pngs"],
    }
    if "report" in r.files:
        rows["report"] = r.files["report"]
    rows["evaluation"] = r.files["evaluation"]
    summary("isle run: done", rows)
