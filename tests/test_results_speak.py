"""Results speak (issue 19): the table's key, merge's one ensemble column, short reprs."""

from __future__ import annotations

import numpy as np

from isle_fast.cli import main
from tests.conftest import write_stack


def _stores(root, n=8):
    rng = np.random.default_rng(1)
    imgs = [rng.integers(0, 3, size=(6, 7)).astype(np.uint8) for _ in range(n)]
    gt = write_stack(str(root / "gt.zarr"), imgs, kind="gt", num_classes=4, chunks=(4, 6, 7))  # class 3: no gt
    paths = []
    for s in range(2):
        noisy = [np.where(rng.random(a.shape) < 0.6 + 0.2 * s, a, (a + 1) % 3).astype(np.uint8) for a in imgs]
        paths.append(write_stack(str(root / f"s{s}.zarr"), noisy, num_classes=4, chunks=(4, 6, 7),
                                 name=f"s{s}").path)
    return gt.path, paths


def test_table_explains_its_marks_and_reprs_are_short(tmp_path):
    import isle_fast as il
    from isle_fast.ensemble.subsets import subset_analysis

    gt, sets = _stores(tmp_path)
    ev = il.evaluate(sets, gt, backend="cpu", progress=False)
    text = ev.table()
    assert text.splitlines()[-1].startswith("* the set chosen for the class")
    assert "- no IoU" in text  # class c3 has no pixels anywhere
    r = repr(ev)
    assert r.startswith("<Evaluation of 2 sets x 4 classes") and "mIoU s0 " in r and len(r) < 300, r
    assert "array(" not in r and "counts" not in r
    sel = ev.select()
    assert repr(sel).startswith("<Selection of 4 classes among 2 sets") and "array(" not in repr(sel)
    sa = subset_analysis(sets, gt, evaluation=ev, backend="cpu", progress=False)
    assert repr(sa).startswith("<SubsetAnalysis of 3 subsets of s0, s1") and "array(" not in repr(sa)
    res = il.merge(sets, gt, tmp_path / "e.zarr", backend="cpu", progress=False)
    assert repr(res).startswith(f"<MergeResult {res.stack.path}: ensemble of ") and len(repr(res)) < 300


def test_merge_prints_the_ensemble_column_once(tmp_path, capsys):
    gt, sets = _stores(tmp_path)
    assert main(["merge", *sets, "--gt", gt, "-o", str(tmp_path / "e.zarr"), "--backend", "cpu"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[-1] == "ensemble"
    assert sum(ln.startswith("mIoU") for ln in lines) == 1 and "ensemble mIoU" not in out, out
    assert len(lines[1].split()) == 4  # class, s0, s1, ensemble: its per-class IoU in the column
    assert "over the best member" in out and "* the set chosen" in out


def test_sets_by_name_or_path_and_renames_are_said(tmp_path, capsys):
    """Two stores named alike: the second is renamed with a note; --sets takes either name or path."""
    import json
    import shutil

    gt, sets = _stores(tmp_path)
    twin = tmp_path / "twin" / "s0.zarr"
    shutil.copytree(sets[0], twin)  # a copied store keeps its name: s0
    out = tmp_path / "ev.json"
    assert main(["evaluate", sets[0], str(twin), sets[1], "--gt", gt, "--backend", "cpu", "--json", str(out),
                 "--sets", f"{twin},s1"]) == 0
    err = capsys.readouterr().err
    assert "two sets are named 's0'" in err and "'s0-2'" in err and str(twin) in err, err
    doc = json.loads(out.read_text())
    assert set(doc["selection"].values()) <= {"s0-2", "s1"}
    assert main(["evaluate", sets[0], sets[1], "--gt", gt, "--sets", "nope", "-q"]) == 2
    assert "no set named 'nope' (nor a store of that path)" in capsys.readouterr().err
