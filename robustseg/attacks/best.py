"""Best-point tracking: keep, per volume, the visited point with the lowest foreground Dice.

An iterative attack's last iterate is not its most damaging point (Croce et al., ECCV 2024: SEA returns the
point with the lowest score, not the highest loss). :class:`BestTracker` scores every point the attack already
ran a forward pass on (the logits are reused, so tracking costs no extra pass except for the final iterate) and
returns the best per volume of the batch.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from robustseg.attacks.sea_losses import predicted


def foreground_dice(logits: Tensor, labels: Tensor) -> Tensor:
    """Hard foreground Dice per volume ``(B,)``: the mean over classes ``1..K-1`` of ``2|P_k & G_k| / (|P_k| + |G_k|)``.

    ``P_k`` is the argmax prediction of ``logits`` ``(B, K, D, H, W)``, ``G_k`` the labels ``(B, 1, D, H, W)``. A
    class empty in both counts as 1, one empty in only one of them as 0 (the policy of
    :func:`robustseg.evaluation.metrics.dice_per_class`).
    """
    bs, k = logits.shape[:2]
    pred = predicted(logits).flatten(1)  # (B, V)
    gold = labels[:, 0].flatten(1).to(pred.device).long()  # (B, V)
    offset = torch.arange(bs, device=pred.device)[:, None] * k  # class c of volume b -> bin b K + c

    def per_class(index: Tensor, weights: Tensor | None = None) -> Tensor:
        counts = torch.bincount((index + offset).flatten(), weights=weights, minlength=bs * k)
        return counts.view(bs, k)[:, 1:].float()  # (B, K - 1)

    inter = per_class(gold, (pred == gold).flatten().float())
    denominator = per_class(pred) + per_class(gold)
    dice = torch.where(denominator > 0, 2 * inter / denominator.clamp_min(1), torch.ones_like(denominator))
    return dice.mean(dim=1)


class BestTracker:
    """The point with the lowest :func:`foreground_dice` per volume among those offered to :meth:`update`.

    Ties keep the earlier point. ``best`` is ``(B, C, D, H, W)``, ``score`` ``(B,)``.
    """

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        self.labels = labels
        self.best = images.detach().clone()
        self.score = torch.full((images.shape[0],), float("inf"), device=images.device)

    def update(self, x: Tensor, logits: Tensor) -> Tensor:
        """Offer ``x`` ``(B, C, D, H, W)`` whose model output is ``logits``; returns its scores ``(B,)``."""
        score = foreground_dice(logits, self.labels).to(self.score.device)
        better = score < self.score  # (B,)
        if better.any():
            self.best[better] = x.detach()[better]
            self.score = torch.where(better, score, self.score)
        return score

    def done(self) -> bool:
        """True when every volume is at foreground Dice 0: no later point can be better."""
        return bool((self.score <= 0).all())


class OutputRecorder(nn.Module):
    """Wraps a model and remembers the input and detached output of its first call since :meth:`reset`.

    Lets a gradient attack reuse the logits of the pass it already ran at ``x`` for tracking: :meth:`logits_at`
    returns them when that first call was on ``x`` itself (same storage and shape), else ``None`` (input
    diversity transforms the input first; the caller then runs a plain forward).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self._input: Tensor | None = None
        self._output: Tensor | None = None
        self.train(model.training)

    def reset(self) -> None:
        self._input = self._output = None

    def forward(self, x: Tensor) -> Tensor:
        out = self.model(x)
        if self._input is None:
            self._input, self._output = x, out.detach()
        return out

    def logits_at(self, x: Tensor) -> Tensor | None:
        first = self._input
        if first is not None and first.data_ptr() == x.data_ptr() and first.shape == x.shape:
            return self._output
        return None


def track(tracker: BestTracker | None, recorder: OutputRecorder | None, model: nn.Module, x: Tensor) -> None:
    """Offer ``x`` to ``tracker`` with the recorded logits at ``x``, or a fresh no-grad forward when none."""
    if tracker is None:
        return
    logits = recorder.logits_at(x) if recorder is not None else None
    if logits is None:
        with torch.no_grad():
            logits = model(x)
    tracker.update(x, logits)


__all__ = ["BestTracker", "OutputRecorder", "foreground_dice", "track"]
