"""`fmnist export --format onnx`: the ONNX model matches PyTorch, takes raw pixels, any batch."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from fmnist.cli import main
from fmnist.data import CLASS_NAMES, FMNIST_MEAN, FMNIST_STD, Normalization, load_split, to_tensor
from fmnist.inference.forward import predict_logits
from fmnist.run import RunDir, load_network, save_model

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from fmnist.export import onnx_session, read_metadata  # noqa: E402


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    assert main(["export", "--model", str(trained_run), "--format", "onnx", "--out", str(out)]) == 0
    return out


def torch_logits(run_dir, images: np.ndarray) -> np.ndarray:
    """The reference: the checkpoint in PyTorch, fed the run's own normalisation."""
    model, meta = load_network(run_dir)
    norm = meta.normalization
    return predict_logits(model, to_tensor(images, norm.mean, norm.std)).numpy()


def onnx_outputs(path, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pixels = images.astype(np.float32)[:, None]  # raw 0..255, (N, 1, 28, 28)
    logits, probabilities = onnx_session(path).run(["logits", "probabilities"], {"pixels": pixels})
    return logits, probabilities


def test_metadata_and_dynamic_batch(exported):
    meta = read_metadata(exported)
    assert json.loads(meta["class_names"]) == list(CLASS_NAMES)
    assert set(json.loads(meta["normalization"])) == {"mean", "std"}
    graph = onnx.load(str(exported)).graph
    batch_dim = graph.input[0].type.tensor_type.shape.dim[0]
    assert graph.input[0].name == "pixels" and batch_dim.dim_param and not batch_dim.dim_value
    for n in (1, 7):
        logits, probabilities = onnx_outputs(exported, np.zeros((n, 28, 28), np.uint8))
        assert logits.shape == (n, len(CLASS_NAMES))
        np.testing.assert_allclose(probabilities.sum(1), 1.0, atol=1e-5)


def test_matches_pytorch_on_a_batch(trained_run, exported, data_dir):
    images, _ = load_split("test", data_dir)
    logits, _ = onnx_outputs(exported, images[:256])
    expected = torch_logits(trained_run, images[:256])
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_matches_pytorch_on_all_test_images(trained_run, exported, data_dir):
    images, _ = load_split("test", data_dir)
    logits, _ = onnx_outputs(exported, images)
    expected = torch_logits(trained_run, images)
    assert len(logits) == 10_000
    assert np.array_equal(logits.argmax(1), expected.argmax(1))
    assert np.abs(logits - expected).max() <= 1e-4


def test_normalisation_is_inside_the_model(trained_run, tmp_path, data_dir):
    """A run trained with standardised inputs: the ONNX model still takes raw pixels."""
    model, meta = load_network(trained_run)
    assert meta.normalization == Normalization(0.0, 1.0)  # the post's: pixels / 255
    meta = dataclasses.replace(meta, normalization=Normalization(FMNIST_MEAN, FMNIST_STD))
    save_model(RunDir(tmp_path), model, meta)
    out = tmp_path / "norm.onnx"
    assert main(["export", "--model", str(tmp_path), "--out", str(out)]) == 0
    images, _ = load_split("test", data_dir)
    logits, _ = onnx_outputs(out, images[:64])
    np.testing.assert_allclose(logits, torch_logits(tmp_path, images[:64]), rtol=0, atol=1e-4)
    with torch.inference_mode():  # and differs from feeding the unnormalised pixels
        plain = model(torch.as_tensor(images[:64], dtype=torch.float32)[:, None] / 255).numpy()
    assert np.abs(logits - plain).max() > 1e-2


def test_export_errors_are_one_line(trained_run, tmp_path, capsys):
    assert main(["export", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "m.onnx")]) == 2
    assert main(["export", "--model", str(trained_run), "--out", str(tmp_path / "no" / "m.onnx")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(line.startswith("fmnist: error: ") for line in err)
    assert "no such run folder" in err[0] and "no such folder" in err[1]
    assert not list(tmp_path.glob("*.onnx"))


def test_int8_export_keeps_the_accuracy(trained_run, exported, tmp_path, data_dir):
    """The int8 model (static, calibrated on training images) agrees with the fp32 export on
    nearly every test image and loses at most half a point of accuracy."""
    out = tmp_path / "int8.onnx"
    assert main(["export", "--model", str(trained_run), "--out", str(out), "--quantize", "int8"]) == 0
    assert read_metadata(out)["quantization"].startswith("int8")
    assert json.loads(read_metadata(out)["class_names"]) == list(CLASS_NAMES)
    graph_ops = {node.op_type for node in onnx.load(str(out)).graph.node}
    assert "QuantizeLinear" in graph_ops and "DequantizeLinear" in graph_ops
    images, labels = load_split("test", data_dir)
    int8 = onnx_outputs(out, images)[0].argmax(1)
    fp32 = onnx_outputs(exported, images)[0].argmax(1)
    assert (int8 == fp32).mean() >= 0.99
    assert (int8 == labels).mean() >= (fp32 == labels).mean() - 0.005


def test_a_model_trained_with_mirror_images_exports_their_average(tmp_path):
    """A run whose model.json asks for flip averaging (tta) exports it, so the ONNX model's
    probabilities are the predictor's."""
    from fmnist.inference.predictor import load_model
    from fmnist.models import build_model
    from fmnist.run import ModelMeta

    torch.manual_seed(0)
    run = RunDir.create(tmp_path / "run", "fast")
    save_model(run, build_model("fast"), ModelMeta("fast", {}, list(CLASS_NAMES),
                                                   Normalization(FMNIST_MEAN, FMNIST_STD), tta=True))
    out = tmp_path / "fast.onnx"
    assert main(["export", "--model", str(run.path), "--out", str(out)]) == 0
    assert read_metadata(out)["source_run"] == "run"  # the folder's name, not where it is
    pixels = np.random.default_rng(0).integers(0, 256, (16, 28, 28)).astype(np.uint8)
    got = onnx_session(out).run(["probabilities"], {"pixels": pixels.astype(np.float32)[:, None]})[0]
    predictor = load_model(run.path)
    np.testing.assert_allclose(got, predictor.probabilities(pixels), atol=1e-5)
    plain = predict_logits(predictor.model, to_tensor(pixels, FMNIST_MEAN, FMNIST_STD)).softmax(1).numpy()
    assert np.abs(got - plain).max() > 1e-3  # the average, not one image alone
