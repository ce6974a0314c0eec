"""The attack suite: named suites (reliable, papers), groups, cascade marks, budget and override checks."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from robustseg.errors import ConfigError
from robustseg.evaluation.suite import build_suite

CONF = Path(__file__).parents[1] / "conf"


def test_reliable_suite_is_fixed_and_documented():
    specs = build_suite([], ["4/255", "8/255"], None, CONF, suites=["reliable"])
    assert [(s.label, s.budget) for s in specs] == [
        (label, budget) for label in ("apgd_mce", "apgd_bce", "apgd_js", "apgd_dce") for budget in ("4/255", "8/255")
    ]
    assert {s.config["loss"] for s in specs} == {"masked_ce", "masked_balanced_ce", "js", "dice_ce"}
    for spec in specs:
        assert spec.group == "reliable" and not spec.cascade
        assert spec.config["name"] == "apgd" and spec.config["steps"] == 100
        assert spec.config["radius_reduction"] and spec.config["track_best"] and spec.config["early_stop"]
        assert spec.norm == "linf" and spec.norm_bound == pytest.approx(spec.eps)
        spec.build()


def test_papers_suite_alongside_presets_and_cascade():
    specs = build_suite(["fgsm", "pgd"], ["8/255"], None, CONF, suites=["papers", "reliable"], cascade=True)
    assert [s.label for s in specs] == [
        "fgsm",
        "pgd",
        "segpgd",
        "cospgd",
        "apgd_mce",
        "apgd_bce",
        "apgd_js",
        "apgd_dce",
    ]
    groups = {s.label: s.group for s in specs}
    assert groups["fgsm"] is None and groups["pgd"] == "papers" and groups["apgd_js"] == "reliable"
    assert [s.cascade for s in specs] == [False] + [True] * 7  # only suite members are ever skipped
    assert all(s.config["steps"] == 20 for s in specs if s.group == "papers")


def test_overrides_reach_members_by_label_or_preset():
    specs = build_suite([], ["4/255"], None, CONF, {"apgd": {"steps": 7}, "apgd_js": {"steps": 5}}, suites=["reliable"])
    assert {s.label: s.config["steps"] for s in specs} == {"apgd_mce": 7, "apgd_bce": 7, "apgd_js": 5, "apgd_dce": 7}


def test_override_for_an_attack_not_in_the_suite_is_named():
    with pytest.raises(ConfigError, match=r"attack_overrides\.segpgd.*not in the suite.*apgd_js"):
        build_suite(["pgd"], ["4/255"], None, CONF, {"segpgd": {"steps": 3}}, suites=["reliable"])


def test_override_with_an_unknown_field_is_named():
    with pytest.raises(ConfigError, match=r"apgd_js\.stepz"):
        build_suite([], ["4/255"], None, CONF, {"apgd_js": {"stepz": 3}}, suites=["reliable"])


def test_linf_eps_of_one_or_more_is_refused_unless_allowed():
    with pytest.raises(ConfigError, match=r"eps=2 .*2/255.*allow_large_eps"):
        build_suite(["pgd"], ["2"], None, CONF)
    with pytest.raises(ConfigError, match=r"eps=2 .*allow_large_eps"):
        build_suite(["gn"], ["2"], None, CONF)  # a noise sigma >= 1 as well
    assert build_suite(["gn"], ["2"], None, CONF, allow_large_eps=True)[0].config["allow_large_budget"] is True
    assert build_suite(["pgd_l2"], ["2"], None, CONF)[0].eps == 2.0  # an L2 radius >= 1 is ordinary
    assert build_suite(["pgd"], ["1/2"], None, CONF)[0].eps == 0.5


def test_unknown_suite_and_empty_suite():
    with pytest.raises(ConfigError, match=r"no suite 'relaible'.*reliable"):
        build_suite([], ["4/255"], None, CONF, suites=["relaible"])
    with pytest.raises(ConfigError, match="suite is empty"):
        build_suite([], ["4/255"], None, CONF)


def test_same_label_with_different_settings_is_an_error(tmp_path):
    shutil.copytree(CONF / "attack", tmp_path / "attack")
    (tmp_path / "suite").mkdir()
    (tmp_path / "suite" / "mine.yaml").write_text("group: mine\nmembers:\n  pgd: {preset: pgd, steps: 5}\n")
    with pytest.raises(ConfigError, match="given twice"):
        build_suite(["pgd"], ["4/255"], None, tmp_path, suites=["mine"])
    assert len(build_suite(["pgd"], ["4/255"], None, CONF, suites=["papers"])) == 3  # the same PGD-20: kept once


def test_bad_suite_file_names_the_member(tmp_path):
    shutil.copytree(CONF / "attack", tmp_path / "attack")
    (tmp_path / "suite").mkdir()
    (tmp_path / "suite" / "mine.yaml").write_text("group: mine\nmembers:\n  a: {preset: apgd, lose: js}\n")
    with pytest.raises(ConfigError, match=r"mine\.yaml members\.a\.lose"):
        build_suite([], ["4/255"], None, tmp_path, suites=["mine"])
    (tmp_path / "suite" / "mine.yaml").write_text("group: mine\nmembers:\n  a: {loss: js}\n")
    with pytest.raises(ConfigError, match="needs a 'preset'"):
        build_suite([], ["4/255"], None, tmp_path, suites=["mine"])


def test_compare_suite_matches_papers_and_reliable():
    """compare.yaml must stay the union of papers.yaml and reliable.yaml, each member in its own group."""
    compare = build_suite([], ["4/255"], None, CONF, suites=["compare"])
    parts = build_suite([], ["4/255"], None, CONF, suites=["papers", "reliable"])
    assert [(s.label, s.group, s.config) for s in compare] == [(s.label, s.group, s.config) for s in parts]


def test_loaded_suite_content_as_from_the_config_group():
    from omegaconf import OmegaConf

    from robustseg.config import expand_flags, load_config

    cfg = load_config("evaluate", [*expand_flags("evaluate", ["--suite", "reliable"]), "logger=none"])
    loaded = build_suite([], ["4/255"], None, CONF, suites=[OmegaConf.to_container(cfg.suite, resolve=True)])
    assert [s.label for s in loaded] == ["apgd_mce", "apgd_bce", "apgd_js", "apgd_dce"]
    assert load_config("evaluate", ["logger=none"]).suite is None
