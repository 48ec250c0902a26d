"""Chunk tasks on worker processes (isle_fast.stores.parallel) and ingest through them.

The ingest cases are run the way a user meets them: a real-size folder (300
VOC-sized label PNGs), ``isle ingest`` in a subprocess under a pseudo-terminal
with progress bars on, a bad file in the middle, a worker killed, Ctrl-C.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from isle_fast.errors import InputError, StoreError
from isle_fast.stores.ingest import ingest_labels
from isle_fast.stores.ingest_arrays import ingest_arrays
from isle_fast.stores.parallel import (
    InlineExecutor,
    ProcessPool,
    ThreadExecutor,
    WorkerLost,
    compact,
    executor_for,
    use_pool,
)
from isle_fast.stores.stack import open_stack
from tests import reference
from tests._pty import isle_on_terminal

REPO = Path(__file__).resolve().parents[1]
PALETTE = reference.voc_palette().ravel().tolist()


def voc_like(rng: np.random.Generator, h: int, w: int, c: int = 21) -> np.ndarray:
    """A VOC-like label map: background, a few rectangles of classes, a 255 band around them."""
    a = np.zeros((h, w), np.uint8)
    for _ in range(int(rng.integers(1, 4))):
        y0, x0 = int(rng.integers(0, h - 8)), int(rng.integers(0, w - 8))
        y1, x1 = y0 + int(rng.integers(8, h // 2)), x0 + int(rng.integers(8, w // 2))
        a[y0:y1, x0:x1] = 255
        a[y0 + 2:y1 - 2, x0 + 2:x1 - 2] = rng.integers(1, c)
    return a


def write_png(path: Path, a: np.ndarray) -> None:
    im = Image.fromarray(a, mode="P")
    im.putpalette(PALETTE)
    im.save(path, compress_level=1)


@pytest.fixture(scope="module")
def folder300(tmp_path_factory):
    """300 VOC-sized palette label PNGs (500 x 330..500); image 150 holds the value 40 (not a class)."""
    root = tmp_path_factory.mktemp("voc300")
    good, bad = root / "good", root / "bad"
    good.mkdir()
    bad.mkdir()
    rng = np.random.default_rng(3)
    data = {}
    for i in range(300):
        h, w = (500, int(rng.integers(330, 501))) if i % 3 else (int(rng.integers(330, 501)), 500)
        a = voc_like(rng, h, w)
        image_id = f"2008_{i:06d}"
        data[image_id] = a
        write_png(good / f"{image_id}.png", a)
        if i == 150:
            a = a.copy()
            a[7, 9] = 40
        os.link(good / f"{image_id}.png", bad / f"{image_id}.png") if i != 150 else write_png(
            bad / f"{image_id}.png", a)
    return {"good": good, "bad": bad, "data": data}


# ----------------------------------------------------------------------------------- executors
def _square(x):
    return x * x


def _fail_on(x, bad):
    if x == bad:
        raise ValueError(f"task {x} failed")
    return x


def _slow_pid(x):
    time.sleep(0.05)
    return os.getpid()


def test_process_pool_results_closures_and_reuse():
    k = 7
    with ProcessPool(2) as pool:
        assert dict(pool.imap(_square, [(i,) for i in range(20)])) == {i: i * i for i in range(20)}
        got = dict(pool.imap(lambda x: x + k, [(i,) for i in range(5)]))   # a closure: cloudpickled
        assert got == {i: i + k for i in range(5)}
        pids = {pid for _, pid in pool.imap(_slow_pid, [(i,) for i in range(6)])}
        assert len(pids) == 2 and os.getpid() not in pids


def _mark_env():
    os.environ["ISLE_TEST_BROADCAST"] = "warm"
    raise ValueError("a warm-up that fails is ignored")


def _read_env(_):
    return os.environ.get("ISLE_TEST_BROADCAST")


def test_broadcast_runs_in_every_worker_before_its_next_task_and_answers_nothing():
    with ProcessPool(2) as pool:
        pool.broadcast(_mark_env)
        got = sorted(pool.imap(_read_env, [(i,) for i in range(6)]))
    assert got == [(i, "warm") for i in range(6)] and "ISLE_TEST_BROADCAST" not in os.environ


def test_numba_fork_safe_follows_numba_threads():
    """Forked after Numba started its thread pool, a worker cannot run a parallel kernel: a pool
    records it when it forks (isle run then counts in the separate evaluate pass)."""
    code = ("from isle_fast.stores.parallel import ProcessPool, numba_fork_safe\n"
            "p = ProcessPool(2, start_method='fork')\n"
            "p.start(); print(numba_fork_safe(), p.numba_safe); p.close()\n")
    fresh = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert fresh.stdout.split() == ["True", "True"], fresh.stderr[-500:]
    from isle_fast.backend import get_kernels
    from isle_fast.stores.parallel import numba_fork_safe

    a = np.zeros((1, 8, 8), np.uint8)
    get_kernels("cpu").confusion_labels(a, (a,), 3)     # a parallel kernel: Numba's threads start
    assert not numba_fork_safe()
    pool = ProcessPool(2, start_method="fork")
    with pool.start():
        assert not pool.numba_safe


def test_process_pool_task_error_keeps_its_traceback():
    with pytest.raises(ValueError, match="task 13 failed") as exc:
        with ProcessPool(2) as pool:
            list(pool.imap(_fail_on, [(i, 13) for i in range(40)]))
    assert "_fail_on" in str(exc.value.__cause__)


def test_process_pool_window_bounds_tasks_in_flight(tmp_path):
    """At most ``window`` tasks are sent out at once (memory stays a few chunks per worker)."""
    started = []

    def task(i):
        Path(tmp_path / f"started-{i}").touch()
        time.sleep(0.02)
        return i

    with ProcessPool(2) as pool:
        for i, _ in pool.imap(task, [(i,) for i in range(30)], window=4):
            started.append(len(list(tmp_path.glob("started-*"))))
            # tasks that have started <= finished so far + the window
            assert started[-1] <= len(started) + 4
    assert sorted(int(p.name.split("-")[1]) for p in tmp_path.glob("started-*")) == list(range(30))


def _kill_self_at(x, at):
    if x == at:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.01)
    return x


def test_dead_worker_is_noticed_at_once():
    t0 = time.monotonic()
    with pytest.raises(WorkerLost, match="SIGKILL"):
        with ProcessPool(2) as pool:
            list(pool.imap(_kill_self_at, [(i, 5) for i in range(200)]))
    assert time.monotonic() - t0 < 10
    assert isinstance(WorkerLost("x"), OSError)        # the CLI reports it as an environment error (exit 1)


def test_terminate_stops_running_tasks():
    pool = ProcessPool(2)
    it = pool.imap(time.sleep, [(30,) for _ in range(4)])
    th = threading.Timer(0.5, pool.terminate)
    th.start()
    t0 = time.monotonic()
    with pytest.raises(Exception):
        next(it)
    th.join()
    assert time.monotonic() - t0 < 10


def test_thread_executor_stops_promptly_on_error():
    t0 = time.monotonic()
    with pytest.raises(ValueError):
        with ThreadExecutor(2) as ex:
            for _ in ex.imap(lambda x: (_fail_on(x, 3), time.sleep(0.01)), [(i,) for i in range(300)]):
                pass
    assert time.monotonic() - t0 < 5


def test_executor_choice():
    with executor_for(1) as ex:
        assert isinstance(ex, InlineExecutor)          # one task: no processes
    with executor_for(5, 1) as ex:
        assert isinstance(ex, InlineExecutor)
    with executor_for(5, 2) as ex:
        assert isinstance(ex, ProcessPool) and ex.workers == 2
    with executor_for(5, 2, in_memory=True) as ex:
        assert isinstance(ex, ThreadExecutor)
    with ProcessPool(2) as pool, use_pool(pool):
        with executor_for(1) as ex:
            assert ex is pool                           # isle run: one pool for every step


def test_compact_moves_images_down_in_place(tmp_path):
    import zarr

    rng = np.random.default_rng(0)
    for _ in range(20):
        n, k = int(rng.integers(2, 12)), int(rng.integers(1, 5))
        data = rng.integers(0, 200, size=(n, 3, 4)).astype(np.uint8)
        a = zarr.create_array(str(tmp_path / f"a{_}"), shape=data.shape, chunks=(k, 3, 4), dtype="uint8")
        a[:] = data
        keep = sorted(rng.choice(n, size=int(rng.integers(1, n + 1)), replace=False).tolist())
        compact(a, keep, k)
        assert np.array_equal(a[:len(keep)], data[keep])


# ----------------------------------------------------------------------------------- ingest
def test_process_ingest_equals_inline_and_the_files(folder300, tmp_path):
    """Worker processes and one process give the same store, equal to the PNGs decoded one by one."""
    a = ingest_labels(folder300["good"], tmp_path / "p.zarr", workers=2, chunks=(7, 500, 500), quiet=True)
    b = ingest_labels(folder300["good"], tmp_path / "i.zarr", workers=1, chunks=(7, 500, 500), quiet=True)
    assert a.ids == b.ids == sorted(folder300["data"])
    assert np.array_equal(a.shapes, b.shapes)
    assert np.array_equal(a.array[:], b.array[:])
    for i in ("2008_000000", "2008_000151", "2008_000299"):
        assert np.array_equal(a.read_image(i), folder300["data"][i])
    assert a.padded_shape == (500, 500)


def test_process_ingest_first_bad_is_named_like_a_sequential_run(folder300, tmp_path):
    msgs = []
    for workers in (1, 2):
        with pytest.raises(InputError) as exc:
            ingest_labels(folder300["bad"], tmp_path / f"o{workers}.zarr", workers=workers,
                          chunks=(4, 500, 500), quiet=True)
        msgs.append(str(exc.value))
    assert msgs[0] == msgs[1]
    assert "2008_000150.png" in msgs[0] and "value 40 at row 7, column 9" in msgs[0]
    assert not list(tmp_path.iterdir())                 # nothing written, no temporary left


def test_process_ingest_skip_bad_compacts_across_chunks(tmp_path):
    """Bad images at chunk boundaries, several per chunk: the store holds the good ones, in order."""
    rng = np.random.default_rng(5)
    src = tmp_path / "src"
    src.mkdir()
    data = {}
    bad_at = {0, 4, 5, 6, 11, 12, 19}
    for i in range(20):
        a = voc_like(rng, 40 + i, 60)
        if i in bad_at:
            a[3, 3] = 99
        data[f"im{i:02d}"] = a
        write_png(src / f"im{i:02d}.png", a)
    st_ = ingest_labels(src, tmp_path / "s.zarr", workers=2, chunks=(3, 59, 60), skip_bad=True, quiet=True)
    want = [i for n, i in enumerate(sorted(data)) if n not in bad_at]
    assert st_.ids == want
    for i in want:
        assert np.array_equal(st_.read_image(i), data[i])
    assert {s["id"] for s in st_.provenance["skipped"]} == {f"im{n:02d}" for n in bad_at}
    assert st_.array.shape[0] == len(want)


def test_in_memory_arrays_use_threads_and_stop_on_a_bad_one(tmp_path):
    rng = np.random.default_rng(1)
    arrays = [rng.integers(0, 21, (30, 40)).astype(np.uint8) for _ in range(300)]
    arrays[200][0, 0] = 77
    t0 = time.monotonic()
    with pytest.raises(InputError, match="array 200"):
        ingest_arrays(arrays, tmp_path / "a.zarr", workers=2, chunks=(4, 30, 40))
    assert time.monotonic() - t0 < 10
    arrays[200][0, 0] = 3
    st_ = ingest_arrays(arrays, tmp_path / "a.zarr", workers=2, chunks=(4, 30, 40))
    assert all(np.array_equal(st_.read_image(i), a) for i, a in enumerate(arrays))


def test_ingest_with_gt_store_reads_no_headers(folder300, tmp_path, monkeypatch):
    """With a gt store the sizes come from it: no file is opened twice."""
    from isle_fast.stores import formats

    gt = ingest_labels(folder300["good"], tmp_path / "gt.zarr", kind="gt", workers=1, quiet=True)
    monkeypatch.setattr(formats, "label_header", lambda p: (_ for _ in ()).throw(AssertionError(p)))
    st_ = ingest_labels(folder300["good"], tmp_path / "s.zarr", gt=gt, workers=1, quiet=True)
    assert st_.ids == gt.ids


# ----------------------------------------------------------------------------------- the command, as met
def _children(pid: int) -> list[int]:
    import psutil

    try:
        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def test_cli_bad_file_under_a_terminal_exits_2_promptly(folder300, tmp_path):
    """300 real-size PNGs, one bad, progress bars on a terminal: status 2, the clear error, no hang."""
    out = tmp_path / "s.zarr"
    rc, text, _ = isle_on_terminal(["ingest", "labels", folder300["bad"], "--kind", "gt", "-o", out,
                                    "--workers", "2"], timeout=60)
    assert rc == 2, text
    last = [ln for ln in text.replace("\r", "\n").splitlines() if ln.strip()][-1]
    assert last.startswith("isle ingest labels: error: ") and "2008_000150.png" in last, text
    assert "Traceback" not in text
    assert not out.exists() and not list(tmp_path.glob("s.zarr*"))


def test_cli_good_folder_under_a_terminal(folder300, tmp_path):
    rc, text, _ = isle_on_terminal(["ingest", "labels", folder300["good"], "--kind", "gt", "-o",
                                    tmp_path / "s.zarr", "--workers", "2"], timeout=120)
    assert rc == 0, text
    assert "ingest labels" in text and "throughput" in text       # the bar, then the summary
    assert open_stack(tmp_path / "s.zarr").num_images == 300


_SLOW_READS = r"""
import sys, time
from isle_fast.stores import formats
_orig = formats.read_label
def _slow(*a, **k):
    time.sleep(0.02)
    return _orig(*a, **k)
formats.read_label = _slow
from isle_fast.stores import ingest    # the labels reader looks the name up there
ingest.read_label = _slow
from isle_fast.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _slow_ingest(argv: list[str]) -> subprocess.Popen:
    env = dict(os.environ, ISLE_PROGRESS="0")
    # Ctrl-C reaches the command as in a shell's foreground job, even when pytest itself runs with SIGINT
    # ignored (a background job of a non-interactive shell), which the child would inherit
    return subprocess.Popen([sys.executable, "-c", _SLOW_READS, *map(str, argv)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for_chunk(out: Path, proc: subprocess.Popen, timeout: float = 60) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        temps = out.parent.glob(out.name + ".tmp-*")
        if any(p.is_file() for t in temps for p in (t / "labels" / "c").rglob("*")):
            return
        if proc.poll() is not None:
            pytest.fail(f"ingest ended (rc {proc.returncode}) before writing a chunk: "
                        f"{proc.stderr.read()[-800:]}")
        time.sleep(0.01)
    pytest.fail("ingest never wrote a chunk")


def _no_store_left(out: Path) -> None:
    assert not out.exists()
    left = list(out.parent.glob(out.name + "*"))
    assert not left, left


def test_cli_worker_killed_mid_ingest(folder300, tmp_path):
    """A worker process SIGKILLed mid-run: exit 1 with one line naming it, nothing that looks complete."""
    out = tmp_path / "s.zarr"
    proc = _slow_ingest(["ingest", "labels", folder300["good"], "-o", out, "--workers", "2", "-q",
                         "--chunks", "5,500,500"])
    _wait_for_chunk(out, proc)
    workers = _children(proc.pid)
    assert workers, "no worker processes"
    os.kill(workers[0], signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    err = err.decode()
    assert proc.returncode == 1, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("isle ingest labels: error: worker process")
    _no_store_left(out)
    assert not _children(proc.pid)


def test_cli_ctrl_c_mid_ingest(folder300, tmp_path):
    """Ctrl-C (SIGINT to the process group, as a terminal sends it): exit 130, workers gone, no store."""
    out = tmp_path / "s.zarr"
    proc = _slow_ingest(["ingest", "labels", folder300["good"], "-o", out, "--workers", "2", "-q",
                         "--chunks", "5,500,500"])
    _wait_for_chunk(out, proc)
    workers = _children(proc.pid)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    err = err.decode()
    assert proc.returncode == 130, err
    assert "Traceback" not in err, err
    _no_store_left(out)
    import psutil

    assert not [p for p in workers if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]


def test_rerun_after_a_killed_ingest(folder300, tmp_path):
    out = tmp_path / "s.zarr"
    proc = _slow_ingest(["ingest", "labels", folder300["good"], "-o", out, "--workers", "2", "-q",
                         "--chunks", "5,500,500"])
    _wait_for_chunk(out, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    with pytest.raises(StoreError):   # the temporary sibling never opens as a store
        open_stack(next(tmp_path.glob("s.zarr.tmp-*")))
    st_ = ingest_labels(folder300["good"], out, workers=2, quiet=True)
    assert st_.num_images == 300


@pytest.mark.slow
def test_ingest_on_an_active_dask_cluster(folder300, tmp_path, process_cluster):
    """With a dask.distributed client active, the chunk tasks run on its workers; the store is the same."""
    from dask.distributed import Client

    from isle_fast.stores import parallel

    want = ingest_labels(folder300["good"], tmp_path / "inline.zarr", workers=1, chunks=(25, 500, 500), quiet=True)
    with Client(process_cluster) as client:
        with executor_for(12, 2) as ex:
            assert isinstance(ex, parallel.ClusterExecutor)
        got = ingest_labels(folder300["good"], tmp_path / "cluster.zarr", chunks=(25, 500, 500), quiet=True)
        pids = set(client.run(os.getpid).values())
    assert os.getpid() not in pids
    assert got.ids == want.ids and np.array_equal(got.array[:], want.array[:])


_PRELOADED = r'''
import threading
import numpy as np
from isle_fast.job import _preload_numba
from isle_fast.stores.parallel import ProcessPool, numba_fork_safe

_preload_numba()
print(numba_fork_safe(), threading.active_count())

def task(seed):
    from numba.core.registry import cpu_target
    built = len(cpu_target.typing_context._registries) > 0     # before this worker compiled or loaded anything
    from isle_fast.backend import get_kernels
    K = get_kernels("cpu")
    rng = np.random.default_rng(seed)
    g = rng.integers(0, 6, (3, 16, 24)).astype(np.uint8)
    g[g == 5] = 255
    s = rng.integers(0, 5, (3, 16, 24)).astype(np.uint8)
    sh = np.array([[16, 24], [9, 24], [16, 7]])
    with K.numba_threads(1):
        got = K.confusion_labels_images(g, (s,), sh, 5)[0]
    want = np.zeros((5, 6), np.int64)
    for m, (h, w) in enumerate(sh):
        gm, sm = g[m, :h, :w].ravel(), s[m, :h, :w].ravel()
        keep = gm < 5
        np.add.at(want, (gm[keep], np.minimum(sm[keep], 5)), 1)
    return built, bool((got == want).all())

p = ProcessPool(2, start_method="fork")
with p.start():
    print(p.numba_safe, sorted(r for _, r in p.imap(task, [(i,) for i in range(4)])))
'''


def test_numba_preloaded_before_the_fork_is_shared_by_the_workers():
    """``isle run`` imports Numba and builds its CPU contexts before it forks its pool (each worker
    otherwise built them again, ~0.4 s of CPU a worker): no thread is started, the pool stays safe for
    the counting kernel, and the workers find the contexts built and count like a NumPy reference."""
    out = subprocess.run([sys.executable, "-c", _PRELOADED], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[:2] == ["True 1", "True [(True, True), (True, True), (True, True), (True, True)]"], \
        out.stdout + out.stderr[-2000:]
