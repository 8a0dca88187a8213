"""The config loader: every key checked with its full path before any work starts."""

import dataclasses
from pathlib import Path

import pytest
import yaml

from extract.config import DictionarySpec
from extract.contract.config import (
    Config,
    ConfigError,
    apply_overrides,
    from_dict,
    load_config,
    to_dict,
    write_resolved,
)
from train.config import Recipe

REPO = Path(__file__).resolve().parents[1]


def _keys(data, prefix=""):
    for k, v in data.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            yield from _keys(v, path + ".")
        else:
            yield path


def test_pipeline_yaml_loads_and_names_every_key():
    from extract.contract.config import dump_yaml, read_file
    from train.heads import head_entry, head_names

    cfg = load_config(REPO / "pipeline.yaml")
    raw = read_file(REPO / "pipeline.yaml")  # tables and recipes read in from their folders
    written = set(_keys(raw))
    named = ("heads", "ablations", "dictionaries.", "grounding", "recipes")  # sections of named entries, below
    declared = {k for k in _keys(to_dict(Config())) if not k.startswith(named)}
    static = {k for k in written if not k.startswith(named)}
    # every named dictionary writes every field of DictionarySpec
    spec_fields = {f.name for f in dataclasses.fields(DictionarySpec)}
    for name, entry in raw["dictionaries"].items():
        assert set(entry) == spec_fields, f"dictionaries.{name}: missing {sorted(spec_fields - set(entry))}"
    # pipeline.yaml is the configuration reference: every key the loader accepts is written there,
    assert declared == static, f"missing in pipeline.yaml: {declared - static}; unknown: {static - declared}"
    # each head's defaults are written once, in code: pipeline.yaml sets none of them, and `ltar config show`
    # prints every option of every registered head at its dataclass default, with every built-in variant
    assert raw["heads"] == {}
    shown = yaml.safe_load(dump_yaml(cfg))["heads"]
    for name in head_names():
        entry = head_entry(name)
        assert {k: v for k, v in shown[name].items() if k != "variants"} == to_dict(entry.config())
        assert shown[name]["variants"] == to_dict(entry.builtin_variants)
    # and every grounding option, in at least one named grounding
    from train.grounding import GroundingOptions

    grounding_keys = {k.split(".", 2)[2] for k in written if k.startswith("grounding.")}
    missing = {f.name for f in dataclasses.fields(GroundingOptions)} - grounding_keys
    assert not missing, f"no grounding in pipeline.yaml writes {sorted(missing)}"
    # every recipe writes every field of Recipe, and every table its reference row
    for name, entry in raw["recipes"].items():
        assert set(entry) == {f.name for f in dataclasses.fields(Recipe)}, f"recipes.{name}"
    assert all(t.reference in (*t.rows, "previous") for t in cfg.ablations.values())
    assert cfg.dataset.name == "synthetic"


@pytest.mark.parametrize(
    "data, message",
    [
        ({"train": {"lr_typo": 1}}, "train.lr_typo: unknown key; did you mean 'lr'?"),
        ({"synthetic": {"videos": {"trian": 3}}}, "synthetic.videos.trian: unknown key; did you mean 'train'?"),
        ({"trian": {}}, "trian: unknown key; did you mean 'train'?"),
        ({"train": {"epochs": "ten"}}, "train.epochs: expected an integer, got 'ten'"),
        ({"train": {"epochs": True}}, "train.epochs: expected an integer, got True"),
        ({"train": {"epochs": 0}}, "train.epochs: 0 is out of range; accepted values lie in [1, inf]"),
        ({"synthetic": {"rho": 1.5}}, "synthetic.rho: 1.5 is out of range; accepted values lie in [0.0, 1.0]"),
        ({"saliency": {"method": "spectral"}}, "saliency.method: 'spectral' is not accepted; did you mean"),
        ({"dataset": {"name": "synthetc"}}, "dataset.name: unknown name 'synthetc'; did you mean 'synthetic'?"),
        ({"encoders": {"clip": {"prompts": "a {}"}}}, "encoders.clip.prompts: expected a list of a string"),
        ({"frames": 16}, "frames: expected a mapping (section), got 16"),
        ({"synthetic": {"min_seconds": 9.0, "max_seconds": 4.0}}, "synthetic.min_seconds (9.0) is larger"),
    ],
)
def test_bad_values_fail_with_the_full_key_path(data, message):
    with pytest.raises(ConfigError) as e:
        from_dict(data)
    assert message in str(e.value)


def test_overrides_are_typed_and_checked(tmp_path):
    cfg = load_config(REPO / "pipeline.yaml", ["train.lr=1e-4", "frames.num_frames=32", "encoders.clip.weights=x.pt"])
    assert cfg.train.lr == pytest.approx(1e-4) and cfg.frames.num_frames == 32
    assert cfg.encoders.clip.weights == "x.pt"
    with pytest.raises(ConfigError, match="train.lr_typo: unknown key"):
        load_config(REPO / "pipeline.yaml", ["train.lr_typo=1"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(REPO / "pipeline.yaml", ["train.lr"])
    with pytest.raises(ConfigError, match="train.lr is a value, not a section"):
        apply_overrides({"train": {"lr": 1}}, ["train.lr.x=2"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_heads_and_ablations_are_checked_against_the_registry():
    import train.heads  # noqa: F401  (registers the validator)

    bad = [
        ({"heads": {"baselin": {}}}, "heads.baselin: unknown head"),
        ({"heads": {"baseline": {"dimm": 3}}}, "heads.baseline.dimm: unknown key; did you mean 'dim'?"),
        ({"heads": {"baseline": {"variants": {"x": {"visual": "rgb"}}}}}, "heads.baseline.variants.x.visual: 'rgb'"),
        ({"ablations": {"t": {"rows": ["baseline:nope"]}}}, "ablations.t.rows[0]: head 'baseline' has no variant"),
        ({"ablations": {"t": {"rows": ["pcmcii"]}}}, "ablations.t.rows[0]: unknown head 'pcmcii'"),
        ({"train": {"head": "nope"}}, "train.head: unknown head 'nope'"),
    ]
    for data, message in bad:
        with pytest.raises(ConfigError) as e:
            from_dict(data)
        assert message in str(e.value), (message, str(e.value))
    ok = from_dict({"ablations": {"t": {"rows": ["baseline", "baseline:clip_only"]}}})
    assert ok.ablations["t"].rows == ("baseline", "baseline:clip_only")


def test_resolved_config_round_trips_and_is_frozen(tmp_path):
    cfg = load_config(REPO / "pipeline.yaml", ["synthetic.rho=0.5"])
    out = write_resolved(cfg, tmp_path)
    back = load_config(out)
    # every section as it was; `heads` is written resolved (defaults from code, every variant), so it reads back to
    # the same options for every head and variant rather than to the same (empty) mapping
    assert dataclasses.replace(back, heads=cfg.heads) == cfg
    from train.heads import head_names, head_options, variant_names

    for name in head_names():
        assert variant_names(back, name) == variant_names(cfg, name)
        for variant in (None, *variant_names(cfg, name)):
            assert head_options(back, name, variant) == head_options(cfg, name, variant)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.lr = 1.0  # type: ignore[misc]
