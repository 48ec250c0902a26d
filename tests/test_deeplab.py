"""DeepLabV3+ model: output shapes, output strides, ASPP rates, backbone weights."""

from __future__ import annotations

import pytest
import torch

from isle_fast.errors import InputError
from isle_fast.training.deeplab import DeepLabV3Plus


@pytest.mark.parametrize("backbone,os_", [("resnet18", 16), ("resnet18", 8), ("resnet18", 32),
                                          ("resnet50", 16), ("resnet50", 8)])
def test_output_shape_and_stride(backbone, os_):
    torch.manual_seed(0)
    m = DeepLabV3Plus(5, backbone, None, os_, head_channels=32).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        low, high = m.features(x)
        y = m(x)
    assert y.shape == (2, 5, 64, 96)
    assert low.shape[-2:] == (16, 24)  # layer1: stride 4
    assert high.shape[-2:] == (64 // os_, 96 // os_)
    assert low.shape[1] == (256 if backbone == "resnet50" else 64)
    assert high.shape[1] == (2048 if backbone == "resnet50" else 512)
    base = {8: 12, 16: 6, 32: 3}[os_]
    assert m.rates == (base, 2 * base, 3 * base)
    atrous = [b[0] for b in m.aspp.branches[1:4]]
    assert [c.dilation[0] for c in atrous] == list(m.rates)


def test_odd_input_gives_full_resolution_logits():
    m = DeepLabV3Plus(3, "resnet18", None, 16, head_channels=16).eval()
    with torch.no_grad():
        y = m(torch.randn(1, 3, 37, 45))
    assert y.shape == (1, 3, 37, 45)


def test_paper_head_layout():
    m = DeepLabV3Plus(21, "resnet18", None, 16)
    assert m.low_proj[0].out_channels == 48
    assert m.low_proj[0].kernel_size == (1, 1)
    convs = [s[0] for s in m.decoder]
    assert [(c.kernel_size, c.out_channels) for c in convs] == [((3, 3), 256), ((3, 3), 256)]
    assert convs[0].in_channels == 256 + 48
    assert m.classifier.out_channels == 21
    assert m.aspp.project[0].in_channels == 5 * 256  # 1x1, three atrous, image pooling
    assert isinstance(m.aspp.branches[4].pool, torch.nn.AdaptiveAvgPool2d)


def test_backward_reaches_backbone_and_head():
    m = DeepLabV3Plus(3, "resnet18", None, 16, head_channels=16)
    m(torch.randn(2, 3, 48, 48)).sum().backward()
    assert m.stem[0].weight.grad is not None and m.stem[0].weight.grad.abs().sum() > 0
    assert m.classifier.weight.grad.abs().sum() > 0
    n_bb = sum(p.numel() for p in m.backbone_parameters())
    n_head = sum(p.numel() for p in m.head_parameters())
    assert n_bb + n_head == sum(p.numel() for p in m.parameters())


def test_local_weights_file_loads_into_dilated_backbone(tmp_path):
    import torchvision

    torch.manual_seed(1)
    ref = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.pt"
    torch.save(ref.state_dict(), path)
    m = DeepLabV3Plus(3, "resnet18", str(path), 8, head_channels=16)
    assert torch.equal(m.stem[0].weight, ref.conv1.weight)
    assert torch.equal(m.layer4[1].conv2.weight, ref.layer4[1].conv2.weight)
    assert m.layer4[1].conv2.dilation == (4, 4) and m.layer3[0].conv1.stride == (1, 1)


def test_bad_arguments_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="output stride"):
        DeepLabV3Plus(3, "resnet18", None, 4)
    with pytest.raises(InputError, match="backbone"):
        DeepLabV3Plus(3, "vgg16")
    with pytest.raises(InputError, match="does not exist"):
        DeepLabV3Plus(3, "resnet18", str(tmp_path / "missing.pt"))


@pytest.mark.parametrize("backbone,width", [("resnet18_w32", 32), ("resnet18_w16", 16)])
@pytest.mark.parametrize("os_", [8, 16, 32])
def test_narrow_backbones_have_the_resnet18_layout_at_their_width(backbone, width, os_):
    torch.manual_seed(0)
    m = DeepLabV3Plus(4, backbone, None, os_, head_channels=16).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        low, high = m.features(x)
        y = m(x)
    assert y.shape == (1, 4, 64, 96)
    assert low.shape[1:] == (width, 16, 24)  # layer1 at stride 4
    assert high.shape[1:] == (8 * width, 64 // os_, 96 // os_)
    assert [len(layer) for layer in (m.layer1, m.layer2, m.layer3, m.layer4)] == [2, 2, 2, 2]
    assert m.stem[0].out_channels == width and m.stem[0].kernel_size == (7, 7)
    assert m.low_proj[0].in_channels == width and m.aspp.branches[0][0].in_channels == 8 * width
    # the multiply-adds of the backbone shrink with the square of the width
    full = sum(p.numel() for p in DeepLabV3Plus(4, "resnet18", None, 32).backbone_parameters())
    narrow = sum(p.numel() for p in m.backbone_parameters())
    assert narrow < full * (width / 64) ** 2 * 1.1


def test_narrow_backbone_weights(tmp_path):
    from isle_fast.training.backbones import load_resnet

    with pytest.raises(InputError, match="no ImageNet weights"):
        load_resnet("resnet18_w16", "imagenet")  # refused before any download is tried
    torch.manual_seed(2)
    ref = load_resnet("resnet18_w16")
    path = tmp_path / "w16.pt"
    torch.save(ref.state_dict(), path)
    m = DeepLabV3Plus(3, "resnet18_w16", str(path), 16, head_channels=16)
    assert torch.equal(m.layer4[1].conv2.weight, ref.layer4[1].conv2.weight)
    assert m.layer4[1].conv2.dilation == (2, 2)
    with pytest.raises(InputError, match="does not fit"):
        DeepLabV3Plus(3, "resnet18_w32", str(path), 16)
