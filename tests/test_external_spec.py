"""External model YAMLs: every bad input fails naming the file, key and value; each model source loads."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from robustseg.errors import CheckpointError, ConfigError
from robustseg.evaluation.resolve import resolve_model
from robustseg.external import load_external
from robustseg.models import MODELS, TINY

ROI = [16, 16, 16]


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def tiny_unet() -> nn.Module:
    torch.manual_seed(0)
    return MODELS.build({"name": "unet", "in_channels": 1, "out_channels": 3, **TINY["unet"]}).eval()


TS = "torchscript: a.ts\nnum_classes: 3\nroi_size: [16, 16, 16]\n"
SD = f"state_dict: w.pt\nnum_classes: 3\nroi_size: {ROI}\n"
ARCH = "architecture: {name: unet, channels: [4, 8], strides: [2], num_res_units: 0}"


def test_state_dict_spec_loads_and_wraps_in_the_adapter(tmp_path):
    arch = {"name": "unet", "channels": [4, 8], "strides": [2], "num_res_units": 0}
    net = MODELS.build({**arch, "in_channels": 1, "out_channels": 3})
    torch.save(net.state_dict(), tmp_path / "w.pt")
    spec = write(tmp_path / "m.yaml", f"state_dict: w.pt\n{ARCH}\nnum_classes: 3\nroi_size: {ROI}\n")
    model = resolve_model(str(spec), tmp_path, ["synthetic"])
    x = torch.rand(2, 1, 16, 16, 16)
    torch.testing.assert_close(model.net(x), net.eval()(x))
    assert not model.net.training and model.extra["input_units"]["scale"] == [1.0]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (
            "torchscript: missing.ts\nnum_classes: 3\nroi_size: [16, 16, 16]\n",
            r"m.yaml: torchscript: file 'missing.ts'",
        ),
        ("num_classes: 3\nroi_size: [16, 16, 16]\n", r"exactly one model source"),
        ("torchscript: a.ts\nexport: b.pt2\nnum_classes: 3\nroi_size: [16, 16, 16]\n", r"exactly one model source"),
        ("torchscript: a.ts\nroi_size: [16, 16, 16]\n", r"num_classes: missing"),
        ("torchscript: a.ts\nnum_classes: 3\nroi_size: [16, 0, 16]\n", r"roi_size: expected a list of positive"),
        (TS + "roi_sise: 1\n", r"roi_sise: unknown key; did you"),
        (TS + "output: softmax\n", r"output: 'softmax' is not"),
        (TS + "input: {zscore: sometimes}\n", r"input.zscore"),
        (TS + "input: {mean: 1}\n", r"both mean and std"),
        (TS + "tta: {mirror: [3]}\n", r"tta.mirror"),
        (
            "torchscript: a.ts\nnum_classes: 3\nroi_size: [16, 16, 16]\nclass_names: [a, b]\n",
            r"class_names: expected 3",
        ),
        ("torchscript: a.ts\nnum_classes: 3\nroi_size: [16, 16, 16\n", r"m.yaml: not valid YAML"),
        ("- just\n- a list\n", r"expected a mapping"),
        (
            f"state_dict: w.pt\nnum_classes: 3\nroi_size: {ROI}\narchitecture: {{name: unet, chanels: [4]}}\n",
            r"chanels",
        ),
        (SD + "architecture: {name: unetz}\n", r"architecture.name"),
    ],
)
def test_bad_specs_name_file_key_and_value(tmp_path, text, match):
    torch.save(tiny_unet().state_dict(), tmp_path / "w.pt")
    (tmp_path / "a.ts").write_bytes(b"")
    with pytest.raises(ConfigError, match=match):
        load_external(write(tmp_path / "m.yaml", text))


def test_corrupt_torchscript_and_unsafe_state_dict_are_refused(tmp_path):
    (tmp_path / "bad.ts").write_bytes(b"not a zip archive at all")
    spec = write(tmp_path / "ts.yaml", f"torchscript: bad.ts\nnum_classes: 3\nroi_size: {ROI}\n")
    with pytest.raises(CheckpointError, match="bad.ts is not a readable TorchScript archive"):
        load_external(spec)
    torch.save({"state_dict": tiny_unet().state_dict(), "hook": Path("x")}, tmp_path / "unsafe.pt")  # needs unpickle
    spec = write(tmp_path / "sd.yaml", f"state_dict: unsafe.pt\n{ARCH}\nnum_classes: 3\nroi_size: {ROI}\n")
    with pytest.raises(CheckpointError, match="unsafe.pt"):
        load_external(spec)


def test_torchscript_ending_in_softmax_is_scored_through_log_probabilities(tmp_path):
    net = tiny_unet()
    torch.jit.trace(nn.Sequential(net, nn.Softmax(1)).eval(), torch.rand(2, 1, 16, 16, 16)).save(str(tmp_path / "m.ts"))
    spec = write(tmp_path / "m.yaml", f"torchscript: m.ts\nnum_classes: 3\nroi_size: {ROI}\noutput: probabilities\n")
    model = load_external(spec)
    x = torch.rand(2, 1, 16, 16, 16)
    torch.testing.assert_close(model.net(x).softmax(1), net(x).softmax(1), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(model.net(x), net(x).log_softmax(1), rtol=1e-4, atol=1e-4)


def test_python_entry_with_kwargs_and_weights(tmp_path, monkeypatch):
    package = tmp_path / "code"
    package.mkdir()
    write(
        package / "my_models_ext.py",
        """
        from torch import nn

        def build(width=4, classes=3):
            return nn.Sequential(nn.Conv3d(1, width, 3, padding=1), nn.ReLU(), nn.Conv3d(width, classes, 1))
        """,
    )
    monkeypatch.setattr(sys, "path", list(sys.path))
    spec = write(
        tmp_path / "py.yaml",
        f"python: my_models_ext:build\npython_path: code\nkwargs: {{width: 5}}\nnum_classes: 3\nroi_size: {ROI}\n"
        "input: {mean: 0.5, std: 0.25, unit: z}\n",
    )
    model = load_external(spec)
    assert model.net.net[0].out_channels == 5 and model.model_name == "python:my_models_ext:build"
    assert model.extra["input_units"] == {"scale": [4.0], "unit": "z"}  # 1 [0, 1] unit = 1 / 0.25 z-units
    x = torch.rand(1, 1, 16, 16, 16)
    torch.testing.assert_close(model.net(x), model.net.net((x - 0.5) / 0.25))
    bad = write(tmp_path / "bad.yaml", f"python: my_models_ext:nothing\nnum_classes: 3\nroi_size: {ROI}\n")
    with pytest.raises(ConfigError, match="has no callable 'nothing'"):
        load_external(bad)
    bad = write(
        tmp_path / "bad2.yaml", f"python: my_models_ext:build\nkwargs: {{depth: 2}}\nnum_classes: 3\nroi_size: {ROI}\n"
    )
    with pytest.raises(ConfigError, match="kwargs"):
        load_external(bad)
    bad = write(tmp_path / "bad3.yaml", f"python: 'os.system'\nnum_classes: 3\nroi_size: {ROI}\n")
    with pytest.raises(ConfigError, match="package.module:function"):
        load_external(bad)


def test_torch_export_program_static_and_dynamic(tmp_path):
    net = tiny_unet()
    x = torch.rand(2, 1, 16, 16, 16)
    static = torch.export.export(net, (x,))
    torch.export.save(static, tmp_path / "static.pt2")
    spec = write(tmp_path / "s.yaml", "export: static.pt2\nnum_classes: 3\n")
    model = load_external(spec)
    assert model.roi_size == (16, 16, 16) and model.model_name == "torch.export"
    three = torch.rand(3, 1, 16, 16, 16)  # the program's batch is static (2): run in chunks
    torch.testing.assert_close(model.net(three), net(three), rtol=1e-4, atol=1e-5)
    g = torch.autograd.grad(model.net(three.requires_grad_(True)).sum(), three)[0]
    assert g.abs().sum() > 0
    dim = torch.export.Dim("s", min=1, max=8)
    dynamic = torch.export.export(
        net, (x,), dynamic_shapes=({0: torch.export.Dim("b", max=8), 2: 8 * dim, 3: 8 * dim, 4: 8 * dim},)
    )
    torch.export.save(dynamic, tmp_path / "dyn.pt2")
    with pytest.raises(ConfigError, match="dynamic spatial sizes"):
        load_external(write(tmp_path / "d0.yaml", "export: dyn.pt2\nnum_classes: 3\n"))
    model = load_external(write(tmp_path / "d.yaml", "export: dyn.pt2\nnum_classes: 3\nroi_size: [24, 24, 24]\n"))
    y = torch.rand(1, 1, 24, 24, 24)
    torch.testing.assert_close(model.net(y), net(y), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ("in_channels: 2\n", r"in_channels=2.*in_channels=1"),
        ("spacing: [2.0, 2.0, 2.0]\n", r"spacing"),
        ("orientation: LPS\n", r"orientation"),
        ("class_names: [bg, liver, spleen]\n", r"trained for classes"),
        ("intensity: {a_min: -100.0, a_max: 200.0}\n", r"intensity"),
    ],
)
def test_model_is_checked_against_the_data_before_any_work(tmp_path, extra, match):
    from robustseg.config import load_config
    from robustseg.evaluation import evaluate

    torch.jit.trace(tiny_unet(), torch.rand(2, 1, 16, 16, 16)).save(str(tmp_path / "m.ts"))
    spec = write(tmp_path / "m.yaml", f"torchscript: m.ts\nnum_classes: 3\nroi_size: {ROI}\n" + extra)
    overrides = ["data=synthetic", "logger=none", f"data.root={tmp_path / 'nodata'}", f"target=[{spec}]"]
    with pytest.raises((CheckpointError, ConfigError), match=match):
        evaluate(load_config("evaluate", [*overrides, f"output_dir={tmp_path / 'out'}"]))
    assert not (tmp_path / "nodata").exists()  # refused before the data was prepared


def test_nnunet_target_parsing_and_region_labels(tmp_path):
    from robustseg.external.nnunet import labels_of, parse_target

    with pytest.raises(ConfigError, match="not an nnU-Net v2 trained model folder"):
        parse_target(str(tmp_path))
    (tmp_path / "plans.json").write_text("{}")
    (tmp_path / "dataset.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"'folds=0' is not one of key=value"):
        parse_target(f"{tmp_path},folds=0")
    assert parse_target(f"{tmp_path},fold=all,checkpoint=best")[1] == {"fold": "all", "checkpoint": "best"}
    brats = {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing": [3]}
    names, outputs, order = labels_of({"labels": brats, "regions_class_order": [1, 2, 3]})
    assert (names, outputs, order) == (["background", "whole tumor", "tumor core", "enhancing"], 3, [1, 2, 3])
    assert labels_of({"labels": {"background": 0, "liver": 1, "tumour": 2}}) == (
        ["background", "liver", "tumour"],
        3,
        None,
    )
    with pytest.raises(CheckpointError, match="no regions_class_order"):
        labels_of({"labels": brats})


def test_adapter_settings_are_part_of_the_model_identity(tmp_path):
    torch.jit.trace(tiny_unet(), torch.rand(2, 1, 16, 16, 16)).save(str(tmp_path / "m.ts"))
    base = f"torchscript: m.ts\nnum_classes: 3\nroi_size: {ROI}\n"
    plain = load_external(write(tmp_path / "a.yaml", base))
    mirrored = load_external(write(tmp_path / "b.yaml", base + "tta: {mirror: [0]}\n"))
    scaled = load_external(write(tmp_path / "c.yaml", base + "input: {scale: 2.0}\n"))
    again = load_external(write(tmp_path / "d.yaml", base))
    assert plain.extra["file_sha256"] == mirrored.extra["file_sha256"] == scaled.extra["file_sha256"]
    assert len({plain.checkpoint_sha256, mirrored.checkpoint_sha256, scaled.checkpoint_sha256}) == 3
    assert again.checkpoint_sha256 == plain.checkpoint_sha256
