"""Stage 2's sections of the config: each head's defaults written once (in code, printed resolved), every grounding
option and recipe field written in pipeline.yaml, and heads, variants and table rows checked against the
registries."""

import dataclasses
from pathlib import Path

import pytest
import yaml

from extract.contract.config import ConfigError, dump_yaml, from_dict, load_config, read_file, to_dict, write_resolved
from tests.conftest import config_keys
from train.config import Recipe

REPO = Path(__file__).resolve().parents[2]


def test_pipeline_yaml_names_every_head_grounding_and_recipe_key():
    from train.grounding import GroundingOptions
    from train.heads import head_entry, head_names

    cfg = load_config(REPO / "pipeline.yaml")
    raw = read_file(REPO / "pipeline.yaml")  # the recipes and tables folders read in
    written = set(config_keys(raw))
    # each head's defaults are written once, in code: pipeline.yaml sets none of them, and `ltar config show`
    # prints every option of every registered head at its dataclass default, with every built-in variant
    assert raw["heads"] == {}
    shown = yaml.safe_load(dump_yaml(cfg))["heads"]
    assert sorted(shown) == head_names()
    for name in head_names():
        entry = head_entry(name)
        assert {k: v for k, v in shown[name].items() if k != "variants"} == to_dict(entry.config())
        assert shown[name]["variants"] == to_dict(entry.builtin_variants)
    # every grounding option, in at least one named grounding
    grounding_keys = {k.split(".", 2)[2] for k in written if k.startswith("grounding.")}
    missing = {f.name for f in dataclasses.fields(GroundingOptions)} - grounding_keys
    assert not missing, f"no grounding in pipeline.yaml writes {sorted(missing)}"
    # every recipe writes every field of Recipe, and every table its reference row
    assert raw["recipes"], "no recipe read"
    for name, entry in raw["recipes"].items():
        assert set(entry) == {f.name for f in dataclasses.fields(Recipe)}, f"recipes.{name}"
    assert cfg.ablations and all(t.reference in (*t.rows, "previous") for t in cfg.ablations.values())


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


def test_resolved_config_reads_back_to_the_same_head_options(tmp_path):
    """The resolved YAML writes `heads` resolved (defaults from code, every variant): read back, every section is
    as it was but `heads`, which gives the same options for every head and variant."""
    from train.heads import head_names, head_options, variant_names

    cfg = load_config(REPO / "pipeline.yaml", ["heads.cmdcl.dim=32", "heads.cmdcl.variants.mine.tau=0.2"])
    back = load_config(write_resolved(cfg, tmp_path))
    assert dataclasses.replace(back, heads=cfg.heads) == cfg
    for name in head_names():
        assert variant_names(back, name) == variant_names(cfg, name)
        for variant in (None, *variant_names(cfg, name)):
            assert head_options(back, name, variant) == head_options(cfg, name, variant)
    assert head_options(back, "cmdcl").dim == 32 and head_options(back, "cmdcl", "mine").tau == 0.2
