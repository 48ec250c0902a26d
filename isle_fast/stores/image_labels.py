"""Image-level labels: WSSS's only supervision, read from the files the public code uses, kept with stacks.

An image's image-level labels are the classes it contains (its tags). They
are held as an ``(I, C)`` bool array over a stack's ids and classes; column
0 (background) is always True, since every image may hold background.

Sources (:func:`read_image_labels`)
-----------------------------------
``cls_labels.npy``
    The file PSA / IRN / PuzzleCAM ship: a pickled dict ``image id ->
    float32[C - 1]`` (1 = present), read with the restricted unpickler
    (:mod:`isle_fast.stores.safe_pickle`, no ``--allow-pickle``). Integer ids
    are IRN's ``decode_int_filename`` form (``2007000032`` is
    ``2007_000032``: an underscore after the year); an id that does not match
    that way is also looked up as the plain number. A row of ``C`` values is
    taken as background first.
VOC XML annotation folder
    ``<id>.xml`` files (``Annotations/``): the classes of the
    ``annotation/object/name`` elements (``difficult`` and truncated
    objects included, part names such as ``hand`` ignored, as IRN's
    ``make_cls_labels.py`` does). An object name that is not a class is an
    error naming the file.
CSV
    One row per image: the id, then its classes as names or class indices
    (0 = background, 1 = the first foreground class: the values of a label
    map), in one cell separated by spaces, ``;`` or ``|``, or one per cell.
    A first row whose first cell is ``id`` / ``image`` / ``image_id`` /
    ``name`` / ``filename`` is a header; if the header's other cells are class
    names, the rows hold 0 / 1 per class instead.
JSON
    ``{"<id>": ["dog", "person"], ...}`` (names or indices), or a list of
    ``{"id": ..., "labels": [...]}`` records.
A store
    An image-labels store written by :func:`ingest_image_labels`
    (``isle ingest image-labels``), or a stack store holding an
    ``image_labels`` array (``isle ingest labels/scores --image-labels``).

Ids are checked against the stack they are used with: every id of the
stack must have labels (an error names the missing ids); ids the source has
beyond the stack are ignored and counted (the public ``cls_labels.npy``
holds all 12,031 VOC images, a val gt 1,449).

A class can be in an image's labels and absent from its ground-truth mask
(818 of the 12,031 VOC images: the labels come from the XML annotations,
which also list objects too small or too occluded to be in the mask);
nothing here depends on the two agreeing.
"""

from __future__ import annotations

import csv
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from isle_fast.errors import InputError, StoreError, param
from isle_fast.stores.stack import FORMAT_VERSION, VOC_CLASSES, Stack, StackWriter, is_remote

__all__ = [
    "IMAGE_LABELS_KIND", "IMAGE_LABELS_MEMBER", "ImageLabels", "read_image_labels", "write_image_labels",
    "open_image_labels", "ingest_image_labels", "resolve_image_labels", "attach_image_labels",
    "check_not_output", "normalize_image_labels",
]

#: ``kind`` attribute of a standalone image-labels store.
IMAGE_LABELS_KIND = "image-labels"
#: Name of the ``(I, C)`` bool array, in an image-labels store and in a stack store that carries labels.
IMAGE_LABELS_MEMBER = "image_labels"

_ID_COLUMNS = ("id", "image", "image_id", "img", "name", "filename", "file")
_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".npy", ".xml")


@dataclass
class ImageLabels:
    """Image-level labels of a set of images.

    Attributes
    ----------
    ids : list of str
    classes : list of str
        Class names, background first.
    labels : ndarray, (I, C) bool
        ``labels[i, c]``: image ``ids[i]`` contains class ``c``; column 0 is True.
    source : str
        Where they were read from.
    aliases : dict str -> int
        Other spellings of ids (the plain number of an integer id) -> row.
    """

    ids: list[str]
    classes: list[str]
    labels: np.ndarray
    source: str
    aliases: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=bool).reshape(len(self.ids), len(self.classes))
        self.labels[:, 0] = True
        self._row = {i: n for n, i in enumerate(self.ids)}
        if len(self._row) != len(self.ids):
            seen: set[str] = set()
            dup = next(i for i in self.ids if i in seen or seen.add(i))  # type: ignore[func-returns-value]
            raise InputError(f"{self.source}: image id {dup!r} has labels twice")

    def __len__(self) -> int:
        return len(self.ids)

    def row(self, image_id: str) -> int | None:
        """Row of ``image_id`` (or of another spelling of it), None if absent."""
        n = self._row.get(image_id)
        return self.aliases.get(image_id) if n is None else n

    def present(self, image_id: str) -> list[int] | None:
        """Foreground class indices of one image (None when the id has no labels)."""
        n = self.row(image_id)
        return None if n is None else [int(c) for c in np.nonzero(self.labels[n, 1:])[0] + 1]

    def aligned(self, ids: Sequence[str], where: str = "the stack") -> np.ndarray:
        """``(len(ids), C)`` bool rows for ``ids``; :class:`InputError` naming the ids without labels."""
        rows = [self.row(str(i)) for i in ids]
        missing = [str(i) for i, r in zip(ids, rows) if r is None]
        if missing:
            shown = ", ".join(repr(m) for m in missing[:5])
            raise InputError(f"{self.source}: no image-level labels for {len(missing)} of the {len(ids)} "
                             f"images of {where}: {shown}{' ...' if len(missing) > 5 else ''}")
        if not rows:
            return np.zeros((0, len(self.classes)), bool)
        return self.labels[np.asarray(rows, dtype=np.int64)]

    def extra(self, ids: Sequence[str]) -> int:
        """How many of these labels' images are not among ``ids``."""
        want = {str(i) for i in ids}
        return sum(1 for i in self.ids if i not in want)


# --------------------------------------------------------------------------- class names
def _class_index(classes: Sequence[str]) -> dict[str, int]:
    return {c.strip().lower(): k for k, c in enumerate(classes)}


def _token_class(tok: Any, index: dict[str, int], c: int, where: str) -> int:
    """A class name or index -> class index (0 = background)."""
    if isinstance(tok, bool):
        raise InputError(f"{where}: {tok!r} is not a class name or index")
    if isinstance(tok, (int, np.integer)) or (isinstance(tok, str) and re.fullmatch(r"\s*\d+\s*", tok)):
        k = int(tok)
        if not 0 <= k < c:
            raise InputError(f"{where}: class index {k} is outside [0, {c}) (0 = background)")
        return k
    if isinstance(tok, float) and tok.is_integer():
        return _token_class(int(tok), index, c, where)
    name = str(tok).strip().lower()
    if name not in index:
        raise InputError(f"{where}: {str(tok)!r} is not one of the {c} classes "
                         f"({', '.join(list(index)[:6])}, ...)")
    return index[name]


def _strip_ext(image_id: str) -> str:
    base = os.path.basename(image_id.strip())
    root, ext = os.path.splitext(base)
    return root if ext.lower() in _IMAGE_EXTS else base


# --------------------------------------------------------------------------- sources
def _irn_id(n: int) -> str:
    """IRN's ``decode_int_filename``: ``2007000032`` -> ``2007_000032``."""
    s = str(int(n))
    return s[:4] + "_" + s[4:]


def _from_cls_labels(path: Path, classes: list[str], allow_pickle: bool) -> ImageLabels:
    from isle_fast.stores.formats import BadInput, load_pickle_npy

    try:
        obj = load_pickle_npy(path, allow_pickle)
    except BadInput as exc:
        raise InputError(f"{path}: {exc}") from None
    if not isinstance(obj, dict):
        raise InputError(f"{path}: holds a {type(obj).__name__}, not a dict image id -> labels "
                         f"(the cls_labels.npy form)")
    c = len(classes)
    ids: list[str] = []
    rows: list[np.ndarray] = []
    aliases: dict[str, int] = {}
    for key, value in obj.items():
        if isinstance(key, (int, np.integer)) and not isinstance(key, (bool, np.bool_)):
            image_id = _irn_id(int(key))
            aliases[str(int(key))] = len(ids)
        elif isinstance(key, (str, bytes)):
            image_id = key.decode() if isinstance(key, bytes) else key
        else:
            raise InputError(f"{path}: image id {key!r} is neither a number nor a string")
        v = np.asarray(value).reshape(-1)
        if v.dtype.kind not in "biuf" or len(v) not in (c - 1, c):
            raise InputError(f"{path}: labels of image {image_id!r} have {len(v)} values of {v.dtype}; "
                             f"expected {c - 1} (one per foreground class) or {c}")
        if not np.isin(v, (0, 1)).all():
            raise InputError(f"{path}: labels of image {image_id!r} hold {v[~np.isin(v, (0, 1))][0]!r}; "
                             f"expected 0 / 1")
        row = np.zeros(c, dtype=bool)
        row[c - len(v):] = v.astype(bool)
        ids.append(image_id)
        rows.append(row)
    return ImageLabels(ids, classes, np.asarray(rows, dtype=bool).reshape(-1, c), str(path), aliases)


def _from_xml(folder: Path, classes: list[str], quiet: bool) -> ImageLabels:
    import xml.etree.ElementTree as ET

    from isle_fast.progress import progress

    files = sorted(f for f in os.listdir(folder) if f.lower().endswith(".xml") and not f.startswith("."))
    if not files:
        raise InputError(f"{folder} holds no .xml annotation files (a VOC Annotations folder)")
    index = _class_index(classes)
    c = len(classes)
    labels = np.zeros((len(files), c), dtype=bool)
    for n, f in enumerate(progress(files, desc="image labels (xml)", unit="file", quiet=quiet)):
        p = folder / f
        try:
            root = ET.parse(p).getroot()
        except (ET.ParseError, OSError) as exc:
            raise InputError(f"{p}: not a readable XML annotation: {exc}") from None
        for obj in root.iter("object"):
            name = obj.findtext("name")
            if name is None:
                raise InputError(f"{p}: an <object> without a <name>")
            labels[n, _token_class(name, index, c, str(p))] = True
    return ImageLabels([f[:-4] for f in files], classes, labels, str(folder))


def _rows_to_labels(records: list[tuple[str, list[Any]]], classes: list[str], source: str) -> ImageLabels:
    index = _class_index(classes)
    c = len(classes)
    labels = np.zeros((len(records), c), dtype=bool)
    ids = []
    for n, (image_id, toks) in enumerate(records):
        ids.append(image_id)
        for t in toks:
            labels[n, _token_class(t, index, c, f"{source}: image {image_id!r}")] = True
    return ImageLabels(ids, classes, labels, source)


def _from_csv(path: Path, classes: list[str]) -> ImageLabels:
    with open(path, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.reader(f) if any(cell.strip() for cell in r)]
    if not rows:
        raise InputError(f"{path}: an empty CSV file")
    index = _class_index(classes)
    head = [cell.strip() for cell in rows[0]]
    if head[0].lower() in _ID_COLUMNS:
        rows = rows[1:]
        cols = [h.lower() for h in head[1:]]
        if len(cols) >= 1 and all(h in index for h in cols) and cols[0] not in ("labels", "classes"):
            # one column per class, 0 / 1
            c = len(classes)
            labels = np.zeros((len(rows), c), dtype=bool)
            for n, r in enumerate(rows):
                if len(r) != len(head):
                    raise InputError(f"{path}: row {n + 2} has {len(r)} cells, the header {len(head)}")
                for h, cell in zip(cols, r[1:]):
                    if cell.strip() not in ("0", "1", "0.0", "1.0"):
                        raise InputError(f"{path}: row {n + 2}, column {h!r} is {cell!r}; expected 0 or 1")
                    labels[n, index[h]] = float(cell) == 1.0
            return ImageLabels([_strip_ext(r[0]) for r in rows], classes, labels, str(path))
    records = []
    for r in rows:
        toks = [t for cell in r[1:] for t in re.split(r"[\s;|]+", cell.strip()) if t]
        records.append((_strip_ext(r[0]), toks))
    return _rows_to_labels(records, classes, str(path))


def _from_json(path: Path, classes: list[str]) -> ImageLabels:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON: {exc}") from None
    if isinstance(obj, dict):
        items = list(obj.items())
    elif isinstance(obj, list) and all(isinstance(r, dict) and "id" in r for r in obj):
        items = [(r["id"], r.get("labels", r.get("classes"))) for r in obj]
    else:
        raise InputError(f"{path}: expected {{id: [classes]}} or a list of {{\"id\": ..., \"labels\": "
                         f"[...]}}")
    records = []
    for image_id, toks in items:
        if not isinstance(toks, list):
            raise InputError(f"{path}: labels of image {image_id!r} are {toks!r}, not a list of class names "
                             f"or indices")
        records.append((_strip_ext(str(image_id)), toks))
    return _rows_to_labels(records, classes, str(path))


def _is_store(p: Path) -> bool:
    return (p / "zarr.json").is_file()


def read_image_labels(src: Any, classes: Sequence[str] | None = None, *, allow_pickle: bool = False,
                      quiet: bool = True) -> ImageLabels:
    """Read image-level labels from any source the module docstring lists.

    Parameters
    ----------
    src : path, ImageLabels or Stack
        ``cls_labels.npy``, a VOC XML folder, a ``.csv`` / ``.json``, an
        image-labels store, or a stack store (or :class:`Stack`) holding
        image labels.
    classes : sequence of str, optional
        Class names, background first (default VOC's 21). A store's classes
        must equal them.
    allow_pickle : bool
        For ``.npy`` files the restricted unpickler refuses (see
        :func:`isle_fast.stores.formats.load_pickle_npy`).
    quiet : bool
        No progress bar (XML folders).

    Raises
    ------
    InputError
        The source is missing, malformed, names an unknown class or repeats an id.
    """
    names = list(classes) if classes is not None else list(VOC_CLASSES)
    if isinstance(src, ImageLabels):
        out = src
    elif isinstance(src, Stack):
        out = _from_stack(src)
    else:
        p = Path(str(src))
        if is_remote(str(src)) or _is_store(p):
            out = open_image_labels(src)
        elif p.is_dir():
            out = _from_xml(p, names, quiet)
        elif not p.is_file():
            raise InputError(f"image-level labels {p} do not exist")
        elif p.suffix.lower() == ".npy":
            out = _from_cls_labels(p, names, allow_pickle)
        elif p.suffix.lower() == ".csv":
            out = _from_csv(p, names)
        elif p.suffix.lower() == ".json":
            out = _from_json(p, names)
        else:
            raise InputError(f"image-level labels {p}: expected cls_labels.npy, a .csv, a .json, a folder of "
                             f"VOC .xml annotations or a store")
    if classes is not None and list(out.classes) != names:
        raise InputError(f"{out.source}: image-level labels over classes {out.classes} do not match the "
                         f"{len(names)} classes {names}")
    return out


# --------------------------------------------------------------------------- stores
def _from_stack(st: Stack) -> ImageLabels:
    arr = st.image_labels
    if arr is None:
        raise InputError(f"store {st.path} holds no image-level labels "
                         f"(ingest them with {param('image_labels')})")
    return ImageLabels(list(st.ids), list(st.classes), arr, st.path)


def open_image_labels(path: str | os.PathLike) -> ImageLabels:
    """Open an image-labels store, or the image labels a stack store carries."""
    import zarr

    spath = str(path)
    try:
        group = zarr.open_group(spath, mode="r")
    except Exception as exc:  # zarr raises several types for "not a group"
        raise StoreError(f"{spath} is not a Zarr v3 group: {exc}") from None
    attrs = dict(group.attrs)
    if attrs.get("kind") != IMAGE_LABELS_KIND:
        from isle_fast.stores.stack import open_stack

        return _from_stack(open_stack(spath))
    if attrs.get("isle_format") != FORMAT_VERSION or not attrs.get("complete", False):
        raise StoreError(f"{spath} is an incomplete image-labels store or of another format version")
    classes = attrs.get("classes")
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes) or len(classes) < 2:
        raise StoreError(f"{spath}: attribute 'classes' is {classes!r}; expected a list of class names")
    try:
        # Array or Group to Zarr's types; a group here fails to slice and is reported below
        ids_member: Any = group["ids"]
        labels_member: Any = group[IMAGE_LABELS_MEMBER]
        ids = [str(s) for s in ids_member[:]]
        labels = np.asarray(labels_member[:])
    except Exception as exc:
        raise StoreError(f"{spath}: its ids or image labels cannot be read: {exc}") from None
    if labels.dtype != bool or labels.shape != (len(ids), len(classes)):
        raise StoreError(f"{spath}: image labels of shape {labels.shape} and dtype {labels.dtype}; expected "
                         f"({len(ids)}, {len(classes)}) bool")
    return ImageLabels(ids, list(classes), labels, spath)


def _is_image_labels_store(path: Path) -> bool:
    try:
        return json.loads((path / "zarr.json").read_text()).get("attributes", {}).get("kind") == IMAGE_LABELS_KIND
    except (OSError, ValueError, AttributeError):
        return False


def write_image_labels(labels: ImageLabels, out: str | os.PathLike, *, overwrite: bool = False,
                       provenance: dict | None = None) -> str:
    """Write an image-labels store (``ids``, ``image_labels`` (I, C) bool) atomically; returns its path.

    ``overwrite`` replaces only an existing image-labels store (never another
    folder or file).
    """
    import zarr

    from isle_fast import __version__
    from isle_fast.outputs import commit_dir, remove_path, temp_path

    final = Path(str(out))
    if is_remote(str(out)):
        raise InputError("image-labels stores are written to local paths")
    if final.exists():
        if not overwrite:
            raise StoreError(f"{final} exists; pass {param('overwrite')} to replace it")
        if not _is_image_labels_store(final):
            raise StoreError(f"{final} is not an image-labels store; {param('overwrite')} replaces only one")
    final.parent.mkdir(parents=True, exist_ok=True)
    work = temp_path(final)
    n, c = labels.labels.shape
    try:
        g = zarr.open_group(str(work), mode="w", zarr_format=3)
        ids = g.create_array("ids", shape=(n,), dtype=str, chunks=(max(n, 1),))
        if n:
            ids[:] = np.asarray(labels.ids, dtype=object)
        arr = g.create_array(IMAGE_LABELS_MEMBER, shape=(n, c), dtype=bool, chunks=(max(n, 1), c))
        if n:
            arr[:] = labels.labels
        g.attrs.update({"isle_format": FORMAT_VERSION, "kind": IMAGE_LABELS_KIND, "name": final.name,
                        "classes": list(labels.classes), "complete": True,
                        "provenance": {"tool": "isle-fast", "version": __version__, "source": labels.source,
                                       **(provenance or {})}})
        commit_dir(work, final, overwrite=overwrite, owned_by_us=_is_image_labels_store)
    except BaseException:
        remove_path(work)
        raise
    return str(final)


def attach_image_labels(writer: StackWriter, labels: np.ndarray, source: str) -> None:
    """Store ``(I, C)`` image labels in a stack being written (read back as :attr:`Stack.image_labels`)."""
    labels = np.asarray(labels, dtype=bool)
    n = int(writer.group["ids"].shape[0])
    c = len(writer.group.attrs["classes"])
    if labels.shape != (n, c):
        raise InputError(f"image labels of shape {labels.shape} do not fit a store of {n} images and {c} "
                         f"classes")
    arr = writer.group.create_array(IMAGE_LABELS_MEMBER, shape=(n, c), dtype=bool, chunks=(max(n, 1), c))
    if n:
        arr[:] = labels
    writer.set_provenance(image_labels=source)


def check_not_output(src: Any, out: Any, what: str = param("image_labels")) -> None:
    """An output never replaces an input of the same command: refuse ``out`` naming the labels' source."""
    if src is None or out is None or isinstance(src, (np.ndarray, ImageLabels, Stack)):
        return
    if is_remote(str(src)) or is_remote(str(out)):
        if str(src).rstrip("/") == str(out).rstrip("/"):
            raise InputError(f"{what} {src} is also the output; write the output elsewhere")
        return
    if Path(str(src)).resolve() == Path(str(out)).resolve():
        raise InputError(f"{what} {src} is also the output; write the output elsewhere")


def normalize_image_labels(values: Any, num_classes: int, what: str = "image labels") -> np.ndarray:
    """Image-level labels as bool rows of every class, the background column set.

    Parameters
    ----------
    values : array-like, (..., C) or (..., C-1)
        Every class (the background entry is ignored) or the foreground only (the
        form of the public ``cls_labels.npy``); booleans or the numbers 0 / 1.
    num_classes : int
        ``C``, background included.
    what : str
        How messages name ``values``.

    Returns
    -------
    ndarray of bool, (..., C)
        A new array; column 0 (background) is True.

    Raises
    ------
    InputError
        The last axis is neither ``C`` nor ``C-1`` long, or a value is not a boolean, 0 or 1.

    Examples
    --------
    >>> normalize_image_labels([0, 1, 0], 4).tolist()
    [True, False, True, False]
    """
    a = np.asarray(values)
    c = int(num_classes)
    if a.ndim == 0 or a.shape[-1] not in (c, c - 1):
        raise InputError(f"{what} have shape {a.shape}; with {c} classes a row holds {c} entries (one per "
                         f"class) or {c - 1} (foreground only)")
    if a.dtype != np.bool_:
        if a.dtype.kind not in "iuf" or not np.isin(a, (0, 1)).all():
            raise InputError(f"{what} must be booleans or 0 / 1, not {a.dtype} values "
                             f"{np.unique(a)[:5].tolist()}")
        a = a != 0
    out = np.ones(a.shape[:-1] + (c,), dtype=bool)
    out[..., 1:] = a[..., 1:] if a.shape[-1] == c else a
    return out


def resolve_image_labels(src: Any, ids: Sequence[str], classes: Sequence[str], *, where: str = "the stack",
                         quiet: bool = True) -> np.ndarray:
    """Image labels for exactly these ids and classes: an ``(I, C)`` bool array.

    ``src`` is anything :func:`read_image_labels` reads, or an array already in
    this order (:func:`normalize_image_labels`: ``(I, C)`` or ``(I, C-1)``).
    """
    if isinstance(src, np.ndarray):
        if src.ndim != 2 or src.shape[0] != len(ids):
            raise InputError(f"image labels of shape {src.shape} ({src.dtype}) do not fit {len(ids)} images "
                             f"and {len(classes)} classes")
        return normalize_image_labels(src, len(classes))
    return read_image_labels(src, classes, quiet=quiet).aligned(ids, where)


def ingest_image_labels(src: Any, out: str | os.PathLike, *, gt: Any = None,
                        ids: str | os.PathLike | Sequence[str] | None = None,
                        classes: str | os.PathLike | Sequence[str] | None = None, overwrite: bool = False,
                        allow_pickle: bool = False, quiet: bool = False) -> ImageLabels:
    """Read image-level labels, check their ids, and write them as an image-labels store.

    Parameters
    ----------
    src : path
        ``cls_labels.npy``, a VOC XML folder, a ``.csv`` or ``.json``.
    out : path
        The image-labels store to write.
    gt : path or Stack, optional
        The labels are stored for exactly the gt's ids, in its order, with
        its classes (every gt id needs labels; others are left out and counted).
    ids : path or sequence of str, optional
        Without ``gt``: which ids (an id list file or a list); default every id
        in ``src``.
    classes : 'voc', path or sequence of str, optional
        Class names (default: the gt's, else VOC's 21).
    overwrite : bool
        Replace an existing image-labels store.
    allow_pickle : bool
        See :func:`read_image_labels`.
    quiet : bool
        No progress bar, no summary.

    Returns
    -------
    ImageLabels
        What was stored.
    """
    from isle_fast.progress import summary
    from isle_fast.stores.ingest import read_ids, resolve_classes
    from isle_fast.stores.stack import open_stack

    t0 = time.perf_counter()
    check_not_output(src, out, "SRC")
    check_not_output(None if isinstance(gt, Stack) else gt, out, param("gt"))
    if not overwrite and Path(str(out)).exists():
        raise StoreError(f"{out} exists; pass {param('overwrite')} to replace it")
    ref = gt if isinstance(gt, Stack) or gt is None else open_stack(gt)
    names = list(ref.classes) if ref is not None and classes is None else resolve_classes(classes)
    if ref is not None and names != list(ref.classes):
        raise InputError(f"classes {names} disagree with the classes of the ground truth {ref.path}")
    read = read_image_labels(src, names, allow_pickle=allow_pickle, quiet=quiet)
    if ref is not None:
        want, where = list(ref.ids), f"the ground truth {ref.path}"
    elif ids is not None:
        want = read_ids(ids) if isinstance(ids, (str, os.PathLike)) else [str(i) for i in ids]
        where = "the id list"
    else:
        want, where = list(read.ids), str(src)
    result = ImageLabels(want, names, read.aligned(want, where), str(src))
    prov = {"gt": None if ref is None else ref.path, "ignored_ids": read.extra(want)}
    path = write_image_labels(result, out, overwrite=overwrite, provenance=prov)
    fg = result.labels[:, 1:]
    rows = {"images": f"{len(want):,}", "source ids not used": f"{read.extra(want):,}",
            "labels per image": f"{fg.sum(axis=1).mean():.2f}" if len(want) else "-",
            "images without a foreground label": f"{int((~fg.any(axis=1)).sum()):,}",
            "seconds": f"{time.perf_counter() - t0:.2f}", "store": path}
    summary("isle ingest: image-level labels", rows, quiet=quiet)
    return result
