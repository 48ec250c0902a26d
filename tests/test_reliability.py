"""Reliability and scale-out: equivalence, faults, bad input, trust, memory (RELIABILITY.md lists each case).

Everything runs the real pipeline (``isle ingest`` -> ``isle evaluate`` /
``isle merge`` -> ``isle export``) on tiny data. The CLI is called in process
(``isle_fast.cli.main``) wherever a traceback would show: an exception that
escapes ``main`` fails the test, so "no traceback" is checked exactly; kills
run it in a subprocess.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from distributed import WorkerPlugin
from PIL import Image

from isle_fast import cli
from isle_fast.errors import StoreError
from isle_fast.stores.stack import VOC_CLASSES, create_stack, open_stack

REPO = Path(__file__).resolve().parents[1]
C = len(VOC_CLASSES)
N_SETS = 3
FEW = settings(max_examples=8, deadline=None,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


# --------------------------------------------------------------------------------------
# data and helpers
# --------------------------------------------------------------------------------------
def _palette() -> list[int]:
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


PALETTE = _palette()


def save_png(path: Path, labels: np.ndarray) -> None:
    im = Image.fromarray(labels.astype(np.uint8), mode="P")
    im.putpalette(PALETTE)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


def make_pngs(root: Path, n: int = 10, seed: int = 0, max_hw: tuple[int, int] = (36, 44)) -> dict[str, Path]:
    """gt + N_SETS pseudo-label PNG folders: blobs of a few classes, sets = gt with per-set noise."""
    rng = np.random.default_rng(seed)
    folders = {"gt": root / "gt", **{f"set{s}": root / f"set{s}" for s in range(N_SETS)}}
    for i in range(n):
        h = int(rng.integers(max_hw[0] // 2, max_hw[0] + 1))
        w = int(rng.integers(max_hw[1] // 2, max_hw[1] + 1))
        gt = np.zeros((h, w), np.uint8)
        for _ in range(int(rng.integers(1, 4))):
            y0, x0 = int(rng.integers(0, max(1, h - 4))), int(rng.integers(0, max(1, w - 4)))
            gt[y0:y0 + int(rng.integers(3, h // 2 + 3)), x0:x0 + int(rng.integers(3, w // 2 + 3))] = rng.integers(1, 8)
        gt_saved = gt.copy()
        gt_saved[rng.random((h, w)) < 0.03] = 255
        save_png(folders["gt"] / f"img{i:03d}.png", gt_saved)
        for s in range(N_SETS):
            p = gt.copy()
            noise = rng.random((h, w)) < 0.05 + 0.05 * s
            p[noise] = rng.integers(0, 8, size=int(noise.sum()))
            p[rng.random((h, w)) < 0.01 * s] = 255          # some abstentions
            save_png(folders[f"set{s}"] / f"img{i:03d}.png", p)
    return folders


def cli_run(argv: list[str], capsys) -> tuple[int, str, str]:
    """Run ``isle ARGV`` in process; an exception escaping ``main`` (a traceback) fails the test."""
    capsys.readouterr()
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_clean_error(rc: int, err: str, *needles: str) -> None:
    """Nonzero exit, a one-line ``isle ...: error: ...`` message naming what went wrong, no traceback."""
    assert rc != 0
    assert "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert lines, "no error message"
    assert re.match(r"^isle \w+: error: ", lines[-1]), err
    for n in needles:
        assert n.lower() in err.lower(), (n, err)


def ingest(folders: dict[str, Path], out: Path, capsys, chunks: dict[str, str] | None = None) -> dict[str, Path]:
    stores = {}
    chunks = chunks or {}
    gt = out / "gt.zarr"
    argv = ["ingest", "labels", folders["gt"], "--kind", "gt", "-o", gt, "-q"]
    rc, _, err = cli_run(argv + (["--chunks", chunks["gt"]] if "gt" in chunks else []), capsys)
    assert rc == 0, err
    stores["gt"] = gt
    for name, src in folders.items():
        if name == "gt":
            continue
        p = out / f"{name}.zarr"
        argv = ["ingest", "labels", src, "--gt", gt, "-o", p, "-q"]
        rc, _, err = cli_run(argv + (["--chunks", chunks[name]] if name in chunks else []), capsys)
        assert rc == 0, err
        stores[name] = p
    return stores


def set_paths(stores: dict[str, Path]) -> list[str]:
    return [str(stores[f"set{s}"]) for s in range(N_SETS)]


def run_pipeline(stores: dict[str, Path], out: Path, backend: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """evaluate + merge through the library; (counts, ensemble label array)."""
    from isle_fast.ensemble.evaluate import evaluate
    from isle_fast.ensemble.merge import merge

    ev = evaluate(set_paths(stores), str(stores["gt"]), backend=backend, progress=False)
    res = merge(set_paths(stores), str(stores["gt"]), str(out), evaluation=ev, backend=backend, progress=False,
                overwrite=True)
    return ev.counts, np.asarray(res.stack.array[:])


def tree_digest(*roots: Path) -> dict[str, str]:
    """sha256 of every file under ``roots`` (inputs must never change)."""
    out = {}
    for root in roots:
        root = Path(root)
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for p in files:
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def no_complete_store(path: Path) -> None:
    """Neither ``path`` nor any temporary sibling of it opens as a complete store."""
    candidates = [path] + list(path.parent.glob(path.name + ".*"))
    for c in candidates:
        if c.exists():
            with pytest.raises(StoreError):
                open_stack(c)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Ingested tiny data set + its threaded-scheduler results (the baseline of every equivalence test)."""
    root = tmp_path_factory.mktemp("rel")
    folders = make_pngs(root / "src")

    stores = {}
    gt = root / "gt.zarr"
    assert cli.main(["ingest", "labels", str(folders["gt"]), "--kind", "gt", "-o", str(gt), "-q"]) == 0
    stores["gt"] = gt
    for s in range(N_SETS):
        p = root / f"set{s}.zarr"
        assert cli.main(["ingest", "labels", str(folders[f"set{s}"]), "--gt", str(gt), "-o", str(p), "-q"]) == 0
        stores[f"set{s}"] = p
    import dask

    with dask.config.set(scheduler="threads"):
        counts, ens = run_pipeline(stores, root / "baseline.zarr")
    return {"root": root, "folders": folders, "stores": stores, "counts": counts, "ensemble": ens}


# --------------------------------------------------------------------------------------
# equivalence: one test per pair (threaded is the baseline)
# --------------------------------------------------------------------------------------
def test_baseline_equals_numpy_reference(data):
    """threaded == the plain NumPy reference of the kernels (counts and ensemble), bit for bit."""
    from isle_fast.ensemble.evaluate import evaluate
    from isle_fast.ensemble.selection import select
    from tests import reference as ref

    gt = open_stack(data["stores"]["gt"])
    sets = [open_stack(p) for p in set_paths(data["stores"])]
    g = np.asarray(gt.array[:])
    s = [np.asarray(x.array[:]) for x in sets]
    assert np.array_equal(data["counts"], ref.confusion_labels(g, s, C))
    sel = select(evaluate(sets, gt, backend="cpu", progress=False))
    merged = ref.merge_labels(s, sel.kernel_selection(), sel.priority(), 0)
    merged[~gt.valid_mask(0, gt.num_images)] = 255
    assert np.array_equal(data["ensemble"], merged)


def test_threaded_vs_synchronous(data, tmp_path):
    import dask

    with dask.config.set(scheduler="synchronous"):
        counts, ens = run_pipeline(data["stores"], tmp_path / "ens.zarr")
    assert np.array_equal(counts, data["counts"])
    assert np.array_equal(ens, data["ensemble"])


@pytest.mark.parametrize("chunks", [
    {"gt": "1,7,9", "set0": "3,16,16", "set1": "2,36,44", "set2": "10,5,44"},   # every store its own odd chunks
    {"gt": "4,36,44", "set0": "4,36,44", "set1": "4,36,44", "set2": "4,36,44"},
])
def test_threaded_vs_other_chunkings(data, tmp_path, capsys, chunks):
    stores = ingest(data["folders"], tmp_path, capsys, chunks)
    assert open_stack(stores["gt"]).chunks != open_stack(data["stores"]["gt"]).chunks or chunks["gt"] == "4,36,44"
    counts, ens = run_pipeline(stores, tmp_path / "ens.zarr")
    assert np.array_equal(counts, data["counts"])
    assert np.array_equal(ens, data["ensemble"])


@pytest.mark.slow
def test_threaded_vs_distributed_process_workers(data, tmp_path):
    from dask.distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        assert len(client.scheduler_info()["workers"]) == 2
        counts, ens = run_pipeline(data["stores"], tmp_path / "ens.zarr")
    assert np.array_equal(counts, data["counts"])
    assert np.array_equal(ens, data["ensemble"])


def _gpu_sim_available() -> bool:
    from isle_fast import backend

    return hasattr(backend, "FORCE_CUDASIM_ENV")


@pytest.mark.slow
def test_cpu_vs_gpu_backend(data, tmp_path):
    """The GPU backend gives the same counts and ensemble: on a GPU if there is one, else under
    Numba's CUDA simulator (``ISLE_FORCE_CUDASIM=1``, in a subprocess, on 3 tiny images)."""
    from isle_fast.backend import gpu_available

    if not gpu_available() and not _gpu_sim_available():
        pytest.skip("no CUDA device and no CUDA-simulator switch in isle_fast.backend")
    # tiny data: the simulator runs one Python thread per CUDA thread
    folders = make_pngs(tmp_path / "src", n=3, seed=5, max_hw=(9, 11))
    stores = {}
    gt = tmp_path / "gt.zarr"
    assert cli.main(["ingest", "labels", str(folders["gt"]), "--kind", "gt", "-o", str(gt), "-q"]) == 0
    stores["gt"] = gt
    for s in range(N_SETS):
        p = tmp_path / f"set{s}.zarr"
        assert cli.main(["ingest", "labels", str(folders[f"set{s}"]), "--gt", str(gt), "-o", str(p), "-q"]) == 0
        stores[f"set{s}"] = p
    cpu_counts, cpu_ens = run_pipeline(stores, tmp_path / "cpu.zarr")
    env = dict(os.environ, ISLE_FORCE_CUDASIM="1", ISLE_PROGRESS="0")
    cmd = [sys.executable, "-m", "isle_fast", "merge", *set_paths(stores), "--gt", str(gt), "--out",
           str(tmp_path / "gpu.zarr"), "--backend", "gpu", "--json", str(tmp_path / "gpu.json"), "--quiet",
           "--no-score"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 and "no CUDA device" in proc.stderr:
        pytest.skip("GPU backend not usable here, even under the simulator: " + proc.stderr.strip()[-200:])
    assert proc.returncode == 0, proc.stderr
    gpu_ens = np.asarray(open_stack(tmp_path / "gpu.zarr").array[:])
    assert np.array_equal(gpu_ens, cpu_ens)
    doc = json.loads((tmp_path / "gpu.json").read_text())
    for n in range(N_SETS):
        tp = np.asarray(doc["sets"][f"set{n}"]["tp"], dtype=np.int64)
        assert np.array_equal(tp, np.diagonal(cpu_counts[n])[:C])


# --------------------------------------------------------------------------------------
# faults
# --------------------------------------------------------------------------------------
class KillWorkerOnce(WorkerPlugin):
    """Worker plugin: the first worker to finish its ``after``-th task SIGKILLs itself, once (marker file)."""

    name = "kill-worker-once"

    def __init__(self, marker: str, after: int = 3):
        self.marker = marker
        self.after = after
        self.done = 0

    def setup(self, worker):
        self.done = 0

    def teardown(self, worker):
        pass

    def transition(self, key, start, finish, **kwargs):
        if finish != "memory":
            return
        self.done += 1
        if self.done >= self.after:
            try:
                fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.slow
def test_worker_killed_mid_merge(data, tmp_path, capsys):
    """A worker process SIGKILLed in the middle of a merge: the nanny restarts it, the lost tasks rerun,
    the merge finishes with the same ensemble."""
    from dask.distributed import Client, LocalCluster

    from isle_fast.ensemble.evaluate import evaluate
    from isle_fast.ensemble.merge import merge

    stores = ingest(data["folders"], tmp_path, capsys,
                    {k: "1,36,44" for k in ("gt", "set0", "set1", "set2")})   # one task per image
    ev = evaluate(set_paths(stores), str(stores["gt"]), backend="cpu", progress=False)
    marker = tmp_path / "killed"
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        pids_before = set(client.run(os.getpid).values())
        client.register_plugin(KillWorkerOnce(str(marker), after=3))
        res = merge(set_paths(stores), str(stores["gt"]), str(tmp_path / "ens.zarr"), evaluation=ev,
                    backend="cpu", progress=False)
        client.wait_for_workers(2, timeout=60)
        pids_after = set(client.run(os.getpid).values())
    assert marker.exists(), "no worker was killed: the test did not test anything"
    killed = int(marker.read_text())
    assert killed in pids_before and killed not in pids_after
    assert np.array_equal(np.asarray(res.stack.array[:]), data["ensemble"])


_SLOW_WRITES = r"""
import asyncio, sys, time
import zarr.storage
_orig = zarr.storage.LocalStore.set
async def _slow(self, key, value, *a, **k):
    if "/c/" in key or key.startswith("c/") or "/c" in key:
        await asyncio.sleep(0.15)
    return await _orig(self, key, value, *a, **k)
zarr.storage.LocalStore.set = _slow
from isle_fast.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _kill_mid_write(argv: list[str], out: Path, timeout: float = 120) -> None:
    """Start ``isle ARGV`` with slowed chunk writes; SIGKILL it once its temporary store holds a chunk."""
    env = dict(os.environ, ISLE_PROGRESS="0")
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_WRITES, *map(str, argv)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t0 = time.time()
    try:
        while time.time() - t0 < timeout:
            tmps = list(out.parent.glob(out.name + ".tmp-*"))
            if any(p.is_file() and "/c/" in str(p) for t in tmps for p in t.rglob("*")):
                proc.send_signal(signal.SIGKILL)
                break
            if proc.poll() is not None:
                pytest.fail(f"the command ended (rc {proc.returncode}) before it could be killed: "
                            f"{proc.stderr.read().decode()[-500:]}")
            time.sleep(0.01)
        else:
            pytest.fail("the command never started writing")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_cli_merge_killed_mid_write_then_rerun(data, tmp_path, capsys):
    stores = ingest(data["folders"], tmp_path, capsys, {k: "1,36,44" for k in ("gt", "set0", "set1", "set2")})
    out = tmp_path / "ens.zarr"
    argv = ["merge", *set_paths(stores), "--gt", stores["gt"], "--out", out, "--quiet", "--no-score"]
    before = tree_digest(*stores.values())
    _kill_mid_write(argv, out)
    no_complete_store(out)
    assert not out.exists()
    rc, _, err = cli_run(argv, capsys)
    assert rc == 0, err
    assert np.array_equal(np.asarray(open_stack(out).array[:]), data["ensemble"])
    assert tree_digest(*stores.values()) == before


@pytest.mark.slow
def test_cli_ingest_killed_mid_write_then_rerun(data, tmp_path, capsys):
    out = tmp_path / "gt.zarr"
    argv = ["ingest", "labels", data["folders"]["gt"], "--kind", "gt", "-o", out, "-q", "--chunks", "1,36,44"]
    before = tree_digest(data["folders"]["gt"])
    _kill_mid_write(argv, out)
    no_complete_store(out)
    rc, _, err = cli_run(argv, capsys)
    assert rc == 0, err
    assert np.array_equal(np.asarray(open_stack(out).array[:]), np.asarray(open_stack(data["stores"]["gt"]).array[:]))
    assert tree_digest(data["folders"]["gt"]) == before


@contextlib.contextmanager
def tmpfs(path: Path, options: str):
    """Mount a tmpfs at ``path`` (root only); skip the test where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _patch_store_writes(monkeypatch, exc: OSError) -> None:
    import zarr.storage

    orig = zarr.storage.LocalStore.set

    async def failing(self, key, value, *a, **k):
        if "/c/" in key or key.startswith("c/"):
            raise exc
        return await orig(self, key, value, *a, **k)

    monkeypatch.setattr(zarr.storage.LocalStore, "set", failing)


def _merge_argv(data, out: Path) -> list:
    return ["merge", *set_paths(data["stores"]), "--gt", data["stores"]["gt"], "--out", out, "--quiet", "--no-score"]


def test_disk_full_monkeypatched(data, tmp_path, capsys, monkeypatch):
    _patch_store_writes(monkeypatch, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    out = tmp_path / "ens.zarr"
    rc, _, err = cli_run(_merge_argv(data, out), capsys)
    assert_clean_error(rc, err, "space")
    no_complete_store(out)
    assert not list(tmp_path.glob("ens.zarr*")), "the failed write left files behind"


def test_disk_full_real_tmpfs(data, tmp_path, capsys):
    with tmpfs(tmp_path / "tiny", "size=12k") as mnt:
        out = mnt / "ens.zarr"
        rc, _, err = cli_run(_merge_argv(data, out), capsys)
        assert_clean_error(rc, err, "space")
        no_complete_store(out)
        rc, _, err = cli_run(["ingest", "labels", data["folders"]["gt"], "--kind", "gt", "-o", mnt / "gt.zarr",
                              "-q"], capsys)
        assert_clean_error(rc, err, "space")
        no_complete_store(mnt / "gt.zarr")


def test_permission_denied_monkeypatched(data, tmp_path, capsys, monkeypatch):
    _patch_store_writes(monkeypatch, PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(tmp_path)))
    out = tmp_path / "ens.zarr"
    rc, _, err = cli_run(_merge_argv(data, out), capsys)
    assert_clean_error(rc, err, "permission")
    no_complete_store(out)


def test_read_only_output_real_mount(data, tmp_path, capsys):
    with tmpfs(tmp_path / "ro", "ro,size=1m") as mnt:
        rc, _, err = cli_run(_merge_argv(data, mnt / "ens.zarr"), capsys)
        assert_clean_error(rc, err, "read-only")
        rc, _, err = cli_run(["export", data["stores"]["set0"], "--out", mnt / "png", "--quiet"], capsys)
        assert_clean_error(rc, err, "read-only")


def test_output_under_proc_is_a_clear_error(data, capsys):
    """Root ignores file modes; a folder that cannot be created (under /proc) stands in for 'not writable'."""
    rc, _, err = cli_run(_merge_argv(data, Path("/proc/isle-no-such-dir/ens.zarr")), capsys)
    assert_clean_error(rc, err, "/proc/isle-no-such-dir")


# --------------------------------------------------------------------------------------
# bad input: a clear error, never a traceback, inputs unchanged
# --------------------------------------------------------------------------------------
def _copy_src(data, tmp_path: Path) -> dict[str, Path]:
    dst = {}
    for name, src in data["folders"].items():
        dst[name] = tmp_path / "src" / name
        shutil.copytree(src, dst[name])
    return dst


def _ingest_set_argv(folder: Path, gt: Path, out: Path) -> list:
    return ["ingest", "labels", folder, "--gt", gt, "-o", out, "-q"]


def _corrupt_truncated(p: Path) -> None:
    b = p.read_bytes()
    p.write_bytes(b[: len(b) // 2])


def _corrupt_out_of_range(p: Path) -> None:
    a = np.array(Image.open(p))
    a[0, 0] = 40                                   # not a VOC class, not 255
    save_png(p, a)


def _corrupt_rgb_colours(p: Path) -> None:
    a = np.zeros(np.array(Image.open(p)).shape + (3,), np.uint8)
    a[..., 1] = 77                                 # a colour not in the VOC palette
    Image.fromarray(a, mode="RGB").save(p)


def _corrupt_16bit(p: Path) -> None:
    a = np.array(Image.open(p)).astype(np.uint16) * 300
    Image.fromarray(a).save(p)


def _corrupt_not_png(p: Path) -> None:
    p.write_bytes(b"this is not an image at all\n")


def _corrupt_wrong_shape(p: Path) -> None:
    a = np.array(Image.open(p))
    save_png(p, np.pad(a, ((0, 3), (0, 2))))


def _corrupt_missing(p: Path) -> None:
    p.unlink()


@pytest.mark.parametrize("corrupt,needle", [
    (_corrupt_truncated, "img004"),
    (_corrupt_out_of_range, "img004"),
    (_corrupt_rgb_colours, "img004"),
    (_corrupt_16bit, "img004"),
    (_corrupt_not_png, "img004"),
    (_corrupt_wrong_shape, "img004"),
    (_corrupt_missing, "img004"),
], ids=["truncated-png", "value-not-a-class", "rgb-not-voc-palette", "16-bit", "not-an-image", "wrong-shape",
        "missing-id"])
def test_corrupted_label_file(data, tmp_path, capsys, corrupt, needle):
    src = _copy_src(data, tmp_path)
    corrupt(src["set1"] / "img004.png")
    before = tree_digest(tmp_path / "src", data["stores"]["gt"])
    out = tmp_path / "set1.zarr"
    rc, _, err = cli_run(_ingest_set_argv(src["set1"], data["stores"]["gt"], out), capsys)
    assert_clean_error(rc, err, needle)
    no_complete_store(out)
    assert tree_digest(tmp_path / "src", data["stores"]["gt"]) == before


def test_float_npy_label_map(data, tmp_path, capsys):
    src = tmp_path / "npy"
    src.mkdir()
    gt = open_stack(data["stores"]["gt"])
    for i in gt.ids:
        np.save(src / f"{i}.npy", gt.read_image(i).astype(np.float64) + 0.5)   # wrong dtype, not integral
    before = tree_digest(src)
    rc, _, err = cli_run(_ingest_set_argv(src, data["stores"]["gt"], tmp_path / "s.zarr"), capsys)
    assert_clean_error(rc, err, "img000")
    assert tree_digest(src) == before


def test_nan_cams(data, tmp_path, capsys):
    src = tmp_path / "cams"
    src.mkdir()
    gt = open_stack(data["stores"]["gt"])
    rng = np.random.default_rng(0)
    for i in gt.ids:
        h, w = (int(v) for v in gt.shapes[gt.index_of(i)])
        cam = rng.random((C, h, w)).astype(np.float32)
        if i == "img002":
            cam[3, 1, 1] = np.nan
        np.save(src / f"{i}.npy", cam)
    before = tree_digest(src)
    out = tmp_path / "cams.zarr"
    rc, _, err = cli_run(["ingest", "scores", src, "--gt", data["stores"]["gt"], "-o", out, "-q"], capsys)
    assert_clean_error(rc, err, "img002")
    no_complete_store(out)
    assert tree_digest(src) == before


def test_mismatched_ids_between_stores(data, tmp_path, capsys):
    """A set made from other ids than the gt: evaluate / merge refuse it, naming the store and an id."""
    src = _copy_src(data, tmp_path)
    (src["set0"] / "img009.png").unlink()
    other = tmp_path / "other.zarr"
    rc, _, err = cli_run(["ingest", "labels", src["set0"], "-o", other, "-q"], capsys)   # no --gt: its own ids
    assert rc == 0, err
    before = tree_digest(*data["stores"].values(), other)
    rc, _, err = cli_run(["evaluate", other, data["stores"]["set1"], "--gt", data["stores"]["gt"], "--quiet"],
                         capsys)
    assert_clean_error(rc, err, "img009")
    rc, _, err = cli_run(["merge", other, data["stores"]["set1"], "--gt", data["stores"]["gt"], "--out",
                          tmp_path / "e.zarr", "--quiet"], capsys)
    assert_clean_error(rc, err, "img009")
    no_complete_store(tmp_path / "e.zarr")
    assert tree_digest(*data["stores"].values(), other) == before


def _set_attr(store: Path, **attrs) -> None:
    meta = store / "zarr.json"
    doc = json.loads(meta.read_text())
    doc.setdefault("attributes", {}).update(attrs)
    meta.write_text(json.dumps(doc))


@pytest.mark.parametrize("attrs,needle", [
    ({"isle_format": 99}, "format"),
    ({"complete": False}, "incomplete"),
])
def test_store_of_another_version_or_incomplete(data, tmp_path, capsys, attrs, needle):
    bad = tmp_path / "set0.zarr"
    shutil.copytree(data["stores"]["set0"], bad)
    _set_attr(bad, **attrs)
    before = tree_digest(bad)
    for argv in (["info", bad],
                 ["evaluate", bad, data["stores"]["set1"], "--gt", data["stores"]["gt"], "--quiet"],
                 ["merge", bad, data["stores"]["set1"], "--gt", data["stores"]["gt"], "--out", tmp_path / "e.zarr",
                  "--quiet"],
                 ["export", bad, "--out", tmp_path / "png", "--quiet"]):
        rc, _, err = cli_run(argv, capsys)
        assert_clean_error(rc, err, needle, str(bad))
    assert tree_digest(bad) == before


@FEW
@given(cut=st.integers(0, 400), flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)),
                                               max_size=6))
def test_fuzzed_png_bytes(data, tmp_path_factory, cut, flips):
    """Random truncations / byte flips of one PNG: ingest either succeeds or fails cleanly; inputs unchanged."""
    import io

    tmp = tmp_path_factory.mktemp("fuzz")
    src = tmp / "set"
    shutil.copytree(data["folders"]["set2"], src)
    p = src / "img003.png"
    b = bytearray(p.read_bytes())
    for pos, val in flips:
        b[pos % len(b)] = val
    if cut:
        b = b[: max(0, len(b) - cut)]
    p.write_bytes(bytes(b))
    before = tree_digest(src)
    err_buf = io.StringIO()
    with contextlib.redirect_stderr(err_buf), contextlib.redirect_stdout(io.StringIO()):
        rc = cli.main(["ingest", "labels", str(src), "--gt", str(data["stores"]["gt"]), "-o", str(tmp / "s.zarr"),
                       "-q"])
    err = err_buf.getvalue()
    if rc == 0:
        open_stack(tmp / "s.zarr")
    else:
        assert_clean_error(rc, err, "img003")
        no_complete_store(tmp / "s.zarr")
    assert tree_digest(src) == before
    shutil.rmtree(tmp, ignore_errors=True)


_ATTR_VALUES = st.one_of(st.none(), st.integers(-3, 300), st.text(max_size=8), st.booleans(),
                         st.lists(st.text(max_size=5), max_size=4), st.dictionaries(st.text(max_size=3), st.integers(),
                                                                                    max_size=2))


@FEW
@given(key=st.sampled_from(["isle_format", "kind", "classes", "encoding", "ignore_index", "complete", "name",
                            "provenance", "score_scale"]), value=_ATTR_VALUES)
def test_fuzzed_store_attributes(data, tmp_path_factory, key, value):
    """Any value in any attribute of a store: info / evaluate succeed or fail cleanly, the store is unchanged."""
    import io

    tmp = tmp_path_factory.mktemp("attrs")
    bad = tmp / "set0.zarr"
    shutil.copytree(data["stores"]["set0"], bad)
    _set_attr(bad, **{key: value})
    before = tree_digest(bad)
    for argv in (["info", str(bad)],
                 ["evaluate", str(bad), str(data["stores"]["set1"]), "--gt", str(data["stores"]["gt"]), "--quiet"]):
        err_buf = io.StringIO()
        with contextlib.redirect_stderr(err_buf), contextlib.redirect_stdout(io.StringIO()):
            rc = cli.main(argv)
        if rc != 0:
            assert_clean_error(rc, err_buf.getvalue())
    assert tree_digest(bad) == before
    shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------
# stores that know their chunks: damage is an error on every command, never data
# --------------------------------------------------------------------------------------
CHUNKS = "2,16,16"        # 5 x 3 x 3 = 45 chunks per array of the tiny data set
TRAIN_ARGS = ["--steps", "5", "--batch-size", "2", "--crop", "16", "--backbone", "resnet18_w16",
              "--weights", "none", "--head-channels", "16", "--val-every", "0", "--ckpt-every", "0",
              "--log-every", "5", "--threads", "1"]
#: which commands read which store of the ``chunked`` fixture (the damaged one is always the "target")
READERS = {
    "gt": ("info", "info --check", "evaluate", "merge", "export", "report"),
    "set0": ("info", "info --check", "evaluate", "merge", "export", "report", "train", "refine"),
    "images": ("info", "info --check", "train", "refine"),
}
EVERY_COMMAND = ("info", "info --check", "evaluate", "merge", "export", "report", "train", "refine")
FAST_COMMANDS = ("info", "info --check", "evaluate", "export")


def fuzz(examples: int):
    """Hypothesis settings of the damage fuzzers: ``examples`` each (``ISLE_FUZZ_EXAMPLES=N`` for more)."""
    return settings(max_examples=int(os.environ.get("ISLE_FUZZ_EXAMPLES", examples)), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
#: commands that need not read every chunk: info reads ids and shapes only, export each image's own pixels
#: (a damaged chunk of pure padding changes nothing it writes); the others read all of a store
PARTIAL_READERS = ("info", "export")


class _Shown(dict):
    """A fixture's dict with a short repr (hypothesis prints the arguments of a failing example)."""

    def __repr__(self) -> str:
        return f"<{self.get('root')}>"


def quiet_cli(argv: list) -> tuple[int, str, str]:
    """``isle ARGV`` in process, stdout and stderr captured (usable inside hypothesis tests)."""
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        rc = cli.main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def _store_data(path: Path) -> tuple:
    s = open_stack(path)
    return (s.ids, s.shapes.tolist(), np.asarray(s.array[...]))


def run_on_stores(command: str, stores: dict[str, Path], target: str, out: Path,
                  workers: int = 0) -> tuple[int, str, Any, str]:
    """Run ``command`` the way a user would on ``stores`` (``target`` is the store under test); returns
    (exit status, stderr, what it made: numbers and arrays, compared with an undamaged run; stdout)."""
    out.mkdir(parents=True, exist_ok=True)
    t = stores[target]
    sets = [stores["set0"], stores["set1"]]
    if command == "info":
        rc, o, err = quiet_cli(["info", "--json", t])
        keys = ("images", "pixels", "image_height", "image_width")
        made = None if rc else {k: json.loads(o)[k] for k in keys}
    elif command == "info --check":
        rc, o, err = quiet_cli(["info", "--check", "--json", "--quiet", t])
        made = None if rc else _store_data(t)
    elif command == "evaluate":
        rc, o, err = quiet_cli(["evaluate", *sets, "--gt", stores["gt"], "--json", out / "ev.json",
                                "--quiet"])
        made = None if rc else [(v["tp"], v["fp"], v["fn"]) for v in json.loads((out / "ev.json").read_text())
                                ["sets"].values()]
    elif command == "merge":
        rc, o, err = quiet_cli(["merge", *sets, "--gt", stores["gt"], "--out", out / "e.zarr", "--json",
                                out / "m.json", "--quiet"])
        if rc:
            no_complete_store(out / "e.zarr")
            made = None
        else:
            doc = json.loads((out / "m.json").read_text())
            made = ([(v["tp"], v["fp"], v["fn"]) for v in doc["sets"].values()], doc["ensemble"]["iou"],
                    _store_data(out / "e.zarr")[2])
    elif command == "export":
        rc, o, err = quiet_cli(["export", t, "--out", out / "png", "--quiet"])
        made = None if rc else {p.name: np.asarray(Image.open(p)) for p in sorted((out / "png").iterdir())}
        if rc:
            assert not (out / "png").exists()
    elif command == "report":
        rc, o, err = quiet_cli(["report", *sets, "--gt", stores["gt"], "--out", out / "rep", "--quiet"])
        if rc:
            assert not (out / "rep").exists()
            made = None
        else:
            doc = json.loads((out / "rep" / "report.json").read_text())
            made = ([(v["tp"], v["fp"], v["fn"]) for v in doc["sets"].values()], doc["ensemble"]["iou"])
    elif command == "refine":
        rc, o, err = quiet_cli(["refine", stores["set0"], "--images", stores["images"], "--with", "crf",
                                "--out", out / "r.zarr", "--scheduler", "threads", "--quiet"])
        if rc:
            no_complete_store(out / "r.zarr")
        made = None if rc else _store_data(out / "r.zarr")[2]
    elif command == "train":
        rc, o, err = quiet_cli(["train", "--images", stores["images"], "--labels", stores["set0"], "--out",
                                out / "run", *TRAIN_ARGS, "--workers", workers, "--quiet"])
        made = None if rc else json.loads((out / "run" / "metrics.json").read_text())["train"][-1]["loss"]
    else:
        raise ValueError(command)
    assert "Traceback" not in err, err
    return rc, err, made, o


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and np.array_equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b or (a != a and b != b)


@pytest.fixture(scope="module")
def chunked(tmp_path_factory):
    """gt, two sets and an images store of the tiny data set in small chunks, and what every command
    makes of them undamaged (the baselines: a damaged store's command must fail or make exactly this)."""
    root = tmp_path_factory.mktemp("chunked")
    folders = make_pngs(root / "src")
    rgb = root / "src" / "rgb"
    rgb.mkdir()
    rng = np.random.default_rng(7)
    for p in sorted(folders["gt"].iterdir()):
        h, w = np.asarray(Image.open(p)).shape
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(rgb / p.name)
    stores = {"gt": root / "gt.zarr", "set0": root / "set0.zarr", "set1": root / "set1.zarr",
              "images": root / "images.zarr"}
    argvs = [["labels", folders["gt"], "--kind", "gt", "-o", stores["gt"], "--chunks", CHUNKS]]
    argvs += [["labels", folders[s], "--gt", stores["gt"], "-o", stores[s], "--chunks", CHUNKS]
              for s in ("set0", "set1")]
    argvs += [["images", rgb, "--gt", stores["gt"], "-o", stores["images"], "--chunks", CHUNKS + ",3"]]
    for argv in argvs:
        rc, _, err = quiet_cli(["ingest", *argv, "-q"])
        assert rc == 0, err
    return _Shown(root=root, stores=stores, baseline={})


def baseline(chunked, command: str, target: str) -> Any:
    """What ``command`` makes of the undamaged stores (computed once, when first needed)."""
    key = (command, target)
    if key not in chunked["baseline"]:
        out = chunked["root"] / "baseline" / target / command.replace(" ", "")
        rc, err, made, _ = run_on_stores(command, chunked["stores"], target, out)
        assert rc == 0, (command, err)
        chunked["baseline"][key] = made
    return chunked["baseline"][key]


def _chunk_files(store: Path, array: str) -> list[Path]:
    return sorted(p for p in (store / array).rglob("*") if p.is_file() and p.name != "zarr.json")


def _main_array(store: Path) -> str:
    return json.loads((store / "zarr.json").read_text())["attributes"]["encoding"]


def damage_chunk(store: Path, array: str, how: str, a: int, b: int, value: int) -> None:
    """Truncate, flip a byte of, delete or swap (with another) one chunk file of ``array``."""
    files = _chunk_files(store, array)
    f = files[a % len(files)]
    raw = bytearray(f.read_bytes())
    if how == "truncate":
        f.write_bytes(bytes(raw[: b % max(1, len(raw))]))
    elif how == "flip":
        raw[b % len(raw)] = value
        f.write_bytes(bytes(raw))
    elif how == "delete":
        f.unlink()
    else:
        g = files[b % len(files)]
        other = g.read_bytes()
        g.write_bytes(bytes(raw))
        f.write_bytes(other)


def _copy_target(chunked, tmp: Path, target: str) -> dict[str, Path]:
    stores = dict(chunked["stores"])
    stores[target] = tmp / stores[target].name
    shutil.copytree(chunked["stores"][target], stores[target])
    return stores


def check_damaged_run(chunked, stores: dict[str, Path], target: str, commands: Sequence[str], tmp: Path,
                      changed: bool, metadata: bool) -> None:
    """Every command on the damaged ``target``: a clear error naming the store, or exactly the undamaged
    result (and that only when nothing changed, a metadata change left the data's meaning alone, or the
    command is one of :data:`PARTIAL_READERS` and did not need the damaged chunk)."""
    before = tree_digest(*stores.values())
    for command in commands:
        rc, err, made, _ = run_on_stores(command, stores, target, tmp / "out" / command.replace(" ", ""))
        if rc == 0:
            assert _same(made, baseline(chunked, command, target)), (command, "exit 0 with another result")
            assert metadata or not changed or command in PARTIAL_READERS, (command, "exit 0 on damage")
        else:
            assert_clean_error(rc, err)
            if not metadata:
                assert str(stores[target]) in err, (command, err)
    assert tree_digest(*stores.values()) == before, "an input changed"


def _chunk_damage_case(chunked, tmp_path_factory, target, array, how, a, b, value, commands) -> None:
    tmp = tmp_path_factory.mktemp("chunkdmg")
    stores = _copy_target(chunked, tmp, target)
    name = _main_array(stores[target]) if array == "main" else array
    if how in ("truncate", "flip", "delete", "swap") and array != "main" and how == "swap":
        how = "flip"  # ids / shapes have one chunk each: nothing to swap with
    before = tree_digest(stores[target])
    damage_chunk(stores[target], name, how, a, b, value)
    changed = tree_digest(stores[target]) != before
    check_damaged_run(chunked, stores, target, [c for c in commands if c in READERS[target]], tmp, changed,
                      metadata=False)
    shutil.rmtree(tmp, ignore_errors=True)


_DAMAGE = dict(array=st.sampled_from(["main", "main", "main", "ids", "shapes"]),
               how=st.sampled_from(["truncate", "flip", "delete", "swap"]),
               a=st.integers(0, 10**6), b=st.integers(0, 10**6), value=st.integers(0, 255))


@fuzz(10)
@given(target=st.sampled_from(["gt", "set0"]), **_DAMAGE)
def test_fuzzed_chunk_damage(chunked, tmp_path_factory, target, array, how, a, b, value):
    """Any chunk of a set or the gt truncated, flipped, deleted or swapped: info, info --check, evaluate and
    export fail cleanly naming the store (or, undamaged, give the same result); inputs unchanged."""
    _chunk_damage_case(chunked, tmp_path_factory, target, array, how, a, b, value, FAST_COMMANDS)


@pytest.mark.slow
@fuzz(12)
@given(target=st.sampled_from(["gt", "set0", "images"]), **_DAMAGE)
def test_fuzzed_chunk_damage_every_command(chunked, tmp_path_factory, target, array, how, a, b, value):
    """The same on every command that reads the store: + merge, report, refine (crf) and train (5 steps =
    one epoch, so every chunk is read)."""
    _chunk_damage_case(chunked, tmp_path_factory, target, array, how, a, b, value, EVERY_COMMAND)


def _json_paths(doc: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix] if prefix else []
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _json_paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _json_paths(v, prefix + (i,))
    return out


_JSON_LEAVES = st.one_of(st.none(), st.booleans(), st.integers(-3, 2**33), st.floats(allow_nan=False),
                         st.text(max_size=6), st.sampled_from(["uint8", "bool", "int64", "string", "zstd",
                                                               "crc32c", "c", "."]))
_JSON_VALUES = st.recursive(_JSON_LEAVES, lambda children: st.lists(children, max_size=3)
                            | st.dictionaries(st.text(max_size=4), children, max_size=2), max_leaves=4)


def damage_metadata(store: Path, file: str, how: str, k: int, value: Any, byte: int) -> None:
    """Set or delete one key anywhere in a zarr.json, or truncate / flip a byte of the file."""
    p = store / file
    if how in ("truncate", "flip"):
        raw = bytearray(p.read_bytes())
        if how == "truncate":
            raw = raw[: k % len(raw)]
        else:
            raw[k % len(raw)] = byte
        p.write_bytes(bytes(raw))
        return
    doc = json.loads(p.read_text())
    paths = _json_paths(doc)
    path = paths[k % len(paths)]
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    if how == "delete":
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    p.write_text(json.dumps(doc))


_META = dict(file=st.sampled_from(["zarr.json", "MAIN/zarr.json", "MAIN/zarr.json", "ids/zarr.json",
                                   "shapes/zarr.json"]),
             how=st.sampled_from(["set", "set", "delete", "truncate", "flip"]),
             k=st.integers(0, 10**6), value=_JSON_VALUES, byte=st.integers(0, 255))


def _metadata_case(chunked, tmp_path_factory, target, file, how, k, value, byte, commands) -> None:
    tmp = tmp_path_factory.mktemp("metadmg")
    stores = _copy_target(chunked, tmp, target)
    damage_metadata(stores[target], file.replace("MAIN", _main_array(stores[target])), how, k, value, byte)
    check_damaged_run(chunked, stores, target, [c for c in commands if c in READERS[target]], tmp, True,
                      metadata=True)
    shutil.rmtree(tmp, ignore_errors=True)


@fuzz(12)
@given(target=st.sampled_from(["gt", "set0"]), **_META)
def test_fuzzed_store_metadata(chunked, tmp_path_factory, target, file, how, k, value, byte):
    """Any key of the group's or an array's zarr.json set to any JSON value or deleted, or the file cut or
    a byte flipped: info, info --check, evaluate, export fail cleanly or give exactly the undamaged result."""
    _metadata_case(chunked, tmp_path_factory, target, file, how, k, value, byte, FAST_COMMANDS)


@pytest.mark.slow
@fuzz(12)
@given(target=st.sampled_from(["gt", "set0", "images"]), **_META)
def test_fuzzed_store_metadata_every_command(chunked, tmp_path_factory, target, file, how, k, value, byte):
    """The same on every command that reads the store (+ merge, report, refine, train)."""
    _metadata_case(chunked, tmp_path_factory, target, file, how, k, value, byte, EVERY_COMMAND)


# the cases of issue 18, one by one, the way a user meets them
@pytest.mark.parametrize("target,damage,command", [
    *[("set0", d, c) for d in ("delete", "flip") for c in READERS["set0"] if c != "info"],
    *[("gt", "delete", c) for c in READERS["gt"] if c != "info"],
    *[("images", "delete", c) for c in READERS["images"] if c != "info"],
])
def test_missing_or_damaged_chunk_fails_every_command(chunked, tmp_path, target, damage, command):
    """A deleted chunk of a set used to read as 'ignore' (the set scored 0 and was merged anyway), one of the
    gt evaluated nothing, all with exit 0; a damaged one was a traceback in export. Now every command that
    reads it stops with one line naming store, array, chunk and images; no output; inputs unchanged.
    ``train`` runs with its default DataLoader workers (the error comes from a worker process)."""
    stores = _copy_target(chunked, tmp_path, target)
    chunk = stores[target] / _main_array(stores[target]) / "c" / "0" / "0" / "0"
    chunk = chunk / "0" if target == "images" else chunk
    if damage == "delete":
        chunk.unlink()
    else:
        raw = bytearray(chunk.read_bytes())
        raw[len(raw) // 2] ^= 0x10
        chunk.write_bytes(bytes(raw))
    before = tree_digest(*stores.values())
    rc, err, _, out = run_on_stores(command, stores, target, tmp_path / "out", workers=2)
    named = out if command == "info --check" else err      # --check lists the bad chunks, then fails
    assert_clean_error(rc, err, str(stores[target]))
    for needle in (str(stores[target]), "chunk c/0/0/0", "images 'img000' to 'img001'",
                   "missing" if damage == "delete" else "damaged"):
        assert needle in named, (needle, named)
    assert tree_digest(*stores.values()) == before


@pytest.mark.parametrize("member", ["ids", "shapes"])
def test_damaged_ids_or_shapes_chunk_on_info_and_evaluate(chunked, tmp_path, capsys, member):
    """Was a traceback on ``info`` and ``evaluate``: now a clear error naming the store and the array."""
    stores = _copy_target(chunked, tmp_path, "set0")
    chunk = _chunk_files(stores["set0"], member)[0]
    chunk.write_bytes(b"\x28\xb5\x2f\xfd" + chunk.read_bytes()[4:-6])
    for argv in (["info", stores["set0"]],
                 ["evaluate", stores["set0"], stores["set1"], "--gt", stores["gt"], "--quiet"]):
        rc, _, err = cli_run(argv, capsys)
        assert_clean_error(rc, err, str(stores["set0"]), f"array '{member}'", "damaged")


def _rewrite(store: Path, name: str, values: np.ndarray | None = None, **meta: Any) -> None:
    """Make a store inconsistent the way a foreign tool or a hand edit would (its chunk record kept true)."""
    import zarr

    from isle_fast.stores.chunks import MANIFEST_ATTR, record_manifests

    if values is not None:
        g = zarr.open_group(str(store), mode="r+")
        g[name][...] = values
        record_manifests(g)
    if meta:
        p = store / name / "zarr.json"
        doc = json.loads(p.read_text())
        doc.update(meta)
        doc["attributes"].pop(MANIFEST_ATTR, None)
        p.write_text(json.dumps(doc))


@pytest.mark.parametrize("case,needle", [
    ("repeated ids", "image id 'img000' appears twice"),
    ("negative shape", "image 'img003' has shape (-4, 20)"),
    ("shape beyond the padding", "is 99 x 20 in 'shapes' but array 'labels' is padded to 35 x 43"),
    ("labels shape vs ids", "array 'labels' holds 12 images but 'ids' has 10"),
    ("labels rank vs chunk shape", "array 'labels'"),
    ("bool labels", "array 'labels' has dtype bool; a labels store holds uint8"),
])
def test_inconsistent_store_is_refused(chunked, tmp_path, capsys, case, needle):
    """Repeated ids (export overwrote images), negative shapes and a shapes / array mismatch (accepted by
    info), a labels shape that disagrees with the ids or the chunk shape and a bool labels dtype (tracebacks):
    info, evaluate and export all refuse the store, naming it and what is wrong."""
    stores = _copy_target(chunked, tmp_path, "set0")
    s = stores["set0"]
    st0 = open_stack(s)
    ids, shapes = list(st0.ids), st0.shapes.astype(np.int32)
    if case == "repeated ids":
        _rewrite(s, "ids", np.asarray(ids[:1] + ["img000"] + ids[2:], dtype=object))
    elif case == "negative shape":
        shapes[3] = (-4, 20)
        _rewrite(s, "shapes", shapes)
    elif case == "shape beyond the padding":
        shapes[3] = (99, 20)
        _rewrite(s, "shapes", shapes)
    elif case == "labels shape vs ids":
        _rewrite(s, "labels", shape=[12, *st0.array.shape[1:]])
    elif case == "labels rank vs chunk shape":
        _rewrite(s, "labels", chunk_grid={"name": "regular", "configuration": {"chunk_shape": [2, 16]}})
    else:
        _rewrite(s, "labels", data_type="bool", fill_value=True)
    before = tree_digest(s)
    for argv in (["info", s], ["evaluate", s, stores["set1"], "--gt", stores["gt"], "--quiet"],
                 ["export", s, "--out", tmp_path / "png", "--quiet"]):
        rc, _, err = cli_run(argv, capsys)
        assert_clean_error(rc, err, str(s), needle)
    assert not (tmp_path / "png").exists()
    assert tree_digest(s) == before


@pytest.mark.parametrize("text,needle", [
    ("background\naeroplane\n\nbicycle\n", "line 3: blank line"),
    ("background\naeroplane\n  \t\nbicycle\n", "line 3: blank line"),
    ("background\naeroplane\nbird\naeroplane\n", "line 4: class 'aeroplane' is already named on line 2"),
])
def test_classes_file_blank_line_or_repeated_name(data, tmp_path, capsys, text, needle):
    """A blank line used to shift every later class name by one, a repeated name was accepted."""
    classes = tmp_path / "classes.txt"
    classes.write_text(text)
    rc, _, err = cli_run(["ingest", "labels", data["folders"]["gt"], "--kind", "gt", "--classes", classes,
                          "-o", tmp_path / "g.zarr", "-q"], capsys)
    assert_clean_error(rc, err, str(classes), needle)
    no_complete_store(tmp_path / "g.zarr")


def test_classes_file_trailing_blank_lines_are_fine(data, tmp_path, capsys):
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(VOC_CLASSES) + "\n\n\n")
    rc, _, err = cli_run(["ingest", "labels", data["folders"]["gt"], "--kind", "gt", "--classes", classes,
                          "-o", tmp_path / "g.zarr", "-q"], capsys)
    assert rc == 0, err
    assert open_stack(tmp_path / "g.zarr").classes == list(VOC_CLASSES)


@pytest.mark.parametrize("value", ["2", "nan", "-1", "inf", "-0.01", "x"])
@pytest.mark.parametrize("command", ["evaluate", "merge", "report", "ingest"])
def test_bg_threshold_must_be_a_finite_score(data, tmp_path, capsys, command, value):
    """``--bg-threshold`` 2, nan and -1 used to be accepted by evaluate and merge: a usage error now."""
    st_ = data["stores"]
    sets = [st_["set0"], st_["set1"]]
    argv = {"evaluate": ["evaluate", *sets, "--gt", st_["gt"]],
            "merge": ["merge", *sets, "--gt", st_["gt"], "--out", tmp_path / "e.zarr"],
            "report": ["report", *sets, "--gt", st_["gt"], "--out", tmp_path / "rep"],
            "ingest": ["ingest", "scores", tmp_path, "--gt", st_["gt"], "--out", tmp_path / "s.zarr"],
            }[command]
    with pytest.raises(SystemExit) as exc:
        cli.main([str(a) for a in argv + ["--bg-threshold", value, "--quiet"]])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert re.match(rf"isle {command}( scores)?: error: argument --bg-threshold: must be a finite number in "
                    rf"\[0, 1\] \(a score\), not {re.escape(repr(value))}$",
                    err.strip().splitlines()[-1]), err
    assert not any(p.name.startswith(("e.zarr", "rep", "s.zarr")) for p in tmp_path.iterdir())


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), True, "x"])
def test_bg_threshold_library_calls(data, tmp_path, value):
    """The library keeps its tested edge meanings (negative = off, above 1 = background wins) but refuses
    what has none: nan, infinities, bools, text."""
    from isle_fast.ensemble.evaluate import evaluate
    from isle_fast.ensemble.merge import merge
    from isle_fast.errors import InputError

    sets = set_paths(data["stores"])
    with pytest.raises(InputError, match="bg-threshold must be a finite number"):
        evaluate(sets, data["stores"]["gt"], bg_threshold=value, progress=False)
    with pytest.raises(InputError, match="bg-threshold must be a finite number"):
        merge(sets, data["stores"]["gt"], tmp_path / "e.zarr", bg_threshold=value, progress=False)
    assert not (tmp_path / "e.zarr").exists()


@pytest.mark.parametrize("case", ["pseudo as --gt", "gt as --ensemble", "images as a set", "gt as a set"])
def test_store_kinds_are_checked(chunked, tmp_path, capsys, case):
    """A pseudo store given as --gt and a gt store as --ensemble were accepted without a word."""
    s = chunked["stores"]
    if case == "pseudo as --gt":
        argvs = [["evaluate", s["set1"], "--gt", s["set0"], "--quiet"],
                 ["merge", s["set1"], "--gt", s["set0"], "--out", tmp_path / "e.zarr", "--quiet"],
                 ["report", s["set1"], "--gt", s["set0"], "--out", tmp_path / "rep", "--quiet"]]
        needles = (str(s["set0"]), "'pseudo' store", "not ground truth")
    elif case == "gt as --ensemble":
        argvs = [["report", s["set0"], s["set1"], "--gt", s["gt"], "--ensemble", s["gt"],
                  "--out", tmp_path / "rep", "--quiet"]]
        needles = ("--ensemble", str(s["gt"]), "'gt' store")
    elif case == "images as a set":
        argvs = [["evaluate", s["set0"], s["images"], "--gt", s["gt"], "--quiet"],
                 ["merge", s["set0"], s["images"], "--gt", s["gt"], "--out", tmp_path / "e.zarr", "--quiet"]]
        needles = (str(s["images"]), "an 'images' store", "pseudo-label set")
    else:  # e.g. ``isle merge stores/*.zarr --gt stores/gt.zarr``: the glob picks up the gt itself
        argvs = [["merge", s["set0"], s["gt"], "--gt", s["gt"], "--out", tmp_path / "e.zarr", "--quiet"]]
        needles = (str(s["gt"]), "'gt' store", "pseudo-label set")
    for argv in argvs:
        rc, _, err = cli_run(argv, capsys)
        assert_clean_error(rc, err, *needles)
    assert not list(tmp_path.iterdir())


def run_in_terminal(argv: list, timeout: float = 300) -> tuple[int, str]:
    """``isle ARGV`` in a subprocess whose stdout and stderr are a pseudo-terminal (progress bars on, as
    a user sees them); returns (exit status, everything it printed)."""
    import pty
    import select

    env = {k: v for k, v in os.environ.items() if k != "ISLE_PROGRESS"}
    pid, fd = pty.fork()
    if pid == 0:  # the child: the isle command on a 120 x 40 terminal (tqdm draws nothing 0 columns wide)
        import fcntl
        import struct
        import termios

        fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        os.chdir(str(REPO))
        os.execve(sys.executable, [sys.executable, "-m", "isle_fast", *map(str, argv)], env)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.5)
            if ready:
                try:
                    data = os.read(fd, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
        else:
            os.kill(pid, signal.SIGKILL)
            raise AssertionError(f"isle {argv[0]} did not finish in {timeout} s")
    finally:
        os.close(fd)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), b"".join(chunks).decode("utf-8", "replace")


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in re.split(r"[\r\n]", text) if ln.strip()]
    return lines[-1] if lines else ""


def test_info_check_under_a_terminal(chunked, tmp_path):
    """``isle info --check`` with its progress bar, on a terminal: exit 0 for a good store; for a damaged one
    every bad chunk is named, the last line is the error, exit 2, no traceback."""
    good = chunked["stores"]["set0"]
    rc, text = run_in_terminal(["info", "--check", good])
    assert rc == 0, text
    assert "check set0" in text and "chunk" in text                 # the bar was drawn
    assert "all 47 chunks good (decoded, crc32c verified, compared with the store's record)" in text
    stores = _copy_target(chunked, tmp_path, "set0")
    files = _chunk_files(stores["set0"], "labels")
    files[5].unlink()
    files[7].write_bytes(files[7].read_bytes()[:-1])
    rc, text = run_in_terminal(["info", "--check", stores["set0"]])
    assert rc == 2 and "Traceback" not in text, text
    assert "2 of 47 chunks missing or damaged" in text
    for f in (files[5], files[7]):
        assert "chunk " + "/".join(f.relative_to(stores["set0"] / "labels").parts) in text
    assert re.match(r"isle info: error: .*set0\.zarr: 2 of 47 chunks missing or damaged",
                    _last_line(text)), text


def test_evaluate_of_a_damaged_store_under_a_terminal(chunked, tmp_path):
    """Progress bars on, on a terminal: the error is the last line, exit 2, no traceback."""
    stores = _copy_target(chunked, tmp_path, "gt")
    _chunk_files(stores["gt"], "labels")[4].unlink()
    rc, text = run_in_terminal(["evaluate", stores["set0"], stores["set1"], "--gt", stores["gt"]])
    assert rc == 2 and "Traceback" not in text, text
    assert "evaluate:" in text                                        # the bar was drawn
    assert re.match(r"isle evaluate: error: .*gt\.zarr: array 'labels', chunk c/\d/\d/\d .* is missing",
                    _last_line(text)), text


# --------------------------------------------------------------------------------------
# trust
# --------------------------------------------------------------------------------------
class _Evil:
    """Unpickling this runs code (creates a marker file): what a hostile CAM / checkpoint would do."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_pickled_cams_refused_unless_allowed(data, tmp_path, capsys):
    src = tmp_path / "cams"
    src.mkdir()
    gt = open_stack(data["stores"]["gt"])
    marker = tmp_path / "PWNED"
    for i in gt.ids:
        h, w = (int(v) for v in gt.shapes[gt.index_of(i)])
        obj = {"keys": np.array([0]), "high_res": np.zeros((1, h, w), np.float32), "evil": _Evil(str(marker))}
        np.save(src / f"{i}.npy", np.array(obj, dtype=object), allow_pickle=True)
    before = tree_digest(src)
    rc, _, err = cli_run(["ingest", "scores", src, "--gt", data["stores"]["gt"], "-o", tmp_path / "c.zarr", "-q"],
                         capsys)
    assert_clean_error(rc, err, "allow-pickle")
    assert not marker.exists(), "a pickled CAM file was unpickled without --allow-pickle"
    assert tree_digest(src) == before


def test_every_torch_load_is_weights_only():
    """grep level: every ``torch.load(`` in the package passes ``weights_only=True``."""
    calls = []
    for p in sorted((REPO / "isle_fast").rglob("*.py")) + sorted((REPO / "kernels").rglob("*.py")):
        text = p.read_text(encoding="utf-8")
        for m in re.finditer(r"torch\.load\(", text):
            depth, j = 0, m.end() - 1
            while j < len(text):
                depth += text[j] == "("
                depth -= text[j] == ")"
                if depth == 0:
                    break
                j += 1
            calls.append((p.name, text[m.start():j + 1]))
    code_calls = [(f, c) for f, c in calls if "\n" not in c[:12]]
    for f, call in code_calls:
        assert "weights_only=True" in call, f"{f}: {call}"


def test_malicious_checkpoint_is_not_executed(tmp_path, capsys):
    """A checkpoint whose pickle runs code: ``isle predict`` refuses it and the code never runs."""
    torch = pytest.importorskip("torch")
    try:
        from isle_fast.training.predict import load_model
    except ImportError:
        pytest.skip("isle_fast.training.predict not built")
    marker = tmp_path / "PWNED"
    ck = tmp_path / "best.pt"
    torch.save({"format": "x", "model": {}, "evil": _Evil(str(marker))}, ck)
    from isle_fast.errors import IsleError

    with pytest.raises(IsleError):
        load_model(ck)
    assert not marker.exists()


def _evil_ids_store(path: Path, ids: list[str]) -> None:
    rng = np.random.default_rng(0)
    shapes = np.array([[6, 7]] * len(ids))
    with create_stack(path, kind="ensemble", classes=list(VOC_CLASSES), ids=ids, shapes=shapes) as w:
        for i in range(len(ids)):
            w.write_image(i, rng.integers(0, C, size=(6, 7)).astype(np.uint8))


EVIL_IDS = ["ok", "../../evil", "../evil2", "/tmp/isle-evil-abs", "a/../../evil3", "..", "sub/../../../evil4"]


def _files(root: Path) -> set[str]:
    return {str(p) for p in root.rglob("*")}


def test_export_never_writes_outside_out(tmp_path, capsys):
    """Ids like ``../../evil`` inside a store: ``isle export`` writes only inside --out (or refuses)."""
    store = tmp_path / "a" / "b" / "ens.zarr"
    _evil_ids_store(store, EVIL_IDS)
    out = tmp_path / "a" / "b" / "out"
    before = _files(tmp_path)
    abs_evil = Path("/tmp/isle-evil-abs.png")
    abs_evil.unlink(missing_ok=True)
    rc, _, err = cli_run(["export", store, "--out", out, "--quiet"], capsys)
    if rc != 0:
        assert_clean_error(rc, err)
    new = _files(tmp_path) - before
    outside = [p for p in new if not (p == str(out) or p.startswith(str(out) + os.sep))]
    assert not outside, f"export wrote outside --out: {outside}"
    assert not abs_evil.exists()


def test_ingest_ids_never_write_outside_out(data, tmp_path, capsys):
    """An id list naming ``../x`` (a file that exists there): ingest stays inside its output, and a later
    export of that store stays inside its --out."""
    src = tmp_path / "w" / "src"
    src.mkdir(parents=True)
    save_png(src / "ok.png", np.zeros((5, 6), np.uint8))
    save_png(tmp_path / "w" / "evil.png", np.ones((5, 6), np.uint8))
    ids = tmp_path / "ids.txt"
    ids.write_text("ok\n../evil\n")
    before = _files(tmp_path)
    store = tmp_path / "w" / "out" / "s.zarr"
    rc, _, err = cli_run(["ingest", "labels", src, "--ids", ids, "--kind", "gt", "-o", store, "-q"], capsys)
    if rc != 0:
        assert_clean_error(rc, err, "evil")
    else:
        out = tmp_path / "w" / "out" / "png"
        rc, _, err = cli_run(["export", store, "--out", out, "--quiet"], capsys)
        if rc != 0:
            assert_clean_error(rc, err)
    new = _files(tmp_path) - before
    outside = [p for p in new if not p.startswith(str(tmp_path / "w" / "out"))]
    assert not outside, f"wrote outside the output folder: {outside}"


# --------------------------------------------------------------------------------------
# memory
# --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_out_of_core_bounded_memory(tmp_path):
    """evaluate + merge over a data set several times the workers' memory limit completes, and no worker
    grows past its limit (measured: peak RSS sampled every 20 ms)."""
    sys.path.insert(0, str(REPO))
    from benchmarks.common import PeakMemory, make_label_stores
    from dask.distributed import Client, LocalCluster
    from dask.utils import parse_bytes

    from isle_fast.ensemble.evaluate import evaluate
    from isle_fast.ensemble.merge import merge

    limit = "380MiB"
    d = make_label_stores(tmp_path, 1200, n_sets=4, max_side=448, seed=3)   # 5 stores x 1200 x 448^2 B = 1.2 GB
    assert d["raw_bytes"] > 3 * parse_bytes(limit)
    tiny = make_label_stores(tmp_path, 4, n_sets=3, max_side=16, seed=4)
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=True, memory_limit=limit,
                      dashboard_address=":0") as cluster, Client(cluster):
        evaluate(tiny["sets"], tiny["gt"], backend="cpu", progress=False)          # load the kernels first
        with PeakMemory() as pm:
            ev = evaluate(d["sets"], d["gt"], backend="cpu", progress=False)
            res = merge(d["sets"], d["gt"], str(tmp_path / "ens.zarr"), evaluation=ev, backend="cpu",
                        progress=False)
    assert res.stack.num_images == 1200
    assert 0 < pm.peak_child < parse_bytes(limit), (pm.peak_child, pm.children)
    # every set was counted over the same gt pixels (the full-scale equality check is in benchmarks/pipeline.py)
    per_set = ev.counts.sum(axis=(1, 2))
    assert (per_set == per_set[0]).all() and per_set[0] > 0.5 * 1200 * 448 * 448 * 0.66
