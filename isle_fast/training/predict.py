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

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from isle_fast.errors import InputError, IsleError, param
from isle_fast.outputs import FolderOutput, check_output
from isle_fast.progress import Timer, progress, summary
from isle_fast.training.data import SegmentationDataset, normalize, worker_error
from isle_fast.training.deeplab import DeepLabV3Plus
from isle_fast.training.runtime import (
    amp_dtype,
    checkpoint_path,
    load_checkpoint,
    resolve_device,
    resolve_threads,
    torch_threads,
)

__all__ = ["load_model", "predict_probs", "predict", "PredictResult"]

def load_model(run: str | os.PathLike, which: str = "best",
               device: torch.device | str = "cpu") -> tuple[DeepLabV3Plus, dict]:
    """The model of a run (eval mode, on ``device``) and its checkpoint metadata (config, classes, step)."""
    path = checkpoint_path(run, which)
    ck = load_checkpoint(path)
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
    acc: torch.Tensor | None = None
    count = torch.zeros((1, 1, H, W), device=x.device)
    for y0 in ys:
        for x0 in xs:
            p = run(xp[..., y0:y0 + window, x0:x0 + window])
            if acc is None:
                acc = torch.zeros((1, p.shape[1], H, W), device=x.device)
            acc[..., y0:y0 + window, x0:x0 + window] += p
            count[..., y0:y0 + window, x0:x0 + window] += 1
    assert acc is not None, "the windows cover the image"
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
    total: torch.Tensor | None = None
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
    if total is None:
        raise InputError("scales must hold at least one scale")
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
    from isle_fast.stores.stack import StackWriter, create_stack

    if format not in ("store", "png"):
        raise InputError(f"{param('format')} must be store or png, not {format!r}")
    if window is not None and window < 16:
        raise InputError(f"{param('window')} must be at least 16 pixels, not {window}")
    scales = tuple(float(s) for s in scales)
    if not scales or min(scales) <= 0:
        raise InputError(f"{param('scales')} must be positive numbers, not {scales}")
    timer = Timer()
    dev = resolve_device(device)
    amp = (dev.type == "cuda") if amp is None else bool(amp)
    model, meta = load_model(run, which, dev)
    classes = list(meta["classes"])
    ds = SegmentationDataset(images, None, train=False)
    outp = Path(out)
    # never the images or the checkpoint (nor inside / holding them), never what isle did not write; a
    # run's own folder may hold its predictions (run/val_pred.zarr)
    check_output(out, overwrite=overwrite, inputs=[images, meta["path"]])
    loader = torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False, num_workers=num_workers,
                                         pin_memory=dev.type == "cuda")
    writer: StackWriter | FolderOutput
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
        writer, padded = FolderOutput(out, command="isle predict", overwrite=overwrite, check=False), None
    try:
        with torch_threads(resolve_threads(threads, dev)):
            try:
                _predict_loop(model, loader, len(ds), ds.ids, scales, flip, window, amp, quiet,
                              writer=writer if isinstance(writer, StackWriter) else None, padded=padded,
                              png_dir=writer.work if isinstance(writer, FolderOutput) else None)
            except IsleError as exc:  # met by a DataLoader worker: its message, not its traceback
                clean = worker_error(exc)
                if clean is exc:
                    raise
                raise clean from None
        writer.commit()
    except BaseException:
        writer.abort()
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
            from isle_fast.stores.png import write_label_png

            assert png_dir is not None, "PNG output without a folder"
            write_label_png(png_dir / f"{ids[i]}.png", lab)
