"""Fashion-MNIST as files and as tensors.

- `idx`: the IDX format, parsed with every size checked against the header.
- `locate`: where the four files are looked for, and the hardened download.
- `splits`: class names, the train/validation/test splits as tensors, the batch sampler.
- `augment`: augmentation as operations on a whole batch tensor.
- `photos`: folders of labelled real photos and the classes each label accepts.
"""

from fmnist.data.idx import DataError, load_idx, parse_idx, save_idx
from fmnist.data.locate import SPLITS, download, find_data_dir
from fmnist.data.splits import (
    CLASS_NAMES,
    FMNIST_MEAN,
    FMNIST_STD,
    IMAGE_SIZE,
    NUM_CLASSES,
    BatchSampler,
    Normalization,
    Split,
    load_split,
    load_splits,
    load_test_split,
    one_hot,
    to_tensor,
)

__all__ = [
    "CLASS_NAMES", "FMNIST_MEAN", "FMNIST_STD", "IMAGE_SIZE", "NUM_CLASSES", "SPLITS", "BatchSampler",
    "DataError", "Normalization", "Split", "download", "find_data_dir", "load_idx", "load_split", "load_test_split",
    "load_splits", "one_hot", "parse_idx", "save_idx", "to_tensor",
]
