"""U-Mamba Bot / Enc (Ma et al., 2024): paper-size plans, tiny presets, training and attacks on CPU."""

from __future__ import annotations

import pytest
import torch
from conftest import make_volume_batch

from robustseg.models import MODELS, TINY
from robustseg.models.umamba import MambaLayer, UMamba, plan

NAMES = ["umamba_bot", "umamba_enc"]


def tiny(name: str, out_channels: int = 3, **overrides) -> UMamba:
    torch.manual_seed(0)
    return MODELS.build({"name": name, "in_channels": 1, "out_channels": out_channels, **TINY[name], **overrides})


def millions(net: torch.nn.Module) -> float:
    return sum(p.numel() for p in net.parameters()) / 1e6


# Paper plan (6 stages, 32-320, 14 classes). The official code builds this same module tree (UMambaBot_3d.py,
# UMambaEnc_3d.py with nnU-Net's default 3d_fullres block counts), so these are its counts; the published range of
# U-Mamba 3D models is roughly 40-70M depending on the plan. Enc at 96^3 uses channel tokens in its last 2 stages.
@pytest.mark.parametrize(
    ("name", "img_size", "expected"),
    [("umamba_bot", None, 42.12), ("umamba_bot", (96, 96, 96), 42.12), ("umamba_enc", (96, 96, 96), 42.37)],
)
def test_paper_size_construction_and_parameter_count(name, img_size, expected):
    net = MODELS.build({"name": name, "in_channels": 1, "out_channels": 14, "img_size": img_size})
    assert millions(net) == pytest.approx(expected, abs=0.05)
    assert 40 <= millions(net) <= 70
    assert len(net.encoder.stages) == 6 and net.total_stride == 32
    mambas = [m for m in net.modules() if isinstance(m, MambaLayer)]
    assert all(m.mamba.d_state == 16 and m.mamba.d_conv == 4 and m.mamba.expand == 2 for m in mambas)
    if name == "umamba_bot":
        assert [m.dim for m in mambas] == [320]
    else:  # 96 -> 96, 48, 24, 12, 6, 3 voxels per side: 216 <= 320 and 27 <= 320 switch to channel tokens
        assert [(m.dim, m.channel_token) for m in mambas] == [
            (32, False), (64, False), (128, False), (256, False), (216, True), (27, True)
        ]  # fmt: skip


def test_plan_follows_umamba_block_rule_and_trims_to_the_roi():
    features, strides, blocks, blocks_dec, sizes = plan(
        [32, 64, 128, 256, 320, 320], [1, 2, 2, 2, 2, 2], None, None, None, "t"
    )
    assert blocks == [2, 2, 2, 1, 1, 1] and blocks_dec == [2, 2, 2, 1, 1] and sizes is None  # UMambaBot_3d.py rule
    features, strides, blocks, blocks_dec, sizes = plan(
        [32, 64, 128, 256, 320, 320], [1, 2, 2, 2, 2, 2], None, None, (32, 32, 32), "t"
    )
    assert features == [32, 64, 128, 256, 320] and sizes[-1] == [2, 2, 2]  # a 1^3 bottleneck would break InstanceNorm
    assert blocks == [2, 2, 2, 1, 1] and blocks_dec == [2, 2, 2, 1]  # the rule, for 5 stages
    with pytest.raises(ValueError, match="too small"):
        plan([4, 8], [1, 2], None, None, (2, 2, 2), "t")
    with pytest.raises(ValueError, match="one entry per stage"):
        plan([4, 8], [1], None, None, None, "t")
    with pytest.raises(ValueError, match="strides\\[0\\] must be 1"):
        plan([4, 8], [2, 2], None, None, None, "t")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(2, 1, 8, 8, 8), (1, 1, 16, 12, 4)], ids=["cube", "anisotropic"])
def test_tiny_forward_backward_any_multiple_of_the_stride(name, shape):
    """32^3 is covered for every TINY preset by tests/test_models.py; here other multiples of the stride (4)."""
    net = tiny(name)
    x = torch.rand(*shape, requires_grad=True)
    y = net(x)
    assert y.shape == (shape[0], 3, *shape[2:])
    y.square().mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in net.parameters()), "every parameter is used (DDP-safe)"


@pytest.mark.parametrize("name", NAMES)
def test_illegal_input_sizes_are_rejected(name):
    with pytest.raises(ValueError, match="multiple of 4"):
        tiny(name)(torch.rand(1, 1, 16, 16, 18))


def test_enc_channel_tokens_fix_the_input_size():
    net = tiny("umamba_enc", img_size=(8, 8, 8), features=(4, 8, 80))  # 2^3 = 8 voxels <= 80 channels
    assert net.encoder.mamba_layers[2].channel_token and net.encoder.mamba_layers[2].dim == 8
    assert net(torch.rand(2, 1, 8, 8, 8)).shape == (2, 3, 8, 8, 8)
    with pytest.raises(ValueError, match="channel tokens"):
        net(torch.rand(2, 1, 16, 16, 16))


@pytest.mark.parametrize("name", NAMES)
def test_pure_torch_scans_agree_inside_the_network_in_values_and_input_gradients(name):
    """The attack's bare pass (frozen parameters, gradient to the input) through chunks of 16 of 512 tokens."""
    net_chunked = tiny(name, scan="chunked", chunk_size=16).eval().requires_grad_(False)
    net_sequential = tiny(name, scan="sequential").eval().requires_grad_(False)
    x = torch.rand(1, 1, 8, 8, 8, requires_grad=True)  # the Mamba layers run in float32 (official)
    y_chunked, y_sequential = net_chunked(x), net_sequential(x)
    torch.testing.assert_close(y_chunked, y_sequential, rtol=1e-4, atol=1e-5)
    weight = torch.randn(y_chunked.shape, generator=torch.Generator().manual_seed(0))
    (g_chunked,) = torch.autograd.grad((y_chunked * weight).sum(), x)
    (g_sequential,) = torch.autograd.grad((y_sequential * weight).sum(), x)
    assert g_sequential.abs().max() > 0
    torch.testing.assert_close(g_chunked, g_sequential, rtol=1e-3, atol=1e-4 * g_sequential.abs().max().item())


@pytest.mark.parametrize("name", NAMES)
def test_tiny_training_steps_reduce_the_loss(name):
    from robustseg.attacks.losses import dice_ce

    net = tiny(name).train()
    batch = make_volume_batch(batch_size=2, size=8, seed=0)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(4):
        opt.zero_grad()
        loss = dice_ce(net(batch["image"]), batch["label"])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("name", NAMES)
def test_pgd_attack_on_tiny_umamba(name):
    from robustseg.attacks.losses import ce
    from robustseg.registry import ATTACKS

    net = tiny(name)
    batch = make_volume_batch(batch_size=2, size=8, seed=1)
    images, labels = batch["image"], batch["label"]
    eps = 8 / 255
    attack = ATTACKS.build({"name": "pgd", "eps": eps, "step_size": eps / 4, "steps": 3, "loss": "ce"})
    adversarial = attack(net, images, labels)
    assert adversarial.shape == images.shape and not adversarial.requires_grad
    assert (adversarial - images).abs().max() <= eps + 1e-6
    assert net.training and all(p.grad is None for p in net.parameters())
    net.eval()
    with torch.no_grad():
        assert ce(net(adversarial), labels) > ce(net(images), labels)


@pytest.mark.parametrize("name", NAMES)
def test_lightning_adversarial_training_and_checkpoint_reload(name, tmp_path):
    """The system trains a tiny U-Mamba with PGD adversarial training and rebuilds it from the checkpoint alone."""
    import lightning as L
    from torch.utils.data import DataLoader

    from robustseg.systems import SegmentationSystem

    items = [make_volume_batch(1, size=16, seed=i) for i in range(2)]
    data = [{"image": b["image"][0], "label": b["label"][0], "case_id": f"case{i}"} for i, b in enumerate(items)]
    torch.manual_seed(0)
    model = {"name": name, "in_channels": 1, "out_channels": 3, **TINY[name]}
    attack = {"name": "pgd", "eps": 4 / 255, "step_size": 1 / 255, "steps": 1}
    system = SegmentationSystem(model=model, attack=attack, num_classes=3, roi_size=(16,) * 3, log_images=0)
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, default_root_dir=tmp_path, inference_mode=False,
    )  # fmt: skip
    trainer.fit(system, DataLoader(data, batch_size=2), DataLoader(data[:1], batch_size=1))
    assert torch.isfinite(trainer.callback_metrics["train/loss/adv"])

    path = tmp_path / "system.ckpt"
    trainer.save_checkpoint(path)
    reloaded = SegmentationSystem.load_from_checkpoint(path, weights_only=True).eval()
    x = items[0]["image"]
    with torch.no_grad():
        torch.testing.assert_close(reloaded.net(x), system.eval().net(x))
