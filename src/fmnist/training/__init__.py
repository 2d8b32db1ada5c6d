"""Training: the loop and what it owns.

- `loop`: `train(TrainConfig)`, read top to bottom: set-up, the step loop, finish.
- `optim`: the optimiser, the learning-rate schedule `lr_at(step)`, the weight average (EMA).
- `checkpoint`: the training state to resume from, written atomically in the background.
- `metrics`: where the losses and evaluations go (metrics.jsonl, TensorBoard).
- `photos`: real photos mixed into the batches, and the partial-label loss.
- `launch`: `--nproc N`, the run started in N processes through torchrun.
"""

from fmnist.training.loop import TrainResult, train

__all__ = ["TrainResult", "train"]
