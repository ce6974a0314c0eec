"""A real nnU-Net v2 model folder, made by nnunetv2 itself, evaluated by robustseg (slow; needs ``.[nnunet-test]``).

nnunetv2 plans and preprocesses four synthetic CT-like cases and trains its own ``nnUNetTrainer`` for a few
iterations on the CPU with tiny plans (features 8-64, patch 24^3 < the 32^3 cases, so the sliding window blends).
robustseg then loads the folder with ``nnunet:PATH`` and must agree with ``nnUNetPredictor`` voxel for voxel up to
window-blending noise (Dice >= 0.99 per case and class), with and without mirroring; and a white-box attack through
``evaluate(cfg)`` must lower Dice.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

pytest.importorskip("nnunetv2", reason="nnU-Net v2 is an optional test extra: pip install -e '.[nnunet-test]'")
pytestmark = pytest.mark.slow

JOB = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path

    import nibabel as nib
    import numpy as np


    def main(root: Path) -> None:
        raw = root / "raw" / "Dataset042_Phantom"
        (raw / "imagesTr").mkdir(parents=True)
        (raw / "labelsTr").mkdir(parents=True)
        rng = np.random.default_rng(0)
        size = 32
        grid = np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing="ij"), -1).astype(np.float32)
        for i in range(4):
            c1 = rng.uniform(11, 21, 3)
            c2 = c1 + rng.uniform(-4, 4, 3)
            label = np.zeros((size,) * 3, np.uint8)
            label[np.linalg.norm(grid - c1, axis=-1) < rng.uniform(8, 11)] = 1
            label[np.linalg.norm(grid - c2, axis=-1) < rng.uniform(5, 7)] = 2
            image = np.where(label == 1, 60.0, np.where(label == 2, 160.0, -80.0)) + rng.normal(0, 20, label.shape)
            image += 0.5 - 300.0 * (grid[..., 0] / size) * (grid[..., 2] < 3)  # breaks the axes' symmetry
            nib.save(nib.Nifti1Image(image.astype(np.float32), np.eye(4)), raw / "imagesTr" / f"case{i}_0000.nii.gz")
            nib.save(nib.Nifti1Image(label, np.eye(4)), raw / "labelsTr" / f"case{i}.nii.gz")
        labels = {"background": 0, "organ1": 1, "organ2": 2}
        dataset = {"channel_names": {"0": "CT"}, "labels": labels, "numTraining": 4, "file_ending": ".nii.gz"}
        (raw / "dataset.json").write_text(json.dumps(dataset))

        import random

        import torch

        random.seed(0)
        np.random.seed(0)
        torch.manual_seed(0)
        from nnunetv2.experiment_planning.plan_and_preprocess_api import (
            extract_fingerprints, plan_experiments, preprocess,
        )

        extract_fingerprints([42], num_processes=1, show_progress_bar=False, verbose=False)
        plan_experiments([42])
        preprocess([42], configurations=("3d_fullres",), num_processes=(1,), show_progress_bar=False)
        os.environ["nnUNet_n_proc_DA"] = "0"  # single-threaded augmentation (the planner needs >= 1)
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

        pre = root / "preprocessed" / "Dataset042_Phantom"
        plans = json.loads((pre / "nnUNetPlans.json").read_text())
        config = plans["configurations"]["3d_fullres"]
        config["architecture"]["arch_kwargs"]["features_per_stage"] = [8, 16, 32, 64]  # tiny plans
        config["patch_size"] = [24, 24, 24]
        plans["continue_training"] = False
        trainer = nnUNetTrainer(plans, "3d_fullres", "all", json.loads((pre / "dataset.json").read_text()),
                                device=torch.device("cpu"))
        trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch = 5, 10, 1
        trainer.run_training()


    if __name__ == "__main__":
        main(Path(sys.argv[1]))
    """
)


@pytest.fixture(scope="module")
def nnunet(tmp_path_factory) -> dict:
    """Run nnunetv2's own planning, preprocessing and training in a subprocess; return the folders."""
    root = tmp_path_factory.mktemp("nnunet")
    env = {**os.environ, "nnUNet_compile": "f", "nnUNet_n_proc_DA": "1", "OMP_NUM_THREADS": "1"}
    env |= {f"nnUNet_{d}": str(root / d) for d in ("raw", "preprocessed", "results")}
    (root / "job.py").write_text(JOB)
    done = subprocess.run([sys.executable, str(root / "job.py"), str(root)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    folder = root / "results" / "Dataset042_Phantom" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    assert (folder / "fold_all" / "checkpoint_final.pth").is_file()
    return {"root": root, "folder": folder, "raw": root / "raw" / "Dataset042_Phantom"}


def robustseg_data(nnunet: dict, model) -> list[str]:
    """Overrides of conf/data/synthetic.yaml that read the nnU-Net raw cases as nnU-Net would preprocess them."""
    raw = nnunet["raw"]
    cases = [
        {"image": f"imagesTr/case{i}_0000.nii.gz", "label": f"labelsTr/case{i}.nii.gz", "id": f"case{i}"}
        for i in range(4)
    ]
    (raw / "robustseg.json").write_text(json.dumps({"training": cases[3:], "validation": cases[:3]}))
    window = model.preprocessing["intensity"]
    return [
        "data=synthetic",
        f"data.root={raw}",
        "data.datalist=robustseg.json",
        "data.prepare=null",
        f"data.intensity={{a_min: {window['a_min']!r}, a_max: {window['a_max']!r}}}",
        f"data.spacing={model.preprocessing['spacing']}",
        f"data.roi_size={list(model.roi_size)}",
        "data.pad_divisor=8",
    ]


def dice(a: np.ndarray, b: np.ndarray, c: int) -> float:
    denominator = (a == c).sum() + (b == c).sum()
    return 1.0 if denominator == 0 else 2.0 * ((a == c) & (b == c)).sum() / denominator


@pytest.mark.parametrize("mirror", [False, True])
def test_clean_prediction_agrees_with_nnunet_predictor(nnunet, mirror):
    from monai.inferers import sliding_window_inference
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from robustseg.config import load_config
    from robustseg.data import build_datamodule
    from robustseg.evaluation.resolve import resolve_model

    model = resolve_model(f"nnunet:{nnunet['folder']},checkpoint=final,mirror={mirror}", "runs", ["x"])
    assert model.class_names == ["background", "organ1", "organ2"] and model.roi_size == (24, 24, 24)
    assert model.extra["input_units"]["unit"].startswith("nnU-Net CTNormalization")
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirror, device=torch.device("cpu"))
    predictor.initialize_from_trained_model_folder(str(nnunet["folder"]), ("all",), "checkpoint_final.pth")
    cfg = load_config("evaluate", [*robustseg_data(nnunet, model), "logger=none"])
    datamodule = build_datamodule(cfg.data)
    dataset = datamodule.eval_dataset("validation")
    for i in range(1 if mirror else 3):
        image, properties = SimpleITKIO().read_images([str(nnunet["raw"] / "imagesTr" / f"case{i}_0000.nii.gz")])
        reference = predictor.predict_single_npy_array(image, properties)  # (z, y, x): SimpleITK's axis order
        case = dataset[i]
        assert case["image"].shape[1:] == (32, 32, 32)  # no padding: the volume is the file's voxels
        weights = model.extra["sliding_window"]["roi_weight_map"]  # nnU-Net's own Gaussian, step 0.5
        with torch.no_grad():
            x = case["image"].as_tensor()[None]  # (1, 1, 32, 32, 32)
            logits = sliding_window_inference(x, model.roi_size, 2, model.net, 0.5, roi_weight_map=weights)
            monai = sliding_window_inference(x, model.roi_size, 2, model.net, 0.5, "gaussian", sigma_scale=0.125)
        ours = logits.argmax(1)[0].numpy().transpose(2, 1, 0)  # (x, y, z) -> (z, y, x)
        assert (reference == 1).sum() > 100  # organ1 is segmented: the Dice below means something
        for c in (1, 2):
            assert dice(ours, reference, c) >= 0.99, (i, c, dice(ours, reference, c))
        # MONAI's own Gaussian (centred between voxels, erf kernel) blends slightly differently
        assert (monai.argmax(1)[0].numpy().transpose(2, 1, 0) == reference).mean() > 0.99


def test_window_weights_are_nnunets(nnunet):
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian

    from robustseg.external.nnunet import importance_map

    for patch in [(24, 24, 24), (20, 32, 17)]:
        reference = compute_gaussian(patch, 1 / 8, 10, dtype=torch.float16, device=torch.device("cpu")).float()
        assert torch.equal(importance_map(patch), reference)


def test_attack_through_evaluate_lowers_dice(nnunet, tmp_path):
    from robustseg.config import load_config
    from robustseg.evaluation import evaluate
    from robustseg.evaluation.resolve import resolve_model

    target = f"nnunet:{nnunet['folder']}:fold=all:checkpoint=final"  # ':' options survive the CLI's comma lists
    model = resolve_model(target, "runs", ["x"])
    overrides = [*robustseg_data(nnunet, model), "logger=none", f"output_dir={tmp_path}", f"target=[{target}]"]
    overrides += [
        "attacks=[pgd]",
        "eps=[8/255]",
        "+attack_overrides.pgd.steps=4",
        "max_cases=2",
        "frequency.bands=null",
    ]
    evaluate(load_config("evaluate", overrides))
    rows = {r["attack"]: r for r in csv.DictReader((tmp_path / "summary.csv").open())}
    assert float(rows["clean"]["dice_mean"]) > 0.3
    assert float(rows["pgd"]["dice_mean"]) < float(rows["clean"]["dice_mean"]) - 0.01  # 8/255 is ~6 HU here
    flags = {f["name"]: f for f in json.loads((tmp_path / "summary.json").read_text())["flags"]}
    assert not flags["gradients"]["raised"]


def test_checkpoint_loads_without_unpickling_code_and_custom_trainer_is_named(nnunet, tmp_path):
    import shutil

    from robustseg.errors import CheckpointError
    from robustseg.external import load_prefixed

    copy = tmp_path / "copy"
    shutil.copytree(nnunet["folder"], copy)
    plans = json.loads((copy / "plans.json").read_text())
    plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["features_per_stage"] = [8, 16, 32, 32]
    (copy / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(CheckpointError, match="nnUNetTrainer' may build a custom network"):
        load_prefixed(f"nnunet:{copy}")
    plans["configurations"]["3d_fullres"]["architecture"]["network_class_name"] = "umamba.nets.UMambaBot"
    (copy / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(CheckpointError, match="cannot import the network class 'umamba.nets.UMambaBot'"):
        load_prefixed(f"nnunet:{copy}")
