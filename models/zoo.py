"""Small architectures for 28x28 grey images that stress import, cut naming and the rewrite.

Each is what users write, not what a framework generates: nested ``Sequential``
stages, a module called twice, a transformer block with its residuals written
inline in ``forward``.  The conformance tests build them with random weights.
"""
from __future__ import annotations

import torch
from torch import nn


class Stage(nn.Module):
    """Two 3x3 convolutions in an inner ``Sequential`` (legacy scopes ``features.0`` / ``block.1``)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.ReLU(),
                                   nn.Conv2d(out_channels, out_channels, 3, padding=1), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class NestedNet(nn.Module):
    """Stages nested two ``Sequential`` levels deep."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(Stage(1, 8), nn.MaxPool2d(2), Stage(8, 16), nn.MaxPool2d(2), Stage(16, 16))
        self.head = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


class ReusedPool(nn.Module):
    """One pooling module called twice (as Inception's stems do)."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        return self.head(torch.relu(self.conv3(x)).mean(dim=(2, 3)))


class Attention(nn.Module):
    """Single-head self-attention."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        weights = torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5, dim=-1)
        return self.proj(weights @ v)


class InlineBlock(nn.Module):
    """Pre-norm transformer block whose residual Adds are written inline: both cuts of the
    block belong to the block module itself."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """7x7 patches, a CLS token, inline-residual blocks, the head on the CLS token."""

    def __init__(self, classes: int = 10, dim: int = 32, depth: int = 3) -> None:
        super().__init__()
        self.patch = nn.Conv2d(1, dim, 7, stride=7)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 17, dim) * 0.02)
        self.blocks = nn.ModuleList(InlineBlock(dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], dim=1) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, 0]))


class TwoInputNet(nn.Module):
    """An image and a side feature vector; the vector's own layers run first and are joined
    with the image features before the head (a remainder that reads a second graph input)."""

    def __init__(self, classes: int = 10, extra: int = 8) -> None:
        super().__init__()
        self.extra = nn.Sequential(nn.Linear(extra, 16), nn.ReLU())
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(32, classes)

    def forward(self, images: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        side = self.extra(extra)
        return self.head(torch.cat([self.features(images).mean(dim=(2, 3)), side], dim=1))


class MLP(nn.Module):
    """Flattened pixels through three hidden layers."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(),
                                    nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class Bottleneck(nn.Module):
    """ResNet bottleneck: 1x1 down, 3x3, 1x1 up, identity shortcut."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels // 4, 1), nn.BatchNorm2d(channels // 4), nn.ReLU(),
                                  nn.Conv2d(channels // 4, channels // 4, 3, padding=1), nn.BatchNorm2d(channels // 4),
                                  nn.ReLU(), nn.Conv2d(channels // 4, channels, 1), nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.body(x))


class PooledClassifier(nn.Module):
    """A stem, a stack of blocks, a linear head on the global average pool."""

    def __init__(self, stem: nn.Module, blocks: nn.Module, width: int, classes: int) -> None:
        super().__init__()
        self.stem, self.blocks = stem, blocks
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


class BottleneckNet(PooledClassifier):
    def __init__(self, classes: int = 10) -> None:
        super().__init__(nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU()),
                         nn.Sequential(Bottleneck(32), nn.MaxPool2d(2), Bottleneck(32), Bottleneck(32),
                                       nn.MaxPool2d(2), Bottleneck(32)), 32, classes)


class InvertedResidual(nn.Module):
    """MobileNetV3 block: 1x1 expand, depthwise 3x3, squeeze-excite, hardswish, 1x1 project."""

    def __init__(self, channels: int, expand: int = 4) -> None:
        super().__init__()
        hidden = channels * expand
        self.expand = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.BatchNorm2d(hidden), nn.Hardswish())
        self.depthwise = nn.Sequential(nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden), nn.BatchNorm2d(hidden),
                                       nn.Hardswish())
        self.excite = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(hidden, hidden // 4, 1), nn.ReLU(),
                                    nn.Conv2d(hidden // 4, hidden, 1), nn.Hardsigmoid())
        self.project = nn.Sequential(nn.Conv2d(hidden, channels, 1), nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.depthwise(self.expand(x))
        return x + self.project(h * self.excite(h))


class MobileNetV3ish(PooledClassifier):
    def __init__(self, classes: int = 10) -> None:
        super().__init__(nn.Sequential(nn.Conv2d(1, 16, 3, stride=2, padding=1), nn.Hardswish()),
                         nn.Sequential(InvertedResidual(16), InvertedResidual(16), InvertedResidual(16)), 16, classes)


class DenseLayer(nn.Module):
    """DenseNet layer: its output is concatenated to its input."""

    def __init__(self, channels: int, growth: int = 8) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(), nn.Conv2d(channels, growth, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.conv(x)], dim=1)


class DenseNetish(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, padding=1)
        self.dense1 = nn.Sequential(DenseLayer(16), DenseLayer(24))
        self.transition = nn.Sequential(nn.Conv2d(32, 16, 1), nn.AvgPool2d(2))
        self.dense2 = nn.Sequential(DenseLayer(16), DenseLayer(24), DenseLayer(32))
        self.head = nn.Linear(40, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dense2(self.transition(self.dense1(self.stem(x)))).mean(dim=(2, 3)))


class ConvNeXtBlock(nn.Module):
    """Depthwise 7x7, LayerNorm over channels (channels-last), 4x MLP with GELU, residual."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.depthwise(x).permute(0, 2, 3, 1)
        return x + self.mlp(self.norm(h)).permute(0, 3, 1, 2)


class ConvNeXtish(PooledClassifier):
    def __init__(self, classes: int = 10) -> None:
        super().__init__(nn.Conv2d(1, 32, 4, stride=4),
                         nn.Sequential(ConvNeXtBlock(32), ConvNeXtBlock(32), ConvNeXtBlock(32)), 32, classes)
