"""Model adapters: each checked against the equivalent plain network under autograd, on odd sizes."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from robustseg.external.adapters import AdaptedModel, IntensityMap, SpatialMap, observe_volume, region_scores


def plain_net(in_channels: int = 1, out: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv3d(in_channels, 6, 3, padding=1), nn.Tanh(), nn.Conv3d(6, out, 3, padding=1)).eval()


def input_grad(fn, x: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad((fn(x) * torch.linspace(-1, 1, fn(x).numel()).reshape(fn(x).shape)).sum(), x)
    return g


X = torch.rand(2, 1, 7, 9, 6, generator=torch.Generator().manual_seed(1))  # odd, unequal sizes


def test_affine_input_equals_plain_network_and_its_gradient():
    net = plain_net()
    adapted = AdaptedModel(net, 3, intensity=IntensityMap(425.0, -175.0))
    reference = lambda x: net(x * 425.0 - 175.0)  # noqa: E731  the model fed HU directly
    torch.testing.assert_close(adapted(X), reference(X))
    torch.testing.assert_close(input_grad(adapted, X), input_grad(reference, X))


def test_fixed_and_frozen_zscore_match_plain_network():
    net = plain_net()
    volume = torch.rand(1, 1, 11, 10, 9) * 3 + 1
    frozen = IntensityMap(2.0, 0.5, zscore="frozen")
    observe_volume(AdaptedModel(net, 3, intensity=frozen), volume)
    hu = volume * 2.0 + 0.5
    mean, std = hu.mean(), hu.std(unbiased=False)  # numpy's std, as nnU-Net
    reference = lambda x: net((x * 2.0 + 0.5 - mean) / std)  # noqa: E731
    adapted = AdaptedModel(net, 3, intensity=frozen)
    window = volume[..., :7, :9, :6]
    torch.testing.assert_close(adapted(window), reference(window), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(input_grad(adapted, window), input_grad(reference, window), rtol=1e-4, atol=1e-5)
    # adaptive: the statistics follow the attacked input, and the gradient flows through them too
    adaptive = AdaptedModel(net, 3, intensity=IntensityMap(2.0, 0.5, zscore="adaptive"))

    def ref_adaptive(x):
        y = x * 2.0 + 0.5
        return net((y - y.mean(dim=(2, 3, 4), keepdim=True)) / y.std(dim=(2, 3, 4), unbiased=False, keepdim=True))

    torch.testing.assert_close(adaptive(X), ref_adaptive(X), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(input_grad(adaptive, X), input_grad(ref_adaptive, X), rtol=1e-4, atol=1e-5)


def test_zscore_inside_nonzero_mask_leaves_zeros():
    x = torch.rand(1, 1, 5, 6, 7) + 0.5
    x[..., :2] = 0.0
    z = IntensityMap(zscore="adaptive", mask_nonzero=True)(x)
    inside = x[x != 0]
    torch.testing.assert_close(z[x != 0], (inside - inside.mean()) / inside.std(unbiased=False))
    assert torch.all(z[x == 0] == 0)


def test_axes_and_grid_round_trip_and_gradient():
    net = plain_net()
    spatial = SpatialMap(axes=(2, 0, 1), size=(8, 8, 8))
    adapted = AdaptedModel(net, 3, spatial=spatial)

    def reference(x):
        y = x.permute(0, 1, 4, 2, 3)  # model axis i = robustseg axis axes[i]
        y = nn.functional.interpolate(y, size=(8, 8, 8), mode="trilinear", align_corners=False)
        out = net(y)
        out = nn.functional.interpolate(out, size=(6, 7, 9), mode="trilinear", align_corners=False)
        return out.permute(0, 1, 3, 4, 2)

    assert adapted(X).shape == (2, 3, 7, 9, 6)
    torch.testing.assert_close(adapted(X), reference(X))
    torch.testing.assert_close(input_grad(adapted, X), input_grad(reference, X))


def test_mirror_tta_is_the_mean_over_all_flips():
    net = plain_net()
    adapted = AdaptedModel(net, 3, mirror_axes=(0, 2))

    def reference(x):
        outs = [net(x)]
        for dims in ((2,), (4,), (2, 4)):
            outs.append(torch.flip(net(torch.flip(x, dims)), dims))
        return torch.stack(outs).mean(0)

    torch.testing.assert_close(adapted(X), reference(X))
    torch.testing.assert_close(input_grad(adapted, X), input_grad(reference, X))
    assert not torch.allclose(adapted(X), net(X))  # the flips matter for this network


def test_probabilities_are_attacked_through_log_probabilities():
    net = plain_net()
    softmaxed = nn.Sequential(net, nn.Softmax(dim=1))
    adapted = AdaptedModel(softmaxed, 3, output="probabilities")
    torch.testing.assert_close(adapted(X).softmax(1), net(X).softmax(1), rtol=1e-5, atol=1e-6)
    # the loss the attack sees equals the one of the logits network: same input gradient (no second softmax)
    labels = torch.randint(0, 3, (2, 7, 9, 6), generator=torch.Generator().manual_seed(0))

    def loss(fn):
        return lambda x: nn.functional.cross_entropy(fn(x), labels)

    x = X.clone().requires_grad_(True)
    (g_adapted,) = torch.autograd.grad(loss(adapted)(x), x)
    (g_plain,) = torch.autograd.grad(loss(net)(x), x)
    torch.testing.assert_close(g_adapted, g_plain, rtol=1e-4, atol=1e-7)
    (g_twice,) = torch.autograd.grad(loss(softmaxed)(x), x)  # what attacking the raw output would do
    assert not torch.allclose(g_twice, g_plain, rtol=1e-2)


def nnunet_region_rule(probabilities: torch.Tensor, order: list[int]) -> torch.Tensor:
    """nnU-Net's rule, written plainly: later regions overwrite earlier ones where their probability > 0.5."""
    seg = torch.zeros(probabilities.shape[1:], dtype=torch.long)
    for r, label in enumerate(order):
        seg[probabilities[r] > 0.5] = label
    return seg


@pytest.mark.parametrize("order", [[1, 2, 3], [3, 1, 2], [2, 1]])
def test_region_scores_argmax_is_nnunets_region_rule(order):
    g = torch.Generator().manual_seed(len(order))
    logits = torch.randn(1, len(order), 6, 7, 5, generator=g) * 3
    scores = region_scores(logits, order, num_labels=max(order) + 1)
    expected = nnunet_region_rule(torch.sigmoid(logits[0]), order)
    assert torch.equal(scores.argmax(1)[0], expected)
    assert len(expected.unique()) > 2  # several labels present: the rule is really exercised
    try:
        from nnunetv2.utilities.label_handling.label_handling import LabelManager
    except ImportError:
        return
    labels = {"background": 0, **{f"r{r}": list(range(label, max(order) + 1)) for r, label in enumerate(order)}}
    manager = LabelManager(labels, regions_class_order=order)
    assert torch.equal(
        scores.argmax(1)[0], manager.convert_probabilities_to_segmentation(torch.sigmoid(logits[0])).long()
    )


def test_sigmoid_probability_outputs_give_the_same_scores():
    logits = torch.randn(1, 2, 4, 5, 3)
    net_logits = AdaptedModel(lambda_module(lambda x: logits), 3, output="regions", regions_class_order=[1, 2])
    net_probs = AdaptedModel(
        lambda_module(lambda x: torch.sigmoid(logits)),
        3,
        output="regions",
        regions_class_order=[1, 2],
        region_outputs="probabilities",
    )
    x = torch.rand(1, 1, 4, 5, 3)
    torch.testing.assert_close(net_logits(x), net_probs(x), rtol=1e-4, atol=1e-4)


class lambda_module(nn.Module):  # noqa: N801  a tiny test double
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def test_blocked_gradients_give_zero_gradients_not_a_crash():
    net = plain_net()
    blocked = AdaptedModel(lambda_module(lambda x: net(x).detach()), 3)
    x = X.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(blocked(x).sum(), x)
    assert torch.all(g == 0) and blocked.blocks_gradients
    with torch.no_grad():
        torch.testing.assert_close(blocked(X), net(X))


def test_in_channels_mismatch_is_named():
    with pytest.raises(ValueError, match="reads 2 input channel"):
        AdaptedModel(plain_net(2), 3, in_channels=2)(X)


def test_mode_follows_the_wrapped_network():
    net = plain_net()
    adapted = AdaptedModel(net, 3).train()
    assert net.training
    adapted.eval()
    assert not net.training and not adapted.training


def test_spatial_axes_must_be_a_permutation():
    with pytest.raises(ValueError, match="permutation"):
        SpatialMap(axes=(0, 0, 1))
    for axes in itertools.permutations(range(3)):
        y = SpatialMap(axes).from_model(SpatialMap(axes).to_model(X), X.shape[2:])
        assert torch.equal(y, X)


def test_budget_in_model_units():
    from robustseg.external import budget_in_units

    assert budget_in_units({"scale": [425.0], "unit": "HU"}, 8 / 255) == "13.33 HU"
    nnunet = {"scale": [5.0], "unit": "nnU-Net CTNormalization z-units", "hu_per_unit": 190.0}
    assert budget_in_units(nnunet, 8 / 255) == "0.1569 nnU-Net CTNormalization z-units (6.0 HU)"
    assert budget_in_units({"scale": None, "unit": "per volume"}, 8 / 255) is None
