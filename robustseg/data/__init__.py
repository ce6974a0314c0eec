"""3D segmentation data: decathlon datalists of NIfTI volumes -> checked cases -> a LightningDataModule.

Importing this package registers the dataset preparers (synthetic phantoms, LiTS-117 CT, MNI152 brain) in
:data:`PREPARERS`.
"""

from __future__ import annotations

from robustseg.data import lits117, mni152, synthetic  # noqa: F401  (import = registration)
from robustseg.data.datalist import BTCV_VALIDATION_CASES, read_datalist, write_btcv_datalist, write_datalist
from robustseg.data.datamodule import SegmentationDataModule, build_datamodule
from robustseg.data.options import DataOptions, parse_options
from robustseg.data.prepare import PREPARERS
from robustseg.data.synthetic import write_synthetic_dataset

__all__ = [
    "BTCV_VALIDATION_CASES",
    "PREPARERS",
    "DataOptions",
    "SegmentationDataModule",
    "build_datamodule",
    "parse_options",
    "read_datalist",
    "write_btcv_datalist",
    "write_datalist",
    "write_synthetic_dataset",
]
