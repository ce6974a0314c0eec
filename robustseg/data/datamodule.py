"""The LightningDataModule every run uses: decathlon datalist -> checked cases -> MONAI datasets.

Usage (what ``robustseg.training`` does)::

    dm = build_datamodule(cfg.data)   # checks the config section: ConfigError naming data.<key>
    dm.validate()                     # prepares shipped datasets, checks every case: DataError naming the file
    trainer.fit(system, datamodule=dm)

Batches: training ``{"image": (B * num_samples, C, *roi_size) float32 in [0, 1], "label": (B * num_samples, 1,
*roi_size) int64, "case_id": list[str]}``; validation one whole preprocessed volume per batch
``{"image": (1, C, D, H, W), "label": (1, 1, D, H, W), "case_id": [str]}``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from monai.data import CacheDataset, DataLoader, Dataset, list_data_collate
from omegaconf import DictConfig
from torch.utils.data import ConcatDataset

from robustseg.data.checks import check_dataset
from robustseg.data.datalist import Case
from robustseg.data.options import DataOptions, parse_options
from robustseg.data.prepare import prepare_dataset
from robustseg.data.transforms import eval_transforms, intensity_transforms, train_transforms
from robustseg.errors import ConfigError

log = logging.getLogger(__name__)


class SegmentationDataModule(L.LightningDataModule):
    """Training crops and whole validation volumes of one dataset described by :class:`DataOptions`.

    Attributes:
        options: the checked ``data`` section.
        num_classes, in_channels, class_names, roi_size: copied from it for the model and the system.
    """

    def __init__(self, options: DataOptions) -> None:
        super().__init__()
        self.options = options
        self.num_classes = options.num_classes
        self.in_channels = options.in_channels
        self.class_names = list(options.class_names)
        self.roi_size = tuple(options.roi_size)
        self.cases: dict[str, list[Case]] | None = None  # set by validate()
        self.data_warnings: dict[str, list[str]] = {}  # case_id -> suspicious-data warnings, set by validate()
        self.train_dataset: Any = None
        self.val_dataset: Any = None

    def prepare_data(self) -> None:
        """Materialise shipped or synthetic datasets (``data.prepare``) into ``root`` when missing."""
        prepare_dataset(self.options)

    def validate(self) -> dict[str, list[Case]]:
        """Prepare if needed, then check the datalist and every case (once; later calls are free).

        Returns:
            ``{"training": [case, ...], "validation": [...]}``; each case has absolute ``image``/``label``
            paths and a ``case_id``.

        Raises:
            DataError: naming the datalist, or the case, file and problem.
        """
        if self.cases is None:
            self.prepare_data()
            self.cases, self.data_warnings = check_dataset(self.options)
        return self.cases

    def case_warnings(self, case_id: str) -> list[str]:
        """Warnings about suspicious data in case ``case_id`` (constant image, far smaller than the ROI, extreme
        anisotropy after resampling); empty when none. Logged once by :meth:`validate`, which this calls."""
        self.validate()
        return list(self.data_warnings.get(str(case_id), []))

    def setup(self, stage: str | None = None) -> None:
        """Build the cached datasets: training (``fit``) and validation (``fit``/``validate``/other)."""
        cases = self.validate()
        opts = self.options
        workers = max(1, opts.num_workers)
        if stage in (None, "fit") and self.train_dataset is None:
            transforms = train_transforms(opts)
            # MONAI transforms draw from their own numpy RandomState: follow the run's seed (seed_everything)
            transforms.set_random_state(seed=torch.initial_seed() % 2**32)
            train = CacheDataset(
                cases["training"],
                transforms,
                cache_rate=opts.cache_rate,
                num_workers=workers,
                progress=False,
            )
            self.train_dataset = ConcatDataset([train] * opts.repeats) if opts.repeats > 1 else train
        if self.val_dataset is None:
            self.val_dataset = CacheDataset(
                cases["validation"],
                eval_transforms(opts, track_meta=False),
                cache_rate=opts.cache_rate,
                num_workers=workers,
                progress=False,
            )

    def train_dataloader(self) -> DataLoader:
        """Shuffled volumes, ``batch_size`` per batch, each giving ``num_samples`` random ROI crops."""
        if self.train_dataset is None:
            self.setup("fit")
        return DataLoader(
            self.train_dataset,
            batch_size=self.options.batch_size,
            shuffle=True,
            num_workers=self.options.num_workers,
            collate_fn=list_data_collate,  # flattens the per-volume crop lists: B * num_samples crops
            persistent_workers=self.options.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        """Whole preprocessed validation volumes, one per batch, in datalist order."""
        if self.val_dataset is None:
            self.setup("validate")
        return DataLoader(
            self.val_dataset,
            batch_size=1,
            shuffle=False,
            num_workers=self.options.num_workers,
            collate_fn=list_data_collate,
            persistent_workers=self.options.num_workers > 0,
        )

    def eval_dataset(self, split: str = "validation") -> Dataset:
        """Whole preprocessed volumes of ``split`` as MONAI MetaTensors, loaded lazily (no cache).

        Each item is ``{"image": MetaTensor (C, D, H, W) float32 in [0, 1], "label": MetaTensor (1, D, H, W)
        int64, "case_id": str}``; ``image.affine`` / ``image.pixdim`` describe the preprocessed voxel grid
        (after orientation, spacing, crops and padding), so metrics in mm and saved volumes are correct.
        """
        cases = self.validate()
        if split not in cases:
            raise ConfigError(f"eval_dataset: unknown split {split!r}; expected one of {sorted(cases)}")
        return Dataset(cases[split], eval_transforms(self.options, track_meta=True))


def build_datamodule(data_cfg: Mapping[str, Any] | DictConfig) -> SegmentationDataModule:
    """Build the datamodule from a ``data`` config section (OmegaConf node, resolved here, or plain dict).

    Raises:
        ConfigError: naming the bad ``data.<key>`` (nothing is read from disk yet).
    """
    options = parse_options(data_cfg)
    intensity_transforms(options)  # checks data.intensity against the modality now, not at setup
    log.debug("data options: %s", options)
    return SegmentationDataModule(options)
