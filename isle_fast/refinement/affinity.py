"""AffinityNet (Ahn & Kwak, CVPR 2018): learned pixel affinities + random walk on CAMs.

The refinement registered as ``affinity``. It has three parts:

**Affinity labels** (:func:`confident_labels`, :func:`pair_labels`). From a
set's CAM scores, two background scores ``(1 - max_c p_c)^alpha`` with a low
and a high ``alpha`` give confident regions: where a foreground class still
wins against the *amplified* background (``alpha_lo = 4``) it is confident
foreground; where background wins even when *weakened* (``alpha_hi = 32``)
it is confident background; the rest is unsure (255). These are the
defaults of the authors' code (the paper also runs a dense CRF on both; we do
not, for speed; chain a CRF before AffinityNet if wanted). The stored
background slice is not used for this. For a ``labels`` set the labels
themselves are the confident regions (255 stays unsure). On the feature grid
(stride 8, or 4), every pair of pixels within ``radius`` (5) whose labels
are both known is a positive foreground pair (same class >= 1), a positive
background pair (both 0) or a negative pair (different labels).

**The network** (:class:`AffinityNet`). A torchvision ResNet-50 (or 18 / 34 /
101 for quick runs) from :func:`isle_fast.training.backbones.load_resnet`; ResNet-50/101
are dilated to output stride 8. Features of ``layer1``, ``layer2`` and
``layer4`` pass 1x1 convolutions (64, 128, 256 channels, ELU), are resized
to the grid (``ceil(H / stride)``) and concatenated, then a last 1x1
convolution gives 448-channel features ``f``. The affinity of pixels ``i, j``
is ``a_ij = exp(-mean_d |f_i[d] - f_j[d]|)`` (the L1 distance *averaged* over
channels, as in the authors' code, so that a randomly initialised network does
not start at ``a = 0``). Loss (:func:`affinity_loss`): the cross-entropy of
positive background pairs, of positive foreground pairs (each averaged over
its own pairs) and of negative pairs, combined as
``L = L_bg/4 + L_fg/4 + L_neg/2``. Training: SGD (momentum 0.9, weight decay
5e-4, poly learning-rate decay, heads at 10x the backbone's rate), random
crops and flips, BatchNorm statistics frozen; a checkpoint
(``torch.save`` of state dicts, loaded with ``weights_only=True``) is written
after every epoch and training resumes from it (``--resume``).

**Inference** (:func:`random_walk_image`). Affinities to every neighbour
within ``radius`` (a disc, including the pixel itself), raised to
``beta = 8``, row-normalised into a transition matrix ``T``; the CAMs (with a
background slice ``(1 - max fg)^alpha``, ``alpha = 16`` as in the authors'
inference code, or the stored slice with ``background='stored'``) are
average-pooled to the grid, walked ``2^logt`` steps (``logt = 6``, 64 steps;
the AffinityNet paper used ``t = 256``) as ``v <- T v`` on a sparse stencil
(:func:`isle_fast.kernels.refine_cpu.random_walk`; on a GPU the same
stencil in torch), upsampled bilinearly to full size and cropped to the
image. ``T`` is row-stochastic, so walked scores stay in [0, 1] and a class
that is 0 everywhere stays 0: the walk never invents a class. The output
keeps the input's encoding (``output='auto'``): walked scores, or their
argmax for a labels set.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from isle_fast.errors import InputError, param
from isle_fast.refinement.chain import PrepareContext, RefineChunk, Refinement

__all__ = [
    "confident_labels",
    "pair_labels",
    "AffinityNet",
    "feature_affinity",
    "affinity_loss",
    "train_affinity",
    "load_affinity",
    "random_walk_image",
    "random_walk_torch",
    "AffinityNetRefinement",
]

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


# ----------------------------------------------------------------------------------------------
# Affinity labels
# ----------------------------------------------------------------------------------------------
def confident_labels(data: np.ndarray, encoding: str = "scores", *, alpha_lo: float = 4.0,
                     alpha_hi: float = 32.0) -> np.ndarray:
    """Confident foreground / background / unsure (255) regions of one image.

    Parameters
    ----------
    data : (h, w, C) float scores in [0, 1] or (h, w) uint8 labels
    encoding : {'scores', 'labels'}
    alpha_lo, alpha_hi : float
        Exponents of the amplified and weakened background ``(1 - max fg)^alpha``.

    Returns
    -------
    (h, w) uint8
        Class >= 1 = confident foreground, 0 = confident background, 255 = unsure.
    """
    if encoding == "labels":
        out = data.astype(np.uint8, copy=True)
        return out
    if not 0 < alpha_lo <= alpha_hi:
        raise InputError(f"affinity.alpha_lo ({alpha_lo}) must be > 0 and <= affinity.alpha_hi ({alpha_hi})")
    fg = data[..., 1:].astype(np.float32)
    out = np.full(data.shape[:2], 255, dtype=np.uint8)
    if fg.shape[-1] == 0:
        out[:] = 0
        return out
    m = fg.max(axis=-1)
    arg = fg.argmax(axis=-1) + 1
    base = np.clip(1.0 - m, 0.0, 1.0)
    fg_conf = m > base ** alpha_lo      # a class beats the amplified background
    bg_conf = m <= base ** alpha_hi     # background wins even when weakened (ties -> background, argmax rule)
    out[bg_conf] = 0
    out[fg_conf] = arg[fg_conf].astype(np.uint8)
    return out


def pair_labels(labels: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Affinity labels of every pixel pair ``(p, p + offset)`` on a grid.

    Parameters
    ----------
    labels : (..., h, w) uint8
        Grid labels; values >= 255 (unsure) give no pair.
    offsets : (K, 2) int
        Usually ``disc_offsets(radius, half=True)`` (each unordered pair once).

    Returns
    -------
    bg_pos, fg_pos, neg : (..., K, h, w) bool
        Pair ``(p, p + o_k)`` (stored at ``p``) is a positive background pair
        (both 0), a positive foreground pair (same class >= 1) or a negative
        pair (different known labels). Pairs leaving the grid are none of them.
    """
    lab = np.asarray(labels)
    h, w = lab.shape[-2:]
    lead = lab.shape[:-2]
    k_n = len(offsets)
    shape = lead + (k_n, h, w)
    bg, fg, neg = (np.zeros(shape, dtype=bool) for _ in range(3))
    known = lab < 255
    for k, (dy, dx) in enumerate(np.asarray(offsets, dtype=np.int64)):
        y0, y1 = max(0, -dy), min(h, h - dy)
        x0, x1 = max(0, -dx), min(w, w - dx)
        if y0 >= y1 or x0 >= x1:
            continue
        a = lab[..., y0:y1, x0:x1]
        b = lab[..., y0 + dy:y1 + dy, x0 + dx:x1 + dx]
        both = known[..., y0:y1, x0:x1] & known[..., y0 + dy:y1 + dy, x0 + dx:x1 + dx]
        same = both & (a == b)
        bg[..., k, y0:y1, x0:x1] = same & (a == 0)
        fg[..., k, y0:y1, x0:x1] = same & (a != 0)
        neg[..., k, y0:y1, x0:x1] = both & (a != b)
    return bg, fg, neg


def _grid_sample_labels(labels: np.ndarray, stride: int) -> np.ndarray:
    """Labels at the centre pixel of every ``stride x stride`` cell: ``(ceil(h/s), ceil(w/s))``."""
    h, w = labels.shape[-2:]
    ys = np.minimum(np.arange(math.ceil(h / stride)) * stride + stride // 2, h - 1)
    xs = np.minimum(np.arange(math.ceil(w / stride)) * stride + stride // 2, w - 1)
    return labels[..., ys[:, None], xs[None, :]]


# ----------------------------------------------------------------------------------------------
# The network
# ----------------------------------------------------------------------------------------------
def _torch():
    import torch

    return torch


def resolve_device(device: str = "auto") -> str:
    """``'cuda'`` when ``device='auto'`` and CUDA is available, else ``device`` (``'cpu'`` for auto)."""
    from isle_fast.training.runtime import resolve_device as torch_device

    dev = torch_device(device, name="affinity.device")
    return dev.type if device in (None, "", "auto") else str(device)


def _build_model_class():
    torch = _torch()
    nn = torch.nn
    F = torch.nn.functional

    from isle_fast.training.backbones import ParameterGroups

    class _AffinityNet(ParameterGroups, nn.Module):
        HEAD_MODULES = ("head1", "head2", "head4", "fuse")

        def __init__(self, backbone: str = "resnet50", weights: Any = None, stride: int = 8, dim: int = 448):
            super().__init__()
            from isle_fast.training.backbones import load_resnet, out_channels

            if stride not in (4, 8):
                raise InputError(f"affinity.stride must be 4 or 8, not {stride}")
            bottleneck = backbone in ("resnet50", "resnet101")
            res = load_resnet(backbone, weights,
                              replace_stride_with_dilation=[False, True, True] if bottleneck else None)
            self.stem = nn.Sequential(res.conv1, res.bn1, res.relu, res.maxpool)
            self.layer1, self.layer2, self.layer3, self.layer4 = res.layer1, res.layer2, res.layer3, res.layer4
            c1, c2, c4 = out_channels(res.layer1), out_channels(res.layer2), out_channels(res.layer4)
            d1, d2 = dim // 7, 2 * dim // 7
            d4 = dim - d1 - d2
            self.head1 = nn.Conv2d(c1, d1, 1, bias=False)
            self.head2 = nn.Conv2d(c2, d2, 1, bias=False)
            self.head4 = nn.Conv2d(c4, d4, 1, bias=False)
            self.fuse = nn.Conv2d(dim, dim, 1, bias=False)
            for m in (self.head1, self.head2, self.head4, self.fuse):
                nn.init.kaiming_normal_(m.weight)
            self.stride = stride
            self.dim = dim
            self.backbone_name = backbone

        def train(self, mode: bool = True):
            super().train(mode)
            for m in self.modules():  # frozen BatchNorm statistics (small batches)
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
            return self

        def forward(self, x):
            h, w = x.shape[-2:]
            gh, gw = math.ceil(h / self.stride), math.ceil(w / self.stride)
            x = self.stem(x)
            x1 = self.layer1(x)
            x2 = self.layer2(x1)
            x4 = self.layer4(self.layer3(x2))

            def grid(t):
                return t if t.shape[-2:] == (gh, gw) else F.interpolate(
                    t, size=(gh, gw), mode="bilinear", align_corners=False)

            f = torch.cat([grid(F.elu(self.head1(x1))), grid(F.elu(self.head2(x2))),
                           grid(F.elu(self.head4(x4)))], dim=1)
            return F.elu(self.fuse(f))

    return _AffinityNet


_MODEL_CLASS = None


def AffinityNet(backbone: str = "resnet50", weights: Any = None, stride: int = 8, dim: int = 448):
    """The affinity network (a ``torch.nn.Module``): images ``(N, 3, H, W)`` -> features
    ``(N, dim, ceil(H/s), ceil(W/s))``.

    Parameters
    ----------
    backbone : {'resnet50', 'resnet18', 'resnet34', 'resnet101'}
    weights : None, 'none', 'imagenet' or path
        Backbone initialisation (see :func:`isle_fast.training.backbones.load_resnet`).
    stride : {8, 4}
        Feature-grid stride.
    dim : int
        Feature channels (448 as in the paper).
    """
    global _MODEL_CLASS
    if _MODEL_CLASS is None:
        _MODEL_CLASS = _build_model_class()
    return _MODEL_CLASS(backbone=backbone, weights=weights, stride=stride, dim=dim)


def feature_affinity(feats, offsets, valid_only: bool = True):
    """Affinities ``exp(-mean_d |f_p - f_{p+o_k}|)`` for every pixel and offset.

    Parameters
    ----------
    feats : torch.Tensor (N, D, h, w)
    offsets : (K, 2) int array
    valid_only : bool
        Set pairs leaving the grid to 0.

    Returns
    -------
    torch.Tensor (N, K, h, w)
    """
    torch = _torch()
    F = torch.nn.functional
    n, d, h, w = feats.shape
    offs = np.asarray(offsets, dtype=np.int64)
    r = int(np.abs(offs).max(initial=0))
    fp = F.pad(feats, (r, r, r, r))
    out = []
    for dy, dx in offs:
        nb = fp[:, :, r + dy:r + dy + h, r + dx:r + dx + w]
        out.append(torch.exp(-torch.mean(torch.abs(feats - nb), dim=1)))
    aff = torch.stack(out, dim=1)
    if valid_only and r > 0:
        aff = aff * torch.as_tensor(_valid_offsets(h, w, offs), device=aff.device)[None]
    return aff


def _valid_offsets(h: int, w: int, offsets: np.ndarray) -> np.ndarray:
    ys = np.arange(h)[None, :, None] + offsets[:, 0][:, None, None]
    xs = np.arange(w)[None, None, :] + offsets[:, 1][:, None, None]
    return ((ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)).astype(np.float32)


def affinity_loss(feats, bg_pos, fg_pos, neg, offsets, eps: float = 1e-5):
    """AffinityNet's loss on a batch.

    Parameters
    ----------
    feats : torch.Tensor (N, D, h, w)
    bg_pos, fg_pos, neg : bool tensors or arrays (N, K, h, w)
        From :func:`pair_labels` with the same ``offsets``.
    offsets : (K, 2) int array
    eps : float

    Returns
    -------
    loss : torch.Tensor (scalar)
        ``L_bg/4 + L_fg/4 + L_neg/2``; each term is averaged over its own
        pairs (a term without pairs is 0).
    parts : dict
        ``bg``, ``fg``, ``neg`` as floats.
    """
    torch = _torch()
    aff = feature_affinity(feats, offsets)
    dev = aff.device
    bg = torch.as_tensor(np.asarray(bg_pos), device=dev).float() if not torch.is_tensor(bg_pos) else bg_pos.float()
    fg = torch.as_tensor(np.asarray(fg_pos), device=dev).float() if not torch.is_tensor(fg_pos) else fg_pos.float()
    ng = torch.as_tensor(np.asarray(neg), device=dev).float() if not torch.is_tensor(neg) else neg.float()
    l_bg = -(torch.log(aff + eps) * bg).sum() / bg.sum().clamp(min=1.0)
    l_fg = -(torch.log(aff + eps) * fg).sum() / fg.sum().clamp(min=1.0)
    l_ng = -(torch.log(1.0 + eps - aff) * ng).sum() / ng.sum().clamp(min=1.0)
    loss = l_bg / 4 + l_fg / 4 + l_ng / 2
    return loss, {"bg": float(l_bg.detach()), "fg": float(l_fg.detach()), "neg": float(l_ng.detach())}


def _normalise(rgb: np.ndarray) -> np.ndarray:
    x = (rgb.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    return np.ascontiguousarray(np.moveaxis(x, -1, 0))


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def _sample(rgb: np.ndarray, labels: np.ndarray, crop: int, rng: np.random.Generator):
    """Random crop (padded with 0 / 255 where the image is smaller) and horizontal flip."""
    h, w = labels.shape
    ch = cw = int(crop)
    y0 = int(rng.integers(0, max(1, h - ch + 1)))
    x0 = int(rng.integers(0, max(1, w - cw + 1)))
    img = np.zeros((ch, cw, 3), dtype=np.uint8)
    lab = np.full((ch, cw), 255, dtype=np.uint8)
    hh, ww = min(ch, h - y0), min(cw, w - x0)
    img[:hh, :ww] = rgb[y0:y0 + hh, x0:x0 + ww]
    lab[:hh, :ww] = labels[y0:y0 + hh, x0:x0 + ww]
    if rng.random() < 0.5:
        img, lab = img[:, ::-1], lab[:, ::-1]
    return img, lab


def _config(backbone: str, stride: int, dim: int, radius: int, epochs: int) -> dict:
    return {"backbone": backbone, "stride": int(stride), "dim": int(dim), "radius": int(radius),
            "epochs": int(epochs)}


def _save(path: str, model, optimizer, epoch: int, step: int, config: dict) -> None:
    from isle_fast.outputs import write_file

    torch = _torch()
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict() if optimizer else {},
             "epoch": int(epoch), "step": int(step), "config": dict(config)}
    write_file(path, lambda p: torch.save(state, p), durable=True)  # atomic, fsynced: a resume needs it whole


def _load_checkpoint(path: str) -> dict:
    torch = _torch()
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"could not load AffinityNet checkpoint {path} (weights_only=True): {exc}") from None


def load_affinity(path: str, device: str = "cpu"):
    """The trained :class:`AffinityNet` of a checkpoint, in eval mode on ``device``."""
    ck = _load_checkpoint(path)
    cfg = ck.get("config", {})
    model = AffinityNet(cfg.get("backbone", "resnet50"), None, cfg.get("stride", 8), cfg.get("dim", 448))
    try:
        model.load_state_dict(ck["model"])
    except Exception as exc:
        raise InputError(f"AffinityNet checkpoint {path} does not fit its recorded config {cfg}: {exc}") from None
    return model.to(device).eval()


def train_affinity(images, source, checkpoint: str, *, backbone: str = "resnet50", weights: Any = "imagenet",
                   epochs: int = 8, batch_size: int = 8, lr: float = 0.01, crop: int = 448, stride: int = 8,
                   radius: int = 5, dim: int = 448, alpha_lo: float = 4.0, alpha_hi: float = 32.0,
                   device: str = "auto", resume: bool = False, seed: int = 0, max_steps: int | None = None,
                   progress: bool = True, log: list | None = None):
    """Train an AffinityNet on a set's confident regions and save it to ``checkpoint``.

    Parameters
    ----------
    images : Stack
        The RGB store.
    source : Stack
        The set whose CAMs (scores) or labels give the affinity labels.
    checkpoint : str
        Where the checkpoint is written after every epoch (write-to-temp + rename).
    backbone, weights, stride, dim
        See :class:`AffinityNet`.
    epochs, batch_size, lr, crop
        Training schedule (paper: 8 epochs of batch 8 on 448 px crops).
    radius : int
        Pairs within this radius on the grid (5).
    alpha_lo, alpha_hi : float
        See :func:`confident_labels`.
    device : str
    resume : bool
        Continue from ``checkpoint`` if it holds an unfinished training.
    seed : int
    max_steps : int, optional
        Stop after this many optimiser steps in total (quick runs, tests).
    progress : bool
    log : list, optional
        Receives one dict per step (``step``, ``loss``, ``bg``, ``fg``, ``neg``).

    Returns
    -------
    The trained model (eval mode).
    """
    from isle_fast.kernels.refine_cpu import disc_offsets
    from isle_fast.progress import progress as bar

    torch = _torch()
    dev = resolve_device(device)
    cfg = _config(backbone, stride, dim, radius, epochs)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    start_epoch, step = 0, 0
    ck = None
    if resume and os.path.exists(checkpoint):
        ck = _load_checkpoint(checkpoint)
        old = {k: ck.get("config", {}).get(k) for k in ("backbone", "stride", "dim", "radius")}
        new = {k: cfg[k] for k in old}
        if old != new:
            raise InputError(f"{param('resume')}: checkpoint {checkpoint} was trained with {old}, not {new}")
        start_epoch, step = int(ck["epoch"]), int(ck["step"])
        rng = np.random.default_rng([seed, start_epoch])
    model = AffinityNet(backbone, None if ck is not None else weights, stride, dim)
    if ck is not None:
        model.load_state_dict(ck["model"])
    model = model.to(dev)
    optimizer = torch.optim.SGD([
        {"params": list(model.backbone_parameters()), "lr": lr},
        {"params": list(model.head_parameters()), "lr": 10 * lr},
    ], lr=lr, momentum=0.9, weight_decay=5e-4)
    base_lrs = [lr, 10 * lr]
    if ck is not None and ck.get("optimizer"):
        optimizer.load_state_dict(ck["optimizer"])
    offsets = disc_offsets(radius, half=True)
    n = source.num_images
    if n == 0:
        raise InputError(f"{source.path} has no images to train AffinityNet on")
    steps_per_epoch = max(1, math.ceil(n / batch_size))
    total = steps_per_epoch * epochs if max_steps is None else min(steps_per_epoch * epochs, int(max_steps))
    model.train()
    with bar(total=total, initial=min(step, total), desc="train AffinityNet", unit="step",
             quiet=not progress) as pbar:
        for epoch in range(start_epoch, epochs):
            order = rng.permutation(n)
            for b in range(steps_per_epoch):
                if step >= total:
                    break
                idx = order[b * batch_size:(b + 1) * batch_size]
                imgs, labs = [], []
                for i in idx:
                    i = int(i)
                    lab = confident_labels(_decode(source, i), source.encoding, alpha_lo=alpha_lo,
                                           alpha_hi=alpha_hi)
                    img, lab = _sample(images.read_image(i), lab, crop, rng)
                    imgs.append(_normalise(img))
                    labs.append(_grid_sample_labels(lab, stride))
                bg, fg, ng = pair_labels(np.stack(labs), offsets)
                x = torch.as_tensor(np.stack(imgs), device=dev)
                frac = step / max(total, 1)
                for g, base in zip(optimizer.param_groups, base_lrs):
                    g["lr"] = base * (1 - frac) ** 0.9
                loss, parts = affinity_loss(model(x), bg, fg, ng, offsets)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                if log is not None:
                    log.append({"step": step, "loss": float(loss.detach()), **parts})
                pbar.update(1)
                pbar.set_postfix(loss=f"{float(loss.detach()):.3f}", refresh=False)
            # a run cut short by max_steps counts as finished (that is what was asked for)
            _save(checkpoint, model, optimizer, epoch + 1 if step < total else epochs, step, cfg)
            if step >= total:
                break
    if total == 0 or start_epoch >= epochs:
        _save(checkpoint, model, optimizer, epochs, step, cfg)
    return model.eval()


def _decode(stack, i: int) -> np.ndarray:
    a = stack.read_image(i)
    if stack.encoding == "scores":
        return a.astype(np.float32) / np.float32(stack.score_scale)
    return a


# ----------------------------------------------------------------------------------------------
# Inference: random walk
# ----------------------------------------------------------------------------------------------
def random_walk_torch(trans, offsets, v, steps: int):
    """Torch version of :func:`isle_fast.kernels.refine_cpu.random_walk` (GPU path).

    ``trans``: (K, h, w) row-normalised, ``v``: (C, h, w); returns ``T^steps v`` as (C, h, w).
    """
    torch = _torch()
    F = torch.nn.functional
    offs = np.asarray(offsets, dtype=np.int64)
    r = int(np.abs(offs).max(initial=0))
    c, h, w = v.shape
    for _ in range(int(steps)):
        vp = F.pad(v[None], (r, r, r, r))[0]
        out = torch.zeros_like(v)
        for k, (dy, dx) in enumerate(offs):
            out += trans[k][None] * vp[:, r + dy:r + dy + h, r + dx:r + dx + w]
        v = out
    return v


def _pool(v: np.ndarray, stride: int) -> np.ndarray:
    """Average of every ``stride x stride`` cell over the pixels inside the image: (h, w, C) -> (gh, gw, C)."""
    h, w, c = v.shape
    gh, gw = math.ceil(h / stride), math.ceil(w / stride)
    pad = np.zeros((gh * stride, gw * stride, c), dtype=np.float32)
    cnt = np.zeros((gh * stride, gw * stride, 1), dtype=np.float32)
    pad[:h, :w] = v
    cnt[:h, :w] = 1
    s = pad.reshape(gh, stride, gw, stride, c).sum(axis=(1, 3))
    n = cnt.reshape(gh, stride, gw, stride, 1).sum(axis=(1, 3))
    return s / np.maximum(n, 1)


def _upsample(v: np.ndarray, stride: int, h: int, w: int) -> np.ndarray:
    """Bilinear upsampling (align_corners=False) of a (gh, gw, C) grid by ``stride``, cropped to (h, w)."""
    torch = _torch()
    F = torch.nn.functional
    t = torch.as_tensor(np.ascontiguousarray(np.moveaxis(v, -1, 0)))[None]
    up = F.interpolate(t, scale_factor=stride, mode="bilinear", align_corners=False)[0]
    return np.moveaxis(up.numpy(), 0, -1)[:h, :w]


def walk_input(data: np.ndarray, encoding: str, num_classes: int, background: str = "alpha",
               alpha: float = 16.0) -> np.ndarray:
    """The (h, w, C) float32 vectors the random walk moves: CAMs with a background slice.

    ``background='alpha'``: slice 0 := ``(1 - max fg)^alpha``; ``'stored'``: the set's own slice.
    A labels set becomes one-hot (unknown 255 -> all zero).
    """
    if encoding == "labels":
        return (data[..., None] == np.arange(num_classes, dtype=np.uint8)).astype(np.float32)
    v = data.astype(np.float32, copy=True)
    if background == "alpha":
        v[..., 0] = np.clip(1.0 - v[..., 1:].max(axis=-1, initial=0.0), 0.0, 1.0) ** alpha
    elif background != "stored":
        raise InputError(f"affinity.background must be 'alpha' or 'stored', not {background!r}")
    return v


def random_walk_image(model, rgb: np.ndarray, data: np.ndarray, encoding: str, num_classes: int, *,
                      radius: int = 5, beta: float = 8.0, logt: int = 6, background: str = "alpha",
                      alpha: float = 16.0, device: str = "cpu", engine: str = "auto") -> np.ndarray:
    """AffinityNet inference on one unpadded image: walked scores ``(h, w, C)`` float32 in [0, 1].

    See the module docs for the steps; ``model`` is a trained :class:`AffinityNet` in eval mode
    on ``device``. ``engine``: ``'numba'`` (the CPU stencil kernel), ``'torch'`` (the same
    stencil in torch, on ``device``) or ``'auto'`` (torch on CUDA, numba otherwise).
    """
    from isle_fast.kernels.refine_cpu import disc_offsets, normalise_rows, random_walk

    torch = _torch()
    h, w = data.shape[:2]
    stride = int(model.stride)
    offsets = disc_offsets(radius)
    full = walk_input(data, encoding, num_classes, background, alpha)
    # only slices with mass move (the walk is linear: an all-zero class stays zero)
    kept = np.nonzero(full.reshape(-1, num_classes).max(axis=0, initial=0.0) > 0)[0]
    if len(kept) == 0:
        return np.zeros((h, w, num_classes), dtype=np.float32)
    v = _pool(full[..., kept], stride)
    with torch.no_grad():
        x = torch.as_tensor(_normalise(rgb)[None], device=device)
        aff = feature_affinity(model(x), offsets)[0] ** beta     # (K, gh, gw)
        if engine not in ("auto", "numba", "torch"):
            raise InputError(f"random-walk engine must be auto, numba or torch, not {engine!r}")
        if engine == "torch" or (engine == "auto" and str(device).startswith("cuda")):
            gh, gw = aff.shape[-2:]
            aff = aff * torch.as_tensor(_valid_offsets(int(gh), int(gw), offsets), device=aff.device)
            trans = aff / aff.sum(dim=0, keepdim=True).clamp(min=1e-12)
            walked = random_walk_torch(trans, offsets, torch.as_tensor(np.moveaxis(v, -1, 0), device=device),
                                       2 ** int(logt))
            walked = np.moveaxis(walked.cpu().numpy(), 0, -1)
        else:
            trans = normalise_rows(np.ascontiguousarray(np.moveaxis(aff.cpu().numpy(), 0, -1)), offsets)
            walked = random_walk(trans, offsets, v, 2 ** int(logt))
    out = np.zeros((h, w, num_classes), dtype=np.float32)
    out[..., kept] = np.clip(_upsample(walked, stride, h, w), 0.0, 1.0)
    return out


class AffinityNetRefinement(Refinement):
    """The ``affinity`` refinement: train (or load) an AffinityNet, then random-walk every image.

    Parameters
    ----------
    checkpoint : str, optional
        Checkpoint file. Default: ``<out>.affinity.pt`` beside the output
        store. A finished checkpoint is loaded and not retrained; an
        unfinished one needs ``--resume`` (or delete it).
    train : bool
        Train when no finished checkpoint exists (False: the checkpoint must exist).
    backbone : str
        ``resnet50`` (paper) or ``resnet18`` / ``resnet34`` / ``resnet101``.
    weights : str
        Backbone initialisation for training: ``imagenet`` (needs the network
        once, or torch's cache), ``none``, or a state-dict file.
    epochs, batch_size, lr, crop, max_steps, seed
        Training schedule (see :func:`train_affinity`).
    stride : {8, 4}
        Feature-grid stride.
    radius : int
        Neighbourhood radius for training pairs and the walk (5).
    alpha_lo, alpha_hi : float
        Confident-region exponents for the affinity labels (4, 32).
    beta : float
        Affinity exponent (8).
    logt : int
        ``2^logt`` random-walk steps (6).
    background : {'alpha', 'stored'}
        Background slice of the walk: ``(1 - max fg)^alpha`` or the set's own slice.
    alpha : float
        Exponent of the walk's background (16).
    device : str
        ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:1``...; default: the run's device.
    output : {'auto', 'labels', 'scores'}
        ``auto`` keeps the input's encoding.
    """

    needs_rgb = True
    gil_bound = False
    sparse_input = True

    def __init__(self, checkpoint: str | None = None, train: bool = True, backbone: str = "resnet50",
                 weights: str = "imagenet", epochs: int = 8, batch_size: int = 8, lr: float = 0.01,
                 crop: int = 448, max_steps: int | None = None, seed: int = 0, stride: int = 8,
                 radius: int = 5, alpha_lo: float = 4.0, alpha_hi: float = 32.0, beta: float = 8.0,
                 logt: int = 6, background: str = "alpha", alpha: float = 16.0, device: str | None = None,
                 output: str = "auto"):
        if output not in ("auto", "labels", "scores"):
            raise InputError(f"affinity.output must be auto, labels or scores, not {output!r}")
        if background not in ("alpha", "stored"):
            raise InputError(f"affinity.background must be 'alpha' or 'stored', not {background!r}")
        if int(radius) < 1 or int(logt) < 0 or int(epochs) < 0:
            raise InputError("affinity.radius must be >= 1, logt >= 0 and epochs >= 0")
        self.checkpoint = checkpoint
        self.train = bool(train)
        self.train_kw: dict[str, Any] = dict(
            backbone=backbone, weights=weights, epochs=int(epochs), batch_size=int(batch_size),
            lr=float(lr), crop=int(crop), max_steps=max_steps, seed=int(seed), stride=int(stride),
            radius=int(radius), alpha_lo=float(alpha_lo), alpha_hi=float(alpha_hi))
        self.walk_kw: dict[str, Any] = dict(radius=int(radius), beta=float(beta), logt=int(logt),
                                            background=background, alpha=float(alpha))
        self.device = device
        self.output = output
        self.model = None
        self.trained_now = False

    # -- interface -----------------------------------------------------------------------
    def params(self) -> dict:
        return {"checkpoint": self.checkpoint, "train": self.train, **self.train_kw, **self.walk_kw,
                "device": self.device, "output": self.output}

    def output_encoding(self, input_encoding: str) -> str:
        return input_encoding if self.output == "auto" else self.output

    def prepare(self, context: PrepareContext) -> None:
        dev = resolve_device(self.device or context.device)
        self.device = dev
        self.process_safe = not dev.startswith("cuda")
        if self.checkpoint is None:
            self.checkpoint = f"{str(context.out).rstrip('/')}.affinity.pt"
        path = self.checkpoint
        epochs = self.train_kw["epochs"]
        if os.path.exists(path):
            ck = _load_checkpoint(path)
            ck_epochs = int(ck.get("config", {}).get("epochs", epochs))
            finished = int(ck.get("epoch", 0)) >= ck_epochs
            extend = context.resume and self.train and epochs > int(ck.get("epoch", 0))
            if (finished and not extend) or not self.train:
                self.model = load_affinity(path, dev)
                return
            if not context.resume:
                raise InputError(f"AffinityNet checkpoint {path} holds an unfinished training (epoch "
                                 f"{ck.get('epoch')} of {ck.get('config', {}).get('epochs')}); "
                                 f"pass {param('resume')} to continue it, or delete it to start again")
        elif not self.train:
            raise InputError(f"affinity.checkpoint {path} does not exist (and affinity.train is false)")
        if context.images is None:
            raise InputError(f"AffinityNet training needs the RGB images: pass {param('images')}")
        self.model = train_affinity(context.images, context.source, path, device=dev, resume=context.resume,
                                    progress=context.progress, **self.train_kw)
        self.trained_now = True

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["model"] = None  # worker processes load the checkpoint themselves
        return state

    def _model(self):
        if self.model is None:  # in a worker process: the model was not pickled, load the checkpoint
            if not self.checkpoint or not os.path.exists(self.checkpoint):
                raise InputError(f"AffinityNet checkpoint {self.checkpoint} is missing")
            import multiprocessing

            if multiprocessing.parent_process() is not None:
                _torch().set_num_threads(1)  # one image per worker process; workers already fill the cores
            self.model = load_affinity(self.checkpoint, self.device or "cpu")
        return self.model

    def refine(self, chunk: RefineChunk) -> Any:
        """The walked block; a class-sparse chunk walks its slots only (the walk is per class, linear,
        and a class that is 0 everywhere stays 0) and gives :class:`SparseScores` with the same keys."""
        from isle_fast.refinement.chain import SparseScores

        model = self._model()
        enc = self.output_encoding(chunk.encoding)
        k, h_pad, w_pad = chunk.data.shape[:3]
        sparse = chunk.keys is not None
        c = chunk.data.shape[3] if sparse else chunk.num_classes   # the slots of a class-sparse chunk
        slots = chunk.slot_classes() if sparse else None
        rgb = chunk.rgb
        assert rgb is not None, "the chain hands RGB to a refinement with needs_rgb"
        out = (np.full((k, h_pad, w_pad), 255, dtype=np.uint8) if enc == "labels"
               else np.zeros((k, h_pad, w_pad, c), dtype=np.float32))
        for i in range(k):
            h, w = (int(v) for v in chunk.shapes[i])
            walked = random_walk_image(model, rgb[i, :h, :w], chunk.data[i, :h, :w], chunk.encoding, c,
                                       device=self.device or "cpu", **self.walk_kw)
            if enc == "labels":
                arg = walked.argmax(axis=-1)
                out[i, :h, :w] = (arg if slots is None else slots[i][arg]).astype(np.uint8)
            else:
                out[i, :h, :w] = walked
        if sparse and enc == "scores":
            assert chunk.keys is not None
            return SparseScores(data=out, keys=chunk.keys.copy())
        return out
