"""The attack contract (ARCHITECTURE.md 2.2), budget parsing and the shared L-inf/L2 gradient loop.

Every attack maps ``(model, images, labels)`` to adversarial images. Images are float ``(B, C, D, H, W)`` in
``[0, 1]``, labels int64 ``(B, 1, D, H, W)``, the model returns logits ``(B, K, D, H, W)``.
"""

from __future__ import annotations

import abc
import contextlib
import math
from collections.abc import Iterator
from fractions import Fraction
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from robustseg.attacks.targets import derive_target
from robustseg.errors import ConfigError, RobustsegError


def parse_budget(
    value: Any, field: str, attack: str = "attack", *, maximum: float | None = None, escape: str | None = None
) -> float:
    """A budget in ``[0, 1]`` intensity units from a number or a fraction string such as ``"8/255"``.

    Args:
        maximum: refuse values ``>= maximum`` (an L-inf eps or a noise sigma of 1 spans the whole intensity range:
            almost always ``8`` written for ``8/255``); ``None`` accepts any finite value >= 0.
        escape: the field that lifts ``maximum``, named in the message.

    Raises:
        ConfigError: naming ``attack.field`` when the value is not a finite number >= 0 (and below ``maximum``).
    """
    number: float
    if isinstance(value, bool):
        raise ConfigError(f"{attack}.{field}: expected a number or a fraction like '8/255', got {value!r}")
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(Fraction(value.replace(" ", "")))
        except (ValueError, ZeroDivisionError):
            raise ConfigError(
                f"{attack}.{field}: expected a number or a fraction like '8/255', got {value!r}"
            ) from None
    else:
        raise ConfigError(f"{attack}.{field}: expected a number or a fraction like '8/255', got {value!r}")
    if not math.isfinite(number) or number < 0:
        raise ConfigError(f"{attack}.{field}: must be a finite number >= 0, got {value!r}")
    if maximum is not None and number >= maximum:
        hint = f"; set {attack}.{escape}=true if you really mean it" if escape else ""
        raise ConfigError(
            f"{attack}.{field}: {value!r} is >= {maximum:g}, the whole [0, 1] intensity range: budgets are in [0, 1] "
            f"units, write e.g. '8/255' (not 8){hint}"
        )
    return number


def check_positive_int(value: Any, field: str, attack: str = "attack", minimum: int = 1) -> None:
    """Raise ``ConfigError`` unless ``value`` is an int >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{attack}.{field}: expected an integer >= {minimum}, got {value!r}")


LARGE_BUDGET_ESCAPE = "allow_large_budget"  # a bool field that lets an attack take an L-inf eps / sigma >= 1


def set_budgets(obj: Any, *fields: str) -> None:
    """Parse the named budget fields of a frozen dataclass in place (for ``__post_init__``).

    An L-inf ``eps`` (``threat_model == "linf"``) and a noise ``sigma`` must be below 1 unless the attack has a true
    ``allow_large_budget`` field; L2 radii are whole-volume norms and may exceed 1.
    """
    name = type(obj).__name__
    allowed = bool(getattr(obj, LARGE_BUDGET_ESCAPE, False))
    for field in fields:
        guarded = field == "sigma" or (field == "eps" and getattr(obj, "threat_model", None) == "linf")
        maximum = 1.0 if guarded and not allowed else None
        escape = LARGE_BUDGET_ESCAPE if hasattr(obj, LARGE_BUDGET_ESCAPE) else None  # name it only where it exists
        value = parse_budget(getattr(obj, field), field, name, maximum=maximum, escape=escape)
        object.__setattr__(obj, field, value)


@contextlib.contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Temporarily set ``requires_grad=False`` on every parameter; restore each flag exactly on exit.

    The attack graph then holds no parameter-gradient paths, so a step costs a bare pass (forward plus an
    input-gradient backward) and no parameter ``.grad`` can be touched.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    """A generator seeded with ``seed`` on ``device``, or ``None`` to use the global RNG."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(int(seed))


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode; on exit give every submodule back its own ``training`` flag.

    Not ``model.train(was_training)``, which would reset a BatchNorm deliberately kept in eval inside a training
    model.
    """
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training


@torch.no_grad()
def output_classes(model: nn.Module, images: Tensor) -> int:
    """The number of classes ``K`` of ``model``: the channels of its logits on ``images``, one forward, no graph."""
    return int(model(images).shape[1])


class AttackInputError(RobustsegError, ValueError):
    """The images given to an attack are not a valid ``[0, 1]`` volume (non-finite, or outside the range)."""


@torch.no_grad()
def check_unit_range(images: Tensor, who: str = "attack") -> None:
    """Raise :class:`AttackInputError` unless every voxel of ``images`` is finite and in ``[0, 1]``.

    Budgets are stated in ``[0, 1]`` units and results are clipped to that range; an input outside it would be
    silently changed by the clipping alone (eps = 0 would move it), so it is refused instead.
    """
    finite = torch.isfinite(images)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise AttackInputError(f"{who}: images contain {bad} non-finite voxel(s) (NaN or inf); expected [0, 1]")
    low, high = float(images.min()), float(images.max())
    if low < 0.0 or high > 1.0:
        raise AttackInputError(
            f"{who}: images must lie in [0, 1] (the intensity transforms clip to it), got min {low:.6g} and max "
            f"{high:.6g}; rescale or clip the input first"
        )


class Attack(abc.ABC):
    """Maps ``(model, images, labels)`` to adversarial images.

    Contract, checked for every ``conf/attack/*.yaml`` preset in ``tests/test_attacks.py``:

    * ``images`` is float ``(B, C, D, H, W)`` in ``[0, 1]``; ``labels`` is int ``(B, 1, D, H, W)``.
    * The result is detached, has the same shape, dtype and device, and lies in ``[0, 1]``.
    * Only input gradients are taken (``torch.autograd.grad``); parameters are frozen for the duration of the
      call and their ``requires_grad`` flags restored, so parameter ``.grad`` is never touched and calling an
      attack inside ``training_step`` under DDP or gradient accumulation is safe.
    * The number of forward passes is fixed by the config, never by the data: DDP ranks stay in step.
    * ``images`` must be finite and in ``[0, 1]`` (:class:`AttackInputError` otherwise, naming the min/max seen).
    * Every submodule's own ``training`` flag is restored on exit (a BatchNorm kept in eval inside a training
      model stays in eval). Subclasses are frozen dataclasses: no state survives a call.
    * Targeted attacks (``targeted=True``) move the prediction towards ``target``: a label map passed as the
      ``target`` keyword, else the map the named rule ``self.target`` derives from ``labels`` and the model's
      ``num_classes`` (see :meth:`goal` and ``TARGETS``), the same for every tile, batch and case.

    Class attributes: ``threat_model`` is ``"linf"`` or ``"l2"`` for attacks bounded by their ``eps`` field (the
    evaluator audits it), ``None`` otherwise; ``uses_gradients`` is False for random baselines.
    """

    threat_model: ClassVar[str | None] = None
    uses_gradients: ClassVar[bool] = True

    def __call__(
        self,
        model: nn.Module,
        images: Tensor,
        labels: Tensor,
        *,
        target: Tensor | None = None,
        num_classes: int | None = None,
    ) -> Tensor:
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                f"{type(self).__name__} needs autograd but torch.inference_mode is on: build the Trainer with "
                "inference_mode=False (or call the attack outside torch.inference_mode())"
            )
        if images.ndim != 5 or labels.shape != (images.shape[0], 1, *images.shape[2:]):
            raise ValueError(
                f"{type(self).__name__}: expected images (B, C, D, H, W) and labels (B, 1, D, H, W), got "
                f"{tuple(images.shape)} and {tuple(labels.shape)}"
            )
        if not images.is_floating_point() or labels.is_floating_point():
            raise ValueError(
                f"{type(self).__name__}: expected float images and integer labels, got {images.dtype} and "
                f"{labels.dtype}"
            )
        check_unit_range(images, type(self).__name__)
        with eval_mode(model):  # attack the deployed model; also keeps BatchNorm running statistics untouched
            goal = self.goal(model, images, labels.long(), target=target, num_classes=num_classes)
            with torch.enable_grad(), frozen_parameters(model):
                adversarial = self.perturb(model, images.detach(), goal)
        return adversarial.detach().clamp(0.0, 1.0).to(images.dtype)

    def goal(
        self,
        model: nn.Module,
        images: Tensor,
        labels: Tensor,
        *,
        target: Tensor | None = None,
        num_classes: int | None = None,
    ) -> Tensor:
        """The label map the objective refers to: ``labels`` (untargeted) or the target map (targeted).

        A targeted attack without an explicit ``target`` derives it with the rule ``self.target`` from ``labels``
        and the model's number of classes: ``num_classes`` when given, else read from one gradient-free forward of
        ``images[:1]`` (the same on every call, so DDP ranks stay in step). Never from the classes a tile or batch
        happens to contain.
        """
        targeted = bool(getattr(self, "targeted", False))
        if target is not None:
            if not targeted:
                raise ValueError(f"{type(self).__name__}: a target map was given but the attack is not targeted")
            if target.shape != labels.shape:
                raise ValueError(
                    f"{type(self).__name__}: target map shape {tuple(target.shape)} != labels {tuple(labels.shape)}"
                )
            return target.to(labels.device).long()
        if not targeted:
            return labels
        if num_classes is None:
            num_classes = output_classes(model, images[:1])
        return derive_target(self.target, labels, num_classes)  # type: ignore[attr-defined]

    @abc.abstractmethod
    def perturb(self, model: nn.Module, images: Tensor, labels: Tensor) -> Tensor:
        """Return adversarial images; called in eval mode, gradients enabled, parameters frozen.

        ``labels`` are the true labels (untargeted) or the target map (targeted).
        """
