"""Stage 2's sections of the config: every head option, grounding option and recipe field written in pipeline.yaml,
and heads, variants and table rows checked against the registries."""

import dataclasses
from pathlib import Path

import pytest

from extract.contract.config import ConfigError, from_dict, load_config, read_file
from train.config import Recipe

REPO = Path(__file__).resolve().parents[2]


def _keys(data, prefix=""):
    for k, v in data.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            yield from _keys(v, path + ".")
        else:
            yield path


def test_pipeline_yaml_names_every_head_grounding_and_recipe_key():
    from train.grounding import GroundingOptions
    from train.heads import head_entry, head_names

    cfg = load_config(REPO / "pipeline.yaml")
    raw = read_file(REPO / "pipeline.yaml")  # the recipes and tables folders read in
    written = set(_keys(raw))
    # every option of every registered head
    for name in head_names():
        options = {f"heads.{name}.{f.name}" for f in dataclasses.fields(head_entry(name).config)}
        assert options <= written, f"pipeline.yaml lacks {sorted(options - written)}"
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
