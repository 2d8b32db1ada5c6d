"""Evaluation throughput on the 10,000 test images, side by side in one run: a plain PyTorch
loop of the post's network (NCHW, no_grad), fmnist's evaluation in fp32 and bf16, and the
exported ONNX model in onnxruntime, fp32 and int8; with optional peers holding the same weights:
the post's own graph in TensorFlow (tf.compat.v1, a session run per batch) and the same network
in Keras 3 (`model.predict`), each skipped with a note when its package is missing.

    python bench/eval_speed.py                          # random weights: speed only
    python bench/eval_speed.py --run runs/post          # a trained run: accuracy too
    python bench/eval_speed.py --repeats 7 --json bench/eval_speed.json
    python bench/eval_speed.py --peers keras            # only Keras among the peers (or: none)

The peers' packages, installed beside the CPU torch already there (see bench/peers.py):

    pip install -r bench/requirements-peers.txt -c bench/constraints-peers.txt

Ratios are of throughput (higher is faster): to the plain loop and to the TF graph.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from peers import TF_GRAPH, load_peers, peers_flag, predictors, versions
from plain import PlainNet

from fmnist.data import CLASS_NAMES, Normalization, load_split, to_tensor
from fmnist.inference.forward import predict_logits
from fmnist.models import build_model
from fmnist.run import ModelMeta, RunDir, cpu_state_dict, load_network, save_model


def timed(fn, repeats: int) -> tuple[float, np.ndarray]:
    fn()  # warm-up: allocations, oneDNN kernel selection
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), np.asarray(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="a run folder of the post's model (default: random weights)")
    parser.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes over the test set")
    peers_flag(parser, ("tf", "keras"))
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()

    tmp = tempfile.TemporaryDirectory()
    run = args.run
    if run is None:  # a run folder with untrained weights, so the export path can be timed too
        random_run = RunDir.create(Path(tmp.name) / "random", "post")
        save_model(random_run, build_model("post"), ModelMeta("post", {}, list(CLASS_NAMES), Normalization()))
        run = random_run.path  # export_onnx takes the folder's path
    model, meta = load_network(run)
    raw, labels = load_split("test")
    images = to_tensor(raw, meta.normalization.mean, meta.normalization.std)
    pixels = torch.as_tensor(raw, dtype=torch.float32).unsqueeze(1).numpy()
    bs = args.batch_size

    plain = PlainNet().load_fmnist_post(cpu_state_dict(model)).eval()

    def plain_loop():
        with torch.no_grad():
            return torch.cat([plain(images[i : i + bs]) for i in range(0, len(images), bs)]).argmax(1)

    fast = model.to(memory_format=torch.channels_last)
    variants = {
        "plain PyTorch (NCHW, no_grad)": plain_loop,
        "fmnist evaluate (fp32)": lambda: predict_logits(fast, images, bs).argmax(1),
        "fmnist evaluate --precision bf16": lambda: predict_logits(fast, images, bs, torch.bfloat16).argmax(1),
    }
    try:
        from fmnist.export import export_onnx, onnx_session

        def run_onnx(session):
            return lambda: np.concatenate(
                [session.run(["logits"], {"pixels": pixels[i : i + bs]})[0] for i in range(0, len(pixels), bs)]
            ).argmax(1)

        fp32 = export_onnx(run, Path(tmp.name) / "model.onnx")
        int8 = export_onnx(run, Path(tmp.name) / "int8.onnx", quantize="int8")
        variants["onnxruntime fp32 (fmnist export)"] = run_onnx(onnx_session(fp32))
        variants["onnxruntime int8 (export --quantize)"] = run_onnx(onnx_session(int8))
    except ImportError as e:
        print(f"skipping onnxruntime: {e}")

    loaded, notes = load_peers(args.peers)
    for note in notes:
        print(note)
    for name, predict in predictors(loaded, cpu_state_dict(model), bs).items():
        variants[name] = lambda predict=predict: predict(images)

    timings = {name: timed(fn, args.repeats) for name, fn in variants.items()}
    rates = {name: len(raw) / seconds for name, (seconds, _) in timings.items()}
    base, tf_graph = next(iter(rates.values())), rates.get(TF_GRAPH)
    reference = next(iter(timings.values()))[1]
    print(f"10,000 test images, batch {bs}, {torch.get_num_threads()} threads, "
          f"{versions(loaded) + ', ' if loaded else ''}median of {args.repeats}")
    print(f"{'variant':<36} {'images/s':>9} {'vs plain':>8} {'vs TF':>6} {'accuracy':>9} {'agree':>7}")
    results = {}
    for name, (seconds, predictions) in timings.items():
        rate = rates[name]
        accuracy = float((predictions == labels).mean())
        agree = float((predictions == reference).mean())
        results[name] = {"images_per_s": rate, "seconds": seconds, "accuracy": accuracy, "agreement": agree,
                         "ratio_to_plain": rate / base, "ratio_to_tf_graph": rate / tf_graph if tf_graph else None}
        vs_tf = f"{rate / tf_graph:6.2f}" if tf_graph else f"{'-':>6}"
        print(f"{name:<36} {rate:9.0f} {rate / base:8.2f} {vs_tf} {accuracy:9.4f} {agree:7.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
