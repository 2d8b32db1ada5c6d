"""The photo augmentation: what `fmnist.inference.photo.prepare_image` does to a picture, as one batch
operation on normalised tensors."""

from __future__ import annotations

import math

import pytest
import torch

from fmnist.config import TrainConfig
from fmnist.data.augment import Augment, random_photo


def bar_batch(n: int = 8) -> torch.Tensor:
    """Raw pixels 0..1: a tall bright bar, off-centre and shorter than the image."""
    x = torch.zeros(n, 1, 28, 28)
    x[:, :, 6:20, 3:8] = 0.9
    return x


def box(image: torch.Tensor, level: float = 0.05) -> tuple[int, int, int, int]:
    rows = torch.nonzero((image > level).any(1)).flatten()
    cols = torch.nonzero((image > level).any(0)).flatten()
    return int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])


@pytest.mark.parametrize("mean,std", [(0.0, 1.0), (0.2860406, 0.3530242)])
def test_photo_fills_the_frame_like_the_preparation(mean, std):
    raw = bar_batch()
    x = (raw - mean) / std
    out = random_photo(x, torch.Generator().manual_seed(1), p=1.0, fill=-mean / std, std=std)
    pixels = out * std + mean
    assert out.shape == x.shape and torch.isfinite(out).all()
    for image in pixels[:, 0]:
        top, bottom, left, right = box(image)
        assert max(bottom - top, right - left) >= 25  # longest side fills the 28 pixels again
        assert abs((top + bottom) / 2 - 13.5) <= 1.5 and abs((left + right) / 2 - 13.5) <= 1.5  # centred
        assert image.min() >= -1e-5 and image.max() <= 1 + 1e-5
        assert float(image[0, 0]) == pytest.approx(0.0, abs=1e-5)  # the background stays black


def test_photo_rotates_and_mirrors_some_and_leaves_the_rest():
    x = torch.zeros(64, 1, 28, 28)
    x[:, :, 2:26, 10:14] = 1.0
    x[:, :, 2:6, 14:24] = 1.0  # an asymmetric "F"-like shape
    out = random_photo(x, torch.Generator().manual_seed(0), p=0.5)
    same = [torch.equal(a, b) for a, b in zip(out, x, strict=True)]
    assert 16 <= sum(same) <= 48  # about half untouched
    changed = out[[not s for s in same]]
    mirrored = (changed[:, 0, 2:8, :14].sum((1, 2)) > changed[:, 0, 2:8, 14:].sum((1, 2))).float().mean()
    assert 0.2 < mirrored < 0.8  # the arm points the other way in some of them


def test_photo_draws_from_its_generator_only():
    x = bar_batch(16)
    a = random_photo(x, torch.Generator().manual_seed(3), p=0.7)
    b = random_photo(x, torch.Generator().manual_seed(3), p=0.7)
    c = random_photo(x, torch.Generator().manual_seed(4), p=0.7)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_augment_runs_photo_from_the_config():
    cfg = TrainConfig(photo=0.5)
    augment = Augment.from_config(cfg, fill=-1.0, std=0.5, device=torch.device("cpu"))
    assert augment.enabled and augment.photo == 0.5
    x = torch.full((4, 1, 28, 28), -1.0).contiguous(memory_format=torch.channels_last)
    x[:, :, 5:20, 5:10] = 0.8
    out = augment(x)
    assert out.is_contiguous(memory_format=torch.channels_last) and torch.isfinite(out).all()


def test_photo_flag_is_validated():
    from fmnist import FmnistError

    with pytest.raises(FmnistError, match=r"--photo must be in \[0, 1\], got 1.5"):
        TrainConfig(photo=1.5).validate()
    TrainConfig(photo=1.0).validate()
    assert math.isclose(TrainConfig().photo, 0.0)
