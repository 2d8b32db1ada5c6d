"""Inference speed of a trained model in PyTorch and in onnxruntime, side by side: images per
second on the Fashion-MNIST test set at batch 1 and batch 256, on the CPU.

    python bench/onnx_speed.py --model runs/my-run
    python bench/onnx_speed.py --model runs/my-run --threads 1 --batch1-images 2000

Both runtimes get the same thread count and the same input: raw pixels for ONNX (its graph
normalises), normalised tensors for PyTorch (as `fmnist evaluate` feeds it). Each cell is the
median of --repeats timed passes after one warm-up pass.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fmnist.data import load_split, to_tensor
from fmnist.export import export_onnx, onnx_session
from fmnist.run import load_network


def images_per_second(run_batch, inputs, batch_size: int, repeats: int) -> float:
    """Median images/s of passes over `inputs` in batches of `batch_size`."""
    def one_pass() -> float:
        start = time.perf_counter()
        for i in range(0, len(inputs), batch_size):
            run_batch(inputs[i : i + batch_size])
        return len(inputs) / (time.perf_counter() - start)

    one_pass()  # warm-up: allocations, oneDNN primitive caches
    return statistics.median(one_pass() for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="run folder written by `fmnist train`")
    parser.add_argument("--onnx", help="an exported model (default: export the run to a temporary file)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for both runtimes (default: all cores)")
    parser.add_argument("--batch1-images", type=int, default=2000, help="test images timed at batch 1 (default: 2000)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per cell; the median is shown (default: 3)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    model, meta = load_network(args.model)
    model = model.to(memory_format=torch.channels_last)  # as fmnist.inference.predictor runs it
    raw, _ = load_split("test")
    normalised = to_tensor(raw, meta.normalization.mean, meta.normalization.std).contiguous(memory_format=torch.channels_last)
    pixels = raw.astype(np.float32)[:, None]

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.onnx) if args.onnx else export_onnx(args.model, Path(tmp) / "model.onnx")
        session = onnx_session(path, threads=args.threads)

        def run_onnx(x):
            return session.run(["logits"], {"pixels": x})

        @torch.inference_mode()
        def run_torch(x):
            return model(x)

        rows = []
        for batch_size in (1, 256):
            n = args.batch1_images if batch_size == 1 else len(raw)
            rows.append((batch_size, n,
                         images_per_second(run_torch, normalised[:n], batch_size, args.repeats),
                         images_per_second(run_onnx, pixels[:n], batch_size, args.repeats)))

    print(f"model {meta['model']} from {args.model}; {args.threads} threads; torch {torch.__version__}, "
          f"onnxruntime {__import__('onnxruntime').__version__}; {os.cpu_count()} CPU cores")
    print(f"{'batch':>6} {'images':>7} {'PyTorch img/s':>14} {'onnxruntime img/s':>18} {'ratio':>6}")
    for batch_size, n, torch_speed, onnx_speed in rows:
        print(f"{batch_size:>6} {n:>7} {torch_speed:>14,.0f} {onnx_speed:>18,.0f} {onnx_speed / torch_speed:>6.2f}")


if __name__ == "__main__":
    main()
