"""Progress in images (issue 19): tqdm on a terminal, plain lines in a log file, one bar for merge."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests._pty import on_terminal
from tests.conftest import write_stack

ROOT = Path(__file__).resolve().parents[1]


def _stores(root: Path, n: int = 24) -> list[str]:
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 4, size=(20, 24)).astype(np.uint8) for _ in range(n)]
    write_stack(str(root / "gt.zarr"), imgs, kind="gt", num_classes=4, chunks=(4, 20, 24))
    paths = []
    for s in range(2):
        noisy = [np.where(rng.random(a.shape) < 0.5 + 0.2 * s, a, (a + 1) % 4).astype(np.uint8) for a in imgs]
        write_stack(str(root / f"s{s}.zarr"), noisy, num_classes=4, chunks=(4, 20, 24), name=f"s{s}")
        paths.append(str(root / f"s{s}.zarr"))
    return paths


def _merge_argv(root: Path) -> list[str]:
    return [sys.executable, "-m", "isle_fast", "merge", *_stores(root), "--gt", str(root / "gt.zarr"),
            "-o", str(root / "e.zarr")]


def _env() -> dict:
    env = dict(os.environ, ISLE_PROGRESS="1", PYTHONPATH=str(ROOT))
    env.pop("DASK_SCHEDULER", None)
    return env


def test_log_file_gets_plain_lines_with_rate_and_eta(monkeypatch):
    from isle_fast import progress as P

    out = io.StringIO()
    monkeypatch.setenv("ISLE_PROGRESS", "1")
    monkeypatch.setattr(P.sys, "stderr", out)
    monkeypatch.setattr(P, "LOG_EVERY", 0.0)  # every update is "10 s later"
    with P.progress(total=40, desc="evaluate", unit="img") as bar:
        assert bar.log_mode
        bar.update(10)
        bar.advance(2.5)
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and len(lines) == 3, lines
    assert lines[0].startswith("evaluate: 10/40 img (25%), ") and "img/s" in lines[0] and "ETA" in lines[0]
    assert lines[1].startswith("evaluate: 12/40 img (31%)")
    assert lines[2].startswith("evaluate: 12/40 img, ") and "done in" in lines[2]


def test_one_bar_takes_the_passes_as_stages(monkeypatch):
    from isle_fast import progress as P

    out = io.StringIO()
    monkeypatch.setenv("ISLE_PROGRESS", "1")
    monkeypatch.setattr(P.sys, "stderr", out)
    with P.one_bar("merge", units=10, stages=2) as bar:
        with P.progress(total=3, desc="evaluate", unit="chunk") as inner:
            inner.update(3)
            assert bar.n == 10 and bar.desc == "merge (evaluate, pass 1/2)"
        with P.progress(total=4, desc="merge", unit="img") as inner:
            inner.update(2)
            assert bar.n == 15
        with P.progress(total=5, desc="score") as inner:  # a third pass: the bar grows
            pass
        assert bar.total == 30 and bar.n == 30
    assert out.getvalue().splitlines()[-1].startswith("merge: 3 passes over 10 img, ")


def test_merge_in_a_log_file_writes_lines_in_images(tmp_path):
    log = tmp_path / "merge.log"
    with open(log, "w") as err:
        proc = subprocess.run(_merge_argv(tmp_path), stdout=subprocess.PIPE, stderr=err, env=_env(),
                              cwd=ROOT, timeout=300, text=True)
    text = log.read_text()
    assert proc.returncode == 0, text
    assert "\r" not in text and "task" not in text, text
    lines = text.splitlines()
    assert lines and all(ln.startswith("merge") for ln in lines), lines
    assert lines[-1].startswith("merge: 3 passes over 24 img, ") and "done in" in lines[-1], lines
    # which lines come before the last depends on timing (a line at each tenth, at most one a second)
    step = re.compile(r"^merge \((evaluate, )?pass [123]/3\): \d+/72 img \(\d+%\), ")
    assert all(step.match(ln) for ln in lines[:-1]), lines


def test_merge_on_a_terminal_shows_one_bar_in_images(tmp_path):
    # stderr on the terminal, stdout not: the bar is drawn on stderr
    rc, text, _ = on_terminal(_merge_argv(tmp_path), timeout=120, stdout=False, env={"DASK_SCHEDULER": None})
    assert rc == 0, text
    frames = [f for f in text.replace("\n", "\r").split("\r") if f.strip() and "\x1b" not in f[:1]]
    assert frames, text
    assert "task" not in text and "img" in text, text
    assert all(f.lstrip().startswith("merge") for f in frames), frames  # one bar, named merge
    assert any("/72" in f for f in frames), frames
    assert "done in" not in text  # the terminal gets tqdm's frames, not the log lines


@pytest.mark.parametrize("stages", [1, 3])
def test_quiet_shows_no_bar(monkeypatch, stages):
    from isle_fast import progress as P

    out = io.StringIO()
    monkeypatch.setattr(P.sys, "stderr", out)
    with P.one_bar("merge", units=5, stages=stages, quiet=True):
        with P.progress(total=5, desc="x") as bar:
            bar.update(5)
    assert out.getvalue() == ""
