"""Named training recipes: `fmnist train --preset NAME`. A preset sets config fields; a config
file and flags given alongside still override it.

    fmnist train --preset cpu-fast
    fmnist train --preset best --epochs 60
    fmnist train --preset post --init normal   # the post exactly, its N(0, 1) initialisation too
    fmnist presets                             # each one's recipe and what it measured
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fmnist import FmnistError

# The best test accuracy a 2-core laptop CPU reaches in about 5 minutes of wall time: the
# post's network with batch normalisation, trained long with SGD, shifted and mirrored images.
_CPU_FAST = {
    "model": "post-bn",
    "normalize": True,
    "epochs": 26.0,
    "batch_size": 256,
    "optimizer": "sgd",
    "lr": 0.1,
    "weight_decay": 5e-4,
    "schedule": "onecycle",
    "warmup": 0.15,
    "label_smoothing": 0.1,
    "translate": 2,
    "flip": True,
    "tta": True,
}

# The first cpu-fast: the `fast` network for 10 epochs.
_CPU_FAST_V1 = _CPU_FAST | {"model": "fast", "epochs": 10.0, "lr": 0.2}

PRESETS: dict[str, dict[str, Any]] = {
    # The post's recipe: the defaults of TrainConfig (--init normal adds its initialisation).
    "post": {},
    "cpu-fast": _CPU_FAST,
    "cpu-fast-v1": _CPU_FAST_V1,
    # Seconds on one GPU: cpu-fast's network and recipe, longer, in batches of 512, compiled.
    "gpu-fast": _CPU_FAST | {"epochs": 40.0, "batch_size": 512, "lr": 0.2, "compile": True},
    # Real photos: cpu-fast with a quarter of each batch drawn from labelled photos (--photos DIR).
    "photo": _CPU_FAST | {"photo_share": 0.25},
    # Top accuracy: a wide ResNet with random erasing, EMA and flip TTA.
    "best": {
        "model": "wrn-28-10",
        "normalize": True,
        "epochs": 40.0,
        "batch_size": 256,
        "optimizer": "sgd",
        "lr": 0.1,
        "weight_decay": 5e-4,
        "schedule": "cosine",
        "warmup": 0.02,
        "label_smoothing": 0.1,
        "translate": 2,
        "flip": True,
        "erase": 0.5,
        "ema": 0.999,
        "tta": True,
        "compile": True,
    },
}


@dataclass(frozen=True)
class About:
    """What `fmnist presets` says of a preset: its recipe in words and what it measured (the
    docs' results pages have the commands and the machines)."""

    summary: str
    measured: str


ABOUT = {
    "post": About("the blog post's recipe (the defaults of `fmnist train`) with PyTorch's initialisation; "
                  "add --init normal for the post's own",
                  "88.52% test accuracy, 500 steps in 19.6 s on 2 CPU cores; 81.92% with --init normal "
                  "(the post's initialisation and the post's own figure)"),
    "cpu-fast": About("the post's network with batch normalisation (`post-bn`), 26 epochs of SGD one-cycle, "
                      "weight decay, label smoothing, shifted and mirrored images, flip test-time augmentation",
                      "94.00 ± 0.04% test accuracy (3 seeds) in 249 s on 2 CPU cores (aimed at >= 94% in <= 300 s); "
                      "with --epochs 14, 93.39 ± 0.09% in 136 s"),
    "cpu-fast-v1": About("the first cpu-fast: a small residual network (`fast`) for 10 epochs, otherwise the same",
                         "93.14 ± 0.03% test accuracy (3 seeds) in 143 s on 2 CPU cores, in the same run as cpu-fast's"),
    "gpu-fast": About("cpu-fast's recipe for one GPU: 40 epochs in batches of 512, compiled",
                      "94.31 ± 0.11% test accuracy (3 seeds, trained on the CPU); its time on a GPU unmeasured "
                      "(aimed at >= 94% in seconds on one H200)"),
    "photo": About("for real photos: cpu-fast with a quarter of each batch from labelled photos people took "
                   "(--photos DIR, laid out as DIR/train/<label>/*.jpg), trained on sets of accepted classes",
                   "93.73% test accuracy; on the 290 clothing photos of clothing-dataset-small's validation/ "
                   "84.8% top-1 in the accepted classes (shoes 80.8%), 91.0% passing the out-of-distribution "
                   "flag (seed 0, 5586 steps, 1338 s on 2 busy CPU cores)"),
    "best": About("a wide ResNet (WRN-28-10), 40 epochs of SGD cosine, random erasing, EMA, flip test-time "
                  "augmentation, compiled",
                  "95.84% test accuracy in 3.6 min on one H200 (aimed at >= 96% within 10 minutes)"),
}


def preset(name: str) -> dict[str, Any]:
    try:
        return dict(PRESETS[name])
    except KeyError:
        raise FmnistError(f"unknown preset {name!r}; choose from: {', '.join(PRESETS)}") from None
