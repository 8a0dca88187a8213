"""Shared fixtures: a few tiny rendered synthetic videos and the cache extracted from them (tests/extract and
tests/e2e; tests/train trains on a store written from random arrays, tests/train/conftest.py)."""

from pathlib import Path

import pytest
import torch

from extract.contract.config import from_dict

torch.set_num_threads(1)  # small ops: a second thread mostly waits (and tests may run beside other work)


def config_keys(data: dict, prefix: str = ""):
    """Every dotted key path of a raw config mapping (a non-empty mapping is walked, anything else is a leaf)."""
    for k, v in data.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            yield from config_keys(v, path + ".")
        else:
            yield path


def tiny_config(root: Path, cache_root: Path, **sections):
    """12 videos of 3-4 s at 48x48, 8 frames each, tiny random encoders, inline decoding."""
    data = {
        "dataset": {"root": str(root)},
        "synthetic": {
            "videos": {"train": 6, "test_iid": 3, "test_ood": 3},
            "height": 48,
            "width": 48,
            "min_seconds": 3.0,
            "max_seconds": 4.0,
        },
        "frames": {"num_frames": 8, "decode_workers": 0},
        "encoders": {"batch_frames": 32},
        "cache": {"root": str(cache_root)},
        "dictionaries": {
            "confounder": {"source": "clip/bg", "size": 4},
            # ECRL's default Z (Sec. 4.2.1: k-means++ and PCA, cluster means at their natural scale)
            "confounder_paper": {"source": "clip/bg", "size": 4, "pca": 8, "spherical": False, "init": "kmeans++"},
            "global": {"source": "clip/frame", "size": 6},
        },
        "train": {"epochs": 2, "batch_size": 4, "runs_root": str(cache_root / "runs")},
    }
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return from_dict(data)


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """12 rendered videos shared by the session (tests that damage files copy them first)."""
    from extract.synthetic import write_dataset

    root = tmp_path_factory.mktemp("synth")
    write_dataset(tiny_config(root, root).synthetic, root, progress=False)
    return root


@pytest.fixture(scope="session")
def tiny_cache(world, tmp_path_factory):
    """(config, store path) of the extracted tiny world; read-only for tests."""
    from extract.pipeline import extract

    cfg = tiny_config(world, tmp_path_factory.mktemp("cache"))
    summary = extract(cfg, progress=False)
    return cfg, summary.store
