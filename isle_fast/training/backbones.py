"""torchvision ResNet backbones with the weight choices every model here offers.

``weights`` is ``None`` / ``"none"`` (random init), ``"imagenet"`` (torchvision's
ImageNet weights: downloaded once into torch's cache where the network allows;
offline this is a clear error, not a hang), or a path to a local state-dict
file (loaded with ``weights_only=True``; a ``fc.`` head may be absent).

Narrow variants for quick CPU runs (:data:`NARROW`): ``resnet18_w32`` and
``resnet18_w16`` are ResNet-18 (torchvision's ``BasicBlock``, the same layout
of 2-2-2-2 blocks, 7x7 stem and max pool) with 32 or 16 stem channels
instead of 64, so ``layer1``-``layer4`` have 32-64-128-256 (16-32-64-128)
channels: about 4x (16x) fewer multiply-adds than ResNet-18. There are no
ImageNet weights for them: they are for training from random weights (the
demo, tests, smoke runs), where a narrow net learns in the few hundred steps a
CPU allows; a state-dict file of the same shape can still be given.
"""

from __future__ import annotations

import os
from typing import Sequence

from isle_fast.errors import InputError, param

__all__ = ["RESNETS", "NARROW", "load_resnet", "out_channels", "ParameterGroups"]

#: Narrow ResNets: name -> (torchvision layout it follows, stem width).
NARROW = {"resnet18_w32": ("resnet18", 32), "resnet18_w16": ("resnet18", 16)}
RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101") + tuple(NARROW)



def out_channels(layer) -> int:
    """Channels a ResNet layer outputs: the width of its last BatchNorm (any block type, any width)."""
    import torch.nn as nn

    return [m for m in layer.modules() if isinstance(m, nn.BatchNorm2d)][-1].num_features


class ParameterGroups:
    """The two parameter groups of a network on a ResNet backbone (the head gets a larger learning rate).

    Mixed into an ``nn.Module`` that names its head modules in ``HEAD_MODULES``; the backbone is
    the ResNet stem and ``layer1``-``layer4``.
    """

    BACKBONE_MODULES: tuple[str, ...] = ("stem", "layer1", "layer2", "layer3", "layer4")
    HEAD_MODULES: tuple[str, ...] = ()

    def backbone_parameters(self):
        """Parameters of the ResNet (for a separate learning rate)."""
        for name in self.BACKBONE_MODULES:
            yield from getattr(self, name).parameters()

    def head_parameters(self):
        """Parameters of everything after the backbone."""
        for name in self.HEAD_MODULES:
            yield from getattr(self, name).parameters()


def _narrow_resnet(name: str):
    """A randomly initialised narrow ResNet (:data:`NARROW`) as a torchvision ``ResNet`` object.

    Built with torchvision's own ``ResNet`` / ``BasicBlock`` (its ``_make_layer`` at the
    narrower widths), initialised as torchvision initialises ResNets.
    """
    import torch.nn as nn
    import torchvision.models as tvm
    from torchvision.models.resnet import BasicBlock

    layout, width = NARROW[name]
    net = getattr(tvm, layout)(weights=None)
    blocks = [len(net.layer1), len(net.layer2), len(net.layer3), len(net.layer4)]
    net.inplanes = width
    net.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
    net.bn1 = nn.BatchNorm2d(width)
    net.layer1 = net._make_layer(BasicBlock, width, blocks[0])
    net.layer2 = net._make_layer(BasicBlock, 2 * width, blocks[1], stride=2)
    net.layer3 = net._make_layer(BasicBlock, 4 * width, blocks[2], stride=2)
    net.layer4 = net._make_layer(BasicBlock, 8 * width, blocks[3], stride=2)
    net.fc = nn.Linear(8 * width, net.fc.out_features)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return net


def load_resnet(name: str = "resnet50", weights: str | os.PathLike | None = None,
                replace_stride_with_dilation: Sequence[bool] | None = None):
    """A torchvision ResNet, with the classification head kept (callers drop what they do not use).

    Parameters
    ----------
    name : {'resnet18', 'resnet34', 'resnet50', 'resnet101', 'resnet18_w32', 'resnet18_w16'}
    weights : None, 'none', 'imagenet' or path
        See the module docstring ('imagenet' does not exist for the narrow ResNets).
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
        if name in ("resnet18", "resnet34") or name in NARROW:
            raise InputError(f"{name} cannot dilate its layers (basic blocks); use resnet50 or resnet101, "
                             "or output stride 32")
        kwargs["replace_stride_with_dilation"] = list(replace_stride_with_dilation)
    if name in NARROW:
        def builder(weights=None, **kw):
            return _narrow_resnet(name)
    else:
        builder = getattr(tvm, name)
    if weights is None or str(weights).lower() == "none":
        return builder(weights=None, **kwargs)
    if str(weights).lower() == "imagenet":
        if name in NARROW:
            raise InputError(f"{name} has no ImageNet weights (it is a narrow ResNet for training from "
                             f"random weights); use {param('weights', 'none')}, a state-dict file, or resnet18/50")
        enum = tvm.get_model_weights(name).IMAGENET1K_V1
        try:
            return builder(weights=enum, **kwargs)
        except Exception as exc:  # URLError, OSError, HTTP errors: all mean "no download here"
            raise InputError(
                f"could not get torchvision's ImageNet weights for {name} ({type(exc).__name__}: {exc}); "
                "this machine may be offline. Download them elsewhere and pass the file's path as "
                f"{param('weights')}, or use {param('weights', 'none')}") from None
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
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # tensors of the wrong shape (another width or depth)
        first = str(exc).strip().splitlines()[1:2] or [str(exc)]
        raise InputError(f"weights file {path} does not fit {name}: {first[0].strip()}") from None
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise InputError(f"weights file {path} does not fit {name}: "
                         f"{len(missing)} missing keys (e.g. {missing[:3]}), "
                         f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    return model
