"""``python -m benchmarks [--quick] [--only NAME,...]``: run every benchmark, write one summary.

Each benchmark module that exists in this checkout (see :data:`MODULES`) runs
as ``python -m benchmarks.<name> [--quick]`` in its own process (a crash or a
memory spike in one cannot spoil the others, and each starts with a cold
heap), its printed tables are shown as they come, and at the end

* ``summary.json`` holds, per module: status, exit code, wall seconds, the
  result files it wrote, the ``headline`` rows of its JSON files and the tail
  of what it printed, plus the machine description;
* ``SUMMARY.md`` is the same as Markdown: one table of headline figures
  (ours, the reference measured in the same run, the ratio) and, for modules
  without a ``headline``, the last table they printed.

Both go to ``benchmarks/results/`` (or ``--out DIR``). ``isle bench`` runs
exactly this, from a source checkout or from an installed wheel, where the
modules are the package ``isle_fast_benchmarks`` (the same files) and the
results go to ``./benchmark-results/``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

#: Benchmark modules in the order they run; missing ones are reported as "not built".
MODULES: tuple[str, ...] = ("kernels", "ingest", "score_storage", "cams", "score_merge", "compression", "refine",
                            "train", "gpu", "scaling", "pipeline", "coco", "e2e", "selection", "strata_memory")

_HERE = Path(__file__).resolve().parent
#: ``benchmarks`` in a checkout (``python -m benchmarks``), ``isle_fast_benchmarks`` when installed
_PACKAGE = __package__ or "benchmarks"


def build_parser(prog: str = "python -m benchmarks") -> argparse.ArgumentParser:
    """Arguments shared by ``python -m benchmarks`` and ``isle bench``."""
    p = argparse.ArgumentParser(prog=prog, description="Run the isle-fast benchmarks and write a combined summary.")
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add ``--quick``, ``--only``, ``--out``, ``--timeout`` to ``p``."""
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes for every benchmark (a smoke test; the numbers mean nothing)")
    p.add_argument("--only", default=None, metavar="NAME,...",
                   help=f"comma-separated subset of: {', '.join(MODULES)}")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="results folder (default benchmarks/results in a checkout, ./benchmark-results when "
                        "installed)")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="stop a benchmark module that runs longer than this (reported as 'timeout')")
    p.add_argument("--summary-only", action="store_true",
                   help="run nothing: rebuild summary.json / SUMMARY.md from the results already there")


def available(name: str) -> bool:
    """Whether ``benchmarks/<name>.py`` exists in this checkout."""
    return (_HERE / f"{name}.py").is_file()


def _run_module(name: str, quick: bool, env: dict[str, str], timeout: float | None) -> dict[str, Any]:
    from .common import SOURCE_CHECKOUT

    cmd = [sys.executable, "-m", f"{_PACKAGE}.{name}"] + (["--quick"] if quick else [])
    print(f"\n=== benchmarks.{name}{' --quick' if quick else ''} ===", flush=True)
    t0 = time.perf_counter()
    lines: list[str] = []
    proc = subprocess.Popen(cmd, cwd=_HERE.parent if SOURCE_CHECKOUT else None, env=env,
                            stdout=subprocess.PIPE, stderr=None, text=True, bufsize=1)
    status = "ok"
    try:
        assert proc.stdout is not None
        deadline = None if timeout is None else t0 + timeout
        for line in proc.stdout:
            sys.stdout.write(line)
            lines.append(line.rstrip("\n"))
            if deadline is not None and time.perf_counter() > deadline:
                proc.kill()
                status = "timeout"
                break
        rc = proc.wait(timeout=None if timeout is None else max(1.0, timeout - (time.perf_counter() - t0)))
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = proc.wait()
        status = "timeout"
    except KeyboardInterrupt:
        proc.kill()
        proc.wait()
        raise
    if status == "ok" and rc != 0:
        status = "failed"
    return {"status": status, "returncode": rc, "seconds": time.perf_counter() - t0, "stdout_tail": lines[-60:]}


def _last_table(lines: Sequence[str]) -> list[str]:
    """The last block of consecutive non-empty lines printed (a module's final table)."""
    block: list[str] = []
    for line in reversed(lines):
        if line.strip():
            block.append(line)
        elif block:
            break
    return list(reversed(block))[-40:]


def main(argv: Sequence[str] | None = None, prog: str = "python -m benchmarks") -> int:
    """Run the selected benchmark modules; returns 0 when every one that exists succeeded."""
    args = build_parser(prog).parse_args(argv)
    return run(args)


def run(args: argparse.Namespace) -> int:
    """Run with parsed arguments (shared with ``isle bench``)."""
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in MODULES]
        if unknown:
            print(f"benchmarks: error: unknown benchmark(s) {', '.join(unknown)}; "
                  f"choose from {', '.join(MODULES)}", file=sys.stderr)
            return 2
    else:
        names = list(MODULES)

    env = dict(os.environ)
    if args.out:
        env["ISLE_BENCH_RESULTS"] = str(Path(args.out).resolve())
        os.environ["ISLE_BENCH_RESULTS"] = env["ISLE_BENCH_RESULTS"]
    env.setdefault("ISLE_PROGRESS", "0")

    from .common import SOURCE_CHECKOUT, machine_info, markdown_table, read_json, results_dir

    if SOURCE_CHECKOUT:  # the checkout's benchmarks/ and isle_fast/ come first, as for `python -m benchmarks`
        env["PYTHONPATH"] = os.pathsep.join([str(_HERE.parent), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)

    out_dir = results_dir()
    t_all = time.perf_counter()
    modules: dict[str, Any] = {}
    if getattr(args, "summary_only", False):
        names = []
    for name in names:
        if not available(name):
            print(f"\n=== benchmarks.{name}: not built in this checkout (skipped) ===", flush=True)
            modules[name] = {"status": "not built"}
            continue
        start = time.time() - 1.0
        res = _run_module(name, args.quick, env, args.timeout)
        files = sorted(p for p in out_dir.iterdir()
                       if p.is_file() and p.stat().st_mtime >= start and not p.name.startswith(".")
                       and p.name not in ("summary.json", "SUMMARY.md"))
        res["files"] = [str(p.relative_to(out_dir)) for p in files]
        headline: list[dict[str, Any]] = []
        for p in files:
            if p.suffix == ".json":
                try:
                    doc = read_json(p)
                except (OSError, ValueError):
                    continue
                for row in doc.get("headline", []) or []:
                    if isinstance(row, dict):
                        headline.append({"source": p.name, **row})
        res["headline"] = headline
        modules[name] = res

    # modules not run now: their latest results, if any, still belong in the summary
    for name in MODULES:
        if name in modules:
            continue
        prev = out_dir / f"{name}.json"
        if not prev.is_file():
            modules[name] = {"status": "not built" if not available(name) else "not run"}
            continue
        try:
            doc = read_json(prev)
        except (OSError, ValueError):
            modules[name] = {"status": "not run"}
            continue
        stem = name + "_"
        files = [prev.name] + sorted(p.name for p in out_dir.glob(f"{stem}*.png")) + (
            [f"{name}.png"] if (out_dir / f"{name}.png").is_file() else [])
        modules[name] = {"status": "earlier result", "quick": doc.get("quick"),
                         "measured_utc": (doc.get("machine") or {}).get("time_utc"), "files": files,
                         "headline": [{"source": prev.name, **r} for r in doc.get("headline", []) or []
                                      if isinstance(r, dict)]}
    modules = {n: modules[n] for n in MODULES if n in modules}

    summary = {"quick": bool(args.quick), "machine": machine_info(), "seconds": time.perf_counter() - t_all,
               "modules": modules}
    tmp = out_dir / ".summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, out_dir / "summary.json")
    md = _markdown(summary, markdown_table)
    tmp = out_dir / ".SUMMARY.md.tmp"
    tmp.write_text(md, encoding="utf-8")
    os.replace(tmp, out_dir / "SUMMARY.md")

    print("\n=== summary ===")
    for name, res in modules.items():
        sec = res.get("seconds")
        print(f"  {name:12s} {res['status']:10s} {'' if sec is None else f'{sec:7.1f} s'}")
    print(f"written: {out_dir / 'summary.json'}, {out_dir / 'SUMMARY.md'}")
    failed = [n for n, r in modules.items() if r["status"] in ("failed", "timeout")]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def _markdown(summary: dict[str, Any], markdown_table) -> str:
    m = summary["machine"]
    lines = ["# isle-fast benchmark summary", "",
             f"Generated by `python -m benchmarks{' --quick' if summary['quick'] else ''}` "
             f"on {m['time_utc']} (commit {m.get('git_commit') or '?'}).",
             f"Machine: {m['cpu']}, {m['usable_cores']} usable cores ({m['logical_cores']} logical), "
             f"{m['memory_gib']} GiB RAM, Python {m['python']}; 1-minute load average at the end "
             f"{m.get('load_average_1m')} (other work on the machine slows every figure).", ""]
    if summary["quick"]:
        lines += ["**Quick mode: tiny sizes, the numbers are a smoke test and mean nothing.**", ""]
    lines += ["| module | status | seconds |", "| --- | --- | --- |"]
    for name, res in summary["modules"].items():
        sec = res.get("seconds")
        lines.append(f"| {name} | {res['status']} | {'' if sec is None else f'{sec:.1f}'} |")
    lines.append("")
    for name, res in summary["modules"].items():
        if res["status"] in ("not built", "not run"):
            continue
        lines += [f"## {name}", ""]
        if res["status"] == "earlier result":
            lines += [f"Not run this time; results of `python -m benchmarks.{name}"
                      f"{' --quick' if res.get('quick') else ''}` measured {res.get('measured_utc')}.", ""]
        if res.get("headline"):
            cols: list[str] = []
            for row in res["headline"]:
                cols += [k for k in row if k not in cols]
            lines += [markdown_table(res["headline"], cols), ""]
        else:
            table = _last_table(res.get("stdout_tail", []))
            if table:
                lines += ["```", *table, "```", ""]
        pngs = sorted((f for f in res.get("files", []) if f.endswith(".png")),
                      key=lambda f: (not f.endswith("_overview.png"), f))   # an overview chart first
        if pngs:
            # images relative to SUMMARY.md (which sits next to them), so they show on GitHub
            lines += ["Plots (`benchmarks/results/`):", ""]
            lines += [f"![{Path(p).stem}]({p})" for p in pngs] + [""]
        if res["status"] not in ("ok", "earlier result"):
            lines += [f"Status: **{res['status']}** (exit code {res.get('returncode')}).", ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
