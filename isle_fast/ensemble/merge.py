"""ISLE step 3: build the ensemble store from the per-class selection (the paper's Algorithm 3).

``strategy="class"`` (the paper's ISLE): for every image, class slice ``c``
comes from the set chosen for ``c``; background is what no chosen slice
claims.

* Label-map sets (or a mix of label and score sets; score sets are decoded
  first) go through the ``merge_labels`` kernel. Where several chosen slices
  claim one pixel, the **policy** decides: ``score`` (default) the claim of the
  set with the higher IoU on its class wins, ``order`` the set given first
  wins, ``ignore`` marks the pixel 255. A pixel no chosen slice claims is
  background (0), or 255 when every set abstains there.
* When every set is a score stack, the ``merge_scores`` kernel builds the
  paper's concatenated stack ``ps*`` (slice ``c`` from the set chosen for
  ``c``, the background slice from the set best on background) and the
  labels: class ``c`` claims a pixel when its slice beats the background
  slice; several claims are resolved by the policy (``score`` = argmax of the
  merged stack). The ensemble then also holds the merged stack as a second
  array named ``scores`` (provenance ``scores_array``). Score sets of
  different dtypes are merged as float32 in [0, 1]. When every set is
  class-sparse (and the merge takes the slot pass below) the merged stack is
  stored class-sparse too (``layout``; provenance ``scores_layout``): per image
  the classes its chosen sets hold, as slots ``scores_cams`` and keys
  ``scores_keys``, and one background level (:func:`ensemble_scores` gives
  its dense view, equal to the dense ``scores``).

``strategy="image"`` (the paper's naive variant): classes are ranked by their
number of instances in the training set, counted as the number of images
that contain the class (ties: lower class index first). For each image, the
image-level labels are the foreground classes present in its gt, or, when
``image_labels`` are given, those labels (WSSS's real supervision); the image
takes the WHOLE prediction of the set chosen for its top-ranked present
class. An image with no foreground class takes the set with the best mIoU
(ties: first set).

``image_labels`` (either strategy): claims of classes absent from an image's
image-level labels are dropped before merging, as WSSS pipelines do (their
CAMs exist only for the labelled classes): in a label-map set such a pixel
becomes background (no claim), in a score set the class's slice becomes 0,
so the pixel goes to the best labelled class or background. The selection
itself uses the sets' own scores (the evaluation is unchanged). A class in
the labels but absent from the gt (818 of VOC's 12,031 images) changes
nothing but the ranking of the image strategy.

Outside each image's true shape the labels are 255 (scores 0). The output is
written chunk by chunk (one task per gt chunk writes its own region of the
new store) into a temporary store that is renamed into place on success, so
peak memory is a few chunks however large the data set is. When every store
is local and chunked like the gt (and the sets are label maps, or all
class-sparse score sets merged as scores: the slots each class chooses are
gathered into the merged stack, no member's dense view is made), the tasks run
on a thread pool of this process with direct chunk reads and writes
(:func:`_local_merge`, as :func:`isle_fast.ensemble.evaluate.local_pass`);
otherwise as a Dask graph. Both run :func:`merge_chunk` on the same regions.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Sequence

import numpy as np

from isle_fast.ensemble.evaluate import Evaluation, check_bg_threshold, evaluate, score_threshold
from isle_fast.ensemble.graph import (
    aligned_arrays,
    blockwise_args,
    local_specs,
    open_inputs,
    unique_names,
    work_chunks,
)
from isle_fast.ensemble.selection import Selection, select
from isle_fast.errors import InputError, param
from isle_fast.metrics import jsonable
from isle_fast.outputs import check_output
from isle_fast.stores.stack import WRITE_EVERY_CHUNK, Stack, create_stack, default_compressors

__all__ = ["POLICIES", "STRATEGIES", "MergePlan", "MergeResult", "merge", "merge_images",
           "make_plan", "image_choice", "gt_presence", "ensemble_scores", "drop_absent_claims"]

POLICIES = {"score": 0, "order": 1, "ignore": 2}
STRATEGIES = ("class", "image")


def policy_code(policy: str) -> int:
    """The merge kernels' code of a tie ``policy`` (:data:`POLICIES`); :class:`InputError` if unknown."""
    if policy not in POLICIES:
        raise InputError(f"{param('policy')} must be one of {', '.join(POLICIES)}, not {policy!r}")
    return POLICIES[policy]


@dataclass(frozen=True)
class MergePlan:
    """Everything a merge task needs besides the data (picklable, small).

    ``mode`` is ``'scores'`` when every member set is a score stack (the
    merged stack is written too), else ``'labels'``. ``thresholds`` are the
    background thresholds per member set in the units the kernel sees.
    """

    mode: str
    strategy: str
    encodings: tuple[str, ...]
    scales: tuple[float, ...]
    cast: bool
    selection: tuple[int, ...]
    priority: tuple[tuple[float, ...], ...]
    policy: int
    thresholds: tuple[float, ...]
    num_classes: int
    #: claims of classes absent from an image's image-level labels are dropped (``allowed`` rows given)
    drop_absent: bool = False


def make_plan(stacks: Sequence[Stack], selection: Selection, *, policy: str = "score",
              strategy: str = "class", bg_threshold: float | None = None,
              drop_absent: bool = False, set_thresholds: Sequence[float | None] | None = None) -> MergePlan:
    """The :class:`MergePlan` for the member sets of ``selection`` (``stacks`` = all evaluated sets).

    ``set_thresholds`` (one [0, 1] threshold or None per set of ``stacks``, e.g. each set's best
    threshold, :class:`isle_fast.ensemble.sweep.ThresholdSweep`) replaces ``bg_threshold``: where the
    member score sets' thresholds differ, each set is decoded at its own threshold and the label
    maps are merged (mode ``'labels'``); where they are all one value, that is ``bg_threshold``.
    """
    if strategy not in STRATEGIES:
        raise InputError(f"{param('strategy')} must be one of {', '.join(STRATEGIES)}, not {strategy!r}")
    code = policy_code(policy)
    members = [stacks[i] for i in selection.member_indices]
    encodings = tuple(s.encoding for s in members)
    mode = "scores" if all(e == "scores" for e in encodings) else "labels"
    kinds = {(str(s.dtype), s.score_scale) for s in members if s.encoding == "scores"}
    cast = mode == "scores" and len(kinds) > 1
    if set_thresholds is not None:
        own = [set_thresholds[i] for i in selection.member_indices]
        used = {t for t, s in zip(own, members) if s.encoding == "scores"}
        if len(used) <= 1:
            bg_threshold = next(iter(used), None)
        else:
            mode, cast = "labels", False
            return MergePlan(
                mode=mode, strategy=strategy, encodings=encodings,
                scales=tuple(float(s.score_scale) for s in members), cast=cast,
                selection=tuple(int(v) for v in selection.kernel_selection()),
                priority=tuple(tuple(float(v) for v in row) for row in selection.priority()),
                policy=code, thresholds=tuple(score_threshold(s, t) if s.encoding == "scores" else -1.0
                                              for s, t in zip(members, own)),
                num_classes=len(selection.classes), drop_absent=bool(drop_absent))
    if cast:
        thr = -1.0 if bg_threshold is None or bg_threshold < 0 else float(bg_threshold)
        thresholds = tuple(thr for _ in members)
    else:
        thresholds = tuple(score_threshold(s, bg_threshold) if s.encoding == "scores" else -1.0
                           for s in members)
    return MergePlan(
        mode=mode, strategy=strategy, encodings=encodings,
        scales=tuple(float(s.score_scale) for s in members), cast=cast,
        selection=tuple(int(v) for v in selection.kernel_selection()),
        priority=tuple(tuple(float(v) for v in row) for row in selection.priority()),
        policy=code, thresholds=thresholds, num_classes=len(selection.classes), drop_absent=bool(drop_absent),
    )


def _gather(arrays: Sequence[np.ndarray], choice: np.ndarray | None) -> np.ndarray:
    if choice is None:
        raise ValueError("the image strategy needs the member chosen for every image (choice)")
    out = np.empty_like(arrays[0])
    for m, n in enumerate(choice):
        out[m] = arrays[int(n)][m]
    return out


def drop_absent_claims(block: np.ndarray, encoding: str, allowed: np.ndarray) -> np.ndarray:
    """A copy of ``block`` (images x rows x cols [x C]) without claims of classes ``allowed`` rules out.

    ``allowed`` is ``(images, C)`` bool (column 0, background, is always
    allowed). Label maps: a pixel of a disallowed class becomes 0 (background:
    no claim); 255 stays. Scores: the slices of disallowed classes become 0.
    """
    allowed = np.asarray(allowed, dtype=bool).copy()
    allowed[:, 0] = True
    if encoding == "labels":
        c = allowed.shape[1]
        out = np.empty_like(block)
        for m in range(block.shape[0]):
            lut = np.arange(256, dtype=np.uint8)
            lut[:c][~allowed[m]] = 0
            out[m] = lut[block[m]]
        return out
    return block * allowed[:, None, None, :].astype(block.dtype)


def _sparse_labels(block: tuple[np.ndarray, np.ndarray], level: int, C: int,
                   shapes: np.ndarray | None) -> np.ndarray:
    """The label map of a class-sparse block ``(cams, keys)`` decoded at the stored ``level``."""
    from isle_fast.kernels import cpu

    one = np.zeros(C, np.int64)  # set 0 chosen for every class: the merge of one set is its decode
    return cpu.merge_sparse_labels(block[:1], block[1:], [level], one, np.ones((1, C)), POLICIES["order"], shapes)


def _drop_absent_sparse(block: tuple[np.ndarray, np.ndarray], allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`drop_absent_claims` of a class-sparse block: the slots of disallowed classes become 0."""
    cams, keys = block
    allowed = np.asarray(allowed, dtype=bool).copy()
    allowed[:, 0] = True
    keep = allowed[np.arange(keys.shape[0])[:, None], keys]  # (images, K); unused slots (key 0) are kept
    return cams * keep[:, None, None, :].astype(np.uint8), keys


def _gather_sparse_scores(blocks: Sequence[tuple[np.ndarray, np.ndarray]], sel: np.ndarray, C: int,
                          background: int) -> np.ndarray:
    """The merged ``(n, h, w, C)`` uint8 stack of class-sparse blocks ``(cams, keys)``: slice ``c`` is the
    slot of class ``c`` in set ``sel[c]`` (0 where that image has no such slot), slice 0 ``background``.

    Equal to gathering slice ``c`` of set ``sel[c]``'s dense view (:func:`isle_fast.stores.sparse.densify`);
    only the chosen slots are copied (1-3 an image for CAMs), not N dense blocks.
    """
    cams0 = blocks[0][0]
    n, h, w = cams0.shape[:3]
    out = np.zeros((n, h, w, C), np.uint8)
    out[..., 0] = background
    for s, (cams, keys) in enumerate(blocks):
        for m in range(n):
            for j in range(keys.shape[1]):
                c = int(keys[m, j])
                if 0 < c < C and int(sel[c]) == s:
                    out[m, :, :, c] = cams[m, :, :, j]
    return out


def sparse_scores_chunk(K: Any, plan: MergePlan, blocks: Sequence[tuple[np.ndarray, np.ndarray]],
                        keys: np.ndarray, level: int, allowed: np.ndarray | None = None
                        ) -> tuple[np.ndarray, np.ndarray]:
    """:func:`merge_chunk` of class-sparse blocks ``(cams, keys)`` (score plan, class strategy) with the
    merged stack as its slots: ``(labels, slots (n, h, w, K))`` for the ensemble's ``keys`` ``(n, K)``.

    Each image is merged on its own compact stack (the background ``level``, then the chosen set's slot
    of every class in ``keys``): the ``merge_scores`` kernel's decisions depend on the classes only
    through their order and their chosen sets (ascending keys keep both), and a class held by no chosen
    set is 0, which claims no pixel; so the labels equal :func:`merge_chunk`'s, and the slots its stack's.
    """
    sel = np.asarray(plan.selection, dtype=np.int64)
    blocks = [(np.ascontiguousarray(b[0]), np.ascontiguousarray(b[1])) for b in blocks]
    if plan.drop_absent:
        if allowed is None:
            raise ValueError("the plan drops absent classes but no image labels were given")
        blocks = [_drop_absent_sparse(b, allowed) for b in blocks]
    n, h, w = blocks[0][0].shape[:3]
    k = keys.shape[1]
    labels = np.empty((n, h, w), np.uint8)
    slots = np.empty((n, h, w, k), np.uint8)
    for m in range(n):
        compact = np.zeros((1, h, w, k + 1), np.uint8)
        compact[..., 0] = level
        csel = np.zeros(k + 1, np.int64)
        csel[0] = sel[0]
        lut = np.full(256, 255, np.uint8)
        lut[0] = 0
        for j in range(k):
            c = int(keys[m, j])
            if not c:
                continue
            s = int(sel[c])
            csel[j + 1] = s
            lut[j + 1] = c
            cams, ks = blocks[s]
            hit = np.flatnonzero(ks[m] == c)
            if hit.size:
                compact[0, :, :, j + 1] = cams[m, :, :, int(hit[0])]
        lab, sc = K.merge_scores((compact,) * len(blocks), csel, plan.policy, -1.0)
        labels[m] = lut[np.asarray(lab)[0]]
        slots[m] = np.asarray(sc)[0, :, :, 1:]
    return labels, slots


def merge_chunk(K: Any, plan: MergePlan, blocks: Sequence[Any],
                choice: np.ndarray | None = None,
                allowed: np.ndarray | None = None, sparse_levels: Sequence[int | None] | None = None,
                shapes: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Merge one aligned region of the member sets: ``(labels, merged scores or None)``.

    ``choice`` (image strategy): the member position chosen for every image of the region.
    ``allowed`` (``plan.drop_absent``): ``(images, C)`` image-level labels of the region's images.
    A class-sparse member's block is its ``(cams, keys)`` (the local pass, labels mode), decoded at
    ``sparse_levels[n]`` (its stored threshold level, or its store's background level); when every
    member is one, the class strategy runs :func:`isle_fast.kernels.cpu.merge_sparse_labels` (decode
    and merge in one sweep; ``shapes``: each image's rows and columns in the region, the rest 255).
    """
    sel = np.asarray(plan.selection, dtype=np.int64)
    blocks = [tuple(np.ascontiguousarray(x) for x in b) if isinstance(b, tuple) else np.ascontiguousarray(b)
              for b in blocks]
    sparse = [isinstance(b, tuple) for b in blocks]
    scores_sparse = plan.mode == "scores" and all(sparse) and plan.strategy == "class" and not plan.cast
    if any(sparse) and (sparse_levels is None or (plan.mode != "labels" and not scores_sparse)):
        raise ValueError("class-sparse blocks are merged as label maps at their levels (sparse_levels), or "
                         "all of them as score stacks (class strategy, one dtype)")
    blocks = _absent_claims_dropped(plan, blocks, allowed)
    if plan.mode == "labels":
        prio = np.asarray(plan.priority, dtype=np.float64)
        if all(sparse) and plan.strategy == "class":
            from isle_fast.kernels import cpu

            lv = [int(v) for v in (sparse_levels or ()) if v is not None]
            return cpu.merge_sparse_labels(tuple(b[0] for b in blocks), tuple(b[1] for b in blocks),
                                           lv, sel, prio, plan.policy, shapes), None
        labs = [_sparse_labels(b, int(sparse_levels[n] or 0), plan.num_classes, shapes)  # type: ignore[index]
                if sp else b if e == "labels" else np.asarray(K.decode_scores(b, t))
                for n, (b, e, t, sp) in enumerate(zip(blocks, plan.encodings, plan.thresholds, sparse))]
        if plan.strategy == "image":
            return _gather(labs, choice), None
        return np.asarray(K.merge_labels(tuple(labs), sel, prio, plan.policy)), None
    thr = plan.thresholds[0]
    if scores_sparse:  # the chosen slots gathered into the merged stack: no member's dense block is made
        lv0 = (sparse_levels or [0])[int(sel[0])] if sparse_levels else 0
        merged = _gather_sparse_scores(blocks, sel, plan.num_classes, int(lv0 or 0))
        # every member is the merged stack: merge_scores then gathers it unchanged and applies the policy
        lab, sc = K.merge_scores((merged,) * len(blocks), sel, plan.policy, thr)
        return np.asarray(lab), np.asarray(sc)
    arrs = ([(b.astype(np.float32) / np.float32(s)) for b, s in zip(blocks, plan.scales)]
            if plan.cast else blocks)
    if plan.strategy == "image":
        sc = _gather(arrs, choice)
        if thr >= 0:
            sc[..., 0] = thr
        return np.asarray(K.decode_scores(sc, -1.0)), sc
    lab, sc = K.merge_scores(tuple(arrs), sel, plan.policy, thr)
    return np.asarray(lab), np.asarray(sc)


def _absent_claims_dropped(plan: MergePlan, blocks: Sequence[Any], allowed: np.ndarray | None) -> list[Any]:
    """``blocks`` with the claims of classes an image's labels rule out made 0 (``plan.drop_absent``),
    class-sparse ``(cams, keys)`` blocks included; ``blocks`` as they are otherwise."""
    if not plan.drop_absent:
        return list(blocks)
    if allowed is None:
        raise ValueError("the plan drops absent classes but no image labels were given")
    return [_drop_absent_sparse(b, allowed) if isinstance(b, tuple) else drop_absent_claims(b, e, allowed)
            for b, e in zip(blocks, plan.encodings)]


def merge_chunk_counted(K: Any, plan: MergePlan, blocks: Sequence[Any], gt: np.ndarray, shapes: np.ndarray,
                        allowed: np.ndarray | None = None, per_image: bool = False
                        ) -> tuple[np.ndarray, np.ndarray] | None:
    """:func:`merge_chunk` of a plain label merge, counted against ``gt`` in the same kernel pass.

    ``(labels, counts)``: the labels as :func:`merge_chunk` makes them with the padding outside each
    image's ``shapes`` (rows, columns in the region) 255, and their counts against ``gt`` as
    ``confusion_labels_images`` gives them (``(1, C, C + 1)``; per image ``(images, C, C + 1)``).
    None where the merge is another (score plans, the image strategy, class-sparse or score
    members, a kernel module without ``merge_count_images``): merge, then count, instead.
    """
    fused = getattr(K, "merge_count_images", None)
    if (fused is None or plan.mode != "labels" or plan.strategy != "class"
            or any(e != "labels" for e in plan.encodings) or any(isinstance(b, tuple) for b in blocks)):
        return None
    blocks = [np.ascontiguousarray(b) for b in blocks]
    if any(b.ndim != 3 for b in blocks) or gt.shape != blocks[0].shape:
        return None
    blocks = _absent_claims_dropped(plan, blocks, allowed)
    lab, counts = fused(tuple(blocks), np.ascontiguousarray(gt), shapes, np.asarray(plan.selection, dtype=np.int64),
                        np.asarray(plan.priority, dtype=np.float64), plan.policy, per_image=per_image)
    return lab, counts[:, 0] if per_image else counts


def _fill_padding(a: np.ndarray, shapes: np.ndarray, row0: int, col0: int, value: Any) -> int:
    """Set ``a`` (images x rows x cols [x C]) outside each image's true shape to ``value``, in place.

    ``row0, col0``: where the region starts in the padded image. Touches only the
    padding (no full-size mask). Returns the number of pixels inside the images.
    """
    rows, cols = a.shape[1], a.shape[2]
    inside = 0
    for m in range(a.shape[0]):
        h = min(rows, max(0, int(shapes[m, 0]) - row0))
        w = min(cols, max(0, int(shapes[m, 1]) - col0))
        a[m, h:] = value
        a[m, :h, w:] = value
        inside += h * w
    return inside


def _merge_block(idx_i: np.ndarray, idx_j: np.ndarray, idx_k: np.ndarray, shapes: np.ndarray,
                 choice: np.ndarray, allowed: np.ndarray, *blocks: np.ndarray, backend: str, plan: MergePlan,
                 labels_target: Any, scores_target: Any) -> np.ndarray:
    """Merge one gt chunk's region and write it into the new store; returns ``(1, 1, 1)`` pixel count."""
    from isle_fast.backend import task_kernels

    with task_kernels(backend) as K:
        lab, sc = merge_chunk(K, plan, blocks, choice, allowed if plan.drop_absent else None)
        lab = np.require(lab, np.uint8, ["C", "W"])
        row0, col0 = int(idx_j[0]), int(idx_k[0])
        inside = _fill_padding(lab, shapes, row0, col0, 255)
        region = (slice(int(idx_i[0]), int(idx_i[-1]) + 1), slice(row0, int(idx_j[-1]) + 1),
                  slice(col0, int(idx_k[-1]) + 1))
        labels_target[region] = lab
        if scores_target is not None and sc is not None:
            sc = np.require(sc, None, ["C", "W"])
            _fill_padding(sc, shapes, row0, col0, 0)
            scores_target[region + (slice(None),)] = sc
        return np.full((1, 1, 1), inside, dtype=np.int64)


def _local_merge_task(specs: Sequence[Any], out_spec: Any, tails: Sequence[tuple], block: tuple[int, int, int],
                      region: tuple[int, int, int], shapes: np.ndarray, choice: np.ndarray,
                      allowed: np.ndarray | None, *, backend: str, plan: MergePlan,
                      each_chunk: Callable[[tuple[int, int, int], np.ndarray], None] | None = None,
                      sparse_keys: Sequence[np.ndarray | None] = (),
                      sparse_levels: Sequence[int | None] | None = None, scores_spec: Any = None,
                      scores_keys: np.ndarray | None = None, scores_level: int = 0, counter: Any = None) -> int:
    """One gt chunk on the local pass: read the members' chunks, merge, write the ensemble chunk.

    ``shapes``, ``choice`` and ``allowed`` are the rows of the chunk's images only (a task sent to a
    cluster worker carries its own images' rows, not the data set's). ``each_chunk(start, labels)``,
    when given, is then called with the chunk as written (``start``: its first ``(image, row,
    column)``; ``labels``: the region, padding = 255). A member with ``sparse_keys[n]`` (the data
    set's keys) is class-sparse: its block is its stored slots with those keys' rows. ``scores_spec``
    (a score ensemble of class-sparse members): the merged stack's chunk is written there too (padding 0);
    with ``scores_keys`` (the ensemble's ``(I, K)`` keys) as its slots, merged by :func:`sparse_scores_chunk`
    at the background level ``scores_level``. ``counter`` (a
    :class:`~isle_fast.ensemble.evaluate.ChunkCounts` of the gt): the chunk is counted into it, in the
    merge kernel's pass where :func:`merge_chunk_counted` takes the plan (else after the merge).
    """
    from isle_fast.backend import task_kernels
    from isle_fast.stores.chunkio import read_kept, write_chunk

    i, j, l = block
    k, hc, wc = (int(v) for v in out_spec.chunk_shape)
    i0 = i * k
    blocks: list[Any] = []
    for n, (sp, t) in enumerate(zip(specs, tails)):
        # into this thread's kept buffer of the same read slot as the evaluation's (gt 0, sets 1..):
        # a merge after an evaluate in the same worker needs no memory of its own for its reads, no
        # fresh chunk-size arrays that the allocator keeps after the task (a memory-limited cluster
        # worker paused over them) and no page faults; merge_chunk copies before it changes anything
        b = read_kept(sp, block + (0,) * len(t), region + t, ("chunk", 1 + n))
        km = sparse_keys[n] if n < len(sparse_keys) else None
        blocks.append(b if km is None else (b, km[i0:i0 + region[0]]))
    inside = np.clip(shapes - np.array([j * hc, l * wc], np.int64), 0,
                     np.array(region[1:], np.int64))
    start = (i0, j * hc, l * wc)
    counted = None
    with task_kernels(backend) as K:
        if counter is not None and scores_keys is None and int(plan.num_classes) == int(counter.gt.num_classes):
            g, _ = counter.gt_region(start, region)
            counted = merge_chunk_counted(K, plan, blocks, g, inside, allowed, per_image=counter.per_image)
        if counted is not None:
            lab, sc = counted[0], None      # its padding is 255 already
        elif scores_keys is None:
            lab, sc = merge_chunk(K, plan, blocks, choice, allowed, sparse_levels, inside)
        else:  # class-sparse merged scores: each image merged on its own classes, no C-slice stack
            lab, sc = sparse_scores_chunk(K, plan, blocks, scores_keys[i0:i0 + region[0]], scores_level, allowed)
    if counted is None:
        lab = np.require(lab, np.uint8, ["C", "W"])
        done = _fill_padding(lab, shapes, j * hc, l * wc, 255)
    else:
        done = int((inside[:, 0] * inside[:, 1]).sum())
    write_chunk(out_spec, block, lab)
    if scores_spec is not None:
        sc = np.require(sc, np.uint8, ["C", "W"])
        _fill_padding(sc, shapes, j * hc, l * wc, 0)
        write_chunk(scores_spec, block + (0,), sc)
    if counter is not None:
        if counted is None:
            counter.add(start, lab)
        else:
            counter.add_counts(start, lab.shape, counted[1])
    if each_chunk is not None:
        each_chunk(start, lab)
    return done


def _member_specs(member_stacks: Sequence[Stack], gt: Stack) -> list[Any] | None:
    """Direct-reader specs of every member (a class-sparse one: its stored slots), or None."""
    from isle_fast.ensemble.graph import MAX_TASK_BYTES
    from isle_fast.ensemble.sweep import _local_specs, _SetPlan

    k, hc, wc = (int(v) for v in gt.chunks)
    per_pixel = 1 + sum(int(s.cams_meta.shape[3]) if s.score_layout == "sparse"
                        else int(np.prod(s.shape[3:], dtype=np.int64)) * s.dtype.itemsize for s in member_stacks)
    if k * hc * wc * per_pixel > MAX_TASK_BYTES:  # the stored slots of a gt chunk must fit one task
        return None
    plans = [_SetPlan("sparse" if s.score_layout == "sparse" else s.encoding) for s in member_stacks]
    specs = _local_specs(member_stacks, gt, plans)
    return None if specs is None else specs[1:]


def sparse_scores_merge(member_stacks: Sequence[Stack], plan: MergePlan) -> bool:
    """A score ensemble (one threshold for all) of class-sparse members only, class strategy, each with
    one background level: merged from the stored slots (:func:`_gather_sparse_scores`), on the gt's grid."""
    from isle_fast.stores.sparse import constant_background

    return (plan.mode == "scores" and plan.strategy == "class" and not plan.cast and bool(member_stacks)
            and all(s.score_layout == "sparse" and constant_background(s) is not None for s in member_stacks))


def _scores_layout(layout: str | None, plan: MergePlan, member_stacks: Sequence[Stack], slot_pass: bool,
                   out: Any) -> str:
    """``'sparse'`` or ``'dense'``: the layout of a score ensemble's merged stack (``layout`` of :func:`merge`)."""
    from isle_fast.stores.stack import is_remote

    choice = "auto" if layout is None else str(layout)
    if choice not in ("auto", "sparse", "dense"):
        raise InputError(f"{param('layout')} must be auto, sparse or dense, not {layout!r}")
    ok = plan.mode == "scores" and slot_pass and not is_remote(str(out))
    if choice == "sparse" and not ok:
        if plan.mode != "scores":
            why = "the ensemble is a label map (a member is a label set): it has no scores"
        elif any(s.score_layout != "sparse" for s in member_stacks):
            why = "a member set is a dense score store"
        elif is_remote(str(out)):
            why = "class-sparse scores are written to local disk only"
        else:
            why = ("it needs class-sparse members with one background level each, the class strategy, one "
                   "score dtype and a gt whose chunks hold the members' slots in one task")
        raise InputError(f"{param('layout', 'sparse')}: {why}")
    return "sparse" if ok and choice != "dense" else "dense"


def _sparse_level(stack: Stack, threshold: float) -> int:
    """The stored level a class-sparse member's foreground must exceed: the threshold's (in stored units,
    ``threshold >= 0``), else the store's background level (its dense view's background slice)."""
    from isle_fast.kernels.checks import threshold_value
    from isle_fast.stores.sparse import BACKGROUND_ATTR

    if threshold >= 0:
        return int(threshold_value(threshold, np.uint8))
    return int(stack.attrs[BACKGROUND_ATTR])


def _sparse_scores_arrays(member_stacks: Sequence[Stack], writer: Any, gt: Stack, plan: MergePlan,
                          levels: Sequence[int | None], allowed: np.ndarray | None, backend: str
                          ) -> tuple[Any, np.ndarray, int]:
    """The class-sparse ``scores`` of a score ensemble of class-sparse members: ``(slots array, keys, level)``.

    Class ``c`` of image ``i`` is stored when the set chosen for it (``plan.selection[c]``) holds it for
    that image (every other class of the merged stack is 0 there); the background slice is one level
    inside every image (the shared threshold's, else the background set's), found by merging one pixel
    with :func:`merge_chunk` itself. Writes ``scores_keys`` and the group attribute of the level; the
    slots (``scores_cams``, chunked like the gt, one chunk over K) are written by the tasks.
    """
    from isle_fast.backend import task_kernels
    from isle_fast.stores.sparse import ENSEMBLE_BACKGROUND_ATTR, ENSEMBLE_CAMS, ENSEMBLE_KEYS

    c = int(plan.num_classes)
    sel = np.asarray(plan.selection, dtype=np.int64)
    n_img = int(gt.num_images)
    rows = np.arange(n_img)[:, None]
    present = np.zeros((n_img, c), dtype=bool)
    for s, st in enumerate(member_stacks):
        held = np.zeros((n_img, c), dtype=bool)
        held[rows, np.asarray(st.sparse_keys, dtype=np.int64)] = True
        present |= held & (sel == s)[None, :]
    present[:, 0] = False
    k = max(1, int(present.sum(axis=1).max(initial=0)))
    keys = np.zeros((n_img, k), np.uint8)
    for i in range(n_img):
        cls = np.flatnonzero(present[i])
        keys[i, :cls.size] = cls
    one = [(np.zeros((1, 1, 1, int(st.cams_meta.shape[3])), np.uint8),
            np.zeros((1, int(st.cams_meta.shape[3])), np.uint8)) for st in member_stacks]
    with task_kernels(backend) as K:
        _, sc = merge_chunk(K, plan, one, None, np.ones((1, c), dtype=bool) if plan.drop_absent else None,
                            levels, np.ones((1, 2), np.int64))
    assert sc is not None  # a score plan
    level = int(np.asarray(sc)[0, 0, 0, 0])
    # written even when every key is 0 (no image holds a chosen class): Zarr skips chunks equal to the fill
    # value, and a chunk that is missing at commit is an error, never a zero
    karr = writer.group.create_array(ENSEMBLE_KEYS, shape=keys.shape, chunks=keys.shape, dtype="uint8",
                                     fill_value=0, compressors=default_compressors("scores")
                                     ).with_config(WRITE_EVERY_CHUNK)
    karr[...] = keys
    arr = writer.group.create_array(
        ENSEMBLE_CAMS, shape=tuple(writer.array.shape) + (k,), chunks=tuple(gt.chunks) + (k,), dtype="uint8",
        fill_value=0, compressors=default_compressors("scores"))
    writer.group.attrs[ENSEMBLE_BACKGROUND_ATTR] = level
    return arr, keys, level


def _local_merge(member_stacks: Sequence[Stack], gt: Stack, writer: Any, plan: MergePlan, choice: np.ndarray,
                 *, backend: str, progress: bool, allowed: np.ndarray | None = None,
                 each_chunk: Callable[[tuple[int, int, int], np.ndarray], None] | None = None,
                 sparse_out: bool = False, counter: Any = None) -> int | None:
    """The merge on a thread pool here, or on a cluster's workers (one task per gt chunk, direct chunk
    reads and writes: :func:`isle_fast.ensemble.graph.chunk_executor`); pixels written.

    None when the stores do not allow it (see :func:`isle_fast.ensemble.graph.local_specs`; label
    ensembles, and score ensembles of class-sparse sets: :func:`sparse_scores_merge`, which write the
    merged stack as ``scores`` beside the labels): the caller builds the Dask graph instead. Each task runs the same
    :func:`merge_chunk` as the graph's, so the ensemble is the same. Class-sparse members are read
    as stored (slots and keys), never as their dense view. ``sparse_out`` (a score ensemble of
    class-sparse members): the merged stack is written class-sparse (:func:`_sparse_scores_arrays`).
    ``counter``: every chunk is counted into it (:func:`_local_merge_task`).
    """
    from isle_fast.ensemble.graph import chunk_executor, chunk_tasks
    from isle_fast.progress import progress as bar
    from isle_fast.stores.chunkio import prepare_folders, write_spec

    sparse = [s.score_layout == "sparse" for s in member_stacks]
    from isle_fast.stores.sparse import constant_background

    if plan.mode != "labels" and not sparse_scores_merge(member_stacks, plan):
        return None
    if any(sp and t < 0 and constant_background(st) is None
           for st, sp, t in zip(member_stacks, sparse, plan.thresholds)):
        return None     # no threshold and a background stored per pixel: the dense view (Dask graph)
    specs = _member_specs(member_stacks, gt) if any(sparse) else local_specs(member_stacks, gt)
    if specs is None:
        return None
    if not any(sparse):
        specs = specs[1:]
    out_spec = write_spec(writer.array)
    if not out_spec.direct or tuple(out_spec.chunk_shape) != tuple(gt.chunks):
        return None
    scores_spec = None
    out_keys: np.ndarray | None = None
    out_level = 0
    levels = [_sparse_level(st, t) if sp else None for st, sp, t in zip(member_stacks, sparse, plan.thresholds)]
    if plan.mode == "scores":  # the merged stack beside the labels, on the same grid (slots gathered)
        c = int(plan.num_classes)
        if sparse_out:
            arr, out_keys, out_level = _sparse_scores_arrays(member_stacks, writer, gt, plan, levels, allowed,
                                                             backend)
        else:
            arr = writer.group.create_array(
                "scores", shape=tuple(writer.array.shape) + (c,), chunks=tuple(gt.chunks) + (c,),
                dtype="uint8", fill_value=0, compressors=default_compressors("scores"))
        writer.group.attrs["score_scale"] = float(member_stacks[0].score_scale)
        scores_spec = write_spec(arr)
        if not scores_spec.direct:
            raise RuntimeError("the ensemble's scores array cannot be written chunk by chunk")
        prepare_folders(scores_spec)
    prepare_folders(out_spec)
    n, h, w = (int(v) for v in gt.shape)
    tasks = chunk_tasks(gt)
    tails = [(int(st.cams_meta.shape[3]),) if sp else tuple(int(v) for v in st.shape[3:])
             for st, sp in zip(member_stacks, sparse)]
    keys = [st.sparse_keys if sp else None for st, sp in zip(member_stacks, sparse)]
    shapes = np.asarray(gt.shapes, dtype=np.int64)
    choice = np.asarray(choice, dtype=np.int64)
    rows = None if allowed is None or not plan.drop_absent else np.asarray(allowed, dtype=bool)
    k = int(gt.chunks[0])
    # each task carries its own images' rows: a task sent to a worker is pickled whole, and the data
    # set's rows in every one of them were (images x tasks) bytes through the scheduler
    work = [(block, region, shapes[block[0] * k:block[0] * k + region[0]],
             choice[block[0] * k:block[0] * k + region[0]],
             None if rows is None else rows[block[0] * k:block[0] * k + region[0]]) for block, region in tasks]
    fn = partial(_local_merge_task, specs, out_spec, tails, backend=backend, plan=plan, each_chunk=each_chunk,
                 sparse_keys=keys, sparse_levels=levels, scores_spec=scores_spec, scores_keys=out_keys,
                 scores_level=out_level, counter=counter)
    written = 0
    with chunk_executor(len(tasks)) as ex, \
            bar(total=n, desc="merge", unit="img", quiet=not progress) as pb:
        for t, px in ex.imap(fn, work):
            written += px
            size = tasks[t][1]
            pb.advance(size[0] * size[1] * size[2] / (h * w))  # a tile's share of its images
    return written


# -- image strategy -----------------------------------------------------------------------

def _presence_block(gt: np.ndarray, *, backend: str, num_classes: int) -> np.ndarray:
    from isle_fast.backend import task_kernels

    with task_kernels(backend) as K:
        gt = np.ascontiguousarray(gt)
        out = np.zeros((gt.shape[0], 1, 1, num_classes), dtype=np.int64)
        for m in range(gt.shape[0]):
            g = gt[m:m + 1]
            out[m, 0, 0] = np.asarray(K.confusion_labels(g, (g,), num_classes))[0].sum(axis=1)
        return out


def gt_presence(gt: Stack, *, backend: str = "cpu", progress: bool = False) -> np.ndarray:
    """``(I, C)`` bool: which classes each image's gt contains (its image-level labels)."""
    import dask.array as da

    from isle_fast.backend import dask_scheduler
    from isle_fast.progress import dask_progress

    g = gt.to_dask()
    c = gt.num_classes
    one = lambda n: 1  # noqa: E731
    arr = da.blockwise(partial(_presence_block, backend=backend, num_classes=c), "ijkc", g, "ijk",
                       new_axes={"c": c}, adjust_chunks={"j": one, "k": one}, dtype=np.int64,
                       meta=np.empty((0, 0, 0, 0), dtype=np.int64))
    with dask_progress("image labels", quiet=not progress, images=gt.num_images):
        px = arr.sum(axis=(1, 2)).compute(scheduler=dask_scheduler())
    return np.asarray(px) > 0


def image_choice(presence: np.ndarray, selection: Selection, miou: np.ndarray) -> tuple[np.ndarray, dict]:
    """The set (position among all sets) whose whole prediction each image takes (image strategy).

    Parameters
    ----------
    presence : (I, C) bool
        Image-level labels (class present in the image's gt).
    selection : Selection
    miou : (N,) float
        mIoU of every set; the best member set serves images without foreground.

    Returns
    -------
    choice : (I,) int64
    info : dict
        ``instances`` (per class image count) and ``rank`` (classes, most frequent first).
    """
    presence = np.asarray(presence, dtype=bool)
    c = presence.shape[1]
    instances = presence.sum(axis=0)
    rank = sorted(range(1, c), key=lambda k: (-int(instances[k]), k))
    pos = np.empty(c, dtype=np.int64)
    pos[0] = c
    for r, k in enumerate(rank):
        pos[k] = r
    scores = np.where(selection.members & ~np.isnan(miou), miou, -np.inf)
    fallback = int(np.argmax(scores)) if np.isfinite(scores).any() else selection.member_indices[0]
    choice = np.full(presence.shape[0], fallback, dtype=np.int64)
    fg = presence[:, 1:]
    has = fg.any(axis=1)
    if has.any():
        ranks = np.where(fg, pos[None, 1:], c)  # lower rank = more instances
        top = np.argmin(ranks, axis=1) + 1
        choice[has] = selection.best[top[has]]
    info = {"instances": {selection.classes[k]: int(instances[k]) for k in range(1, c)},
            "rank": [selection.classes[k] for k in rank],
            "images_without_foreground": int((~has).sum()),
            "fallback_set": selection.set_names[fallback]}
    return choice, info


# -- the merge ----------------------------------------------------------------------------

@dataclass
class MergeResult:
    """What :func:`merge` made: the new store and what it was made from."""

    stack: Stack
    evaluation: Any  # an Evaluation; without pixel labels, the Estimate the selection came from
    selection: Selection
    plan: MergePlan
    seconds: float
    info: dict = field(default_factory=dict)
    #: Whether ``merge(each_chunk=...)`` was called with every chunk (the local pass ran).
    each_chunk_ran: bool = False

    def __repr__(self) -> str:
        members = ", ".join(self.evaluation.set_names[i] for i in self.selection.member_indices)
        return f"<MergeResult {self.stack.path}: ensemble of {members} in {self.seconds:.1f} s>"


def _labels_source(image_labels: Any) -> str | None:
    """What ``merge(image_labels=...)`` was given, for the provenance."""
    if image_labels is None:
        return None
    if isinstance(image_labels, np.ndarray):
        return "array"
    return str(getattr(image_labels, "path", image_labels))


def ensemble_scores(stack: Stack):
    """The merged score stack of an ensemble, or ``None`` for a label-only ensemble.

    A Zarr array (dense ``scores``), or for class-sparse scores (provenance ``scores_layout``
    ``'sparse'``) their dense view (:class:`isle_fast.stores.sparse.SparseView`): the same
    ``(I, H, W, C)`` uint8 stack either way.
    """
    from isle_fast.stores.sparse import ensemble_view

    name = stack.provenance.get("scores_array")
    if not isinstance(name, str):
        return None
    if name in stack.array_names:
        return stack.member(name)
    return ensemble_view(stack)  # class-sparse scores (``scores_layout: sparse``): their dense view


def _blended_scores(stacks: Sequence[Stack], gt: Stack, evaluation: Evaluation, estimator: str | None,
                    allowed: np.ndarray | None, backend: str, bg_threshold: float | None,
                    progress: bool, subset: Sequence[str | int] | None = None) -> dict[str, Any]:
    """The labelled IoU and the no-label estimate combined (see :func:`merge`, ``blend_estimate``): the
    :func:`isle_fast.ensemble.uncertainty.posterior_scores` result."""
    from isle_fast.ensemble.estimate import PRIOR_ESTIMATOR, estimate
    from isle_fast.ensemble.selection import resolve_members
    from isle_fast.ensemble.uncertainty import posterior_scores

    ev = evaluation
    if ev.image_stats is None:  # the labelled images containing each class need per-image counts
        ev = evaluate(stacks, gt, average=evaluation.average, backend=backend, bg_threshold=bg_threshold,
                      progress=progress, per_image=True)
    assert ev.image_stats is not None  # per_image=True above
    if estimator == "rank":
        raise InputError(f"{param('estimator')} 'rank' gives a choice score, not an IoU, and cannot be "
                         "blended with the labelled IoU; name an IoU estimator (default "
                         f"{PRIOR_ESTIMATOR!r})")
    est = estimate(stacks, method=estimator or PRIOR_ESTIMATOR, image_labels=allowed,
                   bg_threshold=bg_threshold, progress=progress)
    members = resolve_members(ev.set_names, subset, ev.set_paths)
    res = posterior_scores(ev.image_stats, est.iou, gt_present=ev.gt_pixels > 0, average=ev.average,
                           population=stacks[0].num_images, pooled=True, members=members)
    res["voting_pixels"] = est.gt_pixels  # pixels some set predicts each class on (every image)
    return res


#: how a gt of some images selects (``merge(subset_selection=...)``); ``auto``: ``strata-context`` for a gt of
#: some of the sets' images with image labels (``strata-semi`` below :data:`CONTEXT_MIN_IMAGES` of them,
#: ``posterior`` without image labels), ``labelled`` for a gt of every image
SUBSET_SELECTIONS = ("auto", "strata", "strata-semi", "strata-context", "posterior", "labelled")
#: labelled images from which ``auto`` refines the strata by the distance to agreement (``strata-context``):
#: in ``benchmarks/selection.py`` it kept more of the gain than ``strata-semi`` from 25 labelled images on
#: (K = 25, 50, 100, 200), less at 10, where the labelled pixels are too few for its per-bin odds
CONTEXT_MIN_IMAGES = 25


def _strata_selection_scores(stacks: Sequence[Stack], gt: Stack, allowed: np.ndarray | None,
                             bg_threshold: float | None, progress: bool,
                             subset: Sequence[str | int] | None, set_names: list[str],
                             set_paths: list[str], model: str = "staple", context: bool = False) -> dict[str, Any]:
    """The :func:`isle_fast.ensemble.uncertainty.stratified_scores` result of a gt of some images: every
    image's vote patterns and the labelled images' strata (two passes; the labelled one over the gt's images;
    with ``context`` the same two split by the distance to agreement, over whole images, which summed over
    the bins are the plain ones)."""
    from isle_fast.ensemble.estimate import check_vote_sets, vote_patterns_pass
    from isle_fast.ensemble.partial import gt_positions
    from isle_fast.ensemble.selection import resolve_members
    from isle_fast.ensemble.uncertainty import context_pass, labelled_strata_pass, stratified_scores
    from isle_fast.metrics import ImageCounts

    positions = gt_positions(gt, stacks)
    if positions is None:
        positions = np.arange(gt.num_images, dtype=np.int64)
    lab_allowed = None if allowed is None else allowed[positions]
    ctx = None
    if context:
        check_vote_sets(stacks)
        lab_ctx = context_pass(stacks, gt, positions, allowed=lab_allowed, bg_threshold=bg_threshold,
                               progress=progress)
        every = context_pass(stacks, allowed=allowed, bg_threshold=bg_threshold, progress=progress)
        assert isinstance(lab_ctx, ImageCounts) and isinstance(every, np.ndarray)  # with a gt / without
        ctx = (lab_ctx, every)
        strata, patterns = lab_ctx.sum_axis(1), every.sum(axis=1)
    else:
        patterns, _, _ = vote_patterns_pass(stacks, image_labels=allowed, bg_threshold=bg_threshold,
                                            progress=progress)
        strata = labelled_strata_pass(stacks, gt, positions, allowed=lab_allowed, bg_threshold=bg_threshold,
                                      progress=progress)
    members = resolve_members(set_names, subset, set_paths)
    return stratified_scores(strata, patterns, members=members, reps=1000, seed=0, model=model, context=ctx)


def subset_choice(stacks: Sequence[Stack], gt_stack: Stack | None, evaluation: Any, *, mode: str = "auto",
                  partial: bool = True, allowed: np.ndarray | None = None, estimator: str | None = None,
                  backend: str = "cpu", bg_threshold: float | None = None, sweep: bool = False,
                  progress: bool = True, subset: Sequence[str | int] | None = None
                  ) -> tuple[str, Any, np.ndarray | None, dict[str, Any], dict[str, Any]]:
    """The selection of a gt of some images (see :func:`merge`, ``subset_selection``).

    Returns ``(mode, selection, scores or None, strata result, posterior result)``; ``mode`` is the one
    taken (``auto`` resolved: with image labels ``allowed`` ``strata-context``, or ``strata-semi`` for a gt of
    fewer than :data:`CONTEXT_MIN_IMAGES` images; ``posterior`` without them; ``labelled`` for a gt of every
    image (``partial`` False) or a threshold ``sweep``; ``estimate`` without a gt).
    """
    if mode not in SUBSET_SELECTIONS:
        raise InputError(f"{param('subset_selection')} must be one of {', '.join(SUBSET_SELECTIONS)}, not "
                         f"{mode!r}")
    blended = None
    strata: dict[str, Any] = {}
    posterior: dict[str, Any] = {}
    if mode == "auto":
        # by measurement (benchmarks/selection.py): with image labels the strata with the semi-supervised
        # prior, refined by the distance to agreement from CONTEXT_MIN_IMAGES labelled images; the posterior
        # without them
        mode = "labelled" if gt_stack is None or not partial or sweep else (
            "posterior" if allowed is None else
            "strata-context" if gt_stack.num_images >= CONTEXT_MIN_IMAGES else "strata-semi")
    if gt_stack is None:
        mode = "estimate"
    if mode in ("strata", "strata-semi", "strata-context"):
        assert gt_stack is not None  # mode "estimate" without a gt
        if sweep:
            raise InputError(f"{param('subset_selection', mode)} does not take a threshold sweep "
                             f"({param('bg_threshold')}): give one threshold")
        strata = _strata_selection_scores(stacks, gt_stack, allowed, bg_threshold, progress, subset,
                                          list(evaluation.set_names), list(evaluation.set_paths),
                                          model="staple" if mode == "strata" else "semi",
                                          context=mode == "strata-context")
        blended = np.where(np.isnan(strata["scores"]), evaluation.iou, strata["scores"])
    elif mode == "posterior":
        assert gt_stack is not None
        posterior = _blended_scores(stacks, gt_stack, evaluation, estimator, allowed, backend, bg_threshold,
                                    progress, subset)
        blended = np.where(np.isnan(posterior["scores"]), evaluation.iou, posterior["scores"])
    # a class the labelled images lack is still chosen from the votes (not left to the first set)
    voting = (strata or posterior).get("voting_pixels")
    sel_pixels = evaluation.gt_pixels if voting is None else np.maximum(evaluation.gt_pixels, voting)
    selection = select(evaluation, sets=subset) if blended is None else select(
        scores=blended, gt_pixels=sel_pixels, set_names=evaluation.set_names,
        classes=evaluation.classes, sets=subset)
    return mode, selection, blended, strata, posterior


def merge_frame(gt: Stack | None, stacks: Sequence[Stack]) -> Any:
    """The layout the ensemble is written on: the gt's, or the first set's when the gt labels a subset
    (or there is none)."""
    from isle_fast.ensemble.partial import SetFrame, gt_positions

    if gt is None:
        from isle_fast.stores.stack import check_aligned

        check_aligned(list(stacks))
        return SetFrame(stacks[0])
    return gt if gt_positions(gt, stacks) is None else SetFrame(stacks[0])


def merge(sets: Sequence[Any], gt: Any, out: str | os.PathLike, *, policy: str = "score",
          strategy: str = "class", subset: Sequence[str | int] | None = None,
          evaluation: Any = None, average: str = "dataset", backend: str = "auto",
          bg_threshold: float | None = None, name: str | None = None, overwrite: bool = False,
          progress: bool = True, image_labels: Any = None, estimator: str | None = None,
          blend_estimate: bool = False, subset_selection: str = "auto",
          each_chunk: Callable[[tuple[int, int, int], np.ndarray], None] | None = None,
          layout: str | None = None, counter: Any = None) -> MergeResult:
    """Evaluate, select and write the ensemble store (ISLE steps 2 and 3).

    Parameters
    ----------
    sets : sequence of path, URL or Stack
        The pseudo-label sets, in priority order (ties go to earlier sets).
    gt : path, URL or Stack
        Ground truth; gives the per-class scores and (image strategy) the
        image-level labels. It may label a subset of the sets' images (any
        order): the selection comes from those, the ensemble covers every
        image of the sets. ``None``: no pixel labels at all, the selection
        comes from ``estimator`` (:mod:`isle_fast.ensemble.estimate`).
    out : path or URL
        The new ensemble store (kind ``ensemble``, encoding ``labels``).
    policy : {'score', 'order', 'ignore'}
        How overlapping claims of chosen slices are resolved.
    strategy : {'class', 'image'}
        The paper's class-wise ISLE, or its naive image-level variant.
    subset : sequence of str or int, optional
        Build the ensemble of these sets only (ISLE-2 style).
    evaluation : Evaluation, optional
        A finished evaluation of ``sets`` against ``gt`` (skips that pass); with
        ``gt=None``, a finished :class:`~isle_fast.ensemble.estimate.Estimate`.
    average : {'dataset', 'image'}
        IoU averaging used for the selection (when evaluating here).
    backend : {'auto', 'cpu', 'gpu'}
    bg_threshold : float, str or sequence of float, optional
        Background threshold ([0, 1] score) for score sets; or a sweep (``'best'``,
        ``'A:B:STEP'``, ``'T1,T2'``, a sequence; :func:`isle_fast.ensemble.sweep.parse_thresholds`):
        every set is evaluated at every threshold in one pass and merged at its own best one
        (recorded in the provenance as ``bg_thresholds``, the sweep as ``bg_sweep``).
    name : str, optional
        Name of the ensemble set (default: the store's folder name).
    overwrite : bool
        Replace an existing store at ``out`` once the new one is complete.
    progress : bool
    image_labels : path, Stack or (I, C) bool array, optional
        Image-level labels (``cls_labels.npy``, a VOC XML folder, CSV / JSON,
        an image-labels store, a stack carrying them, or an array in the gt's
        order; :mod:`isle_fast.stores.image_labels`): claims of classes absent
        from an image's labels are dropped, and the image strategy ranks by
        them instead of the gt. Every gt image needs labels.
    estimator : {'agreement', 'pairwise', 'staple', 'combined', 'rank'}, optional
        With ``gt=None``: how each set's per-class IoU is estimated from the
        sets (default :data:`isle_fast.ensemble.estimate.DEFAULT_ESTIMATOR`);
        with ``blend_estimate``: the prior's estimator (default
        :data:`isle_fast.ensemble.estimate.PRIOR_ESTIMATOR`; not ``rank``).
    blend_estimate : bool
        With a gt of some images: select from the posterior expected IoU
        of the labelled IoU and the no-label estimate of every image
        (``estimator``), each weighted by its error: the labelled one's from
        the bootstrap, the estimate's fitted on the labelled images
        (:func:`isle_fast.ensemble.uncertainty.posterior_scores`); the same as
        ``subset_selection='posterior'``.
    subset_selection : {'auto', 'strata', 'strata-semi', 'strata-context', 'posterior', 'labelled'}
        How a gt of some images selects. ``strata-semi``: the labelled
        images' truth rate per vote stratum (a class and the sets predicting
        it) applied to every image's votes, the labelled pixels counted
        exactly, each stratum's rate shrunk toward a prior from the STAPLE
        model fitted with the labelled truth
        (:func:`isle_fast.ensemble.uncertainty.stratified_scores`,
        ``model='semi'``); ``strata-context`` (what ``auto`` takes for a gt of
        some of the images with ``image_labels``, ``strata-semi`` for a gt of
        fewer than :data:`CONTEXT_MIN_IMAGES`): ``strata-semi`` with every
        unlabelled pixel's stratum rate refined by its distance to where every
        set agrees on the class (``stratified_scores(context=...)``; its two
        passes read whole images,
        :func:`isle_fast.ensemble.uncertainty.context_pass`); ``strata``: the
        same as ``strata-semi`` with the no-label STAPLE posterior in the
        prior (``model='staple'``, the default before 2026-12-02);
        ``posterior`` (what ``auto`` takes without image labels): as
        ``blend_estimate``; ``labelled``: the labelled images' IoU alone (what
        ``auto`` takes for a gt of every image, and with a threshold sweep).
        ``auto`` takes the best of these by measurement in
        ``benchmarks/selection.py`` (its default run: 100 labelled images of
        600, mean of 10 data sets, 20 subsets each: ``strata-context`` kept
        83 % of the full-gt gain with image labels (worst data set 59 %),
        ``strata-semi`` 81 % (52 %), ``strata`` 80 % (49 %), the posterior
        77 % without image labels, the labelled IoU alone 35 %; with 10
        labelled images ``strata-semi`` 71 % and ``strata-context`` 69 %).
    each_chunk : callable, optional
        ``each_chunk(start, labels)``: called with every ensemble chunk once it
        is written (``start``: its first ``(image, row, column)``; ``labels``:
        the chunk's region of the array, padding = 255), from the threads of the
        local pass, so a caller can use the chunk while it is in memory
        (``isle run`` counts it against the gt and encodes its PNGs). Only the
        local pass calls it: :attr:`MergeResult.each_chunk_ran` says whether it
        ran (the Dask graph, taken for a cluster, remote stores or another
        layout, does not call it; nor does a merge whose gt
        covers only some of the images).
    layout : {'auto', 'sparse', 'dense'}, optional
        Layout of a score ensemble's merged stack. ``sparse``: class-sparse
        (:mod:`isle_fast.stores.sparse`: per image the classes its chosen sets
        hold, as slots ``scores_cams`` and keys ``scores_keys``, and the
        background level), possible when every member is class-sparse with one
        background level, class strategy, one dtype, local disk; ``dense``:
        every class slice (the array ``scores``). ``auto`` / None (default):
        sparse where possible. Either layout gives the same stack
        (:func:`ensemble_scores`); the provenance's ``scores_layout`` says which.

    counter : ChunkCounts, optional
        A :class:`~isle_fast.ensemble.evaluate.ChunkCounts` of ``gt``: the local
        pass counts every ensemble chunk into it (``isle run``'s fused
        evaluation of the ensemble), in the merge kernel's own pass where the
        plan is a plain label merge (:func:`merge_chunk_counted`: each image
        counted while it is in cache), else right after the chunk is merged;
        before ``each_chunk`` is called with it. Only the local pass counts, as
        for ``each_chunk`` (:attr:`MergeResult.each_chunk_ran`).
    Returns
    -------
    MergeResult

    Examples
    --------
    >>> import tempfile, isle_fast as il
    >>> ds = il.make_voc_like(tempfile.mkdtemp() + "/voc", n_images=12, size_range=(40, 60), soft_sets=())
    >>> sets = [ds.stores[f"train/pseudo/{name}"] for name in ds.set_names]
    >>> res = il.merge(sets, ds.stores["train/gt"], tempfile.mkdtemp() + "/ensemble.zarr", progress=False)
    >>> res.stack.kind, res.stack.num_images
    ('ensemble', 9)
    """
    from isle_fast.backend import dask_scheduler, resolve_backend
    from isle_fast.ensemble.sweep import is_sweep, parse_thresholds

    if layout not in (None, "auto", "sparse", "dense"):  # a user mistake, before any pass
        raise InputError(f"{param('layout')} must be auto, sparse or dense, not {layout!r}")
    from isle_fast.progress import dask_progress

    t0 = time.perf_counter()
    sweep_spec = bg_threshold if is_sweep(bg_threshold) else None
    if sweep_spec is not None:
        sweep_values = parse_thresholds(sweep_spec)   # a bad sweep is an error before any work
        if evaluation is not None:
            raise InputError("give an evaluation or a threshold sweep (bg_threshold), not both")
        bg_threshold = None
    else:
        bg_threshold = check_bg_threshold(bg_threshold)
    be = resolve_backend(backend)
    if strategy not in STRATEGIES:
        raise InputError(f"{param('strategy')} must be one of {', '.join(STRATEGIES)}, not {strategy!r}")
    policy_code(policy)
    if gt is None:  # no pixel labels: the selection is estimated from the sets
        from isle_fast.ensemble.estimate import DEFAULT_ESTIMATOR, ESTIMATORS

        estimator = estimator or DEFAULT_ESTIMATOR
        if estimator not in ESTIMATORS:
            raise InputError(f"{param('estimator')} must be one of {', '.join(ESTIMATORS)}, not {estimator!r}")
        stacks, gt_stack = [s if isinstance(s, Stack) else _open(s) for s in sets], None
    else:
        stacks, gt_stack = open_inputs(sets, gt)
    # before any work: never an input (`--out A.zarr` of set A, `--out gt.zarr`), never what isle
    # did not write
    check_output(out, overwrite=overwrite, inputs=[s for s in [*stacks, gt_stack] if s is not None])
    # a gt of some images selects; the ensemble covers every image of the sets (their layout: the frame)
    frame = merge_frame(gt_stack, stacks)
    if counter is not None and (gt_stack is None or str(counter.gt.path) != str(gt_stack.path)
                                or tuple(counter.gt.shape) != tuple(gt_stack.shape)
                                or tuple(counter.gt.chunks) != tuple(gt_stack.chunks)):
        raise ValueError(f"{param('counter')} counts against another gt than {gt}: give a ChunkCounts of it")
    if counter is not None:
        from isle_fast.cluster import current_client

        if current_client() is not None:   # its counts live in this process; the tasks would run on workers
            raise ValueError(f"{param('counter')} counts on this machine's threads: not with a dask.distributed "
                             "client (evaluate the ensemble store instead)")
    if frame is not gt_stack and strategy == "image" and image_labels is None:
        have = "no ground truth" if gt_stack is None else f"a ground truth of {gt_stack.num_images} of the " \
            f"{frame.num_images} images"
        raise InputError(f"{param('strategy', 'image')} with {have} needs {param('image_labels')} for every image")
    allowed = None
    if image_labels is not None:
        from isle_fast.stores.image_labels import check_not_output, resolve_image_labels

        check_not_output(image_labels, out)
        frame_path = str(frame.path)
        where = f"the set {frame_path}" if frame is not gt_stack else f"the ground truth {frame_path}"
        allowed = resolve_image_labels(image_labels, frame.ids, frame.classes, where=where)
    set_thresholds = None
    if evaluation is None and gt_stack is None:
        from isle_fast.ensemble.estimate import DEFAULT_ESTIMATOR, estimate

        if sweep_spec is not None:
            raise InputError(f"a threshold sweep ({param('bg_threshold')}) needs pixel labels: give a gt")
        evaluation = estimate(stacks, method=estimator or DEFAULT_ESTIMATOR, image_labels=allowed,
                              bg_threshold=bg_threshold, progress=progress)
    elif sweep_spec is not None:
        from isle_fast.ensemble.sweep import sweep_thresholds

        sweep = sweep_thresholds(stacks, gt_stack, sweep_values, average=average, backend=be,
                                 progress=progress)
        evaluation = sweep.best_evaluation()
        set_thresholds = sweep.best_thresholds
    elif evaluation is None:
        from isle_fast.ensemble.sweep import evaluate_at

        evaluation = evaluate_at(stacks, gt_stack, bg_threshold, average=average, backend=be,
                                 progress=progress)
    elif len(evaluation.set_names) != len(stacks):
        raise InputError(f"the evaluation has {len(evaluation.set_names)} sets, {len(stacks)} were given")
    mode, selection, blended, strata, posterior = subset_choice(
        stacks, gt_stack, evaluation, mode="posterior" if blend_estimate else subset_selection,
        partial=gt_stack is not None and frame is not gt_stack, allowed=allowed, estimator=estimator, backend=be,
        bg_threshold=bg_threshold, sweep=sweep_spec is not None, progress=progress, subset=subset)
    plan = make_plan(stacks, selection, policy=policy, strategy=strategy, bg_threshold=bg_threshold,
                     drop_absent=allowed is not None, set_thresholds=set_thresholds)
    members = selection.member_indices
    names = unique_names(stacks)
    info: dict[str, Any] = {}
    if strategy == "image":
        if allowed is None:
            assert gt_stack is not None  # without a gt (or of some images) image labels are required above
            presence = gt_presence(gt_stack, backend=be, progress=progress)
        else:
            presence = allowed
        choice_all, info = image_choice(presence, selection, evaluation.miou)
        pos = {m: k for k, m in enumerate(members)}
        choice = np.asarray([pos[int(v)] for v in choice_all], dtype=np.int64)
        info["images_per_set"] = {names[m]: int((choice_all == m).sum()) for m in members}
    else:
        choice = np.zeros(frame.num_images, dtype=np.int64)

    member_stacks = [stacks[m] for m in members]
    c = frame.num_classes
    scores_dtype = None
    scale = 1.0
    if plan.mode == "scores":
        scores_dtype = "float32" if plan.cast else str(member_stacks[0].array.dtype)
        scale = 1.0 if plan.cast else member_stacks[0].score_scale
    shown = blended if blended is not None else evaluation.iou  # the scores the selection was made from
    provenance = {
        "sources": [s.path for s in stacks],
        "gt": None if gt_stack is None else gt_stack.path,
        "labelled_images": 0 if gt_stack is None else int(gt_stack.num_images),
        **({"estimator": evaluation.method} if gt_stack is None and hasattr(evaluation, "method") else {}),
        "sets": names,
        "members": [names[m] for m in members],
        "selection": selection.mapping(),
        "background_set": names[int(selection.best[0])],
        "scores": {names[n]: jsonable(evaluation.iou[n]) for n in range(len(stacks))},
        "miou": {names[n]: jsonable(evaluation.miou[n]) for n in range(len(stacks))},
        "average": evaluation.average,
        "policy": policy,
        "strategy": strategy,
        "bg_threshold": bg_threshold if sweep_spec is None else (
            sweep_spec.strip().lower() if isinstance(sweep_spec, str) else list(sweep_values)),
        **({"bg_thresholds": dict(zip(names, set_thresholds)), "bg_sweep": list(sweep_values)}
           if set_thresholds is not None else {}),
        "scores_array": "scores" if scores_dtype else None,
        "image_labels": _labels_source(image_labels),
        **({"blended_scores": {names[n]: jsonable(shown[n]) for n in range(len(stacks))},
            "blend_posterior": {"p_best": jsonable(posterior["p_best"]),
                                "expected_loss": jsonable(posterior["expected_loss"]),
                                "labelled_weight": jsonable(posterior["labelled_weight"]),
                                "estimate_error_variance": posterior["tau2"], "estimate_slope": posterior["slope"]}}
           if posterior else {}),
        **({"image_strategy": jsonable(info)} if info else {}),
        **({"subset_selection": mode} if gt_stack is not None else {}),
        **({"strata_scores": {names[n]: jsonable(shown[n]) for n in range(len(stacks))},
            "strata": {"p_best": jsonable(strata["p_best"]), "expected_loss": jsonable(strata["expected_loss"]),
                       "labelled_weight": jsonable(strata["labelled_weight"])}} if strata else {}),
    }
    grid = work_chunks(member_stacks, frame)
    slot_pass = (plan.mode == "labels" and any(s.score_layout == "sparse" for s in member_stacks)
                 or sparse_scores_merge(member_stacks, plan)) and _member_specs(member_stacks, frame) is not None
    if slot_pass:
        # the direct pass reads the K stored slots of a pixel, not its C classes: the gt's own grid
        grid = (int(frame.chunks[0]), int(frame.chunks[1]), int(frame.chunks[2]))
    sparse_out = _scores_layout(layout, plan, member_stacks, slot_pass, out) == "sparse"
    if plan.mode == "scores":
        provenance["scores_layout"] = "sparse" if sparse_out else "dense"
    writer = create_stack(out, kind="ensemble", classes=frame.classes, ids=frame.ids,
                          shapes=frame.shapes, encoding="labels", name=name,
                          chunks=grid, padded_shape=frame.padded_shape,
                          provenance=provenance, overwrite=overwrite)
    expected = int((frame.shapes[:, 0] * frame.shapes[:, 1]).sum())
    try:
        on_grid = frame is gt_stack     # chunks on the gt's grid only
        fused = each_chunk if on_grid else None
        written_here = _local_merge(member_stacks, frame, writer, plan, choice, backend=be,
                                    progress=progress, allowed=allowed, each_chunk=fused,
                                    sparse_out=sparse_out, counter=counter if on_grid else None)
        if written_here is None and sparse_out:  # the direct pass was possible when the layout was chosen
            raise RuntimeError("a class-sparse ensemble's scores are written by the local pass only")
        if written_here is not None:
            if written_here != expected:  # every chunk must have run exactly once
                raise RuntimeError(f"merge wrote {written_here} pixels, expected {expected}")
            stack = writer.commit()
            return MergeResult(stack=stack, evaluation=evaluation, selection=selection, plan=plan,
                               seconds=time.perf_counter() - t0, info=info,
                               each_chunk_ran=on_grid and (each_chunk is not None or counter is not None))
    except BaseException:
        writer.abort()
        raise
    import dask.array as da

    g, arrays = aligned_arrays(member_stacks, frame, grid)
    try:
        scores_target = None
        if scores_dtype:
            scores_target = writer.group.create_array(
                "scores", shape=tuple(g.shape) + (c,), chunks=grid + (c,),
                dtype=scores_dtype, fill_value=0, compressors=default_compressors("scores"),
            ).with_config({"write_empty_chunks": True})  # skip Zarr's slow all-fill check per chunk
            writer.group.attrs["score_scale"] = scale
        idx = [da.arange(n, chunks=ch, dtype=np.int64) for n, ch in zip(g.shape, g.chunks)]
        shapes = da.from_array(frame.shapes.astype(np.int64), chunks=(g.chunks[0], (2,)))
        choice_da = da.from_array(choice, chunks=(g.chunks[0],))
        allowed_np = allowed if allowed is not None else np.ones((frame.num_images, 1), dtype=bool)
        allowed_da = da.from_array(allowed_np, chunks=(g.chunks[0], (allowed_np.shape[1],)))
        func = partial(_merge_block, backend=be, plan=plan, labels_target=writer.array,
                       scores_target=scores_target)
        one = lambda n: 1  # noqa: E731
        done = da.blockwise(func, "ijk", idx[0], "i", idx[1], "j", idx[2], "k", shapes, "iz",
                            choice_da, "i", allowed_da, "iy", *blockwise_args(arrays, member_stacks),
                            adjust_chunks={"i": one, "j": one, "k": one}, dtype=np.int64,
                            concatenate=True, meta=np.empty((0, 0, 0), dtype=np.int64))
        with dask_progress("merge", quiet=not progress, images=frame.num_images):
            written = int(done.sum().compute(scheduler=dask_scheduler()))
        if written != expected:  # every chunk must have run exactly once
            raise RuntimeError(f"merge wrote {written} pixels, expected {expected}")
        stack = writer.commit()
    except BaseException:
        writer.abort()
        raise
    return MergeResult(stack=stack, evaluation=evaluation, selection=selection, plan=plan,
                       seconds=time.perf_counter() - t0, info=info)


def merge_images(sets: Sequence[Any], selection: Selection, indices: Sequence[int], *,
                 policy: str = "score", strategy: str = "class", choice: np.ndarray | None = None,
                 backend: str = "auto", bg_threshold: float | None = None,
                 image_labels: np.ndarray | None = None) -> list[np.ndarray]:
    """The ensemble labels of a few images, in memory (unpadded), e.g. for figures.

    ``choice`` (image strategy) gives the set (position among all sets) of
    every image of the data set; ``image_labels`` ((I, C) bool, the data
    set's order) drops claims of absent classes as :func:`merge` does.
    """
    from isle_fast.backend import get_kernels

    stacks = [s if isinstance(s, Stack) else _open(s) for s in sets]
    K = get_kernels(backend)
    plan = make_plan(stacks, selection, policy=policy, strategy=strategy, bg_threshold=bg_threshold,
                     drop_absent=image_labels is not None)
    members = [stacks[m] for m in selection.member_indices]
    pos = {m: k for k, m in enumerate(selection.member_indices)}
    out = []
    for i in indices:
        i = int(i)
        h, w = (int(v) for v in members[0].shapes[i])
        blocks = [np.asarray(s.array[i:i + 1, :h, :w]) for s in members]
        ch = None if choice is None else np.asarray([pos[int(choice[i])]], dtype=np.int64)
        al = None if image_labels is None else np.asarray(image_labels, dtype=bool)[i:i + 1]
        lab, _ = merge_chunk(K, plan, blocks, ch, al)
        out.append(np.asarray(lab)[0])
    return out


def _open(path: Any) -> Stack:
    from isle_fast.stores.stack import open_stack

    return open_stack(path)
