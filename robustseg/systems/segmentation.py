"""The Lightning system: a registered network trained clean, adversarially or with VAFT."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from monai.inferers import sliding_window_inference
from monai.optimizers import WarmupCosineSchedule
from torch import Tensor, nn
from torchmetrics.segmentation import DiceScore

from robustseg.attacks import ATTACKS, attack_volume
from robustseg.attacks.losses import dice_ce
from robustseg.models import MODELS
from robustseg.systems.adversarial import ADV_MODES, AttackView
from robustseg.systems.images import slice_panel

log = logging.getLogger(__name__)

Batch = dict[str, Any]  # {"image": (B, C, D, H, W) float in [0, 1], "label": (B, 1, D, H, W) int64, "case_id": [str]}


class SegmentationSystem(L.LightningModule):
    """Trains ``model`` on clean volumes, adversarially, or with VAFT (Hanif et al., MICCAI 2023).

    Takes config sections, not objects, so ``save_hyperparameters`` records everything needed to rebuild
    it: ``SegmentationSystem.load_from_checkpoint(path)`` works without any YAML, with ``weights_only=True``.

    Args:
        model: model config section ``{"name": <registered name>, **kwargs}``.
        attack: attack config section for adversarial training, or ``None`` for clean training.
        num_classes: K, including background.
        class_names: K names, background first; used for per-class metric keys.
        roi_size: sliding-window ROI of validation (the training crop size).
        adv_mode: ``adversarial`` (the papers' AT: adversarial loss only), ``mix`` (``(1 - w) clean + w adv``)
            or ``vaft`` (clean + adversarial + ``freq_weight`` x frequency consistency).
        val_attack: attack section for a cheap adversarial validation on the first ``val_attack_cases`` cases.
        config: the whole resolved run config, recorded for provenance (evaluation reads its data section).
    """

    def __init__(
        self,
        model: dict[str, Any],
        attack: dict[str, Any] | None = None,
        num_classes: int = 14,
        class_names: Sequence[str] | None = None,
        roi_size: Sequence[int] = (96, 96, 96),
        lr: float = 1e-4,
        weight_decay: float = 1e-5,
        warmup_epochs: int = 50,
        adv_mode: str = "adversarial",
        adv_weight: float = 0.5,
        freq_weight: float = 1.0,
        sw_overlap: float = 0.5,
        sw_batch_size: int = 2,
        val_attack: dict[str, Any] | None = None,
        val_attack_cases: int = 1,
        log_images: int = 2,
        config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if adv_mode not in ADV_MODES:
            raise ValueError(f"system.adv_mode={adv_mode!r}: expected one of {sorted(ADV_MODES)}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class_names for num_classes={num_classes}")
        self.save_hyperparameters()
        self.net = MODELS.build(model)
        self.attack = ATTACKS.build(attack) if attack else None
        self.val_attack = ATTACKS.build(val_attack) if val_attack else None
        ADV_MODES[adv_mode].check(self.attack)
        self.class_names = list(class_names) if class_names else [f"class{k}" for k in range(num_classes)]
        self.loss = dice_ce  # the papers' DiceCE (squared_pred, smooth_nr 0, smooth_dr 1e-6), as the attacks use
        conditions = ["clean"] + (["adv"] if self.val_attack else [])
        self.val_dice = nn.ModuleDict({c: self._dice(include_background=False) for c in conditions})
        self.val_dice_bg = nn.ModuleDict({c: self._dice(include_background=True) for c in conditions})

    def _dice(self, include_background: bool) -> DiceScore:
        return DiceScore(
            num_classes=self.hparams.num_classes,
            include_background=include_background,
            average="none",
            input_format="index",
        )

    def forward(self, images: Tensor) -> Tensor:
        """(B, C, D, H, W) -> logits (B, K, D, H, W) of the plain network."""
        return self.net(images)

    def on_train_start(self) -> None:
        if self.global_rank == 0:  # after a restore this is the true resume point
            log.info("training starts at epoch %d, global step %d", self.current_epoch, self.global_step)

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        images, labels = batch["image"], batch["label"]
        if self.attack is None:
            loss = self.loss(self.net(images), labels)
            self.log("train/loss/clean", loss, prog_bar=True, batch_size=images.shape[0])
            return loss
        view = AttackView(self.net, grad_scale=self._attack_grad_scale())
        adversarial = self.attack(view, images, labels)  # plain net, not the DDP wrapper; eval mode inside
        self.log("train/zero_grad_fraction", view.zero_grad_fraction(), batch_size=images.shape[0])
        losses = ADV_MODES[self.hparams.adv_mode].losses(self, images, adversarial, labels)
        for name, value in losses.items():
            self.log(f"train/loss/{name}", value, prog_bar=name == "total", batch_size=images.shape[0])
        return losses["total"]

    def _attack_grad_scale(self) -> float:
        # fp16 input gradients underflow; the attacks use only the gradient's direction, so scaling it is exact
        precision = str(self.trainer.precision) if self._trainer is not None else "32"
        return 2.0**12 if precision.startswith("16") else 1.0

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        images, labels = batch["image"], batch["label"]  # one whole volume: (1, C, D, H, W), (1, 1, D, H, W)
        logits = self._infer(images)
        preds = logits.argmax(dim=1)  # (1, D, H, W)
        self.val_dice["clean"].update(preds, labels[:, 0])
        self.val_dice_bg["clean"].update(preds, labels[:, 0])
        if self.val_attack is not None and batch_idx < self.hparams.val_attack_cases:
            adv_preds = self._attacked_prediction(images, labels)
            self.val_dice["adv"].update(adv_preds, labels[:, 0])
            self.val_dice_bg["adv"].update(adv_preds, labels[:, 0])
        if batch_idx < self.hparams.log_images:
            self._log_slices(images, labels, preds, batch)

    def _infer(self, images: Tensor) -> Tensor:
        """Sliding-window logits over a whole volume, as every reported number is scored."""
        return sliding_window_inference(
            images,
            roi_size=tuple(self.hparams.roi_size),
            sw_batch_size=self.hparams.sw_batch_size,
            predictor=self.net,
            overlap=self.hparams.sw_overlap,
            mode="gaussian",
        )

    def _attacked_prediction(self, images: Tensor, labels: Tensor) -> Tensor:
        """Prediction on the volume attacked through the scoring sliding window (needs autograd: the attack
        raises under ``torch.inference_mode``, so ``train`` builds the Trainer with ``inference_mode=False``)."""
        adversarial = attack_volume(
            self.val_attack,
            self.net,
            images,
            labels,
            mode="pipeline",
            roi_size=tuple(self.hparams.roi_size),
            overlap=self.hparams.sw_overlap,
            sw_batch_size=self.hparams.sw_batch_size,
            memory_bounded=True,
        )
        with torch.no_grad():
            return self._infer(adversarial).argmax(dim=1)  # (1, D, H, W)

    def on_validation_epoch_end(self) -> None:
        for condition in self.val_dice:
            per_class = self.val_dice[condition].compute()  # (K - 1,) foreground classes, NaN where absent
            per_class_bg = self.val_dice_bg[condition].compute()  # (K,)
            self.log(f"val/dice/{condition}", per_class.nanmean(), prog_bar=condition == "clean", sync_dist=False)
            self.log(f"val/dice_with_bg/{condition}", per_class_bg.nanmean(), sync_dist=False)
            for name, value in zip(self.class_names[1:], per_class):
                self.log(f"val/dice/{condition}/{name}", value, sync_dist=False)
            self.val_dice[condition].reset()
            self.val_dice_bg[condition].reset()

    def _log_slices(self, images: Tensor, labels: Tensor, preds: Tensor, batch: Batch) -> None:
        logger = self.logger
        if logger is None or not hasattr(logger, "log_image") or self.global_rank != 0:
            return
        case = batch.get("case_id", ["case"])[0]
        panel = slice_panel(images[0, 0], labels[0, 0], preds[0], num_classes=self.hparams.num_classes)
        logger.log_image(key=f"val/slices/{case}", images=[panel], caption=[f"{case}: image | truth | prediction"])

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.AdamW(self.net.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else 1
        warmup = min(int(self.hparams.warmup_epochs * total / epochs), total - 1)
        scheduler = WarmupCosineSchedule(optimizer, warmup_steps=warmup, t_total=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
