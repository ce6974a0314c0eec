"""Tests written from mutation-testing survivors of apgd.py (continued from ``test_mutants_pgd.py``).

APGD's whole loop against a plain one-volume reference written from the rules of Croce and Hein (2020) and SEA,
and its pass count at foreground Dice 0: each checks behaviour against an independent expectation.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import Recording
from torch import Tensor, nn

from robustseg.attacks import ATTACKS, LOSSES
from robustseg.attacks.best import foreground_dice

# apgd: the whole loop against a plain one-volume reference --------------------------------------------------------


def reference_apgd(net, image, label, eps, steps, norm, reduce=True, loss="masked_ce", rho=0.75, momentum=0.75):
    """APGD on ONE volume ``(1, C, D, H, W)`` from the rules of Croce and Hein (2020) and SEA, with scalar state.

    No random start; with ``reduce``, radius reduction 30 / 30 / 40 % over ``2 eps, 1.5 eps, eps``. Returns the
    points fed to the model in order, and the lowest-foreground-Dice point of the final ball (the first on ties).
    """
    n1 = int(0.3 * steps) if reduce else 0
    plan = [(r, n) for r, n in ((2 * eps, n1), (1.5 * eps, n1)) if n > 0] + [(eps, steps - 2 * n1)]
    seen = []

    def project(z, r):
        d = z - image
        if norm == "linf":
            d = d.clamp(-r, r)
        elif d.norm().item() > r:
            d = d * (r / d.norm().item())
        return (image + d).clamp(0, 1)

    def forward(x, with_grad):
        seen.append(x.detach().clone())
        x = x.detach().requires_grad_(True)
        logits = net(x)
        ce = F.cross_entropy(logits, label[:, 0]).item()  # the tracked loss: plain voxel-mean CE
        dice = foreground_dice(logits.detach(), label).item()
        grad = torch.autograd.grad(LOSSES[loss](logits, label), x)[0] if with_grad else None
        return ce, dice, grad

    x = image.clone()
    for r, n in plan:
        x = project(x, r)
        ce, dice, g = forward(x, True)
        best_point, best_dice = x, dice
        marks, interval, at = set(), max(int(0.22 * n), 1), 0  # checkpoints: 0.22 n, then 0.03 n shorter, >= 0.06 n
        while at + interval <= n:
            at += interval
            marks.add(at)
            interval = max(interval - max(int(0.03 * n), 1), max(int(0.06 * n), 1))
        step, x_max, ce_max, g_max = 2 * r, x, ce, g
        history, previous, max_at_last, cut_at_last, x_old = [ce], 0, ce, True, x
        for i in range(n):
            a = momentum if i > 0 else 1.0
            u = g.sign() if norm == "linf" else g / g.norm()
            z = project(x + step * u, r)
            x, x_old = project(x + a * (z - x) + (1 - a) * (x - x_old), r), x
            final = i == n - 1
            ce, dice, g_new = forward(x, not final)
            if dice < best_dice:
                best_point, best_dice = x, dice
            history.append(ce)
            if ce > ce_max:
                x_max, ce_max, g_max = x, ce, g_new
            if g_new is not None:
                g = g_new
            if i + 1 in marks and not final:
                raised = sum(history[j + 1] > history[j] for j in range(previous, i + 1))
                cut = raised < rho * (i + 1 - previous) or (not cut_at_last and max_at_last >= ce_max)
                if cut:
                    step, x, g = step / 2, x_max, g_max
                previous, max_at_last, cut_at_last = i + 1, ce_max, cut
        x = best_point
    return seen, x


@pytest.mark.parametrize(
    ("norm", "eps", "steps", "reduce"),
    [("linf", 0.06, 40, True), ("l2", 0.4, 40, True), ("linf", 0.04, 30, False), ("linf", 0.06, 4, True)],
)
def test_apgd_matches_a_plain_reference_volume_by_volume(norm, eps, steps, reduce):
    """Every point APGD feeds the model, and the point it returns, equal the reference's for each volume alone."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.Tanh(), nn.Conv3d(4, 3, 3, padding=1)).double()
    images = torch.rand(2, 1, 4, 3, 3, dtype=torch.float64)
    images[1] = images[1] * 0.5 + 0.5  # two different volumes, one near the upper bound
    with torch.no_grad():
        labels = net(images).argmax(1, keepdim=True)
    labels[0, 0, 0] = 2  # a voxel of volume 0 wrong from the start
    cfg = {"name": "apgd", "eps": eps, "norm": norm, "steps": steps, "radius_reduction": reduce, "random_start": False}
    attack = ATTACKS.build(cfg)
    recording = Recording(net)
    adversarial = attack(recording, images, labels)
    for b in range(2):
        seen, point = reference_apgd(net, images[b : b + 1], labels[b : b + 1], eps, steps, norm, reduce)
        assert len(seen) == len(recording.seen) == steps + (3 if reduce else 1)
        for t, expected in enumerate(seen):
            torch.testing.assert_close(recording.seen[t][b : b + 1], expected, msg=f"volume {b}, forward {t}")
        torch.testing.assert_close(adversarial[b : b + 1], point)
    # without track_best: the last iterate, i.e. the last point fed to the model
    recording = Recording(net)
    last = ATTACKS.build({**cfg, "track_best": False})(recording, images, labels)
    torch.testing.assert_close(last, recording.seen[-1])
    for b in range(2):
        seen, _ = reference_apgd(net, images[b : b + 1], labels[b : b + 1], eps, steps, norm, reduce)
        torch.testing.assert_close(last[b : b + 1], seen[-1])


class Background(nn.Module):
    """Predicts class 0 everywhere (foreground Dice 0 against any foreground label), from any number of channels."""

    def forward(self, x: Tensor) -> Tensor:
        s = 0.01 * x.sum(dim=1, keepdim=True)
        return torch.cat([1 + s, s], dim=1)


@pytest.mark.parametrize("early_stop", [False, True])
def test_apgd_forwards_at_dice_zero_follow_early_stop(early_stop):
    """At foreground Dice 0 from the start, ``early_stop`` stops each stage after its start point; without it all
    ``steps + stages`` forwards run. Multi-channel volumes (C = 2, B = 3) keep per-volume steps."""
    images = torch.rand(3, 2, 3, 2, 2)
    labels = torch.ones(3, 1, 3, 2, 2, dtype=torch.long)
    recording = Recording(Background())
    cfg = {"name": "apgd", "eps": 0.05, "steps": 10, "seed": 0, "early_stop": early_stop}
    out = ATTACKS.build(cfg)(recording, images, labels)
    assert len(recording.seen) == (3 if early_stop else 13)
    assert (out - images).abs().max() <= 0.05 + 1e-6
