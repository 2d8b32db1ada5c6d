"""`fmnist train --nproc N`: the run started in N processes on this machine through torchrun, with
a c10d rendezvous on the loopback address (see `fmnist.distributed` for what each process does)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import uuid

import torch

from fmnist import FmnistError
from fmnist.config import TrainConfig, to_dict
from fmnist.device import resolve_device
from fmnist.io import write_json
from fmnist.models import model_spec


def launch(cfg: TrainConfig, quiet: bool = False) -> int:
    """Run `fmnist train` with this config in cfg.nproc processes on this machine, through
    torchrun with a c10d rendezvous on the loopback address; returns torchrun's exit status."""
    cfg.validate()  # a bad flag ends here in one line, not in one traceback per process
    model_spec(cfg.model)
    device = resolve_device(cfg.device)
    if device.type == "cuda" and cfg.nproc > torch.cuda.device_count():
        raise FmnistError(f"--nproc {cfg.nproc} needs as many GPUs, this machine has {torch.cuda.device_count()}")
    # The workers get the resolved config as a file: torchrun would take some flags for its own
    # (--nproc is a prefix of its --nproc-per-node).
    fd, config_file = tempfile.mkstemp(prefix="fmnist-train-", suffix=".json")
    os.close(fd)
    write_json(config_file, to_dict(cfg))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc-per-node={cfg.nproc}",
           "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0", f"--rdzv-id={uuid.uuid4()}",
           "--local-addr=127.0.0.1", "-m", "fmnist", "train", "--config", config_file]
    if quiet:
        cmd.append("--quiet")
    env = dict(os.environ)
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # one machine: gloo talks over loopback
    if device.type == "cpu":  # share the cores (torchrun would give each process one)
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // cfg.nproc)))
    process = subprocess.Popen(cmd, env=env)
    # A terminal's Ctrl-C reaches torchrun and the workers directly; SIGTERM is passed on.
    previous = {signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN),
                signal.SIGTERM: signal.signal(signal.SIGTERM, lambda sig, _: process.send_signal(sig))}
    try:
        return process.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        os.unlink(config_file)
