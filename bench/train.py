"""Stage-2 cost, measured in one run.

1. Training-step throughput of every registered head (default options) and its peak memory at COIN
   scale (C=180, L=32, Dc=512, Dv=768, B=32) and Charades scale (C=157), on random tensors. Peak
   memory is the head's own: each (head, scale) runs in a fresh process and reports the growth of its
   resident-set high-water mark over the inputs (on a GPU, torch.cuda.max_memory_allocated).
2. On a demo-size cache: the time of the extraction that produced it against the time to run every
   ablation table's variants from it (target: all ablations together cost less than one extraction).

Usage: python bench/train.py [--steps 20] [--videos 320] [--seeds 1] [--epochs 30]
The last line is `key=value` pairs.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SCALES = {"coin": dict(C=180, L=32, DC=512, DV=768, B=32), "charades": dict(C=157, L=32, DC=512, DV=768, B=32)}


def _one(head: str, scale: str, steps: int, device: str) -> dict:
    """Run in a child process: steps/s and peak memory of one head at one scale."""
    from extract.config import from_dict
    from train.engine import loss_fn
    from train.heads import Batch, HeadContext, build_head, required_dictionaries

    s = SCALES[scale]
    B, L, DC, DV, C = s["B"], s["L"], s["DC"], s["DV"], s["C"]
    torch.manual_seed(0)
    cfg = from_dict({})
    names = {"confounder", "global", *required_dictionaries(cfg, head)}
    dicts = {n: (torch.randn(256, DC, device=device), torch.full((256,), 1 / 256, device=device)) for n in names}
    t0 = torch.nn.functional.normalize(torch.randn(C, DC), dim=-1)
    ctx = HeadContext(DC, DV, L, C, False, t0, {k: (c.cpu(), p.cpu()) for k, (c, p) in dicts.items()})
    batch = Batch(
        torch.randn(B, L, DC).half(),
        torch.randn(B, L, DV).half(),
        torch.randn(B, L, DC).half(),
        torch.randn(B, L, DC).half(),
        torch.ones(B, L, dtype=torch.bool),
        t0,
        dicts,
        torch.randint(0, C, (B,)),
    ).to(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model = build_head(head, cfg, ctx).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        loss = loss_fn(model(batch), batch.labels, False)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(2):  # warm-up
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if device == "cuda"
        else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024
    )
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"steps_per_s": steps / seconds, "peak_mib": peak, "params": params}


def head_throughput(steps: int, device: str) -> dict[str, dict[str, dict]]:
    from train.heads import head_names

    out: dict[str, dict[str, dict]] = {}
    for head in head_names():
        for scale in SCALES:
            code = (
                f"import json, sys; sys.path.insert(0, {str(ROOT)!r}); import torch; torch.set_num_threads(2); "
                f"from bench.train import _one; print(json.dumps(_one({head!r}, {scale!r}, {steps}, {device!r})))"
            )
            res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            out.setdefault(head, {})[scale] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def ablation_cost(videos: int, seeds: int, epochs: int) -> dict[str, float]:
    """Extract a demo-size cache (timed), build its dictionaries, run every table (timed)."""
    from extract.config import load_config
    from extract.dictionaries import build_dictionaries
    from extract.pipeline import extract
    from extract.synthetic import write_dataset
    from train.ablate import run_table

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        n_test = max(1, videos // 5)
        cfg = load_config(
            ROOT / "pipeline.yaml",
            [
                f"dataset.root={tmp / 'data'}",
                f"cache.root={tmp / 'cache'}",
                f"train.runs_root={tmp / 'runs'}",
                f"synthetic.videos.train={videos - 2 * n_test}",
                f"synthetic.videos.test_iid={n_test}",
                f"synthetic.videos.test_ood={n_test}",
                f"train.epochs={epochs}",
            ],
        )
        write_dataset(cfg.synthetic, tmp / "data", progress=False)
        t = time.perf_counter()
        summary = extract(cfg, progress=False)
        extract_s = time.perf_counter() - t
        t = time.perf_counter()
        build_dictionaries(cfg, summary.store, progress=False)
        dict_s = time.perf_counter() - t
        t = time.perf_counter()
        runs, tables = 0, []
        for name in cfg.ablations:
            result = run_table(replace(cfg), name, seeds=seeds, store=summary.store, progress=False)
            runs += result.runs
            tables.append(result.files[0].read_text())  # the .md, printed below
        ablate_s = time.perf_counter() - t
    return {"extract_s": extract_s, "dictionaries_s": dict_s, "ablate_s": ablate_s, "runs": runs, "tables": tables}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--videos", type=int, default=320)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=30)
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    heads = head_throughput(args.steps, device)
    print(f"training step at B=32, L=32, Dc=512, Dv=768 on {device} (default options):")
    for head, scales in heads.items():
        coin, cha = scales["coin"], scales["charades"]
        print(
            f"  {head:<10} COIN C=180: {coin['steps_per_s']:6.2f} steps/s, peak {coin['peak_mib']:7.1f} MiB, "
            f"{coin['params'] / 1e6:.2f} M params | Charades C=157: {cha['steps_per_s']:6.2f} steps/s, "
            f"peak {cha['peak_mib']:7.1f} MiB"
        )
    cost = ablation_cost(args.videos, args.seeds, args.epochs)
    for table in cost["tables"]:
        print(table)
    print(
        f"demo cache ({args.videos} videos): extraction {cost['extract_s']:.1f} s, dictionaries "
        f"{cost['dictionaries_s']:.1f} s, every table ({cost['runs']} runs, {args.seeds} seed(s), "
        f"{args.epochs} epochs) {cost['ablate_s']:.1f} s -> ablations / extraction = "
        f"{cost['ablate_s'] / cost['extract_s']:.2f}"
    )
    figures = {f"{h}_steps_s": f"{s['coin']['steps_per_s']:.2f}" for h, s in heads.items()}
    figures.update({f"{h}_peak_mib": f"{s['coin']['peak_mib']:.0f}" for h, s in heads.items()})
    figures.update(
        {
            "extract_s": f"{cost['extract_s']:.1f}",
            "ablate_s": f"{cost['ablate_s']:.1f}",
            "ablate_over_extract": f"{cost['ablate_s'] / cost['extract_s']:.2f}",
            "runs": cost["runs"],
            "device": device,
        }
    )
    print(" ".join(f"{k}={v}" for k, v in figures.items()))


if __name__ == "__main__":
    main()
