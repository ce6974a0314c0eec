"""Adversarial training step time over (attack steps + 1) x clean step time, measured side by side.

An adversarial step runs ``steps`` attack passes (forward + input-gradient backward, parameters frozen) and then
one ordinary training step on the adversarial crops, so the ideal cost is at most ``(steps + 1)`` clean steps.
Goal: ratio <= 1.15. Both systems train through Lightning's real loop (``Trainer.fit``); per-step times come from
batch-start/end hooks, clean and adversarial rounds alternate, and the medians are compared.

    python benchmarks/training.py [--size 64] [--steps 5] [--rounds 3] [--batches 4]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from robustseg.systems import SegmentationSystem


class Crops(Dataset):
    """Random training crops with a spherical two-class label, (1, S, S, S) each."""

    def __init__(self, n: int, size: int) -> None:
        g = torch.Generator().manual_seed(0)
        axis = torch.arange(size) - size / 2
        zz, yy, xx = torch.meshgrid(axis, axis, axis, indexing="ij")
        label = ((zz**2 + yy**2 + xx**2).sqrt() < size / 3).long()[None]  # (1, S, S, S)
        self.items = [((label * 0.5 + 0.2 * torch.rand(label.shape, generator=g)).clamp(0, 1), label) for _ in range(n)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        image, label = self.items[i]
        return {"image": image, "label": label, "case_id": f"crop{i}"}


class StepTimer(L.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.times.append(time.perf_counter() - self._start)


def step_times(attack: dict | None, size: int, batches: int, batch_size: int) -> list[float]:
    torch.manual_seed(0)
    system = SegmentationSystem(
        model={"name": "unet", "in_channels": 1, "out_channels": 2},
        attack=attack,
        num_classes=2,
        roi_size=(size,) * 3,
        warmup_epochs=0,
    )
    timer = StepTimer()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=batches + 1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[timer],
    )
    trainer.fit(system, DataLoader(Crops(batch_size * (batches + 1), size), batch_size=batch_size))
    return timer.times[1:]  # the first step warms up allocators and kernels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="crop side length")
    parser.add_argument("--steps", type=int, default=5, help="PGD steps per adversarial example")
    parser.add_argument("--rounds", type=int, default=3, help="alternating clean/adversarial rounds")
    parser.add_argument("--batches", type=int, default=3, help="timed steps per round")
    parser.add_argument("--batch-size", type=int, default=2)
    args = parser.parse_args()
    attack = {"name": "pgd", "eps": "4/255", "step_size": 0.01, "steps": args.steps, "random_start": True}
    clean: list[float] = []
    adversarial: list[float] = []
    step_times(None, args.size, 1, args.batch_size)  # warm-up: one-time kernel and allocator set-up
    step_times(attack, args.size, 1, args.batch_size)
    for _ in range(args.rounds):  # interleaved, so drifting machine load hits both alike
        clean += step_times(None, args.size, args.batches, args.batch_size)
        adversarial += step_times(attack, args.size, args.batches, args.batch_size)
    clean_step, adv_step = statistics.median(clean), statistics.median(adversarial)
    ratio = adv_step / ((args.steps + 1) * clean_step)
    print(
        json.dumps(
            {
                "benchmark": "adversarial training step / ((attack steps + 1) x clean step)",
                "model": "MONAI UNet (paper settings)",
                "crop": [args.batch_size, 1, args.size, args.size, args.size],
                "attack": attack,
                "torch_threads": torch.get_num_threads(),
                "ratio": round(ratio, 3),
                "goal": 1.15,
                "meets_goal": ratio <= 1.15,
                "clean_step_over_adv_step_per_pass": round(clean_step / (adv_step / (args.steps + 1)), 3),
                "samples": {"clean": len(clean), "adversarial": len(adversarial)},
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
