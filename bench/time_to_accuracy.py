"""Time to accuracy of the training presets: each preset for k seeds, with the test set
evaluated along the way, and a table of accuracy, wall time and the training seconds at which
each accuracy level was first reached.

    python bench/time_to_accuracy.py --presets cpu-fast               # 3 seeds
    python bench/time_to_accuracy.py --presets gpu-fast best --device cuda --json tta.json
    python bench/time_to_accuracy.py --presets cpu-fast --seeds 1 --epochs 2   # a quick look

Wall time is the whole `train` call (data loading, training, the final evaluation, writing the
model), without the evaluations made along the way for this table. The time to an accuracy
counts training seconds only (evaluations excluded) up to the first evaluation at or above it.
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

from fmnist.config import resolve_train
from fmnist.data import load_split
from fmnist.run import RunDir
from fmnist.training.loop import train
from fmnist.training.optim import total_steps

LEVELS = (0.90, 0.92, 0.93, 0.94, 0.95, 0.96)


def read_evaluations(run: RunDir, steps: int) -> tuple[list[tuple[float, float]], float]:
    """(training seconds, test accuracy) of every test evaluation in a run's metrics, and the
    seconds spent on the evaluations made during training (not the final ones)."""
    evaluations = run.evaluations()
    curve = [(r.train_seconds, r.accuracy) for r in evaluations if r.split == "test"]
    return curve, sum(r.eval_seconds for r in evaluations if r.step < steps)


def run_once(preset: str, seed: int, evals: int, overrides: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = resolve_train(preset=preset, seed=seed, out=str(Path(tmp) / "run"), plots=False, **overrides)
        n_train = 60_000 - cfg.val_size
        steps = total_steps(cfg, n_train)
        cfg = resolve_train(preset=preset, seed=seed, out=cfg.out, plots=False, eval_test=True,
                            eval_every=max(1, steps // evals), **overrides)
        start = time.perf_counter()
        result = train(cfg, progress=False, log=lambda *_: None)
        run = RunDir(result.run_dir)
        curve, extra = read_evaluations(run, result.steps)
        wall = time.perf_counter() - start - extra
        config = run.read_config()
    reached = {f"{level:.0%}": next((t for t, a in curve if a >= level), None) for level in LEVELS}
    return {"preset": preset, "seed": seed, "device": config["device_resolved"],
            "precision": config["precision_resolved"], "accuracy": result.test.accuracy,
            "train_seconds": result.train_seconds, "wall_seconds": wall,
            "time_to": reached, "curve": curve}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["cpu-fast"], help="presets to run")
    parser.add_argument("--seeds", type=int, default=3, help="runs of each preset (seeds 0..k-1)")
    parser.add_argument("--evals", type=int, default=16, help="test evaluations along each run")
    parser.add_argument("--device", help="override the presets' device (default: auto)")
    parser.add_argument("--epochs", type=float, help="override the presets' epochs")
    parser.add_argument("--json", help="write every run's figures and curve to this file")
    args = parser.parse_args()

    overrides = {k: v for k, v in (("device", args.device), ("epochs", args.epochs)) if v is not None}
    load_split("train")  # find (or fetch) the data before any clock starts
    runs = []
    for preset in args.presets:
        for seed in range(args.seeds):
            runs.append(run_once(preset, seed, args.evals, overrides))
            r = runs[-1]
            print(f"  {preset} seed {seed}: {r['accuracy']:.4f} in {r['wall_seconds']:.1f} s wall", flush=True)

    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    print(f"\nhardware: {gpu or cpu}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}")
    header = f"{'preset':<10} {'device':<7} {'test accuracy':>16} {'wall s':>7} " + " ".join(
        f"{f'{level:.0%}':>6}" for level in LEVELS)
    print(header)
    for preset in args.presets:
        mine = [r for r in runs if r["preset"] == preset]
        accs = [r["accuracy"] for r in mine]
        spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
        cells = []
        for level in LEVELS:
            times = [r["time_to"][f"{level:.0%}"] for r in mine]
            hit = [t for t in times if t is not None]
            # Median over the runs that got there; "-" when fewer than half did.
            cells.append(f"{statistics.median(hit):6.1f}" if len(hit) * 2 > len(times) else f"{'-':>6}")
        wall = statistics.median(r["wall_seconds"] for r in mine)
        device = f"{mine[0]['device']}"
        print(f"{preset:<10} {device:<7} {100 * statistics.mean(accs):7.2f} ± {100 * spread:4.2f} % "
              f"{wall:7.1f} " + " ".join(cells))
    if args.json:
        Path(args.json).write_text(json.dumps({"hardware": gpu or cpu, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
