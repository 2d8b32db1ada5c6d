"""`from fmnist.predict import load_model`: the inference loader under the name the docs have
always used; it lives in `fmnist.inference.predictor`."""

from fmnist.inference.predictor import Predictor, load_model, predict_files

__all__ = ["Predictor", "load_model", "predict_files"]
