"""APGD for volumetric segmentation: step-size control by checkpoints, momentum, radius reduction, best point.

Auto-PGD (Croce and Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks", ICML 2020) as adapted to segmentation by SEA (Croce, Singh, Hein, "Towards Reliable
Evaluation and Fast Training of Robust Semantic Segmentation Models", ECCV 2024). The rules, from
``shared/design/RELIABLE_EVAL.md``:

* random start uniform in the ball (clamped to ``[0, 1]``), initial step ``2 * radius``;
* momentum: ``z = P(x_k + eta * sign(g))``, ``x_{k+1} = P(x_k + a (z - x_k) + (1 - a)(x_k - x_{k-1}))`` with
  ``a = momentum`` (1 on the first step); ``P`` projects onto the ball and ``[0, 1]``; L2 steps along ``g / ||g||``;
* checkpoints (:func:`checkpoints`): the first after ``0.22 N`` iterations, each later interval shorter by
  ``0.03 N``, at least ``0.06 N``. At a checkpoint the step of a volume is halved (:func:`cut_step`) if fewer
  than ``rho`` of the steps since the last checkpoint raised the tracked loss, or if its best tracked loss did not
  improve since the last checkpoint and its step was not cut there; on a cut the volume restarts from its point
  of highest tracked loss and that point's gradient;
* the tracked loss is the plain voxel-mean CE per volume, whatever loss gives the gradient;
* radius reduction: the ``N`` iterations split 30 / 30 / 40 % over radii ``2 eps, 1.5 eps, eps``
  (:func:`stages`), each stage warm-started from the previous stage's lowest-Dice point projected on its ball;
* the point returned (``track_best``) is the one with the lowest foreground Dice per volume in the final ball.

Passes: a stage of ``n`` iterations runs ``n + 1`` forwards (its start point and every iterate) and ``n``
backwards, so a call runs ``steps + stages`` forwards, fewer only with ``early_stop`` when every volume of the
batch is at foreground Dice 0 (then nothing can improve). ``early_stop`` makes the count data-dependent: keep it
off for adversarial training under DDP.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustseg.attacks.base import Attack, check_positive_int, make_generator, set_budgets
from robustseg.attacks.best import BestTracker
from robustseg.attacks.losses import LOSSES, check_loss
from robustseg.errors import ConfigError
from robustseg.registry import ATTACKS

NORMS = ("linf", "l2")
RADII = (2.0, 1.5, 1.0)  # radius reduction: multiples of eps
FRACTIONS = (0.3, 0.3)  # iterations of the first two stages; the last takes the rest


def checkpoints(n: int) -> list[int]:
    """Iteration counts ``w_1 < w_2 < ... <= n`` after which the step size is checked (Croce and Hein, 2020).

    First interval ``max(int(0.22 n), 1)``; each next one shorter by ``max(int(0.03 n), 1)``, never below
    ``max(int(0.06 n), 1)``.
    """
    interval, decrement, minimum = max(int(0.22 * n), 1), max(int(0.03 * n), 1), max(int(0.06 * n), 1)
    out: list[int] = []
    at = interval
    while at <= n:
        out.append(at)
        interval = max(interval - decrement, minimum)
        at += interval
    return out


def stages(steps: int, eps: float, radius_reduction: bool) -> list[tuple[float, int]]:
    """``(radius, iterations)`` per stage: ``[(eps, steps)]``, or ``2 eps, 1.5 eps, eps`` over 30 / 30 / 40 %.

    Reduction stages that would get no iteration are dropped; the final ``eps`` stage is always there.
    """
    if not radius_reduction:
        return [(eps, steps)]
    counts = [int(f * steps) for f in FRACTIONS]
    counts.append(steps - sum(counts))
    return [(r * eps, n) for r, n in zip(RADII, counts) if n > 0 or r == RADII[-1]]


def cut_step(
    losses: Tensor, start: int, end: int, rho: float, best: Tensor, best_at_last: Tensor, cut_at_last: Tensor
) -> Tensor:
    """Which volumes ``(B,)`` halve their step at the checkpoint after iteration ``end``.

    Args:
        losses: tracked loss history ``(n + 1, B)``: row 0 at the stage's start point, row ``i`` after iteration i.
        start: iteration count at the previous checkpoint (0 at the stage start).
        end: iteration count at this checkpoint.
        rho: the fraction of the ``end - start`` steps that must have raised the loss to keep the step.
        best, best_at_last: best tracked loss now and at the previous checkpoint ``(B,)``.
        cut_at_last: whether the step was cut at the previous checkpoint ``(B,)`` (True at the stage start).
    """
    raised = (losses[start + 1 : end + 1] > losses[start:end]).sum(dim=0)  # (B,)
    oscillating = raised < rho * (end - start)
    return oscillating | (~cut_at_last & (best_at_last >= best))


def tracked_ce(logits: Tensor, labels: Tensor) -> Tensor:
    """The loss the step control watches: plain voxel-mean CE per volume ``(B,)``, no gradient."""
    return F.cross_entropy(logits.detach(), labels[:, 0], reduction="none").flatten(1).mean(dim=1)


def _per_volume(value: Tensor) -> Tensor:
    return value.view(-1, 1, 1, 1, 1)  # (B,) -> (B, 1, 1, 1, 1)


@ATTACKS.register("apgd")
@dataclass(frozen=True)
class APGD(Attack):
    """APGD with SEA's segmentation losses, radius reduction and best-point return (module docstring).

    Args:
        eps: budget in ``[0, 1]`` intensity units (L-inf), or the L2 radius of one volume ``(C, D, H, W)``.
        norm: ``linf`` or ``l2``.
        steps: iterations ``N`` over all stages (``steps + stages`` forwards, see the module docstring).
        loss: key into ``LOSSES`` giving the gradient (SEA: ``masked_ce``, ``masked_balanced_ce``, ``js``).
        radius_reduction: run 30 / 30 / 40 % of the iterations at ``2 eps``, ``1.5 eps``, ``eps``.
        track_best: return the lowest-foreground-Dice point of the final ball (else the last iterate).
        early_stop: stop a stage once every volume of the batch is at foreground Dice 0.
        rho: checkpoint threshold on the fraction of loss-raising steps (0.75).
        momentum: weight ``a`` of the new step against the previous one (0.75).
        random_start: start uniformly in the first ball (L2: a Gaussian direction at a uniform radius).
        seed: seed of the random start; ``None`` follows the global torch RNG.

    Untargeted only. Input ``(B, C, D, H, W)``, labels ``(B, 1, D, H, W)``; each volume has its own step size,
    checkpoint decisions and best point.
    """

    eps: float = 8 / 255
    norm: str = "linf"
    steps: int = 100
    loss: str = "masked_ce"
    radius_reduction: bool = True
    track_best: bool = True
    early_stop: bool = False
    rho: float = 0.75
    momentum: float = 0.75
    random_start: bool = True
    seed: int | None = None

    def __post_init__(self) -> None:
        name = type(self).__name__
        set_budgets(self, "eps", "rho", "momentum")
        check_positive_int(self.steps, "steps", name)
        check_loss(self.loss, name)
        if self.norm not in NORMS:
            raise ConfigError(f"{name}.norm: expected one of {NORMS}, got {self.norm!r}")
        for field in ("rho", "momentum"):
            if not 0 < getattr(self, field) <= 1:
                raise ConfigError(f"{name}.{field}: expected a value in (0, 1], got {getattr(self, field)!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ConfigError(f"{name}.seed: expected an integer or null, got {self.seed!r}")

    @property
    def threat_model(self) -> str:  # type: ignore[override]
        """``linf`` or ``l2``: the ``norm`` field (the evaluator audits ``eps`` in it)."""
        return self.norm

    def max_passes(self) -> int:
        """Forwards of one call without early stop: ``steps`` plus one start point per stage."""
        return self.steps + len(stages(self.steps, self.eps, self.radius_reduction))

    # geometry ---------------------------------------------------------------------------------------------------
    def project(self, x: Tensor, images: Tensor, radius: float) -> Tensor:
        """``P``: onto the ball of ``radius`` around ``images`` (per volume), then into ``[0, 1]``."""
        delta = x - images
        if self.norm == "linf":
            delta = delta.clamp(-radius, radius)
        else:
            norm = delta.flatten(1).norm(dim=1)  # (B,)
            delta = delta * _per_volume((radius / norm.clamp_min(1e-12)).clamp(max=1.0))
        return (images + delta).clamp(0.0, 1.0)

    def direction(self, grad: Tensor) -> Tensor:
        """Unit step direction: ``sign(g)`` (L-inf) or ``g / ||g||_2`` per volume (L2)."""
        if self.norm == "linf":
            return grad.sign()
        return grad / _per_volume(grad.flatten(1).norm(dim=1).clamp_min(1e-12))

    def start(self, images: Tensor, radius: float, generator: torch.Generator | None) -> Tensor:
        if not self.random_start or radius == 0:
            return images.clone()
        noise = torch.empty_like(images)
        if self.norm == "linf":
            noise.uniform_(-radius, radius, generator=generator)
        else:
            noise.normal_(generator=generator)
            scale = torch.rand(images.shape[0], generator=generator, device=images.device, dtype=images.dtype)
            noise = noise * _per_volume(radius * scale / noise.flatten(1).norm(dim=1).clamp_min(1e-12))
        return self.project(images + noise, images, radius)

    # passes -----------------------------------------------------------------------------------------------------
    def evaluate(
        self, model: nn.Module, x: Tensor, labels: Tensor, with_grad: bool
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """One forward (and backward): detached logits ``(B, K, D, H, W)``, tracked CE ``(B,)``, gradient or None."""
        if not with_grad:
            with torch.no_grad():
                logits = model(x)
            return logits, tracked_ce(logits, labels), None
        x = x.detach().requires_grad_(True)
        logits = model(x)
        (grad,) = torch.autograd.grad(LOSSES[self.loss](logits, labels), x)  # input gradient only
        logits = logits.detach()
        return logits, tracked_ce(logits, labels), grad

    # loop -------------------------------------------------------------------------------------------------------
    def perturb(self, model: nn.Module, images: Tensor, labels: Tensor) -> Tensor:
        generator = make_generator(self.seed, images.device)
        plan = stages(self.steps, self.eps, self.radius_reduction)
        x = self.start(images, plan[0][0], generator)
        for radius, n in plan:
            tracker = BestTracker(images, labels)  # the best point must lie in this stage's ball
            last = self.stage(model, images, labels, self.project(x, images, radius), radius, n, tracker)
            x = tracker.best  # the warm start of the next stage
        return x if self.track_best else last

    def stage(
        self, model: nn.Module, images: Tensor, labels: Tensor, x: Tensor, radius: float, n: int, tracker: BestTracker
    ) -> Tensor:
        """``n`` APGD iterations in the ball of ``radius`` from ``x``; offers every point to ``tracker``.

        Returns the last iterate ``(B, C, D, H, W)``.
        """
        logits, loss, grad = self.evaluate(model, x, labels, with_grad=n > 0)
        tracker.update(x, logits)
        if n == 0 or (self.early_stop and tracker.done()):
            return x
        step = torch.full((x.shape[0],), 2.0 * radius, device=x.device, dtype=x.dtype)  # (B,)
        x_best, loss_best, grad_best = x.clone(), loss.clone(), grad.clone()  # highest tracked loss: restarts
        history = torch.empty(n + 1, x.shape[0], device=x.device, dtype=loss.dtype)  # (n + 1, B)
        history[0] = loss
        marks, previous = set(checkpoints(n)), 0
        best_at_last, cut_at_last = loss_best.clone(), torch.ones_like(loss_best, dtype=torch.bool)
        x_old = x
        for i in range(n):
            a = self.momentum if i > 0 else 1.0
            z = self.project(x + _per_volume(step) * self.direction(grad), images, radius)
            x, x_old = self.project(x + a * (z - x) + (1.0 - a) * (x - x_old), images, radius), x
            final = i == n - 1
            logits, loss, new_grad = self.evaluate(model, x, labels, with_grad=not final)
            tracker.update(x, logits)
            history[i + 1] = loss
            better = loss > loss_best  # (B,)
            loss_best = torch.where(better, loss, loss_best)
            x_best[better] = x[better]
            if new_grad is not None:
                grad_best[better] = new_grad[better]
                grad = new_grad
            if self.early_stop and tracker.done():
                return x
            if i + 1 in marks and not final:
                cut = cut_step(history, previous, i + 1, self.rho, loss_best, best_at_last, cut_at_last)
                step = torch.where(cut, step / 2, step)
                x = torch.where(_per_volume(cut), x_best, x)
                grad = torch.where(_per_volume(cut), grad_best, grad)
                previous, best_at_last, cut_at_last = i + 1, loss_best.clone(), cut
        return x


__all__ = ["APGD", "checkpoints", "cut_step", "stages", "tracked_ce"]
