"""A trained model at work on pictures.

- `decode`: pictures in, with limits checked from the header before decoding.
- `photo`: any picture made to look like a Fashion-MNIST image (the background model).
- `inputs`: the files `predict` and `explain` read, and the 28x28 inputs they write back.
- `photo_sets`: folders of labelled photos prepared once (cached) for training and the flag.
- `forward`: a network run over normalised images, batch by batch.
- `calibrate`: temperature scaling and the out-of-distribution score.
- `predictor`: `load_model(run_dir)`, the one loader for inference, and its `Predictor`.
"""

from fmnist.inference.predictor import Predictor, load_model, predict_files

__all__ = ["Predictor", "load_model", "predict_files"]
