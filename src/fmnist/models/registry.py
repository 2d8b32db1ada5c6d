"""The model registry: each network is one decorated builder function, found by name.

    fmnist models
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

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


def init_weights(model: nn.Module, scheme: str) -> None:
    """"default" keeps PyTorch's initialisation; "normal" draws every weight and bias from
    N(0, 1), as the post's `tf.random_normal` did. (The choices are `fmnist.config.Init`.)"""
    if scheme == "default":
        return
    if scheme != "normal":
        raise ValueError(f"unknown init {scheme!r}")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 1.0)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_image(model: nn.Module) -> int:
    """Forward FLOPs (a multiply-add counts two) for one 28x28 image, counted by torch."""
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 1, IMAGE_SIZE, IMAGE_SIZE))
    model.train(was_training)
    return counter.get_total_flops()


class MirrorAverage(nn.Module):
    """A network whose logits are the mean of the image's and its mirror image's, as `predict`
    and `evaluate` score a model trained with mirror images (model.json "tta")."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, 28, 28)
        return (self.model(x) + self.model(x.flip(3))) / 2  # (B, classes)





def describe_models() -> list[dict]:
    """`fmnist models`: each registered network's name, parameters, FLOPs per image and description."""
    rows = []
    for name in model_names():
        model = build_model(name)
        rows.append({"name": name, "parameters": count_parameters(model), "flops_per_image": flops_per_image(model),
                     "description": model_spec(name).description})
    return rows


def format_models(rows: list[dict]) -> str:
    lines = [f"{'model':<14} {'params':>10} {'MFLOP/img':>10}  description"]
    lines += [f"{r['name']:<14} {r['parameters']:>10,} {r['flops_per_image'] / 1e6:>10.1f}  {r['description']}" for r in rows]
    return "\n".join(lines)
