"""End-to-end ``evaluate(cfg)`` on synthetic NIfTI with two tiny models (white-box, transfer, resume, shards)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from robustseg.config import load_config
from robustseg.errors import CheckpointError, ConfigError
from robustseg.evaluation import evaluate
from robustseg.evaluation.lock import OutputLock, OutputLockedError, held
from robustseg.evaluation.records import read_records
from robustseg.evaluation.resolve import load_checkpoint, resolve_model
from robustseg.evaluation.shard import log_path
from robustseg.models import TINY
from robustseg.systems import SegmentationSystem

SIZE = 16


def make_run(
    runs_root: Path,
    name: str,
    model: str,
    data_root: Path,
    num_classes: int = 3,
    seed: int = 0,
    *,
    model_extra: dict | None = None,
    config_extra: dict | None = None,
    data_extra: dict | None = None,
    ckpt: str = "best",
) -> Path:
    """A run directory as ``train(cfg)`` leaves it: config.yaml and checkpoints/best.ckpt of a tiny system."""
    torch.manual_seed(seed)
    model_cfg = {"name": model, "in_channels": 1, "out_channels": num_classes, **TINY[model], **(model_extra or {})}
    model_cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in model_cfg.items()}
    classes = ["background", "organ1", "organ2", "organ3"][:num_classes]
    config = {
        "model": model_cfg,
        "data": {"name": "synthetic", "root": str(data_root), "num_classes": num_classes, **(data_extra or {})},
        "choices": {"model": model, "data": "synthetic"},
    }
    for key, value in (config_extra or {}).items():
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    system = SegmentationSystem(
        model=model_cfg, num_classes=num_classes, class_names=classes, roi_size=[SIZE] * 3, config=config
    )
    run = runs_root / name
    (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(config)))
    payload = {"state_dict": system.state_dict(), "hyper_parameters": dict(system.hparams)}
    torch.save(payload, run / "checkpoints" / f"{ckpt}.ckpt")
    return run


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eval")
    make_run(root / "runs", "unet-synthetic", "unet", root / "data")
    make_run(root / "runs", "segresnet-synthetic", "segresnet", root / "data", seed=1)
    return root


def eval_cfg(root: Path, out: Path, *args: str):
    attacks = next((a for a in args if a.startswith("attacks=")), "attacks=[fgsm,pgd]")
    pgd = ["+attack_overrides.pgd.steps=2"] if "pgd" in attacks else []  # overrides must name suite members
    return load_config(
        "evaluate",
        [
            "data=synthetic",
            "logger=none",
            f"data.root={root / 'data'}",
            "data.prepare.num_cases=5",
            "data.prepare.num_validation=3",
            f"data.prepare.size=[{SIZE},{SIZE},{SIZE}]",
            f"data.roi_size=[{SIZE},{SIZE},{SIZE}]",
            f"runs_root={root / 'runs'}",
            f"output_dir={out}",
            "attacks=[fgsm,pgd]",
            *pgd,
            "eps=[2/255,8/255]",
            *args,
        ],
    )


TRANSFER = ("--source", "unet", "--target", "segresnet,unet", "max_cases=1", "frequency.bands={low: [0.0, 0.2]}")


@pytest.mark.slow
def test_whitebox_and_transfer_end_to_end(workspace):
    out = workspace / "out_transfer"
    evaluate(eval_cfg(workspace, out, *TRANSFER))
    rows = list(csv.DictReader((out / "summary.csv").open()))
    keys = {(r["source"], r["target"], r["attack"], r["budget"]) for r in rows}
    for target in ("segresnet", "unet"):
        assert ("", target, "clean", "0") in keys
        for attack in ("fgsm", "pgd"):
            for budget in ("2/255", "8/255"):
                assert ("unet", target, attack, budget) in keys
        assert ("unet", target, "worst", "all") in keys
    assert (out / "report.md").read_text().count("Transfer matrix") == 1
    assert (out / "dice_vs_budget.png").stat().st_size > 0 and (out / "transfer_heatmap.png").stat().st_size > 0
    assert list((out / "montages").glob("*.png"))
    summary = json.loads((out / "summary.json").read_text())
    # crafted once per (source, attack, budget, case), never per target: 1 source x 4 x 1 case
    assert summary["stats"]["attack generations"] == 4
    assert "freq_dice_low" in rows[0]
    flags = {f["name"] for f in summary["flags"]}
    assert {"eps_zero", "determinism", "gradients", "budget", "store", "monotonic"} <= flags
    assert not any(f["raised"] for f in summary["flags"] if f["name"] in ("eps_zero", "budget", "store"))
    # rerun: everything is skipped, nothing is crafted again, the measured costs stay in the summary
    stored = {p: p.stat().st_mtime_ns for p in (out / "adversarial").rglob("*.nii.gz")}
    evaluate(eval_cfg(workspace, out, *TRANSFER))
    assert {p: p.stat().st_mtime_ns for p in (out / "adversarial").rglob("*.nii.gz")} == stored
    again = json.loads((out / "summary.json").read_text())["stats"]
    assert again["invocations (finished runs with these settings)"] == 2
    for name in ("attack generations", "attack forwards", "scoring forwards", "records"):
        assert again[name] == summary["stats"][name], name
    assert len(read_records(log_path(out, 0, 1))) == 2 + 2 * 4


@pytest.mark.slow
def test_resume_after_kill_and_shards(workspace):
    out = workspace / "out_whitebox"
    args = ("--target", "unet", "attacks=[fgsm]", "frequency.bands=null", "attack_mode=tiles")
    evaluate(eval_cfg(workspace, out, *args))
    path = log_path(out, 0, 1)
    full = read_records(path)
    data = path.read_bytes()
    lines = data.splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:-3]) + lines[-3][: len(lines[-3]) // 2])  # kill -9 mid-line, tail lost
    evaluate(eval_cfg(workspace, out, *args))
    resumed = read_records(path)
    key = lambda r: (r["source"], r["target"], r["attack"], r["budget"], r["case_id"])  # noqa: E731
    assert sorted(map(key, resumed)) == sorted(map(key, full))
    # other settings in the same directory: every attack result is recomputed, and counted once
    evaluate(eval_cfg(workspace, out, *args[:-1], "attack_mode=pipeline"))
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert {r["mode"] for r in rows if r["attack"] == "fgsm"} == {"pipeline"}
    assert {int(r["n_cases"]) for r in rows} == {3}
    # the same evaluation in two shards, merged, gives the same records
    sharded = workspace / "out_sharded"
    evaluate(eval_cfg(workspace, sharded, *args, "shard=0/2"))
    evaluate(eval_cfg(workspace, sharded, *args[:-1], "attack_mode=pipeline", "shard=1/2"))  # other settings
    with pytest.raises(ConfigError, match=r"other settings(.|\n)*threat model.mode: \"tiles\" != \"pipeline\""):
        evaluate(eval_cfg(workspace, sharded, *args, "shard=0/2", "merge=true"))
    evaluate(eval_cfg(workspace, sharded, *args, "shard=1/2"))
    evaluate(eval_cfg(workspace, sharded, *args, "shard=0/2", "merge=true"))
    rows = list(csv.DictReader((sharded / "summary.csv").open()))
    clean = next(r for r in rows if r["attack"] == "clean")
    assert int(clean["n_cases"]) == 3
    assert {r["mode"] for r in rows if r["attack"] == "fgsm"} == {"tiles"}
    merged = {key(r): r["dice"] for r in read_records(log_path(sharded, 0, 2)) + read_records(log_path(sharded, 1, 2))}
    single = {key(r): r["dice"] for r in resumed}
    assert {k: v for k, v in merged.items() if k in single} == single  # shards give the single run's numbers


def test_mismatched_checkpoint_names_keys_and_shapes(workspace, tmp_path):
    run = make_run(tmp_path / "runs", "four-classes", "unet", workspace / "data", num_classes=4)
    ckpt = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)
    ckpt["hyper_parameters"]["model"]["out_channels"] = 3  # weights of a 4-class net, loaded as 3 classes
    torch.save(ckpt, run / "checkpoints" / "best.ckpt")
    with pytest.raises(CheckpointError, match=r"shape mismatch.*\(4,"):
        load_checkpoint(run / "checkpoints" / "best.ckpt")
    other = make_run(tmp_path / "runs", "segresnet-as-unet", "segresnet", workspace / "data")
    ckpt = torch.load(other / "checkpoints" / "best.ckpt", weights_only=True)
    ckpt["hyper_parameters"]["model"] = {"name": "unet", "in_channels": 1, "out_channels": 3, **TINY["unet"]}
    torch.save(ckpt, other / "checkpoints" / "best.ckpt")
    with pytest.raises(CheckpointError, match="missing from the checkpoint"):
        resolve_model(str(other), tmp_path / "runs", ["synthetic"])


def test_label_set_mismatch_fails_clearly(workspace, tmp_path):
    make_run(workspace / "runs4", "unet4", "unet", workspace / "data", num_classes=4)
    cfg = eval_cfg(workspace, tmp_path / "o", "--target", "unet", f"runs_root={workspace / 'runs4'}")
    with pytest.raises(CheckpointError, match="4 classes but the data has 3"):
        evaluate(cfg)


KILL_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from test_evaluation_e2e import eval_cfg
from robustseg.evaluation import evaluate
evaluate(eval_cfg(Path({root!r}), Path({out!r}), *{args!r}))
"""
RESULT_FIELDS = ("dice", "hd95", "nsd", "flip_rate", "l2", "linf", "ssim", "dice_counts", "budget_ok")


@pytest.mark.slow
def test_kill_9_mid_run_loses_nothing_and_matches_an_uninterrupted_run(workspace):
    """A BatchNorm model: after kill -9 and resume the records equal an uninterrupted run's, bit for bit."""
    bn = make_run(workspace / "runs_bn", "unet-bn", "unet", workspace / "data", model_extra={"norm": "batch"})
    args = ("--target", str(bn), "attacks=[fgsm,pgd]", "eps=[8/255]", "frequency.bands=null", "sw.overlap=0.25")
    reference = workspace / "out_uninterrupted"
    evaluate(eval_cfg(workspace, reference, *args))
    out = workspace / "out_killed"
    path = log_path(out, 0, 1)
    script = KILL_SCRIPT.format(tests=str(Path(__file__).parent), root=str(workspace), out=str(out), args=args)
    env = {**os.environ, "WANDB_MODE": "disabled"}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env)
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if path.exists() and path.read_bytes().count(b"\n") >= 4:
            break
        time.sleep(0.05)  # polling the child's progress; no assertion depends on timing
    lock = out / ".lock.shard-0-of-1"
    if proc.poll() is None:  # while the child runs, a second evaluation of the same output fails at once
        assert held(lock)["pid"] == proc.pid
        with pytest.raises(OutputLockedError, match=f"pid {proc.pid}"):
            OutputLock(lock).acquire()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(read_records(path))
    assert (out / ".lock.shard-0-of-1").exists()  # the killed process's lock is stale: the resume takes it over
    evaluate(eval_cfg(workspace, out, *args))
    records = read_records(path)
    key = lambda r: (r["source"], r["target"], r["attack"], r["budget"], r["case_id"])  # noqa: E731
    keys = [key(r) for r in records]
    assert len(keys) == len(set(keys)) == 3 * (1 + 2)  # 3 cases x (clean + 2 attacks x 1 budget)
    assert 4 <= done_before < len(keys)
    assert (out / "report.md").exists() and not (out / ".lock.shard-0-of-1").exists()
    expected = {key(r): {f: r.get(f) for f in RESULT_FIELDS} for r in read_records(log_path(reference, 0, 1))}
    assert {key(r): {f: r.get(f) for f in RESULT_FIELDS} for r in records} == expected


def test_external_state_dict_and_torchscript(tmp_path):
    torch.manual_seed(0)
    arch = {"name": "unet", **{k: list(v) for k, v in TINY["unet"].items() if isinstance(v, tuple)}}
    arch["num_res_units"] = TINY["unet"]["num_res_units"]
    from robustseg.models import MODELS

    net = MODELS.build({**arch, "in_channels": 1, "out_channels": 3})
    torch.save(net.state_dict(), tmp_path / "weights.pt")
    spec = {"state_dict": "weights.pt", "architecture": arch, "num_classes": 3, "roi_size": [16, 16, 16]}
    (tmp_path / "ok.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(spec)))
    model = resolve_model(str(tmp_path / "ok.yaml"), tmp_path, ["synthetic"])
    assert model.model_name == "unet" and model.num_classes == 3 and not model.net.training
    (tmp_path / "bad.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create({**spec, "num_classes": 4})))
    with pytest.raises(CheckpointError, match=r"shape mismatch.*checkpoint \(3,"):
        resolve_model(str(tmp_path / "bad.yaml"), tmp_path, ["synthetic"])
    torch.jit.trace(net.eval(), torch.rand(2, 1, 16, 16, 16)).save(str(tmp_path / "model.ts"))
    ts = {"torchscript": "model.ts", "num_classes": 3, "roi_size": [16, 16, 16]}
    (tmp_path / "ts.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(ts)))
    scripted = resolve_model(str(tmp_path / "ts.yaml"), tmp_path, ["synthetic"])
    x = torch.rand(2, 1, 16, 16, 16)
    net.eval()
    assert torch.allclose(scripted.net(x), net(x), atol=1e-5)


def test_suspicious_cases_are_named_in_the_report(tmp_path):
    """A constant validation image is evaluated (a warning, not an error) and the report names the case."""
    import nibabel as nib
    import numpy as np

    from robustseg.data import build_datamodule

    cfg = eval_cfg(tmp_path, tmp_path / "out", "attacks=[fgsm]", "eps=[2/255]", "montage_cases=0")
    build_datamodule(cfg.data).prepare_data()  # the synthetic phantoms, then one of them made constant
    first = sorted((tmp_path / "data").rglob("*.nii.gz"))
    datalist = json.loads((tmp_path / "data" / "dataset.json").read_text())
    image = next(p for p in first if p.name == Path(datalist["validation"][0]["image"]).name)
    img = nib.load(image)
    nib.save(nib.Nifti1Image(np.zeros(img.shape, np.float32), img.affine), image)
    make_run(tmp_path / "runs", "unet-synthetic", "unet", tmp_path / "data")
    out = evaluate(cfg)
    report = (out / "report.md").read_text()
    line = next(x for x in report.splitlines() if x.startswith("- **data warnings**"))
    assert image.name.split(".")[0] in line and "all zero" in line
