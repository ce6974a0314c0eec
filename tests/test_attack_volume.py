"""Whole-volume attacks: tiles stitched without overlap, pipeline through sliding windows, memory-bounded equality."""

from __future__ import annotations

import pytest
import torch
from conftest import TargetSpy, make_volume_batch
from torch import Tensor, nn

from robustseg.attacks import ATTACKS, LOSSES, SlidingWindowModel, attack_volume
from robustseg.attacks.volume import tile_starts


@pytest.fixture
def odd_volume() -> dict[str, Tensor]:
    """A (1, 1, 24, 20, 18) phantom: not divisible by a 16^3 ROI along any axis."""
    batch = make_volume_batch(batch_size=1, size=24, seed=1)
    return {"image": batch["image"][..., :20, :18].contiguous(), "label": batch["label"][..., :20, :18].contiguous()}


class VoxelNet(nn.Module):
    """Per-voxel model (1x1x1 conv): with a voxel-mean CE, the signed gradient of a voxel ignores the tiling."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv3d(1, 3, kernel_size=1)
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return self.conv(x)


def test_tile_starts_cover_each_voxel_once():
    for n, r in [(16, 16), (20, 16), (48, 16), (50, 16), (97, 96)]:
        covered = torch.zeros(n, dtype=torch.long)
        for start, keep, stop in tile_starts(n, r):
            assert stop - start == r and start <= keep <= stop
            covered[keep:stop] += 1
        assert (covered == 1).all(), (n, r)


def test_tiles_not_divisible_stitch_every_voxel_once(odd_volume):
    image, label = odd_volume["image"], odd_volume["label"]
    cfg = {"name": "pgd", "eps": "8/255", "step_size": "8/255", "steps": 1, "random_start": False, "loss": "ce"}
    fgsm = ATTACKS.build(cfg)
    net = VoxelNet()
    tiled = attack_volume(fgsm, net, image, label, mode="tiles", roi_size=16, sw_batch_size=2)
    whole = fgsm(net, image, label)
    assert tiled.shape == image.shape
    torch.testing.assert_close(tiled, whole, rtol=0, atol=1e-6)
    assert (tiled - image).abs().max() <= 8 / 255 + 1e-6


def test_tiles_are_batched(odd_volume):
    net = VoxelNet()
    attack = ATTACKS.build({"name": "pgd", "steps": 2, "seed": 0})
    attack_volume(attack, net, odd_volume["image"], odd_volume["label"], mode="tiles", roi_size=16, sw_batch_size=3)
    assert net.calls == 2 * 3  # 8 tiles in batches of 3 -> 3 forwards per step


def test_tiles_smaller_than_roi(tiny_net):
    batch = make_volume_batch(batch_size=1, size=12)
    attack = ATTACKS.build({"name": "pgd", "steps": 1, "seed": 0})
    out = attack_volume(attack, tiny_net, batch["image"], batch["label"], mode="tiles", roi_size=16)
    assert out.shape == batch["image"].shape


@pytest.mark.parametrize("blend_mode", ["gaussian", "constant"])
def test_memory_bounded_gradient_equals_autograd_through_sliding_window(blend_mode, tiny_net, odd_volume):
    image, label = odd_volume["image"], odd_volume["label"]
    tiny_net.eval()
    grads = []
    for bounded in (False, True):
        model = SlidingWindowModel(tiny_net, 16, overlap=0.5, blend_mode=blend_mode, memory_bounded=bounded)
        x = image.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(LOSSES["dice_ce"](model(x), label), x)
        grads.append(grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("name", ["pgd", "vafa"])
def test_memory_bounded_pipeline_gives_the_same_adversarial(name, tiny_net, odd_volume):
    image, label = odd_volume["image"], odd_volume["label"]
    cfg = {"name": name, "steps": 2, **({"seed": 0} if name == "pgd" else {"block_size": 8})}
    attack = ATTACKS.build(cfg)
    kwargs = {"mode": "pipeline", "roi_size": 16, "overlap": 0.5, "sw_batch_size": 2}
    full = attack_volume(attack, tiny_net, image, label, memory_bounded=False, **kwargs)
    bounded = attack_volume(attack, tiny_net, image, label, memory_bounded=True, **kwargs)
    torch.testing.assert_close(bounded, full, rtol=0, atol=1e-5)
    assert tiny_net.training, "the wrapped model's mode must be restored"
    assert all(p.grad is None for p in tiny_net.parameters())


def test_pipeline_attack_raises_the_scored_loss(tiny_net, odd_volume):
    """White-box through the scoring pipeline: the sliding-window loss goes up."""
    image, label = odd_volume["image"], odd_volume["label"]
    tiny_net.eval()
    attack = ATTACKS.build({"name": "pgd", "steps": 3, "seed": 0, "loss": "ce"})
    adversarial = attack_volume(attack, tiny_net, image, label, roi_size=16, memory_bounded=True)
    scorer = SlidingWindowModel(tiny_net, 16)
    with torch.no_grad():
        assert LOSSES["ce"](scorer(adversarial), label) > LOSSES["ce"](scorer(image), label)
    assert (adversarial - image).abs().max() <= 8 / 255 + 1e-6


def test_attack_volume_rejects_bad_arguments(tiny_net, odd_volume):
    attack = ATTACKS.build({"name": "pgd", "steps": 1})
    with pytest.raises(ValueError, match="mode"):
        attack_volume(attack, tiny_net, odd_volume["image"], odd_volume["label"], mode="slices", roi_size=16)
    with pytest.raises(ValueError, match="label"):
        attack_volume(attack, tiny_net, odd_volume["image"], odd_volume["label"][0], roi_size=16)


def test_tiles_get_the_target_derived_once_from_the_whole_volume():
    """Issue 10: class 2 mapped to 1 in one tile and to 3 in another, and a tile whose largest label was 1 got
    target == labels. Now every tile sees its crop of one whole-volume map (K from the model)."""
    label = torch.zeros(1, 1, 16, 16, 16, dtype=torch.long)
    label[:, :, :8, :8, :8] = 1  # a tile holding only class 1
    label[:, :, 8:, :8, :8] = 2  # a tile holding only class 2
    label[:, :, 8:, 8:, 8:] = torch.tensor([2, 3]).repeat(4)  # a tile holding classes 2 and 3
    image = torch.rand(1, 1, 16, 16, 16)
    spy = TargetSpy()
    attack_volume(spy, nn.Conv3d(1, 4, 1), image, label, mode="tiles", roi_size=8, sw_batch_size=8)
    (tiles,) = spy.seen  # (8, 1, 8, 8, 8): one batch of 8 tiles in C order
    expected = torch.where(label > 0, label % 3 + 1, label)  # K = 4: 1 -> 2, 2 -> 3, 3 -> 1
    assert torch.equal(tiles[0:1], expected[:, :, :8, :8, :8]) and tiles[0].max() == 2
    assert torch.equal(tiles[4:5], expected[:, :, 8:, :8, :8]) and tiles[4].max() == 3
    assert torch.equal(tiles[7:8], expected[:, :, 8:, 8:, 8:])
    pipeline = TargetSpy()
    attack_volume(pipeline, nn.Conv3d(1, 4, 1), image, label, mode="pipeline", roi_size=8)
    assert torch.equal(pipeline.seen[0], expected)


def test_explicit_target_equal_to_the_truth_is_refused(odd_volume):
    attack = ATTACKS.build({"name": "pgd", "steps": 1, "targeted": True})
    with pytest.raises(ValueError, match="equals the true labels"):
        attack_volume(
            attack, VoxelNet(), odd_volume["image"], odd_volume["label"], roi_size=16, target=odd_volume["label"]
        )


@pytest.mark.parametrize("random_start", [False, True])
def test_l2_budget_is_per_volume_in_tiles_mode(random_start, odd_volume):
    """Issue 10: 4 tiles at eps 0.5 gave a volume L2 of 1.0. The volume's ball is shared by its tiles."""
    image, label = odd_volume["image"], odd_volume["label"]  # 8 tiles of 16^3
    attack = ATTACKS.build(
        {"name": "pgd_l2", "eps": 0.5, "step_size": 0.25, "steps": 3, "random_start": random_start, "seed": 0}
    )
    tiled = attack_volume(attack, VoxelNet(), image, label, mode="tiles", roi_size=16, sw_batch_size=4)
    norm = (tiled - image).flatten().norm()
    assert 0.45 < norm <= 0.5 + 1e-5  # the whole budget spent, never more
    pipeline = attack_volume(attack, VoxelNet(), image, label, mode="pipeline", roi_size=16)
    assert (pipeline - image).flatten().norm() <= 0.5 + 1e-5
