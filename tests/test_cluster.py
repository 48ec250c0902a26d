"""The ``isle`` CLI on a real ``dask.distributed`` cluster: a ``dask scheduler`` and two ``dask worker``
processes started here (``--nworkers 1 --nthreads 1``, 127.0.0.1 only, free ports).

Every result equals the threaded run's bit for bit; a worker killed in the middle of an ingest or a
merge does not change the result (its tasks run again on the other); a bad address is one line, no
traceback, within the timeout. Every process is started in its own session and killed with its
group by the fixture's finalizer, whether the test passed or not.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests._pipeline_data import _same_files, _same_store, _scores, make_folders
from tests._pty import isle_on_terminal

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[1]
SLOW_WORKER = Path(__file__).with_name("_slow_worker.py")


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
@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return make_folders(tmp_path_factory.mktemp("data"))


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
    assert re.search(rf"cluster +{re.escape(cluster.address)} \(2 workers, 2 threads\)", text), text
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


def test_the_strata_choice_on_the_cluster_equals_the_threaded_one(cluster, tmp_path):
    """The strata passes return each task's images as a block of Python objects (their sparse
    ``ImageCounts``): from the cluster's worker processes they give the threaded run's scores and ensemble,
    with and without the distance bins (a score set among the sets)."""
    import numpy as np
    from distributed import Client

    from isle_fast.ensemble.merge import merge
    from tests.test_partial_gt import make_case

    rng = np.random.default_rng(11)
    sets, gt, gts, sub, c = make_case(tmp_path, rng, n_img=12, subset=[5, 2, 0, 7, 9], scores=True)
    allowed = np.stack([[(g == k).any() for k in range(c)] for g in gts])
    for mode in ("strata-context", "strata-semi"):
        here = merge(sets, gt, tmp_path / f"{mode}-here.zarr", progress=False, image_labels=allowed,
                     subset_selection=mode)
        with Client(cluster.address):
            there = merge(sets, gt, tmp_path / f"{mode}-there.zarr", progress=False, image_labels=allowed,
                          subset_selection=mode)
        assert there.stack.provenance["subset_selection"] == mode
        assert there.stack.provenance["strata_scores"] == here.stack.provenance["strata_scores"]
        np.testing.assert_array_equal(np.asarray(there.stack.array[:]), np.asarray(here.stack.array[:]))


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


def test_progress_comes_from_the_cluster(cluster, folders, local_run):
    """Under a terminal the bar counts the tasks the cluster's workers finish."""
    rc, text, _ = isle_on_terminal(["evaluate", "local/a.zarr", "local/b.zarr", "--gt", "local/gt.zarr",
                                    "--scheduler", cluster.address], cwd=folders, timeout=120,
                                   env={SCHED_ENV: None})
    text = text.replace("\r", "\n")
    assert rc == 0, text[-2000:]
    # the bar counts images (40), moved by the chunk tasks the workers finish (the direct pass, stores
    # chunked alike) or by the scheduler's progress plugin (the Dask graph), e.g.
    # "evaluate:  85%|#####  | 34/40 [00:00<00:00, 204.56img/s]"
    frames = [ln for ln in text.splitlines() if re.match(r"evaluate: +\d+%\|.*\| \d+/40 \[.*img/s\]", ln)]
    assert frames, text[-2000:]
    assert "cluster" in text and "2 workers" in text


def test_run_and_report_on_the_cluster(cluster, folders, local_run):
    """``isle run`` (every step on the cluster: no local process pool) and ``isle report``."""
    text = ok(isle(["run", "--gt", "gt", "--set", "a=a", "--set", "b=b", "--set", "c=c", "--classes", "classes.txt",
                    "--no-report", "-o", "run-cluster", "--scheduler", cluster.address], folders))
    assert "2 workers" in text, text
    _same_store(local_run / "ens.zarr", folders / "run-cluster" / "ensemble.zarr")
    _same_files(local_run / "png", folders / "run-cluster" / "ensemble")
    stores = [f"local/{s}.zarr" for s in "abc"]
    text = ok(isle(["report", *stores, "--gt", "local/gt.zarr", "--out", "report-cluster",
                    "--scheduler", cluster.address], folders))
    assert "2 workers" in text and (folders / "report-cluster").is_dir()


def test_the_scheduler_address_comes_from_the_flag_the_environment_or_dask_config(tmp_path, monkeypatch):
    from isle_fast.cluster import address_origin, scheduler_address

    monkeypatch.delenv(SCHED_ENV, raising=False)
    monkeypatch.setenv("DASK_CONFIG", str(tmp_path / "none"))
    if "dask" not in sys.modules:    # nothing configured (with Dask imported, its config is read)
        assert scheduler_address(None) is None
    monkeypatch.setenv(SCHED_ENV, "tcp://10.0.0.1:8786")
    assert scheduler_address(None) == "tcp://10.0.0.1:8786"
    assert scheduler_address("tcp://10.0.0.2:8786") == "tcp://10.0.0.2:8786"     # the flag wins
    assert scheduler_address("threads", local=("auto", "threads")) is None        # refine's local names
    assert address_origin(None) == "$DASK_SCHEDULER_ADDRESS" and address_origin("tcp://x:1") == "--scheduler"


def test_dask_yaml_config_is_honoured(folders, local_run, tmp_path):
    """``scheduler-address`` in a Dask YAML file (here via DASK_CONFIG) is where the command goes."""
    port = _free_port()
    (tmp_path / "dask.yaml").write_text(f"scheduler-address: tcp://127.0.0.1:{port}\n")
    proc = isle(["evaluate", "local/a.zarr", "--gt", "local/gt.zarr"], folders,
                env={"DASK_CONFIG": str(tmp_path), "ISLE_SCHEDULER_TIMEOUT": "1"})
    assert proc.returncode == 2, proc.stderr
    assert f"isle evaluate: error: Dask's scheduler-address config tcp://127.0.0.1:{port}: cannot connect" \
        in proc.stderr, proc.stderr


# ------------------------------------------------------------------------------ the chunk executor
def test_the_executor_sends_the_function_once_and_batches_the_tasks(cluster, monkeypatch):
    """``ClusterExecutor.imap``: every result, each under its own index, equal to a plain call; the
    function (here holding 1 MiB, as a partial holds the stores' chunk specs) is pickled at most twice
    (it goes to the cluster as a task of its own), not once per task; consecutive tasks go together
    in fewer cluster tasks."""
    from distributed import Client

    from isle_fast.stores.parallel import ClusterExecutor
    from tests._cluster_fn import CountedFn

    fn = CountedFn(b"x" * 2**20)
    tasks = [(i, i + 1) for i in range(200)]
    with Client(cluster.address, timeout=30) as client:
        ex = ClusterExecutor(client)
        assert ex.workers == 2
        submits = []
        real_submit = client.submit
        monkeypatch.setattr(client, "submit", lambda *a, **k: submits.append(1) or real_submit(*a, **k))
        CountedFn.pickled = 0
        got = dict(ex.imap(fn, tasks))
        assert got == {i: a * b + 2**20 for i, (a, b) in enumerate(tasks)}
        assert CountedFn.pickled <= 2                      # was once per task: 200 MiB through the scheduler
        size = ex.batch_size(len(tasks))
        # 200 // (2 workers x 16) tasks per cluster task, + 1: the task holding the function
        assert size == 6 and len(submits) == 1 + -(-len(tasks) // size)
        assert list(ex.imap(fn, [])) == []


def test_the_executor_batch_size_leaves_every_worker_many_tasks():
    from isle_fast.stores.parallel import ClusterExecutor

    ex = ClusterExecutor.__new__(ClusterExecutor)
    ex.workers = 2
    assert [ex.batch_size(n) for n in (1, 31, 32, 64, 200, 256, 10_000)] == [1, 1, 1, 2, 6, 8, 8]
    ex.workers = 64
    assert ex.batch_size(1000) == 1


def test_a_task_that_kills_its_worker_each_time_is_worker_lost_naming_the_memory_limit():
    """A task whose worker dies each time it runs it (as one killed by its nanny past 95 % memory):
    distributed gives up after ``allowed-failures`` (``KilledWorker``), and the executor raises
    :class:`WorkerLost`, the one-line environment failure, naming the tasks and what to change."""
    import dask
    from distributed import Client, LocalCluster

    from isle_fast.stores.parallel import ClusterExecutor, WorkerLost

    with dask.config.set({"distributed.scheduler.allowed-failures": 0}), \
            LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as lc, \
            Client(lc) as client:
        ex = ClusterExecutor(client)
        with pytest.raises(WorkerLost, match=r"tasks 0\.\.0 were on a cluster worker that died.*memory_limit"):
            list(ex.imap(os._exit, [(3,)]))


@pytest.mark.timeout(120)
def test_a_worker_paused_by_its_kept_chunk_buffers_resumes(monkeypatch):
    """The chunk buffers a worker's threads keep are memory distributed cannot spill: a worker they hold
    past its pause threshold ran nothing more, for good (the stall of test_out_of_core_bounded_memory).
    The executor, seeing every worker paused, has them drop their kept buffers; the worker resumes
    and every task finishes (before: ClusterStalled once the stall limit passed)."""
    import dask
    import psutil
    from distributed import Client, LocalCluster

    from isle_fast.stores.parallel import ClusterExecutor
    from tests._cluster_fn import keep_buffer

    monkeypatch.setenv("ISLE_CLUSTER_STALL_SECONDS", "8")
    big = 400 * 2**20
    with dask.config.set({"distributed.worker.memory.terminate": False, "distributed.worker.memory.spill": False,
                          "distributed.worker.memory.target": False}), \
            LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0",
                         memory_limit="8GiB") as lc, Client(lc) as client:
        client.run(keep_buffer, 0)   # the worker imports what the task needs, then its resident size
        rss = max(client.run(lambda: psutil.Process().memory_info().rss).values())
        limit = int((rss + big // 2) / 0.8)      # paused with the buffer, running without it
        client.run(lambda dask_worker: setattr(dask_worker.memory_manager, "memory_limit", limit))
        ex = ClusterExecutor(client)
        assert dict(ex.imap(keep_buffer, [(big,)] + [(0,)] * 5)) == {0: big, **{i: 0 for i in range(1, 6)}}
