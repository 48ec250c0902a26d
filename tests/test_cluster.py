"""The ``isle`` CLI on a real ``dask.distributed`` cluster: a ``dask scheduler`` and two ``dask worker``
processes started here (``--nworkers 1 --nthreads 1``, 127.0.0.1 only, free ports).

Every result equals the threaded run's bit for bit; a worker killed in the middle of an ingest or a
merge does not change the result (its tasks run again on the other); a bad address is one line, no
traceback, within the timeout. Every process is started in its own session and killed with its
group by the fixture's finalizer, whether the test passed or not.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from isle_fast.stores.stack import open_stack

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[1]
SLOW_WORKER = Path(__file__).with_name("_slow_worker.py")
PALETTE = [v for i in range(256) for v in ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Cluster:
    """A scheduler and workers as process groups; :meth:`stop` kills them all."""

    def __init__(self, root: Path, workers: int = 2, *, slow: float | None = None):
        self.root = root
        self.procs: list[subprocess.Popen] = []
        self.workers: list[subprocess.Popen] = []
        self.port = _free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        run_dir = root / "cluster-cwd"   # workers run elsewhere: paths must reach them absolute
        run_dir.mkdir(exist_ok=True)
        self.env = dict(os.environ, ISLE_PROGRESS="0", PYTHONPATH=str(REPO),
                        DASK_DISTRIBUTED__WORKER__DAEMON="False")
        self.env.pop(SCHED_ENV, None)
        if slow is not None:
            self.env["ISLE_TEST_TASK_DELAY"] = str(slow)
        self.log = open(root / "cluster.log", "ab")
        self._start([sys.executable, "-m", "dask", "scheduler", "--host", "127.0.0.1", "--port",
                     str(self.port), "--no-dashboard"], run_dir)
        for _ in range(workers):
            cmd = [sys.executable, "-m", "dask", "worker", self.address, "--nworkers", "1", "--nthreads", "1",
                   "--host", "127.0.0.1", "--no-dashboard", "--death-timeout", "60"]
            if slow is not None:
                cmd += ["--preload", str(SLOW_WORKER)]
            self.workers.append(self._start(cmd, run_dir))
        self.wait_for_workers(workers)

    def _start(self, cmd: list[str], cwd: Path) -> subprocess.Popen:
        p = subprocess.Popen(cmd, cwd=cwd, env=self.env, stdout=self.log, stderr=self.log,
                             start_new_session=True)
        self.procs.append(p)
        return p

    def n_workers(self) -> int:
        from distributed import Client

        with Client(self.address, timeout=10) as c:
            return len(c.scheduler_info()["workers"])

    def wait_for_workers(self, n: int, timeout: float = 120) -> None:
        from distributed import Client

        with Client(self.address, timeout=timeout) as c:
            c.wait_for_workers(n, timeout=timeout)

    def kill_worker(self, i: int) -> None:
        """SIGKILL worker ``i``'s whole process group (its nanny and the worker process)."""
        _kill_group(self.workers[i], signal.SIGKILL)

    def stop(self) -> None:
        for p in reversed(self.procs):
            _kill_group(p, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _kill_group(p, signal.SIGKILL)
                p.wait(timeout=15)
        self.log.close()


SCHED_ENV = "DASK_SCHEDULER_ADDRESS"


def _kill_group(p: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(p.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture
def slow_cluster(tmp_path):
    c = Cluster(tmp_path, slow=0.15)
    try:
        yield c
    finally:
        c.stop()


# ------------------------------------------------------------------------------------------ data
def _png(path: Path, a: np.ndarray) -> None:
    im = Image.fromarray(a, mode="P")
    im.putpalette(PALETTE)
    im.save(path, compress_level=1)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A gt folder and three noisy pseudo-label folders (label PNGs, 6 classes, odd sizes) + RGB."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(15)
    names = ["gt", "a", "b", "c", "rgb"]
    for n in names:
        (root / n).mkdir()
    for i in range(40):
        h, w = int(rng.integers(40, 61)), int(rng.integers(50, 71))
        gt = np.zeros((h, w), np.uint8)
        for _ in range(3):
            y, x = int(rng.integers(0, h - 10)), int(rng.integers(0, w - 10))
            gt[y:y + int(rng.integers(5, 20)), x:x + int(rng.integers(5, 20))] = rng.integers(1, 6)
        gt[rng.random((h, w)) < 0.02] = 255
        _png(root / "gt" / f"im{i:03d}.png", gt)
        for s, p in zip("abc", (0.1, 0.2, 0.3)):
            noisy = gt.copy()
            flip = rng.random((h, w)) < p
            noisy[flip] = rng.integers(0, 6, size=int(flip.sum()))
            noisy[noisy == 255] = 0
            _png(root / s / f"im{i:03d}.png", noisy)
        Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(root / "rgb" / f"im{i:03d}.png")
    (root / "classes.txt").write_text("background\nc1\nc2\nc3\nc4\nc5\n")
    return root


def isle(args: list, cwd: Path, *, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    e = dict(os.environ, ISLE_PROGRESS="0", PYTHONPATH=str(REPO))
    e.pop(SCHED_ENV, None)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "isle_fast", *map(str, args)], cwd=cwd, env=e,
                          capture_output=True, text=True, timeout=timeout)


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def _ingest_all(root: Path, out: Path, extra: list) -> None:
    """Ingest the gt, the three sets and the RGB images into ``out`` (paths relative to ``root``)."""
    rel = os.path.relpath(out, root)
    ok(isle(["ingest", "labels", "gt", "--kind", "gt", "--classes", "classes.txt", "--chunks", "4,60,70",
             "-o", f"{rel}/gt.zarr", *extra], root))
    for s in "abc":
        ok(isle(["ingest", "labels", s, "--gt", f"{rel}/gt.zarr", "-o", f"{rel}/{s}.zarr", *extra], root))
    ok(isle(["ingest", "images", "rgb", "--gt", f"{rel}/gt.zarr", "-o", f"{rel}/rgb.zarr", *extra], root))


def _same_store(a: Path, b: Path) -> None:
    x, y = open_stack(a), open_stack(b)
    assert x.ids == y.ids and np.array_equal(x.shapes, y.shapes)
    assert x.classes == y.classes and x.encoding == y.encoding
    assert x.array.dtype == y.array.dtype and x.array.shape == y.array.shape
    assert np.array_equal(np.asarray(x.array[:]), np.asarray(y.array[:]))


def _same_files(a: Path, b: Path) -> None:
    """Every PNG byte for byte (not isle's ownership marker: it records when it was written)."""
    fa = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file() and p.name != ".isle-output.json")
    fb = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file() and p.name != ".isle-output.json")
    assert fa == fb and fa
    for p in fa:
        assert (a / p).read_bytes() == (b / p).read_bytes(), p


@pytest.fixture(scope="module")
def local_run(folders):
    """Every step threaded / in local processes (no scheduler): the reference."""
    out = folders / "local"
    out.mkdir()
    _ingest_all(folders, out, [])
    stores = [f"local/{s}.zarr" for s in "abc"]
    ok(isle(["evaluate", *stores, "--gt", "local/gt.zarr", "--json", "local/eval.json"], folders))
    ok(isle(["merge", *stores, "--gt", "local/gt.zarr", "--out", "local/ens.zarr", "--json", "local/merge.json"],
            folders))
    ok(isle(["export", "local/ens.zarr", "--out", "local/png"], folders))
    ok(isle(["refine", "local/a.zarr", "--images", "local/rgb.zarr", "--with", "crf",
             "--param", "crf.iterations=2", "--out", "local/ref.zarr"], folders))
    return out


def _scores(path: Path) -> dict:
    """The JSON's numbers and selection (without the store paths, which differ by folder)."""
    d = json.loads(path.read_text())
    sets = {n: {k: v for k, v in s.items() if k != "path"} for n, s in d["sets"].items()}
    return {"classes": d["classes"], "sets": sets, "selection": d["selection"], "gt_pixels": d["gt_pixels"]}


# ----------------------------------------------------------------------------------------- tests
def test_every_command_on_the_cluster_equals_the_threaded_run(cluster, folders, local_run):
    out = folders / "on-cluster"
    out.mkdir()
    sched = ["--scheduler", cluster.address]
    _ingest_all(folders, out, sched)
    for s in ("gt", "a", "b", "c", "rgb"):
        _same_store(local_run / f"{s}.zarr", out / f"{s}.zarr")
    stores = [f"on-cluster/{s}.zarr" for s in "abc"]
    text = ok(isle(["evaluate", *stores, "--gt", "on-cluster/gt.zarr", "--json", "on-cluster/eval.json",
                    *sched], folders))
    assert f"cluster  {cluster.address} (2 workers, 2 threads)" in text, text
    assert _scores(out / "eval.json") == _scores(local_run / "eval.json")
    text = ok(isle(["merge", *stores, "--gt", "on-cluster/gt.zarr", "--out", "on-cluster/ens.zarr",
                    "--json", "on-cluster/merge.json", *sched], folders))
    assert "2 workers" in text
    _same_store(local_run / "ens.zarr", out / "ens.zarr")
    ok(isle(["export", "on-cluster/ens.zarr", "--out", "on-cluster/png", *sched], folders))
    _same_files(local_run / "png", out / "png")
    ok(isle(["refine", "on-cluster/a.zarr", "--images", "on-cluster/rgb.zarr", "--with", "crf",
             "--param", "crf.iterations=2", "--out", "on-cluster/ref.zarr", *sched], folders))
    _same_store(local_run / "ref.zarr", out / "ref.zarr")


def test_dask_scheduler_address_is_honoured(cluster, folders, local_run):
    stores = [f"local/{s}.zarr" for s in "abc"]
    text = ok(isle(["evaluate", *stores, "--gt", "local/gt.zarr", "--json", "env-eval.json"], folders,
                   env={SCHED_ENV: cluster.address}))
    assert cluster.address in text and "2 workers" in text
    assert _scores(folders / "env-eval.json") == _scores(local_run / "eval.json")
    # --scheduler wins over the environment; a local name (refine) means this machine
    bad = isle(["evaluate", *stores, "--gt", "local/gt.zarr", "--scheduler", cluster.address], folders,
               env={SCHED_ENV: "tcp://127.0.0.1:1"})
    assert bad.returncode == 0, bad.stderr


def test_a_bad_scheduler_address_is_one_line(folders, local_run):
    port = _free_port()   # nothing listens there
    t0 = time.monotonic()
    proc = isle(["evaluate", "local/a.zarr", "--gt", "local/gt.zarr", "--scheduler", f"tcp://127.0.0.1:{port}"],
                folders, env={"ISLE_SCHEDULER_TIMEOUT": "2"})
    assert time.monotonic() - t0 < 30
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("isle evaluate: error: --scheduler tcp://127.0.0.1:") and "2 s" in lines[0]
    proc = isle(["ingest", "labels", "gt", "-o", "x.zarr", "--scheduler", "no such::host"], folders,
                env={"ISLE_SCHEDULER_TIMEOUT": "1"})
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (folders / "x.zarr").exists()


def _wait_for(pred, proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the command ended (rc {proc.returncode}) before {what}: {err[-1500:]}")
        time.sleep(0.02)
    pytest.fail(f"timed out waiting for {what}")


def _popen(args: list, cwd: Path) -> subprocess.Popen:
    e = dict(os.environ, ISLE_PROGRESS="0", PYTHONPATH=str(REPO))
    e.pop(SCHED_ENV, None)
    return subprocess.Popen([sys.executable, "-m", "isle_fast", *map(str, args)], cwd=cwd, env=e,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _chunks_written(store_glob: str, root: Path, array: str = "labels") -> int:
    return sum(1 for t in root.glob(store_glob) for p in (t / array / "c").rglob("*") if p.is_file())


def test_a_worker_killed_mid_ingest_changes_nothing(slow_cluster, folders, local_run, tmp_path):
    out = tmp_path / "k.zarr"
    proc = _popen(["ingest", "labels", "gt", "--kind", "gt", "--classes", "classes.txt", "--chunks", "2,60,70",
                   "-o", out, "--scheduler", slow_cluster.address], folders)
    try:
        _wait_for(lambda: _chunks_written("k.zarr.tmp-*", tmp_path) >= 2, proc, "two chunks were written")
        slow_cluster.kill_worker(1)
        assert proc.poll() is None, "the ingest ended before the worker was killed"
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        _kill_group(proc, signal.SIGKILL)
    assert proc.returncode == 0, stderr[-3000:]
    assert "1 worker" in stdout, stdout     # the summary counts the workers left
    _same_store(local_run / "gt.zarr", out)


def test_a_worker_killed_mid_merge_changes_nothing(slow_cluster, folders, local_run, tmp_path):
    stores = [f"local/{s}.zarr" for s in "abc"]
    out = tmp_path / "e.zarr"
    proc = _popen(["merge", *stores, "--gt", "local/gt.zarr", "--out", out, "--no-score",
                   "--scheduler", slow_cluster.address], folders)
    try:
        _wait_for(lambda: _chunks_written("e.zarr.tmp-*", tmp_path) >= 2, proc, "two ensemble chunks were written")
        slow_cluster.kill_worker(0)
        assert proc.poll() is None, "the merge ended before the worker was killed"
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        _kill_group(proc, signal.SIGKILL)
    assert proc.returncode == 0, stderr[-3000:]
    _same_store(local_run / "ens.zarr", out)
