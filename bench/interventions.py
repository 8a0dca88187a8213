"""Do the causal terms of the paper heads carry information about the sample? Measured on the demo cache.

A back-door or front-door term is an expectation over a dictionary or a memory; if its attention
weights stay near uniform it is a constant vector, a learned bias, whatever the paper intends. For
each head (trained once on the activity task, seed 0, the config's epochs) and each named term (a
submodule whose output is the term), on every evaluation split:

- `variation`: mean_b ||y_b - ȳ|| / mean_b ||y_b||, how much the term changes from video to video
  (0 = the same vector for every video);
- `knockout`: Acc@1 with the term replaced by its mean over the split (a forward hook), minus the
  head's own Acc@1, in points: what the sample-specific part of the term contributes to the prediction.

Usage: python -m bench.interventions [--config pipeline.yaml] [--epochs N]
(reads the config's cache; where it is missing, builds it first as `make demo` does: synth, pretrain-vlm,
extract, dictionaries)
The last line is `key=value` pairs: <head>_<term>_var and <head>_<term>_ko_<split> for every term.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# head -> {short name: (submodule whose output is the term, what it is)}
TERMS = {
    "ecrl": {
        "bd": ("w_b", "W_b E_z: back-door expectation over the confounder dictionary (Eq. 6-7)"),
        "glca_global": ("glca.local_global", "GLCA's local-global attention over the trainable G (front-door)"),
        "s1": ("cls_1", "S1: the whole FG/BG branch's logits"),
    },
    "pcmci": {
        "ich": ("ich.w_h", "W_H Σ_h P(h) h: ICH's back-door term over the video's OT hallucination proxies"),
        "ivc_bank": ("ivc.bank", "IVC's sample-bank term over the TimeSformer dictionary global_video (front-door)"),
    },
    "cmdcl": {
        "tci": ("tci.h", "h([t_c, b_c]): TCI's debiased text T' of each video (Eq. 3)"),
        "vci": ("vci.g", "g([t'_c, v̂_c]): VCI's deconfounded visual embeddings V' (Eq. 8)"),
    },
}


def _outputs(model, data, ctx, device, module, replace_with=None):
    """Run the split; return Acc@1 and the term's outputs stacked over videos (or None if not batched)."""
    from train.data import iterate_batches
    from train.metrics import compute_metrics

    seen: list[torch.Tensor] = []

    def hook(_mod, _inp, out):  # every term is per video: out (B, ..., D)
        seen.append(out.detach())
        return None if replace_with is None else replace_with.expand_as(out)

    handle = module.register_forward_hook(hook)
    scores, labels = [], []
    dicts = {k: (c.to(device), p.to(device)) for k, (c, p) in ctx.dictionaries.items()}
    model.eval()
    with torch.no_grad():
        for _, batch in iterate_batches(data, 64, ctx.t0.to(device), dicts, device):
            scores.append(model(batch).float().cpu().numpy())
            labels.append(batch.labels.cpu().numpy())
    handle.remove()
    acc = compute_metrics(np.concatenate(scores), np.concatenate(labels), False)["acc1"]
    return acc, seen


def measure(cfg, store, epochs: int, runs: Path) -> dict[str, dict]:
    from train.data import CacheReader
    from train.engine import build_model, train

    reader = CacheReader(store, "activity")
    ctx = reader.context()
    splits = {s: reader.load_split(s) for s in sorted(set(reader.info.splits) - {"train", "pretrain"})}
    out: dict[str, dict] = {}
    for head, terms in TERMS.items():
        run_cfg = replace(
            cfg, train=replace(cfg.train, head=head, variant=None, grounding=None, task="activity", seed=0)
        )
        run_cfg = replace(run_cfg, train=replace(run_cfg.train, epochs=epochs, runs_root=str(runs)))
        result = train(run_cfg, store=store, progress=False)
        model = build_model(run_cfg, ctx, head, None, None)
        model.load_state_dict(torch.load(result.run_dir / "last.pt", weights_only=False)["state_dict"])
        modules = dict(model.named_modules())
        for name, (path, _) in terms.items():
            row: dict = {}
            for split, data in splits.items():
                acc, seen = _outputs(model, data, ctx, "cpu", modules[path])
                ys = torch.cat(seen)  # (N, ..., D)
                mean = ys.mean(0, keepdim=True)  # the term's average over the split, (1, ..., D)
                var = float((ys - mean).norm(dim=-1).mean() / ys.norm(dim=-1).mean().clamp_min(1e-12))
                ko_acc, _ = _outputs(model, data, ctx, "cpu", modules[path], replace_with=mean)
                row.update({"var": var, f"acc_{split}": acc, f"ko_{split}": 100 * (ko_acc - acc)})
            out[f"{head}_{name}"] = row
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
    from extract.config import load_config
    from extract.schema import CacheError
    from train.engine import find_store

    cfg = load_config(args.config)
    try:
        store = find_store(cfg, None)
    except CacheError:
        store = build_demo_cache(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure(cfg, store, args.epochs or cfg.train.epochs, Path(tmp))
    figures = {}
    print(f"cache {store}; heads trained on activity, seed 0; knockout = Acc@1 change in points")
    for key, row in rows.items():
        head, term = key.split("_", 1)
        desc = TERMS[head][term][1]
        splits = [k[3:] for k in row if k.startswith("ko_")]
        kos = ", ".join(f"{s} {row[f'acc_{s}'] * 100:.1f} -> {row[f'ko_{s}']:+.1f}" for s in splits)
        print(f"  {key:<20} variation {row['var']:.4f} | knockout {kos} | {desc}")
        figures[f"{key}_var"] = f"{row['var']:.4f}"
        figures.update({f"{key}_ko_{s}": f"{row[f'ko_{s}']:+.1f}" for s in splits})
    print(" ".join(f"{k}={v}" for k, v in figures.items()))


if __name__ == "__main__":
    main()
