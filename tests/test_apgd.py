"""APGD: the step schedule against its formula, a planted adversarial PGD-20 misses, best-point return, passes.

The contract tests of ``tests/test_attacks.py`` run on ``conf/attack/apgd*.yaml`` too.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_volume_batch
from torch import Tensor, nn

from robustseg.attacks import ATTACKS, attack_volume
from robustseg.attacks.apgd import checkpoints, cut_step, stages
from robustseg.attacks.best import foreground_dice
from robustseg.errors import ConfigError

EPS = 8 / 255


def reference_checkpoints(n: int) -> list[int]:
    """Croce and Hein (2020): p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), in iterations."""
    marks, interval, at = [], max(int(0.22 * n), 1), 0
    while at + interval <= n:
        at += interval
        marks.append(at)
        interval = max(interval - max(int(0.03 * n), 1), max(int(0.06 * n), 1))
    return marks


@pytest.mark.parametrize("n", [1, 5, 20, 37, 100, 300])
def test_checkpoints_follow_the_formula(n):
    assert checkpoints(n) == reference_checkpoints(n)


def test_checkpoints_hand():
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]  # intervals 22, 19, 16, 13, 10, 7, 6, 6
    assert checkpoints(20) == [4, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]  # 4, 3, 2, then 1 each


def test_radius_reduction_stages():
    assert stages(100, 0.1, True) == [(0.2, 30), (pytest.approx(0.15), 30), (0.1, 40)]
    assert stages(7, 0.1, True) == [(0.2, 2), (pytest.approx(0.15), 2), (0.1, 3)]
    assert stages(2, 0.1, True) == [(0.1, 2)]  # stages without iterations are dropped, the eps stage stays
    assert stages(50, 0.1, False) == [(0.1, 50)]


def test_cut_step_rules():
    # 4 steps since the last checkpoint for three volumes: raised 3/4 (keep), 2/4 (cut), 4/4 but best stale
    losses = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [2.0, 0.5, 2.0], [3.0, 2.0, 3.0], [2.5, 1.0, 4.0]])
    best = torch.tensor([3.0, 2.0, 4.0])
    at_last = torch.tensor([1.0, 1.0, 4.0])
    no_cut = torch.zeros(3, dtype=torch.bool)
    assert cut_step(losses, 0, 4, 0.75, best, at_last, no_cut).tolist() == [False, True, True]
    # a cut at the previous checkpoint suspends the stale-best rule
    assert cut_step(losses, 0, 4, 0.75, best, at_last, ~no_cut).tolist() == [False, True, False]
    # only the steps since the previous checkpoint count: from 2 on, volume 0 raised 1 of 2
    assert cut_step(losses, 2, 4, 0.75, best, at_last, ~no_cut).tolist() == [True, True, False]


def test_foreground_dice_matches_the_metrics():
    from robustseg.evaluation.metrics import dice_per_class

    torch.manual_seed(0)
    logits = torch.randn(3, 4, 5, 6, 7)
    labels = torch.randint(0, 3, (3, 1, 5, 6, 7))  # class 3 absent from the labels
    logits[2, 3] = -100  # ... and from the prediction of volume 2: counts 1 there
    expected = [sum(dice_per_class(logits[b].argmax(0), labels[b, 0], 4)[1:]) / 3 for b in range(3)]
    torch.testing.assert_close(foreground_dice(logits, labels), torch.tensor(expected))


class SlabNet(nn.Module):
    """Per voxel, class 0 wins only within ``width`` of ``centre``; the CE gradient of label 1 points to the slab.

    From 0.5 with the slab at ``0.5 - eps / 2``, L-inf PGD with step ``eps`` jumps between 0.5 and ``0.5 - eps``
    (half an eps from the slab either way) and never flips a voxel; a method that shrinks its step lands in it.
    """

    def __init__(self, centre: float, width: float) -> None:
        super().__init__()
        self.centre, self.width = centre, width

    def forward(self, x: Tensor) -> Tensor:
        distance = (x - self.centre).abs()  # (B, 1, D, H, W)
        return torch.cat([10 / EPS * (self.width - distance), torch.zeros_like(x)], dim=1)  # (B, 2, D, H, W)


def slab_case() -> tuple[Tensor, Tensor]:
    return torch.full((2, 1, 5, 4, 3), 0.5), torch.ones(2, 1, 5, 4, 3, dtype=torch.long)


def flipped(net: nn.Module, x: Tensor) -> float:
    return float((net(x).argmax(1) == 0).float().mean())


def test_planted_slab_apgd_finds_what_pgd20_misses():
    images, labels = slab_case()
    net = SlabNet(0.5 - EPS / 2, EPS / 10)
    pgd = ATTACKS.build({"name": "pgd", "eps": EPS, "step_size": EPS, "steps": 20, "random_start": False})
    assert flipped(net, pgd(net, images, labels)) == 0.0
    for loss in ("masked_ce", "masked_balanced_ce", "js"):  # (spherical: this net's true-class logit is 0)
        apgd = ATTACKS.build({"name": "apgd", "eps": EPS, "steps": 20, "loss": loss, "seed": 0})
        adversarial = apgd(net, images, labels)
        assert (adversarial - images).abs().max() <= EPS + 1e-6
        assert flipped(net, adversarial) > 0.95, loss


def test_planted_slab_needs_the_step_control(monkeypatch):
    """Without the checkpoint cuts APGD keeps its first step size and misses the slab too."""
    import robustseg.attacks.apgd as apgd_module

    images, labels = slab_case()
    net = SlabNet(0.5 - EPS / 2, EPS / 10)
    cfg = {"name": "apgd", "eps": EPS, "steps": 20, "radius_reduction": False, "random_start": False}
    assert flipped(net, ATTACKS.build(cfg)(net, images, labels)) == 1.0
    monkeypatch.setattr(apgd_module, "cut_step", lambda losses, *args: torch.zeros_like(losses[0], dtype=torch.bool))
    assert flipped(net, ATTACKS.build(cfg)(net, images, labels)) == 0.0


class Recording(nn.Module):
    """Records every input it is called on (as the attack passes it) with the foreground Dice of its output."""

    def __init__(self, net: nn.Module, labels: Tensor) -> None:
        super().__init__()
        self.net, self.labels, self.seen = net, labels, []

    def forward(self, x: Tensor) -> Tensor:
        out = self.net(x)
        self.seen.append((x.detach().clone(), foreground_dice(out, self.labels)))
        return out


def test_pgd_track_best_returns_the_best_visited_point():
    """Slab reached by the first step; the second step leaves it: the last iterate is clean, the best is not."""
    images, labels = slab_case()
    net = SlabNet(0.5 - 0.9 * EPS, EPS / 5)
    cfg = {"name": "pgd", "eps": EPS, "step_size": EPS, "steps": 2, "random_start": False}
    assert flipped(net, ATTACKS.build(cfg)(net, images, labels)) == 0.0
    recording = Recording(net, labels)
    best = ATTACKS.build({**cfg, "track_best": True})(recording, images, labels)
    assert len(recording.seen) == 3, "two gradient passes and one forward on the last iterate"
    assert flipped(net, best) == 1.0
    torch.testing.assert_close(best, recording.seen[1][0])


def test_apgd_returns_the_lowest_dice_point_of_the_final_ball():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.Tanh(), nn.Conv3d(4, 3, 3, padding=1))
    images = torch.rand(2, 1, 6, 5, 4)
    labels = net(images).argmax(1, keepdim=True).detach()  # the clean prediction is perfect
    apgd = ATTACKS.build({"name": "apgd", "eps": 0.05, "steps": 10, "seed": 0})
    recording = Recording(net, labels)
    adversarial = apgd(recording, images, labels)
    assert len(recording.seen) == apgd.max_passes() == 13
    final = recording.seen[-(stages(10, 0.05, True)[-1][1] + 1) :]  # the eps stage: its start and 4 iterates
    for b in range(2):
        scores = torch.stack([s[b] for _, s in final])
        best = int(scores.argmin())  # first of the lowest, as the tracker keeps the earlier point on ties
        torch.testing.assert_close(adversarial[b], final[best][0][b])
    assert (adversarial - images).abs().max() <= 0.05 + 1e-6


def test_early_stop_saves_passes_only_when_nothing_is_left():
    images, labels = slab_case()
    net = SlabNet(0.5 - EPS / 2, EPS / 10)
    cfg = {"name": "apgd", "eps": EPS, "steps": 20, "seed": 0}
    counts = {}
    for early in (False, True):
        recording = Recording(net, labels)
        ATTACKS.build({**cfg, "early_stop": early})(recording, images, labels)
        counts[early] = len(recording.seen)
    assert counts[False] == 23 and counts[True] < counts[False]


def test_l2_stays_in_the_ball(tiny_net, volume_batch):
    attack = ATTACKS.build({"name": "apgd", "norm": "l2", "eps": 0.5, "steps": 4, "seed": 0})
    assert attack.threat_model == "l2"
    delta = attack(tiny_net, volume_batch["image"], volume_batch["label"]) - volume_batch["image"]
    assert delta.flatten(1).norm(dim=1).max() <= 0.5 + 1e-5


@pytest.mark.parametrize("mode", ["pipeline", "tiles"])
def test_apgd_through_attack_volume(mode, tiny_net):
    """Whole volumes larger than the ROI, through the sliding-window model (pipeline) and on tiles."""
    batch = make_volume_batch(batch_size=1, size=20)
    attack = ATTACKS.build({"name": "apgd", "eps": EPS, "steps": 3, "loss": "js", "seed": 0})
    adversarial = attack_volume(attack, tiny_net, batch["image"], batch["label"], mode=mode, roi_size=16)
    assert adversarial.shape == batch["image"].shape
    assert (adversarial - batch["image"]).abs().max() <= EPS + 1e-6


@pytest.mark.parametrize(
    ("cfg", "field"),
    [
        ({"name": "apgd", "norm": "l1"}, "norm"),
        ({"name": "apgd", "rho": 1.5}, "rho"),
        ({"name": "apgd", "momentum": 0}, "momentum"),
        ({"name": "apgd", "steps": 0}, "steps"),
        ({"name": "apgd", "loss": "hinge"}, "loss"),
        ({"name": "pgd", "track_best": True, "targeted": True}, "track_best"),
    ],
)
def test_bad_values_raise_config_error(cfg, field):
    with pytest.raises(ConfigError, match=field):
        ATTACKS.build(cfg)
