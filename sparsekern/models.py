"""Small reference models used by the tests, benchmarks and training jobs.

Plain dense ``nn`` modules: make them sparse with :func:`sparsekern.sparsify`.
"""
from __future__ import annotations

from torch import nn


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with BN, identity or 1x1-conv shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.bn1(self.conv1(x)).relu()
        out = self.bn2(self.conv2(out))
        return (out + (x if self.downsample is None else self.downsample(x))).relu()


class ResNetCifar(nn.Module):
    """ResNet-18 layout for 32x32 inputs (3x3 stem, no max-pool), ``width`` channels in stage 1.

    Input float [N, 3, H, W] -> logits [N, num_classes].
    """

    def __init__(self, num_classes: int = 10, width: int = 64, blocks=(2, 2, 2, 2), in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers, cin = [], width
        for i, n in enumerate(blocks):
            cout = width * 2 ** i
            for j in range(n):
                layers.append(BasicBlock(cin, cout, stride=2 if (i > 0 and j == 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.layers(self.bn1(self.conv1(x)).relu())
        return self.fc(x.mean((2, 3)))


def resnet20(num_classes: int = 10, width: int = 16, in_channels: int = 3) -> ResNetCifar:
    """ResNet-20 for CIFAR (3 stages of 3 basic blocks, 16-32-64 channels)."""
    return ResNetCifar(num_classes, width, blocks=(3, 3, 3), in_channels=in_channels)


def resnet18_cifar(num_classes: int = 10, width: int = 64) -> ResNetCifar:
    """ResNet-18 (2-2-2-2 basic blocks) for CIFAR-sized inputs."""
    return ResNetCifar(num_classes, width)


def mlp(sizes=(64, 256, 256, 10)) -> nn.Sequential:
    """Linear-ReLU stack over ``sizes`` (no ReLU after the last layer)."""
    mods = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        mods.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            mods.append(nn.ReLU())
    return nn.Sequential(*mods)


class LeNet5(nn.Module):
    """LeNet-5-style CNN: conv5(6)-pool-conv5(16)-pool-fc120-fc84-fc. Input [N, C, H, W] (H, W >= 8)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28):
        super().__init__()
        pad = 2 if image_size < 28 else 0
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5, padding=pad), nn.ReLU(), nn.AdaptiveAvgPool2d(4))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(16 * 16, 120), nn.ReLU(),
                                        nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


def vgg(num_classes: int = 10, cfg=(64, "M", 128, "M", 256, 256, "M", 512, 512, "M"), in_channels: int = 3):
    """VGG-style CNN: 3x3 conv-BN-ReLU stacks ("M": 2x2 max-pool), global average pool, linear head."""
    layers, c = [], in_channels
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(c, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU()]
            c = v
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes))
