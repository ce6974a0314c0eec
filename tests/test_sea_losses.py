"""SEA's losses against hand-computed values (plain per-voxel arithmetic written here, not the library's)."""

from __future__ import annotations

import math

import pytest
import torch

from robustseg.attacks import ATTACKS, LOSSES
from robustseg.attacks.sea_losses import balanced_weights
from robustseg.errors import ConfigError

# three voxels of one volume, two classes: a correct (label 0), b wrong (label 0, predicted 1), c correct (label 1)
ROWS = [(2.0, 1.0), (0.0, 1.0), (1.0, 3.0)]
LABELS = [0, 0, 1]


def example() -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.tensor(ROWS).T.reshape(1, 2, 1, 1, 3)  # (B, K, D, H, W)
    labels = torch.tensor(LABELS).reshape(1, 1, 1, 1, 3)
    return logits, labels


def softmax(row):
    e = [math.exp(v) for v in row]
    return [v / sum(e) for v in e]


def ce(row, y):
    return -math.log(softmax(row)[y])


def correct(row, y):
    return max(range(len(row)), key=lambda k: row[k]) == y


def test_masked_ce_hand():
    logits, labels = example()
    terms = [ce(r, y) for r, y in zip(ROWS, LABELS) if correct(r, y)]
    assert LOSSES["masked_ce"](logits, labels).item() == pytest.approx(sum(terms) / len(terms), rel=1e-6)


def test_balanced_weights_hand():
    # two voxels of class 0, one of class 1: inverse frequencies 1/2, 1 -> normalised 1/3, 2/3; class 2 absent
    _, labels = example()
    torch.testing.assert_close(balanced_weights(labels, 3), torch.tensor([[1 / 3, 2 / 3, 0.0]]))


def test_masked_balanced_ce_hand():
    logits, labels = example()
    weight = {0: 1 / 3, 1: 2 / 3}
    expected = sum(weight[y] * ce(r, y) for r, y in zip(ROWS, LABELS) if correct(r, y)) / 3  # mean over 3 voxels
    assert LOSSES["masked_balanced_ce"](logits, labels).item() == pytest.approx(expected, rel=1e-6)


def test_jensen_shannon_hand():
    logits, labels = example()
    expected = 0.0
    for row, y in zip(ROWS, LABELS):
        p = softmax(row)
        q = [1.0 if k == y else 0.0 for k in range(2)]
        m = [(a + b) / 2 for a, b in zip(p, q)]
        kl_pm = sum(a * math.log(a / c) for a, c in zip(p, m) if a > 0)
        kl_qm = sum(b * math.log(b / c) for b, c in zip(q, m) if b > 0)
        expected += (kl_pm + kl_qm) / 2 / 3
    assert LOSSES["js"](logits, labels).item() == pytest.approx(expected, rel=1e-6)


def test_js_is_bounded_by_log2():
    logits = torch.tensor([[-50.0], [50.0]]).reshape(1, 2, 1, 1, 1)  # confidently wrong
    assert LOSSES["js"](logits, torch.zeros(1, 1, 1, 1, 1, dtype=torch.long)).item() == pytest.approx(math.log(2))


def test_masked_spherical_hand():
    logits, labels = example()
    terms = [-r[y] / math.hypot(*r) if correct(r, y) else 0.0 for r, y in zip(ROWS, LABELS)]
    assert LOSSES["masked_spherical"](logits, labels).item() == pytest.approx(sum(terms) / 3, rel=1e-6)


@pytest.mark.parametrize("name", ["masked_balanced_ce", "js", "masked_spherical"])
def test_per_volume_mean_over_a_batch(name):
    """Each volume's voxel mean, then the batch mean; the mask carries no gradient (wrong voxels get none)."""
    logits, labels = example()
    batch = torch.cat([logits, logits.flip(-1)]).requires_grad_(True)
    both = torch.cat([labels, labels.flip(-1)])
    value = LOSSES[name](batch, both)
    assert value.item() == pytest.approx(LOSSES[name](logits, labels).item(), rel=1e-6)
    (grad,) = torch.autograd.grad(value, batch)
    if name.startswith("masked"):
        assert torch.all(grad[0, :, 0, 0, 1] == 0), "a wrongly predicted voxel must not pull"


@pytest.mark.parametrize("loss", ["masked_balanced_ce", "masked_spherical"])
def test_masked_losses_are_untargeted_only(loss):
    with pytest.raises(ConfigError, match="untargeted"):
        ATTACKS.build({"name": "pgd", "loss": loss, "targeted": True})
    ATTACKS.build({"name": "pgd", "loss": "js", "targeted": True})  # JS to a target map is meaningful
