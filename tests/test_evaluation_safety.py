"""Evaluation safety (issue 15): eval mode whatever the case order, output locks, unique file names, umask
permissions, settings checked before anything is written, progress."""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import threading

import pytest
import torch
from torch import nn

from robustseg.config import CONF_DIR
from robustseg.errors import CheckpointError, ConfigError
from robustseg.evaluation import validate
from robustseg.evaluation.lock import OutputLock, OutputLockedError
from robustseg.evaluation.progress import Progress
from robustseg.evaluation.records import CaseLog
from robustseg.evaluation.resolve import LoadedModel
from robustseg.evaluation.runner import Evaluator, PassCounter, SlidingWindow
from robustseg.evaluation.store import AdversarialStore, atomic_write_bytes
from robustseg.evaluation.suite import build_suite

ROI = (8, 8, 8)


class BNNet(nn.Module):
    """A 3-class net whose BatchNorm has non-trivial running statistics: train mode changes its output."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv3d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm3d(4)
        self.head = nn.Conv3d(4, 3, 1)
        self.bn.running_mean.copy_(torch.tensor([0.3, -0.2, 0.1, 0.5]))
        self.bn.running_var.copy_(torch.tensor([0.5, 2.0, 1.5, 0.7]))

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))))


def bn_model(net: nn.Module) -> LoadedModel:
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return LoadedModel("bn", net, "bn", 3, 1, ROI, checkpoint="bn.ckpt", checkpoint_sha256="b" * 64)


def cases() -> list[dict]:
    g = torch.Generator().manual_seed(1)
    out = []
    for i, shape in enumerate([(10, 9, 11), (9, 12, 8), (11, 10, 9)]):
        image = torch.rand(1, *shape, generator=g)
        label = (image > 0.6).long() + (image > 0.85).long()
        out.append({"image": image, "label": label, "case_id": f"c{i}"})
    return out


def evaluator(tmp_path, model: LoadedModel, name: str) -> Evaluator:
    suite = build_suite(["fgsm", "pgd"], ["4/255"], None, CONF_DIR, {"pgd": {"steps": 2}})
    return Evaluator(
        [model],
        None,
        suite,
        AdversarialStore(tmp_path / name / "adversarial"),
        CaseLog(tmp_path / name / "cases.jsonl"),
        window=SlidingWindow(overlap=0.25, sw_batch_size=2),
        bands={"low": (0.0, 0.3)},
    )


def results(ev: Evaluator) -> dict:
    fields = ("dice", "hd95", "nsd", "flip_rate", "l2", "linf", "freq_dice", "dice_counts")
    return {k: {f: r.get(f) for f in fields} for k, r in ev.log.records.items()}


def _strip_case(results_: dict, case: str) -> dict:
    return {k: v for k, v in results_.items() if k[-1] == case}


def test_bn_model_results_do_not_depend_on_case_order_or_shards(tmp_path):
    """Issue 15: after an attack the BN net was left in train mode: the order of cases changed the numbers."""
    net = BNNet()
    stats = {k: v.clone() for k, v in net.state_dict().items()}
    forward = evaluator(tmp_path, bn_model(net), "forward")
    forward.run(cases())
    backward = evaluator(tmp_path, bn_model(copy.deepcopy(net)), "backward")
    backward.run(list(reversed(cases())))
    single = evaluator(tmp_path, bn_model(copy.deepcopy(net)), "shard")
    single.run([cases()[2]])  # a shard holding only the last case
    assert results(forward) == results(backward)
    assert _strip_case(results(forward), "c2") == results(single)
    assert not net.training and not net.bn.training
    for k, v in net.state_dict().items():  # BN running statistics untouched by a whole evaluation
        assert torch.equal(v, stats[k]), k
    first = next(r for r in forward.log.records.values() if r["attack"] == "clean")
    # the clean prediction is the eval-mode prediction
    image = cases()[0]["image"][None]
    from monai.inferers import sliding_window_inference

    with torch.no_grad():
        ref = sliding_window_inference(image, ROI, 2, net.eval(), overlap=0.25, mode="gaussian").argmax(1)[0]
    label = cases()[0]["label"][0]
    assert first["dice_counts"]["pred"] == torch.bincount(ref.flatten(), minlength=3).tolist()
    assert first["dice_counts"]["intersection"] == torch.bincount(ref[ref == label], minlength=3).tolist()


def test_pass_counter_never_leaks_a_training_flag():
    net = BNNet().eval()
    counter = PassCounter(net)
    assert not counter.training
    counter.train(True)  # what an attack contract "restoring" the wrapper's mode does
    assert not counter.training and not net.training
    net.train()
    counter(torch.rand(2, 1, 4, 4, 4))
    assert not net.training


def test_lock_fails_at_once_detects_stale_and_can_wait(tmp_path):
    path = tmp_path / ".lock"
    first = OutputLock(path).acquire()
    owner = json.loads(path.read_text())
    assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
    with pytest.raises(OutputLockedError, match=rf"pid {os.getpid()}.*lock=wait"):
        OutputLock(path).acquire()
    got = []
    waiter = threading.Thread(target=lambda: got.append(OutputLock(path, "wait", poll_s=0.01).acquire()))
    waiter.start()
    first.release()
    waiter.join(timeout=60)
    assert got and got[0].owned
    got[0].release()
    dead = subprocess.Popen(["true"])
    dead.wait()
    path.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    with OutputLock(path) as lock:  # a stale lock of a dead process is taken over
        assert lock.owned and json.loads(path.read_text())["pid"] == os.getpid()
    assert not path.exists()
    with pytest.raises(ConfigError, match="lock='maybe'"):
        OutputLock(path, "maybe")


def test_unicode_case_ids_get_distinct_volume_files(tmp_path):
    store = AdversarialStore(tmp_path)
    ids = ["肝臓 01", "腎臓 01", "01", "0 1"]
    paths = [store.paths("unet", "pgd", "4/255", c)[0] for c in ids]
    assert len(set(paths)) == len(ids)
    assert all(p.name.isascii() for p in paths)
    for i, c in enumerate(ids):
        volume = torch.full((1, 2, 2, 2), float(i) / 10)
        store.save(volume, torch.eye(4).numpy(), {"case_id": c}, ("unet", "pgd", "4/255", c))
    for i, c in enumerate(ids):
        volume, _ = store.load(("unet", "pgd", "4/255", c), {"case_id": c})
        assert float(volume.mean()) == pytest.approx(i / 10)


@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_written_files_follow_the_umask(tmp_path, mask, mode):
    old = os.umask(mask)
    try:
        atomic_write_bytes(tmp_path / "summary.json", b"{}")
        store = AdversarialStore(tmp_path / "adv")
        nii = store.save(torch.zeros(1, 2, 2, 2), torch.eye(4).numpy(), {}, ("a", "b", "c", "d"))
        log = CaseLog(tmp_path / "cases.jsonl")
        log.append({"source": "", "target": "t", "attack": "clean", "budget": "0", "case_id": "d"})
    finally:
        os.umask(old)
    for path in (tmp_path / "summary.json", nii, nii.with_name("d-" + nii.name.split("-", 1)[1]), log.path):
        if path.exists():
            assert path.stat().st_mode & 0o777 == mode, path


@pytest.mark.parametrize("bad", [-1, 0, "abc", True, 1.5, "0"])
def test_max_cases_must_be_a_positive_integer_or_null(bad):
    with pytest.raises(ConfigError, match=f"max_cases={bad!r}"):
        validate.max_cases(bad)


def test_max_cases_accepts_positive_integers_and_null():
    assert validate.max_cases(None) is None and validate.max_cases(3) == 3 and validate.max_cases("2") == 2


def test_output_location_is_checked_before_anything_is_written(tmp_path):
    afile = tmp_path / "taken"
    afile.write_text("x")
    with pytest.raises(ConfigError, match="is an existing file"):
        validate.output_location(afile)
    with pytest.raises(ConfigError, match="is a file, so the directory cannot be created"):
        validate.output_location(afile / "sub" / "out")
    validate.output_location(tmp_path / "new" / "out")  # creatable: fine, and nothing was created
    assert not (tmp_path / "new").exists()


def test_run_directory_naming_another_architecture_is_refused(tmp_path):
    from test_evaluation_e2e import make_run

    from robustseg.evaluation.resolve import resolve_model

    run = make_run(tmp_path / "runs", "unet-synthetic", "unet", tmp_path / "data")
    text = (run / "config.yaml").read_text().replace("name: unet", "name: segresnet")
    (run / "config.yaml").write_text(text)
    with pytest.raises(CheckpointError, match="holds a 'unet' network but its run directory"):
        resolve_model(str(run), tmp_path / "runs", ["synthetic"])


def test_progress_reports_done_total_elapsed_and_eta():
    now = [0.0]
    progress = Progress(6, bar=False, clock=lambda: now[0])
    progress.skip(2)  # done in an earlier run: counted, not pacing the ETA
    now[0] = 10.0
    line = progress.update("c0 unet pgd@4/255")
    assert line.startswith("evaluate: 3/6 (50%) c0 unet pgd@4/255") and "elapsed 0m10s" in line
    assert "ETA 0m30s" in line  # 10 s per computed item, 3 left


def test_cascade_predicate_records_skipped_results(tmp_path):
    """A cascade hook sees the case's records so far; a skipped attack is recorded as such, without metrics."""
    seen = []

    def skip(case_id, spec, so_far):
        seen.append((case_id, spec.label, sorted(r["attack"] for r in so_far)))
        return spec.label == "pgd" and case_id == "c1"

    ev = evaluator(tmp_path, bn_model(BNNet()), "cascade")
    ev.skip = skip
    ev.run(cases()[:2])
    records = {(r["attack"], r["case_id"]): r for r in ev.log.records.values()}
    assert records[("pgd", "c1")]["skipped"] == "cascade" and "dice" not in records[("pgd", "c1")]
    assert "skipped" not in records[("pgd", "c0")] and records[("pgd", "c0")]["dice"]
    assert ("c1", "pgd", ["clean", "fgsm"]) in seen
    assert not list((tmp_path / "cascade" / "adversarial" / "bn" / "pgd").rglob("c1-*.nii.gz"))


def test_read_only_output_location_is_refused(tmp_path, monkeypatch):
    """As root every directory is writable, so the permission answer is simulated: the check must ask and refuse."""
    asked = []
    monkeypatch.setattr(validate.os, "access", lambda path, mode: asked.append(path) or False)
    with pytest.raises(ConfigError, match="is not writable by this user"):
        validate.output_location(tmp_path / "out")
    assert asked == [tmp_path]


def test_make_output_dir_turns_os_errors_into_config_errors(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="cannot create it"):
        validate.make_output_dir(tmp_path / "file" / "out")
