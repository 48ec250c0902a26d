"""Stores in an S3 bucket, against a real S3-compatible server: moto's server mode, started here on a
free 127.0.0.1 port as its own process (not a mock of the client) and stopped at the end.

ingest -> evaluate -> merge -> export (and ``isle train``) with every store in the bucket equal the
local run bit for bit; a write killed in the middle, or a commit interrupted, leaves nothing that
opens as a complete store; a missing bucket and bad credentials are one clear line.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("s3fs")
pytest.importorskip("moto")

from isle_fast.errors import StoreError  # noqa: E402
from isle_fast.stores.stack import create_stack, open_stack  # noqa: E402
from tests._pipeline_data import _same_files, _same_store, _scores, make_folders  # noqa: E402

pytestmark = pytest.mark.s3

REPO = Path(__file__).resolve().parents[1]
KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Moto:
    """``python -m moto.server`` on 127.0.0.1 in its own process group."""

    def __init__(self, root: Path, env: dict | None = None):
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log = open(root / f"moto-{self.port}.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=self.log, stderr=self.log, start_new_session=True,
                                     env=dict(os.environ, **(env or {})))
        t0 = time.monotonic()
        while True:
            try:
                urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=2)
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() - t0 > 60:
                    self.stop()
                    pytest.fail(f"moto server did not start; see {self.log.name}")
                time.sleep(0.2)

    def stop(self) -> None:
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        self.log.close()


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """The server, the env every process needs for it, an s3fs handle and the bucket ``isle-test``."""
    import s3fs

    server = Moto(tmp_path_factory.mktemp("moto"))
    saved = {k: os.environ.get(k) for k in [*KEYS, "AWS_ENDPOINT_URL"]}
    env = dict(KEYS, AWS_ENDPOINT_URL=server.endpoint)
    os.environ.update(env)       # this process's s3fs (open_stack in the checks) reads them too
    try:
        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        fs.mkdir("isle-test")
        yield {"env": env, "fs": fs, "bucket": "s3://isle-test", "server": server}
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return make_folders(tmp_path_factory.mktemp("data"))


def isle(args: list, cwd: Path, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    e = dict(os.environ, ISLE_PROGRESS="0", PYTHONPATH=str(REPO), **env)
    e.pop("DASK_SCHEDULER_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "isle_fast", *map(str, args)], cwd=cwd, env=e,
                          capture_output=True, text=True, timeout=timeout)


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def _pipeline(root: Path, where: str, env: dict) -> None:
    """ingest gt + 3 sets -> evaluate -> merge -> export, every store under ``where``."""
    ok(isle(["ingest", "labels", "gt", "--kind", "gt", "--classes", "classes.txt", "--chunks", "4,60,70",
             "-o", f"{where}/gt.zarr"], root, env))
    for s in "abc":
        ok(isle(["ingest", "labels", s, "--gt", f"{where}/gt.zarr", "-o", f"{where}/{s}.zarr"], root, env))
    sets = [f"{where}/{s}.zarr" for s in "abc"]
    tag = where.replace("://", "_").replace("/", "_")
    ok(isle(["evaluate", *sets, "--gt", f"{where}/gt.zarr", "--json", f"{tag}-eval.json"], root, env))
    ok(isle(["merge", *sets, "--gt", f"{where}/gt.zarr", "--out", f"{where}/ens.zarr"], root, env))
    ok(isle(["export", f"{where}/ens.zarr", "--out", f"{tag}-png"], root, env))


def test_the_pipeline_in_a_bucket_equals_the_local_run(s3, folders):
    local = folders / "s3-local"
    local.mkdir()
    _pipeline(folders, "s3-local", {})
    where = f"{s3['bucket']}/run"
    _pipeline(folders, where, s3["env"])
    for s in ("gt", "a", "b", "c", "ens"):
        _same_store(local / f"{s}.zarr", f"{where}/{s}.zarr")
    tag = where.replace("://", "_").replace("/", "_")
    assert _scores(folders / f"{tag}-eval.json") == _scores(folders / "s3-local-eval.json")
    _same_files(folders / "s3-local-png", folders / f"{tag}-png")
    left = [p for p in s3["fs"].ls("isle-test/run") if ".tmp-" in p or ".isle-commit" in p]
    assert not left, left   # every temporary prefix went away with its commit


def test_train_streams_the_ensemble_from_the_bucket(s3, tmp_path):
    from tests._segdata import make_stores

    local = make_stores(tmp_path, n=8, seed=0, chunk=3)
    remote = make_stores(f"{s3['bucket']}/train", n=8, seed=0, chunk=3)
    _same_store(local[1], remote[1])
    args = ["--backbone", "resnet18_w16", "--weights", "none", "--head-channels", "16", "--crop", "32",
            "--batch-size", "2", "--steps", "2", "--workers", "0", "--seed", "3", "--deterministic", "--quiet"]
    ok(isle(["train", "--images", local[0], "--labels", local[1], "--out", tmp_path / "run-local", *args],
            tmp_path, {}))
    ok(isle(["train", "--images", remote[0], "--labels", remote[1], "--out", tmp_path / "run-s3", *args],
            tmp_path, s3["env"]))
    a = json.loads((tmp_path / "run-local" / "metrics.json").read_text())
    b = json.loads((tmp_path / "run-s3" / "metrics.json").read_text())
    assert [r["loss"] for r in a["train"]] == [r["loss"] for r in b["train"]]


_SLOW_READS = r"""
import sys, time
from isle_fast.stores import formats, ingest
_orig = formats.read_label
def _slow(*a, **k):
    time.sleep(0.1)
    return _orig(*a, **k)
formats.read_label = ingest.read_label = _slow
from isle_fast.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_killed_write_leaves_nothing_that_opens(s3, folders):
    fs, url = s3["fs"], f"{s3['bucket']}/killed/gt.zarr"
    env = dict(os.environ, ISLE_PROGRESS="0", PYTHONPATH=str(REPO), **s3["env"])
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_READS, "ingest", "labels", "gt", "--kind", "gt",
                             "--classes", "classes.txt", "--chunks", "2,60,70", "--workers", "1", "-o", url],
                            cwd=folders, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        t0 = time.monotonic()
        while not any("/labels/c/" in p for p in fs.find("isle-test/killed", refresh=True)):
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            assert time.monotonic() - t0 < 120, "no chunk was written"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    temps = sorted({p.split("/")[2] for p in fs.find("isle-test/killed", refresh=True)})
    assert temps and all(t.startswith("gt.zarr.tmp-") for t in temps), temps   # nothing at the final prefix
    with pytest.raises(StoreError, match="does not exist"):
        open_stack(url)
    for t in temps:
        with pytest.raises(StoreError, match="incomplete"):
            open_stack(f"{s3['bucket']}/killed/{t}")
    proc2 = isle(["evaluate", url, "--gt", url], folders, s3["env"])
    assert proc2.returncode == 2 and len(proc2.stderr.strip().splitlines()) == 1, proc2.stderr
    ok(isle(["ingest", "labels", "gt", "--kind", "gt", "--classes", "classes.txt", "-o", url], folders,
            s3["env"]))
    assert open_stack(url).num_images == 40


def _small(url: str, value: int, overwrite: bool = False):
    w = create_stack(url, kind="gt", classes=["bg", "a"], ids=["x", "y"], shapes=[(4, 5), (4, 5)],
                     chunks=(1, 4, 5), overwrite=overwrite)
    for i in range(2):
        w.write_image(i, np.full((4, 5), value, np.uint8))
    return w


def test_an_interrupted_commit_leaves_nothing_that_opens(s3, monkeypatch):
    from isle_fast.stores import remote

    url = f"{s3['bucket']}/commit/s.zarr"
    _small(url, 1).commit()
    assert int(open_stack(url).array[0, 0, 0]) == 1
    w = _small(url, 0, overwrite=True)
    real_fs = remote._fs

    class Dying:   # the chunks arrive, then the process dies before the root zarr.json is copied
        def __init__(self, fs):
            self.fs = fs

        def __getattr__(self, name):
            return getattr(self.fs, name)

        def copy(self, src, dst, *a, **k):
            if isinstance(src, str) and src.endswith("/zarr.json"):
                raise KeyboardInterrupt
            return self.fs.copy(src, dst, *a, **k)

    monkeypatch.setattr(remote, "_fs", lambda u: (Dying(real_fs(u)[0]), real_fs(u)[1]))
    with pytest.raises(KeyboardInterrupt):
        w.commit()
    monkeypatch.undo()
    with pytest.raises(StoreError, match="does not exist"):   # neither the old store nor a mix opens
        open_stack(url)
    with pytest.raises(StoreError, match="exists"):            # no silent replacement without overwrite
        _small(url, 1)
    _small(url, 0, overwrite=True).commit()                   # the marker: still isle's to replace
    st = open_stack(url)
    assert int(st.array[1, 3, 4]) == 0 and st.num_images == 2
    assert not s3["fs"].exists(f"isle-test/commit/s.zarr/{remote.COMMIT_MARKER}")


def test_missing_bucket_is_one_line(s3, folders):
    for args in (["ingest", "labels", "gt", "--kind", "gt", "--classes", "classes.txt",
                  "-o", "s3://no-such-bucket/x.zarr"],
                 ["evaluate", "s3://no-such-bucket/a.zarr", "--gt", "s3://no-such-bucket/gt.zarr"]):
        proc = isle(args, folders, s3["env"])
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "bucket 'no-such-bucket' does not exist" in lines[0], proc.stderr


def test_bad_credentials_are_one_line(tmp_path, folders):
    """A second server that checks signatures (moto's IAM authentication after 3 set-up calls)."""
    import boto3

    server = Moto(tmp_path, env={"INITIAL_NO_AUTH_ACTION_COUNT": "3"})
    try:
        iam = boto3.client("iam", endpoint_url=server.endpoint, region_name="us-east-1",
                           aws_access_key_id="setup", aws_secret_access_key="setup")
        iam.create_user(UserName="isle")
        iam.put_user_policy(UserName="isle", PolicyName="all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        key = iam.create_access_key(UserName="isle")["AccessKey"]
        good = {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": server.endpoint}
        boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1",
                     aws_access_key_id=good["AWS_ACCESS_KEY_ID"],
                     aws_secret_access_key=good["AWS_SECRET_ACCESS_KEY"]).create_bucket(Bucket="auth-test")
        url = "s3://auth-test/gt.zarr"
        ok(isle(["ingest", "labels", "gt", "--kind", "gt", "--classes", "classes.txt", "-o", url], folders, good))
        bad = dict(good, AWS_SECRET_ACCESS_KEY="wrong")
        for args in (["info", url], ["evaluate", url, "--gt", url],
                     ["ingest", "labels", "gt", "--kind", "gt", "--classes", "classes.txt", "-o",
                      "s3://auth-test/g2.zarr"]):
            proc = isle(args, folders, bad)
            assert proc.returncode == 2, proc.stderr
            lines = proc.stderr.strip().splitlines()
            assert len(lines) == 1 and "access to bucket 'auth-test' denied" in lines[0], proc.stderr
    finally:
        server.stop()
