from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import make_volume_batch
from torch.utils.data import DataLoader, Dataset

from robustseg.attacks.frequency import dct_matrix
from robustseg.models import TINY
from robustseg.systems import SegmentationSystem
from robustseg.systems.adversarial import AttackView, frequency_consistency

MODEL = {"name": "unet", "in_channels": 1, "out_channels": 3, **TINY["unet"]}


class Phantoms(Dataset):
    """Phantom volumes as a dataset of batch dicts without the batch dimension."""

    def __init__(self, n: int, size: int = 32) -> None:
        self.items = [make_volume_batch(1, size=size, seed=i) for i in range(n)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.items[i]["image"][0], "label": self.items[i]["label"][0], "case_id": f"case{i}"}


def fit(
    system: SegmentationSystem, tmp_path, train_cases: int = 4, val_cases: int = 2, val_size: int = 48, **kwargs
) -> L.Trainer:
    """Fit on phantom crops (batches of 2) and validate on whole phantom volumes; ``kwargs`` go to the Trainer."""
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=kwargs.pop("max_epochs", 1),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **kwargs,
    )
    train_loader = DataLoader(Phantoms(train_cases), batch_size=2)
    trainer.fit(system, train_loader, DataLoader(Phantoms(val_cases, size=val_size), batch_size=1))
    return trainer


def test_clean_training_logs_dice_and_checkpoint_rebuilds_without_yaml(tmp_path):
    torch.manual_seed(0)
    system = SegmentationSystem(model=MODEL, num_classes=3, class_names=["bg", "shell", "core"], roi_size=(32,) * 3)
    trainer = fit(system, tmp_path, max_epochs=2, enable_checkpointing=False)
    metrics = trainer.callback_metrics
    for key in ("train/loss/clean", "val/dice/clean", "val/dice_with_bg/clean", "val/dice/clean/core"):
        assert key in metrics and torch.isfinite(metrics[key]), key
    assert metrics["val/dice_with_bg/clean"] >= 0

    path = tmp_path / "system.ckpt"
    trainer.save_checkpoint(path)
    reloaded = SegmentationSystem.load_from_checkpoint(path, weights_only=True)
    x = make_volume_batch(1, size=32)["image"]
    system.eval()
    reloaded.eval()
    with torch.no_grad():
        assert torch.equal(system(x), reloaded(x))
    assert reloaded.hparams.model["name"] == "unet" and reloaded.class_names == ["bg", "shell", "core"]


def test_bad_system_settings_fail_at_construction():
    with pytest.raises(ValueError, match="adv_mode"):
        SegmentationSystem(model=MODEL, num_classes=3, adv_mode="sometimes")
    with pytest.raises(ValueError, match="class_names"):
        SegmentationSystem(model=MODEL, num_classes=3, class_names=["a", "b"])
    with pytest.raises(ValueError, match="needs an attack"):
        SegmentationSystem(model=MODEL, num_classes=3, adv_mode="vaft")


def test_warmup_cosine_schedule(tmp_path):
    system = SegmentationSystem(model=MODEL, num_classes=3, roi_size=(32,) * 3, lr=1e-3, warmup_epochs=1)
    trainer = fit(system, tmp_path, max_epochs=3, enable_checkpointing=False, limit_val_batches=0)
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    lrs = scheduler.get_last_lr()
    assert lrs[0] < 1e-3 * 0.5  # cosine decay reached its tail after 3 of 3 epochs
    assert scheduler.lr_lambda(0) == 0.0 and scheduler.lr_lambda(2) == pytest.approx(1.0)  # 2 warm-up steps


def test_dct_matrix_orthonormal_and_frequency_consistency_formula():
    m = dct_matrix(6, dtype=torch.float64)
    assert torch.allclose(m @ m.T, torch.eye(6, dtype=torch.float64), atol=1e-12)
    z = torch.randn(2, 3, 4, 5, 6, dtype=torch.float64)
    z_adv = z + 0.1 * torch.randn_like(z)

    # reference: separable DCT along each axis with explicit matrix products
    def dct3(v):
        v = torch.einsum("ai,...ijk->...ajk", dct_matrix(4, dtype=v.dtype), v)
        v = torch.einsum("bj,...ijk->...ibk", dct_matrix(5, dtype=v.dtype), v)
        return torch.einsum("ck,...ijk->...ijc", dct_matrix(6, dtype=v.dtype), v)

    expected = (dct3(z) - dct3(z_adv)).abs().sum() / dct3(z).abs().sum()
    assert frequency_consistency(z, z_adv).item() == pytest.approx(expected.item(), rel=1e-10)
    assert frequency_consistency(z, z).item() == 0.0


def test_attack_view_scales_gradient_and_records_zero_fraction():
    net = torch.nn.Conv3d(1, 2, 1, bias=False)
    torch.nn.init.constant_(net.weight, 1.0)
    x = torch.rand(1, 1, 2, 2, 2, requires_grad=True)
    view = AttackView(net, grad_scale=8.0)
    (grad,) = torch.autograd.grad(view(x).sum(), x)
    assert torch.allclose(grad, torch.full_like(x, 16.0))  # d/dx of 2 channels, times 8
    assert view.zero_grad_fraction().item() == 0.0
    net.weight.data.zero_()
    torch.autograd.grad(view(x).sum(), x)
    assert view.zero_grad_fraction().item() == pytest.approx(0.5)  # mean of 0 and 1


def test_attack_view_keeps_fp16_input_gradients_from_underflowing():
    net = torch.nn.Conv3d(1, 2, 1)
    x = torch.rand(1, 1, 4, 4, 4, requires_grad=True)
    fractions = {}
    for scale in (1.0, 2.0**12):
        view = AttackView(net, grad_scale=scale)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = view(x).float().sum() * 1e-9  # a gradient below fp16's smallest subnormal (6e-8)
        torch.autograd.grad(loss, x)
        fractions[scale] = view.zero_grad_fraction().item()
    assert fractions[1.0] == 1.0  # unscaled: every input gradient underflowed to zero
    assert fractions[2.0**12] == 0.0
