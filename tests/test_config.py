import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from mimlab.core.config import (
    ConfigError,
    FinetuneConfig,
    PretrainConfig,
    ProbeConfig,
    from_dict,
    parse_overrides,
    resolve,
    save_yaml,
    to_dict,
)


@pytest.mark.parametrize("cls", [PretrainConfig, FinetuneConfig, ProbeConfig])
def test_yaml_round_trip(cls, tmp_path):
    cfg = resolve(cls, overrides=["model.preset=vit_b16", "run.seed=7"])
    p = tmp_path / "c.yaml"
    save_yaml(cfg, p)
    again = resolve(cls, str(p))
    assert to_dict(again) == to_dict(cfg)
    assert again.model.embed_dim == 768 and again.run.seed == 7


def test_preset_fills_unset_fields_only():
    cfg = resolve(PretrainConfig, overrides=["model.preset=vit_b16", "model.depth=4"])
    assert cfg.model.depth == 4 and cfg.model.embed_dim == 768 and cfg.model.img_size == 224


def test_section_defaults_differ_per_command():
    # fine-tuning: None = 0.75 from a pretrained encoder, 1.0 from scratch (tasks.finetune)
    assert resolve(FinetuneConfig).optim.layer_decay is None
    assert resolve(FinetuneConfig, overrides=["optim.layer_decay=0.65"]).optim.layer_decay == 0.65
    assert resolve(PretrainConfig).optim.layer_decay == 1.0


@pytest.mark.parametrize(
    "override,needle",
    [
        ("optim.epoch=3", "did you mean 'optim.epochs'"),
        ("modle.depth=3", "did you mean 'model'"),
        ("optim.epochs=abc", "expected an integer"),
        ("optim.epochs=2.5", "expected an integer"),
        ("method.mask_ratio=1.0", "mask_ratio must be in (0, 1)"),
        ("method.mask_ratio=0", "mask_ratio must be in (0, 1)"),
        ("model.img_size=30", "not divisible"),
        ("model.depth=0", "depth must be >= 1"),
        ("run.precision=fp8", "precision"),
        ("model.preset=vit_b61", "did you mean 'vit_b16'"),
        ("data.crop_scale=[0.5]", "crop_scale"),
        ("noequals", "key=value"),
        ("method.teacher_size=8", "teacher_size 8 is too small"),
    ],
)
def test_bad_configs_fail_with_one_clear_line(override, needle):
    with pytest.raises(ConfigError) as e:
        resolve(
            PretrainConfig,
            overrides=[override]
            + (["method.name=maskdistill"] if "teacher_size" in override else []),
        )
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_yaml_is_read_safely(tmp_path):
    p = tmp_path / "evil.yaml"
    p.write_text("run: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ConfigError):
        resolve(PretrainConfig, str(p))


def test_missing_and_non_mapping_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        resolve(PretrainConfig, str(tmp_path / "nope.yaml"))
    p = tmp_path / "list.yaml"
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        resolve(PretrainConfig, str(p))


_keys = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=8)


@settings(max_examples=60, deadline=None)
@given(
    path=st.lists(_keys, min_size=1, max_size=3),
    value=st.one_of(
        st.integers(-(10**6), 10**6),
        st.booleans(),
        st.floats(allow_nan=False, allow_infinity=False, width=32),
        st.text(alphabet="abcdefxyz", min_size=1, max_size=6),
    ),
)
def test_parse_overrides_property(path, value):
    key = ".".join(path)
    text = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
    out = parse_overrides([f"{key}={text}"])
    cur = out
    for p in path[:-1]:
        cur = cur[p]
    assert cur[path[-1]] == value


@settings(max_examples=60, deadline=None)
@given(epochs=st.integers(-5, 50), ratio=st.floats(-1, 2, allow_nan=False), bs=st.integers(-2, 300))
def test_resolve_accepts_valid_rejects_invalid(epochs, ratio, bs):
    ov = [f"optim.epochs={epochs}", f"method.mask_ratio={ratio}", f"optim.batch_size={bs}"]
    valid = epochs >= 1 and 0 < ratio < 1 and bs >= 1
    if valid:
        cfg = resolve(PretrainConfig, overrides=ov)
        assert cfg.optim.epochs == epochs and cfg.optim.batch_size == bs
    else:
        with pytest.raises(ConfigError):
            resolve(PretrainConfig, overrides=ov)


def test_from_dict_partial_sections_keep_defaults():
    cfg = from_dict(FinetuneConfig, {"optim": {"epochs": 3}})
    assert cfg.optim.epochs == 3 and cfg.optim.layer_decay is None
