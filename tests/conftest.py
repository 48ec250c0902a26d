"""Shared fixtures: small synthetic stacks written to temporary stores."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, settings

from tests import _shared

# Hypothesis profiles: "ci" (default) keeps the suite within minutes on 2 cores.
settings.register_profile("ci", max_examples=40, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.register_profile("thorough", max_examples=500, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
# "noshrink": the ci profile without shrinking, to see a failure fast while developing
settings.register_profile("noshrink", settings.get_profile("ci"),
                          phases=[Phase.explicit, Phase.reuse, Phase.generate])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# the threshold sweep's cache (isle_fast.ensemble.sweep_cache) of this test session, never the user's
if "ISLE_SWEEP_CACHE" not in os.environ:
    import tempfile

    os.environ["ISLE_SWEEP_CACHE"] = tempfile.mkdtemp(prefix="isle-sweep-cache-")


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)


def write_stack(path, images, *, kind="pseudo", encoding="labels", classes=None, num_classes=None,
                ids=None, chunks=None, padded_shape=None, score_dtype="uint8", name=None):
    """Write a list of unpadded per-image arrays as a committed stack store; returns the opened Stack.

    ``images[i]`` is ``(h, w)`` (labels), ``(h, w, C)`` (scores) or ``(h, w, 3)`` (rgb).
    """
    from isle_fast.stores.stack import create_stack

    if classes is None:
        classes = [f"c{i}" for i in range(num_classes or 3)]
    shapes = [tuple(int(v) for v in a.shape[:2]) for a in images]
    ids = ids or [f"img{i:03d}" for i in range(len(images))]
    w = create_stack(path, kind=kind, classes=classes, ids=ids, shapes=shapes, encoding=encoding,
                     chunks=chunks, padded_shape=padded_shape, score_dtype=score_dtype, name=name)
    for i, a in enumerate(images):
        w.write_image(i, a)
    return w.commit()


@pytest.fixture
def stack_factory(tmp_path):
    """``stack_factory(dirname, images, **kw)``: :func:`write_stack` under ``tmp_path/dirname``."""

    def make(dirname, images, **kw):
        return write_stack(str(tmp_path / dirname), images, **kw)

    return make


@pytest.fixture
def shared_data() -> Path:
    """``../shared/data`` (:data:`tests._shared.SHARED_DATA`); the test is skipped when it is absent."""
    return _shared.shared_data()


@pytest.fixture(scope="session")
def process_cluster():
    """One ``dask.distributed`` LocalCluster of 2 worker processes (1 thread each), started once for the
    tests that only need their tasks to run in other processes; each test opens its own ``Client`` on it
    (the active scheduler only while it is open). Tests that kill or slow a worker start their own."""
    from dask.distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        yield cluster
