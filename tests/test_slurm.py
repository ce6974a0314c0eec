"""SLURM: sbatch scripts parse, the Trainer reads world size and ranks from SLURM's variables, and a job sent
the pre-emption signal leaves a checkpoint from which ``ckpt_path=last`` resumes at the right epoch and step."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins.environments import SLURMEnvironment

from robustseg.config import load_config
from robustseg.trainer import build_trainer_kwargs

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "scripts" / "slurm").glob("*.sbatch"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_sbatch_scripts_parse(script):
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    assert "#SBATCH --signal=SIGUSR1@" in script.read_text() or "array" in script.read_text()


def test_trainer_takes_world_size_and_ranks_from_slurm(monkeypatch):
    env = {
        "SLURM_NTASKS": "4",
        "SLURM_NTASKS_PER_NODE": "2",
        "SLURM_PROCID": "3",
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "1",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "robustseg-train",
        "SLURM_NODELIST": "node[7-8]",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    cfg = load_config("train", ["trainer=slurm", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.num_nodes=2"])
    kwargs = build_trainer_kwargs(cfg.trainer)
    trainer = L.Trainer(**kwargs, logger=False, enable_checkpointing=False)
    environment = trainer.strategy.cluster_environment
    assert isinstance(environment, SLURMEnvironment) and environment.auto_requeue
    assert (trainer.world_size, trainer.global_rank, trainer.local_rank, trainer.node_rank) == (4, 3, 1, 1)
    assert environment.main_address == "node7"


def test_bad_requeue_signal_is_a_config_error():
    from robustseg.errors import ConfigError

    with pytest.raises(ConfigError, match="SIGUSR9"):
        build_trainer_kwargs({"slurm": {"requeue_signal": "SIGUSR9"}})


def wait_for(condition, what: str, process: subprocess.Popen, timeout: float = 300) -> None:
    """Poll ``condition`` until it holds; fail with the process output if it exits or time runs out."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(
                f"training exited ({process.returncode}) before {what}: {process.stderr.read()[-3000:]}"
            )
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.mark.slow
def test_preemption_signal_checkpoints_requeues_and_resume_continues(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    marker = tmp_path / "requeued"
    scontrol = bin_dir / "scontrol"  # SLURM's requeue command, as this machine has no SLURM
    # like SLURM, the requeue ends the job at once: otherwise the job could finish another epoch (a newer last.ckpt)
    # between the signal and the kill, and `ckpt_path=last` would rightly resume from that instead
    scontrol.write_text(f'#!/bin/sh\necho "$@" > {marker}\nkill -9 $PPID\n')
    scontrol.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "SLURM_JOB_ID": "777",
        "SLURM_JOB_NAME": "robustseg-train",
        "SLURM_NTASKS": "1",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_NODELIST": "localhost",
        "WANDB_MODE": "disabled",
    }
    args = [
        "model=unet",
        "model.channels=[4,8]",
        "model.strides=[2]",
        "model.num_res_units=0",
        "data=synthetic",
        f"data.root={tmp_path / 'data'}",
        "data.prepare.size=[32,32,32]",
        "trainer=slurm",
        "trainer.accelerator=cpu",
        "trainer.devices=1",
        "trainer.strategy=auto",
        "trainer.precision=32-true",
        "trainer.check_val_every_n_epoch=1",
        "trainer.limit_val_batches=1",
        "logger=none",
        f"output_dir={tmp_path / 'runs'}",
    ]
    run_dir = tmp_path / "runs" / "unet-synthetic-clean-777"  # named after the job id, as a requeued job finds it
    first = subprocess.Popen(
        [sys.executable, "train.py", *args, "trainer.max_epochs=1000"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: (run_dir / "checkpoints" / "last.ckpt").is_file(), "the first epoch's checkpoint", first)
        first.send_signal(signal.SIGUSR1)  # what SLURM sends ahead of pre-emption (#SBATCH --signal=SIGUSR1@90)
        wait_for(marker.is_file, "the requeue", first)
    finally:
        first.kill()  # SLURM then ends the job
        first.communicate()
    assert marker.read_text().split() == ["requeue", "777"]
    (hpc,) = run_dir.glob("hpc_ckpt_*.ckpt")
    state = torch.load(hpc, weights_only=True)
    assert state["global_step"] > 0

    target_epochs = state["epoch"] + 2
    resumed = subprocess.run(
        [sys.executable, "train.py", *args, "ckpt_path=last", f"trainer.max_epochs={target_epochs}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    start = re.search(r"training starts at epoch (\d+), global step (\d+)", resumed.stderr)
    assert start is not None, resumed.stderr[-3000:]
    assert (int(start[1]), int(start[2])) == (state["epoch"], state["global_step"])
    assert str(hpc) in resumed.stderr  # Lightning restored exactly that checkpoint
