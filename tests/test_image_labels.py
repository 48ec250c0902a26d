"""Image-level labels: every source, the id checks, the stores, and their use by ingest and merge."""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from isle_fast import cli
from isle_fast.errors import InputError, StoreError
from isle_fast.stores.image_labels import (
    ImageLabels,
    ingest_image_labels,
    open_image_labels,
    read_image_labels,
    resolve_image_labels,
)
from isle_fast.stores.ingest import ingest_labels
from isle_fast.stores.stack import VOC_CLASSES, open_stack
from tests._pty import isle_on_terminal

REPO = Path(__file__).resolve().parents[1]
C = len(VOC_CLASSES)


def voc_xml(image_id: str, objects: list[tuple[str, bool, list[str]]]) -> str:
    """An annotation the way VOC writes it: objects with pose / truncated / difficult / bndbox and parts."""
    parts = []
    for name, difficult, subparts in objects:
        box = "<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>2</xmax><ymax>2</ymax></bndbox>"
        sub = "".join(f"<part><name>{p}</name>{box}</part>" for p in subparts)
        parts.append(f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated>"
                     f"<difficult>{int(difficult)}</difficult>"
                     f"<bndbox><xmin>10</xmin><ymin>10</ymin><xmax>50</xmax><ymax>50</ymax></bndbox>"
                     f"{sub}</object>")
    return (f"<annotation><folder>VOC2012</folder><filename>{image_id}.jpg</filename>"
            f"<source><database>The VOC2007 Database</database></source>"
            f"<size><width>500</width><height>375</height><depth>3</depth></size>"
            f"<segmented>0</segmented>{''.join(parts)}</annotation>")


def labels_of(il: ImageLabels, image_id: str) -> list[int]:
    return il.present(image_id)


# ---------------------------------------------------------------- sources
def test_cls_labels_npy_form(tmp_path):
    """The public form: int ids without the underscore -> float32[20]; read safely (no allow_pickle)."""
    d = {np.int32(2007000032): np.eye(20, dtype=np.float32)[0] + np.eye(20, dtype=np.float32)[14],
         np.int32(2011003276): np.eye(20, dtype=np.float32)[19]}
    np.save(tmp_path / "cls_labels.npy", d)
    il = read_image_labels(tmp_path / "cls_labels.npy")
    assert il.ids == ["2007_000032", "2011_003276"]
    assert labels_of(il, "2007_000032") == [1, 15] and labels_of(il, "2011_003276") == [20]
    assert il.labels[:, 0].all() and il.labels.dtype == bool and il.labels.shape == (2, C)
    assert il.row("2007000032") == 0  # the plain number too
    np.save(tmp_path / "bad.npy", {1: np.full(20, 0.5, np.float32)})
    with pytest.raises(InputError, match="bad.npy.*0.5.*expected 0 / 1"):
        read_image_labels(tmp_path / "bad.npy")
    np.save(tmp_path / "short.npy", {1: np.ones(7, np.float32)})
    with pytest.raises(InputError, match="7 values.*expected 20"):
        read_image_labels(tmp_path / "short.npy")


def test_real_cls_labels_file(shared_data):
    il = read_image_labels(shared_data / "voc2012_meta" / "cls_labels.npy")
    ref = np.load(shared_data / "voc2012_meta" / "cls_labels.npy", allow_pickle=True).item()
    assert len(il) == len(ref) == 12031
    for k in list(ref)[:50] + list(ref)[-50:]:
        s = str(int(k))
        assert labels_of(il, s[:4] + "_" + s[4:]) == [int(c) + 1 for c in np.nonzero(ref[k])[0]]
    val = (shared_data / "voc2012_meta" / "val.txt").read_text().split()
    assert il.aligned(val).shape == (1449, C)


def test_voc_xml_folder(tmp_path):
    xml = tmp_path / "Annotations"
    xml.mkdir()
    objs = [("aeroplane", False, []), ("person", True, ["head", "hand", "foot"])]
    (xml / "2007_000032.xml").write_text(voc_xml("2007_000032", objs))
    (xml / "2007_000039.xml").write_text(voc_xml("2007_000039", [("tvmonitor", False, [])]))
    il = read_image_labels(xml)
    assert il.ids == ["2007_000032", "2007_000039"]
    assert labels_of(il, "2007_000032") == [1, 15] and labels_of(il, "2007_000039") == [20]
    (xml / "2007_000040.xml").write_text(voc_xml("2007_000040", [("spaceship", False, [])]))
    with pytest.raises(InputError, match=r"2007_000040\.xml.*'spaceship' is not one of the 21 classes"):
        read_image_labels(xml)
    (xml / "2007_000040.xml").write_text("<annotation><object>")
    with pytest.raises(InputError, match=r"2007_000040\.xml.*not a readable XML"):
        read_image_labels(xml)


def test_csv_forms(tmp_path):
    (tmp_path / "a.csv").write_text("id,labels\n2007_000032,aeroplane person\n2007_000039.jpg,20\nx,\n")
    il = read_image_labels(tmp_path / "a.csv")
    assert il.ids == ["2007_000032", "2007_000039", "x"]
    assert labels_of(il, "2007_000032") == [1, 15] and labels_of(il, "2007_000039") == [20]
    assert labels_of(il, "x") == []
    (tmp_path / "b.csv").write_text("2007_000032,Aeroplane,person\n2007_000039,tvmonitor;dog\n")
    assert labels_of(read_image_labels(tmp_path / "b.csv"), "2007_000039") == [12, 20]
    header = ",".join(["image"] + list(VOC_CLASSES[1:]))
    row = ",".join(["1"] + ["0"] * 13 + ["1"] + ["0"] * 5)
    (tmp_path / "c.csv").write_text(header + "\n2007_000032," + row)
    assert labels_of(read_image_labels(tmp_path / "c.csv"), "2007_000032") == [1, 15]
    for text, match in [("a,cat\na,dog\n", "'a' has labels twice"), ("a,kitten\n", "'kitten' is not one"),
                        ("a,21\n", r"class index 21 is outside \[0, 21\)")]:
        (tmp_path / "bad.csv").write_text(text)
        with pytest.raises(InputError, match=match):
            read_image_labels(tmp_path / "bad.csv")


def test_json_forms(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"2007_000032": ["aeroplane", "person"], "b": [12]}))
    il = read_image_labels(tmp_path / "a.json")
    assert labels_of(il, "2007_000032") == [1, 15] and labels_of(il, "b") == [12]
    (tmp_path / "b.json").write_text(json.dumps([{"id": "a", "labels": ["cat"]}, {"id": "b", "labels": []}]))
    assert labels_of(read_image_labels(tmp_path / "b.json"), "a") == [8]
    (tmp_path / "c.json").write_text(json.dumps({"a": "cat"}))
    with pytest.raises(InputError, match="not a list"):
        read_image_labels(tmp_path / "c.json")
    with pytest.raises(InputError, match="do not exist"):
        read_image_labels(tmp_path / "nope.json")


# ---------------------------------------------------------------- stores and id checks
def _gt(tmp_path, ids, size=(6, 7)):
    (tmp_path / "gt").mkdir(exist_ok=True)
    for i in ids:
        Image.fromarray(np.zeros(size, np.uint8)).save(tmp_path / "gt" / f"{i}.png")
    return ingest_labels(tmp_path / "gt", tmp_path / "gt.zarr", kind="gt", quiet=True)


def test_ingest_image_labels_store_checks_ids(tmp_path, capsys):
    gt = _gt(tmp_path, ["2007_000032", "2007_000039"])
    labels = {"2007_000039": ["dog"], "2007_000032": ["cat"], "extra": ["cow"]}
    (tmp_path / "l.json").write_text(json.dumps(labels))
    il = ingest_image_labels(tmp_path / "l.json", tmp_path / "il.zarr", gt=gt)
    out = capsys.readouterr().out
    assert "isle ingest: image-level labels" in out and "source ids not used" in out
    assert il.ids == gt.ids
    back = open_image_labels(tmp_path / "il.zarr")
    assert back.ids == gt.ids and np.array_equal(back.labels, il.labels)
    assert labels_of(back, "2007_000032") == [8]
    # every gt id needs labels: the error names the missing ones
    (tmp_path / "m.json").write_text(json.dumps({"2007_000039": ["dog"]}))
    with pytest.raises(InputError, match=r"m\.json: no image-level labels for 1 of the 2 im.*'2007_000032'"):
        ingest_image_labels(tmp_path / "m.json", tmp_path / "il2.zarr", gt=gt, quiet=True)
    assert not (tmp_path / "il2.zarr").exists()
    # overwrite replaces an image-labels store, never another folder
    with pytest.raises(StoreError, match="exists"):
        ingest_image_labels(tmp_path / "l.json", tmp_path / "il.zarr", gt=gt, quiet=True)
    ingest_image_labels(tmp_path / "l.json", tmp_path / "il.zarr", gt=gt, overwrite=True, quiet=True)
    with pytest.raises(StoreError, match="not an image-labels store"):
        ingest_image_labels(tmp_path / "l.json", tmp_path / "gt", gt=gt, overwrite=True, quiet=True)
    assert len(os.listdir(tmp_path / "gt")) == 2
    # an output never replaces an input of the same command
    before = (tmp_path / "il.zarr" / "zarr.json").read_bytes()
    with pytest.raises(InputError, match="SRC .*il.zarr is also the output"):
        ingest_image_labels(tmp_path / "il.zarr", tmp_path / "il.zarr", gt=gt, overwrite=True, quiet=True)
    with pytest.raises(InputError, match="^image_labels .*il.zarr is also the output"):
        ingest_labels(tmp_path / "gt", tmp_path / "il.zarr", kind="gt", image_labels=tmp_path / "il.zarr",
                      overwrite=True, quiet=True)
    from isle_fast.ensemble.merge import merge

    pseudo = ingest_labels(tmp_path / "gt", tmp_path / "p.zarr", kind="pseudo", quiet=True)
    with pytest.raises(InputError, match="^image_labels .*il.zarr is also the output"):
        merge([pseudo], gt, tmp_path / "il.zarr", image_labels=tmp_path / "il.zarr", overwrite=True,
              progress=False)
    assert (tmp_path / "il.zarr" / "zarr.json").read_bytes() == before


def test_labels_stored_with_a_stack(tmp_path):
    ids = ["2007_000032", "2007_000039", "2007_000063"]
    (tmp_path / "l.csv").write_text("2007_000032,cat\n2007_000039,dog cow\n2007_000063,\n")
    _gt(tmp_path, ids)
    st = ingest_labels(tmp_path / "gt", tmp_path / "gt2.zarr", kind="gt", image_labels=tmp_path / "l.csv",
                       quiet=True)
    assert st.image_labels.shape == (3, C) and st.image_labels.dtype == bool
    assert np.nonzero(st.image_labels[1])[0].tolist() == [0, 10, 12]
    assert open_stack(tmp_path / "gt.zarr").image_labels is None
    # a stack store carrying labels is itself a source
    assert np.array_equal(resolve_image_labels(tmp_path / "gt2.zarr", ids, VOC_CLASSES), st.image_labels)
    with pytest.raises(InputError, match="holds no image-level labels"):
        resolve_image_labels(tmp_path / "gt.zarr", ids, VOC_CLASSES)
    (tmp_path / "short.csv").write_text("2007_000032,cat\n")
    with pytest.raises(InputError, match="no image-level labels for 2 of the 3"):
        ingest_labels(tmp_path / "gt", tmp_path / "gt3.zarr", kind="gt", image_labels=tmp_path / "short.csv",
                      quiet=True)
    assert not (tmp_path / "gt3.zarr").exists()


def test_labels_follow_skipped_images(tmp_path):
    """--skip-bad compacts the store; its image labels are those of the images written."""
    ids = ["a", "b", "c"]
    _gt(tmp_path, ids)
    (tmp_path / "set").mkdir()
    for i in ids:
        Image.fromarray(np.full((6, 7), 3 if i != "b" else 99, np.uint8)).save(tmp_path / "set" / f"{i}.png")
    (tmp_path / "l.json").write_text(json.dumps({"a": ["bird"], "b": ["cat"], "c": ["dog"]}))
    st = ingest_labels(tmp_path / "set", tmp_path / "s.zarr", gt=tmp_path / "gt.zarr", skip_bad=True,
                       image_labels=tmp_path / "l.json", quiet=True)
    assert st.ids == ["a", "c"]
    assert np.nonzero(st.image_labels[1])[0].tolist() == [0, 12]


# ---------------------------------------------------------------- real VOC: labels and masks that disagree
def _voc_subset(shared: Path, root: Path, n: int = 24) -> list[str]:
    """The first ``n`` val gt PNGs plus 2008_005245 (person in its mask, not in its labels)."""
    want = sorted((shared / "voc2012_meta" / "val.txt").read_text().split())[:n] + ["2008_005245"]
    out = root / "gt"
    out.mkdir(parents=True)
    with tarfile.open(shared / "voc2012_val_gt.tar.gz") as t:
        for i in want:
            data = t.extractfile(f"SegmentationClass/{i}.png").read()
            (out / f"{i}.png").write_bytes(data)
    return want


def test_real_labels_absent_from_the_gt_break_nothing(shared_data, tmp_path, capsys):
    """cls_labels.npy comes from the XML annotations: a class can be labelled and not in the mask (818 VOC
    images; emulated here by erasing a labelled class from one real mask), or in the mask and not labelled
    (2008_005245: person). Ingest, both merge strategies and the image-labels store must all work."""
    from isle_fast.ensemble.merge import merge

    ids = _voc_subset(shared_data, tmp_path)
    cls = shared_data / "voc2012_meta" / "cls_labels.npy"
    victim = tmp_path / "gt" / f"{ids[0]}.png"
    im = Image.open(victim)
    lab = np.array(im)
    present = [int(v) for v in np.unique(lab) if v not in (0, 255)]
    erased = present[0]
    lab[lab == erased] = 0
    out = Image.fromarray(lab, mode="P")
    out.putpalette(im.getpalette())
    out.save(victim)
    rc = cli.main(["ingest", "labels", str(tmp_path / "gt"), "--kind", "gt", "--image-labels", str(cls),
                   "-o", str(tmp_path / "gt.zarr"), "-q"])
    assert rc == 0
    gt = open_stack(tmp_path / "gt.zarr")
    row = gt.index_of(ids[0])
    assert gt.image_labels[row, erased] and not (np.asarray(gt.read_image(ids[0])) == erased).any()
    assert not gt.image_labels[gt.index_of("2008_005245"), 15]
    # two pseudo-label sets: the gt with noise, claiming classes the image does not have
    rng = np.random.default_rng(0)
    for s in range(2):
        (tmp_path / f"set{s}").mkdir()
        for i in ids:
            a = np.array(Image.open(tmp_path / "gt" / f"{i}.png"))
            a[a == 255] = 0
            noise = rng.random(a.shape) < 0.05 * (s + 1)
            a[noise] = rng.integers(1, C, int(noise.sum()))
            Image.fromarray(a).save(tmp_path / f"set{s}" / f"{i}.png")
        assert cli.main(["ingest", "labels", str(tmp_path / f"set{s}"), "--gt", str(tmp_path / "gt.zarr"),
                         "-o", str(tmp_path / f"set{s}.zarr"), "-q"]) == 0
    sets = [str(tmp_path / f"set{s}.zarr") for s in range(2)]
    plain = merge(sets, str(tmp_path / "gt.zarr"), tmp_path / "e0.zarr", progress=False)
    with_labels = merge(sets, str(tmp_path / "gt.zarr"), tmp_path / "e1.zarr", image_labels=str(cls),
                        progress=False)
    allowed = gt.image_labels
    for k, i in enumerate(gt.ids):
        e = np.asarray(with_labels.stack.read_image(i))
        cls_in = np.unique(e[e != 255])
        assert allowed[k, cls_in].all(), i  # no claim of an unlabelled class survives
    e_plain = np.asarray(plain.stack.read_image("2008_005245"))
    e_lab = np.asarray(with_labels.stack.read_image("2008_005245"))
    assert (e_plain == 15).any() and not (e_lab == 15).any()
    # the image strategy ranks by the labels (the erased class counts for its image), from the gt's own copy
    rc = cli.main(["merge", *sets, "--gt", str(tmp_path / "gt.zarr"), "--strategy", "image", "--image-labels",
                   str(tmp_path / "gt.zarr"), "--out", str(tmp_path / "e2.zarr"), "--quiet", "--no-score"])
    assert rc == 0, capsys.readouterr().err
    prov = open_stack(tmp_path / "e2.zarr").provenance
    counts = prov["image_strategy"]["instances"]
    assert counts[VOC_CLASSES[erased]] == int(allowed[:, erased].sum())
    # the standalone store from the real file, for exactly the gt's ids
    rc = cli.main(["ingest", "image-labels", str(cls), "--gt", str(tmp_path / "gt.zarr"), "-o",
                   str(tmp_path / "il.zarr")])
    assert rc == 0
    text = capsys.readouterr().out
    assert f"{12031 - len(ids):,}" in text  # the other ids of the file, counted
    assert np.array_equal(open_image_labels(tmp_path / "il.zarr").labels, allowed)


# ---------------------------------------------------------------- the CLI under a terminal, real size
@pytest.mark.slow
def test_xml_folder_of_all_voc_images_under_a_terminal(shared_data, tmp_path):
    """12,031 VOC-style XML annotations written from the real cls_labels.npy (with parts and difficult
    flags), read back by ``isle ingest image-labels`` under a pseudo-terminal: a progress bar, a summary,
    and exactly the labels of the public file."""
    ref = read_image_labels(shared_data / "voc2012_meta" / "cls_labels.npy")
    xml = tmp_path / "Annotations"
    xml.mkdir()
    rng = np.random.default_rng(1)
    for k, i in enumerate(ref.ids):
        objs = []
        for c in np.nonzero(ref.labels[k, 1:])[0] + 1:
            name = VOC_CLASSES[c]
            for _ in range(1 + int(rng.random() < 0.3)):  # some classes twice, some objects difficult
                objs.append((name, bool(rng.random() < 0.2), ["head", "hand"] if name == "person" else []))
        (xml / f"{i}.xml").write_text(voc_xml(i, objs))
    rc, out, _ = isle_on_terminal(["ingest", "image-labels", xml, "-o", tmp_path / "il.zarr"], size=(24, 100),
                                  stdin=False)
    assert rc == 0, out
    assert "image labels (xml)" in out and "file/s" in out  # the tqdm bar was drawn on the terminal
    assert "isle ingest: image-level labels" in out and "12,031" in out
    got = open_image_labels(tmp_path / "il.zarr")
    assert got.ids == sorted(ref.ids)
    assert np.array_equal(got.aligned(ref.ids), ref.labels)


# -- one normalisation for every caller (refine chain, CRF, resolve_image_labels) ----------------

def _reference_rows(values: np.ndarray, c: int) -> np.ndarray:
    """Plain NumPy: (..., C) or (..., C-1) of 0 / 1 to (..., C) bool with the background column set."""
    v = np.asarray(values).astype(np.float64) != 0
    fg = v[..., 1:] if v.shape[-1] == c else v
    return np.concatenate([np.ones(fg.shape[:-1] + (1,), dtype=bool), fg], axis=-1)


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 7), st.integers(0, 3), st.booleans(),
       st.sampled_from(["bool", "uint8", "int64", "float32"]), st.integers(0, 2**32 - 1))
def test_normalize_image_labels_equals_reference(c, lead, fg_only, dtype, seed):
    from isle_fast.stores.image_labels import normalize_image_labels

    rng = np.random.default_rng(seed)
    shape = (lead,) * min(lead, 2) + (c - 1 if fg_only else c,)
    values = rng.integers(0, 2, size=shape).astype(dtype)
    before = values.copy()
    out = normalize_image_labels(values, c)
    assert out.dtype == np.bool_ and out.shape == shape[:-1] + (c,)
    np.testing.assert_array_equal(out, _reference_rows(values, c))
    np.testing.assert_array_equal(values, before)           # the input is not modified
    assert not np.shares_memory(out, values)


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 7), st.integers(-3, 3).filter(lambda d: d not in (0, -1)))
def test_normalize_image_labels_refuses_a_row_of_another_length(c, delta):
    from isle_fast.stores.image_labels import normalize_image_labels

    if c + delta < 0:
        return
    with pytest.raises(InputError, match=f"{c} entries .* or {c - 1} .foreground only"):
        normalize_image_labels(np.zeros((3, c + delta), bool), c)


@pytest.mark.parametrize("bad", [np.array([0, 2, 1]), np.array([0.0, 0.5, 1.0]), np.array(["a", "b", "c"])])
def test_normalize_image_labels_refuses_values_other_than_0_and_1(bad):
    from isle_fast.stores.image_labels import normalize_image_labels

    with pytest.raises(InputError, match="given labels must be booleans or 0 / 1"):
        normalize_image_labels(bad, 3, "given labels")


def test_refine_crf_and_resolve_share_the_normalisation():
    """The chain's (I, C) rows, the CRF's one-image row and resolve_image_labels agree."""
    from isle_fast.refinement.crf import _label_row
    from isle_fast.stores.image_labels import resolve_image_labels

    fg = np.array([[1, 0, 1], [0, 0, 0], [1, 1, 1]], np.uint8)          # foreground only, C = 4
    full = resolve_image_labels(fg, ["a", "b", "c"], ["bg", "x", "y", "z"])
    np.testing.assert_array_equal(full, _reference_rows(fg, 4))
    for i in range(3):
        np.testing.assert_array_equal(_label_row(fg[i], 4), full[i])
    with pytest.raises(InputError, match="booleans or 0 / 1"):
        resolve_image_labels(np.array([[0, 2, 1, 1]]), ["a"], ["bg", "x", "y", "z"])
