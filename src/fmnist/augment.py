"""Data augmentation as operations on a whole batch tensor (B, C, H, W) on its device: no
per-image Python, no host round trips. Each takes the generator it draws from, so a run's
augmentations are reproducible and resumable."""

from __future__ import annotations

import torch


def _uniform(n: int, generator: torch.Generator, device) -> torch.Tensor:
    return torch.rand(n, generator=generator, device=generator.device).to(device)


def random_flip(x: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Mirror each image left-right with probability p."""
    flip = (_uniform(len(x), generator, x.device) < p).view(-1, 1, 1, 1)
    return torch.where(flip, x.flip(3), x)


def random_translate(x: torch.Tensor, generator: torch.Generator, pad: int, fill: float = 0.0) -> torch.Tensor:
    """Shift each image by up to `pad` pixels in each direction, filling with `fill`: pad the
    batch once, then crop every image at its own offset with one gather over the flattened
    pixels."""
    if pad <= 0:
        return x
    b, c, h, w = x.shape
    side = w + 2 * pad
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad), value=fill).flatten(2)  # (B, C, (H+2p)(W+2p))
    dy, dx = (_uniform(2 * b, generator, x.device) * (2 * pad + 1)).long().view(2, b, 1)
    window = (torch.arange(h, device=x.device).view(h, 1) * side + torch.arange(w, device=x.device)).view(1, -1)
    index = (window + dy * side + dx).unsqueeze(1).expand(b, c, h * w)  # (B, C, H*W)
    return padded.gather(2, index).view(b, c, h, w)


def random_erase(
    x: torch.Tensor,
    generator: torch.Generator,
    p: float = 0.5,
    scale: tuple[float, float] = (0.02, 0.25),
    ratio: tuple[float, float] = (0.3, 3.3),
    fill: float = 0.0,
) -> torch.Tensor:
    """Random erasing (Zhong et al.): with probability p, set a rectangle covering a `scale`
    fraction of the image, with aspect ratio in `ratio`, to `fill`."""
    b, _, h, w = x.shape
    u = _uniform(5 * b, generator, x.device).view(5, b)
    area = h * w * (scale[0] + (scale[1] - scale[0]) * u[0])
    log_lo, log_hi = torch.log(torch.tensor(ratio[0])), torch.log(torch.tensor(ratio[1]))
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[1])
    eh = torch.sqrt(area * aspect).round().clamp(1, h)
    ew = torch.sqrt(area / aspect).round().clamp(1, w)
    top = (u[2] * (h - eh + 1)).floor()
    left = (u[3] * (w - ew + 1)).floor()
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    inside = (
        (rows >= top.view(b, 1, 1)) & (rows < (top + eh).view(b, 1, 1))
        & (cols >= left.view(b, 1, 1)) & (cols < (left + ew).view(b, 1, 1))
        & (u[4] < p).view(b, 1, 1)
    )  # (B, H, W)
    return x.masked_fill(inside.unsqueeze(1), fill)


class Augment:
    """A run's augmentations of a training batch, drawn from their own generator so that a
    resumed run draws the same ones; `fill` is the normalised value of the background."""

    def __init__(self, translate: int, flip: bool, erase: float, fill: float, seed: int, device: torch.device):
        self.translate, self.flip, self.erase, self.fill = translate, flip, erase, fill
        self.generator = torch.Generator(device).manual_seed(seed + 7919)
        self.enabled = bool(translate or flip or erase)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        memory_format = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        if self.translate:
            x = random_translate(x, self.generator, self.translate, self.fill)
        if self.flip:
            x = random_flip(x, self.generator)
        if self.erase:
            x = random_erase(x, self.generator, self.erase, fill=self.fill)
        return x.contiguous(memory_format=memory_format)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
