"""The post's training configuration (500 steps of 128) through `fmnist.train` and through a
plain PyTorch loop of the same network written as a user would, side by side in one run, with
optional peers in other frameworks (bench/peers.py).

    python bench/train_speed.py                 # 3 repeats of each, medians and the ratios
    python bench/train_speed.py --steps 100 --repeats 5 --json bench/train_speed.json
    python bench/train_speed.py --device cuda        # on a GPU (the peers stay on the CPU)
    python bench/train_speed.py --peers tf           # only the TF graph among the peers
    python bench/train_speed.py --peers none         # fmnist and the plain loop alone

The plain loop: NCHW tensors, ReLU then pooling, torch.optim.Adam with its defaults, batches
sliced from the same in-memory tensors (so data loading is not what is compared). The fmnist
figure is its training loop alone (`train_seconds`), measured once with the default precision
and once with `--precision fp32`.

The peers, each run when its package is installed and otherwise skipped with a note:
  tf         the post's own graph in TensorFlow (tf.compat.v1: placeholders, a session, weights
             and biases ~ N(0, 1), AdamOptimizer 1e-3, dropout keep 0.75), the training loop
             alone: the graph is built and its variables initialised before the clock starts
  keras      the same network in Keras 3 (Keras' initialisation), the time of `model.fit` alone,
             one epoch of `steps` batches
  lightning  a LightningModule of the plain network, `Trainer.fit(max_steps=steps)` on the CPU
             without checkpoints, logger or progress bar, a DataLoader over in-memory tensors
Install them beside the CPU torch already there (the constraint keeps it; lightning requires
torch, and a bare torch requirement could pull a multi-GB CUDA build):

    pip install -r bench/requirements-peers.txt -c bench/constraints-peers.txt

Each measurement runs in a fresh Python process (this script with --only), the variants taking
turns: nothing one framework leaves behind (thread pools, allocator settings such as fmnist's
`keep_freed_memory`, caches) reaches another's clock. The table gives each variant's median
time, its ratio to the plain loop and to the TF graph (lower is faster), and its test accuracy
after training (median, measured outside the clock; the TF graph starts from the post's N(0, 1)
weights, the others from their frameworks' own).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from peers import TF_GRAPH, TRAINERS, Outcome, load_peers, peers_flag, versions
from plain import PlainNet

from fmnist.config import TrainConfig
from fmnist.data import load_split, to_tensor
from fmnist.device import autocast_dtype, resolve_device
from fmnist.inference.forward import predict_logits
from fmnist.training.loop import train


def plain_loop(train_set, test_set, steps: int, batch_size: int, seed: int) -> Outcome:
    images, labels = train_set
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
    seconds = time.perf_counter() - start
    predictions = predict_logits(model, test_set[0]).argmax(1)
    return Outcome(seconds, (predictions == test_set[1]).float().mean().item())


def fmnist_loop(steps: int, batch_size: int, seed: int, precision: str, device: str) -> Outcome:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(steps=steps, batch_size=batch_size, seed=seed, precision=precision,
                          out=str(Path(tmp) / "run"), plots=False, device=device)
        result = train(cfg, progress=False, log=lambda *_: None)
        return Outcome(result.train_seconds, result.test.accuracy)


def split(name: str, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 1, 28, 28) as pixels / 255, the post's input, and labels (N,)."""
    raw, labels = load_split(name)
    return to_tensor(raw, device=device), torch.as_tensor(labels, device=device)


def variant_labels(peers: list[str], device: torch.device) -> dict[str, str]:
    """The variants measured, each by its --only key, with its label in the table."""
    native = "bf16" if autocast_dtype("auto", device) else "fp32"
    return {"plain": "plain PyTorch loop", "fmnist": f"fmnist train (default: {native})",
            "fmnist-fp32": "fmnist train --precision fp32"} | {name: TRAINERS[name][0] for name in peers}


def measure_one(key: str, args: argparse.Namespace, seed: int) -> Outcome:
    """One measurement in this process: the variant `key` trained once."""
    if key in TRAINERS:
        loaded, notes = load_peers([key])
        if notes:
            raise SystemExit(notes[0])
        return TRAINERS[key][1](loaded[key], split("train"), split("test"), args.steps, args.batch_size, seed)
    if key == "plain":
        device = resolve_device(args.device)
        return plain_loop(split("train", device), split("test", device), args.steps, args.batch_size, seed)
    precision = "fp32" if key == "fmnist-fp32" else "auto"
    return fmnist_loop(args.steps, args.batch_size, seed, precision, args.device)


def measure_apart(key: str, args: argparse.Namespace, seed: int) -> Outcome:
    """One measurement in a fresh Python process; its result is the child's last line."""
    command = [sys.executable, __file__, "--only", key, "--seed", str(seed), "--steps", str(args.steps),
               "--batch-size", str(args.batch_size), "--device", args.device]
    child = subprocess.run(command, capture_output=True, text=True)
    if child.returncode:
        last = (child.stderr.strip().splitlines() or ["no message"])[-1]
        raise SystemExit(f"{key} failed (exit {child.returncode}): {last}")
    return Outcome(**json.loads(child.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500, help="optimiser steps per measurement")
    parser.add_argument("--batch-size", type=int, default=128, help="images per step")
    parser.add_argument("--repeats", type=int, default=3, help="measurements of each, interleaved")
    parser.add_argument("--device", default="cpu", help="device of fmnist and the plain loop (default: cpu)")
    peers_flag(parser, tuple(TRAINERS))
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--only", help=argparse.SUPPRESS)  # one measurement, in the child process
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.only:
        print(json.dumps(vars(measure_one(args.only, args, args.seed))))
        return

    loaded, notes = load_peers(args.peers)
    for note in notes:
        print(note)
    device = resolve_device(args.device)
    labels = variant_labels(list(loaded), device)
    runs = {key: [] for key in labels}
    for r in range(args.repeats):
        for key in labels:
            runs[key].append(measure_apart(key, args, r))

    seconds = {labels[key]: statistics.median(o.seconds for o in outcomes) for key, outcomes in runs.items()}
    base, tf_graph = seconds[labels["plain"]], seconds.get(TF_GRAPH)
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"{args.steps} steps of {args.batch_size} on {hardware}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}{', ' + versions(loaded) if loaded else ''}, median of {args.repeats}, "
          f"each in its own process")
    print(f"{'variant':<34} {'seconds':>8} {'ms/step':>8} {'images/s':>9} {'vs plain':>8} {'vs TF':>6} {'accuracy':>8}")
    results = {}
    for key, outcomes in runs.items():
        name = labels[key]
        t = seconds[name]
        accuracy = statistics.median(o.accuracy for o in outcomes)
        results[name] = {"seconds": t, "all": [o.seconds for o in outcomes], "ratio_to_plain": t / base,
                         "ratio_to_tf_graph": t / tf_graph if tf_graph else None, "accuracy": accuracy}
        vs_tf = f"{t / tf_graph:6.2f}" if tf_graph else f"{'-':>6}"
        print(f"{name:<34} {t:8.2f} {1000 * t / args.steps:8.1f} {args.steps * args.batch_size / t:9.0f} "
              f"{t / base:8.2f} {vs_tf} {accuracy:8.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
