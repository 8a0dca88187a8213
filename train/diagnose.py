"""`ltar diagnose`: does each causal term of a trained head change anything, on a split?

Every head declares its causal terms in its registry entry (`CausalTerm`: name, the paper's symbol, the
submodule whose output is the term, and optionally the module whose inputs give the term's attention or
transport weights). For each term present in a run's model, on one split:

- `variation`: mean_b ||y_b - ȳ|| / mean_b ||y_b - bias||, the relative spread of the term's output over the
  split's videos, with the module's learned bias excluded from the norm (a constant added to every video is
  not variation); `cosine`: the mean cosine of y_b - bias to ȳ - bias (1 = the same direction for every video);
- `ko_mean` / `ko_zero`: the primary metric (Acc@1, or mAP on a multi-label task) with the term replaced by its
  split mean, or by zero, minus the model's own, in points: what the video-specific part of the term, and the
  term as a whole, contribute to the prediction;
- `entropy`: where the term is an attention or a transport plan, the mean entropy of its weights divided by
  log K over the entries it may weigh (1 = uniform, 0 = one entry).

`diagnose(checkpoint, split)` writes `diagnose-<split>.md`, `.csv` and `.png` beside the checkpoint.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from train.heads import CausalTerm, head_entry


@dataclass
class TermDiagnosis:
    term: CausalTerm
    variation: float
    cosine: float
    metric: float  # the model's own primary metric on the split
    ko_mean: float  # metric change (points) with the term replaced by its split mean
    ko_zero: float  # ... by zero
    entropy: float | None  # normalised entropy of the term's weights, or None


def head_terms(
    model: nn.Module, head_name: str, terms: tuple[CausalTerm, ...] | None = None
) -> list[tuple[CausalTerm, str]]:
    """The declared terms (the registry's, or `terms`) present in this model (a switched-off module is absent)
    with their module paths (a grounded model holds the head as `head`)."""
    modules = dict(model.named_modules())
    out = []
    for term in head_entry(head_name).terms if terms is None else terms:
        for path in (term.module, f"head.{term.module}"):
            if path in modules and modules[path] is not None:
                out.append((term, path))
                break
    return out


def _bias(module: nn.Module) -> torch.Tensor | None:
    bias = getattr(module, "bias", None)
    return bias.detach() if isinstance(bias, torch.Tensor) else None


def _run(model, data, ctx, device, batch_size, hooks) -> tuple[np.ndarray, np.ndarray]:
    """Scores (N, C) and labels of a split in split order, with hooks (module, fn, "pre" | "post") for the pass."""
    from train.data import iterate_batches

    handles = [
        m.register_forward_pre_hook(fn, with_kwargs=True)
        if kind == "pre"
        else m.register_forward_hook(fn, with_kwargs=True)
        for m, fn, kind in hooks
    ]
    scores, labels, positions = [], [], []
    dicts = {k: (c.to(device), p.to(device)) for k, (c, p) in ctx.dictionaries.items()}
    model.eval()
    try:
        with torch.no_grad():
            for pos, batch in iterate_batches(data, batch_size, ctx.t0.to(device), dicts, device):
                scores.append(model(batch).float().cpu().numpy())
                labels.append(batch.labels.cpu().numpy())
                positions.append(pos)
    finally:
        for h in handles:
            h.remove()
    order = np.argsort(np.concatenate(positions))
    return np.concatenate(scores)[order], np.concatenate(labels)[order]


def _primary(scores: np.ndarray, labels: np.ndarray, multi_label: bool) -> float:
    from train.metrics import compute_metrics, primary_metric

    return compute_metrics(scores, labels, multi_label)[primary_metric(multi_label)]


def _entropy_ratio(p: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Entropy of p (..., K) over its last axis / log(valid entries): (...,); 0 where at most one entry."""
    p = p.float()
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-30)
    ent = -(p * p.clamp_min(1e-30).log()).sum(-1)
    n = torch.full_like(ent, p.shape[-1]) if valid is None else valid.float().expand_as(ent)
    return torch.where(n > 1, ent / n.clamp_min(2).log(), torch.zeros_like(ent))


def diagnose_model(
    model: nn.Module,
    head_name: str,
    data,
    ctx,
    device: str,
    batch_size: int,
    terms: tuple[CausalTerm, ...] | None = None,
) -> list[TermDiagnosis]:
    """Every declared term of `model` (the registry's for `head_name`, or `terms`) on one split (`data`, as
    `train.data` loads it)."""
    modules = dict(model.named_modules())
    scores, labels = _run(model, data, ctx, device, batch_size, [])
    own = _primary(scores, labels, ctx.multi_label)
    out = []
    for term, path in head_terms(model, head_name, terms):
        wpath = path[: len(path) - len(term.module)] + (term.weights_module or term.module)
        weigher = modules[wpath] if term.weights is not None else None
        run = lambda hooks: _run(model, data, ctx, device, batch_size, hooks)  # noqa: E731
        out.append(_diagnose_term(model, term, modules[path], weigher, run, labels, own, ctx.multi_label, device))
    return out


def _diagnose_term(model, term, module, weigher, run, labels, own, multi_label, device) -> TermDiagnosis:
    current = {}  # the batch size of the forward pass in flight
    seen: list[torch.Tensor] = []
    ratios: list[torch.Tensor] = []
    batched = []  # whether the term is per video (B, ...) or one tensor shared by the batch

    def record(m, a, k, o):
        B = current["B"]
        per_video = o.dim() > 1 and o.shape[0] == B
        batched.append(per_video)
        y = o.detach().float().cpu()
        seen.append(y if per_video else y.unsqueeze(0).expand(B, *y.shape))  # a shared term: the same per video

    def weigh(m, a, k, o):
        ratios.append(_entropy_ratio(*term.weights(m, a, k, o)))

    hooks = [(model, lambda m, a, k: current.update(B=a[0].mask.shape[0]), "pre"), (module, record, "post")]
    if weigher is not None:
        hooks.append((weigher, weigh, "post"))
    run(hooks)
    ys = torch.cat(seen)  # (N, ...): the term for every video
    bias = _bias(module)
    centred = ys - bias.float().cpu() if bias is not None else ys  # the learned bias is no variation
    mean = ys.mean(0, keepdim=True)  # ȳ (1, ...)
    spread = (ys - mean).flatten(1).norm(dim=1).mean()
    size = ys.flatten(1).norm(dim=1).mean()
    if centred.flatten(1).norm(dim=1).mean() <= 1e-6 * size:  # the term is its bias alone: constant
        centred = ys
    variation = float(spread / centred.flatten(1).norm(dim=1).mean().clamp_min(1e-12)) if spread > 1e-6 * size else 0.0
    mean_c = centred.mean(0, keepdim=True).flatten(1)  # (1, F)
    cosine = float(torch.nn.functional.cosine_similarity(centred.flatten(1), mean_c, dim=1).mean())
    kos = []
    for fill in (mean.to(device), torch.zeros_like(mean).to(device)):

        def replace_output(m, a, k, o, f=fill):
            return (f.expand_as(o) if batched[0] else f[0]).to(o.dtype)

        replaced, _ = run([(module, replace_output, "post")])
        kos.append(100 * (_primary(replaced, labels, multi_label) - own))
    entropy = float(torch.cat([r.flatten() for r in ratios]).mean()) if ratios else None
    return TermDiagnosis(term, variation, cosine, own, kos[0], kos[1], entropy)


def diagnose(
    checkpoint: Path, split: str, store: Path | None = None, cfg=None, out_dir: Path | None = None, trust: bool = False
):
    """Diagnose a run (its folder or a checkpoint) on a split; write diagnose-<split>.md/.csv/.png."""
    from train.engine import RunError, _load, load_run

    checkpoint = Path(checkpoint)
    if checkpoint.is_dir():
        checkpoint = checkpoint / "last.pt"
    if not checkpoint.exists():
        raise RunError(f"checkpoint {checkpoint} does not exist; pass a run folder or its last.pt / best.pt")
    run = load_run(checkpoint, store, cfg, trust=trust)
    ckpt, reader, ctx, device, model = run.ckpt, run.reader, run.ctx, run.device, run.model
    if split not in reader.info.splits:
        raise RunError(f"split {split!r} is not in {reader.path}; it holds {sorted(reader.info.splits)}")
    data = _load(reader, split, run.cfg, device)
    rows = diagnose_model(model, ckpt["head"], data, ctx, device, run.cfg.train.batch_size)
    title = f"{ckpt['head']}{':' + ckpt['variant'] if ckpt['variant'] else ''} ({ckpt['task']}) on {split}"
    files = write_diagnosis(rows, Path(out_dir or checkpoint.parent), split, title, ctx.multi_label)
    return rows, files


def write_diagnosis(rows: list[TermDiagnosis], out: Path, split: str, title: str, multi_label: bool) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    metric = "mAP" if multi_label else "Acc@1"
    lines = [
        f"Diagnosis of {title}: variation = relative spread of the term over the split's videos (its learned bias "
        f"excluded), cosine = mean cosine to the split mean, knock-out = {metric} change in points with the term "
        "replaced by its split mean / by zero, entropy = of its weights / log K (1 = uniform).",
        "",
        f"| term | symbol | variation | cosine | {metric} | knock-out mean | knock-out zero | entropy |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ent = "—" if r.entropy is None else f"{r.entropy:.3f}"
        lines.append(
            f"| {r.term.name} | `{r.term.symbol}` | {r.variation:.4f} | {r.cosine:.3f} | {100 * r.metric:.1f} | "
            f"{r.ko_mean:+.1f} | {r.ko_zero:+.1f} | {ent} |"
        )
    if not rows:
        lines.append("| (the head declares no causal term, or every declared module is switched off) | | | | | | | |")
    md = out / f"diagnose-{split}.md"
    md.write_text("\n".join(lines) + "\n")
    path_csv = out / f"diagnose-{split}.csv"
    with path_csv.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["term", "symbol", "module", "variation", "cosine", "metric", "ko_mean", "ko_zero", "entropy"])
        for r in rows:
            w.writerow(
                [r.term.name, r.term.symbol, r.term.module, f"{r.variation:.6f}", f"{r.cosine:.6f}", f"{r.metric:.6f}"]
                + [f"{r.ko_mean:.4f}", f"{r.ko_zero:.4f}", "" if r.entropy is None else f"{r.entropy:.6f}"]
            )
    fig, axes = plt.subplots(1, 2, figsize=(8, 2.5 + 0.3 * len(rows)))
    names = [r.term.name for r in rows]
    y = np.arange(len(rows))
    axes[0].barh(y, [r.variation for r in rows], color="tab:blue")
    axes[0].set_yticks(y, names)
    axes[0].set_xlabel("variation over videos")
    axes[1].barh(y - 0.2, [r.ko_mean for r in rows], height=0.4, label="split mean", color="tab:orange")
    axes[1].barh(y + 0.2, [r.ko_zero for r in rows], height=0.4, label="zero", color="tab:red")
    axes[1].set_yticks(y, names)
    axes[1].axvline(0, color="k", lw=0.5)
    axes[1].set_xlabel(f"knock-out Δ {metric} (points)")
    axes[1].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    png = out / f"diagnose-{split}.png"
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return [md, path_csv, png]


def headline(rows: list[TermDiagnosis]) -> str:
    """One table cell: `term var 0.012 KO -3.1` per term (knock-out by the split mean)."""
    if not rows:
        return "—"
    return "; ".join(f"{r.term.name} var {r.variation:.3f} KO {r.ko_mean:+.1f}" for r in rows)
