"""The config loader: every key checked with its full path before any work starts."""

import dataclasses
from pathlib import Path

import pytest

from extract.config import DictionarySpec
from extract.contract.config import (
    Config,
    ConfigError,
    apply_overrides,
    from_dict,
    load_config,
    read_file,
    to_dict,
    write_resolved,
)
from tests.conftest import config_keys

REPO = Path(__file__).resolve().parents[2]


def test_pipeline_yaml_loads_and_names_every_key():
    """pipeline.yaml is the configuration reference: every key the loader accepts is written there (the sections of
    named entries aside: tests/train/test_config.py checks stage 2's), every named dictionary writes every field."""
    cfg = load_config(REPO / "pipeline.yaml")
    raw = read_file(REPO / "pipeline.yaml")  # folders of named entries (tables, recipes) read in
    written = set(config_keys(raw))
    named = ("heads", "ablations", "dictionaries.", "grounding", "recipes")  # sections of named entries
    declared = {k for k in config_keys(to_dict(Config())) if not k.startswith(named)}
    static = {k for k in written if not k.startswith(named)}
    # every named dictionary writes every field of DictionarySpec
    spec_fields = {f.name for f in dataclasses.fields(DictionarySpec)}
    for name, entry in raw["dictionaries"].items():
        assert set(entry) == spec_fields, f"dictionaries.{name}: missing {sorted(spec_fields - set(entry))}"
    assert declared == static, f"missing in pipeline.yaml: {declared - static}; unknown: {static - declared}"
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


def test_resolved_config_round_trips_and_is_frozen(tmp_path):
    cfg = load_config(REPO / "pipeline.yaml", ["synthetic.rho=0.5"])
    out = write_resolved(cfg, tmp_path)
    back = load_config(out)
    # `heads` is written resolved (tests/train/test_config.py checks it reads back to the same options)
    assert dataclasses.replace(back, heads=cfg.heads) == cfg
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.lr = 1.0  # type: ignore[misc]


def test_override_files_merge_key_by_key_and_sections_may_be_folders(tmp_path):
    """`--config a.yaml --config b.yaml`: b's keys over a's, mapping by mapping (a list or value replaces); a section
    of named entries given as a folder reads one `<name>.yaml` per entry, relative to the file naming it. Known
    answer: the same configuration written inline in one file; and the benchmark world equals its old `--set` list."""
    (tmp_path / "tables").mkdir()
    (tmp_path / "tables" / "t1.yaml").write_text("rows: [baseline, cmdcl]\nseeds: 2\n")
    (tmp_path / "tables" / "t1.md").write_text("# not a table: ignored\n")
    (tmp_path / "a.yaml").write_text(
        "ablations: tables\nsynthetic: {rho: 0.5, videos: {train: 10, test_iid: 4}}\nframes: {num_frames: 8}\n"
    )
    (tmp_path / "b.yaml").write_text("synthetic: {videos: {test_iid: 6}}\nablations: {t2: {rows: [pcmci]}}\n")
    merged = load_config([tmp_path / "a.yaml", tmp_path / "b.yaml"], ["frames.num_frames=4"])
    (tmp_path / "inline.yaml").write_text(
        "synthetic: {rho: 0.5, videos: {train: 10, test_iid: 6}}\nframes: {num_frames: 4}\n"
        "ablations: {t1: {rows: [baseline, cmdcl], seeds: 2}, t2: {rows: [pcmci]}}\n"
    )
    assert merged == load_config(tmp_path / "inline.yaml")
    (tmp_path / "c.yaml").write_text("recipes: missing\n")
    with pytest.raises(ConfigError, match="recipes: the folder .*missing does not exist"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("train: folder\n")
    with pytest.raises(ConfigError, match="train: expected a mapping \\(section\\).*may name a folder"):
        load_config(tmp_path / "d.yaml")
    world = load_config([REPO / "pipeline.yaml", REPO / "configs" / "worlds" / "benchmark.yaml"])
    old = [  # the Makefile's BENCH_SET before the worlds became files
        "synthetic.videos.test_iid=512",
        "synthetic.videos.test_ood=512",
        "synthetic.videos.train_oracle=192",
        "train.eval_every=30",
        "dataset.root=data/synthetic-benchmark",
    ]
    assert world == load_config(REPO / "pipeline.yaml", old)
