"""Shared test helpers: seeded phantom volumes and a tiny network."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from torch import Tensor, nn

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

from robustseg.attacks import Attack  # noqa: E402
from robustseg.models import TINY  # noqa: E402
from robustseg.registry import MODELS  # noqa: E402


def make_volume_batch(batch_size: int = 2, size: int = 16, seed: int = 0, num_classes: int = 3) -> dict[str, Tensor]:
    """Concentric-sphere phantoms: class k fills the shell between radii; a noisy image in [0, 1].

    Returns ``{"image": (B, 1, S, S, S) float32, "label": (B, 1, S, S, S) int64, "case_id": list[str]}``.
    """
    g = torch.Generator().manual_seed(seed)
    axis = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    zz, yy, xx = torch.meshgrid(axis, axis, axis, indexing="ij")
    radius = (zz**2 + yy**2 + xx**2).sqrt()  # (D, H, W)
    label = torch.zeros_like(radius, dtype=torch.long)
    for k in range(1, num_classes):
        label += (radius < size / 2 * (1 - k / num_classes)).long()
    label = label.expand(batch_size, 1, -1, -1, -1).clone()  # (B, 1, D, H, W)
    image = (label / max(num_classes - 1, 1) + 0.1 * torch.randn(label.shape, generator=g)).clamp(0, 1)
    return {"image": image.float(), "label": label, "case_id": [f"case{i}" for i in range(batch_size)]}


def conv_net3d(width: int = 6, out_channels: int = 3, scale: float = 6.0, seed: int = 0) -> nn.Module:
    """A fixed float64 net, 3x3x3 conv -> tanh -> 3x3x3 conv, in eval mode, for attack reference tests.

    Each logit depends on its neighbours (so windows and tiles matter), and the weights are scaled by ``scale`` so the
    loss, its gradient and the prediction react to perturbations within a few /255.
    """
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv3d(1, width, 3, padding=1), nn.Tanh(), nn.Conv3d(width, out_channels, 3, padding=1))
    net = net.double()
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(scale)  # in float64: exact for scale 1
    return net.eval()


class Recording(nn.Module):
    """Wraps a net and records every input it is called on (detached copies, in call order)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net, self.seen = net, []

    def forward(self, x: Tensor) -> Tensor:
        self.seen.append(x.detach().clone())
        return self.net(x)


@dataclasses.dataclass(frozen=True)
class TargetSpy(Attack):
    """Returns its input and records the label map its objective would use (the target map when targeted)."""

    targeted: bool = True
    target: str = "foreground_swap"
    seen: list = dataclasses.field(default_factory=list, compare=False)

    def perturb(self, model: nn.Module, images: Tensor, labels: Tensor) -> Tensor:
        self.seen.append(labels.clone())
        return images


@pytest.fixture(autouse=True)
def _rank_zero():
    """A Trainer built under fake SLURM/DDP ranks (tests/test_slurm.py) sets Lightning's process-wide
    ``rank_zero_only.rank``; left at 3 it turns every later logger in this worker into a dummy. Reset it."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    rank_zero_only.rank = 0
    yield
    rank_zero_only.rank = 0


@pytest.fixture(autouse=True)
def _one_thread():
    """Tests use tiny tensors: one intra-op thread avoids oversubscription stalls on a shared 2-core machine
    (and beside the two processes of the DDP tests)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def volume_batch() -> dict[str, Tensor]:
    return make_volume_batch()


@pytest.fixture
def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return MODELS.build({"name": "unet", "in_channels": 1, "out_channels": 3, **TINY["unet"]})
