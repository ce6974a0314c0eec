from __future__ import annotations

import pytest

from robustseg.registry import Registry


def make_registry() -> Registry:
    reg: Registry = Registry("thing")
    reg.register("swin_unetr")(lambda **kw: ("swin_unetr", kw))
    reg.register("segresnet")(lambda **kw: ("segresnet", kw))
    reg.register("unet")(lambda **kw: ("unet", kw))
    reg.register("unetr")(lambda **kw: ("unetr", kw))
    return reg


def test_build_passes_kwargs_and_resolves_unique_prefix():
    reg = make_registry()
    assert reg.build({"name": "swin", "depth": 2}) == ("swin_unetr", {"depth": 2})
    assert reg.resolve("seg") == "segresnet"


def test_exact_match_beats_prefix():
    assert make_registry().resolve("unet") == "unet"  # also a prefix of unetr


def test_ambiguous_prefix_lists_candidates():
    with pytest.raises(KeyError, match=r"ambiguous.*segresnet.*swin_unetr"):
        make_registry().resolve("s")


def test_unknown_name_lists_known_and_closest():
    with pytest.raises(
        KeyError, match=r"Did you mean 'unetr'\?.*Known: \['segresnet', 'swin_unetr', 'unet', 'unetr'\]"
    ):
        make_registry().build({"name": "unetrr"})


def test_missing_name_and_double_registration():
    reg = make_registry()
    with pytest.raises(KeyError, match="needs a 'name' key"):
        reg.build({"depth": 1})
    with pytest.raises(KeyError, match="registered twice"):
        reg.register("unet")(lambda: None)


def test_unknown_keyword_is_pythons_type_error():
    reg: Registry = Registry("thing")
    reg.register("f")(lambda *, a=1: a)
    with pytest.raises(TypeError):
        reg.build({"name": "f", "b": 2})
