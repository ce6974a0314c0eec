"""No code runs from a checkpoint: a pickle whose ``__reduce__`` writes a marker file is planted at every place
robustseg reads a checkpoint (evaluate ``--target`` / ``--source``, a run found under ``runs_root``, an external
model's ``state_dict:``, train ``ckpt_path=``, ``ckpt_path=last`` and a SLURM ``hpc_ckpt``), through the real
command-line entry points; the marker must never appear and the user gets one clear message (exit code 2)."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import pytest
import torch
import yaml

from robustseg.checkpoint_io import TRUST_ENV, safe_torch_load
from robustseg.cli import evaluate_main, train_main
from robustseg.errors import CheckpointError
from robustseg.models import TINY
from robustseg.systems import SegmentationSystem

SIZE = 16
TINY_UNET = {"name": "unet", "in_channels": 1, "out_channels": 3}
TINY_UNET.update({k: list(v) if isinstance(v, tuple) else v for k, v in TINY["unet"].items()})


class WritesMarker:
    """Unpickling this calls ``open(marker, "w")``: the file appears only if the pickle was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant(path: Path, marker: Path) -> Path:
    """A file shaped like a real robustseg checkpoint, plus one object whose unpickling writes ``marker``."""
    torch.manual_seed(0)
    system = SegmentationSystem(model=TINY_UNET, num_classes=3, roi_size=[SIZE] * 3)
    ckpt = {"state_dict": system.state_dict(), "hyper_parameters": dict(system.hparams), "epoch": 0}
    ckpt["hyper_parameters"]["payload"] = WritesMarker(marker)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return path


def good_checkpoint(path: Path) -> Path:
    torch.manual_seed(1)
    system = SegmentationSystem(model=TINY_UNET, num_classes=3, roi_size=[SIZE] * 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": system.state_dict(), "hyper_parameters": dict(system.hparams)}, path)
    return path


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


def data_args(root: Path) -> list[str]:
    return [
        "data=synthetic",
        f"data.root={root}",
        "data.prepare.num_cases=2",
        "data.prepare.num_validation=1",
        f"data.prepare.size=[{SIZE},{SIZE},{SIZE}]",
        f"data.roi_size=[{SIZE},{SIZE},{SIZE}]",
        "logger=none",
    ]


def evaluate_args(tmp_path: Path, data_root: Path, *args: str) -> list[str]:
    return [
        *data_args(data_root),
        f"runs_root={tmp_path / 'runs'}",
        f"output_dir={tmp_path / 'eval'}",
        "attacks=[fgsm]",
        "eps=[2/255]",
        *args,
    ]


def train_args(tmp_path: Path, data_root: Path, *args: str) -> list[str]:
    return [
        *data_args(data_root),
        "model=unet",
        "model.channels=[4,8,16]",
        "model.strides=[2,2]",
        "model.num_res_units=1",
        f"output_dir={tmp_path / 'runs'}",
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
        *args,
    ]


def refused(capsys, code: int, marker: Path, path: Path) -> str:
    """The common verdict: exit 2, the marker absent, one message naming the file, the reason and the way out."""
    err = capsys.readouterr().err
    assert not marker.exists(), "the planted pickle ran"
    assert code == 2, err
    assert "Traceback" not in err and err.startswith("error: ")
    assert str(path) in err and "arbitrary code" in err and TRUST_ENV in err
    return err


def test_the_planted_pickle_really_runs_code_when_unpickled(tmp_path):
    """Guards the other tests: the same file loaded the unsafe way does write the marker."""
    marker = tmp_path / "marker"
    path = plant(tmp_path / "evil.ckpt", marker)
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_evaluate_target_ckpt(tmp_path, data_root, capsys):
    marker, evil = tmp_path / "marker", plant(tmp_path / "evil.ckpt", tmp_path / "marker")
    code = evaluate_main(evaluate_args(tmp_path, data_root, "--target", str(evil)))
    refused(capsys, code, marker, evil)


def test_evaluate_source_ckpt(tmp_path, data_root, capsys):
    marker, evil = tmp_path / "marker", plant(tmp_path / "evil.ckpt", tmp_path / "marker")
    target = good_checkpoint(tmp_path / "good.ckpt")
    code = evaluate_main(evaluate_args(tmp_path, data_root, "--target", str(target), "--source", str(evil)))
    refused(capsys, code, marker, evil)


def test_evaluate_run_found_under_runs_root(tmp_path, data_root, capsys):
    """Merely lying under runs_root as the newest unet run is enough to be loaded by ``--target unet``."""
    marker = tmp_path / "marker"
    run = tmp_path / "runs" / "unet-synthetic-clean-20260101-000000"
    evil = plant(run / "checkpoints" / "best.ckpt", marker)
    config = {"model": TINY_UNET, "data": {"name": "synthetic"}, "choices": {"model": "unet", "data": "synthetic"}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    code = evaluate_main(evaluate_args(tmp_path, data_root, "--target", "unet"))
    refused(capsys, code, marker, evil)


def test_evaluate_external_state_dict(tmp_path, data_root, capsys):
    marker = tmp_path / "marker"
    evil = tmp_path / "ext" / "weights.pt"
    evil.parent.mkdir()
    torch.save({"weight": torch.zeros(2), "payload": WritesMarker(marker)}, evil)
    spec = {
        "state_dict": "weights.pt",
        "architecture": {k: v for k, v in TINY_UNET.items() if k not in ("in_channels", "out_channels")},
        "num_classes": 3,
        "roi_size": [SIZE] * 3,
    }
    (evil.parent / "model.yaml").write_text(yaml.safe_dump(spec))
    code = evaluate_main(evaluate_args(tmp_path, data_root, "--target", str(evil.parent / "model.yaml")))
    err = capsys.readouterr().err
    assert not marker.exists(), "the planted pickle ran"
    assert code == 2 and "Traceback" not in err and "weights.pt" in err and "arbitrary code" in err, err


def test_train_ckpt_path(tmp_path, data_root, capsys):
    marker, evil = tmp_path / "marker", plant(tmp_path / "evil.ckpt", tmp_path / "marker")
    code = train_main(train_args(tmp_path, data_root, f"ckpt_path={evil}"))
    refused(capsys, code, marker, evil)
    assert not (tmp_path / "runs").exists(), "a run directory was created before the checkpoint was checked"


def test_train_ckpt_path_last(tmp_path, data_root, capsys):
    marker = tmp_path / "marker"
    evil = plant(tmp_path / "runs" / "unet-synthetic-clean-20260101-000000" / "checkpoints" / "last.ckpt", marker)
    before = sorted(p.name for p in evil.parent.parent.rglob("*"))
    code = train_main(train_args(tmp_path, data_root, "ckpt_path=last"))
    refused(capsys, code, marker, evil)
    assert sorted(p.name for p in evil.parent.parent.rglob("*")) == before  # nothing written into the run


def test_train_slurm_requeue_checkpoint(tmp_path, data_root, capsys):
    """Lightning resumes from a run's ``hpc_ckpt_N.ckpt`` by itself: it is checked like any other."""
    marker = tmp_path / "marker"
    evil = plant(tmp_path / "runs" / "job" / "hpc_ckpt_3.ckpt", marker)
    code = train_main(train_args(tmp_path, data_root, "run_name=job"))
    refused(capsys, code, marker, evil)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "no such file"),
        (b"", "empty"),
        (b"\x80\x04garbage" * 30, "not a PyTorch checkpoint"),
        ("truncated", "corrupt or truncated"),
        ("plain pickle", "plain or legacy pickle"),
        ("directory", "is a directory"),
    ],
)
def test_unusable_files_give_one_clear_error(tmp_path, content, expected):
    path = tmp_path / "model.ckpt"
    if content == "truncated":
        good = good_checkpoint(tmp_path / "good.ckpt").read_bytes()
        path.write_bytes(good[: len(good) // 2])
    elif content == "plain pickle":
        path.write_bytes(pickle.dumps(WritesMarker(tmp_path / "marker")))
    elif content == "directory":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=expected) as info:
        safe_torch_load(path, what="checkpoint")
    assert str(path) in str(info.value) and not (tmp_path / "marker").exists()


def test_train_ckpt_path_empty_or_corrupt_is_one_message(tmp_path, data_root, capsys):
    for name, data in (("empty.ckpt", b""), ("corrupt.ckpt", b"PK\x03\x04 not really a zip" * 10)):
        path = tmp_path / name
        path.write_bytes(data)
        code = train_main(train_args(tmp_path, data_root, f"ckpt_path={path}"))
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err and str(path) in err, err
    assert not (tmp_path / "runs").exists()


def test_trusting_a_file_explicitly_loads_it(tmp_path, monkeypatch):
    """The expert's way out: only a file named in ROBUSTSEG_TRUST_PICKLE is fully unpickled."""
    marker = tmp_path / "marker"
    evil = plant(tmp_path / "evil.ckpt", marker)
    monkeypatch.setenv(TRUST_ENV, str(tmp_path / "other.ckpt"))
    with pytest.raises(CheckpointError):
        safe_torch_load(evil, what="checkpoint")
    assert not marker.exists()
    monkeypatch.setenv(TRUST_ENV, str(evil))
    loaded = safe_torch_load(evil, what="checkpoint")
    assert marker.exists() and "state_dict" in loaded


def test_every_real_checkpoint_loads_weights_only(tmp_path):
    """A checkpoint as robustseg writes it passes unchanged: the rule costs nothing for honest files."""
    path = good_checkpoint(tmp_path / "good.ckpt")
    loaded = safe_torch_load(path, what="checkpoint")
    assert set(loaded) == {"state_dict", "hyper_parameters"} and loaded["hyper_parameters"]["num_classes"] == 3


def test_no_unsafe_torch_load_left_in_the_package():
    """Every torch.load of robustseg goes through safe_torch_load (a grep, so a new call site cannot slip in)."""
    root = Path(__file__).resolve().parents[1] / "robustseg"
    call = re.compile(r"(?<![`\w.])(torch\.load\(|weights_only=False)")  # code, not ``docstring`` mentions
    offenders = [
        f"{p.relative_to(root)}:{i}"
        for p in sorted(root.rglob("*.py"))
        if p.name != "checkpoint_io.py"
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if call.search(line.split("#")[0])
    ]
    assert not offenders, f"load checkpoints with robustseg.checkpoint_io.safe_torch_load: {offenders}"
