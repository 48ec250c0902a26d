"""Ingest of every supported format: round trips, validation, atomicity, skip-bad."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from reference import irn_decode, quantize_scores_u8

from isle_fast.errors import InputError, StoreError
from isle_fast.stores.ingest import (
    DEFAULT_BG_THRESHOLD,
    ingest_images,
    ingest_labels,
    ingest_scores,
    read_ids,
    resolve_classes,
)
from isle_fast.stores.ingest_arrays import ingest_arrays, ingest_dask
from isle_fast.stores.ingest_tiff import ingest_tiff
from isle_fast.stores.png import voc_palette

C = 21
PALETTE = voc_palette().ravel().tolist()


# ------------------------------------------------------------------ fixtures
def save_label(path, arr, mode="P"):
    if mode == "P":
        im = Image.fromarray(arr.astype(np.uint8)).convert("L")
        im.putpalette(PALETTE)
    elif mode == "RGB":
        im = Image.fromarray(voc_palette()[arr])
    else:
        im = Image.fromarray(arr.astype(np.uint8))
    im.save(path)


def make_labels(folder, rng, n=5, c=C, modes=("P", "L")):
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for i in range(n):
        h, w = (int(v) for v in rng.integers(3, 17, 2))
        a = rng.integers(0, c, (h, w)).astype(np.uint8)
        a[rng.random((h, w)) < 0.1] = 255
        image_id = f"2007_{i:06d}"
        save_label(folder / f"{image_id}.png", a, modes[i % len(modes)])
        out[image_id] = a
    return out


def leftovers(root, keep):
    """Entries of ``root`` other than the fixture folders: must be none after a failed ingest."""
    return sorted(p for p in os.listdir(root) if p not in keep)


def assert_padded(stack, data, fill):
    assert stack.ids == list(data)
    full = stack.array[:]
    for k, (i, a) in enumerate(data.items()):
        h, w = a.shape[:2]
        assert tuple(stack.shapes[k]) == (h, w)
        np.testing.assert_array_equal(stack.read_image(i), a)
        rest = full[k].copy()
        rest[:h, :w] = fill
        assert (rest == fill).all(), "padding beyond the true shape must be the fill value"


# ------------------------------------------------------------------ ids, classes
def test_read_ids_forms(tmp_path):
    f = tmp_path / "train_aug.txt"
    f.write_text("# comment\n2007_000032\n\n2007_000039\n")
    assert read_ids(f) == ["2007_000032", "2007_000039"]
    f.write_text("/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png\n"
                 "JPEGImages/a.jpg SegmentationClassAug/a.png\n")
    assert read_ids(f) == ["2007_000032", "a"]
    f.write_text("x\ny\nx\n")
    with pytest.raises(InputError, match="train_aug.txt line 3"):
        read_ids(f)
    with pytest.raises(InputError, match="nope.txt"):
        read_ids(tmp_path / "nope.txt")


def test_read_ids_follows_the_folder_listing(tmp_path, caplog):
    """Issue 19: a BOM is dropped, an id with a space is whole (as a file 'a b.png' in a folder), and
    'dir/x' is read as 'x' with a note saying so (the VOC two-column form needs no note)."""
    f = tmp_path / "ids.txt"
    f.write_bytes("\ufeff2007_000032\na b\n".encode("utf-8"))
    assert read_ids(f) == ["2007_000032", "a b"]
    f.write_text("dir/x\nother/y.png\nz\n")
    with caplog.at_level("WARNING", logger="isle_fast"):
        assert read_ids(f) == ["x", "y", "z"]
    assert "2 entries with a folder (e.g. 'dir/x') read as their file name ('x')" in caplog.text
    caplog.clear()
    f.write_text("JPEGImages/a.jpg SegmentationClassAug/a.png\n")
    with caplog.at_level("WARNING", logger="isle_fast"):
        assert read_ids(f) == ["a"]
    assert caplog.text == ""


def test_resolve_classes(tmp_path):
    assert len(resolve_classes("voc")) == 21
    f = tmp_path / "c.txt"
    f.write_text("bg\ncat\ndog\n\n")            # blank lines after the last name are fine
    assert resolve_classes(f) == ["bg", "cat", "dog"]
    # deliberate change (issue 18): a blank line between names used to be dropped, shifting every later class
    f.write_text("bg\ncat\n\ndog\n")
    with pytest.raises(InputError, match=r"c\.txt, line 3: blank line"):
        resolve_classes(f)
    with pytest.raises(InputError, match="missing.txt"):
        resolve_classes(tmp_path / "missing.txt")


# ------------------------------------------------------------------ labels
def test_labels_round_trip_palette_gray_rgb(tmp_path, rng):
    data = make_labels(tmp_path / "lab", rng, n=6, modes=("P", "L", "RGB"))
    st_ = ingest_labels(tmp_path / "lab", tmp_path / "s.zarr", quiet=True)
    assert st_.encoding == "labels" and st_.kind == "pseudo" and st_.classes[0] == "background"
    assert_padded(st_, data, 255)
    assert st_.provenance["source"] == str(tmp_path / "lab")
    assert st_.provenance["version"]


def test_labels_ids_file_order_and_subset(tmp_path, rng):
    data = make_labels(tmp_path / "lab", rng, n=5)
    order = list(data)[::-2]
    (tmp_path / "ids.txt").write_text("".join(f"JPEGImages/{i}.jpg SegmentationClassAug/{i}.png\n" for i in order))
    st_ = ingest_labels(tmp_path / "lab", tmp_path / "s.zarr", ids=tmp_path / "ids.txt", quiet=True)
    assert st_.ids == order
    assert st_.provenance["ids_file"] == str(tmp_path / "ids.txt")
    for i in order:
        np.testing.assert_array_equal(st_.read_image(i), data[i])


def test_labels_gt_alignment_and_npy(tmp_path, rng):
    data = make_labels(tmp_path / "gt", rng, n=4)
    gt = ingest_labels(tmp_path / "gt", tmp_path / "gt.zarr", kind="gt", quiet=True)
    (tmp_path / "set").mkdir()
    for i, a in data.items():  # a set saved as 2-D .npy, in another order on disk
        np.save(tmp_path / "set" / f"{i}.npy", a.astype(np.int32))
    s = ingest_labels(tmp_path / "set", tmp_path / "s.zarr", gt=tmp_path / "gt.zarr", quiet=True)
    assert s.ids == gt.ids and s.padded_shape == gt.padded_shape
    from isle_fast.stores.stack import check_aligned

    check_aligned([gt, s])
    for i, a in data.items():
        np.testing.assert_array_equal(s.read_image(i), a)
    # the gt may also be a folder
    s2 = ingest_labels(tmp_path / "set", tmp_path / "s2.zarr", gt=tmp_path / "gt", quiet=True)
    assert sorted(s2.ids) == sorted(data)


@pytest.mark.parametrize("problem", ["missing", "size", "value", "truncated", "not_png", "extra_id", "classes"])
def test_labels_bad_input_names_file_and_writes_nothing(tmp_path, rng, problem):
    data = make_labels(tmp_path / "gt", rng, n=4)
    ingest_labels(tmp_path / "gt", tmp_path / "gt.zarr", kind="gt", quiet=True)
    make_labels(tmp_path / "set", np.random.default_rng(7), n=0)
    for i, a in data.items():
        save_label(tmp_path / "set" / f"{i}.png", a)
    victim = list(data)[2]
    f = tmp_path / "set" / f"{victim}.png"
    kw = {}
    if problem == "missing":
        f.unlink()
    elif problem == "size":
        save_label(f, np.zeros((data[victim].shape[0] + 1, data[victim].shape[1]), np.uint8))
    elif problem == "value":
        a = data[victim].copy()
        a[1, 2] = 21
        save_label(f, a)
    elif problem == "truncated":
        raw = f.read_bytes()
        f.write_bytes(raw[: len(raw) // 2])
    elif problem == "not_png":
        f.write_bytes(b"this is not an image")
    elif problem == "extra_id":
        save_label(tmp_path / "set" / "stray.png", np.zeros((3, 3), np.uint8))
        kw["ids"] = list(data) + ["stray"]
        victim = "stray"
    elif problem == "classes":
        kw["classes"] = ["bg", "a", "b"]
    before = leftovers(tmp_path, [])
    with pytest.raises(InputError) as exc:
        ingest_labels(tmp_path / "set", tmp_path / "s.zarr", gt=tmp_path / "gt.zarr", quiet=True, **kw)
    msg = str(exc.value)
    if problem == "classes":
        assert "gt.zarr" in msg
    else:
        assert f"{victim}.png" in msg and repr(victim) in msg
    assert leftovers(tmp_path, []) == before, "a failed ingest must leave no store and no temp folder"


def test_labels_value_error_without_gt(tmp_path, rng):
    data = make_labels(tmp_path / "lab", rng, n=3)
    victim = list(data)[1]
    a = data[victim].copy()
    a[0, 0] = 200
    save_label(tmp_path / "lab" / f"{victim}.png", a, "L")
    with pytest.raises(InputError, match=rf"{victim}\.png.*value 200 at row 0, column 0"):
        ingest_labels(tmp_path / "lab", tmp_path / "s.zarr", quiet=True)
    assert not (tmp_path / "s.zarr").exists()
    # 255 is fine, and a smaller class list makes 20 out of range
    with pytest.raises(InputError, match=r"outside \[0, 3\)"):
        ingest_labels(tmp_path / "lab", tmp_path / "s.zarr", classes=["a", "b", "c"], quiet=True)


def test_labels_skip_bad(tmp_path, rng):
    data = make_labels(tmp_path / "lab", rng, n=6)
    ids = list(data)
    # one missing (found before writing), one truncated (found while decoding: header is fine)
    (tmp_path / "lab" / f"{ids[1]}.png").unlink()
    raw = (tmp_path / "lab" / f"{ids[3]}.png").read_bytes()
    (tmp_path / "lab" / f"{ids[3]}.png").write_bytes(raw[:60])
    a = data[ids[5]].copy()
    a[0, 0] = 99
    save_label(tmp_path / "lab" / f"{ids[5]}.png", a)
    s = ingest_labels(tmp_path / "lab", tmp_path / "s.zarr", ids=ids, skip_bad=True, quiet=True, chunks=(2, 4, 4))
    good = [ids[0], ids[2], ids[4]]
    assert s.ids == good
    assert s.array.shape[0] == 3 and len(s.shapes) == 3
    assert_padded(s, {i: data[i] for i in good}, 255)
    skipped = {d["id"]: d for d in s.provenance["skipped"]}
    assert set(skipped) == {ids[1], ids[3], ids[5]}
    assert skipped[ids[5]]["file"].endswith(f"{ids[5]}.png") and "99" in skipped[ids[5]]["reason"]
    assert "no file" in skipped[ids[1]]["reason"]


def test_labels_skip_bad_all_bad_writes_nothing(tmp_path, rng):
    (tmp_path / "lab").mkdir()
    (tmp_path / "lab" / "a.png").write_bytes(b"junk")
    with pytest.raises(InputError, match="a.png"):
        ingest_labels(tmp_path / "lab", tmp_path / "s.zarr", skip_bad=True, quiet=True)
    assert leftovers(tmp_path, ["lab"]) == []


def test_labels_overwrite(tmp_path, rng):
    data = make_labels(tmp_path / "lab", rng, n=2)
    ingest_labels(tmp_path / "lab", tmp_path / "s.zarr", quiet=True)
    with pytest.raises(StoreError, match="exists"):
        ingest_labels(tmp_path / "lab", tmp_path / "s.zarr", quiet=True)
    s = ingest_labels(tmp_path / "lab", tmp_path / "s.zarr", overwrite=True, kind="gt", quiet=True)
    assert s.kind == "gt" and s.ids == list(data)


def test_labels_summary_printed(tmp_path, rng, capsys):
    make_labels(tmp_path / "lab", rng, n=2)
    ingest_labels(tmp_path / "lab", tmp_path / "s.zarr")
    out = capsys.readouterr().out
    for word in ("images", "pixels", "seconds", "throughput", "store size"):
        assert word in out


# ------------------------------------------------------------------ scores
def irn_dict(rng, h, w, keys, low=True):
    hr = rng.random((len(keys), h, w)).astype(np.float32)
    d = {"keys": np.asarray(keys), "high_res": hr}
    if low:
        d["cam"] = rng.random((len(keys), (h + 3) // 4, (w + 3) // 4)).astype(np.float32)
    return d


def expected_full(fg: np.ndarray, keys, h, w, thr=DEFAULT_BG_THRESHOLD, c=C):
    full = np.zeros((h, w, c), np.float32)
    full[..., 0] = thr
    for j, k in enumerate(keys):
        full[..., k + 1] = fg[j]
    return quantize_scores_u8(full)


def write_gt(tmp_path, shapes):
    (tmp_path / "gt").mkdir(exist_ok=True)
    for i, (h, w) in shapes.items():
        save_label(tmp_path / "gt" / f"{i}.png", np.zeros((h, w), np.uint8))
    return ingest_labels(tmp_path / "gt", tmp_path / "gt.zarr", kind="gt", quiet=True)


def test_scores_irn_dict_read_safely_without_allow_pickle(tmp_path, rng):
    """np.save'd IRN dicts are pickles; the restricted unpickler reads them, no --allow-pickle needed."""
    shapes = {"a": (5, 7), "b": (9, 4)}
    write_gt(tmp_path, shapes)
    (tmp_path / "cam").mkdir()
    dicts = {}
    for n, (i, (h, w)) in enumerate(shapes.items()):
        dicts[i] = irn_dict(rng, h, w, [2, 14] if n else [0])
        np.save(tmp_path / "cam" / f"{i}.npy", dicts[i])
    s = ingest_scores(tmp_path / "cam", tmp_path / "s.zarr", gt=tmp_path / "gt.zarr", quiet=True)
    assert s.encoding == "scores" and s.array.dtype == np.uint8 and s.score_scale == 255.0
    exp = {i: expected_full(d["high_res"], d["keys"], *shapes[i]) for i, d in dicts.items()}
    assert_padded(s, exp, 0)
    # the stored stack decodes like the public eval code, every pixel: argmax over [thr, cams], keys + 1
    for i, d in dicts.items():
        np.testing.assert_array_equal(np.argmax(s.read_image(i), axis=-1),
                                      irn_decode(d["high_res"], d["keys"], DEFAULT_BG_THRESHOLD))
    assert s.provenance["parameters"]["bg_threshold"] == DEFAULT_BG_THRESHOLD


@settings(max_examples=25)
@given(seed=st.integers(0, 2**31), n_keys=st.integers(1, 4), pool=st.integers(1, 5),
       thr=st.sampled_from([DEFAULT_BG_THRESHOLD, 0.0, 0.25, 38.5 / 255, 1.0]),
       h=st.integers(1, 13), w=st.integers(1, 17), dtype=st.sampled_from(["uint8", "float16", "float32"]))
def test_scores_store_decodes_like_irn_evaluation_of_the_files(tmp_path_factory, seed, n_keys, pool, thr,
                                                               h, w, dtype):
    """Issue 13.5: rounding to uint8 made exact ties that went to the lower class (0.49 % of the pixels of
    IRN-style CAMs decoded differently from IRN's own evaluation). CAMs full of near-ties and values equal to
    the threshold, written as IRN writes them: the stored stack decodes exactly like IRN's eval_cam.py."""
    from _scores import tricky_scores

    from isle_fast.kernels.cpu import decode_scores

    root = tmp_path_factory.mktemp("irn")
    rng = np.random.default_rng(seed)
    (root / "cam").mkdir()
    files = {}
    for k in range(3):
        keys = np.sort(rng.choice(C - 1, n_keys, replace=False))
        cams = tricky_scores(seed + k, h * w, n_keys, pool, np.float32, lo=0.0, hi=1.0)
        cams = np.where(rng.random(cams.shape) < 0.2, np.float32(thr), cams)  # exactly the threshold
        cams = np.ascontiguousarray(cams.T.reshape(n_keys, h, w))
        np.save(root / "cam" / f"im{k}.npy", {"keys": keys, "cam": cams[:, ::4, ::4], "high_res": cams})
        files[f"im{k}"] = (cams, keys)
    s = ingest_scores(root / "cam", root / "s.zarr", bg_threshold=thr, score_dtype=dtype, allow_pickle=True,
                      quiet=True)
    for image_id, (cams, keys) in files.items():
        np.testing.assert_array_equal(decode_scores(s.read_image(image_id)), irn_decode(cams, keys, thr),
                                      err_msg=f"{image_id}: threshold {thr}, {dtype}")


def test_scores_low_res_cam_refused_or_upsampled(tmp_path, rng):
    write_gt(tmp_path, {"a": (8, 8)})
    (tmp_path / "cam").mkdir()
    np.save(tmp_path / "cam" / "a.npy", {"keys": np.array([4]), "cam": np.ones((1, 2, 2), np.float32) * 0.5})
    with pytest.raises(InputError, match=r"a\.npy.*low-resolution 'cam' of 2 x 2.*8 x 8.*pass upsample=True to "
                       r"resize") as err:                                       # the API names the parameter
        ingest_scores(tmp_path / "cam", tmp_path / "s.zarr", gt=tmp_path / "gt.zarr", allow_pickle=True,
                      quiet=True)
    assert "pass --upsample to resize" in err.value.for_cli() and "--" not in str(err.value)   # the CLI the flag
    s = ingest_scores(tmp_path / "cam", tmp_path / "s.zarr", gt=tmp_path / "gt.zarr", allow_pickle=True,
                      upsample=True, quiet=True)
    x = s.read_image("a")
    assert x.shape == (8, 8, C) and (x[..., 5] == 128).all() and (x[..., 0] == 38).all()
    with pytest.raises(InputError, match=r"give the ground truth \(gt\)") as err:  # the API names the parameter
        ingest_scores(tmp_path / "cam", tmp_path / "s2.zarr", upsample=True, quiet=True)
    assert "(--gt)" in err.value.for_cli()                                     # the command line, the flag


def test_scores_plain_layouts(tmp_path, rng):
    (tmp_path / "cam").mkdir()
    full_chw = rng.random((C, 4, 6)).astype(np.float32)
    full_hwc = rng.random((5, 3, C)).astype(np.float32)
    fg_only = rng.random((C - 1, 2, 9)).astype(np.float32)
    keyed = rng.random((2, 6, 6)).astype(np.float32)
    np.save(tmp_path / "cam" / "a.npy", full_chw)
    np.save(tmp_path / "cam" / "b.npy", full_hwc)
    np.savez(tmp_path / "cam" / "c.npz", scores=fg_only)
    np.savez(tmp_path / "cam" / "d.npz", keys=np.array([1, 19]), high_res=keyed)
    s = ingest_scores(tmp_path / "cam", tmp_path / "s.zarr", score_dtype="float16", bg_threshold=0.3, quiet=True)
    assert s.array.dtype == np.float16 and s.score_scale == 1.0
    np.testing.assert_array_equal(s.read_image("a"), np.moveaxis(full_chw, 0, 2).astype(np.float16))
    np.testing.assert_array_equal(s.read_image("b"), full_hwc.astype(np.float16))
    c = s.read_image("c")
    assert (c[..., 0] == np.float16(0.3)).all()
    np.testing.assert_array_equal(c[..., 1:], np.moveaxis(fg_only, 0, 2).astype(np.float16))
    d = s.read_image("d")
    np.testing.assert_array_equal(d[..., 2], keyed[0].astype(np.float16))
    np.testing.assert_array_equal(d[..., 20], keyed[1].astype(np.float16))
    assert (d[..., [1, 3, 19]] == 0).all()
    assert (s.array[:][0, 4:] == 0).all()  # padding of scores is 0


@pytest.mark.parametrize("problem,match", [
    ("nan", r"x\.npy.*NaN"),
    ("range", r"x\.npy.*outside \[0, 1\].*pass normalize=True to max-normalise"),
    ("classes", r"x\.npy.*class count disagrees"),
    ("keys", r"x\.npz.*keys \[20\].*class count disagrees"),
    ("truncated", r"x\.npy.*(corrupt|truncated)"),
    ("size", r"x\.npy.*does not match the image size"),
])
def test_scores_bad_input(tmp_path, rng, problem, match):
    write_gt(tmp_path, {"x": (4, 5), "y": (4, 5)})
    (tmp_path / "cam").mkdir()
    np.save(tmp_path / "cam" / "y.npy", rng.random((C, 4, 5)).astype(np.float32))
    a = rng.random((C, 4, 5)).astype(np.float32)
    if problem == "nan":
        a[3, 1, 1] = np.nan
    elif problem == "range":
        a *= 7
    elif problem == "classes":
        a = a[:5]
    elif problem == "size":
        a = a[:, :3]
    if problem == "keys":
        np.savez(tmp_path / "cam" / "x.npz", keys=np.array([20]), cam=a[:1])
    else:
        np.save(tmp_path / "cam" / "x.npy", a)
    if problem == "truncated":
        raw = (tmp_path / "cam" / "x.npy").read_bytes()
        (tmp_path / "cam" / "x.npy").write_bytes(raw[: len(raw) - 50])
    with pytest.raises(InputError, match=match) as exc:
        ingest_scores(tmp_path / "cam", tmp_path / "s.zarr", gt=tmp_path / "gt.zarr", quiet=True)
    assert "'x'" in str(exc.value)
    assert leftovers(tmp_path, ["gt", "gt.zarr", "cam"]) == []
    # skip_bad keeps y
    s = ingest_scores(tmp_path / "cam", tmp_path / "s.zarr", gt=tmp_path / "gt.zarr", skip_bad=True, quiet=True)
    assert s.ids == ["y"] and s.provenance["skipped"][0]["id"] == "x"
    reason = s.provenance["skipped"][0]["reason"]   # kept as text: the parameter's name, no markup
    assert reason in str(exc.value) and reason.isprintable(), reason


def test_scores_normalize(tmp_path, rng):
    (tmp_path / "cam").mkdir()
    a = rng.random((C, 3, 3)).astype(np.float32) * 5 - 1
    np.save(tmp_path / "cam" / "x.npy", a)
    s = ingest_scores(tmp_path / "cam", tmp_path / "s.zarr", normalize=True, score_dtype="float32", quiet=True)
    r = np.maximum(a, 0)
    r = r / r.reshape(C, -1).max(axis=1)[:, None, None]
    np.testing.assert_allclose(s.read_image("x"), np.moveaxis(r, 0, 2), rtol=1e-6)


# ------------------------------------------------------------------ images
def test_images_round_trip(tmp_path, rng):
    (tmp_path / "img").mkdir()
    data = {}
    for i in range(3):
        h, w = (int(v) for v in rng.integers(4, 12, 2))
        a = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
        Image.fromarray(a).save(tmp_path / "img" / f"i{i}.png")
        data[f"i{i}"] = a
    Image.fromarray(np.full((5, 6), 77, np.uint8)).save(tmp_path / "img" / "g.jpg")  # grayscale JPEG -> RGB
    s = ingest_images(tmp_path / "img", tmp_path / "im.zarr", ids=["i0", "i1", "i2", "g"], quiet=True)
    assert s.kind == "images" and s.encoding == "rgb"
    g = s.read_image("g")
    assert g.shape == (5, 6, 3) and abs(int(g.astype(int).mean()) - 77) <= 2
    assert_padded(s, {**data, "g": g}, 0)


# ------------------------------------------------------------------ TIFF
def test_tiff_tiled_label_map_tile_by_tile(tmp_path, rng, monkeypatch):
    import tifffile

    big = rng.integers(0, C, (300, 170)).astype(np.uint8)
    big[rng.random(big.shape) < 0.05] = 255
    tifffile.imwrite(tmp_path / "big.tif", big, tile=(64, 64))
    # spy on region reads: none may be larger than one output chunk
    import zarr

    reads = []
    real_open = zarr.open

    def spy_open(store, mode="r", **kw):
        z = real_open(store, mode=mode, **kw)

        class Spy:
            shape = z.shape

            def __getitem__(self, key):
                out = z[key]
                reads.append(out.shape)
                return out
        return Spy()

    monkeypatch.setattr(zarr, "open", spy_open)
    s = ingest_tiff(tmp_path / "big.tif", tmp_path / "t.zarr", kind="gt", chunks=(1, 128, 100), quiet=True)
    monkeypatch.undo()
    assert s.ids == ["big"] and s.chunks == (1, 128, 100)
    np.testing.assert_array_equal(s.read_image("big"), big)
    assert reads and max(r[0] for r in reads) <= 128 and max(r[1] for r in reads) <= 100


def test_tiff_scores_and_bad_values(tmp_path, rng):
    import tifffile

    sc = rng.random((70, 50, 4)).astype(np.float32)
    tifffile.imwrite(tmp_path / "s.tif", sc, tile=(64, 64), planarconfig="contig", photometric="minisblack")
    s = ingest_tiff(tmp_path / "s.tif", tmp_path / "s.zarr", classes=["bg", "a", "b", "c"],
                    chunks=(1, 32, 32, 4), quiet=True)
    assert s.encoding == "scores"
    np.testing.assert_array_equal(s.read_image("s"), quantize_scores_u8(sc))
    bad = rng.integers(0, 3, (80, 80)).astype(np.uint8)
    bad[70, 75] = 9
    tifffile.imwrite(tmp_path / "bad.tif", bad, tile=(64, 64))
    with pytest.raises(InputError, match=r"bad\.tif.*'bad'.*value 9"):
        ingest_tiff(tmp_path / "bad.tif", tmp_path / "b.zarr", classes=["a", "b", "c"], chunks=(1, 64, 64),
                    quiet=True)
    assert not (tmp_path / "b.zarr").exists()
    assert leftovers(tmp_path, ["s.tif", "s.zarr", "bad.tif"]) == []
    # a folder with one good and one bad TIFF, skip-bad keeps the good one
    (tmp_path / "d").mkdir()
    good = rng.integers(0, 3, (40, 30)).astype(np.uint8)
    tifffile.imwrite(tmp_path / "d" / "good.tif", good, tile=(16, 16))
    tifffile.imwrite(tmp_path / "d" / "zbad.tif", bad, tile=(64, 64))
    s = ingest_tiff(tmp_path / "d", tmp_path / "d.zarr", classes=["a", "b", "c"], chunks=(1, 32, 32),
                    skip_bad=True, quiet=True)
    assert s.ids == ["good"] and s.provenance["skipped"][0]["id"] == "zbad"
    np.testing.assert_array_equal(s.read_image("good"), good)


# ------------------------------------------------------------------ arrays
def test_arrays_list_batch_and_errors(tmp_path, rng):
    imgs = [rng.integers(0, C, (h, w)).astype(np.uint8) for h, w in [(3, 4), (6, 2), (5, 5)]]
    s = ingest_arrays(imgs, tmp_path / "a.zarr", ids=["x", "y", "z"])
    assert_padded(s, dict(zip(["x", "y", "z"], imgs)), 255)
    batch = rng.random((2, 4, 4, 3)).astype(np.float32)
    s = ingest_arrays(batch, tmp_path / "b.zarr", shapes=[(4, 4), (2, 3)], classes=["bg", "a", "b"])
    assert s.encoding == "scores"
    np.testing.assert_array_equal(s.read_image(1), quantize_scores_u8(batch[1, :2, :3]))
    assert (s.array[1, 2:] == 0).all()
    bad = [imgs[0], np.full((2, 2), 30, np.uint8)]
    with pytest.raises(InputError, match=r"array 1: image '1'.*value 30"):
        ingest_arrays(bad, tmp_path / "c.zarr")
    assert not (tmp_path / "c.zarr").exists()
    with pytest.raises(InputError, match="NaN"):
        ingest_arrays([np.full((2, 2, 3), np.nan, np.float32)], tmp_path / "c.zarr", classes=["a", "b", "c"])


def test_dask_round_trip_and_error(tmp_path, rng):
    import dask.array as da

    shapes = np.array([(7, 5), (3, 9), (9, 9), (1, 1)])
    batch = rng.integers(0, C, (4, 9, 9)).astype(np.uint8)
    s = ingest_dask(da.from_array(batch, chunks=(3, 4, 5)), tmp_path / "d.zarr", ids=list("abcd"), shapes=shapes,
                    chunks=(2, 5, 5))
    assert s.chunks == (2, 5, 5)
    assert_padded(s, {i: batch[k, :h, :w] for k, (i, (h, w)) in enumerate(zip("abcd", shapes))}, 255)
    batch[2, 8, 8] = 77
    with pytest.raises(InputError, match=r"'c'.*value 77"):
        ingest_dask(da.from_array(batch, chunks=(2, 9, 9)), tmp_path / "e.zarr", ids=list("abcd"), shapes=shapes)
    assert leftovers(tmp_path, ["d.zarr"]) == []


# ------------------------------------------------------------------ hypothesis: random shapes and chunkings
@settings(max_examples=15)
@given(st.data())
def test_store_round_trip_random_shapes_and_chunks(tmp_path_factory, data):
    root = tmp_path_factory.mktemp("h")
    n = data.draw(st.integers(1, 5))
    shapes = [tuple(data.draw(st.integers(1, 13)) for _ in range(2)) for _ in range(n)]
    scores = data.draw(st.booleans())
    hp, wp = max(s[0] for s in shapes), max(s[1] for s in shapes)
    chunks = (data.draw(st.integers(1, n + 1)), data.draw(st.integers(1, hp + 2)), data.draw(st.integers(1, wp + 2)))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31)))
    if scores:
        imgs = [rng.integers(0, 256, s + (3,)).astype(np.uint8) for s in shapes]
        chunks = chunks + (3,)
        fill = 0
    else:
        imgs = [rng.choice(np.array([0, 1, 2, 255], np.uint8), s) for s in shapes]
        fill = 255
    s = ingest_arrays(imgs, root / "s.zarr", classes=["a", "b", "c"], chunks=chunks, workers=2)
    assert s.chunks == tuple(min(c, d) for c, d in zip(chunks, s.array.shape))
    assert_padded(s, {str(k): a for k, a in enumerate(imgs)}, fill)
    # the one-hot view agrees with the label map (padding and ignore are all-zero)
    if not scores:
        oh = s.as_dask().compute()
        lab = s.array[:]
        assert (oh.argmax(-1)[lab < 3] == lab[lab < 3]).all() and (oh[lab == 255] == 0).all()


def test_finding_files_from_one_listing_equals_a_stat_per_id(tmp_path):
    """``_find`` with the listing finds what a stat per candidate finds (dirs, case, links, subfolders)."""
    from isle_fast.stores.ingest import _files_of, _find

    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "b.png").mkdir()                    # a folder named like a file is not a file
    (tmp_path / "c.PNG").write_bytes(b"x")
    (tmp_path / "d.npy").write_bytes(b"x")
    (tmp_path / "d.png").symlink_to(tmp_path / "a.png")
    (tmp_path / "e.png").symlink_to(tmp_path / "gone.png")    # a dangling link is no file
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "f.png").write_bytes(b"x")
    files = _files_of(tmp_path)
    for i in ("a", "b", "c", "d", "e", "sub/f", "missing", "sub"):
        assert _find(tmp_path, i, (".png", ".npy"), files) == _find(tmp_path, i, (".png", ".npy")), i
    assert _find(tmp_path, "d", (".png", ".npy"), files) == str(tmp_path / "d.png")
    assert _find(tmp_path, "sub/f", (".png",), files) == str(tmp_path / "sub" / "f.png")
    assert _files_of(tmp_path / "nope") is None
