"""train(cfg) end to end on synthetic NIfTI data: run directory, checkpoints, resume, errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from robustseg.cli import main
from robustseg.config import load_config
from robustseg.errors import ConfigError
from robustseg.training import train

ROOT = Path(__file__).resolve().parents[1]
TINY_UNET = ["model=unet", "model.channels=[4,8,16]", "model.strides=[2,2]", "model.num_res_units=1"]


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("synthetic")


def fast_args(out: Path, data_root: Path, *extra: str) -> list[str]:
    return [
        *TINY_UNET,
        "data=synthetic",
        f"data.root={data_root}",
        f"output_dir={out}",
        "logger=none",
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
        *extra,
    ]


def test_fast_run_leaves_config_and_checkpoints_then_resumes(tmp_path, synthetic_root):
    run_dir = train(load_config("train", fast_args(tmp_path, synthetic_root)))
    assert run_dir.parent == tmp_path and run_dir.name.startswith("unet-synthetic-clean-")
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["model"]["out_channels"] == 3 and resolved["choices"]["data"] == "synthetic"
    first = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert (run_dir / "checkpoints" / "best.ckpt").is_file() and first["epoch"] == 0
    steps_per_epoch = first["global_step"]
    assert steps_per_epoch > 0

    # one more epoch of one batch: a resumed run ends at steps_per_epoch + 1, a fresh one would end at 2
    more = ("ckpt_path=last", "trainer.max_epochs=2", "trainer.limit_train_batches=1")
    resumed = train(load_config("train", fast_args(tmp_path, synthetic_root, *more)))
    assert resumed == run_dir
    second = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert second["global_step"] == steps_per_epoch + 1


def test_resume_without_a_previous_run_is_a_config_error(tmp_path, synthetic_root):
    with pytest.raises(ConfigError, match="ckpt_path=last: no unet-synthetic-clean-\\*/checkpoints/last.ckpt"):
        train(load_config("train", fast_args(tmp_path, synthetic_root, "ckpt_path=last")))


def test_missing_datalist_fails_before_training_with_one_message(tmp_path, capsys):
    code = main("train", train, ["data=btcv", f"data.root={tmp_path / 'empty'}", f"output_dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    assert code == 2 and "dataset.json" in err and str(tmp_path / "empty") in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_unknown_model_name_is_a_config_error(tmp_path, synthetic_root):
    with pytest.raises(ConfigError, match="unknown model 'unett'"):
        train(load_config("train", fast_args(tmp_path, synthetic_root, "model.name=unett")))


@pytest.mark.slow
def test_train_py_command_line(tmp_path, synthetic_root):
    """The real entry point: a run directory on stdout, and a clean error (exit 2) for a bad dataset root."""
    ok = subprocess.run(
        [sys.executable, "train.py", *fast_args(tmp_path, synthetic_root)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert ok.returncode == 0, ok.stderr[-2000:]
    run_dir = Path(ok.stdout.strip().splitlines()[-1])
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and (run_dir / "config.yaml").is_file()

    bad = subprocess.run(
        [sys.executable, "train.py", "data=btcv", f"data.root={tmp_path / 'nothing'}", f"output_dir={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert bad.returncode == 2 and "dataset.json" in bad.stderr and "Traceback" not in bad.stderr
