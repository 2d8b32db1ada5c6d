"""Running a network over normalised images: batch by batch, channels-last where its weights
are, under autocast when asked, averaged with mirror images for a model trained with them."""

from __future__ import annotations

import torch
from torch import nn


def uses_channels_last(model: nn.Module) -> bool:
    """Whether the model's convolution weights are laid out channels-last."""
    return any(
        p.dim() == 4 and not p.is_contiguous() and p.is_contiguous(memory_format=torch.channels_last)
        for p in model.parameters()
    )


@torch.inference_mode()
def predict_logits(
    model: nn.Module, images: torch.Tensor, batch_size: int = 256, amp_dtype: torch.dtype | None = None,
    tta: bool = False,
) -> torch.Tensor:
    """Logits (N, classes) of normalised images (N, 1, 28, 28), in eval mode, batch by batch,
    under autocast to `amp_dtype` when given; with `tta`, the mean of the logits of each image
    and its mirror image."""
    was_training = model.training
    model.eval()
    channels_last = uses_channels_last(model)
    outputs = []
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size]
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x).float()
            if tta:
                logits = (logits + model(x.flip(3)).float()) / 2
        outputs.append(logits)
    model.train(was_training)
    return torch.cat(outputs)
