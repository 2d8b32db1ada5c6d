"""The model registry: each network is one decorated builder function.

    fmnist models
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fmnist import FmnistError
from fmnist.data import IMAGE_SIZE, NUM_CLASSES


@dataclass(frozen=True)
class ModelSpec:
    name: str
    builder: Callable[..., nn.Module]
    description: str


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(name: str, description: str):
    """Decorator adding a builder `fn(num_classes=..., **kwargs) -> nn.Module` to the registry."""

    def wrap(builder):
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = ModelSpec(name, builder, description)
        return builder

    return wrap


def model_names() -> list[str]:
    return list(_REGISTRY)


def model_spec(name: str) -> ModelSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise FmnistError(f"unknown model {name!r}; choose from: {', '.join(_REGISTRY)}") from None


def build_model(name: str, num_classes: int = NUM_CLASSES, **kwargs) -> nn.Module:
    return model_spec(name).builder(num_classes=num_classes, **kwargs)


INIT_SCHEMES = ("default", "seed")


def init_weights(model: nn.Module, scheme: str) -> None:
    """"default" keeps PyTorch's initialisation; "seed" draws every weight and bias from N(0, 1),
    as the post's `tf.random_normal` did."""
    if scheme == "default":
        return
    if scheme != "seed":
        raise FmnistError(f"unknown init {scheme!r}; choose from: {', '.join(INIT_SCHEMES)}")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 1.0)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_image(model: nn.Module) -> int:
    """Forward FLOPs (a multiply-add counts two) for one 28x28 image, counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 1, IMAGE_SIZE, IMAGE_SIZE))
    model.train(was_training)
    return counter.get_total_flops()


# ----------------------------------------------------------------------------- networks


class SeedNet(nn.Module):
    """The post's ConvNet: two 5x5 SAME convolutions with 2x2 max-pooling, a 1024-unit dense
    layer with dropout, and a linear classifier."""

    def __init__(self, num_classes: int = NUM_CLASSES, keep_prob: float = 0.75):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, kernel_size=5, padding=2)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=5, padding=2)
        side = IMAGE_SIZE // 4  # two 2x2 poolings
        self.fc1 = nn.Linear(64 * side * side, 1024)
        self.dropout = nn.Dropout(p=1.0 - keep_prob)
        self.out = nn.Linear(1024, num_classes)

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


@register_model("seed", "the post's ConvNet: conv5x5-32, conv5x5-64, dense 1024, dropout")
def seed(num_classes: int = NUM_CLASSES, keep_prob: float = 0.75) -> nn.Module:
    return SeedNet(num_classes, keep_prob)
