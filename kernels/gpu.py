"""GPU kernels (``numba.cuda``): confusion counting, class-slice merge, decode, subset confusions.

Same names, semantics and argument checks (:mod:`isle_fast.kernels.checks`) as
:mod:`isle_fast.kernels.cpu`; every function is checked against the NumPy reference in
``tests/reference.py`` under Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``), which runs
these very kernels in Python threads without a GPU.

Inputs and outputs
------------------
Every function accepts NumPy arrays **or** device arrays (CuPy, or anything exposing
``__cuda_array_interface__``, or Numba device arrays):

* all NumPy in -> NumPy out. The data go to the device through the *host pipeline*
  (below) and only the (small) result comes back, so Dask orchestration can call the
  GPU backend on host chunks unchanged.
* any device array in -> device arrays out (CuPy when CuPy is installed, else Numba
  device arrays, e.g. under the simulator). Kernels are launched on CuPy's current
  stream and nothing is synchronised: the result is ready in stream order.

Kernel design
-------------
* **Fused confusion counting.** One launch reads ``gt`` once per pixel block and counts
  all N sets (or all S subsets) into a histogram of ``N x C x (C+1)`` bins. Each block keeps a
  *privatised* ``uint32`` histogram in dynamic shared memory (``_SHARED_BINS`` bins =
  48 KiB, the per-block limit that needs no opt-in); tables are processed in groups of as
  many as fit (e.g. VOC, C=21: 26 sets per launch; N<=8 and C<=38 always fit in one launch),
  and only a table larger than 48 KiB on its own (C > 110) falls back to ``uint64`` atomics
  in global memory. At the end each block flushes its non-zero bins with one 64-bit atomic
  add each into a global ``uint64`` histogram, returned as ``int64``. The grid is sized so that
  a block counts at most 2**31 pixels (no ``uint32`` overflow) and so that the flush stays
  small next to the counting work.
* **Run aggregation.** Each thread handles ``_PIX`` (4) consecutive pixels per step and
  merges runs of the same (true, predicted) bin into one shared atomic: segmentation maps are
  piecewise constant (mostly background), so this cuts contention on the hot bins.
* **Decode on the fly.** Score sets are never decoded to memory: the argmax over the class
  axis (ties -> first index; background replaced by the threshold) is done per pixel inside
  the counting kernel. ``float16`` scores are read as ``uint16`` bit patterns and converted
  exactly in registers (no dependence on the device's half-precision support).
* **Merge** kernels are one thread per pixel (grid-stride): claims are collected over the N
  sets and resolved by the policy exactly as :func:`isle_fast.kernels.cpu.merge_labels`.
  ``merge_labels`` is the one-subset case of the subset kernel, so both share one
  device function.
* **Subset confusions** compute, per pixel, the merged label of every subset (masked to its
  member sets) and count it, in one pass over the data; subsets are grouped into launches
  like sets.

Host pipeline (transfer / compute overlap)
------------------------------------------
For NumPy inputs the pixel range is cut into chunks of about ``_CHUNK_BYTES`` (32 MiB) of
input and processed on two CUDA streams alternately: for chunk ``k`` the host copies the
inputs into a page-locked (pinned) staging buffer, queues the asynchronous host-to-device
copy, the kernel and (for merges) the device-to-host copy of the output on stream
``k % 2``, then goes on to chunk ``k+1`` while the device works. So the host-side staging
copy of chunk ``k+1`` overlaps the device's work on chunk ``k``, on the device the transfer of
chunk ``k`` overlaps the kernel of chunk ``k-1`` (two streams, separate copy engine), and
transfers run from pinned memory (full PCIe bandwidth instead of the pageable-memory
path). Staging and device buffers are reused across calls, one set per calling thread
(Dask's threaded scheduler calls kernels concurrently): two byte arenas per stream slot
(inputs, outputs) of one chunk each, so a thread holds about 2 x (32 MiB + the chunk's
outputs) of pinned memory and the same on the device. For counting the only device-to-host
copy is the histogram at the end. Counting is transfer-bound for host data (PCIe is ~50x slower than
device memory), which is why keeping data on the device (CuPy in) is the fast path.
"""

from __future__ import annotations

import functools
import math
import threading
from typing import Any, Callable, Sequence

import numpy as np
from numba import config as _numba_config
from numba import cuda, float64, int64, uint32, uint64

from .checks import (
    IGNORE,
    ORDER,
    SCORE,
    confusion_labels_args,
    confusion_scores_args,
    decode_scores_args,
    merge_labels_args,
    merge_scores_args,
    subset_confusion_labels_args,
    subset_confusion_scores_args,
    threshold_value,
)

__all__ = [
    "SCORE", "ORDER", "IGNORE", "SIMULATOR", "threshold_value",
    "confusion_labels", "confusion_scores", "decode_scores",
    "merge_labels", "merge_scores",
    "subset_confusion_labels", "subset_confusion_scores",
]

#: True when numba runs ``numba.cuda`` kernels in its CPU simulator (``NUMBA_ENABLE_CUDASIM=1``).
SIMULATOR = bool(_numba_config.ENABLE_CUDASIM)



_THREADS = 32 if SIMULATOR else 256        # threads per block (the simulator runs one Python thread each)
_PIX = 4                                   # consecutive pixels per thread per step (run aggregation)
_SHARED_BINS = 12288                       # uint32 bins per block: 48 KiB of dynamic shared memory
_CHUNK_BYTES = 32 << 20                    # host pipeline: input bytes per chunk
_CHUNK_PIXELS: int | None = None           # test hook: fixed pixels per chunk (exercises the pipeline)
_MAX_BLOCK_PIXELS = 1 << 31                # per-block pixel bound -> uint32 shared bins cannot overflow

# The simulator swaps module globals while a kernel runs, so concurrent launches from several
# host threads (Dask's threaded scheduler) must be serialised there; real devices need no lock.
_SIM_LOCK = threading.RLock()


def _serialised(fn: Callable) -> Callable:
    if not SIMULATOR:
        return fn

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with _SIM_LOCK:
            return fn(*args, **kwargs)

    return wrapper


# ----------------------------------------------------------------------------------------------
# device functions
# ----------------------------------------------------------------------------------------------

@cuda.jit(device=True)
def _read_plain(a, idx):
    return float64(a[idx])


@cuda.jit(device=True)
def _read_half(a, idx):
    """IEEE binary16 bit pattern (uint16) -> float64, exactly."""
    h = int64(a[idx])
    e = (h >> 10) & 31
    m = h & 1023
    if e == 0:
        v = float64(m) * 5.9604644775390625e-08              # m * 2**-24 (subnormal)
    elif e == 31:
        v = math.inf if m == 0 else math.nan
    else:
        v = float64(m + 1024) * (float64(int64(1) << e) * 2.9802322387695312e-08)  # * 2**(e-25)
    if h & 32768:
        v = -v
    return v


@cuda.jit(device=True)
def _merge_label_px(sets, sel, mem, prio, policy, s, i, C):
    """Merged label of subset ``s`` at pixel ``i`` (label sets); 255 = abstain / conflict."""
    have = False
    count = 0
    best = int64(0)
    bkey = float64(0.0)
    all_abstain = True
    for n in range(len(sets)):
        if mem[s, n] != 0:
            v = int64(sets[n][i])
            if v < C:
                all_abstain = False
                if v >= 1 and sel[s, v] == n:
                    count += 1
                    if not have:
                        better = True
                    elif policy == 0:                       # SCORE: higher priority, ties -> lower class
                        key = prio[n, v]
                        better = key > bkey or (key == bkey and v < best)
                    else:                                   # ORDER: lowest set index = first seen
                        better = False
                    if better:
                        best = v
                        bkey = prio[n, v]
                        have = True
    if have:
        if policy == 2 and count >= 2:
            return int64(255)
        return best
    if all_abstain:
        return int64(255)
    return int64(0)


def _score_functions(read: Callable) -> tuple[Callable, Callable]:
    """Device functions for score sets, specialised on the element reader."""

    @cuda.jit(device=True)
    def decode_px(a, i, C, use_thr, thr):
        base = i * C
        best = thr if use_thr else read(a, base)
        bi = int64(0)
        for c in range(1, C):
            v = read(a, base + c)
            if v > best:
                best = v
                bi = int64(c)
        return bi

    @cuda.jit(device=True)
    def merge_score_px(sets, sel, policy, use_thr, thr, s, i, C):
        base = i * C
        bg = thr if use_thr else read(sets[sel[s, 0]], base)
        have = False
        count = 0
        best = int64(0)
        bv = float64(0.0)
        bsel = int64(0)
        for c in range(1, C):
            n = sel[s, c]
            v = read(sets[n], base + c)
            if v > bg:
                count += 1
                if not have:
                    better = True
                elif policy == 0:                           # SCORE: highest value, ties -> lower class
                    better = v > bv
                elif policy == 1:                           # ORDER: lowest set index, ties -> lower class
                    better = n < bsel
                else:
                    better = False
                if better:
                    best = int64(c)
                    bv = v
                    bsel = n
                    have = True
        if policy == 2 and count >= 2:
            return int64(255)
        return best

    return decode_px, merge_score_px


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------

def _hist_kernel(label_fn: Callable) -> Any:
    """The kernel counting ``label_fn(aux, k, i, C)`` against ``gt`` for tables ``k0 <= k < k1``.

    ``out`` is the flat ``uint64`` histogram of ``K x C x (C+1)`` bins. With ``shared`` the
    block counts into a privatised ``uint32`` table in dynamic shared memory (tables
    ``k0..k1`` must fit; launched with that many bytes) and flushes its non-zero bins into
    ``out`` at the end; without, it adds straight into ``out`` (``uint64`` global atomics, for
    a table larger than shared memory). The one counting loop serves both: only the array
    the atomics go to differs.
    """

    @cuda.jit(device=True)
    def count(target, first, gt, aux, k0, k1, C):
        """Runs of equal bins over this thread's pixels, added to ``target`` (tables from ``first``)."""
        width = C + 1
        P = gt.shape[0]
        step = cuda.gridDim.x * cuda.blockDim.x * _PIX
        base = (cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x) * _PIX
        while base < P:
            for k in range(k0, k1):
                prev = int64(-1)
                run = 0
                for j in range(_PIX):
                    i = base + j
                    if i < P:
                        t = int64(gt[i])
                        if t < C:
                            p = label_fn(aux, k, i, C)
                            if p > C:
                                p = int64(C)
                            b = ((k - first) * C + t) * width + p
                            if b == prev:
                                run += 1
                            else:
                                if run > 0:
                                    cuda.atomic.add(target, prev, run)
                                prev = b
                                run = 1
                if run > 0:
                    cuda.atomic.add(target, prev, run)
            base += step

    @cuda.jit
    def kernel(gt, aux, k0, k1, C, shared, out):
        if not shared:
            count(out, 0, gt, aux, k0, k1, C)
            return
        hist = cuda.shared.array(0, dtype=uint32)
        nbins = (k1 - k0) * C * (C + 1)
        tid = cuda.threadIdx.x
        for b in range(tid, nbins, cuda.blockDim.x):
            hist[b] = uint32(0)
        cuda.syncthreads()
        count(hist, k0, gt, aux, k0, k1, C)
        cuda.syncthreads()
        off = k0 * C * (C + 1)
        for b in range(tid, nbins, cuda.blockDim.x):
            v = hist[b]
            if v != 0:
                cuda.atomic.add(out, off + b, uint64(v))

    return kernel


@cuda.jit(device=True)
def _label_of_set(aux, k, i, C):
    return int64(aux[0][k][i])


@cuda.jit(device=True)
def _label_of_subset(aux, k, i, C):
    return _merge_label_px(aux[0], aux[1], aux[2], aux[3], aux[4], k, i, C)


@cuda.jit
def _merge_labels_kernel(sets, sel, mem, prio, policy, C, out):
    for i in range(cuda.grid(1), out.shape[0], cuda.gridsize(1)):
        out[i] = _merge_label_px(sets, sel, mem, prio, policy, 0, i, C)


@functools.lru_cache(maxsize=None)
def _kernels(kind: str, half: bool = False) -> Any:
    """Compile-on-first-use kernel families (``half``: float16 scores read as uint16)."""
    if kind == "labels":
        return _hist_kernel(_label_of_set)
    if kind == "subset_labels":
        return _hist_kernel(_label_of_subset)
    decode_px, merge_score_px = _score_functions(_read_half if half else _read_plain)
    if kind == "scores":
        @cuda.jit(device=True)
        def label_fn(aux, k, i, C):
            return decode_px(aux[0][k], i, C, aux[1], aux[2])

        return _hist_kernel(label_fn)
    if kind == "subset_scores":
        @cuda.jit(device=True)
        def label_fn(aux, k, i, C):
            return merge_score_px(aux[0], aux[1], aux[2], aux[3], aux[4], k, i, C)

        return _hist_kernel(label_fn)
    if kind == "decode":
        @cuda.jit
        def decode_kernel(scores, C, use_thr, thr, out):
            for i in range(cuda.grid(1), out.shape[0], cuda.gridsize(1)):
                out[i] = decode_px(scores, i, C, use_thr, thr)

        return decode_kernel
    if kind == "merge_scores":
        @cuda.jit
        def merge_scores_kernel(sets, sel, policy, use_thr, thr, thr_raw, C, labels, merged):
            for i in range(cuda.grid(1), labels.shape[0], cuda.gridsize(1)):
                base = i * C
                for c in range(C):
                    merged[base + c] = sets[sel[0, c]][base + c]
                if use_thr:
                    merged[base] = thr_raw
                labels[i] = merge_score_px(sets, sel, policy, use_thr, thr, 0, i, C)

        return merge_scores_kernel
    raise ValueError(kind)


# ----------------------------------------------------------------------------------------------
# device / host plumbing
# ----------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _cupy() -> Any:
    """CuPy, or None (never under the simulator: its arrays are host memory)."""
    if SIMULATOR:
        return None
    try:
        import cupy

        return cupy
    except Exception:
        return None


def _is_device(a: Any) -> bool:
    if isinstance(a, np.ndarray):
        return False
    if hasattr(a, "__cuda_array_interface__"):
        return True
    return SIMULATOR and type(a).__name__ == "FakeCUDAArray"


@functools.lru_cache(maxsize=1)
def _sm_count() -> int:
    if SIMULATOR:
        return 1
    try:
        return int(cuda.get_current_device().MULTIPROCESSOR_COUNT)
    except Exception:
        return 80


def _blocks(P: int, work_per_block: int | None = None) -> int:
    """Grid size: enough blocks to fill the device, at most one step of work per thread."""
    per_step = _THREADS * _PIX
    b = min(4 * _sm_count(), max(1, -(-P // per_step)))
    if work_per_block:
        b = min(b, max(1, -(-P // work_per_block)))
    return max(b, -(-P // _MAX_BLOCK_PIXELS), 1)


def _device_view(a: Any) -> Any:
    """A Numba device array for a device array (zero copy); contiguous, 1-D is done by caller."""
    if SIMULATOR:
        return a
    return cuda.as_cuda_array(a, sync=False)


def _flat_device(a: Any, dtype: np.dtype | type[np.generic] | None = None) -> Any:
    """Contiguous 1-D Numba device view of a device (or NumPy, moved) array, reinterpreted as dtype."""
    cp = _cupy()
    if isinstance(a, np.ndarray):
        h = np.ascontiguousarray(a).reshape(-1)
        if dtype is not None:
            h = h.view(dtype)
        return cuda.to_device(h)
    if cp is not None and isinstance(a, cp.ndarray):
        a = cp.ascontiguousarray(a).reshape(-1)
        if dtype is not None:
            a = a.view(dtype)
        return _device_view(a)
    d = _device_view(a)
    if not d.is_c_contiguous():
        raise ValueError("device arrays given to the GPU kernels must be C-contiguous")
    d = d.reshape(d.size)
    if dtype is not None:
        d = d.view(dtype)
    return d


def _stream() -> Any:
    """The stream device-mode kernels run on: CuPy's current stream, else the default (0)."""
    cp = _cupy()
    if cp is None:
        return 0
    ptr = cp.cuda.get_current_stream().ptr
    return cuda.external_stream(ptr) if ptr else 0


def _device_empty(shape: tuple[int, ...], dtype: Any, zero: bool = False) -> tuple[Any, Any]:
    """(user-facing array, Numba view) of a new device array."""
    cp = _cupy()
    if cp is not None:
        a = cp.zeros(shape, dtype) if zero else cp.empty(shape, dtype)
        return a, _device_view(a.reshape(-1))
    if zero:
        a = cuda.to_device(np.zeros(shape, dtype))
    else:
        a = cuda.device_array(shape, dtype)
    return a, a.reshape(int(np.prod(shape, dtype=np.int64)))


class _Staging(threading.local):
    """Per-thread streams and reusable pinned / device byte arenas of the host pipeline.

    Two slots (one per stream), each with an input and an output arena holding one chunk;
    typed buffers are aligned views into them, so the memory held per thread stays bounded
    (about 2 x (chunk inputs + chunk outputs), pinned and on the device) whatever the mix of
    calls.
    """

    def __init__(self) -> None:
        self.streams: list[Any] = []
        self.arenas: dict[tuple[int, str], tuple[np.ndarray, Any]] = {}

    def stream(self, slot: int) -> Any:
        while len(self.streams) <= slot:
            self.streams.append(cuda.stream())
        return self.streams[slot]

    def arena(self, slot: int, side: str, nbytes: int) -> tuple[np.ndarray, Any]:
        got = self.arenas.get((slot, side))
        if got is None or got[0].nbytes < nbytes:
            self.arenas.pop((slot, side), None)          # release the smaller one first
            n = max(int(nbytes), 1)
            got = (cuda.pinned_array((n,), dtype=np.uint8), cuda.device_array((n,), dtype=np.uint8))
            self.arenas[(slot, side)] = got
        return got


_staging = _Staging()
_ALIGN = 256


def _layout(arrays: Sequence[tuple[np.ndarray, int]], B: int) -> tuple[list[int], int]:
    """Byte offsets (256-aligned) of each array's ``B``-pixel chunk in an arena, and its size."""
    offsets, cur = [], 0
    for a, w in arrays:
        cur = -(-cur // _ALIGN) * _ALIGN
        offsets.append(cur)
        cur += B * w * a.dtype.itemsize
    return offsets, cur


def _pipeline(P: int, inputs: Sequence[tuple[np.ndarray, int]], outputs: Sequence[tuple[np.ndarray, int]],
              launch: Callable[[list, list, int, Any], None]) -> None:
    """Stream ``P`` pixels of host data through the device in chunks on two streams.

    ``inputs`` / ``outputs``: (flat C-contiguous host array, elements per pixel).
    ``launch(dev_inputs, dev_outputs, m, stream)`` queues the kernel(s) for an ``m``-pixel chunk.
    For chunk ``k`` on stream ``k % 2``: wait for that stream's previous chunk, copy its outputs
    out of the pinned arena, stage the new inputs into the pinned arena, queue the async
    host-to-device copies, the kernel and the async device-to-host copies, and move on.
    """
    per_px = sum(a.dtype.itemsize * w for a, w in inputs) or 1
    B = max(1, min(P, _CHUNK_PIXELS or _CHUNK_BYTES // per_px))
    in_off, in_bytes = _layout(inputs, B)
    out_off, out_bytes = _layout(outputs, B)
    pending: list[list] = [[], []]

    def drain(slot: int) -> None:
        for dst, lo, hi, host in pending[slot]:
            dst[lo:hi] = host
        pending[slot] = []

    def views(arena: tuple[np.ndarray, Any], off: int, a: np.ndarray, n: int) -> tuple[np.ndarray, Any]:
        nb = n * a.dtype.itemsize
        return arena[0][off:off + nb].view(a.dtype), arena[1][off:off + nb].view(a.dtype)

    for k, lo_px in enumerate(range(0, P, B)):
        hi_px = min(P, lo_px + B)
        m = hi_px - lo_px
        slot = k % 2
        stream = _staging.stream(slot)
        stream.synchronize()            # this slot's arenas are free again
        drain(slot)
        ain = _staging.arena(slot, "in", in_bytes)
        aout = _staging.arena(slot, "out", out_bytes)
        d_in = []
        for (a, w), off in zip(inputs, in_off):
            h, d = views(ain, off, a, m * w)
            h[...] = a[lo_px * w: hi_px * w]
            d.copy_to_device(h, stream=stream)
            d_in.append(d)
        d_out, h_out = [], []
        for (a, w), off in zip(outputs, out_off):
            h, d = views(aout, off, a, m * w)
            d_out.append(d)
            h_out.append(h)
        launch(d_in, d_out, m, stream)
        for (a, w), h, d in zip(outputs, h_out, d_out):
            d.copy_to_host(h, stream=stream)
            pending[slot].append((a, lo_px * w, hi_px * w, h))
    for slot in range(min(2, len(_staging.streams))):
        _staging.streams[slot].synchronize()
        drain(slot)


def _mode(arrays: Sequence[Any]) -> bool:
    """True (device mode) when any input is a device array."""
    return any(_is_device(a) for a in arrays)


def _launch_hist(kernel: Any, gt: Any, aux: tuple, ntab: int, C: int, out: Any, P: int, stream: Any) -> None:
    """Queue the counting of ``ntab`` tables over ``P`` pixels into ``out`` (flat uint64)."""
    per_tab = C * (C + 1)
    group = _SHARED_BINS // per_tab
    if group >= 1:                      # as many tables per launch as fit in shared memory
        for k0 in range(0, ntab, group):
            k1 = min(ntab, k0 + group)
            nbins = (k1 - k0) * per_tab
            blocks = _blocks(P, work_per_block=max(_THREADS * _PIX, 4 * nbins // max(1, k1 - k0)))
            kernel[blocks, _THREADS, stream, nbins * 4](gt, aux, k0, k1, C, True, out)
    else:                               # one table is larger than shared memory: global atomics
        kernel[_blocks(P), _THREADS, stream](gt, aux, 0, ntab, C, False, out)


def _confusion(kind: str, half: bool, gt: Any, pixel_inputs: Sequence[tuple[Any, int]],
               make_aux: Callable[[list], tuple], ntab: int, C: int) -> Any:
    """Shared driver of the four counting functions (host pipeline or device mode)."""
    kernel = _kernels(kind, half)
    nbins = ntab * C * (C + 1)
    shape = (ntab, C, C + 1)
    P = int(np.prod(gt.shape, dtype=np.int64))
    device = _mode([gt] + [a for a, _ in pixel_inputs])
    if device:
        res, out = _device_empty((nbins,), np.uint64, zero=True)
        if P and C:
            stream = _stream()
            d_gt = _flat_device(gt)
            d_in = [_flat_device(a, np.uint16 if half and w > 1 else None) for a, w in pixel_inputs]
            _launch_hist(kernel, d_gt, make_aux(d_in), ntab, C, out, P, stream)
        return res.view(np.int64).reshape(shape)
    if P == 0 or C == 0:
        return np.zeros(shape, np.int64)
    out = cuda.to_device(np.zeros(nbins, np.uint64))
    gt_h = np.ascontiguousarray(gt).reshape(-1)
    ins = [(gt_h, 1)]
    for a, w in pixel_inputs:
        h = np.ascontiguousarray(a).reshape(-1)
        ins.append((h.view(np.uint16) if half and w > 1 else h, w))

    def launch(d_in: list, d_out: list, m: int, stream: Any) -> None:
        _launch_hist(kernel, d_in[0], make_aux(d_in[1:]), ntab, C, out, m, stream)

    _pipeline(P, ins, [], launch)
    return out.copy_to_host().view(np.int64).reshape(shape)


# ----------------------------------------------------------------------------------------------
# public kernels
# ----------------------------------------------------------------------------------------------

@_serialised
def confusion_labels(gt: Any, sets: Sequence[Any], num_classes: int) -> Any:
    """Confusion counts of N label sets against ``gt`` in one fused pass.

    Parameters
    ----------
    gt : uint8 array, any shape (NumPy or device)
        Ground truth; values ``>= num_classes`` (255) are skipped for every set.
    sets : sequence of N uint8 arrays shaped like ``gt``
        Predictions; values ``>= num_classes`` are abstentions, counted in column C.
    num_classes : int
        C, background included.

    Returns
    -------
    int64 array (N, C, C+1)
        ``out[n, t, p]`` = pixels with ``gt == t`` and ``sets[n] == p``. NumPy for NumPy inputs,
        a device array otherwise.
    """
    gt, sets, C = confusion_labels_args(gt, sets, num_classes, host=False)
    return _confusion("labels", False, gt, [(s, 1) for s in sets], lambda d: (tuple(d),), len(sets), C)


@_serialised
def confusion_scores(gt: Any, sets: Sequence[Any], num_classes: int, bg_threshold: float = -1.0) -> Any:
    """Confusion counts of N score sets, decoded on the fly (never written to memory).

    Parameters
    ----------
    gt : uint8 array, any shape
        Ground truth; values ``>= num_classes`` are skipped.
    sets : sequence of N arrays shaped ``gt.shape + (C,)``
        uint8 / float16 / float32 scores, all of one dtype.
    num_classes : int
        C.
    bg_threshold : float, optional
        If >= 0, the background score is replaced by this value as stored in the scores' dtype
        (see :func:`threshold_value`).

    Returns
    -------
    int64 array (N, C, C+1)
        Confusion of ``decode_scores(sets[n], bg_threshold)``; column C stays 0.
    """
    gt, sets, C, dt, (use, thr, _) = confusion_scores_args(gt, sets, num_classes, bg_threshold, host=False)
    return _confusion("scores", dt == np.float16, gt, [(s, C) for s in sets],
                      lambda d: (tuple(d), use, thr), len(sets), C)


@_serialised
def decode_scores(scores: Any, bg_threshold: float = -1.0) -> Any:
    """Hard labels of a score stack: argmax over the last axis (first index wins ties).

    Parameters
    ----------
    scores : array (..., C) of uint8 / float16 / float32
    bg_threshold : float, optional
        If >= 0, the background slice (index 0) is replaced by this value (in the dtype).

    Returns
    -------
    uint8 array ``scores.shape[:-1]``
    """
    scores, C, dt, (use, thr, _) = decode_scores_args(scores, bg_threshold, host=False)
    shape = tuple(scores.shape)[:-1]   # (device arrays' shapes need not support negative indices)
    P = int(np.prod(shape, dtype=np.int64))
    half = dt == np.float16
    kernel = _kernels("decode", half)
    if _is_device(scores):
        res, out = _device_empty(shape, np.uint8)
        if P:
            kernel[_blocks(P), _THREADS, _stream()](_flat_device(scores, np.uint16 if half else None),
                                                     C, use, thr, out)
        return res
    result = np.empty(P, np.uint8)
    if P:
        h = np.ascontiguousarray(scores).reshape(-1)

        def launch(d_in: list, d_out: list, m: int, stream: Any) -> None:
            kernel[_blocks(m), _THREADS, stream](d_in[0], C, use, thr, d_out[0])

        _pipeline(P, [(h.view(np.uint16) if half else h, C)], [(result, 1)], launch)
    return result.reshape(shape)


def _small(a: np.ndarray) -> Any:
    """A small parameter array (selection, priority, ...) copied to the device."""
    return cuda.to_device(np.ascontiguousarray(a))


@_serialised
def merge_labels(sets: Sequence[Any], selection: Any, priority: Any, policy: int) -> Any:
    """Class-slice merge of N label sets (the paper's Algorithm 3, label encoding).

    Parameters
    ----------
    sets : sequence of N uint8 arrays of one shape
    selection : int64 (C,)
        ``selection[c]`` = the set chosen for class c (c >= 1; entry 0 unused).
    priority : float64 (N, C)
        For ``SCORE``: rank of set n's claim on class c (higher wins, ties -> lower class).
    policy : int
        ``SCORE`` (0), ``ORDER`` (1: lowest set index wins) or ``IGNORE`` (2: 255 on conflict).

    Returns
    -------
    uint8 array shaped like ``sets[0]``
        One claim -> its class; several -> policy; none -> 255 if every set abstains, else 0.
    """
    sets, C, sel, policy, prio = merge_labels_args(sets, selection, priority, policy, host=False)
    N = len(sets)
    sel = sel.reshape(1, C)
    mem = np.ones((1, N), np.uint8)
    shape = tuple(sets[0].shape)
    P = int(np.prod(shape, dtype=np.int64))
    kernel = _merge_labels_kernel
    device = _mode(sets)
    if device:
        res, out = _device_empty(shape, np.uint8)
        if P:
            d = tuple(_flat_device(s) for s in sets)
            kernel[_blocks(P), _THREADS, _stream()](d, _small(sel), _small(mem),
                                                     _small(prio), policy, C, out)
        return res
    result = np.empty(P, np.uint8)
    if P:
        d_sel, d_mem, d_prio = (_small(x) for x in (sel, mem, prio))

        def launch(d_in: list, d_out: list, m: int, stream: Any) -> None:
            kernel[_blocks(m), _THREADS, stream](tuple(d_in), d_sel, d_mem, d_prio, policy, C, d_out[0])

        _pipeline(P, [(np.ascontiguousarray(s).reshape(-1), 1) for s in sets], [(result, 1)], launch)
    return result.reshape(shape)


@_serialised
def merge_scores(sets: Sequence[Any], selection: Any, policy: int,
                 bg_threshold: float = -1.0) -> tuple[Any, Any]:
    """Class-slice merge of N score stacks: ``merged[..., c] = sets[selection[c]][..., c]``.

    Parameters
    ----------
    sets : sequence of N arrays (..., C), uint8 / float16 / float32, one dtype
    selection : int64 (C,)
        ``selection[c]`` = the set whose slice c is used, c = 0 (background) included.
    policy : int
        ``SCORE`` / ``ORDER`` / ``IGNORE`` (how pixels claimed by several classes are decided).
    bg_threshold : float, optional
        If >= 0, ``merged[..., 0]`` is this value (in the dtype) instead of a set's slice.

    Returns
    -------
    labels : uint8 array ``sets[0].shape[:-1]``
        Class c >= 1 claims a pixel when ``merged[..., c] > merged[..., 0]``; no claim -> 0;
        several -> SCORE: highest merged value (ties -> lower c); ORDER: lowest
        ``selection[c]`` (ties -> lower c); IGNORE: 255.
    merged : array like ``sets[0]`` (same dtype)
    """
    sets, C, sel, policy, dt, (use, thr, raw) = merge_scores_args(sets, selection, policy, bg_threshold,
                                                                  host=False)
    shape = tuple(sets[0].shape)
    sel = sel.reshape(1, C)
    half = dt == np.float16
    view = np.uint16 if half else None
    kernel = _kernels("merge_scores", half)
    P = int(np.prod(shape[:-1], dtype=np.int64))
    if _mode(sets):
        lab, d_lab = _device_empty(shape[:-1], np.uint8)
        mer, d_mer = _device_empty(shape, dt)
        if P:
            d = tuple(_flat_device(s, view) for s in sets)
            d_m = d_mer.view(view) if half else d_mer
            kernel[_blocks(P), _THREADS, _stream()](d, _small(sel), policy, use, thr, raw, C, d_lab, d_m)
        return lab, mer
    labels = np.empty(P, np.uint8)
    merged = np.empty(P * C, dt)
    if P:
        d_sel = _small(sel)

        def launch(d_in: list, d_out: list, m: int, stream: Any) -> None:
            kernel[_blocks(m), _THREADS, stream](tuple(d_in), d_sel, policy, use, thr, raw, C,
                                                 d_out[0], d_out[1])

        ins = []
        for s in sets:
            h = np.ascontiguousarray(s).reshape(-1)
            ins.append((h.view(np.uint16) if half else h, C))
        _pipeline(P, ins, [(labels, 1), (merged.view(np.uint16) if half else merged, C)], launch)
    return labels.reshape(shape[:-1]), merged.reshape(shape)


@_serialised
def subset_confusion_labels(gt: Any, sets: Sequence[Any], selections: Any, members: Any, priority: Any,
                            policy: int, num_classes: int) -> Any:
    """Confusion of the merged label of every subset of the sets, in one pass over the data.

    Parameters
    ----------
    gt : uint8 array, any shape
    sets : sequence of N uint8 arrays shaped like ``gt``
    selections : int64 (S, C)
        Selection of subset s (entries c >= 1 point at member sets).
    members : bool / uint8 (S, N)
        Which sets are in subset s.
    priority : float64 (N, C)
    policy : int
    num_classes : int

    Returns
    -------
    int64 (S, C, C+1)
        ``out[s]`` = confusion of :func:`merge_labels` over the members of s against ``gt``
        (merged 255 counted in column C).
    """
    gt, sets, C, sel, mem, policy, prio = subset_confusion_labels_args(
        gt, sets, selections, members, priority, policy, num_classes, host=False)
    d_sel, d_mem, d_prio = (_small(x) for x in (sel, mem.astype(np.uint8), prio))
    return _confusion("subset_labels", False, gt, [(s, 1) for s in sets],
                      lambda d: (tuple(d), d_sel, d_mem, d_prio, policy), sel.shape[0], C)


@_serialised
def subset_confusion_scores(gt: Any, sets: Sequence[Any], selections: Any, members: Any, policy: int,
                            num_classes: int, bg_threshold: float = -1.0) -> Any:
    """Confusion of the merged score stack of every subset, in one pass over the data.

    Parameters
    ----------
    gt : uint8 array, any shape
    sets : sequence of N score arrays ``gt.shape + (C,)``, one dtype
    selections : int64 (S, C)
        ``selections[s, 0]`` is the background set of subset s.
    members : bool / uint8 (S, N)
    policy : int
    num_classes : int
    bg_threshold : float, optional

    Returns
    -------
    int64 (S, C, C+1)
        ``out[s]`` = confusion of :func:`merge_scores` labels over the members of s.
    """
    gt, sets, C, sel, _, policy, dt, (use, thr, _) = subset_confusion_scores_args(
        gt, sets, selections, members, policy, num_classes, bg_threshold, host=False)
    d_sel = _small(sel)
    return _confusion("subset_scores", dt == np.float16, gt, [(s, C) for s in sets],
                      lambda d: (tuple(d), d_sel, policy, use, thr), sel.shape[0], C)
