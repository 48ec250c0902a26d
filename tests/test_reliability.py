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
import pickle
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
from distributed import WorkerPlugin
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from isle_fast import cli
from isle_fast.errors import StoreError
from isle_fast.stores.stack import VOC_CLASSES, create_stack, open_stack
from tests import reference
from tests._pty import isle_on_terminal, on_terminal

REPO = Path(__file__).resolve().parents[1]
C = len(VOC_CLASSES)
N_SETS = 3
FEW = settings(max_examples=8, deadline=None,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


# --------------------------------------------------------------------------------------
# data and helpers
# --------------------------------------------------------------------------------------
PALETTE = reference.voc_palette().ravel().tolist()


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
    assert re.match(r"^isle \w+( [a-z-]+)?: error: ", lines[-1]), err  # "isle ingest labels: error: "
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
def test_threaded_vs_distributed_process_workers(data, tmp_path, process_cluster):
    from dask.distributed import Client

    with Client(process_cluster) as client:
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
from isle_fast.stores import chunkio           # ingest workers write their chunks directly
_orig_block = chunkio.write_block
def _slow_block(*a, **k):
    time.sleep(0.15)
    return _orig_block(*a, **k)
chunkio.write_block = _slow_block
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


def _signal_mid_write(argv: list[str], out: Path, sig: int, timeout: float = 120) -> subprocess.Popen:
    """Start ``isle ARGV`` with slowed chunk writes; send ``sig`` once its temporary store holds a label chunk
    (so the signal lands while chunks are being written, not while the store's skeleton is)."""
    env = dict(os.environ, ISLE_PROGRESS="0")
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_WRITES, *map(str, argv)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t0 = time.time()
    while time.time() - t0 < timeout:
        tmps = list(out.parent.glob(out.name + ".tmp-*"))
        if any(p.is_file() and "/labels/c/" in str(p) for t in tmps for p in t.rglob("*")):
            proc.send_signal(sig)
            return proc
        if proc.poll() is not None:
            pytest.fail(f"the command ended (rc {proc.returncode}) before the signal: "
                        f"{proc.stderr.read().decode()[-500:]}")
        time.sleep(0.01)
    proc.kill()
    pytest.fail("the command never started writing")


@pytest.mark.slow
@pytest.mark.parametrize("command", ["merge", "ingest"])
def test_sigterm_mid_write_exits_cleanly(data, tmp_path, capsys, command):
    """SIGTERM (what a batch scheduler sends) is handled like Ctrl-C: exit 143, one line saying so,
    no output and no temporary left, inputs unchanged; a rerun succeeds."""
    if command == "merge":
        one_per_chunk = {k: "1,36,44" for k in ("gt", "set0", "set1", "set2")}
        stores = ingest(data["folders"], tmp_path, capsys, one_per_chunk)
        out = tmp_path / "ens.zarr"
        argv = ["merge", *set_paths(stores), "--gt", stores["gt"], "--out", out, "--quiet", "--no-score"]
        inputs = list(stores.values())
    else:
        out = tmp_path / "gt.zarr"
        argv = ["ingest", "labels", data["folders"]["gt"], "--kind", "gt", "-o", out, "-q",
                "--chunks", "1,36,44"]
        inputs = [data["folders"]["gt"]]
    before = tree_digest(*inputs)
    proc = _signal_mid_write(argv, out, signal.SIGTERM)
    try:
        rc = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("SIGTERM did not end the command within 60 s")
    err = proc.stderr.read().decode()
    assert rc == 143, (rc, err[-800:])
    assert "Traceback" not in err
    prog = "ingest labels" if command == "ingest" else command  # the command as typed
    assert re.search(rf"^isle {prog}: terminated \(SIGTERM\); no partial output was kept$", err, re.M), err
    assert not out.exists()
    assert not list(out.parent.glob(out.name + ".*")), "SIGTERM left a temporary behind"
    assert tree_digest(*inputs) == before
    rc, _, err = cli_run(argv, capsys)
    assert rc == 0, err


@pytest.mark.slow
def test_kill_9_leftover_is_named_then_removed_by_the_next_run(data, tmp_path, capsys):
    """After kill -9 the temporary stays (nothing can run in the killed process): ``isle info`` of the missing
    store points at it, and the next run writing the same output removes it and says so."""
    out = tmp_path / "gt.zarr"
    argv = ["ingest", "labels", data["folders"]["gt"], "--kind", "gt", "-o", out, "-q", "--chunks", "1,36,44"]
    _kill_mid_write(argv, out)
    (tmp,) = out.parent.glob(out.name + ".tmp-*")
    rc, _, err = cli_run(["info", out], capsys)
    assert_clean_error(rc, err, "does not exist", tmp.name, "no longer running")
    rc, _, err = cli_run(argv, capsys)
    assert rc == 0, err
    assert f"removed {tmp.name}" in err and "interrupted" in err
    assert not tmp.exists() and not list(out.parent.glob(out.name + ".tmp-*"))
    open_stack(out)


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


def _cam_folder(data, tmp_path, write) -> Path:
    """A CAM folder for the gt's images: ``write(path, image_id, h, w)`` writes each file."""
    src = tmp_path / "cams"
    src.mkdir()
    gt = open_stack(data["stores"]["gt"])
    for i in gt.ids:
        h, w = (int(v) for v in gt.shapes[gt.index_of(i)])
        write(src / i, i, h, w)
    return src


def test_fractional_cam_keys(data, tmp_path, capsys):
    """Issue 18: CAM keys like 0.5 were truncated to a class; now a clear error naming file and key."""
    def write(p, i, h, w):
        keys = np.array([0.5 if i == "img004" else 2.0, 3.0])
        np.save(f"{p}.npy", {"keys": keys, "high_res": np.full((2, h, w), 0.5, np.float32)})

    src = _cam_folder(data, tmp_path, write)
    before = tree_digest(src)
    out = tmp_path / "cams.zarr"
    rc, _, err = cli_run(["ingest", "scores", src, "--gt", data["stores"]["gt"], "-o", out, "-q"], capsys)
    assert_clean_error(rc, err, "img004.npy", "0.5", "not a whole number")
    no_complete_store(out)
    assert tree_digest(src) == before


def test_npz_header_claiming_125_gib(data, tmp_path, capsys):
    """Issue 18: an .npz member whose header claims 125 GiB: checked against the member's size and the gt's
    image size before loading; a clear error, no allocation (seconds, not a MemoryError), no traceback."""
    import io
    import zipfile

    def write(p, i, h, w):
        if i != "img003":
            np.savez(f"{p}.npz", scores=np.full((C, h, w), 0.5, np.float32))
            return
        buf = io.BytesIO()
        np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False,
                                                   "shape": (C, 40000, 40000)})
        with zipfile.ZipFile(f"{p}.npz", "w") as zf:
            zf.writestr("scores.npy", buf.getvalue() + b"\0" * 4096)

    src = _cam_folder(data, tmp_path, write)
    before = tree_digest(src)
    out = tmp_path / "cams.zarr"
    t0 = time.perf_counter()
    rc, _, err = cli_run(["ingest", "scores", src, "--gt", data["stores"]["gt"], "-o", out, "-q"], capsys)
    assert_clean_error(rc, err, "img003.npz", "(21, 40000, 40000)")
    assert time.perf_counter() - t0 < 30
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
        made = None if rc else {p.name: np.asarray(Image.open(p)) for p in sorted((out / "png").glob("*.png"))}
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
    named = err      # (info --check -q prints no list; its error names the bad chunks)
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
    with pytest.raises(InputError, match="^bg_threshold must be a finite number"):
        evaluate(sets, data["stores"]["gt"], bg_threshold=value, progress=False)
    with pytest.raises(InputError, match="^bg_threshold must be a finite number"):
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


def test_info_check_under_a_terminal(chunked, tmp_path):
    """``isle info --check`` with its progress bar, on a terminal: exit 0 for a good store; for a damaged one
    every bad chunk is named, the last line is the error, exit 2, no traceback."""
    good = chunked["stores"]["set0"]
    rc, text, _ = isle_on_terminal(["info", "--check", good])
    assert rc == 0, text
    assert "check set0" in text and "chunk" in text                 # the bar was drawn
    assert "all 47 chunks good (decoded, crc32c verified, compared with the store's record)" in text
    stores = _copy_target(chunked, tmp_path, "set0")
    files = _chunk_files(stores["set0"], "labels")
    files[5].unlink()
    files[7].write_bytes(files[7].read_bytes()[:-1])
    rc, text, _ = isle_on_terminal(["info", "--check", stores["set0"]])
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
    rc, text, _ = isle_on_terminal(["evaluate", stores["set0"], stores["set1"], "--gt", stores["gt"]])
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


class _System:
    """A pickle whose loading would run a shell command creating the marker."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Reduce:
    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


def _hostile(case: str, marker: Path, h: int, w: int):
    cam = {"keys": np.array([0]), "high_res": np.zeros((1, h, w), np.float32)}
    if case == "names-another-global":
        return {**cam, "f": eval}  # only named, never called
    if case == "nested-in-allowed-dict":
        return {**cam, "extra": [1, {"x": _Evil(str(marker))}]}
    if case == "reduce-os-system":
        return _System(str(marker))
    if case == "hostile-torch-storage":
        torch = pytest.importorskip("torch")
        from isle_fast.stores import safe_pickle

        inner = (pickle.dumps(safe_pickle._TORCH_MAGIC, 2) + pickle.dumps(safe_pickle._TORCH_PROTOCOL, 2)
                 + pickle.dumps({"little_endian": True}, 2) + pickle.dumps(_System(str(marker)), 2))
        return {**cam, "cam": _Reduce(torch.storage._load_from_bytes, (inner,))}
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["names-another-global", "nested-in-allowed-dict", "reduce-os-system",
                                  "hostile-torch-storage"])
def test_hostile_pickles_never_run(data, tmp_path, capsys, case):
    """CAM dicts load without --allow-pickle now (restricted unpickler); a hostile one is refused, naming what
    it asked for, and its payload never runs: through ingest scores, ingest image-labels and merge."""
    marker = tmp_path / "PWNED"

    def write(p, i, h, w):
        obj = _hostile(case, marker, h, w) if i == "img005" else {
            "keys": np.array([0]), "high_res": np.zeros((1, h, w), np.float32)}
        obj = obj if isinstance(obj, dict) else np.array(obj, dtype=object)
        np.save(f"{p}.npy", obj, allow_pickle=True)

    src = _cam_folder(data, tmp_path, write)
    before = tree_digest(src)
    rc, _, err = cli_run(["ingest", "scores", src, "--gt", data["stores"]["gt"], "-o", tmp_path / "c.zarr",
                          "-q"], capsys)
    assert_clean_error(rc, err, "img005.npy", "names the global", "refused without running", "--allow-pickle")
    no_complete_store(tmp_path / "c.zarr")
    gt = open_stack(data["stores"]["gt"])
    labels = {i: np.eye(20, dtype=np.float32)[0] for i in gt.ids}
    labels["img005"] = _hostile(case, marker, 2, 2)
    np.save(tmp_path / "cls_labels.npy", labels, allow_pickle=True)
    rc, _, err = cli_run(["ingest", "image-labels", tmp_path / "cls_labels.npy", "--gt", data["stores"]["gt"],
                          "-o", tmp_path / "il.zarr", "-q"], capsys)
    assert_clean_error(rc, err, "cls_labels.npy", "names the global")
    rc, _, err = cli_run(["merge", *set_paths(data["stores"]), "--gt", data["stores"]["gt"], "--image-labels",
                          tmp_path / "cls_labels.npy", "--out", tmp_path / "e.zarr", "--quiet"], capsys)
    assert_clean_error(rc, err, "cls_labels.npy", "names the global")
    no_complete_store(tmp_path / "e.zarr")
    assert not marker.exists(), "a hostile pickle ran"
    assert tree_digest(src) == before


def test_cam_dicts_as_the_public_code_saves_them_need_no_allow_pickle(data, tmp_path, capsys):
    """The other side of the trust: IRN-style dicts with a pickled torch tensor ingest without the flag."""
    torch = pytest.importorskip("torch")

    def write(p, i, h, w):
        label = torch.zeros(20)
        label[[2, 6]] = 1
        valid_cat = torch.nonzero(label)[:, 0]
        hr = torch.rand((2, h, w))
        np.save(f"{p}.npy", {"keys": valid_cat, "cam": hr[:, ::4, ::4].cpu(), "high_res": hr.numpy()})

    src = _cam_folder(data, tmp_path, write)
    rc, _, err = cli_run(["ingest", "scores", src, "--gt", data["stores"]["gt"], "-o", tmp_path / "c.zarr",
                          "-q"], capsys)
    assert rc == 0, err
    st = open_stack(tmp_path / "c.zarr")
    assert (st.read_image("img000")[..., [3, 7]] > 0).any()


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
    from dask.distributed import Client, LocalCluster
    from dask.utils import parse_bytes

    from benchmarks.common import PeakMemory, make_label_stores
    from isle_fast.ensemble.evaluate import evaluate
    from isle_fast.ensemble.merge import merge

    limit = "380MiB"
    d = make_label_stores(tmp_path, 1200, n_sets=4, max_side=448, seed=3)   # 5 stores x 1200 x 448^2 B = 1.2 GB
    assert d["raw_bytes"] > 3 * parse_bytes(limit)
    tiny = make_label_stores(tmp_path, 4, n_sets=3, max_side=16, seed=4)
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=True, memory_limit=limit,
                      dashboard_address=":0") as cluster, Client(cluster):
        # load the kernels first (both passes': compiling in the worker is memory of its own)
        evaluate(tiny["sets"], tiny["gt"], backend="cpu", progress=False)
        merge(tiny["sets"], tiny["gt"], str(tmp_path / "tiny.zarr"), backend="cpu", progress=False)
        with PeakMemory() as pm:
            ev = evaluate(d["sets"], d["gt"], backend="cpu", progress=False)
        after_evaluate = max(pm.children.values())
        with PeakMemory() as pm_merge:
            res = merge(d["sets"], d["gt"], str(tmp_path / "ens.zarr"), evaluation=ev, backend="cpu",
                        progress=False)
    assert res.stack.num_images == 1200
    peak = max(pm.peak_child, pm_merge.peak_child)
    assert 0 < peak < parse_bytes(limit), (pm.peak_child, pm_merge.peak_child, pm.children)
    # the merge reads into the buffers the evaluation's reads left in the worker's threads: beyond
    # them it needs about an output chunk a thread, not a fresh chunk of every member (measured:
    # 83 MiB more than the evaluation's plateau when it allocated its reads, 21 MiB since)
    import zarr

    chunk = int(np.prod(zarr.open_array(os.path.join(str(d["gt"]), "labels"), mode="r").chunks))
    assert pm_merge.peak_child - after_evaluate < 2 * 3 * chunk, (pm_merge.peak_child, after_evaluate, chunk)
    # every set was counted over the same gt pixels (the full-scale equality check is in benchmarks/pipeline.py)
    per_set = ev.counts.sum(axis=(1, 2))
    assert (per_set == per_set[0]).all() and per_set[0] > 0.5 * 1200 * 448 * 448 * 0.66


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_cluster_whose_workers_all_pause_is_a_clear_error_not_a_hang(data, tmp_path, capsys, monkeypatch):
    """A worker paused at its memory limit with nothing to spill stays paused for good (its memory is
    the libraries' and the allocator's, not task results), and with every worker paused the run waited
    forever (a CI run stalled an hour in test_out_of_core_bounded_memory). Made certain here: a pause
    threshold of 1 % pauses the only worker at once. `isle merge` on it fails within the stall limit,
    one line naming the pause, the memory and what to change; no store and no temporary left."""
    import dask
    from dask.distributed import Client, LocalCluster

    monkeypatch.setenv("ISLE_CLUSTER_STALL_SECONDS", "3")
    with dask.config.set({"distributed.worker.memory.pause": 0.01, "distributed.worker.memory.terminate": False,
                          "distributed.worker.memory.spill": False, "distributed.worker.memory.target": False}), \
            LocalCluster(n_workers=1, threads_per_worker=1, processes=True, memory_limit="4GiB",
                         dashboard_address=":0") as cluster:
        deadline = time.monotonic() + 30
        with Client(cluster) as client:
            while not all(w["status"] == "paused" for w in client.scheduler_info()["workers"].values()):
                assert time.monotonic() < deadline, "the worker never paused"
                time.sleep(0.1)
        out = tmp_path / "ens.zarr"
        t0 = time.monotonic()
        rc, _, err = cli_run(["merge", *set_paths(data["stores"]), "--gt", data["stores"]["gt"], "-o", out,
                              "-q", "--scheduler", cluster.scheduler_address], capsys)
    assert time.monotonic() - t0 < 60
    assert rc == 1, err
    assert_clean_error(rc, err, "no progress", "paused", "memory_limit", "smaller chunks")
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("ens.zarr")], list(tmp_path.iterdir())


# --------------------------------------------------------------------------------------
# hangs: a bad file among many queued reads, the way a user meets it (a terminal, bars on)
# --------------------------------------------------------------------------------------
def _last_line(text: str) -> str:
    lines = [ln for ln in text.replace("\r", "\n").splitlines() if ln.strip()]
    return lines[-1] if lines else ""


N_BIG = 320              # a real-size folder: the bug needs reads still queued when the bad file is found
BAD_AT = 7
CAM_HW = (96, 128)       # CAM-sized: many images per chunk, so many reads queued at once


def _smooth_cam() -> np.ndarray:
    """IRN-style ``high_res`` of two classes, values in [0, 1]."""
    ramp = ((np.arange(CAM_HW[0])[:, None] + np.arange(CAM_HW[1])[None, :]) / sum(CAM_HW)).astype(np.float32)
    return np.stack([ramp, 1 - ramp])


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """320 VOC-sized label PNGs; a gt store of 320 CAM-sized images and 320 IRN-style CAM .npz files."""
    root = tmp_path_factory.mktemp("big")
    rng = np.random.default_rng(5)
    labels = root / "labels"
    labels.mkdir()
    for i in range(N_BIG):
        a = np.zeros((375, 500), np.uint8)
        for _ in range(3):
            y, x = int(rng.integers(0, 300)), int(rng.integers(0, 400))
            a[y:y + 70, x:x + 90] = rng.integers(1, 21)
        Image.fromarray(a, mode="L").save(labels / f"img{i:04d}.png")
    gt_arrays = [np.zeros(CAM_HW, np.uint8) for _ in range(N_BIG)]
    from isle_fast.stores.ingest_arrays import ingest_arrays

    gt = ingest_arrays(gt_arrays, root / "gt.zarr", ids=[f"img{i:04d}" for i in range(N_BIG)], kind="gt").path
    cams = root / "cams"
    cams.mkdir()
    np.savez(cams / "img0000.npz", keys=np.array([0, 14]), high_res=_smooth_cam())
    for i in range(1, N_BIG):
        os.link(cams / "img0000.npz", cams / f"img{i:04d}.npz")
    return {"root": root, "labels": labels, "gt": Path(gt), "cams": cams}


def _with_bad_file(src: Path, dst: Path, bad_id: str, write_bad) -> Path:
    """A copy of folder ``src`` (hard links) in which the file of ``bad_id`` is replaced by ``write_bad``."""
    shutil.copytree(src, dst, copy_function=os.link)
    for p in dst.glob(f"{bad_id}.*"):
        p.unlink()
    write_bad(dst, bad_id)
    return dst


def _bad_pixel(d: Path, i: str) -> None:
    a = np.zeros((375, 500), np.uint8)
    a[5, 5] = 40                                             # not a class, not 255
    Image.fromarray(a, mode="L").save(d / f"{i}.png")


def _cam_with(value: float):
    def write(d: Path, i: str) -> None:
        hr = _smooth_cam()
        hr[1, 3, 4] = value
        np.savez(d / f"{i}.npz", keys=np.array([0, 14]), high_res=hr)
    return write


def _cam_bad_keys(d: Path, i: str) -> None:
    np.savez(d / f"{i}.npz", keys=np.array([0, 25]), high_res=_smooth_cam())


def _cam_truncated_npz(d: Path, i: str) -> None:
    np.savez(d / f"{i}.npz", keys=np.array([0, 14]), high_res=_smooth_cam())
    b = (d / f"{i}.npz").read_bytes()
    (d / f"{i}.npz").write_bytes(b[: len(b) // 2])


def _cam_pickled(d: Path, i: str) -> None:
    # a plain dict of arrays is read by the restricted unpickler; one that names another global is refused
    obj = {"keys": np.array([0, 14]), "high_res": _smooth_cam(), "evil": _System(str(d / "PWNED"))}
    np.save(d / f"{i}.npy", np.array(obj, dtype=object), allow_pickle=True)


_HANG_CASES = {
    "labels-bad-pixel": ("labels", _bad_pixel, "outside [0, 21)"),
    "cams-nan": ("cams", _cam_with(np.nan), "nan"),
    "cams-inf": ("cams", _cam_with(np.inf), "inf"),
    "cams-bad-keys": ("cams", _cam_bad_keys, "keys"),
    "cams-truncated-npz": ("cams", _cam_truncated_npz, "img0007"),
    "cams-pickle-refused": ("cams", _cam_pickled, "allow-pickle"),
}


def _hang_argv(big, case: str, tmp_path: Path) -> tuple[list, Path, Path]:
    what, write_bad, _ = _HANG_CASES[case]
    src = _with_bad_file(big[what], tmp_path / what, f"img{BAD_AT:04d}", write_bad)
    out = tmp_path / "out.zarr"
    if what == "labels":
        argv = ["ingest", "labels", src, "--kind", "gt", "--out", out]
    else:                      # with --gt every file is checked in the read pass
        argv = ["ingest", "scores", src, "--gt", big["gt"], "--out", out, "--workers", "2"]
    return argv, src, out


@pytest.mark.parametrize("case", list(_HANG_CASES))
def test_ingest_bad_file_among_many_exits_under_a_terminal(big, tmp_path, case):
    """``isle ingest`` of 320 files with one bad file, in a terminal with progress bars: it prints the error
    and exits 2 within seconds (it used to print the error and then wait forever)."""
    argv, src, out = _hang_argv(big, case, tmp_path)
    before = tree_digest(src, big["gt"])
    rc, text, _ = isle_on_terminal(argv, timeout=60, size=None, fail_on_timeout=False)
    assert rc is not None, f"isle ingest hung after its error (killed after 60 s): {text[-400:]}"
    assert rc == 2, text[-800:]
    last = _last_line(text)
    fmt = "labels" if _HANG_CASES[case][0] == "labels" else "scores"
    assert last.startswith(f"isle ingest {fmt}: error: ") and f"img{BAD_AT:04d}" in last, last
    assert _HANG_CASES[case][2].lower() in last.lower(), last
    assert "Traceback" not in text
    no_complete_store(out)
    assert not list(tmp_path.glob("out.zarr*")), "the failed ingest left files behind"
    assert tree_digest(src, big["gt"]) == before


_CATCH_AND_GO_ON = r"""
import sys, time
from isle_fast.errors import InputError
from isle_fast.stores.ingest import ingest_labels, ingest_scores
kind, src, out, gt = sys.argv[1:5]
t0 = time.monotonic()
try:
    if kind == "labels":
        ingest_labels(src, out, kind="gt", quiet=False)
    else:
        ingest_scores(src, out, gt=gt, workers=2, quiet=False)
except InputError as exc:
    print("caught:", exc, flush=True)
print(f"carried on after {time.monotonic() - t0:.1f} s", flush=True)
"""


@pytest.mark.parametrize("case", ["labels-bad-pixel", "cams-nan"])
def test_ingest_function_returns_control_after_a_bad_file(big, tmp_path, case):
    """The Python API: the caller catches the InputError and carries on; the process exits promptly
    (it used to block in the ``except`` clause, when the failed run's reads were finalised)."""
    argv, src, out = _hang_argv(big, case, tmp_path)
    what = _HANG_CASES[case][0]
    rc, text, _ = on_terminal([sys.executable, "-c", _CATCH_AND_GO_ON, what, src, out, big["gt"]], timeout=60,
                              size=None, fail_on_timeout=False)
    assert rc is not None, f"the process hung after the caller caught the error: {text[-400:]}"
    assert rc == 0, text[-800:]
    assert "caught:" in text and f"img{BAD_AT:04d}" in text and "carried on" in text
    assert not list(tmp_path.glob("out.zarr*"))


# --------------------------------------------------------------------------------------
# outputs that never destroy: --overwrite replaces only what isle wrote, never an input
# --------------------------------------------------------------------------------------
@pytest.fixture
def own(data, tmp_path):
    """Copies of the stores and PNG folders (a bug here must not damage the module's data), and an images
    store aligned with the gt, in ``tmp_path/in``."""
    from isle_fast.stores.ingest_arrays import ingest_arrays

    root = tmp_path / "in"
    stores = {k: root / Path(v).name for k, v in data["stores"].items()}
    for k, v in data["stores"].items():
        shutil.copytree(v, stores[k])
    folders = {k: root / "src" / k for k in data["folders"]}
    for k, v in data["folders"].items():
        shutil.copytree(v, folders[k])
    gt = open_stack(stores["gt"])
    rng = np.random.default_rng(1)
    imgs = [rng.integers(0, 256, (int(h), int(w), 3)).astype(np.uint8) for h, w in gt.shapes]
    stores["images"] = Path(ingest_arrays(imgs, root / "images.zarr", ids=gt.ids, kind="images").path)
    return {"root": root, "stores": stores, "folders": folders}


def _sets(own) -> list:
    return [own["stores"][f"set{s}"] for s in range(N_SETS)]


def _link(target: Path, link: Path) -> Path:
    link.symlink_to(target)
    return link


@pytest.mark.parametrize("case", [
    "merge-out-is-a-set", "merge-out-is-the-gt", "merge-out-is-a-link-to-a-set", "merge-out-dot-slash-set",
    "ingest-out-is-its-gt", "ingest-out-inside-its-source", "ingest-out-is-its-source",
    "report-out-is-the-gt", "export-out-is-its-store", "refine-out-is-its-images", "merge-out-holds-the-gt",
    "evaluate-json-is-an-input",
])
def test_overwrite_never_replaces_an_input(own, tmp_path, capsys, monkeypatch, case):
    """``isle merge A.zarr B.zarr --gt gt.zarr --out A.zarr --overwrite`` replaced the set A (and
    ``--out gt.zarr`` scored the ensemble against itself: mIoU 100): every spelling of an input as an output
    is refused before any work, naming the argument, and every input is unchanged."""
    st, fo = own["stores"], own["folders"]
    monkeypatch.chdir(own["root"])
    merge = ["merge", *_sets(own), "--gt", st["gt"], "--quiet", "--overwrite"]
    if case == "merge-out-holds-the-gt":
        rep = tmp_path / "rep"           # an earlier report folder (isle's own) into which the gt was moved
        assert cli_run(["report", *_sets(own)[:2], "--gt", st["gt"], "--out", rep, "--quiet"], capsys)[0] == 0
        shutil.move(st["gt"], rep / "gt.zarr")
        st = dict(st, gt=rep / "gt.zarr")
        merge = ["merge", *_sets(own), "--gt", st["gt"], "--quiet", "--overwrite"]
    argv = {
        "merge-out-is-a-set": merge + ["--out", st["set0"]],
        "merge-out-is-the-gt": merge + ["--out", st["gt"]],
        "merge-out-is-a-link-to-a-set": merge + ["--out", _link(st["set1"], tmp_path / "link.zarr")],
        "merge-out-dot-slash-set": merge + ["--out", "./" + st["set2"].name],
        "ingest-out-is-its-gt": ["ingest", "labels", fo["gt"], "--gt", st["gt"], "--out", st["gt"], "-q",
                                 "--overwrite"],
        "ingest-out-inside-its-source": ["ingest", "labels", fo["set0"], "--out", fo["set0"] / "s.zarr",
                                         "-q"],
        "ingest-out-is-its-source": ["ingest", "labels", fo["set0"], "--out", fo["set0"], "-q",
                                     "--overwrite"],
        "report-out-is-the-gt": ["report", *_sets(own), "--gt", st["gt"], "--out", st["gt"], "--quiet",
                                 "--overwrite"],
        "export-out-is-its-store": ["export", st["set0"], "--out", st["set0"], "--quiet", "--overwrite"],
        "refine-out-is-its-images": ["refine", st["set0"], "--images", st["images"], "--out", st["images"],
                                     "--quiet", "--overwrite"],
        "merge-out-holds-the-gt": merge + ["--out", tmp_path / "rep"],
        "evaluate-json-is-an-input": ["evaluate", *_sets(own), "--gt", st["gt"], "--quiet", "--json",
                                      st["gt"] / "zarr.json"],
    }[case]
    roots = [p for p in {*st.values(), *fo.values()} if Path(p).exists()]
    before = tree_digest(*roots)
    rc, out, err = cli_run(argv, capsys)
    assert_clean_error(rc, err, "input" if case != "evaluate-json-is-an-input" else "inside the store")
    assert rc == 2
    assert "mIoU" not in out                           # refused before any work
    assert tree_digest(*roots) == before


def test_train_out_is_never_an_input(own, tmp_path, capsys):
    st = own["stores"]
    for out in (st["images"], st["set0"], st["images"] / "run"):
        before = tree_digest(st["images"], st["set0"])
        rc, _, err = cli_run(["train", "--images", st["images"], "--labels", st["set0"], "--out", out,
                              "--steps", "1", "--batch-size", "2", "--crop", "16",
                              "--backbone", "resnet18_w16", "--weights", "none", "--workers", "0", "--quiet",
                              "--overwrite"], capsys)
        assert_clean_error(rc, err, "input")
        assert tree_digest(st["images"], st["set0"]) == before


@pytest.mark.parametrize("command", ["merge", "ingest", "export", "report", "refine", "train"])
def test_overwrite_refuses_a_folder_isle_did_not_write(own, tmp_path, capsys, command):
    """A folder of someone's files (and a plain file) at --out is refused even with --overwrite, naming it;
    it is left exactly as it was."""
    st, fo = own["stores"], own["folders"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    (mine / "figs").mkdir()
    (mine / "figs" / "a.png").write_bytes(b"\x89PNG")
    notes = tmp_path / "notes.txt"
    notes.write_text("do not delete")
    base = {
        "merge": ["merge", *_sets(own), "--gt", st["gt"], "--quiet", "--no-score"],
        "ingest": ["ingest", "labels", fo["set0"], "--gt", st["gt"], "-q"],
        "export": ["export", st["set0"], "--quiet"],
        "report": ["report", *_sets(own), "--gt", st["gt"], "--quiet"],
        "refine": ["refine", st["set0"], "--images", st["images"], "--quiet"],
        "train": ["train", "--images", st["images"], "--labels", st["set0"], "--steps", "1",
                  "--batch-size", "2", "--crop", "16", "--backbone", "resnet18_w16", "--weights", "none",
                  "--workers", "0", "--quiet"],
    }[command]
    targets = [mine] + ([notes] if command != "train" else [])
    before = tree_digest(mine, notes)
    for target in targets:
        rc, _, err = cli_run(base + ["--out", target, "--overwrite"], capsys)
        assert_clean_error(rc, err, str(target), "even with --overwrite")
        assert tree_digest(mine, notes) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "mine", "notes.txt"]   # no temporaries


@pytest.mark.parametrize("command", ["export", "report", "merge"])
def test_overwrite_replaces_what_isle_wrote(own, tmp_path, capsys, command):
    st = own["stores"]
    base = {"export": ["export", st["set0"], "--quiet"],
            "report": ["report", *_sets(own)[:2], "--gt", st["gt"], "--quiet"],
            "merge": ["merge", *_sets(own), "--gt", st["gt"], "--quiet", "--no-score"]}[command]
    out = tmp_path / "out"
    assert cli_run(base + ["--out", out], capsys)[0] == 0
    rc, _, err = cli_run(base + ["--out", out], capsys)
    assert_clean_error(rc, err, "exists", "--overwrite")
    rc, _, err = cli_run(base + ["--out", out, "--overwrite"], capsys)
    assert rc == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]


@pytest.mark.parametrize("out", [".", "/", "..", "~", "HOME", "CWD"])
@pytest.mark.parametrize("command", ["merge", "export", "ingest", "report"])
def test_out_dot_root_home_and_parents_are_clear_errors(own, tmp_path, capsys, monkeypatch, command, out):
    """``--out .`` used to end in a traceback; ``.``, ``/``, ``..``, the home folder and the working directory
    are refused before any work, with or without --overwrite."""
    st, fo = own["stores"], own["folders"]
    work = tmp_path / "work" / "here"
    work.mkdir(parents=True)
    (work / "keep.txt").write_text("x")
    monkeypatch.chdir(work)
    path = {"HOME": str(Path.home()), "CWD": str(work), "~": os.path.expanduser("~")}.get(out, out)
    base = {"merge": ["merge", *_sets(own), "--gt", st["gt"], "--quiet", "--no-score"],
            "export": ["export", st["set0"], "--quiet"],
            "ingest": ["ingest", "labels", fo["set0"], "--gt", st["gt"], "-q"],
            "report": ["report", *_sets(own)[:2], "--gt", st["gt"], "--quiet"]}[command]
    for extra in ([], ["--overwrite"]):
        rc, _, err = cli_run(base + ["--out", path] + extra, capsys)
        assert_clean_error(rc, err, "--out")
        assert rc == 2
        assert re.search("root folder|home folder|working directory", err), err
    assert [p.name for p in work.iterdir()] == ["keep.txt"]


def test_json_never_replaces_what_isle_did_not_write(own, tmp_path, capsys):
    """``--json`` used to overwrite any file, ``gt.zarr/zarr.json`` included, and to leave ``.x.tmp-...``
    when it named a folder. Now: a folder, a file inside a store, an input, a file isle did not write (even
    for merge with --overwrite) are refused before any work; an earlier isle result is replaced."""
    st = own["stores"]
    ev = ["evaluate", *_sets(own), "--gt", st["gt"], "--quiet"]
    before = tree_digest(*st.values())
    folder = tmp_path / "results"
    folder.mkdir()
    paper = tmp_path / "paper.json"
    paper.write_text('{"title": "mine"}')
    for target, needle in ((st["gt"] / "zarr.json", "inside the store"),
                           (st["set1"] / "labels" / "x.json", "inside the store"),
                           (folder, "is a folder"), (st["set0"], "is a folder"),
                           (paper, "not written by isle")):
        rc, out, err = cli_run(ev + ["--json", target], capsys)
        assert_clean_error(rc, err, "--json", needle)
        assert out == ""                                   # refused before the evaluation ran
    merge = ["merge", *_sets(own), "--gt", st["gt"], "--quiet", "--no-score", "--overwrite"]
    rc, _, err = cli_run(merge + ["--out", tmp_path / "e.zarr", "--json", paper], capsys)
    assert_clean_error(rc, err, "not written by isle")
    rc, _, err = cli_run(merge + ["--out", tmp_path / "e.zarr", "--json", tmp_path / "e.zarr" / "m.json"],
                         capsys)
    assert_clean_error(rc, err, "another output")
    assert not (tmp_path / "e.zarr").exists()
    assert tree_digest(*st.values()) == before and paper.read_text() == '{"title": "mine"}'
    assert not any(folder.iterdir()) and not [p for p in tmp_path.rglob("*") if ".tmp-" in p.name]
    scores = tmp_path / "scores.json"
    for _ in range(2):                                     # re-running replaces its own result
        rc, _, err = cli_run(ev + ["--json", scores], capsys)
        assert rc == 0, err
    assert json.loads(scores.read_text())["isle_output"]["command"] == "isle evaluate"


def test_broken_stdout_pipe_is_not_a_traceback(data, tmp_path):
    """``isle evaluate ... | head -1``: the reader goes away; the command ends quietly (exit 1), without
    "Exception ignored ... BrokenPipeError" or a traceback."""
    argv = [sys.executable, "-m", "isle_fast", "evaluate", *set_paths(data["stores"]), "--gt",
            data["stores"]["gt"]]                           # (not --quiet: it prints nothing to stdout)
    plain = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}   # as in a shell: buffered
    plain["ISLE_PROGRESS"] = "0"
    for env in (plain, dict(plain, PYTHONUNBUFFERED="1")):
        r, w = os.pipe()
        os.close(r)                                        # the reader is gone before the first write
        try:
            proc = subprocess.run([str(a) for a in argv], stdout=w, stderr=subprocess.PIPE, cwd=REPO, env=env,
                                  timeout=120)
        finally:
            os.close(w)
        err = proc.stderr.decode()
        assert proc.returncode == 1, (proc.returncode, err)
        assert "Traceback" not in err and "BrokenPipeError" not in err and "Exception ignored" not in err, err
    shell = subprocess.run(["bash", "-c", " ".join(f"'{a}'" for a in argv) + " | head -1"],
                           capture_output=True, text=True, cwd=REPO, env=plain, timeout=120)
    assert shell.stdout.startswith("class") and "Traceback" not in shell.stderr, shell.stderr
    assert "Exception ignored" not in shell.stderr, shell.stderr


def test_demo_out_dot_never_deletes_the_working_directory(tmp_path, capsys, monkeypatch):
    """``isle demo --out . --overwrite`` inside an earlier demo folder used to delete the working directory
    (``rmtree('.')``); the working directory and the folders above it are never outputs."""
    work = tmp_path / "demo"
    work.mkdir()
    (work / ".isle-demo").write_text("made by isle demo\n")
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    for out in (".", str(work), str(tmp_path)):
        rc, _, err = cli_run(["demo", "--out", out, "--overwrite", "--quick", "--quiet"], capsys)
        assert_clean_error(rc, err, "working directory")
    assert sorted(p.name for p in work.iterdir()) == [".isle-demo", "notes.txt"]
