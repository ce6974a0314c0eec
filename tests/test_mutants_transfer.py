"""Tests written from mutation-testing survivors of the transfer attacks (MI/DI/VMI-FGSM), CosPGD, SegPGD, GN and
the target rules; each checks behaviour against an independent expectation written plainly here (the paper's
formula in a hand-written loop, a hand computation, or a rule stated in the docstring), on inputs where a wrong
variant of the code gives a different answer: more than one class, odd sizes, voxels at the ends of [0, 1].
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import conv_net3d
from torch import Tensor, nn

from robustseg.attacks import ATTACKS
from robustseg.attacks import transfer as transfer_module
from robustseg.attacks.segpgd import segpgd_loss
from robustseg.attacks.targets import TARGETS, derive_target
from robustseg.errors import ConfigError

EPS, ALPHA = 8 / 255, 2 / 255


class Masked(nn.Module):
    """A net that only sees the voxels where ``mask`` is 1: the others have an input gradient of exactly 0."""

    def __init__(self, net: nn.Module, mask: Tensor) -> None:
        super().__init__()
        self.net, self.mask = net, mask

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x * self.mask)


def ce_grad(net: nn.Module, x: Tensor, labels: Tensor) -> Tensor:
    x = x.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(net(x), labels[:, 0]), x)
    return grad


def hand_foreground_dice(logits: Tensor, labels: Tensor) -> list[float]:
    """Per volume, the mean over classes 1..K-1 of 2|P & G| / (|P| + |G|); a class absent from both counts 1."""
    pred, gold, scores = logits.argmax(1), labels[:, 0], []
    for b in range(pred.shape[0]):
        per_class = []
        for c in range(1, logits.shape[1]):
            p, g = pred[b] == c, gold[b] == c
            total = int(p.sum() + g.sum())
            per_class.append(1.0 if total == 0 else 2 * int((p & g).sum()) / total)
        scores.append(sum(per_class) / len(per_class))
    return scores


def vmi_iterates(net: nn.Module, images: Tensor, labels: Tensor, steps: int, n: int, beta: float, seed: int):
    """Wang and He's VMI-FGSM (decay 1, CE) from a uniform random start in the eps-ball clipped to [0, 1]; the
    start and the neighbours r_i ~ U[-beta eps, beta eps] come from one generator seeded with ``seed``, in that
    order. Returns every iterate x_0 .. x_T."""
    gen = torch.Generator().manual_seed(seed)
    x = (images + torch.empty_like(images).uniform_(-EPS, EPS, generator=gen)).clamp(0, 1)
    g, v, iterates = torch.zeros_like(images), torch.zeros_like(images), [x]
    for _ in range(steps):
        grad = ce_grad(net, x, labels)
        tuned = grad + v
        g = g + tuned / tuned.abs().sum(dim=(1, 2, 3, 4), keepdim=True)
        samples = [torch.empty_like(x).uniform_(-beta * EPS, beta * EPS, generator=gen) for _ in range(n)]
        v = sum(ce_grad(net, x + r, labels) for r in samples) / n - grad
        x = torch.min(torch.max(x + ALPHA * g.sign(), images - EPS), images + EPS).clamp(0, 1)
        iterates.append(x)
    return iterates


@pytest.fixture
def saturated_batch() -> tuple[Tensor, Tensor]:
    """Two (1, 5, 6, 7) float64 volumes with about 30 % of the voxels exactly at 0 or 1 (a random start leaves
    [0, 1] there), labels of three classes."""
    g = torch.Generator().manual_seed(13)
    images = torch.rand(2, 1, 5, 6, 7, generator=g, dtype=torch.float64)
    images[images < 0.15] = 0.0
    images[images > 0.85] = 1.0
    labels = torch.randint(0, 3, (2, 1, 5, 6, 7), generator=g)
    return images, labels


VMI = {"name": "vmi_fgsm", "eps": EPS, "step_size": ALPHA, "steps": 4, "n_samples": 2, "beta": 1.5, "loss": "ce"}


def test_vmi_fgsm_random_start_matches_wang_and_he(saturated_batch):
    """With a random start the start point is clipped to [0, 1] before the first gradient; the start and the
    neighbours come from the seeded generator."""
    images, labels = saturated_batch
    net = conv_net3d(seed=1)
    expected = vmi_iterates(net, images, labels, 4, 2, 1.5, seed=13)[-1]
    attack = ATTACKS.build({**VMI, "random_start": True, "seed": 13})
    torch.testing.assert_close(attack(net, images, labels), expected, rtol=0, atol=1e-12)


def test_vmi_fgsm_track_best_returns_the_visited_point_with_the_lowest_dice(saturated_batch):
    """track_best: per volume the iterate x_0 .. x_T (the last one included) with the lowest foreground Dice,
    the earlier one on ties. Here volume 0 is best at an intermediate iterate and volume 1 at the last one."""
    images, labels = saturated_batch
    net = conv_net3d(seed=1)
    iterates = vmi_iterates(net, images, labels, 4, 2, 1.5, seed=13)
    with torch.no_grad():
        scores = torch.tensor([hand_foreground_dice(net(x), labels) for x in iterates])  # (T + 1, B)
    best = [min(range(len(iterates)), key=lambda t, b=b: (scores[t, b], t)) for b in range(2)]
    assert 0 < best[0] < len(iterates) - 1 and best[1] == len(iterates) - 1  # the case this test is about
    expected = torch.stack([iterates[best[b]][b] for b in range(2)])
    attack = ATTACKS.build({**VMI, "random_start": True, "seed": 13, "track_best": True})
    torch.testing.assert_close(attack(net, images, labels), expected, rtol=0, atol=1e-12)


def test_vmi_fgsm_track_best_costs_one_forward_more():
    """The contract: steps * (1 + n_samples) forwards, plus exactly one with track_best (the logits of the
    gradient passes are reused for scoring)."""
    calls = []
    net = nn.Conv3d(1, 3, 1)
    net.register_forward_hook(lambda *_: calls.append(1))
    images = torch.rand(2, 1, 5, 4, 3, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 3, (2, 1, 5, 4, 3), generator=torch.Generator().manual_seed(1))
    ATTACKS.build({"name": "vmi_fgsm", "steps": 3, "n_samples": 2, "seed": 0, "track_best": True})(net, images, labels)
    assert len(calls) == 3 * (1 + 2) + 1


@pytest.mark.parametrize("extra", [{"name": "mi_fgsm"}, {"name": "vmi_fgsm", "n_samples": 2}])
def test_voxels_with_zero_gradient_are_not_moved(extra):
    """A sign step moves a voxel by step_size * sign(g), and sign(0) = 0: voxels the model never sees stay put."""
    g = torch.Generator().manual_seed(4)
    images = torch.rand(2, 1, 5, 6, 7, generator=g, dtype=torch.float64) * 0.8 + 0.1
    labels = torch.randint(0, 3, (2, 1, 5, 6, 7), generator=g)
    mask = torch.ones_like(images)
    mask[..., 2:4, :] = 0.0
    attack = ATTACKS.build({**extra, "eps": EPS, "step_size": ALPHA, "steps": 3, "seed": 0})
    moved = attack(Masked(conv_net3d(seed=0), mask), images, labels) - images
    assert torch.equal(moved[mask == 0], torch.zeros_like(moved[mask == 0]))
    assert moved[mask == 1].abs().max() > 0  # the seen voxels do move


def test_mi_fgsm_normalises_each_volume_by_its_own_gradient():
    """Dong et al. divide each example's gradient by its own L1 norm, so a volume's result does not depend on the
    other volumes of its batch; here volume 1 is nearly flat, with a gradient scale unlike volume 0's."""
    g = torch.Generator().manual_seed(1)
    images = torch.rand(2, 1, 5, 6, 7, generator=g, dtype=torch.float64)
    images[1] = images[1] * 0.02 + 0.5
    labels = torch.randint(0, 3, (2, 1, 5, 6, 7), generator=g)
    net = conv_net3d(seed=1)
    attack = ATTACKS.build({"name": "mi_fgsm", "eps": EPS, "step_size": ALPHA, "steps": 6, "decay": 1.0, "loss": "ce"})
    alone = torch.cat([attack(net, images[i : i + 1], labels[i : i + 1]) for i in range(2)])
    torch.testing.assert_close(attack(net, images, labels), alone, rtol=0, atol=1e-12)


def test_input_diversity_draws_every_random_number_from_the_generator():
    """Same generator state, same transform: the apply decision, the scale and the offsets all come from the given
    generator (u_0 < p applies; s = r + (1 - r) u_1; offset int(u_i (n - m + 1))), never from the global RNG."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 1, 9, 10, 7, generator=g, dtype=torch.float64)
    net = conv_net3d(seed=2)
    twin = torch.Generator().manual_seed(11)
    u = [float(torch.rand((), generator=twin)) for _ in range(5)]
    assert u[0] < 0.9  # the transform applies for this seed
    scale = 0.6 + 0.4 * u[1]
    small = [max(1, min(n, round(n * scale))) for n in (9, 10, 7)]
    offsets = [int(ui * (n - m + 1)) for ui, n, m in zip(u[2:], (9, 10, 7), small)]
    region = tuple(slice(o, o + m) for o, m in zip(offsets, small))
    canvas = torch.zeros_like(x)
    canvas[(slice(None), slice(None), *region)] = F.interpolate(x, size=small, mode="trilinear", align_corners=False)
    with torch.no_grad():
        placed = net(canvas)[(slice(None), slice(None), *region)]
        expected = F.interpolate(placed, size=(9, 10, 7), mode="trilinear", align_corners=False)
        torch.manual_seed(12345)  # the global RNG is in some other state
        got = transfer_module.diverse_logits(net, x, torch.Generator().manual_seed(11), 0.6, 0.9)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_segpgd_loss_is_exact_in_float64():
    """sum[(1 - lam) CE on correct + lam CE on wrong voxels] / N by hand, in float64, with lam = 1/3 (not a float32
    number): the weights keep the logits' precision."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 3, 4, 5, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 3, (2, 1, 3, 4, 5), generator=g)
    ce = -logits.log_softmax(dim=1).gather(1, labels)[:, 0]  # (B, D, H, W)
    correct = (logits.argmax(dim=1) == labels[:, 0]).double()
    assert 0 < correct.sum() < correct.numel()  # both kinds of voxel present
    lam = 1 / 3
    untargeted = ((1 - lam) * correct * ce + lam * (1 - correct) * ce).sum() / ce.numel()
    targeted = ((1 - lam) * (1 - correct) * ce + lam * correct * ce).sum() / ce.numel()
    torch.testing.assert_close(segpgd_loss(logits, labels, lam), untargeted, rtol=1e-14, atol=0)
    torch.testing.assert_close(segpgd_loss(logits, labels, lam, targeted=True), targeted, rtol=1e-14, atol=0)


def test_gn_with_sigma_one_adds_noise():
    """sigma = 1 (allowed with allow_large_budget) is x + N(0, 1), clipped: only sigma = 0 returns the input."""
    images = torch.full((1, 1, 3, 4, 5), 0.5, dtype=torch.float64)
    gn = ATTACKS.build({"name": "gn", "sigma": 1, "allow_large_budget": True, "seed": 7})
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    torch.testing.assert_close(gn(nn.Identity(), images, images.long()), (images + noise).clamp(0, 1))


def test_transfer_config_errors_name_the_attack_and_field():
    """A bad value is reported as ``<Attack>.<field>``, so the config line to fix is named."""
    for cfg, where in [
        ({"name": "vmi_fgsm", "n_samples": 0}, "VMIFGSM.n_samples"),
        ({"name": "vmi_fgsm", "beta": -1}, "VMIFGSM.beta"),
        ({"name": "di_fgsm", "resize_rate": 0.0}, "DIFGSM.resize_rate"),
        ({"name": "di_fgsm", "diversity_prob": 1.5}, "DIFGSM.diversity_prob"),
        ({"name": "mi_fgsm", "decay": -0.5}, "MIFGSM.decay"),
    ]:
        with pytest.raises(ConfigError, match=where.replace(".", r"\.")):
            ATTACKS.build(cfg)


def test_transfer_fraction_budgets_are_parsed():
    """beta and decay accept fraction strings like other budgets and are stored as floats."""
    vmi = ATTACKS.build({"name": "vmi_fgsm", "beta": "3/2", "decay": "1/2"})
    assert vmi.beta == 1.5 and isinstance(vmi.beta, float)
    assert vmi.decay == 0.5 and isinstance(vmi.decay, float)


def test_derive_target_names_a_rule_that_returns_the_truth(monkeypatch):
    """A user-added rule that maps the labels to themselves is refused, naming the rule."""
    monkeypatch.setitem(TARGETS, "identity", lambda labels, num_classes: labels.clone())
    labels = torch.tensor([0, 1, 2]).view(1, 1, 1, 1, 3)
    with pytest.raises(ValueError, match="target rule 'identity'"):
        derive_target("identity", labels, 3)
