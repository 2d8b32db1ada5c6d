"""Data augmentation as operations on a whole batch tensor (B, C, H, W) on its device: no
per-image Python, no host round trips. Each takes the generator it draws from, so a run's
augmentations are reproducible and resumable."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fmnist.config import TrainConfig


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


def _object_box(raw: torch.Tensor, level: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per image of (B, 1, H, W), the first and last row and column holding a pixel above
    `level` (the whole image when none does), as float tensors (B,)."""
    b, _, h, w = raw.shape
    mask = raw[:, 0] > level  # (B, H, W)
    rows, cols = mask.any(2), mask.any(1)  # (B, H), (B, W)
    empty = ~rows.any(1)
    r = torch.arange(h, device=raw.device).expand(b, h)
    c = torch.arange(w, device=raw.device).expand(b, w)
    top = torch.where(rows, r, h).amin(1).masked_fill(empty, 0)
    bottom = torch.where(rows, r, -1).amax(1).masked_fill(empty, h - 1)
    left = torch.where(cols, c, w).amin(1).masked_fill(empty, 0)
    right = torch.where(cols, c, -1).amax(1).masked_fill(empty, w - 1)
    return top.float(), bottom.float(), left.float(), right.float()


def _resample(raw: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Bilinear resampling of (B, 1, H, W) by affine maps (B, 2, 3) from output to input
    coordinates (-1..1), black outside."""
    grid = F.affine_grid(theta, list(raw.shape), align_corners=False)
    return F.grid_sample(raw, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def random_photo(x: torch.Tensor, generator: torch.Generator, p: float, fill: float = 0.0, std: float = 1.0,
                 max_degrees: float = 15.0, object_level: float = 0.05) -> torch.Tensor:
    """With probability p, make each image look like a photo after `fmnist.inference.photo.prepare_image`:
    mirrored (half of them), rotated by up to `max_degrees` and stretched by up to 15% along
    one axis, cropped to its object again and resized so its longest side fills the image
    (what the preparation does to any picture), its intensities bent by a gamma in
    0.6..1.6 and, for some, blurred. `fill` is the normalised black and `std` the
    normalisation's scale, so the work happens on pixels 0..1."""
    b, _, h, w = x.shape
    u = _uniform(7 * b, generator, x.device).view(7, b)
    chosen = (u[0] < p).view(b, 1, 1, 1)
    raw = ((x - fill) * std).clamp(0.0, 1.0)  # pixels 0..1, black background
    # Rotation, a stretch along x and the mirror, as one map from output to input coordinates.
    angle = (2 * u[1] - 1) * math.radians(max_degrees)
    stretch = 1.0 + 0.3 * (u[2] - 0.5)
    mirror = torch.where(u[3] < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.zeros(b, 2, 3, device=x.device)
    theta[:, 0, 0], theta[:, 0, 1] = cos * stretch * mirror, -sin
    theta[:, 1, 0], theta[:, 1, 1] = sin * stretch * mirror, cos
    moved = _resample(raw, theta)
    # The preparation: crop to the object, longest side to the full size, centred.
    top, bottom, left, right = _object_box(moved, object_level)
    side = torch.maximum(bottom - top + 1, right - left + 1)  # pixels
    zoom = side / max(h, w)  # < 1 enlarges
    crop = torch.zeros(b, 2, 3, device=x.device)
    crop[:, 0, 0], crop[:, 1, 1] = zoom * max(h, w) / w, zoom * max(h, w) / h
    crop[:, 0, 2] = (left + right + 1) / w - 1  # the box's centre, in -1..1
    crop[:, 1, 2] = (top + bottom + 1) / h - 1
    photo = _resample(moved, crop)
    # Intensities: a gamma, then a blur of random strength for about half of them.
    gamma = torch.exp((2 * u[4] - 1) * math.log(1.6)).view(b, 1, 1, 1)
    photo = photo.clamp_min(0.0).pow(gamma)
    kernel = torch.tensor([1.0, 2.0, 1.0], device=x.device)
    kernel = (kernel[:, None] * kernel[None, :] / 16).view(1, 1, 3, 3)
    blurred = F.conv2d(photo, kernel, padding=1)
    amount = (u[5] * (u[6] < 0.5)).view(b, 1, 1, 1)
    photo = photo + amount * (blurred - photo)
    return torch.where(chosen, photo / std + fill, x)


class Augment:
    """A run's augmentations of a training batch, drawn from their own generator so that a
    resumed run draws the same ones; `fill` is the normalised value of the background."""

    def __init__(self, translate: int, flip: bool, erase: float, fill: float, seed: int, device: torch.device,
                 photo: float = 0.0, std: float = 1.0):
        self.translate, self.flip, self.erase, self.fill = translate, flip, erase, fill
        self.photo, self.std = photo, std
        self.generator = torch.Generator(device).manual_seed(seed + 7919)
        self.enabled = bool(translate or flip or erase or photo)

    @classmethod
    def from_config(cls, cfg: TrainConfig, fill: float, std: float, device: torch.device) -> Augment:
        """The augmentations a training config asks for; `fill` is the normalised black, `std`
        the normalisation's scale."""
        return cls(cfg.translate, cfg.flip, cfg.erase, fill, cfg.seed, device, photo=cfg.photo, std=std)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        memory_format = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        if self.photo:
            x = random_photo(x, self.generator, self.photo, self.fill, self.std)
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
