from __future__ import annotations

import pytest
import torch

from robustseg.models import MODELS, TINY


def test_every_model_has_a_tiny_setting():
    assert set(TINY) == set(MODELS.names())


@pytest.mark.parametrize("name", sorted(TINY))
def test_forward_backward_shape(name):
    torch.manual_seed(0)
    net = MODELS.build({"name": name, "in_channels": 1, "out_channels": 3, **TINY[name]})
    x = torch.rand(2, 1, 32, 32, 32, requires_grad=True)
    y = net(x)
    assert y.shape == (2, 3, 32, 32, 32)
    y.square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


# Parameter counts (millions) of the paper-size builds with 14 output classes (BTCV). Published: UNETR 92.6M
# (Hatamizadeh et al., WACV 2022: 92.58M), SwinUNETR 62.2M (Hatamizadeh et al., 2022: 62.19M); MONAI's UNet
# and SegResNet at the papers' settings: 4.8M and 18.8M.
PAPER_PARAMS = {"unet": 4.8, "segresnet": 18.8, "unetr": 92.6, "swin_unetr": 62.2}


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_paper_size_parameter_count(name):
    net = MODELS.build({"name": name, "in_channels": 1, "out_channels": 14})
    millions = sum(p.numel() for p in net.parameters()) / 1e6
    assert millions == pytest.approx(PAPER_PARAMS[name], rel=0.03)


def test_builders_reject_illegal_sizes():
    with pytest.raises(ValueError, match="multiple of 8"):
        MODELS.build({"name": "segresnet", "init_filters": 12})
    with pytest.raises(ValueError, match="multiples of the 16"):
        MODELS.build({"name": "unetr", "img_size": (40, 40, 40)})
    with pytest.raises(ValueError, match="one entry fewer"):
        MODELS.build({"name": "unet", "channels": (4, 8), "strides": (2, 2)})
