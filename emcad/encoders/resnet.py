"""ResNet-18/34/50/101/152 feature encoders with torchvision's architecture and key names.

The layout is torchvision's ResNet v1.5 (a bottleneck strides on its 3x3
convolution, the 1x1 projection shortcut is ``downsample.0``/``downsample.1``),
so torchvision and timm ``resnet*`` checkpoints load unchanged. torchvision is
not imported (it cannot be imported with the CPU-only torch used here).

The encoder keeps the classifier ``fc = Linear(512 * expansion, 1000)`` although
``forward`` never uses it: original EMCAD checkpoints of ResNet-based models
contain ``backbone.fc.*``, and they should load strictly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
]

IMAGENET_NUM_CLASSES = 1000


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (ResNet-18/34)."""

    expansion = 1

    def __init__(
        self, in_channels: int, width: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, width, stride)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(width, width)
        self.bn2 = nn.BatchNorm2d(width)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (carries the stride, v1.5) -> 1x1 expand, with a residual connection."""

    expansion = 4

    def __init__(
        self, in_channels: int, width: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = _conv1x1(in_channels, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = _conv1x1(width, out_channels)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet feature encoder returning ``[layer1, layer2, layer3, layer4]`` outputs.

    The outputs are at strides 4, 8, 16, 32 with ``out_channels`` channels
    (shallow to deep). ``fc`` exists only for checkpoint compatibility.
    """

    out_strides = (4, 8, 16, 32)

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: Sequence[int],
        in_channels: int = 3,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if len(layers) != 4:
            raise ValueError(f"layers needs 4 entries, got {list(layers)}")
        self.blocks_per_layer = list(layers)
        self._in_channels = 64  # running input width while the layers are built

        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        # Unused by forward; kept so that checkpoints with `fc.*` load strictly.
        self.fc = nn.Linear(512 * block.expansion, IMAGENET_NUM_CLASSES)

        del self._in_channels
        self.out_channels = [width * block.expansion for width in (64, 128, 256, 512)]
        self._init_weights(zero_init_residual)

    def _make_layer(
        self, block: type[BasicBlock] | type[Bottleneck], width: int, num_blocks: int, stride: int = 1
    ) -> nn.Sequential:
        out_channels = width * block.expansion
        downsample = None
        if stride != 1 or self._in_channels != out_channels:
            downsample = nn.Sequential(
                _conv1x1(self._in_channels, out_channels, stride), nn.BatchNorm2d(out_channels)
            )
        blocks = [block(self._in_channels, width, stride, downsample)]
        self._in_channels = out_channels
        blocks += [block(out_channels, width) for _ in range(1, num_blocks)]
        return nn.Sequential(*blocks)

    def _init_weights(self, zero_init_residual: bool) -> None:
        # torchvision's scheme; `fc` keeps nn.Linear's default initialisation.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if zero_init_residual:
            # Each residual branch starts as zero, so every block starts as the identity.
            for module in self.modules():
                if isinstance(module, Bottleneck):
                    nn.init.zeros_(module.bn3.weight)
                elif isinstance(module, BasicBlock):
                    nn.init.zeros_(module.bn2.weight)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        features = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            features.append(x)
        return features


def resnet18(**kwargs) -> ResNet:
    """ResNet-18: basic blocks [2, 2, 2, 2]; 11,689,512 parameters including the unused fc."""
    return ResNet(BasicBlock, (2, 2, 2, 2), **kwargs)


def resnet34(**kwargs) -> ResNet:
    """ResNet-34: basic blocks [3, 4, 6, 3]; 21,797,672 parameters including the unused fc."""
    return ResNet(BasicBlock, (3, 4, 6, 3), **kwargs)


def resnet50(**kwargs) -> ResNet:
    """ResNet-50: bottlenecks [3, 4, 6, 3]; 25,557,032 parameters including the unused fc."""
    return ResNet(Bottleneck, (3, 4, 6, 3), **kwargs)


def resnet101(**kwargs) -> ResNet:
    """ResNet-101: bottlenecks [3, 4, 23, 3]; 44,549,160 parameters including the unused fc."""
    return ResNet(Bottleneck, (3, 4, 23, 3), **kwargs)


def resnet152(**kwargs) -> ResNet:
    """ResNet-152: bottlenecks [3, 8, 36, 3]; 60,192,808 parameters including the unused fc."""
    return ResNet(Bottleneck, (3, 8, 36, 3), **kwargs)
