"""PNG export on worker processes (isle_fast.stores.export): exact label maps, every chunk layout."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from isle_fast import cli
from isle_fast.cli import main
from isle_fast.ensemble.report import export_pngs
from isle_fast.errors import InputError
from isle_fast.stores.export import png_options
from tests import reference as ref
from tests.conftest import write_stack

REPO = Path(__file__).resolve().parents[1]


def _read(folder: Path, image_id: str) -> np.ndarray:
    with Image.open(folder / f"{image_id}.png") as im:
        assert im.mode == "P"
        return np.asarray(im)


@settings(max_examples=15, deadline=None)
@given(data=st.data(), workers=st.sampled_from([1, 2]), compress=st.sampled_from(["rle", "0", "1", "6", "9"]))
def test_export_equals_the_store(tmp_path_factory, data, workers, compress):
    """Odd sizes, chunks of several images or spatial tiles, 255 and padding: every PNG is the stored map."""
    root = tmp_path_factory.mktemp("e")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31)))
    n = data.draw(st.integers(1, 9))
    images = [rng.integers(0, 21, size=(int(rng.integers(1, 30)), int(rng.integers(1, 30)))).astype(np.uint8)
              for _ in range(n)]
    for a in images:
        a[rng.random(a.shape) < 0.1] = 255
    hp, wp = max(a.shape[0] for a in images), max(a.shape[1] for a in images)
    chunks = data.draw(st.sampled_from([(1, max(1, hp // 2), max(1, wp // 3)), (2, hp, wp), (n, hp, wp)]))
    st_ = write_stack(str(root / "s.zarr"), images, num_classes=21, chunks=chunks)
    res = export_pngs(st_, root / "out", progress=False, workers=workers, compress=compress)
    assert res["images"] == n and res["bytes"] > 0
    for i, a in zip(st_.ids, images):
        assert np.array_equal(_read(root / "out", i), a)


def test_export_scores_is_the_argmax_and_ids_with_folders(tmp_path):
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 256, size=(9 + i, 7, 5)).astype(np.uint8) for i in range(7)]
    images[0][:] = 17                               # all ties: class 0 wins
    ids = [f"d{i % 2}/x{i}" for i in range(7)]
    st_ = write_stack(str(tmp_path / "s.zarr"), images, encoding="scores", num_classes=5, ids=ids,
                      chunks=(3, 15, 7, 5))
    export_pngs(st_, tmp_path / "out", progress=False, workers=2, backend="cpu")
    for i, a in zip(ids, images):
        assert np.array_equal(_read(tmp_path / "out", i), ref.decode_scores(a))


def test_one_worker_and_two_write_the_same_files(tmp_path):
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 4, size=(40, 50)).astype(np.uint8) for _ in range(12)]
    st_ = write_stack(str(tmp_path / "s.zarr"), images, num_classes=21, chunks=(5, 40, 50))
    export_pngs(st_, tmp_path / "a", progress=False, workers=1)
    export_pngs(st_, tmp_path / "b", progress=False, workers=2)
    for i in st_.ids:
        assert (tmp_path / "a" / f"{i}.png").read_bytes() == (tmp_path / "b" / f"{i}.png").read_bytes()


def test_compress_choices():
    assert png_options("rle") == {"compress_level": 6, "compress_type": 3}
    assert png_options(1) == {"compress_level": 1}
    for bad in ("10", "fast", -1):
        with pytest.raises(InputError, match="^compress must be 'rle' or a zlib level") as info:
            png_options(bad)
        assert info.value.for_cli(cli.FLAGS).startswith("--compress-level must be")


def test_cli_compress_level(tmp_path, capsys):
    images = [np.full((6, 8), 3, np.uint8)] * 3
    write_stack(str(tmp_path / "s.zarr"), images, num_classes=21)
    assert main(["export", str(tmp_path / "s.zarr"), "--out", str(tmp_path / "o"),
                 "--compress-level", "9"]) == 0
    out = capsys.readouterr().out
    assert "compression 9" in out and "images/s" in out
    with pytest.raises(SystemExit) as exc:
        main(["export", str(tmp_path / "s.zarr"), "--out", str(tmp_path / "p"), "--compress-level", "11"])
    assert exc.value.code == 2 and not (tmp_path / "p").exists()


_SLOW_SAVES = r"""
import sys, time
from isle_fast.stores import png
_orig = png.encode_palette_png
def _slow(*a, **k):
    time.sleep(0.01)
    return _orig(*a, **k)
png.encode_palette_png = _slow   # export encodes every PNG with it (in the worker processes too)
from isle_fast.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_cli_export_worker_killed_then_rerun(tmp_path):
    """A worker SIGKILLed mid-export: exit 1, one line, no output or temporary left; a re-run works."""
    import psutil

    rng = np.random.default_rng(4)
    images = [rng.integers(0, 21, size=(30, 30)).astype(np.uint8) for _ in range(300)]
    write_stack(str(tmp_path / "s.zarr"), images, num_classes=21, chunks=(10, 30, 30))
    out = tmp_path / "out"
    argv = ["export", str(tmp_path / "s.zarr"), "--out", str(out), "--quiet", "--workers", "2"]
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_SAVES, *argv], cwd=REPO, stderr=subprocess.PIPE,
                            env=dict(os.environ, ISLE_PROGRESS="0"))
    t0 = time.monotonic()
    while not any(p.suffix == ".png" for t in tmp_path.glob("out.tmp-*") for p in t.iterdir()):
        assert proc.poll() is None and time.monotonic() - t0 < 60, "export never started writing"
        time.sleep(0.01)
    os.kill(psutil.Process(proc.pid).children()[0].pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    assert "Traceback" not in err.decode() and "worker process" in err.decode().strip().splitlines()[-1]
    assert not out.exists() and not list(tmp_path.glob("out.tmp-*"))
    assert main(argv) == 0
    assert len(list(out.glob("*.png"))) == 300


def test_blocks_in_memory_write_the_files_the_export_writes(tmp_path):
    """``LabelPngWriter`` (isle run's fused export) writes what ``export_pngs`` writes; refuses cut images."""
    from isle_fast.stores.export import LabelPngWriter

    rng = np.random.default_rng(5)
    images = [rng.integers(0, 4, size=(int(rng.integers(20, 41)), int(rng.integers(20, 51)))).astype(np.uint8)
              for _ in range(12)]
    st_ = write_stack(str(tmp_path / "s.zarr"), images, num_classes=21, chunks=(5, 40, 50))
    export_pngs(st_, tmp_path / "a", progress=False, workers=1)
    (tmp_path / "b").mkdir()
    w = LabelPngWriter(tmp_path / "b", [f"{i}.png" for i in st_.ids], st_.shapes)
    arr = np.asarray(st_.array[:])
    assert w.write(0, arr[:7]) > 0 and w.write(7, arr[7:]) > 0
    assert w.images == 12
    for i in st_.ids:
        assert (tmp_path / "a" / f"{i}.png").read_bytes() == (tmp_path / "b" / f"{i}.png").read_bytes()
    with pytest.raises(ValueError, match="cuts"):
        w.write(0, np.ascontiguousarray(arr[:2, :10, :10]))
    with pytest.raises(ValueError, match="outside"):
        w.write(11, arr[:2])
