"""torchvision ResNet backbones with the weight choices every model here offers.

``weights`` is ``None`` / ``"none"`` (random init), ``"imagenet"`` (torchvision's
ImageNet weights: downloaded once into torch's cache where the network allows;
offline this is a clear error, not a hang), or a path to a local state-dict
file (loaded with ``weights_only=True``; a ``fc.`` head may be absent).
"""

from __future__ import annotations

import os
from typing import Sequence

from .errors import InputError

__all__ = ["RESNETS", "load_resnet"]

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")


def load_resnet(name: str = "resnet50", weights: str | os.PathLike | None = None,
                replace_stride_with_dilation: Sequence[bool] | None = None):
    """A torchvision ResNet, with the classification head kept (callers drop what they do not use).

    Parameters
    ----------
    name : {'resnet18', 'resnet34', 'resnet50', 'resnet101'}
    weights : None, 'none', 'imagenet' or path
        See the module docstring.
    replace_stride_with_dilation : sequence of 3 bool, optional
        Dilate layers 2-4 instead of striding (output stride 16: ``[False, False, True]``;
        8: ``[False, True, True]``). Only for the bottleneck ResNets (50, 101).

    Returns
    -------
    torchvision.models.ResNet
    """
    import torch
    import torchvision.models as tvm

    if name not in RESNETS:
        raise InputError(f"backbone must be one of {', '.join(RESNETS)}, not {name!r}")
    kwargs = {}
    if replace_stride_with_dilation is not None and any(replace_stride_with_dilation):
        if name in ("resnet18", "resnet34"):
            raise InputError(f"{name} cannot dilate its layers (basic blocks); use resnet50 or resnet101, "
                             "or output stride 32")
        kwargs["replace_stride_with_dilation"] = list(replace_stride_with_dilation)
    builder = getattr(tvm, name)
    if weights is None or str(weights).lower() == "none":
        return builder(weights=None, **kwargs)
    if str(weights).lower() == "imagenet":
        enum = tvm.get_model_weights(name).IMAGENET1K_V1
        try:
            return builder(weights=enum, **kwargs)
        except Exception as exc:  # URLError, OSError, HTTP errors: all mean "no download here"
            raise InputError(
                f"could not get torchvision's ImageNet weights for {name} ({type(exc).__name__}: {exc}); "
                "this machine may be offline. Download them elsewhere and pass the file with "
                "--weights PATH, or use --weights none") from None
    path = os.fspath(weights)
    if not os.path.isfile(path):
        raise InputError(f"weights file {path} does not exist (use 'none', 'imagenet' or a state-dict path)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"could not load weights file {path} with weights_only=True: {exc}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    model = builder(weights=None, **kwargs)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise InputError(f"weights file {path} does not fit {name}: "
                         f"{len(missing)} missing keys (e.g. {missing[:3]}), "
                         f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    return model
