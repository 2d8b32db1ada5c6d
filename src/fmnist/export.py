"""Export a trained model to ONNX, for runtimes without PyTorch.

    fmnist export --model runs/my-run --format onnx --out fmnist.onnx

The ONNX model takes raw pixels, float32 0..255 of shape (N, 1, 28, 28) with any N, and does
the run's normalisation itself; it returns "logits" and "probabilities" (N, classes). The class
names, normalisation and source model are in its metadata (`class_names` is a JSON list).
Needs the `export` extra: pip install 'fmnist[export]'.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fmnist import FmnistError, __version__
from fmnist.data import IMAGE_SIZE, load_split
from fmnist.io import atomic_open
from fmnist.run import load_network

FORMATS = ("onnx",)
INPUT_NAME = "pixels"
OUTPUT_NAMES = ("logits", "probabilities")


class RawPixelModel(nn.Module):
    """A trained model behind its own normalisation: pixels 0..255 in, logits and probabilities
    out, the probabilities tempered by the run's calibration as `fmnist predict` tempers them."""

    def __init__(self, model: nn.Module, mean: float, std: float, tta: bool = False, temperature: float = 1.0):
        super().__init__()
        self.model, self.tta = model, tta
        self.register_buffer("inverse_temperature", torch.tensor(1.0 / temperature))  # the run's calibration
        # (pixels / 255 - mean) / std, folded into one multiply-add
        self.register_buffer("scale", torch.tensor(1.0 / (255.0 * std)))
        self.register_buffer("shift", torch.tensor(-mean / std))

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # (N, 1, 28, 28)
        x = pixels * self.scale + self.shift
        logits = self.model(x)  # (N, classes)
        if self.tta:  # a model trained with mirror images: the mean with its mirror's, as evaluate
            logits = (logits + self.model(x.flip(3))) / 2
        return logits, (logits * self.inverse_temperature).softmax(1)


def _require_onnx():
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        raise FmnistError(f"ONNX export needs the export extra ({e.name} is missing): "
                          "pip install 'fmnist[export]'") from None
    return onnx, onnxruntime


def onnx_session(model: str | os.PathLike | bytes, threads: int = 0):
    """An onnxruntime CPU session for an exported model, a path or its bytes (threads 0: one
    per core)."""
    _, ort = _require_onnx()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3  # errors only
    if not isinstance(model, bytes):
        model = str(model)
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def export_onnx(run_dir: str | os.PathLike, out: str | os.PathLike, check_images: int = 64,
                quantize: str | None = None, data_dir=None) -> Path:
    """Write the run's model as ONNX with a dynamic batch dimension, then check that
    onnxruntime agrees with PyTorch on `check_images` random images before keeping the file.
    With quantize="int8" the file holds the int8 model instead (see `quantize_int8`)."""
    if quantize not in (None, "int8"):
        raise FmnistError(f"unknown quantization {quantize!r}; choose int8")
    onnx, _ = _require_onnx()
    out = Path(out)
    if out.is_dir():
        raise FmnistError(f"{out}: is a directory; give a file name such as model.onnx")
    if not out.parent.is_dir():
        raise FmnistError(f"{out.parent}: no such folder")
    model, meta = load_network(run_dir, "cpu")
    norm = meta.normalization
    wrapped = RawPixelModel(model, norm.mean, norm.std, tta=meta.tta, temperature=meta.temperature).eval()
    example = torch.zeros(2, 1, IMAGE_SIZE, IMAGE_SIZE)
    batch = torch.export.Dim("batch")
    onnx_log = logging.getLogger("torch.onnx")
    level = onnx_log.level
    onnx_log.setLevel(logging.ERROR)  # "torchvision is not installed" and other chatter
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            program = torch.onnx.export(
                wrapped, (example,), dynamo=True, input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES), dynamic_shapes={"pixels": {0: batch}},
                optimize=True, verbose=False,
            )
    finally:
        onnx_log.setLevel(level)
    proto = program.model_proto
    proto.doc_string = "fmnist classifier: float32 pixels 0..255 (N, 1, 28, 28) -> logits, probabilities"
    metadata = {
        "class_names": json.dumps(meta.class_names),
        "normalization": json.dumps({"mean": norm.mean, "std": norm.std}),
        "input": "float32 pixels 0..255, shape (N, 1, 28, 28), light object on black",
        "model": meta.model,
        "temperature": json.dumps(meta.temperature),  # probabilities = softmax(logits / temperature)
        "fmnist_version": __version__,
        "source_run": Path(run_dir).resolve().name,  # its name only: no paths of this machine
    }
    del proto.metadata_props[:]
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(proto)

    serialized = proto.SerializeToString()
    if check_images:
        _check_agreement(wrapped, serialized, check_images)
    if quantize == "int8":
        serialized = quantize_int8(serialized, data_dir=data_dir)
    with atomic_open(out) as f:
        f.write(serialized)
    return out


CALIBRATION_IMAGES = 1000  # training images whose activations set the int8 ranges


def quantize_int8(model: bytes, data_dir=None, calibration_images: int = CALIBRATION_IMAGES) -> bytes:
    """Static int8 quantisation with onnxruntime: per-channel int8 weights, uint8 activations
    (the layout x86 VNNI instructions run fastest), QDQ format, activation ranges calibrated on
    training images. Metadata is carried over."""
    import tempfile

    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    images, _ = load_split("train", data_dir)
    step = max(1, len(images) // calibration_images)
    pixels = images[::step][:calibration_images].astype(np.float32)[:, None]  # (n, 1, 28, 28)

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(np.array_split(pixels, max(1, len(pixels) // 100)))

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {INPUT_NAME: batch}

    with tempfile.TemporaryDirectory() as tmp:
        fp32, prepared, int8 = (Path(tmp) / name for name in ("fp32.onnx", "prep.onnx", "int8.onnx"))
        fp32.write_bytes(model)
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(int8), Batches(), quant_format=QuantFormat.QDQ,
                        per_channel=True, weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
        proto = onnx.load(str(int8))
    source = onnx.load_from_string(model)
    del proto.metadata_props[:]
    proto.metadata_props.extend(source.metadata_props)
    proto.metadata_props.add(key="quantization", value="int8 static, per-channel weights, QDQ")
    proto.doc_string = source.doc_string
    return proto.SerializeToString()


def _check_agreement(wrapped: nn.Module, serialized: bytes, n: int) -> None:
    pixels = torch.randint(0, 256, (n, 1, IMAGE_SIZE, IMAGE_SIZE)).float()
    with torch.inference_mode():
        expected = wrapped(pixels)[0].numpy()
    got = onnx_session(serialized).run(["logits"], {INPUT_NAME: pixels.numpy()})[0]
    error = float(np.abs(got - expected).max())
    if not np.allclose(got, expected, rtol=1e-4, atol=1e-4):
        raise FmnistError(f"exported model disagrees with PyTorch (max logit difference {error:.2e})")


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata properties of an exported model."""
    return dict(onnx_session(path).get_modelmeta().custom_metadata_map)
