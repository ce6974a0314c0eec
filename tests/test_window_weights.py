"""A model's own window blending weights (nnU-Net's Gaussian) are used by scoring and by the pipeline attack alike."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from monai.inferers import sliding_window_inference
from torch import nn

from robustseg.attacks.volume import SlidingWindowModel
from robustseg.evaluation.scoring import PassCounter, SlidingWindow, predict


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.Tanh(), nn.Conv3d(4, 3, 3, padding=1)).eval()


def _weights(roi: tuple[int, int, int]) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.rand(roi, generator=g) + 0.05  # (rd, rh, rw): far from MONAI's Gaussian


def test_scoring_uses_the_models_window_weights():
    net, roi = _net(), (8, 8, 8)
    image = torch.rand(1, 1, 13, 11, 17)
    model = SimpleNamespace(roi_size=roi, extra={"sliding_window": {"roi_weight_map": _weights(roi)}})
    window = SlidingWindow(overlap=0.5, sw_batch_size=2, blend_mode="gaussian", roi_size=None)
    got = predict(window, model, PassCounter(net), image)
    want = sliding_window_inference(image, roi, 2, net, 0.5, mode="gaussian", roi_weight_map=_weights(roi))
    plain = sliding_window_inference(image, roi, 2, net, 0.5, mode="gaussian")
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, plain)  # the weights matter on this input


def test_pipeline_gradient_uses_the_models_window_weights():
    net, roi = _net(), (8, 8, 8)
    image = torch.rand(1, 1, 13, 11, 17)
    upstream = torch.randn(1, 3, 13, 11, 17)
    x = image.clone().requires_grad_(True)
    out = sliding_window_inference(x, roi, 2, net, 0.5, mode="gaussian", roi_weight_map=_weights(roi))
    (want,) = torch.autograd.grad(out, x, upstream)
    for bounded in (False, True):
        model = SlidingWindowModel(net, roi, overlap=0.5, memory_bounded=bounded, roi_weight_map=_weights(roi))
        x = image.clone().requires_grad_(True)
        (got,) = torch.autograd.grad(model(x), x, upstream)
        torch.testing.assert_close(got, want)
