"""Every sanity flag fires THROUGH the Evaluator (and the summary + flag pass that ``finalize`` runs on its records).

Models are intensity classifiers (no training needed; the phantom's classes sit at intensities 0, 0.5, 1) and
``craft_fn`` is replaced by scripted "attacks", so each test builds exactly the defect its flag must catch: a
model with masked gradients, an attack that perturbs at eps = 0, a budget sweep whose Dice rises (eps and VAFA's
q_max), a transfer attack stronger than every white-box attack. Each has a healthy control where the flag stays
quiet.
"""

from __future__ import annotations

import hashlib

import pytest
import torch
from conftest import make_volume_batch
from torch import Tensor, nn

from robustseg.config import CONF_DIR
from robustseg.evaluation import checks
from robustseg.evaluation.records import CaseLog
from robustseg.evaluation.resolve import LoadedModel
from robustseg.evaluation.runner import Evaluator, SlidingWindow
from robustseg.evaluation.store import AdversarialStore
from robustseg.evaluation.suite import build_suite
from robustseg.evaluation.summary import summarise

SIZE = 16


class IntensityNet(nn.Module):
    """Class k where the intensity is nearest k / 2; ``masked`` quantises the input first (zero gradients)."""

    def __init__(self, masked: bool = False) -> None:
        super().__init__()
        self.masked = masked
        self.register_buffer("centres", torch.tensor([0.0, 0.5, 1.0]).view(1, 3, 1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:  # (B, 1, D, H, W) -> (B, 3, D, H, W)
        if self.masked:
            x = torch.round(x * 4) / 4  # a step function: d/dx = 0 almost everywhere
        return -20.0 * (x - self.centres) ** 2


def loaded(label: str, net: nn.Module) -> LoadedModel:
    sha = hashlib.sha256(label.encode()).hexdigest()
    return LoadedModel(label, net.eval(), "intensity", 3, 1, (SIZE,) * 3, f"{label}.ckpt", sha, ["bg", "a", "b"])


def cases(n: int = 2) -> list[dict]:
    batch = make_volume_batch(batch_size=n, size=SIZE)
    return [{"image": batch["image"][i], "label": batch["label"][i], "case_id": f"case{i}"} for i in range(n)]


def identity_attack(attack, counter, image, label, **kw) -> Tensor:
    return image.clone()


def run(tmp_path, targets, suite, craft_fn=identity_attack, source=None, also_whitebox=False):
    """Run the Evaluator, then what ``finalize`` does with its records: summary rows and every flag."""
    log = CaseLog(tmp_path / "cases.jsonl")
    evaluator = Evaluator(
        targets,
        source,
        suite,
        AdversarialStore(tmp_path / "adversarial"),
        log,
        window=SlidingWindow(overlap=0.25, sw_batch_size=2, roi_size=(SIZE,) * 3),
        also_whitebox=also_whitebox,
        craft_fn=craft_fn,
    )
    evaluator.run(cases())
    records = list(log.records.values())
    rows = summarise(records, ["bg", "a", "b"])
    flags = checks.result_flags(rows, records, evaluator.flags, store_root=tmp_path / "adversarial")
    return rows, {name: [f for f in flags if f.name == name] for name in {f.name for f in flags}}


def suite(names, eps=("4/255",), q_max=None, overrides=None):
    return build_suite(list(names), list(eps), q_max, CONF_DIR, overrides or {})


@pytest.mark.parametrize("masked", [True, False])
def test_gradients_flag_fires_for_a_model_with_masked_gradients(tmp_path, masked):
    _, flags = run(tmp_path, [loaded("m", IntensityNet(masked=masked))], suite(["fgsm"]))
    (flag,) = flags["gradients"]
    assert flag.raised is masked and flag.checked
    assert ("zero 1.0000" in flag.detail) is masked


def test_gradients_flag_fires_when_the_model_cuts_the_graph(tmp_path):
    class Detached(IntensityNet):
        def forward(self, x: Tensor) -> Tensor:
            return super().forward(x.detach())

    _, flags = run(tmp_path, [loaded("m", Detached())], suite(["fgsm"]))
    assert flags["gradients"][0].raised and "zero 1.0000" in flags["gradients"][0].detail


def test_eps_zero_flag_fires_for_an_attack_that_perturbs_at_budget_zero(tmp_path):
    def sloppy(attack, counter, image, label, **kw):  # ignores its budget: +0.02 whatever eps says
        return (image + 0.02).clamp(0, 1)

    _, flags = run(tmp_path, [loaded("m", IntensityNet())], suite(["fgsm"]), craft_fn=sloppy)
    (flag,) = flags["eps_zero"]
    assert flag.raised and "input identical=False" in flag.detail


def test_eps_zero_flag_quiet_for_the_real_attack(tmp_path):
    _, flags = run(tmp_path, [loaded("m", IntensityNet())], suite(["fgsm"]), craft_fn=None)
    (flag,) = flags["eps_zero"]
    assert not flag.raised and flag.checked
    assert not any(f.raised for f in flags["budget"] + flags["determinism"] + flags["gradients"])


def _by_budget(threshold: float, field: str):
    """An attack that destroys the volume (all zeros) below ``threshold`` of ``field`` and is a no-op above it."""

    def craft(attack, counter, image, label, **kw):
        return torch.zeros_like(image) if getattr(attack, field) < threshold else image.clone()

    return craft


def test_monotonic_flag_fires_for_a_non_monotonic_eps_sweep(tmp_path):
    specs = suite(["fgsm"], eps=("2/255", "8/255"))
    rows, flags = run(tmp_path, [loaded("m", IntensityNet())], specs, craft_fn=_by_budget(4 / 255, "eps"))
    dice = {r["budget"]: r["dice_mean"] for r in rows if r["attack"] == "fgsm"}
    assert dice["2/255"] == 0.0 and dice["8/255"] > 0.9
    (flag,) = flags["monotonic"]
    assert flag.raised and "over eps" in flag.detail


def test_monotonic_flag_fires_for_a_non_monotonic_vafa_q_max_sweep(tmp_path):
    specs = suite(["vafa"], q_max=[10, 30], overrides={"vafa": {"steps": 1, "block_size": 8}})
    rows, flags = run(tmp_path, [loaded("m", IntensityNet())], specs, craft_fn=_by_budget(20, "q_max"))
    assert [r["budget"] for r in rows if r["attack"] == "vafa"] == ["q_max=10", "q_max=30"]
    (flag,) = flags["monotonic"]
    assert flag.raised and "over q_max" in flag.detail and "@10 ->" in flag.detail


def test_monotonic_flag_quiet_for_a_monotonic_sweep(tmp_path):
    specs = suite(["fgsm"], eps=("2/255", "8/255"))
    _, flags = run(tmp_path, [loaded("m", IntensityNet())], specs, craft_fn=_by_budget(-1, "eps"))
    assert not flags["monotonic"][0].raised


def test_transfer_vs_whitebox_fires_for_a_transfer_stronger_than_whitebox(tmp_path):
    surrogate, target = IntensityNet(), IntensityNet()

    def craft(attack, counter, image, label, **kw):  # the surrogate's volumes break everything, white-box nothing
        return torch.zeros_like(image) if counter.net is surrogate else image.clone()

    models = dict(source=loaded("s", surrogate), targets=[loaded("t", target)])
    rows, flags = run(tmp_path, models["targets"], suite(["fgsm"]), craft, models["source"], also_whitebox=True)
    transfer = [f for f in flags["transfer_vs_whitebox"] if f.detail.startswith("transfer")]
    assert len(transfer) == 1 and transfer[0].raised and "s->t" in transfer[0].detail

    # without also_whitebox the comparison cannot run: it says so instead of disappearing
    _, flags = run(tmp_path / "no_whitebox", models["targets"], suite(["fgsm"]), craft, models["source"])
    (flag,) = flags["transfer_vs_whitebox"]
    assert not flag.raised and not flag.checked and "also_whitebox=true" in flag.detail


def test_transfer_vs_whitebox_quiet_when_whitebox_is_stronger(tmp_path):
    surrogate, target = IntensityNet(), IntensityNet()

    def craft(attack, counter, image, label, **kw):
        return image.clone() if counter.net is surrogate else torch.zeros_like(image)

    rows, flags = run(tmp_path, [loaded("t", target)], suite(["fgsm"]), craft, loaded("s", surrogate), True)
    assert flags["transfer_vs_whitebox"] and not any(f.raised for f in flags["transfer_vs_whitebox"])
