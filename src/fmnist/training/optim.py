"""How the weights move: the optimiser, the learning rate of each step, and the exponential
moving average of the weights."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from fmnist.config import TrainConfig


def total_steps(cfg: TrainConfig, n_train: int) -> int:
    """Optimiser steps of the run: --steps, or --epochs passes over n_train images."""
    if cfg.epochs is not None:
        return max(1, math.ceil(cfg.epochs * n_train / cfg.batch_size))
    return cfg.steps


def lr_at(step: int, cfg: TrainConfig, steps: int) -> float:
    """The learning rate of a step: a linear rise over the first `warmup` fraction of the steps,
    then constant (the post), a cosine to 0, or (onecycle) a straight line down to 0."""
    warm = round(cfg.warmup * steps)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    if cfg.schedule == "constant":
        return cfg.lr
    done = (step - warm) / max(1, steps - warm)  # 0 -> 1 after the warm-up
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * done))
    return cfg.lr * (1 - done)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> float:
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device | None = None) -> torch.optim.Optimizer:
    params = model.parameters()
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0,
                               weight_decay=cfg.weight_decay)
    # The fused kernels update all parameters in one pass, with the same maths.
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)


def ema_update(decay: float):
    """The moving-average update for AveragedModel, with a warm-up: the decay after n updates
    is min(decay, (1 + n) / (10 + n)), so the first steps' random weights fade out quickly
    instead of weighing on a short run's average."""

    @torch.no_grad()
    def update(averages: list[torch.Tensor], current: list[torch.Tensor], num_averaged) -> None:
        # AveragedModel passes one list per device and dtype.
        if not averages[0].is_floating_point():  # counters such as num_batches_tracked
            torch._foreach_copy_(averages, current)
            return
        n = float(num_averaged)
        torch._foreach_lerp_(averages, current, 1.0 - min(decay, (1.0 + n) / (10.0 + n)))

    return update


def build_ema(model: nn.Module, decay: float) -> AveragedModel | None:
    """An exponential moving average of the weights (batch-norm statistics included), or None
    when `decay` is 0."""
    if not decay:
        return None
    return AveragedModel(model, multi_avg_fn=ema_update(decay), use_buffers=True)
