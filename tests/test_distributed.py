"""DistributedDataParallel on the CPU with gloo, launched by torchrun on the loopback address:
two processes, two "nodes" meeting through a c10d rendezvous, and a distributed run stopped by
SIGTERM and resumed."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from helpers import as_flags, assert_same_run, fmnist_cli, free_port, quiet, signal_after
from safetensors.torch import load_file

from fmnist.config import TrainConfig
from fmnist.run import RunDir
from fmnist.training.checkpoint import load_state
from fmnist.training.loop import train

# No dropout, so that one process and two draw the same numbers; fp32 for a tight comparison.
EXACT = dict(steps=6, batch_size=32, val_size=64, log_every=1, keep_prob=1.0, precision="fp32", plots=False)
LOOPBACK = os.environ | {"GLOO_SOCKET_IFNAME": "lo"}

WORKER = """
import json, os, sys
from safetensors.torch import save_file
from fmnist.run import cpu_state_dict
from fmnist.config import TrainConfig
from fmnist.training.loop import train

cfg = TrainConfig(**json.loads(sys.argv[1]))
result = train(cfg, progress=False, log=lambda *_: None)
save_file(cpu_state_dict(result.model), os.path.join(cfg.out, f"rank{os.environ['RANK']}.safetensors"))
"""


def torchrun(*args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--rdzv-backend=c10d", "--local-addr=127.0.0.1", *args]


def losses(run_dir) -> list[float]:
    return [r.loss for r in RunDir(run_dir).losses()]


@pytest.fixture(scope="module")
def two_processes(shared_synthetic_dir, tmp_path_factory):
    """EXACT trained by two processes on one machine; each saves the weights it ends with."""
    tmp = tmp_path_factory.mktemp("ddp")
    (tmp / "worker.py").write_text(WORKER)
    values = EXACT | dict(data_dir=str(shared_synthetic_dir), out=str(tmp / "run"))
    cmd = torchrun("--nnodes=1", "--nproc-per-node=2", "--rdzv-endpoint=127.0.0.1:0", "--rdzv-id=ddp",
                   str(tmp / "worker.py"), json.dumps(values))
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=LOOPBACK)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp / "run"


def test_two_processes_end_with_identical_weights_and_the_loss_of_one(two_processes, shared_synthetic_dir, tmp_path):
    rank0, rank1 = (load_file(two_processes / f"rank{r}.safetensors") for r in (0, 1))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    saved = load_file(RunDir(two_processes).weights_path)
    assert all(torch.equal(rank0[k], saved[k]) for k in rank0)
    assert RunDir(two_processes).read_config()["world_size"] == 2
    # One process on the same global batch of 32: the same losses, to float rounding.
    single = train(TrainConfig(**EXACT, data_dir=str(shared_synthetic_dir), out=str(tmp_path / "one")), progress=False,
                   log=quiet)
    assert len(losses(two_processes)) == 6
    assert losses(two_processes) == pytest.approx(losses(single.run_dir), rel=1e-4)
    assert losses(two_processes)[-1] < losses(two_processes)[0]  # it learns
    accuracy = lambda run: RunDir(run).read_meta().test_accuracy  # noqa: E731
    assert accuracy(two_processes) == pytest.approx(accuracy(single.run_dir), abs=1 / 160)


def test_two_nodes_meet_through_a_c10d_rendezvous(two_processes, shared_synthetic_dir, tmp_path):
    run = tmp_path / "run"
    cmd = torchrun("--nnodes=2", "--nproc-per-node=1", f"--rdzv-endpoint=127.0.0.1:{free_port()}",
                   "--rdzv-id=two-nodes", "-m", "fmnist", "train", *as_flags(EXACT),
                   "--data-dir", str(shared_synthetic_dir), "--out", str(run), "--quiet")
    logs = [tmp_path / f"node{n}.log" for n in (0, 1)]
    nodes = [subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=LOOPBACK) for log in logs]
    try:
        codes = [node.wait(timeout=300) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    assert codes == [0, 0], [log.read_text()[-2000:] for log in logs]
    assert RunDir(run).read_config()["world_size"] == 2
    assert sum("test accuracy" in log.read_text() for log in logs) == 1  # only rank 0 reports
    assert losses(run) == pytest.approx(losses(two_processes), rel=1e-5)


@pytest.mark.slow  # three torchrun jobs of 2 processes: ~25 s, out of the fast tier
def test_distributed_run_stopped_by_sigterm_resumes_bit_identical(shared_synthetic_dir, tmp_path):
    flags = [*as_flags(dict(steps=30, batch_size=32, val_size=64, log_every=1, eval_every=8,
                            checkpoint_every=10, plots=False)), "--data-dir", str(shared_synthetic_dir), "--nproc", "2", "--quiet"]
    reference = tmp_path / "reference"
    result = fmnist_cli("train", *flags, "--out", str(reference))
    assert result.returncode == 0, result.stderr[-3000:]
    run = RunDir(tmp_path / "run")
    code, output = signal_after(["train", *flags, "--out", str(run)], run, 3, signal.SIGTERM, tmp_path / "out.log")
    assert code != 0
    state = load_state(run.last_state)
    assert state["world_size"] == 2 and len(state["rng"]["cpu"]) == 2
    assert f"stopped by SIGTERM after step {state['step']}" in output, output[-3000:]
    assert state["step"] < 30 and not run.weights_path.exists()
    result = fmnist_cli("train", "--resume", str(run), "--quiet")  # --nproc 2 comes from its config
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_run(reference, run)
