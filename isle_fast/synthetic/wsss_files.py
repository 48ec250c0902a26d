"""Files in the forms the public WSSS code writes: CAM ``.npy`` dicts and ``cls_labels.npy``.

:func:`save_cam_npy` / :func:`load_cam_npy` (PuzzleCAM's or IRN's layout), :func:`cam_scores` (a CAM
dict as the score stack a store holds) and :func:`save_cls_labels` (image-level labels).
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from isle_fast.errors import InputError
from isle_fast.outputs import write_bytes
from isle_fast.stores.stack import VOC_CLASSES

__all__ = ["CAM_STRIDE", "CAM_BG_THRESHOLD", "save_cam_npy", "load_cam_npy", "save_cls_labels", "cam_scores"]

NUM_CLASSES = len(VOC_CLASSES)  # 21, background included
CAM_STRIDE = 4
#: Background score of the CAM score stores (IRN's ``cam_eval_thres``; ingest's default too).
CAM_BG_THRESHOLD = 0.15


def save_cam_npy(path: str | os.PathLike, keys: np.ndarray, high_res: np.ndarray,
                 stride: int = CAM_STRIDE, layout: str = "puzzlecam") -> None:
    """Write CAMs in a public WSSS ``.npy`` dict form (atomically).

    Parameters
    ----------
    path : str or path-like
        Output ``.npy`` file.
    keys : ndarray, (K,), int
        The image's foreground classes, 0-based over the foreground (class k + 1).
    high_res : ndarray, (K, H, W), float
        Full-resolution scores in [0, 1].
    stride : int
        The ``"cam"`` entry is ``high_res[:, ::stride, ::stride]``.
    layout : {'puzzlecam', 'irn'}
        ``puzzlecam`` (the default, the paper's components):
        ``{"keys": np.pad(keys + 1, (1, 0)), "cam", "hr_cam"}``; ``irn``:
        ``{"keys": keys, "cam", "high_res"}``.
    """
    buf = io.BytesIO()
    hr = np.asarray(high_res, dtype=np.float32)
    k = np.asarray(keys, dtype=np.int64)
    if layout == "puzzlecam":
        d = {"keys": np.pad(k + 1, (1, 0), mode="constant"), "cam": hr[:, ::stride, ::stride].copy(),
             "hr_cam": hr}
    elif layout == "irn":
        d = {"keys": k, "cam": hr[:, ::stride, ::stride].copy(), "high_res": hr}
    else:
        raise InputError(f"layout must be 'puzzlecam' or 'irn', not {layout!r}")
    np.save(buf, np.asarray(d, dtype=object), allow_pickle=True)  # what np.save makes of a dict
    write_bytes(Path(path), buf.getvalue())


def load_cam_npy(path: str | os.PathLike) -> dict:
    """Load a CAM ``.npy`` dict as saved, with the restricted unpickler (nothing in it runs)."""
    from isle_fast.stores.formats import BadInput, load_pickle_npy

    try:
        obj = load_pickle_npy(path)
    except BadInput as exc:
        raise InputError(f"{path}: {exc}") from None
    if not isinstance(obj, dict):
        raise InputError(f"{path}: not a CAM dict (.npy of a pickled dict)")
    return obj


def save_cls_labels(path: str | os.PathLike, labels: Mapping[str, Sequence[int]],
                    num_classes: int = NUM_CLASSES) -> None:
    """Write image-level labels in the public ``cls_labels.npy`` form: a pickled dict id -> float32[C - 1].

    ``labels`` maps an image id to its foreground classes (1-based class indices).
    """
    out = {}
    for image_id, classes in labels.items():
        row = np.zeros(num_classes - 1, dtype=np.float32)
        row[np.asarray(list(classes), dtype=np.int64) - 1] = 1.0
        out[str(image_id)] = row
    buf = io.BytesIO()
    np.save(buf, np.asarray(out, dtype=object), allow_pickle=True)  # what np.save makes of a dict
    write_bytes(Path(path), buf.getvalue())


def cam_scores(cam: Mapping[str, np.ndarray], num_classes: int = NUM_CLASSES,
               bg_threshold: float | None = None) -> np.ndarray:
    """A CAM dict as an ``(H, W, C)`` float32 score stack.

    Parameters
    ----------
    cam : mapping
        ``{"keys": (K,), "high_res": (K, H, W)}`` as written by :func:`save_cam_npy`.
    num_classes : int
        C, background included.
    bg_threshold : float, optional
        The constant background slice; default :data:`CAM_BG_THRESHOLD` (0.15,
        IRN's ``cam_eval_thres`` and the default of :func:`isle_fast.stores.ingest.ingest_scores`,
        so a score store made here equals one ingested from ``cams/<set>``).

    Returns
    -------
    ndarray, (H, W, C), float32
        Absent classes are 0.
    """
    thr = CAM_BG_THRESHOLD if bg_threshold is None else float(bg_threshold)
    hr = np.asarray(cam["high_res"], dtype=np.float32)
    _, h, w = hr.shape
    out = np.zeros((h, w, num_classes), dtype=np.float32)
    out[..., 0] = thr
    for slot, key in enumerate(np.asarray(cam["keys"], dtype=np.int64)):
        out[..., int(key) + 1] = hr[slot]
    return out
