"""The attack contract and behaviour, parametrised over every conf/attack/*.yaml preset (new ones are covered)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

from robustseg.attacks import ATTACKS, LOSSES, Attack, parse_budget
from robustseg.errors import ConfigError

ATTACK_CONFIGS = sorted(Path(__file__).parents[1].joinpath("conf", "attack").glob("*.yaml"))
IDS = [p.stem for p in ATTACK_CONFIGS]


def preset(path: Path, **overrides: Any) -> dict[str, Any]:
    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    cfg.update(overrides)
    return cfg


def seeded(path: Path, **overrides: Any) -> dict[str, Any]:
    """The preset with ``seed=0`` where it has a seed (VAFA is deterministic and has none)."""
    cfg = preset(path, **overrides)
    if "seed" in cfg:
        cfg["seed"] = 0
    return cfg


def build_fast(path: Path, **overrides: Any) -> Attack:
    """The shipped preset with 2 steps (and small VMI / VAFA settings) so the test stays fast."""
    cfg = preset(path)
    if "steps" in cfg:
        cfg["steps"] = min(cfg["steps"], 2)
    if cfg["name"] == "vmi_fgsm":
        cfg["n_samples"] = 2
    if "block_size" in cfg:
        cfg["block_size"] = 8
    cfg.update(overrides)
    return ATTACKS.build(cfg)


def budget_field(attack: Attack) -> str | None:
    names = {f.name for f in dataclasses.fields(attack)}
    return next((n for n in ("eps", "sigma") if n in names), None)


def test_every_preset_matches_its_dataclass():
    """Preset keys are exactly the dataclass fields plus ``name``; every registered attack has a preset."""
    used = set()
    for path in ATTACK_CONFIGS:
        cfg = preset(path)
        attack = ATTACKS.build(cfg)
        used.add(cfg["name"])
        assert set(cfg) - {"name"} == {f.name for f in dataclasses.fields(attack)}, path.name
    assert used == set(ATTACKS.names())


@pytest.mark.parametrize("path", ATTACK_CONFIGS, ids=IDS)
def test_attack_contract(path, tiny_net, volume_batch):
    images, labels = volume_batch["image"], volume_batch["label"]
    tiny_net.train()
    frozen = next(iter(tiny_net.parameters()))
    frozen.requires_grad_(False)  # a flag the attack must restore exactly as it found it
    flags = [p.requires_grad for p in tiny_net.parameters()]

    adversarial = build_fast(path)(tiny_net, images, labels)

    assert adversarial.shape == images.shape and adversarial.dtype == images.dtype
    assert not adversarial.requires_grad
    assert adversarial.min() >= 0.0 and adversarial.max() <= 1.0
    assert tiny_net.training, "attack must restore the model's mode"
    assert all(p.grad is None for p in tiny_net.parameters()), "attack must not touch parameter grads"
    assert [p.requires_grad for p in tiny_net.parameters()] == flags


class CountingNet(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net, self.calls = net, 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return self.net(x)


@pytest.mark.parametrize("path", ATTACK_CONFIGS, ids=IDS)
def test_forward_count_is_fixed(path, tiny_net, volume_batch):
    """The number of forwards depends on the config only, never on the data (DDP ranks stay in step)."""
    attack = build_fast(path, **({"seed": 0} if "seed" in preset(path) else {}))
    counts = []
    for images in (volume_batch["image"], torch.zeros_like(volume_batch["image"])):
        net = CountingNet(tiny_net)
        attack(net, images, volume_batch["label"])
        counts.append(net.calls)
    assert counts[0] == counts[1]


@pytest.mark.parametrize("path", ATTACK_CONFIGS, ids=IDS)
def test_budget_respected(path, tiny_net, volume_batch):
    images, labels = volume_batch["image"], volume_batch["label"]
    attack = build_fast(path)
    delta = attack(tiny_net, images, labels) - images
    if attack.threat_model == "linf":
        assert delta.abs().max() <= attack.eps + 1e-6
    elif attack.threat_model == "l2":
        assert delta.flatten(1).norm(dim=1).max() <= attack.eps + 1e-5


@pytest.mark.parametrize("path", ATTACK_CONFIGS, ids=IDS)
def test_zero_budget_returns_input(path, tiny_net, volume_batch):
    attack = build_fast(path)
    field = budget_field(attack)
    if field is None:
        pytest.skip("no norm budget (VAFA is bounded by its quantisation tables)")
    attack = dataclasses.replace(attack, **{field: 0.0})
    images = volume_batch["image"]
    assert torch.equal(attack(tiny_net, images, volume_batch["label"]), images)


@pytest.mark.parametrize("path", ATTACK_CONFIGS, ids=IDS)
def test_same_seed_same_result(path, tiny_net, volume_batch):
    images, labels = volume_batch["image"], volume_batch["label"]
    attack = build_fast(path, **({"seed": 0} if "seed" in preset(path) else {}))
    first = attack(tiny_net, images, labels)
    torch.manual_seed(123)  # the global RNG must not matter once the seed is set
    assert torch.equal(first, attack(tiny_net, images, labels))


def sensitive_net() -> nn.Module:
    """A small conv net with large weights: its loss reacts to small input changes (an untrained UNet in eval mode
    is nearly flat, which would make VAFA's integer table steps look like noise)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(1, 8, 3, padding=1), nn.Tanh(), nn.Conv3d(8, 3, 3, padding=1))
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(10)
    return net


@pytest.mark.parametrize("path", ATTACK_CONFIGS, ids=IDS)
def test_loss_goes_up(path, volume_batch):
    images, labels = volume_batch["image"], volume_batch["label"]
    attack = build_fast(path)
    if not attack.uses_gradients:
        pytest.skip("random baseline: no loss to raise")
    net = sensitive_net()
    adversarial = attack(net, images, labels)
    with torch.no_grad():
        assert LOSSES["dice_ce"](net(adversarial), labels) > LOSSES["dice_ce"](net(images), labels)


class PlantedNet(nn.Module):
    """Per-voxel two-class model predicting class 1 where ``x > 0.5``: a known small shift flips it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 2, kernel_size=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([-50.0, 50.0]).view(2, 1, 1, 1, 1))
            self.conv.bias.copy_(torch.tensor([25.0, -25.0]))

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


@pytest.mark.parametrize("path", ATTACK_CONFIGS, ids=IDS)
def test_planted_adversarial_is_found(path):
    """Every budgeted gradient attack breaks a model whose flip needs half of the budget (full preset steps)."""
    attack = ATTACKS.build(seeded(path))
    if not attack.uses_gradients or attack.threat_model is None:
        pytest.skip("no norm budget to plant an adversarial inside")
    size = 8
    margin = attack.eps / 2 if attack.threat_model == "linf" else attack.eps / 4 / size**1.5  # L2: a quarter
    images = torch.full((2, 1, size, size, size), 0.5 + margin)
    labels = torch.ones(2, 1, size, size, size, dtype=torch.long)
    net = PlantedNet()
    assert (net(images).argmax(1) == 1).all()
    assert (net(images - 2 * margin).argmax(1) == 0).all(), "the planted perturbation must flip the model"
    adversarial = attack(net, images, labels)
    flipped = (net(adversarial).argmax(1) == 0).float().mean()
    assert flipped > 0.99


def test_fgsm_preset_is_one_pgd_step(tiny_net, volume_batch):
    images, labels = volume_batch["image"], volume_batch["label"]
    path = next(p for p in ATTACK_CONFIGS if p.stem == "fgsm")
    attack = ATTACKS.build(preset(path))
    tiny_net.eval()
    x = images.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(LOSSES["dice_ce"](tiny_net(x), labels), x)
    expected = (images + 8 / 255 * grad.sign()).clamp(0, 1)
    torch.testing.assert_close(attack(tiny_net, images, labels), expected, rtol=0, atol=1e-6)


def test_fgsm_step_follows_eps_override():
    cfg = OmegaConf.load(next(p for p in ATTACK_CONFIGS if p.stem == "fgsm"))
    cfg.eps = "4/255"
    assert ATTACKS.build(OmegaConf.to_container(cfg, resolve=True)).step_size == pytest.approx(4 / 255)


@pytest.mark.parametrize("eps", [1 / 255, 8 / 255])
def test_pgd_stays_in_budget_and_raises_loss(eps, tiny_net, volume_batch):
    images, labels = volume_batch["image"], volume_batch["label"]
    attack = ATTACKS.build({"name": "pgd", "eps": eps, "step_size": eps / 4, "steps": 5, "loss": "ce"})
    adversarial = attack(tiny_net, images, labels)
    assert (adversarial - images).abs().max() <= eps + 1e-6
    tiny_net.eval()  # the attack optimised the eval-mode model
    with torch.no_grad():
        assert LOSSES["ce"](tiny_net(adversarial), labels) > LOSSES["ce"](tiny_net(images), labels)


def test_inference_mode_raises(tiny_net, volume_batch):
    attack = ATTACKS.build({"name": "pgd", "steps": 1})
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode=False"):
        attack(tiny_net, volume_batch["image"], volume_batch["label"])


def test_wrong_label_shape_raises(tiny_net, volume_batch):
    attack = ATTACKS.build({"name": "pgd", "steps": 1})
    with pytest.raises(ValueError, match=r"\(B, 1, D, H, W\)"):
        attack(tiny_net, volume_batch["image"], volume_batch["label"][:, 0])


@pytest.mark.parametrize(
    ("cfg", "field"),
    [
        ({"name": "pgd", "eps": -0.1}, "eps"),
        ({"name": "pgd", "eps": "nan"}, "eps"),
        ({"name": "pgd", "eps": "8/0"}, "eps"),
        ({"name": "pgd", "steps": 0}, "steps"),
        ({"name": "pgd", "loss": "hinge"}, "loss"),
        ({"name": "pgd", "targeted": True, "target": "nowhere"}, "target"),
        ({"name": "pgd", "targeted": True, "loss": "masked_ce"}, "loss"),
        ({"name": "gn", "sigma": -1}, "sigma"),
    ],
)
def test_bad_values_raise_config_error(cfg, field):
    with pytest.raises(ConfigError, match=field):
        ATTACKS.build(cfg)


def test_budget_strings():
    assert parse_budget("8/255", "eps") == pytest.approx(8 / 255)
    assert parse_budget(" 4 / 255 ", "eps") == pytest.approx(4 / 255)
    assert parse_budget(0.5, "eps") == 0.5
    assert ATTACKS.build({"name": "pgd", "eps": "4/255"}).eps == pytest.approx(4 / 255)


def test_targeted_moves_towards_background(tiny_net, volume_batch):
    images, labels = volume_batch["image"], volume_batch["label"]
    tiny_net.eval()  # the no-grad checks below must not update BatchNorm statistics between the two attacks
    cfg = {"name": "pgd", "eps": 0.05, "steps": 5, "step_size": 0.01, "random_start": False, "loss": "ce"}
    attack = ATTACKS.build({**cfg, "targeted": True})
    adversarial = attack(tiny_net, images, labels)
    background = torch.zeros_like(labels)
    with torch.no_grad():
        assert LOSSES["ce"](tiny_net(adversarial), background) < LOSSES["ce"](tiny_net(images), background)
    explicit = attack(tiny_net, images, labels, target=background)
    assert torch.equal(explicit, adversarial)
    with pytest.raises(ValueError, match="not targeted"):
        ATTACKS.build(cfg)(tiny_net, images, labels, target=background)


@pytest.mark.parametrize("path", ATTACK_CONFIGS, ids=IDS)
def test_targeted_planted(path):
    """Targeted mode of every gradient attack moves the planted model to the target map (here: background)."""
    attack = ATTACKS.build(seeded(path))
    if "targeted" not in preset(path) or attack.threat_model is None:
        pytest.skip("no targeted mode or no norm budget to plant an adversarial inside")
    attack = ATTACKS.build(seeded(path, targeted=True, target="background"))
    size = 8
    margin = attack.eps / 2 if attack.threat_model == "linf" else attack.eps / 4 / size**1.5
    images = torch.full((2, 1, size, size, size), 0.5 + margin)
    labels = torch.ones(2, 1, size, size, size, dtype=torch.long)
    net = PlantedNet()
    adversarial = attack(net, images, labels)
    assert (net(adversarial).argmax(1) == 0).float().mean() > 0.99


def test_each_submodule_keeps_its_own_training_flag(volume_batch):
    """A BatchNorm deliberately kept in eval inside a training model stays in eval (not model.train(was))."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.BatchNorm3d(4), nn.Conv3d(4, 3, 1), nn.Dropout(0.1))
    net.train()
    net[1].eval()
    modes = [m.training for m in net.modules()]
    ATTACKS.build({"name": "pgd", "steps": 1, "seed": 0})(net, volume_batch["image"], volume_batch["label"])
    assert [m.training for m in net.modules()] == modes


def test_eval_mode_during_the_attack(volume_batch):
    seen = []
    net = nn.Conv3d(1, 3, 1)
    net.register_forward_hook(lambda module, *_: seen.append(module.training))
    net.train()
    ATTACKS.build({"name": "pgd", "steps": 2, "seed": 0})(net, volume_batch["image"], volume_batch["label"])
    assert seen == [False, False] and net.training


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda x: x * 1.5, r"\[0, 1\].*min 0.*max 1\.5"),
        (lambda x: x - 0.25, r"min -0\.25"),
        (lambda x: x.index_fill(2, torch.tensor([3]), float("nan")), "non-finite"),
        (lambda x: x.index_fill(2, torch.tensor([3]), float("inf")), "non-finite"),
    ],
)
@pytest.mark.parametrize("name", ["pgd", "gn", "vafa"])
def test_inputs_outside_the_unit_range_are_refused(name, change, match, volume_batch):
    """The result is clipped to [0, 1]: an input outside it would be changed by the clipping alone (eps 0 moved an
    input in [0, 1.5] by 0.5), so it is refused, naming the range seen."""
    from robustseg.attacks.base import AttackInputError

    attack = ATTACKS.build({"name": name, **({"block_size": 8, "steps": 1} if name == "vafa" else {})})
    images = change(volume_batch["image"])  # the phantom spans exactly [0, 1]
    with pytest.raises(AttackInputError, match=match):
        attack(nn.Conv3d(1, 3, 1), images, volume_batch["label"])


@pytest.mark.parametrize(
    ("cfg", "field"),
    [
        ({"name": "pgd", "eps": 2}, "eps"),  # issue 15: attack.eps=2 in training was silently accepted
        ({"name": "pgd", "eps": 8}, "eps"),
        ({"name": "pgd", "eps": 1.0}, "eps"),
        ({"name": "bim", "eps": "255/255"}, "eps"),
        ({"name": "mi_fgsm", "eps": 4}, "eps"),
        ({"name": "gn", "sigma": 1}, "sigma"),
    ],
)
def test_whole_range_budgets_are_refused(cfg, field):
    with pytest.raises(ConfigError, match=rf"{field}.*whole \[0, 1\] intensity range.*8/255"):
        ATTACKS.build(cfg)


def test_large_budget_escape_and_l2_radius():
    """An explicit allow_large_budget lifts the guard; an L2 radius is a whole-volume norm and may exceed 1."""
    assert ATTACKS.build({"name": "gn", "sigma": 2, "allow_large_budget": True}).sigma == 2.0
    assert ATTACKS.build({"name": "pgd_l2", "eps": 3.0}).eps == 3.0
    with pytest.raises(ConfigError, match="allow_large_budget"):
        parse_budget(1.5, "eps", "PGD", maximum=1.0, escape="allow_large_budget")
    assert parse_budget(0.999, "eps", maximum=1.0) == 0.999
    with pytest.raises(ConfigError) as refused:  # PGD has no escape field: the message must not invent one
        ATTACKS.build({"name": "pgd", "eps": 2})
    assert "allow_large_budget" not in str(refused.value)
