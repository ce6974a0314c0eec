"""The data pipeline on NIfTI files the tests write: batch contracts, eval metadata, config checks, conf files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from omegaconf import OmegaConf

from robustseg.data import BTCV_VALIDATION_CASES, build_datamodule, write_btcv_datalist, write_synthetic_dataset
from robustseg.data.options import parse_options
from robustseg.data.transforms import _crop
from robustseg.errors import ConfigError, DataError

CONF_DATA = Path(__file__).resolve().parents[1] / "conf" / "data"
SIZE = (40, 36, 32)  # odd, non-cubic: exercises padding to roi and to pad_divisor


def synthetic_cfg(root: Path, **overrides) -> dict:
    """A small CT ``data`` section over files already written to ``root``."""
    cfg = {
        "name": "synthetic",
        "root": str(root),
        "modality": "ct",
        "num_classes": 3,
        "intensity": {"a_min": -175.0, "a_max": 250.0},
        "roi_size": [32, 32, 32],
        "num_samples": 2,
        "batch_size": 2,
        "augment": {"flip": 0.5, "rot90": 0.5, "scale_intensity": 0.5, "shift_intensity": 0.5},
        "pad_divisor": 16,
        "num_workers": 0,
    }
    cfg.update(overrides)
    return cfg


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic_dataset(root, num_cases=3, size=SIZE, num_classes=3, seed=0)
    return root


def test_train_batches_are_random_roi_crops(synthetic_root):
    torch.manual_seed(0)
    dm = build_datamodule(synthetic_cfg(synthetic_root))
    dm.setup("fit")

    batch = next(iter(dm.train_dataloader()))

    assert batch["image"].shape == (4, 1, 32, 32, 32)  # batch_size 2 x num_samples 2
    assert batch["label"].shape == (4, 1, 32, 32, 32)
    assert batch["image"].dtype == torch.float32 and batch["label"].dtype == torch.int64
    assert type(batch["image"]) is torch.Tensor, "training batches carry plain tensors, not MetaTensors"
    assert batch["image"].min() >= 0.0 and batch["image"].max() <= 1.0
    assert set(batch["label"].unique().tolist()) <= {0, 1, 2} and batch["label"].max() > 0
    assert len(batch["case_id"]) == 4 and all(c.startswith("phantom") for c in batch["case_id"])
    assert (dm.num_classes, dm.in_channels, dm.roi_size) == (3, 1, (32, 32, 32))


def test_val_batches_are_whole_padded_volumes(synthetic_root):
    dm = build_datamodule(synthetic_cfg(synthetic_root))
    dm.setup("validate")

    batches = list(dm.val_dataloader())

    assert len(batches) == 1  # a quarter of 3 cases, at least one
    batch = batches[0]
    assert batch["image"].shape == (1, 1, 48, 48, 32)  # 40 x 36 x 32 padded to multiples of 16 (>= roi 32)
    assert batch["label"].shape == (1, 1, 48, 48, 32) and batch["label"].dtype == torch.int64
    assert batch["case_id"] == ["phantom002"]


def test_eval_dataset_keeps_affine_and_pixdim(synthetic_root):
    dm = build_datamodule(synthetic_cfg(synthetic_root, pad_divisor=None))
    item = dm.eval_dataset("validation")[0]

    image, label = item["image"], item["label"]
    assert isinstance(image, MetaTensor) and isinstance(label, MetaTensor)
    assert image.shape == (1, *SIZE) and label.shape == (1, *SIZE) and label.dtype == torch.int64
    assert torch.allclose(image.pixdim.float(), torch.tensor([1.5, 1.5, 1.5]))
    # stored LPS-like (negative x, y steps); reoriented to RAS: positive diagonal, same world positions
    assert torch.all(torch.diagonal(image.affine)[:3] > 0)
    assert item["case_id"] == "phantom002"
    # CT window: air (-1000 HU) -> 0; organ 2 (about 160 HU) -> (160 + 175) / 425 = 0.79
    assert image[label == 0].min() == 0.0
    assert abs(image[label == 2].mean().item() - 335 / 425) < 0.03


def test_mri_uses_percentiles_not_a_ct_window(synthetic_root):
    cfg = synthetic_cfg(synthetic_root, modality="mri", intensity={"lower": 0.0, "upper": 100.0}, pad_divisor=None)
    image = build_datamodule(cfg).eval_dataset()[0]["image"]
    assert image.min() == 0.0 and image.max() == 1.0  # min/max of the volume, whatever its units


def test_dictconfig_section_is_resolved(synthetic_root):
    cfg = OmegaConf.create({"data": synthetic_cfg(synthetic_root, roi_size="${roi}"), "roi": 32})
    assert build_datamodule(cfg.data).roi_size == (32, 32, 32)
    cfg = OmegaConf.create({"data": synthetic_cfg(synthetic_root, roi_size="${missing}")})
    with pytest.raises(ConfigError, match="data"):
        build_datamodule(cfg.data)


def test_repeats_multiplies_the_training_epoch(synthetic_root):
    dm = build_datamodule(synthetic_cfg(synthetic_root, repeats=3))
    dm.setup("fit")
    assert len(dm.train_dataset) == 3 * 2


def test_crop_ratios_centre_crops_on_the_weighted_classes(tmp_path):
    # a 64^3 volume with a 4^3 class-2 blob in one corner: 16^3 crops centred on class 2 all hold it, crops
    # centred positive/negative 1:1 (class 1 fills half the volume) mostly miss it
    label = torch.zeros(1, 64, 64, 64, dtype=torch.int64)
    label[:, 32:] = 1
    label[:, 50:54, 50:54, 50:54] = 2
    sample = {"image": torch.rand(1, 64, 64, 64), "label": label}

    def holding_class_2(**overrides) -> int:
        options = parse_options(synthetic_cfg(tmp_path, roi_size=[16, 16, 16], num_samples=20, **overrides))
        crop = _crop(options)
        crop.set_random_state(seed=0)
        return sum(bool((c["label"] == 2).any()) for c in crop(sample))

    assert holding_class_2(crop_ratios=[0, 0, 1]) == 20
    assert holding_class_2(crop_ratios=[1, 1, 0]) < 5
    assert holding_class_2() < 5  # default: positive/negative 1:1


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("modality", "pet", "data.modality"),
        ("roi_size", [32, 0, 32], "data.roi_size"),
        ("roi_size", [32.5, 32, 32], "data.roi_size"),
        ("roi_sise", [32, 32, 32], "roi_size"),  # typo: names the closest key
        ("num_classes", 1, "data.num_classes"),
        ("class_names", ["a", "b"], "data.class_names"),
        ("spacing", [1.0, -1.0, 1.0], "data.spacing"),
        ("intensity", {"lower": 1.0, "upper": 99.0}, "data.intensity.lower"),  # MRI setting on CT
        ("augment", {"flip": 2.0}, "data.augment.flip"),
        ("orientation", "XYZ", "data.orientation"),
        ("prepare", {"name": "nonexistent"}, "data.prepare.name"),
        ("crop_ratios", [1, 1], "data.crop_ratios"),  # one per class: 3 classes
        ("crop_ratios", [1, -1, 1], "data.crop_ratios"),
        ("crop_ratios", [0, 0, 0], "data.crop_ratios"),
    ],
)
def test_bad_config_values_raise_config_error(tmp_path, key, value, match):
    with pytest.raises(ConfigError, match=match):
        dm = build_datamodule(synthetic_cfg(tmp_path, **{key: value}))
        dm.prepare_data()


def test_btcv_datalist_helper_uses_the_synapse_split(tmp_path):
    for n in range(1, 41):
        if n in (9, 10, 11, 12, 13, 14, 15, 16, 17, 18):  # BTCV numbering has gaps: 30 labelled cases
            continue
        for kind, folder in (("img", "imagesTr"), ("label", "labelsTr")):
            (tmp_path / folder).mkdir(exist_ok=True)
            (tmp_path / folder / f"{kind}{n:04d}.nii.gz").touch()

    path = write_btcv_datalist(tmp_path)

    content = json.loads(path.read_text())
    assert len(content["training"]) == 18 and len(content["validation"]) == 12
    assert content["validation"][0] == {"image": "imagesTr/img0001.nii.gz", "label": "labelsTr/label0001.nii.gz"}
    assert sorted(BTCV_VALIDATION_CASES) == [int(e["image"][-11:-7]) for e in content["validation"]]


DATA_CONFS = sorted(CONF_DATA.glob("*.yaml"))


@pytest.mark.parametrize("path", DATA_CONFS, ids=lambda p: p.stem)
def test_every_data_conf_builds_a_datamodule(path, tmp_path, monkeypatch):
    monkeypatch.setenv("ROBUSTSEG_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("ROBUSTSEG_CACHE", str(tmp_path / "cache"))
    cfg = OmegaConf.create({"data": OmegaConf.load(path)})
    OmegaConf.set_struct(cfg, True)

    dm = build_datamodule(cfg.data)

    assert dm.options.name == path.stem
    assert len(dm.class_names) == dm.num_classes and dm.in_channels >= 1
    assert all(s % 32 == 0 for s in dm.roi_size)  # legal for SwinUNETR
    assert str(dm.options.root).startswith(str(tmp_path))
    if cfg.data.prepare is None:  # real datasets: an empty root names the missing datalist
        with pytest.raises(DataError, match=str(tmp_path / "data" / path.stem / "dataset.json")):
            dm.validate()


def test_synthetic_conf_prepares_and_trains(tmp_path, monkeypatch):
    monkeypatch.setenv("ROBUSTSEG_CACHE", str(tmp_path))
    cfg = OmegaConf.create({"data": OmegaConf.load(CONF_DATA / "synthetic.yaml")})
    cfg.data.prepare.size = [32, 32, 32]  # smaller than shipped, for speed

    dm = build_datamodule(cfg.data)
    cases = dm.validate()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))

    assert (tmp_path / "synthetic" / "dataset.json").is_file()
    assert len(cases["training"]) == 4 and len(cases["validation"]) == 2
    assert batch["image"].shape == (4, 1, 32, 32, 32)
    assert np.isin(batch["label"].unique().numpy(), [0, 1, 2]).all()


def test_training_crops_follow_the_torch_seed(synthetic_root):
    def first_batch(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        dm = build_datamodule(synthetic_cfg(synthetic_root))
        dm.setup("fit")
        torch.manual_seed(seed)  # the loader's shuffle
        return next(iter(dm.train_dataloader()))["image"]

    assert torch.equal(first_batch(0), first_batch(0))
    assert not torch.equal(first_batch(0), first_batch(1))


@pytest.mark.parametrize("name", [p.stem for p in DATA_CONFS])
def test_every_data_conf_composes_through_load_config(name, tmp_path, monkeypatch):
    from robustseg.config import load_config

    monkeypatch.setenv("ROBUSTSEG_DATA", str(tmp_path))
    cfg = load_config("train", [f"data={name}"])
    dm = build_datamodule(cfg.data)
    assert dm.options.name == name and dm.num_classes == cfg.data.num_classes


def test_multichannel_images_from_a_list_of_files(tmp_path):
    write_synthetic_dataset(tmp_path, num_cases=2, size=16, num_classes=3)
    content = json.loads((tmp_path / "dataset.json").read_text())
    for entries in content.values():
        for entry in entries:
            entry["image"] = [entry["image"], entry["image"]]  # e.g. CT + PET
    (tmp_path / "dataset.json").write_text(json.dumps(content))

    cfg = synthetic_cfg(tmp_path, in_channels=2, roi_size=16, batch_size=1, modality="ct_pet", intensity={})
    dm = build_datamodule(cfg)
    dm.setup("fit")

    assert next(iter(dm.train_dataloader()))["image"].shape == (2, 2, 16, 16, 16)
    image = dm.eval_dataset()[0]["image"]  # (2, D, H, W): channel 0 CT-windowed, channel 1 SUV-scaled
    assert image.shape[0] == 2 and image.min() >= 0 and image.max() <= 1
    assert not torch.equal(image[0], image[1])  # the same HU volume, normalised two ways
    with pytest.raises(ConfigError, match="data.in_channels"):
        build_datamodule({**cfg, "in_channels": 1})
