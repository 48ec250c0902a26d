"""Tests of `isle demo`: the whole ISLE pipeline on synthetic data (refine, evaluate, merge, report, train)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from isle_fast import demo as demo_lib
from isle_fast.cli import main
from isle_fast.commands import demo


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    """One `isle demo --quick` run shared by the tests of this module: (folder, summary, printed text)."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("demo") / "run"
    buf = io.StringIO()
    # not --quiet: that prints nothing but errors, and the printed table is under test; no bars instead
    mp = pytest.MonkeyPatch()
    mp.setenv("ISLE_PROGRESS", "0")
    try:
        with contextlib.redirect_stdout(buf):
            rc = main(["demo", "--quick", "--out", str(out)])
    finally:
        mp.undo()
    assert rc == 0
    summary = json.loads((out / "demo_summary.json").read_text())
    return out, summary, buf.getvalue()


@pytest.mark.slow
def test_quick_demo_runs_every_step_and_writes_its_outputs(quick_demo):
    out, summary, text = quick_demo
    steps = [s["step"] for s in summary["steps"]]
    assert steps == ["data", "ingest", "info", "threshold_sweep", "refine", "evaluate", "merge", "report", "run",
                     "train"]
    run = summary["results"]["run"]            # isle run on the same tree: same ensemble, cached re-run
    assert run["identical_to_the_steps"] is True and len(run["stores_reused_on_rerun"]) >= 5
    assert len(list((out / "run" / "ensemble").glob("*.png"))) == summary["results"]["data"]["train"]
    for s in summary["steps"]:
        assert s["seconds"] >= 0 and s["user_cpu_seconds"] >= 0
        assert s["output"] != "-", s  # every step of a full run writes something
    assert summary["total_seconds"] > 0 and summary["total_user_cpu_seconds"] > 0
    # the printed table and headline lines
    for word in ("step", "seconds", "user CPU", "ensemble mIoU", "refinement gain", "val mIoU"):
        assert word in text, word
    # report PNGs are real PNGs
    from PIL import Image

    pngs = sorted((out / "report").glob("*.png"))
    assert {p.name for p in pngs} >= {"per_class_iou.png", "iou_table.png", "samples.png"}
    for p in pngs:
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size[0] > 50 and im.size[1] > 50
    assert (out / "report" / "tables.md").read_text().strip()


@pytest.mark.slow
def test_quick_demo_evaluation_json_has_the_design_schema(quick_demo):
    out, summary, _ = quick_demo
    doc = json.loads((out / "evaluation.json").read_text())
    classes = doc["classes"]
    assert classes[0] == "background" and len(classes) == 21
    names = list(summary["results"]["evaluate"]["miou"])
    assert list(doc["sets"]) == names and len(names) == 6  # 4 hard sets + 2 refined soft sets
    for name, s in doc["sets"].items():
        assert len(s["iou"]) == len(classes)
        assert all(v is None or 0.0 <= v <= 100.0 for v in s["iou"])
        assert isinstance(s["miou"], float)
        for key in ("tp", "fp", "fn"):
            assert len(s[key]) == len(classes) and all(isinstance(v, int) and v >= 0 for v in s[key])
        # mIoU is the mean of the defined IoUs
        assert s["miou"] == pytest.approx(np.mean([v for v in s["iou"] if v is not None]))
    assert set(doc["selection"]) == set(classes[1:])
    assert set(doc["selection"].values()) <= set(names)


@pytest.mark.slow
def test_quick_demo_refinement_and_ensemble_gains(quick_demo):
    from isle_fast.ensemble.evaluate import evaluate
    from isle_fast.stores.stack import open_stack

    out, summary, _ = quick_demo
    res, head = summary["results"], summary["headline"]
    # step 1: the CRF raises every soft set's mIoU
    refine = res["refine"]
    assert refine["chain"] == ["crf"] and set(refine["sets"]) == {"pmm_cam", "drs_cam"}
    for name, r in refine["sets"].items():
        assert r["after"] > r["before"], name
        assert head["refine_gain"][name] == pytest.approx(r["after"] - r["before"], abs=0.02)
    # step 3: the ensemble store opens, is aligned with the gt, and is at least as good as any single set
    gt = open_stack(summary["results"]["info"][1]["path"])
    ens = open_stack(str(out / "ensemble.zarr"))
    assert ens.kind == "ensemble" and ens.ids == gt.ids and np.array_equal(ens.shapes, gt.shapes)
    ev = evaluate([ens], gt, progress=False)
    sets_miou = res["evaluate"]["miou"]
    best = max(sets_miou.values())
    assert float(ev.miou[0]) >= best
    assert head["ensemble_miou"] == pytest.approx(float(ev.miou[0]), abs=0.01)
    assert head["best_single_miou"] == best and head["best_single_set"] == max(sets_miou, key=sets_miou.get)
    assert head["ensemble_gain"] == pytest.approx(float(ev.miou[0]) - best, abs=0.02)
    # the one-pass subset analysis scores the all-sets ensemble exactly as the written store
    assert res["merge"]["subsets"]["all_sets_equals_ensemble_store"] is True
    assert res["merge"]["subsets"]["count"] == 2 ** 6 - 1
    assert (out / "ensemble_isle2.zarr").is_dir() and len(res["merge"]["isle2"]["sets"]) == 2


@pytest.mark.slow
def test_quick_demo_cams_in_puzzlecam_layout_and_image_labels(quick_demo):
    """The demo writes PuzzleCAM-layout CAM files and a cls_labels.npy, ingests them without --allow-pickle,
    stores the labels with the gt, and merges once more with them."""
    from isle_fast.ensemble.merge import gt_presence
    from isle_fast.stores.stack import open_stack

    out, summary, _ = quick_demo
    res = summary["results"]
    cam = next((out / "data" / "cams" / "pmm_cam").glob("*.npy"))
    d = np.load(cam, allow_pickle=True).item()
    assert set(d) == {"keys", "cam", "hr_cam"} and d["keys"][0] == 0
    assert len(d["keys"]) == len(d["hr_cam"]) + 1  # PuzzleCAM: the background key, then one per slice
    assert res["ingest"]["identical_to_direct"] and res["ingest"]["cam_layout"] == "puzzlecam"
    gt = open_stack(res["ingest"]["stores"]["train/gt"])
    assert gt.image_labels is not None
    np.testing.assert_array_equal(gt.image_labels[:, 1:], gt_presence(gt, backend="cpu")[:, 1:])
    il = res["merge"]["image_labels"]
    ens = open_stack(il["store"])
    for k, i in enumerate(ens.ids):
        e = np.asarray(ens.read_image(i))
        assert gt.image_labels[k, np.unique(e[e != 255])].all()
    assert il["gain_over_ensemble"] is not None


@pytest.mark.slow
def test_quick_demo_trains_both_models_and_scores_them_on_val(quick_demo):
    from isle_fast.ensemble.evaluate import evaluate
    from isle_fast.stores.stack import open_stack

    out, summary, _ = quick_demo
    train, head = summary["results"]["train"], summary["headline"]
    assert set(train["runs"]) == {"ensemble", summary["headline"]["best_single_set"]}
    preds = [train["runs"][k]["val_pred"] for k in ("ensemble", train["single_set"])]
    val_gt = open_stack(str(out / "data" / "stores" / "val" / "gt.zarr"))
    ev = evaluate(preds, val_gt, progress=False)
    assert head["val_miou_ensemble"] == pytest.approx(float(ev.miou[0]), abs=0.01)
    assert head["val_miou_single"] == pytest.approx(float(ev.miou[1]), abs=0.01)
    lo, hi = head["val_gain_95ci"]
    assert lo <= hi and head["val_verdict"]
    for run in train["runs"].values():
        assert (out / "train").is_dir() and run["run"].startswith(str(out / "train"))
        names = {p.name for p in (out / "train" / run["run"].rsplit("/", 1)[-1]).iterdir()}
        assert "final.pt" in names and not names & {"last.pt", "best.pt"}  # only the weights predict used
        # the trainer's own validation agrees with predict + evaluate (same mIoU convention)
        assert run["trainer_val_miou"] == pytest.approx(run["val_miou"], abs=0.01)


def test_refuses_a_non_empty_out_without_overwrite(tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(["demo", "--quick", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and str(out) in err and "Traceback" not in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    # --overwrite does not delete a folder the demo did not make
    assert main(["demo", "--quick", "--out", str(out), "--quiet", "--overwrite"]) == 2
    assert (out / "keep.txt").exists()


@pytest.mark.parametrize("argv, word", [
    (["--refine", "nosuch"], "nosuch"),
    (["--train-steps", "0"], "--train-steps"),
    (["--images", "1"], "--images"),
])
def test_bad_arguments_fail_before_any_work(tmp_path, capsys, argv, word):
    out = tmp_path / "never"
    assert main(["demo", "--quick", "--out", str(out), "--quiet", *argv]) == 2
    err = capsys.readouterr().err
    assert word in err and "Traceback" not in err
    assert not out.exists()


def test_headline_without_training():
    h = demo_lib.headline({"refine": {"chain": ["crf"], "sets": {"a": {"gain": 3.5}}},
                       "merge": {"ensemble_miou": 80.0, "best_single_set": "b", "best_single_miou": 77.5,
                                 "ensemble_gain": 2.5, "isle2": {"miou": 79.0}},
                       "train": "skipped (--skip-train)"})
    assert h["refine_gain"] == {"a": 3.5} and h["ensemble_gain"] == 2.5 and h["isle2_miou"] == 79.0
    assert h["val_miou_ensemble"] is None and "skipped" in h["val_note"]
    lines = demo._headline_lines(h)
    assert any("ensemble mIoU 80.0 vs best single set b 77.5: +2.5" in line for line in lines)
    assert any("training: skipped" in line for line in lines)


@pytest.mark.slow
def test_demo_train_seeds_compares_means_over_seeds(tmp_path):
    import contextlib
    import io

    out = tmp_path / "run"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["demo", "--quick", "--images", "8", "--train-seeds", "2", "--seed", "3", "--out", str(out),
                   "--refine", "none", "--quiet"])
    assert rc == 0
    train = json.loads((out / "demo_summary.json").read_text())["results"]["train"]
    assert train["seeds"] == [3, 4]
    per_seed = np.array(train["val_miou_per_seed"], dtype=float)
    assert per_seed.shape == (2, 2)
    assert train["val_miou_ensemble"] == pytest.approx(per_seed[:, 0].mean(), abs=0.01)
    assert train["val_miou_single"] == pytest.approx(per_seed[:, 1].mean(), abs=0.01)
    assert sorted(r["seed"] for r in train["runs"].values()) == [3, 3, 4, 4]
    assert all((out / "train" / p).is_dir() for p in ("ensemble-seed3", "ensemble-seed4"))
    assert "per seed" in train["verdict"]
    with contextlib.redirect_stderr(io.StringIO()):
        assert main(["demo", "--train-seeds", "0", "--out", str(tmp_path / "x")]) == 2


@pytest.mark.slow
def test_quick_demo_selects_from_few_and_no_pixel_labels(quick_demo):
    from isle_fast.stores.stack import open_stack

    out, summary, _ = quick_demo
    few = summary["results"]["merge"]["few_labels"]
    assert few["labelled_images"] == 12 and few["full_gain"] == summary["headline"]["ensemble_gain"]
    assert isinstance(few["few_gain"], float) and isinstance(few["none_gain"], float)
    assert isinstance(few["few_estimate_gain"], float)
    gt = open_stack(summary["results"]["info"][1]["path"])
    for name in ("ensemble_few_labels.zarr", "ensemble_few_labels_estimate.zarr", "ensemble_no_labels.zarr"):
        ens = open_stack(str(out / name))
        assert ens.ids == gt.ids  # every training image, whatever the selection came from
    assert open_stack(str(out / "gt_12_labelled.zarr")).num_images == 12
    assert open_stack(str(out / "ensemble_no_labels.zarr")).provenance["gt"] is None
