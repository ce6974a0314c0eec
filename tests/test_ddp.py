"""Multi-process DDP on CPU (gloo, 2 processes): clean, PGD and VAFA training through train(cfg)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from robustseg.config import load_config
from robustseg.training import train


class CaseRecorder(L.Callback):
    """Writes the case ids each rank trained and validated on, and the reduced validation Dice, to ``out``."""

    def __init__(self, out: Path) -> None:
        self.out = str(out)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._write(trainer, "train", batch["case_id"])

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._write(trainer, "val", batch["case_id"])

    def on_validation_end(self, trainer, pl_module) -> None:
        # what every rank holds after torchmetrics reduced the per-case Dice across processes
        dice = trainer.callback_metrics["val/dice/clean"].item()
        self._write(trainer, "dice", [dice])

    def _write(self, trainer, kind: str, values) -> None:
        with open(Path(self.out) / f"{kind}-rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps(list(values)) + "\n")


def read(out: Path, kind: str, rank: int) -> list:
    lines = (out / f"{kind}-rank{rank}.jsonl").read_text().splitlines()
    return [v for line in lines for v in json.loads(line)]


@pytest.mark.slow
@pytest.mark.parametrize("adv", ["none", "pgd", "vafa"])
def test_ddp_two_cpu_processes(adv, tmp_path, tmp_path_factory):
    data_root = tmp_path_factory.getbasetemp() / "ddp-synthetic"
    cfg = load_config(
        "train",
        [
            "--adv",
            adv,
            "model=unet",
            "model.channels=[4,8,16]",
            "model.strides=[2,2]",
            "model.num_res_units=1",
            "data=synthetic",
            f"data.root={data_root}",
            "data.prepare.num_cases=6",
            "data.prepare.size=[32,32,32]",
            "trainer=ddp",
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            "trainer.strategy=ddp_spawn",
            "trainer.max_epochs=1",
            "trainer.check_val_every_n_epoch=1",
            "trainer.enable_progress_bar=false",
            "logger=none",
            f"output_dir={tmp_path / 'runs'}",
            *(["attack.steps=2"] if adv != "none" else []),
        ],
    )
    out = tmp_path / "record"
    out.mkdir()
    run_dir = train(cfg, callbacks=[CaseRecorder(out)])

    train0, train1 = set(read(out, "train", 0)), set(read(out, "train", 1))
    assert train0 and train1 and not train0 & train1, "ranks must train on disjoint shards"
    val0, val1 = read(out, "val", 0), read(out, "val", 1)
    assert len(val0) == len(val1) == 1 and val0 != val1  # two validation cases, one per rank, no padding
    dice0, dice1 = read(out, "dice", 0), read(out, "dice", 1)
    assert dice0 == dice1, "the logged Dice must be reduced across ranks"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["hyper_parameters"]["attack"] == (None if adv == "none" else cfg.attack)
