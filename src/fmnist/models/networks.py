"""The registered networks: the post's ConvNet, its batch-normalised variant, the fast
networks of the CPU presets and the wide ResNets."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fmnist.data import IMAGE_SIZE, NUM_CLASSES
from fmnist.models.layers import Conv2d, Dense, Dropout
from fmnist.models.registry import register_model


class PostNet(nn.Module):
    """The post's ConvNet: two 5x5 SAME convolutions with 2x2 max-pooling, a 1024-unit dense
    layer with dropout, and a linear classifier."""

    def __init__(self, num_classes: int = NUM_CLASSES, keep_prob: float = 0.75):
        super().__init__()
        self.conv1 = Conv2d(1, 32, kernel_size=5, padding=2)
        self.conv2 = Conv2d(32, 64, kernel_size=5, padding=2)
        side = IMAGE_SIZE // 4  # two 2x2 poolings
        self.fc1 = Dense(64 * side * side, 1024)
        self.dropout = Dropout(p=1.0 - keep_prob)
        self.out = Dense(1024, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, 28, 28)
        # Pooling before ReLU gives the same values and gradients as after, on a quarter of
        # the elements.
        x = F.max_pool2d(self.conv1(x), 2).relu_()  # (B, 32, 14, 14)
        x = F.max_pool2d(self.conv2(x), 2).relu_()  # (B, 64, 7, 7)
        # Flatten in (H, W, C) order, as the post's NHWC reshape did; for a channels-last
        # tensor this is a view, not a copy.
        x = x.permute(0, 2, 3, 1).flatten(1)  # (B, 3136)
        x = self.dropout(self.fc1(x).relu_())  # (B, 1024)
        return self.out(x)  # (B, classes)


@register_model("post", "the post's ConvNet: conv5x5-32, conv5x5-64, dense 1024, dropout")
def post(num_classes: int = NUM_CLASSES, keep_prob: float = 0.75) -> nn.Module:
    return PostNet(num_classes, keep_prob)


class PostBNNet(PostNet):
    """The post's network with batch normalisation after each convolution and the dense layer
    (their biases dropped: the normalisation's shift replaces them)."""

    def __init__(self, num_classes: int = NUM_CLASSES, keep_prob: float = 0.75):
        super().__init__(num_classes, keep_prob)
        self.conv1 = nn.Conv2d(1, 32, kernel_size=5, padding=2, bias=False)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=5, padding=2, bias=False)
        self.fc1 = Dense(self.fc1.in_features, 1024, bias=False)
        self.bn1, self.bn2, self.bn3 = nn.BatchNorm2d(32), nn.BatchNorm2d(64), nn.BatchNorm1d(1024)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, 28, 28)
        x = F.max_pool2d(self.bn1(self.conv1(x)), 2).relu_()  # (B, 32, 14, 14)
        x = F.max_pool2d(self.bn2(self.conv2(x)), 2).relu_()  # (B, 64, 7, 7)
        x = x.permute(0, 2, 3, 1).flatten(1)  # (B, 3136)
        x = self.dropout(self.bn3(self.fc1(x)).relu_())  # (B, 1024)
        return self.out(x)


@register_model("post-bn", "the post's ConvNet with batch normalisation")
def post_bn(num_classes: int = NUM_CLASSES, keep_prob: float = 0.75) -> nn.Module:
    return PostBNNet(num_classes, keep_prob)


def conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    """3x3 convolution, batch norm, ReLU."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)
    )


def conv_pool_bn(c_in: int, c_out: int) -> nn.Sequential:
    """3x3 convolution, 2x2 max-pooling, batch norm, ReLU: the normalisation and the ReLU on a
    quarter of the elements."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.MaxPool2d(2), nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class FastNet(nn.Module):
    """A small network for CPUs: one cheap convolution at 28x28, the rest at 14x14 and 7x7,
    with a residual pair of convolutions at 7x7 and a max-pooled head. With `pool_first`, the
    two downsampling convolutions pool before their batch norm and ReLU (`conv_pool_bn`)."""

    def __init__(self, num_classes: int = NUM_CLASSES, widths: tuple[int, int, int] = (32, 64, 128),
                 pool_first: bool = False):
        super().__init__()
        c1, c2, c3 = widths
        if pool_first:
            self.stem, self.layer1 = conv_pool_bn(1, c1), conv_pool_bn(c1, c2)
        else:
            self.stem = nn.Sequential(conv_bn(1, c1), nn.MaxPool2d(2))  # (B, c1, 14, 14)
            self.layer1 = nn.Sequential(conv_bn(c1, c2), nn.MaxPool2d(2))  # (B, c2, 7, 7)
        self.layer2 = conv_bn(c2, c3)  # (B, c3, 7, 7)
        self.res = nn.Sequential(conv_bn(c3, c3), conv_bn(c3, c3))  # (B, c3, 7, 7)
        self.head = nn.Linear(c3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, 28, 28)
        x = self.layer2(self.layer1(self.stem(x)))
        x = x + self.res(x)
        x = torch.amax(x, dim=(2, 3))  # (B, c3)
        return self.head(x)


@register_model("fast", "a small residual network designed for CPU training speed")
def fast(num_classes: int = NUM_CLASSES, widths: tuple[int, int, int] = (32, 64, 128)) -> nn.Module:
    return FastNet(num_classes, tuple(widths))


@register_model("fast2", "the fast network pooling before normalising: the same work in 15% less time")
def fast2(num_classes: int = NUM_CLASSES, widths: tuple[int, int, int] = (32, 64, 128)) -> nn.Module:
    return FastNet(num_classes, tuple(widths), pool_first=True)


class WideBlock(nn.Module):
    """Pre-activation residual block of a wide ResNet (BN-ReLU-conv twice)."""

    def __init__(self, c_in: int, c_out: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(self.dropout(F.relu(self.bn2(out))))
        return out + skip


class WideResNet(nn.Module):
    """WRN-depth-k (Zagoruyko & Komodakis) for 28x28 inputs: three stages at 28, 14 and 7
    pixels with 16k, 32k and 64k channels."""

    def __init__(self, depth: int, k: int, num_classes: int = NUM_CLASSES, dropout: float = 0.0):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError("wide ResNet depth must be 6n + 4")
        n = (depth - 4) // 6
        widths = [16, 16 * k, 32 * k, 64 * k]
        self.stem = nn.Conv2d(1, widths[0], 3, padding=1, bias=False)
        blocks = []
        for stage, stride in enumerate((1, 2, 2)):
            c_in, c_out = widths[stage], widths[stage + 1]
            blocks += [WideBlock(c_in if i == 0 else c_out, c_out, stride if i == 0 else 1, dropout) for i in range(n)]
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(widths[-1])
        self.head = nn.Linear(widths[-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, 28, 28)
        x = self.blocks(self.stem(x))  # (B, 64k, 7, 7)
        x = F.relu(self.bn(x)).mean(dim=(2, 3))  # (B, 64k)
        return self.head(x)


@register_model("wrn-16-4", "wide ResNet, depth 16, width 4")
def wrn_16_4(num_classes: int = NUM_CLASSES, dropout: float = 0.0) -> nn.Module:
    return WideResNet(16, 4, num_classes, dropout)


@register_model("wrn-28-10", "wide ResNet, depth 28, width 10 (the dataset's top table entries)")
def wrn_28_10(num_classes: int = NUM_CLASSES, dropout: float = 0.0) -> nn.Module:
    return WideResNet(28, 10, num_classes, dropout)
