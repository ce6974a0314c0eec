"""Resuming training never deletes earlier metrics: ``metrics.csv`` keeps the earlier epochs' rows and the W&B
logger continues the same run id (real CSV files and a real offline W&B run, read back)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from robustseg.config import load_config
from robustseg.loggers import KeepingExperimentWriter, previous_wandb_id
from robustseg.training import train

SIZE = 16


def fast_args(out: Path, data_root: Path, *extra: str) -> list[str]:
    return [
        "data=synthetic",
        f"data.root={data_root}",
        "data.prepare.num_cases=3",
        "data.prepare.num_validation=1",
        f"data.prepare.size=[{SIZE},{SIZE},{SIZE}]",
        f"data.roi_size=[{SIZE},{SIZE},{SIZE}]",
        "model=unet",
        "model.channels=[4,8,16]",
        "model.strides=[2,2]",
        "model.num_res_units=1",
        f"output_dir={out}",
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
        *extra,
    ]


RESUME = ("ckpt_path=last", "trainer.max_epochs=2")


def rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_csv_metrics_survive_a_resume(tmp_path):
    data = tmp_path / "data"
    run_dir = train(load_config("train", fast_args(tmp_path / "runs", data, "logger=csv")))
    metrics = run_dir / "csv" / "metrics.csv"
    first = rows(metrics)
    assert first and {r["epoch"] for r in first if r.get("epoch")} == {"0"}

    assert train(load_config("train", fast_args(tmp_path / "runs", data, "logger=csv", *RESUME))) == run_dir
    after = rows(metrics)
    kept = [{k: r.get(k, "") for k in first[0]} for r in after[: len(first)]]
    assert kept == first, "the earlier epoch's rows changed or disappeared"
    assert {r["epoch"] for r in after if r.get("epoch")} == {"0", "1"} and len(after) > len(first)
    assert "val/dice/clean" in after[-1] and after[-1]["val/dice/clean"] != ""


def test_csv_writer_appends_and_widens_the_header(tmp_path):
    """New metric names in a resumed run: the header grows, earlier rows stay (empty cells for the new column)."""
    (tmp_path / "metrics.csv").write_text("epoch,step,train/loss\n0,0,1.5\n0,1,1.25\n")
    writer = KeepingExperimentWriter(str(tmp_path))
    writer.log_metrics({"epoch": 1, "train/loss": 1.0}, step=2)
    writer.save()
    assert (tmp_path / "metrics.csv").read_text().splitlines() == [
        "epoch,step,train/loss",
        "0,0,1.5",
        "0,1,1.25",
        "1,2,1.0",
    ]
    writer.log_metrics({"epoch": 1, "val/dice/clean": 0.5}, step=3)
    writer.save()
    assert rows(tmp_path / "metrics.csv") == [
        {"epoch": "0", "step": "0", "train/loss": "1.5", "val/dice/clean": ""},
        {"epoch": "0", "step": "1", "train/loss": "1.25", "val/dice/clean": ""},
        {"epoch": "1", "step": "2", "train/loss": "1.0", "val/dice/clean": ""},
        {"epoch": "1", "step": "3", "train/loss": "", "val/dice/clean": "0.5"},
    ]


def test_previous_wandb_id_is_the_newest_run(tmp_path):
    for name in ("offline-run-20260101_100000-aaaa1111", "run-20260102_090000-bbbb2222", "latest-run", "debug.log"):
        (tmp_path / "wandb" / name).mkdir(parents=True)
    assert previous_wandb_id(tmp_path) == "bbbb2222"
    assert previous_wandb_id(tmp_path / "nothing") is None


@pytest.mark.slow
def test_wandb_resume_continues_the_same_run(tmp_path, monkeypatch):
    """Offline W&B: the resumed training writes into the same run id, after the first part's steps, and the first
    part's transaction log is left untouched (``wandb sync`` joins the parts in order)."""
    from test_wandb import read_wandb_log

    monkeypatch.setenv("WANDB_MODE", "offline")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    data = tmp_path / "data"
    run_dir = train(load_config("train", fast_args(tmp_path / "runs", data, "logger=wandb")))
    (first,) = sorted((run_dir / "wandb").glob("offline-run-*"))
    first_log = next(first.glob("run-*.wandb"))
    first_bytes = first_log.read_bytes()

    train(load_config("train", fast_args(tmp_path / "runs", data, "logger=wandb", *RESUME)))
    parts = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(parts) == 2 and parts[0] == first
    ids = {p.name.rsplit("-", 1)[-1] for p in parts}
    assert len(ids) == 1, f"a resumed training started a new W&B run: {[p.name for p in parts]}"
    assert first_log.read_bytes() == first_bytes

    def logged(part: Path, key: str) -> set[float]:
        records = read_wandb_log(next(part.glob("run-*.wandb")))
        return {
            float(item.value_json)
            for r in records
            if r.WhichOneof("record_type") == "history"
            for item in r.history.item
            if (item.key or "/".join(item.nested_key)) == key
        }

    assert logged(parts[0], "epoch") == {0} and logged(parts[1], "epoch") == {1}
    before, after = logged(parts[0], "trainer/global_step"), logged(parts[1], "trainer/global_step")
    assert before and after and min(after) >= max(before)  # the second part continues the step axis
