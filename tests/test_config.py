from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from robustseg.config import CONF_DIR, groups, help_text, load_config
from robustseg.errors import ConfigError


@pytest.fixture
def conf(tmp_path: Path) -> Path:
    """A small conf/ tree with the real layout: groups, presets, an experiment."""
    files = {
        "train.yaml": "defaults: {data: small, model: net, attack: none}\nseed: 0\noutput_dir: runs\n"
        "system: {lr: 0.1, adv_mode: adversarial}\n",
        "data/small.yaml": "name: small\nnum_classes: 3\nroi_size: [32, 32, 32]\n",
        "data/big.yaml": "name: big\nnum_classes: 14\nroi_size: [96, 96, 96]\n",
        "model/net.yaml": "name: unet\nout_channels: ${data.num_classes}\nchannels: [4, 8]\n",
        "model/other.yaml": "name: unetr\nout_channels: ${data.num_classes}\nimg_size: ${data.roi_size}\n",
        "attack/pgd.yaml": "name: pgd\neps: 8/255\nsteps: 10\n",
        "attack/fgsm.yaml": "name: pgd\neps: 8/255\nstep_size: ${.eps}\nsteps: 1\n",
        "attack/vafa.yaml": "name: vafa\nq_max: 20\n",
        "experiment/paper.yaml": "defaults: {data: big, attack: pgd}\nsystem: {lr: 0.01}\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return tmp_path


def test_defaults_compose_and_interpolate(conf):
    cfg = load_config("train", [], conf_dir=conf)
    assert cfg.model.out_channels == 3 and cfg.attack is None
    assert dict(cfg.choices) == {"data": "small", "model": "net", "attack": "none"}


def test_group_pick_and_dotlist_override(conf):
    cfg = load_config("train", ["model=other", "data=big", "system.lr=0.5"], conf_dir=conf)
    assert cfg.model.name == "unetr" and list(cfg.model.img_size) == [96, 96, 96] and cfg.system.lr == 0.5


def test_experiment_repicks_groups_and_cli_wins(conf):
    cfg = load_config("train", ["experiment=paper", "system.lr=0.2"], conf_dir=conf)
    assert cfg.choices.data == "big" and cfg.attack.name == "pgd" and cfg.system.lr == 0.2
    assert cfg.choices.experiment == "paper"
    cfg = load_config("train", ["experiment=paper", "data=small"], conf_dir=conf)
    assert cfg.data.num_classes == 3  # a CLI pick beats the experiment's


def test_preset_interpolation_follows_override(conf):
    cfg = load_config("train", ["attack=fgsm", "attack.eps=0.01"], conf_dir=conf)
    assert cfg.attack.step_size == 0.01


def test_adv_flag_and_vaft(conf):
    assert load_config("train", ["--adv", "pgd"], conf_dir=conf).attack.name == "pgd"
    cfg = load_config("train", ["--adv=vaft"], conf_dir=conf)
    assert cfg.attack.name == "vafa" and cfg.system.adv_mode == "vaft"
    assert load_config("train", ["--model", "other", "--data", "big"], conf_dir=conf).model.name == "unetr"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["model=nett"], r"unknown model option 'nett'\. Did you mean 'net'\?"),
        (["--adv", "pgdd"], r"unknown attack option 'pgdd'\. Did you mean 'pgd'\?"),
        (["system.lrr=1"], r"unknown config key 'system.lrr'\. Did you mean 'system.lr'\?"),
        (["sytem.lr=1"], r"unknown config key 'sytem'\. Did you mean 'system'\?"),
        (["attack.eps=0.1"], r"attack is none; pick an option first, e.g. attack=NAME"),
        (["experiment=papr"], r"unknown experiment option 'papr'\. Did you mean 'paper'\?"),
        (["--mdel", "x"], r"unknown flag '--mdel'\. Did you mean --model\?"),
        (["--adv"], r"flag --adv needs a value"),
        (["seed"], r"expected key=value"),
    ],
)
def test_typos_fail_naming_the_closest_valid_choice(conf, argv, message):
    with pytest.raises(ConfigError, match=message):
        load_config("train", argv, conf_dir=conf)


def test_plus_adds_a_new_key(conf):
    assert load_config("train", ["+system.extra=3"], conf_dir=conf).system.extra == 3


def test_help_lists_groups_options_and_defaults(conf):
    text = help_text("train", conf_dir=conf)
    assert "model: net*, other" in text and "attack: fgsm, pgd, vafa" in text and "--adv" in text


def test_real_conf_help_lists_every_group():
    text = help_text("train")
    for group in ("data", "model", "attack", "trainer", "logger", "experiment"):
        assert f"  {group}:" in text


def test_every_real_conf_file_composes():
    """Each option of each group composes into train.yaml and resolves."""
    for group, options in groups(CONF_DIR).items():
        for option in options:
            cfg = load_config("train", [f"{group}={option}"])
            OmegaConf.to_container(cfg, resolve=True)
