"""Data-parallel training over processes, GPUs and machines on PyTorch's own engine
(torch.distributed and DistributedDataParallel): NCCL between GPUs, gloo between CPU processes.

    fmnist train --nproc 4 ...                                # 4 processes on this machine
    torchrun --nproc-per-node=4 -m fmnist train ...           # the same, launched by hand
    torchrun --nnodes=2 --nproc-per-node=8 --rdzv-backend=c10d \\
        --rdzv-endpoint=HOST0:29400 --rdzv-id=JOB -m fmnist train ...   # on each of 2 machines

Every process holds the whole dataset and draws the same global batch of --batch-size images;
process r trains on the r-th of world_size equal slices of it and DDP averages the gradients,
so a step is the step one process would take on the whole batch: --batch-size and --lr mean
the same at any process count.
"""

from __future__ import annotations

import math
import os
import signal
import threading
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from fmnist import FmnistError


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


@dataclass
class Dist:
    """This process's place in the job; a process on its own is rank 0 of 1."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    control: Any = None  # a gloo process group for host-side agreement (stop requests)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _comm(self, t: torch.Tensor) -> torch.Tensor:
        """`t` where the backend can read it: NCCL only moves GPU tensors."""
        return t.to(self.device) if dist.get_backend() == "nccl" else t

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """The mean of `t` over the processes (gloo has no AVG: a sum, divided)."""
        if not self.enabled:
            return t
        t = self._comm(t.clone())
        dist.all_reduce(t)
        return t / self.world_size

    def gather_rows(self, t: torch.Tensor) -> torch.Tensor:
        """Every process's rows (n_r, ...) concatenated in rank order, on every process."""
        if not self.enabled:
            return t
        t = self._comm(t)
        counts = [torch.zeros(1, dtype=torch.int64, device=t.device) for _ in range(self.world_size)]
        dist.all_gather(counts, torch.tensor([len(t)], device=t.device))
        longest = int(max(counts).item())
        padded = t.new_zeros((longest, *t.shape[1:]))
        padded[: len(t)] = t
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        return torch.cat([p[: int(n.item())] for p, n in zip(parts, counts, strict=True)])

    def gather_same_size(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Every process's `t` (same shape everywhere), on the CPU, in rank order."""
        if not self.enabled:
            return [t]
        t = self._comm(t)
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(parts, t)
        return [p.cpu() for p in parts]

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` (a path, a message: small and plain), on every process."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def my_share(self, batch: torch.Tensor) -> torch.Tensor:
        """This process's equal slice of a global batch (of indices)."""
        return batch.tensor_split(self.world_size)[self.rank] if self.enabled else batch

    def shard(self, n: int) -> slice:
        """This process's contiguous share of n items, for evaluation."""
        chunk = math.ceil(n / self.world_size)
        return slice(min(n, self.rank * chunk), min(n, (self.rank + 1) * chunk))

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def setup(device: torch.device) -> Dist:
    """Join the torchrun job this process belongs to, if any. Under torchrun a CUDA device
    becomes cuda:LOCAL_RANK and the backend NCCL; on the CPU the backend is gloo."""
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return Dist(device)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        if device.index is not None:
            raise FmnistError(f"--device {device} names one GPU; under torchrun each process takes "
                              "cuda:LOCAL_RANK: give --device cuda (or auto)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    elif device.type == "cpu":
        dist.init_process_group("gloo")
    else:
        raise FmnistError(f"distributed training runs on CUDA or the CPU, not {device.type}")
    return Dist(device, rank, world_size, local_rank, control=dist.new_group(backend="gloo"))


class GracefulStop:
    """SIGINT (Ctrl-C) and SIGTERM ask training to stop at the next step boundary, where it
    writes a checkpoint. Under torchrun every process stops at the same boundary: the flags are
    combined by a small host-side all-reduce, started at one boundary and read at the next,
    so nothing waits on it. A second signal to a process on its own stops it at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, ctx: Dist):
        self.ctx = ctx
        self.received: str | None = None  # name of the first signal, e.g. "SIGTERM"
        self._previous: dict[int, Any] = {}
        self._flag: torch.Tensor | None = None
        self._work = None

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():  # handlers live in the main thread
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, exc_type, *_) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self._work is not None and exc_type is None:
            self._work.wait()

    def _handle(self, signum, frame) -> None:
        if self.received is not None and not self.ctx.enabled:
            raise KeyboardInterrupt
        # torchrun passes a terminal's Ctrl-C on as a second signal: the first one counts.
        self.received = self.received or signal.Signals(signum).name

    def requested(self) -> bool:
        """Whether to stop at this step boundary."""
        if not self.ctx.enabled:
            return self.received is not None
        agreed = False
        if self._work is not None:
            self._work.wait()
            agreed = bool(self._flag.item())
        self._flag = torch.tensor([int(self.received is not None)])
        self._work = dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, group=self.ctx.control, async_op=True)
        return agreed
