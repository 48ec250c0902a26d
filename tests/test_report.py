"""isle_fast.ensemble.report: the tables (Markdown + JSON) and PNG figures exist and agree with the evaluation."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from isle_fast.cli import main
from isle_fast.ensemble.evaluate import evaluate
from isle_fast.ensemble.merge import merge
from isle_fast.ensemble.report import report
from isle_fast.ensemble.subsets import subset_analysis
from isle_fast.errors import InputError, StoreError
from tests.conftest import write_stack

SHAPES = [(9, 7), (8, 8), (6, 9)]
C = 3


@pytest.fixture
def stores(tmp_path, rng):
    vals = np.array([0, 1, 2, 255], np.uint8)
    gt = write_stack(str(tmp_path / "gt"), [rng.choice(vals, size=s, p=[.4, .3, .2, .1]) for s in SHAPES],
                     kind="gt", num_classes=C)
    a = write_stack(str(tmp_path / "a"), [rng.choice(vals, size=s) for s in SHAPES], num_classes=C, name="A")
    b = write_stack(str(tmp_path / "b"), [rng.integers(0, 9, size=s + (C,)).astype(np.uint8) for s in SHAPES],
                    encoding="scores", num_classes=C, name="B")
    img = write_stack(str(tmp_path / "img"), [rng.integers(0, 256, size=s + (3,)).astype(np.uint8) for s in SHAPES],
                      kind="images")
    return tmp_path, gt, a, b, img


def assert_png(path):
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 50 and im.size[1] > 50


def test_report_files_and_numbers(stores):
    root, gt, a, b, img = stores
    out = root / "rep"
    res = report([a, b], gt, out, images=img, backend="cpu", num_images=2, progress=False)
    files = set(os.listdir(out))
    assert {"tables.md", "report.json", "per_class_iou.png", "iou_table.png", "subsets.png",
            "samples.png"} <= files
    for f in files:
        if f.endswith(".png"):
            assert_png(out / f)
    doc = json.loads((out / "report.json").read_text())
    ev = evaluate([a, b], gt, backend="cpu", progress=False)
    sa = subset_analysis([a, b], gt, backend="cpu", progress=False)
    assert doc["classes"] == ["c0", "c1", "c2"]
    assert doc["sets"]["A"]["tp"] == ev.tp[0].tolist()
    assert doc["selection"] == ev.select().mapping()
    assert doc["ensemble"]["miou"] == pytest.approx(float(sa.miou[-1]))
    assert res["ensemble_miou"] == pytest.approx(float(sa.miou[-1]))
    assert [s["name"] for s in doc["subsets"]["subsets"]] == ["A", "B", "A+B"]
    md = (out / "tables.md").read_text()
    for title in ("Per-class IoU", "Best set per class", "Ensemble vs its members", "every subset"):
        assert title in md
    assert md.count("✓") == C - 1  # one chosen set per foreground class
    assert f"{ev.miou[0]:.1f}" in md
    assert not [p for p in os.listdir(root) if ".tmp-" in p]


def test_report_with_ensemble_store_and_overwrite(stores):
    root, gt, a, b, img = stores
    ens = merge([a, b], gt, str(root / "ens"), backend="cpu", progress=False).stack
    out = root / "rep"
    report([a, b], gt, out, ensemble=ens, backend="cpu", progress=False)
    doc = json.loads((out / "report.json").read_text())
    ev = evaluate([ens], gt, backend="cpu", progress=False)
    assert doc["ensemble"]["source"] == ens.path
    assert doc["ensemble"]["miou"] == pytest.approx(float(ev.miou[0]))
    assert "samples.png" not in os.listdir(out)
    with pytest.raises(StoreError, match="exists"):
        report([a, b], gt, out, backend="cpu", progress=False)
    report([a], gt, out, backend="cpu", overwrite=True, progress=False)
    assert list(json.loads((out / "report.json").read_text())["sets"]) == ["A"]


def test_cli_report(stores, capsys):
    root, gt, a, b, img = stores
    out = root / "cli-rep"
    rc = main(["report", a.path, b.path, "--gt", gt.path, "--images", img.path, "--out", str(out),
               "--backend", "cpu", "--num-images", "1"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "isle report: done" in text and str(out) in text
    assert_png(out / "samples.png")
    rc = main(["report", a.path, "--gt", gt.path, "--images", a.path, "--out", str(root / "x"), "--quiet"])
    assert rc == 2 and "images" in capsys.readouterr().err
    assert not os.path.exists(root / "x")


def test_report_image_average(stores):
    root, gt, a, b, img = stores
    out = root / "rep-img"
    report([a, b], gt, out, average="image", backend="cpu", progress=False)
    doc = json.loads((out / "report.json").read_text())
    ev = evaluate([a, b], gt, average="image", backend="cpu", progress=False)
    assert doc["average"] == "image"
    assert doc["sets"]["B"]["miou"] == pytest.approx(float(ev.miou[1]))
    assert "dataset-level IoU" in (out / "tables.md").read_text()


def test_charts_with_long_names_warn_nothing(tmp_path):
    import warnings

    import numpy as np

    from isle_fast.ensemble.report import _bar_chart, _heat_table

    classes = ["background"] + [f"a-rather-long-class-name-{k}" for k in range(1, 6)]
    names = [f"pseudo-labels-from-a-very-long-method-name-{k}" for k in range(3)]
    iou = np.random.default_rng(0).uniform(0, 100, (3, 6))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _bar_chart(tmp_path / "bars.png", classes, names, iou)
        _heat_table(tmp_path / "heat.png", classes, names, iou, iou.mean(axis=1))
    assert (tmp_path / "bars.png").stat().st_size > 0 and (tmp_path / "heat.png").stat().st_size > 0


# -- figures and tables that explain themselves (issue 19) -----------------------------------------

def test_tables_name_the_best_subset_and_the_background_slice_only_for_score_sets(stores, rng):
    root, gt, a, b, img = stores
    vals = np.array([0, 1, 2, 255], np.uint8)
    c = write_stack(str(root / "c"), [rng.choice(vals, size=s) for s in SHAPES], num_classes=C, name="C|x")
    res = report([a, c], gt, root / "labels", backend="cpu", progress=False)
    md = (root / "labels" / "tables.md").read_text()
    assert "Background slice" not in md  # every set is a label set
    assert "C\\|x" in md and "| C|x |" not in md  # a '|' in a name does not split the row
    sa = subset_analysis([a, c], gt, backend="cpu", progress=False)
    best = sa.names()[sa.best()].replace("|", "\\|")
    assert f"Best subset (bold): **{best}**" in md and f"| **{best}** |" in md
    report([a, b], gt, root / "mixed", backend="cpu", progress=False)
    assert "Background slice (score sets): " in (root / "mixed" / "tables.md").read_text()
    assert res["path"]


def test_figures_have_keys_and_sensible_sizes(tmp_path):
    """21 classes x 5 bars: the bar chart stays within about 1,800 px (was 3,246), the heat map and the
    subset chart have their colour keys beside the plot (wider than the plot alone)."""
    from isle_fast.ensemble import report as R

    classes = [f"class{j}" for j in range(21)]
    names = ["a", "b", "c", "d", "ensemble"]
    rng = np.random.default_rng(0)
    iou = rng.uniform(0, 100, (5, 21))
    no_gt = [j in (3, 4) for j in range(21)]
    iou[:, 3:5] = 0.0  # predicted but not in the gt: IoU 0 by the formula, undefined as a score
    R._bar_chart(tmp_path / "bars.png", classes, names, iou, no_gt=no_gt)
    R._heat_table(tmp_path / "heat.png", classes, names, iou, np.nanmean(iou, axis=1), no_gt=no_gt)
    R._heat_table(tmp_path / "heat0.png", classes, names, iou, np.nanmean(iou, axis=1))
    with Image.open(tmp_path / "bars.png") as im:
        assert 800 < im.size[0] <= 1900, im.size
    with Image.open(tmp_path / "heat.png") as im, Image.open(tmp_path / "heat0.png") as im0:
        grey = np.all(np.asarray(im.convert("RGB")) == (0xD9, 0xD9, 0xD9), axis=-1).sum()
        grey0 = np.all(np.asarray(im0.convert("RGB")) == (0xD9, 0xD9, 0xD9), axis=-1).sum()
        assert grey > 1000 and grey > 10 * max(grey0, 1)  # no-gt columns are grey, not IoU 0's colour
    sizes = np.array([1, 1, 2])
    R._subset_chart(tmp_path / "sub.png", ["a", "b", "a+b"], np.array([50.0, 60.0, 55.0]), sizes, best=1)
    with Image.open(tmp_path / "sub.png") as im:
        red = np.asarray(im.convert("RGB")).astype(int)
        assert ((red[..., 0] > 200) & (red[..., 1] < 60) & (red[..., 2] < 60)).sum() > 50  # the best outlined


def test_samples_figure_has_a_class_legend(tmp_path):
    from isle_fast.ensemble import report as R

    img = [np.zeros((20, 30, 3), np.uint8)]
    masks = [np.array([[0] * 30] * 10 + [[1] * 30] * 10, np.uint8)]
    R._samples_figure(tmp_path / "with.png", img, [("A", masks)], ["x"], class_names=["bg", "cat"])
    R._samples_figure(tmp_path / "without.png", img, [("A", masks)], ["x"])
    with Image.open(tmp_path / "with.png") as a, Image.open(tmp_path / "without.png") as b:
        assert a.size[1] > b.size[1]  # the legend's row below the images


# -- report.html in a real browser (issue 19) --------------------------------------------------------

def _browser() -> str | None:
    import shutil

    for name in (os.environ.get("ISLE_CHROMIUM", ""), "chromium", "chromium-browser", "google-chrome",
                 "google-chrome-stable", "chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _chromium(browser, tmp_path, *args, timeout=120):
    import subprocess
    import tempfile

    profile = tempfile.mkdtemp(dir=tmp_path, prefix="chromium-profile-")
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=tmp_path)


def test_report_html_is_self_contained(stores):
    import re

    root, gt, a, b, img = stores
    report([a, b], gt, root / "rep", images=img, backend="cpu", num_images=2, progress=False)
    page = (root / "rep" / "report.html").read_text(encoding="utf-8")
    srcs = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs), srcs  # nothing to fetch
    assert "<script" not in page and "http://" not in page and "https://" not in page
    assert page.count("<img ") == 5  # bars, heat map, subsets, samples, the uncertainty of every choice
    assert page.count("<table>") == 5  # Tables 3-4, 1, 2, the subsets and the uncertainty of every choice
    for needed in ("Provenance", "isle-fast", "numpy", "policy", "score", gt.path, a.path, "A", "B"):
        assert needed in page, needed


@pytest.mark.skipif(_browser() is None, reason="no Chromium / Chrome found (.ci/run installs chromium)")
def test_report_html_renders_in_headless_chromium(stores):
    import re

    root, gt, a, b, img = stores
    report([a, b], gt, root / "rep", images=img, backend="cpu", num_images=2, progress=False)
    browser = _browser()
    page = (root / "rep" / "report.html").read_text(encoding="utf-8")
    # a copy with a probe: after load, how many figures decoded, and how many tables there are
    probe = ("<script>window.addEventListener('load', function () {"
             "var im = document.images, ok = 0;"
             "for (var i = 0; i < im.length; i++) { if (im[i].complete && im[i].naturalWidth > 0) ok++; }"
             "var p = document.createElement('pre'); p.id = 'probe';"
             "p.textContent = 'PROBE ' + ok + '/' + im.length + ' tables ' + document.querySelectorAll('table').length;"
             "document.body.appendChild(p); });</script>")
    (root / "probe.html").write_text(page.replace("</body>", probe + "</body>"), encoding="utf-8")
    run = _chromium(browser, root, "--virtual-time-budget=10000", "--dump-dom", (root / "probe.html").as_uri())
    assert run.returncode == 0, run.stderr[-2000:]
    found = re.search(r"PROBE (\d+)/(\d+) tables (\d+)", run.stdout)
    assert found, run.stdout[-2000:] + run.stderr[-2000:]
    ok, total, tables = (int(v) for v in found.groups())
    assert total == 5 and ok == total and tables == 5, found.group(0)  # every figure loads
    # the page itself (no probe) as a screenshot: its size, and not blank
    shot = root / "shot.png"
    run = _chromium(browser, root, "--window-size=1280,1800", f"--screenshot={shot}",
                    (root / "rep" / "report.html").as_uri())
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    with Image.open(shot) as im:
        assert im.size == (1280, 1800), im.size
        px = np.asarray(im.convert("RGB"))
    not_white = (px < 240).any(axis=-1).mean()
    colours = len(np.unique(px.reshape(-1, 3)[::7], axis=0))
    assert not_white > 0.03 and colours > 50, (not_white, colours)  # text, tables and figures drawn



def test_report_reads_the_figure_images_from_a_folder(stores):
    """Issue 19: --images may be a folder of <id>.jpg / .png; the figure is the same as from a store."""
    root, gt, a, b, img = stores
    folder = root / "jpegs"
    folder.mkdir()
    for i, image_id in enumerate(img.ids):
        Image.fromarray(img.read_image(i)).save(folder / f"{image_id}.png")
    report([a, b], gt, root / "from_store", images=img, backend="cpu", num_images=2, progress=False)
    report([a, b], gt, root / "from_folder", images=folder, backend="cpu", num_images=2, progress=False)
    assert (root / "from_folder" / "samples.png").read_bytes() == (root / "from_store" / "samples.png").read_bytes()
    (folder / f"{img.ids[0]}.png").unlink()
    Image.fromarray(np.zeros((3, 3, 3), np.uint8)).save(folder / f"{img.ids[0]}.png")
    with pytest.raises(InputError, match=r"is 3 x 3 pixels; the ground truth"):
        report([a, b], gt, root / "bad", images=folder, backend="cpu", num_images=3, progress=False)
    assert not (root / "bad").exists()


def test_report_html_embeds_any_other_figure(tmp_path):
    """A figure added to the report folder later (e.g. an uncertainty figure) is embedded too."""
    from isle_fast.ensemble.report import html_report

    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(tmp_path / "selection_uncertainty.png")
    page = html_report(tmp_path, "# ISLE report\n", inputs={"gt": "g"}, options={"policy": "score"})
    assert page.count("data:image/png;base64,") == 1 and "selection uncertainty" in page
