"""isle_fast.ensemble.selection: best set per class, ties, absent classes, subset restriction."""

from __future__ import annotations

import numpy as np
import pytest

from isle_fast.ensemble.evaluate import evaluate
from isle_fast.ensemble.selection import resolve_members, select
from isle_fast.errors import InputError

CLASSES = ["bg", "a", "b", "c", "d"]
NAMES = ["P", "Q", "R"]


def table():
    nan = np.nan
    return np.array([
        [90.0, 50.0, 30.0, nan, 10.0],
        [91.0, 50.0, 40.0, nan, 20.0],
        [80.0, 60.0, 40.0, nan, 20.0],
    ])


def test_best_per_class_with_ties_to_the_first_set():
    sel = select(scores=table(), gt_pixels=np.array([5, 5, 5, 5, 5]), set_names=NAMES, classes=CLASSES)
    # a: R best; b: Q ties R -> Q (earlier); c: undefined everywhere -> first set; d: Q ties R -> Q
    np.testing.assert_array_equal(sel.best, [1, 2, 1, 0, 1])
    assert sel.mapping() == {"a": "R", "b": "Q", "c": "P", "d": "Q"}
    assert sel.counts() == {"P": 1, "Q": 2, "R": 1}


def test_class_absent_from_gt_goes_to_the_first_allowed_set():
    # class d has no gt pixels: a set that predicts it has IoU 0, others NaN; must not decide
    scores = table()
    sel = select(scores=scores, gt_pixels=np.array([5, 5, 5, 5, 0]), set_names=NAMES, classes=CLASSES)
    assert sel.mapping()["d"] == "P"
    sub = select(scores=scores, sets=["R", "Q"], gt_pixels=np.array([5, 5, 5, 5, 0]), set_names=NAMES,
                 classes=CLASSES)
    assert sub.mapping()["d"] == "Q"  # first allowed set in store order


def test_subset_restriction_and_kernel_renumbering():
    sel = select(scores=table(), sets=["P", "R"], set_names=NAMES, classes=CLASSES)
    np.testing.assert_array_equal(sel.members, [True, False, True])
    assert sel.member_indices == [0, 2]
    np.testing.assert_array_equal(sel.best, [0, 2, 2, 0, 2])  # b: P 30 < R 40; d: 10 < 20
    np.testing.assert_array_equal(sel.kernel_selection(), [0, 1, 1, 0, 1])
    prio = sel.priority()
    assert prio.shape == (2, 5) and prio.dtype == np.float64
    assert prio[0, 3] == -1.0  # undefined IoU never wins a SCORE contest
    by_pos = select(scores=table(), sets=[0, 2], set_names=NAMES, classes=CLASSES)
    np.testing.assert_array_equal(by_pos.best, sel.best)


def test_bad_subsets_are_named():
    with pytest.raises(InputError, match="'Z'"):
        resolve_members(NAMES, ["P", "Z"])
    with pytest.raises(InputError, match="position 7"):
        resolve_members(NAMES, [7])
    with pytest.raises(InputError):
        resolve_members(NAMES, [])


def test_select_from_evaluation(stack_factory):
    gt = stack_factory("gt", [np.array([[0, 1, 1, 2, 2, 2]], np.uint8)], kind="gt", num_classes=3)
    a = stack_factory("a", [np.array([[0, 1, 1, 0, 0, 2]], np.uint8)], num_classes=3, name="A")
    b = stack_factory("b", [np.array([[0, 0, 1, 2, 2, 2]], np.uint8)], num_classes=3, name="B")
    ev = evaluate([a, b], gt, backend="cpu", progress=False)
    sel = ev.select()
    assert sel.mapping() == {"c1": "A", "c2": "B"}
    assert ev.to_json(sel)["selection"] == {"c1": "A", "c2": "B"}
    assert ev.select(["B"]).mapping() == {"c1": "B", "c2": "B"}


@pytest.mark.parametrize("seed", [0, 1])
def test_benchmark_ensemble_from_joint_labels_equals_the_image_by_image_merge(seed):
    """benchmarks.selection scores an ensemble from the distinct (gt, sets) label tuples: the same counts."""
    from benchmarks import selection as bench

    data = bench.synthetic(seed, "close", 12, 40)
    data["gts"][0][:5, :5] = 255
    data["sets"][1][2][3:9, 3:9] = 255  # an abstaining set
    pre = bench.precompute(data)
    assert pre["joint_pixels"].sum() == sum(g.size for g in data["gts"])
    rng = np.random.default_rng(seed)
    for _ in range(4):
        scores = rng.uniform(0, 100, size=(bench.N_SETS, data["classes"]))
        sel = bench.select_from(scores, pre["gt_px"].sum(axis=0), data["classes"])
        assert bench.ensemble_miou(data, sel, pre) == bench.ensemble_miou(data, sel)
