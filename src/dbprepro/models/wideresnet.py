"""Wide residual network (Zagoruyko & Komodakis 2016, arXiv:1605.07146) for 32x32 images.

WRN-d-k: a 3x3 stem convolution with 16 filters, three groups of (d - 4) / 6
pre-activation basic blocks with 16k, 32k and 64k channels (strides 1, 2, 2), then
BN-ReLU, global average pooling and a linear classifier.  A block is
BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3 plus a shortcut; when the width or stride
changes the shortcut is a 1x1 convolution applied to the block's pre-activated input.

Parameter names follow the checkpoints of RobustBench's CIFAR-10 ``Standard`` model
(WRN-28-10, trained without input normalisation): ``conv1``, ``block{1,2,3}.layer.{i}``
with ``bn1``/``conv1``/``bn2``/``conv2``/``convShortcut``, then ``bn1`` and ``fc``, so
that checkpoint loads strictly.  Inputs are images in [0, 1], used as they are.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class _Block(nn.Module):
    """Pre-activation basic block; ``convShortcut`` exists only when the shape changes."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=False)
        self.dropout = dropout
        self.projects = in_ch != out_ch or stride != 1
        if self.projects:
            self.convShortcut = nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.bn1(x))
        h = F.relu(self.bn2(self.conv1(a)))
        if self.dropout > 0:
            h = F.dropout(h, p=self.dropout, training=self.training)
        h = self.conv2(h)
        return h + (self.convShortcut(a) if self.projects else x)


class _Group(nn.Module):
    """``n`` blocks at one width; the first one may change width and stride."""

    def __init__(self, n: int, in_ch: int, out_ch: int, stride: int, dropout: float):
        super().__init__()
        self.layer = nn.Sequential(*[
            _Block(in_ch if i == 0 else out_ch, out_ch, stride if i == 0 else 1, dropout)
            for i in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-``depth``-``widen_factor`` classifier for 3-channel images in [0, 1]."""

    def __init__(self, depth: int = 28, widen_factor: int = 10, num_classes: int = 10,
                 dropout: float = 0.0):
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n + 4 with n >= 1, got {depth}")
        if widen_factor < 1:
            raise ValueError(f"widen_factor must be >= 1, got {widen_factor}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.depth, self.widen_factor, self.num_features = depth, widen_factor, widths[3]
        self.conv1 = nn.Conv2d(3, widths[0], 3, stride=1, padding=1, bias=False)
        self.block1 = _Group(n, widths[0], widths[1], 1, dropout)
        self.block2 = _Group(n, widths[1], widths[2], 2, dropout)
        self.block3 = _Group(n, widths[2], widths[3], 2, dropout)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # He initialisation, fan-out (as in the WRN paper's code)
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(x)
        h = self.block3(self.block2(self.block1(h)))
        h = F.relu(self.bn1(h))
        h = F.adaptive_avg_pool2d(h, 1).flatten(1)
        return self.fc(h)
