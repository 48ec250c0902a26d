"""Inference with a trained DeepLabV3+ run: label stores or VOC palette PNGs.

Every image is predicted at its true shape (``Stack.shapes``), either whole
(default) or with a sliding window (``window`` pixels square, stride 2/3 of
the window, overlapping softmax probabilities averaged); small images are
padded with the mean colour (0 after normalisation) up to the window.
Test-time augmentation averages the softmax probabilities of every requested
scale (the image resized, logits resized back) and, with ``flip``, of the
horizontally flipped image. The result is the argmax, class 0 winning ties.

Output is a ``labels`` store of kind ``pseudo`` (so ``isle evaluate`` scores
it like any other set), aligned with the images store (same ids, order,
shapes and padding), or a folder of VOC palette PNGs named ``<id>.png``.
Both appear only when complete.
"""

from __future__ import annotations

import math
import os
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from isle_fast.training.data import SegmentationDataset, normalize, worker_error
from isle_fast.training.deeplab import DeepLabV3Plus
from isle_fast.errors import InputError, IsleError, StoreError
from isle_fast.progress import Timer, progress, summary

__all__ = ["load_model", "resolve_device", "amp_dtype", "resolve_threads", "ThreadGovernor", "torch_threads",
           "predict_probs", "predict", "PredictResult", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = "isle-fast-deeplab"


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; an unusable ``cuda`` is an :class:`InputError`."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"--device must be auto, cpu or cuda[:N], not {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {device}: torch sees no CUDA device here (use --device cpu)")
    return dev


def amp_dtype(device_type: str) -> torch.dtype:
    """Autocast dtype of mixed precision: float16 on CUDA (with a GradScaler in training), bfloat16 on CPU.

    bfloat16 has float32's exponent range, so CPU training needs no loss scaling; it
    is only faster on CPUs with native bfloat16 instructions (AVX-512 BF16 / AMX).
    """
    return torch.float16 if device_type == "cuda" else torch.bfloat16


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _cpu_times() -> tuple[int, int] | None:
    """(total, idle + iowait) jiffies of all CPUs from ``/proc/stat``; None where it cannot be read."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return sum(vals[:8]), vals[3] + (vals[4] if len(vals) > 4 else 0)


class _LoadWindow:
    """Cores busy with *other* processes between two points in time (see :func:`busy_cores`)."""

    def __init__(self) -> None:
        import time

        self.start = (_cpu_times(), time.process_time(), time.perf_counter())

    def others(self) -> float | None:
        import time

        (a, own0, t0), b = self.start, _cpu_times()
        own1, t1 = time.process_time(), time.perf_counter()
        if a is None or b is None or b[0] - a[0] <= 0 or t1 <= t0:
            return None
        total, idle = b[0] - a[0], b[1] - a[1]
        busy = (total - idle) / total * (os.cpu_count() or 1)  # cores busy, all processes
        return max(0.0, busy - (own1 - own0) / (t1 - t0))


def busy_cores(seconds: float = 0.2) -> float | None:
    """Cores kept busy by *other* processes over ``seconds`` (Linux ``/proc/stat``), None elsewhere.

    The machine-wide busy time minus this process's own CPU time, in cores.
    """
    import time

    w = _LoadWindow()
    time.sleep(seconds)
    return w.others()


def _free_cores(others: float, limit: int) -> int:
    """Threads for the cores others leave idle: usable cores minus busy ones (a quarter core is noise)."""
    return max(1, min(limit, _usable_cores() - int(math.ceil(others - 0.25))))


class ThreadGovernor:
    """Re-chooses torch's CPU thread count while a long job runs, as the machine's load changes.

    :func:`resolve_threads` looks at the load once; on a shared machine other
    jobs come and go during a training run. :meth:`update` (call it between
    steps; cheap) measures, every ``period`` seconds, the cores other
    processes kept busy since the last look and sets ``torch.set_num_threads``
    to the cores left idle (at most ``limit``). Disabled (never changes
    anything) when ``enabled`` is False: an explicit ``threads``, a
    deterministic run (the thread count can change results in the last bits),
    or a device other than the CPU.
    """

    def __init__(self, enabled: bool, limit: int, period: float = 5.0):
        self.enabled = bool(enabled) and _cpu_times() is not None
        self.limit = max(1, int(limit))
        self.period = float(period)
        self.changes = 0
        self._window = _LoadWindow()

    def update(self) -> int:
        """The current thread count, changed first if the last ``period`` seconds call for it."""
        import time

        current = torch.get_num_threads()
        if not self.enabled or time.perf_counter() - self._window.start[2] < self.period:
            return current
        others = self._window.others()
        self._window = _LoadWindow()
        if others is None:
            return current
        want = _free_cores(others, self.limit)
        if want != current:
            torch.set_num_threads(want)
            self.changes += 1
        return want


def resolve_threads(threads: int | None, device: torch.device, deterministic: bool = False) -> int:
    """Intra-op threads for CPU work: ``threads`` if given, else one per core *not busy elsewhere*.

    Why: torch's CPU kernels split every operation over ``torch.get_num_threads()``
    OpenMP threads (by default one per core) and wait at a barrier for all of
    them. On a machine where other processes keep cores busy, one of those
    threads is often descheduled, and every operation waits for it: measured
    here (2 cores, one busy with another process) a DeepLabV3+ training step
    ran 3-5x *slower* with 2 threads than with 1, and a tiny BatchNorm took
    35 ms instead of 0.05 ms. So the automatic choice is the number of usable
    cores minus the cores other processes kept busy over 0.2 s
    (:func:`busy_cores`, rounded up), at least 1; training re-checks it every
    few seconds (:class:`ThreadGovernor`). With ``deterministic`` (or
    where the load cannot be read, or on CUDA) it is torch's current setting:
    results may differ in the last bits with the thread count, so a load-based
    choice would make reruns differ.
    """
    if threads is not None:
        if int(threads) < 1:
            raise InputError(f"--threads must be at least 1, not {threads}")
        return int(threads)
    current = torch.get_num_threads()
    if device.type != "cpu" or deterministic:
        return current
    busy = busy_cores()
    if busy is None:
        return current
    return _free_cores(busy, current)


class torch_threads:
    """Context manager: ``torch.set_num_threads(n)`` inside, the previous count restored after."""

    def __init__(self, n: int):
        self.n = int(n)

    def __enter__(self) -> int:
        self.old = torch.get_num_threads()
        if self.n != self.old:
            torch.set_num_threads(self.n)
        return self.n

    def __exit__(self, *exc) -> None:
        if torch.get_num_threads() != self.old:
            torch.set_num_threads(self.old)


def checkpoint_path(run: str | os.PathLike, which: str = "best") -> Path:
    """The checkpoint file of a run folder (``best`` falls back to ``final`` then ``last``) or a file."""
    p = Path(run)
    if p.is_file():
        return p
    if not p.is_dir():
        raise InputError(f"run {p} does not exist (give the folder `isle train --out` wrote, or a .pt file)")
    order = {"best": ("best.pt", "final.pt", "last.pt"), "final": ("final.pt", "last.pt"),
             "last": ("last.pt",)}.get(which)
    if order is None:
        raise InputError(f"--checkpoint must be best, final or last, not {which!r}")
    for name in order:
        if (p / name).is_file():
            return p / name
    raise InputError(f"run {p} holds no checkpoint ({', '.join(order)}); did training finish a step?")


def load_model(run: str | os.PathLike, which: str = "best",
               device: torch.device | str = "cpu") -> tuple[DeepLabV3Plus, dict]:
    """The model of a run (eval mode, on ``device``) and its checkpoint metadata (config, classes, step)."""
    path = checkpoint_path(run, which)
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"could not read checkpoint {path}: {exc}") from None
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"{path} is not an isle-fast DeepLabV3+ checkpoint")
    cfg = ck["config"]
    model = DeepLabV3Plus(len(ck["classes"]), cfg["backbone"], None, cfg["output_stride"],
                          cfg["head_channels"])
    model.load_state_dict(ck["model"])
    model.to(device).eval()
    meta = {k: v for k, v in ck.items() if k not in ("model", "optimizer", "scheduler", "scaler", "rng")}
    meta["path"] = str(path)
    return model, meta


def _logits(model: torch.nn.Module, x: torch.Tensor, window: int | None, amp: bool) -> torch.Tensor:
    """Softmax probabilities ``(1, C, h, w)`` of a normalised ``(1, 3, h, w)`` image."""
    dev_type = x.device.type

    def run(t: torch.Tensor) -> torch.Tensor:
        with torch.autocast(dev_type, dtype=amp_dtype(dev_type), enabled=amp):
            return torch.softmax(model(t).float(), dim=1)

    h, w = x.shape[-2:]
    if window is None or (h <= window and w <= window):
        return run(x)
    ph, pw = max(0, window - h), max(0, window - w)
    xp = F.pad(x, (0, pw, 0, ph)) if (ph or pw) else x
    H, W = xp.shape[-2:]
    stride = max(1, (2 * window) // 3)
    ys = list(range(0, max(H - window, 0) + 1, stride))
    xs = list(range(0, max(W - window, 0) + 1, stride))
    if ys[-1] + window < H:
        ys.append(H - window)
    if xs[-1] + window < W:
        xs.append(W - window)
    acc = None
    count = torch.zeros((1, 1, H, W), device=x.device)
    for y0 in ys:
        for x0 in xs:
            p = run(xp[..., y0:y0 + window, x0:x0 + window])
            if acc is None:
                acc = torch.zeros((1, p.shape[1], H, W), device=x.device)
            acc[..., y0:y0 + window, x0:x0 + window] += p
            count[..., y0:y0 + window, x0:x0 + window] += 1
    return (acc / count)[..., :h, :w]


@torch.no_grad()
def predict_probs(model: torch.nn.Module, image: torch.Tensor, *, scales: Sequence[float] = (1.0,),
                  flip: bool = False, window: int | None = None, amp: bool = False) -> torch.Tensor:
    """Mean softmax probabilities ``(C, h, w)`` of one ``uint8`` ``(3, h, w)`` image (on the model's device).

    Parameters
    ----------
    model : torch.nn.Module
        In eval mode.
    image : torch.Tensor
        ``uint8`` ``(3, h, w)``; moved to the model's device here.
    scales : sequence of float
        Test-time scales (1.0 alone: no multi-scale).
    flip : bool
        Also average the horizontally flipped prediction.
    window : int, optional
        Sliding-window side; whole-image inference when None.
    amp : bool
        Autocast: float16 on CUDA, bfloat16 on CPU (:func:`amp_dtype`).
    """
    dev = next(model.parameters()).device
    x = normalize(image.unsqueeze(0).to(dev, non_blocking=True))
    h, w = x.shape[-2:]
    total = None
    n = 0
    for s in scales:
        xs = x if s == 1.0 else F.interpolate(
            x, size=(max(1, round(h * s)), max(1, round(w * s))), mode="bilinear", align_corners=False)
        views = [(xs, False)] + ([(xs.flip(-1), True)] if flip else [])
        for v, flipped in views:
            p = _logits(model, v, window, amp)
            if flipped:
                p = p.flip(-1)
            if p.shape[-2:] != (h, w):
                p = F.interpolate(p, size=(h, w), mode="bilinear", align_corners=False)
            total = p if total is None else total + p
            n += 1
    return (total / n)[0]


@dataclass
class PredictResult:
    """What :func:`predict` wrote."""

    path: str
    format: str
    images: int
    seconds: float
    checkpoint: str

    def to_dict(self) -> dict:
        return asdict(self)


def predict(run: str | os.PathLike, images: str | os.PathLike, out: str | os.PathLike, *,
            format: str = "store", which: str = "best", scales: Sequence[float] = (1.0,),
            flip: bool = False, window: int | None = None, device: str = "auto",
            amp: bool | None = None, num_workers: int = 0, threads: int | None = None,
            overwrite: bool = False, name: str | None = None, quiet: bool = False) -> PredictResult:
    """Predict every image of an images store with a trained run.

    Parameters
    ----------
    run : path
        Run folder of :func:`isle_fast.training.train.train` (or a checkpoint file).
    images : path
        Store of kind ``images``.
    out : path
        Label store (``format='store'``) or PNG folder (``format='png'``).
    format : {'store', 'png'}
    which : {'best', 'final', 'last'}
        Checkpoint of the run: best validation mIoU (falls back to final), final, or last saved.
    scales, flip, window
        Test-time augmentation and sliding window (see :func:`predict_probs`).
    device : str
        ``auto``, ``cpu`` or ``cuda[:N]``.
    amp : bool, optional
        Autocast (float16 on CUDA, bfloat16 on CPU); default on for CUDA only.
    num_workers : int
        DataLoader workers reading images.
    threads : int, optional
        torch CPU threads; default one per core not busy elsewhere (:func:`resolve_threads`).
    overwrite : bool
        Replace an existing output (only once the new one is complete).
    name : str, optional
        Set name of the output store (default: its folder name).
    quiet : bool
        No progress bar or summary.

    Returns
    -------
    PredictResult
    """
    from isle_fast.stores.stack import create_stack

    if format not in ("store", "png"):
        raise InputError(f"--format must be store or png, not {format!r}")
    if window is not None and window < 16:
        raise InputError(f"--window must be at least 16 pixels, not {window}")
    scales = tuple(float(s) for s in scales)
    if not scales or min(scales) <= 0:
        raise InputError(f"--scales must be positive numbers, not {scales}")
    timer = Timer()
    dev = resolve_device(device)
    amp = (dev.type == "cuda") if amp is None else bool(amp)
    model, meta = load_model(run, which, dev)
    classes = list(meta["classes"])
    ds = SegmentationDataset(images, None, train=False)
    outp = Path(out)
    if outp.exists() and not overwrite:
        raise StoreError(f"{outp} exists; pass --overwrite to replace it")
    loader = torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False, num_workers=num_workers,
                                         pin_memory=dev.type == "cuda")
    if format == "store":
        from isle_fast.stores.stack import open_stack

        src = open_stack(images)
        writer = create_stack(out, kind="pseudo", classes=classes, ids=ds.ids, shapes=ds.shapes,
                              padded_shape=src.padded_shape, name=name, overwrite=overwrite,
                              provenance={"source": "isle predict", "checkpoint": meta["path"],
                                          "images": str(images), "step": int(meta.get("step", 0)),
                                          "scales": list(scales), "flip": flip, "window": window})
        padded = tuple(src.padded_shape)
    else:
        writer, padded = None, None
        tmp = outp.with_name(f"{outp.name}.tmp-{uuid.uuid4().hex[:12]}")
        tmp.mkdir(parents=True)
    try:
        with torch_threads(resolve_threads(threads, dev)):
            try:
                _predict_loop(model, loader, len(ds), ds.ids, scales, flip, window, amp, quiet,
                              writer=writer, padded=padded, png_dir=tmp if writer is None else None)
            except IsleError as exc:  # met by a DataLoader worker: its message, not its traceback
                clean = worker_error(exc)
                if clean is exc:
                    raise
                raise clean from None
        if format == "store":
            writer.commit()
        else:
            if outp.exists():
                trash = outp.with_name(f"{outp.name}.old-{uuid.uuid4().hex[:8]}")
                os.replace(outp, trash)
                shutil.rmtree(trash, ignore_errors=True)
            os.replace(tmp, outp)
    except BaseException:
        if format == "store":
            writer.abort()
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    res = PredictResult(str(outp), format, len(ds), timer.seconds, meta["path"])
    summary("isle predict", {"images": len(ds), "checkpoint": f"{meta['path']} (step {meta.get('step')})",
                             "tta": f"scales {list(scales)}, flip {flip}, window {window}",
                             "seconds": f"{res.seconds:.1f}", "output": str(outp)}, quiet=quiet)
    return res


def _predict_loop(model, loader, n: int, ids: list, scales, flip, window, amp, quiet, *,
                  writer=None, padded=None, png_dir: Path | None = None) -> None:
    """Predict every image of ``loader`` into ``writer`` (a label store, whole chunks) or PNGs in ``png_dir``."""
    if writer is not None:
        k = int(writer.array.chunks[0])
        block = np.full((k,) + tuple(padded), 255, np.uint8)
        start = 0
    for i, (img, _) in enumerate(progress(loader, total=n, desc="predict", unit="img", quiet=quiet)):
        probs = predict_probs(model, img, scales=scales, flip=flip, window=window, amp=amp)
        lab = probs.argmax(0).to(torch.uint8).cpu().numpy()
        if writer is not None:
            j = i - start
            block[j] = 255
            block[j, :lab.shape[0], :lab.shape[1]] = lab
            if j == k - 1 or i == n - 1:
                writer.write_block(start, block[:j + 1])
                start = i + 1
        else:
            from isle_fast.synthetic.datasets import write_label_png

            write_label_png(png_dir / f"{ids[i]}.png", lab)
