"""`ltar ground-check`: is the grounding indicator decisive, and does the mask it learned minimise its own objective?

IGV / EIGV train an indicator that splits each video's frames into causal frames c and environment frames e.
If the indicator works, the mask it chooses should score at least as well on the training objective as any
other mask of the same budget, and the ground-truth action frames (the oracle mask) should be among the best
on a world whose shortcut lives in the environment. This module evaluates a trained grounded run's objective
with the mask held fixed, mask by mask, on one split (by default `train`, the objective's own data):

- `learned`: the indicator's causal frames, noise-free (its `per_frame` decision, or its `budget`'s top frames);
- `learned_noisy`: the same scores with one draw of the training noise (logistic × `noise_scale`; std π/√3 ≈ 1.81
  at scale 1): the masks training actually saw;
- `oracle`: frames inside the annotated action segments first (random order among them), to the same budget (the
  budget: the `budget` indicator's `causal_share`; for the `per_frame` indicator, the learned mask's own size in
  each video, so every mask below is compared at the size the indicator chose);
- `oracle_unbudgeted`: every annotated action frame causal (at least one frame on each side);
- `idle_first`: frames outside every segment first, to the budget;
- `random`: the budget's worth of frames drawn at random;
- `untrained`: the top frames of a freshly initialised indicator (seeded).

For each mask: the objective as the run trains it — `L(head(c), y) + swap_weight · L(head(c ⊕ e_π), y) +
env_weight · L(head(e), uninformative)`, and for EIGV (`mix: paper`) `+ mix_weight · L(head(v_mix), λ1 y + (1 - λ1)
y_π) + contrast_weight · InfoNCE(anchor, positive, negatives)` (EIGV's paper objective, `igv_terms: false`: its
mixup and its contrastive disruptor; the IGV terms are shown, weighted 0; the mixed video's causal slots, which
training re-grounds with the indicator, are the slots where either source video's fixed causal frame lies) —
with its terms, the share of real frames marked causal, and the mask's frame IoU / precision against the
annotated segments beside the exact random expectation. Each side of the split is read as training reads it
(`empty_side`). The derangements, bank draws and EIGV's λ's are drawn from one seed, the same for every mask, so
the masks are compared on the same interventions. Also reported: the indicator's decisiveness, the mean
within-video standard deviation of its frame scores against the std of the noise it is sampled with (a ratio far
below 1: the training masks are nearly random). A label-conditioned indicator (EIGV's code) is scored on the
split's labels, as in training.

A run of the oracle indicator (`igv_oracle`, IGV's losses trained on the annotated frames) is checked too: its
`learned` mask is the annotation itself, so its `learned` objective is what IGV's objective reaches when the head
is trained on the true split, the comparison for a learned indicator's `learned` objective on a head co-trained
with its own mask (which favours that mask: a learned mask beating `oracle` on its own head is no evidence that
the objective prefers it; beating the oracle run's trained objective would be).

A learned mask whose objective is worse than the oracle's on its own trained head is an optimisation defect of the
indicator (the head was trained on the learned masks, which favours them). Writes `ground-check-<split>.md` and
`.csv` beside the checkpoint. The substituted environments are the run's own: drawn from its saved bank
(`env_source: bank`) or the batch.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from train.data import iterate_batches
from train.grounding import (
    FrameScorer,
    Grounded,
    causal_budget,
    causal_view,
    derangement,
    eigv_mixed_batch,
    environment_view,
    frame_relevance,
    frozen_memories,
    grounding_scores,
    info_nce_negatives,
    one_hot_targets,
    per_frame_causal,
    ranks,
    soft_loss,
    swap_keep,
    swapped_view,
)
from train.heads import Batch

MASKS = ("learned", "learned_noisy", "oracle", "oracle_unbudgeted", "idle_first", "random", "untrained")
LOGISTIC_STD = math.pi / math.sqrt(3)  # std of the standard logistic noise of the binary Gumbel-softmax
CHECK_SEED = 0  # the interventions' draws (derangements, λ's, random masks, the untrained indicator)


@dataclass
class MaskObjective:
    mask: str
    objective: float  # the training objective with this mask fixed (mean over the split's batches)
    terms: dict[str, float]  # causal, swapped, env (and mix for EIGV), unweighted
    causal_share: float  # share of the real frames marked causal
    ground: dict[str, float]  # frame IoU / precision against the annotated segments (and their random values)


def top_by(priority: torch.Tensor, mask: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The k[b] real frames of highest priority in each video: (B, L), (B, L), (B,) -> (B, L) bool."""
    return (ranks(priority, mask) < k.unsqueeze(1)) & mask


def fixed_masks(
    model: Grounded, batch: Batch, relevant: torch.Tensor, untrained: FrameScorer, g: torch.Generator
) -> dict[str, torch.Tensor]:
    """Every mask of `MASKS` for one batch: name -> (B, L) bool causal frames. relevant (B, L): action frames."""
    o, mask = model.opts, batch.mask
    scores = indicator_scores(model, batch)  # (B, L)
    tie = torch.rand(mask.shape, generator=g).to(mask.device)  # (B, L) random order within a group
    u = torch.rand(mask.shape, generator=g).clamp(1e-6, 1 - 1e-6).to(mask.device)
    noisy = scores + o.noise_scale * (u.log() - (-u).log1p())  # one draw of the training noise
    if o.indicator == "oracle":  # IGV's losses trained on the annotated frames: its own split is the learned mask
        learned = learned_noisy = model.oracle_split(batch)[0]
        k = learned.sum(1)
    elif o.indicator == "per_frame":
        fallback = o.empty_side == "whole_video"
        learned = per_frame_causal(scores, mask, fallback)
        k = learned.sum(1)  # (B,): the other masks at the learned mask's size, video by video
        learned_noisy = per_frame_causal(noisy, mask, fallback)
    else:
        k = causal_budget(mask, o.causal_share)  # (B,), as the indicator's own split
        learned, learned_noisy = top_by(scores, mask, k), top_by(noisy, mask, k)
    first_actions = relevant.float() + 0.5 * tie  # every action frame ranks above every idle frame
    # every action frame, kept within [1, n - 1] causal frames as the indicator's split is
    every = (relevant & mask).sum(1).clamp(max=(mask.sum(1) - 1).clamp_min(1)).clamp_min(1)  # (B,)
    return {
        "learned": learned,
        "learned_noisy": learned_noisy,
        "oracle": top_by(first_actions, mask, k),
        "oracle_unbudgeted": top_by(first_actions, mask, every),
        "idle_first": top_by((~relevant).float() + 0.5 * tie, mask, k),
        "random": top_by(tie, mask, k),
        "untrained": top_by(untrained(batch.vp.float(), batch.t0.float()), mask, k),
    }


def indicator_scores(model: Grounded, batch: Batch) -> torch.Tensor:
    """The indicator's frame scores (B, L) as training computes them: a label-conditioned indicator (EIGV's code)
    on the batch's labels."""
    y = one_hot_targets(batch.labels, model.num_classes, model.multi_label)  # (B, C)
    return model.indicator(batch.vp.float(), batch.t0.float(), model.query(y))


def objective_terms(model: Grounded, batch: Batch, hard: torch.Tensor, g: torch.Generator) -> dict[str, torch.Tensor]:
    """The run's training losses with the causal frames fixed to `hard` (B, L): causal, swapped, env (and, for
    EIGV's paper form, mix and contrast); the interventions drawn from `g` (seeded, so the same for every mask).
    Each side of the split is read as training reads it (`empty_side`). EIGV's contrastive term takes the mixed
    video's causal slots from the fixed mask as well: the slots where either source video's causal frame lies."""
    o, head, B = model.opts, model.head, hard.shape[0]
    w = hard.float()
    y = one_hot_targets(batch.labels, model.num_classes, model.multi_label)  # (B, C)
    C = y.shape[1]
    uninformative = y.mean(0, keepdim=True).expand_as(y) if model.multi_label else torch.full_like(y, 1 / C)
    if o.empty_side == "whole_video":  # ours, earlier: an empty causal side keeps every frame
        hard = torch.where(hard.any(1, keepdim=True), hard, batch.mask)
        w = hard.float()
    with torch.random.fork_rng(devices=[]), frozen_memories(head):  # seeded interventions; memories untouched
        torch.manual_seed(int(torch.randint(2**31, (1,), generator=g)))
        source, perm = model.environments(batch, 1)  # the run's own environments: its bank, or the batch
        weight, keep = swap_keep(w, hard, batch.mask, detach=True)
        terms = {
            "causal": soft_loss(head(causal_view(batch, w, hard)), y, model.multi_label),
            "swapped": soft_loss(head(swapped_view(batch, weight, keep, perm[0], source=source)), y, model.multi_label),
            "env": soft_loss(head(environment_view(batch, w, hard, o.empty_side)), uninformative, model.multi_label),
        }
        if o.method == "eigv" and o.mix == "paper" and B > 1:
            lam1, lam2 = model.sample_lambdas(hard.device)
            mix_perm = derangement(B, hard.device)
            target = lam1 * y + (1 - lam1) * y[mix_perm]
            mixed = eigv_mixed_batch(batch, w, mix_perm, lam1, lam2)
            mix_logits = head(mixed)
            terms["mix"] = soft_loss(mix_logits, target, model.multi_label)
            if o.contrast_weight > 0:
                mix_hard = (hard | hard[mix_perm]) & mixed.mask  # (B, L) slots holding a causal frame
                avoid = None if batch.ids is None else torch.stack([batch.ids, batch.ids[mix_perm]], 1)
                pos, negs = model.disrupted_views(batch, mixed, mix_hard.float(), mix_hard, avoid)
                z = model.project(torch.cat([mix_logits, head(pos), head(negs)], 0).float())
                N = o.contrast_negatives
                terms["contrast"] = info_nce_negatives(z[:B], z[B : 2 * B], z[2 * B :].view(N, B, -1), o.contrast_tau)
    return terms


def weighted(model: Grounded, terms: dict[str, float]) -> float:
    """The run's training objective from its terms: IGV's three (when it trains them) and EIGV's mixup and
    contrastive disruptor at their weights."""
    o = model.opts
    igv = 1.0 if o.igv_terms else 0.0  # EIGV's paper objective: its mixup and contrastive terms alone
    weights = {
        "causal": igv,
        "swapped": igv * o.swap_weight,
        "env": igv * o.env_weight,
        "mix": o.mix_weight,
        "contrast": o.contrast_weight,
    }
    return sum(weights[k] * v for k, v in terms.items())


@torch.no_grad()
def mask_objectives(
    run_dir_or_checkpoint: Path,
    split: str = "train",
    store: Path | None = None,
    cfg: Any = None,
    trust: bool = False,
) -> tuple[list[MaskObjective], dict[str, float]]:
    """Every fixed mask's objective on `split` for a grounded run (IGV or EIGV); also the indicator's decisiveness
    {score_spread, noise_std, ratio}. Raises for a run without an indicator."""
    from train.engine import RunError, _load, load_run

    path = Path(run_dir_or_checkpoint)
    checkpoint = path / "last.pt" if path.is_dir() else path
    run = load_run(checkpoint, store, cfg, trust=trust)  # cfg: the caller's cache and dataset location
    model = run.model
    if not isinstance(model, Grounded) or model.indicator is None:
        raise RunError(
            f"{checkpoint}: `ltar ground-check` needs a run with a grounding indicator (grounding.<name>.method igv "
            "or eigv); this run has none"
        )
    model.eval()
    data = _load(run.reader, split, run.cfg, run.device)
    relevant_all = frame_relevance(run.cfg, run.reader, data.rows)
    if relevant_all is None:
        raise RunError(
            f"{checkpoint}: the store {run.reader.info.path} holds no annotated action segments to check against"
        )
    oracle = model.opts.indicator == "oracle"  # its mask is the annotation: the objective the oracle trained to
    if oracle:
        model.oracle_frames = torch.from_numpy(relevant_all)
    torch.manual_seed(CHECK_SEED)
    untrained = FrameScorer(run.ctx.clip_dim, model.opts.dim).to(run.device)  # seeded fresh initialisation
    g = torch.Generator().manual_seed(CHECK_SEED)
    sums = {m: {} for m in MASKS}
    used = {m: np.zeros(relevant_all.shape, dtype=bool) for m in MASKS}
    real = np.zeros(relevant_all.shape, dtype=bool)
    spreads, batches = [], 0
    dicts = {k: (c.to(run.device), p.to(run.device)) for k, (c, p) in run.ctx.dictionaries.items()}
    for pos, batch in iterate_batches(data, run.cfg.train.batch_size, run.ctx.t0.to(run.device), dicts, run.device):
        relevant = torch.from_numpy(relevant_all[pos]).to(batch.mask.device)  # (B, L)
        scores = indicator_scores(model, batch)  # (B, L)
        m = batch.mask.float()
        mean = (scores * m).sum(1) / m.sum(1).clamp_min(1)
        spreads.append((((scores - mean[:, None]) ** 2 * m).sum(1) / (m.sum(1) - 1).clamp_min(1)).sqrt().cpu())
        masks = fixed_masks(model, batch, relevant, untrained, g)
        state = g.get_state()
        for name, hard in masks.items():
            g.set_state(state)  # the same interventions for every mask
            for k, v in objective_terms(model, batch, hard, g).items():
                sums[name][k] = sums[name].get(k, 0.0) + float(v)
            used[name][pos] = hard.cpu().numpy()
        real[pos] = batch.mask.cpu().numpy()
        batches += 1
    out = []
    for name in MASKS:
        terms = {k: v / batches for k, v in sums[name].items()}
        share = float(used[name].sum() / max(real.sum(), 1))
        out.append(
            MaskObjective(name, weighted(model, terms), terms, share, grounding_scores(used[name], relevant_all, real))
        )
    spread = float(torch.cat(spreads).mean()) if not oracle else float("nan")  # the oracle's scorer is unused
    noise_std = LOGISTIC_STD * model.opts.noise_scale
    return out, {"score_spread": spread, "noise_std": noise_std, "ratio": spread / max(noise_std, 1e-12)}


def write_check(
    rows: list[MaskObjective], decisive: dict[str, float], out_dir: Path, split: str, title: str
) -> list[Path]:
    """ground-check-<split>.md and .csv."""
    term_names = list(dict.fromkeys(k for r in rows for k in r.terms))
    md = out_dir / f"ground-check-{split}.md"
    lines = [
        f"# Grounding objective under fixed masks: {title} on {split}",
        "",
        "The run's training objective with its causal-frame mask held fixed (the same interventions for every mask); "
        "lower is better. A learned mask worse than `oracle` is an optimisation defect of the indicator.",
        f"Indicator decisiveness: within-video std of its frame scores {decisive['score_spread']:.3f} against the "
        f"training noise's std {decisive['noise_std']:.3f} (ratio {decisive['ratio']:.3f}).",
        "",
        "| mask | objective | "
        + " | ".join(term_names)
        + " | causal share | frame IoU | IoU random | precision | precision random |",
        "|---|" + "---:|" * (len(term_names) + 6),
    ]
    for r in rows:
        vals = [
            f"{r.objective:.4f}",
            *(f"{r.terms.get(k, float('nan')):.4f}" for k in term_names),
            f"{r.causal_share:.3f}",
        ]
        gs = r.ground
        vals += [
            f"{gs['ground_iou']:.3f}",
            f"{gs['ground_iou_random']:.3f}",
            f"{gs['ground_precision']:.3f}",
            f"{gs['ground_precision_random']:.3f}",
        ]
        lines.append(f"| {r.mask} | " + " | ".join(vals) + " |")
    md.write_text("\n".join(lines) + "\n")
    path_csv = out_dir / f"ground-check-{split}.csv"
    with path_csv.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["mask", "objective", *term_names, "causal_share", *rows[0].ground, "score_spread", "noise_std"])
        for r in rows:
            w.writerow(
                [r.mask, f"{r.objective:.6f}", *(f"{r.terms.get(k, float('nan')):.6f}" for k in term_names)]
                + [f"{r.causal_share:.6f}", *(f"{v:.6f}" for v in r.ground.values())]
                + [f"{decisive['score_spread']:.6f}", f"{decisive['noise_std']:.6f}"]
            )
    return [md, path_csv]


def _num(x: float) -> str:
    return "—" if math.isnan(x) else f"{x:.3f}"


def write_table_check(
    checks: dict[str, tuple[list[MaskObjective], dict[str, float]]], out_root: Path, name: str
) -> list[Path]:
    """A table's fixed-mask objectives, one row per grounded row (seed 0's run): <name>-ground-check.md and .csv."""
    md, path_csv = out_root / f"{name}-ground-check.md", out_root / f"{name}-ground-check.csv"
    lines = [
        f"# Grounding objective under fixed masks: table `{name}`, seed 0, train split",
        "",
        "Each grounded row's training objective with its causal-frame mask held fixed, on the same interventions for "
        "every mask (lower is better; `ltar ground-check` on the run). The masks other than `learned_noisy` and "
        "`oracle_unbudgeted` have the learned mask's size in every video. Decisiveness: the within-video std of the "
        "indicator's frame scores over the std of its training noise. IoU: the learned mask's frame IoU against the "
        "annotated segments (random: the exact expectation at its size).",
        "",
        "| row | decisiveness | learned share | learned IoU | IoU random | " + " | ".join(MASKS) + " |",
        "|---|" + "---:|" * (4 + len(MASKS)),
    ]
    for row, (rows, decisive) in checks.items():
        by = {r.mask: r for r in rows}
        learned = by["learned"]
        best = min(r.objective for r in rows)
        objectives = [
            f"**{by[m].objective:.3f}**" if by[m].objective == best else f"{by[m].objective:.3f}" for m in MASKS
        ]
        lines.append(
            f"| {row} | {_num(decisive['ratio'])} | {learned.causal_share:.2f} | {learned.ground['ground_iou']:.3f} | "
            f"{learned.ground['ground_iou_random']:.3f} | " + " | ".join(objectives) + " |"
        )
    lines += [
        "",
        "Bold: the lowest objective of the row. A row with the oracle indicator (decisiveness —) was trained on the "
        "annotated frames: its `learned` is the objective IGV's losses reach with the true split given, the figure "
        "to hold a learned row's `learned` against (a learned mask is favoured on its own co-trained head).",
    ]
    md.write_text("\n".join(lines) + "\n")
    with path_csv.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "row",
                "mask",
                "objective",
                "causal_share",
                "ground_iou",
                "ground_iou_random",
                "score_spread",
                "noise_std",
                "decisiveness",
            ]
        )
        for row, (rows, decisive) in checks.items():
            for r in rows:
                w.writerow(
                    [
                        row,
                        r.mask,
                        f"{r.objective:.6f}",
                        f"{r.causal_share:.6f}",
                        f"{r.ground['ground_iou']:.6f}",
                        f"{r.ground['ground_iou_random']:.6f}",
                        f"{decisive['score_spread']:.6f}",
                        f"{decisive['noise_std']:.6f}",
                        f"{decisive['ratio']:.6f}",
                    ]
                )
    return [md, path_csv]


def ground_check(
    run_dir_or_checkpoint: Path,
    split: str = "train",
    store: Path | None = None,
    cfg: Any = None,
    trust: bool = False,
) -> tuple[list[MaskObjective], dict[str, float], list[Path]]:
    """`mask_objectives` and the files beside the checkpoint."""
    path = Path(run_dir_or_checkpoint)
    rows, decisive = mask_objectives(path, split, store, cfg, trust)
    out_dir = path if path.is_dir() else path.parent
    return rows, decisive, write_check(rows, decisive, out_dir, split, out_dir.name)
