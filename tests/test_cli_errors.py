"""Every user error is one clear message on stderr and exit code 2, never a traceback, and training writes nothing
(no orphan run directory with a config.yaml) before its configuration and output location are known valid."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from robustseg import training
from robustseg.cli import main, train_main
from robustseg.config import check_arguments
from robustseg.errors import ConfigError

SIZE = 16


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


def args(out: Path, data_root: Path, *extra: str) -> list[str]:
    return [
        "data=synthetic",
        f"data.root={data_root}",
        "data.prepare.num_cases=2",
        "data.prepare.num_validation=1",
        f"data.prepare.size=[{SIZE},{SIZE},{SIZE}]",
        f"data.roi_size=[{SIZE},{SIZE},{SIZE}]",
        "model=unet",
        "model.channels=[4,8,16]",
        "model.strides=[2,2]",
        "model.num_res_units=1",
        "logger=none",
        f"output_dir={out}",
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
        *extra,
    ]


def one_message(capsys, code: int, *expected: str) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and err.startswith("error: ") and err.count("error: ") == 1, err
    for text in expected:
        assert text in err, err
    return err


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("trainer.max_epochs=abc", "trainer.max_epochs='abc': expected an integer or null"),
        ("trainer.precision=17", "trainer.precision=17: expected one of"),
        ("trainer.devices=[a]", "trainer.devices=['a']"),
        ("system.lr=abc", "system.lr='abc': expected a number"),
        ("system.lr=-1", "system.lr=-1: expected a number > 0.0"),
        ("system.sw_overlap=1.0", "system.sw_overlap=1.0: expected a number >= 0.0 and < 1.0"),
        ("system.warmup_epochs=1.5", "system.warmup_epochs=1.5: expected an integer"),
    ],
)
def test_bad_values_fail_before_a_run_directory_exists(tmp_path, data_root, capsys, override, expected):
    out = tmp_path / "runs"
    code = train_main(args(out, data_root, override))
    one_message(capsys, code, expected)
    assert not out.exists(), "an orphan run directory was left behind"


def test_output_dir_is_an_existing_file(tmp_path, data_root, capsys):
    out = tmp_path / "taken"
    out.write_text("not a directory")
    code = train_main(args(out, data_root))
    one_message(capsys, code, f"output_dir={str(out)!r} is a file", "expected a directory")
    assert out.read_text() == "not a directory"


def test_output_dir_below_a_file(tmp_path, data_root, capsys):
    (tmp_path / "file").write_text("x")
    code = train_main(args(tmp_path / "file" / "runs", data_root))
    one_message(capsys, code, "output_dir=", f"({tmp_path / 'file'} is a file)")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only-mode directories")
def test_output_dir_read_only_for_real(tmp_path, data_root, capsys):
    out = tmp_path / "ro"
    out.mkdir(mode=0o555)
    try:
        code = train_main(args(out / "runs", data_root))
    finally:
        out.chmod(0o755)
    one_message(capsys, code, "is not writable", "output_dir=")
    assert list(out.iterdir()) == []


def test_output_dir_read_only(tmp_path, data_root, capsys, monkeypatch):
    """A read-only file system (EROFS) refuses writes even to root: access() says so before any work."""
    out = tmp_path / "ro"
    out.mkdir()
    real_access = os.access
    monkeypatch.setattr(training.os, "access", lambda p, mode: False if Path(p) == out else real_access(p, mode))
    code = train_main(args(out / "runs", data_root))
    one_message(capsys, code, "is not writable (read-only file system or no permission)", str(out))
    assert list(out.iterdir()) == []


@pytest.mark.parametrize(
    ("number", "reason"), [(errno.ENOSPC, "No space left on device"), (errno.EROFS, "Read-only file system")]
)
def test_run_directory_that_cannot_be_written_leaves_nothing(tmp_path, data_root, capsys, monkeypatch, number, reason):
    """The disk fills up (or turns read-only) as the run directory is made: one message, no orphan directory."""

    def fail(cfg, run_dir):
        (run_dir / "config.yaml.tmp").write_text("partial")  # what a full disk leaves mid-write
        raise OSError(number, reason, str(run_dir / "config.yaml.tmp"))

    monkeypatch.setattr(training, "_write_config", fail)
    out = tmp_path / "deep" / "runs"
    code = train_main(args(out, data_root))
    one_message(capsys, code, reason, "cannot write the run directory", "output_dir=")
    assert not (tmp_path / "deep").exists()


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (OSError(errno.ENOSPC, "No space left on device", "/data/out/x.nii.gz"), "the disk is full"),
        (OSError(errno.EROFS, "Read-only file system", "/ro/out"), "read-only"),
        (PermissionError(errno.EACCES, "Permission denied", "/root/out"), "permission denied"),
        (FileExistsError(errno.EEXIST, "File exists", "/out/report.md"), "a file stands where a directory"),
        (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/out/file/x"), "a file stands where a directory"),
    ],
)
def test_os_errors_anywhere_become_one_line(capsys, error, expected):
    """Whatever part of a run hits the OS error (training, evaluation, a report), the user sees one line."""

    def run(cfg):
        raise error

    code = main("train", run, ["logger=none"])
    err = one_message(capsys, code, expected, error.filename, error.strerror)
    assert err.count("\n") == 1


def test_unknown_trainer_key_names_the_closest(tmp_path):
    with pytest.raises(ConfigError, match="Did you mean 'trainer.max_epochs'"):
        from lightning import Trainer

        check_arguments(Trainer.__init__, {"max_epohcs": 3}, "trainer")


def test_evaluate_output_dir_is_a_file(tmp_path, data_root, capsys):
    """The evaluation side's output checks reach the user the same way: one line, exit 2."""
    from robustseg.cli import evaluate_main

    out = tmp_path / "report"
    out.write_text("a file")
    data = [a for a in args(out, data_root) if a.startswith(("data", "logger"))]
    code = evaluate_main([*data, "--target", "unet", f"runs_root={tmp_path / 'runs'}", f"output_dir={out}"])
    one_message(capsys, code, str(out))
    assert out.read_text() == "a file"


def test_multi_line_messages_are_printed_on_one_line(capsys):
    from robustseg.errors import DataError

    def run(cfg):
        raise DataError("image a.nii.gz and label b.nii.gz have different affines:\n[[1. 0.]\n [0. 1.]]\nvs\n[[2. 0.]]")

    code = main("train", run, ["logger=none"])
    err = one_message(capsys, code, "different affines: [[1. 0.] [0. 1.]] vs [[2. 0.]]")
    assert err.count("\n") == 1


def test_trainer_keys_robustseg_sets_itself_are_refused(tmp_path, data_root, capsys):
    out = tmp_path / "runs"
    code = train_main(args(out, data_root, "+trainer.logger=false"))
    one_message(capsys, code, "trainer.logger is set by robustseg", "logger=csv|wandb|none")
    assert not out.exists()
