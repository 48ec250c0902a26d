"""The sweep cache (isle_fast.ensemble.sweep_cache): a kept sweep is used instead of a pass, a changed
store or a damaged cache file is counted again, and the counts are always those of a fresh pass."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from isle_fast.cli import main
from isle_fast.ensemble import sweep as sweep_mod
from isle_fast.ensemble import sweep_cache
from isle_fast.ensemble.sweep import sweep_thresholds
from isle_fast.stores.sparse import sparsify
from isle_fast.stores.stack import open_stack
from tests.test_sparse import _build

TS = (0.1, 0.15, 0.2, 0.5)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv(sweep_cache.CACHE_ENV, str(d))
    return d


def _stores(tmp_path, seed=3):
    gt, dense, sparse = _build(str(tmp_path), 4, 4, [(6, 5), (4, 4), (7, 3), (2, 2)], (1, 1), (2, 4, 4), seed)
    return gt, dense, sparse


def _no_pass(monkeypatch):
    """Any sweep pass from here on fails the test."""

    def fail(*a, **k):
        raise AssertionError("a sweep pass was made")

    monkeypatch.setattr(sweep_mod, "_local_sweep", fail)
    monkeypatch.setattr(sweep_mod, "_dask_sweep", fail)


def _fresh(stores, gt, ts, monkeypatch):
    with monkeypatch.context() as m:
        m.setenv(sweep_cache.CACHE_ENV, "off")
        return sweep_thresholds(stores, gt, ts, backend="cpu", progress=False)


def test_second_sweep_is_kept(tmp_path, cache, monkeypatch):
    gt, dense, sparse = _stores(tmp_path)
    a = sweep_thresholds(sparse + dense[:1], gt, TS, backend="cpu", progress=False)
    assert not a.from_cache and len(list(cache.glob("*.npz"))) == 1
    _no_pass(monkeypatch)
    b = sweep_thresholds(sparse + dense[:1], gt, TS, backend="cpu", progress=False)
    assert b.from_cache
    np.testing.assert_array_equal(a.counts, b.counts)
    assert b.best_thresholds == a.best_thresholds


def test_other_thresholds_sets_or_average_are_counted(tmp_path, cache, monkeypatch):
    gt, dense, sparse = _stores(tmp_path)
    sweep_thresholds(sparse, gt, TS, backend="cpu", progress=False)
    assert not sweep_thresholds(sparse, gt, TS[:2], backend="cpu", progress=False).from_cache
    assert not sweep_thresholds(sparse[::-1], gt, TS, backend="cpu", progress=False).from_cache
    img = sweep_thresholds(sparse, gt, TS, average="image", backend="cpu", progress=False)
    assert not img.from_cache and img.image_stats is not None  # per-image statistics are never kept
    assert len(list(cache.glob("*.npz"))) == 3


def test_changed_store_is_counted_again(tmp_path, cache, monkeypatch):
    gt, dense, sparse = _stores(tmp_path)
    a = sweep_thresholds(sparse, gt, TS, backend="cpu", progress=False)
    # set 0 made again at the same path from other data (the set 1 of another build)
    (tmp_path / "other").mkdir()
    _, other, _ = _stores(tmp_path / "other", seed=11)
    path = sparse[0].path
    shutil.rmtree(path)
    sparsify(other[1], path)
    changed = [open_stack(path), sparse[1]]
    b = sweep_thresholds(changed, gt, TS, backend="cpu", progress=False)
    assert not b.from_cache
    want = _fresh(changed, gt, TS, monkeypatch)
    np.testing.assert_array_equal(b.counts, want.counts)
    assert not np.array_equal(a.counts[0], b.counts[0])


def _damage_garbage(f):
    f.write_bytes(b"not a zip file at all")


def _damage_truncate(f):
    f.write_bytes(f.read_bytes()[:40])


def _damage_counts(f):
    with np.load(f) as z:
        doc = {k: np.array(z[k]) for k in z.files}
    doc["counts"] = doc["counts"].copy()
    doc["counts"].flat[0] += 1  # the checksum no longer matches
    with open(f, "wb") as fh:
        np.savez(fh, **doc)


def _damage_key(f):
    with np.load(f) as z:
        doc = {k: np.array(z[k]) for k in z.files}
    doc["key"] = np.array("0" * 64)
    with open(f, "wb") as fh:
        np.savez(fh, **doc)


def _damage_shape(f):
    with np.load(f) as z:
        doc = {k: np.array(z[k]) for k in z.files}
    doc["counts"] = doc["counts"][:1]
    doc["sha256"] = np.array(sweep_cache._checksum(doc["counts"]))
    with open(f, "wb") as fh:
        np.savez(fh, **doc)


@pytest.mark.parametrize("damage", [_damage_garbage, _damage_truncate, _damage_counts, _damage_key, _damage_shape])
def test_damaged_cache_is_counted_again(tmp_path, cache, monkeypatch, damage):
    gt, dense, sparse = _stores(tmp_path)
    a = sweep_thresholds(sparse, gt, TS, backend="cpu", progress=False)
    (f,) = cache.glob("*.npz")
    damage(f)
    b = sweep_thresholds(sparse, gt, TS, backend="cpu", progress=False)
    assert not b.from_cache
    np.testing.assert_array_equal(a.counts, b.counts)
    _no_pass(monkeypatch)  # the file was replaced by a good one
    assert sweep_thresholds(sparse, gt, TS, backend="cpu", progress=False).from_cache


def test_cache_off_and_unwritable(tmp_path, monkeypatch):
    gt, dense, sparse = _stores(tmp_path)
    monkeypatch.setenv(sweep_cache.CACHE_ENV, "off")
    assert sweep_cache.cache_dir() is None
    assert not sweep_thresholds(sparse, gt, TS, backend="cpu", progress=False).from_cache
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv(sweep_cache.CACHE_ENV, str(blocker / "sub"))  # a folder that cannot be made
    a = sweep_thresholds(sparse, gt, TS, backend="cpu", progress=False)
    b = sweep_thresholds(sparse, gt, TS, backend="cpu", progress=False)
    assert not a.from_cache and not b.from_cache
    np.testing.assert_array_equal(a.counts, b.counts)


def test_uncommitted_store_has_no_digest(tmp_path):
    gt, dense, sparse = _stores(tmp_path)
    assert sweep_cache.store_digest(gt) is not None
    assert sweep_cache.store_digest(gt) == sweep_cache.store_digest(open_stack(gt.path))
    assert sweep_cache.store_digest(type("S", (), {"path": "s3://bucket/x.zarr"})()) is None
    assert sweep_cache.store_digest(type("S", (), {"path": str(tmp_path / "nothing")})()) is None


def test_evaluate_then_merge_makes_one_sweep(tmp_path, cache, monkeypatch, capsys):
    """``isle evaluate --bg-threshold S`` then ``isle merge --bg-threshold S``: the merge makes no sweep pass,
    and its ensemble is the one made without the cache."""
    gt, dense, sparse = _stores(tmp_path)
    sets = [s.path for s in sparse]
    spec = "0.1:0.5:0.05"
    assert main(["evaluate", *sets, "--gt", gt.path, "--bg-threshold", spec]) == 0
    assert "kept from an earlier sweep" not in capsys.readouterr().err
    with monkeypatch.context() as m:
        _no_pass(m)
        assert main(["evaluate", *sets, "--gt", gt.path, "--bg-threshold", spec]) == 0
    out = capsys.readouterr()
    assert "kept from an earlier sweep of the same stores" in out.out + out.err
    with monkeypatch.context() as m:
        _no_pass(m)
        assert main(["merge", *sets, "--gt", gt.path, "--bg-threshold", spec, "--no-score", "--quiet",
                     "--out", str(tmp_path / "ens.zarr")]) == 0
    monkeypatch.setenv(sweep_cache.CACHE_ENV, "off")
    assert main(["merge", *sets, "--gt", gt.path, "--bg-threshold", spec, "--no-score", "--quiet",
                 "--out", str(tmp_path / "ens_fresh.zarr")]) == 0
    a, b = open_stack(str(tmp_path / "ens.zarr")), open_stack(str(tmp_path / "ens_fresh.zarr"))
    np.testing.assert_array_equal(np.asarray(a.array[:]), np.asarray(b.array[:]))
    assert a.provenance["bg_thresholds"] == b.provenance["bg_thresholds"]
    capsys.readouterr()


# -- the bound --------------------------------------------------------------------------------------

def _kept_file(folder, n, size, mtime):
    p = folder / (f"{n:064x}"[-64:] + ".npz")
    p.write_bytes(b"x" * size)
    import os

    os.utime(p, (mtime, mtime))
    return p


def test_prune_removes_least_recently_used_only_ours(tmp_path):
    import os
    import time

    d = tmp_path / "sweeps"
    d.mkdir()
    now = time.time()
    old, mid, new = (_kept_file(d, i, 1000, now - 100 + i * 10) for i in range(3))
    foreign = [d / "notes.txt", d / "abc.npz", d / ("f" * 64 + ".npz.bak")]
    for f in foreign:
        f.write_bytes(b"y" * 5000)
    stale_tmp = d / (f"{7:064x}" + ".npz.tmp-host-1-deadbeef")
    fresh_tmp = d / (f"{8:064x}" + ".npz.tmp-host-2-deadbeef")
    for f in (stale_tmp, fresh_tmp):
        f.write_bytes(b"z")
    os.utime(stale_tmp, (now - 7200, now - 7200))
    # room for two of the three: the oldest goes, the foreign files are neither counted nor removed
    assert sweep_cache.prune(d, limit=2000) == 2          # the oldest sweep and the stale temporary
    assert not old.exists() and mid.exists() and new.exists()
    assert all(f.exists() for f in foreign) and fresh_tmp.exists() and not stale_tmp.exists()
    # the kept file counts against the bound but is never removed, even when it alone is too large
    assert sweep_cache.prune(d, keep=mid, limit=500) == 1
    assert mid.exists() and not new.exists()


def test_load_renews_and_save_prunes(tmp_path, cache, monkeypatch):
    import os

    gt, dense, sparse = _stores(tmp_path)
    sets = sparse + dense[:1]
    sweep_thresholds(sets, gt, TS, backend="cpu", progress=False)
    first = next(cache.glob("*.npz"))
    size = first.stat().st_size
    os.utime(first, (1, 1))                       # long unused ...
    again = sweep_thresholds(sets, gt, TS, backend="cpu", progress=False)
    assert again.from_cache and first.stat().st_mtime > 1      # ... until loaded again
    monkeypatch.setenv(sweep_cache.MAX_ENV, str(1.5 * size / 2**20))   # room for one sweep only
    other = sweep_thresholds(sets, gt, TS + (0.3,), backend="cpu", progress=False)
    assert not other.from_cache
    left = list(cache.glob("*.npz"))
    assert len(left) == 1 and left[0] != first                # the older sweep made room


@pytest.mark.parametrize("value", ["lots", "-1", "nan"])
def test_bad_bound_is_named_before_the_pass(tmp_path, cache, monkeypatch, value):
    from isle_fast.errors import InputError

    gt, dense, sparse = _stores(tmp_path)
    monkeypatch.setenv(sweep_cache.MAX_ENV, value)
    _no_pass(monkeypatch)
    with pytest.raises(InputError, match=sweep_cache.MAX_ENV):
        sweep_thresholds(sparse, gt, TS, backend="cpu", progress=False)
