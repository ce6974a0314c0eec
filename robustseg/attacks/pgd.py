"""Projected gradient attacks: the shared iterative loop, L-inf PGD, BIM and L2 PGD. FGSM is a PGD preset."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from robustseg.attacks.base import Attack, check_positive_int, make_generator, set_budgets
from robustseg.attacks.best import BestTracker, OutputRecorder, track
from robustseg.attacks.losses import LOSSES, check_loss
from robustseg.attacks.targets import TARGETS
from robustseg.errors import ConfigError
from robustseg.registry import ATTACKS


class GradientAttack(Attack):
    """The iterative input-gradient loop shared by PGD, BIM, CosPGD, SegPGD and the transfer family.

    Subclasses are frozen dataclasses with at least ``eps``, ``step_size``, ``steps``, ``random_start``,
    ``targeted``, ``target`` and ``seed`` fields, and override hooks:

    * :meth:`objective` - the scalar to maximise (untargeted) or minimise (targeted); one model forward;
    * :meth:`gradient` - its gradient w.r.t. the input (DI and VMI change how it is taken);
    * :meth:`ascend` - the step from the gradient (momentum lives here);
    * :meth:`project` and :meth:`init_delta` - the threat model (L-inf here, L2 in :class:`PGDL2`).

    Exactly ``steps * forwards_per_step`` model forwards are run, whatever the data; with ``track_best`` (a field
    of every subclass) one more, a gradient-free forward scoring the last iterate, and the visited point with the
    lowest foreground Dice per volume is returned instead of the last iterate (:class:`~robustseg.attacks.best.
    BestTracker`; the logits of the gradient passes are reused, so tracking adds no other pass).
    """

    threat_model: ClassVar[str | None] = "linf"

    eps: float
    step_size: float
    steps: int
    random_start: bool
    targeted: bool
    target: str
    seed: int | None

    def __post_init__(self) -> None:
        name = type(self).__name__
        set_budgets(self, "eps", "step_size")
        check_positive_int(self.steps, "steps", name)
        if self.targeted:
            TARGETS[self.target]  # noqa: B018  (raises ConfigError naming the known rules)
        if hasattr(self, "loss"):
            check_loss(self.loss, name, targeted=self.targeted)  # also: masked losses are untargeted only
        if getattr(self, "track_best", False) and self.targeted:
            raise ConfigError(f"{name}.track_best: tracks the lowest Dice to the true labels; untargeted only")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ConfigError(f"{name}.seed: expected an integer or null, got {self.seed!r}")

    # hooks ------------------------------------------------------------------------------------------------------
    def objective(self, model: nn.Module, x: Tensor, labels: Tensor, step: int) -> Tensor:
        """Scalar loss of ``model(x)`` against ``labels`` (the target map when targeted)."""
        return LOSSES[self.loss](model(x), labels)  # type: ignore[attr-defined]

    def gradient(
        self, model: nn.Module, x: Tensor, labels: Tensor, step: int, generator: torch.Generator | None
    ) -> Tensor:
        """Gradient of the signed objective (ascent direction) w.r.t. the input ``x`` ``(B, C, D, H, W)``."""
        x = x.detach().requires_grad_(True)
        value = self.objective(model, x, labels, step)
        if self.targeted:
            value = -value
        (grad,) = torch.autograd.grad(value, x)  # input gradient only
        return grad

    def ascend(self, delta: Tensor, grad: Tensor, memory: Any) -> tuple[Tensor, Any]:
        """One signed-gradient step; ``memory`` carries state between steps (momentum), unused here."""
        return delta + self.step_size * grad.sign(), memory

    def init_delta(self, images: Tensor, generator: torch.Generator | None) -> Tensor:
        """Zero, or uniform in the L-inf ball when ``random_start``."""
        delta = torch.zeros_like(images)
        if self.random_start and self.eps > 0:
            delta.uniform_(-self.eps, self.eps, generator=generator)
        return delta

    def project(self, delta: Tensor) -> Tensor:
        """Project onto the L-inf ball of radius ``eps``."""
        return delta.clamp(-self.eps, self.eps)

    def tracking(
        self, model: nn.Module, images: Tensor, labels: Tensor
    ) -> tuple[BestTracker | None, OutputRecorder | None]:
        """With ``track_best``: a tracker and a recorder wrapping ``model`` (use it for the gradient passes)."""
        if not getattr(self, "track_best", False):
            return None, None
        return BestTracker(images, labels), OutputRecorder(model)

    # loop -------------------------------------------------------------------------------------------------------
    def perturb(self, model: nn.Module, images: Tensor, labels: Tensor) -> Tensor:
        generator = make_generator(self.seed, images.device)
        delta = self.init_delta(images, generator)
        delta = (images + delta).clamp(0, 1) - images  # keep images + delta a valid volume
        tracker, recorder = self.tracking(model, images, labels)
        net = recorder if recorder is not None else model
        memory: Any = None
        for step in range(self.steps):
            x = images + delta
            if recorder is not None:
                recorder.reset()
            grad = self.gradient(net, x, labels, step, generator)
            track(tracker, recorder, model, x)
            delta, memory = self.ascend(delta, grad, memory)
            delta = self.project(delta)
            delta = (images + delta).clamp(0, 1) - images
        if tracker is None:
            return images + delta
        track(tracker, None, model, images + delta)  # the last iterate: one gradient-free forward
        return tracker.best


@ATTACKS.register("pgd")
@dataclass(frozen=True)
class PGD(GradientAttack):
    """L-inf projected gradient descent (Madry et al., ICLR 2018) on a voxel-wise segmentation loss.

    Args:
        eps: L-inf budget in ``[0, 1]`` intensity units; a float or a fraction string such as ``"8/255"``.
        step_size: size of each signed-gradient step (same units).
        steps: number of steps (= model forwards); ``steps=1, step_size=eps, random_start=False`` is FGSM
            (Goodfellow et al., ICLR 2015).
        random_start: start from a uniform point in the eps-ball.
        loss: key into ``LOSSES``.
        targeted: minimise the loss towards a target map instead of maximising it against the labels.
        target: rule in ``TARGETS`` deriving the target map from the labels (unless one is passed on call).
        seed: seed of the random start; ``None`` follows the global torch RNG.
        track_best: return the visited point with the lowest foreground Dice per volume, not the last iterate
            (one extra forward); untargeted only.
    """

    eps: float = 8 / 255
    step_size: float = 0.01
    steps: int = 20
    random_start: bool = True
    loss: str = "dice_ce"
    targeted: bool = False
    target: str = "background"
    seed: int | None = None
    track_best: bool = False


@ATTACKS.register("bim")
@dataclass(frozen=True)
class BIM(PGD):
    """Basic iterative method (Kurakin et al., ICLR 2017 workshop): iterative FGSM, projected, no random start."""

    random_start: bool = False


@ATTACKS.register("pgd_l2")
@dataclass(frozen=True)
class PGDL2(PGD):
    """L2 PGD (Madry et al., ICLR 2018): normalised-gradient steps, projection onto the per-volume L2 ball.

    Args:
        eps: L2 radius of the perturbation of one volume ``(C, D, H, W)``, in ``[0, 1]`` intensity units.
        step_size: L2 length of each step.
    """

    threat_model: ClassVar[str | None] = "l2"

    eps: float = 1.0
    step_size: float = 0.2

    def ascend(self, delta: Tensor, grad: Tensor, memory: Any) -> tuple[Tensor, Any]:
        norm = grad.flatten(1).norm(dim=1).clamp_min(1e-12)  # (B,)
        return delta + self.step_size * grad / norm.view(-1, 1, 1, 1, 1), memory

    def init_delta(self, images: Tensor, generator: torch.Generator | None) -> Tensor:
        """Zero, or a Gaussian direction scaled to a uniform radius in ``[0, eps]`` when ``random_start``."""
        delta = torch.zeros_like(images)
        if self.random_start and self.eps > 0:
            delta.normal_(generator=generator)
            radius = torch.rand(images.shape[0], generator=generator, device=images.device, dtype=images.dtype)
            norm = delta.flatten(1).norm(dim=1).clamp_min(1e-12)  # (B,)
            delta = delta * (self.eps * radius / norm).view(-1, 1, 1, 1, 1)
        return delta

    def project(self, delta: Tensor) -> Tensor:
        norm = delta.flatten(1).norm(dim=1)  # (B,)
        scale = torch.where(norm > self.eps, self.eps / norm.clamp_min(1e-12), torch.ones_like(norm))
        return delta * scale.view(-1, 1, 1, 1, 1)
