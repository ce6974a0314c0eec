"""Tests written from mutation-testing survivors of pgd.py, apgd.py, best.py, sea_losses.py and losses.py.

Each checks the library's behaviour against an independent expectation written plainly here (a hand computation
over Python numbers, the documented distribution, the documented contract), on inputs where the surviving mutant
answers differently: more than one volume, more than one slice, small logits, half-precision inputs. APGD's whole
loop against a plain reference is in ``test_mutants_pgd_2.py``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import Recording
from torch import Tensor, nn

from robustseg.attacks import ATTACKS, LOSSES
from robustseg.attacks.best import BestTracker, OutputRecorder, foreground_dice
from robustseg.attacks.sea_losses import balanced_weights, correct_mask, masked_spherical
from robustseg.errors import ConfigError


class TwoClass(nn.Module):
    """Logits ``(x, 1 - x)`` of two classes from a one-channel volume: dtype-generic, no parameters."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x, 1 - x], dim=1)


# configuration ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"name": "pgd", "steps": 0}, r"PGD\.steps"),
        ({"name": "pgd", "loss": "hinge"}, r"PGD\.loss"),
        ({"name": "pgd", "seed": 1.5}, r"PGD\.seed"),
        ({"name": "pgd", "seed": True}, r"PGD\.seed"),
        ({"name": "pgd", "seed": "3"}, r"PGD\.seed"),
        ({"name": "apgd", "steps": 0}, r"APGD\.steps"),
        ({"name": "apgd", "loss": "hinge"}, r"APGD\.loss"),
        ({"name": "apgd", "norm": "l1"}, r"APGD\.norm"),
        ({"name": "apgd", "rho": 0}, r"APGD\.rho"),
        ({"name": "apgd", "seed": 1.5}, r"APGD\.seed"),
        ({"name": "apgd", "seed": False}, r"APGD\.seed"),
        ({"name": "vafa", "targeted": True, "loss": "masked_ce"}, r"loss: masked_ce is untargeted only"),
        # SEA's masked losses need the true labels too: refused for every attack with a loss, VAFA included
        ({"name": "vafa", "targeted": True, "loss": "masked_balanced_ce"}, r"VAFA\.loss: masked_balanced_ce is unt"),
        ({"name": "vafa", "targeted": True, "loss": "masked_spherical"}, r"VAFA\.loss: masked_spherical is untar"),
        ({"name": "pgd", "targeted": True, "loss": "masked_spherical"}, r"PGD\.loss: masked_spherical is untarg"),
    ],
)
def test_config_errors_name_the_attack_and_field(cfg, message):
    """A bad value is refused with a ``ConfigError`` naming ``<Attack>.<field>`` (seeds: integers or null only)."""
    with pytest.raises(ConfigError, match=message):
        ATTACKS.build(cfg)


def test_apgd_accepts_its_whole_parameter_range_and_fraction_strings():
    """``rho`` and ``momentum`` lie in ``(0, 1]`` (1 included) and, like budgets, may be written as fractions."""
    attack = ATTACKS.build({"name": "apgd", "rho": "3/4", "momentum": "1/2", "seed": 7})
    assert (attack.rho, attack.momentum, attack.seed) == (0.75, 0.5, 7)
    edge = ATTACKS.build({"name": "apgd", "rho": 1, "momentum": 1.0})
    assert (edge.rho, edge.momentum) == (1.0, 1.0)
    assert ATTACKS.build({"name": "pgd", "seed": 3}).seed == 3


# sea_losses and losses ---------------------------------------------------------------------------------------


def _volumes() -> tuple[Tensor, Tensor]:
    """Two volumes ``(2, 3, 2, 1, 2)`` of 4 voxels, three classes, small logits (norms below 1), in float64."""
    g = torch.Generator().manual_seed(3)
    logits = (torch.rand(2, 3, 2, 1, 2, generator=g, dtype=torch.float64) - 0.5) * 0.6
    labels = torch.tensor([[0, 0, 1, 2], [1, 1, 1, 0]]).reshape(2, 1, 2, 1, 2)
    return logits, labels


def _voxels(logits: Tensor, labels: Tensor, b: int) -> list[tuple[list[float], int]]:
    """The (logit row, label) pairs of volume ``b``, as Python numbers."""
    rows = logits[b].reshape(logits.shape[1], -1).T.tolist()
    return list(zip(rows, labels[b].flatten().tolist()))


def test_sea_masks_weights_and_spherical_per_volume_by_hand():
    logits, labels = _volumes()
    # correct mask: a float mask of the input's dtype (documented "float mask"), 1 where the argmax is the label
    expected_mask = [
        [float(max(range(3), key=row.__getitem__) == y) for row, y in _voxels(logits, labels, b)] for b in (0, 1)
    ]
    torch.testing.assert_close(
        correct_mask(logits, labels), torch.tensor(expected_mask, dtype=torch.float64).view(2, 2, 1, 2)
    )
    # balanced weights per volume: normalised inverse counts of the classes present in that volume
    weights = []
    for b in (0, 1):
        counts = [labels[b].flatten().tolist().count(k) for k in range(3)]
        inverse = [1 / n if n else 0.0 for n in counts]
        weights.append([v / sum(inverse) for v in inverse])
    torch.testing.assert_close(balanced_weights(labels, 3), torch.tensor(weights))
    # masked spherical: mean over each volume's voxels of -z_y / ||z|| on correct voxels, then the batch mean
    per_volume = []
    for b in (0, 1):
        terms = [
            -row[y] / math.sqrt(sum(v * v for v in row)) if max(range(3), key=row.__getitem__) == y else 0.0
            for row, y in _voxels(logits, labels, b)
        ]
        per_volume.append(sum(terms) / len(terms))
    assert masked_spherical(logits, labels).item() == pytest.approx(sum(per_volume) / 2, rel=1e-9)


def test_masked_ce_with_a_single_correct_voxel_is_its_ce():
    """One voxel of four still correct: masked CE is that voxel's CE (mean over the one correct voxel)."""
    rows = [(0.3, 1.2), (2.0, -0.5), (0.1, 0.4), (1.5, 0.2)]  # argmax 1, 0, 1, 0
    logits = torch.tensor(rows, dtype=torch.float64).T.reshape(1, 2, 1, 2, 2)
    labels = torch.tensor([1, 1, 0, 1]).reshape(1, 1, 1, 2, 2)  # only the first voxel is correct
    expected = -math.log(math.exp(1.2) / (math.exp(0.3) + math.exp(1.2)))
    assert LOSSES["masked_ce"](logits, labels).item() == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize(
    ("name", "kwargs"), [("dice_ce_monai", {}), ("dice_ce", {"squared_pred": True, "smooth_dr": 1e-6})]
)
def test_fused_dice_ce_with_a_nearly_absent_class_equals_monai(name, kwargs):
    """A class absent from the labels and given ~1e-3 probability: its Dice denominator is small, so the smoothing
    terms matter; value and input gradient still equal MONAI ``DiceCELoss``'s."""
    from monai.losses import DiceCELoss

    logits = torch.tensor([[2.0, 0.5, -1.0, 1.0], [0.0, 1.5, 0.3, -0.2], [-7.0, -6.5, -7.5, -7.0]], dtype=torch.float64)
    logits = logits.reshape(1, 3, 1, 2, 2).requires_grad_(True)
    labels = torch.tensor([0, 1, 1, 0]).reshape(1, 1, 1, 2, 2)  # class 2 absent
    smooth = {"smooth_nr": 0.0} if name == "dice_ce" else {}
    expected = DiceCELoss(to_onehot_y=True, softmax=True, **kwargs, **smooth)(logits, labels)
    value = LOSSES[name](logits, labels)
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(torch.autograd.grad(value, logits)[0], torch.autograd.grad(expected, logits)[0])


# pgd: the L2 random start ---------------------------------------------------------------------------------------


def test_l2_random_start_radius_uniform_in_ball_for_small_eps():
    """``pgd_l2``'s start is a direction at a radius uniform in ``[0, eps]`` per volume, also for ``eps < 1``.

    One-voxel volumes make the Gaussian direction's norm often below 1; the radii must still be uniform.
    """
    eps, n = 0.4, 4000
    images = torch.full((n, 1, 1, 1, 1), 0.5)
    labels = torch.zeros(n, 1, 1, 1, 1, dtype=torch.long)
    attack = ATTACKS.build({"name": "pgd_l2", "eps": eps, "step_size": 0.0, "steps": 1, "seed": 0, "loss": "ce"})
    radii = (attack(TwoClass(), images, labels) - images).flatten(1).norm(dim=1) / eps  # (n,)
    assert (radii <= 1 + 1e-5).all()
    assert abs(radii.mean().item() - 0.5) < 0.025  # uniform on [0, 1]: mean 1/2, standard error 0.0046
    assert abs((radii < 0.5).float().mean().item() - 0.5) < 0.04
    assert radii.max().item() > 0.95


@pytest.mark.parametrize(
    "cfg",
    [
        {"name": "pgd_l2", "eps": 0.5, "step_size": 0.1, "steps": 2},
        {"name": "apgd", "norm": "l2", "eps": 0.5, "steps": 2, "radius_reduction": False},
    ],
)
def test_l2_random_start_runs_a_half_precision_model(cfg):
    """An L2 attack with a random start attacks a bfloat16 model on bfloat16 volumes: every point it feeds the model
    stays bfloat16 (a float32 radius would promote the start, and a bfloat16 convolution rejects float32 input)."""
    images = torch.full((3, 1, 2, 2, 2), 0.5, dtype=torch.bfloat16)
    labels = torch.zeros(3, 1, 2, 2, 2, dtype=torch.long)
    net = nn.Conv3d(1, 2, 1).to(torch.bfloat16)
    out = ATTACKS.build({**cfg, "seed": 0, "loss": "ce"})(net, images, labels)
    assert out.dtype == torch.bfloat16
    assert (out != images).any()


@pytest.mark.parametrize(("norm", "eps", "size"), [("linf", 0.2, 4), ("l2", 1.0, 4), ("l2", 0.4, 1)])
def test_apgd_random_start_fills_its_ball(norm, eps, size):
    """APGD's first point: uniform in the L-inf box, or a Gaussian direction at a radius uniform in ``[0, eps]``
    (also at radius 1, and for one-voxel volumes whose Gaussian direction is often shorter than 1)."""
    images = torch.full((400, 1, size, size, size), 0.5)
    labels = torch.zeros(400, 1, size, size, size, dtype=torch.long)
    recording = Recording(TwoClass())
    cfg = {"name": "apgd", "norm": norm, "eps": eps, "steps": 1, "radius_reduction": False, "seed": 0}
    ATTACKS.build(cfg)(recording, images, labels)
    delta = recording.seen[0] - images
    if norm == "linf":
        assert delta.abs().max() <= eps + 1e-6
        assert abs((delta.abs() > eps / 2).float().mean().item() - 0.5) < 0.02  # uniform: half beyond eps / 2
        assert abs(delta.mean().item()) < 0.01
    else:
        radii = delta.flatten(1).norm(dim=1) / eps
        assert (radii <= 1 + 1e-5).all() and (radii > 0).all()
        assert abs(radii.mean().item() - 0.5) < 0.05 and (radii > 0.99).float().mean() < 0.05
        assert abs(radii.std().item() - 12**-0.5) < 0.03  # a radius of its own per volume


def test_apgd_stages_split_every_iteration():
    """Radius reduction splits all ``N`` iterations 30 / 30 / 40 %: stages of one iteration are kept."""
    from robustseg.attacks.apgd import stages

    assert stages(4, 0.1, True) == [(0.2, 1), (pytest.approx(0.15), 1), (0.1, 2)]  # int(0.3 * 4) = 1
    for steps in range(1, 25):
        assert sum(n for _, n in stages(steps, 0.1, True)) == steps


def test_apgd_cut_step_counts_only_strict_increases():
    """A plateau (loss unchanged step after step, e.g. an iterate stuck at a bound) raises nothing: the step is cut."""
    from robustseg.attacks.apgd import cut_step

    losses = torch.tensor([[0.0], [1.0], [1.0], [1.0], [1.0]])  # raised once in 4 steps, then flat
    cut = cut_step(losses, 0, 4, 0.75, torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([True]))
    assert cut.tolist() == [True]


class Threshold(nn.Module):
    """Per voxel, class 0 wins once ``x < 0.5 - c / 10``: logits ``(10 (0.5 - x) - c, 0)``; label 1 pushes x down.

    Voxels where ``blind`` is set ignore the input (zero gradient there)."""

    def __init__(self, c: float, blind: Tensor | None = None) -> None:
        super().__init__()
        self.c, self.blind = c, blind

    def forward(self, x: Tensor) -> Tensor:
        if self.blind is not None:
            x = torch.where(self.blind, torch.full_like(x, 0.5), x)
        return torch.cat([10 * (0.5 - x) - self.c, torch.zeros_like(x)], dim=1)


def test_pgd_sign_step_leaves_zero_gradient_voxels_alone():
    """FGSM: ``x + a sign(g)`` with ``sign(0) = 0``; voxels the model ignores do not move."""
    images = torch.full((1, 1, 1, 2, 3), 0.5)
    labels = torch.ones(1, 1, 1, 2, 3, dtype=torch.long)
    blind = torch.zeros(1, 1, 1, 2, 3, dtype=torch.bool)
    blind[..., 0, :] = True
    cfg = {"name": "pgd", "eps": 0.1, "step_size": 0.05, "steps": 1, "random_start": False, "loss": "ce"}
    out = ATTACKS.build(cfg)(Threshold(0.75, blind), images, labels)
    expected = torch.tensor([[0.5, 0.5, 0.5], [0.45, 0.45, 0.45]]).view(1, 1, 1, 2, 3)
    torch.testing.assert_close(out, expected)


def test_pgd_track_best_scores_the_last_iterate():
    """Two steps of 0.05 down from 0.5; only the last iterate (0.4) is flipped, so track_best returns it."""
    images = torch.full((2, 1, 1, 2, 2), 0.5)
    labels = torch.ones(2, 1, 1, 2, 2, dtype=torch.long)
    cfg = {"name": "pgd", "eps": 0.1, "step_size": 0.05, "steps": 2, "random_start": False, "loss": "ce"}
    out = ATTACKS.build({**cfg, "track_best": True})(Threshold(0.75), images, labels)
    torch.testing.assert_close(out, torch.full_like(images, 0.4))


def test_pgd_random_start_is_clamped_before_the_first_forward():
    """Volumes at the intensity bounds: every point the model sees, the start included, lies in ``[0, 1]``."""
    images = torch.cat([torch.zeros(1, 1, 2, 2, 2), torch.ones(1, 1, 2, 2, 2)])
    labels = torch.ones(2, 1, 2, 2, 2, dtype=torch.long)
    recording = Recording(TwoClass())
    ATTACKS.build({"name": "pgd", "eps": 0.3, "step_size": 0.0, "steps": 1, "seed": 0})(recording, images, labels)
    assert len(recording.seen) == 1
    start = recording.seen[0]
    assert start.min() >= 0 and start.max() <= 1
    assert start[0].max() > 0 and start[1].min() < 1  # the start did move inwards


def test_di_fgsm_track_best_with_transformed_inputs():
    """DI transforms every input (probability 1): tracking falls back to a plain forward at each iterate and returns
    a point no better for the model than the clean volume (the clean volume is the first point visited)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(1, 3, 3, padding=1), nn.Tanh(), nn.Conv3d(3, 3, 1))
    images = torch.rand(2, 1, 4, 4, 4)
    with torch.no_grad():
        labels = net(images).argmax(1, keepdim=True)
    cfg = {"name": "di_fgsm", "eps": 0.1, "steps": 3, "diversity_prob": 1.0, "track_best": True, "seed": 0}
    out = ATTACKS.build(cfg)(net, images, labels)
    with torch.no_grad():
        assert (foreground_dice(net(out), labels) <= foreground_dice(net(images), labels)).all()
    assert (out - images).abs().max() <= 0.1 + 1e-6


# best ------------------------------------------------------------------------------------------------------------


def test_best_tracker_done_only_at_dice_zero():
    """``done`` is True only once every volume is at foreground Dice 0, not at any Dice <= 1."""
    labels = torch.tensor([[1, 1, 0, 0]]).reshape(1, 1, 1, 1, 4)
    tracker = BestTracker(torch.zeros(1, 1, 1, 1, 4), labels)

    def logits_predicting(pred: list[int]) -> Tensor:
        return torch.nn.functional.one_hot(torch.tensor(pred), 2).T.reshape(1, 2, 1, 1, 4).float()

    score = tracker.update(torch.ones(1, 1, 1, 1, 4), logits_predicting([1, 0, 0, 0]))  # Dice 2 * 1 / (1 + 2)
    torch.testing.assert_close(score, torch.tensor([2 / 3]))
    assert not tracker.done()
    tracker.update(torch.ones(1, 1, 1, 1, 4), logits_predicting([0, 0, 1, 1]))  # no overlap: Dice 0
    assert tracker.done()


def test_foreground_dice_of_a_single_voxel_class():
    """A class of one labelled voxel, predicted nowhere: |P| + |G| = 1, Dice 0 (not the empty-class 1)."""
    labels = torch.tensor([0, 0, 1, 2]).reshape(1, 1, 1, 2, 2)
    pred = torch.tensor([0, 0, 2, 2])  # class 1 missed, class 2 found with one false positive: 2 / 3
    logits = F.one_hot(pred, 3).T.reshape(1, 3, 1, 2, 2).float()
    torch.testing.assert_close(foreground_dice(logits, labels), torch.tensor([(0 + 2 / 3) / 2]))


def test_output_recorder_reuses_only_the_recorded_input():
    """A fresh recorder remembers its first call; logits are reused for that very tensor only."""
    net = nn.Conv3d(1, 2, 1)
    recorder = OutputRecorder(net)
    x = torch.rand(1, 1, 2, 2, 2)
    assert recorder.logits_at(x) is None  # nothing recorded yet
    out = recorder(x)
    recorder(x + 1)  # later calls do not replace the first
    torch.testing.assert_close(recorder.logits_at(x), out.detach())
    assert recorder.logits_at(x.clone()) is None  # same shape and values, other storage: a different point
    assert recorder.logits_at(x.view(1, 1, 2, 4, 1)) is None  # same storage, other shape
