"""The post's training configuration (500 steps of 128) through `fmnist.train` and through a
plain PyTorch loop of the same network written as a user would, side by side in one run.

    python bench/train_speed.py                 # 3 repeats of each, medians and the ratio
    python bench/train_speed.py --steps 100 --repeats 5 --json bench/train_speed.json
    python bench/train_speed.py --device cuda        # on a GPU

The plain loop: NCHW tensors, ReLU then pooling, torch.optim.Adam with its defaults, batches
sliced from the same in-memory tensors (so data loading is not what is compared). The fmnist
figure is its training loop alone (`train_seconds`), measured once with the default precision
and once with `--precision fp32`.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from plain import PlainNet

from fmnist.config import TrainConfig
from fmnist.data import load_split, to_tensor
from fmnist.device import autocast_dtype, resolve_device
from fmnist.train import train


def plain_loop(images: torch.Tensor, labels: torch.Tensor, steps: int, batch_size: int, seed: int) -> float:
    torch.manual_seed(seed)
    model = PlainNet().to(images.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    start = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(len(images), (batch_size,), device=images.device)
        loss = F.cross_entropy(model(images[idx]), labels[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss.item()
    return time.perf_counter() - start


def fmnist_loop(steps: int, batch_size: int, seed: int, precision: str, device: str) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(steps=steps, batch_size=batch_size, seed=seed, precision=precision,
                          out=str(Path(tmp) / "run"), plots=False, device=device)
        return train(cfg, progress=False, log=lambda *_: None).train_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500, help="optimiser steps per measurement")
    parser.add_argument("--batch-size", type=int, default=128, help="images per step")
    parser.add_argument("--repeats", type=int, default=3, help="measurements of each, interleaved")
    parser.add_argument("--device", default="cpu", help="device of both loops (default: cpu)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()

    device = resolve_device(args.device)
    raw, labels = load_split("train")
    images, labels = to_tensor(raw, device=device), torch.as_tensor(labels, device=device)
    native = "bf16" if autocast_dtype("auto", device) else "fp32"
    runs = {"plain PyTorch loop": [], f"fmnist train (default: {native})": [], "fmnist train --precision fp32": []}
    names = list(runs)
    for r in range(args.repeats):
        runs[names[0]].append(plain_loop(images, labels, args.steps, args.batch_size, r))
        runs[names[1]].append(fmnist_loop(args.steps, args.batch_size, r, "auto", args.device))
        runs[names[2]].append(fmnist_loop(args.steps, args.batch_size, r, "fp32", args.device))

    base = statistics.median(runs[names[0]])
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"{args.steps} steps of {args.batch_size} on {hardware}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, median of {args.repeats}")
    print(f"{'variant':<34} {'seconds':>8} {'ms/step':>8} {'images/s':>9} {'ratio':>6}")
    results = {}
    for name, times in runs.items():
        t = statistics.median(times)
        results[name] = {"seconds": t, "all": times, "ratio_to_plain": t / base}
        print(f"{name:<34} {t:8.2f} {1000 * t / args.steps:8.1f} "
              f"{args.steps * args.batch_size / t:9.0f} {t / base:6.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
