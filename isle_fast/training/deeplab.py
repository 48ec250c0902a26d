"""DeepLabV3+ (Chen et al., ECCV 2018) on a torchvision ResNet backbone.

The model of the paper's step 4. Layout, following the DeepLabV3+ paper:

* **Backbone**: a torchvision ResNet (:func:`isle_fast.training.backbones.load_resnet`)
  without its pooling / fully connected head. Output stride 16 (default)
  dilates ``layer4`` instead of striding it; output stride 8 dilates
  ``layer3`` and ``layer4``. ResNet-50/101 use torchvision's
  ``replace_stride_with_dilation``; the basic-block ResNets (18/34, for quick
  runs) are dilated here the same way (torchvision refuses to), so every
  backbone supports every output stride.
* **ASPP** on the last feature map: a 1x1 conv, three 3x3 atrous convs with
  rates 6/12/18 at output stride 16 (12/24/36 at 8), and image pooling
  (global average, 1x1 conv, upsampled back); each branch conv + BN + ReLU with
  256 channels, concatenated and projected by a 1x1 conv to 256 channels,
  BN, ReLU, dropout 0.1.
* **Decoder**: the low-level features of ``layer1`` (stride 4) projected to 48
  channels (1x1 conv, BN, ReLU), concatenated with the ASPP output upsampled
  (bilinear) to stride 4, two 3x3 convs with 256 channels (BN, ReLU), a 1x1
  classifier, and bilinear upsampling to the input size.

Choices where the paper is silent: dropout 0.1 after the ASPP projection and
none in the decoder; ``align_corners=False`` everywhere; a 32 output stride
(no dilation) is also accepted for the cheapest runs. ``head_channels`` (256 in
the paper) can be lowered for quick CPU runs.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from isle_fast.errors import InputError
from isle_fast.training.backbones import RESNETS, ParameterGroups, load_resnet, out_channels

__all__ = ["DeepLabV3Plus", "build_deeplab", "OUTPUT_STRIDES"]

OUTPUT_STRIDES = (8, 16, 32)


def _conv_bn_relu(cin: int, cout: int, kernel: int = 1, dilation: int = 1) -> nn.Sequential:
    pad = 0 if kernel == 1 else dilation
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=pad, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class _ImagePooling(nn.Module):
    """ASPP's image-level branch: global average pool, 1x1 conv + BN + ReLU, upsample."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.conv = _conv_bn_relu(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        y = self.conv(self.pool(x))
        return F.interpolate(y, size=size, mode="bilinear", align_corners=False)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1x1 conv, three atrous 3x3 convs, image pooling."""

    def __init__(self, cin: int, rates: Sequence[int], channels: int = 256, dropout: float = 0.1):
        super().__init__()
        branches: list[nn.Module] = [_conv_bn_relu(cin, channels, 1)]
        branches += [_conv_bn_relu(cin, channels, 3, dilation=int(r)) for r in rates]
        branches.append(_ImagePooling(cin, channels))
        self.branches = nn.ModuleList(branches)
        self.project = nn.Sequential(
            nn.Conv2d(channels * len(branches), channels, 1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([b(x) for b in self.branches], dim=1))


def _dilate_basic_layer(layer: nn.Sequential, dilation: int, previous: int) -> None:
    """Turn a striding ResNet layer into a dilated one in place (weights are unchanged).

    Same scheme as torchvision's ``replace_stride_with_dilation``: the first
    block keeps the previous dilation, the others use ``dilation``; no stride.
    """
    for b, block in enumerate(layer):
        d = previous if b == 0 else dilation
        for name, m in block.named_modules():
            if isinstance(m, nn.Conv2d):
                if name.startswith("downsample"):
                    m.stride = (1, 1)
                elif m.kernel_size == (3, 3):
                    m.stride = (1, 1)
                    m.dilation = (d, d)
                    m.padding = (d, d)


class DeepLabV3Plus(ParameterGroups, nn.Module):
    """DeepLabV3+ with a ResNet backbone; see the module docstring for the layout.

    Parameters
    ----------
    num_classes : int
        Output classes (background included).
    backbone : {'resnet50', 'resnet101', 'resnet18', 'resnet34', 'resnet18_w32', 'resnet18_w16'}
        ``resnet18_w32`` / ``resnet18_w16``: narrow ResNet-18s for quick CPU runs
        from random weights (:mod:`isle_fast.training.backbones`).
    weights : None, 'none', 'imagenet' or path
        Backbone weights (:func:`isle_fast.training.backbones.load_resnet`).
    output_stride : {16, 8, 32}
        Ratio of input size to the ASPP feature map.
    head_channels : int
        Channels of ASPP and decoder convs (256 in the paper).
    low_level_channels : int
        Channels of the low-level projection (48 in the paper).
    """

    HEAD_MODULES = ("aspp", "low_proj", "decoder", "classifier")

    def __init__(self, num_classes: int, backbone: str = "resnet50",
                 weights: str | os.PathLike | None = None, output_stride: int = 16,
                 head_channels: int = 256, low_level_channels: int = 48):
        super().__init__()
        if output_stride not in OUTPUT_STRIDES:
            raise InputError(f"output stride must be one of {OUTPUT_STRIDES}, not {output_stride!r}")
        if backbone not in RESNETS:
            raise InputError(f"backbone must be one of {', '.join(RESNETS)}, not {backbone!r}")
        if num_classes < 1:
            raise InputError(f"num_classes must be at least 1, not {num_classes}")
        dilate = {8: [False, True, True], 16: [False, False, True], 32: [False, False, False]}[output_stride]
        bottleneck = backbone in ("resnet50", "resnet101")  # the others are basic-block ResNets
        net = load_resnet(backbone, weights, replace_stride_with_dilation=dilate if bottleneck else None)
        if not bottleneck:
            d = 1
            for layer, flag in zip((net.layer2, net.layer3, net.layer4), dilate):
                if flag:
                    _dilate_basic_layer(layer, d * 2, d)
                    d *= 2
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        high, low = out_channels(self.layer4), out_channels(self.layer1)
        base = {8: 12, 16: 6, 32: 3}[output_stride]
        self.rates = (base, 2 * base, 3 * base)
        self.output_stride = output_stride
        self.num_classes = num_classes
        self.aspp = ASPP(high, self.rates, head_channels)
        self.low_proj = _conv_bn_relu(low, low_level_channels, 1)
        self.decoder = nn.Sequential(
            _conv_bn_relu(head_channels + low_level_channels, head_channels, 3),
            _conv_bn_relu(head_channels, head_channels, 3),
        )
        self.classifier = nn.Conv2d(head_channels, num_classes, 1)
        self._init_head()

    def _init_head(self) -> None:
        for mod in (self.aspp, self.low_proj, self.decoder, self.classifier):
            for m in mod.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
                elif isinstance(m, nn.BatchNorm2d):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)
        # Small classifier weights: the first logits are near 0 and the first loss near log(C).
        nn.init.normal_(self.classifier.weight, std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes, H, W)`` for a normalized ``(N, 3, H, W)`` batch."""
        size = x.shape[-2:]
        low = self.layer1(self.stem(x))
        high = self.layer4(self.layer3(self.layer2(low)))
        y = self.aspp(high)
        low = self.low_proj(low)
        y = F.interpolate(y, size=low.shape[-2:], mode="bilinear", align_corners=False)
        y = self.classifier(self.decoder(torch.cat([y, low], dim=1)))
        return F.interpolate(y, size=size, mode="bilinear", align_corners=False)

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The (low-level, high-level) backbone feature maps (for inspecting strides)."""
        low = self.layer1(self.stem(x))
        return low, self.layer4(self.layer3(self.layer2(low)))


def build_deeplab(num_classes: int, backbone: str = "resnet50", weights: str | os.PathLike | None = None,
                  output_stride: int = 16, head_channels: int = 256) -> DeepLabV3Plus:
    """A :class:`DeepLabV3Plus`; the same arguments, for callers that prefer a function."""
    return DeepLabV3Plus(num_classes, backbone, weights, output_stride, head_channels)
