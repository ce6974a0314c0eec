"""The smallest legal kwargs of every registered model, for tests and CPU smoke runs.

``tests/test_models.py`` fails when a registered model has no entry here. Sizes are legal for 32^3 inputs:
UNETR needs multiples of its 16^3 patch, SwinUNETR multiples of 32, SegResNet ``init_filters`` a multiple of 8.
SwinUNETR's instance norm at its 1/32-resolution bottleneck needs more than one voxel, so at 32^3 its tiny preset
uses batch norm (train-mode batches of 2 or more).
"""

from __future__ import annotations

from typing import Any

TINY: dict[str, dict[str, Any]] = {
    "unet": {"channels": (4, 8, 16), "strides": (2, 2), "num_res_units": 1},
    "segresnet": {"init_filters": 8, "blocks_down": (1, 1, 1), "blocks_up": (1, 1)},
    "unetr": {"img_size": (32, 32, 32), "feature_size": 4, "hidden_size": 48, "mlp_dim": 96, "num_heads": 4},
    "swin_unetr": {
        "feature_size": 12,
        "depths": (1, 1, 1, 1),
        "num_heads": (1, 1, 1, 1),
        "use_checkpoint": False,
        "norm_name": "batch",
    },
    # U-Mamba: 3 stages (total stride 4), voxel tokens everywhere (no img_size), small state.
    "umamba_bot": {
        "features": (4, 8, 16),
        "strides": (1, 2, 2),
        "blocks_per_stage": (1, 1, 1),
        "blocks_per_stage_decoder": (1, 1),
        "d_state": 4,
    },
    "umamba_enc": {
        "features": (4, 8, 16),
        "strides": (1, 2, 2),
        "blocks_per_stage": (1, 1, 1),
        "blocks_per_stage_decoder": (1, 1),
        "d_state": 4,
    },
}
