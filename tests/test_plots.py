"""The run's pictures (`fmnist.plots`): drawn as the model sees the images, packed under their title."""

import numpy as np
import pytest
from PIL import Image

from fmnist.data import CLASS_NAMES
from fmnist.plots import plot_misclassified, plot_samples


def images_and_labels(n: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Black images with a light square in the middle, as Fashion-MNIST's are light on black."""
    images = np.zeros((n, 28, 28), np.uint8)
    images[:, 8:20, 8:20] = 230
    return images, np.arange(n) % 10


def ink_blocks(path) -> tuple[list[tuple[int, int]], np.ndarray]:
    """The runs of rows holding anything darker than the white page, top to bottom."""
    pixels = np.asarray(Image.open(path).convert("L"))
    inked = (pixels < 128).any(axis=1)
    blocks, start = [], None
    for row, ink in enumerate(inked):
        if ink and start is None:
            start = row
        elif not ink and start is not None:
            blocks.append((start, row))
            start = None
    return blocks, pixels


@pytest.mark.parametrize("draw", ["samples", "misclassified"])
def test_images_are_light_on_black_right_under_the_title(tmp_path, draw):
    images, labels = images_and_labels()
    path = tmp_path / f"{draw}.png"
    if draw == "samples":
        plot_samples(images, labels, CLASS_NAMES, path)
    else:
        plot_misclassified(images, labels, (labels + 1) % 10, CLASS_NAMES, path)
    blocks, pixels = ink_blocks(path)
    # Light on black: the black of the images covers much of the picture (dark on white, it
    # would be a few letters).
    assert (pixels < 40).mean() > 0.3
    title, below = blocks[0], blocks[1]
    gap = below[0] - title[1]  # white rows between the title and what follows it
    assert gap < 0.03 * pixels.shape[0], (gap, pixels.shape)
