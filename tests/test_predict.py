"""Prediction: label stores `isle evaluate` can score, PNG folders, TTA and sliding windows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _segdata import make_stores

from isle_fast.errors import InputError, StoreError
from isle_fast.stores.stack import open_stack
from isle_fast.training.predict import load_model, predict, predict_probs
from isle_fast.training.train import train


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    ip, lp = make_stores(root, n=8, seed=0, chunk=3)
    vi, vg = make_stores(root, n=5, seed=1, chunk=2, prefix="val")
    train(ip, lp, root / "run", val_images=vi, val_gt=vg, backbone="resnet18", weights="none",
          head_channels=16, crop=32, batch_size=2, steps=2, num_workers=0, quiet=True)
    return root / "run", vi, vg


def test_predict_store_is_aligned_and_evaluate_scores_it(run, tmp_path):
    from isle_fast.cli import main

    rundir, vi, vg = run
    res = predict(rundir, vi, tmp_path / "pred.zarr", quiet=True)
    assert res.images == 5 and res.checkpoint.endswith("best.pt")
    st, img, gt = open_stack(tmp_path / "pred.zarr"), open_stack(vi), open_stack(vg)
    assert st.kind == "pseudo" and st.encoding == "labels" and st.classes == gt.classes
    assert st.ids == img.ids and np.array_equal(st.shapes, img.shapes) and st.padded_shape == img.padded_shape
    model, _ = load_model(rundir)
    for i in range(5):
        lab = st.read_image(i)
        assert lab.max() < 3
        x = torch.from_numpy(np.ascontiguousarray(img.read_image(i).transpose(2, 0, 1)))
        ref = predict_probs(model, x).argmax(0).numpy()
        assert np.array_equal(lab, ref)
    full = np.asarray(st.array[:])
    assert (full[~st.valid_mask(0, 5)] == 255).all()
    assert main(["evaluate", str(tmp_path / "pred.zarr"), "--gt", vg, "--quiet",
                 "--json", str(tmp_path / "e.json")]) == 0


def test_predict_pngs_and_tta(run, tmp_path):
    from isle_fast.stores.png import read_label_png

    rundir, vi, _ = run
    out = tmp_path / "pngs"
    predict(rundir, vi, out, format="png", flip=True, scales=(0.75, 1.0), quiet=True)
    img = open_stack(vi)
    files = sorted(p.name for p in out.iterdir())   # the PNGs and the marker that isle wrote the folder
    assert files == sorted([".isle-output.json"] + [f"{i}.png" for i in img.ids])
    for i, iid in enumerate(img.ids):
        lab = read_label_png(out / f"{iid}.png")
        assert lab.shape == tuple(img.shapes[i]) and lab.max() < 3
    assert not list(tmp_path.glob("pngs.tmp-*"))


def test_sliding_window_covering_the_image_equals_whole_image(run):
    rundir, vi, _ = run
    model, _ = load_model(rundir, "final")
    x = torch.from_numpy(np.ascontiguousarray(open_stack(vi).read_image(0).transpose(2, 0, 1)))
    whole = predict_probs(model, x)
    assert torch.allclose(whole.sum(0), torch.ones(()), atol=1e-5)
    assert torch.equal(predict_probs(model, x, window=128), whole)
    tiled = predict_probs(model, x, window=24)
    assert tiled.shape == whole.shape and torch.allclose(tiled.sum(0), torch.ones(()), atol=1e-5)


def test_cli_predict_and_errors(run, tmp_path):
    from isle_fast.cli import main

    rundir, vi, vg = run
    out = tmp_path / "p.zarr"
    assert main(["predict", str(rundir), "--images", vi, "--out", str(out), "--window", "32", "--quiet"]) == 0
    assert open_stack(out).num_images == 5
    with pytest.raises(StoreError, match="exists"):
        predict(rundir, vi, out, quiet=True)
    predict(rundir, vi, out, overwrite=True, quiet=True)
    with pytest.raises(InputError, match="does not exist"):
        predict(tmp_path / "nope", vi, tmp_path / "q.zarr", quiet=True)
    assert main(["predict", str(rundir), "--images", vg, "--out", str(tmp_path / "r.zarr")]) == 2


def test_cpu_autocast_is_bfloat16_and_predicts(run):
    from isle_fast.training.runtime import amp_dtype

    assert amp_dtype("cpu") == torch.bfloat16 and amp_dtype("cuda") == torch.float16
    model, _ = load_model(run[0])
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad(), torch.autocast("cpu", dtype=amp_dtype("cpu")):
        assert model(x).dtype == torch.bfloat16
    img = torch.randint(0, 256, (3, 37, 41), dtype=torch.uint8)
    p = predict_probs(model, img, amp=True)
    assert p.dtype == torch.float32 and p.shape[-2:] == (37, 41)
    assert torch.allclose(p.sum(0), torch.ones(37, 41), atol=1e-3)
    # bfloat16 keeps about 3 significant digits: the same argmax almost everywhere
    agree = (p.argmax(0) == predict_probs(model, img, amp=False).argmax(0)).float().mean()
    assert agree > 0.9


def test_predict_never_writes_over_its_inputs_or_foreign_files(run, tmp_path, capsys):
    """``--out`` is never the images store, the run (it holds the checkpoint) or the checkpoint itself, nor a
    folder isle did not write, even with --overwrite; a run's own folder may hold its predictions."""
    import hashlib
    import shutil
    from pathlib import Path

    from isle_fast.cli import main

    rundir, vi, _ = run
    vi = Path(vi)
    run_copy = tmp_path / "run"
    shutil.copytree(rundir, run_copy)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("x")

    def digest():
        return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
                for root in (run_copy, vi, mine) for p in sorted(root.rglob("*")) if p.is_file()}

    before = digest()
    for out, needle in ((vi, "input"), (run_copy, "holds the input"), (run_copy / "best.pt", "input"),
                        (mine, "did not write")):
        for fmt in ("store", "png"):
            code = main(["predict", str(run_copy), "--images", str(vi), "--out", str(out), "--format", fmt,
                         "--quiet", "--overwrite"])
            err = capsys.readouterr().err
            assert code == 2 and needle in err and "Traceback" not in err, err
    assert digest() == before
    assert main(["predict", str(run_copy), "--images", str(vi), "--out", str(run_copy / "val_pred.zarr"),
                 "--quiet"]) == 0
