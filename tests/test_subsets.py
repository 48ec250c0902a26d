"""isle_fast.ensemble.subsets: the one-pass subset analysis equals merging every subset and evaluating it."""

from __future__ import annotations

import numpy as np
import pytest

from isle_fast.ensemble.evaluate import evaluate
from isle_fast.ensemble.merge import merge
from isle_fast.ensemble.subsets import all_subsets, subset_analysis
from isle_fast.errors import InputError
from tests.conftest import write_stack

SHAPES = [(6, 5), (7, 7), (3, 4), (5, 6)]
C = 4


def labels(rng):
    vals = np.array(list(range(C)) + [255], np.uint8)
    return [rng.choice(vals, size=s, p=[0.3, 0.2, 0.2, 0.2, 0.1]) for s in SHAPES]


def scores(rng, dtype):
    return [rng.integers(0, 5, size=s + (C,)).astype(dtype) for s in SHAPES]


def make_sets(root, rng, kinds):
    out = []
    for k, kind in enumerate(kinds):
        name = f"S{k}"
        if kind == "labels":
            out.append(write_stack(f"{root}/{name}", labels(rng), num_classes=C, name=name, chunks=(k + 1, 4, 7)))
        else:
            out.append(write_stack(f"{root}/{name}", scores(rng, kind), encoding="scores", score_dtype=kind,
                                   num_classes=C, name=name, chunks=(2, 7, 3, C)))
    return out


def slow_way(sets, gt, root, policy, bg):
    """Merge every subset into a store with isle_fast.ensemble.merge, then evaluate it: (S, C, C+1)."""
    ev = evaluate(sets, gt, backend="cpu", progress=False, bg_threshold=bg)
    out = []
    for s, m in enumerate(all_subsets(len(sets))):
        members = [int(i) for i in np.nonzero(m)[0]]
        res = merge(sets, gt, f"{root}/ens-{policy}-{s}", policy=policy, subset=members, evaluation=ev,
                    bg_threshold=bg, backend="cpu", progress=False)
        out.append(evaluate([res.stack], gt, backend="cpu", progress=False).counts[0])
    return np.stack(out)


@pytest.mark.parametrize("kinds,policy,bg", [
    (["labels", "labels", "labels"], "score", None),
    (["labels", "labels", "labels"], "ignore", None),
    (["uint8", "uint8", "uint8"], "order", 0.005),
    (["labels", "uint8", "float16"], "score", None),
    (["float16", "uint8", "float16"], "ignore", 0.5),
])
def test_subsets_equal_merge_then_evaluate(tmp_path, rng, kinds, policy, bg):
    gt = write_stack(str(tmp_path / "gt"), labels(rng), kind="gt", num_classes=C, chunks=(3, 4, 4))
    sets = make_sets(str(tmp_path), rng, kinds)
    sa = subset_analysis(sets, gt, policy=policy, bg_threshold=bg, backend="cpu", progress=False)
    assert sa.counts.shape == (7, C, C + 1) and sa.counts.dtype == np.int64
    np.testing.assert_array_equal(sa.counts, slow_way(sets, gt, str(tmp_path), policy, bg))
    assert sa.names()[:3] == ["S0", "S1", "S2"] and sa.names()[-1] == "S0+S1+S2"
    # the selection of every subset only points at its members
    for m, sel in zip(sa.members, sa.selections):
        assert m[sel[1:]].all()
    doc = sa.to_json()
    assert len(doc["subsets"]) == 7 and doc["subsets"][-1]["members"] == ["S0", "S1", "S2"]
    assert 0 <= sa.best() < 7 and sa.members[sa.best(2)].sum() == 2


def test_all_subsets_order():
    m = all_subsets(3)
    assert m.shape == (7, 3)
    assert [tuple(np.nonzero(r)[0]) for r in m] == [(0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]


def test_too_many_sets(tmp_path, rng):
    gt = write_stack(str(tmp_path / "gt"), labels(rng), kind="gt", num_classes=C)
    s = write_stack(str(tmp_path / "s"), labels(rng), num_classes=C)
    with pytest.raises(InputError, match="at most 8"):
        subset_analysis([s] * 9, gt, backend="cpu", progress=False)
