"""Real offline W&B runs (no network) for an evaluation and a training run, read back from the files W&B wrote.

W&B 0.2x+ writes media and tables under ``<run>/files/`` and everything else (history, summary, config) into the
``run-<id>.wandb`` transaction log, a LevelDB-style record log of protobuf ``Record`` messages; it is read here
with the protobuf classes that ship with wandb, so a payload that W&B would reject, or that never reaches the
run, fails these tests.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import pytest

from robustseg.evaluation.report import write_outputs
from robustseg.evaluation.summary import summarise
from robustseg.evaluation.wandb_log import log_wandb

CLASSES = ["background", "liver", "tumour"]
PGD = {"name": "pgd", "eps": 8 / 255, "step_size": 0.01, "steps": 20, "random_start": True, "loss": "dice_ce"}
VAFA = {"name": "vafa", "q_max": 20, "steps": 20, "block_size": 32, "use_ssim": True, "init": "paper"}
BLOCK = 32768  # the record log's block size


def read_wandb_log(path: Path) -> list[Any]:
    """Every protobuf ``Record`` of a ``.wandb`` file (7-byte header, then 32 KiB blocks of chunked records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    pos, buffer, records = 7, b"", []
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            break
        buffer += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk: a whole record
            record = pb.Record()
            record.ParseFromString(buffer)
            records.append(record)
            buffer = b""
    return records


def run_contents(root: Path) -> dict[str, Any]:
    """The single offline run under ``root``: its files dir, summary, history rows and config, as W&B stored them."""
    runs = sorted(root.rglob("offline-run-*"))
    assert len(runs) == 1, f"expected one offline run under {root}, found {runs}"
    run = runs[0]
    (log,) = run.glob("run-*.wandb")
    summary: dict[str, Any] = {}
    history: list[dict[str, Any]] = []
    config: dict[str, Any] = {}
    for record in read_wandb_log(log):
        kind = record.WhichOneof("record_type")
        if kind == "summary":
            for item in record.summary.update:
                key = item.key or "/".join(item.nested_key)
                summary[key] = json.loads(item.value_json)
        elif kind == "history":
            history.append(
                {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            )
        elif kind in ("config", "run"):
            items = record.config.update if kind == "config" else record.run.config.update
            config.update({item.key: json.loads(item.value_json) for item in items})
    return {"dir": run, "files": run / "files", "summary": summary, "history": history, "config": config}


def table(files: Path, key: str) -> list[dict[str, Any]]:
    """A logged ``wandb.Table`` read back from its JSON under media/table/, as a list of row dicts."""
    (path,) = (files / "media" / "table").glob(f"{key}_*.table.json")
    content = json.loads(path.read_text())
    return [dict(zip(content["columns"], row)) for row in content["data"]]


def wandb_children() -> list[str]:
    """Command lines of this process's children that belong to wandb (its service must not outlive a run)."""
    me, found = str(os.getpid()), []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if fields[1] == me and "wandb" in cmdline:
            found.append(cmdline)
    return found


@pytest.fixture
def offline(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "wandb_dir"
    root.mkdir()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(root))
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    return root


def _records() -> list[dict[str, Any]]:
    base = {"mode": "pipeline", "window": {"roi": [16, 16, 16], "overlap": 0.5}, "spacing": [1.0, 1.0, 2.0]}
    base |= {"nsd_tolerance_mm": 2.0, "hd95_empty_pred": 0, "hd95_empty_truth": 0}
    out = []
    for case, shift in (("c0", 0.0), ("c1", 0.1)):
        metrics = {"dice": [0.99, 0.9 - shift, 0.8], "hd95": [3.0, 4.0], "nsd": [0.9, 0.8]}
        clean = {**base, **metrics, "source": "", "target": "unet", "attack": "clean", "budget": "0", "eps": 0.0}
        out.append({**clean, "case_id": case, "dice_mean": 0.85 - shift / 2, "hd95_mean": 3.5, "nsd_mean": 0.85})
        for source, attack, budget, eps, config, dice in (
            ("unet", "pgd", "8/255", 8 / 255, PGD, 0.3),
            ("unet", "vafa", "q_max=20", None, VAFA, 0.5),
            ("segresnet", "pgd", "8/255", 8 / 255, PGD, 0.6),
        ):
            out.append(
                {
                    **base,
                    **metrics,
                    "source": source,
                    "target": "unet",
                    "attack": attack,
                    "budget": budget,
                    "eps": eps,
                    "case_id": case,
                    "kind": "whitebox" if source == "unet" else "transfer",
                    "attack_config": config,
                    "dice_mean": dice - shift,
                    "hd95_mean": 20.0 + 10 * shift,
                    "nsd_mean": 0.5,
                    "budget_ok": True if eps is not None else None,  # bool and missing in one column (issue 9)
                    "linf": eps,
                    "psnr": float("inf") if case == "c0" and attack == "vafa" else 40.0,
                }
            )
    return out


def test_evaluation_logs_tables_plots_montages_and_flags_to_an_offline_run(tmp_path, offline):
    out = tmp_path / "eval"
    (out / "montages").mkdir(parents=True)
    rows = summarise(_records(), CLASSES, {"intensity": {"a_min": -175, "a_max": 250}, "seed": 3})
    flags = [
        {"name": "budget", "raised": False, "detail": "4/4 volumes within budget", "checked": True},
        {"name": "monotonic", "raised": True, "detail": "vafa rises", "checked": True},
        {"name": "transfer_vs_whitebox", "raised": False, "detail": "not checked: no white-box", "checked": False},
    ]
    import matplotlib.pyplot as plt

    plt.imsave(out / "montages" / "c0_unet_to_unet_pgd.png", [[0.0, 1.0], [1.0, 0.0]])
    paths = write_outputs(out, rows, flags, {"data": "synthetic"}, {"seconds": 1.5}, CLASSES)
    images = [p for p in paths.values() if p.suffix == ".png"]
    config = {"attacks": ["pgd", "vafa"], "seed": 3}
    payload = log_wandb({"name": "wandb", "mode": "auto"}, out, rows, flags, {"seconds": 1.5}, images, config)
    assert not wandb_children(), "a wandb process outlived the run"

    run = run_contents(offline)
    files, summary = run["files"], run["summary"]
    # scalars and flags in the run summary, exactly the payload
    assert summary["eval/dice/pgd@8/255/unet"] == pytest.approx((0.3 + 0.2) / 2)
    assert summary["eval/dice/pgd@8/255@segresnet/unet"] == pytest.approx(0.55)
    assert summary["eval/hd95/vafa@q_max=20/unet"] == pytest.approx(20.5)
    assert summary["flags/monotonic"] is True and summary["flags/budget"] is False
    assert summary["flags/transfer_vs_whitebox/status"] == "not checked"
    assert summary["cost/seconds"] == 1.5 and payload["flags/monotonic/status"] == "RAISED"
    assert run["config"]["attacks"] == ["pgd", "vafa"]
    # the summary table: every row, the threat model and the per-class columns, one type per column
    rows_back = {(r["source"], r["attack"], r["budget"]): r for r in table(files, "eval/summary")}
    pgd = rows_back[("unet", "pgd", "8/255")]
    assert pgd["attack.steps"] == 20 and pgd["attack.random_start"] is True and pgd["budget_ok"] is True
    assert pgd["budget_hu"] == pytest.approx(8 / 255 * 425) and pgd["seed"] == 3 and pgd["mode"] == "pipeline"
    assert pgd["dice_liver"] == pytest.approx(0.85) and pgd["hd95_tumour"] == pytest.approx(4.0)
    vafa = rows_back[("unet", "vafa", "q_max=20")]
    assert vafa["budget_ok"] is None and vafa["attack.block_size"] == 32 and vafa["budget_value"] == 20
    assert vafa["psnr"] == 40.0  # the inf of identical volumes is not a number W&B can chart; the finite mean
    assert ("unet", "worst", "all") in rows_back
    per_class = table(files, "eval/per_class")
    liver = next(r for r in per_class if (r["attack"], r["source"], r["class"]) == ("pgd", "unet", "liver"))
    assert liver["dice"] == pytest.approx(0.85) and "steps=20" in liver["threat_model"]
    matrix = table(files, "eval/transfer_matrix")
    assert {(r["source"], r["target"]) for r in matrix if r["attack"] == "pgd"} == {
        ("unet", "unet"),
        ("segresnet", "unet"),
    }
    flag_rows = {r["name"]: r for r in table(files, "eval/flags")}
    assert flag_rows["transfer_vs_whitebox"]["status"] == "not checked" and flag_rows["monotonic"]["raised"] is True
    threat = table(files, "eval/threat_model")
    assert any("block_size=32" in r["threat_model"] for r in threat)
    # plots and montages as images, and the report files saved with the run
    media = {p.name.split("_")[0] for p in (files / "media" / "images" / "eval").rglob("*.png")}
    assert (files / "media" / "images" / "eval" / "plots").is_dir() and (
        files / "media" / "images" / "eval" / "montages"
    ).is_dir()
    assert media and any(
        p.name.startswith("dice_vs_budget") for p in (files / "media" / "images" / "eval" / "plots").iterdir()
    )
    assert "worst case per metric" in (files / "report.md").read_text().lower()
    assert (files / "summary.csv").read_text().startswith("source,target,kind,attack")


def test_disabled_wandb_logs_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    rows = summarise(_records(), CLASSES)
    payload = log_wandb({"name": "wandb"}, tmp_path, rows, [], {}, [], {})
    assert payload["eval/dice/clean/unet"] == pytest.approx(0.825) and not list(tmp_path.rglob("offline-run-*"))


def test_training_logs_curves_and_slice_images_to_an_offline_run(tmp_path, offline):
    from robustseg.config import load_config
    from robustseg.training import train

    args = [
        "model=unet",
        "model.channels=[4,8]",
        "model.strides=[2]",
        "model.num_res_units=0",
        "data=synthetic",
        f"data.root={tmp_path / 'data'}",
        "data.prepare.num_cases=4",
        "data.prepare.num_validation=2",
        "data.prepare.size=[16,16,16]",
        "data.roi_size=[16,16,16]",
        f"output_dir={tmp_path / 'runs'}",
        "logger=wandb",
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
    ]
    train(load_config("train", args))
    assert not wandb_children(), "a wandb process outlived the training run"
    run = run_contents(tmp_path)
    keys = {k for row in run["history"] for k in row}
    assert "train/loss/clean" in keys or "train/loss/clean_epoch" in keys, sorted(keys)
    assert any(k.startswith("val/dice/clean") for k in keys), sorted(keys)
    assert any(k.startswith("val/slices/") for k in keys), sorted(keys)
    slices = list((run["files"] / "media" / "images" / "val").rglob("*.png"))
    assert slices and all(p.stat().st_size > 0 for p in slices)
    assert run["config"]["model"]["name"] == "unet"
    assert "val/dice/clean" in run["summary"] or any(k.startswith("val/dice/clean") for k in run["summary"])


@pytest.mark.slow
def test_evaluate_transfer_with_the_default_wandb_logger(tmp_path, offline):
    """Issue 9's reproduction: ``evaluate.py --source unet --target segresnet,unet`` with W&B (offline) must not
    crash in ``wandb.Table`` and must leave the summary, per-class and transfer tables in the run."""
    from test_evaluation_e2e import eval_cfg, make_run

    from robustseg.evaluation import evaluate

    make_run(tmp_path / "runs", "unet-synthetic", "unet", tmp_path / "data")
    make_run(tmp_path / "runs", "segresnet-synthetic", "segresnet", tmp_path / "data", seed=1)
    args = ("--source", "unet", "--target", "segresnet,unet", "max_cases=1", "logger=wandb", "frequency.bands=null")
    out = evaluate(eval_cfg(tmp_path, tmp_path / "out", *args))
    assert not wandb_children()
    run = run_contents(offline)
    summary = table(run["files"], "eval/summary")
    assert {(r["source"], r["target"], r["attack"], r["budget"]) for r in summary} >= {
        ("unet", "segresnet", "fgsm", "2/255"),
        ("unet", "unet", "fgsm", "8/255"),
        ("", "unet", "clean", "0"),
    }
    fgsm = next(r for r in summary if r["attack"] == "fgsm")
    assert fgsm["attack.steps"] == 1 and fgsm["attack.random_start"] is False and isinstance(fgsm["budget_ok"], bool)
    assert table(run["files"], "eval/per_class") and table(run["files"], "eval/transfer_matrix")
    assert run["summary"]["eval/dice/fgsm@8/255@unet/segresnet"] == pytest.approx(
        next(
            r["dice_mean"] for r in summary if (r["target"], r["attack"], r["budget"]) == ("segresnet", "fgsm", "8/255")
        )
    )
    assert (out / "report.md").exists() and (run["files"] / "report.md").exists()


def test_training_never_logs_into_a_run_left_open(tmp_path, offline):
    """A W&B run left open in the process (a notebook, an earlier crash) is finished, not reused by the next
    training's WandbLogger (Lightning reuses ``wandb.run`` when one is active)."""
    import wandb

    from robustseg.loggers import build_logger, finish

    stale = wandb.init(project="robustseg", dir=str(tmp_path / "stale"), mode="offline")
    logger = build_logger({"name": "wandb"}, tmp_path / "run", "fresh", {"model": {"name": "unet"}})
    try:
        assert logger.experiment.id != stale.id
        assert Path(logger.experiment.dir).is_relative_to(tmp_path / "run")
    finally:
        finish(logger)
    assert not wandb_children()
