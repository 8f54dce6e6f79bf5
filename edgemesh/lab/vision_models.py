"""Vision models for the graph-model bench and examples, random weights, nothing downloaded.

The architectures follow torchvision's definitions (layer for layer, so the
compute and the operators match the real models): ``mobilenet_v3_small``
(``torchvision.models.mobilenetv3``'s small config) and ``resnet18``
(``torchvision.models.resnet``, BasicBlock [2, 2, 2, 2]). ``tiny_detector``
is a YOLO-style single-stage detector (Conv-BN-SiLU backbone to stride 32,
a 2-scale head of ``3 * (5 + classes)`` channels at strides 16 and 32).

torchvision itself is not used: its PyPI wheel for torch 2.13 (0.28.0) is
built against the CUDA torch and its ops library does not load next to the
CPU torch this project installs (``libc10_cuda.so`` missing).
"""

from __future__ import annotations

import torch
from torch import nn


def _divisible(v: float, divisor: int = 8) -> int:
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


def _conv_bn(
    cin: int, cout: int, k: int, s: int, groups: int = 1, act: type | None = nn.ReLU
) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, k, s, (k - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act is not None:
        layers.append(act(inplace=True))
    return nn.Sequential(*layers)


class _SqueezeExcite(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        squeeze = _divisible(channels // 4)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)  # [N, C, 1, 1]
        return x * nn.functional.hardsigmoid(self.fc2(nn.functional.relu(self.fc1(s))))


class _InvertedResidual(nn.Module):
    def __init__(self, cin: int, k: int, exp: int, cout: int, se: bool, hs: bool, s: int) -> None:
        super().__init__()
        act = nn.Hardswish if hs else nn.ReLU
        layers: list[nn.Module] = []
        if exp != cin:
            layers.append(_conv_bn(cin, exp, 1, 1, act=act))
        layers.append(_conv_bn(exp, exp, k, s, groups=exp, act=act))
        if se:
            layers.append(_SqueezeExcite(exp))
        layers.append(_conv_bn(exp, cout, 1, 1, act=None))
        self.block = nn.Sequential(*layers)
        self.residual = s == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.block(x)
        return x + y if self.residual else y


# torchvision mobilenet_v3_small: (in, kernel, expanded, out, SE, hardswish, stride)
_SMALL = [
    (16, 3, 16, 16, True, False, 2),
    (16, 3, 72, 24, False, False, 2),
    (24, 3, 88, 24, False, False, 1),
    (24, 5, 96, 40, True, True, 2),
    (40, 5, 240, 40, True, True, 1),
    (40, 5, 240, 40, True, True, 1),
    (40, 5, 120, 48, True, True, 1),
    (48, 5, 144, 48, True, True, 1),
    (48, 5, 288, 96, True, True, 2),
    (96, 5, 576, 96, True, True, 1),
    (96, 5, 576, 96, True, True, 1),
]


class MobileNetV3Small(nn.Module):
    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = [_conv_bn(3, 16, 3, 2, act=nn.Hardswish)]
        layers += [_InvertedResidual(*cfg) for cfg in _SMALL]
        layers.append(_conv_bn(96, 576, 1, 1, act=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Linear(576, 1024),
            nn.Hardswish(inplace=True),
            nn.Dropout(0.2),
            nn.Linear(1024, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [N, 3, H, W]
        logits: torch.Tensor = self.classifier(self.features(x).mean((2, 3)))  # [N, classes]
        return logits


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _conv_bn(cin, cout, 3, stride)
        self.conv2 = _conv_bn(cout, cout, 3, 1, act=None)
        same = stride == 1 and cin == cout
        self.down = None if same else _conv_bn(cin, cout, 1, stride, act=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.down is None else self.down(x)
        return torch.relu(self.conv2(self.conv1(x)) + identity)


class ResNet18(nn.Module):
    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(_conv_bn(3, 64, 7, 2), nn.MaxPool2d(3, 2, 1))
        blocks, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [_BasicBlock(cin, cout, stride), _BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [N, 3, H, W]
        logits: torch.Tensor = self.fc(self.layers(self.stem(x)).mean((2, 3)))  # [N, classes]
        return logits


class TinyDetector(nn.Module):
    """YOLO-style: outputs ``[N, 3*(5+C), H/16, W/16]`` and ``[N, 3*(5+C), H/32, W/32]``."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        c = [16, 32, 64, 128, 256]
        self.stem = _conv_bn(3, c[0], 3, 2, act=nn.SiLU)
        self.stage = nn.ModuleList(
            nn.Sequential(
                _conv_bn(c[i], c[i + 1], 3, 2, act=nn.SiLU),
                _conv_bn(c[i + 1], c[i + 1], 3, 1, act=nn.SiLU),
            )
            for i in range(4)
        )
        out = 3 * (5 + num_classes)
        self.lateral = _conv_bn(c[4], c[3], 1, 1, act=nn.SiLU)
        self.head16 = nn.Conv2d(c[3] * 2, out, 1)
        self.head32 = nn.Conv2d(c[4], out, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.stem(x)
        feats = []
        for stage in self.stage:
            x = stage(x)
            feats.append(x)
        p16, p32 = feats[2], feats[3]  # strides 16 and 32
        up = nn.functional.interpolate(self.lateral(p32), scale_factor=2.0, mode="nearest")
        return self.head16(torch.cat([p16, up], 1)), self.head32(p32)


def _seeded(model: nn.Module, seed: int) -> nn.Module:
    """Random weights with non-trivial BatchNorm statistics (a 'trained-looking' net)."""
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            # BatchNorm2d keeps running statistics unless told not to; these all do.
            assert m.running_mean is not None and m.running_var is not None
            with torch.no_grad():
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def mobilenet_v3_small(num_classes: int = 1000) -> tuple[nn.Module, tuple[torch.Tensor]]:
    torch.manual_seed(0)
    return _seeded(MobileNetV3Small(num_classes), 0), (torch.randn(1, 3, 224, 224),)


def resnet18(num_classes: int = 1000) -> tuple[nn.Module, tuple[torch.Tensor]]:
    torch.manual_seed(1)
    return _seeded(ResNet18(num_classes), 1), (torch.randn(1, 3, 224, 224),)


def tiny_detector(num_classes: int = 4) -> tuple[nn.Module, tuple[torch.Tensor]]:
    torch.manual_seed(2)
    return _seeded(TinyDetector(num_classes), 2), (torch.randn(1, 3, 320, 320),)
