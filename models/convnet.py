"""Small multi-scale convolutional classifier (input [B, 3, 32, 32] float).

Data flow (spatial size in brackets)::

    stem  3x3 conv/BN/ReLU, stride 1                       [32]
    s1    3x3 stride 2 + 3x3, conv/BN/ReLU                 [16]
    s2    3x3 stride 2 + 3x3, conv/BN/ReLU, plus a         [8]
          1x1 stride-2 conv/BN shortcut from s1 (add)
    fuse  nearest 2x upsample of s2 + 1x1 lateral of s1,   [16]
          3x3 conv/BN/ReLU, then 2x2 max pool              [8]
    head  global average pool -> linear

BatchNorm running statistics are randomised at init so that, in eval mode,
each BN is a non-trivial affine map (useful for testing BN folding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .registry import register_model


@dataclass
class ConvNetConfig:
    """Channel widths per scale, input geometry and class count."""

    in_channels: int = 3
    image_size: int = 32
    widths: tuple[int, int, int] = (16, 32, 64)
    num_classes: int = 10
    init_std: float = 0.02  # linear head


def conv_bn(
    c_in: int, c_out: int, kernel: int, stride: int = 1, relu: bool = True
) -> nn.Sequential:
    """Conv (no bias) + BatchNorm (+ ReLU), 'same' padding for odd kernels."""
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(c_out),
    ]
    if relu:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class ConvNet(nn.Module):
    """Multi-scale conv net: ``forward(images [B, C, H, W]) -> logits [B, classes]``."""

    def __init__(self, cfg: ConvNetConfig) -> None:
        super().__init__()
        w0, w1, w2 = cfg.widths
        self.stem = conv_bn(cfg.in_channels, w0, 3)
        self.stage1 = nn.Sequential(conv_bn(w0, w1, 3, stride=2), conv_bn(w1, w1, 3))
        self.stage2 = nn.Sequential(conv_bn(w1, w2, 3, stride=2), conv_bn(w2, w2, 3, relu=False))
        self.shortcut = conv_bn(w1, w2, 1, stride=2, relu=False)
        self.lateral = nn.Conv2d(w1, w2, 1)
        self.fuse = conv_bn(w2, w2, 3)
        self.head = nn.Linear(w2, cfg.num_classes)
        self._init(cfg.init_std)

    @torch.no_grad()
    def _init(self, std: float) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.uniform_(m.weight, 0.8, 1.2)
                nn.init.normal_(m.bias, 0.0, 0.05)
                nn.init.normal_(m.running_mean, 0.0, 0.05)
                nn.init.uniform_(m.running_var, 0.5, 1.5)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, std)
                nn.init.zeros_(m.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x0 = self.stem(images)
        x1 = self.stage1(x0)
        x2 = F.relu(self.stage2(x1) + self.shortcut(x1))
        top_down = F.interpolate(x2, scale_factor=2.0, mode="nearest") + self.lateral(x1)
        fused = F.max_pool2d(self.fuse(top_down), kernel_size=2)
        pooled = fused.mean(dim=(2, 3))
        return self.head(pooled)


def _image_inputs(
    cfg: ConvNetConfig, batch: int, seq: int, device: str | torch.device
) -> tuple[torch.Tensor]:
    """Deterministic N(0, 1) images; ``seq`` is ignored."""
    gen = torch.Generator().manual_seed(1234)
    shape = (batch, cfg.in_channels, cfg.image_size, cfg.image_size)
    return (torch.randn(shape, generator=gen).to(device),)


register_model(
    "convnet-tiny",
    ConvNetConfig,
    ConvNet,
    _image_inputs,
    "Multi-scale conv net for tests: 3 scales, 1x1 shortcut add, upsample fusion, [B,3,32,32]",
    family="conv",
)
