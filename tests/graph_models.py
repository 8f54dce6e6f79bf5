"""Small real models for the graph-model tests, built in the test (random weights).

Imported by the tests through ``module:factory`` specs, the way a user points
``edgemesh import`` at their own code.
"""

from __future__ import annotations

import torch
from torch import nn


class TinyClassifier(nn.Module):
    """Conv -> ReLU -> global pool -> linear: a 10-class image classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [N, 3, 32, 32]
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))  # [N, 10]


class TwoHeads(nn.Module):
    """Two outputs (boxes-and-scores style), to check output order and names."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2)
        self.box = nn.Conv2d(8, 4, 1)
        self.cls = nn.Conv2d(8, 3, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.relu(self.conv(x))
        return self.box(h), torch.sigmoid(self.cls(h))


class SignBranch(nn.Module):
    """Data-dependent control flow: tracing keeps only the branch the example
    took, so the ONNX graph disagrees with eager PyTorch on other inputs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x * 2
        return -x


def classifier() -> tuple[nn.Module, tuple[torch.Tensor]]:
    torch.manual_seed(0)
    model = TinyClassifier().eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        model.bn.running_mean.uniform_(-0.2, 0.2)
        model.bn.running_var.uniform_(0.5, 1.5)
    return model, (torch.randn(1, 3, 32, 32),)


def two_heads() -> tuple[nn.Module, tuple[torch.Tensor]]:
    torch.manual_seed(1)
    return TwoHeads().eval(), (torch.randn(1, 3, 32, 32),)


def sign_branch() -> tuple[nn.Module, tuple[torch.Tensor]]:
    return SignBranch().eval(), (torch.ones(1, 4),)
