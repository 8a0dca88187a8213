"""Do the causal terms of the paper heads carry information about the sample? Measured on the demo cache.

A thin caller of `train.diagnose` (`ltar diagnose` on a run): each paper head is trained once (activity,
seed 0, the config's epochs) and every causal term its registry entry declares is diagnosed on every
evaluation split: its variation over videos (learned bias excluded), its cosine to the split mean, the
Acc@1 change when it is replaced by its split mean or by zero, and the entropy of its weights.

Usage: python -m bench.interventions [--config pipeline.yaml] [--epochs N]
(reads the config's cache; where it is missing, builds it first as `make demo` does: synth, pretrain-vlm,
extract, dictionaries)
The last line is `key=value` pairs: <head>_<term>_var_<split> and <head>_<term>_ko_<split> for every term.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HEADS = ("cmdcl", "pcmci", "ecrl")  # their causal terms are declared in the registry (train.heads)


def measure(cfg, store, epochs: int, runs: Path) -> dict[str, list]:
    """Train each paper head (activity, seed 0) and diagnose its declared terms on every evaluation split."""
    from train.data import CacheReader
    from train.diagnose import diagnose_model
    from train.engine import build_model, read_checkpoint, train

    reader = CacheReader(store, "activity")
    ctx = reader.context()
    splits = {s: reader.load_split(s) for s in sorted(set(reader.info.splits) - {"train", "pretrain"})}
    out: dict[str, list] = {}
    for head in HEADS:
        run_cfg = replace(
            cfg, train=replace(cfg.train, head=head, variant=None, grounding=None, task="activity", seed=0)
        )
        run_cfg = replace(run_cfg, train=replace(run_cfg.train, epochs=epochs, runs_root=str(runs)))
        result = train(run_cfg, store=store, progress=False)
        model = build_model(run_cfg, ctx, head, None, None)
        model.load_state_dict(read_checkpoint(result.run_dir / "last.pt")["state_dict"])
        for split, data in splits.items():
            out[f"{head}/{split}"] = diagnose_model(model, head, data, ctx, "cpu", 64)
    return out


def build_demo_cache(cfg) -> Path:
    """The config's cache, built as `make demo` builds it (synthetic videos, the tiny VLM, extraction, dictionaries)."""
    from extract.dictionaries import build_dictionaries
    from extract.pipeline import extract
    from extract.synthetic import write_dataset
    from extract.vlm import pretrain_vlm

    print(f"no cache for {cfg.dataset.name} yet: building it as `make demo` does (a few minutes)")
    write_dataset(cfg.synthetic, Path(cfg.dataset.root), progress=False)
    pretrain_vlm(cfg, progress=False)
    store = extract(cfg, progress=False).store
    build_dictionaries(cfg, store, progress=False)
    return store


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "pipeline.yaml"))
    ap.add_argument("--epochs", type=int, default=None, help="training epochs (default: train.epochs)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(1)
    from extract.contract.config import load_config
    from extract.contract.schema import CacheError
    from train.engine import find_store

    cfg = load_config(args.config)
    try:
        store = find_store(cfg, None)
    except CacheError:
        store = build_demo_cache(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        results = measure(cfg, store, args.epochs or cfg.train.epochs, Path(tmp))
    figures = {}
    print(f"cache {store}; heads trained on activity, seed 0; knock-out = Acc@1 change in points (ltar diagnose)")
    for key, rows in results.items():
        head, split = key.split("/")
        for r in rows:
            ent = "—" if r.entropy is None else f"{r.entropy:.3f}"
            print(
                f"  {head:<6} {r.term.name:<12} {split:<9} Acc@1 {100 * r.metric:5.1f} | variation {r.variation:.4f} "
                f"| cosine {r.cosine:.3f} | KO mean {r.ko_mean:+5.1f} zero {r.ko_zero:+5.1f} | entropy {ent} "
                f"| {r.term.symbol}"
            )
            figures[f"{head}_{r.term.name}_var_{split}"] = f"{r.variation:.4f}"
            figures[f"{head}_{r.term.name}_ko_{split}"] = f"{r.ko_mean:+.1f}"
    print(" ".join(f"{k}={v}" for k, v in figures.items()))


if __name__ == "__main__":
    main()
