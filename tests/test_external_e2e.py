"""External models evaluated end to end through ``evaluate(cfg)`` on synthetic NIfTI (slow)."""

from __future__ import annotations

import csv
import json
import sys
import textwrap
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from torch import nn

from robustseg.config import load_config
from robustseg.evaluation import evaluate
from robustseg.models import MODELS, TINY

SIZE = 16
pytestmark = pytest.mark.slow


ORACLE = """
import torch
from torch import nn


class Oracle(nn.Module):
    \"\"\"Classifies each voxel of the synthetic phantoms by intensity (air, body 40, organ1 100, organ2 160 HU).

    Works in HU: its input is robustseg's [0, 1] window [-175, 250] mapped back by the adapter (scale 425, shift
    -175). Differentiable everywhere, so white-box attacks lower its Dice.
    \"\"\"

    def __init__(self, sharpness: float = 0.02) -> None:
        super().__init__()
        self.register_buffer("centres", torch.tensor([-175.0, 40.0, 100.0, 160.0]).reshape(1, 4, 1, 1, 1))
        self.sharpness = sharpness

    def forward(self, hu):
        s = -((hu - self.centres) * self.sharpness) ** 2  # (B, 4, D, H, W): air, body, organ1, organ2
        return torch.cat([torch.logsumexp(s[:, :2], 1, keepdim=True), s[:, 2:]], 1)  # (B, 3, D, H, W)


def build(sharpness=0.02):
    return Oracle(sharpness)
"""
HU_INPUT = "input: {scale: 425.0, shift: -175.0, unit: HU}\n"


def oracle_module(tmp_path: Path, monkeypatch) -> object:
    """Write the oracle as an importable module ``ext_oracle`` under ``tmp_path/code`` and import it."""
    monkeypatch.setattr(sys, "path", [str(tmp_path / "code"), *sys.path])
    monkeypatch.delitem(sys.modules, "ext_oracle", raising=False)
    (tmp_path / "code").mkdir(exist_ok=True)
    (tmp_path / "code" / "ext_oracle.py").write_text(ORACLE)
    import importlib

    return importlib.import_module("ext_oracle")


def tiny_unet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MODELS.build({"name": "unet", "in_channels": 1, "out_channels": 3, **TINY["unet"]}).eval()


def run(root: Path, out: Path, target: str) -> tuple[list[dict], dict]:
    cfg = load_config(
        "evaluate",
        [
            "data=synthetic",
            "logger=none",
            f"data.root={root / 'data'}",
            "data.prepare.num_cases=3",
            "data.prepare.num_validation=1",
            f"data.prepare.size=[{SIZE},{SIZE},{SIZE}]",
            f"data.roi_size=[{SIZE},{SIZE},{SIZE}]",
            f"runs_root={root / 'runs'}",
            f"output_dir={out}",
            "attacks=[pgd]",
            "+attack_overrides.pgd.steps=2",
            "eps=[8/255]",
            "frequency.bands=null",
            f"target=[{target}]",
        ],
    )
    evaluate(cfg)
    rows = list(csv.DictReader((out / "summary.csv").open()))
    return rows, json.loads((out / "summary.json").read_text())


def dice(rows: list[dict], attack: str) -> float:
    return float(next(r for r in rows if r["attack"] == attack)["dice_mean"])


def gradients_flag(summary: dict) -> dict:
    return next(f for f in summary["flags"] if f["name"] == "gradients")


def test_torchscript_ending_in_softmax_end_to_end(tmp_path, monkeypatch):
    oracle = oracle_module(tmp_path, monkeypatch).build().eval()
    scripted = torch.jit.trace(nn.Sequential(oracle, nn.Softmax(1)).eval(), torch.rand(2, 1, SIZE, SIZE, SIZE))
    scripted.save(str(tmp_path / "m.ts"))
    spec = tmp_path / "softmax.yaml"
    spec.write_text(
        f"torchscript: m.ts\nnum_classes: 3\nroi_size: [{SIZE}, {SIZE}, {SIZE}]\noutput: probabilities\n" + HU_INPUT
    )
    rows, summary = run(tmp_path, tmp_path / "out", str(spec))
    assert dice(rows, "clean") > 0.5
    assert dice(rows, "pgd") < dice(rows, "clean") - 0.05
    assert not gradients_flag(summary)["raised"]  # log-probabilities: no saturated second softmax
    from robustseg.external import load_external

    units = load_external(spec).extra["input_units"]  # the budget in the model's own units: 8/255 = 13.3 HU
    assert units == {"scale": [425.0], "unit": "HU"}


def test_python_entry_with_zscore_input_end_to_end(tmp_path, monkeypatch):
    oracle_module(tmp_path, monkeypatch)
    # the model expects z-scores of HU: (HU - 40) / 120, i.e. ([0, 1] * 425 - 175 - 40) / 120; its centres follow
    spec = tmp_path / "zscore.yaml"
    spec.write_text(
        "python: ext_oracle:build\npython_path: code\nkwargs: {sharpness: 2.4}\nnum_classes: 3\n"
        f"roi_size: [{SIZE}, {SIZE}, {SIZE}]\ninput: {{scale: 425.0, shift: -175.0, mean: 40.0, std: 120.0, unit: z}}\n"
    )
    import ext_oracle

    def zscore_oracle(sharpness=2.4):
        net = ext_oracle.Oracle(sharpness)
        net.centres = (net.centres - 40.0) / 120.0
        return net

    monkeypatch.setattr(ext_oracle, "build", zscore_oracle)
    rows, summary = run(tmp_path, tmp_path / "out", str(spec))
    assert dice(rows, "clean") > 0.5 and dice(rows, "pgd") < dice(rows, "clean") - 0.05
    assert not gradients_flag(summary)["raised"]
    units = summary["settings"]["budgets in the models' own input units"]  # the report states the model's units
    eps = float(Fraction(next(r["budget"] for r in rows if r.get("attack") == "pgd")))
    assert any(f"{eps * 425 / 120:.4f} z" in u for u in units), units


def test_bundle_written_by_monai_end_to_end(tmp_path):
    from monai.bundle import init_bundle
    from monai.networks.nets import UNet

    arch = {"spatial_dims": 3, "in_channels": 1, "out_channels": 3, "channels": [4, 8], "strides": [2]}
    torch.manual_seed(2)
    net = UNet(**arch)
    arch = {"_target_": "UNet", **arch}
    inference = {
        "network_def": arch,
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "LoadImaged", "keys": "image"},
                {"_target_": "EnsureChannelFirstd", "keys": "image"},
                {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
                {
                    "_target_": "ScaleIntensityRanged",
                    "keys": "image",
                    "a_min": -175,
                    "a_max": 250,
                    "b_min": -1.0,
                    "b_max": 1.0,
                    "clip": True,
                },
            ],
        },
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [SIZE] * 3},
    }
    channels = {"0": "background", "1": "organ1", "2": "organ2"}
    meta = {
        "network_data_format": {
            "inputs": {"image": {"num_channels": 1}},
            "outputs": {"pred": {"num_channels": 3, "channel_def": channels}},
        }
    }  # noqa: E501
    init_bundle(tmp_path / "bundle", network=net, metadata_str=meta, inference_str=inference)
    rows, summary = run(tmp_path, tmp_path / "out", f"bundle:{tmp_path / 'bundle'}")
    assert {r["attack"] for r in rows} >= {"clean", "pgd"}
    assert "bundle" in json.dumps(summary["settings"])
    # an unmappable transform is refused, naming it
    inference["preprocessing"]["transforms"].append({"_target_": "ScaleIntensityd", "keys": "image"})
    init_bundle(tmp_path / "bundle2", network=net, metadata_str=meta, inference_str=inference)
    from robustseg.errors import ConfigError
    from robustseg.external import load_prefixed

    with pytest.raises(ConfigError, match="transform #4 ScaleIntensityd cannot be mapped"):
        load_prefixed(f"bundle:{tmp_path / 'bundle2'}")


def test_exported_program_end_to_end(tmp_path, monkeypatch):
    oracle = oracle_module(tmp_path, monkeypatch).build().eval()
    program = torch.export.export(oracle, (torch.rand(2, 1, SIZE, SIZE, SIZE),))
    torch.export.save(program, tmp_path / "m.pt2")
    spec = tmp_path / "exported.yaml"
    spec.write_text("export: m.pt2\nnum_classes: 3\n" + HU_INPUT)  # the ROI is the exported size
    rows, summary = run(tmp_path, tmp_path / "out", str(spec))
    assert dice(rows, "clean") > 0.5 and dice(rows, "pgd") < dice(rows, "clean") - 0.05
    assert not gradients_flag(summary)["raised"]


def test_model_that_blocks_gradients_raises_the_flag_and_still_scores(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "ext_blocked.py").write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn
            from robustseg.models import MODELS, TINY

            class Detached(nn.Module):
                def __init__(self):
                    super().__init__()
                    torch.manual_seed(0)
                    self.net = MODELS.build({"name": "unet", "in_channels": 1, "out_channels": 3, **TINY["unet"]})

                def forward(self, x):
                    with torch.no_grad():
                        return self.net(x)

            def build():
                return Detached()
            """
        )
    )
    spec = tmp_path / "blocked.yaml"
    spec.write_text(
        f"python: ext_blocked:build\npython_path: code\nnum_classes: 3\nroi_size: [{SIZE}, {SIZE}, {SIZE}]\n"
    )
    rows, summary = run(tmp_path, tmp_path / "out", str(spec))
    assert gradients_flag(summary)["raised"]
    assert dice(rows, "pgd") == pytest.approx(dice(rows, "clean"), abs=0.05)  # zero gradients: PGD barely moves
