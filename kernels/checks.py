"""Argument checks of the kernel API, shared by :mod:`isle_fast.kernels.cpu` and :mod:`isle_fast.kernels.gpu`.

Pure NumPy on shapes, dtypes and small parameter tables (never on the pixels): both
backends reject the same arguments with the same :class:`ValueError` message, prefixed
with the function's name (``what``). ``host=True`` (the CPU kernels) also requires
NumPy arrays and returns them C-contiguous (a non-contiguous input is copied once);
the GPU kernels pass ``host=False`` and accept device arrays as they are.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "SCORE",
    "ORDER",
    "IGNORE",
    "SCORE_DTYPES",
    "check_classes",
    "check_gt",
    "check_sets",
    "check_label_sets",
    "check_score_sets",
    "check_score_dtype",
    "check_policy",
    "check_selection",
    "check_priority",
    "check_subsets",
    "threshold_value",
    "threshold_args",
    "confusion_score_bins_args",
    "confusion_score_bins_sparse_args",
    "confusion_labels_args",
    "confusion_scores_args",
    "decode_scores_args",
    "merge_labels_args",
    "merge_scores_args",
    "subset_confusion_labels_args",
    "subset_confusion_scores_args",
]

SCORE, ORDER, IGNORE = 0, 1, 2
SCORE_DTYPES = (np.dtype(np.uint8), np.dtype(np.float16), np.dtype(np.float32))


def _dtype(a: Any) -> np.dtype | None:
    try:
        return np.dtype(a.dtype)
    except (AttributeError, TypeError):
        return None


def check_classes(num_classes: Any, what: str) -> int:
    """C, background included: 1..255 (255 is the ignore label)."""
    C = int(num_classes)
    if not 1 <= C <= 255:
        raise ValueError(
            f"{what}: num_classes must be in [1, 255] (255 is the ignore label), got {num_classes}"
        )
    return C


def check_gt(gt: Any, what: str, host: bool) -> Any:
    """A uint8 ground truth (C-contiguous NumPy for ``host``)."""
    if host and not isinstance(gt, np.ndarray):
        raise ValueError(f"{what}: gt must be a uint8 NumPy array, not {type(gt).__name__}")
    if _dtype(gt) != np.uint8:
        raise ValueError(f"{what}: gt must be a uint8 array, got {getattr(gt, 'dtype', type(gt).__name__)}")
    return np.ascontiguousarray(gt) if host else gt


def check_sets(sets: Any, what: str, host: bool) -> tuple:
    """N >= 1 arrays given as a tuple or list (C-contiguous NumPy arrays for ``host``)."""
    if hasattr(sets, "shape") or not isinstance(sets, (tuple, list)):
        raise ValueError(f"{what}: sets must be a tuple or list of arrays, not {type(sets).__name__}")
    if len(sets) == 0:
        raise ValueError(f"{what}: sets is empty: need at least one set")
    out = []
    for n, s in enumerate(sets):
        if host and not isinstance(s, np.ndarray):
            raise ValueError(f"{what}: sets[{n}] must be a NumPy array, not {type(s).__name__}")
        if _dtype(s) is None or not hasattr(s, "shape"):
            raise ValueError(f"{what}: sets[{n}] must be an array, not {type(s).__name__}")
        out.append(np.ascontiguousarray(s) if host else s)
    return tuple(out)


def _same_shape_and_dtype(sets: tuple, shape: tuple[int, ...] | None, what: str) -> None:
    ref = tuple(sets[0].shape) if shape is None else tuple(shape)
    dt = _dtype(sets[0])
    for n, s in enumerate(sets):
        if _dtype(s) != dt:
            raise ValueError(
                f"{what}: sets[{n}] has dtype {_dtype(s)}, but sets[0] has {dt} (all must match)"
            )
        if tuple(s.shape) != ref:
            raise ValueError(f"{what}: sets[{n}] has shape {tuple(s.shape)}, expected {ref}")


def check_label_sets(sets: Any, shape: tuple[int, ...] | None, what: str, host: bool) -> tuple:
    """N uint8 label maps of ``shape`` (default: the shape of ``sets[0]``)."""
    sets = check_sets(sets, what, host)
    for n, s in enumerate(sets):
        if _dtype(s) != np.uint8:
            raise ValueError(f"{what}: sets[{n}] must be uint8 labels, got dtype {_dtype(s)}")
    _same_shape_and_dtype(sets, shape, what)
    return sets


def check_score_dtype(dtype: Any, what: str) -> np.dtype:
    """uint8, float16 or float32."""
    dt = np.dtype(dtype)
    if dt not in SCORE_DTYPES:
        raise ValueError(f"{what}: score dtype must be uint8, float16 or float32, not {dt}")
    return dt


def check_score_sets(
    sets: Any, shape: tuple[int, ...] | None, what: str, host: bool
) -> tuple[tuple, np.dtype]:
    """N score stacks of one score dtype and of ``shape`` (default: the shape of ``sets[0]``), and the dtype.

    Without ``shape`` the last (class) axis must hold 1..255 classes.
    """
    sets = check_sets(sets, what, host)
    dt = check_score_dtype(_dtype(sets[0]), what)
    _same_shape_and_dtype(sets, shape, what)
    full = tuple(sets[0].shape)
    if shape is None and (len(full) < 1 or not 1 <= full[-1] <= 255):
        raise ValueError(f"{what}: scores need a last (class) axis of length 1..255, got shape {full}")
    return sets, dt


def check_policy(policy: Any, what: str) -> int:
    """``SCORE`` (0), ``ORDER`` (1) or ``IGNORE`` (2)."""
    p = int(policy)
    if p not in (SCORE, ORDER, IGNORE):
        raise ValueError(f"{what}: policy must be SCORE (0), ORDER (1) or IGNORE (2), got {policy}")
    return p


def check_selection(selection: Any, C: int, N: int, first: int, what: str) -> np.ndarray:
    """``(C,)`` int64 selection whose entries ``first..C-1`` are set indices in ``[0, N)``."""
    sel = np.ascontiguousarray(np.asarray(selection, dtype=np.int64).reshape(-1))
    if sel.shape != (C,):
        raise ValueError(f"{what}: selection has {sel.size} entries, expected {C} (one per class)")
    body = sel[first:]
    if body.size and (body.min() < 0 or body.max() >= N):
        raise ValueError(
            f"{what}: selection entries must be set indices in [0, {N}); {sel.tolist()} "
            f"points outside the {N} sets"
        )
    return sel


def check_priority(priority: Any, N: int, C: int, what: str) -> np.ndarray:
    """``(N, C)`` float64 priorities."""
    prio = np.ascontiguousarray(np.asarray(priority, dtype=np.float64))
    if prio.shape != (N, C):
        raise ValueError(f"{what}: priority must have shape (N, C) = ({N}, {C}), got {prio.shape}")
    return prio


def check_subsets(
    selections: Any, members: Any, N: int, C: int, first: int, what: str
) -> tuple[np.ndarray, np.ndarray]:
    """``(S, C)`` int64 selections and ``(S, N)`` bool members: each subset has a member, and its
    selection (entries ``first..C-1``) points at its own members only."""
    sels = np.ascontiguousarray(np.asarray(selections, dtype=np.int64))
    mem = np.ascontiguousarray(np.asarray(members).astype(bool))
    if sels.ndim != 2 or sels.shape[1] != C:
        raise ValueError(f"{what}: selections must have shape (S, {C}), not {sels.shape}")
    if mem.shape != (sels.shape[0], N):
        raise ValueError(f"{what}: members must have shape (S, N) = ({sels.shape[0]}, {N}), not {mem.shape}")
    empty = np.flatnonzero(~mem.any(axis=1))
    if empty.size:
        raise ValueError(
            f"{what}: subset {empty[0]} has no member set: every subset needs at least one member"
        )
    body = sels[:, first:]
    out_of_range = np.flatnonzero(((body < 0) | (body >= N)).any(axis=1))
    if out_of_range.size:
        s = int(out_of_range[0])
        raise ValueError(
            f"{what}: selections entries must be set indices in [0, {N}); selections[{s}] is "
            f"{sels[s].tolist()}"
        )
    inside = np.take_along_axis(mem, body, axis=1) if body.size else np.ones(body.shape, bool)
    bad = np.flatnonzero(~inside.all(axis=1))
    if bad.size:
        s = int(bad[0])
        outside = sorted({int(v) for v in body[s][~inside[s]]})
        raise ValueError(
            f"{what}: selections[{s}] = {sels[s].tolist()} points at a set outside its subset "
            f"(members of subset {s}: {np.flatnonzero(mem[s]).tolist()}; outside subset {s}: "
            f"{outside})"
        )
    return sels, mem


def threshold_value(bg_threshold: float, dtype: Any) -> np.generic:
    """The background threshold as a value of the scores' dtype.

    ``uint8``: clipped to [0, 255] and truncated (compares against integer scores exactly like
    the real-valued threshold); ``float16`` / ``float32``: rounded to the nearest value (a
    threshold beyond float16's range is +inf).
    """
    dtype = np.dtype(dtype)
    if dtype == np.uint8:
        return np.uint8(np.floor(np.clip(float(bg_threshold), 0.0, 255.0)))
    with np.errstate(over="ignore"):
        return dtype.type(bg_threshold)


def threshold_args(bg_threshold: float | None, dtype: Any) -> tuple[bool, float, np.generic]:
    """(use, the threshold as float64, the threshold in the kernels' element dtype) for a score dtype.

    A threshold is used when it is ``>= 0`` (None, NaN or negative: off). The element dtype
    of float16 scores is their uint16 bit pattern.
    """
    dtype = np.dtype(dtype)
    use = bg_threshold is not None and float(bg_threshold) >= 0
    v = threshold_value(bg_threshold if use else 0.0, dtype)  # type: ignore[arg-type]
    raw = v.view(np.uint16) if dtype == np.float16 else v
    return use, float(v) if use else 0.0, raw


# -- the arguments of each kernel, checked in one call ------------------------------------------


def confusion_labels_args(gt: Any, sets: Any, num_classes: Any, host: bool) -> tuple[Any, tuple, int]:
    """``confusion_labels``: (gt, sets, C)."""
    what = "confusion_labels"
    C = check_classes(num_classes, what)
    gt = check_gt(gt, what, host)
    return gt, check_label_sets(sets, tuple(gt.shape), what, host), C


def confusion_scores_args(
    gt: Any, sets: Any, num_classes: Any, bg_threshold: float | None, host: bool
) -> tuple[Any, tuple, int, np.dtype, tuple[bool, float, np.generic]]:
    """``confusion_scores``: (gt, sets, C, score dtype, :func:`threshold_args`)."""
    what = "confusion_scores"
    C = check_classes(num_classes, what)
    gt = check_gt(gt, what, host)
    sets, dt = check_score_sets(sets, tuple(gt.shape) + (C,), what, host)
    return gt, sets, C, dt, threshold_args(bg_threshold, dt)


def confusion_score_bins_args(gt: Any, sets: Any, num_classes: Any, host: bool) -> tuple[Any, tuple, int]:
    """``confusion_score_bins``: (gt, sets, C); the sets must be ``uint8`` (the bins are its 256 levels)."""
    what = "confusion_score_bins"
    C = check_classes(num_classes, what)
    gt = check_gt(gt, what, host)
    sets, dt = check_score_sets(sets, tuple(gt.shape) + (C,), what, host)
    if dt != np.uint8:
        raise ValueError(f"{what}: score sets must be uint8 (one bin per stored level), not {dt}")
    return gt, sets, C


def confusion_score_bins_sparse_args(gt: Any, cams: Any, keys: Any, num_classes: Any, host: bool
                                     ) -> tuple[Any, tuple, tuple, int]:
    """``confusion_score_bins_sparse``: (gt ``(n, h, w)``, cams ``(n, h, w, K_s)``, keys ``(n, K_s)``, C)."""
    what = "confusion_score_bins_sparse"
    C = check_classes(num_classes, what)
    gt = check_gt(gt, what, host)
    if gt.ndim != 3:
        raise ValueError(f"{what}: gt must be (images, H, W), not shape {tuple(gt.shape)}")
    cams = check_sets(cams, what, host)
    keys = check_sets(keys, what, host)
    if len(keys) != len(cams):
        raise ValueError(f"{what}: {len(cams)} cams arrays but {len(keys)} keys arrays")
    for n, (a, k) in enumerate(zip(cams, keys)):
        if a.dtype != np.uint8 or k.dtype != np.uint8:
            raise ValueError(f"{what}: set {n}: cams and keys must be uint8, not {a.dtype} / {k.dtype}")
        if a.ndim != 4 or tuple(a.shape[:3]) != tuple(gt.shape):
            raise ValueError(f"{what}: set {n}: cams of shape {tuple(a.shape)} do not match gt "
                             f"{tuple(gt.shape)}")
        if tuple(k.shape) != (a.shape[0], a.shape[3]):
            raise ValueError(f"{what}: set {n}: keys of shape {tuple(k.shape)}; expected "
                             f"{(a.shape[0], a.shape[3])}")
        if host and k.size and int(k.max()) >= C:
            raise ValueError(f"{what}: set {n}: a key >= {C} classes")
    return gt, cams, keys, C


def decode_scores_args(
    scores: Any, bg_threshold: float | None, host: bool
) -> tuple[Any, int, np.dtype, tuple[bool, float, np.generic]]:
    """``decode_scores``: (scores, C, score dtype, :func:`threshold_args`)."""
    (scores,), dt = check_score_sets((scores,), None, "decode_scores", host)
    return scores, int(tuple(scores.shape)[-1]), dt, threshold_args(bg_threshold, dt)


def merge_labels_args(
    sets: Any, selection: Any, priority: Any, policy: Any, host: bool
) -> tuple[tuple, int, np.ndarray, int, np.ndarray]:
    """``merge_labels``: (sets, C, selection (C,), policy, priority (N, C))."""
    what = "merge_labels"
    sets = check_label_sets(sets, None, what, host)
    C = check_classes(np.asarray(selection).size, what)
    sel = check_selection(selection, C, len(sets), 1, what)
    pol = check_policy(policy, what)
    return sets, C, sel, pol, check_priority(priority, len(sets), C, what)


def merge_scores_args(
    sets: Any, selection: Any, policy: Any, bg_threshold: float | None, host: bool
) -> tuple[tuple, int, np.ndarray, int, np.dtype, tuple[bool, float, np.generic]]:
    """``merge_scores``: (sets, C, selection (C,), policy, score dtype, :func:`threshold_args`)."""
    what = "merge_scores"
    sets, dt = check_score_sets(sets, None, what, host)
    C = int(tuple(sets[0].shape)[-1])
    sel = check_selection(selection, C, len(sets), 0, what)
    pol = check_policy(policy, what)
    return sets, C, sel, pol, dt, threshold_args(bg_threshold, dt)


def subset_confusion_labels_args(
    gt: Any,
    sets: Any,
    selections: Any,
    members: Any,
    priority: Any,
    policy: Any,
    num_classes: Any,
    host: bool,
) -> tuple[Any, tuple, int, np.ndarray, np.ndarray, int, np.ndarray]:
    """``subset_confusion_labels``: (gt, sets, C, selections (S, C), members (S, N), policy, priority)."""
    what = "subset_confusion_labels"
    C = check_classes(num_classes, what)
    gt = check_gt(gt, what, host)
    sets = check_label_sets(sets, tuple(gt.shape), what, host)
    sels, mem = check_subsets(selections, members, len(sets), C, 1, what)
    pol = check_policy(policy, what)
    return gt, sets, C, sels, mem, pol, check_priority(priority, len(sets), C, what)


def subset_confusion_scores_args(
    gt: Any,
    sets: Any,
    selections: Any,
    members: Any,
    policy: Any,
    num_classes: Any,
    bg_threshold: float | None,
    host: bool,
) -> tuple[Any, tuple, int, np.ndarray, np.ndarray, int, np.dtype, tuple[bool, float, np.generic]]:
    """``subset_confusion_scores``: (gt, sets, C, selections, members, policy, score dtype, threshold)."""
    what = "subset_confusion_scores"
    C = check_classes(num_classes, what)
    gt = check_gt(gt, what, host)
    sets, dt = check_score_sets(sets, tuple(gt.shape) + (C,), what, host)
    sels, mem = check_subsets(selections, members, len(sets), C, 0, what)
    pol = check_policy(policy, what)
    return gt, sets, C, sels, mem, pol, dt, threshold_args(bg_threshold, dt)


#: most sets :func:`vote_patterns` counts the joint votes of (2**N patterns per class)
MAX_VOTE_SETS = 12


def vote_context_args(sets: Any, gt: Any, num_classes: Any, radii: Any
                      ) -> tuple[np.ndarray, np.ndarray, int, np.ndarray]:
    """``vote_context``: (the sets stacked ``(N, H, W)``, gt ``(H, W)`` or empty, C, radii int64).

    1..MAX_VOTE_SETS label maps of one 2-D shape; ``gt`` None or uint8 of that shape; ``radii`` one or
    more increasing pixel distances >= 0.
    """
    what = "vote_context"
    C = check_classes(num_classes, what)
    sets = check_label_sets(sets, None, what, True)
    if len(sets) > MAX_VOTE_SETS:
        raise ValueError(f"{what}: at most {MAX_VOTE_SETS} sets, got {len(sets)}")
    if np.ndim(sets[0]) != 2:
        raise ValueError(f"{what}: the sets must be 2-D label maps (one image), not shape {np.shape(sets[0])}")
    labs = np.ascontiguousarray(np.stack(sets))
    if gt is None:
        g = np.zeros((0, 0), np.uint8)
    else:
        g = np.ascontiguousarray(gt)
        if g.dtype != np.uint8 or g.shape != labs.shape[1:]:
            raise ValueError(f"{what}: gt must be uint8 of shape {labs.shape[1:]}, not {g.dtype} {g.shape}")
    r = np.asarray(radii, dtype=np.int64).ravel()
    if r.size < 1 or (r < 0).any() or (np.diff(r) <= 0).any():
        raise ValueError(f"{what}: radii must be one or more increasing distances >= 0, not {list(r)}")
    return labs, g, C, np.ascontiguousarray(r)


def vote_patterns_args(sets: Any, num_classes: Any, host: bool) -> tuple[tuple, int]:
    """``vote_patterns``: (sets, C); 1..MAX_VOTE_SETS label maps of one shape."""
    what = "vote_patterns"
    C = check_classes(num_classes, what)
    sets = check_label_sets(sets, None, what, host)
    if len(sets) > MAX_VOTE_SETS:
        raise ValueError(f"{what}: at most {MAX_VOTE_SETS} sets, got {len(sets)}")
    return sets, C


def sparse_set_args(gt_shape: tuple[int, ...], cams: Any, keys: Any, shapes: Any, C: int, what: str
                    ) -> tuple[tuple, tuple, np.ndarray]:
    """Class-sparse sets of one block: (cams ``(n, h, w, K_s)`` uint8, keys ``(n, K_s)`` uint8, shapes ``(n, 2)``).

    ``shapes`` (int64) are the rows and columns of every image inside the block (clipped to it);
    None: the whole block.
    """
    cams = check_sets(cams, what, True)
    keys = check_sets(keys, what, True)
    if len(keys) != len(cams):
        raise ValueError(f"{what}: {len(cams)} cams arrays but {len(keys)} keys arrays")
    for n, (a, k) in enumerate(zip(cams, keys)):
        if a.dtype != np.uint8 or k.dtype != np.uint8:
            raise ValueError(f"{what}: set {n}: cams and keys must be uint8, not {a.dtype} / {k.dtype}")
        if a.ndim != 4 or tuple(a.shape[:3]) != tuple(gt_shape):
            raise ValueError(f"{what}: set {n}: cams of shape {tuple(a.shape)} do not match {tuple(gt_shape)}")
        if tuple(k.shape) != (a.shape[0], a.shape[3]):
            raise ValueError(f"{what}: set {n}: keys of shape {tuple(k.shape)}; expected {(a.shape[0], a.shape[3])}")
        if k.size and int(k.max()) >= C:
            raise ValueError(f"{what}: set {n}: a key >= {C} classes")
    n_img, h, w = (int(v) for v in gt_shape)
    if shapes is None:
        sh = np.empty((n_img, 2), np.int64)
        sh[:, 0], sh[:, 1] = h, w
    else:
        sh = np.asarray(shapes)
        if sh.shape != (n_img, 2) or not np.issubdtype(sh.dtype, np.integer):
            raise ValueError(f"{what}: shapes must be ({n_img}, 2) integers, not {sh.dtype} {sh.shape}")
        sh = np.clip(sh.astype(np.int64), 0, [h, w])
    cams = tuple(np.ascontiguousarray(a) for a in cams)
    keys = tuple(np.ascontiguousarray(k) for k in keys)
    return cams, keys, np.ascontiguousarray(sh)


def level_bins_args(level_bins: Any, N: int, what: str) -> tuple[np.ndarray, int]:
    """``(N, 256)`` bin of every stored level per set (non-decreasing, from 0): (the table, bins)."""
    lb = np.asarray(level_bins)
    if lb.shape != (N, 256) or not np.issubdtype(lb.dtype, np.integer):
        raise ValueError(f"{what}: level_bins must be ({N}, 256) integers, not {lb.dtype} {lb.shape}")
    if lb.size and (lb.min() < 0 or lb.max() > 255 or (np.diff(lb.astype(np.int64), axis=1) < 0).any()
                    or (lb[:, 0] != 0).any()):
        raise ValueError(f"{what}: level_bins rows must be non-decreasing integers in 0..255 starting at 0")
    return np.ascontiguousarray(lb, dtype=np.uint8), (int(lb.max()) + 1 if lb.size else 1)


def levels_args(levels: Any, N: int, what: str) -> np.ndarray:
    """``(N,)`` stored uint8 level per set that a foreground score must exceed."""
    lv = np.asarray(levels)
    if lv.shape != (N,) or not np.issubdtype(lv.dtype, np.integer) or (lv.size and (lv.min() < 0 or lv.max() > 255)):
        raise ValueError(f"{what}: levels must be {N} integers in 0..255, not {lv.dtype} {lv.shape}")
    return np.ascontiguousarray(lv, dtype=np.int64)
