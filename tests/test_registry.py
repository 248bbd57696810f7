"""The method registry (mimlab/core/registry.py): every family and preset, parametrised from it."""

import dataclasses

import pytest
import torch
import yaml

from mimlab.cli import methods_listing, run
from mimlab.core.config import (
    ConfigError,
    MethodConfig,
    PretrainConfig,
    from_dict,
    resolve,
    to_dict,
)
from mimlab.core.registry import FAMILIES, PRESETS, family_of, presets_of, reading_families
from mimlab.methods import BUILDERS, build_method, is_siamese

METHOD_FIELDS = {f.name for f in dataclasses.fields(MethodConfig)}


def _cfg(*ov):
    return resolve(PretrainConfig, overrides=["model.preset=micro", *ov])


def test_every_family_has_a_builder_and_every_field_a_reader():
    assert set(BUILDERS) == set(FAMILIES)
    for fam in FAMILIES.values():
        assert fam.reads <= METHOD_FIELDS, fam.reads - METHOD_FIELDS
        assert presets_of(fam.name), f"family {fam.name} has no preset"
    unread = {f for f in METHOD_FIELDS if not reading_families(f)}
    assert not unread, f"fields no family reads: {unread}"


@pytest.mark.parametrize("name", PRESETS)
def test_preset_declares_its_family_and_sets_only_fields_it_reads(name):
    p = PRESETS[name]
    m = _cfg(f"method.name={name}").method
    assert family_of(m).name == p.family
    assert set(p.values) <= FAMILIES[p.family].reads, set(p.values) - FAMILIES[p.family].reads
    for k, v in p.values.items():
        assert getattr(m, k) == v, k


@pytest.mark.parametrize("name", PRESETS)
def test_preset_builds_and_trains_one_step(name):
    small_teacher = (
        ["method.teacher_size=64"] if PRESETS[name].values.get("target") == "teacher" else []
    )
    cfg = _cfg(f"method.name={name}", *small_teacher)
    torch.manual_seed(0)
    m = build_method(cfg, [0.5] * 3, [0.25] * 3)
    assert is_siamese(cfg) == (PRESETS[name].family != "masked")
    m.train()
    out = m(torch.randn(2, 3, 32, 32))
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


@pytest.mark.parametrize("name", PRESETS)
def test_full_config_dump_resolves_back_unchanged(name, tmp_path):
    """A run's config.yaml (every field written) passes the unread-field check."""
    cfg = _cfg(f"method.name={name}")
    f = tmp_path / "config.yaml"
    f.write_text(yaml.safe_dump(to_dict(cfg)))
    assert to_dict(resolve(PretrainConfig, str(f))) == to_dict(cfg)


@pytest.mark.parametrize("family", FAMILIES)
def test_field_the_family_does_not_read_is_an_error(family):
    name = presets_of(family)[0]
    fam = FAMILIES[family]
    others = sorted(METHOD_FIELDS - fam.reads)
    assert others
    for key in others:
        default = {f.name: f.default for f in dataclasses.fields(MethodConfig)}[key]
        value = {
            bool: "true" if not default else "false",
            float: "0.5",
            int: "3",
            str: "x",
            type(None): "64",
        }[type(default)]
        with pytest.raises(ConfigError) as e:
            _cfg(f"method.name={name}", f"method.{key}={value}")
        msg = str(e.value)
        assert f"method.{key} is not read by the {fam.title} family" in msg, msg
        assert "\n" not in msg


def test_issue_example_and_did_you_mean():
    with pytest.raises(
        ConfigError,
        match="method.temperature is not read by the masked "
        "prediction family.*read by contrastive siamese",
    ):
        _cfg("method.name=mae", "method.temperature=0.01", "method.tokens=cls", "method.lam=7")
    with pytest.raises(ConfigError, match="method.lam .*read by relaxed MAE"):
        _cfg("method.name=cmae", "method.lam=2")
    # a close name among the fields the family reads is suggested
    with pytest.raises(
        ConfigError, match="method.view2_mask_ratio .*did you mean 'method.mask_ratio'"
    ):
        _cfg("method.name=mae", "method.view2_mask_ratio=0.5")
    # the same field at its default value is accepted (a full dump writes it)
    assert _cfg("method.name=mae", "method.temperature=0.2").method.temperature == 0.2


def test_norm_pix_loss_is_an_input_alias_of_target_norm():
    assert _cfg("method.name=mae", "method.norm_pix_loss=false").method.target_norm == "none"
    assert _cfg("method.name=simmim", "method.norm_pix_loss=true").method.target_norm == "patch"
    assert "norm_pix_loss" not in to_dict(_cfg("method.name=simmim"))["method"]
    # configs saved before the alias wrote both: target_norm decides
    d = to_dict(_cfg("method.name=simmim"))
    d["method"]["norm_pix_loss"] = True
    assert from_dict(PretrainConfig, d).method.target_norm == "none"


def test_methods_command_and_help_come_from_the_registry(capsys):
    text = methods_listing()
    for name, p in PRESETS.items():
        assert f"  {name} " in text and p.about in text
    for fam in FAMILIES.values():
        assert text.count(f"{fam.name}: {fam.title}") == 1
    assert run(["methods"]) == 0
    assert capsys.readouterr().out.strip() == text
    with pytest.raises(SystemExit):
        run(["pretrain", "--help"])
    help_text = capsys.readouterr().out
    assert "read by contrastive" in help_text and " | ".join(PRESETS) in help_text
