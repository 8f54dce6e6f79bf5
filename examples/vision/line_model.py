"""The line-inspection model: MobileNetV3-small (torchvision's architecture) with a
2-class head, ok / defect, random weights (nothing downloaded).

`edgemesh import line_model:make ...` calls ``make()``, which returns the
module and an example frame batch, as any user's own factory would.
"""

from __future__ import annotations

import torch

from edgemesh.lab.vision_models import MobileNetV3Small

LABELS = ("ok", "defect")
SIZE = 224


def make() -> tuple[torch.nn.Module, tuple[torch.Tensor]]:
    torch.manual_seed(17)
    model = MobileNetV3Small(num_classes=len(LABELS)).eval()
    return model, (torch.randn(1, 3, SIZE, SIZE),)
