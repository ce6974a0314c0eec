"""The evaluator's sanity checks on the first case with work to do (flags in the report, never a crash).

Determinism (two eval-mode passes identical) and input gradients (fraction of zero / NaN, a sign of masking) of
every model, and the eps=0 check of every norm-bounded attack (budget 0 must reproduce the clean input and
prediction). Their network passes count as ``overhead`` in the costs. The flag functions live in ``checks.py``.
"""

from __future__ import annotations

import torch
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from torch import Tensor

from robustseg.evaluation import checks


class SanityChecks:
    """Mixin of :class:`~robustseg.evaluation.runner.Evaluator`: uses its models, window, counters and flags."""

    def run_checks(self, image: Tensor, label: Tensor) -> None:
        """Determinism and input gradients of every model, eps=0 of every attack; passes count as overhead."""
        self.checked = True
        self._counted(self.stats.overhead_passes, lambda: self._checks(image, label))

    def _checks(self, image: Tensor, label: Tensor) -> None:
        for model in self.models.values():
            self._check_model(model, image, label, self.predict(model, image))
        for source, _targets in self.plan():
            for spec in self.suite:
                if spec.eps is not None:
                    self._check_eps_zero(source, spec, image, label)

    def _check_model(self, model, image: Tensor, label: Tensor, logits: Tensor) -> None:
        again = self.predict(model, image)
        self.flags.append(checks.check_determinism(model.label, logits, again))
        loss = DiceCELoss(to_onehot_y=True, softmax=True)
        counter = self.counters[model.label].train(False)
        window = self.window

        def loss_fn(x: Tensor) -> Tensor:
            out = sliding_window_inference(
                x,
                window.roi(model),
                window.sw_batch_size,
                counter,
                window.overlap,
                window.blend_mode,
                sigma_scale=window.sigma_scale,
            )
            return loss(out, label)

        zero, nan = checks.input_gradient_fractions(loss_fn, image)
        self.flags.append(checks.check_gradients(model.label, zero, nan, self.max_zero_grad_fraction))

    def _check_eps_zero(self, source, spec, image: Tensor, label: Tensor) -> None:
        zero = spec.with_budget(0.0, steps=1)  # with eps 0 the result cannot depend on the step count
        if any(f.name == "eps_zero" and f.detail.startswith(f"{source.label}/{spec.label}:") for f in self.flags):
            return
        adversarial = self.craft(source, zero, image, label, seed=self.seed)
        if torch.equal(adversarial, image):  # identical input: the prediction is identical iff determinism holds
            clean = adv = torch.zeros(())
        else:
            clean = self.predict(source, image).argmax(1)
            adv = self.predict(source, adversarial).argmax(1)
        self.flags.append(checks.check_eps_zero(f"{source.label}/{spec.label}", image, adversarial, clean, adv))
