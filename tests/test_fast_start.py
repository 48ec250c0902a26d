"""A fast start: commands import what they use, when they use it.

``isle evaluate`` on local stores reaches its first chunk task without
importing Dask, Zarr, Numba or ``distributed`` (they cost about 0.7 s of a
2,400-image run before: ``python -m benchmarks.e2e``, ``fast_start``); no
command imports ``distributed`` unless a cluster is used. The times
themselves are measured by the benchmark, not asserted here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import write_stack

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("dask", "dask.array", "zarr", "numba", "distributed", "torch")

_PROBE = r"""
import json, sys
import isle_fast.ensemble.evaluate as E
seen = {}
orig = E._confusion_block
def probe(*a, **k):
    seen.setdefault("first_task", sorted(m for m in HEAVY if m in sys.modules))
    return orig(*a, **k)
E._confusion_block = probe
from isle_fast.cli import main
rc = main(sys.argv[1:])
seen["end"] = sorted(m for m in HEAVY if m in sys.modules)
print("PROBE " + json.dumps(seen))
sys.exit(rc)
"""


def _stores(root: Path, n_sets: int = 3) -> list[str]:
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 5, size=(20, 24)).astype(np.uint8) for _ in range(10)]
    write_stack(str(root / "gt.zarr"), imgs, kind="gt", num_classes=5, chunks=(4, 20, 24))
    paths = []
    for s in range(n_sets):
        write_stack(str(root / f"s{s}.zarr"), [np.roll(a, s, axis=1) for a in imgs], num_classes=5,
                    chunks=(4, 20, 24), name=f"s{s}")
        paths.append(str(root / f"s{s}.zarr"))
    return paths


def _probe(argv: list[str]) -> dict:
    code = f"HEAVY = {HEAVY!r}\n" + _PROBE
    env = dict(os.environ, ISLE_PROGRESS="0")
    env.pop("DASK_SCHEDULER", None)
    proc = subprocess.run([sys.executable, "-c", code, *argv], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE "))
    return json.loads(line[6:])


def test_evaluate_reaches_its_first_task_without_heavy_imports(tmp_path):
    sets = _stores(tmp_path)
    seen = _probe(["evaluate", *sets, "--gt", str(tmp_path / "gt.zarr"), "--quiet",
                   "--json", str(tmp_path / "e.json")])
    assert seen["first_task"] == [], seen          # Numba loads inside the task, with the kernels
    assert set(seen["end"]) == {"numba"}, seen     # no Dask, Zarr or distributed at all
    assert json.loads((tmp_path / "e.json").read_text())["selection"]


def test_merge_never_imports_distributed(tmp_path):
    sets = _stores(tmp_path)
    seen = _probe(["merge", *sets, "--gt", str(tmp_path / "gt.zarr"), "--out", str(tmp_path / "e.zarr"),
                   "--quiet"])
    assert "distributed" not in seen["end"] and "torch" not in seen["end"], seen


def test_backend_choice_imports_nothing_heavy(tmp_path):
    """Without CuPy, choosing the backend imports neither Numba nor anything else heavy."""
    import importlib.util

    if importlib.util.find_spec("cupy") is not None:
        pytest.skip("CuPy is installed: 'auto' has to ask the driver (through CuPy and numba.cuda)")
    code = ("import sys\nfrom isle_fast.backend import resolve_backend\nresolve_backend('auto')\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    env = dict(os.environ)
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    env.pop("ISLE_FORCE_CUDASIM", None)
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------ the fast open keeps every check of open_stack
def _damaged_copy(root: Path, tmp: Path, name: str) -> Path:
    import shutil

    dst = tmp / name
    shutil.copytree(root / "s1.zarr", dst)
    return dst


@pytest.mark.parametrize("damage", ["ids-flip", "ids-missing", "shapes-swap", "main-missing", "main-flip",
                                    "main-swap", "dup-ids", "manifest"])
def test_fast_open_and_local_pass_raise_store_errors(tmp_path, damage):
    """A store opened from its documents (no Zarr) fails exactly where open_stack through Zarr fails, and the
    local evaluate pass (direct reads) names a missing, damaged or swapped chunk."""
    from isle_fast.ensemble.evaluate import evaluate
    from isle_fast.errors import StoreError
    from isle_fast.stores import stack as S
    from isle_fast.stores.stack import open_stack

    root = tmp_path / "stores"
    root.mkdir()
    _stores(root)
    st = _damaged_copy(root, tmp_path, "d.zarr")
    assert open_stack(st)._group is None              # opened without Zarr
    if damage.startswith("ids") or damage == "shapes-swap" or damage == "dup-ids":
        arr = "shapes" if damage == "shapes-swap" else "ids"
        chunk = st / arr / "c" / "0"
        if damage == "ids-flip":
            raw = bytearray(chunk.read_bytes())
            raw[len(raw) // 2] ^= 0xFF
            chunk.write_bytes(bytes(raw))
        elif damage == "ids-missing":
            chunk.unlink()
        elif damage == "shapes-swap":
            (st / "shapes" / "c" / "0" / "0").write_bytes(b"\x00" * 12)
        else:
            import zarr

            g = zarr.open_group(str(st), mode="r+")
            ids = list(g["ids"][:])
            ids[1] = ids[0]
            g["ids"][:] = np.asarray(ids, dtype=object)
            from isle_fast.stores.chunks import record_manifests

            record_manifests(g)
        with pytest.raises(StoreError) as fast:
            open_stack(st)
        light, S._open_light = S._open_light, (lambda *a, **k: None)   # Zarr's path only
        try:
            with pytest.raises(StoreError) as slow:
                open_stack(st)
        finally:
            S._open_light = light
        assert str(fast.value) == str(slow.value)
        assert str(st) in str(fast.value)
        return
    if damage == "manifest":
        doc = json.loads((st / "labels" / "zarr.json").read_text())
        doc["attributes"]["isle_chunk_crc32c"] = doc["attributes"]["isle_chunk_crc32c"][:-1]
        (st / "labels" / "zarr.json").write_text(json.dumps(doc))
        with pytest.raises(StoreError, match="isle_chunk_crc32c"):
            open_stack(st)
        return
    chunks = sorted(p for p in (st / "labels").rglob("*") if p.is_file() and p.name != "zarr.json")
    if damage == "main-missing":
        chunks[0].unlink()
        want = "is missing"
    elif damage == "main-flip":
        raw = bytearray(chunks[0].read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        chunks[0].write_bytes(bytes(raw))
        want = "is damaged"
    else:
        a, b = chunks[0].read_bytes(), chunks[1].read_bytes()
        chunks[0].write_bytes(b)
        chunks[1].write_bytes(a)
        want = "is damaged"
    opened = open_stack(st)
    with pytest.raises(StoreError, match=f"{st}: array 'labels', chunk c/.* {want}"):
        evaluate([opened], str(root / "gt.zarr"), backend="cpu", progress=False)
