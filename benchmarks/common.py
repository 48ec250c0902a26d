"""Shared helpers of every benchmark: timing, machine info, JSON / Markdown output, fits, plots.

Every benchmark module (``python -m benchmarks.<name> [--quick]``) uses the
same conventions so that ``python -m benchmarks`` can collect them:

* results go to :func:`results_dir` (``benchmarks/results/`` of the source
  checkout, or ``./benchmark-results/`` when the benchmarks run from an
  installed wheel as ``isle_fast_benchmarks``, unless the environment variable
  ``ISLE_BENCH_RESULTS`` names another folder; the smoke test uses that to keep
  its tiny numbers out of the real results);
* :func:`write_json` writes ``<name>.json`` with a ``machine`` block (CPU
  model, cores, memory, library versions, git commit) next to the payload;
  a top-level ``headline`` list (rows made by :func:`headline_row`) is what
  the combined ``SUMMARY.md`` shows for the module;
* every timing is the best of ``k`` runs after a warm-up (:func:`best_of`),
  and every step is measured next to a reference implementation in the same
  run, so the tables report ratios, not only seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

__all__ = [
    "BENCH_DIR",
    "results_dir",
    "default_results_dir",
    "SOURCE_CHECKOUT",
    "tmp_dir",
    "machine_info",
    "best_of",
    "Timing",
    "write_json",
    "read_json",
    "fit_exponent",
    "fit_power_offset",
    "plot_loglog",
    "format_table",
    "markdown_table",
    "headline_row",
    "PeakMemory",
    "bench_parser",
    "fmt_seconds",
    "fmt_bytes",
    "quiet_progress",
    "log",
    "synth_shapes",
    "synth_quality",
    "synth_block",
    "make_label_stores",
    "voc_palette",
    "export_pngs",
    "read_png",
    "wsss_confusion",
    "wsss_evaluate_pngs",
    "numpy_merge_image",
]

#: The folder of the benchmark modules: ``benchmarks/`` of a checkout, or the installed package.
BENCH_DIR = Path(__file__).resolve().parent
#: Whether the modules run from a source checkout (``benchmarks/`` next to ``setup.py``), not a wheel.
SOURCE_CHECKOUT = (BENCH_DIR.parent / "setup.py").is_file() and (BENCH_DIR.parent / "isle_fast").is_dir()


def default_results_dir() -> Path:
    """``benchmarks/results`` of the checkout; from an installed wheel ``./benchmark-results`` (never
    the installed package's folder)."""
    return BENCH_DIR / "results" if SOURCE_CHECKOUT else Path.cwd() / "benchmark-results"


def results_dir() -> Path:
    """Folder the results go to (created): ``$ISLE_BENCH_RESULTS`` or :func:`default_results_dir`."""
    d = Path(os.environ.get("ISLE_BENCH_RESULTS") or default_results_dir())
    d.mkdir(parents=True, exist_ok=True)
    return d


def tmp_dir() -> Path:
    """Cache for generated data (``<results>/tmp``, git-ignored); ``$ISLE_BENCH_TMP`` overrides."""
    d = Path(os.environ.get("ISLE_BENCH_TMP") or default_results_dir() / "tmp")
    d.mkdir(parents=True, exist_ok=True)
    return d


def fill_once(folder: Path, write: Callable[[Path], Any]) -> Path:
    """Generated data, cached: ``write(folder)`` into a fresh ``folder`` unless its ``.complete`` marker is there.

    The marker is written after ``write`` returns, so an interrupted run is redone, not reused.
    """
    marker = folder / ".complete"
    if not marker.exists():
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        write(folder)
        marker.write_text("ok\n")
    return folder


@contextmanager
def scratch(name: str) -> Iterator[Path]:
    """A scratch folder under :func:`tmp_dir` for this process (``<name>-<pid>``), removed afterwards."""
    work = tmp_dir() / f"{name}-{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def dir_bytes(path: Path) -> int:
    """Bytes on disk of a file, or of every file below a folder."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# --------------------------------------------------------------------------------------
# machine
# --------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except Exception:
        return None
    if module == "SimpleITK":
        try:
            return mod.Version_VersionString()
        except Exception:
            return "?"
    return str(getattr(mod, "__version__", "?"))


def _git_commit() -> str | None:
    if not SOURCE_CHECKOUT:
        return None
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=BENCH_DIR, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except Exception:
        return None


def machine_info() -> dict[str, Any]:
    """CPU model, core counts, memory, OS, Python and library versions, git commit: JSON-ready."""
    import psutil

    versions = {m: _version(m) for m in ("numpy", "numba", "zarr", "numcodecs", "dask", "distributed",
                                         "torch", "PIL", "torchmetrics", "SimpleITK", "cupy")}
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    return {
        "cpu": _cpu_model(),
        "logical_cores": psutil.cpu_count(logical=True),
        "physical_cores": psutil.cpu_count(logical=False),
        "usable_cores": affinity,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": {k: v for k, v in versions.items() if v is not None},
        "git_commit": _git_commit(),
        "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


# --------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------
class Timing(dict):
    """Result of :func:`best_of`: ``best``, ``median``, ``runs`` (seconds) and ``value`` (last return)."""

    @property
    def best(self) -> float:
        return self["best"]

    @property
    def value(self) -> Any:
        return self["value"]


def best_of(fn: Callable[[], Any], k: int = 3, warmup: int = 1, max_seconds: float | None = None) -> Timing:
    """Run ``fn`` ``warmup`` times untimed, then ``k`` times; the best (minimum) wall time wins.

    The minimum is the least noisy estimate on a shared machine: noise only
    ever adds time. ``max_seconds`` stops repeating once the timed runs have
    taken that long (at least one timed run always happens).

    Returns
    -------
    Timing
        ``{"best": s, "median": s, "runs": [s, ...], "value": last return value}``.
    """
    value = None
    for _ in range(max(0, warmup)):
        value = fn()
    runs: list[float] = []
    spent = 0.0
    for _ in range(max(1, k)):
        t0 = time.perf_counter()
        value = fn()
        dt = time.perf_counter() - t0
        runs.append(dt)
        spent += dt
        if max_seconds is not None and spent >= max_seconds:
            break
    return Timing(best=min(runs), median=float(np.median(runs)), runs=runs, value=value)


# --------------------------------------------------------------------------------------
# memory
# --------------------------------------------------------------------------------------
class PeakMemory:
    """Peak resident memory (RSS) of this process and its children, sampled by a thread.

    ``with PeakMemory() as pm: ...`` then ``pm.peak`` (bytes, this process +
    all descendants at the same instant, e.g. dask.distributed workers),
    ``pm.peak_self``, ``pm.peak_child`` (the largest single descendant, e.g.
    one worker), ``pm.children`` (pid -> peak) and ``pm.baseline`` (RSS when
    the block started). Sampling
    every ``interval`` seconds can miss a very short spike; the chunked
    pipeline's memory is a plateau, which it does not miss.
    """

    def __init__(self, interval: float = 0.02, pid: int | None = None):
        self.interval = interval
        self.pid = pid or os.getpid()
        self.peak = 0
        self.peak_self = 0
        self.peak_child = 0
        self.children: dict[int, int] = {}
        self.baseline = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        import psutil

        proc = psutil.Process(self.pid)
        while True:
            try:
                own = proc.memory_info().rss
                total = own
                for child in proc.children(recursive=True):
                    try:
                        rss = child.memory_info().rss
                    except (psutil.NoSuchProcess, psutil.AccessDenied):
                        continue
                    total += rss
                    self.children[child.pid] = max(self.children.get(child.pid, 0), rss)
                    self.peak_child = max(self.peak_child, rss)
            except psutil.NoSuchProcess:
                return
            self.peak_self = max(self.peak_self, own)
            self.peak = max(self.peak, total)
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> "PeakMemory":
        import psutil

        self.baseline = psutil.Process(self.pid).memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True, name="peak-rss")
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


# --------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------
def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items() if k != "value"}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(name: str, payload: dict[str, Any], *, quick: bool = False) -> Path:
    """Write ``results_dir()/<name>.json`` atomically, with :func:`machine_info` and the mode added.

    ``Timing`` values lose their ``value`` entry; NumPy scalars and arrays become
    plain JSON; NaN and infinity become ``null``.
    """
    path = results_dir() / f"{name}.json"
    doc = {"benchmark": name, "quick": bool(quick), "machine": machine_info(), **payload}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{name}.", suffix=".json.tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(_jsonable(doc), f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
    return path


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """Load a results JSON file."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def headline_row(what: str, seconds: float | None, reference: str | None = None,
                 reference_seconds: float | None = None, **extra: Any) -> dict[str, Any]:
    """One row of a module's ``headline`` list: our time, the reference's, and the ratio."""
    row: dict[str, Any] = {"what": what, "seconds": seconds}
    if reference is not None:
        row["reference"] = reference
        row["reference_seconds"] = reference_seconds
        row["speedup"] = (reference_seconds / seconds) if (seconds and reference_seconds) else None
    row.update(extra)
    return row


def fmt_seconds(s: float | None) -> str:
    """``1.23 s`` / ``45.6 ms`` / ``789 us``; ``-`` for None."""
    if s is None or (isinstance(s, float) and not math.isfinite(s)):
        return "-"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.1f} ms"
    return f"{s * 1e6:.0f} us"


def fmt_bytes(n: float | None) -> str:
    """Human-readable bytes (KiB, MiB, GiB)."""
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if not math.isfinite(v):
            return "-"
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Plain aligned text table of ``rows`` (dicts); columns default to the first row's keys."""
    if not rows:
        return "(no rows)"
    cols = list(columns or rows[0].keys())
    cells = [[_cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """GitHub Markdown table of ``rows`` (dicts)."""
    if not rows:
        return "_(no rows)_"
    cols = list(columns or rows[0].keys())
    out = ["| " + " | ".join(cols) + " |", "| " + " | ".join("---" for _ in cols) + " |"]
    for r in rows:
        out.append("| " + " | ".join(_cell(r.get(c)).replace("|", "\\|") for c in cols) + " |")
    return "\n".join(out)


# --------------------------------------------------------------------------------------
# fits and plots
# --------------------------------------------------------------------------------------
def fit_exponent(x: Iterable[float], y: Iterable[float]) -> dict[str, float]:
    """Least-squares fit of ``log y = a log x + b``: the growth exponent ``a``.

    ``a`` near 1 is linear growth, near 0 constant. Non-positive points are
    dropped. Returns ``{"exponent": a, "intercept": b, "r2": R^2, "points": n}``
    (exponent NaN with fewer than two usable points).
    """
    xa = np.asarray(list(x), dtype=float)
    ya = np.asarray(list(y), dtype=float)
    ok = (xa > 0) & (ya > 0) & np.isfinite(xa) & np.isfinite(ya)
    xa, ya = np.log(xa[ok]), np.log(ya[ok])
    if len(xa) < 2 or np.ptp(xa) == 0:
        return {"exponent": float("nan"), "intercept": float("nan"), "r2": float("nan"), "points": int(len(xa))}
    a, b = np.polyfit(xa, ya, 1)
    pred = a * xa + b
    ss_res = float(((ya - pred) ** 2).sum())
    ss_tot = float(((ya - ya.mean()) ** 2).sum())
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    return {"exponent": float(a), "intercept": float(b), "r2": float(r2), "points": int(len(xa))}


def fit_power_offset(x: Iterable[float], y: Iterable[float], kmin: float = -1.5, kmax: float = 3.0,
                     step: float = 0.01) -> dict[str, Any]:
    """Fit ``y = a + b * x**k`` with ``a, b >= 0``: a fixed cost ``a`` plus a power law.

    A plain log-log slope (:func:`fit_exponent`) of timings whose small sizes
    are dominated by a fixed cost (opening stores, building the Dask graph,
    loading a model) comes out too low; this fit separates the two. ``k`` is
    searched on a grid (``kmin..kmax`` by ``step``); for each ``k``, ``a`` and
    ``b`` solve a least-squares problem in *relative* error (residuals divided
    by ``y``: timing noise is multiplicative), constrained to be non-negative.

    Returns
    -------
    dict
        ``exponent`` (k), ``fixed`` (a, seconds), ``coef`` (b), ``rel_rms``
        (root-mean-square relative residual), ``fixed_share_min`` / ``fixed_share_max``
        (a / fitted y at the smallest / largest x), ``varying_share_max`` (the
        ``b x**k`` part's share at the largest x: near 0 means the series is
        flat and ``k`` means nothing), ``varying_share_peak`` (the same share at
        whichever end of the range it is largest: the smallest x for a
        decreasing power, ``k < 0``), ``points``. NaNs with fewer than three
        usable points.
    """
    xa = np.asarray(list(x), dtype=float)
    ya = np.asarray(list(y), dtype=float)
    ok = (xa > 0) & (ya > 0) & np.isfinite(xa) & np.isfinite(ya)
    xa, ya = xa[ok], ya[ok]
    nan = float("nan")
    out: dict[str, Any] = {"exponent": nan, "fixed": nan, "coef": nan, "rel_rms": nan,
                           "fixed_share_min": nan, "fixed_share_max": nan, "varying_share_max": nan,
                           "varying_share_peak": nan, "points": int(len(xa))}
    if len(xa) < 3 or np.ptp(xa) == 0:
        return out
    w = 1.0 / ya
    xs = xa / xa.max()                      # scale x so x**k stays finite for every k on the grid
    best = None
    for k in np.arange(kmin, kmax + step / 2, step):
        p = xs ** k
        cands = []
        A = np.stack([w, p * w], axis=1)
        sol, *_ = np.linalg.lstsq(A, np.ones_like(ya), rcond=None)
        if sol[0] >= 0 and sol[1] >= 0:
            cands.append((sol[0], sol[1]))
        # boundary solutions: pure power law (a = 0) or pure constant (b = 0)
        pw = p * w
        cands.append((0.0, max(0.0, float(pw @ np.ones_like(ya)) / float(pw @ pw))))
        cands.append((max(0.0, float(w.sum()) / float(w @ w)), 0.0))
        for a, b in cands:
            r = (a + b * p) * w - 1.0
            sse = float(r @ r)
            if best is None or sse < best[0] - 1e-15:
                best = (sse, float(k), float(a), float(b))
    sse, k, a, b = best
    fit_min = a + b * (xa.min() / xa.max()) ** k
    fit_max = a + b
    out.update(exponent=k, fixed=a, coef=float(b / xa.max() ** k), rel_rms=math.sqrt(sse / len(xa)),
               fixed_share_min=float(a / fit_min) if fit_min > 0 else nan,
               fixed_share_max=a / fit_max if fit_max > 0 else nan,
               varying_share_max=b / fit_max if fit_max > 0 else nan,
               varying_share_peak=float(max(1.0 - a / fit_min if fit_min > 0 else nan,
                                            b / fit_max if fit_max > 0 else nan)))
    return out


def plot_loglog(path: str | os.PathLike, series: dict[str, tuple[Sequence[float], Sequence[float]]], *,
                xlabel: str, ylabel: str = "seconds", title: str = "", fit: bool = True) -> Path:
    """Log-log plot of several ``label -> (x, y)`` series, each with its fitted slope in the legend.

    Written atomically as PNG (matplotlib, Agg backend). Returns the path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
    for i, (label, (x, y)) in enumerate(series.items()):
        xa, ya = np.asarray(x, float), np.asarray(y, float)
        ok = (xa > 0) & (ya > 0)
        if not ok.any():
            continue
        text = label
        line, = ax.plot(xa[ok], ya[ok], "o-", label=label)
        if fit and ok.sum() >= 2:
            f = fit_exponent(xa[ok], ya[ok])
            xs = np.geomspace(xa[ok].min(), xa[ok].max(), 20)
            ax.plot(xs, np.exp(f["intercept"]) * xs ** f["exponent"], "--", color=line.get_color(), alpha=0.6)
            line.set_label(f"{text} (slope {f['exponent']:.2f})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def save_figure(fig: Any, path: Path) -> Path:
    """Lay out ``fig``, write it to ``path`` atomically (temp file + rename) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------
def bench_parser(name: str, description: str) -> argparse.ArgumentParser:
    """Argument parser every benchmark module starts from: ``--quick`` and ``--repeat``."""
    p = argparse.ArgumentParser(prog=f"python -m benchmarks.{name}", description=description)
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test, numbers are meaningless")
    p.add_argument("--repeat", type=int, default=None, help="timed runs per measurement (best is kept)")
    return p


@contextmanager
def quiet_progress() -> Iterator[None]:
    """Hide isle-fast progress bars inside the block (benchmarks print their own tables)."""
    old = os.environ.get("ISLE_PROGRESS")
    os.environ["ISLE_PROGRESS"] = "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("ISLE_PROGRESS", None)
        else:
            os.environ["ISLE_PROGRESS"] = old


def log(msg: str) -> None:
    """Progress line on stderr (tables go to stdout)."""
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------
# synthetic VOC-like data, written straight into stores
# --------------------------------------------------------------------------------------
#: Side of the coarse cells the synthetic label maps are drawn on (pixels).
SYNTH_CELL = 10


def synth_shapes(n_images: int, max_side: int, seed: int = 0) -> np.ndarray:
    """VOC-like true image shapes: mostly landscape ``(0.66..1) * max_side x max_side``, some portrait."""
    rng = np.random.default_rng(seed)
    short = rng.integers(int(max_side * 0.66), max_side + 1, size=n_images)
    portrait = rng.random(n_images) < 0.3
    h = np.where(portrait, max_side, short)
    w = np.where(portrait, short, max_side)
    return np.stack([h, w], axis=1).astype(np.int64)


def synth_quality(n_sets: int, num_classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per (set, class) error rates of the synthetic sets: cell miss rate and object confusion rate.

    Drawn independently per set and class, so each set is best on different
    classes (what ISLE exploits).
    """
    rng = np.random.default_rng(seed + 7919)
    miss = rng.uniform(0.02, 0.35, size=(n_sets, num_classes))
    confuse = rng.uniform(0.0, 0.15, size=(n_sets, num_classes))
    miss[:, 0] = rng.uniform(0.0, 0.05, size=n_sets)
    return miss, confuse


def synth_block(seed: int, shapes: np.ndarray, padded: tuple[int, int], num_classes: int, n_sets: int,
                quality: tuple[np.ndarray, np.ndarray] | None = None, max_objects: int = 3,
                ) -> tuple[np.ndarray, list[np.ndarray]]:
    """Ground truth and ``n_sets`` pseudo-label sets for a run of images, vectorised.

    Objects are axis-aligned rectangles on a coarse grid (``SYNTH_CELL`` pixels),
    upsampled; ground truth gets a 2-pixel ``255`` boundary like VOC's; each set
    jitters object extents by one cell, confuses whole objects and misses cells
    at its own per-class rates (:func:`synth_quality`). Everything outside an
    image's true shape is ``255`` (padding).

    Returns
    -------
    gt : (n, H, W) uint8
    sets : list of (n, H, W) uint8
    """
    rng = np.random.default_rng(seed)
    n = len(shapes)
    H, W = padded
    cell = SYNTH_CELL
    gh, gw = -(-H // cell), -(-W // cell)
    miss, confuse = quality if quality is not None else synth_quality(n_sets, num_classes)
    yy = np.arange(gh)[None, :, None]
    xx = np.arange(gw)[None, None, :]
    hc = np.maximum(1, shapes[:, 0] // cell)[:, None, None]
    wc = np.maximum(1, shapes[:, 1] // cell)[:, None, None]
    gt_c = np.zeros((n, gh, gw), np.uint8)
    sets_c = [np.zeros((n, gh, gw), np.uint8) for _ in range(n_sets)]
    n_obj = rng.integers(1, max_objects + 1, size=n)
    fg = max(1, num_classes - 1)
    for j in range(max_objects):
        present = (n_obj > j)[:, None, None]
        cls = rng.integers(1, num_classes, size=n).astype(np.uint8) if num_classes > 1 else np.zeros(n, np.uint8)
        fy = np.sort(rng.random((n, 2)), axis=1)
        fx = np.sort(rng.random((n, 2)), axis=1)
        y0 = (fy[:, 0] * hc[:, 0, 0] * 0.8).astype(int)[:, None, None]
        y1 = np.maximum(y0 + 2, (fy[:, 1] * hc[:, 0, 0]).astype(int)[:, None, None])
        x0 = (fx[:, 0] * wc[:, 0, 0] * 0.8).astype(int)[:, None, None]
        x1 = np.maximum(x0 + 2, (fx[:, 1] * wc[:, 0, 0]).astype(int)[:, None, None])
        box = present & (yy >= y0) & (yy < y1) & (xx >= x0) & (xx < x1)
        gt_c = np.where(box, cls[:, None, None], gt_c)
        for s in range(n_sets):
            jit = rng.integers(-1, 2, size=(4, n))[:, :, None, None]
            sbox = (present & (yy >= y0 + jit[0]) & (yy < y1 + jit[1])
                    & (xx >= x0 + jit[2]) & (xx < x1 + jit[3]))
            other = ((cls.astype(np.int64) - 1 + rng.integers(1, max(2, fg), size=n)) % fg + 1).astype(np.uint8)
            scls = np.where(rng.random(n) < confuse[s, cls], other, cls).astype(np.uint8)
            sets_c[s] = np.where(sbox, scls[:, None, None], sets_c[s])
    for s in range(n_sets):
        drop = rng.random((n, gh, gw)) < miss[s][sets_c[s]]
        sets_c[s][drop] = 0

    def up(a: np.ndarray) -> np.ndarray:
        return np.repeat(np.repeat(a, cell, axis=1), cell, axis=2)[:, :H, :W]

    rows = np.arange(H)[None, :, None] < shapes[:, 0][:, None, None]
    cols = np.arange(W)[None, None, :] < shapes[:, 1][:, None, None]
    outside = ~(rows & cols)
    gt = up(gt_c)
    edge = np.zeros(gt.shape, bool)
    edge[:, 1:, :] |= gt[:, 1:, :] != gt[:, :-1, :]
    edge[:, :, 1:] |= gt[:, :, 1:] != gt[:, :, :-1]
    edge[:, :-1, :] |= edge[:, 1:, :]
    edge[:, :, :-1] |= edge[:, :, 1:]
    gt[edge | outside] = 255
    sets = []
    for s in range(n_sets):
        a = up(sets_c[s])
        a[outside] = 255
        sets.append(a)
    return gt, sets


def make_label_stores(root: str | os.PathLike, n_images: int, *, n_sets: int = 4, max_side: int = 500,
                      num_classes: int = 21, seed: int = 0, chunk_images: int | None = None,
                      workers: int = 2, classes: Sequence[str] | None = None) -> dict[str, Any]:
    """Generate (or reuse) a synthetic data set as stores: ``gt.zarr`` + ``set0..set{N-1}.zarr``.

    Stores are written block by block with :func:`isle_fast.stores.stack.create_stack`
    (default compression and chunking unless ``chunk_images`` is given) and
    committed; a folder whose stores all open as complete is reused as is (the
    parameters are part of the folder name under ``root``).

    Returns
    -------
    dict
        ``{"root", "gt", "sets": [paths], "images", "padded", "classes",
        "generated": bool, "seconds", "stored_bytes", "raw_bytes"}``.
    """
    from concurrent.futures import ThreadPoolExecutor

    from isle_fast.stores.stack import VOC_CLASSES, create_stack, open_stack

    if classes is None:
        classes = list(VOC_CLASSES) if num_classes == len(VOC_CLASSES) else (
            ["background"] + [f"class{c}" for c in range(1, num_classes)])
    classes = list(classes)
    tag = f"synth-n{n_images}-s{max_side}-C{num_classes}-N{n_sets}-k{chunk_images or 'auto'}-seed{seed}-v1"
    folder = Path(root) / tag
    gt_path = folder / "gt.zarr"
    set_paths = [folder / f"set{s}.zarr" for s in range(n_sets)]
    info: dict[str, Any] = {"root": str(folder), "gt": str(gt_path), "sets": [str(p) for p in set_paths],
                            "images": n_images, "padded": (max_side, max_side), "classes": classes}
    t0 = time.perf_counter()
    try:
        stacks = [open_stack(p) for p in [gt_path, *set_paths]]
        from isle_fast.stores.stack import default_compressors
        want = [c.to_dict() for c in default_compressors()]
        if any([c.to_dict() for c in st.array.compressors] != want for st in stacks):
            raise ValueError("written with other compressors than today's default: regenerate")
        info["generated"] = False
    except Exception:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
        shapes = synth_shapes(n_images, max_side, seed)
        ids = [f"{i:06d}" for i in range(n_images)]
        quality = synth_quality(n_sets, num_classes, seed)
        chunks = None if chunk_images is None else (chunk_images, max_side, max_side)
        prov = {"generator": "benchmarks.common.make_label_stores", "seed": seed}
        writers = [create_stack(gt_path, kind="gt", classes=classes, ids=ids, shapes=shapes, chunks=chunks,
                                name="gt", provenance=prov)]
        writers += [create_stack(p, kind="pseudo", classes=classes, ids=ids, shapes=shapes, chunks=chunks,
                                 name=f"set{s}", provenance=prov) for s, p in enumerate(set_paths)]
        k = writers[0].array.chunks[0]

        def one(b: int) -> None:
            start = b * k
            stop = min(n_images, start + k)
            gt, sets = synth_block(seed * 1_000_003 + b, shapes[start:stop], (max_side, max_side),
                                   num_classes, n_sets, quality)
            writers[0].write_block(start, gt)
            for w, a in zip(writers[1:], sets):
                w.write_block(start, a)

        try:
            with ThreadPoolExecutor(max(1, workers)) as pool:
                list(pool.map(one, range(-(-n_images // k))))
            stacks = [w.commit() for w in writers]
        except BaseException:
            for w in writers:
                w.abort()
            raise
        info["generated"] = True
    info["seconds"] = time.perf_counter() - t0
    info["stored_bytes"] = int(sum(s.stored_bytes() for s in stacks))
    info["raw_bytes"] = int(sum(int(np.prod(s.array.shape)) for s in stacks))
    info["chunks"] = list(stacks[0].chunks)
    return info


# --------------------------------------------------------------------------------------
# reference implementations (what the public WSSS code does), timed next to ours
# --------------------------------------------------------------------------------------
def voc_palette() -> list[int]:
    """The PASCAL VOC colour map as a flat 768-entry PIL palette."""
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


def export_pngs(stores: dict[str, str], folder: str | os.PathLike, n_images: int | None = None) -> dict[str, Any]:
    """Write the (unpadded) label maps of ``stores`` (``name -> path``) as VOC palette PNGs, cached.

    ``folder/<name>/<id>.png``; a ``done.json`` marker makes a second call a no-op.
    Returns ``{"folder", "ids", "seconds"}``.
    """
    from PIL import Image

    from isle_fast.stores.stack import open_stack

    folder = Path(folder)
    marker = folder / "done.json"
    if marker.exists():
        return read_json(marker)
    t0 = time.perf_counter()
    pal = voc_palette()
    ids: list[str] = []
    for name, path in stores.items():
        st = open_stack(path)
        n = st.num_images if n_images is None else min(n_images, st.num_images)
        ids = st.ids[:n]
        d = folder / name
        d.mkdir(parents=True, exist_ok=True)
        k = st.chunks[0]
        for start in range(0, n, k):
            block = np.asarray(st.array[start:min(n, start + k)])
            for j, a in enumerate(block):
                i = start + j
                h, w = (int(v) for v in st.shapes[i])
                im = Image.fromarray(np.ascontiguousarray(a[:h, :w]), mode="P")
                im.putpalette(pal)
                im.save(d / f"{st.ids[i]}.png")
    info = {"folder": str(folder), "ids": ids, "seconds": time.perf_counter() - t0}
    marker.write_text(json.dumps(info), encoding="utf-8")
    return info


def read_png(path: str | os.PathLike) -> np.ndarray:
    """A palette PNG's index array, as the public WSSS code reads it (``np.array(Image.open(p))``)."""
    from PIL import Image

    return np.array(Image.open(path))


def wsss_confusion(gt: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """The per-image confusion of the public WSSS repositories: a masked ``np.bincount``.

    ``mask = (gt >= 0) & (gt < C); bincount(C * gt[mask] + pred[mask], minlength=C*C)``,
    reshaped ``(C, C)`` (rows: gt class, columns: prediction).
    """
    c = num_classes
    mask = (gt >= 0) & (gt < c)
    return np.bincount(c * gt[mask].astype(int) + pred[mask], minlength=c * c).reshape(c, c)


def wsss_evaluate_pngs(folder: str | os.PathLike, ids: Sequence[str], set_names: Sequence[str],
                       num_classes: int) -> np.ndarray:
    """The public evaluation loop over PNG files: decode gt and each set with PIL, add the bincounts.

    Returns ``(N, C, C)`` int64 counts.
    """
    folder = Path(folder)
    hist = np.zeros((len(set_names), num_classes, num_classes), np.int64)
    for i in ids:
        gt = read_png(folder / "gt" / f"{i}.png")
        for n, name in enumerate(set_names):
            hist[n] += wsss_confusion(gt, read_png(folder / name / f"{i}.png"), num_classes)
    return hist


def numpy_merge_image(preds: Sequence[np.ndarray], selection: np.ndarray, priority: np.ndarray,
                      num_classes: int) -> np.ndarray:
    """Plain NumPy Algorithm 3 for one image (label maps), the ``score`` overlap policy.

    Class ``c`` (c >= 1) takes the pixels where the set chosen for it,
    ``preds[selection[c]]``, says ``c``; where several chosen classes claim a
    pixel the claim with the higher ``priority[selection[c], c]`` wins (ties:
    lower class); unclaimed pixels are background, or 255 where every set
    abstains (value >= C). This is the contract of ``merge_labels``, written
    as the obvious per-class loop.
    """
    c = num_classes
    order = sorted(range(1, c), key=lambda k: (priority[selection[k], k], -k))
    out = np.zeros(preds[0].shape, np.uint8)
    claimed = np.zeros(preds[0].shape, bool)
    for k in order:
        m = preds[int(selection[k])] == k
        out[m] = k
        claimed |= m
    abstain = np.ones(preds[0].shape, bool)
    for p in preds:
        abstain &= p >= c
    out[~claimed & abstain] = 255
    return out
